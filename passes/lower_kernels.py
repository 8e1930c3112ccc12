"""``lower_kernels``: a coded weight and the linear op reading it become one fused dequant-matmul.

Before::

    w = call_module[l2fx_weights.fc__weight]()          # CodedWeight: int8 codes [N, K], s, e
    y = call_function[F.linear](x, w, b)

After::

    y = call_module[l2fx_weights.fc__weight](x, b)      # DequantLinear: packed int32 words, s, e
                                                        # -> torch.ops.l2fx.dequant_matmul

A 1x1, stride-1, unpadded, undilated, ungrouped ``conv2d`` is the same GEMM over the
channels and is lowered to :class:`DequantConv1x1`. Every other layer (embeddings, k x k and
depthwise convs, conv1d, a weight also read by a non-linear op) keeps its ``CodedWeight``:
the torch reference path. The new module takes the CodedWeight's path, so ``state_dict()``
keys keep their prefix and the artifact still strips them as coded; the weight node's
``l2fx.*`` meta (``WeightSite``, ``CodedInfo``, ...) moves onto the (first) new node, so
``artifact.serialize`` writes the same layers from the same ``CodedInfo.stream``. (It writes
them in graph order, and a lowered node sits where its consumer was: where a front-end hoists
weight nodes in another order than their consumers run, as torch.export does for models whose
layers are registered out of execution order, the lowered model's artifact lists the same
layers in another order, so its bytes differ though it loads to the same model.)

When (``BackendConfig.use_triton``): ``"never"`` lowers nothing; ``"auto"`` lowers a layer
whose codes sit on a CUDA device when Triton imports; ``"always"`` lowers regardless of the
device (on CPU the custom op runs its torch reference, which is how CPU tests exercise the
lowered graph and ``torch.compile``). Codes are packed at the smallest width in
``BackendConfig.supported_bits`` that holds them; a layer needing a width the backend lacks
stays a CodedWeight. Why each layer was kept is recorded in ``PassContext.records``.

Pre: every weight site is a ``call_module`` of a ``CodedWeight`` or a ``DequantLinear``
(``range_code`` has run). Post: no CodedWeight that the rule above would lower remains; every
DequantLinear node has one or two inputs (x, bias) and its module's buffers are consistent
([N, ceil(K / F)] words, [N] or [1] parameters); every lowered layer is found by
``artifact.coded_layers`` exactly once. Idempotent: a second run changes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from l2fx.config import BackendConfig
from l2fx.errors import PassError
from l2fx.ir import arg_of, weight_consumers, weight_sites
from l2fx.modules import CodedWeight, StoredParams
from l2fx.pipeline import L2fxPass, PassContext, PassManager, PassResult
from l2fx.transform import TransformKind
from l2fx.triton_kernels.packing import WORD_BITS, choose_bits, pack_codes

if TYPE_CHECKING:
    from l2fx.api import CompiledModel

__all__ = ["LowerKernels", "DequantLinear", "DequantConv1x1", "lower"]


def _kernels():
    """The kernel module, imported on first use, not when ``l2fx.passes`` is imported.

    Importing it registers ``torch.ops.l2fx.dequant_matmul`` and decorates the Triton kernels,
    which reads ``TRITON_INTERPRET`` once; the kernel tests set that variable before their own
    import, so an earlier import through ``l2fx.passes`` would make them skip.
    """
    from l2fx.triton_kernels import dequant_matmul

    return dequant_matmul


# --------------------------------------------------------------------------------------------
# Lowered weight modules


class DequantLinear(StoredParams):
    """``y = x @ T^-1(q)^T + bias`` with ``q`` decoded in registers (``torch.ops.l2fx.dequant_matmul``).

    Buffers (exactly what runs; ``state_dict()`` holds these and nothing else):

    * ``words``: ``torch.int32 [N, ceil(K / F)]``, ``F = 32 // bits``: the codes ``q [N, K]``
      packed along K (:mod:`l2fx.triton_kernels.packing`).
    * ``step_s``: ``torch.float32 [N]`` (per output channel, ``channel_axis == 0``) or ``[1]``
      (per tensor, ``channel_axis is None``; expanded to ``[N]`` as a view at call time): the
      stored ``s`` of Eq. 13, the same values the artifact holds.
    * ``threshold_e``: same shape and meaning for ``e``.

    Attributes: ``kind`` (:class:`TransformKind`), ``bits`` (2..8), ``k`` (K), ``n`` (N),
    ``channel_axis`` (0 or None, as the CodedWeight it replaces).

    ``forward(x [..., K], bias [N] | None) -> [..., N]`` in ``x.dtype``.
    """

    def __init__(self, codes: torch.Tensor, kind: TransformKind, step_s: torch.Tensor,
                 threshold_e: torch.Tensor, channel_axis: int | None, bits: int | None = None):
        super().__init__()
        _kernels()  # the op this module calls
        if codes.dim() != 2:
            raise PassError(f"DequantLinear packs 2-D codes [N, K], got shape {tuple(codes.shape)}")
        packed = pack_codes(codes, bits)
        self.register_buffer("words", packed.words)
        self.register_buffer("step_s", step_s.detach().float().reshape(-1).contiguous())
        self.register_buffer("threshold_e", threshold_e.detach().float().reshape(-1).contiguous())
        self.kind = TransformKind(kind)
        self.bits = packed.bits
        self.k = packed.k
        self.n = packed.n
        self.channel_axis = channel_axis

    def __setstate__(self, state: dict) -> None:  # unpickling in a fresh process needs the op too
        _kernels()
        super().__setstate__(state)

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step_s.expand(self.n), self.threshold_e.expand(self.n)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        s, e = self._params()
        return torch.ops.l2fx.dequant_matmul(x, self.words, self.bits, self.k, s, e, self.kind.value, bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind.value}, n={self.n}, k={self.k}, bits={self.bits}, axis={self.channel_axis}"


class DequantConv1x1(DequantLinear):
    """A 1x1, stride-1, unpadded, ungrouped ``conv2d``: the same GEMM over channels.

    Buffers as :class:`DequantLinear` with ``N = C_out``, ``K = C_in`` (the ``[C_out, C_in,
    1, 1]`` codes flattened to ``[C_out, C_in]``). ``forward(x [B, C_in, H, W], bias [C_out] |
    None) -> [B, C_out, H, W]``, computed as ``x`` in channels-last rows ``[B*H*W, C_in]``.
    """

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        s, e = self._params()
        b, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, self.k)
        y = torch.ops.l2fx.dequant_matmul(rows, self.words, self.bits, self.k, s, e, self.kind.value, bias)
        return y.reshape(b, h, w, self.n).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# Rewrite rules: which consumers lower, to what. One row per supported op shape.


def _pair(v: Any) -> tuple[Any, ...] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return tuple(v) * (2 if len(v) == 1 else 1)
    return None


def _linear_reason(consumer: fx.Node, codes: torch.Tensor) -> str | None:
    if consumer.kwargs or len(consumer.args) > 3:
        return "linear call with keyword or extra arguments"
    return None if codes.dim() == 2 else f"linear weight is {codes.dim()}-d"


_CONV2D_DEFAULTS = ((1, 1), (0, 0), (1, 1), 1)  # stride, padding, dilation, groups


def _conv1x1_reason(consumer: fx.Node, codes: torch.Tensor) -> str | None:
    if consumer.target not in (F.conv2d, torch.ops.aten.conv2d.default):
        return "only conv2d lowers"
    if consumer.kwargs:
        return "conv2d call with keyword arguments"
    if codes.dim() != 4 or tuple(codes.shape[2:]) != (1, 1):
        return f"conv2d kernel {tuple(codes.shape[2:])} is not 1x1"
    given = list(consumer.args[3:7]) + list(_CONV2D_DEFAULTS[max(0, len(consumer.args) - 3):])
    stride, padding, dilation, groups = given
    if padding == "valid":
        padding = 0
    if _pair(stride) != (1, 1) or _pair(padding) != (0, 0) or _pair(dilation) != (1, 1) or groups != 1:
        return f"conv2d with stride={stride}, padding={padding}, dilation={dilation}, groups={groups}"
    return None


@dataclasses.dataclass(frozen=True)
class LoweringRule:
    """Consumers of ``family`` lower to ``module`` when ``reason(consumer, codes)`` is None."""

    family: str
    reason: Callable[[fx.Node, torch.Tensor], str | None]
    module: type[DequantLinear]


LOWERING_RULES: tuple[LoweringRule, ...] = (
    LoweringRule("linear", _linear_reason, DequantLinear),
    LoweringRule("conv", _conv1x1_reason, DequantConv1x1),
)


@dataclasses.dataclass(frozen=True)
class _Plan:
    rule: LoweringRule
    consumers: tuple[fx.Node, ...]  # in graph order
    bits: int


# --------------------------------------------------------------------------------------------
# The pass


class LowerKernels(L2fxPass):
    name = "lower_kernels"

    def requires(self, gm: fx.GraphModule) -> None:
        PassContext.current()  # fails with a clear message outside `with PassContext(...)`
        for node, _ in weight_sites(gm):
            mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if not isinstance(mod, (CodedWeight, DequantLinear)):
                self.fail("expects CodedWeight modules: run range_code first", node)

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        kept: dict[str, str] = {}
        lowered: list[str] = []
        for node, site in list(weight_sites(gm)):
            module = gm.get_submodule(str(node.target))
            if not isinstance(module, CodedWeight):
                continue  # already lowered
            plan = self.plan(gm, node, module, ctx.backend)
            if isinstance(plan, str):
                kept[site.param] = plan
                continue
            self._rewrite(gm, node, module, plan)
            lowered.append(site.param)
            ctx.log(self.name, f"{site.param}: {plan.rule.module.__name__} at {plan.bits} bits")
        if lowered:
            gm.graph.lint()
            gm.recompile()
        record = ctx.records.setdefault(self.name, {"lowered": [], "kept": {}})
        record["lowered"].extend(lowered)
        record["kept"].update(kept)
        return PassResult(gm, bool(lowered))

    def plan(self, gm: fx.GraphModule, node: fx.Node, module: CodedWeight, backend: BackendConfig) -> _Plan | str:
        """How ``node``'s weight lowers under ``backend``, or why it stays a CodedWeight."""
        if backend.use_triton == "never":
            return "use_triton='never'"
        kernels = _kernels()
        if backend.use_triton == "auto" and not (module.codes.is_cuda and kernels.HAS_TRITON):
            return "use_triton='auto' and the layer is not on CUDA with Triton importable"
        if module.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"kernel computes in float16/bfloat16/float32, the model's weight is {module.dtype}"
        if module.kind.value not in kernels.KINDS:
            return f"kernel has no decoder for kind {module.kind.value!r}"
        if module.channel_axis not in (0, None):
            return f"parameters run along axis {module.channel_axis}, the kernel needs output channels (axis 0)"
        consumers = weight_consumers(node)
        if not consumers or len(consumers) != len(node.users):
            return "weight is read by an op outside WEIGHTED_OPS"
        families = {op.family for _, op in consumers}
        rule = next((r for r in LOWERING_RULES if {r.family} == families), None)
        if rule is None:
            return f"no lowering for consumers of family {sorted(families)}"
        for consumer, op in consumers:
            if _uses(consumer, node) != 1 or op.weight_arg != 1 or op.bias_arg != 2:
                return f"{consumer.name} reads the weight outside its weight argument"
            reason = rule.reason(consumer, module.codes)
            if reason is not None:
                return reason
        needed = choose_bits(module.codes)
        bits = min((b for b in backend.supported_bits if b >= needed), default=None)
        if bits is None:
            return f"codes need {needed} bits; backend supports {list(backend.supported_bits)}"
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        return _Plan(rule, tuple(sorted((c for c, _ in consumers), key=order.__getitem__)), bits)

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, module: CodedWeight, plan: _Plan) -> None:
        path = str(node.target)
        codes = module.codes.reshape(module.codes.shape[0], -1)  # conv [N, K, 1, 1] -> [N, K]
        new_module = plan.rule.module(codes, module.kind, module.step_s, module.threshold_e,
                                      module.channel_axis, plan.bits)
        new_module.dtype = module.dtype
        # Same path: state_dict keys keep the coded prefix the artifact strips, and no orphan
        # CodedWeight (with its int8 codes) stays registered.
        gm.add_submodule(path, new_module)
        l2fx_meta = {k: v for k, v in node.meta.items() if k.startswith("l2fx.")}
        for i, consumer in enumerate(plan.consumers):
            bias = arg_of(consumer, 2)
            with gm.graph.inserting_before(consumer):
                new = gm.graph.call_module(path, (consumer.args[0],) if bias is None else (consumer.args[0], bias))
            new.meta.update(consumer.meta)  # val / stack_trace / nn_module_stack describe the same output
            if i == 0:
                new.meta.update(l2fx_meta)  # the layer is serialised once, from the first call
            consumer.replace_all_uses_with(new)
            gm.graph.erase_node(consumer)
        gm.graph.erase_node(node)

    def ensures(self, gm: fx.GraphModule) -> None:
        backend = PassContext.current().backend
        sites: dict[str, int] = {}
        for node, _ in weight_sites(gm):
            sites[str(node.target)] = sites.get(str(node.target), 0) + 1
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, CodedWeight) and not isinstance(self.plan(gm, node, mod, backend), str):
                self.fail("a lowerable CodedWeight was left unlowered", node)
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), DequantLinear):
                continue
            mod = gm.get_submodule(str(node.target))
            if not 1 <= len(node.args) <= 2 or node.kwargs:
                self.fail("a DequantLinear call takes (x) or (x, bias)", node)
            f = WORD_BITS // mod.bits
            if tuple(mod.words.shape) != (mod.n, -(-mod.k // f)) or mod.words.dtype != torch.int32:
                self.fail(f"words {mod.words.dtype} {tuple(mod.words.shape)} do not pack [N, K] = "
                          f"[{mod.n}, {mod.k}] at {mod.bits} bits", node)
            for pname in ("step_s", "threshold_e"):
                if getattr(mod, pname).numel() not in (1, mod.n):
                    self.fail(f"{pname} must hold 1 or N={mod.n} values", node)
            if sites.get(str(node.target), 0) != 1:
                self.fail("lowered layer must carry its l2fx.site meta on exactly one node", node)


def _uses(consumer: fx.Node, node: fx.Node) -> int:
    return sum(1 for a in consumer.args if a is node) + sum(1 for a in consumer.kwargs.values() if a is node)


# --------------------------------------------------------------------------------------------
# Public entry point


def lower(compiled: "CompiledModel", backend: BackendConfig | None = None) -> "CompiledModel":
    """A new :class:`CompiledModel` whose supported layers run the fused dequant-matmul kernel.

    ``compiled`` is not modified (its GraphModule is deep-copied; ``CodedInfo`` streams are
    shared, being immutable). ``backend`` defaults to ``BackendConfig()`` (``use_triton="auto"``:
    lowers only layers on CUDA with Triton available). The header is kept as is, so
    ``artifact_bytes()`` of the result equals the input's: lowering is a runtime choice made
    from the device, not part of the stored model.
    """
    from l2fx.api import CompiledModel

    if not isinstance(compiled, CompiledModel):
        raise PassError(f"lower expects a CompiledModel from l2fx.compile/l2fx.load, got {type(compiled).__name__}")
    gm = copy.deepcopy(compiled.graph_module)
    with PassContext(backend=backend or BackendConfig(), verify=True):
        gm = PassManager([LowerKernels()])(gm).graph_module
    out = CompiledModel(gm, compiled.report, copy.deepcopy(compiled._header))
    out.train(compiled.training)
    return out
