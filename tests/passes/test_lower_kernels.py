"""passes/lower_kernels.py: CodedWeight + linear -> DequantLinear (torch.ops.l2fx.dequant_matmul).

On CPU ``use_triton="always"`` lowers anyway and the custom op runs its torch reference, so
these tests exercise the lowered graph, the artifact and ``torch.compile`` without a GPU.
Two l2fx.compile runs (reconstruction off, ~7 s each on 2 CPU cores), shared per module.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import l2fx
from l2fx.config import BackendConfig, CompileConfig, ReconstructionConfig, SensitivityConfig
from l2fx.ir import CodedInfo, WeightSite, get_meta, replace_weight, set_meta
from l2fx.modules import CodedWeight
from l2fx.api import lower
from l2fx.modules import DequantConv1x1, DequantLinear
from l2fx.passes.lower_kernels import LowerKernels
from l2fx.pipeline import PassContext, PassManager
from l2fx.transform import TransformKind

from conftest import DictInputNet, make_tiny_convnet

ALWAYS = BackendConfig(use_triton="always")
_CONFIG = CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=12),
                        reconstruction=ReconstructionConfig(enabled=False))


def _weight_modules(gm: fx.GraphModule) -> dict[str, type]:
    return {name: type(m) for name, m in gm.named_modules() if name.startswith("l2fx_weights.")}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def convnet():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 1, 28, 28, generator=g)
    compiled = l2fx.compile(make_tiny_convnet(), target_cr=8, calib=[x[:16], x[16:32], x[32:]], config=_CONFIG)
    return compiled, x[:16]


@pytest.fixture(scope="module")
def dictnet():
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (8, 12))
    mask = torch.ones(8, 12, dtype=torch.long)
    compiled = l2fx.compile(DictInputNet().eval(), target_cr=6,
                            calib=[{"input_ids": ids, "attention_mask": mask}], config=_CONFIG)
    return compiled, {"input_ids": torch.randint(0, 200, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# Compiled models


def test_convnet_linears_lowered_convs_kept(convnet):
    compiled, x = convnet
    before_graph, before_state = str(compiled.graph_module.graph), _state(compiled)
    expected = compiled(x)
    lowered = lower(compiled, ALWAYS)
    assert _weight_modules(lowered.graph_module) == {
        "l2fx_weights.c2__weight": CodedWeight,  # 3x3 conv: reference path
        "l2fx_weights.fc__weight": DequantLinear,
        "l2fx_weights.out__weight": DequantLinear,
    }
    assert not any(n.op == "call_function" and n.target is F.linear for n in lowered.graph_module.graph.nodes)
    # Both sides decode with the same formula in fp32 and run F.linear on the same fp32 weight
    # (the op's CPU path is the torch reference): measured max |diff| = 0.0, so equality.
    assert torch.equal(lowered(x), expected)
    # The artifact describes the stored model, not the runtime lowering: same bytes.
    assert lowered.artifact_bytes() == compiled.artifact_bytes()
    # state_dict holds what runs: packed words for the lowered layers, no int8 codes.
    sd = lowered.state_dict()
    assert sd["graph_module.l2fx_weights.fc__weight.words"].dtype == torch.int32
    assert not any(k.startswith("graph_module.l2fx_weights.fc__weight.codes") for k in sd)
    # The input is untouched.
    assert str(compiled.graph_module.graph) == before_graph
    assert _weight_modules(compiled.graph_module)["l2fx_weights.fc__weight"] is CodedWeight
    after = compiled.state_dict()
    assert after.keys() == before_state.keys() and all(torch.equal(after[k], before_state[k]) for k in after)
    assert torch.equal(compiled(x), expected)


def test_lowered_node_carries_the_layer_meta(convnet):
    compiled, _ = convnet
    lowered = lower(compiled, ALWAYS)
    nodes = {str(n.target): n for n in lowered.graph_module.graph.nodes if n.op == "call_module"}
    node = nodes["l2fx_weights.fc__weight"]
    assert get_meta(node, WeightSite).param == "fc.weight"
    assert get_meta(node, CodedInfo) is get_meta(
        next(n for n in compiled.graph_module.graph.nodes if str(n.target) == "l2fx_weights.fc__weight"), CodedInfo)
    assert len(node.args) == 2 and node.args[1].op == "get_attr"  # (x, fc.bias)


@pytest.mark.parametrize("use_triton", ["never", "auto"])
def test_never_and_auto_on_cpu_leave_the_graph_unchanged(convnet, use_triton):
    compiled, x = convnet
    gm = copy.deepcopy(compiled.graph_module)
    with PassContext(backend=BackendConfig(use_triton=use_triton)) as ctx:
        result = PassManager([LowerKernels()])(gm)
    assert not result.modified
    assert str(result.graph_module.graph) == str(compiled.graph_module.graph)
    assert _weight_modules(result.graph_module) == _weight_modules(compiled.graph_module)
    assert set(ctx.records["lower_kernels"]["kept"]) == {"c2.weight", "fc.weight", "out.weight"}
    assert torch.equal(lower(compiled, BackendConfig(use_triton=use_triton))(x), compiled(x))


# The whole model, kept CodedWeight (3x3 conv, reference path) and lowered linears together.
# (torch._dynamo is reached through torch.compile: importing it at collection would import
# Triton before the kernel tests set TRITON_INTERPRET.)
def test_convnet_torch_compile_fullgraph(convnet):
    compiled, x = convnet
    lowered = lower(compiled, ALWAYS)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(lowered, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, lowered(x), rtol=0, atol=0)


def test_export_frontend_aten_linear(dictnet):
    compiled, inputs = dictnet
    lowered = lower(compiled, ALWAYS)
    assert _weight_modules(lowered.graph_module) == {
        "l2fx_weights.emb__weight": CodedWeight,  # embedding: reference path
        "l2fx_weights.proj__weight": DequantLinear,
        "l2fx_weights.head__weight": DequantLinear,
    }
    assert not any(n.target is torch.ops.aten.linear.default for n in lowered.graph_module.graph.nodes)
    lowered_node = next(n for n in lowered.graph_module.graph.nodes if str(n.target) == "l2fx_weights.proj__weight")
    assert "val" in lowered_node.meta  # export's output metadata moved from the aten.linear node
    assert torch.equal(lowered(**inputs), compiled(**inputs))  # measured max |diff| = 0.0, as above
    assert lowered.artifact_bytes() == compiled.artifact_bytes()


# --------------------------------------------------------------------------------------------
# A hand-built graph: 1x1 conv, per-tensor parameters, a weight read by two linears, 3x3 conv


def _mixed_forward(x, w_pw, b_pw, w_fc, w_k3=None):
    h = torch.relu(F.conv2d(x, w_pw, b_pw))
    if w_k3 is not None:
        h = F.conv2d(h, w_k3, None, 1, 1)
    p = h.mean((2, 3))
    return F.linear(p, w_fc) + F.linear(2 * p, w_fc)


class _Mixed(nn.Module):
    def __init__(self, with_k3: bool):
        super().__init__()
        self.w_pw = nn.Parameter(torch.zeros(13, 6, 1, 1))
        self.b_pw = nn.Parameter(torch.linspace(-1, 1, 13))
        self.w_fc = nn.Parameter(torch.zeros(5, 13))
        self.w_k3 = nn.Parameter(torch.zeros(13, 13, 3, 3)) if with_k3 else None

    def forward(self, x):
        return _mixed_forward(x, self.w_pw, self.b_pw, self.w_fc, self.w_k3)


def _coded_mixed(with_k3: bool) -> fx.GraphModule:
    """The traced _Mixed with every weight a CodedWeight: w_pw per tensor (joint), w_fc per
    channel (log, K=13 is not a multiple of the 5 fields per 6-bit word), w_k3 per channel.
    e/s is drawn so that |q| s / e <= 2 at |q| = qmax (log weights stay O(e))."""
    g = torch.Generator().manual_seed(3)
    gm = fx.symbolic_trace(_Mixed(with_k3))
    specs = {
        "w_pw": ("conv", TransformKind.JOINT, 7, None),
        "w_fc": ("linear", TransformKind.LOG, 31, 0),
        "w_k3": ("conv", TransformKind.JOINT, 3, 0),
    }
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in specs:
            continue
        family, kind, qmax, axis = specs[node.target]
        shape = tuple(getattr(gm, node.target).shape)
        codes = torch.randint(-qmax, qmax + 1, shape, generator=g)
        channels = 1 if axis is None else shape[0]
        s = torch.rand(channels, generator=g) * 0.05 + 0.01
        e = s * qmax * (torch.rand(channels, generator=g) + 0.5)
        set_meta(node, WeightSite(str(node.target), family, 0, shape))
        replace_weight(gm, node, CodedWeight(codes, kind, s, e, axis))
    return gm


def _run_lowering(gm: fx.GraphModule, backend: BackendConfig = ALWAYS):
    with PassContext(backend=backend, verify=True):
        return PassManager([LowerKernels()])(gm)


def test_mixed_graph_rules_and_fp32_accuracy():
    gm = _coded_mixed(with_k3=True)
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(4))
    weights = {name: gm.get_submodule(f"l2fx_weights.{name}")() for name in ("w_pw", "w_fc", "w_k3")}
    expected = gm(x)
    expected64 = _mixed_forward(x.double(), weights["w_pw"].double(), gm.b_pw.double(), weights["w_fc"].double(),
                                weights["w_k3"].double())
    result = _run_lowering(copy.deepcopy(gm))
    lowered = result.graph_module
    assert result.modified
    assert _weight_modules(lowered) == {"l2fx_weights.w_pw": DequantConv1x1, "l2fx_weights.w_fc": DequantLinear,
                                        "l2fx_weights.w_k3": CodedWeight}
    pw, fc = lowered.l2fx_weights.w_pw, lowered.l2fx_weights.w_fc
    assert pw.step_s.shape == (1,) and pw.channel_axis is None  # stored per-tensor values, as in the artifact
    assert (fc.bits, fc.k, tuple(fc.words.shape)) == (6, 13, (5, 3))
    fc_calls = [n for n in lowered.graph.nodes if n.op == "call_module" and n.target == "l2fx_weights.w_fc"]
    assert len(fc_calls) == 2 and sum(WeightSite.META_KEY in n.meta for n in fc_calls) == 1
    # The 1x1 conv runs as a channels-last GEMM, so its sums are ordered unlike conv2d's: allow
    # twice the error plain fp32 torch has against fp64 on the same graph (measured: plain
    # 1.5e-6, lowered 2.1e-6, at max |y| 14.1).
    got = lowered(x)
    plain_err = (expected.double() - expected64).abs().max().item()
    err = (got.double() - expected64).abs().max().item()
    assert err <= 2 * plain_err + torch.finfo(torch.float32).eps * expected64.abs().max().item()
    # Idempotent: a second run changes nothing.
    again = _run_lowering(lowered)
    assert not again.modified and torch.equal(again.graph_module(x), got)


def test_fully_lowered_graph_torch_compile_fullgraph_matches_eager():
    gm = _run_lowering(_coded_mixed(with_k3=False)).graph_module
    assert not any(isinstance(m, CodedWeight) for m in gm.modules())
    x = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    eager = gm(x)
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True)  # inductor; the op's fake impl gives the shapes
    # no_grad: the op registers no autograd formula, and b_pw is a Parameter requiring grad.
    with torch.no_grad():
        got = compiled(x)
    # Inductor fuses relu + mean + add around the op and sums in its own order: measured max
    # |diff| 1.9e-6 at max |y| 10.8 (1.5 fp32 ulps of the output scale); allow 4 ulps.
    atol = 4 * torch.finfo(torch.float32).eps * eager.abs().max().item()
    torch.testing.assert_close(got, eager, rtol=0, atol=atol)
