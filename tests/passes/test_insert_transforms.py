"""passes/insert_transforms.py: every compressed weight becomes T^-1(round(T(w))).

before     a marked graph whose sites carry an ``Allocation`` (kind, step_s, threshold_e,
           channel_scaled): ``w = get_attr[fc.weight]; y = linear(x, w, b)``
transform  InsertTransforms
expected   ``w = call_module[l2fx_weights.fc__weight]()``, a ``TransformedWeight`` holding the fp32
           weight whose output is, bit for bit, ``decode(encode(w))`` under the allocated
           parameters as stored (per channel or per tensor, scaled by channel range or not);
           the fp32 tensor has left the model's state; a second run changes nothing.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, strategies as st

from l2fx.config import CompileConfig, Granularity
from l2fx.errors import PassError
from l2fx.ir import Allocation, get_meta, set_meta, weight_module_path, weight_sites
from l2fx.modules import TransformedWeight
from l2fx.passes import InsertTransforms
from l2fx.tparams import layout, scale_ratio, stored_vector
from l2fx.transform import TransformKind, channel_view, decode, encode, param_shape

from conftest import make_tiny_convnet
from pass_cases import marked, run, same_tensors, tensors

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
_MARKED: dict = {}


def marked_convnet(cfg: CompileConfig):
    """The marked TinyConvNet (captured once per config: capture checks the trace against eager)."""
    key = cfg.to_json()
    if key not in _MARKED:
        _MARKED[key] = marked(make_tiny_convnet(), X, cfg)
    return copy.deepcopy(_MARKED[key])


@given(st.sampled_from(list(TransformKind)), st.floats(2.0, 200.0), st.floats(0.5, 3.0),
       st.sampled_from(list(Granularity)), st.booleans(), st.sampled_from([7, 127]))
def test_each_site_starts_at_decode_of_encode_under_its_allocation(kind, levels, deadzone, granularity, scaled, qmax):
    from l2fx.config import CodingConfig

    cfg = CompileConfig(granularity=granularity, coding=CodingConfig(qmax=qmax))
    gm = marked_convnet(cfg)
    weights = {site.param: gm.get_parameter(site.param).detach().clone() for _, site in weight_sites(gm)}
    for node, site in weight_sites(gm):
        s = float(weights[site.param].abs().max()) / levels
        set_meta(node, Allocation(kind.value, s, deadzone * s, 1000, scaled))
    gm, _, modified = run(gm, [InsertTransforms()], cfg)
    assert modified
    state = gm.state_dict()
    for node, site in weight_sites(gm):
        w = weights[site.param]
        assert node.op == "call_module" and str(node.target) == weight_module_path(site.param)
        module = gm.get_submodule(str(node.target))
        assert isinstance(module, TransformedWeight) and torch.equal(module.weight, w)
        assert site.param not in state  # the fp32 tensor lives only in the module now
        alloc = get_meta(node, Allocation)
        # The allocated per-tensor (s, e) in the stored layout of the granularity
        # (l2fx.tparams's table), scaled by each channel's or group's range when channel_scaled.
        axis, group = layout(site, cfg)
        ratio = scale_ratio(w, site, cfg) if scaled else None
        sv, ev = stored_vector(alloc.step_s, site, cfg, ratio), stored_vector(alloc.threshold_e, site, cfg, ratio)
        assert tuple(sv.shape) == param_shape(site.shape, axis, group)
        sc, ec = channel_view(sv, w, axis, group), channel_view(ev, w, axis, group)
        expected = decode(encode(w, kind, sc, ec, qmax), kind, sc, ec)
        assert torch.equal(module.step_s, sv) and torch.equal(module.threshold_e, ev)
        with torch.no_grad():
            assert torch.equal(module(), expected)


def test_the_graph_reads_the_modules_and_runs():
    gm = marked_convnet(CompileConfig())
    steps = {}
    for node, site in weight_sites(gm):
        steps[site.param] = float(gm.get_parameter(site.param).abs().max()) / 100  # symbols up to 100 < qmax
        set_meta(node, Allocation("joint", steps[site.param], 0.5 * steps[site.param], 1000))  # e = s/2: no dead zone
    gm, _, _ = run(gm, [InsertTransforms()])
    assert not any(n.op == "get_attr" and n.target in ("c2.weight", "fc.weight", "out.weight") for n in gm.graph.nodes)
    # No dead zone and no saturation: every weight moves by at most half its step.
    for node, site in weight_sites(gm):
        m = gm.get_submodule(str(node.target))
        with torch.no_grad():
            assert float((m() - m.weight).abs().max()) <= 0.5 * steps[site.param] * (1 + 1e-6)
    with torch.no_grad():
        assert torch.isfinite(gm(X)).all()


def test_a_second_run_changes_nothing():
    gm = marked_convnet(CompileConfig())
    for node, _ in weight_sites(gm):
        set_meta(node, Allocation("joint", 1e-2, 2e-2, 1000))
    once, _, _ = run(gm, [InsertTransforms()])
    code, state = once.code, tensors(once)
    modules = {n.target: once.get_submodule(str(n.target)) for n, _ in weight_sites(once)}
    twice, _, modified = run(once, [InsertTransforms()])
    assert not modified and twice.code == code and same_tensors(tensors(twice), state)
    assert all(twice.get_submodule(str(t)) is m for t, m in modules.items())


def test_without_an_allocation_the_pass_names_itself_and_the_node():
    gm = marked_convnet(CompileConfig())
    node = next(n for n, _ in weight_sites(gm))
    with pytest.raises(PassError, match=rf"'insert_transforms' at node '{node.name}'.*l2fx.allocation"):
        run(gm, [InsertTransforms()])
