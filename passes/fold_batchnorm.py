"""``fold_batchnorm``: fold eval-mode BatchNorm into the conv (or linear) that feeds it.

Before::

    y = conv2d(x, w, b, ...); z = batch_norm(y, mean, var, gamma, beta, False, _, eps)

After::

    z = conv2d(x, w', b', ...)   with  w' = w * gamma / sqrt(var + eps)  (per output channel)
                                       b' = (b - mean) * gamma / sqrt(var + eps) + beta

The folded weights are what gets compressed (fewer tensors to store, and the stored weights
are the ones that run). Pre: ``normalize`` ran. Post: no batch_norm call_function whose input
is a conv/linear output used only by it, whose weight (and bias) tensor no other node reads. The conv's ``bias`` parameter is created if absent;
the BatchNorm's tensors are deleted by ``prune_unused_state``. Idempotent.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from l2fx.ir import arg_of, fetch_attr, weighted_op
from l2fx.pipeline import L2fxPass, PassResult

_BATCH_NORMS = {F.batch_norm}


def _match(gm: fx.GraphModule, bn: fx.Node):
    """(producer, op, weight node, bias node, stats nodes, eps) when ``bn`` can be folded."""
    if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
        return None
    producer = bn.args[0]
    if not isinstance(producer, fx.Node) or len(producer.users) != 1:
        return None
    op = weighted_op(producer)
    if op is None or op.family not in ("conv", "linear"):
        return None
    w_node, b_node = arg_of(producer, op.weight_arg), arg_of(producer, op.bias_arg)
    stats = bn.args[1:5]
    training = bn.args[5] if len(bn.args) > 5 else bn.kwargs.get("training", False)
    eps = bn.args[7] if len(bn.args) > 7 else bn.kwargs.get("eps", 1e-5)
    if training or not isinstance(w_node, fx.Node) or w_node.op != "get_attr" or _reads(gm, w_node) != 1:
        return None
    if not all(s is None or (isinstance(s, fx.Node) and s.op == "get_attr") for s in stats):
        return None
    if b_node is not None and (not isinstance(b_node, fx.Node) or b_node.op != "get_attr" or _reads(gm, b_node) != 1):
        return None
    return producer, op, w_node, b_node, stats, eps


def _reads(gm: fx.GraphModule, attr: fx.Node) -> int:
    """How many nodes read the *tensor* ``attr`` fetches, through any get_attr node: folding
    rescales the tensor in place, so one read elsewhere (a conv module called twice gets a
    get_attr per call; a tensor tied under two names) would change what that read sees."""
    tensor = fetch_attr(gm, str(attr.target))
    return sum(len(n.users) for n in gm.graph.nodes
               if n.op == "get_attr" and (n is attr or fetch_attr(gm, str(n.target)) is tensor))


class FoldBatchNorm(L2fxPass):
    name = "fold_batchnorm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for bn in list(gm.graph.nodes):
            match = _match(gm, bn)
            if match is None:
                continue
            producer, op, w_node, b_node, stats, eps = match
            mean, var, gamma, beta = (None if s is None else fetch_attr(gm, s.target).detach().double() for s in stats)
            w = fetch_attr(gm, w_node.target)
            scale = torch.rsqrt(var + eps) * (gamma if gamma is not None else 1.0)
            bias = fetch_attr(gm, b_node.target).detach().double() if b_node is not None else torch.zeros_like(mean)
            new_bias = (bias - mean) * scale + (beta if beta is not None else 0.0)
            shape = [-1] + [1] * (w.dim() - 1)
            with torch.no_grad():
                w.copy_((w.double() * scale.reshape(shape)).to(w.dtype))
            if b_node is not None:
                with torch.no_grad():
                    fetch_attr(gm, b_node.target).copy_(new_bias.to(w.dtype))
            else:
                owner_path = str(w_node.target).rpartition(".")[0]
                bias_target = f"{owner_path}.bias" if owner_path else "bias"
                owner = gm.get_submodule(owner_path) if owner_path else gm
                if getattr(owner, "bias", None) is not None:
                    self.fail(f"cannot create folded bias: {bias_target!r} already exists", producer)
                setattr(owner, "bias", nn.Parameter(new_bias.to(w.dtype), requires_grad=False))
                with gm.graph.inserting_before(producer):
                    b_node = gm.graph.get_attr(bias_target)
                args = list(producer.args)
                while len(args) <= op.bias_arg:
                    args.append(None)
                args[op.bias_arg] = b_node
                producer.args = tuple(args)
            bn.replace_all_uses_with(producer)
            gm.graph.erase_node(bn)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if _match(gm, node) is not None:
                self.fail("foldable batch_norm left in the graph", node)
