"""Optimal Brain Compression (Frantar & Alistarh, NeurIPS 2022): exact greedy OBS per row.

(Just past 400 lines: OBS pruning, its N:M and block variants and OBQ share the row-batched
inverse-Hessian updates, which one file keeps in one place.)

The layer loss ``tr(dW H dW^T)`` splits into one quadratic per row (all rows share ``H``), so
every row is compressed on its own, removing (or quantising) one weight at a time: the weight
``q`` with the smallest loss increase ``w_q^2 / [H_F^-1]_qq`` (OBS, Hassibi & Stork 1993; OBC
Eq. 2-3; ``F`` the row's remaining weights) is fixed, the remaining weights get the optimal
compensation ``w_F -= w_q / [H_F^-1]_qq * [H_F^-1]_{:,q}`` and the inverse Hessian drops ``q``:
``H_F^-1 -= [H_F^-1]_{:,q} [H_F^-1]_{q,:} / [H_F^-1]_qq`` (OBC Eq. 4). Rows are processed in
batches, vectorised over the batch as the reference's ``TrueOBS`` (``parallel`` rows at once).

Methods:

* :func:`obs_prune` with ``sparsity``: unstructured, with the reference's per-layer allocation:
  every row's greedy path is run to the end, its loss increments recorded, and the layer
  target of ``round(sparsity * rows * cols)`` weights is met by the smallest increments over all
  rows (OBC ``prepare_unstr``/``prune_blocked``). The increments along a path are often not
  monotone (measured: in most rows of random 64-column layers), and then the reference's count
  (how many of a row's raw increments are among the layer's smallest) charges the row the
  larger increments of its prefix too: e.g. for one weight it can pick the row whose *second*
  increment is smallest. So three allocations are computed, from the raw increments (the
  reference), their running maximum, and the slopes of each path's lower convex hull (each
  makes a row's selection a prefix, the hull's is optimal for the convexified paths), and the
  one with the smallest true total path loss is kept (``extra["allocation"]``). The running
  maximum alone already makes one weight the provably best single removal of the layer. The
  row's weights for its count are then solved exactly (:func:`refit_masked`), which is what the
  greedy path reaches (and what the reference stores as its trace), without storing
  ``rows * cols^2`` trace values.
* :func:`obs_prune` with ``prune_n``/``prune_m``: N:M per row (``prune_n`` kept of every
  ``prune_m`` consecutive columns): greedy removals restricted to groups not yet full, until
  every group has ``M - N`` removed (OBC ``nmprune``).
* :func:`obs_prune` with ``block=4`` (and ``sparsity``): 4-blocks of consecutive columns removed
  at once by the block OBS formulas (OBC Eq. 6: loss ``w_P^T ([H_F^-1]_PP)^-1 w_P``, update
  ``w -= [H_F^-1]_{:,P} ([H_F^-1]_PP)^-1 w_P``), with the same per-layer allocation.
* :func:`obq_quantize`: greedy OBQ (OBC Sec. 5): the weight whose rounding costs the least,
  ``(w_q - quant(w_q))^2 / [H_F^-1]_qq``, is quantised next and the rest compensate. As in the
  reference, a row holding a weight outside the grid's range (error above the in-range maximum
  ``max(e, s/2)``, from earlier compensation) quantises its largest-error weight first.

Implementation: the downdates are applied lazily. Within a super-step of ``_LAZY`` removals
the current row ``q`` of ``H_F^-1`` is the last exact ``H^-1`` row minus the pending rank-1
terms (a small matrix product), the diagonal is updated exactly, and at the end of the
super-step the pending terms are applied at once as a batched matrix product on the matrix
compacted to the remaining weights. Same arithmetic as the reference up to float rounding,
``O(rows * cols^3 / 3)`` flops as batched GEMMs instead of ``rows * cols`` memory-bound
rank-1 updates of the full matrix.

Cost and ``max_cost``: ``rows * cols^3``; see :data:`DEFAULT_MAX_COST` (5e12, ~90 s on this
CPU, 1 thread). A layer above ``max_cost`` is a :class:`SolverError` naming the layer and the
solver to use instead (SparseGPT for pruning, GPTQ for quantisation: ``cols^3 + rows cols^2``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from l2fx.errors import ConfigError, SolverError
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import check_layer, layer_loss, prepare_hessian, refit_masked
from l2fx.solvers.result import SolverResult
from l2fx.solvers._common import check_sparsity, pruned_count

__all__ = ["obs_prune", "obq_quantize", "DEFAULT_MAX_COST", "obs_cost"]

# Measured on this project's 2-core CPU, 1 thread, float32 (another job on the other core):
# obs_prune of 256x2304 (rows * cols^3 = 3.1e12, a ResNet-50 layer3 3x3 conv) took 57 s
# unstructured, 47 s 2:4, 69 s in 4-blocks, obq_quantize 61 s: ~5.5e10 cost units per second.
# The default bound, 5e12, is ~90 s of that: every ResNet-50 layer but layer4's 3x3 convs
# (512 x 4608 columns: 5.0e13, ~15 min), BERT-base's attention and FFN-in layers but not FFN-out
# (768 x 3072 columns: 2.2e13).
DEFAULT_MAX_COST = 5.0e12

_LAZY = 32  # removals per lazy super-step (columns for 1-blocks)
_BATCH_ELEMENTS = 1 << 28  # row batch: at most this many inverse-Hessian entries (1 GB float32)


def obs_cost(rows: int, cols: int) -> float:
    """``rows * cols^3``, the cost measure :data:`DEFAULT_MAX_COST` bounds."""
    return float(rows) * float(cols) ** 3


def _check_cost(rows: int, cols: int, max_cost: float, layer: str, instead: str) -> None:
    if not isinstance(max_cost, (int, float)) or isinstance(max_cost, bool) or max_cost <= 0:
        raise ConfigError(f"layer {layer!r}: max_cost must be a positive number, got {max_cost!r}")
    cost = obs_cost(rows, cols)
    if cost > max_cost:
        raise SolverError(f"layer {layer!r}: exact OBS costs rows*cols^3 = {cost:.3g} > max_cost={max_cost:.3g} "
                          f"({rows}x{cols}); use {instead} for this layer, or raise max_cost")


class _Workspace:
    """Buffers reused by every row batch of one solver call.

    On this machine (a VM) a fresh tensor costs a page fault per 4 KiB on first touch: a new
    1 GB tensor filled at ~1.5-2 GB/s, an existing one at ~14 GB/s (measured, 1 thread). The
    inverse-Hessian stacks are therefore views into two flat buffers that are allocated once.
    """

    def __init__(self, c: int, n: int, b: int, dtype: torch.dtype):
        self.stacks = [torch.empty(c * n * n, dtype=dtype), torch.empty(c * n * n, dtype=dtype)]
        self.rowbuf = torch.empty(n * n, dtype=dtype)
        self.ubuf = torch.empty(c * _LAZY * b * n, dtype=dtype)

    def stack(self, k: int, c: int, n: int) -> Tensor:
        return self.stacks[k][: c * n * n].view(c, n, n)


class _Greedy:
    """Greedy exact OBS on a batch of rows, removing ``b`` consecutive (compacted) columns per
    step (:meth:`remove`; the callers choose what to remove from :meth:`block_scores`).

    State: ``H`` ``[c, n, n]`` is ``H_F^-1`` of every row up to the pending downdates ``U``
    (``H_F^-1 = H - U^T U``); removed columns stay in ``H`` (their rows and columns of ``H_F^-1``
    are 0) until :meth:`compact` drops them, once a third of the columns are removed. Gathering
    the stack is ~10x slower per element than the downdate GEMM, so compacting after every lazy
    step (32 removals) made the gathers 80% of the time (measured: 256x2304 unstructured, 323 s
    of which 260 s in gathers, 1 thread); with a third, the GEMMs compute on ~1.4x the compacted
    size on average.
    """

    def __init__(self, w: Tensor, Hinv: Tensor, b: int, ws: _Workspace):
        self.c, self.n = w.shape
        self.b, self.ws, self.cur = b, ws, 0
        self.w = w
        self.H = ws.stack(0, self.c, self.n)
        for r in range(self.c):  # one copy per row: copy_ from an expanded view ran at ~0.7 GB/s
            self.H[r].copy_(Hinv)
        self.idx = torch.arange(self.n).expand(self.c, self.n).contiguous()  # original columns
        self.alive = torch.ones(self.c, self.n, dtype=torch.bool)
        self.ar = torch.arange(self.c)
        self.removed = 0  # columns removed since the last compaction (same for every row)
        self._new_u()
        self._read_diag()

    def _new_u(self):
        self.U = self.ws.ubuf[: self.c * _LAZY * self.b * self.n].view(self.c, _LAZY * self.b, self.n)
        self.t = 0  # pending rows in U

    def _read_diag(self):
        if self.b == 1:
            self.diag = self.H.diagonal(dim1=1, dim2=2).clone()
        else:
            nb = self.n // self.b
            blocks = self.H.reshape(self.c, nb, self.b, nb, self.b)
            self.dblk = blocks.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).clone()  # [c, nb, b, b]

    def _rows(self, cols: Tensor) -> Tensor:
        """Rows ``cols`` ``[c, b]`` of every row's ``H`` stack, ``[c, b, n]`` (contiguous copies)."""
        flat = (self.ar[:, None] * self.n + cols).reshape(-1)
        return self.H.view(self.c * self.n, self.n).index_select(0, flat).view(self.c, self.b, self.n)

    def remove(self, j: Tensor, target: Tensor) -> None:
        """Fix block ``j`` ``[c]`` (compacted block index) of every row to ``target`` ``[c, b]``
        and compensate the remaining weights (OBC Eq. 3 / Eq. 6)."""
        c, b, ar = self.c, self.b, self.ar
        cols = (j * b)[:, None] + torch.arange(b)[None, :]  # [c, b] compacted positions
        rows = self._rows(cols)  # [c, b, n]
        if self.t:
            Ut = self.U[:, : self.t]
            rows = rows - torch.bmm(torch.gather(Ut, 2, cols[:, None, :].expand(c, self.t, b)).transpose(1, 2), Ut)
        delta = torch.gather(self.w, 1, cols) - target
        if b == 1:
            d = rows[ar, 0, cols[:, 0]]
            self.w.sub_(rows[:, 0] * (delta[:, 0] / d)[:, None])
            u = rows / d.sqrt()[:, None, None]
        else:
            D = torch.gather(rows, 2, cols[:, None, :].expand(c, b, b))
            L, _ = torch.linalg.cholesky_ex(D)
            lam = torch.cholesky_solve(delta[:, :, None], L)  # [c, b, 1]
            self.w.sub_(torch.bmm(lam.transpose(1, 2), rows)[:, 0])
            u = torch.linalg.solve_triangular(L, rows, upper=False)
        self.w.scatter_(1, cols, target)
        self.U[:, self.t: self.t + b] = u
        self.t += b
        if b == 1:
            self.diag.sub_(u[:, 0].square())
        else:
            ub = u.reshape(c, b, self.n // b, b)
            self.dblk.sub_(torch.einsum("ckbi,ckbj->cbij", ub, ub))
        self.alive.scatter_(1, cols, False)
        self.removed += b
        if self.t == self.U.shape[1]:
            self.flush()
            if 3 * self.removed >= self.n:
                self.compact()

    def flush(self) -> None:
        """Apply the pending downdates: ``H -= U^T U`` (one batched GEMM)."""
        if self.t:
            Ut = self.U[:, : self.t]
            self.H.baddbmm_(Ut.transpose(1, 2), Ut, alpha=-1.0)
            self._new_u()
            self._read_diag()

    def compact(self) -> None:
        """Drop the removed columns (after :meth:`flush`)."""
        self.flush()
        if self.removed == 0:
            return
        n2 = self.n - self.removed
        keep = self.alive.nonzero()[:, 1].reshape(self.c, n2)
        Hk = self.ws.stack(1 - self.cur, self.c, n2)
        tmp = self.ws.rowbuf[: n2 * self.n].view(n2, self.n)
        for r in range(self.c):  # per row: index_select is 2-4x faster than one 3-index gather
            k = keep[r]
            torch.index_select(torch.index_select(self.H[r], 0, k, out=tmp), 1, k, out=Hk[r])
        self.H, self.cur = Hk, 1 - self.cur
        self.w = torch.gather(self.w, 1, keep)
        self.idx = torch.gather(self.idx, 1, keep)
        self.n, self.removed = n2, 0
        self.alive = torch.ones(self.c, n2, dtype=torch.bool)
        self._new_u()
        self._read_diag()

    def block_scores(self) -> Tensor:
        """OBS loss of removing each block now, ``[c, n/b]`` (inf for removed blocks)."""
        if self.b == 1:
            score = self.w.square() / self.diag
            return score.masked_fill_(~self.alive, math.inf)
        nb = self.n // self.b
        wb = self.w.reshape(self.c, nb, self.b, 1)
        alive_b = self.alive.reshape(self.c, nb, self.b)[:, :, 0]
        D = torch.where(alive_b[:, :, None, None], self.dblk, torch.eye(self.b, dtype=self.w.dtype))
        L, _ = torch.linalg.cholesky_ex(D)
        score = (wb * torch.cholesky_solve(wb, L)).sum((2, 3))
        # A block whose [H_F^-1]_PP lost definiteness to float rounding is never chosen.
        return score.nan_to_num_(nan=math.inf).masked_fill_(~alive_b, math.inf)


def _allocate(inc: Tensor, total: int) -> Tensor:
    """Per-row counts: how many of each row's increments are among the ``total`` smallest."""
    rows, steps = inc.shape
    if total == 0:
        return torch.zeros(rows, dtype=torch.int64)
    sel = torch.topk(inc.reshape(-1), total, largest=False, sorted=False).indices
    return torch.bincount(torch.div(sel, steps, rounding_mode="floor"), minlength=rows)


def _hull_slopes(path: Tensor) -> Tensor:
    """Per unit step, the slope of the lower convex hull of each row's ``(k, path[k])``
    (non-decreasing along the row), ``[rows, steps]``."""
    rows, n1 = path.shape
    out = torch.empty(rows, n1 - 1, dtype=torch.float64)
    p = path.tolist()
    for r in range(rows):
        y = p[r]
        hull = [0]
        for k in range(1, n1):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # drop b if it lies on or above the chord a -> k
                if (y[b] - y[a]) * (k - a) >= (y[k] - y[a]) * (b - a):
                    hull.pop()
                else:
                    break
            hull.append(k)
        for a, b in zip(hull, hull[1:]):
            out[r, a:b] = (y[b] - y[a]) / (b - a)
    return out


def _batch_rows(rows: int, n: int) -> int:
    return max(1, min(rows, _BATCH_ELEMENTS // (n * n)))


def _row_batches(rows: int, c: int):
    for r0 in range(0, rows, c):
        yield r0, min(rows, r0 + c)


def _prepare(W: Tensor, H: Tensor, percdamp: float):
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    w = W.to(dt).clone()
    Hd, dead = prepare_hessian(H.to(torch.float64), w, percdamp)
    L, info = torch.linalg.cholesky_ex(Hd)
    return w, Hd, L, int(info), dead


def _inverse(Hd: Tensor, L: Tensor, info: int, layer: str, dt: torch.dtype) -> Tensor:
    if info != 0:
        raise SolverError(f"layer {layer!r}: the damped Hessian is not positive definite; raise percdamp")
    return torch.cholesky_inverse(L).to(dt)


@torch.no_grad()
def obs_prune(W: Tensor, H: Tensor, *, sparsity: float | None = None, prune_n: int = 0, prune_m: int = 0,
              block: int = 1, percdamp: float = 0.01, max_cost: float = DEFAULT_MAX_COST,
              layer: str = "?") -> SolverResult:
    """Exact greedy OBS pruning of a layer (see the module docstring for the three modes).

    Give either ``sparsity`` (unstructured; with ``block=4`` in 4-blocks of consecutive columns,
    ``cols % 4 == 0``) or ``prune_n``/``prune_m`` (N:M, ``prune_n`` kept, ``block=1``). Returns
    ``w_hat`` (float32), ``mask`` (True = kept) and the loss; ``extra["row_loss"]`` (unstructured
    and blocked) is float64 ``[rows, steps + 1]``: each row's loss after removing ``k``
    weights/blocks along its greedy path (in the damped ``H``), ``extra["row_counts"]`` the
    weights removed per row and ``extra["allocation"]`` which allocation won.
    """
    rows, cols = check_layer(W, H, layer)
    nm = prune_n != 0 or prune_m != 0
    if nm == (sparsity is not None):
        raise ConfigError(f"layer {layer!r}: give exactly one of sparsity or prune_n/prune_m")
    check_sparsity(0.0 if sparsity is None else sparsity, prune_n, prune_m, cols, layer)
    if block not in (1, 4) or isinstance(block, bool):
        raise ConfigError(f"layer {layer!r}: block must be 1 or 4, got {block!r}")
    if block != 1 and nm:
        raise ConfigError(f"layer {layer!r}: N:M sparsity works on single weights (block=1)")
    if cols % block:
        raise SolverError(f"layer {layer!r}: block={block} needs cols divisible by {block}, the layer has {cols}")
    _check_cost(rows, cols, max_cost, layer, "sparsegpt()")
    w0, Hd, L, info, _ = _prepare(W, H, percdamp)
    dt = w0.dtype
    Hinv = _inverse(Hd, L, info, layer, dt)
    b = block
    nblocks = cols // b
    cb = _batch_rows(rows, cols)
    ws = _Workspace(cb, cols, b, dt)
    if nm:
        w_hat = torch.zeros(rows, cols, dtype=dt)
        mask = torch.ones(rows, cols, dtype=torch.bool)
        per_group = prune_m - prune_n
        steps = cols // prune_m * per_group
        for r0, r1 in _row_batches(rows, cb):
            c = r1 - r0
            g = _Greedy(w0[r0:r1].clone(), Hinv, 1, ws)
            removed = torch.zeros(c, cols // prune_m, dtype=torch.int64)
            for _ in range(steps):
                score = g.block_scores()
                full = torch.gather(removed, 1, torch.div(g.idx, prune_m, rounding_mode="floor")) >= per_group
                j = score.masked_fill_(full, math.inf).argmin(1)
                orig = g.idx[g.ar, j]
                removed[g.ar, torch.div(orig, prune_m, rounding_mode="floor")] += 1
                mask[r0 + g.ar, orig] = False
                g.remove(j, torch.zeros(c, 1, dtype=dt))
            g.compact()
            w_hat[r0:r1].scatter_(1, g.idx, g.w)
        w_hat = w_hat.to(torch.float32)
        return SolverResult(w_hat=w_hat, symbols=None, mask=mask, loss=layer_loss(W, w_hat, H))

    # Unstructured / blocked: full greedy paths, then the per-layer allocation.
    inc = torch.zeros(rows, nblocks, dtype=torch.float64)
    order = torch.zeros(rows, nblocks, dtype=torch.int64)  # original block index removed at step k
    for r0, r1 in _row_batches(rows, cb):
        c = r1 - r0
        g = _Greedy(w0[r0:r1].clone(), Hinv, b, ws)
        for k in range(nblocks):
            score = g.block_scores()
            j = score.argmin(1)
            inc[r0:r1, k] = score[g.ar, j].double()
            order[r0:r1, k] = torch.div(g.idx[g.ar, j * b], b, rounding_mode="floor")
            g.remove(j, torch.zeros(c, b, dtype=dt))
    total = pruned_count(sparsity, rows * nblocks)  # weights (blocks of b) removed in the layer
    path = torch.cat([torch.zeros(rows, 1, dtype=torch.float64), inc.cumsum(1)], 1)  # [rows, steps + 1]
    best = None
    for name, cand in (("reference", inc), ("running_max", inc.cummax(1).values), ("hull", _hull_slopes(path))):
        cnt = _allocate(cand, total)
        cost = float(path[torch.arange(rows), cnt].sum())
        if best is None or cost < best[0]:
            best = (cost, name, cnt)
    _, allocation, counts = best
    pruned_blocks = torch.arange(nblocks)[None, :] < counts[:, None]  # in path order
    mask_b = torch.ones(rows, nblocks, dtype=torch.bool)
    mask_b.scatter_(1, order, ~pruned_blocks)
    mask = mask_b.repeat_interleave(b, dim=1)
    w_hat = refit_masked(W, H, mask, percdamp=percdamp, layer=layer, dtype=dt).to(torch.float32)
    return SolverResult(w_hat=w_hat, symbols=None, mask=mask, loss=layer_loss(W, w_hat, H),
                        extra={"row_loss": path, "row_counts": counts * b, "allocation": allocation})


@torch.no_grad()
def obq_quantize(W: Tensor, H: Tensor, grid: Grid, *, percdamp: float = 0.01, max_cost: float = DEFAULT_MAX_COST,
                 layer: str = "?") -> SolverResult:
    """Greedy OBQ quantisation of a layer on ``grid`` (see the module docstring).

    Returns ``w_hat == grid.decode(symbols)`` bit for bit and the loss.
    """
    rows, cols = check_layer(W, H, layer)
    if not isinstance(grid, Grid):
        raise ConfigError(f"layer {layer!r}: grid must be a Grid, got {type(grid).__name__}")
    grid.check(rows, cols, layer)
    _check_cost(rows, cols, max_cost, layer, "gptq()")
    w0, Hd, L, info, _ = _prepare(W, H, percdamp)
    dt = w0.dtype
    Hinv = _inverse(Hd, L, info, layer, dt)
    symbols = torch.zeros(rows, cols, dtype=torch.int16)
    cb = _batch_rows(rows, cols)
    ws = _Workspace(cb, cols, 1, dt)
    s_full, e_full = grid.expand(cols)
    outlier = torch.maximum(e_full, 0.5 * s_full).square().to(dt)  # largest in-range squared error
    for r0, r1 in _row_batches(rows, cb):
        g = _Greedy(w0[r0:r1].clone(), Hinv, 1, ws)
        ri = torch.arange(r0, r1)
        out_c = outlier[r0:r1]
        for _ in range(cols):
            q, sym = grid.quantize_gathered(g.w, g.idx, ri)
            err = (g.w - q).square_().masked_fill_(~g.alive, 0.0)
            score = (err / g.diag).masked_fill_(~g.alive, math.inf)
            j = score.argmin(1)
            far = (err > torch.gather(out_c, 1, g.idx)).any(1)
            if bool(far.any()):
                j = torch.where(far, err.argmax(1), j)
            symbols[ri, g.idx[g.ar, j]] = sym[g.ar, j]
            g.remove(j, q[g.ar, j][:, None].to(dt))
    w_hat = grid.decode(symbols)
    return SolverResult(w_hat=w_hat, symbols=symbols, mask=None, loss=layer_loss(W, w_hat, H))
