"""The built-in passes, in pipeline order, and the pipelines made of them.

Each pass is its own module with its pre/postconditions in the docstring. ``default_pipeline``
is what :func:`l2fx.compile` runs; users insert their own passes with
``default_pipeline().insert_after("rate_fit", MyPass())``.
"""
from __future__ import annotations

from l2fx.passes.allocation import EntropyAllocation
from l2fx.passes.fold_batchnorm import FoldBatchNorm
from l2fx.passes.insert_transforms import InsertTransforms
from l2fx.passes.mark_weights import MarkWeights
from l2fx.passes.normalize import Normalize
from l2fx.passes.plain_storage import PlainStorage
from l2fx.passes.prune_state import PruneUnusedState
from l2fx.passes.range_code import RangeCode
from l2fx.passes.rate_fit import RateFit
from l2fx.passes.sensitivity import SensitivityAnalysis
from l2fx.pipeline import PassManager

__all__ = [
    "Normalize", "FoldBatchNorm", "PruneUnusedState", "MarkWeights", "PlainStorage", "SensitivityAnalysis",
    "EntropyAllocation", "InsertTransforms", "RateFit", "RangeCode", "structural_pipeline", "default_pipeline",
]


def structural_pipeline(fold_batchnorm: bool = True) -> PassManager:
    """Passes that only reshape the graph; :func:`l2fx.load` replays them on the user's model."""
    passes = [Normalize()] + ([FoldBatchNorm()] if fold_batchnorm else []) + [PruneUnusedState()]
    return PassManager(passes)


def default_pipeline(fold_batchnorm: bool = True) -> PassManager:
    """The compression pipeline.

    Block reconstruction (learning T and fine-tuning weights, paper Sec. 4-5) belongs between
    ``insert_transforms`` and ``rate_fit``; until its pass exists the pipeline compresses from
    the sensitivity-driven allocation alone.
    """
    pm = structural_pipeline(fold_batchnorm)
    for p in (MarkWeights(), PlainStorage(), SensitivityAnalysis(), EntropyAllocation(), InsertTransforms(),
              RateFit(), RangeCode()):
        pm.append(p)
    return pm
