"""``entropy_allocation``: one T setting per weight so that the total bytes meet the budget.

Budget (Eq. 10's target): ``sum(32 * numel) / 8 / target_cr`` bytes for all compressed
weights. Lagrangian equal-slope allocation over the sensitivity curves: for a multiplier
lambda every layer takes the candidate minimising ``distortion + lambda * bytes``; lambda is
bisected (in log space) to the smallest value whose total fits the budget. The discrete grid
leaves the total a little under budget; ``rate_fit`` closes the gap on the real symbols.

With ``SensitivityConfig.joint_rounds``, the additive assumption is checked and corrected:
:func:`joint_correction` measures the picks' joint error, rescales each layer's curve by its
measured marginal share over its predicted distortion and re-allocates at the same budget,
keeping a round only when the measured joint error falls (``records[...]["joint"]``).

A picked candidate of a block-format kind (offered by ``SensitivityConfig.formats``) makes the
layer a block-format layer: its ``l2fx.intent`` becomes the format's, exactly as a ``layers``
rule's ``format=`` would have made it, so every later pass stores it in that format.

Pre: every site has an ``l2fx.sensitivity`` curve. Post: every site has an
``l2fx.allocation``; the predicted total is within the budget; a site allocated a block format
has that format's intent. Picked formats are fixed (``rate_fit`` does not rescale them): when the
other layers could not then fill the budget, the allocation is redone without the offered formats
and the reason recorded (``records["entropy_allocation"]["formats_dropped"]``). A target outside what the
curves can reach raises TargetCRError stating the reachable range, unless ``check_target`` is
False (the compound methods: every grid fixed from a BOP target, one candidate per curve, the
bytes are the result).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from l2fx.errors import TargetCRError
from l2fx.data import output_distortion
from l2fx.evaluate import DownstreamRunner
from l2fx.ir import Allocation, Candidate, LayerIntent, SensitivityCurve, fetch_attr, get_meta, set_meta, weight_sites
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.tparams import candidate_weight, format_intent
from l2fx.transform import FORMAT_KINDS, TransformKind


def lagrangian_pick(curves: list[tuple[Candidate, ...]], lam: float) -> list[Candidate]:
    return [min(c, key=lambda x: (x.distortion + lam * x.nbytes, x.nbytes)) for c in curves]


def _slope_range(curves: list[tuple[Candidate, ...]]) -> tuple[float, float]:
    """log10 of a lambda range holding every slope at which a pick can change (the distortion
    per byte between two candidates of a curve), a decade wider each side. It follows the
    distortions' scale, which depends on the metric and the samples, not a fixed range."""
    slopes = [abs(a.distortion - b.distortion) / abs(a.nbytes - b.nbytes)
              for curve in curves for i, a in enumerate(curve) for b in curve[i + 1:]
              if a.nbytes != b.nbytes and a.distortion != b.distortion
              and math.isfinite(a.distortion) and math.isfinite(b.distortion)]
    if not slopes:
        return -30.0, 10.0
    return math.log10(min(slopes)) - 1.0, math.log10(max(slopes)) + 1.0


def allocate(curves: list[tuple[Candidate, ...]], budget: float) -> list[Candidate]:
    """Equal-slope allocation: the least-distortion picks whose total bytes fit ``budget``."""
    total = lambda picks: sum(c.nbytes for c in picks)  # noqa: E731
    best = lagrangian_pick(curves, 0.0)
    if total(best) <= budget:
        return best
    lo, hi = _slope_range(curves)  # log10 lambda, per byte of output distortion
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if total(lagrangian_pick(curves, 10.0 ** mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return lagrangian_pick(curves, 10.0 ** hi)


# A layer's curve moves by the square root of its measured / predicted ratio, at most 4x per
# round: one round's marginals are noisy and interact (restoring one layer changes the others').
_RATIO_CLAMP = 4.0
_DAMPING = 0.5


@torch.no_grad()
def joint_correction(gm: fx.GraphModule, sites, intents, curves, picks, budget: float):
    """``SensitivityConfig.joint_rounds`` rounds of the interaction correction (the config's
    docstring): returns the picks kept and the record of every round (predicted = the picks'
    summed curve distortions, measured = their joint output error on the sensitivity samples)."""
    ctx = PassContext.current()
    cfg = ctx.config
    batch = ctx.sensitivity_batch()
    weights = [fetch_attr(gm, site.param).detach() for _, site in sites]
    distortion = output_distortion(DownstreamRunner(gm, batch).output, cfg.sensitivity.output_metric, batch)

    def decoded(chosen):
        return {node: candidate_weight(w.float(), site, intent, c.kind, c.step_s, c.threshold_e, c.channel_scaled,
                                       cfg.coding.qmax).to(w.dtype)
                for (node, site), intent, w, c in zip(sites, intents, weights, chosen)}

    def error(runner_output) -> float:
        d = distortion(runner_output)
        return d if math.isfinite(d) else math.inf

    scale = [1.0] * len(sites)
    rounds = []
    runner = DownstreamRunner(gm, batch, overrides=decoded(picks))
    measured = error(runner.output)
    for r in range(cfg.sensitivity.joint_rounds):
        predicted = sum(c.distortion * k for c, k in zip(picks, scale))
        ratios = []
        for i, ((node, _), w) in enumerate(zip(sites, weights)):
            # The layer's marginal share of the joint error: how much restoring it alone removes.
            marginal = measured - error(runner.run_with(node, w))
            d = picks[i].distortion * scale[i]
            raw = marginal / d if d > 0 and math.isfinite(marginal) else 1.0
            ratio = min(max(max(raw, 0.0) ** _DAMPING, 1 / _RATIO_CLAMP), _RATIO_CLAMP)
            ratios.append(ratio)
        trial_scale = [k * q for k, q in zip(scale, ratios)]
        scaled = [tuple(dataclasses.replace(c, distortion=c.distortion * k) for c in curve)
                  for curve, k in zip(curves, trial_scale)]
        trial = [curve[scaled_curve.index(p)] for curve, scaled_curve, p in zip(curves, scaled,
                                                                                 allocate(scaled, budget))]
        trial_runner = DownstreamRunner(gm, batch, overrides=decoded(trial))
        trial_measured = error(trial_runner.output)
        accepted = trial_measured < measured
        rounds.append({"round": r + 1, "predicted": predicted, "measured": measured,
                       "trial_measured": trial_measured, "accepted": accepted,
                       "layers_moved": sum(a != b for a, b in zip(picks, trial)),
                       "ratio_range": [min(ratios), max(ratios)]})
        ctx.log("entropy_allocation", f"joint round {r + 1}: predicted {predicted:.4g}, measured {measured:.4g}, "
                                      f"re-allocated {trial_measured:.4g} ({'kept' if accepted else 'dropped'})")
        if not accepted:
            break
        picks, scale, runner, measured = trial, trial_scale, trial_runner, trial_measured
    return picks, {"rounds": rounds, "final_measured": measured,
                   "predicted_additive": sum(c.distortion for c in picks)}


class EntropyAllocation(L2fxPass):
    name = "entropy_allocation"
    requires_meta = (SensitivityCurve,)
    # joint_rounds reads the sensitivity samples; its every error is all-reduced
    # (data.output_distortion), and its choices depend on those and the curves only.
    supports_distributed = True

    def __init__(self, check_target: bool = True):
        # The compound methods fix every grid from a BOP target: their bytes are the result,
        # so target_cr is not checked (the curves then hold one candidate each).
        self.check_target = check_target

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        target = ctx.config.target_cr
        sites = list(weight_sites(gm))
        curves = [get_meta(node, SensitivityCurve).candidates for node, _ in sites]
        fp32 = sum(4 * site.numel for _, site in sites)
        budget = fp32 / target
        # A candidate of infinite distortion is never picked (unless every one is): the range
        # is what the finite ones reach.
        usable = [[c for c in curve if math.isfinite(c.distortion)] or list(curve) for curve in curves]
        smallest = sum(min(c.nbytes for c in curve) for curve in usable)
        largest = sum(max(c.nbytes for c in curve) for curve in usable)
        lo_cr, hi_cr = fp32 / largest, fp32 / smallest
        # rate_fit can move every step by a common factor, which widens the range a little;
        # the grid's ends are what the curves vouch for.
        if self.check_target and not (lo_cr * (1 - ctx.config.cr_tolerance) <= target
                                      <= hi_cr * (1 + ctx.config.cr_tolerance)):
            raise TargetCRError(
                f"target_cr={target} is out of reach for this model: the reachable range of the "
                f"compressed-parameter CR is {lo_cr:.2f} .. {hi_cr:.2f} (symbols limited to +-{ctx.config.coding.qmax})")
        picks = allocate(curves, budget)
        intents = [get_meta(node, LayerIntent) for node, _ in sites]
        joint = None  # the interaction correction runs first; a dropped format redoes the picks without it
        if ctx.config.sensitivity.joint_rounds and ctx.calib:
            picks, joint = joint_correction(gm, sites, intents, curves, picks, budget)
        offered = [lambda c, i=i: c.kind in FORMAT_KINDS and c.kind != i.format for i in intents]
        dropped = None
        if any(is_offered(p) for is_offered, p in zip(offered, picks)):
            # A picked format is fixed (rate_fit does not rescale it): the other layers, at their
            # finest, must still fill the budget to rate_fit's lower bound, else the CR misses.
            reach = sum(p.nbytes if is_offered(p) else max(c.nbytes for c in curve)
                        for is_offered, p, curve in zip(offered, picks, usable))
            low = budget * (1 - ctx.config.cr_tolerance / 2)
            if reach < low:
                dropped = (f"with the picked formats fixed the other layers reach at most {reach:.0f} of the "
                           f"{low:.0f} bytes the target needs; allocated without the offered formats")
                curves = [tuple(c for c in curve if not is_offered(c)) for is_offered, curve in zip(offered, curves)]
                picks = allocate(curves, budget)
        formats: dict[str, str] = {}
        for (node, site), intent, pick in zip(sites, intents, picks):
            set_meta(node, Allocation(pick.kind, pick.step_s, pick.threshold_e, pick.nbytes, pick.channel_scaled))
            if pick.kind in FORMAT_KINDS and intent.format != pick.kind:
                set_meta(node, format_intent(TransformKind(pick.kind), intent.options, intent.rule))
                formats[site.param] = pick.kind
        ctx.records[self.name] = {
            "budget_nbytes": budget,
            "predicted_nbytes": sum(p.nbytes for p in picks),
            "predicted_distortion": sum(p.distortion for p in picks if math.isfinite(p.distortion)),
            "formats_chosen": formats,
            **({"formats_dropped": dropped} if dropped else {}),
            **({"joint": joint} if joint else {}),
        }
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            alloc = get_meta(node, Allocation)
            if alloc is None:
                self.fail("weight was given no allocation", node)
            if alloc.kind in FORMAT_KINDS and get_meta(node, LayerIntent).format != alloc.kind:
                self.fail(f"weight allocated block format {alloc.kind} keeps another intent", node)
