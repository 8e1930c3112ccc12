"""``smol_precision``: a precision per parameter (or per layer) learned by noise injection, Eq. 12.

Post-training SMOL (seed 004): per block, streamed as the one-shot methods stream
(:func:`l2fx.layerwise.stream_blocks`: the block's inputs are the outputs of the already
rounded prefix, one block's inputs held at a time), Adam minimises over (s, w)

    E_eps || B(w + sigmoid(s) 2^(P-1) u eps) - B_fp32 ||^2 / E||B_fp32||^2 + lambda * mean(log2(1 + e^-s))

with ``eps ~ U(-1, 1)`` per weight (K = ``noise_samples`` draws per step, each with its mirror
``-eps`` when ``antithetic``: the pair's first-order terms ``g . eps`` cancel, leaving the
curvature term that ``s`` must learn from; with one plain draw that term is buried under the
``g . eps`` noise, and Adam's normalised steps then follow the penalty alone), ``u`` the layer's
symbol unit (``bit_value_grid``), ``B`` the block on a mini-batch of its calibration inputs and
``B_fp32`` the block with fp32 weights on the same inputs (``u`` per cell of the
layer's layout: per output channel by default, ``bit_value_grid``): Eq. 12 with the block-output MSE
as the loss and the penalty's sum replaced by the block's mean (one lambda for any block
size; :class:`l2fx.precision.SmolOptions`). ``s`` is one value per weight element (``smol``)
or one per layer (``smol-l``, Appendix D); ``sigmoid(s) = 2^(1-p)``, so the noise is half a cell
of the precision-p grid. ``w`` moves only within the layer's range (``lr_w = 0``: not at all).

With ``downstream``, the penalty of layer ``l`` is weighted by ``c_l ∝ n_b / g_l``, ``n_b`` its
block's weight count and ``g_l = D_out / D_blk`` how much of the block's relative output error
reaches the network output (both measured once, before any block trains, on the fp32 model and
``sensitivity.num_samples`` calibration inputs, under the noise the training starts from: ``p0``
on every weight of the layer); ``c`` is normalised to geometric mean 1 over the weights. Each
block's objective is then its share of ``sum_b g_b D_blk,b + mu * bits``: one price per bit of
the network's error, where without it every block's relative error costs the same per bit of
its mean precision.

Before the next block runs, this block's weights are rounded provisionally at
``round(p)`` (offset 0) so that the later blocks learn on inputs of a rounded prefix; the
continuous weights are then put back for ``smol_round``, which rounds every layer with one
per-model offset once all precisions are known.

Pre: blocks partitioned; every weight a ``TransformedWeight`` of ``bit_value_grid``. Post:
every weight carries a :class:`~l2fx.precision.LearnedPrecision` (finite, >= 1; the weight's
shape, or [1] per layer) and its weight lies within each cell's ``max|w|`` of its fp32 layer;
per-block and per-layer records in ``ctx.records["smol_precision"]``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.fx as fx

from l2fx.blocks import build_programs
from l2fx.data import output_distortion, token_mask
from l2fx.evaluate import DownstreamRunner
from l2fx.ir import Block, get_meta, set_meta, weight_sites
from l2fx.layerwise import stream_blocks
from l2fx.modules import TransformedWeight
from l2fx.optim import Adam, Sampler, mean_square, relative_mse
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.precision import (LearnedPrecision, SmolOptions, check_learned_precisions, integer_precisions,
                            precision_of_s, quantize_at, s_of_precision)
from l2fx.tparams import cell_amax

__all__ = ["SmolPrecision"]


class _Noisy(fx.Interpreter):
    """Runs a block program with some weight modules' outputs replaced (``weights``: module
    path -> tensor), so gradients reach the noisy weights; every other node as the program runs it."""

    def __init__(self, gm: fx.GraphModule, weights: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.weights = weights

    def call_module(self, target, args, kwargs):
        w = self.weights.get(str(target))
        return w if w is not None else super().call_module(target, args, kwargs)


def _noise_scale(m: TransformedWeight, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the range of each cell of the layout, it in the weight's shape, the noise's amplitude per
    weight at ``sigmoid(s) = 1``: the layer's symbol unit times ``2^(P-1)``, 0 on an all-zero cell,
    which ``smol_round`` prunes whole)."""
    amax = cell_amax(m.weight.detach(), m.channel_axis, m.group_size)
    limit = m.view(amax)
    return amax, limit, m.view(m.step_s.detach()) * 2.0 ** (P - 1) * (limit > 0)


_WEIGHT_RANGE = 1e3  # a layer's penalty weight stays within [1/_WEIGHT_RANGE, _WEIGHT_RANGE]


@torch.no_grad()
def downstream_weights(gm: fx.GraphModule, batch: Any, p0: float, P: int, gen: torch.Generator
                       ) -> dict[str, dict[str, float]]:
    """Per compressed parameter: ``d_out`` and ``d_blk`` (the network's and its block's relative
    output error with the layer's weights under the noise of precision ``p0``), ``gain`` (their
    ratio) and ``weight`` (its penalty weight ``c_l``, see the module docstring)."""
    programs = build_programs(gm)
    fp32 = {node: m.weight.detach() for prog in programs for node, m, _ in prog.weights}
    runner = DownstreamRunner(gm, batch, overrides=fp32)
    error_of = output_distortion(runner.output, "mse", batch)  # a language model's padding left out
    keep = token_mask(batch)  # so in the block's error too
    sigma = 2.0 ** (1.0 - p0)  # sigmoid(s) at p0
    out: dict[str, dict[str, float]] = {}
    for prog in programs:
        ref = [runner.cache[n] for n in prog.outputs]
        energy = mean_square(ref, keep) or 1.0
        n_block = sum(m.weight.numel() for _, m, _ in prog.weights)
        for node, m, site in prog.weights:
            w = fp32[node]
            eps = torch.rand(w.shape, generator=gen, device=gen.device).to(w.device) * 2.0 - 1.0
            final, seen = runner.run_observing(node, w + sigma * _noise_scale(m, P)[2] * eps, prog.outputs)
            d_out, d_blk = error_of(final), float(relative_mse(seen, ref, energy, keep))
            gain = d_out / d_blk if d_blk > 0 else 0.0
            out[site.param] = {"d_out": d_out, "d_blk": d_blk, "gain": gain, "numel": float(w.numel()),
                               "factor": n_block / gain if gain > 0 and math.isfinite(gain) else math.inf}
    finite = [(v["factor"], v["numel"]) for v in out.values() if 0 < v["factor"] < math.inf]
    log_mean = sum(math.log(f) * n for f, n in finite) / sum(n for _, n in finite) if finite else 0.0
    for v in out.values():
        v["weight"] = min(max(v.pop("factor") / math.exp(log_mean), 1.0 / _WEIGHT_RANGE), _WEIGHT_RANGE)
    return out


class SmolPrecision(L2fxPass):
    name = "smol_precision"
    requires_meta = (Block,)
    requires_weight_modules = (TransformedWeight,)
    writes_weights = True
    requires_calib = True  # (not supports_distributed: gradients are per rank)

    def __init__(self, per_layer: bool = False):
        self.per_layer = per_layer

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config
        opts = SmolOptions.from_pairs(cfg.method_options, self.per_layer)
        device = torch.device(ctx.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1) if device.type != "cpu" else gen
        p0 = opts.start_precision(cfg.target_cr)
        blocks, layers = [], {}
        downstream, downstream_s = {}, 0.0
        if opts.downstream:
            t0 = time.perf_counter()
            batch = ctx.sensitivity_batch()
            downstream = downstream_weights(gm, batch, p0, opts.max_precision, noise_gen)
            downstream_s = time.perf_counter() - t0
            ctx.log(self.name, f"downstream gains of {len(downstream)} layers in {downstream_s:.1f} s")
        saved_flags = {id(p): p.requires_grad for p in gm.parameters()}
        try:
            for p in gm.parameters():
                p.requires_grad_(False)
            for prog, inputs, keep, advance in stream_blocks(gm, ctx.calib, device, cfg.reconstruction.max_samples):
                t0 = time.perf_counter()
                weights = [downstream[site.param]["weight"] if downstream else 1.0 for _, _, site in prog.weights]
                rec = self._train_block(prog, inputs, keep, opts, p0, weights, gen, noise_gen)
                # Provisional rounding at offset 0 for the next blocks' inputs, then back.
                kept = []
                with torch.no_grad():
                    for node, m, _ in prog.weights:
                        lp = get_meta(node, LearnedPrecision)
                        kept.append(m.weight.detach().clone())
                        pint = integer_precisions(lp.precision, 0.0, opts.max_precision)
                        unit = m.view(m.step_s.detach())
                        m.weight.copy_(quantize_at(m.weight / unit, pint, opts.max_precision).float() * unit)
                advance()
                with torch.no_grad():
                    for (node, m, site), w in zip(prog.weights, kept):
                        m.weight.copy_(w)
                        p = get_meta(node, LearnedPrecision).precision
                        layers[site.param] = {"mean_precision": float(p.float().mean()),
                                              "min_precision": float(p.min()), "max_precision": float(p.max()),
                                              **({"downstream": downstream[site.param]} if downstream else {})}
                rec.update(index=prog.block.index, name=prog.block.name, seconds=time.perf_counter() - t0)
                blocks.append(rec)
                ctx.log(self.name, f"block {prog.block.name}: loss {rec['loss_first']:.4g} -> {rec['loss_last']:.4g}, "
                                   f"mean p {rec['mean_precision']:.3f}")
        finally:
            for p in gm.parameters():
                p.requires_grad_(saved_flags.get(id(p), True))
        ctx.records[self.name] = {"per_layer": self.per_layer, "init_precision": p0, "lam": opts.lam,
                                  "downstream": opts.downstream, "downstream_seconds": downstream_s,
                                  "blocks": blocks, "layers": layers}
        return PassResult(gm, True)

    def _train_block(self, prog, inputs: list[list[Any]], keep: list[torch.Tensor | None], opts: SmolOptions,
                     p0: float, weights: list[float], gen: torch.Generator, noise_gen: torch.Generator
                     ) -> dict[str, Any]:
        P = opts.max_precision
        with torch.no_grad():
            targets = [tuple(prog.fp32(*args)) for args in inputs]
            energy = sum(mean_square(tg, k) for tg, k in zip(targets, keep))
            energy = energy / max(len(targets), 1) or 1.0
        paths, ss, ws, amaxes, limits, amps = [], [], [], [], [], []
        for node, m, _ in prog.weights:
            w0 = m.weight.detach()
            amax, limit, amp = _noise_scale(m, P)
            shape = (1,) if self.per_layer else tuple(w0.shape)
            ss.append(torch.full(shape, float(s_of_precision(p0)), device=w0.device, requires_grad=True))
            ws.append(w0.clone().requires_grad_(opts.lr_w > 0))
            paths.append(str(node.target))
            amaxes.append(amax)
            limits.append(limit)
            amps.append(amp)
        numel = sum(w.numel() for w in ws)
        sampler = Sampler([[] for _ in inputs], inputs, inputs, targets, opts.batch_size, 0.0, gen, keep)
        opt_s = Adam(ss, opts.lr_s, opts.iters, opts.schedule)
        # Adam moves a parameter by about its learning rate: lr_w is a fraction of the layer's max|w|.
        opt_w = Adam(ws, opts.lr_w, opts.iters, opts.schedule,
                     scales=[a.max().clamp_min(1e-30) for a in amaxes])

        def penalty(c: list[float] = weights) -> torch.Tensor:
            total = sum(cl * (precision_of_s(s) - 1.0).mean() * w.numel() for cl, s, w in zip(c, ss, ws))
            return total / max(numel, 1)

        losses = []
        for _ in range(opts.iters):
            args, tgt, real = sampler.draw()
            mse, runs = 0.0, 0
            for _k in range(opts.noise_samples):
                eps = [torch.rand(w.shape, generator=noise_gen, device=w.device) * 2.0 - 1.0 for w in ws]
                for sign in ((1.0, -1.0) if opts.antithetic else (1.0,)):
                    noisy = {path: w + torch.sigmoid(s) * (sign * amp) * e
                             for path, s, w, amp, e in zip(paths, ss, ws, amps, eps)}
                    mse = mse + relative_mse(_Noisy(prog.quant, noisy).run(*args), tgt, energy, real)
                    runs += 1
            mse = mse / runs
            if not isinstance(mse, torch.Tensor) or not mse.requires_grad:
                break  # the block's output does not depend on its weights
            loss = mse + opts.lam * penalty()
            loss.backward()
            opt_s.step()
            opt_w.step()
            with torch.no_grad():
                for w, limit in zip(ws, limits):
                    w.clamp_(-limit, limit)
            losses.append(float(mse.detach()))
        with torch.no_grad():
            for (node, m, _), s, w, amax in zip(prog.weights, ss, ws, amaxes):
                m.weight.copy_(w.detach())
                set_meta(node, LearnedPrecision(precision_of_s(s.detach()).float().contiguous(), amax.contiguous(),
                                                self.per_layer))
            mean_p = float(penalty([1.0] * len(ss))) + 1.0
        return {"iters": len(losses), "loss_first": losses[0] if losses else float("nan"),
                "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"),
                "mean_precision": mean_p}

    def ensures(self, gm: fx.GraphModule) -> None:
        check_learned_precisions(gm, self.fail)
