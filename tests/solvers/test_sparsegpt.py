"""l2fx.solvers.sparsegpt: exact sparsity, N:M groups, joint quantisation, loss vs magnitude."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError, SolverError
from l2fx.solvers._common import pruned_count
from l2fx.solvers.gptq import gptq
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import layer_loss
from l2fx.solvers.sparsegpt import sparsegpt
from l2fx.solvers.wanda import magnitude_mask
from l2fx.transform import TransformKind
from solver_layers import assert_symbols_decode, correlated_layer, make_grid


@given(rows=st.integers(1, 6), cols=st.integers(1, 40), sparsity=st.floats(0.0, 1.0),
       blocksize=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_unstructured_sparsity_is_exact_per_layer(rows, cols, sparsity, blocksize, seed):
    W, H, _ = correlated_layer(rows, cols, seed)
    res = sparsegpt(W, H, sparsity=sparsity, blocksize=blocksize)
    assert int((~res.mask).sum()) == pruned_count(sparsity, rows * cols)
    assert bool((res.w_hat[~res.mask] == 0).all())
    assert res.symbols is None
    assert res.loss == pytest.approx(layer_loss(W, res.w_hat, H))


@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]), groups=st.integers(1, 6),
       rows=st.integers(1, 5), seed=st.integers(0, 2**16), quantise=st.booleans())
def test_nm_keeps_exactly_n_per_group(nm, groups, rows, seed, quantise):
    n, m = nm
    W, H, _ = correlated_layer(rows, groups * m, seed)
    grid = Grid.minmax(W, 4) if quantise else None
    res = sparsegpt(W, H, prune_n=n, prune_m=m, grid=grid, blocksize=2 * m)
    kept = res.mask.reshape(rows, groups, m).sum(2)
    assert bool((kept == n).all())
    assert bool((res.w_hat[~res.mask] == 0).all())


@given(rows=st.integers(1, 5), cols=st.integers(2, 30), sparsity=st.floats(0.1, 0.9), seed=st.integers(0, 2**16),
       kind=st.sampled_from([TransformKind.LINEAR, TransformKind.JOINT]), symmetric=st.booleans(),
       group_size=st.one_of(st.none(), st.integers(1, 8)))
def test_joint_mode_symbols_decode_and_pruned_are_zero(rows, cols, sparsity, seed, kind, symmetric, group_size):
    W, H, _ = correlated_layer(rows, cols, seed)
    grid = make_grid(W, 3, symmetric, group_size, kind, dead_zone=1.5)
    res = sparsegpt(W, H, sparsity=sparsity, grid=grid, blocksize=8)
    assert_symbols_decode(grid, res.symbols, res.w_hat)
    assert bool((res.symbols[~res.mask] == 0).all())


def test_zero_sparsity_with_grid_is_gptq():
    W, H, _ = correlated_layer(8, 40, 3)
    grid = Grid.minmax(W, 3, group_size=16)
    a = sparsegpt(W, H, sparsity=0.0, grid=grid, blocksize=16)
    b = gptq(W, H, grid, blocksize=16)
    assert torch.equal(a.w_hat, b.w_hat) and torch.equal(a.symbols, b.symbols)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(prune_n=2, prune_m=4)])
def test_sparsegpt_beats_magnitude_in_aggregate(kw):
    """The mask and the compensation are greedy (the saliency uses the inverse Hessian of the
    columns not yet pruned), so a single seed may lose to magnitude pruning; in total it wins."""
    wins, total_s, total_m = 0, 0.0, 0.0
    for seed in range(10):
        W, H, _ = correlated_layer(16, 64, seed)
        s = sparsegpt(W, H, **kw).loss
        mask = magnitude_mask(W, **kw)
        m = layer_loss(W, W * mask, H)
        wins += s < m
        total_s, total_m = total_s + s, total_m + m
    assert wins >= 8
    assert total_s < 0.8 * total_m


def test_sparsegpt_bad_input_names_the_layer():
    W, H, _ = correlated_layer(4, 10, 0)
    with pytest.raises(SolverError, match=r"mlp\.up.*prune_m"):
        sparsegpt(W, H, prune_n=2, prune_m=4, layer="mlp.up")
    with pytest.raises(ConfigError, match=r"mlp\.up"):
        sparsegpt(W, H, prune_n=4, prune_m=4, layer="mlp.up")
    with pytest.raises(ConfigError, match=r"mlp\.up"):
        sparsegpt(W, H, sparsity=1.5, layer="mlp.up")
    W8, H8, _ = correlated_layer(4, 8, 0)
    with pytest.raises(ConfigError, match=r"mlp\.up"):
        sparsegpt(W8, H8, prune_n=2, prune_m=4, blocksize=6, layer="mlp.up")
