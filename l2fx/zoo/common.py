"""What every zoo family shares: the error type, the cache, optional imports, batching, fidelity.

Nothing here knows a model or a data set. The family modules (:mod:`l2fx.zoo.fmnist`,
:mod:`~l2fx.zoo.photos`, :mod:`~l2fx.zoo.lite0`, :mod:`~l2fx.zoo.pydocs`,
:mod:`~l2fx.zoo.minilm`) import from here, never from each other's internals and never from
the package ``l2fx.zoo`` itself (that would be an import cycle).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, L2fxError

__all__ = [
    "ZooError",
    "cache_dir",
    "data_root",
    "require",
    "pil",
    "check_calib_args",
    "chunks",
    "threads",
    "batched_logits",
    "classifier_fidelity",
]


class ZooError(L2fxError):
    """A zoo model or its data cannot be provided (missing package, data or unknown name)."""


def cache_dir() -> Path:
    """``$L2FX_CACHE`` or ``~/.cache/l2fx``, created on first use."""
    path = Path(os.environ.get("L2FX_CACHE") or Path.home() / ".cache" / "l2fx")
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root(variable: str, default: Path) -> Path:
    """The folder ``$variable`` names, else ``default`` (where a Debian data package puts it)."""
    return Path(os.environ.get(variable) or default)


def require(module: str, install: str):
    """Import an optional third-party ``module``; :class:`ZooError` naming ``install`` if absent.

    The one sanctioned function-level import in the zoo: the heavy optional packages
    (transformers, efficientnet_lite_pytorch, sklearn, skimage, PIL) are only needed by the
    entries that use them, and importing them at module level would make ``import l2fx`` slow
    and fail where they are not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ZooError(f"the zoo needs the Python module {module!r}: {install}") from exc


def pil():
    """``PIL.Image`` (JPEG decoding and bicubic resizing of the photos)."""
    return require("PIL.Image", "pip install pillow")


def check_calib_args(num_samples: int, batch_size: int) -> None:
    if int(num_samples) < 1 or int(batch_size) < 1:
        raise CalibrationError(
            f"calib needs num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}"
        )


_Batch = TypeVar("_Batch")


def text_calib(pool: Sequence[str], num_samples: int, batch_size: int, seed: int,
               tokenize: Callable[[list[str]], _Batch]) -> list[_Batch]:
    """``num_samples`` paragraphs of ``pool`` drawn without replacement with ``seed``, tokenized
    in batches of ``batch_size`` (the text models' calibration sets)."""
    check_calib_args(num_samples, batch_size)
    if num_samples > len(pool):
        raise CalibrationError(f"{len(pool)} calibration paragraphs available, asked {num_samples}")
    rng = np.random.default_rng(seed)
    texts = [pool[i] for i in rng.choice(len(pool), size=num_samples, replace=False)]
    return [tokenize(texts[s]) for s in chunks(num_samples, batch_size)]


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2 size), ...`` covering ``range(n)``; the last may be shorter."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@contextlib.contextmanager
def threads(n: int):
    """Run with ``n`` intra-op threads, restoring the previous setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model(x)`` in eval mode, ``batch_size`` rows at a time, as float32."""
    model.eval()
    return torch.cat([model(x[s]).float() for s in chunks(len(x), batch_size)])


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
