"""GPTQ (Frantar et al., ICLR 2023): one-shot quantisation of a layer with OBS compensation.

Columns are quantised one at a time, in order (or by decreasing ``H_jj`` with ``act_order``).
After column ``i`` is rounded to ``q_i``, the not yet quantised columns absorb the error by the
OBS update ``W[:, F] -= (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_{i,F}`` (GPTQ Eq. 2 with ``F`` the
remaining columns), which minimises ``tr(dW H dW^T)`` over them. The paper's two speed-ups are
used: the rows of every ``H_F^-1`` are the rows of the upper Cholesky factor of ``H^-1``
(Sec. 3, "Cholesky Reformulation"), and updates to columns beyond the current block of
``blocksize`` are applied once per block as a matrix product ("Lazy Batch-Updates").

Pre: ``W`` ``[rows, cols]``, ``H`` ``[cols, cols]`` positive semi-definite, a :class:`Grid` for the
layer. Post: ``w_hat == grid.decode(symbols)`` bit for bit, symbols within the grid's bounds.

Cost: ``O(cols^3)`` for the factorisation plus ``O(rows * cols^2)`` for the updates. Measured on
this project's 2-core CPU (shared: load average 4-5 from other jobs), 4096x4096 given its H,
4-bit per row, float32 W, float64 H: 5.6 s with 1 thread (2.0 s of it the float64 loss, 1.8 s
the factorisation), 9.7 s with 2 threads (the sweep's many small parallel regions then wait for
a descheduled thread), 7.2 s with act_order and groups of 128 (1 thread).
"""
from __future__ import annotations

import torch
from torch import Tensor

from l2fx.errors import ConfigError
from l2fx.solvers._common import check_blocksize
from l2fx.solvers._sweep import column_sweep
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import _factor_dtype, check_layer, inverse_cholesky, layer_loss, prepare_hessian
from l2fx.solvers.result import SolverResult

__all__ = ["gptq"]


@torch.no_grad()
def gptq(W: Tensor, H: Tensor, grid: Grid, *, blocksize: int = 128, percdamp: float = 0.01,
         act_order: bool = False, layer: str = "?") -> SolverResult:
    """Quantise ``W`` on ``grid`` by GPTQ. Returns a :class:`SolverResult` with ``symbols``.

    * ``blocksize``: columns per lazy batch (128 in the paper; any value gives the same result
      up to float rounding).
    * ``percdamp``: damping ``percdamp * mean(diag H)`` (:func:`prepare_hessian`).
    * ``act_order``: process columns by decreasing ``H_jj`` (the reference's ``--act-order``).
      The grid's groups stay those of the original column index, as the reference's
      ``static_groups`` does: the grid is fixed before the solver runs.

    Arithmetic is in float32 (float64 if ``W`` is float64); the Cholesky factorisation in float64
    when ``H`` or ``W`` is float64. ``extra``: ``perm`` (act-order column order, a LongTensor, or
    None) and ``dead`` (number of inputs with ``H_jj = 0``, whose weights become 0).
    """
    rows, cols = check_layer(W, H, layer)
    if not isinstance(grid, Grid):
        raise ConfigError(f"layer {layer!r}: grid must be a Grid, got {type(grid).__name__}")
    grid.check(rows, cols, layer)
    check_blocksize(blocksize, layer)
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    # The working copy, transposed: columns are rows of Wt, contiguous for the per-column work
    # (one copy of W; prepare_hessian zeroes the dead columns through the transposed view).
    Wt = W.to(dt).t().clone(memory_format=torch.contiguous_format)
    Hd, dead = prepare_hessian(H.to(_factor_dtype(H, W)), Wt.t(), percdamp)
    perm = None
    if act_order:
        perm = torch.argsort(Hd.diagonal(), descending=True, stable=True)
        Wt, Hd = Wt[perm], Hd[perm][:, perm]
        original = perm.tolist()
    else:
        original = list(range(cols))
    U = inverse_cholesky(Hd, layer, percdamp).to(dt)
    del Hd
    Qt = torch.empty(cols, rows, dtype=torch.float32)
    St = torch.empty(cols, rows, dtype=torch.int16)

    def column(i: int, w: Tensor) -> Tensor:
        q, sym = grid.quantize(w, original[i])
        Qt[i], St[i] = q, sym
        return q

    column_sweep(Wt, U, blocksize, column)
    del Wt, U
    w_hat, symbols = Qt.t(), St.t()
    if perm is not None:
        inv = torch.argsort(perm)
        w_hat, symbols = w_hat[:, inv], symbols[:, inv]
    w_hat, symbols = w_hat.contiguous(), symbols.contiguous()
    return SolverResult(w_hat=w_hat, symbols=symbols, mask=None, loss=layer_loss(W, w_hat, H),
                        extra={"perm": perm, "dead": int(dead.sum())})
