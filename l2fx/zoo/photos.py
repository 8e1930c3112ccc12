"""Real photos that ship inside installed packages: labelled samples and calibration photos.

Labelled samples: the ``foolbox/data/`` folder of the ``foolbox==3.3.4`` package, 20 each of
ImageNet (JPEG), CIFAR-10, CIFAR-100, MNIST and Fashion-MNIST (PNG), the label in the file
name (``imagenet_07_609.jpg``: label 609). Install it with

    pip install --no-deps foolbox==3.3.4

(``scripts/setup.sh`` does). The folder is located with ``importlib.util.find_spec`` and read
as files: foolbox itself is never imported, so its own dependencies (eagerpy, ...) are not
needed. Nothing is downloaded at run time.

Calibration photos: scikit-learn's two sample images and the photos bundled in the
scikit-image wheel (``pip install scikit-learn scikit-image``). They are disjoint from the
labelled samples, which are reserved for evaluation.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import io
import re
from pathlib import Path

import numpy as np

from .common import ZooError, pil, require

__all__ = ["FOOLBOX", "FOOLBOX_INSTALL", "foolbox_data_dir", "foolbox_samples", "imagenet_photos",
           "calibration_photos"]

FOOLBOX = "foolbox==3.3.4"
FOOLBOX_INSTALL = f"pip install --no-deps {FOOLBOX}"
_FOOLBOX_KINDS = {"imagenet": "jpg", "cifar10": "png", "cifar100": "png", "mnist": "png", "fashionMNIST": "png"}
_SAMPLES_PER_KIND = 20

# RGB photos shipped inside the scikit-image wheel (no pooch download), checked with
# scikit-image 0.26: lily, eagle, skin, kidney need a download and are left out; `cat` is
# `chelsea`. Grayscale ones are replicated to 3 channels.
_SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "stereo_motorcycle", "camera", "clock", "coins", "moon", "grass", "gravel", "brick",
)


def foolbox_data_dir() -> Path:
    """The installed ``foolbox/data/`` folder; :class:`ZooError` naming the install otherwise.

    ``find_spec`` of a top-level name searches ``sys.path`` without executing the package.
    The version is read from the installed metadata, since other releases may ship other samples.
    """
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(f"the labelled sample photos come from the {FOOLBOX} package: {FOOLBOX_INSTALL}")
    try:
        version = importlib.metadata.version("foolbox")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if version != FOOLBOX.split("==")[1]:
        raise ZooError(f"found foolbox {version} at {folder.parent}, the samples need {FOOLBOX}: {FOOLBOX_INSTALL}")
    if not folder.is_dir():
        raise ZooError(f"{folder} is missing (an incomplete foolbox install?): {FOOLBOX_INSTALL}")
    return folder


@functools.lru_cache(maxsize=len(_FOOLBOX_KINDS))
def foolbox_samples(kind: str) -> tuple[tuple[str, int, np.ndarray], ...]:
    """The 20 labelled ``kind`` samples of foolbox as (file name, label, uint8 HxWx3), by name.

    ``kind``: ``imagenet`` (varied sizes), ``cifar10``, ``cifar100`` (32x32), ``mnist``,
    ``fashionMNIST`` (28x28, replicated to 3 channels by the RGB conversion).
    """
    if kind not in _FOOLBOX_KINDS:
        raise ZooError(f"unknown foolbox sample kind {kind!r}; known: {', '.join(_FOOLBOX_KINDS)}")
    Image = pil()
    pattern = re.compile(rf"{kind}_\d+_(\d+)\.{_FOOLBOX_KINDS[kind]}")
    samples = []
    for path in sorted(foolbox_data_dir().iterdir()):
        m = pattern.fullmatch(path.name)
        if m and path.is_file():
            rgb = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
            samples.append((path.name, int(m.group(1)), rgb))
    if len(samples) != _SAMPLES_PER_KIND:
        raise ZooError(f"expected {_SAMPLES_PER_KIND} labelled {kind} samples in {FOOLBOX}, found {len(samples)}")
    return tuple(samples)


def imagenet_photos() -> tuple[tuple[str, int, np.ndarray], ...]:
    """The 20 labelled ImageNet photos of foolbox as (file name, label, uint8 HxWx3).

    The label is the last number of the file name (``imagenet_07_609.jpg`` -> 609). These
    are reserved for evaluation: calibration never sees them.
    """
    return foolbox_samples("imagenet")


@functools.lru_cache(maxsize=1)
def calibration_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """Unlabelled photos for calibration as (name, uint8 HxWx3); disjoint from evaluation.

    scikit-learn's two sample images plus the scikit-image photos that ship in its wheel.
    """
    datasets = require("sklearn.datasets", "pip install scikit-learn")
    sk_data = require("skimage.data", "pip install scikit-image")
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
