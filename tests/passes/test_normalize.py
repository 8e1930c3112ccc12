"""passes/normalize.py: in-place ops survive dead-code elimination, and graph inputs written
in place are read through a copy (the calibration batches are run many times)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

import l2fx
from l2fx.inplace import written_inputs
from l2fx.passes import Normalize
from l2fx.pipeline import PassContext, PassManager


class _WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(128, 128)
        self.out = nn.Linear(128, 8)

    def forward(self, x):
        x.mul_(2)                      # a statement: fx's own dead-code pass would drop it
        h = torch.relu(self.lin(x))
        return self.out(h)


def test_normalize_keeps_statement_inplace_and_clones_written_input():
    model = _WritesItsInput().eval()
    with PassContext(verify=True):
        gm = PassManager([Normalize()])(fx.symbolic_trace(model)).graph_module
    assert any(n.target == "mul_" for n in gm.graph.nodes)
    assert written_inputs(gm) == []
    x = torch.randn(3, 128)
    kept = x.clone()
    torch.testing.assert_close(gm(x), model(x.clone()), rtol=0, atol=0)
    assert torch.equal(x, kept)


def test_compile_of_a_model_that_writes_its_input_leaves_calibration_intact():
    model = _WritesItsInput().eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 128, generator=gen) for _ in range(2)]
    kept = [c.clone() for c in calib]
    cfg = l2fx.CompileConfig(reconstruction=l2fx.ReconstructionConfig(transform_iters=3, weight_iters=3))
    compiled = l2fx.compile(model, target_cr=4, calib=calib, config=cfg)
    assert all(torch.equal(c, k) for c, k in zip(calib, kept))
    x = torch.randn(5, 128, generator=gen)
    with torch.no_grad():
        ref = model(x.clone())
        err = float((compiled(x) - ref).pow(2).sum() / ref.pow(2).sum())
    assert err < 0.05, err
