"""``sensitivity_analysis``: a rate-distortion curve per compressed weight, measured.

For every weight marked by ``mark_weights`` and every candidate T setting (a grid of steps
``s`` spaced ``config.sensitivity.step_ratio`` apart and, for the joint transform, dead-zone
ratios e/s), the pass measures

* the rate: the exact bytes the layer would take in the artifact with that setting
  (:func:`l2fx.accounting.predict_layer_nbytes`: payload of the real symbols under the real
  probability table, table, chunk index, T parameters, manifest entry);
* the distortion: the model's output error on ``num_samples`` calibration inputs with only
  this layer compressed, relative to the output's energy.

Distortions are assumed additive across layers (the usual high-rate assumption); the
allocation pass then picks one point per curve. Candidates coarser than one that already
destroys the output (relative error > ``_DESTROYED``) are not measured.

Pre: ``mark_weights`` ran; the context holds calibration data. Post: every site carries a
non-empty ``l2fx.sensitivity`` curve sorted by rate.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from l2fx.accounting import predict_layer_nbytes
from l2fx.config import CompileConfig, Granularity
from l2fx.data import call_model_with, output_vector, relative_error, take_samples, to_device
from l2fx.errors import CalibrationError
from l2fx.ir import Candidate, SensitivityCurve, WeightSite, fetch_attr, get_meta, set_meta, weight_sites
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.transform import TransformKind, decode, encode

_DESTROYED = 4.0


def candidate_params(w: torch.Tensor, kind: TransformKind, cfg: CompileConfig) -> list[tuple[float, float]]:
    """(step_s, threshold_e) pairs from coarse (about 3 levels) to the finest the alphabet holds."""
    qmax = cfg.coding.qmax
    amax = float(w.abs().max())
    if amax == 0.0:
        return [(1.0, 0.5)]
    r = cfg.sensitivity.step_ratio

    def grid(span: float) -> list[float]:
        # Steps giving a largest symbol of about 1.5, 1.5 r, 1.5 r^2 ... up to qmax.
        steps = [span / (1.5 * r ** k) for k in range(cfg.sensitivity.num_steps)]
        return [s for s in steps if span / s <= qmax + 0.5] or [span / qmax]

    if kind is TransformKind.LINEAR:
        return [(s, 0.5 * s) for s in grid(amax)]
    if kind is TransformKind.JOINT:
        return [(s, d * s) for s in grid(amax) for d in cfg.sensitivity.deadzones]
    if kind is TransformKind.PRUNE:
        s = amax / qmax  # Eq. 12: kept weights at the alphabet's finest step; only e varies
        return [(s, max(e, 0.5 * s)) for e in grid(amax)]
    # LOG keeps step s below the knee e and compresses above it; EXP refines large weights.
    e = amax / 8.0 if kind is TransformKind.LOG else amax / 2.0
    span = e * (math.log1p(amax / e) if kind is TransformKind.LOG else math.expm1(amax / e))  # s * T(amax)
    return [(s, e) for s in grid(span)]


def per_channel(value: float, site: WeightSite, cfg: CompileConfig) -> torch.Tensor:
    n = site.channels if cfg.granularity is Granularity.PER_CHANNEL else 1
    return torch.full((n,), float(value))


class SensitivityAnalysis(L2fxPass):
    name = "sensitivity_analysis"

    def requires(self, gm: fx.GraphModule) -> None:
        if not PassContext.current().calib:
            raise CalibrationError("sensitivity_analysis needs calibration data in the PassContext")
        if not any(True for _ in weight_sites(gm)):
            self.fail("no weight carries l2fx.site: run mark_weights first")

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config
        kind = cfg.transform
        batch = to_device(take_samples(list(ctx.calib), cfg.sensitivity.num_samples), ctx.device)
        reference = output_vector(call_model_with(gm, {}, batch))
        sites = list(weight_sites(gm))
        for i, (node, site) in enumerate(sites):
            ctx.log(self.name, f"{i + 1}/{len(sites)} {site.param}")
            w = fetch_attr(gm, site.param).detach().float()
            candidates = []
            # Fine to coarse, so that measuring stops once the output is destroyed.
            for s, e in reversed(candidate_params(w, kind, cfg)):
                st, et = torch.tensor(s), torch.tensor(e)
                q = encode(w, kind, st, et, cfg.coding.qmax)
                nbytes = predict_layer_nbytes(site.param, kind, q, site.channel_axis, cfg.coding.chunk_size,
                                              per_channel(s, site, cfg), per_channel(e, site, cfg)).total
                w_hat = decode(q, kind, st, et).to(w.dtype)
                out = output_vector(call_model_with(gm, {site.param: w_hat}, batch))
                distortion = relative_error(out, reference)
                if not math.isfinite(distortion):
                    distortion = math.inf
                candidates.append(Candidate(kind.value, s, e, nbytes, distortion))
                if distortion > _DESTROYED:
                    break
            candidates.sort(key=lambda c: (c.nbytes, c.distortion))
            set_meta(node, SensitivityCurve(tuple(candidates)))
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            curve = get_meta(node, SensitivityCurve)
            if curve is None or not curve.candidates:
                self.fail("weight has no rate-distortion curve", node)
