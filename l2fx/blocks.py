"""Reconstruction blocks as programs: binding inputs, slicing a block out of the graph, side values.

Shared by the passes that run a graph block by block (``block_partition``, ``block_reconstruction``,
``network_distillation``, the one-shot methods' sequential passes): what a block is
(:class:`l2fx.ir.Block`, set by ``block_partition``), which nodes are compressed weights and
which are *side* values (computed from the model inputs alone: masks, sizes), and each block
as a pair of GraphModules (compressed weights / fp32 weights) that take the block's inputs and
return its outputs (:class:`BlockProgram`).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from l2fx.data import Batch, batch_size, to_device, token_mask
from l2fx.inplace import clone_written_inputs
from l2fx.ir import Block, WeightSite, get_meta, require_meta, weight_sites
from l2fx.modules import TransformedWeight

__all__ = ["is_weight_node", "is_state", "block_key", "tensor_valued", "side_nodes", "node_blocks",
           "placeholder_values", "BlockProgram", "extract", "plain_parameters", "build_programs",
           "build_network_programs", "calibration_inputs", "calibration_masks"]

def is_weight_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A compressed weight: a zero-input call_module of a TransformedWeight."""
    return (node.op == "call_module" and not node.all_input_nodes
            and isinstance(gm.get_submodule(str(node.target)), TransformedWeight))


def is_state(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Nodes that are parameters, not data: get_attr and zero-input weight modules."""
    return node.op == "get_attr" or is_weight_node(gm, node)


_NUMERIC = re.compile(r"^\d+$")


def block_key(param: str) -> str:
    """The module path of ``param`` up to its first numeric component (else its module)."""
    parts = param.split(".")[:-1] or [param]
    for i, part in enumerate(parts):
        if _NUMERIC.match(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts)


class RawWeights(fx.Interpreter):
    """Interprets a graph with every ``TransformedWeight`` giving its raw (uncompressed) ``.weight``."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, TransformedWeight):
            return module.weight
        return super().call_module(target, args, kwargs)


def tensor_valued(gm: fx.GraphModule, calib: Any = None) -> dict[fx.Node, bool]:
    """Whether each node's value holds a Tensor (False for sizes, dtypes, None).

    Read from ``meta["val"]`` (torch.export) when present, else measured by interpreting the
    graph once on ``calib`` (one calibration batch), else assumed True. Nodes nothing reads (the
    output, an exported graph's ``_guards_fn``) need no answer, so an exported graph, whose
    weight modules carry their weights' value meta (``ir.replace_weight``), is not interpreted.
    The interpretation runs each ``TransformedWeight``'s raw ``.weight`` (:class:`RawWeights`):
    fake-quantising every weight of a 0.5 B-parameter Llama here added 2.1 GB to the peak.
    """
    out: dict[fx.Node, bool] = {}
    missing = False
    for node in gm.graph.nodes:
        val = node.meta.get("val", node.meta.get("example_value"))
        if val is None:
            missing = missing or bool(node.users)
            continue
        out[node] = any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(val))
    if missing and calib is not None:
        env: dict[fx.Node, Any] = {}

        class _Record(RawWeights):
            def run_node(self, n):
                value = super().run_node(n)
                env[n] = any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))
                return value

        with torch.no_grad():
            _Record(gm).run(*placeholder_values(gm, calib), enable_io_processing=False)
        for node, is_tensor in env.items():
            out.setdefault(node, is_tensor)
    for node in gm.graph.nodes:
        out.setdefault(node, True)
    return out


def side_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on no compressed weight (placeholders and what they feed)."""
    main: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or is_state(gm, node):
            continue
        if any(is_weight_node(gm, a) or a in main for a in node.all_input_nodes):
            main.add(node)
    return {n for n in gm.graph.nodes
            if n not in main and n.op != "output" and not is_state(gm, n)}


def node_blocks(gm: fx.GraphModule) -> dict[fx.Node, Block]:
    return {n: b for n in gm.graph.nodes if (b := get_meta(n, Block)) is not None}



# --------------------------------------------------------------------------------------------
# Binding a calibration batch to the graph's placeholders.


def placeholder_values(gm: fx.GraphModule, batch: Batch) -> list[Any]:
    """The values of ``gm``'s placeholders, in graph order, when called on ``batch``.

    fx-traced graphs take the forward's parameters by name; ``torch.export`` graphs flatten
    ``(args, kwargs)`` with the pytree spec recorded in the graph's codegen.
    """
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    else:
        args, kwargs = tuple(batch), {}
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return _flatten_export(info, bound)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [bound.arguments[str(n.target).lstrip("*")] for n in phs]


def _flatten_export(info: Any, bound: inspect.BoundArguments) -> list[Any]:
    spec = info.in_spec
    args_spec, kwargs_spec = spec.children() if hasattr(spec, "children") else spec.children_specs
    n_args = args_spec.num_children
    args = [bound.arguments[name] for name in info.orig_args[:n_args]]
    kwargs = {k: bound.arguments[k] for k in kwargs_spec.context}
    return list(fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec))


# --------------------------------------------------------------------------------------------
# A block as its own pair of GraphModules.


@dataclasses.dataclass
class BlockProgram:
    """One block: its nodes in ``gm`` and two GraphModules computing its outputs.

    ``quant`` runs the TransformedWeight modules (shared with ``gm``, so training updates them
    in place); ``fp32`` runs their raw ``.weight``. Both take ``placeholders`` (model inputs
    that side values used in the block are recomputed from) followed by ``inputs`` (values of
    earlier blocks), and return the tuple ``outputs`` (values used after the block).
    """

    block: Block
    placeholders: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    weights: list[tuple[fx.Node, TransformedWeight, WeightSite]]  # owned: trained here
    quant: fx.GraphModule
    fp32: fx.GraphModule
    # Plain (not range-coded) float parameters read only by this block's nodes: biases,
    # folded BatchNorm shifts, norm affines. Path in ``gm`` -> the parameter (shared with gm).
    plain: dict[str, torch.nn.Parameter] = dataclasses.field(default_factory=dict)


def extract(gm: fx.GraphModule, keep: list[fx.Node], phs: list[fx.Node], inputs: list[fx.Node],
             outputs: list[fx.Node], fp32: bool) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in phs + inputs:
        env[n] = g.placeholder(n.name)
    for n in keep:
        if fp32 and is_weight_node(gm, n):
            env[n] = g.get_attr(f"{n.target}.weight")
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    block = fx.GraphModule(gm, g, class_name="L2fxBlock")
    # The block runs again and again on its cached inputs: a block that begins with the
    # previous block's in-place activation would otherwise apply it to the cache on every run.
    if clone_written_inputs(block):
        block.recompile()
    return block


def plain_parameters(gm: fx.GraphModule) -> dict[int, dict[str, torch.nn.Parameter]]:
    """Block index -> the plain float parameters only that block's nodes read.

    A parameter qualifies when it is not a compressed weight and every user of every
    ``get_attr`` of it is a (non-weight) node of one block; one read from outside (another
    block, a side value, the unblocked head) keeps it out, so tuning it cannot change what
    a block already reconstructed, or anything else, sees.
    """
    params = dict(gm.named_parameters())
    sites = {site.param for _, site in weight_sites(gm)}
    owners: dict[str, set] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        path = str(n.target)
        users = owners.setdefault(path, set())
        if not n.users:
            users.add(None)
        for u in n.users:
            b = u.meta.get(Block.META_KEY)
            users.add(None if b is None or is_weight_node(gm, u) else b.index)
    result: dict[int, dict[str, torch.nn.Parameter]] = {}
    for path, users in owners.items():
        p = params.get(path)
        if p is None or path in sites or not p.is_floating_point() or len(users) != 1 or None in users:
            continue
        result.setdefault(next(iter(users)), {})[path] = p
    return result


def build_programs(gm: fx.GraphModule) -> list[BlockProgram]:
    """One :class:`BlockProgram` per block of ``block_partition``, in block order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    plain = plain_parameters(gm)
    side = side_nodes(gm)
    members: dict[int, list[fx.Node]] = {}
    blocks: dict[int, Block] = {}
    for n in gm.graph.nodes:
        b = n.meta.get(Block.META_KEY)
        if b is not None and not is_weight_node(gm, n):
            members.setdefault(b.index, []).append(n)
            blocks[b.index] = b
    programs = []
    for index in sorted(members):
        nodes = set(members[index])
        keep, phs, inputs = set(nodes), set(), set()
        stack = list(nodes)
        while stack:  # pull in weights, parameters and side values (recomputed from the inputs)
            for a in stack.pop().all_input_nodes:
                if a in keep or a in inputs or a in phs:
                    continue
                if a.op == "placeholder":
                    phs.add(a)
                elif a.op == "get_attr" or is_weight_node(gm, a) or a in side:
                    keep.add(a)
                    stack.append(a)
                else:
                    inputs.add(a)
        outputs = sorted({n for n in nodes for u in n.users if u not in nodes}, key=order.__getitem__)
        ordered = sorted(keep, key=order.__getitem__)
        phs_l, inputs_l = sorted(phs, key=order.__getitem__), sorted(inputs, key=order.__getitem__)
        owned = [(n, gm.get_submodule(str(n.target)), require_meta(n, WeightSite, "block_reconstruction"))
                 for n in ordered if is_weight_node(gm, n) and n.meta.get(Block.META_KEY) == blocks[index]]
        programs.append(BlockProgram(
            blocks[index], phs_l, inputs_l, outputs, owned,
            extract(gm, ordered, phs_l, inputs_l, outputs, fp32=False),
            extract(gm, ordered, phs_l, inputs_l, outputs, fp32=True), plain.get(index, {})))
    return programs



def build_network_programs(gm: fx.GraphModule, programs: list[BlockProgram]
                           ) -> tuple[fx.GraphModule, fx.GraphModule, int]:
    """The whole graph as two GraphModules (compressed weights / raw ``.weight``), both taking
    the model's placeholders and returning the network's tensor outputs followed by every
    block output; also returns how many leading outputs are the network's."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    final = list(dict.fromkeys(a for a in pytree.tree_leaves(out_node.args[0]) if isinstance(a, fx.Node)))
    inner = [n for n in dict.fromkeys(o for p in programs for o in p.outputs) if n not in final]
    outputs = final + inner
    return (extract(gm, body, phs, [], outputs, fp32=False), extract(gm, body, phs, [], outputs, fp32=True),
            len(final))


def _calibration_batches(calib: Any, max_samples: int) -> list:
    """The first calibration batches holding ``max_samples`` samples (0 = all)."""
    batches = list(calib)
    if max_samples:
        kept, have = [], 0
        for b in batches:
            if have >= max_samples:
                break
            kept.append(b)
            have += batch_size(b)
        batches = kept
    return batches


def calibration_inputs(gm: fx.GraphModule, calib: Any, max_samples: int, device: torch.device) -> list[dict]:
    """Per calibration batch (the first ones holding ``max_samples`` samples; 0 = all), the
    values of ``gm``'s placeholders on ``device``, keyed by placeholder node."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [dict(zip(phs, placeholder_values(gm, to_device(b, device))))
            for b in _calibration_batches(calib, max_samples)]


def calibration_masks(calib: Any, max_samples: int, device: torch.device) -> list[torch.Tensor | None]:
    """Per batch of :func:`calibration_inputs`, its real tokens (``l2fx.data.token_mask``:
    a language model batch's ``attention_mask`` ``[batch, tokens]`` as bool) on ``device``, or
    None (no mask: every position is real)."""
    masks = [token_mask(b) for b in _calibration_batches(calib, max_samples)]
    return [None if m is None else m.to(device) for m in masks]
