"""passes/mark_weights.py: which weights are compressed.

before     a normalized graph: tensors read by get_attr nodes, as the weight of a
           ``WEIGHTED_OPS`` op, as something else, or both; some small, some integer
transform  MarkWeights
expected   a ``WeightSite`` on exactly the floating tensors read only as weights (one family,
           one channel axis) with >= ``min_numel`` elements (embeddings only with
           ``compress_embeddings``); one get_attr, so one site, per tensor; a NaN/inf tensor is a
           NonFiniteWeightError naming it, no site at all a NoCompressibleLayersError.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from l2fx.config import CompileConfig
from l2fx.errors import NoCompressibleLayersError, NonFiniteWeightError
from l2fx.ir import WeightSite, weight_sites
from l2fx.passes import MarkWeights

from conftest import make_tiny_convnet
from pass_cases import marked, run

OPS = {"linear": F.linear, "conv": F.conv2d, "embedding": F.embedding}
AXIS = {"linear": 0, "conv": 0, "embedding": 1}  # F.embedding tables: per hidden dimension


@st.composite
def tensor_specs(draw):
    """Per tensor: family, shape, floating?, how many get_attr nodes read it as a weight, also
    read as something else?"""
    n = draw(st.integers(1, 6))
    specs = []
    for _ in range(n):
        family = draw(st.sampled_from(sorted(OPS)))
        shape = (draw(st.integers(1, 24)), draw(st.integers(1, 24))) + ((3, 3) if family == "conv" else ())
        specs.append(dict(family=family, shape=shape, floating=draw(st.booleans()),
                          weight_reads=draw(st.integers(0, 2)), other_read=draw(st.booleans())))
    return specs


def build(specs) -> fx.GraphModule:
    """The graph reading ``specs``' tensors p0, p1, ... (it is never run: mark_weights only reads it)."""
    root = nn.Module()
    for i, spec in enumerate(specs):
        t = torch.randn(spec["shape"]) if spec["floating"] else torch.randint(-3, 3, spec["shape"])
        root.register_buffer(f"p{i}", t)
    g = fx.Graph()
    x = g.placeholder("x")
    outs = [x]
    for i, spec in enumerate(specs):
        for _ in range(spec["weight_reads"]):  # its own get_attr per read, as normalize makes them
            w = g.get_attr(f"p{i}")
            outs.append(g.call_function(OPS[spec["family"]], (x, w)))
        if spec["other_read"]:
            outs.append(g.call_function(torch.sum, (g.get_attr(f"p{i}"),)))
    g.output(tuple(outs))
    return fx.GraphModule(root, g)


def expected_sites(specs, cfg: CompileConfig) -> dict[str, WeightSite]:
    out = {}
    for i, spec in enumerate(specs):
        numel = 1
        for d in spec["shape"]:
            numel *= d
        if (spec["floating"] and spec["weight_reads"] and not spec["other_read"] and numel >= cfg.min_numel
                and (spec["family"] != "embedding" or cfg.compress_embeddings)):
            out[f"p{i}"] = WeightSite(f"p{i}", spec["family"], AXIS[spec["family"]], spec["shape"])
    return out


@given(tensor_specs(), st.sampled_from([1, 64, 256]), st.booleans())
def test_sites_are_exactly_the_floating_weights_read_only_as_weights(specs, min_numel, embeddings):
    cfg = CompileConfig(min_numel=min_numel, compress_embeddings=embeddings)
    expected = expected_sites(specs, cfg)
    if not expected:
        with pytest.raises(NoCompressibleLayersError, match="min_numel"):
            run(build(specs), [MarkWeights()], cfg)
        return
    gm, _, _ = run(build(specs), [MarkWeights()], cfg)
    got = {site.param: site for _, site in weight_sites(gm)}
    assert got == expected
    # One get_attr per tensor: a weight read by two ops is one site feeding both.
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(targets) == len(set(targets))
    for node, site in weight_sites(gm):
        spec = specs[int(site.param[1:])]
        assert len(node.users) == spec["weight_reads"]


def test_tiny_convnet_marks_the_three_large_weights():
    """c1.weight (16x1x3x3 = 144 elements) is under min_numel = 256 and stays plain; biases
    are read as biases, not weights."""
    x = torch.randn(2, 1, 28, 28)
    gm = marked(make_tiny_convnet(), x)
    assert {s.param: (s.family, s.channel_axis, s.shape) for _, s in weight_sites(gm)} == {
        "c2.weight": ("conv", 0, (32, 16, 3, 3)), "fc.weight": ("linear", 0, (64, 1568)),
        "out.weight": ("linear", 0, (10, 64))}
    assert "c1.weight" in {s.param for _, s in weight_sites(marked(make_tiny_convnet(), x, CompileConfig(min_numel=144)))}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["p0", "p1"])  # a compressible weight, and a tensor read otherwise
def test_a_non_finite_tensor_is_named(bad, where):
    specs = [dict(family="linear", shape=(32, 32), floating=True, weight_reads=1, other_read=False),
             dict(family="linear", shape=(4, 4), floating=True, weight_reads=0, other_read=True)]
    gm = build(specs)
    getattr(gm, where)[1, 2] = bad
    with pytest.raises(NonFiniteWeightError, match=f"'{where}'"):
        run(gm, [MarkWeights()])


def test_a_model_without_a_compressible_weight_says_so():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()  # 64 and 16 weights
    x = torch.randn(3, 8)
    with pytest.raises(NoCompressibleLayersError, match="Conv/Linear/Embedding"):
        marked(model, x)


class _TiedLinears(nn.Module):
    """Two Linear modules sharing one weight tensor (as a tied embedding/LM head does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_tied_tensor_is_one_site():
    torch.manual_seed(0)
    gm = marked(_TiedLinears().eval(), torch.randn(4, 32), CompileConfig(min_numel=16))
    assert len(list(weight_sites(gm))) == 1


class _TiedEmbeddingHead(nn.Module):
    """A language model's tied input embedding and output projection, plus one other Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.embed(ids))))


@pytest.mark.parametrize("embeddings", [True, False])
def test_a_tied_embedding_and_head_is_one_linear_site(embeddings):
    """Read by F.embedding (axis 1) and F.linear (axis 0): one site of the linear family, one step
    per vocabulary row; kept plain, as any embedding, when compress_embeddings is off. (It was
    left plain whatever the config: the two families differ.)"""
    torch.manual_seed(0)
    gm = marked(_TiedEmbeddingHead().eval(), torch.randint(0, 40, (2, 5)),
                CompileConfig(min_numel=16, compress_embeddings=embeddings))
    sites = {s.param: (s.family, s.channel_axis, s.shape) for _, s in weight_sites(gm)}
    tied = {"embed.weight": ("linear", 0, (40, 16))} if embeddings else {}
    assert sites == {"mix.weight": ("linear", 0, (16, 16)), **tied}
