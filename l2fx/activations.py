"""Static per-tensor activation quantisation: the seed's w+a BOP setting (OBC, Sec. 6 / A.10).

A layer whose option quantises activations to ``bits`` reads its input through the fake
quantiser of an :class:`ActQuantSpec` (asymmetric, per tensor, fixed after calibration)::

    q(x) = (clamp(round(x / scale) + zero_point, 0, 2^bits - 1) - zero_point) * scale

computed in float32 (the result cast back to the input's dtype). ``zero_point`` is an integer,
so 0 is represented exactly: a ReLU's zeros and a convolution's zero padding stay zeros, and
quantising the input before unfolding a convolution's patches equals quantising the patches.

The range is chosen on the calibration inputs (:func:`fit_spec`): the input's min and max
(0 included) over all of them, then the clipping ratio ``alpha`` in (0, 1] of that range
minimising the expected squared error ``E (q(x) - x)^2`` estimated from a histogram of the
inputs (:class:`RangeHistogram`, :data:`HISTOGRAM_BINS` bins). Min/max alone spend most of a
4-bit grid on rare outliers; the MSE search is what OBC's and most post-training
quantisers' static calibration does. Histograms add, so calibration shards on several
ranks give the union's histogram (``l2fx.distributed``).

Pure tensors: no modules, no graph (the module is :class:`l2fx.modules.ActQuant`, the pass
``passes/insert_act_quant.py``).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from l2fx.errors import ConfigError

__all__ = ["ActQuantSpec", "RangeHistogram", "fit_spec", "fake_quant_act", "HISTOGRAM_BINS", "ACT_BITS_RANGE"]

#: Histogram resolution: 2048 bins over the input's range, 128 per level of an 4-bit grid.
HISTOGRAM_BINS = 2048
#: Activation bit widths an option may ask for.
ACT_BITS_RANGE = (2, 8)
_ALPHAS = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)  # clipping ratios searched


def fake_quant_act(x: Tensor, bits: int, scale: float, zero_point: int) -> Tensor:
    """``q(x)`` of the module docstring, in float32, returned in ``x``'s dtype."""
    qmax = (1 << bits) - 1
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, 0, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class ActQuantSpec:
    """One layer's activation quantiser: ``bits`` (2..8), ``scale`` (> 0, a float32 value),
    ``zero_point`` (an integer in ``[0, 2^bits - 1]``)."""

    bits: int
    scale: float
    zero_point: int

    def __post_init__(self):
        lo, hi = ACT_BITS_RANGE
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not lo <= self.bits <= hi:
            raise ConfigError(f"ActQuantSpec.bits must be an int in {lo}..{hi}, got {self.bits!r}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ConfigError(f"ActQuantSpec.scale must be a float, got {s!r}")
        # The scale is stored and applied as float32: keep exactly that value.
        s32 = float(torch.tensor(float(s), dtype=torch.float32)) if math.isfinite(float(s)) else math.inf
        if not (math.isfinite(s32) and s32 > 0):
            raise ConfigError(f"ActQuantSpec.scale must be a finite float32 value > 0, got {s!r}")
        object.__setattr__(self, "scale", s32)
        z = self.zero_point
        if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z <= (1 << self.bits) - 1:
            raise ConfigError(f"ActQuantSpec.zero_point must be an int in [0, {(1 << self.bits) - 1}], got {z!r}")

    def __call__(self, x: Tensor) -> Tensor:
        return fake_quant_act(x, self.bits, self.scale, self.zero_point)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def of_range(cls, bits: int, lo: float, hi: float) -> "ActQuantSpec":
        """The quantiser whose grid spans ``[lo, hi]`` (widened to hold 0)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        qmax = (1 << bits) - 1
        if not hi > lo:  # an all-zero input: any grid holds it exactly
            return cls(bits, 1.0, 0)
        scale = float(torch.tensor((hi - lo) / qmax, dtype=torch.float32))
        if not scale > 0:  # a range below float32's resolution
            scale = float(torch.finfo(torch.float32).tiny)
        return cls(bits, scale, int(min(max(round(-lo / scale), 0), qmax)))


class RangeHistogram:
    """Min, max, then a histogram of a layer's input values, over every calibration batch.

    Two passes over the data: :meth:`observe_range` on each batch, :meth:`freeze` (after the
    ranges of all ranks are combined), :meth:`observe` on each batch. ``counts`` float64
    ``[HISTOGRAM_BINS]`` over ``[lo, hi]``.
    """

    def __init__(self):
        self.lo, self.hi = math.inf, -math.inf
        self.counts: Tensor | None = None

    @torch.no_grad()
    def observe_range(self, x: Tensor) -> None:
        if self.counts is not None:
            raise ConfigError("RangeHistogram: the range is frozen; observe() the values now")
        if x.numel():
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def freeze(self) -> None:
        self.lo, self.hi = min(self.lo, 0.0), max(self.hi, 0.0)
        self.counts = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        if self.counts is None:
            raise ConfigError("RangeHistogram: observe_range() every batch and freeze() before observe()")
        if not self.hi > self.lo or not x.numel():
            self.counts[0] += x.numel()
            return
        width = (self.hi - self.lo) / HISTOGRAM_BINS
        idx = ((x.detach().double().reshape(-1) - self.lo) / width).floor().clamp_(0, HISTOGRAM_BINS - 1).long()
        self.counts += torch.bincount(idx, minlength=HISTOGRAM_BINS).double()

    def centres(self) -> Tensor:
        width = (self.hi - self.lo) / HISTOGRAM_BINS
        return self.lo + width * (torch.arange(HISTOGRAM_BINS, dtype=torch.float64) + 0.5)


def expected_sq_error(hist: RangeHistogram, spec: ActQuantSpec) -> float:
    """``E (q(x) - x)^2`` over the histogram (each bin's values at its centre)."""
    c = hist.centres()
    err = (fake_quant_act(c, spec.bits, spec.scale, spec.zero_point).double() - c) ** 2
    total = float(hist.counts.sum())
    return float((err * hist.counts).sum()) / total if total else 0.0


def fit_spec(hist: RangeHistogram, bits: int) -> ActQuantSpec:
    """The quantiser of ``bits`` whose clipped range ``alpha * [lo, hi]`` has the least
    :func:`expected_sq_error` (module docstring); ties go to the wider range."""
    if hist.counts is None:
        raise ConfigError("fit_spec: the histogram holds no values (observe() the calibration inputs first)")
    best, best_err = None, math.inf
    for alpha in reversed(_ALPHAS.tolist()):
        spec = ActQuantSpec.of_range(bits, alpha * hist.lo, alpha * hist.hi)
        err = expected_sq_error(hist, spec)
        if err < best_err:
            best, best_err = spec, err
    return best
