"""Which fx nodes write into a tensor in place, and which graph inputs such writes reach.

l2fx runs graphs (and block sub-graphs) many times on the same cached calibration tensors. An
in-place op that writes into a graph input (``nn.Hardswish(inplace=True)`` on the value a block
receives, ``x.mul_(2)`` on the model's input) would change the cache on every run: on
torchvision's MobileNetV3-Small, block ``features.1`` starts with ``features.0``'s in-place
Hardswish, so each evaluation applied it once more to the cached block input and the
reconstruction trained against drifting inputs. :func:`clone_written_inputs` makes such a graph
read a private copy instead.

Recognised writes: modules with ``inplace=True``; functions called with ``inplace=True``
(by keyword or position); functions and methods whose name ends in one ``_`` (``relu_``,
``add_``, ``copy_``); ``operator.i*`` and ``operator.setitem``; aten overloads whose schema
marks an argument as written. A write reaches an input through view-like ops (reshape,
getitem, transpose, ``.to``/``.float()`` that may return ``self``, ...) and through other
in-place ops, which return their argument.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from l2fx.ir import owned_meta

__all__ = ["written_arguments", "written_inputs", "clone_written_inputs", "is_impure"]

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
}
# Ops whose result may share storage with their first argument.
_ALIASING_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "split", "chunk", "unbind",
    "contiguous", "detach", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold",
    "as_strided", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
    "getitem", "__getitem__", "real", "imag", "view_as_real", "view_as_complex", "alias",
}
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                     nn.Dropout3d, nn.AlphaDropout)


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "")


def _trailing_underscore(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _schema_writes(node: fx.Node) -> list[Any]:
    """Arguments an aten overload's schema marks as written (``Tensor(a!)``)."""
    schema = node.target._schema
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written.append(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
    return written


def _bound_inplace(target: Any, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or a call it cannot bind
        return False
    return bound.arguments.get("inplace") is True


def written_arguments(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The argument nodes ``node`` writes into in place (usually none, else its first)."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return [first] if first is not None and getattr(mod, "inplace", False) is True else []
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return [a for a in _schema_writes(node) if isinstance(a, fx.Node)]
        if (node.target in _INPLACE_OPERATORS or _trailing_underscore(_name(node.target))
                or _bound_inplace(node.target, node.args, node.kwargs)):
            return [first] if first is not None else []
        return []
    if node.op == "call_method" and _trailing_underscore(str(node.target)):
        return [first] if first is not None else []
    return []


def _may_alias_first_argument(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _ALIASING_MODULES)
    if node.op in ("call_function", "call_method"):
        return _name(node.target) in _ALIASING_NAMES or bool(written_arguments(gm, node))
    return False


def written_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Placeholders of ``gm`` that some node writes into, directly or through a view."""
    hit: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        for arg in written_arguments(gm, node):
            seen = set()
            while arg is not None and arg not in seen:
                seen.add(arg)
                if arg.op == "placeholder":
                    hit[arg] = None
                    break
                nxt = arg.args[0] if arg.args and isinstance(arg.args[0], fx.Node) else None
                arg = nxt if _may_alias_first_argument(gm, arg) else None
    return list(hit)


def clone_written_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Makes every node that reads a written placeholder read ``placeholder.clone()`` instead,
    so running ``gm`` leaves its inputs as they were. Returns the placeholders cloned; the
    caller recompiles when there are any."""
    written = written_inputs(gm)
    for ph in written:
        users = list(ph.users)
        anchor = next(n for n in gm.graph.nodes if n.op != "placeholder")  # after every placeholder
        with gm.graph.inserting_before(anchor):
            copy = gm.graph.call_method("clone", (ph,))
        owned = owned_meta(ph)  # entries of the passes' namespaces describe the input, not its copy
        copy.meta.update({k: v for k, v in ph.meta.items() if k not in owned})
        for user in users:
            user.replace_input_with(ph, copy)
    return written


def is_impure(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its result: it
    writes in place, or fx itself calls it impure."""
    return bool(written_arguments(gm, node)) or node.is_impure()
