"""Invariants of the unified weight transformation T (paper Eq. 11-13), l2fx/transform.py."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError
from l2fx.transform import (
    FORMAT_KINDS,
    TransformKind,
    channel_view,
    decode,
    encode,
    fake_quant,
    forward_t,
    group_count,
    init_threshold_for_linear,
    inverse_t,
    param_shape,
    round_ste,
)

EPS32 = torch.finfo(torch.float32).eps
# The learnt transforms; the block-format kinds (a table, not a formula) are tests/test_format_kinds.py's.
KINDS = [k for k in TransformKind if k not in FORMAT_KINDS]
# (weight shape, channel axis): None is per tensor; Linear [out, in], Conv [out, in, kh, kw],
# a channel axis that is not the first, and a negative axis.
LAYOUTS = [((300,), None), ((7, 33), None), ((16, 20), 0), ((5, 3, 3, 3), 0), ((12, 9), 1), ((4, 6, 5), -1)]


def _case(seed: int, kind: TransformKind, layout, qmax: int):
    """Random (w, s, e) for one layer: s log-uniform, e/s in [0.1, 30], per tensor or per channel.

    w is drawn uniformly in symbol space over [-1.5 qmax, 1.5 qmax] (so some symbols
    saturate) and mapped back with T^-1, plus exact zeros and values at and next to +-e.
    """
    shape, axis = layout
    g = torch.Generator().manual_seed(seed)
    nchan = 1 if axis is None else shape[axis]
    s = 10.0 ** (torch.rand(nchan, generator=g) * 4 - 4)  # [1e-4, 1]
    e = s * 10.0 ** (torch.rand(nchan, generator=g) * 2.5 - 1)  # e/s in [0.1, 30]
    if kind is TransformKind.LOG:
        # LOG's T^-1(q) = e (exp(q s/e) - 1) must stay finite in float32: the transform's
        # domain is q s/e <= 80 (it clamps there), so keep the whole alphabet inside it.
        e = torch.maximum(e, s * qmax / 60)
    s_v, e_v = channel_view(s, torch.empty(shape), axis), channel_view(e, torch.empty(shape), axis)
    t = (torch.rand(shape, generator=g) * 2 - 1) * 1.5 * qmax
    w = inverse_t(t, kind, s_v, e_v)
    flat = w.reshape(-1).clone()
    e_full = e_v.expand(shape).reshape(-1)
    n = flat.numel()
    flat[: n // 10] = 0.0
    flat[n // 10 : n // 5] = e_full[n // 10 : n // 5] * torch.tensor([1.0, -1.0]).repeat(n)[: n // 5 - n // 10]
    lo = torch.nextafter(e_full, torch.zeros(()))
    flat[n // 5 : 3 * n // 10] = lo[n // 5 : 3 * n // 10]
    w = flat.reshape(shape)
    return w, s_v, e_v


case_args = dict(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from(LAYOUTS),
    qmax=st.sampled_from([1, 3, 7, 15, 127, 2047]),
)


@given(**case_args)
def test_inverse_undoes_forward(seed, kind, layout, qmax):
    w, s, e = _case(seed, kind, layout, qmax)
    if kind is TransformKind.EXP:
        w = w.clamp(-60 * e, 60 * e)  # EXP's T saturates at |w| = 80 e: not invertible beyond
    back = inverse_t(forward_t(w, kind, s, e), kind, s, e)
    # Each kind is a handful of float32 ops, each off by <= eps/2 relative to its result;
    # the intermediate magnitudes are |w|, e and s (JOINT subtracts e and adds 0.5 s), and
    # LOG's exp / EXP's log amplify a relative error of the symbol by up to
    # 1 + ln(1 + |w|/e). 8 eps bounds the sum of these roundings with margin.
    bound = 8 * EPS32 * (w.abs() + e + s) * (1 + torch.log1p(w.abs() / e))
    err = (back - w).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@given(**case_args)
def test_encode_decode_is_a_projection(seed, kind, layout, qmax):
    w, s, e = _case(seed, kind, layout, qmax)
    q = encode(w, kind, s, e, qmax)
    assert q.dtype == torch.int16 and q.shape == w.shape
    assert int(q.abs().max()) <= qmax
    assert torch.equal(encode(decode(q, kind, s, e), kind, s, e, qmax), q)
    # decode(encode(.)) is idempotent as a map on weights: a projection onto the levels.
    w_hat = decode(q, kind, s, e)
    assert torch.equal(decode(encode(w_hat, kind, s, e, qmax), kind, s, e), w_hat)


@given(**case_args)
def test_forward_is_odd_monotone_and_continuous(seed, kind, layout, qmax):
    w, s, e = _case(seed, kind, layout, qmax)
    # odd
    assert torch.equal(forward_t(-w, kind, s, e), -forward_t(w, kind, s, e))
    # monotone non-decreasing along each channel (parameters are constant along a row)
    shape, axis = layout
    ax = 0 if axis is None else axis % len(shape)
    wm = w.movedim(ax, 0).reshape(w.shape[ax], -1)
    sm = s.expand(w.shape).movedim(ax, 0).reshape(w.shape[ax], -1)
    em = e.expand(w.shape).movedim(ax, 0).reshape(w.shape[ax], -1)
    ws, _ = torch.sort(wm, dim=1)
    tm = forward_t(ws, kind, sm, em)
    assert bool((tm[:, 1:] >= tm[:, :-1]).all())
    # continuous at the branch point |w| = e (and at 0): T(e (1 +- h)) -> T(e) as h -> 0,
    # with a Lipschitz bound from the larger of the two branch slopes (1/(2e), 1/s;
    # LOG's slope is at most 1/s, EXP's at |w| <= 2e is at most e^2/s).
    h = 1e-3
    slope = torch.maximum(1 / (2 * e), math.exp(2) / s)
    at = forward_t(e, kind, s, e)
    for side in (1 - h, 1 + h):
        gap = (forward_t(e * side, kind, s, e) - at).abs()
        assert bool((gap <= slope * e * h * (1 + 1e-3) + 4 * EPS32 * at.abs()).all())
    tiny = forward_t(e * 1e-6, kind, s, e)
    assert bool((tiny.abs() <= slope * e * 1e-6 * 1.01).all())


@given(**case_args)
def test_dead_zone_maps_to_symbol_zero(seed, kind, layout, qmax):
    if kind not in (TransformKind.JOINT, TransformKind.PRUNE):
        return
    w, s, e = _case(seed, kind, layout, qmax)  # includes w = +-e and nextafter(e, 0)
    q = encode(w, kind, s, e, qmax)
    inside = w.abs() < e
    assert bool((q[inside] == 0).all())
    # |w| == e sits on 0.5 exactly; half to even still gives 0
    on_edge = w.abs() == e
    assert bool((q[on_edge] == 0).all())
    # symbol k != 0 reconstructs to sign(k) (e + (|k| - 0.5) s)
    lv = decode(q, kind, s, e)
    kf = q.float()
    expect = torch.sign(kf) * (e + (kf.abs() - 0.5) * s)
    nz = q != 0
    torch.testing.assert_close(lv[nz], expect.expand(q.shape)[nz], rtol=4 * EPS32, atol=0)


@given(**case_args)
def test_fake_quant_matches_codec_and_has_useful_gradients(seed, kind, layout, qmax):
    w, s, e = _case(seed, kind, layout, qmax)
    w = w.clone().requires_grad_()
    s = s.clone().requires_grad_()
    e = e.clone().requires_grad_()
    out = fake_quant(w, kind, s, e, qmax)
    ref = decode(encode(w, kind, s, e, qmax), kind, s, e)
    assert torch.equal(out.detach(), ref)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * r).sum().backward()
    grads = [w.grad, s.grad] + ([] if kind is TransformKind.LINEAR else [e.grad])  # LINEAR ignores e
    for g in grads:
        assert g is not None and bool(torch.isfinite(g).all())
    assert bool((s.grad != 0).any())
    if kind is not TransformKind.LINEAR:
        assert bool((e.grad != 0).any())


def test_joint_with_half_step_threshold_is_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, generator=g) * 0.1
    s = torch.tensor(0.013)
    e = init_threshold_for_linear(s)
    for kind in (TransformKind.JOINT, TransformKind.PRUNE):
        torch.testing.assert_close(forward_t(w, kind, s, e), forward_t(w, "linear", s, e))
        assert torch.equal(encode(w, kind, s, e, 15), encode(w, TransformKind.LINEAR, s, e, 15))


def test_round_ste_is_half_to_even_with_identity_gradient():
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51], requires_grad=True)
    out = round_ste(t)
    assert out.tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 1.0]
    out.sum().backward()
    assert t.grad.tolist() == [1.0] * 8


def test_channel_view_shapes_and_validation():
    w = torch.empty(8, 3, 5, 5)
    assert channel_view(torch.ones(8), w, 0).shape == (8, 1, 1, 1)
    assert channel_view(torch.ones(3), w, 1).shape == (1, 3, 1, 1)
    assert channel_view(torch.ones(5), w, -1).shape == (1, 1, 1, 5)
    assert channel_view(torch.tensor(2.0), w, None).shape == ()
    assert channel_view(torch.ones(1), w, None).shape == ()
    with pytest.raises(ConfigError):
        channel_view(torch.ones(7), w, 0)
    with pytest.raises(ConfigError):
        channel_view(torch.ones(8), w, 4)
    with pytest.raises(ConfigError):
        channel_view(torch.ones(2), w, None)
    with pytest.raises(ConfigError):
        channel_view(torch.ones(8, 1), w, 0)


def test_validation_errors():
    w, s, e = torch.randn(10), torch.tensor(0.1), torch.tensor(0.05)
    with pytest.raises(ConfigError):
        forward_t(w, "quadratic", s, e)
    with pytest.raises(ConfigError):
        forward_t(w, 3, s, e)
    for bad_q in (0, -1, 40000, 2.0, True):
        with pytest.raises(ConfigError):
            encode(w, TransformKind.LINEAR, s, e, bad_q)
    with pytest.raises(ConfigError):
        encode(w, TransformKind.JOINT, torch.tensor(0.0), e, 7)
    with pytest.raises(ConfigError):
        decode(torch.zeros(3, dtype=torch.int16), TransformKind.JOINT, s, torch.tensor(-1.0))
    with pytest.raises(ConfigError):
        decode(torch.zeros(3), TransformKind.JOINT, s, e)
    # a string that names a kind is accepted
    assert torch.equal(forward_t(w, "joint", s, e), forward_t(w, TransformKind.JOINT, s, e))


# Per-group layouts: (weight shape, group size); groups of g consecutive elements of each row of
# the weight viewed as [rows, K], a shorter last group when g does not divide K.
GROUP_LAYOUTS = [((12, 20), 8), ((6, 5, 3, 3), 16), ((4, 7), 7), ((3, 10), 64), ((5, 32), 32)]


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS), layout=st.sampled_from(GROUP_LAYOUTS),
       qmax=st.sampled_from([1, 7, 127]))
def test_group_parameters_act_elementwise_and_keep_the_projection(seed, kind, layout, qmax):
    shape, group = layout
    g = torch.Generator().manual_seed(seed)
    rows, k = shape[0], math.prod(shape[1:])
    groups = -(-k // group)
    s = 10.0 ** (torch.rand(rows, groups, generator=g) * 3 - 3)
    e = s * 10.0 ** (torch.rand(rows, groups, generator=g) * 2 - 0.5)
    if kind is TransformKind.LOG:
        e = torch.maximum(e, s * qmax / 60)
    like = torch.empty(shape)
    s_v, e_v = channel_view(s, like, 0, group), channel_view(e, like, 0, group)
    # Element (r, j) of the row view takes the parameters of group j // group.
    cols = torch.arange(k) // group
    assert torch.equal(s_v.reshape(rows, k), s[:, cols]) and torch.equal(e_v.reshape(rows, k), e[:, cols])
    w = inverse_t((torch.rand(shape, generator=g) * 2 - 1) * 1.5 * qmax, kind, s_v, e_v)
    q = encode(w, kind, s_v, e_v, qmax)
    w_hat = decode(q, kind, s_v, e_v)
    assert torch.equal(encode(w_hat, kind, s_v, e_v, qmax), q)
    assert torch.equal(decode(encode(w_hat, kind, s_v, e_v, qmax), kind, s_v, e_v), w_hat)
    assert param_shape(shape, 0, group) == (rows, groups) and group_count(shape, group) == groups


def test_channel_view_group_validation():
    w = torch.empty(6, 10)
    with pytest.raises(ConfigError, match=r"shape \[6, 2\]"):
        channel_view(torch.ones(6, 3), w, 0, 5)
    with pytest.raises(ConfigError, match="rows"):
        channel_view(torch.ones(6, 2), w, 1, 5)
    with pytest.raises(ConfigError, match="positive int"):
        channel_view(torch.ones(6, 2), w, 0, 0)
