"""Byte fits: scaling a layer's T grid by a common factor until its real bytes meet a budget.

Shared by ``rate_fit`` (the whole model), ``block_reconstruction`` (one block at a time) and the
one-shot methods: the bytes of a layer at a step factor (its real symbols under its real table,
T parameters rounded to their storage dtype: :mod:`l2fx.accounting`), the search for the factor
that lands a total inside a window, and the finest factor before symbols saturate at ``+-qmax``.
Larger factors mean coarser steps and fewer bytes.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from l2fx.accounting import predict_layer_nbytes, round_params
from l2fx.ir import weight_sites
from l2fx.modules import TransformedWeight
from l2fx.transform import TransformKind, encode

__all__ = ["scaled", "within_tolerance", "prediction_slack", "symbols_at", "layer_bytes_at", "clipped_at", "finest_log2_factor",
           "total_nbytes", "budget_nbytes", "fit_log2_factor", "block_nbytes", "fit_block_nbytes", "apply_factor"]


def scaled(module: TransformedWeight, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's (s, e) with its grid scaled by ``factor``: a fixed grid (a user's bits) is
    never scaled; the PRUNE kind scales only its threshold (its step is the alphabet's finest)."""
    s, e = module.step_s.detach(), module.threshold_e.detach()
    if module.fixed:
        return s, e
    if module.kind is TransformKind.PRUNE:
        return s, torch.maximum(e * factor, 0.5 * s)
    return s * factor, e * factor


def within_tolerance(nbytes: float, budget: float, tolerance: float, slack: float = 0.0) -> bool:
    """Whether ``nbytes`` puts the CR within ``-tolerance/2 .. +tolerance`` of the target
    whose byte budget is ``budget``: the promise of ``cr_tolerance``, kept on the safe side.
    ``slack``: how far predicted bytes may be off the real ones (:func:`prediction_slack`); the
    window shrinks by it at both ends so that the real bytes are inside too."""
    return budget / (1 + tolerance) + slack <= nbytes <= budget / (1 - tolerance / 2) - slack


def prediction_slack(gm: fx.GraphModule, chunk_size: int) -> int:
    """The most predicted payload bytes may differ from the coder's: one 32-bit word per chunk
    (:func:`l2fx.coding.predict_payload_nbytes`). A 1 kB model is 4 bytes (0.4 %) off at worst,
    enough to leave a total predicted inside the tolerance outside it once coded."""
    return sum(4 * -(-site.numel // chunk_size) for _, site in weight_sites(gm))


@torch.no_grad()
def symbols_at(module: TransformedWeight, factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's symbols with T scaled by ``factor`` and rounded to its storage dtype, and that (s, e)."""
    s, e = scaled(module, factor)
    s, e, _ = round_params(module.kind, s, e)
    w = module.weight.detach()
    q = encode(w, module.kind, module.view(s), module.view(e),
               module.qmax)
    return q, s, e


def layer_bytes_at(module: TransformedWeight, param: str, factor: float, chunk_size: int) -> int:
    q, s, e = symbols_at(module, factor)
    return predict_layer_nbytes(param, module.kind, q.cpu(), module.channel_axis, chunk_size, s, e,
                                module.group_size).total


def clipped_at(module: TransformedWeight, factor: float) -> int:
    """How many of the module's weights saturate at symbol ``+-qmax`` with T scaled by ``factor``."""
    return int((symbols_at(module, factor)[0].abs() == module.qmax).sum())


def finest_log2_factor(modules: list[TransformedWeight], floor: float, iters: int = 12) -> float:
    """The smallest log2 factor t in ``[floor, 0]`` at which no more weights saturate at
    ``+-qmax`` than at t = 0.

    Below it, finer steps *lower* the byte count (symbols pile up at +-qmax) while the error
    explodes, so a byte fit that wants more bytes than the layers can hold must stop there
    instead of following the bytes down (2-layer MLP at CR 4.3: relative output error 0.29
    instead of 8e-5). Saturation only grows as t falls, so bisection finds it.
    """
    def clipped(t: float) -> int:
        return sum(clipped_at(m, 2.0 ** t) for m in modules)

    now = clipped(0.0)
    if clipped(floor) <= now:
        return floor
    lo, hi = floor, 0.0  # clipped(lo) > now >= clipped(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if clipped(mid) > now:
            lo = mid
        else:
            hi = mid
    return hi


def total_nbytes(gm: fx.GraphModule, factor: float, chunk_size: int) -> int:
    """Real bytes of every weight site of ``gm`` with its T grid scaled by ``factor``."""
    return sum(layer_bytes_at(gm.get_submodule(str(n.target)), site.param, factor, chunk_size)
               for n, site in weight_sites(gm))


def fit_log2_factor(total, budget: float, low_ok: float, log=lambda t, b: None,
                    max_evals: int = 30, floor: float = -6.0, ceil: float = 6.0,
                    second: float | None = None) -> tuple[float, int]:
    """The log2 step factor t in ``[floor, ceil]`` whose byte total lies in [low_ok, budget]
    (else the closest under).

    Bytes fall roughly linearly in t (about numel/8 bytes per halving of the step), so a
    secant step on log(bytes) finds the window in a few evaluations; a bracket kept alongside
    falls back to bisection when the secant leaves it. Larger t = coarser steps = fewer bytes.
    ``second``: the second probe (default 0.02), where the caller can guess better.
    """
    goal = math.log(0.5 * (budget + low_ok))
    evals: dict[float, int] = {}

    def f(t: float) -> int:
        if t not in evals:
            evals[t] = total(t)
            log(t, evals[t])
        return evals[t]

    lo, hi = floor, ceil  # bracket: bytes(lo) > budget >= bytes(hi) once established
    # A small first probe (it was 0.25), so the secant starts from the current steps. It does
    # not by itself keep t small where bytes barely move with t: on snapped weights
    # (TransformedWeight.snap) over budget by 0.4 %, it still ended at 2^0.26, scaling every
    # decoded weight by 1.2 (Fashion-MNIST ResNet, CR 20: accuracy 0.75). What prevents that
    # is block reconstruction keeping the total within tolerance, which ``call`` then keeps.
    t_prev, t = 0.0, 0.02 if second is None else second
    for _ in range(max_evals):
        for x in (t_prev, t):
            b = f(x)
            if low_ok <= b <= budget:
                return x, b
            if b > budget:
                lo = max(lo, x)
            else:
                hi = min(hi, x)
        y0, y1 = math.log(f(t_prev)) - goal, math.log(f(t)) - goal
        nxt = t - y1 * (t - t_prev) / (y1 - y0) if y1 != y0 else 0.5 * (lo + hi)
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        t_prev, t = t, nxt
    under = [(x, b) for x, b in evals.items() if b <= budget]
    return max(under, key=lambda xb: xb[1]) if under else max(evals.items(), key=lambda xb: xb[0])

def budget_nbytes(gm: fx.GraphModule, target_cr: float) -> float:
    """Bytes the compressed weights may take at ``target_cr``: their fp32 bytes over the target."""
    return sum(4 * site.numel for _, site in weight_sites(gm)) / target_cr


@torch.no_grad()
def apply_factor(modules: list[TransformedWeight], factor: float) -> None:
    """Scales every module's T grid by ``factor`` in place (:func:`scaled`)."""
    for m in modules:
        s, e = scaled(m, factor)
        m.step_s.copy_(s)
        m.threshold_e.copy_(e)


@torch.no_grad()
def block_nbytes(layers: list[tuple[TransformedWeight, str]], factor: float, chunk_size: int) -> int:
    """Real bytes of ``layers`` (module, param) with their T grids scaled by ``factor``."""
    return sum(layer_bytes_at(m, param, factor, chunk_size) for m, param in layers)


@torch.no_grad()
def fit_block_nbytes(layers: list[tuple[TransformedWeight, str]], target: float, tolerance: float,
                     chunk_size: int, now: int | None = None) -> tuple[float, int]:
    """Scales the layers' T by one common factor so their bytes land in ``[target (1 - tol), target]``.

    The block-local version of ``rate_fit`` (same search, :func:`fit_log2_factor`,
    within a factor 4 either way, and never finer than the layers can hold without saturating
    more symbols: :func:`finest_log2_factor`); returns the factor applied and the
    block's real bytes after it. ``now``: the bytes at factor 1, where the caller has them already.
    """
    if not layers:
        return 1.0, 0
    now = block_nbytes(layers, 1.0, chunk_size) if now is None else now
    if target * (1 - tolerance) <= now <= target:
        return 1.0, now
    floor = finest_log2_factor([m for m, _ in layers], -2.0) if now < target else 0.0
    log2f, nbytes = fit_log2_factor(lambda t: now if t == 0.0 else block_nbytes(layers, 2.0 ** t, chunk_size),
                                    target, target * (1 - tolerance), floor=floor, ceil=2.0)
    factor = 2.0 ** log2f
    apply_factor([m for m, _ in layers], factor)
    return factor, nbytes
