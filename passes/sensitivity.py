"""``sensitivity_analysis``: a rate-distortion curve per compressed weight, measured.

For every weight marked by ``mark_weights`` and every candidate T setting (a grid of steps
``s`` spaced ``config.sensitivity.step_ratio`` apart and, for the joint transform, dead-zone
ratios e/s), the pass measures

* the rate: the exact bytes the layer would take in the artifact with that setting
  (:func:`l2fx.accounting.predict_layer_nbytes`: payload of the real symbols under the real
  probability table, table, chunk index, T parameters, manifest entry);
* the distortion: the model's output error on ``num_samples`` calibration inputs with only
  this layer compressed, relative to the output's energy, or the mean KL divergence of its
  softmax (``sensitivity.output_metric="kl"``) (``sensitivity.scope="model"``, each
  measurement re-running the model downstream of the layer: O(depth^2) in all); or, with
  ``scope="layer"``, the relative error of the outputs of the ops reading the weight, on their
  inputs in the uncompressed model, all from one run of the model (linear in depth, memory one
  block's activations; every layer's relative error weighs alike).

With ``config.sensitivity.formats``, every allocated layer's curve also holds one candidate per
block format (kind: the format), bytes exact and output error measured.

Distortions are assumed additive across layers (the usual high-rate assumption); the
allocation pass then picks one point per curve. Measuring every candidate would cost one
model evaluation each (EfficientNet-Lite0: ~46 layers x 28 candidates); a few per dead-zone
family are measured and the rest scaled from their weight error (:func:`estimate_distortions`).

Pre: ``mark_weights`` ran; the context holds calibration data. Post: every site carries a
non-empty ``l2fx.sensitivity`` curve sorted by rate.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.fx as fx

from l2fx.accounting import predict_layer_nbytes
from l2fx.config import CompileConfig
from l2fx.data import output_distortion
from l2fx.evaluate import DownstreamRunner, LocalError, visit_readers
from l2fx.ir import Candidate, LayerIntent, SensitivityCurve, fetch_attr, get_meta, set_meta, weight_sites
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.tparams import fixed_qmax, format_intent, format_scales, layout, scale_ratio, stored_vector
from l2fx.transform import FORMAT_KINDS, TransformKind, channel_view, decode, encode

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
    if kind in FORMAT_KINDS:
        # A block format's element set with allocated scales: from saturating the largest
        # weights (a quarter of the format's top value) to a 16x coarser grid, r apart.
        span = amax / FORMAT_KINDS[kind].max_normal
        n = cfg.sensitivity.num_steps
        return [(span * r ** (k - n // 3), 0.5 * span * r ** (k - n // 3)) for k in range(n)]
    # LOG keeps step s below the knee e and compresses above it; EXP refines large weights.
    e = amax / 8.0 if kind is TransformKind.LOG else amax / 2.0
    span = e * (math.log1p(amax / e) if kind is TransformKind.LOG else math.expm1(amax / e))  # s * T(amax)
    return [(s, e) for s in grid(span)]


def _ratio_model(anchors: list[tuple[float, float]], fit: str):
    """log alpha as a function of log weight MSE through the anchors (sorted by x): linear
    interpolation between them (held constant outside), or (``fit="least_squares"``, three or
    more anchors) the least-squares line, evaluated within the anchors' x range."""
    xs, ys = zip(*anchors)
    if fit == "least_squares" and len(set(xs)) >= 3:
        slope, intercept = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
        lo, hi = xs[0], xs[-1]
        return lambda x: float(intercept + slope * min(max(x, lo), hi))
    return lambda x: float(np.interp(x, xs, ys))


def estimate_distortions(points, measured_points: int, output_error,
                         fit: str = "interpolate") -> list[tuple[float, bool]]:
    """(distortion, measured?) per candidate.

    Candidates sharing a dead-zone ratio e/s form a family ordered by step. In each family
    ``measured_points`` candidates spread evenly from finest to coarsest get their output
    error measured; for the rest the ratio alpha = output error / weight MSE is interpolated
    linearly in (log weight MSE, log alpha) between measured points of the same family
    (quantisation noise is near white, so output error grows in proportion to weight MSE;
    alpha captures how much this layer's noise reaches the output). A family without a usable
    measured ratio uses the layer's other families'; a layer whose every measurement is 0
    gets 0; only a layer with no usable ratio at all measures every candidate.

    ``fit="least_squares"``: a family with three or more usable measured ratios takes the
    least-squares line through them instead, for its measured candidates too (one noisy
    measurement is then not a point of the curve as it is).
    """
    families: dict[tuple, list[int]] = {}
    for idx, (s, e, *_rest) in enumerate(points):
        families.setdefault((round(e / s, 6), points[idx][5]), []).append(idx)
    result: list[tuple[float, bool]] = [(math.inf, False)] * len(points)
    anchors: dict[tuple, list[tuple[float, float]]] = {}
    for key, members in families.items():
        members.sort(key=lambda i: points[i][0])
        k = min(measured_points, len(members))
        chosen = sorted({members[round(j * (len(members) - 1) / max(k - 1, 1))] for j in range(k)})
        anchors[key] = []
        for idx in chosen:
            d = output_error(points[idx][4]())
            result[idx] = (d, True)
            mse = points[idx][3]
            if mse > 0 and 0 < d < math.inf:
                anchors[key].append((math.log(mse), math.log(d / mse)))
        anchors[key].sort()
    # A family whose measured points give no usable ratio (output error 0 or inf at both)
    # borrows the layer's other families' ratios; measuring all of its candidates instead
    # made one layer of a randomly initialised EfficientNet-B0 7x slower to analyse.
    pooled = sorted(a for family in anchors.values() for a in family)
    measured = [d for d, exact in result if exact]
    for key, members in families.items():
        usable = anchors[key] or pooled
        model = _ratio_model(usable, fit) if usable else None
        smooth = model is not None and fit == "least_squares" and len(set(x for x, _ in usable)) >= 3
        for idx in members:
            if result[idx][1]:
                if smooth and points[idx][3] > 0 and 0 < result[idx][0] < math.inf:
                    result[idx] = (points[idx][3] * math.exp(model(math.log(points[idx][3]))), True)
                continue
            mse = points[idx][3]
            if mse == 0:
                result[idx] = (0.0, False)
            elif usable:
                result[idx] = (mse * math.exp(model(math.log(mse))), False)
            elif measured and all(d == 0 for d in measured):  # no noise of this layer reaches the output
                result[idx] = (0.0, False)
            else:
                result[idx] = (output_error(points[idx][4]()), True)
    return result


def _decoded(w: torch.Tensor, kind: TransformKind, view, sv: torch.Tensor, ev: torch.Tensor, qmax: int):
    """A thunk giving ``w`` as the artifact would decode it under the stored (sv, ev), made on
    demand: it holds the compact parameters, broadcast (``view``) only when called. Holding the
    broadcast ones made per-group analysis of all-MiniLM-L6-v2 peak at 4.9 GB (its 11.7 M-weight
    embedding's expanded s and e, for every candidate)."""
    def thunk() -> torch.Tensor:
        st, et = view(sv), view(ev)
        return decode(encode(w, kind, st, et, qmax), kind, st, et).to(w.dtype)

    return thunk


def _points(w: torch.Tensor, site, intent: LayerIntent, ratios, params, cfg: CompileConfig) -> list[tuple]:
    """(s, e, nbytes, weight mse, w_hat thunk, channel_scaled, kind) per (ratio, (s, e)) of a
    layer under ``intent``: ``ratio`` None is one step for the whole tensor, else the stored
    parameters are ``s * ratio``; bytes exact (:func:`predict_layer_nbytes`)."""
    kind = TransformKind(intent.kind)
    qmax = fixed_qmax(intent) or cfg.coding.qmax
    axis, group = layout(site, intent)
    points = []
    for ratio in ratios:
        if ratio is not None:
            view = functools.partial(channel_view, like=w, channel_axis=axis, group_size=group)
        else:  # one step for the whole tensor: a 0-d parameter broadcasts
            view = lambda p: p.reshape(-1)[:1].reshape(())  # noqa: E731
        for s, e in params:
            sv, ev = stored_vector(s, site, intent, ratio), stored_vector(e, site, intent, ratio)
            st, et = view(sv), view(ev)
            q = encode(w, kind, st, et, qmax)
            nbytes = predict_layer_nbytes(site.param, kind, q.cpu(), axis, cfg.coding.chunk_size, sv, ev, group).total
            mse = float((decode(q, kind, st, et) - w).pow(2).mean())
            del q, st, et
            points.append((s, e, nbytes, mse, _decoded(w, kind, view, sv, ev, qmax), ratio is not None, kind.value))
    return points


def _curve(w: torch.Tensor, site, intent: LayerIntent, cfg: CompileConfig, error) -> tuple[tuple[Candidate, ...], int]:
    """A layer's candidates sorted by (bytes, distortion), with ``error(w_hat)`` (the scope's
    distortion of a decoded weight) measured where :func:`estimate_distortions` asks; and how
    many were measured."""
    def output_error(w_hat: torch.Tensor) -> float:
        d = error(w_hat)
        return d if math.isfinite(d) else math.inf

    # Points (see _points) hold a w_hat thunk: the decoded weights are re-made for the few
    # candidates whose error is measured rather than kept for all of them: ~56 copies of a
    # layer (a 4096x4096 Linear: peak RSS 4.4 GB for a 64 MB model; VGG-11's 392 MB classifier
    # layer was killed at 24 GB).
    # Two step families: one step for the whole tensor (MSE-optimal under entropy coding), and
    # steps proportional to each channel's (or group's) range (no channel is rounded away: BN
    # folding leaves depthwise convs with channels 100x apart).
    kind = TransformKind(intent.kind)
    ratio = scale_ratio(w, site, intent)
    if intent.format is not None:
        # A block format's own grid: one candidate, its max-scaled power-of-two scales.
        ratios, params = [format_scales(w, intent)], [(1.0, 0.5)]
    elif intent.bits is not None:
        # A fixed grid (a layers rule's bits): one candidate, RTN steps max|w_c| / qmax per
        # channel (or group), so the allocation takes it as it is.
        amax = float(w.abs().max()) or 1.0
        qmax = fixed_qmax(intent)
        ratios, params = [ratio], [(amax / qmax, 0.5 * amax / qmax)]
    else:
        ratios, params = [None] + ([ratio] if ratio is not None else []), candidate_params(w, kind, cfg)
    points = _points(w, site, intent, ratios, params, cfg)
    distortions = estimate_distortions(points, cfg.sensitivity.measured_points, output_error, cfg.sensitivity.fit)
    if intent.format is None and intent.bits is None:
        # Block formats offered beside the grids: one candidate each, measured.
        for fmt in cfg.sensitivity.formats:
            f_intent = format_intent(fmt, intent.options, intent.rule)
            (point,) = _points(w, site, f_intent, [format_scales(w, f_intent)], [(1.0, 0.5)], cfg)
            points.append(point)
            distortions.append((output_error(point[4]()), True))
    candidates = sorted((Candidate(kind, s, e, nbytes, d, scaled) for (s, e, nbytes, _, _, scaled, kind), (d, _)
                         in zip(points, distortions)), key=lambda c: (c.nbytes, c.distortion))
    return tuple(candidates), sum(1 for _, exact in distortions if exact)


class SensitivityAnalysis(L2fxPass):
    name = "sensitivity_analysis"
    requires_meta = (LayerIntent,)
    requires_calib = True
    supports_distributed = True  # output errors / Hessians all-reduced (l2fx.distributed)

    def requires(self, gm: fx.GraphModule) -> None:
        if not any(True for _ in weight_sites(gm)):
            self.fail("no weight carries l2fx.site: run mark_weights first")

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config
        batch = ctx.sensitivity_batch()
        sites = dict(weight_sites(gm))
        index = {node: i for i, node in enumerate(sites)}
        measured = 0

        def curve(node: fx.Node, output_error) -> None:
            nonlocal measured
            site = sites[node]
            ctx.log(self.name, f"{index[node] + 1}/{len(sites)} {site.param}")
            candidates, n = _curve(fetch_attr(gm, site.param).detach().float(), site, get_meta(node, LayerIntent),
                                   cfg, output_error)
            measured += n
            set_meta(node, SensitivityCurve(candidates))

        if cfg.sensitivity.scope == "layer":
            # One run; each weight measured on its readers' inputs as they pass (evaluate.visit_readers).
            visit_readers(gm, batch, sites, lambda node, readings: curve(node, LocalError(readings)))
        else:
            runner = DownstreamRunner(gm, batch)
            # over every rank's samples, padding excluded
            error_of = output_distortion(runner.output, cfg.sensitivity.output_metric, batch)
            for node in sites:
                def output_error(w_hat: torch.Tensor, node=node) -> float:
                    return error_of(runner.run_with(node, w_hat))
                curve(node, output_error)
        ctx.records[self.name] = {"model_evaluations": measured, "scope": cfg.sensitivity.scope, "candidates": sum(
            len(get_meta(n, SensitivityCurve).candidates) for n in sites)}
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            curve = get_meta(node, SensitivityCurve)
            if curve is None or not curve.candidates:
                self.fail("weight has no rate-distortion curve", node)
