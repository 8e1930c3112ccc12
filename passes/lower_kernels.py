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
keys keep their prefix and the artifact still strips them as coded; the weight node's meta in
every registered namespace (``WeightSite``, ``CodedInfo``, a user pass's entries) moves onto
the (first) new node, so ``artifact.serialize`` writes the same layers from the same
``CodedInfo.stream``, in the same (name) order: a lowered model saves the same bytes.

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

import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from l2fx.accounting import bits_for_magnitude
from l2fx.config import BackendConfig
from l2fx.ir import arg_of, owned_meta, weight_consumers, weight_sites
from l2fx.modules import HAS_TRITON, KERNEL_KINDS, CodedWeight, DequantConv1x1, DequantLinear
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.triton_kernels.packing import WORD_BITS

__all__ = ["LowerKernels", "LoweringRule", "LOWERING_RULES"]


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
    requires_weight_modules = (CodedWeight, DequantLinear)

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
        if backend.use_triton == "auto" and not (module.codes.is_cuda and HAS_TRITON):
            return "use_triton='auto' and the layer is not on CUDA with Triton importable"
        if module.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"kernel computes in float16/bfloat16/float32, the model's weight is {module.dtype}"
        if module.kind.value not in KERNEL_KINDS:
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
        needed = bits_for_magnitude(int(module.codes.abs().max()) if module.codes.numel() else 0)
        bits = min((b for b in backend.supported_bits if b >= needed), default=None)
        if bits is None:
            return f"codes need {needed} bits; backend supports {list(backend.supported_bits)}"
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        return _Plan(rule, tuple(sorted((c for c, _ in consumers), key=order.__getitem__)), bits)

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, module: CodedWeight, plan: _Plan) -> None:
        path = str(node.target)
        codes = module.codes.reshape(module.codes.shape[0], -1)  # conv [N, K, 1, 1] -> [N, K]
        new_module = plan.rule.module(codes, module.kind, module.step_s, module.threshold_e,
                                      module.channel_axis, plan.bits, module.group_size)
        new_module.dtype = module.dtype
        # Same path: state_dict keys keep the coded prefix the artifact strips, and no orphan
        # CodedWeight (with its int8 codes) stays registered.
        gm.add_submodule(path, new_module)
        carried = owned_meta(node)  # every registered namespace: the built-in passes' and users' alike
        for i, consumer in enumerate(plan.consumers):
            bias = arg_of(consumer, 2)
            with gm.graph.inserting_before(consumer):
                new = gm.graph.call_module(path, (consumer.args[0],) if bias is None else (consumer.args[0], bias))
            new.meta.update(consumer.meta)  # val / stack_trace / nn_module_stack describe the same output
            if i == 0:
                new.meta.update(carried)  # the layer is serialised once, from the first call
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
                shape = tuple(getattr(mod, pname).shape)
                ok = shape == (mod.n, -(-mod.k // mod.group_size)) if mod.group_size else shape in ((1,), (mod.n,))
                if not ok:
                    self.fail(f"{pname} of shape {list(shape)} is not [1], [N={mod.n}] or [N, ceil(K / group)]", node)
            if sites.get(str(node.target), 0) != 1:
                self.fail("lowered layer must carry its l2fx.site meta on exactly one node", node)


def _uses(consumer: fx.Node, node: fx.Node) -> int:
    return sum(1 for a in consumer.args if a is node) + sum(1 for a in consumer.kwargs.values() if a is node)
