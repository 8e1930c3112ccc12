"""The column sweep GPTQ and SparseGPT share (GPTQ Algorithm 1; SparseGPT Algorithm 1).

Columns ``0..cols-1`` (rows of the transposed weight ``Wt [cols, rows]``) are fixed in order. For
column ``i`` a callback returns its fixed value ``q_i``; the sweep then applies the OBS update of
the later columns, ``Wt[j] -= U[i, j] / U[i, i] * (w_i - q_i)`` for ``j > i``, with ``U`` the upper
Cholesky factor of ``H^-1`` (:func:`l2fx.solvers.hessian.inverse_cholesky`).

Updates are lazy at two levels: inside a sub-block of ``sub`` columns as rank-1 updates, then once
per sub-block for the rest of the block and once per block (``blocksize``) for the rest of the
matrix, as matrix products. The result equals the column-by-column update up to float rounding.
Why two levels: the rank-1 updates of a 128-column block (up to 127 x rows elements) run
multi-threaded, and with 2 threads on this shared 2-core CPU every parallel region between the
per-column operations cost ~0.7 ms of scheduling. Rank-1 updates inside an 8-column sub-block
stay below torch's parallel grain (32768 elements) for rows <= 4096 and leave 1/8 as many
parallel regions (GPTQ 4096x4096 with 2 threads: 18 s before, 10.5 s after; 6.6 s and 5.9 s with
1 thread).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


@torch.no_grad()
def column_sweep(Wt: Tensor, U: Tensor, blocksize: int, column: Callable[[int, Tensor], Tensor],
                 block_start: Callable[[int, int], None] | None = None, sub: int = 8) -> None:
    """Run the sweep in place on ``Wt``. ``column(i, w_i)`` returns ``q_i`` (any float dtype);
    ``block_start(i1, i2)`` runs before each block, when ``Wt[i1:i2]`` is up to date. When
    ``column`` is called for ``i``, the rows ``Wt[i .. end of i's sub-block]`` are up to date."""
    cols, rows = Wt.shape
    diag = U.diagonal().tolist()
    E = torch.empty(min(blocksize, cols), rows, dtype=Wt.dtype)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if block_start is not None:
            block_start(i1, i2)
        for j1 in range(i1, i2, sub):
            j2 = min(j1 + sub, i2)
            for i in range(j1, j2):
                w = Wt[i]
                q = column(i, w)
                err = E[i - i1]
                torch.sub(w, q, out=err)
                err.div_(diag[i])
                if i + 1 < j2:
                    Wt[i + 1:j2].addr_(U[i, i + 1:j2], err, alpha=-1.0)
            if j2 < i2:
                Wt[j2:i2].addmm_(U[j1:j2, j2:i2].t(), E[j1 - i1:j2 - i1], alpha=-1.0)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E[: i2 - i1], alpha=-1.0)
