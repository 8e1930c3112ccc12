"""Block number formats: OCP Microscaling (MX) v1.0 and hybrid block floating point (HBFP).

(Past 400 lines on purpose: every decision on a point the spec leaves open is stated here,
beside the code that makes it.)

A block format stores a tensor as blocks of ``k`` consecutive elements along one axis (the
reduction axis of the layer). Each block has one shared power-of-two scale ``2^X`` and each
element a narrow code ``P_i``; the value is ``v_i = P_i * 2^X`` (OCP MX v1.0).

Representation used throughout l2fx
-----------------------------------
* **symbols**: ``int16``, same shape as the tensor. A symbol is ``sign * magnitude_index``
  where ``magnitude_index`` indexes :attr:`BlockFormat.magnitudes`, the format's non-negative
  finite values in increasing order. For the FP element formats the index *is* the 7/5/3 low
  bits of the sign-magnitude code (exponent field, mantissa field), so ``symbol`` and the
  hardware code convert losslessly (:func:`element_codes`, :func:`symbols_from_element_codes`).
  Ranges: FP4 E2M1 [-7, 7], FP6 E3M2 and E2M3 [-31, 31], FP8 E4M3 [-126, 126] (0x7F is NaN),
  FP8 E5M2 [-123, 123] (finite codes only), MXINT8 [-127, 127], ``hbfp(m, k)``
  [-(2^(m-1)-1), 2^(m-1)-1]. **Negative zero is never emitted**: a value that rounds to zero
  has symbol 0 whatever its sign, and decodes to +0.0.
* **scales**: ``uint8`` E8M0 codes (MX v1.0 scale format): ``X = code - 127``, code 0..254 gives
  ``X`` in [-127, 127], code 0xFF is NaN; there is no zero. Shape: the tensor's shape with the
  blocked axis replaced by ``nblocks = ceil(n / k)`` (the block dimension stays where the axis
  was, like ``amax(dim=axis, keepdim=True)`` but with ``nblocks`` entries).
  :func:`scale_exponents` gives the unbiased ``int16`` exponents.

Quantisation (:func:`quantize`), per block, follows the spec's conversion algorithm as the
reference emulator implements it (microsoft/microxcaling ``mx/mx_ops.py::_quantize_mx``)::

    X   = floor(log2(max_i |V_i|)) - emax_elem        clamped to >= -127 (E8M0's smallest)
    P_i = cast(V_i / 2^X)   round-to-nearest-even, |.| > max normal saturates to +-max normal

``emax_elem`` is the exponent of the element format's largest normal (E2M1 2, E3M2 4, E2M3 2,
E4M3 8, E5M2 15, INT8 0). Decisions on points the spec leaves open or treats specially:

* **All-zero block**: ``log2(0)`` is undefined; every ``X`` decodes to zeros. We emit
  ``X = -127`` (code 0x00), which is what the reference's ``max + FP32_MIN_NORMAL*(max==0)``
  trick followed by its clamp yields for every FP element format (for INT8 it yields -126).
  One fixed choice makes quantisation idempotent on zero blocks.
* **E8M0 clamping**: ``X < -127`` (tiny blocks, float32 subnormals) is clamped to -127, as in
  the reference; small elements then round towards zero. ``X > 127`` cannot happen for
  float32/float16/bfloat16 input (``floor(log2(amax)) <= 127`` and ``emax_elem >= 0``); for
  float64 input beyond float32's range it raises :class:`FormatError` (the reference would
  emit a NaN scale).
* **NaN / Inf input**: a block holding any NaN or +-Inf gets the NaN scale 0xFF and symbols 0;
  it decodes to NaN throughout (the spec makes a NaN scale mean every element of the block
  is NaN; the reference reaches the same through ``log2(inf)`` / NaN propagating into the
  shared exponent). Other blocks are unaffected. Callers that must not see NaN should reject
  non-finite weights before quantising (l2fx does, with ``NonFiniteWeightError``).
* **MXINT8 -128**: the element is 8-bit two's complement with an implicit scale 2^-6, so
  0x80 = -2.0 is a valid code. The spec permits restricting the range to be symmetric (as
  ARM's reference header ``cmicroscaling.h``, class ``mxint8``, notes); the reference
  quantiser clamps to +-127/64, so 0x80 is never produced. We do the same: symbols are
  [-127, 127], and :func:`symbols_from_element_codes` refuses 0x80 with :class:`FormatError`
  rather than decode a value outside the symbol set.
* **Partial last block**: allowed. When ``n % k != 0`` the last block holds ``n % k``
  elements and its scale comes from those alone (the reference zero-pads, which leaves the
  block maximum unchanged, so the numbers agree). :func:`raw_nbytes` counts one scale for it.

Decode (:func:`dequantize`, :func:`element_values`) is exact: ``sign * magnitude * 2^X`` is
formed in float64 (exact: magnitudes have <= 15 significant bits, ``2^X`` is a power of two)
and rounded once to float32. For ``X`` in [-127, 127] that rounding never changes the value
while the result is below float32's max: the smallest step any format reaches is
``2^-16 * 2^-127 = 2^-143`` (E5M2's smallest subnormal), above float32's ``2^-149``, so results
in float32's subnormal range are exact too. A hand-built (symbol, scale) pair whose product
exceeds float32's max (e.g. E4M3 448 with ``X = 127``) decodes to +-inf; :func:`quantize` never
produces one, because every format's largest magnitude is below ``2^(emax_elem+1)``.

HBFP (:func:`hbfp`): one shared exponent per block of ``k`` and a sign-magnitude integer
mantissa of ``m`` bits (sign included) per element, ``v_i = q_i * 2^(X - (m-2))`` with
``|q_i| <= 2^(m-1)-1`` (symmetric, saturating), ``X = floor(log2(amax))``. In MX terms it is
an integer element with magnitudes ``i * 2^-(m-2)`` and ``emax_elem = 0``, so ``hbfp(8, 32)``
computes exactly what MXINT8 does. The shared exponent is that of the block's largest element,
as in HBFP (Drumond et al., NeurIPS 2018) and its emulator (parsa-epfl/HBFPEmulator
``bfp/bfp_ops.py::get_exponent``). One deliberate difference: the
emulator takes ``ceil(log2(amax))`` with a ``0.mantissa`` reading, which agrees with ours
except when ``amax`` is an exact power of two, where it saturates the block maximum by one step;
``floor`` (the MSFP/MX convention) keeps it exact. The exponent width is a parameter there
(the emulator's tests use 10 bits); here it is stored as E8M0 like MX, which covers every
float32 weight. Rounding is to nearest, ties to even (the emulator's deterministic mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import torch

from l2fx.errors import ConfigError, FormatError

#: E8M0 (MX v1.0): bias 127, codes 0..254 are 2^-127..2^127, 0xFF is NaN, no zero.
E8M0_BIAS = 127
E8M0_NAN = 0xFF
SCALE_EXP_MIN = -127
SCALE_EXP_MAX = 127

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# 2^e for e in [-127, 127], built from Python floats so that every entry is exact.
_POW2 = torch.tensor([2.0 ** e for e in range(SCALE_EXP_MIN, SCALE_EXP_MAX + 1)],
                     dtype=torch.float64)


@dataclass(frozen=True)
class BlockFormat:
    """One block format: element code set, shared-scale encoding and block size.

    ``magnitude_values`` are the element format's non-negative finite values in increasing
    order (index = magnitude index, see the module docstring); ``emax_elem`` is the exponent
    of its largest normal; ``scale_bits`` is 8 (E8M0, the only scale encoding implemented).
    Use :data:`FORMATS` or :func:`hbfp`; ``dataclasses.replace(fmt, block_size=16)`` changes
    ``k``.
    """

    name: str
    element: str
    element_bits: int
    magnitude_values: tuple[float, ...] = field(repr=False)
    emax_elem: int
    block_size: int = 32
    scale_bits: int = 8

    def __post_init__(self):
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) \
                or self.block_size < 1:
            raise ConfigError(f"block format {self.name!r}: block_size must be an int >= 1, "
                              f"got {self.block_size!r}")
        if self.scale_bits != 8:
            raise ConfigError(f"block format {self.name!r}: only E8M0 scales (scale_bits=8) "
                              f"are implemented, got scale_bits={self.scale_bits!r}")
        if not isinstance(self.element_bits, int) or not 2 <= self.element_bits <= 16:
            raise ConfigError(f"block format {self.name!r}: element_bits must be in [2, 16], "
                              f"got {self.element_bits!r}")
        mags = self.magnitude_values
        if len(mags) < 2 or mags[0] != 0.0 or any(b <= a for a, b in zip(mags, mags[1:])):
            raise ConfigError(f"block format {self.name!r}: magnitude_values must start at 0 "
                              f"and increase strictly")
        if len(mags) > 2 ** (self.element_bits - 1):
            raise ConfigError(f"block format {self.name!r}: {len(mags)} magnitudes do not fit "
                              f"a sign-magnitude code of {self.element_bits} bits")
        if math.frexp(mags[-1])[1] - 1 != self.emax_elem:
            raise ConfigError(f"block format {self.name!r}: emax_elem={self.emax_elem} is not "
                              f"the exponent of the largest magnitude {mags[-1]}")

    @property
    def magnitudes(self) -> torch.Tensor:
        """float64 [max_symbol + 1]: the non-negative finite element values, increasing."""
        return torch.tensor(self.magnitude_values, dtype=torch.float64)

    @property
    def max_symbol(self) -> int:
        """Largest symbol magnitude: symbols lie in [-max_symbol, max_symbol]."""
        return len(self.magnitude_values) - 1

    @property
    def max_normal(self) -> float:
        """Largest element magnitude (saturation bound)."""
        return self.magnitude_values[-1]

    @property
    def is_integer(self) -> bool:
        """True for MXINT8 and HBFP (two's complement / sign-magnitude integer elements)."""
        return self.element.startswith(("INT", "HBFP"))


class Quantized(NamedTuple):
    """Result of :func:`quantize`: ``symbols`` int16 (shape of w), ``scales`` uint8 E8M0 codes
    (shape of w with the blocked axis replaced by nblocks)."""

    symbols: torch.Tensor
    scales: torch.Tensor


def _fp_magnitudes(ebits: int, mbits: int, bias: int, ncodes: int) -> tuple[float, ...]:
    """Values of the first ``ncodes`` non-negative codes of an ExMy format (subnormals at e=0)."""
    out = []
    for code in range(ncodes):
        e, m = code >> mbits, code & ((1 << mbits) - 1)
        if e == 0:
            out.append(math.ldexp(m, 1 - bias - mbits))
        else:
            out.append(math.ldexp((1 << mbits) | m, e - bias - mbits))
    return tuple(out)


def _int_magnitudes(bits: int) -> tuple[float, ...]:
    """Sign-magnitude / symmetric two's complement integers i * 2^-(bits-2), |i| <= 2^(bits-1)-1."""
    return tuple(math.ldexp(i, -(bits - 2)) for i in range(2 ** (bits - 1)))


def _mx(name: str, element: str, bits: int, mags: tuple[float, ...]) -> BlockFormat:
    return BlockFormat(name=name, element=element, element_bits=bits, magnitude_values=mags,
                       emax_elem=math.frexp(mags[-1])[1] - 1)


#: The concrete MX formats of the OCP MX v1.0 spec, k = 32, E8M0 scale.
FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    # OFP8 E4M3: bias 7, no infinities, S.1111.111 is NaN -> 127 finite magnitudes, max 448.
    _mx("mxfp8_e4m3", "FP8 E4M3", 8, _fp_magnitudes(4, 3, 7, 127)),
    # OFP8 E5M2: bias 15, IEEE-like, exponent field 31 is Inf/NaN -> 124 finite, max 57344.
    _mx("mxfp8_e5m2", "FP8 E5M2", 8, _fp_magnitudes(5, 2, 15, 124)),
    # FP6 E3M2: bias 3, no Inf/NaN, max 28. FP6 E2M3: bias 1, max 7.5. FP4 E2M1: bias 1, max 6.
    _mx("mxfp6_e3m2", "FP6 E3M2", 6, _fp_magnitudes(3, 2, 3, 32)),
    _mx("mxfp6_e2m3", "FP6 E2M3", 6, _fp_magnitudes(2, 3, 1, 32)),
    _mx("mxfp4_e2m1", "FP4 E2M1", 4, _fp_magnitudes(2, 1, 1, 8)),
    # MXINT8: two's complement, implicit scale 2^-6, symmetric [-127, 127] (see docstring).
    _mx("mxint8", "INT8", 8, _int_magnitudes(8)),
)}


def hbfp(mantissa_bits: int, block_size: int) -> BlockFormat:
    """HBFP with ``mantissa_bits`` bits per element (sign included, 2..16) and one shared
    exponent per ``block_size`` elements; exponent rule in the module docstring."""
    if not isinstance(mantissa_bits, int) or isinstance(mantissa_bits, bool) \
            or not 2 <= mantissa_bits <= 16:
        raise ConfigError(f"hbfp: mantissa_bits must be an int in [2, 16] (sign included; "
                          f"symbols are int16), got {mantissa_bits!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ConfigError(f"hbfp: block_size must be an int >= 1, got {block_size!r}")
    return BlockFormat(name=f"hbfp{mantissa_bits}_b{block_size}", element=f"HBFP{mantissa_bits}",
                       element_bits=mantissa_bits,
                       magnitude_values=_int_magnitudes(mantissa_bits), emax_elem=0,
                       block_size=block_size)


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_float(w: torch.Tensor, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"tensor {name!r}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"tensor {name!r}: block formats quantise float16/bfloat16/float32/"
                          f"float64 tensors, got dtype {w.dtype}")


def _check_axis(w: torch.Tensor, axis: int, name: str) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ConfigError(f"tensor {name!r}: axis must be an int, got {axis!r}")
    if w.dim() == 0:
        raise ConfigError(f"tensor {name!r}: a 0-d tensor has no axis to block")
    if not -w.dim() <= axis < w.dim():
        raise ConfigError(f"tensor {name!r}: axis {axis} out of range for shape "
                          f"{tuple(w.shape)}")
    return axis % w.dim()


def _nblocks(n: int, k: int) -> int:
    return -(-n // k)


# ---------------------------------------------------------------------------------------------
# Element level


def _round_to_table(y: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """Nearest magnitude index for y in [0, mags[-1]] (float64), ties to the even index.

    The two differences are exact (Sterbenz: neighbouring magnitudes differ by at most 2x, or
    the lower one is 0), so the comparison is exact; an even index is an even mantissa LSB
    (FP) or an even integer (INT), i.e. IEEE round-half-even.
    """
    hi = torch.searchsorted(mags, y.contiguous()).clamp_(max=mags.numel() - 1)
    lo = (hi - 1).clamp_(min=0)
    d_lo = y - mags[lo]
    d_hi = mags[hi] - y
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return torch.where(take_hi, hi, lo)


def _cast_magnitudes(x: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Signed symbols (int64) of float64 x, RNE, saturating; x must hold no NaN."""
    y = x.abs().clamp_(max=fmt.max_normal)
    idx = _round_to_table(y, fmt.magnitudes)
    return torch.where(x < 0, -idx, idx)


def cast_elements(x: torch.Tensor, fmt: BlockFormat, name: str = "?") -> torch.Tensor:
    """Element cast without a scale: int16 symbols of ``x`` (any shape), round-to-nearest-even,
    saturating to +-max normal (+-inf saturates too). NaN raises :class:`FormatError`."""
    _check_float(x, name)
    x64 = x.detach().to(torch.float64)
    if torch.isnan(x64).any():
        raise FormatError(f"tensor {name!r}: NaN has no {fmt.element} symbol "
                          f"(element cast, format {fmt.name})")
    return _cast_magnitudes(x64, fmt).to(torch.int16)


def _check_symbols(symbols: torch.Tensor, fmt: BlockFormat, name: str) -> torch.Tensor:
    if not isinstance(symbols, torch.Tensor) or symbols.dtype.is_floating_point \
            or symbols.dtype.is_complex or symbols.dtype == torch.bool:
        raise ConfigError(f"tensor {name!r}: symbols must be an integer tensor, got "
                          f"{getattr(symbols, 'dtype', type(symbols).__name__)}")
    s = symbols.to(torch.int64)
    if s.numel() and int(s.abs().max()) > fmt.max_symbol:
        raise FormatError(f"tensor {name!r}: symbol {int(s.abs().max())} outside "
                          f"[-{fmt.max_symbol}, {fmt.max_symbol}] of format {fmt.name}")
    return s


def _signed_magnitudes(s: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    mag = fmt.magnitudes[s.abs()]
    return torch.where(s < 0, -mag, mag)


def element_values(symbols: torch.Tensor, fmt: BlockFormat, name: str = "?") -> torch.Tensor:
    """float32, shape of ``symbols``: ``sign * magnitudes[|symbol|]`` (no scale; exact)."""
    s = _check_symbols(symbols, fmt, name)
    return _signed_magnitudes(s, fmt).to(torch.float32)


def element_codes(symbols: torch.Tensor, fmt: BlockFormat, name: str = "?") -> torch.Tensor:
    """Hardware codes of the symbols: sign-magnitude ``S|index`` for FP and HBFP elements,
    two's complement for MXINT8; uint8 for element_bits <= 8, int32 above (HBFP > 8 bits).
    Symbol 0 gives code 0 (never -0)."""
    s = _check_symbols(symbols, fmt, name)
    if fmt.name == "mxint8":
        return (s & 0xFF).to(torch.uint8)
    sign_bit = 1 << (fmt.element_bits - 1)
    codes = torch.where(s < 0, sign_bit | (-s), s)
    return codes.to(torch.uint8 if fmt.element_bits <= 8 else torch.int32)


def symbols_from_element_codes(codes: torch.Tensor, fmt: BlockFormat,
                               name: str = "?") -> torch.Tensor:
    """int16 symbols of uint8 hardware codes (inverse of :func:`element_codes`; -0 -> 0).

    NaN/Inf codes (E4M3 S.1111.111, E5M2 exponent field 31) and MXINT8 0x80 (-2.0, outside
    the symmetric symbol set) raise :class:`FormatError`.
    """
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2 ** fmt.element_bits):
        raise FormatError(f"tensor {name!r}: codes outside [0, 2^{fmt.element_bits}) for "
                          f"format {fmt.name}")
    if fmt.name == "mxint8":
        if (c == 0x80).any():
            raise FormatError(f"tensor {name!r}: MXINT8 code 0x80 (-2.0) is valid in the spec "
                              f"but outside l2fx's symmetric symbol set [-127, 127]")
        return torch.where(c >= 128, c - 256, c).to(torch.int16)
    sign_bit = 1 << (fmt.element_bits - 1)
    idx = c & (sign_bit - 1)
    if (idx > fmt.max_symbol).any():
        raise FormatError(f"tensor {name!r}: {fmt.element} code(s) for NaN/Inf have no symbol "
                          f"(format {fmt.name})")
    return torch.where(c & sign_bit != 0, -idx, idx).to(torch.int16)


# ---------------------------------------------------------------------------------------------
# Block level


def quantize(w: torch.Tensor, fmt: BlockFormat, axis: int = -1, name: str = "?") -> Quantized:
    """Quantise ``w`` (float, any shape) to ``fmt`` in blocks of ``fmt.block_size`` along
    ``axis``; returns ``Quantized(symbols int16 [w.shape], scales uint8 E8M0 [w.shape with
    shape[axis] -> ceil(shape[axis] / k)])``. Algorithm and special cases: module docstring."""
    _check_float(w, name)
    ax = _check_axis(w, axis, name)
    k = fmt.block_size
    x = w.detach().to(torch.float64).movedim(ax, -1)
    n = x.shape[-1]
    nb = _nblocks(n, k)
    xb = torch.nn.functional.pad(x, (0, nb * k - n)).reshape(*x.shape[:-1], nb, k)
    nonfinite = ~torch.isfinite(xb).all(dim=-1)
    xb = torch.where(nonfinite.unsqueeze(-1), 0.0, xb)
    amax = xb.abs().amax(dim=-1) if nb else xb.new_zeros(xb.shape[:-1])
    # floor(log2(amax)) exactly: amax = f * 2^e with f in [0.5, 1)  =>  floor(log2) = e - 1.
    exp = torch.frexp(amax).exponent.to(torch.int64) - 1 - fmt.emax_elem
    exp = torch.where(amax == 0, SCALE_EXP_MIN, exp)
    if exp.numel() and int(exp.max()) > SCALE_EXP_MAX:
        raise FormatError(f"tensor {name!r}: a block maximum along dim {ax} needs scale "
                          f"exponent {int(exp.max())} > {SCALE_EXP_MAX}, beyond E8M0 "
                          f"(format {fmt.name}); values this large exceed float32")
    exp = exp.clamp_(min=SCALE_EXP_MIN)
    y = xb * _POW2[(-exp) - SCALE_EXP_MIN].unsqueeze(-1)  # V / 2^X, exact in float64
    sym = _cast_magnitudes(y, fmt)
    sym = sym.reshape(*x.shape[:-1], nb * k)[..., :n].movedim(-1, ax).to(torch.int16)
    codes = torch.where(nonfinite, E8M0_NAN, exp + E8M0_BIAS).to(torch.uint8).movedim(-1, ax)
    return Quantized(sym.contiguous(), codes.contiguous())


def dequantize(symbols: torch.Tensor, scales: torch.Tensor, fmt: BlockFormat, axis: int = -1,
               name: str = "?") -> torch.Tensor:
    """float32 [symbols.shape]: ``sign * magnitudes[|s|] * 2^X`` per element, NaN for blocks
    whose scale code is 0xFF. Exact (see module docstring); shapes as :func:`quantize`."""
    s = _check_symbols(symbols, fmt, name)
    ax = _check_axis(s, axis, name)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.uint8:
        raise ConfigError(f"tensor {name!r}: scales must be a uint8 tensor of E8M0 codes, "
                          f"got {getattr(scales, 'dtype', type(scales).__name__)}")
    k = fmt.block_size
    n = s.shape[ax]
    want = list(s.shape)
    want[ax] = _nblocks(n, k)
    if list(scales.shape) != want:
        raise FormatError(f"tensor {name!r}: scales shape {tuple(scales.shape)} does not match "
                          f"symbols {tuple(s.shape)} blocked by {k} along dim {ax} "
                          f"(expected {tuple(want)}, format {fmt.name})")
    codes = scales.to(torch.int64)
    pow2 = _POW2[codes.clamp(max=E8M0_NAN - 1)]
    pow2 = torch.where(codes == E8M0_NAN, float("nan"), pow2)
    pow2 = pow2.repeat_interleave(k, dim=ax).narrow(ax, 0, n)
    return (_signed_magnitudes(s, fmt) * pow2).to(torch.float32)


def scale_exponents(scales: torch.Tensor, name: str = "?") -> torch.Tensor:
    """int16 unbiased exponents ``X = code - 127`` of uint8 E8M0 codes; 0xFF (NaN) raises."""
    c = scales.to(torch.int16)
    if (c == E8M0_NAN).any():
        raise FormatError(f"tensor {name!r}: E8M0 code 0xFF is NaN and has no exponent")
    return c - E8M0_BIAS


def raw_bits_per_element(fmt: BlockFormat) -> Fraction:
    """Exact storage bits per element for full blocks: ``element_bits + scale_bits / k``
    (MXFP4: 17/4 = 4.25). A Fraction, so it compares equal to 4.25 and stays exact for
    block sizes that are not powers of two."""
    return Fraction(fmt.element_bits) + Fraction(fmt.scale_bits, fmt.block_size)


def raw_nbytes(shape, fmt: BlockFormat, axis: int = -1) -> int:
    """Bytes of a tightly packed encoding of a tensor of ``shape`` blocked along ``axis``:
    ``ceil((numel * element_bits + nscales * scale_bits) / 8)``, where a partial last block
    stores only its own elements plus one full scale."""
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ConfigError("raw_nbytes: a 0-d shape has no axis to block")
    if not -len(shape) <= axis < len(shape):
        raise ConfigError(f"raw_nbytes: axis {axis} out of range for shape {shape}")
    n = shape[axis]
    numel = math.prod(shape)
    nscales = 0 if n == 0 else numel // n * _nblocks(n, fmt.block_size)
    return -(-(numel * fmt.element_bits + nscales * fmt.scale_bits) // 8)
