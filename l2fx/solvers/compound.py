"""Compound compression (OBC, Frantar & Alistarh 2022, Sec. 6 and appendix A.10): one option per
layer from {dense, 2:4} x {8, 4} weight bits (the seed's; ``method_options`` ``bop_options`` offers
any of dense / N:M / 4-block x 2..8 bits, :meth:`Option.parse`), chosen by a dynamic program over
per-layer error tables under a global BOP-reduction target; block formats (MXFP4, MXFP8 ...) can
join the options (:meth:`Option.of_format`, ``bop_formats``), rounded as their spec says.

* An :class:`Option` is a sparsity pattern (dense, N:M, or a fraction of 4-blocks), a weight
  bit width and an activation bit width; its BOPs are ``MACs * density * weight bits *
  activation bits`` (:func:`option_bops`: 2:4 halves the MACs; 4-blocks at 50% too, on a
  runtime that skips them, as OBC's CPU setting assumes of DeepSparse; l2fx's own runtime
  decodes pruned blocks as zeros). The BOP reduction is against the dense fp32 model (``32 x
  32`` per MAC). Activations stay fp32 (``act_bits`` 32, :data:`ACT_BITS`) unless an option
  names its bits (``dense-w8a8``, ``2:4-w4a4``: the seed's w+a setting, :data:`WA_OPTIONS`):
  then the layer reads its input through a static per-tensor quantiser
  (:mod:`l2fx.activations`) calibrated on the calibration inputs, which the artifact stores
  and both load paths replay. Weights only: dense 8-bit is 4x, 2:4 8-bit and dense 4-bit 8x,
  2:4 4-bit 16x; with activations at the weights' bits: 16x, 64x, 32x and 128x.
* :func:`option_errors`: one layer's row of the table, the layer loss ``tr(dW H dW^T)``
  (:func:`l2fx.solvers.hessian.layer_loss`, on the calibration inputs' Hessian) of each option,
  each solved by the given recipe (OBC's ExactOBS, or the AdaPrune+AdaQuant baseline).
* :func:`choose_options`: the dynamic program. Costs are discretised in units of
  ``budget / resolution`` and rounded *up*, so every plan the DP accepts meets the real budget;
  on the rounded costs it is exact (the minimum summed error among all plans whose rounded
  costs fit ``resolution`` units). What rounding can lose: plans within ``layers`` units of the
  budget whose rounded costs no longer fit (at most ``layers / resolution`` of the budget).

Pure tensors and numbers: no modules, no graph (``passes/compound_plan.py`` builds the tables
from a model).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping, Sequence

import numpy as np
from torch import Tensor

from l2fx import formats
from l2fx.errors import ConfigError, TargetCRError
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import layer_loss
from l2fx.solvers.recipes import solve
from l2fx.transform import FORMAT_KINDS, TransformKind

__all__ = ["Option", "OPTIONS", "WA_OPTIONS", "BLOCK", "ACT_BITS", "option_bops", "option_errors", "format_loss", "Plan", "choose_options",
           "DEFAULT_RESOLUTION"]

BLOCK = 4  # the 4-block pattern: 4 consecutive input columns of a row pruned together
ACT_BITS = 32  # activations stay fp32 unless an option names its bits (see the module docstring)
DEFAULT_RESOLUTION = 10000  # DP budget units: costs rounded up lose at most layers/10000 of the budget


@dataclasses.dataclass(frozen=True)
class Option:
    """A layer's compression option: ``bits`` per weight and a pattern: dense, ``prune_n`` kept of
    every ``prune_m`` consecutive input columns (N:M), or ``block_sparsity`` of the layer's
    4-blocks (:data:`BLOCK` consecutive input columns of one row, OBC's CPU pattern) pruned; or a
    block ``format`` (dense). ``act_bits``: the layer's input activations, 32 (fp32, not
    quantised) or 2..8 (static per-tensor fake quantisation, :mod:`l2fx.activations`)."""

    bits: int
    prune_n: int = 0
    prune_m: int = 0
    format: str | None = None  # a block format (dense): its spec's quantisation, ``bits`` its element bits
    block_sparsity: float = 0.0  # fraction of the layer's 4-blocks pruned (0: no block pruning)
    act_bits: int = ACT_BITS

    def __post_init__(self):
        a = self.act_bits
        if isinstance(a, bool) or not isinstance(a, int) or not (a == ACT_BITS or 2 <= a <= 8):
            raise ConfigError(f"Option.act_bits must be {ACT_BITS} (fp32 activations) or an int in 2..8, got {a!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"Option.bits must be an int in 2..8, got {self.bits!r}")
        if (self.prune_m == 0) != (self.prune_n == 0) or not 0 <= self.prune_n < max(self.prune_m, 1):
            raise ConfigError(f"Option: prune_n/prune_m must be 0/0 (dense) or 0 < N < M, "
                              f"got {self.prune_n}/{self.prune_m}")
        s = self.block_sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ConfigError(f"Option.block_sparsity must be a fraction in [0, 1), got {s!r}")
        object.__setattr__(self, "block_sparsity", float(s))
        if s and self.prune_m:
            raise ConfigError(f"Option: give N:M ({self.prune_n}:{self.prune_m}) or block_sparsity ({s}), not both")
        if self.format is not None:
            if self.format not in FORMAT_KINDS:
                raise ConfigError(f"Option.format must be a block format ({[k.value for k in FORMAT_KINDS]}), "
                                  f"got {self.format!r}")
            object.__setattr__(self, "format", TransformKind(self.format).value)
            if (self.prune_m or s or self.act_bits != ACT_BITS
                    or self.bits != FORMAT_KINDS[TransformKind(self.format)].element_bits):
                raise ConfigError(f"Option {self.format}: a format option is dense with bits = its element bits "
                                  f"({FORMAT_KINDS[TransformKind(self.format)].element_bits}) and fp32 activations; "
                                  f"use Option.of_format")

    @classmethod
    def of_format(cls, fmt: "str | TransformKind") -> "Option":
        """The dense option of block format ``fmt`` (BOPs at its element bits: the per-block scale
        multiplies once per block of MACs, which BOPs do not count)."""
        if fmt not in FORMAT_KINDS:
            raise ConfigError(f"bop_formats: {fmt!r} is not a block format; known: {[k.value for k in FORMAT_KINDS]}")
        kind = TransformKind(fmt)
        return cls(FORMAT_KINDS[kind].element_bits, format=kind.value)

    @classmethod
    def parse(cls, name: str) -> "Option":
        """The option named ``name`` (its :attr:`name`): ``dense-w<b>``, ``<N>:<M>-w<b>``,
        ``4block<percent pruned>-w<b>`` (e.g. ``4block50-w4``), each optionally followed by
        ``a<bits>`` (activations quantised: ``dense-w8a8``, ``2:4-w4a4``), or a block format's name."""
        if not isinstance(name, str):
            raise ConfigError(f"bop_options: an option is a name such as 'dense-w6', '2:4-w4' or '4block50-w4', "
                              f"got {name!r}")
        if name in FORMAT_KINDS:
            return cls.of_format(name)
        m = _OPTION_NAME.fullmatch(name)
        if m is None:
            raise ConfigError(f"bop_options: {name!r} is not an option name: 'dense-w<bits>', '<N>:<M>-w<bits>', "
                              f"'4block<percent pruned>-w<bits>' (bits 2..8), each optionally + 'a<activation "
                              f"bits>' (e.g. 'dense-w8a8'), or a block format ({[k.value for k in FORMAT_KINDS]})")
        bits = int(m["bits"])
        act = int(m["abits"]) if m["abits"] is not None else ACT_BITS
        if m["n"] is not None:
            return cls(bits, int(m["n"]), int(m["m"]), act_bits=act)
        if m["pct"] is not None:
            pct = float(m["pct"])
            if not 0 < pct < 100:
                raise ConfigError(f"bop_options: {name!r}: the percentage of 4-blocks pruned must be in (0, 100)")
            return cls(bits, block_sparsity=pct / 100, act_bits=act)
        return cls(bits, act_bits=act)

    @property
    def dense(self) -> bool:
        return self.prune_m == 0 and self.block_sparsity == 0.0

    @property
    def group(self) -> int:
        """The number of input columns the pattern works on together (1 dense; M; 4 for 4-blocks):
        the layer's column count must be a multiple of it."""
        return self.prune_m or (BLOCK if self.block_sparsity else 1)

    @property
    def density(self) -> float:
        """The fraction of weights kept (of 4-blocks: the nominal one; the layer rounds its pruned
        block count to the nearest whole block)."""
        if self.prune_m:
            return self.prune_n / self.prune_m
        return 1.0 - self.block_sparsity

    @property
    def name(self) -> str:
        if self.format is not None:
            return self.format
        if self.prune_m:
            pattern = f"{self.prune_n}:{self.prune_m}"
        elif self.block_sparsity:
            pattern = f"{BLOCK}block{100 * self.block_sparsity:g}"
        else:
            pattern = "dense"
        return f"{pattern}-w{self.bits}" + (f"a{self.act_bits}" if self.act_bits != ACT_BITS else "")

    def solver_options(self) -> tuple[tuple[str, object], ...]:
        """The one-shot options that make a recipe apply this pattern (dense: none pruned)."""
        if self.block_sparsity:
            return (("sparsity", self.block_sparsity), ("prune_n", 0), ("prune_m", 0), ("block", BLOCK))
        return (("sparsity", 0.0), ("prune_n", self.prune_n), ("prune_m", self.prune_m), ("block", 1))


_OPTION_NAME = re.compile(r"(?:dense|(?P<n>\d+):(?P<m>\d+)|4block(?P<pct>\d+(?:\.\d+)?))-w(?P<bits>\d+)"
                          r"(?:a(?P<abits>\d+))?")

#: The seed's options with fp32 activations (the weights-only BOP count).
OPTIONS: tuple[Option, ...] = (Option(8), Option(4), Option(8, 2, 4), Option(4, 2, 4))
#: The seed's w+a setting: {dense, 2:4} x {8w8a, 4w4a}.
WA_OPTIONS: tuple[Option, ...] = (Option(8, act_bits=8), Option(4, act_bits=4), Option(8, 2, 4, act_bits=8),
                                  Option(4, 2, 4, act_bits=4))


def option_bops(macs: float, option: Option | None) -> float:
    """BOPs of a layer of ``macs`` multiply-accumulates under ``option`` (None: dense fp32)."""
    if option is None:
        return float(macs) * 32 * ACT_BITS
    return float(macs) * option.density * option.bits * option.act_bits


def option_errors(recipe: str, W: Tensor, H: Tensor, grids: Mapping[int, Grid], options: Sequence[Option],
                  base_options: Mapping[str, object], layer: str = "?") -> list[float]:
    """The layer loss of each option (``grids[bits]``: the layer's grid at that width), the
    pattern passed to ``recipe`` through its options, ``base_options`` (the method's) underneath.
    Weights-only options: a w+a option's loss needs the layer's inputs, not one Hessian
    (``passes/compound_plan.py`` measures it with :func:`l2fx.layerwise.joint_errors`)."""
    out = []
    for opt in options:
        if opt.act_bits != ACT_BITS:
            raise ConfigError(f"option_errors: {opt.name} quantises activations; its loss is measured on the "
                              f"layer's inputs (l2fx.layerwise.joint_errors), not from one Hessian")
        if opt.format is not None:
            out.append(format_loss(W, H, opt.format))
            continue
        res = solve(recipe, W, H, grids[opt.bits], {**base_options, **dict(opt.solver_options())}, layer=layer)
        out.append(float(res.loss))
    return out


def format_loss(W: Tensor, H: Tensor, fmt: str) -> float:
    """The layer loss of ``W`` [rows, K] stored in block format ``fmt``: its spec's quantisation
    along the rows (blocks of the format along K, as ``l2fx.tparams.format_scales`` makes them).
    Rounded to nearest: the solvers' grids are uniform, so no recipe searches a format's element
    set (``oneshot_solve`` records such a layer as a round-to-nearest fallback)."""
    spec = FORMAT_KINDS[TransformKind(fmt)]
    q = formats.quantize(W.detach().float(), spec, axis=1)
    return layer_loss(W, formats.dequantize(q.symbols, q.scales, spec, axis=1), H)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The DP's choice: ``choice[i]`` indexes layer i's options; ``error`` and ``cost`` are the
    true (not rounded) sums; ``units``: the rounded cost in budget units of ``budget / resolution``."""

    choice: tuple[int, ...]
    error: float
    cost: float
    budget: float
    resolution: int
    units: int


def _check_table(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(errors) or not costs:
        raise ConfigError(f"choose_options: need one cost and one error row per layer (got {len(costs)} cost rows, "
                          f"{len(errors)} error rows)")
    for i, (c, e) in enumerate(zip(costs, errors)):
        if len(c) != len(e) or not c:
            raise ConfigError(f"choose_options: layer {i} has {len(c)} costs and {len(e)} errors (need as many, >= 1)")
        if not all(math.isfinite(x) and x >= 0 for x in c):
            raise ConfigError(f"choose_options: layer {i}'s costs must be finite and >= 0, got {list(c)}")
        if any(math.isnan(x) for x in e):
            raise ConfigError(f"choose_options: layer {i}'s errors hold a NaN: {list(e)}")


def choose_options(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], budget: float,
                   resolution: int = DEFAULT_RESOLUTION,
                   describe: Callable[[int], str] = lambda i: f"layer {i}") -> Plan:
    """One option per layer minimising the summed error with the summed cost within ``budget``
    (see the module docstring: exact on costs rounded up to units of ``budget / resolution``).
    Ties go to the cheaper plan. Raises :class:`TargetCRError` when even the cheapest options
    (rounded) exceed the budget, naming the cheapest total."""
    _check_table(costs, errors)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"choose_options: resolution must be an int >= 1, got {resolution!r}")
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"choose_options: budget must be finite and > 0, got {budget!r}")
    unit = budget / resolution
    R = resolution
    # ceil with a relative guard: a cost that is an exact multiple of the unit stays that multiple.
    units = [[int(math.ceil(c / unit * (1 - 1e-12))) for c in row] for row in costs]
    cheapest = sum(min(row) for row in units)
    if cheapest > R:
        raise TargetCRError(f"BOP budget {budget:.4g} is out of reach: the cheapest option of every layer costs "
                            f"{sum(min(r) for r in costs):.4g} ({cheapest} of {R} units)")
    inf = math.inf
    # best[b]: least summed error of the layers so far at a rounded cost of exactly b units.
    best = np.full(R + 1, inf)
    best[0] = 0.0
    picks = []
    for i, (urow, erow) in enumerate(zip(units, errors)):
        new = np.full(R + 1, inf)
        arg = np.full(R + 1, -1, dtype=np.int64)
        for j, (u, e) in enumerate(zip(urow, erow)):
            if u > R:
                continue
            cand = np.full(R + 1, inf)
            cand[u:] = best[: R + 1 - u] + e
            better = cand < new
            new[better], arg[better] = cand[better], j
        if not np.isfinite(new).any():
            raise TargetCRError(f"BOP budget {budget:.4g} is out of reach at {describe(i)}")
        best = new
        picks.append(arg)
    # The least error over every reachable rounded cost; among equal errors, the cheapest.
    b = int(np.flatnonzero(best == best.min())[0])
    total_units = b
    choice = []
    for i in range(len(units) - 1, -1, -1):
        j = int(picks[i][b])
        choice.append(j)
        b -= units[i][j]
    choice.reverse()
    return Plan(tuple(choice), float(sum(errors[i][j] for i, j in enumerate(choice))),
                float(sum(costs[i][j] for i, j in enumerate(choice))), float(budget), R, total_units)
