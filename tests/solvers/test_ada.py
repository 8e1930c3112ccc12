"""l2fx.solvers.ada: AdaRound, AdaQuant and the closed-form AdaPrune."""
import pytest
import torch

from l2fx.errors import ConfigError, SolverError
from l2fx.solvers.ada import adaprune, adaquant, adaround
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import layer_loss
from l2fx.solvers.wanda import magnitude_mask
from l2fx.transform import TransformKind
from solver_layers import assert_symbols_decode, correlated_layer, make_grid


def test_adaprune_matches_numerical_least_squares_and_beats_magnitude():
    W, H, X = correlated_layer(6, 20, 0, dtype=torch.float64)
    mask = magnitude_mask(W, sparsity=0.6)
    res = adaprune(W, H, mask)
    assert torch.equal(res.mask, mask)
    # Row by row: min ||X (w' - w)||^2 over the kept entries, by lstsq on the activations.
    for r in range(6):
        S = mask[r].nonzero()[:, 0]
        sol = torch.linalg.lstsq(X[:, S], (X @ W[r])[:, None]).solution[:, 0]
        torch.testing.assert_close(res.w_hat[r, S].double(), sol, rtol=1e-5, atol=1e-6)
        assert bool((res.w_hat[r, ~mask[r]] == 0).all())
    assert res.loss < layer_loss(W, W * mask, H)


def test_adaprune_default_mask_and_damping():
    W, H, _ = correlated_layer(4, 16, 1, n=8)  # n < cols: H is singular
    res = adaprune(W, H, sparsity=0.25, percdamp=0.01)
    assert int((~res.mask).sum()) == 16
    with pytest.raises(SolverError, match="fc2"):
        adaprune(W, H, sparsity=0.25, layer="fc2")  # H_SS singular without damping


@pytest.mark.parametrize("kind", [TransformKind.LINEAR, TransformKind.JOINT])
def test_adaround_symbols_decode_and_beat_rtn_in_aggregate(kind):
    """Learnt rounding, on weights of a trained network's scale (std 0.05: lambda = 0.01 is
    absolute, see adaround's docstring). Single seeds can tie; in total it wins clearly."""
    total_a, total_r = 0.0, 0.0
    for seed in range(4):
        W, H, _ = correlated_layer(8, 24, seed)
        W = 0.05 * W
        grid = make_grid(W, 3, True, None, kind, dead_zone=1.2)
        res = adaround(W, H, grid, iters=300, lr=1e-2)
        assert_symbols_decode(grid, res.symbols, res.w_hat)
        # each weight is rounded to one of the two levels around it (or clamped)
        t = grid.quantize_all(W)[1].int()
        assert bool(((res.symbols.int() - t).abs() <= 1).all())
        total_a += res.loss
        total_r += layer_loss(W, grid.quantize_all(W)[0], H)
    assert total_a < 0.9 * total_r


def test_adaquant_learnt_grid_decodes_and_does_not_lose_to_rtn():
    total_a, total_r = 0.0, 0.0
    for seed in range(4):
        W, H, _ = correlated_layer(8, 24, seed)
        grid = Grid.minmax(W, 3, group_size=8)
        res = adaquant(W, H, grid, iters=200)
        learnt = res.extra["grid"]
        assert_symbols_decode(learnt, res.symbols, res.w_hat)
        assert learnt.step_s.shape == grid.step_s.shape
        rtn = layer_loss(W, grid.quantize_all(W)[0], H)
        assert res.loss <= rtn * (1 + 1e-5)  # the best iterate is kept; the first one is RTN
        total_a += res.loss
        total_r += rtn
    assert total_a < total_r


def test_ada_bad_input():
    W, H, _ = correlated_layer(4, 8, 0)
    with pytest.raises(ConfigError, match="fc"):
        adaround(W, H, Grid.minmax(W, 3), iters=-1, layer="fc")
    with pytest.raises(SolverError, match="fc"):
        adaquant(W, H, Grid.minmax(W[:2], 3), layer="fc")
    with pytest.raises(ConfigError, match="fc"):
        adaprune(W, H, torch.ones(4, 7, dtype=torch.bool), layer="fc")
