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

The budget of a block is what the allocation gave its layers, so the global target of Eq. 10
holds block by block. The allocation's grid leaves the total up to ~25 % under the target
(TinyConvNet at CR 14: 23.5 of 30.2 kB), so the pass first applies ``rate_fit``'s common
step factor, which fills the target exactly; a block's budget is then its layers' real bytes
at that point. Stage (a) keeps the counter's estimate of the block's payload at or under its
value there (the hinge of Eq. 10); after stage (a) the block's T parameters are rescaled by
one common factor so that its real bytes are back on the budget (within ``cr_tolerance / 2``),
*before* the weights are fine-tuned: a rescale after fine-tuning re-rounds every weight and
undoes it (TinyConvNet, CR 14, relative output error: 1.26 without reconstruction, 2.48 with
it when the final rate_fit moved all steps by 0.89, 0.33 with the budget kept per block).

Streaming: the calibration set's activations are propagated block by block; only the current
block's inputs are cached, in a compressed version (the output of the already reconstructed
prefix) and an fp32 version (the fp32 prefix), plus the fp32 targets while the block trains.
The fp32 block runs the raw ``TransformedWeight.weight`` tensors (a copy of the block's graph
with each weight module replaced by a ``get_attr`` of its ``.weight``); it runs before the
block's weights are fine-tuned, so the targets are those of the original model.

Optional network-level distillation (``ReconstructionConfig.distill_iters``, paper Sec. 5.1
and A.1: "both the complete network output and specific intermediate layer outputs contribute
to the MSE loss"): after the last block, every weight is fine-tuned at once (T frozen, within
``weight_radius`` steps of its original value) against the network output's relative MSE
(weighted ``distill_output_weight``) plus the mean of the block outputs' relative MSEs; the
fp32 targets come from the whole graph run on a snapshot of the original weights, per step,
so nothing is cached beyond one mini-batch.

Pre: ``block_partition`` ran (every compressed weight carries ``l2fx.block``); every weight
has an ``l2fx.allocation``. Post: the same graph; T parameters and weights of every block
updated in place; every parameter finite; per-block records in
``ctx.records["block_reconstruction"]``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.func import functional_call

from l2fx.config import LRSchedule, PlainDtype, ReconstructionConfig
from l2fx.counter import estimate_bits
from l2fx.data import Batch, batch_size, to_device
from l2fx.inplace import clone_written_inputs
from l2fx.ir import Allocation, WeightSite, require_meta, weight_sites
from l2fx.modules import TransformedWeight
from l2fx.passes.block_partition import Block, is_weight_node, side_nodes
from l2fx.passes.allocation import budget_nbytes as global_budget
from l2fx.passes.plain_storage import round_to_fp16
from l2fx.passes.rate_fit import (RateFit, finest_log2_factor, fit_log2_factor, layer_bytes_at, scaled,
                                  total_nbytes, within_tolerance)
from l2fx.pipeline import L2fxPass, PassContext, PassResult, peak_rss_mib
from l2fx.transform import TransformKind, channel_view, forward_t

__all__ = ["BlockReconstruction", "BlockProgram", "build_programs", "placeholder_values"]


# --------------------------------------------------------------------------------------------
# Binding a calibration batch to the graph's placeholders.


def placeholder_values(gm: fx.GraphModule, batch: Batch) -> list[Any]:
    """The values of ``gm``'s placeholders, in graph order, when called on ``batch``.

    fx-traced graphs take the forward's parameters by name; ``torch.export`` graphs flatten
    ``(args, kwargs)`` with the pytree spec recorded in the graph's codegen.
    """
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    else:
        args, kwargs = tuple(batch), {}
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return _flatten_export(info, bound)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [bound.arguments[str(n.target).lstrip("*")] for n in phs]


def _flatten_export(info: Any, bound: inspect.BoundArguments) -> list[Any]:
    import torch.fx._pytree as fx_pytree

    spec = info.in_spec
    args_spec, kwargs_spec = spec.children() if hasattr(spec, "children") else spec.children_specs
    n_args = args_spec.num_children
    args = [bound.arguments[name] for name in info.orig_args[:n_args]]
    kwargs = {k: bound.arguments[k] for k in kwargs_spec.context}
    return list(fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec))


# --------------------------------------------------------------------------------------------
# A block as its own pair of GraphModules.


@dataclasses.dataclass
class BlockProgram:
    """One block: its nodes in ``gm`` and two GraphModules computing its outputs.

    ``quant`` runs the TransformedWeight modules (shared with ``gm``, so training updates them
    in place); ``fp32`` runs their raw ``.weight``. Both take ``placeholders`` (model inputs
    that side values used in the block are recomputed from) followed by ``inputs`` (values of
    earlier blocks), and return the tuple ``outputs`` (values used after the block).
    """

    block: Block
    placeholders: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    weights: list[tuple[fx.Node, TransformedWeight, WeightSite]]  # owned: trained here
    quant: fx.GraphModule
    fp32: fx.GraphModule
    # Plain (not range-coded) float parameters read only by this block's nodes: biases,
    # folded BatchNorm shifts, norm affines. Path in ``gm`` -> the parameter (shared with gm).
    plain: dict[str, torch.nn.Parameter] = dataclasses.field(default_factory=dict)


def _extract(gm: fx.GraphModule, keep: list[fx.Node], phs: list[fx.Node], inputs: list[fx.Node],
             outputs: list[fx.Node], fp32: bool) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in phs + inputs:
        env[n] = g.placeholder(n.name)
    for n in keep:
        if fp32 and is_weight_node(gm, n):
            env[n] = g.get_attr(f"{n.target}.weight")
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    block = fx.GraphModule(gm, g, class_name="L2fxBlock")
    # The block runs again and again on its cached inputs: a block that begins with the
    # previous block's in-place activation would otherwise apply it to the cache on every run.
    if clone_written_inputs(block):
        block.recompile()
    return block


def plain_parameters(gm: fx.GraphModule) -> dict[int, dict[str, torch.nn.Parameter]]:
    """Block index -> the plain float parameters only that block's nodes read.

    A parameter qualifies when it is not a compressed weight and every user of every
    ``get_attr`` of it is a (non-weight) node of one block; one read from outside (another
    block, a side value, the unblocked head) keeps it out, so tuning it cannot change what
    a block already reconstructed, or anything else, sees.
    """
    params = dict(gm.named_parameters())
    sites = {site.param for _, site in weight_sites(gm)}
    owners: dict[str, set] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        path = str(n.target)
        users = owners.setdefault(path, set())
        if not n.users:
            users.add(None)
        for u in n.users:
            b = u.meta.get(Block.META_KEY)
            users.add(None if b is None or is_weight_node(gm, u) else b.index)
    result: dict[int, dict[str, torch.nn.Parameter]] = {}
    for path, users in owners.items():
        p = params.get(path)
        if p is None or path in sites or not p.is_floating_point() or len(users) != 1 or None in users:
            continue
        result.setdefault(next(iter(users)), {})[path] = p
    return result


def build_programs(gm: fx.GraphModule) -> list[BlockProgram]:
    """One :class:`BlockProgram` per block of ``block_partition``, in block order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    plain = plain_parameters(gm)
    side = side_nodes(gm)
    members: dict[int, list[fx.Node]] = {}
    blocks: dict[int, Block] = {}
    for n in gm.graph.nodes:
        b = n.meta.get(Block.META_KEY)
        if b is not None and not is_weight_node(gm, n):
            members.setdefault(b.index, []).append(n)
            blocks[b.index] = b
    programs = []
    for index in sorted(members):
        nodes = set(members[index])
        keep, phs, inputs = set(nodes), set(), set()
        stack = list(nodes)
        while stack:  # pull in weights, parameters and side values (recomputed from the inputs)
            for a in stack.pop().all_input_nodes:
                if a in keep or a in inputs or a in phs:
                    continue
                if a.op == "placeholder":
                    phs.add(a)
                elif a.op == "get_attr" or is_weight_node(gm, a) or a in side:
                    keep.add(a)
                    stack.append(a)
                else:
                    inputs.add(a)
        outputs = sorted({n for n in nodes for u in n.users if u not in nodes}, key=order.__getitem__)
        ordered = sorted(keep, key=order.__getitem__)
        phs_l, inputs_l = sorted(phs, key=order.__getitem__), sorted(inputs, key=order.__getitem__)
        owned = [(n, gm.get_submodule(str(n.target)), require_meta(n, WeightSite, "block_reconstruction"))
                 for n in ordered if is_weight_node(gm, n) and n.meta.get(Block.META_KEY) == blocks[index]]
        programs.append(BlockProgram(
            blocks[index], phs_l, inputs_l, outputs, owned,
            _extract(gm, ordered, phs_l, inputs_l, outputs, fp32=False),
            _extract(gm, ordered, phs_l, inputs_l, outputs, fp32=True), plain.get(index, {})))
    return programs


# --------------------------------------------------------------------------------------------
# Losses and the rate term.


def _floats(values: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _relative_mse(out: Any, target: Any, energy: float) -> torch.Tensor:
    terms = [(o.float() - t.float()).pow(2).mean() for o, t in zip(_floats(out), _floats(target))]
    return torch.stack(terms).sum() / energy


@dataclasses.dataclass
class _RateTerm:
    """Eq. 10 for one block: ``ReLU(sum of estimated bits / budget - 1)`` on log-space T."""

    weights: list[tuple[TransformedWeight, str]]  # module, its path in the block GraphModule
    log_s: list[torch.Tensor]
    log_e: list[torch.Tensor]
    budget_bits: float
    cfg: ReconstructionConfig
    generator: torch.Generator

    def params(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.weights[i][0]
        s = self.log_s[i].exp()
        if m.kind is TransformKind.LINEAR:
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
            t = forward_t(w, m.kind, channel_view(s, w, m.channel_axis), channel_view(e, w, m.channel_axis))
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


@torch.no_grad()
def block_nbytes(layers: list[tuple[TransformedWeight, str]], factor: float, chunk_size: int) -> int:
    """Real bytes of ``layers`` (module, param) with their T grids scaled by ``factor``."""
    return sum(layer_bytes_at(m, param, factor, chunk_size) for m, param in layers)


@torch.no_grad()
def fit_block_nbytes(layers: list[tuple[TransformedWeight, str]], target: float, tolerance: float,
                     chunk_size: int, now: int | None = None) -> tuple[float, int]:
    """Scales the layers' T by one common factor so their bytes land in ``[target (1 - tol), target]``.

    The block-local version of ``rate_fit`` (same search, :func:`l2fx.passes.rate_fit.fit_log2_factor`,
    within a factor 4 either way, and never finer than the layers can hold without saturating
    more symbols: :func:`~l2fx.passes.rate_fit.finest_log2_factor`); returns the factor applied and the
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
    for m, _ in layers:
        s, e = scaled(m, factor)
        m.step_s.copy_(s)
        m.threshold_e.copy_(e)
    return factor, nbytes


# --------------------------------------------------------------------------------------------
# Training loop pieces.


class _Adam:
    """Adam (Kingma & Ba) with a cosine or constant learning rate, for a handful of leaf tensors.

    ``torch.optim`` would do, but its first use imports ``torch._dynamo``: 7 s of the 25 s a
    TinyConvNet compile took on the project's loaded 2-core CPU (torch 2.14).
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
        """One update from the accumulated ``.grad`` (then cleared)."""
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


class _Sampler:
    """Draws training mini-batches from the cached block inputs of the calibration set."""

    def __init__(self, phs: list[list[Any]], xq: list[list[Any]], xf: list[list[Any]], targets: list[tuple],
                 batch: int, qdrop: float, generator: torch.Generator):
        self.phs, self.xq, self.xf, self.targets = phs, xq, xf, targets
        self.batch, self.qdrop, self.gen = batch, qdrop, generator
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

    def draw(self) -> tuple[list[Any], tuple]:
        weights = torch.tensor([float(s or 1) for s in self.sizes])
        i = int(torch.multinomial(weights, 1, generator=self.gen))
        n = self.sizes[i]
        phs, xq, xf, tgt = self.phs[i], self.xq[i], self.xf[i], self.targets[i]
        if n is not None and n > self.batch:
            idx = torch.randperm(n, generator=self.gen)[: self.batch]
            take = lambda v: v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731
            phs, xq, xf = [take(v) for v in phs], [take(v) for v in xq], [take(v) for v in xf]
            tgt = tuple(take(v) for v in tgt)
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
        return phs + xq, tgt


def _finetune_weights(modules: list[TransformedWeight], centres: list[torch.Tensor], loss_fn, cfg: ReconstructionConfig,
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
    opt = _Adam(ws, cfg.lr_weight, iters, cfg.lr_schedule, scales=scales)
    opt_plain = _Adam(plain, cfg.lr_plain * plain_lr_scale, iters, cfg.lr_schedule)
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


def _nbytes(values: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor))


class BlockReconstruction(L2fxPass):
    name = "block_reconstruction"

    def requires(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            if not is_weight_node(gm, node):
                self.fail("expects TransformedWeight modules: run insert_transforms first", node)
            require_meta(node, Block, self.name)
            require_meta(node, Allocation, self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config.reconstruction
        if not cfg.enabled or (cfg.transform_iters == 0 and cfg.weight_iters == 0):
            return PassResult(gm, False)
        device = torch.device(ctx.device)
        gen = torch.Generator().manual_seed(ctx.config.seed)
        dev_gen = torch.Generator(device=device).manual_seed(ctx.config.seed) if device.type != "cpu" else gen
        # Start every block at the budget: the allocation's grid leaves it up to ~25 % under
        # (TinyConvNet at CR 14: 23.5 of 30.2 kB), and a common rescale *after* fine-tuning
        # re-rounds every weight and undoes it (measured: relative output error 1.26 without
        # reconstruction, 2.48 with it when rate_fit had to move the steps by 0.89 afterwards).
        saved = ctx.records.get(RateFit.name)
        RateFit().call(gm)
        ctx.records[self.name + ".prefill"] = ctx.records.pop(RateFit.name)
        if saved is not None:
            ctx.records[RateFit.name] = saved
        programs = build_programs(gm)
        originals = ({**{f"{n.target}.weight": m.weight.detach().clone() for p in programs for n, m, _ in p.weights},
                      **{path: t.detach().clone() for p in programs for path, t in p.plain.items()}}
                     if cfg.distill_iters else {})

        batches = list(ctx.calib)
        if cfg.max_samples:
            kept, have = [], 0
            for b in batches:
                if have >= cfg.max_samples:
                    break
                kept.append(b)
                have += batch_size(b)
            batches = kept
        ph_all = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ph_vals = [dict(zip(ph_all, placeholder_values(gm, to_device(b, device)))) for b in batches]

        # Streaming caches: node -> per-calibration-batch value, compressed and fp32 prefixes.
        cache_q: dict[fx.Node, list[Any]] = {}
        cache_f: dict[fx.Node, list[Any]] = {}
        last_use = {n: p.block.index for p in programs for n in p.inputs}
        records = []
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
                rec = self._run_block(prog, ph_vals, cache_q, cache_f, cfg, ctx, device, gen, dev_gen,
                                      carry * share)
                carry += rec["nbytes_after"] - rec["budget_nbytes"]
                for n, v_q, v_f in zip(prog.outputs, rec.pop("_out_q"), rec.pop("_out_f")):
                    if last_use.get(n, -1) > prog.block.index:  # keep only what a later block reads
                        cache_q[n], cache_f[n] = v_q, v_f
                for n in [n for n in cache_q if last_use.get(n, -1) <= prog.block.index]:
                    del cache_q[n], cache_f[n]
                records.append(rec)
                ctx.log(self.name, f"block {prog.block.index} {prog.block.name}: "
                                   f"{rec['loss_before']:.4g} -> {rec['loss_after']:.4g}")
            distill = self._distill(gm, programs, originals, ph_vals, cfg, gen) if cfg.distill_iters else None
            snapped = self._snap_if_on_budget(gm, programs, chunk)
        finally:
            for p in gm.parameters():
                p.requires_grad_(saved_flags.get(id(p), True))
        ctx.records[self.name] = {"blocks": records, "distill": distill, "snapped": snapped,
                                  "max_cache_nbytes": max((r["cache_nbytes"] for r in records), default=0)}
        return PassResult(gm, True)

    @staticmethod
    def _snap_if_on_budget(gm: fx.GraphModule, programs: list[BlockProgram], chunk: int) -> bool:
        """Snaps every fine-tuned weight to its symbol's centre when the total is already
        within the CR tolerance (then rate_fit leaves T alone, and only T's rounding to its
        storage dtype remains, which can no longer flip a symbol). Off budget, the weights
        stay where fine-tuning left them: rate_fit's common rescale then re-rounds the
        weights sitting at boundaries instead of scaling every weight by the factor."""
        cfg = PassContext.current().config
        if not within_tolerance(total_nbytes(gm, 1.0, chunk), global_budget(gm, cfg.target_cr), cfg.cr_tolerance):
            return False
        for p in programs:
            for _, m, _ in p.weights:
                m.snap()
        return True

    def _run_block(self, prog: BlockProgram, ph_vals: list[dict], cache_q: dict, cache_f: dict,
                   cfg: ReconstructionConfig, ctx: PassContext, device: torch.device, gen: torch.Generator,
                   dev_gen: torch.Generator, repay: float = 0.0) -> dict:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        nb = len(ph_vals)
        phs = [[pv[p] for p in prog.placeholders] for pv in ph_vals]
        xq = [[cache_q[n][i] for n in prog.inputs] for i in range(nb)]
        xf = [[cache_f[n][i] for n in prog.inputs] for i in range(nb)]
        cached = sorted(n.name for n in cache_q)
        cache_nbytes = _nbytes([cache_q[n] for n in cache_q]) + _nbytes([cache_f[n] for n in cache_f])

        with torch.no_grad():  # fp32 targets first: the block's weights are about to move
            targets = [tuple(prog.fp32(*phs[i], *xf[i])) for i in range(nb)]
            energy = sum(float(sum(t.float().pow(2).mean() for t in _floats(tg))) for tg in targets) / nb
            energy = energy if energy > 0 else 1.0  # scale-free: no absolute floor (outputs at 1e-8 are legitimate)

            def eval_loss() -> float:
                return sum(float(_relative_mse(prog.quant(*phs[i], *xq[i]), targets[i], energy))
                           for i in range(nb)) / nb

            loss_before = eval_loss()
        sampler = _Sampler(phs, xq, xf, targets, cfg.batch_size, cfg.qdrop_prob, gen)

        # Stage (a): T parameters, weights frozen.
        paths = {id(m): str(n.target) for n, m, _ in prog.weights}
        chunk = ctx.config.coding.chunk_size
        layers = [(m, site.param) for _, m, site in prog.weights]
        budget_nbytes = block_nbytes(layers, 1.0, chunk)
        rate = _RateTerm([(m, paths[id(m)]) for _, m, _ in prog.weights],
                         [m.step_s.detach().log().clone().requires_grad_(m.kind is not TransformKind.PRUNE)
                          for _, m, _ in prog.weights],
                         [m.threshold_e.detach().log().clone().requires_grad_(m.kind is not TransformKind.LINEAR)
                          for _, m, _ in prog.weights],
                         1.0, cfg, dev_gen)
        with torch.no_grad():
            rate.budget_bits = max(float(rate.bits()), 1.0)  # the estimate at the budget's bytes
        bits_before = rate.budget_bits
        train_t = [t for t in rate.log_s + rate.log_e if t.requires_grad]
        if cfg.transform_iters and train_t and prog.weights:
            opt = _Adam(train_t, cfg.lr_transform, cfg.transform_iters, cfg.lr_schedule)
            for _ in range(cfg.transform_iters):
                args, tgt = sampler.draw()
                out = functional_call(prog.quant, rate.overrides(), tuple(args), strict=False)
                penalty, _ = rate.loss()
                loss = _relative_mse(out, tgt, energy) + cfg.entropy_lambda * penalty
                if not loss.requires_grad:  # the block's output does not depend on its T parameters
                    break
                loss.backward()
                opt.step()
            rate.write_back()
        # This block's share of the earlier blocks' drift (``repay`` bytes) is paid back here.
        target = min(max(budget_nbytes - repay, 0.8 * budget_nbytes), 1.25 * budget_nbytes)
        factor, nbytes_after_t = fit_block_nbytes(layers, target, ctx.config.cr_tolerance / 2, chunk)
        rate.reload()
        with torch.no_grad():
            bits_after_t = float(rate.bits())
            loss_after_t = eval_loss()  # also after a rescale alone (this block repaying others)

        # Stage (b): weights through the STE, T frozen.
        ws = [m.weight for _, m, _ in prog.weights]
        plain = list(prog.plain.values()) if cfg.tune_plain else []
        reverted = False
        if cfg.weight_iters and (ws or plain):
            saved = [t.detach().clone() for _, m, _ in prog.weights for t in (m.weight, m.step_s, m.threshold_e)]
            saved += [t.detach().clone() for t in plain]

            def block_loss() -> torch.Tensor:
                args, tgt = sampler.draw()
                return _relative_mse(prog.quant(*args), tgt, energy)

            # Rate checkpoints: fine-tuning moves weights out of the dead zone, so bytes drift
            # up with the number of steps (Fashion-MNIST ResNet, 400 steps: +6 % on one block,
            # more than the blocks after it can repay). Part-way through, a block over its
            # target is put back on it by a common T factor; the remaining steps re-adapt
            # the weights to the new grid.
            checks = {round(f * cfg.weight_iters) - 1 for f in (0.5, 0.75, 0.9)} if ws else set()

            def keep_on_budget(step: int) -> None:
                if step in checks and (now := block_nbytes(layers, 1.0, chunk)) > target:
                    fit_block_nbytes(layers, target, ctx.config.cr_tolerance / 2, chunk, now)

            # Adam steps are absolute: a bias moved by lr_plain per step drowns a block whose
            # outputs are far below unit scale (randomly initialised MobileNetV2 in eval mode:
            # outputs ~1e-10, relative output error 8e11 after tuning). The step is capped at
            # lr_plain times the block output's RMS (unchanged for outputs at unit scale or above).
            _finetune_weights([m for _, m, _ in prog.weights], [w.detach() for w in ws], block_loss,
                              cfg, cfg.weight_iters, plain, keep_on_budget,
                              plain_lr_scale=min(1.0, math.sqrt(energy)))
            if ctx.config.plain_dtype is PlainDtype.FLOAT16:  # back to what the artifact stores
                for t in plain:                                # (plain_storage's postcondition)
                    round_to_fp16(t)

        def outputs_and_loss() -> tuple[list[tuple], float]:
            with torch.no_grad():
                out = [tuple(prog.quant(*phs[i], *xq[i])) for i in range(nb)]
                return out, sum(float(_relative_mse(out[i], targets[i], energy)) for i in range(nb)) / nb

        out_q, loss_after = outputs_and_loss()
        # Fine-tuning minimises this very loss; ending above where it started means it failed
        # (a step size wrong for this block), and the block goes back to its state before
        # stage (b), T included (the rate checkpoints may have rescaled it).
        if cfg.weight_iters and (ws or plain) and loss_after > loss_after_t:
            with torch.no_grad():
                live = [t for _, m, _ in prog.weights for t in (m.weight, m.step_s, m.threshold_e)] + plain
                for t, v in zip(live, saved):
                    t.copy_(v)
            reverted = True
            ctx.log(self.name, f"block {prog.block.name}: fine-tuning raised the calibration loss; reverted")
            out_q, loss_after = outputs_and_loss()
        with torch.no_grad():
            bits_after = float(rate.bits())
        for _, m, _ in prog.weights:
            for name, p in m.named_parameters():
                if not torch.isfinite(p).all():
                    self.fail(f"block {prog.block.name}: {name} of {paths[id(m)]} became non-finite")
        out_f = [list(t) for t in zip(*targets)] if targets else [[] for _ in prog.outputs]
        out_qt = [list(t) for t in zip(*out_q)] if out_q else [[] for _ in prog.outputs]
        peak_dev = (torch.cuda.max_memory_allocated(device) / 2 ** 20) if device.type == "cuda" else None
        return {
            "index": prog.block.index, "name": prog.block.name,
            "weights": [paths[id(m)] for _, m, _ in prog.weights], "plain_tuned": len(plain),
            "inputs": [n.name for n in prog.inputs], "cached": cached, "cache_nbytes": cache_nbytes,
            "target_rms": math.sqrt(energy), "loss_before": loss_before, "loss_after_transform": loss_after_t,
            "loss_after": loss_after, "finetune_reverted": reverted,
            "budget_nbytes": budget_nbytes, "target_nbytes": target, "block_factor": factor,
            "nbytes_after_transform": nbytes_after_t,
            "nbytes_after": block_nbytes(layers, 1.0, chunk), "budget_bits": rate.budget_bits, "bits_before": bits_before, "bits_after_transform": bits_after_t,
            "bits_after": bits_after, "seconds": time.perf_counter() - t0,
            "peak_rss_mib": peak_rss_mib(), "peak_device_mib": peak_dev,
            "_out_q": out_qt, "_out_f": out_f,
        }

    def _distill(self, gm: fx.GraphModule, programs: list[BlockProgram], originals: dict[str, torch.Tensor],
                 ph_vals: list[dict], cfg: ReconstructionConfig, gen: torch.Generator) -> dict:
        """Network-level distillation (Sec. 5.1, A.1): every weight at once, T frozen, against
        the network output and every block output of the fp32 model (on the fly, per step)."""
        t0 = time.perf_counter()
        quant, fp32, n_final = build_network_programs(gm, programs)
        weights = [(str(n.target), m) for p in programs for n, m, _ in p.weights]
        overrides = originals  # the fp32 model: original weights and plain parameters
        phs = [list(pv.values()) for pv in ph_vals]
        sampler = _Sampler(phs, [[] for _ in phs], [[] for _ in phs], [() for _ in phs], cfg.batch_size, 0.0, gen)

        with torch.no_grad():
            probe = phs[0]
            probe_target = functional_call(fp32, overrides, tuple(probe), strict=False)
            usable = [isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0 for t in probe_target]
            energies = [(float(t.float().pow(2).mean()) or 1.0) if ok else 1.0
                        for t, ok in zip(probe_target, usable)]
        n_inner = sum(usable[n_final:])
        scale = [0.0 if not usable[j] else cfg.distill_output_weight if j < n_final else 1.0 / n_inner
                 for j in range(len(energies))]

        def loss_of(out: tuple, target: tuple) -> torch.Tensor:
            terms = [k * _relative_mse(o, t, e) for o, t, e, k in zip(out, target, energies, scale) if k > 0]
            return torch.stack(terms).sum()

        def output_error() -> float:  # the network output alone, on the first calibration batch
            with torch.no_grad():
                out = quant(*probe)
                return float(sum(_relative_mse(o, t, e)
                                 for o, t, e, ok in zip(out, probe_target, energies, usable[:n_final]) if ok))

        def network_loss() -> torch.Tensor:
            args, _ = sampler.draw()
            with torch.no_grad():
                target = functional_call(fp32, overrides, tuple(args), strict=False)
            return loss_of(quant(*args), target)

        def objective() -> float:  # the distillation loss itself, on the first calibration batch
            with torch.no_grad():
                return float(loss_of(quant(*probe), probe_target))

        # Start from the symbols' centres, not from the rounding boundaries the blocks'
        # fine-tuning left many weights at: from there the STE flips them at random (tiny
        # ConvNet, 3 seeds: distillation objective +1 % .. +42 % unsnapped; unchanged within
        # 0.2 % snapped, where lr_weight = 1e-4 moves few weights across a boundary).
        for _, m in weights:
            m.snap()
        before, objective_before = output_error(), objective()
        _finetune_weights([m for _, m in weights], [overrides[f"{path}.weight"] for path, _ in weights],
                          network_loss, cfg, cfg.distill_iters)
        for path, m in weights:
            if not torch.isfinite(m.weight).all():
                self.fail(f"distillation: the weight of {path} became non-finite")
        after, objective_after = output_error(), objective()
        PassContext.current().log(self.name, f"distillation: network output error {before:.4g} -> {after:.4g}")
        return {"iters": cfg.distill_iters, "outputs": len(energies), "network_outputs": n_final,
                "output_error_before": before, "output_error_after": after,
                "objective_before": objective_before, "objective_after": objective_after, "seconds": time.perf_counter() - t0}


def build_network_programs(gm: fx.GraphModule, programs: list[BlockProgram]
                           ) -> tuple[fx.GraphModule, fx.GraphModule, int]:
    """The whole graph as two GraphModules (compressed weights / raw ``.weight``), both taking
    the model's placeholders and returning the network's tensor outputs followed by every
    block output; also returns how many leading outputs are the network's."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    final = list(dict.fromkeys(a for a in pytree.tree_leaves(out_node.args[0]) if isinstance(a, fx.Node)))
    inner = [n for n in dict.fromkeys(o for p in programs for o in p.outputs) if n not in final]
    outputs = final + inner
    return (_extract(gm, body, phs, [], outputs, fp32=False), _extract(gm, body, phs, [], outputs, fp32=True),
            len(final))
