"""``rate_fit``: scale every layer's T grid by one common factor so the real bytes hit the target.

The allocation picks points on a discrete grid, and block reconstruction (when it runs)
moves weights and T parameters; either leaves the total off the budget. This pass measures
every layer's bytes on its actual symbols (with T parameters rounded to their storage dtype,
exactly as the artifact will hold them) and bisects a common factor 2^t applied to every
``step_s`` and ``threshold_e`` (only ``threshold_e`` for the PRUNE kind, whose step is fixed)
so that the total lands in ``[budget * (1 - tol/2), budget]``. A common factor keeps the
equal-slope condition of the allocation (distortion ~ s^2 at high rate for every layer).
A total already within the tolerance (CR between ``target * (1 - tol/2)`` and
``target * (1 + tol)``, the case after block reconstruction, which keeps every block on its
budget) is left as it is.

Pre: every site is a ``TransformedWeight``. Post: predicted compressed-parameter CR within
``cr_tolerance`` of the target (or the closest the grid allows, recorded). Where even the finest
steps the symbols allow leave the bytes under the window (a one-shot method's 50 % sparsity at
a low target: the kept weights would need more than ``+-qmax``), a TargetCRError says so, with
the CR those steps give, instead of ``range_code`` failing on the miss.

The byte arithmetic lives in :mod:`l2fx.bytefit`, shared with block reconstruction.
"""
from __future__ import annotations

import math

import torch.fx as fx

from l2fx.bytefit import (apply_factor, finest_log2_factor, fit_log2_factor, prediction_slack, total_nbytes,
                          within_tolerance)
from l2fx.errors import TargetCRError
from l2fx.ir import weight_sites
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult

__all__ = ["RateFit"]


class RateFit(L2fxPass):
    """``name``: one pipeline can hold the pass twice (the L2 method runs it as ``rate_prefill``
    before block reconstruction, to start every block on its budget, and as ``rate_fit`` after).
    ``tight``: leave T alone only inside the fit's own window ``[budget (1 - tol/2), budget]``,
    not anywhere within the promised tolerance: L2's ``rate_prefill`` is tight, since the blocks
    drift by a few tenths of a percent after it, and a start at the tolerance's edge (a randomly
    initialised MobileNetV2 at CR 8: CR 8.074 for a window up to 8.08) then ends outside it,
    where ``rate_fit`` rescales every fine-tuned weight (factor 0.978, no snapping), undoing
    reconstruction."""

    name = "rate_fit"
    requires_weight_modules = (TransformedWeight,)

    def __init__(self, name: str = "rate_fit", tight: bool = False):
        self.name = name
        self.tight = tight

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config
        layers = [(gm.get_submodule(str(node.target)), site) for node, site in weight_sites(gm)]
        fp32 = sum(4 * site.numel for _, site in layers)
        budget = fp32 / cfg.target_cr
        low_ok = budget * (1 - cfg.cr_tolerance / 2)

        def total(log2_factor: float) -> int:
            return total_nbytes(gm, 2.0 ** log2_factor, cfg.coding.chunk_size)

        now = total(0.0)
        slack = prediction_slack(gm, cfg.coding.chunk_size)
        if (low_ok <= now <= budget) if self.tight else within_tolerance(now, budget, cfg.cr_tolerance, slack):
            # Already within the promised tolerance (CR within -tol/2 .. +tol of the target;
            # tight: within the fit's own window): leave T alone. After block reconstruction
            # this is the rule, and any rescale there scales every fine-tuned weight, whose
            # symbols it hardly changes.
            best_t, best_bytes = 0.0, now
        else:
            # Finer steps than the layers can hold would saturate symbols at +-qmax.
            floor = finest_log2_factor([m for m, _ in layers], -6.0) if now < low_ok else 0.0
            best_t, best_bytes = fit_log2_factor(total, budget, low_ok, lambda t, b: ctx.log(
                self.name, f"factor 2^{t:+.3f}: CR {fp32 / b:.3f}"), floor=floor)
            if (now < low_ok and not within_tolerance(best_bytes, budget, cfg.cr_tolerance, slack)
                    and (finest := total(floor)) < budget / (1 + cfg.cr_tolerance) + slack):
                # Too few bytes even at the finest steps the symbols allow: what the earlier
                # passes left (a one-shot method's pruning, say) cannot spend the budget.
                zeros = sum(int((m().detach() == 0).sum()) for m, _ in layers) / max(fp32 / 4, 1)
                raise TargetCRError(
                    f"target_cr={cfg.target_cr} is out of reach after the passes of method {cfg.method!r}: at the "
                    f"finest steps the symbols allow (+-{cfg.coding.qmax}) the weights as they are ({zeros:.0%} of "
                    f"them zero) give CR {fp32 / finest:.3f}; ask for at least that, or less sparsity, or a larger "
                    f"coding.qmax")
        factor = 2.0 ** best_t
        apply_factor([m for m, _ in layers], factor)
        ctx.records[self.name] = {"factor": factor, "predicted_nbytes": best_bytes, "budget_nbytes": budget,
                                  "predicted_cr": fp32 / best_bytes if best_bytes else math.inf}
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            m = gm.get_submodule(str(node.target))
            for t in (m.step_s, m.threshold_e):
                if not (t.isfinite().all() and (t > 0).all()):
                    self.fail("a scaled T parameter is not finite and > 0", node)
