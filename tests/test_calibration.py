"""l2fx.calibration: BatchNorm-statistics synthesis, augmentation, and the sources built from them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from l2fx import calibration
from l2fx.calibration import Augmentation, Diversity, Synthesis, augment, bn_statistics_loss, calibration_source, synthesize
from l2fx.errors import CalibrationError, ConfigError

from conftest import make_tiny_convnet

SHAPE = (1, 28, 28)
FAST = dict(steps=20, lr=0.3, batch_size=8)


def bn_model() -> nn.Module:
    """The tiny ConvNet with BatchNorm statistics of a data distribution (smooth noise of mean 0.5,
    std ~0.9), not random ones: random statistics need not be reachable by any input (its first
    BatchNorm's 16 channel means follow from one input mean, up to the borders)."""
    model = make_tiny_convnet()
    data = F.avg_pool2d(torch.randn(256, 1, 32, 32, generator=torch.Generator().manual_seed(5)), 5, 1) * 2 + 0.5
    for bn in (model.b1, model.b2):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the statistics of all of ``data``
    model.train()
    with torch.no_grad():
        model(data)
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_synthesised_inputs_match_the_batchnorm_statistics_far_better_than_noise():
    # Measured (batch 16, 2-core CPU): noise 2.74, ZeroQ alone 0.0015, with DSG's terms 0.0039
    # after 60 steps at lr 0.3; 0.009 / 0.013 after 30.
    model = bn_model()
    noise = torch.randn((8,) + SHAPE, generator=torch.Generator().manual_seed(0))
    before = bn_statistics_loss(model, noise)
    for diversity in (None, Diversity()):
        (x,) = synthesize(model, SHAPE, 8, seed=0, diversity=diversity, steps=30, lr=0.3, batch_size=8)
        after = bn_statistics_loss(model, x)
        assert after < before / 50, (diversity, before, after)


def test_shapes_dtypes_batches_and_value_range():
    model = bn_model()
    out = synthesize(model, SHAPE, 19, seed=0, value_range=(-1.0, 2.0), **FAST)
    assert [tuple(b.shape) for b in out] == [(8,) + SHAPE, (8,) + SHAPE, (3,) + SHAPE]
    assert all(b.dtype == torch.float32 and not b.requires_grad for b in out)
    x = torch.cat(out)
    assert x.min() >= -1.0 and x.max() <= 2.0 and torch.isfinite(x).all()


def test_synthesis_is_deterministic_by_seed():
    model = make_tiny_convnet()
    a = synthesize(model, SHAPE, 8, seed=3, **FAST)
    b = synthesize(model, SHAPE, 8, seed=3, **FAST)
    c = synthesize(model, SHAPE, 8, seed=4, **FAST)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_the_callers_model_is_not_modified():
    model = make_tiny_convnet()
    model.train()  # a training-mode model must not have its running statistics updated
    before = _state(model)
    grads = [p.requires_grad for p in model.parameters()]
    synthesize(model, SHAPE, 4, seed=0, steps=3, lr=0.1, batch_size=4)
    bn_statistics_loss(model, torch.randn((4,) + SHAPE))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())


def test_a_model_without_batchnorm_is_a_calibration_error_saying_why():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(CalibrationError, match="no BatchNorm layer with running statistics"):
        synthesize(model, SHAPE, 4, seed=0, steps=2)
    untracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(CalibrationError, match="no BatchNorm layer"):
        synthesize(untracked, SHAPE, 4, seed=0, steps=2)


def test_batchnorm1d_layers_count_without_per_sample_statistics():
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    noise = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    (x,) = synthesize(model, (12,), 16, seed=0, steps=100, lr=0.1, batch_size=16)
    assert x.shape == (16, 12)
    assert bn_statistics_loss(model, x) < bn_statistics_loss(model, noise) / 20


def _images(n: int = 10, channels: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, 20, 24, generator=g) * 2 - 1
    x[:, 0] = x[:, 0] * 0.5 + 0.25  # channel 0 in [-0.25, 0.75]: the range is per channel
    return [x[:6], x[6:]]


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_keeps_shapes_and_each_channels_range(channels):
    batches = _images(channels=channels)
    pool = torch.cat(batches)
    out = augment(batches, 23, seed=0, batch_size=8)
    assert [tuple(b.shape) for b in out] == [(8, channels, 20, 24)] * 2 + [(7, channels, 20, 24)]
    x = torch.cat(out)
    assert x.dtype == pool.dtype
    low, high = pool.amin((0, 2, 3)), pool.amax((0, 2, 3))
    assert (x.amin((0, 2, 3)) >= low).all() and (x.amax((0, 2, 3)) <= high).all()
    # strong augmentation: no view is a copy of a source sample
    assert min((x[:, None] - pool[None]).abs().flatten(2).amax(-1).min(1).values) > 1e-3


def test_augment_is_deterministic_and_every_option_can_be_off():
    batches = _images()
    assert torch.equal(augment(batches, 5, seed=1)[0], augment(batches, 5, seed=1)[0])
    assert not torch.equal(augment(batches, 5, seed=1)[0], augment(batches, 5, seed=2)[0])
    square = [b[..., :20] for b in batches]
    plain = torch.cat(augment(square, 10, seed=0, mix=0.0, colour=0.0, scale=(1.0, 1.0)))
    pool = torch.cat(square)
    # full-area crops of a square image (no other box fits after rounding): each view is a
    # source sample, maybe flipped
    assert all(any(torch.equal(v, p) or torch.equal(v, p.flip(-1)) for p in pool) for v in plain)


def test_augment_rejects_non_images_and_bad_settings():
    with pytest.raises(CalibrationError, match="image batches"):
        augment([torch.randn(4, 12)], 4, seed=0)
    with pytest.raises(ConfigError):
        augment(_images(), 4, seed=0, mix=1.5)
    with pytest.raises(ConfigError):
        Augmentation(scale=(0.8, 0.5))
    with pytest.raises(ConfigError):
        Diversity(slack=-1)
    with pytest.raises(ConfigError):
        Synthesis(steps=0)


def test_calibration_sources_compose_and_shuffle():
    model = make_tiny_convnet()
    real = [torch.rand(6, *SHAPE) * 2 - 1, torch.rand(4, *SHAPE) * 2 - 1]
    synth = Synthesis(steps=3, batch_size=8)
    as_given = calibration_source("real", model, real)
    assert len(as_given) == 2 and all(a is b for a, b in zip(as_given, real))
    only = calibration_source("synthetic", model, real, None, 12, 0, synthesis=synth)
    assert sum(len(b) for b in only) == 12
    # the real batches bound the synthetic inputs, channel by channel
    pool = torch.cat(real)
    assert torch.cat(only).min() >= pool.min() and torch.cat(only).max() <= pool.max()
    both = calibration_source("synthetic+real", model, real, None, 12, 0, synthesis=synth, synthetic=only)
    x = torch.cat(both)
    assert len(x) == 22 and all(len(b) <= 32 for b in both)
    # every real and every synthetic sample is there once, in a shuffled order
    key = lambda t: sorted(map(tuple, t.flatten(1)[:, :5].tolist()))  # noqa: E731
    assert key(x) == key(torch.cat([pool, torch.cat(only)]))
    assert not torch.equal(x[:10], pool)
    everything = calibration_source("synthetic+real+augment", model, real, None, 5, 0, synthesis=synth)
    assert sum(len(b) for b in everything) == 10 + 5 + 5
    assert sum(len(b) for b in calibration_source("augment+real", model, real, None, 7, 0)) == 17


def test_calibration_source_errors_name_the_problem():
    model = make_tiny_convnet()
    with pytest.raises(ConfigError, match="expected one of"):
        calibration_source("noise", model, None, SHAPE, 4, 0)
    with pytest.raises(ConfigError, match="add \\+real"):
        calibration_source("synthetic+augment", model, None, SHAPE, 4, 0)
    with pytest.raises(CalibrationError, match="needs real batches"):
        calibration_source("synthetic+real", model, None, SHAPE, 4, 0)
    with pytest.raises(CalibrationError, match="per-sample shape"):
        calibration_source("synthetic", model, None, None, 4, 0)
    with pytest.raises(CalibrationError, match="differs"):
        calibration_source("synthetic+real", model, [torch.randn(2, 1, 28, 28)], (1, 14, 14), 4, 0)


def test_the_sources_list_is_what_the_parser_accepts():
    for spec in calibration.SOURCES:
        calibration._parse(spec)
