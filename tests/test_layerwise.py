"""``l2fx.layerwise.model_hessians``: the uncompressed model's Hessians and MACs per layer."""
from __future__ import annotations

import torch
from torch import nn

from l2fx.config import CompileConfig
from l2fx.frontend import capture
from l2fx.layerwise import model_hessians
from l2fx.method import structural_pipeline
from l2fx.passes import MarkWeights
from l2fx.pipeline import PassContext, PassManager


def marked(model: nn.Module, batch):
    """The model captured, through the structural passes and ``mark_weights`` (under the verifier)."""
    gm, _ = capture(model, batch)
    with PassContext(config=CompileConfig(min_numel=1), calib=[batch], verify=True):
        return PassManager([*structural_pipeline().passes, MarkWeights()])(gm).graph_module


class _ConvFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_hessians_are_those_of_the_fp32_inputs_and_macs_count_every_output():
    torch.manual_seed(0)
    model = _ConvFc().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(6, 2, 5, 5, generator=g) for _ in range(2)]
    gm = marked(model, calib[0])
    stats = model_hessians(gm, calib, torch.device("cpu"), {"fc.weight"})
    assert set(stats) == {"conv.weight", "fc.weight"}
    # MACs per sample: output elements x the weight's flatten(1) width.
    assert stats["conv.weight"].macs == 4 * 5 * 5 * 2 * 9
    assert stats["fc.weight"].macs == 3 * 100
    assert stats["conv.weight"].hessians is None  # not asked for
    with torch.no_grad():
        X = torch.cat([torch.relu(model.conv(x)).flatten(1) for x in calib]).double()
    H = stats["fc.weight"].hessians[0]
    assert stats["fc.weight"].nsamples == 12
    torch.testing.assert_close(H, 2 * X.T @ X / 12, rtol=1e-6, atol=1e-9)
