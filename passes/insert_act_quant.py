"""``insert_act_quant``: the input of every linear/conv op reading a weight with an activation
quantiser goes through it (the seed's w+a BOP setting, :mod:`l2fx.activations`).

Before::

    w = get_attr[conv.weight]          # l2fx.act_quant: ActQuantIntent(spec)
    y = conv2d(x, w, b, ...)

After::

    w = get_attr[conv.weight]
    xq = call_module[l2fx_act.conv__weight](x)      # ActQuant(layer="conv.weight", spec)
    y = conv2d(xq, w, b, ...)

One :class:`~l2fx.modules.ActQuant` module per weight, at ``l2fx_act.<param with . as __>``,
shared by every linear/conv op reading that weight (other ops reading it, such as a tied
embedding's lookup, read indices and are left as they are). The weight may be a ``get_attr`` or a
weight module's ``call_module`` (the pass runs at compile after ``compound_plan``, and at
``l2fx.load`` after the weights are installed, from the specs the artifact stores).

``specs``: parameter name -> :class:`~l2fx.activations.ActQuantSpec` to set first (the load
path); without, the weights' ``ActQuantIntent`` entries are applied.

Pre: every weight with an intent (or a given spec) is read by at least one linear/conv op.
Post: every such op's input is the call of its weight's ``ActQuant``, whose spec is the
intent's; idempotent (an op already reading its weight's quantiser is left).
"""
from __future__ import annotations

from typing import Mapping

import torch.fx as fx

from l2fx.activations import ActQuantSpec
from l2fx.errors import ConfigError
from l2fx.ir import ActQuantIntent, get_meta, set_meta, weight_consumers, weight_sites
from l2fx.modules import ActQuant
from l2fx.pipeline import L2fxPass, PassResult

__all__ = ["InsertActQuant", "act_module_path"]

FAMILIES = ("linear", "conv")


def _quantised_ops(node: fx.Node) -> list[fx.Node]:
    """The linear/conv ops reading the weight ``node`` (a tied embedding's lookup reads indices,
    not activations: it is left alone)."""
    return [op_node for op_node, op in weight_consumers(node) if op.family in FAMILIES]


def act_module_path(param: str) -> str:
    """Where the quantiser of the inputs of the ops reading ``param`` lives in the GraphModule."""
    return "l2fx_act." + param.replace(".", "__")


class InsertActQuant(L2fxPass):
    name = "insert_act_quant"

    def __init__(self, specs: Mapping[str, ActQuantSpec] | None = None):
        specs = dict(specs or {})
        for param, spec in specs.items():
            if not isinstance(spec, ActQuantSpec):
                raise ConfigError(f"insert_act_quant: the spec of {param!r} must be an ActQuantSpec, got "
                                  f"{type(spec).__name__}")
        self.specs = specs

    def requires(self, gm: fx.GraphModule) -> None:
        sites = {site.param for _, site in weight_sites(gm)}
        missing = sorted(set(self.specs) - sites)
        if missing:
            raise ConfigError(f"insert_act_quant: no compressed weight named {missing[0]!r} in the graph "
                              f"(activation quantisers are given for {len(missing)} unknown layer(s))")
        for node, site in weight_sites(gm):
            if site.param in self.specs or get_meta(node, ActQuantIntent) is not None:
                if not _quantised_ops(node):
                    fams = {op.family for _, op in weight_consumers(node)}
                    self.fail(f"layer {site.param!r} has an activation quantiser, but no linear/conv op reads it "
                              f"(read by {'/'.join(sorted(fams)) or 'no weighted'} op(s)): only linear/conv inputs "
                              f"are quantised", node)

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node, site in list(weight_sites(gm)):
            if site.param in self.specs:
                set_meta(node, ActQuantIntent(self.specs[site.param]))
            intent = get_meta(node, ActQuantIntent)
            if intent is None:
                continue
            path = act_module_path(site.param)
            try:
                module = gm.get_submodule(path)
            except AttributeError:
                module = None
            if not isinstance(module, ActQuant) or module.spec != intent.spec:
                gm.add_submodule(path, ActQuant(site.param, intent.spec))
                modified = True
            for op_node in _quantised_ops(node):
                x = op_node.args[0]
                if isinstance(x, fx.Node) and x.op == "call_module" and str(x.target) == path:
                    continue
                with gm.graph.inserting_before(op_node):
                    xq = gm.graph.call_module(path, (x,))
                op_node.update_arg(0, xq)
                modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, site in weight_sites(gm):
            intent = get_meta(node, ActQuantIntent)
            if intent is None:
                continue
            path = act_module_path(site.param)
            module = gm.get_submodule(path)
            if not isinstance(module, ActQuant) or module.spec != intent.spec:
                self.fail(f"the quantiser at {path} is not the layer's", node)
            for op_node in _quantised_ops(node):
                x = op_node.args[0]
                if not (isinstance(x, fx.Node) and x.op == "call_module" and str(x.target) == path):
                    self.fail(f"op {op_node.name} reads {site.param!r} without its activation quantiser", node)
