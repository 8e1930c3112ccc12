"""passes/fold_batchnorm.py: eval-mode BatchNorm folded into the conv/linear feeding it.

before     normalize's graph: ``y = conv2d(x, w, b); z = batch_norm(y, mean, var, gamma, beta, False, _, eps)``
transform  FoldBatchNorm
expected   ``z = conv2d(x, w', b')`` computing the same function (within what float32 rounding
           allows, measured against float64), no foldable batch_norm left, idempotent.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from l2fx.passes import FoldBatchNorm, Normalize

from conftest import make_tiny_convnet
from pass_cases import run, same_tensors, tensors


def normalized(model: nn.Module) -> fx.GraphModule:
    return run(fx.symbolic_trace(copy.deepcopy(model)), [Normalize()])[0]


def batch_norms(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


@st.composite
def conv_bn(draw):
    """A (producer, BatchNorm) pair in eval mode with running statistics far from 0/1, and an input."""
    family = draw(st.sampled_from(["conv2d", "conv1d", "linear"]))
    c = draw(st.integers(1, 12))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    log_var = draw(st.floats(-8.0, 8.0))  # running variances spread over e^(log_var +- 2)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    torch.manual_seed(seed)
    if family == "conv2d":
        conv, bn, x = nn.Conv2d(3, c, 3, padding=1, bias=bias), nn.BatchNorm2d(c, eps=eps, affine=affine), torch.randn(4, 3, 7, 7)
    elif family == "conv1d":
        conv, bn, x = nn.Conv1d(3, c, 5, bias=bias), nn.BatchNorm1d(c, eps=eps, affine=affine), torch.randn(4, 3, 12)
    else:
        conv, bn, x = nn.Linear(24, c, bias=bias), nn.BatchNorm1d(c, eps=eps, affine=affine), torch.randn(16, 24)
    with torch.no_grad():
        bn.running_mean.normal_(0, 2)
        bn.running_var.copy_(torch.exp(log_var + torch.empty(c).uniform_(-2, 2)))
        if affine:
            bn.weight.normal_(0, 2)  # negative scales too
            bn.bias.normal_(0, 2)
    return nn.Sequential(conv, bn).eval(), x


@given(conv_bn())
def test_folding_preserves_the_output_within_float32_rounding(case):
    model, x = case
    before = normalized(model)
    assert len(batch_norms(before)) == 1
    after, _, modified = run(before, [FoldBatchNorm()])
    assert modified and batch_norms(after) == []
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        eager_err = rms(model(x).double() - exact)
        folded_err = rms(after(x).double() - exact)
    # Tolerance from fp64: the folded graph errs against the float64 model by at most 4x what
    # the unfolded float32 model does (measured: at most 1.72x over 300 random pairs of these
    # three families, variances e^-10 .. e^10). The floor is one float32 ulp of the output's
    # RMS, for the rare output float32 computes exactly.
    assert folded_err <= 4 * eager_err + 2.0 ** -24 * rms(exact), (folded_err, eager_err)


@given(conv_bn())
def test_folding_is_idempotent(case):
    model, _ = case
    once, _, _ = run(normalized(model), [FoldBatchNorm()])
    code, state = once.code, tensors(once)
    twice, _, modified = run(once, [FoldBatchNorm()])
    assert not modified
    assert twice.code == code and same_tensors(tensors(twice), state)


def test_tiny_convnet_folds_both_batchnorms_and_creates_the_missing_bias():
    model = make_tiny_convnet()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    before = normalized(model)
    assert len(batch_norms(before)) == 2 and model.c2.bias is None
    after, _, _ = run(before, [FoldBatchNorm()])
    assert batch_norms(after) == []
    # c2 had no bias: the folded shift becomes the parameter c2.bias, read by its conv.
    conv2 = next(n for n in after.graph.nodes if n.target is torch.conv2d and n.args[1].target == "c2.weight")
    assert conv2.args[2].op == "get_attr" and conv2.args[2].target == "c2.bias"
    assert after.c2.bias.shape == (32,)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        assert rms(after(x).double() - exact) <= 4 * rms(model(x).double() - exact) + 2.0 ** -24 * rms(exact)


class _ConvFeedsTwo(nn.Module):
    """The conv's output is read by the BatchNorm and by the residual sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.bn(y) + y


def test_batchnorm_whose_input_has_other_readers_is_left_alone():
    torch.manual_seed(0)
    model = _ConvFeedsTwo().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.2, 3.0)
    before = normalized(model)
    state = tensors(before)
    after, _, modified = run(before, [FoldBatchNorm()])
    assert not modified and len(batch_norms(after)) == 1 and same_tensors(tensors(after), state)


def test_training_mode_batchnorm_is_not_folded():
    """normalize leaves a training-mode BatchNorm a call_module (batch statistics, not running
    ones), and fold_batchnorm only folds the eval-mode call_function form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].eval()
    before = normalized(model)
    state = tensors(before)
    after, _, modified = run(before, [FoldBatchNorm()])
    assert not modified and same_tensors(tensors(after), state)
    assert any(n.op == "call_module" and n.target == "1" for n in after.graph.nodes)


class _SharedConv(nn.Module):
    """One conv module applied twice, a BatchNorm after one of the calls only."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.c(x)) + self.c(x)


def test_a_conv_called_twice_keeps_the_unnormalised_call_exact():
    torch.manual_seed(0)
    model = _SharedConv().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    after, _, _ = run(normalized(model), [FoldBatchNorm()])
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        assert rms(after(x).double() - exact) <= 4 * rms(model(x).double() - exact) + 2.0 ** -24 * rms(exact)
