"""passes/range_code.py: T(w) becomes int8 symbols, range coded in chunks, with exact byte counts.

before     ``w = call_module[l2fx_weights.fc__weight]()``: a TransformedWeight (fp32 w, learnable s, e)
transform  RangeCode
expected   the same node now a CodedWeight (int8 codes, (s, e) as stored: float16 when every
           value is a normal float16) whose output is what the TransformedWeight computes with
           those stored parameters, bit for bit (exactly its output when they were stored
           values already); its ``l2fx.coded`` stream decodes to the codes, its byte counts are
           the real stream's, and they are what ``l2fx.accounting`` predicts from the codes (the
           payload to within the word per chunk the prediction promises); the CR is checked against the
           target unless ``check_target=False``; a second run changes nothing.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from l2fx import coding
from l2fx.accounting import layer_nbytes, predict_layer_nbytes, round_params
from l2fx.config import CompileConfig, Granularity
from l2fx.errors import PassError
from l2fx.ir import CodedInfo, get_meta, weight_sites
from l2fx.modules import CodedWeight, TransformedWeight
from l2fx.passes import InsertTransforms, RangeCode, RateFit
from l2fx.transform import TransformKind, fake_quant

from pass_cases import allocate_from_grid, make_mlp, marked, mlp_calib, run

KINDS = ["joint", "linear", "log", "exp", "prune"]
_GRAPHS: dict = {}


def on_budget(kind: str, cfg: CompileConfig, where: float = 0.5):
    """The MLP after insert_transforms (a candidate of the sensitivity grid) and rate_fit."""
    key = (kind, where, cfg.to_json())
    if key not in _GRAPHS:
        gm = marked(make_mlp(), mlp_calib()[0], cfg)
        allocate_from_grid(gm, kind, where, cfg)
        _GRAPHS[key] = run(gm, [InsertTransforms(), RateFit()], cfg)[0]
    return copy.deepcopy(_GRAPHS[key])


def weight_modules(gm) -> dict[str, torch.nn.Module]:
    return {site.param: gm.get_submodule(str(node.target)) for node, site in weight_sites(gm)}


@given(st.sampled_from(KINDS), st.sampled_from(list(Granularity)), st.floats(6.0, 20.0))
def test_coded_weights_decode_to_the_transform_at_its_stored_parameters(kind, granularity, target):
    cfg = CompileConfig(target_cr=target, granularity=granularity)
    gm = on_budget(kind, cfg)
    before = {p: copy.deepcopy(m) for p, m in weight_modules(gm).items()}
    gm, _, modified = run(gm, [RangeCode()], cfg)
    assert modified
    fp32 = nbytes = 0
    for node, site in weight_sites(gm):
        coded, tw = gm.get_submodule(str(node.target)), before[site.param]
        assert isinstance(coded, CodedWeight) and coded.codes.dtype == torch.int8
        s, e, pdtype = round_params(tw.kind, tw.step_s, tw.threshold_e)
        assert torch.equal(coded.step_s, s) and torch.equal(coded.threshold_e, e)
        with torch.no_grad():
            expected = fake_quant(tw.weight, tw.kind, tw.view(s), tw.view(e), tw.qmax)
            assert torch.equal(coded(), expected)
        info = get_meta(node, CodedInfo)
        assert info.param == site.param and info.entry["pdtype"] == pdtype
        # The stream decodes to the codes, and its bytes are what the accounting predicts.
        symbols = coding.decode_symbols(info.stream, decoder="constriction")
        assert np.array_equal(symbols, coded.codes.reshape(-1).numpy().astype(symbols.dtype))
        group = getattr(tw, "group_size", None)
        args = (site.param, tw.kind)
        predicted = predict_layer_nbytes(*args, coded.codes.to(torch.int16), tw.channel_axis, cfg.coding.chunk_size,
                                         s, e, group)
        # Everything but the payload is counted exactly; the payload's prediction (code lengths
        # under constriction's 24-bit weights) is within one 32-bit word per chunk, as
        # coding.predict_payload_nbytes states and tests/test_coding.py measures.
        assert dataclasses.replace(info.layer_bytes, payload=0) == dataclasses.replace(predicted, payload=0)
        assert abs(info.layer_bytes.payload - predicted.payload) <= 4 * info.stream.num_chunks
        assert info.layer_bytes == layer_nbytes(*args, site.shape, tw.channel_axis, info.stream.table,
                                                sum(len(c) for c in info.stream.chunks), cfg.coding.chunk_size, s, e,
                                                group)
        assert info.bits >= 2 and int(coded.codes.abs().max()) <= 2 ** (info.bits - 1) - 1
        fp32 += 4 * site.numel
        nbytes += info.nbytes
    assert abs(fp32 / nbytes / target - 1) <= cfg.cr_tolerance


@given(st.sampled_from(KINDS))
def test_stored_parameters_decode_exactly_what_the_transformed_weight_computed(kind):
    """before: T parameters already float16 values (as the artifact stores them);
    expected: the coded weight is the TransformedWeight's output, bit for bit."""
    cfg = CompileConfig(target_cr=10.0)
    gm = on_budget(kind, cfg)
    outputs = {}
    for p, m in weight_modules(gm).items():
        with torch.no_grad():
            m.step_s.copy_(m.step_s.half().float())
            m.threshold_e.copy_(m.threshold_e.half().float())
            if m.kind is TransformKind.LINEAR:  # linear ignores e and stores none: decoded with e = s/2
                m.threshold_e.copy_(0.5 * m.step_s)
            outputs[p] = m()
    gm, _, _ = run(gm, [RangeCode(check_target=False)], cfg)
    for p, m in weight_modules(gm).items():
        assert isinstance(m, CodedWeight)
        with torch.no_grad():
            assert torch.equal(m(), outputs[p])


def test_the_target_is_checked_unless_told_not_to():
    """before: the finest grid step, no rate_fit: CR ~4 against a target of 20."""
    cfg = CompileConfig(target_cr=20.0)
    gm = marked(make_mlp(), mlp_calib()[0], cfg)
    allocate_from_grid(gm, "joint", 1.0, cfg)
    gm, _, _ = run(gm, [InsertTransforms()], cfg)
    with pytest.raises(PassError, match=r"'range_code': achieved compressed-parameter CR .* misses target 20"):
        run(copy.deepcopy(gm), [RangeCode()], cfg)
    coded, _, _ = run(gm, [RangeCode(check_target=False)], cfg)
    assert all(isinstance(m, CodedWeight) for m in weight_modules(coded).values())


def test_without_weight_modules_the_pass_names_itself_and_the_node():
    gm = marked(make_mlp(), mlp_calib()[0])
    node = next(n for n, _ in weight_sites(gm))
    with pytest.raises(PassError, match=rf"'range_code' at node '{node.name}'.*TransformedWeight or CodedWeight"):
        run(gm, [RangeCode()])


def test_a_second_run_changes_nothing():
    cfg = CompileConfig(target_cr=10.0)
    once, _, _ = run(on_budget("joint", cfg), [RangeCode()], cfg)
    infos = {n.name: get_meta(n, CodedInfo) for n, _ in weight_sites(once)}
    codes = {p: m.codes.clone() for p, m in weight_modules(once).items()}
    twice, _, modified = run(once, [RangeCode()], cfg)
    assert not modified
    assert all(get_meta(n, CodedInfo) is infos[n.name] for n, _ in weight_sites(twice))
    assert all(torch.equal(m.codes, codes[p]) for p, m in weight_modules(twice).items())
    assert not any(isinstance(m, TransformedWeight) for m in twice.modules())
