"""``block_reconstruction``: learn T, then fine-tune weights, block by block (paper Sec. 4-5, A.1).

For each block found by ``block_partition``, in order:

* stage (a), transform training: the T parameters of the block's weights (``step_s``,
  ``threshold_e``, trained as log s, log e so they stay positive; weights frozen) minimise
  the block-output distillation loss plus the rate term of Eq. 10,
  ``MSE(B(x_q), B_fp32(x_fp)) / E[B_fp32^2] + lambda * ReLU(bits / budget - 1)``, with
  ``bits`` from the differentiable counter (:func:`l2fx.counter.estimate_bits`, Eq. 14-19);
* stage (b), weight fine-tuning: the weights (``TransformedWeight.weight``) through the STE
  of Eq. 11 with T frozen, against the same MSE; with ``tune_plain``, the plain parameters
  only this block reads (biases, folded BatchNorm shifts, norm affines: stored as float16,
  they cost the same bytes whatever their value) are tuned alongside, then rounded back to
  their storage dtype, so later blocks see what the artifact will hold. Steps are scale-free
  (each weight's capped at a tenth of its rounding step, each plain parameter's at ``lr_plain``
  times the block output's RMS), and a block that ends stage (b) with a higher calibration
  loss than it started with is put back as it was (``finetune_reverted`` in its record).

The budget of a block is what its layers take when the pass starts: the pipeline runs
``rate_fit`` just before it (the instance named ``rate_prefill``), because the allocation's
grid leaves the total up to ~25 % under the target (TinyConvNet at CR 14: 23.5 of 30.2 kB) and
a common rescale *after* fine-tuning re-rounds every weight and undoes it (TinyConvNet, CR 14,
relative output error: 1.26 without reconstruction, 2.48 with it when the final rate_fit moved
all steps by 0.89, 0.33 with the budget kept per block). Stage (a) keeps the counter's estimate
of the block's payload at or under its value there (the hinge of Eq. 10); after stage (a) the
block's T parameters are rescaled by one common factor so that its real bytes are back on the
budget (within ``cr_tolerance / 2``), less its share of the earlier blocks' drift, *before* the
weights are fine-tuned.

Streaming: the calibration set's activations are propagated block by block; only the current
block's inputs are cached, in a compressed version (the output of the already reconstructed
prefix) and an fp32 version (the fp32 prefix), plus the fp32 targets while the block trains.
The fp32 block runs the raw ``TransformedWeight.weight`` tensors (:class:`l2fx.blocks.BlockProgram`);
it runs before the block's weights are fine-tuned, so the targets are those of the original
model.

Pre: ``block_partition`` ran (every compressed weight carries ``l2fx.block``); every weight is a
``TransformedWeight`` with an ``l2fx.allocation``. Post: the same graph; T parameters and
weights of every block updated in place, every parameter finite; per-block
:class:`BlockRecord` s in ``ctx.records["block_reconstruction"]``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
import torch.fx as fx
from torch.func import functional_call

from l2fx import distributed
from l2fx.accounting import round_to_fp16
from l2fx.blocks import BlockProgram, build_programs, calibration_inputs, calibration_masks
from l2fx.bytefit import block_nbytes, fit_block_nbytes
from l2fx.config import PlainDtype, ReconstructionConfig
from l2fx.counter import estimate_bits
from l2fx.ir import Allocation, Block, Reference, get_meta
from l2fx.modules import TransformedWeight
from l2fx.optim import Adam, Sampler, finetune_weights, mean_square, nbytes_of, relative_mse
from l2fx.pipeline import L2fxPass, PassContext, PassResult, peak_rss_mib
from l2fx.transform import TransformKind, forward_t, uses_threshold

__all__ = ["BlockReconstruction", "BlockRecord"]


@dataclasses.dataclass
class _RateTerm:
    """Eq. 10 for one block: ``ReLU(sum of estimated bits / budget - 1)`` on log-space T."""

    weights: list[tuple[TransformedWeight, str]]  # module, its path in the block GraphModule
    log_s: list[torch.Tensor]
    log_e: list[torch.Tensor]
    budget_bits: float
    cfg: ReconstructionConfig
    generator: torch.Generator

    @classmethod
    def of(cls, prog: BlockProgram, cfg: ReconstructionConfig, generator: torch.Generator) -> "_RateTerm":
        """Log-space copies of the block's T parameters, trainable where the kind uses them."""
        ms = [m for _, m, _ in prog.weights]
        # A fixed grid (a user's bits) is not trained.
        return cls([(m, str(n.target)) for n, m, _ in prog.weights],
                   [m.step_s.detach().log().clone().requires_grad_(m.kind is not TransformKind.PRUNE and not m.fixed)
                    for m in ms],
                   [m.threshold_e.detach().log().clone().requires_grad_(uses_threshold(m.kind) and not m.fixed)
                    for m in ms],
                   1.0, cfg, generator)

    def trainable(self) -> list[torch.Tensor]:
        return [t for t in self.log_s + self.log_e if t.requires_grad]

    def params(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.weights[i][0]
        s = self.log_s[i].exp()
        if not uses_threshold(m.kind):
            return s, 0.5 * s
        # Eq. 13 keeps the first level outside the dead zone: e >= s/2 (rate_fit assumes it too).
        return s, torch.maximum(self.log_e[i].exp(), 0.5 * s)

    def overrides(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (_, path) in enumerate(self.weights):
            s, e = self.params(i)
            out[f"{path}.step_s"], out[f"{path}.threshold_e"] = s, e
        return out

    def bits(self) -> torch.Tensor:
        total = []
        for i, (m, _) in enumerate(self.weights):
            s, e = self.params(i)
            w = m.weight.detach()
            t = forward_t(w, m.kind, m.view(s), m.view(e))
            total.append(estimate_bits(t, m.qmax, self.cfg.counter, self.generator))
        return torch.stack(total).sum()

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        bits = self.bits()
        return torch.relu(bits / self.budget_bits - 1.0), bits

    @torch.no_grad()
    def reload(self) -> None:
        """Takes s, e back from the modules (after they were rescaled there)."""
        for i, (m, _) in enumerate(self.weights):
            self.log_s[i].copy_(m.step_s.log())
            self.log_e[i].copy_(m.threshold_e.log())

    @torch.no_grad()
    def write_back(self) -> None:
        for i, (m, _) in enumerate(self.weights):
            s, e = self.params(i)
            m.step_s.copy_(s)
            m.threshold_e.copy_(e)


@dataclasses.dataclass
class BlockRecord:
    """What reconstructing one block did, measured (losses relative to the fp32 block output's
    mean square, on every calibration sample; bytes real; bits the counter's estimate)."""

    index: int
    name: str
    weights: list[str]
    plain_tuned: int
    inputs: list[str]
    cached: list[str]
    cache_nbytes: int
    target_rms: float
    loss_before: float
    loss_after_transform: float = math.nan
    loss_after: float = math.nan
    finetune_reverted: bool = False
    budget_nbytes: int = 0
    target_nbytes: float = 0.0
    block_factor: float = 1.0
    nbytes_after_transform: int = 0
    nbytes_after: int = 0
    budget_bits: float = 0.0
    bits_before: float = 0.0
    bits_after_transform: float = 0.0
    bits_after: float = 0.0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_device_mib: float | None = None


@dataclasses.dataclass
class _BlockData:
    """One block's calibration data: model inputs it reads, compressed and fp32 block inputs,
    fp32 targets, and the targets' mean square (the scale of the loss); ``keep``: per batch,
    its real tokens (``l2fx.blocks.calibration_masks``: a language model's padding counts nothing)."""

    phs: list[list[Any]]
    xq: list[list[Any]]
    xf: list[list[Any]]
    targets: list[tuple]
    energy: float
    keep: list[torch.Tensor | None]

    def loss(self, prog: BlockProgram) -> float:
        """The calibration loss: relative MSE of the compressed block over every sample (of every
        torch.distributed rank: the per-batch sum and count all-reduced)."""
        return self.outputs_and_loss(prog)[1]

    def outputs_and_loss(self, prog: BlockProgram) -> tuple[list[tuple], float]:
        with torch.no_grad():
            out = [tuple(prog.quant(*self.phs[i], *self.xq[i])) for i in range(len(self.targets))]
            total = sum(float(relative_mse(out[i], self.targets[i], self.energy, self.keep[i]))
                        for i in range(len(self.targets)))
            total, count = distributed.all_reduce_scalars(total, len(self.targets))
            return out, total / count


class BlockReconstruction(L2fxPass):
    """``train_transform=False``: stage (b) only, T kept as it is (a one-shot method's grid,
    whose symbols are then the starting point of the fine-tuning: method ``gptq+l2``)."""

    name = "block_reconstruction"
    requires_meta = (Block, Allocation)
    requires_weight_modules = (TransformedWeight,)
    writes_weights = True
    requires_calib = True
    # The loss scale and the calibration loss all-reduced here, the gradients in l2fx.optim.Adam:
    # every rank takes the same steps and the same revert decisions.
    supports_distributed = True

    def __init__(self, train_transform: bool = True):
        self.train_transform = train_transform

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config.reconstruction
        if not cfg.enabled or (cfg.transform_iters == 0 and cfg.weight_iters == 0):
            return PassResult(gm, False)
        device = torch.device(ctx.device)
        gen = torch.Generator().manual_seed(ctx.config.seed)
        dev_gen = torch.Generator(device=device).manual_seed(ctx.config.seed) if device.type != "cpu" else gen
        programs = build_programs(gm)
        ph_vals = calibration_inputs(gm, ctx.calib, cfg.max_samples, device)
        keep = calibration_masks(ctx.calib, cfg.max_samples, device)

        # Streaming caches: node -> per-calibration-batch value, compressed and fp32 prefixes.
        cache_q: dict[fx.Node, list[Any]] = {}
        cache_f: dict[fx.Node, list[Any]] = {}
        last_use = {n: p.block.index for p in programs for n in p.inputs}
        records: list[BlockRecord] = []
        # Stage (b) moves symbols, so bytes: each block's drift from its budget is paid back by
        # the blocks after it, in proportion to their budgets, so that the total stays on the
        # global budget and the final rate_fit has nothing to rescale (a common rescale there
        # would scale every fine-tuned weight, with no later block left to compensate).
        chunk = ctx.config.coding.chunk_size
        remaining = [float(block_nbytes([(m, site.param) for _, m, site in p.weights], 1.0, chunk)) for p in programs]
        carry = 0.0  # bytes the reconstructed blocks are over (+) or under (-) their budgets
        saved_flags = {id(p): p.requires_grad for p in gm.parameters()}
        try:
            for p in gm.parameters():
                p.requires_grad_(False)
            for prog_i, prog in enumerate(programs):
                share = remaining[prog_i] / max(sum(remaining[prog_i:]), 1.0)
                rec, out_q, out_f = self._run_block(prog, ph_vals, keep, cache_q, cache_f, cfg, ctx, device, gen,
                                                    dev_gen, carry * share)
                carry += rec.nbytes_after - rec.budget_nbytes
                for n, v_q, v_f in zip(prog.outputs, out_q, out_f):
                    if last_use.get(n, -1) > prog.block.index:  # keep only what a later block reads
                        cache_q[n], cache_f[n] = v_q, v_f
                for n in [n for n in cache_q if last_use.get(n, -1) <= prog.block.index]:
                    del cache_q[n], cache_f[n]
                records.append(rec)
                ctx.log(self.name, f"block {prog.block.index} {prog.block.name}: "
                                   f"{rec.loss_before:.4g} -> {rec.loss_after:.4g}")
        finally:
            for p in gm.parameters():
                p.requires_grad_(saved_flags.get(id(p), True))
        ctx.records[self.name] = {"blocks": [dataclasses.asdict(r) for r in records],
                                  "max_cache_nbytes": max((r.cache_nbytes for r in records), default=0)}
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for name, p in gm.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                self.fail(f"parameter {name} became non-finite")

    def _block_data(self, prog: BlockProgram, ph_vals: list[dict], keep: list[torch.Tensor | None], cache_q: dict,
                    cache_f: dict) -> _BlockData:
        nb = len(ph_vals)
        phs = [[pv[p] for p in prog.placeholders] for pv in ph_vals]
        xq = [[cache_q[n][i] for n in prog.inputs] for i in range(nb)]
        xf = [[cache_f[n][i] for n in prog.inputs] for i in range(nb)]
        # Weights a pass before this one already moved (a one-shot solve, for gptq+l2) carry their
        # original value as an l2fx.reference (keep_reference): the targets are the original
        # block's, not the moved weights' (which would make every loss 0 and the pass a no-op).
        refs = {f"{n.target}.weight": ref.value for n, _, _ in prog.weights
                if (ref := get_meta(n, Reference)) is not None}
        with torch.no_grad():  # fp32 targets first: the block's weights are about to move
            if refs:
                targets = [tuple(functional_call(prog.fp32, refs, (*phs[i], *xf[i]), strict=False)) for i in range(nb)]
            else:
                targets = [tuple(prog.fp32(*phs[i], *xf[i])) for i in range(nb)]
            energy = sum(mean_square(tg, k) for tg, k in zip(targets, keep))
            energy, batches = distributed.all_reduce_scalars(energy, nb)  # every rank's batches
            energy /= batches
        # Scale-free: no absolute floor (block outputs at 1e-8 are legitimate).
        return _BlockData(phs, xq, xf, targets, energy if energy > 0 else 1.0, keep)

    def _run_block(self, prog: BlockProgram, ph_vals: list[dict], keep: list[torch.Tensor | None], cache_q: dict,
                   cache_f: dict, cfg: ReconstructionConfig, ctx: PassContext, device: torch.device,
                   gen: torch.Generator, dev_gen: torch.Generator, repay: float = 0.0
                   ) -> tuple[BlockRecord, list, list]:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        data = self._block_data(prog, ph_vals, keep, cache_q, cache_f)
        rec = BlockRecord(prog.block.index, prog.block.name, [str(n.target) for n, _, _ in prog.weights],
                          len(prog.plain) if cfg.tune_plain else 0, [n.name for n in prog.inputs],
                          sorted(n.name for n in cache_q), nbytes_of(list(cache_q.values())) + nbytes_of(
                              list(cache_f.values())), math.sqrt(data.energy), data.loss(prog))
        sampler = Sampler(data.phs, data.xq, data.xf, data.targets, cfg.batch_size, cfg.qdrop_prob, gen, data.keep)
        rate = self._stage_a(prog, data, sampler, cfg, ctx, dev_gen, rec, repay)
        out_q = self._stage_b(prog, data, sampler, cfg, ctx, rec)
        with torch.no_grad():
            rec.bits_after = float(rate.bits())
        rec.nbytes_after = block_nbytes([(m, site.param) for _, m, site in prog.weights], 1.0,
                                        ctx.config.coding.chunk_size)
        rec.seconds = time.perf_counter() - t0
        rec.peak_rss_mib = peak_rss_mib()
        rec.peak_device_mib = (torch.cuda.max_memory_allocated(device) / 2 ** 20) if device.type == "cuda" else None
        out_f = [list(t) for t in zip(*data.targets)] if data.targets else [[] for _ in prog.outputs]
        out_qt = [list(t) for t in zip(*out_q)] if out_q else [[] for _ in prog.outputs]
        return rec, out_qt, out_f

    def _stage_a(self, prog: BlockProgram, data: _BlockData, sampler: Sampler, cfg: ReconstructionConfig,
                 ctx: PassContext, dev_gen: torch.Generator, rec: BlockRecord, repay: float) -> _RateTerm:
        """T parameters against the block MSE plus Eq. 10's hinge, weights frozen; then the
        block's common step factor puts its real bytes back on its budget (less ``repay``)."""
        chunk = ctx.config.coding.chunk_size
        layers = [(m, site.param) for _, m, site in prog.weights]
        rec.budget_nbytes = block_nbytes(layers, 1.0, chunk)
        rate = _RateTerm.of(prog, cfg, dev_gen)
        with torch.no_grad():
            rate.budget_bits = max(float(rate.bits()), 1.0)  # the estimate at the budget's bytes
        rec.budget_bits = rec.bits_before = rate.budget_bits
        train_t = rate.trainable()
        if cfg.transform_iters and train_t and prog.weights and self.train_transform:
            opt = Adam(train_t, cfg.lr_transform, cfg.transform_iters, cfg.lr_schedule)
            for _ in range(cfg.transform_iters):
                args, tgt, keep = sampler.draw()
                out = functional_call(prog.quant, rate.overrides(), tuple(args), strict=False)
                penalty, _ = rate.loss()
                loss = relative_mse(out, tgt, data.energy, keep) + cfg.entropy_lambda * penalty
                if not loss.requires_grad:  # the block's output does not depend on its T parameters
                    break
                loss.backward()
                opt.step()
            rate.write_back()
        # This block's share of the earlier blocks' drift (``repay`` bytes) is paid back here.
        rec.target_nbytes = min(max(rec.budget_nbytes - repay, 0.8 * rec.budget_nbytes), 1.25 * rec.budget_nbytes)
        rec.block_factor, rec.nbytes_after_transform = fit_block_nbytes(layers, rec.target_nbytes,
                                                                        ctx.config.cr_tolerance / 2, chunk)
        rate.reload()
        with torch.no_grad():
            rec.bits_after_transform = float(rate.bits())
        rec.loss_after_transform = data.loss(prog)  # also after a rescale alone (this block repaying others)
        return rate

    def _stage_b(self, prog: BlockProgram, data: _BlockData, sampler: Sampler, cfg: ReconstructionConfig,
                 ctx: PassContext, rec: BlockRecord) -> list[tuple]:
        """Weights through the STE (and the block's plain parameters), T frozen; reverted when
        the calibration loss ends above where it started. Returns the block's outputs."""
        chunk = ctx.config.coding.chunk_size
        layers = [(m, site.param) for _, m, site in prog.weights]
        ws = [m.weight for _, m, _ in prog.weights]
        plain = list(prog.plain.values()) if cfg.tune_plain else []
        tuned = bool(cfg.weight_iters and (ws or plain))
        if tuned:
            saved = [t.detach().clone() for _, m, _ in prog.weights for t in (m.weight, m.step_s, m.threshold_e)]
            saved += [t.detach().clone() for t in plain]

            def block_loss() -> torch.Tensor:
                args, tgt, keep = sampler.draw()
                return relative_mse(prog.quant(*args), tgt, data.energy, keep)

            # Rate checkpoints: fine-tuning moves weights out of the dead zone, so bytes drift
            # up with the number of steps (Fashion-MNIST ResNet, 400 steps: +6 % on one block,
            # more than the blocks after it can repay). Part-way through, a block over its
            # target is put back on it by a common T factor; the remaining steps re-adapt
            # the weights to the new grid.
            checks = {round(f * cfg.weight_iters) - 1 for f in (0.5, 0.75, 0.9)} if ws else set()

            def keep_on_budget(step: int) -> None:
                if step in checks and (now := block_nbytes(layers, 1.0, chunk)) > rec.target_nbytes:
                    fit_block_nbytes(layers, rec.target_nbytes, ctx.config.cr_tolerance / 2, chunk, now)

            # Adam steps are absolute: a bias moved by lr_plain per step drowns a block whose
            # outputs are far below unit scale (randomly initialised MobileNetV2 in eval mode:
            # outputs ~1e-10, relative output error 8e11 after tuning). The step is capped at
            # lr_plain times the block output's RMS (unchanged for outputs at unit scale or above).
            finetune_weights([m for _, m, _ in prog.weights], [w.detach() for w in ws], block_loss,
                             cfg, cfg.weight_iters, plain, keep_on_budget,
                             plain_lr_scale=min(1.0, math.sqrt(data.energy)))
            if ctx.config.plain_dtype is PlainDtype.FLOAT16:  # back to what the artifact stores
                for t in plain:                                # (plain_storage's postcondition)
                    round_to_fp16(t)
        out_q, rec.loss_after = data.outputs_and_loss(prog)
        # Fine-tuning minimises this very loss; ending above where it started means it failed
        # (a step size wrong for this block), and the block goes back to its state before
        # stage (b), T included (the rate checkpoints may have rescaled it).
        if tuned and rec.loss_after > rec.loss_after_transform:
            with torch.no_grad():
                live = [t for _, m, _ in prog.weights for t in (m.weight, m.step_s, m.threshold_e)] + plain
                for t, v in zip(live, saved):
                    t.copy_(v)
            rec.finetune_reverted = True
            ctx.log(self.name, f"block {prog.block.name}: fine-tuning raised the calibration loss; reverted")
            out_q, rec.loss_after = data.outputs_and_loss(prog)
        for n, m, _ in prog.weights:
            for pname, p in m.named_parameters():
                if not torch.isfinite(p).all():
                    self.fail(f"block {prog.block.name}: {pname} of {n.target} became non-finite")
        return out_q
