"""Methods: named pipelines over the shared passes, registered the way a user registers their own.

A method is a short list of passes: the shared front (``normalize``, ``fold_batchnorm``,
``prune_unused_state``, ``mark_weights``, ``plain_storage``), whatever the method does to choose
and round each weight, and the shared back (``rate_fit``, ``range_code``, ``lower_kernels``), so
that every method's artifact is counted, written, loaded and run the same way and one table
compares them honestly. ``l2fx.compile(model, target_cr, method="l2")`` (or
``CompileConfig.method``) picks one; :func:`methods` lists them.

A user method::

    def my_pipeline(config: l2fx.CompileConfig) -> l2fx.PassManager:
        return l2fx.method.pipeline("l2", config).insert_after("insert_transforms", MyPass())

    l2fx.register_method("l2+mine", my_pipeline, "L2 with my pass after T-insertion")
    l2fx.compile(model, 12, calib, method="l2+mine")
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from l2fx.config import CompileConfig
from l2fx.errors import ConfigError
from l2fx.passes import (BlockPartition, BlockReconstruction, CompoundPlan, EntropyAllocation, FoldBatchNorm,
                         InsertTransforms, KeepReference, LowerKernels, MarkWeights, NetworkDistillation, Normalize,
                         OneShotSolve, PlainStorage, PruneUnusedState, RangeCode, RateFit, RoundToNearest,
                         SensitivityAnalysis, SnapWeights)
from l2fx.passes import AssignFormat, BitValueGrid, InsertActQuant, SmolPrecision, SmolRound
from l2fx.pipeline import PassManager
from l2fx.precision import SmolOptions

__all__ = ["Method", "register_method", "methods", "get_method", "pipeline", "default_pipeline",
           "structural_pipeline", "front_pipeline", "rtn_pipeline", "format_pipeline", "compound_pipeline"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its name, a one-line description, and the function building its
    pipeline for a :class:`CompileConfig`."""

    name: str
    description: str
    build: Callable[[CompileConfig], PassManager]


_METHODS: dict[str, Method] = {}


def register_method(name: str, build: Callable[[CompileConfig], PassManager], description: str, *,
                    replace: bool = False) -> Method:
    """Registers ``build(config) -> PassManager`` as method ``name`` (what the built-ins use too)."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ConfigError(f"a method name must be a non-empty string without spaces, got {name!r}")
    if not callable(build):
        raise ConfigError(f"method {name!r}: build must be callable, got {type(build).__name__}")
    if name in _METHODS and not replace:
        raise ConfigError(f"method {name!r} is already registered (pass replace=True to redefine it)")
    _METHODS[name] = Method(name, description, build)
    return _METHODS[name]


def methods() -> dict[str, str]:
    """Registered methods: name -> description."""
    return {name: m.description for name, m in _METHODS.items()}


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; registered: {sorted(_METHODS)}") from None


def pipeline(method: str, config: CompileConfig | None = None) -> PassManager:
    """The pipeline of ``method`` for ``config`` (default ``CompileConfig()``)."""
    config = config or CompileConfig()
    pm = get_method(method).build(config)
    if not isinstance(pm, PassManager):
        raise ConfigError(f"method {method!r} built a {type(pm).__name__}, not a PassManager")
    return pm


def default_pipeline(config: CompileConfig | None = None) -> PassManager:
    """The pipeline :func:`l2fx.compile` runs for ``config``: that of ``config.method``."""
    config = config or CompileConfig()
    return pipeline(config.method, config)


# --------------------------------------------------------------------------------------------
# Shared parts


def structural_pipeline(fold_batchnorm: bool = True) -> PassManager:
    """Passes that only reshape the graph; :func:`l2fx.load` replays them on the user's model."""
    return PassManager([Normalize()] + ([FoldBatchNorm()] if fold_batchnorm else []) + [PruneUnusedState()])


def front_pipeline(config: CompileConfig) -> PassManager:
    """What every method starts with: the structural passes, which weights are compressed, and
    the plain tensors rounded to their storage dtype."""
    return structural_pipeline(config.fold_batchnorm).append(MarkWeights()).append(PlainStorage())


# --------------------------------------------------------------------------------------------
# Built-in methods


def l2_pipeline(config: CompileConfig) -> PassManager:
    """L2 (Shi et al.): measured rate-distortion curves, equal-slope allocation, joint T
    insertion, block reconstruction (T under Eq. 10, then weights), the common rate fit, range
    coding, lowering."""
    pm = front_pipeline(config)
    for p in (SensitivityAnalysis(), EntropyAllocation(), InsertTransforms()):
        pm.append(p)
    rec = config.reconstruction
    if rec.enabled:
        pm.append(BlockPartition())
        if rec.transform_iters or rec.weight_iters:
            # Every block starts on its budget (block_reconstruction's docstring says why),
            # the total in the middle of the tolerance, so the blocks' drift stays inside it.
            pm.append(RateFit("rate_prefill", tight=True))
            if rec.distill_iters:
                pm.append(KeepReference())
            pm.append(BlockReconstruction())
            if rec.distill_iters:
                pm.append(NetworkDistillation())
            pm.append(SnapWeights())
    # LowerKernels is last: it swaps supported layers for the fused kernel when the backend
    # config and the device allow it (on CPU with use_triton="auto" it changes nothing).
    for p in (RateFit(), RangeCode(), LowerKernels()):
        pm.append(p)
    return pm


register_method("l2", l2_pipeline, "L2 (Shi et al.): learned joint pruning + quantisation transform T, block "
                                   "reconstruction under a differentiable entropy estimate, range coding")


def oneshot_pipeline(recipe: str, *, then_l2: bool = False, **options) -> Callable[[CompileConfig], PassManager]:
    """The pipeline of a one-shot method: the allocation chooses each layer's grid from the
    measured sensitivities (as L2's does), then ``oneshot_solve`` runs ``recipe`` block by block
    on those grids, each block on its byte budget; ``then_l2``: L2's weight fine-tuning (stage
    (b) of block reconstruction, T kept) starts from the recipe's symbols."""
    def build(config: CompileConfig) -> PassManager:
        pm = front_pipeline(config)
        for p in (SensitivityAnalysis(), EntropyAllocation(), InsertTransforms(), BlockPartition(),
                  RateFit("rate_prefill")):
            pm.append(p)
        if then_l2:  # the solve moves the weights: reconstruction's targets come from the originals
            pm.append(KeepReference())
        # Nothing after the solve writes the weights unless L2 follows: hold them as symbols.
        pm.append(OneShotSolve(recipe, hold_symbols=not then_l2, **options))
        if then_l2:
            pm.append(BlockReconstruction(train_transform=False))
            # Network distillation (distill_iters > 0) against the original model; with 0 it
            # only drops the references (a float32 copy of every weight).
            pm.append(NetworkDistillation())
            pm.append(SnapWeights())
        for p in (RateFit(), RangeCode(), LowerKernels()):
            pm.append(p)
        return pm

    return build


_ONESHOT = {
    "gptq": ("gptq", {}, "GPTQ (Frantar et al.): column-wise quantisation with Hessian error feedback"),
    "sparsegpt": ("sparsegpt", {"sparsity": 0.5}, "SparseGPT: 50 % unstructured pruning jointly with quantisation"),
    "sparsegpt-2:4": ("sparsegpt", {"prune_n": 2, "prune_m": 4}, "SparseGPT: 2:4 pruning jointly with quantisation"),
    "wanda": ("wanda", {"sparsity": 0.5}, "Wanda: 50 % pruning by |w| ||x|| per row, then round to nearest"),
    "wanda-2:4": ("wanda", {"prune_n": 2, "prune_m": 4}, "Wanda 2:4, then round to nearest"),
    "obq": ("obq", {}, "OBQ (OBC): exact greedy quantisation with OBS updates, where tractable"),
    "obc-2:4": ("obc", {"prune_n": 2, "prune_m": 4}, "OBC compound: exact OBS 2:4 pruning, then OBQ"),
    "adaround": ("adaround", {}, "AdaRound: learned up/down rounding against the layer loss"),
    "adaquant": ("adaquant", {}, "AdaQuant: weights and steps learned through the STE"),
    "adaprune+adaquant-2:4": ("adaprune+adaquant", {"prune_n": 2, "prune_m": 4},
                              "AdaPrune 2:4 then AdaQuant: the OBC paper's compound baseline"),
    "rtn": ("rtn", {}, "round to nearest on the allocated grid (the one-shot baseline)"),
}
for _name, (_recipe, _opts, _desc) in _ONESHOT.items():
    register_method(_name, oneshot_pipeline(_recipe, **_opts), _desc + "; grids and bytes from L2's allocation")
register_method("gptq+l2", oneshot_pipeline("gptq", then_l2=True),
                "GPTQ's symbols as the starting point of L2's weight fine-tuning (block reconstruction stage (b))")


def compound_pipeline(recipe: str) -> Callable[[CompileConfig], PassManager]:
    """The pipeline of a compound method (OBC appendix A.10): ``compound_plan`` chooses every
    layer's option from {dense, 2:4} x {8, 4} weight bits (or ``method_options`` ``bop_options``)
    by a DP over its error table (the layer losses of ``recipe``) under ``method_options``
    ``bop_reduction``, fixing each layer's
    grid and pattern; ``oneshot_solve`` then applies them with the same recipe, block by block
    on the compressed prefix's inputs, and ``range_code`` counts and writes every byte as for any
    method. The BOP target is what the method meets; its bytes follow from the plan, so
    ``target_cr`` is not a constraint (not checked; the report's CR is the result)."""
    def build(config: CompileConfig) -> PassManager:
        pm = front_pipeline(config)
        for p in (CompoundPlan(recipe), InsertActQuant(), SensitivityAnalysis(), EntropyAllocation(check_target=False),
                  InsertTransforms(), BlockPartition(), OneShotSolve(recipe, hold_symbols=True),
                  RangeCode(check_target=False),
                  LowerKernels()):
            pm.append(p)
        return pm

    return build


register_method("obc-compound", compound_pipeline("obc-compound"),
                "OBC compound (appendix A.10): per layer {dense, 2:4} x {8, 4} bits (or bop_options) chosen "
                "by a DP under method_options bop_reduction (activations fp32, or w+a options such as "
                "dense-w8a8), ExactOBS tables and solves; "
                "CR is the result")
register_method("adaprune+adaquant-compound", compound_pipeline("adaprune+adaquant-compound"),
                "the same DP over AdaPrune+AdaQuant (dense: AdaQuant) tables and solves: OBC's compound baseline")


def smol_pipeline(per_layer: bool) -> Callable[[CompileConfig], PassManager]:
    """SMOL (seed 004): precisions learned by noise injection on block outputs (Eq. 12), one per
    parameter or, ``per_layer``, one per layer (SMOL-L, Appendix D); then every weight rounded to
    its integer precision on the bit-value grid, one per-model offset fitting the counted bytes
    (zero precision = pruned); range coded like every method (the symbols carry the map).
    Options: :class:`l2fx.precision.SmolOptions` via ``CompileConfig.method_options``."""
    def build(config: CompileConfig) -> PassManager:
        SmolOptions.from_pairs(config.method_options, per_layer)  # a bad option fails when the method is built
        pm = front_pipeline(config)
        for p in (BitValueGrid(per_layer), BlockPartition(), SmolPrecision(per_layer), SmolRound(per_layer),
                  RangeCode(), LowerKernels()):
            pm.append(p)
        return pm

    return build


register_method("smol", smol_pipeline(False), "SMOL: a precision per parameter learned by noise injection "
                                              "(Eq. 12) on block outputs, zero precision pruned, the map range coded")
register_method("smol-l", smol_pipeline(True), "SMOL-L: one learned precision per layer (SMOL's Appendix D)")


def rtn_pipeline(bits: int, prune_fraction: float = 0.0, fold_batchnorm: bool = True) -> PassManager:
    """Baseline, not a method (it reaches whatever CR ``bits`` gives): RTN per channel,
    optionally after magnitude pruning, then range coding in l2fx's byte accounting."""
    pm = structural_pipeline(fold_batchnorm)
    for p in (MarkWeights(), PlainStorage(), RoundToNearest(bits, prune_fraction), RangeCode(check_target=False)):
        pm.append(p)
    return pm


def format_pipeline(fmt, config: CompileConfig | None = None) -> PassManager:
    """Baseline, not a method (it reaches whatever CR the format gives; ``target_cr`` is not
    checked): every weight no ``layers`` rule names stored in block format ``fmt`` (MXFP4, MXFP8,
    MXINT8, HBFP ...) as its spec quantises it, then range coded in l2fx's byte accounting. Its
    measured CR is the target at which to compare a method against the format."""
    config = config or CompileConfig()
    pm = front_pipeline(config)
    for p in (AssignFormat(fmt), SensitivityAnalysis(), EntropyAllocation(check_target=False), InsertTransforms(),
              RangeCode(check_target=False), LowerKernels()):
        pm.append(p)
    return pm

