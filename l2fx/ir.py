"""The l2fx IR: an fx GraphModule plus typed, namespaced ``node.meta`` entries.

Passes talk to each other only through the entries below. Each entry is a dataclass with a
``META_KEY`` class attribute (``"l2fx.<what>"``); :func:`set_meta` / :func:`get_meta` store
and fetch them by type, and the verifier checks that every ``l2fx.*`` key holds the type
registered for it. A user pass registers its own entry type with :func:`meta_entry`.

The graph itself follows one convention from ``normalize`` on: every compressible weight is
a ``get_attr`` node (later a ``call_module`` of a weight module) feeding a call_function in
:data:`WEIGHTED_OPS`, which says where the weight and bias arguments sit. This table is the
only place that knows op signatures; add a row to support another op.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from l2fx.activations import ActQuantSpec
from l2fx.errors import PassError

T = TypeVar("T")

_META_TYPES: dict[str, type] = {}


def meta_entry(cls: type[T]) -> type[T]:
    """Class decorator registering a dataclass as a ``node.meta`` entry under ``cls.META_KEY``."""
    key = getattr(cls, "META_KEY", None)
    if not isinstance(key, str) or "." not in key:
        raise PassError(f"{cls.__name__}.META_KEY must be a namespaced string like 'mypass.info'")
    if key in _META_TYPES and _META_TYPES[key] is not cls:
        raise PassError(f"node.meta key {key!r} is already registered to {_META_TYPES[key].__name__}")
    _META_TYPES[key] = cls
    return cls


def registered_meta_types() -> dict[str, type]:
    return dict(_META_TYPES)


def namespace(key: str) -> str | None:
    """The namespace of a ``node.meta`` key (``"l2fx"`` of ``"l2fx.site"``), None for fx's own keys."""
    return key.split(".", 1)[0] if "." in key else None


def registered_namespaces() -> set[str]:
    """Namespaces some registered entry uses: ``l2fx`` and every user pass's (``mypass``)."""
    return {namespace(k) for k in _META_TYPES}


def owned_meta(node: fx.Node) -> dict[str, Any]:
    """The node's meta entries in registered namespaces (built-in and user passes' alike):
    what the verifier checks, ``DumpIR`` prints, and a rewrite carries to the node replacing it."""
    spaces = registered_namespaces()
    return {k: v for k, v in node.meta.items() if namespace(k) in spaces}


def set_meta(node: fx.Node, value: Any) -> None:
    key = type(value).META_KEY
    if _META_TYPES.get(key) is not type(value):
        raise PassError(f"{type(value).__name__} is not a registered node.meta entry (use @meta_entry)")
    node.meta[key] = value


def get_meta(node: fx.Node, cls: type[T]) -> T | None:
    return node.meta.get(cls.META_KEY)


def require_meta(node: fx.Node, cls: type[T], who: str) -> T:
    value = node.meta.get(cls.META_KEY)
    if value is None:
        raise PassError(f"{who}: node {node.name!r} lacks node.meta[{cls.META_KEY!r}]")
    return value


# --------------------------------------------------------------------------------------------
# Weighted ops: the table of ops whose weight l2fx compresses.


@dataclasses.dataclass(frozen=True)
class WeightedOp:
    """Where an op takes its weight and bias, and which weight axis is the output channel."""

    family: str  # "linear" | "conv" | "embedding"
    weight_arg: int
    bias_arg: int | None
    channel_axis: int  # per-channel T parameters run along this weight axis


_LINEAR = WeightedOp("linear", 1, 2, 0)
_CONV = WeightedOp("conv", 1, 2, 0)
# Embedding tables are [vocab, dim]; per-row parameters would cost 4 bytes per token, so the
# per-channel axis is the hidden dimension.
_EMB_F = WeightedOp("embedding", 1, None, 1)
_EMB_ATEN = WeightedOp("embedding", 0, None, 1)

WEIGHTED_OPS: dict[Callable[..., Any], WeightedOp] = {
    F.linear: _LINEAR,
    torch.ops.aten.linear.default: _LINEAR,
    F.conv1d: _CONV,
    F.conv2d: _CONV,
    torch.ops.aten.conv1d.default: _CONV,
    torch.ops.aten.conv2d.default: _CONV,
    F.embedding: _EMB_F,
    torch.ops.aten.embedding.default: _EMB_ATEN,
}


def weighted_op(node: fx.Node) -> WeightedOp | None:
    if node.op != "call_function":
        return None
    return WEIGHTED_OPS.get(node.target)


def arg_of(node: fx.Node, index: int | None) -> Any:
    if index is None or index >= len(node.args):
        return None
    return node.args[index]


# --------------------------------------------------------------------------------------------
# Meta entries written by the built-in passes.


@meta_entry
@dataclasses.dataclass(frozen=True)
class WeightSite:
    """A compressible weight (set by ``mark_weights`` on the weight-producing node).

    ``param`` is the qualified parameter name in the original model's namespace after
    normalisation (e.g. ``"features.0.weight"``); ``consumers`` the names of the op nodes
    that read it.
    """

    META_KEY = "l2fx.site"
    param: str
    family: str
    channel_axis: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]


@meta_entry
@dataclasses.dataclass(frozen=True)
class LayerIntent:
    """What the user wants for one compressed weight (set by ``mark_weights`` from the global
    config and the first matching ``CompileConfig.layers`` rule, ``rule``: its index or None):
    the transform ``kind``, the T-parameter layout (``granularity``, ``group_size``), a fixed
    grid of ``bits`` (None: allocated), and the method options of the rule."""

    META_KEY = "l2fx.intent"
    kind: str
    granularity: str
    group_size: int
    bits: int | None = None
    options: tuple = ()
    rule: int | None = None
    format: str | None = None  # a block format kind: the layer's grid is the format's (fixed)

    def option(self, name: str, default: Any = None) -> Any:
        return next((v for k, v in self.options if k == name), default)


@meta_entry
@dataclasses.dataclass(frozen=True)
class ActQuantIntent:
    """The input activations of the linear/conv ops reading this weight are fake-quantised by
    ``spec`` (set by ``compound_plan`` for an option with activation bits, or at load from the
    artifact; applied by ``insert_act_quant``, written by ``range_code`` into the layer's
    manifest entry as ``act``)."""

    META_KEY = "l2fx.act_quant"
    spec: ActQuantSpec


@meta_entry
@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of a layer's rate-distortion curve: a T setting, its exact bytes, its error.

    ``step_s``/``threshold_e`` are per-tensor values of the T parameters (Eq. 13).
    ``nbytes`` counts everything written for the layer at this setting (payload, table, T
    parameters, manifest entry). ``distortion`` is the model-output error with only this
    layer compressed, relative to the output's energy (:func:`l2fx.data.relative_error`).
    """

    META_KEY = "l2fx.candidate"
    kind: str
    step_s: float
    threshold_e: float
    nbytes: int
    distortion: float
    # True: per channel c the parameters are step_s * r_c, threshold_e * r_c with
    # r_c = max|w_c| / max|w| (every channel keeps the same relative precision).
    channel_scaled: bool = False


@meta_entry
@dataclasses.dataclass(frozen=True)
class SensitivityCurve:
    """Rate-distortion curve of one weight (set by ``sensitivity_analysis``)."""

    META_KEY = "l2fx.sensitivity"
    candidates: tuple[Candidate, ...]


@meta_entry
@dataclasses.dataclass(frozen=True)
class Allocation:
    """The T setting chosen for one weight (set by ``entropy_allocation``)."""

    META_KEY = "l2fx.allocation"
    kind: str
    step_s: float
    threshold_e: float
    predicted_nbytes: int
    channel_scaled: bool = False


@meta_entry
@dataclasses.dataclass(frozen=True)
class CodedInfo:
    """What range-code lowering wrote for one weight; byte counts are real, not estimated.

    ``stream`` holds the coded chunks and the table; ``entry`` is the layer's manifest entry
    (``docs/format.md``) exactly as the artifact writes it.
    """

    META_KEY = "l2fx.coded"
    param: str
    stream: Any  # l2fx.coding.CodedStream
    entry: dict
    layer_bytes: Any  # l2fx.accounting.LayerBytes
    shannon_bits: float
    bits: int  # bits per symbol needed in memory (2..8)
    sparsity: float

    @property
    def nbytes(self) -> int:
        return self.layer_bytes.total


@meta_entry
@dataclasses.dataclass(frozen=True)
class Block:
    """The reconstruction block a node belongs to (set by ``block_partition``): ``index`` in
    topological order, ``name`` (the block key of its first weight, e.g. ``"layer1.0"``)."""

    META_KEY = "l2fx.block"
    index: int
    name: str


@meta_entry
@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    """The float32 value a tensor had before reconstruction moved it (set by ``keep_reference``
    on compressed weights and on the plain parameters the blocks tune; read by
    ``network_distillation``, whose targets come from the original model, and by
    ``block_reconstruction``, whose block targets then do too)."""

    META_KEY = "l2fx.reference"
    value: torch.Tensor

    def __repr__(self) -> str:
        return f"Reference({tuple(self.value.shape)}, {self.value.dtype})"


# --------------------------------------------------------------------------------------------
# Traversal helpers.


def weight_sites(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, WeightSite]]:
    for node in gm.graph.nodes:
        site = node.meta.get(WeightSite.META_KEY)
        if site is not None:
            yield node, site


def weight_consumers(node: fx.Node) -> list[tuple[fx.Node, WeightedOp]]:
    out = []
    for user in node.users:
        op = weighted_op(user)
        if op is not None and arg_of(user, op.weight_arg) is node:
            out.append((user, op))
    return out


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def weight_module_path(param: str) -> str:
    """Where the weight module replacing tensor ``param`` lives in the GraphModule."""
    return "l2fx_weights." + param.replace(".", "__")


def replace_weight(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module, recompile: bool = True) -> fx.Node:
    """Makes ``module()`` produce the weight that ``node`` produced, and drops the fp32 tensor.

    ``node`` is the weight's ``get_attr`` (or an earlier weight module's ``call_module``);
    its meta in every registered namespace (:func:`owned_meta`) moves to the returned node. The original tensor is deleted from its
    owner so that ``state_dict()`` holds only what runs. A caller replacing many weights
    passes ``recompile=False`` and calls ``gm.recompile()`` once at the end (a recompile
    costs ~30 ms on a transformer's graph).
    """
    site = node.meta.get(WeightSite.META_KEY)
    param = site.param if site is not None else str(node.target)
    path = weight_module_path(param)
    gm.add_submodule(path, module)
    if node.op == "call_module" and str(node.target) == path:
        return node
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path)
    new.meta.update(owned_meta(node))
    # The module produces the tensor the node did (same shape and dtype): torch.export's value
    # meta carries over, so blocks.tensor_valued need not interpret an exported graph.
    for key in ("val", "tensor_meta"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if node.op == "get_attr":
        owner_path, _, attr = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
    if recompile:
        gm.recompile()
    return new
