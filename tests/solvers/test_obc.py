"""l2fx.solvers.obc: exact OBS against brute force, structure of the masks, OBQ, max_cost."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError, SolverError
from l2fx.solvers._common import pruned_count
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import layer_loss, prepare_hessian
from l2fx.solvers.obc import obq_quantize, obs_prune
from l2fx.solvers.sparsegpt import sparsegpt
from l2fx.transform import TransformKind
from solver_layers import assert_symbols_decode, correlated_layer, make_grid


def brute_force_single_removal(W, H):
    """For every weight (r, q): the best compensation of row r with w_q = 0 by least squares on
    ||L^T (w' - w)||^2 (H = L L^T). Returns (loss, r, q, row) of the best candidate."""
    A = torch.linalg.cholesky(H).T  # ||A d||^2 = d^T H d
    best = None
    for r in range(W.shape[0]):
        for q in range(W.shape[1]):
            S = [j for j in range(W.shape[1]) if j != q]
            # d_q = -w_q, minimise ||A[:, S] d_S - A[:, q] w_q||
            d_S = torch.linalg.lstsq(A[:, S], (A[:, q] * W[r, q])[:, None]).solution[:, 0]
            d = torch.zeros(W.shape[1], dtype=W.dtype)
            d[S], d[q] = d_S, -W[r, q]
            loss = float(d @ H @ d)
            if best is None or loss < best[0]:
                best = (loss, r, q, W[r] + d)
    return best


@given(rows=st.integers(1, 8), cols=st.integers(2, 16), seed=st.integers(0, 2**16))
def test_first_greedy_step_equals_brute_force(rows, cols, seed):
    """Removing one weight of the layer: OBS's closed form is exact for a single removal, and the
    per-layer allocation must pick the globally cheapest row, so the solver is optimal."""
    W, H, _ = correlated_layer(rows, cols, seed, dtype=torch.float64)
    res = obs_prune(W, H, sparsity=1.0 / (rows * cols), percdamp=0.0)
    loss, r, q, row = brute_force_single_removal(W, H)
    assert int((~res.mask).sum()) == 1 and not bool(res.mask[r, q])
    assert res.loss == pytest.approx(loss, rel=1e-5, abs=1e-9)
    torch.testing.assert_close(res.w_hat[r].double(), row, rtol=1e-5, atol=1e-6)
    others = [i for i in range(rows) if i != r]
    assert torch.equal(res.w_hat[others], W[others].float())


@given(rows=st.integers(1, 6), cols=st.integers(1, 24), sparsity=st.floats(0.0, 1.0), block=st.sampled_from([1, 4]),
       seed=st.integers(0, 2**16))
def test_unstructured_and_blocked_sparsity_is_exact(rows, cols, sparsity, block, seed):
    cols = cols * block
    W, H, _ = correlated_layer(rows, cols, seed, dtype=torch.float64)
    res = obs_prune(W, H, sparsity=sparsity, block=block)
    blocks = res.mask.reshape(rows, cols // block, block)
    assert bool((blocks == blocks[:, :, :1]).all())  # whole 4-blocks
    assert int((~blocks[:, :, 0]).sum()) == pruned_count(sparsity, rows * cols // block)
    assert bool((res.w_hat[~res.mask] == 0).all())
    # The row paths are exact: the loss (in the damped H) of the refit weights is the sum of the
    # path increments up to each row's count.
    Hd, _ = prepare_hessian(H, W.clone(), 0.01)
    path = res.extra["row_loss"][torch.arange(rows), res.extra["row_counts"] // block].sum()
    assert layer_loss(W, res.w_hat.double(), Hd) == pytest.approx(float(path), rel=1e-4, abs=1e-6)


@given(nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (1, 4)]), groups=st.integers(1, 5), rows=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_nm_keeps_exactly_n_per_group(nm, groups, rows, seed):
    n, m = nm
    W, H, _ = correlated_layer(rows, groups * m, seed)
    res = obs_prune(W, H, prune_n=n, prune_m=m)
    assert bool((res.mask.reshape(rows, groups, m).sum(2) == n).all())
    assert bool((res.w_hat[~res.mask] == 0).all())


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(prune_n=2, prune_m=4), dict(sparsity=0.5, block=4)])
def test_exact_obs_beats_sparsegpt_in_aggregate(kw):
    """Row-wise exact OBS revisits the whole row at every step where SparseGPT fixes columns in
    order; both are greedy, so only the aggregate is asserted."""
    total_o, total_s, wins = 0.0, 0.0, 0
    for seed in range(6):
        W, H, _ = correlated_layer(12, 32, seed)
        o = obs_prune(W, H, **kw).loss
        s = sparsegpt(W, H, **{k: v for k, v in kw.items() if k != "block"}).loss if "block" not in kw else \
            layer_loss(W, W * _magnitude_blocks(W, 4, kw["sparsity"]), H)
        wins += o < s
        total_o, total_s = total_o + o, total_s + s
    assert wins >= 5 and total_o < total_s


def _magnitude_blocks(W, b, sparsity):
    norms = W.reshape(W.shape[0], -1, b).norm(dim=2)
    k = pruned_count(sparsity, norms.numel())
    keep = torch.ones(norms.numel(), dtype=torch.bool)
    keep[torch.argsort(norms.reshape(-1))[:k]] = False
    return keep.reshape(norms.shape).repeat_interleave(b, dim=1)


@given(rows=st.integers(1, 5), cols=st.integers(1, 16), seed=st.integers(0, 2**16),
       kind=st.sampled_from([TransformKind.LINEAR, TransformKind.JOINT]), symmetric=st.booleans(),
       group_size=st.one_of(st.none(), st.integers(1, 6)))
def test_obq_symbols_decode(rows, cols, seed, kind, symmetric, group_size):
    W, H, _ = correlated_layer(rows, cols, seed)
    grid = make_grid(W, 3, symmetric, group_size, kind, dead_zone=1.3)
    res = obq_quantize(W, H, grid)
    assert_symbols_decode(grid, res.symbols, res.w_hat)


def test_obq_beats_rtn_in_aggregate():
    total_o, total_r, wins = 0.0, 0.0, 0
    for seed in range(8):
        W, H, _ = correlated_layer(12, 32, seed)
        grid = Grid.minmax(W, 3)
        o = obq_quantize(W, H, grid).loss
        r = layer_loss(W, grid.quantize_all(W)[0], H)
        wins += o < r
        total_o, total_r = total_o + o, total_r + r
    assert wins >= 7 and total_o < 0.8 * total_r


def test_obc_bad_input_names_the_layer():
    W, H, _ = correlated_layer(4, 10, 0)
    with pytest.raises(SolverError, match=r"conv3.*sparsegpt"):
        obs_prune(W, H, sparsity=0.5, max_cost=100.0, layer="conv3")
    with pytest.raises(SolverError, match=r"conv3.*gptq"):
        obq_quantize(W, H, Grid.minmax(W, 4), max_cost=100.0, layer="conv3")
    with pytest.raises(SolverError, match=r"conv3.*prune_m"):
        obs_prune(W, H, prune_n=2, prune_m=4, layer="conv3")
    with pytest.raises(SolverError, match=r"conv3.*block"):
        obs_prune(W, H, sparsity=0.5, block=4, layer="conv3")
    with pytest.raises(ConfigError, match="conv3"):
        obs_prune(W, H, layer="conv3")  # neither sparsity nor N:M
    with pytest.raises(ConfigError, match="conv3"):
        obs_prune(W, H[:, :9], sparsity=0.5, layer="conv3")
