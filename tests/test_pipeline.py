"""Pass infrastructure: ordering, user passes under the verifier and instruments, verifier messages."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx

import l2fx
from l2fx.errors import PassError, VerifierError
from l2fx.frontend import capture
from l2fx.ir import WeightSite, meta_entry, set_meta, weight_sites
from l2fx.method import default_pipeline, structural_pipeline
from l2fx.passes import MarkWeights, Normalize
from l2fx.pipeline import DumpIR, L2fxPass, PassContext, PassManager, PassResult, Timing, verify


@meta_entry
@dataclasses.dataclass(frozen=True)
class FanOut:
    META_KEY = "test.fanout"
    users: int


class CountUsers(L2fxPass):
    """A user pass: records, for every compressed weight, how many nodes read it."""

    name = "count_users"

    def call(self, gm):
        for node, _ in weight_sites(gm):
            set_meta(node, FanOut(len(node.users)))
        return PassResult(gm, True)

    def ensures(self, gm):
        for node, _ in weight_sites(gm):
            if "test.fanout" not in node.meta:
                self.fail("weight without fan-out", node)


def test_custom_pass_runs_in_place_under_verifier_and_instruments(tiny_convnet, tiny_calib, fast_config, tmp_path):
    pipeline = default_pipeline().insert_after("insert_transforms", CountUsers())
    names = pipeline.names
    assert names.index("count_users") == names.index("insert_transforms") + 1
    timing = Timing()
    compiled = l2fx.compile(tiny_convnet, target_cr=8, calib=tiny_calib, config=fast_config, pipeline=pipeline,
                            instruments=[timing, DumpIR(tmp_path / "ir")], verify=True)
    assert "count_users" in timing.seconds and "count_users" in compiled.report.pass_seconds
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert any(name.endswith("_count_users.txt") for name in dumps)
    fanouts = [n.meta["test.fanout"] for n in compiled.graph_module.graph.nodes if "test.fanout" in n.meta]
    assert fanouts and all(f.users == 1 for f in fanouts)


def test_insert_relative_to_unknown_pass_fails():
    with pytest.raises(PassError, match="no pass named"):
        default_pipeline().insert_before("does_not_exist", CountUsers())
    with pytest.raises(PassError, match="already"):
        default_pipeline().append(CountUsers()).append(CountUsers())


class BreakMeta(L2fxPass):
    name = "break_meta"

    def call(self, gm):
        node = next(iter(gm.graph.nodes))
        node.meta["l2fx.site"] = "not a WeightSite"
        return PassResult(gm, True)


class BreakGraph(L2fxPass):
    name = "break_graph"

    def call(self, gm):
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                node.target = "no.such.tensor"
                break
        return PassResult(gm, True)


@pytest.mark.parametrize("bad, message", [(BreakMeta(), "holds str, expected WeightSite"),
                                          (BreakGraph(), "does not exist")])
def test_verifier_names_pass_and_node(tiny_convnet, bad, message):
    gm = fx.symbolic_trace(tiny_convnet)

    pm = PassManager([Normalize(), bad])
    with PassContext(verify=True):
        with pytest.raises(VerifierError) as info:
            pm(gm)
    text = str(info.value)
    assert f"after pass {bad.name!r}" in text and "node" in text and message in text


def test_passes_need_a_context(tiny_convnet):

    with pytest.raises(PassError, match="PassContext"):
        MarkWeights().call(fx.symbolic_trace(tiny_convnet))


def test_structural_passes_are_idempotent(tiny_convnet):

    gm, _ = capture(tiny_convnet, None)
    with PassContext(verify=True):
        gm = structural_pipeline()(gm).graph_module
        code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
        result = structural_pipeline()(gm)
    assert not result.modified
    assert result.graph_module.code == code
    assert all(torch.equal(state[k], v) for k, v in result.graph_module.state_dict().items())


def test_fold_batchnorm_preserves_outputs(tiny_convnet):

    x = torch.randn(4, 1, 28, 28)
    gm, _ = capture(tiny_convnet, x)  # a deep copy: passes rewrite parameters
    with PassContext(verify=True):
        gm = structural_pipeline()(gm).graph_module
    assert not any("batch_norm" in str(n.target) for n in gm.graph.nodes)
    assert not any(k.startswith(("b1.", "b2.")) for k in gm.state_dict())
    torch.testing.assert_close(gm(x), tiny_convnet(x), rtol=1e-5, atol=1e-5)


def test_meta_entry_requires_namespaced_key():
    with pytest.raises(PassError):
        @meta_entry
        @dataclasses.dataclass(frozen=True)
        class Bad:
            META_KEY = "nonamespace"


def test_verify_accepts_compiled_graph(tiny_convnet, tiny_calib, fast_config):
    compiled = l2fx.compile(tiny_convnet, target_cr=8, calib=tiny_calib, config=fast_config)
    verify(compiled.graph_module, after="final")
    sites = list(weight_sites(compiled.graph_module))
    assert sites and all(isinstance(site, WeightSite) for _, site in sites)


class _WritesThroughAView(torch.nn.Module):
    """``y += 1`` on a view of the input: eager mode writes into ``x``; fx records ``y = y + 1``."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = x[:, :2]
        y += 1
        return self.lin(x)


def test_capture_rejects_an_fx_graph_that_computes_something_else():
    from l2fx.errors import CaptureError
    from l2fx.frontend import capture

    model = _WritesThroughAView().eval()
    x = torch.randn(3, 8)
    with pytest.raises(CaptureError, match="does not reproduce the model"):
        capture(model, x, frontend="fx")
    gm, info = capture(model, x)  # auto: export, which keeps the write
    assert info.frontend == "export"
    torch.testing.assert_close(gm(x.clone()), model(x.clone()))
    gm, info = capture(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), x)
    assert info.frontend == "fx"
