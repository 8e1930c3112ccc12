"""l2fx.solvers.grid: the quantiser every quantising solver uses."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError, SolverError
from l2fx.solvers.grid import Grid
from l2fx.transform import TransformKind
from solver_layers import assert_symbols_decode, make_grid


def _weights(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))


grids = st.fixed_dictionaries({
    "bits": st.integers(2, 7),
    "symmetric": st.booleans(),
    "group_size": st.one_of(st.none(), st.integers(1, 9)),
    "kind": st.sampled_from([TransformKind.LINEAR, TransformKind.JOINT]),
})


@given(cfg=grids, rows=st.integers(1, 5), cols=st.integers(1, 20), seed=st.integers(0, 2**16),
       dead_zone=st.floats(1.0, 2.5))
def test_quantize_is_a_projection_and_decodes_exactly(cfg, rows, cols, seed, dead_zone):
    W = _weights(rows, cols, seed)
    grid = make_grid(W, dead_zone=dead_zone, **cfg)
    w_hat, sym = grid.quantize_all(W)
    assert_symbols_decode(grid, sym, w_hat)
    again, sym2 = grid.quantize_all(w_hat)  # T^-1(round(T(.))) is a projection
    assert torch.equal(again, w_hat) and torch.equal(sym2, sym)


@given(cfg=grids, cols=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_column_and_slice_paths_agree_with_whole_matrix(cfg, cols, seed):
    W = _weights(3, cols, seed)
    grid = make_grid(W, **cfg)
    w_hat, sym = grid.quantize_all(W)
    for c in range(cols):
        q, s = grid.quantize(W[:, c].clone(), c)
        assert torch.equal(q, w_hat[:, c]) and torch.equal(s, sym[:, c])
    start = cols // 3
    q, s = grid.quantize(W[:, start:].clone(), start)
    assert torch.equal(q, w_hat[:, start:]) and torch.equal(s, sym[:, start:])
    q, s = grid.quantize_gathered(W.flip(1), torch.arange(cols).flip(0).expand(3, cols))
    assert torch.equal(q, w_hat.flip(1)) and torch.equal(s, sym.flip(1))


@given(bits=st.integers(1, 7), rows=st.integers(1, 4), cols=st.integers(1, 20), seed=st.integers(0, 2**16),
       group_size=st.one_of(st.none(), st.integers(1, 8)))
def test_asymmetric_minmax_is_gptqs_quantizer(bits, rows, cols, seed, group_size):
    """GPTQ's s * (clamp(round(w/s) + z, 0, maxq) - z) with s = (max - min)/maxq, z = round(-min/s)."""
    W = _weights(rows, cols, seed)
    grid = Grid.minmax(W, bits, symmetric=False, group_size=group_size)
    maxq = 2**bits - 1
    g = group_size or cols
    ref = torch.empty_like(W)
    for c0 in range(0, cols, g):
        x = W[:, c0:c0 + g]
        xmin = x.amin(1).clamp(max=0)
        xmax = x.amax(1).clamp(min=0)
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1.0, 1.0
        s = (xmax - xmin) / maxq
        z = torch.round(-xmin / s)
        q = torch.clamp(torch.round(x / s[:, None]) + z[:, None], 0, maxq)
        ref[:, c0:c0 + g] = s[:, None] * (q - z[:, None])
    w_hat, sym = grid.quantize_all(W)
    torch.testing.assert_close(w_hat, ref, rtol=0, atol=float(grid.step_s.max()) * 1e-6)
    assert_symbols_decode(grid, sym, w_hat)
    # every weight is inside the min-max range: the error is at most half a step
    s_full, _ = grid.expand(cols)
    assert bool(((W - w_hat).abs() <= 0.5 * s_full * (1 + 1e-5)).all())


def test_symmetric_minmax_bounds_and_from_scale_zero():
    W = _weights(4, 9, 0)
    g = Grid.minmax(W, 8)
    assert int(g.qmax) == 127 and int(g.qmin) == -127
    torch.testing.assert_close(g.step_s, W.abs().amax(1) / 127)
    gptq_sym = Grid.from_scale_zero(2 * W.abs().amax(1) / 15, torch.full((4,), 8), 4)
    assert gptq_sym.bounds(9)[0].unique().tolist() == [-8] and gptq_sym.bounds(9)[1].unique().tolist() == [7]
    assert math.isclose(float(Grid.minmax(torch.zeros(2, 3), 4).step_s[0]), 1 / 7, rel_tol=1e-6)


def test_bad_grids():
    W = _weights(2, 4, 0)
    with pytest.raises(ConfigError):
        Grid.minmax(W, 8, symmetric=False)  # symbols would leave [-127, 127]
    with pytest.raises(ConfigError):
        Grid.minmax(W, 1)
    with pytest.raises(ConfigError):
        Grid.from_steps(torch.ones(2), qmax=200)
    with pytest.raises(ConfigError):
        Grid.from_steps(torch.ones(2), qmax=3, qmin=1)  # 0 must be a level
    with pytest.raises(ConfigError):
        Grid.from_steps(-torch.ones(2), qmax=3)
    with pytest.raises(ConfigError):
        Grid.from_steps(torch.ones(2), qmax=3, kind=TransformKind.LOG)
    with pytest.raises(ConfigError):
        Grid.from_steps(torch.ones(2, 3), qmax=3)  # 2-D steps need group_size
    g = Grid.minmax(W, 4, group_size=3)
    with pytest.raises(SolverError, match="fc"):
        g.check(2, 7, "fc")  # 7 columns need 3 groups of 3
    with pytest.raises(SolverError, match="fc"):
        g.check(3, 4, "fc")


def test_ties_round_half_to_even_like_encode():
    """The per-column path rounds like l2fx.transform.encode (torch.round: half to even)."""
    step = torch.tensor([0.25, 1.0])
    grid = Grid.from_steps(step, qmax=7)
    t = torch.arange(-8.0, 8.5, 0.5)
    W = t[None, :] * step[:, None]
    _, sym = grid.quantize_all(W)
    assert torch.equal(sym, torch.round(t).clamp(-7, 7).to(torch.int16).expand(2, -1))
