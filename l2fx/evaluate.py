"""Re-running only what a change reaches: cached evaluation of an fx graph.

Sensitivity analysis evaluates the model once per (layer, candidate) with one weight
replaced. Everything that does not depend on that weight is the same every time, so
:class:`DownstreamRunner` runs the graph once, keeps every node's value, and afterwards
recomputes only the descendants of the replaced node. For a layer halfway through a network
this halves the work; for the last layers it is nearly free.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.node import map_arg

from l2fx.data import Batch
from l2fx.ir import fetch_attr


def _flat_inputs(gm: fx.GraphModule, batch: Batch) -> list[Any]:
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, dict):
        args, kwargs = (), batch
    else:
        args, kwargs = tuple(batch), {}
    if kwargs:  # the generated forward names its inputs: bind keywords to positions first
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        args = tuple(bound.arguments.values())
    return list(gm.graph._codegen.process_inputs(*args))


class DownstreamRunner:
    """Caches all node values of ``gm`` on ``batch``; re-evaluates the part a node reaches."""

    def __init__(self, gm: fx.GraphModule, batch: Batch, overrides: Mapping[fx.Node, Any] | None = None):
        """``overrides``: values some nodes take instead of their own (e.g. compressed weights)."""
        self.gm = gm
        overrides = overrides or {}
        self.order = list(gm.graph.nodes)
        self.graph = nx.DiGraph()
        for node in self.order:
            for user in node.users:
                self.graph.add_edge(node, user)
        placeholders = [n for n in self.order if n.op == "placeholder"]
        flat = _flat_inputs(gm, batch)
        if len(flat) != len(placeholders):
            raise ValueError(f"graph takes {len(placeholders)} inputs, batch gives {len(flat)}")
        self.cache: dict[fx.Node, Any] = dict(zip(placeholders, flat))
        with torch.no_grad():
            for node in self.order:
                if node in overrides:
                    self.cache[node] = overrides[node]
                elif node.op != "placeholder":
                    self.cache[node] = self._execute(node, self.cache)
        self.output = self.cache[self.order[-1]]

    def _execute(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = map_arg(node.args, lambda n: env[n])
        kwargs = map_arg(node.kwargs, lambda n: env[n])
        if node.op == "get_attr":
            return fetch_attr(self.gm, str(node.target))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "output":
            out = args[0]
            return self.gm.graph._codegen.process_outputs(out)
        raise ValueError(f"cannot execute {node.op}")

    @torch.no_grad()
    def run_with(self, node: fx.Node, value: Any) -> Any:
        """The graph's output with ``node``'s value replaced by ``value``."""
        reached = nx.descendants(self.graph, node) if node in self.graph else set()
        env = dict(self.cache)
        env[node] = value
        for n in self.order:
            if n in reached:
                env[n] = self._execute(n, env)
        return env[self.order[-1]]
