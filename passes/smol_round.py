"""``smol_round``: every weight rounded to its learned integer precision, the counted bytes on target.

Each parameter's precision becomes ``clamp(round(p - offset), 0, P)`` (0 = pruned) with one per-
model ``offset``, and its weight the centre of its cell on the precision's bit-value grid over
its cell's range (:func:`l2fx.precision.quantize_at`; a cell of the weight's layout, per output
channel by default, ``bit_value_grid``): symbols ``r``, weight ``r * unit``. The offset is
bisected so that the *counted* bytes (every byte the artifact writes for the layers,
:func:`l2fx.accounting.predict_layer_nbytes`: the symbols, which carry the precision map, under
their range-coder table, and the units) land in the tolerance window of the target. One offset
moves a whole layer's precision at once for ``smol-l`` (and many equal precisions at once for
``smol``), so the bytes jump; where no offset lands in the window, the offset just above it is
kept and one common range factor ``a = factor * max|w|`` of every cell (>= 1, coarser cells, no
clipping) is bisected to close the rest. ``shuffle`` (the control of the seed's Table 6): each
layer's integer map is permuted by a fixed random permutation before the weights are rounded,
and the same search fits its bytes. ``fixed=(offset, factor)`` (training-aware SMOL, whose fine-
tuning trained the weights at one rounding) applies that rounding when its bytes are in the
window, and searches as above, recorded, when they are not.

Before: ``TransformedWeight`` s of ``bit_value_grid`` with a ``LearnedPrecision`` each. After:
the same modules, each weight a point of its grid (``T^-1(round(T(w))) == w``), its unit as
stored, a :class:`~l2fx.precision.PrecisionMap` on each weight, equal to the precision its
symbols encode (:func:`~l2fx.precision.precision_of_symbols`).

Pre: ``smol_precision`` ran. Post: the above, and the counted bytes give a compressed-parameter
CR within ``cr_tolerance`` of ``target_cr`` (checked here on the predicted bytes, allowing the
predictor's one word per chunk, and by ``range_code`` on the real ones).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from l2fx.accounting import predict_layer_nbytes, round_params
from l2fx.bytefit import prediction_slack, within_tolerance
from l2fx.errors import ConfigError, TargetCRError
from l2fx.ir import get_meta, set_meta, weight_sites
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.precision import (LearnedPrecision, PrecisionMap, SmolOptions, grid_unit, integer_precisions,
                            map_code_bits, precision_of_symbols, symbols_by_precision)
from l2fx.transform import TransformKind

__all__ = ["SmolRound"]

_OFFSET_ITERS = 18
_FACTOR_ITERS = 16
_MAX_FACTOR = 4.0


def _layer_nbytes(m: TransformedWeight, site, q: torch.Tensor, s: torch.Tensor, e: torch.Tensor, chunk: int) -> int:
    """The counted bytes of a layer stored as symbols ``q`` with units ``s`` in the module's layout."""
    return predict_layer_nbytes(site.param, TransformKind.LINEAR, q, m.channel_axis, chunk, s, e, m.group_size).total


class SmolRound(L2fxPass):
    name = "smol_round"
    requires_meta = (LearnedPrecision,)
    requires_weight_modules = (TransformedWeight,)
    writes_weights = True

    def __init__(self, per_layer: bool = False, fixed: tuple[float, float] | None = None):
        if fixed is not None:
            offset, factor = fixed
            if not (math.isfinite(offset) and math.isfinite(factor) and 1.0 <= factor <= _MAX_FACTOR):
                raise ConfigError(f"smol_round: fixed must be (finite offset, range factor in [1, {_MAX_FACTOR}]), "
                                  f"got {fixed!r}")
        self.per_layer = per_layer
        self.fixed = None if fixed is None else (float(fixed[0]), float(fixed[1]))

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config
        opts = SmolOptions.from_pairs(cfg.method_options, self.per_layer)
        P, chunk, tol = opts.max_precision, cfg.coding.chunk_size, cfg.cr_tolerance
        layers = []
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        for node, site in weight_sites(gm):
            m = gm.get_submodule(str(node.target))
            lp = get_meta(node, LearnedPrecision)
            p = lp.precision.cpu().expand(m.weight.shape) if lp.per_layer else lp.precision.cpu()
            perm = torch.randperm(p.numel(), generator=gen) if opts.shuffle else None
            layers.append((node, site, m, p, lp.amax.detach().cpu(), perm))
        fp32 = sum(4 * site.numel for _, site, *_ in layers)
        budget = fp32 / cfg.target_cr
        slack = prediction_slack(gm, chunk)
        high, low = budget / (1 - tol / 2) - slack, budget / (1 + tol) + slack

        stacks: dict[float, list] = {}  # range factor -> per layer (s, e, symbols at every precision)

        def grids(factor: float) -> list:
            if factor not in stacks:
                stacks.clear()  # one factor's stacks at a time: 16 bytes per weight
                stacks[factor] = []
                for node, site, m, p, amax, perm in layers:
                    unit = grid_unit(amax, factor, P)
                    s, e, _ = round_params(TransformKind.LINEAR, unit, 0.5 * unit)
                    w = m.weight.detach().cpu()
                    stacks[factor].append((s, e, symbols_by_precision(w / m.view(s), P)))
            return stacks[factor]

        def rounded(offset: float, factor: float):
            out = []
            for (node, site, m, p, amax, perm), (s, e, stack) in zip(layers, grids(factor)):
                pint = integer_precisions(p, offset, P)
                # an all-zero cell is exactly its zero-precision map (the mid-rise grid has no 0)
                pint = torch.where(m.view(amax) > 0, pint, torch.zeros_like(pint))
                if perm is not None:
                    pint = pint.reshape(-1)[perm].reshape(pint.shape)
                q = stack.gather(0, pint.to(torch.int64).unsqueeze(0)).squeeze(0)
                out.append((q, s, e, pint))
            return out

        evals = {}

        def total(offset: float, factor: float) -> int:
            key = (offset, factor)
            if key not in evals:
                evals[key] = sum(_layer_nbytes(m, site, q, s, e, chunk)
                                 for (q, s, e, _), (_, site, m, *_r) in zip(rounded(offset, factor), layers))
            return evals[key]

        fixed_used = self.fixed is not None and low <= total(*self.fixed) <= high
        lo, hi = -float(P) - 1.0, float(P) + 1.0  # offset: lo = every parameter at P, hi = all pruned
        if not fixed_used and total(lo, 1.0) < low:
            raise TargetCRError(f"smol: target_cr {cfg.target_cr} needs more bytes ({budget:.0f}) than every weight "
                                f"at the highest precision {P} gives ({total(lo, 1.0)}); lower target_cr")
        if not fixed_used and total(hi, 1.0) > high:
            raise TargetCRError(f"smol: target_cr {cfg.target_cr} needs fewer bytes ({budget:.0f}) than every weight "
                                f"pruned still takes ({total(hi, 1.0)}: the units and code tables of the layers' "
                                f"grids); lower target_cr, or use a coarser granularity")
        offset, factor = self.fixed if fixed_used else self._search(total, lo, hi, low, high)
        nbytes = total(offset, factor)
        records, numel, zeros, psum, map_bits, joint_bits = {}, 0, 0, 0, 0.0, 0.0
        for (node, site, m, p, amax, perm), (q, s, e, pint) in zip(layers, rounded(offset, factor)):
            m.step_s.copy_(s.to(m.step_s.device))
            m.threshold_e.copy_(e.to(m.threshold_e.device))
            m.weight.copy_(q.float().to(m.weight.device) * m.view(s.to(m.weight.device)))
            set_meta(node, PrecisionMap(pint.contiguous(), s.clone(), P))
            bits = map_code_bits(q, P)
            hist = torch.bincount(pint.reshape(-1).to(torch.int64), minlength=P + 1).tolist()
            layer_bytes = _layer_nbytes(m, site, q, s, e, chunk)
            records[site.param] = {"numel": site.numel, "mean_precision": float(pint.float().mean()),
                                   "zero_fraction": hist[0] / site.numel, "histogram": hist,
                                   "bpp": 8.0 * layer_bytes / site.numel, "nbytes": layer_bytes, "code_bits": bits}
            numel += site.numel
            zeros += hist[0]
            psum += float(pint.float().sum())
            map_bits += bits["map_order0"]
            joint_bits += bits["joint"]
        ctx.records[self.name] = {
            "offset": offset, "range_factor": factor, "shuffle": opts.shuffle,
            "fixed": self.fixed, "fixed_used": fixed_used, "predicted_nbytes": nbytes,
            "budget_nbytes": budget, "predicted_cr": fp32 / nbytes if nbytes else math.inf,
            "mean_precision": psum / max(numel, 1), "zero_fraction": zeros / max(numel, 1),
            "bpp": 8.0 * nbytes / max(numel, 1), "map_bits": map_bits, "joint_bits": joint_bits,
            "searches": len(evals), "layers": records}
        ctx.log(self.name, f"offset {offset:+.4f}, range x{factor:.4f}: CR {fp32 / nbytes:.3f}, "
                           f"mean precision {psum / max(numel, 1):.3f}, zero {zeros / max(numel, 1):.3f}")
        return PassResult(gm, True)

    @staticmethod
    def _search(total, lo: float, hi: float, low: float, high: float) -> tuple[float, float]:
        """(offset, range factor): the offset bisected to the window's top, then, where the bytes
        jump over the window, the offset below it and a coarser range."""
        for _ in range(_OFFSET_ITERS):  # total(lo) > high >= total(hi)
            mid = 0.5 * (lo + hi)
            if total(mid, 1.0) > high:
                lo = mid
            else:
                hi = mid
        if total(hi, 1.0) >= low:
            return hi, 1.0
        f_lo, f_hi = 1.0, _MAX_FACTOR  # a jump over the window: total(lo, f_lo) > high
        if total(lo, f_hi) > high:
            return hi, 1.0
        for _ in range(_FACTOR_ITERS):
            mid = 0.5 * (f_lo + f_hi)
            b = total(lo, mid)
            if b > high:
                f_lo = mid
            else:
                f_hi = mid
                if b >= low:
                    break
        return lo, f_hi

    @torch.no_grad()
    def ensures(self, gm: fx.GraphModule) -> None:
        ctx = PassContext.current()
        cfg = ctx.config
        chunk = cfg.coding.chunk_size
        fp32 = nbytes = 0
        for node, site in weight_sites(gm):
            m = gm.get_submodule(str(node.target))
            pm = get_meta(node, PrecisionMap)
            if pm is None:
                self.fail("weight has no precision map", node)
            if not torch.equal(m(), m.weight):
                self.fail("a weight is not a point of its grid", node)
            s, e = m.step_s.detach().cpu(), m.threshold_e.detach().cpu()
            q = torch.round(m.weight.detach().cpu() / m.view(s)).to(torch.int16)
            if not torch.equal(precision_of_symbols(q, pm.max_precision), pm.precision.cpu()):
                self.fail("the symbols do not encode the layer's precision map", node)
            fp32 += 4 * site.numel
            nbytes += _layer_nbytes(m, site, q, s, e, chunk)
        slack = prediction_slack(gm, chunk)
        budget = fp32 / cfg.target_cr
        if not within_tolerance(nbytes, budget, cfg.cr_tolerance, slack):
            raise TargetCRError(f"pass {self.name!r}: counted bytes {nbytes} give CR {fp32 / nbytes:.3f}, outside "
                                f"{cfg.cr_tolerance:.0%} of target {cfg.target_cr} (the precision grid allows no "
                                f"closer fit)")
