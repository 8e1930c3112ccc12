"""What reconstruction trains with: Adam, a mini-batch sampler over cached block inputs, the
bounded weight fine-tuning loop, and the relative MSE it minimises.

On a language model's padded batches the losses count the real tokens only: where a batch
carries an ``attention_mask`` ``[batch, tokens]`` (``l2fx.data.token_mask``), a leaf
``[batch, tokens, ...]`` is compared at its real tokens (``l2fx.data.real_rows``).

Shared by ``block_reconstruction`` (per block), ``network_distillation`` (all weights at once)
and the methods that learn weights or rounding against a reconstruction loss.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree

from l2fx import distributed
from l2fx.config import LRSchedule, ReconstructionConfig
from l2fx.data import real_rows
from l2fx.modules import TransformedWeight

__all__ = ["Adam", "Sampler", "finetune_weights", "float_leaves", "mean_square", "relative_mse", "nbytes_of"]


def float_leaves(values: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _mean_sq(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    x = real_rows(x, keep)
    return x.pow(2).sum() / max(x.numel(), 1)  # 0 (not NaN) for a batch that is all padding


def mean_square(values: Any, keep: torch.Tensor | None = None) -> float:
    """Sum over the floating leaves of ``mean(v^2)`` (at the real tokens ``keep`` when given)."""
    return float(sum(_mean_sq(t.float(), keep) for t in float_leaves(values)))


def relative_mse(out: Any, target: Any, energy: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the floating leaves of ``mean((out - target)^2)``, over ``energy`` (the target's
    mean square); ``keep``: the batch's real tokens (a leaf ``[batch, tokens, ...]`` is compared
    at those only)."""
    terms = [_mean_sq(o.float() - t.float(), keep) for o, t in zip(float_leaves(out), float_leaves(target))]
    return torch.stack(terms).sum() / energy


class Adam:
    """Adam (Kingma & Ba) with a cosine or constant learning rate, and an optional per-element
    learning-rate scale (``scales``: the step caps of reconstruction's stage (b)).

    Measured against ``torch.optim.Adam`` on this 2-core CPU (torch 2.14, loaded machine, 4
    tensors of 256x256x3x3 = 2.4 M elements, 100 steps): 10.8 s here, 11.0 s for torch's
    ``foreach=True`` and 23 s for ``foreach=False``; torch's first use also imports
    ``torch._dynamo``, 2.9-7 s once per process (a Fashion-MNIST compile takes 15-20 s in all).
    torch's fused GPU variant takes no per-element learning rate (the caps would become a
    projection after each step, which changes the numbers); it was not measured for lack of a GPU.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, iters: int, schedule: LRSchedule,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 scales: list[torch.Tensor] | None = None):
        """``scales``: per parameter, a tensor broadcasting to it that multiplies ``lr`` elementwise."""
        self.params, self.lr, self.iters, self.schedule = params, lr, iters, schedule
        self.scales = scales if scales is not None else [None] * len(params)
        self.b1, self.b2, self.eps, self.t = betas[0], betas[1], eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def factor(self) -> float:
        if self.schedule is LRSchedule.CONSTANT or self.iters <= 1:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(self.t, self.iters) / self.iters))

    @torch.no_grad()
    def step(self) -> None:
        """One update from the accumulated ``.grad`` (then cleared). Under ``torch.distributed``
        the gradients are first averaged over the ranks (:mod:`l2fx.distributed`), so every rank
        takes the same step."""
        if distributed.active():
            world = distributed.world_size()
            for p in self.params:
                if p.grad is not None:
                    distributed.all_reduce_sum(p.grad).div_(world)
        lr = self.lr * self.factor()
        self.t += 1
        c1, c2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        for p, m, v, k in zip(self.params, self.m, self.v, self.scales):
            if p.grad is None:
                continue
            m.mul_(self.b1).add_(p.grad, alpha=1.0 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1.0 - self.b2)
            if k is None:
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)
            else:
                p.sub_(m / (v / c2).sqrt_().add_(self.eps) * k * (lr / c1))
            p.grad = None


class Sampler:
    """Draws training mini-batches from the cached block inputs of the calibration set:
    :meth:`draw` returns ``(arguments, targets, real tokens)``, the last the drawn samples' rows
    of ``keep`` (per calibration batch, ``l2fx.blocks.calibration_masks``), or None."""

    def __init__(self, phs: list[list[Any]], xq: list[list[Any]], xf: list[list[Any]], targets: list[tuple],
                 batch: int, qdrop: float, generator: torch.Generator,
                 keep: list[torch.Tensor | None] | None = None):
        self.phs, self.xq, self.xf, self.targets = phs, xq, xf, targets
        self.batch, self.qdrop, self.gen = batch, qdrop, generator
        self.keep = keep if keep is not None else [None] * len(targets)
        self.sizes = [self._size(i) for i in range(len(targets))]

    def _size(self, i: int) -> int | None:
        """Samples in calibration batch i, or None when some input cannot be sliced per sample."""
        n = None
        for v in self.phs[i] + self.xq[i]:
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                return None
            if n is None:
                n = v.shape[0]
            elif v.shape[0] != n:
                return None
        return n

    def draw(self) -> tuple[list[Any], tuple, torch.Tensor | None]:
        weights = torch.tensor([float(s or 1) for s in self.sizes])
        i = int(torch.multinomial(weights, 1, generator=self.gen))
        n = self.sizes[i]
        phs, xq, xf, tgt, keep = self.phs[i], self.xq[i], self.xf[i], self.targets[i], self.keep[i]
        if n is not None and n > self.batch:
            idx = torch.randperm(n, generator=self.gen)[: self.batch]
            take = lambda v: v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731
            phs, xq, xf = [take(v) for v in phs], [take(v) for v in xq], [take(v) for v in xf]
            tgt = tuple(take(v) for v in tgt)
            keep = take(keep)
        if self.qdrop > 0 and n is not None:
            m = None
            mixed = []
            for q, f in zip(xq, xf):
                if isinstance(q, torch.Tensor) and q.is_floating_point():
                    if m is None:
                        m = torch.rand(q.shape[0], generator=self.gen) < self.qdrop
                    mixed.append(torch.where(m.to(q.device).view(-1, *([1] * (q.dim() - 1))), f, q))
                else:
                    mixed.append(q)
            xq = mixed
        return phs + xq, tgt, keep


def finetune_weights(modules: list[TransformedWeight], centres: list[torch.Tensor], loss_fn, cfg: ReconstructionConfig,
                      iters: int, plain: list[torch.Tensor] = (), after_step=None,
                      plain_lr_scale: float = 1.0) -> None:
    """``iters`` Adam steps on the modules' weights (through the STE, T frozen) minimising
    ``loss_fn()``; each weight stays within ``weight_radius`` steps ``s`` of its centre
    (AdaRound-like: "slightly tune the weights", Sec. 4.1, without fitting the calibration set).
    ``plain`` tensors (biases, norm affines) are tuned alongside at ``lr_plain * plain_lr_scale``, unbounded;
    ``after_step(i)`` runs after step i (0-based)."""
    ws = [m.weight for m in modules]
    plain = list(plain)
    with torch.no_grad():
        steps = [m.params()[0] for m in modules]  # [1, .., C, .., 1] or 0-d: broadcasts
        lo = [c - cfg.weight_radius * s for c, s in zip(centres, steps)]
        hi = [c + cfg.weight_radius * s for c, s in zip(centres, steps)]
        # An Adam step moves a weight by about lr whatever its gradient's scale; capped at a
        # tenth of the weight's rounding step s, so a layer (or channel) at a scale far below
        # lr_weight is tuned, not thrown about (weights at 1e-4, steps 1e-5: every stage (b)
        # step crossed several symbols, and the block ended worse than it started).
        scales = [(0.1 * m.params()[0] / cfg.lr_weight).clamp(max=1.0) for m in modules]  # broadcast views
    for w in ws + plain:
        w.requires_grad_(True)
    opt = Adam(ws, cfg.lr_weight, iters, cfg.lr_schedule, scales=scales)
    opt_plain = Adam(plain, cfg.lr_plain * plain_lr_scale, iters, cfg.lr_schedule)
    try:
        for step in range(iters):
            loss = loss_fn()
            if not loss.requires_grad:  # the output does not depend on these weights
                break
            loss.backward()
            opt.step()
            opt_plain.step()
            if cfg.weight_radius > 0:
                with torch.no_grad():
                    for w, a, b in zip(ws, lo, hi):
                        w.copy_(torch.minimum(torch.maximum(w, a), b))
            if after_step is not None:
                after_step(step)
    finally:
        for w in ws + plain:
            w.requires_grad_(False)
            w.grad = None


def nbytes_of(values: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor))
