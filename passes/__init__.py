"""The built-in passes, one module each, with their pre/postconditions in the docstring.

Passes never import each other: what two passes share lives in ``l2fx`` below them
(``l2fx.blocks``, ``l2fx.bytefit``, ``l2fx.optim``, ``l2fx.tparams``, ...). The pipelines made of
them are methods (:mod:`l2fx.method`); users insert their own passes with
``l2fx.method.pipeline("l2", config).insert_after("rate_fit", MyPass())``.
"""
from __future__ import annotations

from l2fx.passes.allocation import EntropyAllocation
from l2fx.passes.assign_format import AssignFormat
from l2fx.passes.baselines import RoundToNearest
from l2fx.passes.bit_value_grid import BitValueGrid
from l2fx.passes.block_partition import BlockPartition
from l2fx.passes.block_reconstruction import BlockReconstruction
from l2fx.passes.compound_plan import CompoundPlan
from l2fx.passes.distill import KeepReference, NetworkDistillation
from l2fx.passes.fold_batchnorm import FoldBatchNorm
from l2fx.passes.given_precision import GivenPrecision
from l2fx.passes.insert_act_quant import InsertActQuant
from l2fx.passes.insert_transforms import InsertTransforms
from l2fx.passes.install_weights import DecodedLayer, InstallDecodedWeights
from l2fx.passes.lower_kernels import LowerKernels
from l2fx.passes.mark_weights import MarkWeights
from l2fx.passes.normalize import Normalize
from l2fx.passes.oneshot import OneShotSolve
from l2fx.passes.plain_storage import PlainStorage
from l2fx.passes.prune_state import PruneUnusedState
from l2fx.passes.range_code import RangeCode
from l2fx.passes.rate_fit import RateFit
from l2fx.passes.sensitivity import SensitivityAnalysis
from l2fx.passes.smol_precision import SmolPrecision
from l2fx.passes.smol_round import SmolRound
from l2fx.passes.snap import SnapWeights

__all__ = [
    "Normalize", "FoldBatchNorm", "PruneUnusedState", "MarkWeights", "PlainStorage", "SensitivityAnalysis",
    "EntropyAllocation", "InsertTransforms", "BlockPartition", "KeepReference", "BlockReconstruction",
    "NetworkDistillation", "SnapWeights", "RateFit", "RangeCode", "LowerKernels", "RoundToNearest",
    "InstallDecodedWeights", "DecodedLayer", "OneShotSolve", "CompoundPlan", "InsertActQuant",
    "BitValueGrid", "SmolPrecision", "GivenPrecision", "SmolRound", "AssignFormat",
]
