"""l2fx.solvers.wanda: Wanda and magnitude masks."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError, SolverError
from l2fx.solvers._common import pruned_count
from l2fx.solvers.hessian import layer_loss
from l2fx.solvers.wanda import magnitude_mask, wanda, wanda_mask
from solver_layers import correlated_layer


def _per_row_magnitude(W, sparsity):
    """Reference: zero the round(sparsity * cols) smallest |w| of every row (argsort)."""
    k = pruned_count(sparsity, W.shape[1])
    keep = torch.ones_like(W, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(W.abs(), dim=1)[:, :k], False)
    return keep


@given(rows=st.integers(1, 6), cols=st.integers(1, 30), sparsity=st.floats(0.0, 1.0),
       norm=st.floats(1e-6, 1e6), seed=st.integers(0, 2**16))
def test_wanda_with_equal_norms_is_magnitude_pruning(rows, cols, sparsity, norm, seed):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = wanda_mask(W, torch.full((cols,), norm), sparsity=sparsity)
    assert torch.equal(mask, _per_row_magnitude(W, sparsity))
    assert torch.equal(mask, magnitude_mask(W, sparsity=sparsity, per_row=True))


@given(nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (2, 8)]), groups=st.integers(1, 5), rows=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_wanda_nm_keeps_the_top_n_scores_per_group(nm, groups, rows, seed):
    n, m = nm
    W, H, _ = correlated_layer(rows, groups * m, seed)
    norms = H.diagonal()
    mask = wanda_mask(W, norms, prune_n=n, prune_m=m)
    score = (W.double().abs() * norms.sqrt()).reshape(rows, groups, m)
    kept = mask.reshape(rows, groups, m)
    assert bool((kept.sum(2) == n).all())
    lowest_kept = score.masked_fill(~kept, float("inf")).amin(2)
    highest_pruned = score.masked_fill(kept, -float("inf")).amax(2)
    assert bool((lowest_kept >= highest_pruned).all())


def test_wanda_scale_of_norms_does_not_matter_and_solver_result():
    W, H, X = correlated_layer(8, 32, 1)
    a = wanda_mask(W, H.diagonal())
    b = wanda_mask(W, (X * X).sum(0))  # ||X_j||^2 = diag(H) * n / 2
    assert torch.equal(a, b)
    res = wanda(W, H)
    assert torch.equal(res.mask, a) and res.loss == pytest.approx(layer_loss(W, W * a, H))
    assert int((~a).sum(1).unique()) == 16  # exactly per row


def test_wanda_bad_input():
    W = torch.randn(3, 10)
    with pytest.raises(SolverError, match="emb.proj"):
        wanda_mask(W, torch.ones(10), prune_n=2, prune_m=4, layer="emb.proj")
    with pytest.raises(ConfigError, match="emb.proj"):
        wanda_mask(W, torch.ones(9), layer="emb.proj")
    with pytest.raises(ConfigError, match="emb.proj"):
        wanda_mask(W, -torch.ones(10), layer="emb.proj")
