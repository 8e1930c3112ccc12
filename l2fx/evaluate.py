"""Re-running only what a change reaches: cached evaluation of an fx graph.

Sensitivity analysis evaluates the model once per (layer, candidate) with one weight
replaced. Everything that does not depend on that weight is the same every time, so
:class:`DownstreamRunner` runs the graph once, keeps every node's value, and afterwards
recomputes only the descendants of the replaced node. For a layer halfway through a network
this halves the work; for the last layers it is nearly free.

:func:`visit_readers` is the linear-time alternative (sensitivity's ``scope="layer"``): one run
of the graph, each value freed after its last use, handing every watched weight's readers
(their inputs and outputs) to a callback, from which :class:`LocalError` measures a replaced
weight's effect on those outputs alone.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Collection, Mapping

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.node import map_arg

from l2fx import distributed, memory
from l2fx.data import Batch
from l2fx.ir import fetch_attr, weighted_op


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


def execute_node(gm: fx.GraphModule, node: fx.Node, env: Mapping[fx.Node, Any]) -> Any:
    """``node``'s value from its inputs' values in ``env`` (what ``gm``'s generated code does)."""
    args = map_arg(node.args, lambda n: env[n])
    kwargs = map_arg(node.kwargs, lambda n: env[n])
    if node.op == "get_attr":
        return fetch_attr(gm, str(node.target))
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "output":
        return gm.graph._codegen.process_outputs(args[0])
    raise ValueError(f"cannot execute {node.op}")


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
        return execute_node(self.gm, node, env)

    @torch.no_grad()
    def run_with(self, node: fx.Node, value: Any) -> Any:
        """The graph's output with ``node``'s value replaced by ``value``."""
        return self.run_observing(node, value, ())[0]

    @torch.no_grad()
    def run_observing(self, node: fx.Node, value: Any, observe: Collection[fx.Node]) -> tuple[Any, list[Any]]:
        """As :meth:`run_with`, and the values the ``observe`` nodes took in that run (in order)."""
        reached = nx.descendants(self.graph, node) if node in self.graph else set()
        env = dict(self.cache)
        env[node] = value
        for n in self.order:
            if n in reached:
                env[n] = self._execute(n, env)
        return env[self.order[-1]], [env[n] for n in observe]


#: ``(reader node, its positional args, its kwargs, its output)`` as the uncompressed run gave them.
Reading = tuple[fx.Node, tuple, dict, Any]


@torch.no_grad()
def visit_readers(gm: fx.GraphModule, batch: Batch, weights: Collection[fx.Node],
                  visit: Callable[[fx.Node, list[Reading]], None]) -> Any:
    """Runs ``gm`` once on ``batch`` and returns its output. ``weights``: weight nodes, each read
    only by weighted ops (:data:`l2fx.ir.WEIGHTED_OPS`, as ``mark_weights`` guarantees); once the
    last reader (user) of such a node has run, ``visit(node, readings)`` is called with every reader's inputs and output,
    in graph order. Values are freed after their last use, so what is alive at once is what the
    graph's own execution holds plus the readings of the weights being visited."""
    order = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in order}
    placeholders = [n for n in order if n.op == "placeholder"]
    flat = _flat_inputs(gm, batch)
    if len(flat) != len(placeholders):
        raise ValueError(f"graph takes {len(placeholders)} inputs, batch gives {len(flat)}")
    env: dict[fx.Node, Any] = dict(zip(placeholders, flat))
    pending: dict[fx.Node, list[Reading]] = {}
    weights = set(weights)
    readers_left = {w: len(w.users) for w in weights}
    for i, node in enumerate(order):
        if node.op != "placeholder":
            env[node] = execute_node(gm, node, env)
        for w in node.all_input_nodes:
            if w in weights:
                pending.setdefault(w, []).append((node, map_arg(node.args, lambda n: env[n]),
                                                  map_arg(node.kwargs, lambda n: env[n]), env[node]))
                readers_left[w] -= 1
                if readers_left[w] == 0:
                    visit(w, pending.pop(w))
                    memory.release()
        if node is order[-1]:
            break
        for n in node.all_input_nodes + ([node] if not node.users else []):  # a value nothing reads: now
            if last_use[n] <= i and n in env:
                del env[n]
    return env[order[-1]]


class LocalError:
    """The relative error a replacement of one weight makes in the outputs of its readers,
    ``sum ||op(x, W_hat) - op(x, W)||^2 / sum ||op(x, W)||^2`` over the readings (their inputs
    from the uncompressed run), both sums over every rank's samples in a distributed compile;
    0 when the outputs carry no energy."""

    def __init__(self, readings: list[Reading]):
        self.readings = readings
        self.energy, = distributed.all_reduce_scalars(sum(float(out.double().pow(2).sum()) for *_, out in readings))

    @torch.no_grad()
    def __call__(self, w_hat: torch.Tensor) -> float:
        num = 0.0
        for node, args, kwargs, out in self.readings:
            args = list(args)
            i = weighted_op(node).weight_arg
            args[i] = w_hat.to(args[i].dtype)
            num += float((node.target(*args, **kwargs) - out).double().pow(2).sum())
        num, = distributed.all_reduce_scalars(num)
        return num / self.energy if self.energy > 0 else 0.0
