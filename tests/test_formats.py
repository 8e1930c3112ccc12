"""Invariants of l2fx.formats: element tables from the spec, FP8 against torch's casts, block
quantisation against a slow per-element reference, idempotence, exact decode, raw sizes.

Mirrors l2fx/formats.py. The reference quantiser below is written independently of the module
(it rounds by exponent/quantum arithmetic on Python floats, the module by table search).
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError, FormatError
from l2fx.formats import (
    E8M0_NAN,
    FORMATS,
    cast_elements,
    dequantize,
    element_codes,
    element_values,
    hbfp,
    quantize,
    raw_bits_per_element,
    raw_nbytes,
    scale_exponents,
    symbols_from_element_codes,
)

FLT_MAX = 3.4028234663852886e38

# ---------------------------------------------------------------------------------------------
# Element tables, written out from the MX v1.0 spec (FP4 E2M1 and FP6 tables), code -> value.
# Sign-magnitude: the upper half of every table is the lower half negated (-0 included).

FP4_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]

FP6_E3M2 = [0.0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375,
            0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 1.75,
            2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0,
            8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0,
            -0.0, -0.0625, -0.125, -0.1875, -0.25, -0.3125, -0.375, -0.4375,
            -0.5, -0.625, -0.75, -0.875, -1.0, -1.25, -1.5, -1.75,
            -2.0, -2.5, -3.0, -3.5, -4.0, -5.0, -6.0, -7.0,
            -8.0, -10.0, -12.0, -14.0, -16.0, -20.0, -24.0, -28.0]

FP6_E2M3 = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875,
            1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
            2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75,
            4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5,
            -0.0, -0.125, -0.25, -0.375, -0.5, -0.625, -0.75, -0.875,
            -1.0, -1.125, -1.25, -1.375, -1.5, -1.625, -1.75, -1.875,
            -2.0, -2.25, -2.5, -2.75, -3.0, -3.25, -3.5, -3.75,
            -4.0, -4.5, -5.0, -5.5, -6.0, -6.5, -7.0, -7.5]


@pytest.mark.parametrize("fmt_name, table", [("mxfp4_e2m1", FP4_E2M1),
                                             ("mxfp6_e3m2", FP6_E3M2),
                                             ("mxfp6_e2m3", FP6_E2M3)])
def test_small_element_tables_match_spec(fmt_name, table):
    fmt = FORMATS[fmt_name]
    codes = torch.arange(len(table), dtype=torch.uint8)
    sym = symbols_from_element_codes(codes, fmt)
    vals = element_values(sym, fmt)
    assert vals.tolist() == table  # -0.0 == 0.0: both decode to zero
    assert not torch.signbit(vals[vals == 0]).any()  # ... and l2fx never produces -0
    # Round trip code -> symbol -> code for every code except -0 (which becomes +0).
    back = element_codes(sym, fmt)
    neg_zero = 1 << (fmt.element_bits - 1)
    assert torch.equal(back, torch.where(codes == neg_zero, 0, codes).to(torch.uint8))
    assert int(sym.abs().max()) == fmt.max_symbol == len(table) // 2 - 1


def test_symbol_ranges_and_emax():
    expect = {"mxfp8_e4m3": (126, 448.0, 8), "mxfp8_e5m2": (123, 57344.0, 15),
              "mxfp6_e3m2": (31, 28.0, 4), "mxfp6_e2m3": (31, 7.5, 2),
              "mxfp4_e2m1": (7, 6.0, 2), "mxint8": (127, 127 / 64, 0)}
    for name, (max_sym, max_normal, emax) in expect.items():
        fmt = FORMATS[name]
        assert (fmt.max_symbol, fmt.max_normal, fmt.emax_elem) == (max_sym, max_normal, emax)
        assert fmt.block_size == 32 and fmt.scale_bits == 8
        assert torch.all(fmt.magnitudes[1:] > fmt.magnitudes[:-1])


# ---------------------------------------------------------------------------------------------
# FP8 against torch.float8_e4m3fn / torch.float8_e5m2

FP8 = [("mxfp8_e4m3", torch.float8_e4m3fn), ("mxfp8_e5m2", torch.float8_e5m2)]


@pytest.mark.parametrize("fmt_name, dtype", FP8)
def test_fp8_decode_all_codes_matches_torch(fmt_name, dtype):
    fmt = FORMATS[fmt_name]
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(dtype).to(torch.float32)
    finite = torch.isfinite(ref)
    assert int(finite.sum()) == 2 * (fmt.max_symbol + 1)
    vals = element_values(symbols_from_element_codes(codes[finite], fmt), fmt)
    assert torch.equal(vals, ref[finite])
    for c in codes[~finite].tolist():  # NaN (and Inf for E5M2) have no symbol
        with pytest.raises(FormatError):
            symbols_from_element_codes(torch.tensor([c], dtype=torch.uint8), fmt)


def _fp8_probe_values(fmt) -> torch.Tensor:
    """float32: every representable value, every midpoint (ties), +-, zeros, subnormals,
    values at and beyond the max, and random floats over the whole range."""
    mags = fmt.magnitudes
    mids = (mags[1:] + mags[:-1]) / 2
    nudges = torch.cat([mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20)])
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(4000, generator=g, dtype=torch.float64) \
        * torch.exp2(torch.randint(-30, 20, (4000,), generator=g).double())
    extra = torch.tensor([0.0, -0.0, fmt.max_normal, fmt.max_normal * 1.01, 1e30, FLT_MAX,
                          2.0 ** -149, 1e-40, float("inf"), -float("inf")], dtype=torch.float64)
    v = torch.cat([mags, mids, nudges, rnd, extra])
    return torch.cat([v, -v]).to(torch.float32)


@pytest.mark.parametrize("fmt_name, dtype", FP8)
def test_fp8_cast_matches_torch(fmt_name, dtype):
    fmt = FORMATS[fmt_name]
    x = _fp8_probe_values(fmt)
    # torch's cast rounds to nearest even but does not saturate: clamp first.
    ref8 = x.clamp(-fmt.max_normal, fmt.max_normal).to(dtype)
    sym = cast_elements(x, fmt)
    assert torch.equal(element_values(sym, fmt), ref8.to(torch.float32))
    # Bit-exact codes, except that torch keeps -0 (0x80) where l2fx emits +0.
    ref_codes = ref8.view(torch.uint8)
    ref_codes = torch.where(ref_codes == 0x80, 0, ref_codes).to(torch.uint8)
    assert torch.equal(element_codes(sym, fmt), ref_codes)


def test_cast_elements_rejects_nan():
    with pytest.raises(FormatError):
        cast_elements(torch.tensor([1.0, float("nan")]), FORMATS["mxfp4_e2m1"], name="w")


# ---------------------------------------------------------------------------------------------
# Independent slow reference quantiser (Python floats, per block, per element)

#: kind, exponent bits, mantissa bits, bias, max normal, emax_elem (from the spec's tables).
REF_PARAMS = {
    "mxfp8_e4m3": ("fp", 4, 3, 7, 448.0, 8),
    "mxfp8_e5m2": ("fp", 5, 2, 15, 57344.0, 15),
    "mxfp6_e3m2": ("fp", 3, 2, 3, 28.0, 4),
    "mxfp6_e2m3": ("fp", 2, 3, 1, 7.5, 2),
    "mxfp4_e2m1": ("fp", 2, 1, 1, 6.0, 2),
    "mxint8": ("int", 0, 6, 0, 127 / 64, 0),  # 6 fraction bits: values i / 64, |i| <= 127
}


def ref_round(y: float, params) -> float:
    """Round y >= 0 to the element format: quantum of y's binade, Python round (ties to even),
    saturate to max normal."""
    kind, _ebits, mbits, bias, max_normal, _emax = params
    if y == 0.0:
        return 0.0
    if kind == "int":
        quantum = 2.0 ** -mbits
    else:
        e = max(math.frexp(y)[1] - 1, 1 - bias)  # subnormals share the lowest binade's quantum
        quantum = 2.0 ** (e - mbits)
    return min(round(y / quantum) * quantum, max_normal)


def ref_quantize_block(vals: list[float], params) -> tuple[list[float], int]:
    """(decoded values, E8M0 code) of one block by the MX conversion algorithm."""
    if not all(math.isfinite(v) for v in vals):
        return [math.nan] * len(vals), 0xFF
    amax = max(abs(v) for v in vals)
    x = -127 if amax == 0 else max(math.frexp(amax)[1] - 1 - params[5], -127)
    out = []
    for v in vals:
        r = ref_round(abs(v) * 2.0 ** -x, params)
        out.append(math.copysign(r, v) * 2.0 ** x if r else 0.0)
    return out, x + 127


def ref_quantize(w: torch.Tensor, params, k: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.to(torch.float64).movedim(axis, -1)
    rows = x.reshape(-1, x.shape[-1]).tolist()
    vals, codes = [], []
    for row in rows:
        rv, rc = [], []
        for b in range(0, len(row), k):
            bv, bc = ref_quantize_block(row[b:b + k], params)
            rv += bv
            rc.append(bc)
        vals.append(rv)
        codes.append(rc)
    n = x.shape[-1]
    nb = -(-n // k)
    v = torch.tensor(vals, dtype=torch.float64).reshape(x.shape).to(torch.float32)
    c = torch.tensor(codes, dtype=torch.int64).reshape(*x.shape[:-1], nb).to(torch.uint8)
    return v.movedim(-1, axis), c.movedim(-1, axis)


KINDS = ["normal", "wide", "zero_blocks", "subnormal", "saturating", "ties", "nonfinite"]


@st.composite
def block_cases(draw):
    """(w float32, axis): random blocks including all-zero blocks, float32 subnormals, values
    near float32's max, exact rounding ties and NaN/Inf; lengths not multiples of 32."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 90)))
    axis = draw(st.sampled_from([-1, 0]))
    kind = draw(st.sampled_from(KINDS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "normal":
        w = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 ** draw(st.integers(-40, 40))
    elif kind == "wide":  # each element its own binade: exercises underflow within a block
        w = torch.randn(shape, generator=g, dtype=torch.float64) \
            * torch.exp2(torch.randint(-149, 127, shape, generator=g).double())
    elif kind == "zero_blocks":
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        w = w * (torch.rand(shape, generator=g) < 0.3)
        w[..., : min(32, shape[1])] = 0.0  # at least one all-zero block along the last axis
    elif kind == "subnormal":
        w = torch.randn(shape, generator=g, dtype=torch.float64) * 1e-41
    elif kind == "saturating":
        w = torch.randn(shape, generator=g, dtype=torch.float64) * 1e38
        w.view(-1)[0] = FLT_MAX
    elif kind == "ties":  # small integers times a power of two hit midpoints after scaling
        w = torch.randint(-96, 97, shape, generator=g).double() * 2.0 ** draw(st.integers(-8, 8))
    else:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        w.view(-1)[draw(st.integers(0, w.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return w.clamp(-FLT_MAX, FLT_MAX).to(torch.float32), axis


ALL_FORMATS = sorted(FORMATS)


@given(case=block_cases(), fmt_name=st.sampled_from(ALL_FORMATS))
def test_quantize_matches_reference(case, fmt_name):
    w, axis = case
    fmt = FORMATS[fmt_name]
    sym, scales = quantize(w, fmt, axis=axis, name="w")
    assert sym.dtype == torch.int16 and sym.shape == w.shape
    assert scales.dtype == torch.uint8
    assert int(sym.abs().max()) <= fmt.max_symbol
    ref_vals, ref_codes = ref_quantize(w, REF_PARAMS[fmt_name], fmt.block_size, axis)
    assert torch.equal(scales, ref_codes)
    out = dequantize(sym, scales, fmt, axis=axis)
    torch.testing.assert_close(out, ref_vals, rtol=0, atol=0, equal_nan=True)
    assert not torch.signbit(out[out == 0]).any()  # no negative zero


@given(case=block_cases(), fmt_name=st.sampled_from(ALL_FORMATS))
def test_quantize_is_idempotent(case, fmt_name):
    w, axis = case
    fmt = FORMATS[fmt_name]
    q = quantize(w, fmt, axis=axis)
    q2 = quantize(dequantize(*q, fmt, axis=axis), fmt, axis=axis)
    assert torch.equal(q.symbols, q2.symbols) and torch.equal(q.scales, q2.scales)


@given(case=block_cases(), m=st.integers(2, 12), k=st.sampled_from([1, 7, 16, 32]))
def test_hbfp_matches_reference_and_is_idempotent(case, m, k):
    w, axis = case
    fmt = hbfp(m, k)
    q = quantize(w, fmt, axis=axis)
    assert int(q.symbols.abs().max()) <= 2 ** (m - 1) - 1
    params = ("int", 0, m - 2, 0, (2 ** (m - 1) - 1) / 2 ** (m - 2), 0)
    ref_vals, ref_codes = ref_quantize(w, params, k, axis)
    assert torch.equal(q.scales, ref_codes)
    out = dequantize(*q, fmt, axis=axis)
    torch.testing.assert_close(out, ref_vals, rtol=0, atol=0, equal_nan=True)
    q2 = quantize(out, fmt, axis=axis)
    assert torch.equal(q.symbols, q2.symbols) and torch.equal(q.scales, q2.scales)


def test_hbfp8_b32_is_mxint8():
    w = torch.randn(5, 100, generator=torch.Generator().manual_seed(3)) * 7
    a, b = quantize(w, FORMATS["mxint8"]), quantize(w, hbfp(8, 32))
    assert torch.equal(a.symbols, b.symbols) and torch.equal(a.scales, b.scales)


def test_hbfp_block_maximum_power_of_two_is_exact():
    # The emulator's ceil(log2) would saturate 1.0 to 1 - 2^-7; floor keeps it exact.
    w = torch.tensor([[1.0, 0.3, -0.7]])
    out = dequantize(*quantize(w, hbfp(8, 32)), hbfp(8, 32))
    assert out[0, 0].item() == 1.0


# ---------------------------------------------------------------------------------------------
# Special cases


def test_all_zero_block_and_nan_block():
    fmt = FORMATS["mxfp4_e2m1"]
    w = torch.zeros(1, 96)
    w[0, 40] = float("nan")
    w[0, 64:] = torch.linspace(-3, 3, 32)
    sym, scales = quantize(w, fmt, name="w")
    assert scales.tolist() == [[0, E8M0_NAN, 127 + 1 - 2]]  # zero block: X = -127 (code 0)
    out = dequantize(sym, scales, fmt)
    assert torch.equal(out[0, :32], torch.zeros(32))
    assert torch.isnan(out[0, 32:64]).all()  # NaN scale: the whole block is NaN
    assert torch.isfinite(out[0, 64:]).all()  # other blocks unaffected
    assert sym[0, 32:64].eq(0).all()


def test_negative_values_rounding_to_zero_give_symbol_zero():
    fmt = FORMATS["mxfp4_e2m1"]
    w = torch.tensor([[6.0, -1e-3, -0.0, 0.2]])
    sym, scales = quantize(w, fmt)
    assert sym.tolist() == [[7, 0, 0, 0]]
    assert not torch.signbit(dequantize(sym, scales, fmt)).any()


def test_partial_last_block_uses_its_own_maximum():
    fmt = FORMATS["mxfp8_e4m3"]
    w = torch.ones(2, 33) * 1000.0
    w[:, 32] = 0.001
    sym, scales = quantize(w, fmt, name="w")
    assert scales.shape == (2, 2)
    assert torch.equal(scale_exponents(scales[:, 1]),
                       torch.full((2,), math.frexp(0.001)[1] - 1 - 8, dtype=torch.int16))
    out = dequantize(sym, scales, fmt)
    # X = floor(log2 0.001) - 8 = -18; 0.001 * 2^18 = 262.1 rounds to 256 in E4M3.
    assert out[0, 32].item() == 2.0 ** -10
    assert out[0, 0].item() == 896.0  # X = 9 - 8 = 1; 1000 / 2 = 500 saturates to 448


def test_axis_other_than_last_equals_transpose():
    fmt = FORMATS["mxfp6_e2m3"]
    w = torch.randn(70, 3, generator=torch.Generator().manual_seed(1))
    a = quantize(w, fmt, axis=0)
    b = quantize(w.t().contiguous(), fmt, axis=-1)
    assert torch.equal(a.symbols, b.symbols.t()) and torch.equal(a.scales, b.scales.t())
    assert a.scales.shape == (3, 3)


def test_largest_float32_block_decodes_finite():
    for fmt in [*FORMATS.values(), hbfp(16, 32), hbfp(2, 32)]:
        w = torch.tensor([[FLT_MAX, -FLT_MAX, 1.0]])
        q = quantize(w, fmt)
        assert torch.isfinite(dequantize(*q, fmt)).all(), fmt.name


@pytest.mark.parametrize("fmt", [*FORMATS.values(), hbfp(8, 32)], ids=lambda f: f.name)
def test_decode_is_exact_for_every_symbol_and_scale(fmt):
    """sign * magnitude * 2^X never rounds in float32 for X in [-127, 127]; it overflows to
    inf where the exact value exceeds float32's max, and stays exact in the subnormal range."""
    one = dataclasses.replace(fmt, block_size=1)
    nsym = fmt.max_symbol + 1
    sym = torch.arange(nsym, dtype=torch.int16).repeat(255)
    codes = torch.arange(255, dtype=torch.uint8).repeat_interleave(nsym)
    out = dequantize(sym, codes, one).double().tolist()
    mags = fmt.magnitude_values
    for s, c, o in zip(sym.tolist(), codes.tolist(), out):
        exact = math.ldexp(mags[s], c - 127)
        assert o == (math.inf if exact > FLT_MAX else exact), (s, c)
    # The smallest nonzero result of E5M2 lies in float32's subnormal range, exactly.
    if fmt.name == "mxfp8_e5m2":
        tiny = dequantize(torch.tensor([1], dtype=torch.int16),
                          torch.tensor([0], dtype=torch.uint8), one)
        assert tiny.item() == 2.0 ** -143 and tiny.item() < torch.finfo(torch.float32).tiny


def test_mxint8_minus_128_is_refused():
    fmt = FORMATS["mxint8"]
    with pytest.raises(FormatError, match="0x80"):
        symbols_from_element_codes(torch.tensor([0x80], dtype=torch.uint8), fmt, name="w")
    sym = symbols_from_element_codes(torch.tensor([0x81, 0x7F, 0xFF], dtype=torch.uint8), fmt)
    assert sym.tolist() == [-127, 127, -1]
    assert element_codes(sym, fmt).tolist() == [0x81, 0x7F, 0xFF]
    # A block whose maximum is negative saturates at -127, never -128.
    q = quantize(torch.tensor([[-1.999, 0.5]]), fmt)
    assert q.symbols.min().item() == -127


# ---------------------------------------------------------------------------------------------
# Sizes


def test_raw_sizes():
    assert raw_bits_per_element(FORMATS["mxfp4_e2m1"]) == 4.25
    assert raw_bits_per_element(FORMATS["mxfp6_e3m2"]) == 6.25
    assert raw_bits_per_element(FORMATS["mxfp8_e4m3"]) == 8.25
    assert raw_bits_per_element(hbfp(8, 24)) == Fraction(25, 3)
    fp4 = FORMATS["mxfp4_e2m1"]
    assert raw_nbytes((4, 70), fp4) == (4 * 70 * 4 + 4 * 3 * 8) // 8  # 152: partial block
    assert raw_nbytes((70, 4), fp4, axis=0) == 152
    assert raw_nbytes((1, 33), FORMATS["mxfp6_e2m3"]) == math.ceil((33 * 6 + 2 * 8) / 8)
    assert raw_nbytes((3, 0), fp4) == 0
    for fmt in FORMATS.values():  # agrees with what quantize produces
        w = torch.randn(3, 5, 45)
        q = quantize(w, fmt, axis=1)
        bits = q.symbols.numel() * fmt.element_bits + q.scales.numel() * fmt.scale_bits
        assert raw_nbytes(w.shape, fmt, axis=1) == math.ceil(bits / 8)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises():
    fp4 = FORMATS["mxfp4_e2m1"]
    w = torch.randn(2, 64)
    with pytest.raises(ConfigError, match="axis"):
        quantize(w, fp4, axis=2, name="layer.weight")
    with pytest.raises(ConfigError, match="layer.weight"):
        quantize(torch.ones(2, 64, dtype=torch.int32), fp4, name="layer.weight")
    with pytest.raises(ConfigError):
        quantize(torch.tensor(1.0), fp4)
    with pytest.raises(ConfigError, match="block_size"):
        hbfp(8, 0)
    with pytest.raises(ConfigError, match="block_size"):
        dataclasses.replace(fp4, block_size=0)
    with pytest.raises(ConfigError):
        hbfp(1, 32)
    with pytest.raises(ConfigError):
        hbfp(17, 32)
    with pytest.raises(FormatError, match="E8M0"):
        quantize(torch.tensor([[1e300]], dtype=torch.float64), fp4, name="big")
    q = quantize(w, fp4)
    with pytest.raises(FormatError, match="scales shape"):
        dequantize(q.symbols, q.scales[:, :1], fp4, name="w")
    with pytest.raises(FormatError, match="outside"):
        dequantize(q.symbols * 2 + 1, q.scales, fp4, name="w")
    with pytest.raises(ConfigError):
        dequantize(q.symbols.float(), q.scales, fp4)
    with pytest.raises(ConfigError):
        dequantize(q.symbols, q.scales.to(torch.int16), fp4)
    with pytest.raises(FormatError):
        scale_exponents(torch.tensor([255], dtype=torch.uint8))


def test_empty_and_other_float_dtypes():
    fp8 = FORMATS["mxfp8_e4m3"]
    q = quantize(torch.zeros(3, 0), fp8)
    assert q.symbols.shape == (3, 0) and q.scales.shape == (3, 0)
    w = torch.randn(2, 40)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        wd = w.to(dt)
        q = quantize(wd, fp8)
        ref_vals, _ = ref_quantize(wd.float(), REF_PARAMS["mxfp8_e4m3"], 32, -1)
        assert torch.equal(dequantize(*q, fp8), ref_vals)
