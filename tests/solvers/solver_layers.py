"""Layers with correlated calibration inputs for the solver tests (helpers, no global state).

Imported by the tests of this folder as ``from solver_layers import ...`` (pytest puts this
folder on ``sys.path``: it has no ``__init__.py``).
"""
import math

import torch

from l2fx.solvers.grid import Grid
from l2fx.transform import TransformKind, inverse_t


def correlated_layer(rows: int, cols: int, seed: int, *, n: int | None = None, dtype=torch.float32,
                     dead: int = 0):
    """``(W, H, X)``: W ``[rows, cols]`` in ``dtype``, H = 2 X^T X / n in float64.

    The inputs mix a few shared factors into every feature (correlation ~0.5 between columns)
    plus per-feature noise and scale, the regime where OBS-type compensation helps. The first
    ``dead`` inputs are always 0 (H_jj = 0).
    """
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * cols
    factors = torch.randn(n, max(1, cols // 4), generator=g, dtype=torch.float64)
    mix = torch.randn(factors.shape[1], cols, generator=g, dtype=torch.float64)
    scale = torch.exp(0.5 * torch.randn(cols, generator=g, dtype=torch.float64))
    X = (factors @ mix / math.sqrt(factors.shape[1]) + torch.randn(n, cols, generator=g, dtype=torch.float64)) * scale
    X[:, :dead] = 0.0
    H = 2.0 * X.T @ X / n
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    return W, H, X


def make_grid(W, bits, symmetric, group_size, kind, dead_zone=1.0):
    """Min-max grid; for JOINT, ``e = dead_zone * s / 2`` (1.0: no dead zone)."""
    g = Grid.minmax(W, bits, symmetric=symmetric, group_size=group_size, kind=kind)
    if kind is TransformKind.JOINT and dead_zone != 1.0:
        g = g.replace(threshold_e=0.5 * dead_zone * g.step_s)
    return g


def assert_symbols_decode(grid, symbols, w_hat):
    """Symbols lie in the grid's bounds and decode to w_hat bit for bit through inverse_t."""
    assert symbols.dtype == torch.int16
    lo, hi = grid.bounds(symbols.shape[1])
    assert bool((symbols.int() >= lo).all()) and bool((symbols.int() <= hi).all())
    assert bool((symbols.abs() <= 127).all())
    s, e = grid.expand(symbols.shape[1])
    decoded = inverse_t(symbols.to(torch.float32), grid.kind, s, e)
    assert torch.equal(decoded, w_hat)
