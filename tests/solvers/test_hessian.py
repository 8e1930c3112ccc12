"""l2fx.solvers.hessian: accumulation, conv unfolding, damping, losses, the exact refit."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import CalibrationError, ConfigError
from l2fx.solvers.hessian import (HessianAccumulator, check_layer, inverse_cholesky, layer_loss, layer_rows,
                                  prepare_hessian, refit_masked, relative_layer_loss)
from solver_layers import correlated_layer


@given(n=st.integers(1, 60), cols=st.integers(1, 12), cuts=st.lists(st.integers(0, 60), max_size=6),
       seed=st.integers(0, 2**16))
def test_accumulation_in_any_split_equals_one_shot(n, cols, cuts, seed):
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(seed))
    acc = HessianAccumulator(cols)
    bounds = [0] + sorted(min(c, n) for c in cuts) + [n]
    for a, b in zip(bounds, bounds[1:]):
        acc.add(x[a:b])  # empty batches included
    assert acc.nsamples == n
    one_shot = 2.0 * x.double().T @ x.double() / n
    torch.testing.assert_close(acc.hessian(), one_shot, rtol=1e-12, atol=1e-12)


def test_accumulator_dtype_rule_and_groups():
    assert HessianAccumulator(8192).dtype == torch.float64
    assert HessianAccumulator(8193).dtype == torch.float32  # calloc'd: nothing is touched
    acc = HessianAccumulator(3, groups=2)
    x = torch.randn(2, 10, 3)
    acc.add(x[:, :4])
    acc.add(x[:, 4:])
    H = acc.hessian()
    for g in range(2):
        torch.testing.assert_close(H[g], 2.0 * x[g].double().T @ x[g].double() / 10)
    with pytest.raises(ConfigError):
        acc.add(torch.randn(10, 3))
    with pytest.raises(CalibrationError):
        HessianAccumulator(3).hessian()


def _conv_check(x, weight, family, stride, padding, dilation, groups):
    rows = layer_rows(x, family, weight.shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv = F.conv2d if family == "conv2d" else F.conv1d
    y = conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)  # [B, Cout, *spatial]
    cout = weight.shape[0]
    per = cout // groups
    assert rows.shape[0] == groups and rows.shape[2] == weight[0].numel()
    w_flat = weight.flatten(1)
    for g in range(groups):
        out = rows[g].double() @ w_flat[g * per:(g + 1) * per].double().T  # [B * L, per]
        ref = y[:, g * per:(g + 1) * per].flatten(2).transpose(1, 2).reshape(-1, per)
        torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)


@given(groups=st.sampled_from([1, 2, 4]), cin_per=st.integers(1, 3), cout_per=st.integers(1, 3),
       k=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       seed=st.integers(0, 2**16))
def test_conv2d_rows_reproduce_conv(groups, cin_per, cout_per, k, stride, padding, dilation, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin_per * groups, 7, 6, generator=g)
    weight = torch.randn(cout_per * groups, cin_per, *k, generator=g)
    _conv_check(x, weight, "conv2d", stride, padding, dilation, groups)


def test_conv1d_depthwise_and_same_padding():
    x = torch.randn(3, 4, 11)
    _conv_check(x, torch.randn(6, 2, 3), "conv1d", 2, 1, 2, 2)
    xd = torch.randn(2, 5, 6, 6)
    _conv_check(xd, torch.randn(5, 1, 3, 3), "conv2d", 1, 1, 1, 5)  # depthwise: cols = kh * kw
    rows = layer_rows(xd, "conv2d", (5, 1, 3, 3), padding=1, groups=5)
    assert rows.shape == (5, 2 * 36, 9)
    _conv_check(xd, torch.randn(4, 5, 2, 3), "conv2d", 1, "same", (2, 1), 1)


def test_linear_rows_and_bad_shapes():
    x = torch.randn(2, 5, 7)
    assert layer_rows(x, "linear", (3, 7)).shape == (10, 7)
    with pytest.raises(ConfigError):
        layer_rows(x, "linear", (3, 6))
    with pytest.raises(ConfigError):
        layer_rows(torch.randn(2, 3, 5, 5), "conv2d", (4, 2, 3, 3), groups=1)  # 3 != 2 * 1 channels
    with pytest.raises(ConfigError):
        layer_rows(x, "conv3d", (3, 7))


def test_prepare_hessian_dead_inputs_and_damping():
    W, H, _ = correlated_layer(4, 6, 0, dead=2)
    Hd, dead = prepare_hessian(H, W, percdamp=0.1)
    assert dead.tolist() == [True, True, False, False, False, False]
    assert bool((W[:, :2] == 0).all())
    diag = H.diagonal().clone()
    diag[:2] = 1.0
    torch.testing.assert_close(Hd.diagonal(), diag + 0.1 * diag.mean())
    assert H[0, 0] == 0  # the caller's H is not modified


def test_inverse_cholesky_is_upper_factor_of_inverse():
    _, H, _ = correlated_layer(1, 20, 3)
    U = inverse_cholesky(H)
    torch.testing.assert_close(U, torch.triu(U))
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H), rtol=1e-9, atol=1e-9)


def test_layer_loss_is_output_error():
    W, H, X = correlated_layer(5, 8, 1, dtype=torch.float64)
    W_hat = W + 0.1 * torch.randn_like(W)
    direct = 2.0 / X.shape[0] * float(((X @ (W - W_hat).T) ** 2).sum())
    assert layer_loss(W, W_hat, H) == pytest.approx(direct, rel=1e-12)
    assert relative_layer_loss(W, torch.zeros_like(W), H) == pytest.approx(1.0)
    assert relative_layer_loss(W, W, H) == 0.0


@given(seed=st.integers(0, 2**16), frac=st.floats(0.0, 1.0))
def test_refit_is_the_restricted_least_squares_optimum(seed, frac):
    W, H, _ = correlated_layer(4, 10, seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(4, 10, generator=g) >= frac
    w = refit_masked(W, H, mask)
    assert bool((w[~mask] == 0).all())
    # KKT: the gradient 2 (w - W) H vanishes on the kept weights.
    grad = (w - W) @ H
    worst = float(grad[mask].abs().max()) if bool(mask.any()) else 0.0
    assert worst < 1e-9 * float(H.abs().max()) * (1.0 + float(W.abs().max()))


def test_check_layer_names_the_layer():
    with pytest.raises(ConfigError, match="fc1"):
        check_layer(torch.randn(3, 4), torch.eye(5), "fc1")
    with pytest.raises(ConfigError, match="fc1"):
        check_layer(torch.randn(4), torch.eye(4), "fc1")
    assert math.isfinite(layer_loss(torch.zeros(2, 2), torch.ones(2, 2), torch.eye(2)))
