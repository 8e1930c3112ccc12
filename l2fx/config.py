"""User intent and backend capability, as frozen dataclasses with validation and a JSON round trip.

``CompileConfig`` says *what* the user wants (target CR, transform kind, how hard to look at
calibration data); ``BackendConfig`` says what the runtime can execute (bit widths and
layouts of the kernels). Both validate in ``__post_init__`` and raise :class:`ConfigError`
naming the field, so a bad value fails at construction rather than deep inside a pass.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import typing
from typing import Any, Mapping

from l2fx.counter import CounterConfig
from l2fx.errors import ConfigError, TargetCRError
from l2fx.transform import FORMAT_KINDS, TransformKind


class Granularity(str, enum.Enum):
    """How many (threshold_e, step_s) pairs a weight gets: one per output channel, one per group
    of ``CompileConfig.group_size`` consecutive elements of each row, or one."""

    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_TENSOR = "per_tensor"


class PlainDtype(str, enum.Enum):
    """Storage dtype for tensors that are not range coded (biases, norms, buffers)."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _from_jsonable(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _from_jsonable(args[0], value)
    if origin in (tuple,):
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_from_jsonable(inner, v) for v in value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp.from_dict(value)
    return value


class _JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``to_json``/``from_json`` for a frozen dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**{k: _from_jsonable(hints[k], v) for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _require(cond: bool, cls_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{cls_name}: {msg}")


#: ``SensitivityConfig.output_metric``: how a model output's distortion is measured
#: (:func:`l2fx.data.output_distortion`).
OUTPUT_METRICS = ("mse", "kl")


@dataclasses.dataclass(frozen=True)
class SensitivityConfig(_JsonConfig):
    """How the per-layer rate-distortion curves are measured (sensitivity analysis pass).

    Candidate steps are spaced ``step_ratio`` apart (2 ** 0.5 is half a bit per weight at high
    rate) over ``num_steps`` candidates, each tried with every dead-zone ratio e/s in
    ``deadzones`` (0.5 = no dead zone, i.e. linear quantisation). Every candidate's bytes are
    exact; its model-output error is measured on ``num_samples`` calibration inputs for
    ``measured_points`` candidates per dead-zone family and, for the others, scaled from the
    weight error by the measured output-error/weight-error ratio (interpolated in log space).

    ``fit``: how the measured points of a family become its curve: ``"interpolate"`` (each
    measured point as it is, ratios interpolated between them) or ``"least_squares"`` (with 3 or
    more measured points, a least-squares line of log(output error / weight MSE) against log weight
    MSE, measured points included: one noisy measurement does not bend the curve).

    ``joint_rounds``: rounds of the allocation's interaction correction (0: off). Each measures
    the chosen allocation's joint output error (all layers compressed) and, per layer, its
    marginal share (the error drop when that layer alone is restored), rescales the layer's curve
    by marginal / predicted, re-allocates at the same bytes and keeps the result only when its
    measured joint error is lower; the report has predicted vs measured per round. Cost: about
    one model evaluation per layer and round, on the ``num_samples`` inputs.

    ``scope``: where a candidate's distortion is measured. ``"model"`` (the default): the model's
    output with only this layer compressed (what the allocation's additivity assumes; each
    measurement re-runs the model downstream of the layer, so the pass costs O(depth^2) model
    blocks and holds every node's value on the ``num_samples`` inputs). ``"layer"``: the outputs
    of the ops reading the weight, ``sum ||op(x, W_hat) - op(x, W)||^2 / sum ||op(x, W)||^2``
    on their inputs in the uncompressed model: one run of the model, each value freed after its
    last use, so time is linear in depth and memory one block's activations; a proxy that
    weighs every layer's relative error alike (for models too deep to measure at the output,
    e.g. decoder LLMs; ``joint_rounds`` needs ``"model"``).

    ``output_metric``: the distortion of the model's output (``scope="model"`` and
    ``joint_rounds``). ``"mse"`` (the default): squared error of every floating output relative
    to its energy, for any model. ``"kl"``: the mean KL divergence of the first output's softmax
    (over its last dimension: a classifier's or a language model's logits) from the uncompressed
    model's, what perplexity, top-1 agreement and the benchmarks' KL measure. With either, on a
    language model's ``[batch, tokens, vocabulary]`` logits only the positions the samples'
    ``attention_mask`` keeps count (padding excluded, as from perplexity). Logit MSE weighs a
    vocabulary's improbable tokens like the likely ones, so it undervalues layers that move the
    likely logits: SmolLM2's tied embedding/output table is one (docs/methods.md has the figures).

    ``formats``: block formats (``TransformKind.MXFP4_E2M1``, ``"mxfp8_e4m3"``, ...) offered to
    every allocated layer as candidates besides its grids: each format one candidate, its bytes
    exact and its output error measured (one model evaluation per layer and format). Where the
    allocation picks one, the layer is stored in that format exactly as a ``layers`` rule's
    ``format=`` stores it. Empty (the default): grids only.
    """

    num_samples: int = 8
    num_steps: int = 14
    step_ratio: float = 2 ** 0.5
    deadzones: tuple[float, ...] = (0.5, 1.0)
    measured_points: int = 2
    formats: tuple[TransformKind, ...] = ()
    joint_rounds: int = 0
    fit: str = "interpolate"
    scope: str = "model"
    output_metric: str = "mse"

    def __post_init__(self) -> None:
        n = type(self).__name__
        _require(self.num_samples >= 1, n, f"num_samples must be >= 1, got {self.num_samples}")
        _require(self.num_steps >= 2, n, f"num_steps must be >= 2, got {self.num_steps}")
        _require(self.step_ratio > 1.0, n, f"step_ratio must be > 1, got {self.step_ratio}")
        _require(self.measured_points >= 1, n, f"measured_points must be >= 1, got {self.measured_points}")
        _require(len(self.deadzones) >= 1 and all(d >= 0.5 for d in self.deadzones), n,
                 f"deadzones must be non-empty ratios e/s >= 0.5, got {self.deadzones}")
        _require(isinstance(self.formats, (tuple, list)) and all(f in FORMAT_KINDS for f in self.formats), n,
                 f"formats must be block formats ({[k.value for k in FORMAT_KINDS]}), got {self.formats!r}")
        _require(isinstance(self.joint_rounds, int) and not isinstance(self.joint_rounds, bool)
                 and 0 <= self.joint_rounds <= 16, n, f"joint_rounds must be an int in 0..16, got {self.joint_rounds!r}")
        _require(self.fit in ("interpolate", "least_squares"), n,
                 f"fit must be 'interpolate' or 'least_squares', got {self.fit!r}")
        _require(self.scope in ("model", "layer"), n, f"scope must be 'model' or 'layer', got {self.scope!r}")
        _require(self.output_metric in OUTPUT_METRICS, n,
                 f"output_metric must be one of {OUTPUT_METRICS}, got {self.output_metric!r}")
        _require(self.scope == "model" or self.output_metric == "mse", n,
                 "output_metric measures the model's output: it needs scope='model' (scope='layer' measures each "
                 "weight at its own ops)")
        _require(self.scope == "model" or self.joint_rounds == 0, n,
                 "joint_rounds re-weights curves measured at the model output: it needs scope='model'")
        formats = tuple(TransformKind(f) for f in self.formats)
        _require(len(set(formats)) == len(formats), n, f"formats holds a format twice: {[f.value for f in formats]}")
        object.__setattr__(self, "formats", formats)


@dataclasses.dataclass(frozen=True)
class CodingConfig(_JsonConfig):
    """Range-code lowering: symbol alphabet and chunking."""

    qmax: int = 127
    chunk_size: int = 1 << 16

    def __post_init__(self) -> None:
        n = type(self).__name__
        _require(1 <= self.qmax <= 127, n, f"qmax must be in [1, 127] (int8 symbols), got {self.qmax}")
        _require(self.chunk_size >= 1024, n, f"chunk_size must be >= 1024, got {self.chunk_size}")


class LRSchedule(str, enum.Enum):
    """Learning-rate schedule of both reconstruction stages."""

    CONSTANT = "constant"
    COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig(_JsonConfig):
    """Block reconstruction (paper Sec. 4.1 Eq. 10, Sec. 5.1, A.1): per block, first train the
    T parameters (``transform_iters`` Adam steps at ``lr_transform`` on log s, log e) against
    the block-output MSE plus ``entropy_lambda * ReLU(bits / budget - 1)``, then fine-tune the
    weights through the STE (``weight_iters`` steps at ``lr_weight``) against the MSE alone,
    together with the block's plain parameters (``tune_plain``, at ``lr_plain``).

    ``weight_radius``: fine-tuned weights stay within this many steps ``s`` of their fp32
    value (0 = unbounded). Adam's steps are absolute, so they are capped where the model's
    scale is small: ``lr_weight`` at a tenth of each weight's step ``s``, ``lr_plain`` at
    ``lr_plain`` times the RMS of the block's fp32 output. ``batch_size`` samples per step, drawn from the calibration set (at most ``max_samples``
    of it; 0 = all). ``qdrop_prob``: per sample, the probability of feeding the block its fp32
    input instead of the compressed one (QDrop). ``counter`` relaxes the entropy (Eq. 14-19).
    The MSE is relative to the target's mean square and the rate term to the block's budget,
    so one ``entropy_lambda`` serves every block and model.
    """

    enabled: bool = True
    # 40 + 200 steps of 32 samples. Fashion-MNIST ResNet (512 calibration images, 2-core CPU,
    # quiet), CR 15 / CR 20: 80 weight steps KL 0.0017 / 0.0059 in 10 s, 200 steps 0.0010 /
    # 0.0038 in 20-24 s, 800 steps 0.0010 / 0.0033 in 54-61 s. The paper runs 1500 + 5000 on
    # a GPU (Sec. 5.1).
    transform_iters: int = 40
    weight_iters: int = 200
    batch_size: int = 32
    lr_transform: float = 5e-3
    lr_weight: float = 1e-4
    weight_radius: float = 0.5
    lr_schedule: LRSchedule = LRSchedule.COSINE
    entropy_lambda: float = 1.0
    qdrop_prob: float = 0.0
    max_samples: int = 0
    # Network-level distillation after the blocks (paper Sec. 5.1, A.1): ``distill_iters``
    # steps fine-tuning every weight at once (T frozen) against the MSE of the network output
    # (weight ``distill_output_weight``) plus the MSE of every block's output, each relative
    # to its fp32 mean square, fp32 targets computed on the fly. 0 = off.
    distill_iters: int = 0
    distill_output_weight: float = 1.0
    # Stage (b) also tunes the block's plain parameters (biases, incl. folded BatchNorm shifts,
    # and norm scales/shifts read only inside the block) at ``lr_plain``: stored as float16
    # whatever their value, they cost no byte, and they absorb the mean shift rounding leaves
    # in a layer's output (bias correction, Nagel et al. 2019), large in depthwise convs.
    tune_plain: bool = True
    lr_plain: float = 1e-3
    # 2**14 weights per layer per step, as in the paper's A.2.
    counter: CounterConfig = CounterConfig(max_samples=1 << 14)

    def __post_init__(self) -> None:
        n = type(self).__name__
        _require(isinstance(self.enabled, bool), n, f"enabled must be a bool, got {self.enabled!r}")
        for name in ("transform_iters", "weight_iters", "max_samples", "distill_iters"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, n,
                     f"{name} must be an int >= 0, got {v!r}")
        _require(isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size >= 1,
                 n, f"batch_size must be an int >= 1, got {self.batch_size!r}")
        _require(isinstance(self.tune_plain, bool), n, f"tune_plain must be a bool, got {self.tune_plain!r}")
        for name in ("lr_transform", "lr_weight", "lr_plain"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, n, f"{name} must be > 0, got {v!r}")
        _require(isinstance(self.weight_radius, (int, float)) and math.isfinite(self.weight_radius)
                 and self.weight_radius >= 0, n, f"weight_radius must be >= 0, got {self.weight_radius!r}")
        _require(isinstance(self.lr_schedule, LRSchedule), n, f"lr_schedule must be an LRSchedule, got {self.lr_schedule!r}")
        _require(isinstance(self.entropy_lambda, (int, float)) and math.isfinite(self.entropy_lambda)
                 and self.entropy_lambda >= 0, n, f"entropy_lambda must be >= 0, got {self.entropy_lambda!r}")
        _require(isinstance(self.qdrop_prob, (int, float)) and 0.0 <= self.qdrop_prob <= 1.0, n,
                 f"qdrop_prob must be in [0, 1], got {self.qdrop_prob!r}")
        _require(isinstance(self.counter, CounterConfig), n, f"counter must be a CounterConfig, got {self.counter!r}")
        _require(isinstance(self.distill_output_weight, (int, float)) and math.isfinite(self.distill_output_weight)
                 and self.distill_output_weight >= 0, n,
                 f"distill_output_weight must be >= 0, got {self.distill_output_weight!r}")


@dataclasses.dataclass(frozen=True)
class LayerRule(_JsonConfig):
    """What the user wants of the compressible weights whose name matches ``pattern``.

    ``pattern`` is a regular expression matched in full against the weight's module path
    (``"features.0"``) or its parameter name (``"features.0.weight"``); in
    ``CompileConfig.layers`` the first rule that matches a weight decides for it, and a field
    left None takes the global setting. ``keep``: the weight is not compressed (stored as a
    plain tensor, float16 where exact). ``bits``: the weight gets a fixed grid of ``2^bits - 1``
    levels per output channel (RTN steps ``max|w_c| / (2^(bits-1) - 1)``, LINEAR), range coded
    like every layer but never re-allocated or rescaled to meet the target: the target counts
    its bytes and the other layers share the rest. ``kind``, ``granularity``, ``group_size``:
    this layer's transform and T-parameter layout. ``options``: ``(name, value)`` pairs a method
    reads for this layer (e.g. a one-shot method's per-layer settings); a method names the
    options it understands in its docstring.

    "Keep ``lm_head`` and the first conv at 8 bits" is
    ``CompileConfig(layers=(LayerRule(r"lm_head|conv1", bits=8),))``.

    ``format``: the layer is stored in a block format exactly as its spec quantises it (OCP MX
    v1.0 or HBFP: ``TransformKind.MXFP4_E2M1`` ...): blocks of 32 elements along the reduction
    axis, each with its max-scaled power-of-two scale (E8M0, one byte), elements cast with
    saturating round-to-nearest-even; a fixed grid like ``bits`` (its symbols still range coded).
    """

    pattern: str
    keep: bool = False
    bits: int | None = None
    kind: TransformKind | None = None
    granularity: Granularity | None = None
    group_size: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    format: TransformKind | None = None

    def __post_init__(self) -> None:
        n = f"{type(self).__name__}({self.pattern!r})"
        _require(isinstance(self.pattern, str) and bool(self.pattern), n, "pattern must be a non-empty regular expression")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"{n}: pattern is not a regular expression: {exc}") from exc
        _require(isinstance(self.keep, bool), n, f"keep must be a bool, got {self.keep!r}")
        _require(self.bits is None or (isinstance(self.bits, int) and not isinstance(self.bits, bool)
                                       and 2 <= self.bits <= 8), n, f"bits must be None or in 2..8, got {self.bits!r}")
        _require(self.kind is None or isinstance(self.kind, TransformKind), n, f"kind must be a TransformKind, got {self.kind!r}")
        _require(self.kind not in FORMAT_KINDS, n, f"kind {getattr(self.kind, 'value', self.kind)!r} is a block format: "
                 f"give it as format=, not kind=")
        _require(self.granularity is None or isinstance(self.granularity, Granularity), n,
                 f"granularity must be a Granularity, got {self.granularity!r}")
        _require(self.group_size is None or (isinstance(self.group_size, int) and not isinstance(self.group_size, bool)
                                             and self.group_size >= 1), n,
                 f"group_size must be None or an int >= 1, got {self.group_size!r}")
        _require(not (self.keep and (self.bits or self.kind or self.granularity or self.group_size or self.options)),
                 n, "a kept (uncompressed) layer takes no bits, kind, granularity, group_size or options")
        _require(not (self.bits is not None and self.kind not in (None, TransformKind.LINEAR)), n,
                 "a fixed-bits layer uses the LINEAR grid; kind must be None or linear")
        _require(self.format is None or self.format in FORMAT_KINDS, n,
                 f"format must be a block format ({[k.value for k in FORMAT_KINDS]}), got {self.format!r}")
        _require(not (self.format is not None and (self.keep or self.bits or self.kind or self.granularity
                                                   or self.group_size)), n,
                 "a block-format layer takes its grid from the format: no keep, bits, kind, granularity or group_size")
        opts = tuple(tuple(o) for o in self.options)
        _require(all(len(o) == 2 and isinstance(o[0], str) for o in opts), n,
                 f"options must be (name, value) pairs, got {self.options!r}")
        object.__setattr__(self, "options", opts)

    def matches(self, param: str) -> bool:
        module = param.rsplit(".", 1)[0] if "." in param else param
        return re.fullmatch(self.pattern, module) is not None or re.fullmatch(self.pattern, param) is not None


@dataclasses.dataclass(frozen=True)
class CompileConfig(_JsonConfig):
    """What the user asks of :func:`l2fx.compile`.

    ``target_cr`` is the compression ratio of the compressed parameters: their fp32 bytes over
    every byte written for them (payload, probability table, T parameters, header share).
    ``method`` names a registered method (:func:`l2fx.methods`), the pipeline that runs.
    ``layers``: per-layer intent (:class:`LayerRule`), first match wins.
    """

    target_cr: float = 10.0
    method: str = "l2"
    transform: TransformKind = TransformKind.JOINT
    granularity: Granularity = Granularity.PER_CHANNEL
    # Per-group granularity: T parameters for every group_size consecutive elements of each row
    # (GPTQ's g128, MX's 32-element blocks); a shorter last group when it does not divide K.
    group_size: int = 128
    plain_dtype: PlainDtype = PlainDtype.FLOAT16
    fold_batchnorm: bool = True
    compress_embeddings: bool = True
    min_numel: int = 256
    cr_tolerance: float = 0.01
    sensitivity: SensitivityConfig = SensitivityConfig()
    coding: CodingConfig = CodingConfig()
    seed: int = 0
    reconstruction: ReconstructionConfig = ReconstructionConfig()
    layers: tuple[LayerRule, ...] = ()
    # (name, value) options of the method (e.g. a one-shot method's sparsity or act_order); a
    # layers rule's options override them for its layers. A method names those it reads.
    method_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        n = type(self).__name__
        _require(isinstance(self.target_cr, (int, float)) and math.isfinite(self.target_cr), n,
                 f"target_cr must be a finite number, got {self.target_cr!r}")
        if self.target_cr <= 1.0:
            raise TargetCRError(f"target_cr must be > 1 (fp32 is 1.0), got {self.target_cr}")
        _require(isinstance(self.method, str) and bool(self.method), n, f"method must be a method's name, got {self.method!r}")
        _require(isinstance(self.transform, TransformKind), n, f"transform must be a TransformKind, got {self.transform!r}")
        _require(self.transform not in FORMAT_KINDS, n,
                 f"transform {self.transform.value!r} is a block storage format (spec scales, fixed grid): give it to "
                 f"the layers that use it as LayerRule(pattern, format=...); the learnt transform is one of "
                 f"{[k.value for k in TransformKind if k not in FORMAT_KINDS]}")
        _require(isinstance(self.granularity, Granularity), n, f"granularity must be a Granularity, got {self.granularity!r}")
        _require(isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 1,
                 n, f"group_size must be an int >= 1, got {self.group_size!r}")
        _require(isinstance(self.plain_dtype, PlainDtype), n, f"plain_dtype must be a PlainDtype, got {self.plain_dtype!r}")
        _require(self.min_numel >= 1, n, f"min_numel must be >= 1, got {self.min_numel}")
        _require(0 < self.cr_tolerance < 0.5, n, f"cr_tolerance must be in (0, 0.5), got {self.cr_tolerance}")
        _require(isinstance(self.layers, tuple) and all(isinstance(r, LayerRule) for r in self.layers), n,
                 f"layers must be a tuple of LayerRule, got {self.layers!r}")
        opts = tuple(tuple(o) for o in self.method_options)
        _require(all(len(o) == 2 and isinstance(o[0], str) for o in opts), n,
                 f"method_options must be (name, value) pairs, got {self.method_options!r}")
        object.__setattr__(self, "method_options", opts)

    def rule_for(self, param: str) -> LayerRule | None:
        """The first of ``layers`` that matches the weight ``param``, or None."""
        return next((r for r in self.layers if r.matches(param)), None)

    def replace(self, **changes: Any) -> "CompileConfig":
        return dataclasses.replace(self, **changes)


#: ``BackendConfig.decode`` values; :class:`l2fx.modules.CodedWeight` reads them.
DECODE_MODES = ("auto", "cache", "per_call")


@dataclasses.dataclass(frozen=True)
class BackendConfig(_JsonConfig):
    """What the runtime can execute; the lowering pass consults it, never the user intent.

    ``use_triton``: "auto" lowers to the fused Triton kernel when the layer sits on a CUDA
    device and Triton is importable; "never" keeps the torch reference dequantisation.

    ``decode``: when a weight left on the torch reference path (a ``CodedWeight``) turns its
    codes into the weight. "cache": once, into a tensor in the weight's dtype kept beside the
    codes (not in ``state_dict()``, not saved), re-decoded when the codes, T parameters, dtype
    or device change; costs the dense weight's memory on top of the codes. "per_call": on every
    forward (least memory; the weight exists only during the op that reads it). "auto": cache
    on CPU, per call on an accelerator (where ``lower_kernels`` puts the fused kernel, which
    decodes in registers; what it leaves decodes per call there). Layers already lowered
    decode in the kernel whatever this says.
    """

    use_triton: str = "auto"
    supported_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    decode: str = "auto"

    def __post_init__(self) -> None:
        n = type(self).__name__
        _require(self.use_triton in ("auto", "never", "always"), n,
                 f"use_triton must be 'auto', 'never' or 'always', got {self.use_triton!r}")
        _require(all(2 <= b <= 8 for b in self.supported_bits), n, "supported_bits must lie in 2..8")
        _require(isinstance(self.decode, str) and self.decode in DECODE_MODES, n,
                 f"decode must be one of {', '.join(repr(m) for m in DECODE_MODES)}, got {self.decode!r}")
