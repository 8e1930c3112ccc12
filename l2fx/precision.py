"""SMOL per-parameter precision (seed 004, Eq. 10-12, Appendix D): the bit-value grid, the
reparametrisation, the precision map's meta entries, options, and the shuffled-precision control.

**Bit-value grid.** The bit-value map ``v_j = 2^(1-j)`` (Eq. 10's setting) gives a parameter at
precision ``p`` the values ``theta = sum_{j<=p} b_j 2^(1-j)``, ``b_j in {-1, +1}``: the ``2^p``
odd multiples of ``2^(1-p)`` in ``(-2, 2)``, a mid-rise grid of cell ``2^(2-p)``. Truncating the
signed-bit expansion of ``theta`` after ``p`` bits (the seed's ``Q(theta, p)``) is the cell
centre of ``theta``, so rounding at precision ``p`` is :func:`quantize_at`. Precision 0 is the
empty bit string: the value 0, a pruned parameter ("zero-precision allocation", Appendix C).

The grid is laid over a range ``[-a, a]`` per cell of the layer's layout (``CompileConfig.
granularity`` or a ``layers`` rule's: one per output channel by default, else per tensor or
per group; ``a = range_factor * max|w|`` over the cell, :func:`l2fx.tparams.cell_amax`): the
cell's weights are ``w = r * unit`` with ``unit = a / (2^P - 1)`` (:func:`grid_unit`) and integer symbols
``r = theta * 2^(P-1)``, ``P`` the highest precision (``max_precision``, at most 7 so that
``|r| <= 127`` fits the int8 codes of the artifact). At precision ``p >= 1`` the symbol is an
odd multiple of ``2^(P-p)``: **the precision is a function of the symbol**,
``p = P - v2(r)`` (its 2-adic valuation; :func:`precision_of_symbols`), and ``p = 0`` iff
``r = 0``. A layer's symbols under one frequency table are therefore an order-0 code of the
pair (precision map, values at their precisions): ``H(r) = H(p) + H(r | p)`` exactly, since p
is determined by r. That is how the map is stored, range coded and counted: the artifact's
ordinary LINEAR layer with its units in the layout's shape, nothing new in the format (docs/format.md).
:func:`map_code_bits` measures what other contexts would give (``bench/smol.py``).

**Reparametrisation (Eq. 12).** ``sigmoid(s) = 2^(1-p)``, so ``p = 1 + log2(1 + e^-s)``
(:func:`precision_of_s`, always >= 1: zero precision comes only from the final rounding) and the
penalty ``lambda * log2(1 + e^-s)`` is ``lambda * (p - 1)``. The noise of Eq. 11,
``2^(1-p) U(-1, 1)`` in theta units, is ``sigmoid(s) 2^(P-1) U(-1, 1)`` symbols: half a cell of
the precision-p grid, the rounding error it stands for.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from l2fx.config import LRSchedule
from l2fx.errors import ConfigError
from l2fx.ir import get_meta, meta_entry, weight_sites

__all__ = ["MAX_PRECISION", "SmolOptions", "LearnedPrecision", "PrecisionMap", "grid_unit", "clip_range",
           "precision_of_s",
           "s_of_precision", "quantize_at", "integer_precisions", "precision_of_symbols", "symbols_by_precision",
           "shuffle_within_layer", "check_learned_precisions", "entropy_bits",
           "map_code_bits"]

#: The highest precision whose symbols fit int8 codes: |r| <= 2^7 - 1.
MAX_PRECISION = 7


@dataclasses.dataclass(frozen=True)
class SmolOptions:
    """Options of the ``smol`` / ``smol-l`` methods (``CompileConfig.method_options`` pairs).

    ``per_layer``: one precision per layer (SMOL-L, Appendix D) instead of one per parameter
    (set by the method, not an option). ``lam``: lambda of Eq. 12, per bit of mean precision
    against the block output's relative MSE (the seed sums over all parameters, so its lambdas
    shrink with model size; here the penalty is the block's mean, so one value serves any block).
    ``init_precision``: p at the start (None: ``32 / target_cr + 1``, the target's bits plus
    about what entropy coding saves). ``iters``, ``lr_s``, ``lr_w`` (0: weights not trained,
    only the precisions), ``batch_size``, ``noise_samples`` (K of Eq. 8-12; ``antithetic``: each
    draw also with its mirror, ``passes/smol_precision.py`` says why): the per-block Adam run.
    ``max_precision``: P (<= 7). ``shuffle``: the control of the seed's Table 6, precisions
    permuted within each layer after rounding (then the range refitted to the same bytes).
    ``clip``: each layer's range is that of least weight MSE at the target's bits per weight
    (:func:`clip_range`, one factor per layer on every cell's range), not ``max|w|``. Off by
    default: on the Fashion-MNIST ResNet at CR 12 (128 calibration images, 100 steps, one range
    per tensor) it cost accuracy, 0.704 -> 0.837 for SMOL and 0.878 -> 0.894 for SMOL-L without
    it (``bench/results/smol_fmnist-resnet_clip*.md``): the tails it clips matter more than the
    finer cells it buys there. On MiniLM it is what keeps SMOL-L working (CR 12, cosine to fp32
    0.020 -> 0.646 per tensor; 0.645 per channel, ``smol_minilm_clip.md``).
    ``downstream``: each layer's bits priced by how much of its block's output error reaches the
    network's output (``passes/smol_precision.py``: one gain per layer, measured once on the
    fp32 model), so that one lambda trades bits against the network's error rather than each
    block's own; off, every block's relative error costs the same. On by default: measured on
    the three models of ``bench/smol.py`` (100 steps per block; on / off, ``*_ds.md`` against the
    tables without it), SMOL-L at CR 8 / 12 / 16 on MiniLM (with ``clip``) cosine to fp32 0.986 /
    0.920 / 0.676 against 0.950 / 0.645 / 0.437, on EfficientNet-Lite0 top-1 agreement 0.90 /
    0.82 / 0.00 against 0.88 / 0.15 / 0.00; SMOL on Lite0 at CR 8 0.52 against 0.13, on MiniLM
    0.971 / 0.231 / 0.070 against 0.932 / 0.276 / 0.022 (worse at CR 12 only); Fashion-MNIST
    ResNet: ``bench/results/smol_fmnist-resnet_ds.md`` against ``_nods.md``.
    """

    per_layer: bool = False
    lam: float = 0.02
    init_precision: float | None = None
    iters: int = 150
    lr_s: float = 0.05
    lr_w: float = 1e-4
    batch_size: int = 32
    noise_samples: int = 1
    antithetic: bool = True
    clip: bool = False
    downstream: bool = True
    max_precision: int = MAX_PRECISION
    schedule: LRSchedule = LRSchedule.COSINE
    shuffle: bool = False

    OPTIONS = ("lam", "init_precision", "iters", "lr_s", "lr_w", "batch_size", "noise_samples", "antithetic",
               "clip", "downstream", "max_precision", "schedule", "shuffle")

    def __post_init__(self) -> None:
        def num(name: str, lo: float, hi: float = math.inf, integer: bool = False) -> None:
            v = getattr(self, name)
            ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
            if not ok or not math.isfinite(v) or not lo <= v <= hi:
                kind = "an int" if integer else "a number"
                raise ConfigError(f"smol option {name!r} must be {kind} in [{lo}, {hi}], got {v!r}")

        if not isinstance(self.per_layer, bool):
            raise ConfigError(f"smol option 'per_layer' must be a bool, got {self.per_layer!r}")
        for flag in ("shuffle", "antithetic", "clip", "downstream"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"smol option {flag!r} must be a bool, got {getattr(self, flag)!r}")
        num("lam", 0.0)
        num("iters", 0, 10 ** 6, integer=True)
        num("lr_s", 0.0, 10.0)
        num("lr_w", 0.0, 1.0)
        num("batch_size", 1, 10 ** 6, integer=True)
        num("noise_samples", 1, 64, integer=True)
        num("max_precision", 1, MAX_PRECISION, integer=True)
        if self.init_precision is not None:
            num("init_precision", 1.05, MAX_PRECISION)
        if isinstance(self.schedule, str) and not isinstance(self.schedule, LRSchedule):
            try:
                object.__setattr__(self, "schedule", LRSchedule(self.schedule))
            except ValueError:
                raise ConfigError(f"smol option 'schedule' must be one of {[s.value for s in LRSchedule]}, "
                                  f"got {self.schedule!r}") from None
        if not isinstance(self.schedule, LRSchedule):
            raise ConfigError(f"smol option 'schedule' must be an LRSchedule, got {self.schedule!r}")

    @classmethod
    def from_pairs(cls, pairs: tuple[tuple[str, Any], ...], per_layer: bool) -> "SmolOptions":
        """The options of ``CompileConfig.method_options``; an unknown name is a ConfigError."""
        given = {}
        for key, value in pairs:
            if key not in cls.OPTIONS:
                raise ConfigError(f"unknown smol option {key!r}; known: {sorted(cls.OPTIONS)}")
            given[key] = value
        return cls(per_layer=per_layer, **given)

    def reference_precision(self, target_cr: float) -> int:
        """The precision a layer's clipping range is chosen for: the target's bits per weight."""
        return int(min(max(round(32.0 / target_cr), 1), self.max_precision))

    def start_precision(self, target_cr: float) -> float:
        p = self.init_precision if self.init_precision is not None else 32.0 / target_cr + 1.0
        return float(min(max(p, 1.05), self.max_precision))


@meta_entry
@dataclasses.dataclass(frozen=True)
class LearnedPrecision:
    """``smol_precision``'s result for one weight: the continuous precision ``p >= 1`` (float32,
    the weight's shape, or ``[1]`` for a per-layer precision) and the range the grid is laid
    over, ``amax`` (float32, one per cell of the weight's layout: ``[1]`` per tensor, ``[C]`` per
    output channel, ``[rows, groups]`` per group; every weight of a cell within it)."""

    META_KEY = "l2fx.smol_precision"
    precision: torch.Tensor
    amax: torch.Tensor
    per_layer: bool


@meta_entry
@dataclasses.dataclass(frozen=True)
class PrecisionMap:
    """``smol_round``'s result for one weight: integer precisions (int8, the weight's shape,
    0 = pruned) and the grid they were rounded on (``unit``: the units as stored, one per cell
    of the weight's layout; ``max_precision`` P)."""

    META_KEY = "l2fx.precision_map"
    precision: torch.Tensor
    unit: torch.Tensor
    max_precision: int


def grid_unit(amax: float | torch.Tensor, range_factor: float, max_precision: int) -> float | torch.Tensor:
    """The symbol unit of a grid over the range ``range_factor * amax`` (a float, or a tensor of
    ranges, one per cell of the layer's layout: :func:`l2fx.tparams.cell_amax`); 1 where the
    range is 0 (an all-zero cell, whose symbols are all 0)."""
    if isinstance(amax, torch.Tensor):
        a = amax.float() * float(range_factor)
        return torch.where(a > 0, a / (2 ** max_precision - 1), torch.ones_like(a))
    a = float(amax) * float(range_factor)
    return a / (2 ** max_precision - 1) if a > 0 else 1.0


@torch.no_grad()
def clip_range(w: torch.Tensor, precision: int, max_precision: int, candidates: int = 32) -> float:
    """The range ``a`` in ``[max|w| / candidates, max|w|]`` (``candidates`` evenly spaced) whose
    precision-``precision`` bit-value grid rounds ``w`` (clipped to ``[-a, a]``) with the least MSE."""
    amax = float(w.abs().max())
    if amax <= 0:
        return 0.0
    flat = w.detach().float().reshape(-1)
    if flat.numel() > 1 << 15:  # a fixed subsample: the range of a big layer needs no more
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 15]]
    best, best_err = amax, math.inf
    for i in range(1, candidates + 1):
        a = amax * i / candidates
        unit = grid_unit(a, 1.0, max_precision)
        q = quantize_at(flat.clamp(-a, a) / unit, torch.tensor(precision), max_precision).float() * unit
        err = float((q - flat).pow(2).mean())
        if err < best_err:
            best, best_err = a, err
    return best


def check_learned_precisions(gm, fail) -> None:
    """The postcondition of a pass that sets :class:`LearnedPrecision` s (``smol_precision``,
    ``given_precision``): every weight has one, of the weight's shape or ``[1]``, finite and
    >= 1, and its weight within ``amax``. ``fail(message, node)`` raises."""
    for node, _ in weight_sites(gm):
        lp = get_meta(node, LearnedPrecision)
        m = gm.get_submodule(str(node.target))
        if lp is None:
            fail("weight has no learned precision", node)
        if tuple(lp.precision.shape) not in ((1,), tuple(m.weight.shape)):
            fail(f"precision of shape {tuple(lp.precision.shape)} for a weight of {tuple(m.weight.shape)}", node)
        if not (torch.isfinite(lp.precision).all() and (lp.precision >= 1.0).all()):
            fail("a learned precision is not finite and >= 1", node)
        if not isinstance(lp.amax, torch.Tensor) or lp.amax.shape != m.step_s.shape:
            fail(f"range of shape {tuple(getattr(lp.amax, 'shape', ()))} for a layout of {tuple(m.step_s.shape)}", node)
        if bool((m.weight.detach().abs() > m.view(lp.amax.to(m.weight.device))).any()):
            fail("a weight left its cell's range", node)


def precision_of_s(s: torch.Tensor) -> torch.Tensor:
    """``p = 1 - log2(sigmoid(s)) = 1 + log2(1 + e^-s)`` (Eq. 12's reparametrisation)."""
    return 1.0 + torch.nn.functional.softplus(-s) / math.log(2.0)


def s_of_precision(p: float | torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`precision_of_s`, for ``p > 1``: ``s = -log(2^(p-1) - 1)``."""
    p = torch.as_tensor(p, dtype=torch.float32)
    return -torch.log(torch.expm1((p - 1.0) * math.log(2.0)))


def integer_precisions(precision: torch.Tensor, offset: float, max_precision: int) -> torch.Tensor:
    """``clamp(round(p - offset), 0, P)`` as int8: the final per-model offset moves every
    parameter's precision by the same amount (what the byte fit searches)."""
    return torch.round(precision.float() - offset).clamp(0, max_precision).to(torch.int8)


@torch.no_grad()
def quantize_at(r: torch.Tensor, p: torch.Tensor, max_precision: int) -> torch.Tensor:
    """Symbols of real-valued ``r`` (weights in units of the grid unit, ``|r| <= 2^P - 1``) at
    integer precisions ``p`` (broadcast): the centre of r's cell on the precision-p grid (cell
    ``2^(P+1-p)``, centres odd multiples of ``2^(P-p)``); 0 where p = 0. Returns int16."""
    P = max_precision
    if p.numel() == 1:  # one precision for all (a layer's grid, symbols_by_precision): scalar arithmetic
        k = int(p)
        if k == 0:
            return torch.zeros(r.shape, dtype=torch.int16, device=r.device)
        cell = 2.0 ** (P + 1 - k)
        top = 2.0 ** P - 0.5 * cell
        # floor(r / cell) * cell + cell / 2: exact in float32 (powers of two, |values| < 2^8)
        return (torch.floor(r.float() / cell) * cell + 0.5 * cell).clamp_(-top, top).to(torch.int16)
    p = p.to(torch.int64).expand_as(r)
    cell = torch.pow(2.0, (P + 1 - p).clamp(min=1).to(torch.float32))
    half = 0.5 * cell
    centre = torch.floor(r.float() / cell) * cell + half
    top = float(2 ** P) - half
    q = torch.maximum(torch.minimum(centre, top), -top)
    return torch.where(p == 0, torch.zeros_like(q), q).round().to(torch.int16)


def precision_of_symbols(q: torch.Tensor, max_precision: int) -> torch.Tensor:
    """The precision each symbol was stored at: ``P - v2(|q|)``, 0 for q = 0 (int8)."""
    table = torch.zeros(2 ** max_precision, dtype=torch.int8)
    for a in range(1, 2 ** max_precision):
        table[a] = max_precision - ((a & -a).bit_length() - 1)
    a = q.to(torch.int64).abs()
    if a.numel() and int(a.max()) >= 2 ** max_precision:
        raise ValueError(f"symbol {int(a.max())} is not on a grid of highest precision {max_precision}")
    return table.to(q.device)[a]


def symbols_by_precision(r: torch.Tensor, max_precision: int) -> torch.Tensor:
    """``[P + 1, *r.shape]`` int16: row k holds :func:`quantize_at` of ``r`` at precision k, so
    that symbols at any map are a gather (what a byte fit over the offset evaluates)."""
    P = max_precision
    return torch.stack([quantize_at(r, torch.tensor(k), P) for k in range(P + 1)])


def shuffle_within_layer(precision: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The control of the seed's Table 6 / D.3: the same precisions, randomly permuted among
    the layer's parameters (destroying any structure in the map, keeping its histogram)."""
    flat = precision.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=generator)].reshape(precision.shape)


def entropy_bits(x: np.ndarray) -> float:
    """Order-0 Shannon bits of the integer array ``x`` under its own histogram."""
    if x.size == 0:
        return 0.0
    _, counts = np.unique(x, return_counts=True)
    pr = counts / x.size
    return float(-(counts * np.log2(pr)).sum())


def map_code_bits(q: torch.Tensor, max_precision: int) -> dict[str, float]:
    """Shannon bits of one layer's symbols split and coded under different contexts.

    * ``joint``: the symbols under one table (what the artifact's range coder stores, up to
      its table and 32-bit word overhead) = ``map_order0 + values_given_p``;
    * ``map_order0``: the precision map alone, one table per layer;
    * ``map_per_row``: the map with one table per output row (rows = first dimension; each
      extra table costs ``P + 1`` 16-bit counts, added here);
    * ``map_order1``: the map conditioned on the previous precision in C order (one table
      per previous value, ``(P + 1)^2`` counts added);
    * ``values_given_p``: the values at their precisions (sign and index within the 2^p
      grid), one table per precision.
    """
    flat = q.reshape(-1).to(torch.int64).numpy()
    p = precision_of_symbols(q, max_precision).reshape(-1).to(torch.int64).numpy()
    n_ctx = max_precision + 1
    joint = entropy_bits(flat)
    map0 = entropy_bits(p)
    rows = q.shape[0] if q.dim() > 1 else 1
    per_row = sum(entropy_bits(r) for r in p.reshape(rows, -1)) + 16 * n_ctx * (rows - 1)
    prev = np.concatenate([[0], p[:-1]])
    order1 = sum(entropy_bits(p[prev == c]) for c in range(n_ctx)) + 16 * n_ctx * (n_ctx - 1)
    values = sum(entropy_bits(flat[p == c]) for c in range(1, n_ctx))
    return {"numel": int(flat.size), "joint": joint, "map_order0": map0, "map_per_row": float(per_row),
            "map_order1": float(order1), "values_given_p": float(values)}
