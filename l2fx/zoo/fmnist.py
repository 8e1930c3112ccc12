"""Fashion-MNIST: the IDX reader, two small classifiers, their training recipe, calib and eval.

Data: the Debian package ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``)
puts the four IDX ``.gz`` files in ``/usr/share/datasets/fashion-mnist``; set
``$L2FX_FASHION_MNIST`` to a folder holding the same four files to read them from elsewhere.

Models: :class:`FmnistCNN` and :class:`FmnistResNet`, trained here by :func:`train_fmnist`
(seeded; 1-3 min on 2 CPU cores) the first time they are built, then loaded from
:func:`~l2fx.zoo.common.cache_dir` (``{name}-v{version}.safetensors``).

Calibration draws from the 60k training images, evaluation uses the 10k test images.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CalibrationError
from .common import (
    ZooError, batched_logits, cache_dir, check_calib_args, chunks, classifier_fidelity, data_root, threads,
)

__all__ = [
    "FMNIST_CLASSES",
    "fmnist_arrays",
    "fmnist_tensors",
    "FmnistCNN",
    "FmnistResNet",
    "BasicBlock",
    "RECIPES",
    "train_fmnist",
    "fmnist_accuracy",
    "weights_path",
    "build",
    "calib",
    "example_inputs",
    "evaluate",
    "fidelity",
]

# Where the Debian package dataset-fashion-mnist installs it (`dpkg -L dataset-fashion-mnist`).
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "L2FX_FASHION_MNIST"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Mean/std of the 60k training images scaled to [0, 1].
_MEAN, _STD = 0.2860, 0.3530
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_EVAL_BATCH = 1000


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned byte, the only type FMNIST uses
        raise ZooError(f"{path} is not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise ZooError(f"{path} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


@functools.lru_cache(maxsize=2)
def fmnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as (uint8 [N, 28, 28], int64 [N])."""
    if split not in _FILES:
        raise ZooError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = data_root(ENV_VAR, DEFAULT_DIR)
    paths = [root / f for f in _FILES[split]]
    if not all(p.is_file() for p in paths):
        raise ZooError(
            f"Fashion-MNIST not found in {root}: apt-get install -y dataset-fashion-mnist "
            f"(or point ${ENV_VAR} at a folder with the IDX .gz files)"
        )
    images, labels = (_read_idx(p) for p in paths)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ZooError(f"unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}")
    images.setflags(write=False)
    return images, labels.astype(np.int64)


@functools.lru_cache(maxsize=2)
def fmnist_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 images [N, 1, 28, 28] (the models' input) and int64 labels [N].

    Cached and shared between callers: treat as read-only (index or clone before editing).
    """
    images, labels = fmnist_arrays(split)
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(_MEAN)
    return x.div_(_STD).unsqueeze(1), torch.from_numpy(labels)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class FmnistCNN(nn.Module):
    """Plain Conv-BN-ReLU CNN, 28x28x1 -> 10 logits (~99k parameters).

    Three Conv-BN-ReLU blocks at 28, 14 and 7 pixels (16, 32, 64 channels), each followed by
    2x2 max-pooling, then a two-layer Linear head on the flattened 64x3x3 map. No residuals:
    the simplest fx graph to compress. Narrow on purpose: the 32/64/128-channel variant
    (one Linear head) cost ~1.6x per step on the 2-core CPU and reached 0.909 test accuracy
    after 2 epochs, against 0.902 for this one.
    """

    def __init__(self, width: int = 16, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, width), nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(4 * width * 3 * 3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class FmnistResNet(nn.Module):
    """Small ResNet for 28x28x1 (~166k parameters): stem, 4 BasicBlocks, avg-pool, Linear.

    Stages of two blocks each at 14x14 (32 channels) and 7x7 (64 channels); ``layers``
    holds the blocks in order, the unit block-reconstruction methods work on.
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_relu(1, width)
        self.layers = nn.Sequential(
            BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width),
            BasicBlock(2 * width, 4 * width, 2), BasicBlock(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@dataclass(frozen=True)
class Recipe:
    """How a zoo entry's model is made: its class and the training schedule of :func:`train_fmnist`."""

    factory: Callable[[], nn.Module]
    epochs: int
    lr: float
    # Bump when the architecture or recipe changes so stale cached weights are not reused.
    version: int = 1


RECIPES = {
    "fmnist-cnn": Recipe(FmnistCNN, epochs=2, lr=3e-3),
    "fmnist-resnet": Recipe(FmnistResNet, epochs=2, lr=3e-3),
}


@torch.inference_mode()
def fmnist_accuracy(model: nn.Module, batch_size: int = _EVAL_BATCH) -> float:
    """Top-1 accuracy on the full 10k Fashion-MNIST test split."""
    x, y = fmnist_tensors("test")
    return (batched_logits(model, x, batch_size).argmax(-1) == y).double().mean().item()


def train_fmnist(
    name: str, epochs: int | None = None, seed: int = 0, batch_size: int = 128, log=print
) -> nn.Module:
    """Train zoo model ``name`` on the 60k training split; returns it in eval mode.

    AdamW with a one-cycle schedule and random horizontal flips, seeded (same seed, same
    weights on the same machine and torch build). Uses all CPU cores while it runs.
    """
    if name not in RECIPES:
        raise ZooError(f"no Fashion-MNIST recipe {name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    epochs = recipe.epochs if epochs is None else int(epochs)
    x, y = fmnist_tensors("train")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = recipe.factory().to(memory_format=torch.channels_last)
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
    model.train()
    t0 = time.perf_counter()
    with threads(os.cpu_count() or 1):
        for epoch in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            total = 0.0
            for s in chunks(len(x), batch_size):
                idx = perm[s]
                xb = x[idx]
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb[flip] = xb[flip].flip(-1)
                loss = F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            if log:
                log(f"{name} epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
        model = model.to(memory_format=torch.contiguous_format).eval()
    return model


def weights_path(name: str) -> Path:
    """The cache file of ``name``'s trained weights (versioned by its recipe)."""
    return cache_dir() / f"{name}-v{RECIPES[name].version}.safetensors"


def build(name: str) -> nn.Module:
    """Load the cached trained weights, or train (1-3 min on 2 CPU cores) and cache them."""
    path = weights_path(name)
    model = RECIPES[name].factory()
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except (RuntimeError, OSError) as exc:  # stale or corrupt cache: retrain below
            print(f"l2fx.zoo: ignoring {path} ({exc}); retraining", file=sys.stderr)
    model = train_fmnist(name, log=lambda m: print("l2fx.zoo:", m, file=sys.stderr))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
    return model


def calib(num_samples: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``num_samples`` training images in a seeded random order, in batches of ``batch_size``."""
    check_calib_args(num_samples, batch_size)
    x, _ = fmnist_tensors("train")
    if num_samples > len(x):
        raise CalibrationError(f"Fashion-MNIST train has {len(x)} images, asked {num_samples}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [x[idx[s]].clone() for s in chunks(num_samples, batch_size)]


def example_inputs() -> tuple[torch.Tensor]:
    return (fmnist_tensors("test")[0][:2].clone(),)


def fidelity(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    x, _ = fmnist_tensors("test")
    return classifier_fidelity(batched_logits(model, x, _EVAL_BATCH), batched_logits(reference, x, _EVAL_BATCH))


def evaluate(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    """Accuracy on the 10k test images; with a reference also its :func:`classifier_fidelity`."""
    x, y = fmnist_tensors("test")
    logits = batched_logits(model, x, _EVAL_BATCH)
    out = {"accuracy": (logits.argmax(-1) == y).double().mean().item()}
    if reference is not None:
        out.update(classifier_fidelity(logits, batched_logits(reference, x, _EVAL_BATCH)))
    return out
