"""How magnitude sparsity and max-scaled block quantisation interact, measured on a real model.

(Past 400 lines on purpose: the brief allows one module, and the definitions below, the options,
the measurement and the report that states them belong together; the report's rows are the
definitions' numbers.)

Seed 002 (Harma et al., "Effective Interplay between Sparsity and Quantization: From Theory to
Practice", arXiv 2405.20935) claims, for magnitude pruning and max-scaled block quantisation:
(1) sparsity before quantisation (S->Q) is never worse than the reverse (Q->S); (2) the two are
not orthogonal: the combined error exceeds the sum of the single errors; (3) errors accumulate
through depth, faster for Q->S. :func:`interplay` measures all three on a model.

Definitions
-----------
Every weight is viewed as ``[rows, cols]`` with ``cols`` the reduction axis of its layer (Linear
``[out, in]``; Conv ``[Cout, Cin/groups*kh*kw]``; :func:`l2fx.sparsity.as_rows_cols`). Layers are
the linear and conv ops of the captured graph (``torch.fx`` or ``torch.export`` through
:func:`l2fx.frontend.capture`, then the ``normalize`` pass; BatchNorm is *not* folded, so the
weights are the model's own). Embedding tables (no reduction axis) and weights read by other
ops stay fp32 and are listed in :attr:`InterplayReport.skipped` with the reason.

* **Patterns** (:class:`Pattern`, by name): ``"50%"`` unstructured magnitude pruning of the
  whole tensor, ``"50%/row"`` per row, ``"N:M"`` (any ``0 < N < M``; groups of ``M``
  consecutive cols), ``"BRxBC@50%"`` whole ``BR x BC`` tiles by their L2 norm (``1x4@50%``,
  ``4x4@50%``). Masks, counts and tie-breaking are :mod:`l2fx.sparsity`'s (among equal
  scores the lower row-major index is pruned first).
* **Formats** (:class:`Format`, by name): the MX formats of :data:`l2fx.formats.FORMATS`
  (``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4_e2m1``, ``mxint8``),
  blocks of 32 along cols with an E8M0 scale; ``hbfpM_bK`` (:func:`l2fx.formats.hbfp`) and the
  alias ``hbfp8`` = ``hbfp8_b64``: at ``k = 32`` HBFP8 computes exactly what MXINT8 does
  (``l2fx.formats``' docstring), so the alias takes the next block size to be a data point of
  its own; ``intB_channel`` (B in 2..8): symmetric round-to-nearest-even per output row,
  ``step = max|w_row| / (2^(B-1) - 1)``, stored as a float32 step per row.
* **Schemes** on one weight ``w`` with mask function ``M`` and quantiser ``Q``:
  ``S = M(w) * w``; ``Q = Q(w)``; ``S->Q = Q(M(w) * w)`` (the block scales see only the kept
  values; zeros stay zero, ``Q(0) = 0``); ``Q->S = M(Q(w)) * Q(w)``: prune by the magnitudes of
  the *quantised* values, whose collisions (equal values after rounding) are ties, broken as
  above by index, not by the original magnitudes.
* **Layer error** (isolated): ``e = ||W_hat X - W X||^2 / ||W X||^2`` over the layer's fp32
  calibration inputs ``X`` (the bias cancels in the numerator and is left out of the
  denominator), computed as ``tr(dW H dW^T) / tr(W H W^T)`` with ``H = 2 X^T X / n`` streamed
  by :class:`l2fx.solvers.HessianAccumulator` from hooks on the graph (conv inputs unfolded by
  :func:`l2fx.solvers.layer_rows`, one ``H`` per conv group); a weight read by several ops sums
  them. For the ``S``, ``Q``, ``S->Q``, ``Q->S`` weights: ``err_s``, ``err_q``, ``err_sq``,
  ``err_qs``.
* **Orthogonality threshold**: for a combined scheme ``c``, ``excess = err_c - (err_s + err_q)``
  and ``ratio = err_c / (err_s + err_q)``; orthogonal means ``excess = 0`` (``ratio = 1``), the
  seed's claim (2) is ``excess > 0``.
* **Accumulated error** (``acc_*``): the model compressed in full with one scheme, each layer's
  ``||W_hat X_hat - W X||^2 / ||W X||^2`` with ``X_hat`` its input in the compressed model and
  ``W X`` the fp32 model's same activation (both run side by side on the calibration batches),
  so the errors of the layers before it compound. At the first layer it equals the isolated one.
* **Claim (3)**: per (pattern, format), the least-squares slope of ``log10(acc)`` against the
  normalised depth (first analysed layer 0, last 1) for S->Q and for Q->S; Q->S accumulates
  faster when its slope is larger. ``acc_qs / acc_sq`` at the first and the last layer is
  reported beside it.
* **Model level**: ``output_error = ||y_hat - y||^2 / ||y||^2`` of all floating outputs
  (:func:`l2fx.data.output_vector`: logits, embeddings) on the calibration batches, and whatever
  ``evaluate(model)`` returns (task metrics), for the fp32 model and every scheme. None of the
  schemes fits anything to the data (magnitude masks, round-to-nearest), so measuring on the
  calibration batches measures no fit.
* **Counted bits** of the analysed layers (:attr:`ModelRow.bits_ideal` / ``bits_bitmap``): a
  block format's :func:`l2fx.formats.raw_nbytes` (all elements and one E8M0 scale per block of
  the *dense* layout, since sparsity does not change the blocks) less the element bits of the
  pruned elements, plus the mask: at its information content
  (:func:`l2fx.sparsity.mask_entropy_bits`: 2:4 is ``log2(6)/4 = 0.646`` bits per weight, 50 %
  unstructured 1 bit) or as a plain 1-bit bitmap; ``intB_channel`` counts B bits per kept
  element and 32 per row; fp32 32 bits per weight, ``S`` 32 per kept weight plus the mask.

Bad input: a pattern that does not divide a layer (N:M with ``cols % M != 0``) is, with
``on_unfit="dense"`` (the default), recorded in ``skipped`` and the layer stays dense under that
pattern (fp32 in ``S``, ``Q`` only in ``S->Q`` and ``Q->S``; it has no layer row for that
pattern); with ``on_unfit="raise"`` it raises :class:`~l2fx.errors.FormatError` naming the layer
and the pattern before any calibration run. A format a tensor cannot take (a block maximum
beyond E8M0) raises the :class:`~l2fx.errors.FormatError` of :mod:`l2fx.formats`, naming the
layer. The caller's model is never modified (capture deep-copies it).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from l2fx import formats as fmts
from l2fx import sparsity as sp
from l2fx.data import Batch, batch_size, cast_floats, check_runs, normalize_calib, output_vector
from l2fx.errors import ConfigError, FormatError, NoCompressibleLayersError, NonFiniteWeightError
from l2fx.frontend import capture
from l2fx.inplace import written_arguments
from l2fx.ir import fetch_attr, weighted_op
from l2fx.method import structural_pipeline
from l2fx.pipeline import PassContext
from l2fx.solvers import HessianAccumulator, layer_rows

__all__ = [
    "Pattern", "Format", "LayerRow", "ModelRow", "Skip", "ClaimCheck", "InterplayReport", "interplay",
    "SCHEMES", "apply_scheme",
]

#: The four compressed variants of every weight (module docstring).
SCHEMES = ("S", "Q", "S->Q", "Q->S")

# Unfolded conv patches are fed to the Hessian this many elements at a time (float32 rows are
# cast to float64 inside the accumulator): EfficientNet-Lite0's first depthwise conv has
# 32 x 12544 x 9 patch elements per image, 230 MB for a batch of 16 in float64 otherwise.
_ROWS_CHUNK = 4_000_000


# ---------------------------------------------------------------------------------------------
# Options


_PCT = r"(\d+(?:\.\d+)?)%"


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A magnitude-pruning pattern on the ``[rows, cols]`` view of a weight (names: module
    docstring). ``kind`` is ``"unstructured"`` (``sparsity``, ``scope`` ``"tensor"``/``"row"``),
    ``"nm"`` (``n`` of every ``m`` kept) or ``"block"`` (``block = (rows, cols)`` tiles,
    ``sparsity`` of the tiles pruned)."""

    kind: str
    sparsity: float = 0.5
    scope: str = "tensor"
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (0, 0)

    def __post_init__(self):
        if self.kind == "unstructured":
            if self.scope not in ("tensor", "row"):
                raise ConfigError(f"pattern: scope must be 'tensor' or 'row', got {self.scope!r}")
        elif self.kind == "nm":
            sp.NM(self.n, self.m)  # validates 0 < n < m
        elif self.kind == "block":
            if not (isinstance(self.block, tuple) and len(self.block) == 2):
                raise ConfigError(f"pattern: block must be a (rows, cols) tuple, got {self.block!r}")
            sp.Blocks(*self.block)
        else:
            raise ConfigError(f"pattern: kind must be 'unstructured', 'nm' or 'block', got {self.kind!r}")
        if self.kind != "nm" and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                  or not 0.0 < self.sparsity < 1.0):
            raise ConfigError(f"pattern: sparsity must be a number in (0, 1), got {self.sparsity!r}")

    @property
    def name(self) -> str:
        pct = f"{100 * self.sparsity:g}%"
        if self.kind == "unstructured":
            return pct if self.scope == "tensor" else f"{pct}/row"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return f"{self.block[0]}x{self.block[1]}@{pct}"

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        """``"50%"``, ``"50%/row"``, ``"2:4"``, ``"1x4@50%"``, ``"4x4@50%"`` (or a Pattern)."""
        if isinstance(text, Pattern):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"pattern must be a name like '50%' or '2:4', got {text!r}")
        t = text.strip()
        if m := re.fullmatch(_PCT + r"(?:/(tensor|row))?", t):
            return cls("unstructured", float(m[1]) / 100, m[2] or "tensor")
        if m := re.fullmatch(r"(\d+):(\d+)", t):
            return cls("nm", n=int(m[1]), m=int(m[2]))
        if m := re.fullmatch(r"(\d+)x(\d+)@" + _PCT, t):
            return cls("block", float(m[3]) / 100, block=(int(m[1]), int(m[2])))
        raise ConfigError(f"unknown sparsity pattern {text!r}: use '50%', '50%/row', 'N:M' (e.g. '2:4') or "
                          f"'BRxBC@50%' (e.g. '1x4@50%', '4x4@50%')")

    @property
    def info(self):
        """The :mod:`l2fx.sparsity` pattern whose information content prices the mask."""
        if self.kind == "unstructured":
            return sp.Unstructured()
        if self.kind == "nm":
            return sp.NM(self.n, self.m)
        return sp.Blocks(*self.block)

    def mask(self, w: torch.Tensor, layer: str = "?") -> torch.Tensor:
        """bool [w.shape], True = kept, ranking by ``|w|``; an unfit shape raises FormatError."""
        if self.kind == "unstructured":
            return sp.magnitude_mask(w, self.sparsity, self.scope, name=layer)
        if self.kind == "nm":
            return sp.nm_mask(w, self.n, self.m, name=layer)
        return sp.block_mask(w, self.sparsity, self.block, name=layer)


_INT_CHANNEL = re.compile(r"int(\d+)_channel")
_HBFP = re.compile(r"hbfp(\d+)(?:_b(\d+))?")


@dataclasses.dataclass(frozen=True)
class Format:
    """A quantiser, by name (module docstring): an MX format, ``hbfpM_bK`` / ``hbfp8``, or
    ``intB_channel``. Validated on construction."""

    name: str

    def __post_init__(self):
        self._resolve()

    def _resolve(self) -> "fmts.BlockFormat | int":
        if self.name in fmts.FORMATS:
            return fmts.FORMATS[self.name]
        if m := _HBFP.fullmatch(self.name):
            return fmts.hbfp(int(m[1]), int(m[2]) if m[2] else 64)
        if m := _INT_CHANNEL.fullmatch(self.name):
            bits = int(m[1])
            if not 2 <= bits <= 8:
                raise ConfigError(f"format {self.name!r}: per-channel INT needs 2..8 bits")
            return bits
        raise ConfigError(f"unknown format {self.name!r}: use one of {', '.join(fmts.FORMATS)}, hbfpM_bK "
                          f"(hbfp8 = hbfp8_b64) or intB_channel (e.g. int8_channel, int4_channel)")

    @property
    def block_format(self) -> "fmts.BlockFormat | None":
        r = self._resolve()
        return r if isinstance(r, fmts.BlockFormat) else None

    @property
    def element_bits(self) -> int:
        r = self._resolve()
        return r.element_bits if isinstance(r, fmts.BlockFormat) else r

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, layer: str = "?") -> torch.Tensor:
        """float32 [w.shape]: ``w`` quantised and decoded, along cols of ``[rows, cols]``."""
        w2 = sp.as_rows_cols(w.detach(), layer)
        bf = self.block_format
        if bf is not None:
            q = fmts.quantize(w2, bf, axis=-1, name=layer)
            return fmts.dequantize(q.symbols, q.scales, bf, axis=-1, name=layer).reshape(w.shape)
        qmax = 2 ** (self.element_bits - 1) - 1
        x = w2.to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteWeightError(f"layer {layer!r}: NaN or inf cannot be quantised ({self.name})")
        step = x.abs().amax(dim=1, keepdim=True) / qmax
        step = torch.where(step > 0, step.to(torch.float32).to(torch.float64), 1.0)  # stored as float32
        q = torch.round(x / step).clamp_(-qmax, qmax)  # torch.round: half to even
        return (q * step).to(torch.float32).reshape(w.shape)

    def nbits(self, shape: Sequence[int], kept: int) -> int:
        """Bits storing a ``shape`` tensor whose ``kept`` elements are stored (the rest are the
        mask's zeros): raw_nbytes less the pruned element bits; per-channel INT: B per kept
        element plus a float32 step per row."""
        rows, cols = int(shape[0]), math.prod(int(s) for s in shape[1:])
        pruned = rows * cols - int(kept)
        bf = self.block_format
        if bf is not None:
            return 8 * fmts.raw_nbytes((rows, cols), bf, axis=-1) - pruned * bf.element_bits
        return int(kept) * self.element_bits + 32 * rows


def apply_scheme(w: torch.Tensor, scheme: str, pattern: Pattern | None, fmt: Format | None,
                 layer: str = "?") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w_hat, mask)`` of one weight under ``scheme`` (``mask`` None for ``Q``): the module
    docstring's definitions, written out once so that tests can check them directly."""
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    w = w.detach().to(torch.float32)
    if scheme == "Q":
        return fmt.quantize(w, layer), None
    if scheme == "S":
        mask = pattern.mask(w, layer)
        return w * mask, mask
    if scheme == "S->Q":
        mask = pattern.mask(w, layer)
        return fmt.quantize(w * mask, layer), mask
    wq = fmt.quantize(w, layer)
    mask = pattern.mask(wq, layer)
    return wq * mask, mask


# ---------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer under one (pattern, format): isolated errors ``err_*`` and accumulated errors
    ``acc_*`` of the four schemes (module docstring), and the weight-space errors ``werr_*`` of
    the two orders (``||W_hat - W||^2 / ||W||^2``, where the seed's order argument is made: both
    orders quantise the kept values with the same block scales, see the claims in
    ``docs/interplay.md``, so they differ only in the mask). ``depth``: index among analysed
    layers."""

    layer: str
    depth: int
    shape: tuple[int, ...]
    pattern: str
    format: str
    err_s: float
    err_q: float
    err_sq: float
    err_qs: float
    acc_s: float
    acc_q: float
    acc_sq: float
    acc_qs: float
    werr_sq: float = 0.0  # ||W_hat - W||^2 / ||W||^2 of S->Q and Q->S (weight space, no H)
    werr_qs: float = 0.0

    @property
    def sum_single(self) -> float:
        """``err_s + err_q``: the combined error if the two were orthogonal."""
        return self.err_s + self.err_q

    @property
    def excess_sq(self) -> float:
        return self.err_sq - self.sum_single

    @property
    def excess_qs(self) -> float:
        return self.err_qs - self.sum_single

    @property
    def ratio_sq(self) -> float:
        return _ratio(self.err_sq, self.sum_single)

    @property
    def ratio_qs(self) -> float:
        return _ratio(self.err_qs, self.sum_single)

    @property
    def order_gap(self) -> float:
        """``err_qs - err_sq`` (claim (1): >= 0)."""
        return self.err_qs - self.err_sq


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """The whole model under one scheme (``"fp32"`` for the reference; ``pattern``/``format``
    empty where the scheme has none): calibration output error, ``evaluate``'s metrics, and the
    counted bits of the analysed layers (``weights`` elements) with the ideal and the bitmap
    mask cost."""

    scheme: str
    pattern: str
    format: str
    output_error: float
    metrics: tuple[tuple[str, float], ...]
    weights: int
    bits_ideal: float
    bits_bitmap: float
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return self.bits_ideal / self.weights

    @property
    def cr_ideal(self) -> float:
        """fp32 bytes / counted bytes, mask at its information content."""
        return 32 * self.weights / self.bits_ideal

    @property
    def cr_bitmap(self) -> float:
        return 32 * self.weights / self.bits_bitmap

    def metric(self, key: str) -> float | None:
        return dict(self.metrics).get(key)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A layer left out of the analysis, for one pattern (``pattern``) or for all (``""``)."""

    layer: str
    pattern: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ClaimCheck:
    """The seed's three claims on one (pattern, format), from the report's rows."""

    pattern: str
    format: str
    layers: int
    sq_le_qs: int  # layers with err_sq <= err_qs                                  (claim 1)
    sq_le_qs_weights: int  # layers with werr_sq <= werr_qs
    output_sq: float
    output_qs: float
    nonorth_sq: int  # layers with err_sq > err_s + err_q                           (claim 2)
    nonorth_qs: int
    median_ratio_sq: float
    median_ratio_qs: float
    output_single_sum: float  # output error of S plus that of Q
    slope_sq: float  # d log10(acc) / d normalised depth                          (claim 3)
    slope_qs: float
    first_gap: float  # acc_qs / acc_sq at the first and last analysed layer
    last_gap: float

    @property
    def claim1(self) -> bool:
        """S->Q <= Q->S at the model output (layer counts in :meth:`text`)."""
        return self.output_sq <= self.output_qs

    @property
    def claim2(self) -> bool:
        """Non-orthogonal at the model output: err(S->Q) > err(S) + err(Q)."""
        return self.output_sq > self.output_single_sum

    @property
    def claim3(self) -> bool:
        """Q->S's accumulated error grows faster with depth than S->Q's."""
        return self.slope_qs > self.slope_sq

    def text(self) -> str:
        yes = {True: "holds", False: "FAILS"}
        n = self.layers
        out_ratio = _ratio(self.output_sq, self.output_single_sum)
        return (f"{self.pattern} x {self.format}:\n"
                f"  (1) S->Q <= Q->S: output {self.output_sq:.3e} vs {self.output_qs:.3e} "
                f"(Q->S/S->Q {_ratio(self.output_qs, self.output_sq):.3g}): {yes[self.claim1]}; layer output error "
                f"{self.sq_le_qs}/{n} layers, weight error {self.sq_le_qs_weights}/{n} layers\n"
                f"  (2) S->Q > S + Q: output {self.output_sq:.3e} vs {self.output_single_sum:.3e} "
                f"(ratio {out_ratio:.3g}): {yes[self.claim2]}; layers {self.nonorth_sq}/{n} (median ratio "
                f"{self.median_ratio_sq:.4g}), for Q->S {self.nonorth_qs}/{n} (median {self.median_ratio_qs:.4g})\n"
                f"  (3) Q->S accumulates faster: slope of log10(acc. error) over depth S->Q {self.slope_sq:.3f}, "
                f"Q->S {self.slope_qs:.3f}: {yes[self.claim3]}; acc. Q->S/S->Q first layer {self.first_gap:.3g}, "
                f"last {self.last_gap:.3g}")


@dataclasses.dataclass(frozen=True)
class InterplayReport:
    """What :func:`interplay` measured. ``layers``: one row per (layer, pattern, format) that
    fits; ``models``: fp32, then ``S`` per pattern, ``Q`` per format, ``S->Q`` and ``Q->S`` per
    (pattern, format); ``skipped``: every weight or (weight, pattern) left out, with why."""

    model: str
    patterns: tuple[str, ...]
    formats: tuple[str, ...]
    layers: tuple[LayerRow, ...]
    models: tuple[ModelRow, ...]
    skipped: tuple[Skip, ...]
    calib_samples: int
    seconds: float

    def layer_rows(self, pattern: str, fmt: str) -> list[LayerRow]:
        return sorted((r for r in self.layers if r.pattern == pattern and r.format == fmt), key=lambda r: r.depth)

    def model_row(self, scheme: str, pattern: str = "", fmt: str = "") -> ModelRow:
        for r in self.models:
            if (r.scheme, r.pattern, r.format) == (scheme, pattern, fmt):
                return r
        raise KeyError((scheme, pattern, fmt))

    def _output(self, scheme: str, pattern: str, fmt: str) -> float:
        return self.model_row(scheme, pattern if scheme != "Q" else "", fmt if scheme != "S" else "").output_error

    def claims(self) -> list[ClaimCheck]:
        out = []
        for p in self.patterns:
            for f in self.formats:
                rows = self.layer_rows(p, f)
                if not rows:
                    continue
                out.append(ClaimCheck(
                    pattern=p, format=f, layers=len(rows),
                    sq_le_qs=sum(r.err_sq <= r.err_qs for r in rows),
                    sq_le_qs_weights=sum(r.werr_sq <= r.werr_qs for r in rows),
                    output_sq=self._output("S->Q", p, f), output_qs=self._output("Q->S", p, f),
                    nonorth_sq=sum(r.excess_sq > 0 for r in rows), nonorth_qs=sum(r.excess_qs > 0 for r in rows),
                    median_ratio_sq=_median([r.ratio_sq for r in rows]),
                    median_ratio_qs=_median([r.ratio_qs for r in rows]),
                    output_single_sum=self._output("S", p, f) + self._output("Q", p, f),
                    slope_sq=_log_slope([r.acc_sq for r in rows]), slope_qs=_log_slope([r.acc_qs for r in rows]),
                    first_gap=_ratio(rows[0].acc_qs, rows[0].acc_sq), last_gap=_ratio(rows[-1].acc_qs, rows[-1].acc_sq)))
        return out

    def table(self, layers: bool = False) -> str:
        """Markdown: the model rows, a per-(pattern, format) summary of the layer rows, the three
        claims, the skipped layers; with ``layers=True`` every layer row too."""
        keys = sorted({k for r in self.models for k, _ in r.metrics})
        lines = [f"### {self.model}: sparsity x quantisation interplay ({self.calib_samples} calibration samples, "
                 f"{self.seconds:.0f} s)", "",
                 "| scheme | pattern | format | output rel. err | " + "".join(f"{k} | " for k in keys)
                 + "bits/weight (ideal mask) | bits/weight (bitmap) | CR vs fp32 (ideal / bitmap) |",
                 "|---" * (6 + len(keys) + 1) + "|"]
        for r in self.models:
            m = dict(r.metrics)
            lines.append(f"| {r.scheme} | {r.pattern or '-'} | {r.format or '-'} | {r.output_error:.3e} | "
                         + "".join(f"{m[k]:.4f} | " if k in m else "- | " for k in keys)
                         + f"{r.bits_ideal / r.weights:.3f} | {r.bits_bitmap / r.weights:.3f} | "
                           f"{r.cr_ideal:.2f} / {r.cr_bitmap:.2f} |")
        lines += ["", "Layer errors (isolated, fp32 inputs; medians over layers) and the orthogonality threshold:", "",
                  "| pattern | format | layers | err S | err Q | err S->Q | err Q->S | S->Q<=Q->S | S->Q<=Q->S (weights) | "
                  "S->Q>S+Q | median S->Q/(S+Q) | median Q->S/(S+Q) | slope acc S->Q | slope acc Q->S |",
                  "|---" * 14 + "|"]
        for c in self.claims():
            rows = self.layer_rows(c.pattern, c.format)
            med = {k: _median([getattr(r, k) for r in rows]) for k in ("err_s", "err_q", "err_sq", "err_qs")}
            lines.append(f"| {c.pattern} | {c.format} | {c.layers} | {med['err_s']:.3e} | {med['err_q']:.3e} | "
                         f"{med['err_sq']:.3e} | {med['err_qs']:.3e} | {c.sq_le_qs}/{c.layers} | "
                         f"{c.sq_le_qs_weights}/{c.layers} | {c.nonorth_sq}/{c.layers} | {c.median_ratio_sq:.4g} | {c.median_ratio_qs:.4g} | "
                         f"{c.slope_sq:.3f} | {c.slope_qs:.3f} |")
        lines += ["", "Claims:", "", "```", *[c.text() for c in self.claims()], "```"]
        if self.skipped:
            lines += ["", f"Skipped ({len(self.skipped)}):", ""]
            lines += [f"- `{s.layer}`{' under ' + s.pattern if s.pattern else ''}: {s.reason}" for s in self.skipped]
        if layers:
            lines += ["", "| layer | depth | shape | pattern | format | err S | err Q | err S->Q | err Q->S | "
                          "S->Q-(S+Q) | S->Q/(S+Q) | Q->S/(S+Q) | acc S | acc Q | acc S->Q | acc Q->S |",
                      "|---" * 16 + "|"]
            for r in sorted(self.layers, key=lambda r: (r.pattern, r.format, r.depth)):
                lines.append(f"| {r.layer} | {r.depth} | {'x'.join(map(str, r.shape))} | {r.pattern} | {r.format} | "
                             f"{r.err_s:.3e} | {r.err_q:.3e} | {r.err_sq:.3e} | {r.err_qs:.3e} | {r.excess_sq:.2e} | "
                             f"{r.ratio_sq:.4g} | {r.ratio_qs:.4g} | {r.acc_s:.3e} | {r.acc_q:.3e} | "
                             f"{r.acc_sq:.3e} | {r.acc_qs:.3e} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["claims"] = [dict(dataclasses.asdict(c), claim1=c.claim1, claim2=c.claim2, claim3=c.claim3)
                       for c in self.claims()]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InterplayReport":
        return cls(
            model=d["model"], patterns=tuple(d["patterns"]), formats=tuple(d["formats"]),
            layers=tuple(LayerRow(**dict(r, shape=tuple(r["shape"]))) for r in d["layers"]),
            models=tuple(ModelRow(**dict(r, metrics=tuple((k, v) for k, v in r["metrics"]))) for r in d["models"]),
            skipped=tuple(Skip(**s) for s in d["skipped"]), calib_samples=d["calib_samples"], seconds=d["seconds"])

    @classmethod
    def from_json(cls, text: str) -> "InterplayReport":
        return cls.from_dict(json.loads(text))

    def plot(self, path: "str | Path") -> list[Path]:
        """Writes ``<path>_layers.png`` (accumulated error vs depth for S, Q, S->Q, Q->S, dotted:
        isolated S->Q and Q->S; one panel per pattern x format) and ``<path>_gap.png`` (the order
        gap ``err_qs / err_sq`` per layer, accumulated and isolated; one panel per pattern);
        ``path`` a directory means ``<path>/interplay``. Matplotlib's Agg canvas, no pyplot (no
        global backend state)."""
        # matplotlib is needed by this method only; importing it with l2fx would cost ~0.5 s.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        base = Path(path)
        if base.is_dir():
            base = base / "interplay"
        base.parent.mkdir(parents=True, exist_ok=True)
        combos = [(p, f) for p in self.patterns for f in self.formats if self.layer_rows(p, f)]
        if not combos:
            raise ConfigError("InterplayReport.plot: no layer rows to plot")
        styles = {"S": ("tab:green", "acc_s"), "Q": ("tab:blue", "acc_q"), "S->Q": ("tab:orange", "acc_sq"),
                  "Q->S": ("tab:red", "acc_qs")}
        P, F = len(self.patterns), len(self.formats)
        fig = Figure(figsize=(3.4 * F, 2.8 * P), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(P, F, squeeze=False, sharex=True)
        for i, p in enumerate(self.patterns):
            for j, f in enumerate(self.formats):
                ax, rows = axes[i][j], self.layer_rows(p, f)
                ax.set_title(f"{p} x {f}", fontsize=8)
                ax.set_yscale("log")
                ax.tick_params(labelsize=7)
                if not rows:
                    continue
                x = [r.depth for r in rows]
                for scheme, (color, key) in styles.items():
                    ax.plot(x, [_pos(getattr(r, key)) for r in rows], color=color, lw=1.2, label=scheme)
                for key, color in (("err_sq", "tab:orange"), ("err_qs", "tab:red")):
                    ax.plot(x, [_pos(getattr(r, key)) for r in rows], color=color, lw=0.8, ls=":")
                if i == P - 1:
                    ax.set_xlabel("layer (depth order)", fontsize=7)
                if j == 0:
                    ax.set_ylabel("rel. output error", fontsize=7)
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"{self.model}: per-layer error, compressed prefix (solid) / isolated (dotted)", fontsize=9)
        layers_png = base.with_name(base.name + "_layers.png")
        fig.savefig(layers_png, dpi=110)

        fig = Figure(figsize=(4.2 * P, 3.0), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, P, squeeze=False)[0]
        colors = [f"C{k}" for k in range(10)]
        for i, p in enumerate(self.patterns):
            ax = axes[i]
            ax.set_title(f"order gap Q->S / S->Q, {p}", fontsize=8)
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.6)
            ax.tick_params(labelsize=7)
            for j, f in enumerate(self.formats):
                rows = self.layer_rows(p, f)
                if not rows:
                    continue
                x = [r.depth for r in rows]
                c = colors[j % len(colors)]
                ax.plot(x, [_pos(_ratio(r.acc_qs, r.acc_sq)) for r in rows], color=c, lw=1.2, label=f)
                ax.plot(x, [_pos(_ratio(r.err_qs, r.err_sq)) for r in rows], color=c, lw=0.8, ls=":")
            ax.set_xlabel("layer (depth order)", fontsize=7)
        axes[0].legend(fontsize=6)
        fig.suptitle(f"{self.model}: accumulated (solid) / isolated (dotted)", fontsize=9)
        gap_png = base.with_name(base.name + "_gap.png")
        fig.savefig(gap_png, dpi=110)
        return [layers_png, gap_png]


def _ratio(a: float, b: float) -> float:
    if b == 0.0:
        return 1.0 if a == 0.0 else math.inf
    return a / b


def _pos(v: float) -> float:
    """Log-scale plots: an exact zero (lossless) drawn at 1e-12, not dropped."""
    return v if v > 0 else 1e-12


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return math.nan if n == 0 else (v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]))


def _log_slope(values: Sequence[float]) -> float:
    """Least-squares slope of log10(v) against depth normalised to [0, 1] (0 for one layer)."""
    n = len(values)
    if n < 2:
        return 0.0
    x = [i / (n - 1) for i in range(n)]
    y = [math.log10(max(v, 1e-30)) for v in values]
    mx, my = sum(x) / n, sum(y) / n
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


# ---------------------------------------------------------------------------------------------
# Graph execution: the fp32 model, or the fp32 model and a compressed one side by side


@dataclasses.dataclass
class _Layer:
    """An analysed weight: its get_attr target, the op nodes reading it, its conv family."""

    name: str
    depth: int
    family: str  # "linear" | "conv1d" | "conv2d"
    shape: tuple[int, ...]
    consumers: list[fx.Node]
    hessian: HessianAccumulator | None = None
    H: torch.Tensor | None = None  # [groups, cols, cols] once accumulated


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _op_args(node: fx.Node, env: Mapping[fx.Node, Any]) -> dict[str, Any]:
    """The bound arguments of a linear (input, weight, bias) or conv op node, as values."""
    vals = dict(zip(_CONV_ARGS, _CONV_DEFAULTS))
    for name, a in zip(_CONV_ARGS, node.args):
        vals[name] = a
    vals.update(node.kwargs)
    return {k: map_arg(v, lambda n: env[n]) for k, v in vals.items()}


def _flat_inputs(gm: fx.GraphModule, batch: Batch) -> list[Any]:
    """Placeholder values for ``batch`` (as :class:`l2fx.evaluate.DownstreamRunner` binds them)."""
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    else:
        args, kwargs = tuple(batch), {}
    if kwargs:
        args = tuple(inspect.signature(gm.forward).bind(*args, **kwargs).arguments.values())
    return list(gm.graph._codegen.process_inputs(*args))


class _Runner:
    """Runs ``gm`` node by node, freeing each value after its last use.

    :meth:`run` calls ``on_layer(node, args, value)`` at every op node in ``layer_nodes``;
    :meth:`twin` runs the fp32 graph (a) and the graph with some get_attr values replaced (b)
    together, and calls ``on_layer(node, args_a, value_a, value_b)``. Nodes that no replaced
    weight reaches are computed once and shared by both, unless a node they do reach writes in
    place into a shared value (then nothing is shared and (b) reads copies of the inputs).
    """

    def __init__(self, gm: fx.GraphModule, layer_nodes: set[fx.Node]):
        self.gm, self.layer_nodes = gm, layer_nodes
        self.order = list(gm.graph.nodes)
        last: dict[fx.Node, int] = {}
        for i, node in enumerate(self.order):
            for a in node.all_input_nodes:
                last[a] = i
        self.free_after: list[list[fx.Node]] = [[] for _ in self.order]
        for node, i in last.items():
            self.free_after[i].append(node)
        self.writes = {n: written_arguments(gm, n) for n in self.order if n.op not in ("placeholder", "get_attr")}

    def _execute(self, node: fx.Node, env: dict, weights: Mapping[str, torch.Tensor] | None) -> Any:
        if node.op == "get_attr":
            target = str(node.target)
            return weights[target] if weights and target in weights else fetch_attr(self.gm, target)
        args = map_arg(node.args, lambda n: env[n])
        kwargs = map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "output":
            return self.gm.graph._codegen.process_outputs(args[0])
        raise ConfigError(f"cannot execute node {node.name!r} ({node.op})")

    @torch.no_grad()
    def run(self, batch: Batch, on_layer: Callable) -> Any:
        env: dict[fx.Node, Any] = {}
        inputs = iter(_flat_inputs(self.gm, batch))
        out = None
        for i, node in enumerate(self.order):
            value = next(inputs) if node.op == "placeholder" else self._execute(node, env, None)
            if node in self.layer_nodes:
                on_layer(node, _op_args(node, env), value)
            env[node] = value
            if node.op == "output":
                out = value
            for dead in self.free_after[i]:
                env.pop(dead, None)
        return out

    def reached(self, weights: Mapping[str, torch.Tensor]) -> set[fx.Node] | None:
        """Nodes a replaced weight reaches; None when sharing the rest would be unsafe."""
        hit: set[fx.Node] = set()
        for node in self.order:
            if (node.op == "get_attr" and str(node.target) in weights) or any(a in hit for a in node.all_input_nodes):
                hit.add(node)
        for node in hit:
            if any(w not in hit for w in self.writes.get(node, ())):
                return None
        return hit

    @torch.no_grad()
    def twin(self, batch: Batch, weights: Mapping[str, torch.Tensor], reached: set[fx.Node] | None,
             on_layer: Callable) -> tuple[Any, Any]:
        env_a: dict[fx.Node, Any] = {}
        env_b: dict[fx.Node, Any] = {}
        flat = _flat_inputs(self.gm, batch)
        flat_b = iter(flat if reached is not None else [t.clone() if isinstance(t, torch.Tensor) else t
                                                        for t in flat])
        flat_a = iter(flat)
        outs = (None, None)
        for i, node in enumerate(self.order):
            if node.op == "placeholder":
                va, vb = next(flat_a), next(flat_b)
            else:
                va = self._execute(node, env_a, None)
                vb = self._execute(node, env_b, weights) if reached is None or node in reached else va
            if node in self.layer_nodes:
                on_layer(node, _op_args(node, env_a), va, vb)
            env_a[node], env_b[node] = va, vb
            if node.op == "output":
                outs = (va, vb)
            for dead in self.free_after[i]:
                env_a.pop(dead, None)
                env_b.pop(dead, None)
        return outs


def _find_layers(gm: fx.GraphModule, max_layers: int | None) -> tuple[list[_Layer], list[Skip]]:
    """Analysed weights in depth order (first reading op), and every other >= 2-D float weight
    with the reason it is left out."""
    by_name: dict[str, _Layer] = {}
    other: dict[str, str] = {}
    for node in gm.graph.nodes:
        op = weighted_op(node)
        if op is None:
            continue
        w_node = node.args[op.weight_arg] if op.weight_arg < len(node.args) else node.kwargs.get("weight")
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            continue
        name = str(w_node.target)
        if op.family == "embedding":
            other.setdefault(name, "embedding table: no reduction axis to block or prune along (kept fp32)")
            continue
        w = fetch_attr(gm, name)
        family = "linear" if op.family == "linear" else f"conv{w.dim() - 2}d"
        if name not in by_name:
            by_name[name] = _Layer(name, len(by_name), family, tuple(w.shape), [])
        by_name[name].consumers.append(node)
    layers = list(by_name.values())
    skipped = [Skip(n, "", r) for n, r in other.items() if n not in by_name]
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        name = str(node.target)
        t = fetch_attr(gm, name)
        if name in by_name or name in other or not isinstance(t, torch.Tensor) or not t.is_floating_point() \
                or t.dim() < 2:
            continue
        readers = ", ".join(sorted({str(getattr(u.target, "__name__", u.target)) for u in node.users}))
        skipped.append(Skip(name, "", f"read by {readers}, not a linear/conv weight (kept fp32)"))
    if max_layers is not None:
        if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
            raise ConfigError(f"max_layers must be a positive int or None, got {max_layers!r}")
        skipped += [Skip(l.name, "", f"beyond max_layers={max_layers} (kept fp32)") for l in layers[max_layers:]]
        layers = layers[:max_layers]
    return layers, skipped


def _add_rows(layer: _Layer, args: Mapping[str, Any]) -> None:
    """Fold one op call's inputs into the layer's Hessian (conv patches a few images at a time)."""
    x = args["input"]
    if layer.family == "linear":
        rows = layer_rows(x.float(), "linear", layer.shape).unsqueeze(0)
        if layer.hessian is None:
            layer.hessian = HessianAccumulator(rows.shape[-1], groups=1)
        layer.hessian.add(rows)
        return
    groups = int(args["groups"])
    kw = {k: args[k] for k in ("stride", "padding", "dilation")}
    cols = math.prod(layer.shape[1:])
    if layer.hessian is None:
        layer.hessian = HessianAccumulator(cols, groups=groups)
    if x.dim() == len(layer.shape) - 1:  # unbatched
        x = x.unsqueeze(0)
    per_sample = groups * cols * max(1, math.prod(x.shape[2:]))
    step = max(1, _ROWS_CHUNK // per_sample)
    for s in range(0, x.shape[0], step):
        layer.hessian.add(layer_rows(x[s:s + step].float(), layer.family, layer.shape, groups=groups, **kw))


def _isolated_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)`` summed over conv groups (H ``[groups, cols, cols]``)."""
    g, cols = H.shape[0], H.shape[-1]
    W = w.detach().to(H.dtype).reshape(g, -1, cols)
    dW = w_hat.detach().to(H.dtype).reshape(g, -1, cols) - W
    den = float(((W @ H) * W).sum())
    num = float(((dW @ H) * dW).sum())
    return _ratio(num, den)


def _weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||W_hat - W||^2 / ||W||^2`` in float64."""
    w64 = w.detach().double()
    return _ratio(float((w_hat.detach().double() - w64).square().sum()), float(w64.square().sum()))


class _Accumulated:
    """Per-layer ``sum ||y_b - y_a||^2`` and ``sum ||y_a - bias||^2`` over a twin run's batches."""

    def __init__(self, owner: dict[fx.Node, _Layer]):
        self.owner = owner
        self.num: dict[str, float] = {}
        self.den: dict[str, float] = {}

    def __call__(self, node: fx.Node, args: Mapping[str, Any], ya: torch.Tensor, yb: torch.Tensor) -> None:
        layer = self.owner[node]
        bias = args.get("bias")
        clean = ya if bias is None else ya - (bias if layer.family == "linear"
                                              else bias.reshape(-1, *([1] * (ya.dim() - 2))))
        # Squares in float32, sums in float64: the float64 copies of every activation took 13 of
        # 49 s (EfficientNet-Lite0, 16 images, one pattern x one format).
        num = 0.0 if yb is ya else float((yb - ya).square().sum(dtype=torch.float64))
        self.num[layer.name] = self.num.get(layer.name, 0.0) + num
        self.den[layer.name] = self.den.get(layer.name, 0.0) + float(clean.square().sum(dtype=torch.float64))

    def error(self, name: str) -> float:
        return _ratio(self.num.get(name, 0.0), self.den.get(name, 0.0))


# ---------------------------------------------------------------------------------------------
# Entry point


def interplay(model: torch.nn.Module, calib: Any, *, patterns: Iterable["str | Pattern"] = ("50%", "2:4"),
              formats: Iterable["str | Format"] = ("mxfp8_e4m3", "mxfp4_e2m1"),
              evaluate: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
              max_layers: int | None = None, on_unfit: str = "dense", name: str | None = None) -> InterplayReport:
    """Measures S, Q, S->Q and Q->S (module docstring) for every pattern x format on ``model``.

    ``calib``: a batch or batches (as :func:`l2fx.compile` takes them), used to capture the
    model, accumulate each layer's ``H`` and measure the errors. ``evaluate(model) -> metrics``
    is called on the captured fp32 model and on every compressed one (the same GraphModule, its
    weights set to the scheme's and put back after). ``max_layers``: analyse only the first
    layers in depth order (the rest stay fp32, listed in ``skipped``). ``on_unfit``:
    ``"dense"`` or ``"raise"`` for a pattern that does not divide a layer. The caller's model
    is not modified.
    """
    t_start = time.perf_counter()
    pats = tuple(Pattern.parse(p) for p in patterns)
    fms = tuple(f if isinstance(f, Format) else Format(str(f)) for f in formats)
    for kind, items in (("pattern", [p.name for p in pats]), ("format", [f.name for f in fms])):
        if not items:
            raise ConfigError(f"interplay: give at least one {kind}")
        if len(set(items)) != len(items):
            raise ConfigError(f"interplay: a {kind} is given twice: {items}")
    if on_unfit not in ("dense", "raise"):
        raise ConfigError(f"on_unfit must be 'dense' or 'raise', got {on_unfit!r}")
    batches = normalize_calib(calib)
    gm, _ = capture(model, batches[0])
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in gm.state_dict().values()):
        gm.float()  # measured in float32, as l2fx.compile does
        batches = [cast_floats(b, torch.float32) for b in batches]
    check_runs(gm, batches[0])
    with PassContext(calib=batches):
        gm = _mode_only(structural_pipeline(fold_batchnorm=False)(gm).graph_module)
    layers, skipped = _find_layers(gm, max_layers)
    if not layers:
        raise NoCompressibleLayersError(f"{type(model).__name__}: no linear or conv weight to analyse")
    weights = {l.name: fetch_attr(gm, l.name).detach().float() for l in layers}
    for l in layers:
        if not bool(torch.isfinite(weights[l.name]).all()):
            raise NonFiniteWeightError(f"layer {l.name!r}: the weight holds NaN or inf")

    # Masks of S first: an unfit pattern raises (or is recorded) before any calibration run.
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for p in pats:
        for l in layers:
            try:
                masks[l.name, p.name] = p.mask(weights[l.name], l.name)
            except FormatError as exc:
                if on_unfit == "raise":
                    raise FormatError(f"layer {l.name!r}: pattern {p.name!r} does not fit: {exc}") from exc
                skipped.append(Skip(l.name, p.name, f"{exc} (left dense under this pattern)"))

    owner = {node: l for l in layers for node in l.consumers}
    runner = _Runner(gm, set(owner))
    for b in batches:
        runner.run(b, lambda node, args, value: _add_rows(owner[node], args))
    for l in layers:
        l.H = l.hessian.hessian()
        l.hessian = None
    n_samples = sum(batch_size(b) for b in batches)

    def counted(used: Mapping[str, tuple[torch.Tensor | None, str]], fmt: Format | None,
                pat: Pattern | None) -> tuple[float, float]:
        """(bits with the ideal mask, bits with a bitmap) of the analysed layers; ``used``: per
        layer its mask and how it is stored (absent: fp32)."""
        ideal = bitmap = 0.0
        for l in layers:
            mask, kind = used.get(l.name, (None, "fp32"))
            numel = math.prod(l.shape)
            kept = numel if mask is None else int(mask.sum())
            if kind == "fp32":
                value, mask_bits, bitmap_bits = 32 * numel, 0.0, 0.0
            elif kind == "S":
                value, bitmap_bits = 32 * kept, float(numel)
                mask_bits = sp.mask_entropy_bits(mask, pat.info, l.name)
            elif kind == "Q":
                value, mask_bits, bitmap_bits = fmt.nbits(l.shape, numel), 0.0, 0.0
            else:
                value, bitmap_bits = fmt.nbits(l.shape, kept), float(numel)
                mask_bits = sp.mask_entropy_bits(mask, pat.info, l.name)
            ideal += value + mask_bits
            bitmap += value + bitmap_bits
        return ideal, bitmap

    def run_model(w_hats: Mapping[str, torch.Tensor]) -> tuple[dict[str, float], float, tuple]:
        acc = _Accumulated(owner)
        reached = runner.reached(w_hats)
        num = den = 0.0
        for b in batches:
            ya, yb = runner.twin(b, w_hats, reached, acc)
            va, vb = output_vector(ya).double(), output_vector(yb).double()
            num += float((vb - va).square().sum())
            den += float(va.square().sum())
        metrics: tuple = ()
        if evaluate is not None:
            metrics = _evaluate_with(gm, w_hats, evaluate)
        return {l.name: acc.error(l.name) for l in layers}, _ratio(num, den), metrics

    total = sum(math.prod(l.shape) for l in layers)
    model_rows: list[ModelRow] = []
    t0 = time.perf_counter()
    fp32_metrics = tuple(sorted((str(k), float(v)) for k, v in evaluate(gm).items())) if evaluate else ()
    model_rows.append(ModelRow("fp32", "", "", 0.0, fp32_metrics, total, 32.0 * total, 32.0 * total,
                               time.perf_counter() - t0))

    iso: dict[tuple, float] = {}   # (scheme, layer, pattern, format) -> isolated error
    acc: dict[tuple, float] = {}
    wspace: dict[tuple, float] = {}  # (scheme, layer, pattern, format) -> weight-space error

    def record(scheme: str, pat: Pattern | None, fmt: Format | None, w_hats: dict, used: dict, t: float) -> None:
        acc_errors, out_err, metrics = run_model(w_hats)
        pn, fn = (pat.name if pat else ""), (fmt.name if fmt else "")
        for l in layers:
            acc[scheme, l.name, pn, fn] = acc_errors[l.name]
        ideal, bitmap = counted(used, fmt, pat)
        model_rows.append(ModelRow(scheme, pn, fn, out_err, metrics, total, ideal, bitmap, time.perf_counter() - t))

    for p in pats:  # S: one model per pattern
        t = time.perf_counter()
        w_hats, used = {}, {}
        for l in layers:
            mask = masks.get((l.name, p.name))
            if mask is None:
                continue
            w_hats[l.name] = weights[l.name] * mask
            used[l.name] = (mask, "S")
            iso["S", l.name, p.name, ""] = _isolated_error(weights[l.name], w_hats[l.name], l.H)
        record("S", p, None, w_hats, used, t)
    for f in fms:
        t = time.perf_counter()
        wq = {l.name: f.quantize(weights[l.name], l.name) for l in layers}
        for l in layers:
            iso["Q", l.name, "", f.name] = _isolated_error(weights[l.name], wq[l.name], l.H)
        record("Q", None, f, wq, {l.name: (None, "Q") for l in layers}, t)
        for p in pats:
            for scheme in ("S->Q", "Q->S"):
                t = time.perf_counter()
                w_hats, used = {}, {}
                for l in layers:
                    mask = masks.get((l.name, p.name))
                    if mask is None:  # the pattern does not fit: quantised only (module docstring)
                        w_hats[l.name], used[l.name] = wq[l.name], (None, "Q")
                        continue
                    if scheme == "S->Q":
                        w_hats[l.name] = f.quantize(weights[l.name] * mask, l.name)
                    else:
                        mask = p.mask(wq[l.name], l.name)
                        w_hats[l.name] = wq[l.name] * mask
                    used[l.name] = (mask, scheme)
                    iso[scheme, l.name, p.name, f.name] = _isolated_error(weights[l.name], w_hats[l.name], l.H)
                    wspace[scheme, l.name, p.name, f.name] = _weight_error(weights[l.name], w_hats[l.name])
                record(scheme, p, f, w_hats, used, t)
        del wq

    rows = []
    for p in pats:
        for f in fms:
            for l in layers:
                if (l.name, p.name) not in masks:
                    continue
                k = (l.name, p.name, f.name)
                rows.append(LayerRow(
                    layer=l.name, depth=l.depth, shape=l.shape, pattern=p.name, format=f.name,
                    err_s=iso["S", l.name, p.name, ""], err_q=iso["Q", l.name, "", f.name],
                    err_sq=iso[("S->Q", *k)], err_qs=iso[("Q->S", *k)],
                    acc_s=acc["S", l.name, p.name, ""], acc_q=acc["Q", l.name, "", f.name],
                    acc_sq=acc[("S->Q", *k)], acc_qs=acc[("Q->S", *k)],
                    werr_sq=wspace[("S->Q", *k)], werr_qs=wspace[("Q->S", *k)]))
    return InterplayReport(model=name or type(model).__name__, patterns=tuple(p.name for p in pats),
                           formats=tuple(f.name for f in fms), layers=tuple(rows), models=tuple(model_rows),
                           skipped=tuple(skipped), calib_samples=n_samples, seconds=time.perf_counter() - t_start)


def _mode_only(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (the analysis's own capture) with ``train()``/``eval()`` recording the mode only, as
    :class:`l2fx.CompiledModel`'s do: the graph was captured in eval mode, torch.export's graphs
    refuse both, and the zoo's evaluations call ``eval()``."""
    def train(self, mode: bool = True):
        self.training = mode
        return self

    gm.train = types.MethodType(train, gm)
    gm.eval = types.MethodType(lambda self: self.train(False), gm)
    return gm


@torch.no_grad()
def _evaluate_with(gm: fx.GraphModule, w_hats: Mapping[str, torch.Tensor],
                   evaluate: Callable[[torch.nn.Module], Mapping[str, float]]) -> tuple[tuple[str, float], ...]:
    """``evaluate(gm)`` with the compressed weights copied into ``gm``'s parameters (so that
    ``state_dict()`` holds what runs) and the fp32 values copied back afterwards."""
    saved = {}
    try:
        for name, w_hat in w_hats.items():
            p = fetch_attr(gm, name)
            saved[name] = p.detach().clone()
            p.copy_(w_hat.to(p.dtype))
        return tuple(sorted((str(k), float(v)) for k, v in evaluate(gm).items()))
    finally:
        for name, value in saved.items():
            fetch_attr(gm, name).copy_(value)
