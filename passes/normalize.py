"""``normalize``: one spelling for weighted ops, whatever the front-end.

Before (symbolic_trace)::

    conv = call_module[features.0](x)
    bn   = call_module[features.1](conv)

After::

    w    = get_attr[features.0.weight]
    conv = call_function[F.conv2d](x, w, None, stride, padding, dilation, groups)
    rm   = get_attr[features.1.running_mean] ...
    bn   = call_function[F.batch_norm](conv, rm, rv, g, b, False, momentum, eps)

Dead code (nodes the output does not depend on) is removed. A tensor registered under several
names (tied weights) is read through the first of them in ``state_dict()`` order.

Pre: a GraphModule. Post: no dead node (in-place ops count as live); every tensor read by
get_attr nodes under one name; no graph input is
written in place (such a graph reads ``input.clone()``: the calibration batches it runs on
again and again stay as they were); no call_module node targets an ``nn.Linear``/``nn.Conv1d``/
``nn.Conv2d`` (zero padding)/``nn.Embedding``/eval-mode ``nn.BatchNorm2d``; the owning
modules stay, so parameter names (state_dict keys) are unchanged. Graphs from torch.export
are already in this form (aten ops on get_attr weights). Idempotent.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from l2fx.inplace import clone_written_inputs, is_impure, written_inputs
from l2fx.ir import fetch_attr
from l2fx.pipeline import L2fxPass, PassResult


def _linear(gm, node, mod: nn.Linear, attr):
    return F.linear, (node.args[0], attr("weight"), attr("bias") if mod.bias is not None else None)


def _conv(gm, node, mod, attr):
    fn = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
    padding: Any = mod.padding
    return fn, (node.args[0], attr("weight"), attr("bias") if mod.bias is not None else None,
                mod.stride, padding, mod.dilation, mod.groups)


def _embedding(gm, node, mod: nn.Embedding, attr):
    return F.embedding, (node.args[0], attr("weight"), mod.padding_idx, mod.max_norm, mod.norm_type,
                         mod.scale_grad_by_freq, mod.sparse)


def _batch_norm(gm, node, mod: nn.BatchNorm2d, attr):
    return F.batch_norm, (node.args[0], attr("running_mean"), attr("running_var"),
                          attr("weight") if mod.affine else None, attr("bias") if mod.affine else None,
                          False, 0.0, mod.eps)


def _eligible(mod: nn.Module) -> Callable | None:
    if type(mod) is nn.Linear:
        return _linear
    if type(mod) in (nn.Conv1d, nn.Conv2d) and mod.padding_mode == "zeros":
        return _conv
    if type(mod) is nn.Embedding:
        return _embedding
    if type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d) and not mod.training and mod.track_running_stats:
        return _batch_norm
    return None


def _read_tied_tensors_by_one_name(gm: fx.GraphModule) -> bool:
    """A tensor registered under several names (tied embeddings: ``lm_head.weight is
    embed.weight``) is read through one: the first of its names in ``state_dict()`` order, which
    the same architecture always gives. Its other names are then read by nothing, and
    ``prune_unused_state`` drops them: the tensor is compressed, stored and counted once."""
    canonical: dict[int, str] = {}
    for name, t in gm.state_dict(keep_vars=True).items():
        canonical.setdefault(id(t), name)
    changed = False
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = fetch_attr(gm, str(node.target))
        first = canonical.get(id(t)) if isinstance(t, torch.Tensor) else None
        if first is not None and first != str(node.target):
            node.target = first
            changed = True
    return changed


class Normalize(L2fxPass):
    name = "normalize"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            mod = gm.get_submodule(str(node.target))
            rewrite = _eligible(mod)
            if rewrite is None:
                continue
            with gm.graph.inserting_before(node):
                def attr(name: str, _t=str(node.target)) -> fx.Node:
                    return gm.graph.get_attr(f"{_t}.{name}")

                fn, args = rewrite(gm, node, mod, attr)
                new = gm.graph.call_function(fn, args)
            new.meta.update({k: v for k, v in node.meta.items()})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        modified |= _read_tied_tensors_by_one_name(gm)
        # Drop what the output does not depend on (e.g. BERT's pooler under a mean-pooling
        # wrapper): its weights would otherwise be stored, and reconstructed against nothing.
        # In-place ops stay although nothing reads their result (fx's own pass drops
        # ``x.add_(1)`` written as a statement).
        for node in reversed(list(gm.graph.nodes)):
            if node.op not in ("placeholder", "output") and not node.users and not is_impure(gm, node):
                gm.graph.erase_node(node)
                modified = True
        # The pipeline runs the graph on the same calibration batches many times: a model that
        # writes into its input in place would change them on every run. It reads a copy.
        modified |= bool(clone_written_inputs(gm))
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        names: dict[int, str] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                t = fetch_attr(gm, str(node.target))
                if names.setdefault(id(t), str(node.target)) != str(node.target):
                    self.fail(f"a tensor is read under two names ({names[id(t)]!r})", node)
        for node in gm.graph.nodes:
            if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
                if _eligible(gm.get_submodule(str(node.target))) is not None:
                    self.fail("weighted module left as call_module", node)
        for ph in written_inputs(gm):
            self.fail("an in-place op writes into this graph input", ph)
