"""The built-in passes, in pipeline order, and the pipelines made of them.

Each pass is its own module with its pre/postconditions in the docstring. ``default_pipeline``
is what :func:`l2fx.compile` runs; users insert their own passes with
``default_pipeline().insert_after("rate_fit", MyPass())``.
"""
from __future__ import annotations

from l2fx.config import CompileConfig
from l2fx.passes.allocation import EntropyAllocation
from l2fx.passes.block_partition import BlockPartition
from l2fx.passes.block_reconstruction import BlockReconstruction
from l2fx.passes.fold_batchnorm import FoldBatchNorm
from l2fx.passes.insert_transforms import InsertTransforms
from l2fx.passes.lower_kernels import LowerKernels
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
    "EntropyAllocation", "InsertTransforms", "BlockPartition", "BlockReconstruction", "RateFit", "RangeCode",
    "LowerKernels", "structural_pipeline", "default_pipeline",
]


def structural_pipeline(fold_batchnorm: bool = True) -> PassManager:
    """Passes that only reshape the graph; :func:`l2fx.load` replays them on the user's model."""
    passes = [Normalize()] + ([FoldBatchNorm()] if fold_batchnorm else []) + [PruneUnusedState()]
    return PassManager(passes)


def default_pipeline(config: CompileConfig | None = None) -> PassManager:
    """The compression pipeline for ``config`` (default: ``CompileConfig()``).

    With ``config.reconstruction.enabled``, block reconstruction (learning T, then fine-tuning
    weights, block by block; paper Sec. 4-5) runs between ``insert_transforms`` and ``rate_fit``.
    """
    config = config or CompileConfig()
    pm = structural_pipeline(config.fold_batchnorm)
    passes = [MarkWeights(), PlainStorage(), SensitivityAnalysis(), EntropyAllocation(), InsertTransforms()]
    if config.reconstruction.enabled:
        passes += [BlockPartition(), BlockReconstruction()]
    # LowerKernels is last: it swaps supported layers for the fused kernel when the backend
    # config and the device allow it (on CPU with use_triton="auto" it changes nothing).
    for p in passes + [RateFit(), RangeCode(), LowerKernels()]:
        pm.append(p)
    return pm
