"""``oneshot_solve``: every weight compressed by a layer-wise one-shot recipe (GPTQ, SparseGPT,
Wanda, OBC, AdaRound, ...) on the grid the allocation chose, block by block, on budget.

Before: ``TransformedWeight`` s holding the fp32 weights and the allocated T (steps, dead zones,
per channel or group), every block on its byte budget (``rate_prefill`` ran). After: the same
modules, each weight replaced by the recipe's ``w_hat``, a point of its (possibly rescaled)
grid, and its T the grid's, rounded to its storage dtype: ``range_code`` codes exactly the
recipe's symbols. With ``hold_symbols`` (the one-shot methods) the weights are held as those
symbols (:meth:`~l2fx.modules.TransformedWeight.hold_symbols`), a quarter of the fp32 bytes,
and read-only from then on.

Per block, streamed (:func:`l2fx.layerwise.stream_blocks`: inputs from the already compressed
prefix, the references' sequential setting): the Hessian of every weight's inputs with the
block's weights uncompressed (:func:`l2fx.layerwise.block_hessians`), then the block's byte fit:
the recipe runs on every layer's grid scaled by one common factor ``2^t`` (``t`` by the secant
search of ``rate_fit``, :func:`l2fx.bytefit.fit_log2_factor`, within a factor 4 either way) until
the block's real bytes land within ``cr_tolerance / 2`` under its target: its budget less its
share of the earlier blocks' drift, as block reconstruction repays it. The recipe's result is
measured, never predicted: pruning or error feedback change the symbols' entropy, so the grid
the allocation chose for round-to-nearest does not give the budget's bytes by itself. A grid
fixed by the user (a ``layers`` rule's bits) is not rescaled; a block whose grids are all fixed
is solved once.

Layers the recipe cannot take fall back to round-to-nearest on their grid, recorded per layer
with the reason: a weight read by an op with no input Hessian (embeddings), a transform kind
other than linear/joint (the recipes' grids), parameters along a non-output axis. A recipe
that cannot apply as asked (N:M on a dimension M does not divide, OBC over its cost bound) is a
:class:`~l2fx.errors.SolverError` naming the layer and the option; with the option
``nm_unfit="dense"`` a layer N:M does not divide runs the recipe's quantiser without pruning
instead (:data:`l2fx.solvers.recipes.DENSE_RECIPE`), recorded as its fallback.

Options: the recipe's defaults (:data:`l2fx.solvers.recipes.DEFAULTS`), then the pass's own
(the method's), then ``CompileConfig.method_options``, then the weight's ``layers`` rule options.

Pre: blocks partitioned; every weight a ``TransformedWeight`` with an allocation. Post: every
weight a fixed point of its grid (``T^-1(round(T(w))) == w``), its T finite and > 0; per-block
and per-layer records in ``ctx.records["oneshot_solve"]``.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.fx as fx

from l2fx.accounting import predict_layer_nbytes, round_params
from l2fx.bytefit import fit_log2_factor, layer_bytes_at, scaled
from l2fx.errors import ConfigError
from l2fx.ir import Allocation, Block, LayerIntent, get_meta, weight_sites
from l2fx.layerwise import LayerStats, block_hessians, stream_blocks
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.solvers import Grid
from l2fx.solvers.recipes import RECIPES, dense_fallback, options_for, solve
from l2fx.transform import TransformKind, encode, inverse_t

__all__ = ["OneShotSolve"]

_GRID_KINDS = (TransformKind.LINEAR, TransformKind.JOINT)


def _grid(module: TransformedWeight, s: torch.Tensor, e: torch.Tensor, rows: slice) -> Grid:
    """The module's grid with parameters (s, e) over rows ``rows`` of its [rows, K] view."""
    if module.group_size is not None:
        sv, ev = s[rows], e[rows]
    else:  # per channel along axis 0, or per tensor (one value for every row)
        n = module.weight.shape[0]
        sv, ev = s.reshape(-1).expand(n)[rows], e.reshape(-1).expand(n)[rows]
    return Grid(module.kind, sv.contiguous(), ev.contiguous(), -module.qmax, module.qmax, module.group_size)


def _unsupported(module: TransformedWeight) -> str | None:
    if module.kind not in _GRID_KINDS:
        return f"transform kind {module.kind.value!r} (one-shot grids are linear or joint)"
    if module.channel_axis not in (0, None):
        return f"parameters along axis {module.channel_axis} (one-shot grids run along the output rows)"
    return None


class OneShotSolve(L2fxPass):
    name = "oneshot_solve"
    requires_meta = (Block, Allocation, LayerIntent)
    requires_weight_modules = (TransformedWeight,)
    requires_calib = True
    supports_distributed = True  # output errors / Hessians all-reduced (l2fx.distributed)

    def __init__(self, recipe: str, *, hold_symbols: bool = False, **options: Any):
        """``hold_symbols``: each solved weight is held as its symbols
        (:meth:`TransformedWeight.hold_symbols`, 1 byte per weight instead of 4) instead of written
        into its fp32 parameter; for pipelines in which no later pass writes the weights (the
        one-shot methods, up to ``range_code``)."""
        if recipe not in RECIPES:
            raise ConfigError(f"unknown one-shot recipe {recipe!r}; known: {sorted(RECIPES)}")
        options_for(options)  # an unknown option fails when the method is built
        self.recipe, self.options, self.hold_symbols = recipe, options, bool(hold_symbols)

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config
        chunk, tol = cfg.coding.chunk_size, cfg.cr_tolerance
        # Every block's budget, before any moves: its layers' bytes as rate_prefill left them.
        budgets: dict[int, float] = {}
        for node, site in weight_sites(gm):
            index = get_meta(node, Block).index
            budgets[index] = budgets.get(index, 0.0) + layer_bytes_at(gm.get_submodule(str(node.target)), site.param,
                                                                      1.0, chunk)
        order = sorted(budgets)
        blocks, layers, carry = [], {}, 0.0
        saved_flags = {id(p): p.requires_grad for p in gm.parameters()}
        try:
            for p in gm.parameters():
                p.requires_grad_(False)
            for prog, inputs, keep, advance in stream_blocks(gm, ctx.calib, torch.device(ctx.device),
                                                             cfg.reconstruction.max_samples):
                t0 = time.perf_counter()
                stats = block_hessians(prog, inputs, keep)
                budget = budgets[prog.block.index]
                later = order[order.index(prog.block.index):]
                share = budget / max(sum(budgets[i] for i in later), 1.0)  # this block's share of the drift
                target = min(max(budget - carry * share, 0.8 * budget), 1.25 * budget)
                runs: dict[float, list[dict[str, Any]]] = {}
                sizes: dict[float, int] = {}

                def total(t: float) -> int:
                    runs[t] = [self._solve_layer(st, 2.0 ** t, cfg) for st in stats]
                    sizes[t] = sum(r["nbytes"] for r in runs[t])
                    # Only the runs fit_log2_factor can still return keep their symbols: the latest,
                    # the largest under the target, the coarsest (a block's symbols per run: 8
                    # runs of the lm_head of a 32000-word vocabulary held 1 GB).
                    under = [x for x, b in sizes.items() if b <= target]
                    keep = {t, max(sizes)} | ({max(under, key=sizes.__getitem__)} if under else set())
                    for x in [x for x in runs if x not in keep]:
                        del runs[x]
                    return sizes[t]

                # The second probe from the first solve: a halving of every step costs about one
                # bit per weight that is not zero (numel / 8 bytes at no sparsity).
                first = total(0.0)
                if all(st.module.fixed for st in stats):
                    # Every grid is fixed (the compound methods, a user's bits): no factor moves
                    # the bytes, so one solve is the block's result.
                    t, nbytes = 0.0, first
                else:
                    coded = sum(int((r["_q"] != 0).sum()) for r in runs[0.0])
                    guess = (first - target * (1 - tol / 4)) * 8 / max(coded, 1)
                    second = min(max(guess, -2.0), 2.0) if abs(guess) > 1e-3 else None
                    t, nbytes = fit_log2_factor(lambda x: first if x == 0.0 else total(x), target,
                                                target * (1 - tol / 2), floor=-2.0, ceil=2.0, max_evals=8,
                                                second=second)
                for st, r in zip(stats, runs[t]):
                    self._install(st.module, r, self.hold_symbols)
                    layers[st.site.param] = {k: v for k, v in r.items() if not k.startswith("_")}
                advance()
                carry += nbytes - budget
                blocks.append({"index": prog.block.index, "name": prog.block.name, "budget_nbytes": budget,
                               "target_nbytes": target, "nbytes": nbytes, "factor": 2.0 ** t, "solves": len(sizes),
                               "seconds": time.perf_counter() - t0})
                ctx.log(self.name, f"block {prog.block.name}: {len(sizes)} solves, factor 2^{t:+.3f}")
        finally:
            for p in gm.parameters():
                p.requires_grad_(saved_flags.get(id(p), True))
        ctx.records[self.name] = {"recipe": self.recipe, "blocks": blocks, "layers": layers,
                                  "fallbacks": {k: v["fallback"] for k, v in layers.items() if v["fallback"]}}
        return PassResult(gm, True)

    def _solve_layer(self, st: LayerStats, factor: float, cfg) -> dict[str, Any]:
        """The recipe on one layer with its grid scaled by ``factor``: symbols, T and their bytes."""
        m, site = st.module, st.site
        intent = get_meta(st.node, LayerIntent)
        s, e = scaled(m, factor)
        s, e, _ = round_params(m.kind, s, e)  # the grid as the artifact stores it
        w = m.weight.detach()
        unsupported = _unsupported(m)
        reason = unsupported or st.reason
        recipe, loss = ("rtn" if reason else self.recipe), 0.0
        opts = options_for(self.options, cfg.method_options, intent.options)
        if not reason and (dense := dense_fallback(recipe, opts, w[0].numel())):
            recipe, reason = dense
        if unsupported:  # not a grid the recipes take: the module's own rounding on its scaled grid
            q = encode(w, m.kind, m.view(s), m.view(e), m.qmax)
        else:
            rows = w.shape[0]
            W2, w_hat = w.reshape(rows, -1), torch.empty(rows, w[0].numel())
            groups = 1 if st.hessians is None else st.hessians.shape[0]
            per = rows // groups
            for g in range(groups):
                sl = slice(g * per, (g + 1) * per)
                H = st.hessians[g] if st.hessians is not None else torch.eye(W2.shape[1], dtype=torch.float64)
                res = solve(recipe, W2[sl], H, _grid(m, s, e, sl), opts, layer=site.param)
                w_hat[sl] = res.w_hat
                loss += res.loss
                learnt = res.extra.get("grid")
                if learnt is not None:  # the recipe learnt its own steps (AdaQuant)
                    ls, le, _ = round_params(m.kind, learnt.step_s, learnt.threshold_e)
                    _put_rows(m, s, e, ls, le, sl)
            q = encode(w_hat.reshape(w.shape), m.kind, m.view(s), m.view(e), m.qmax)
        nbytes = predict_layer_nbytes(site.param, m.kind, q.cpu(), m.channel_axis, cfg.coding.chunk_size, s, e,
                                      m.group_size).total
        return {"recipe": recipe, "fallback": reason or "", "loss": loss, "nbytes": nbytes,
                "sparsity": float((q == 0).float().mean()), "_q": q, "_s": s, "_e": e}

    @staticmethod
    @torch.no_grad()
    def _install(m: TransformedWeight, r: dict[str, Any], hold: bool) -> None:
        """The layer's T and its weight at its symbols' level: range_code re-derives these symbols.
        ``hold`` (or a weight held already): held as the symbols, else written in fp32."""
        m.step_s.copy_(r["_s"])
        m.threshold_e.copy_(r["_e"])
        if hold or m.holds_symbols:
            m.hold_symbols(r["_q"])
        else:
            m.weight.copy_(inverse_t(r["_q"].to(torch.float32), m.kind, m.view(m.step_s), m.view(m.threshold_e)))

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            m = gm.get_submodule(str(node.target))
            if not (torch.isfinite(m.step_s).all() and (m.step_s > 0).all()):
                self.fail("a T parameter is not finite and > 0", node)
            with torch.no_grad():
                if not torch.equal(m(), m.weight):
                    self.fail("a weight is not a point of its grid", node)


def _put_rows(m: TransformedWeight, s: torch.Tensor, e: torch.Tensor, ls: torch.Tensor, le: torch.Tensor,
              rows: slice) -> None:
    """Writes learnt per-row (or per-group) steps into the layer's (s, e), in place."""
    if m.group_size is not None or s.numel() == m.weight.shape[0]:
        s[rows], e[rows] = ls.reshape(s[rows].shape), le.reshape(e[rows].shape)
    else:  # a per-tensor grid holds one step: the mean of the learnt ones
        s.fill_(float(ls.mean()))
        e.fill_(float(le.mean()))
