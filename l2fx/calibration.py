"""Calibration inputs from little data: BatchNorm-statistics synthesis and strong augmentation.

:func:`l2fx.compile` fits what it is shown (block reconstruction fits the calibration
activations), so few calibration inputs limit fidelity more than any setting does (README,
"Calibration data matters more than any setting on Lite0"). This module builds ``calib``
from a model and a few real samples; ``compile`` itself takes batches as before:

    from l2fx import calibration
    calib = calibration.calibration_source("synthetic+real", model, real_batches, None, n=128, seed=0)
    compiled = l2fx.compile(model, target_cr=10, calib=calib)

Sources (:data:`SOURCES`, the ``spec`` of :func:`calibration_source`, also
``l2fx compress --calib-source``):

* ``real``: the real batches as given.
* ``synthetic``: ``n`` inputs optimised so that every BatchNorm layer's input statistics
  match its running statistics (:func:`synthesize`: ZeroQ, Cai et al. 2020, Eq. 4, with the
  diversity terms of DSG, Zhang et al. 2021). Real batches, when given, supply only the input
  shape, the per-channel value range and the per-channel input mean/std (what an input
  normalisation states), never their content.
* ``real+augment``: the real samples plus ``n`` strongly augmented views of them
  (:func:`augment`: rescale-crop, flip, colour jitter, cutmix/mixup).
* ``synthetic+real``, ``synthetic+real+augment``: the union.

Every multi-part source is shuffled with the seed and re-batched, so that any prefix of it
(sensitivity analysis reads the first few samples) holds every kind.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from l2fx.data import normalize_calib
from l2fx.errors import CalibrationError, ConfigError

__all__ = [
    "SOURCES",
    "Diversity",
    "Synthesis",
    "Augmentation",
    "synthesize",
    "bn_statistics_loss",
    "augment",
    "calibration_source",
]

SOURCES = ("real", "synthetic", "synthetic+real", "real+augment", "synthetic+real+augment")
_PARTS = ("synthetic", "real", "augment")
# Added to a variance before its square root: the gradient of sqrt at 0 is infinite.
_VAR_EPS = 1e-8


@dataclass(frozen=True)
class Diversity:
    """DSG's diversity terms (Zhang et al. 2021, "Diversifying Sample Generation for Accurate
    Data-Free Quantization", Sec. 3.2-3.3), added to ZeroQ's batch-statistics loss.

    ``slack`` (Slack Distribution Alignment): each sample's *own* per-channel statistics (over
    its spatial positions) must lie within a margin of the running ones, the margin being
    ``slack`` times the channel's running std: ``relu(|mu_i - mu| - slack sigma)^2 +
    relu(|sigma_i - sigma| - slack sigma)^2``. Matching only the batch's statistics lets a few
    extreme samples balance many alike ones; matching each sample exactly makes them alike.
    ``enhance`` (Layerwise Sample Enhancement): sample ``i`` (counted over all batches) has its
    per-sample loss at BatchNorm layer ``i mod L`` weighted ``1 + enhance``, so different
    samples fit different layers best. ``weight``: the per-sample term's weight against the
    batch term. Only BatchNorm inputs with spatial positions (``[N, C, *]``, ``*`` not empty)
    have per-sample statistics.
    """

    slack: float = 0.5
    enhance: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("slack", "enhance", "weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"Diversity.{name} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class Synthesis:
    """Settings of :func:`synthesize` (see there), as :func:`calibration_source` passes them."""

    steps: int = 200
    lr: float = 0.1
    batch_size: int = 32
    tv: float = 0.0
    diversity: Diversity | None = Diversity()

    def __post_init__(self) -> None:
        _check_int("Synthesis.steps", self.steps, 1)
        _check_int("Synthesis.batch_size", self.batch_size, 1)
        _check_nonneg("Synthesis.lr", self.lr, positive=True)
        _check_nonneg("Synthesis.tv", self.tv)
        if self.diversity is not None and not isinstance(self.diversity, Diversity):
            raise ConfigError(f"Synthesis.diversity must be a Diversity or None, got {self.diversity!r}")


@dataclass(frozen=True)
class Augmentation:
    """Settings of :func:`augment` (see there), as :func:`calibration_source` passes them."""

    mix: float = 0.5
    colour: float = 0.4
    scale: tuple[float, float] = (0.35, 1.0)

    def __post_init__(self) -> None:
        _check_augment_args(self.mix, self.colour, self.scale)


def _check_int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {v!r}")


def _check_nonneg(name: str, v: Any, positive: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")


def _check_augment_args(mix: float, colour: float, scale: Sequence[float]) -> None:
    _check_nonneg("mix", mix)
    if mix > 1:
        raise ConfigError(f"mix is a probability, got {mix!r}")
    _check_nonneg("colour", colour)
    if colour >= 1:
        raise ConfigError(f"colour must be < 1 (factors in [1 - colour, 1 + colour]), got {colour!r}")
    if (not isinstance(scale, (tuple, list)) or len(scale) != 2
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scale)
            or not 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")


# --------------------------------------------------------------------------------------------
# Synthesis (ZeroQ Eq. 4 + DSG)


class _StatsRecorder:
    """Forward pre-hooks on a model's BatchNorm layers that keep each call's input."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules()
                       if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
                       and m.running_var is not None]
        self.inputs: list[tuple[int, torch.Tensor]] = []
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module, args):
            self.inputs.append((index, args[0]))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _batchnorm_model(model: nn.Module, who: str) -> tuple[nn.Module, _StatsRecorder]:
    """An eval-mode deep copy of ``model`` with frozen parameters and the hooks on its
    BatchNorm layers; CalibrationError if it has none with running statistics."""
    if not isinstance(model, nn.Module):
        raise CalibrationError(f"{who} needs a torch.nn.Module, got {type(model).__name__}")
    net = copy.deepcopy(model).eval()
    net.requires_grad_(False)
    recorder = _StatsRecorder(net)
    if not recorder.layers:
        raise CalibrationError(
            f"{who} matches BatchNorm running statistics, and {type(model).__name__} has no BatchNorm layer "
            "with running statistics (track_running_stats=True): there is nothing to synthesise inputs from. "
            "Use real calibration data, optionally with calibration.augment")
    return net, recorder


def _targets(layer: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.running_mean.detach().float(), layer.running_var.detach().float().clamp_min(0).sqrt()


def _channel_stats(x: torch.Tensor, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a BatchNorm input ``[N, C, *]``: over the batch and every
    position ([C]), or per sample over its positions ([N, C])."""
    x = x.float()
    if per_sample:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        dims: tuple[int, ...] = (2,)
    else:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        dims = (1,)
    mean = flat.mean(dims)
    var = flat.var(dims, unbiased=False)
    return mean, (var + _VAR_EPS).sqrt()


def _batch_loss(recorder: _StatsRecorder) -> torch.Tensor:
    """ZeroQ Eq. 4 over the recorded inputs: sum over BatchNorm calls of ``||mu - mu_run||^2 +
    ||sigma - sqrt(var_run)||^2``, each norm's square divided by the channels (as ZeroQ's code
    does, so wide layers do not outweigh narrow ones)."""
    total = torch.zeros(())
    for index, x in recorder.inputs:
        mu_run, sigma_run = _targets(recorder.layers[index])
        mu, sigma = _channel_stats(x, per_sample=False)
        total = total + (mu - mu_run).pow(2).mean() + (sigma - sigma_run).pow(2).mean()
    return total


def _sample_loss(recorder: _StatsRecorder, diversity: Diversity, first_sample: int) -> torch.Tensor:
    """DSG's per-sample slack loss with layer-wise enhancement (:class:`Diversity`), the mean over
    the batch's samples."""
    total = torch.zeros(())
    n_layers = len(recorder.layers)
    for index, x in recorder.inputs:
        if x.dim() < 3:  # [N, C]: a sample has one value per channel, no statistics
            continue
        mu_run, sigma_run = _targets(recorder.layers[index])
        mu, sigma = _channel_stats(x, per_sample=True)  # [N, C]
        margin = diversity.slack * sigma_run
        per_sample = (F.relu((mu - mu_run).abs() - margin).pow(2).mean(1)
                      + F.relu((sigma - sigma_run).abs() - margin).pow(2).mean(1))
        boost = (torch.arange(first_sample, first_sample + x.shape[0], device=x.device) % n_layers) == index
        total = total + (per_sample * (1 + diversity.enhance * boost.float())).mean()
    return diversity.weight * total


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring positions along each spatial axis, summed."""
    total = torch.zeros((), device=x.device)
    for dim in range(2, x.dim()):
        if x.shape[dim] > 1:
            total = total + x.diff(dim=dim).pow(2).mean()
    return total


def _input_loss(x: torch.Tensor, input_stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """ZeroQ's input term: the batch's per-channel mean/std against the inputs' (a layer 0)."""
    mean, std = input_stats
    mu, sigma = _channel_stats(x, per_sample=False)
    return (mu - mean).pow(2).mean() + (sigma - std).pow(2).mean()


def synthesize(
    model: nn.Module,
    shape: Sequence[int],
    n: int,
    *,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
    diversity: Diversity | None = Diversity(),
    tv: float = 0.0,
    batch_size: int = 32,
    value_range: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
    input_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``n`` inputs of per-sample ``shape`` (``[C, H, W]``; ``[C, *]`` in general) whose BatchNorm
    input statistics match ``model``'s running statistics, in batches of ``batch_size``.

    ZeroQ (Cai et al. 2020): each batch starts as Gaussian noise and is optimised by Adam
    (``steps`` steps, ``lr`` with a cosine decay to 1 % of it) on

        L = sum_l ||mu_l - mu_run,l||^2 + ||sigma_l - sqrt(var_run,l)||^2      (Eq. 4)

    over every BatchNorm layer ``l`` of the model (batch statistics of the layer's input, over
    samples and positions; each term divided by the layer's channels), plus DSG's
    per-sample slack and layer-wise enhancement when ``diversity`` is given (:class:`Diversity`),
    plus ``tv`` times a total-variation prior (mean squared difference of neighbouring pixels).

    ``value_range``: ``(low, high)`` floats or per-channel tensors ``[C]``; the inputs are
    projected into it after every step (a model's input normalisation bounds them: Lite0's
    ``(x - 127) / 128`` of uint8 pixels lies in ``[-0.99, 1]``). ``input_stats``: per-channel
    mean and std ``[C]`` of the model's inputs; the noise starts at them and ZeroQ's input
    term matches them (without it: ``N(0, 1)``, no input term).

    The hooks sit on an eval-mode deep copy of ``model``; the caller's model is not touched.
    Inputs are float32 on the model's device. Deterministic for a ``seed`` on one machine and
    torch build. A model without a BatchNorm layer that tracks running statistics is a
    :class:`CalibrationError`.
    """
    _check_int("n", n, 1)
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_nonneg("lr", lr, positive=True)
    _check_nonneg("tv", tv)
    if diversity is not None and not isinstance(diversity, Diversity):
        raise ConfigError(f"diversity must be a Diversity or None, got {diversity!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise CalibrationError(f"synthesize needs a per-sample shape [C, *] of positive sizes, got {shape}")
    net, recorder = _batchnorm_model(model, "synthesize")
    device = next((t.device for t in net.parameters()), None) or next((t.device for t in net.buffers()),
                                                                     torch.device("cpu"))
    channels = shape[0]
    view = (1, channels) + (1,) * (len(shape) - 1)

    def per_channel(v: torch.Tensor | float, what: str) -> torch.Tensor:
        t = torch.as_tensor(v, dtype=torch.float32, device=device).flatten()
        if t.numel() not in (1, channels):
            raise CalibrationError(f"synthesize: {what} has {t.numel()} values for {channels} channels")
        return t.expand(channels).reshape(view)

    low = high = None
    if value_range is not None:
        low, high = per_channel(value_range[0], "value_range low"), per_channel(value_range[1], "value_range high")
        if not bool((low < high).all()):
            raise CalibrationError("synthesize: value_range needs low < high in every channel")
    mean = torch.zeros(view, device=device)
    std = torch.ones(view, device=device)
    if input_stats is not None:
        mean, std = per_channel(input_stats[0], "input_stats mean"), per_channel(input_stats[1], "input_stats std")
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn((b,) + shape, generator=gen).to(device) * std + mean
            if low is not None:
                x = torch.maximum(torch.minimum(x, high), low)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for step in range(steps):
                for group in opt.param_groups:  # cosine from lr to lr / 100
                    group["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
                recorder.inputs.clear()
                net(x)
                loss = _batch_loss(recorder)
                if diversity is not None:
                    loss = loss + _sample_loss(recorder, diversity, start)
                if input_stats is not None:
                    loss = loss + _input_loss(x, (mean.flatten(), std.flatten()))
                if tv:
                    loss = loss + tv * _total_variation(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if low is not None:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, high), low))
            out.append(x.detach().clone())
    finally:
        recorder.inputs.clear()
        recorder.remove()
    return out


@torch.no_grad()
def bn_statistics_loss(model: nn.Module, batch: torch.Tensor) -> float:
    """ZeroQ's Eq. 4 loss (the batch term :func:`synthesize` minimises) of ``batch`` on
    ``model``: how far the batch's BatchNorm input statistics are from the running ones.
    The caller's model is not touched."""
    net, recorder = _batchnorm_model(model, "bn_statistics_loss")
    try:
        net(batch)
        return float(_batch_loss(recorder))
    finally:
        recorder.inputs.clear()
        recorder.remove()


# --------------------------------------------------------------------------------------------
# Augmentation


def _image_pool(batches: Any, who: str) -> torch.Tensor:
    """Every sample of ``batches`` (floating ``[B, C, H, W]`` Tensors) in one tensor."""
    batches = normalize_calib(batches)
    if not all(isinstance(b, torch.Tensor) and b.dim() == 4 and b.is_floating_point() for b in batches):
        raise CalibrationError(f"{who} works on image batches: floating Tensors [B, C, H, W]")
    return torch.cat([b.detach() for b in batches])


def _random_crop_resize(img: torch.Tensor, scale: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (area fraction in ``scale``, aspect ratio in [3/4, 4/3]; the whole image
    when ten draws do not fit) back to the image's size, bilinear, then a horizontal flip with probability 1/2. ``img``: [C, H, W]."""
    _, h, w = img.shape
    for _ in range(10):  # torchvision's rule: ten tries at a box that fits, else the whole image
        u = torch.rand(4, generator=gen).tolist()
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = w, h
    top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
    crop = img[None, :, top: top + ch, left: left + cw]
    # Bilinear without antialiasing weighs each output by a convex combination of inputs: the
    # values stay within the source's range.
    out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else out


def _colour_jitter(img: torch.Tensor, low: torch.Tensor, span: torch.Tensor, colour: float,
                   gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and (3 channels) saturation factors in ``[1 - colour, 1 + colour]``,
    applied in ``[0, 1]`` units of the pool's per-channel range and clamped there."""
    u = (img - low) / span
    b, c, s = (1 + colour * (2 * torch.rand(3, generator=gen) - 1)).tolist()
    u = u * b
    u = (u - u.mean()) * c + u.mean()
    if u.shape[0] == 3:
        gray = u.mean(0, keepdim=True)
        u = gray + (u - gray) * s
    return low + u.clamp(0, 1) * span


def _mix(a: torch.Tensor, other: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """CutMix or mixup (equally likely) of two images [C, H, W]: a box of 25-50 % of the area
    pasted from ``other``, or ``lam a + (1 - lam) other`` with ``lam`` in [0.5, 0.8]."""
    u = torch.rand(4, generator=gen).tolist()
    _, h, w = a.shape
    if u[0] < 0.5:
        frac = 0.25 + 0.25 * u[1]
        bh, bw = max(1, round(h * math.sqrt(frac))), max(1, round(w * math.sqrt(frac)))
        top, left = int(u[2] * (h - bh + 1)), int(u[3] * (w - bw + 1))
        out = a.clone()
        out[:, top: top + bh, left: left + bw] = other[:, top: top + bh, left: left + bw]
        return out
    lam = 0.5 + 0.3 * u[1]
    return lam * a + (1 - lam) * other


@torch.no_grad()
def augment(
    batches: Any,
    n: int,
    *,
    seed: int = 0,
    mix: float = 0.5,
    colour: float = 0.4,
    scale: tuple[float, float] = (0.35, 1.0),
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """``n`` strongly augmented views of the samples in ``batches`` (floating ``[B, C, H, W]``
    image Tensors, any normalisation), in batches of ``batch_size``.

    The sources are drawn in seeded permutations of all samples (each used equally often).
    Each view: a random resized crop of ``scale`` (area fraction) and aspect ratio 3/4-4/3,
    resized back bilinearly, flipped horizontally with probability 1/2; colour jitter with
    brightness, contrast and saturation factors in ``[1 - colour, 1 + colour]`` (0 = off);
    with probability ``mix``, mixed with another view (CutMix of a 25-50 % box or mixup with
    weight 0.5-0.8, equally likely).

    Value range: every output value lies within its channel's ``[min, max]`` over all input
    samples (cropping, bilinear resizing and mixing are convex combinations; colour jitter
    is clamped to that range). Shapes and dtype are those of the inputs.
    """
    _check_int("n", n, 1)
    _check_int("batch_size", batch_size, 1)
    _check_augment_args(mix, colour, scale)
    pool = _image_pool(batches, "augment")
    dtype = pool.dtype
    pool = pool.float()
    low = pool.amin(dim=(0, 2, 3))[:, None, None]
    span = (pool.amax(dim=(0, 2, 3))[:, None, None] - low).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.cat([torch.randperm(len(pool), generator=gen) for _ in range(-(-n // len(pool)))])[:n]

    def view(i: int) -> torch.Tensor:
        img = _random_crop_resize(pool[i], scale, gen)
        return _colour_jitter(img, low, span, colour, gen) if colour else img

    views = []
    for i in order.tolist():
        img = view(i)
        if mix and torch.rand(1, generator=gen).item() < mix:
            img = _mix(img, view(int(torch.randint(len(pool), (1,), generator=gen))), gen)
        # Rounding in the arithmetic above can step a value a few ulps past the range.
        views.append(torch.maximum(torch.minimum(img, low + span), low))
    out = torch.stack(views).to(dtype)
    return [out[s: s + batch_size].clone() for s in range(0, n, batch_size)]


# --------------------------------------------------------------------------------------------
# Sources


def _parse(spec: str) -> frozenset[str]:
    parts = spec.split("+") if isinstance(spec, str) else None
    if not parts or any(p not in _PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"calibration source {spec!r}: expected one of {', '.join(SOURCES)}")
    chosen = frozenset(parts)
    if "augment" in chosen and "real" not in chosen:
        raise ConfigError(f"calibration source {spec!r}: augment works on real samples; add +real")
    return chosen


def calibration_source(
    spec: str,
    model: nn.Module,
    real: Any = None,
    shape: Sequence[int] | None = None,
    n: int = 128,
    seed: int = 0,
    *,
    batch_size: int = 32,
    synthesis: Synthesis = Synthesis(),
    augmentation: Augmentation = Augmentation(),
    synthetic: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Calibration batches from the source ``spec`` (one of :data:`SOURCES`, parts joined by
    ``+`` in any order): ``real`` (the real batches as given), ``synthetic`` (``n`` inputs from
    :func:`synthesize` with ``synthesis``), ``augment`` (``n`` views of the real samples from
    :func:`augment` with ``augmentation``).

    ``real``: image batches ``[B, C, H, W]`` (what ``compile`` takes), required by ``real``
    and ``augment``; for ``synthetic`` it supplies, when given, the shape, each channel's
    value range (inputs are kept within it) and each channel's input mean/std, nothing more.
    ``shape``: the per-sample shape ``[C, H, W]``, needed only when ``real`` is not given.
    ``synthetic``: batches an earlier :func:`synthesize` made, used instead of synthesising
    again (one synthesis for several sources). A source of more than one part is shuffled with
    ``seed`` and re-batched in ``batch_size``.
    """
    parts = _parse(spec)
    _check_int("n", n, 1)
    _check_int("batch_size", batch_size, 1)
    if real is None and parts & {"real", "augment"}:
        raise CalibrationError(f"calibration source {spec!r} needs real batches")
    if parts == {"real"}:
        return normalize_calib(real)
    pool = _image_pool(real, "calibration_source") if real is not None else None
    if shape is None:
        if pool is None:
            raise CalibrationError(f"calibration source {spec!r} needs the per-sample shape or real batches")
        shape = tuple(pool.shape[1:])
    elif pool is not None and tuple(shape) != tuple(pool.shape[1:]):
        raise CalibrationError(f"shape {tuple(shape)} differs from the real samples' {tuple(pool.shape[1:])}")
    pieces: list[torch.Tensor] = []
    if "real" in parts:
        pieces.append(pool)
    if "augment" in parts:
        pieces.extend(augment(pool, n, seed=seed, batch_size=batch_size,
                              **{f.name: getattr(augmentation, f.name) for f in fields(augmentation)}))
    if "synthetic" in parts:
        if synthetic is None:
            floats = None if pool is None else pool.float()
            stats = None if pool is None else (floats.mean((0, 2, 3)), floats.std((0, 2, 3)))
            bounds = None if pool is None else (floats.amin((0, 2, 3)), floats.amax((0, 2, 3)))
            synthetic = synthesize(model, shape, n, seed=seed, value_range=bounds, input_stats=stats,
                                   **{f.name: getattr(synthesis, f.name) for f in fields(synthesis)})
        synthetic = normalize_calib(synthetic)
        if any(not isinstance(b, torch.Tensor) or tuple(b.shape[1:]) != tuple(shape) for b in synthetic):
            raise CalibrationError(f"the given synthetic batches are not Tensors of per-sample shape {tuple(shape)}")
        if parts == {"synthetic"}:
            return synthetic
        pieces.extend(b.to(device=pool.device, dtype=pool.dtype) for b in synthetic)
    everything = torch.cat(pieces)
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(int(seed)))
    everything = everything[order.to(everything.device)]
    return [everything[s: s + batch_size].clone() for s in range(0, len(everything), batch_size)]
