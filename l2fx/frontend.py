"""Front-ends: turn an ``nn.Module`` into an fx ``GraphModule`` the passes can rewrite.

``torch.fx.symbolic_trace`` is tried first (keeps module names and call_module nodes);
models it cannot trace (data-dependent control flow, HF transformers) go through
``torch.export.export`` with every input dimension marked ``Dim.AUTO``, and its unlifted
``ep.module()`` (parameters as ``get_attr`` nodes, aten ops). Both give parameter names equal
to the original model's ``state_dict`` keys, which the artifact uses. An fx graph must
reproduce the model's output on the example batch (within 1e-5 of its largest output), or it
counts as a failed trace and export is tried.

The caller's model is deep-copied first: fx shares submodules with the traced model, and
later passes (BatchNorm folding) rewrite parameters. ``capture(..., dtype=torch.float32)`` makes
that copy with every floating parameter and buffer cast as it is copied (:func:`copy_as`; the
caller's weights in their own dtype are never copied first; tensors of the copy's dtype are
copied on write, so they cost memory only where a pass rewrites them): how :func:`l2fx.compile` captures a
bfloat16 or float16 model whose graph, traced in its own dtype, casts to that dtype inside (a
transformers ``LlamaRMSNorm`` returns ``weight * h.to(input_dtype)``; torch.export records
``input_dtype`` as a constant), so the graph cannot simply be cast to float32 afterwards.

Hugging Face transformers (:func:`_prepare_copy`): a model whose ``config.use_cache`` is on
returns a ``DynamicCache`` that torch.export cannot flatten ("not a known type"), and a KV
cache is no part of what is compressed; the *copy* is captured with ``use_cache = False``
(the caller's model and config are left as they are). What was changed is in
``CaptureInfo.notes`` (and the compile report's ``records["capture"]``).

vmap regions (:func:`outline_vmap_regions`): torch.export records ``torch.vmap`` as a
sequence of ``_vmap_increment_nesting`` / ``_add_batch_dim`` / ... / ``_remove_batch_dim`` /
``_vmap_decrement_nesting`` calls whose batched values are only valid between the nesting
calls, and the nesting calls have no users. A runner that executes only part of the graph
(dead-code elimination, :class:`l2fx.evaluate.DownstreamRunner`'s recomputation of what a
weight reaches, a reconstruction block pulling in its side values) ran the batched ops
outside their vmap level: "your tensor may have escaped from inside a function being
vmapped". Transformers builds attention masks this way when a model (or a user) adds mask
functions (``or_mask_function``/``and_mask_function``), and did for every mask on older
versions. The capture moves each region into one ``call_module`` of a sub-GraphModule
(``l2fx_vmap_<i>``, no parameters: the state_dict is unchanged), which every runner executes
whole, in its recorded order.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import operator
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

try:
    from torch._functorch import predispatch as _predispatch
except ImportError:  # torch before 2.4 records the torch._C._functorch functions themselves
    _predispatch = None

from l2fx.data import Batch, call_model, clone_batch, output_vector
from l2fx.errors import CaptureError
from l2fx.memory import can_lazy_clone, lazy_clone


@dataclasses.dataclass(frozen=True)
class CaptureInfo:
    """How the graph was captured; stored in the artifact so :func:`l2fx.load` can redo it."""

    frontend: str  # "fx" | "export"
    # For export: per input leaf, (kind "arg"/"kwarg", key, shape, dtype) of the example batch.
    inputs: tuple[tuple[str, str, tuple[int, ...], str], ...] = ()
    # What the capture changed on its copy or in the graph (e.g. "config.use_cache=False"). Not
    # stored in the artifact: the same model gets the same changes when l2fx.load re-captures.
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"frontend": self.frontend, "inputs": [list(i[:2]) + [list(i[2]), i[3]] for i in self.inputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CaptureInfo":
        return cls(d["frontend"], tuple((k, key, tuple(shape), dt) for k, key, shape, dt in d["inputs"]))


def _input_spec(batch: Batch) -> tuple[tuple[str, str, tuple[int, ...], str], ...]:
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, Mapping):
        return tuple(("kwarg", k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in batch.items())
    return tuple(("arg", str(i), tuple(v.shape), str(v.dtype).replace("torch.", "")) for i, v in enumerate(batch))


def example_from_spec(info: CaptureInfo) -> tuple[tuple, dict]:
    args, kwargs = [], {}
    for kind, key, shape, dtype in info.inputs:
        t = torch.zeros(shape, dtype=getattr(torch, dtype))
        if kind == "arg":
            args.append(t)
        else:
            kwargs[key] = t
    return tuple(args), kwargs


def _split(batch: Batch) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    return tuple(batch), {}


def _prepare_copy(work: torch.nn.Module) -> tuple[str, ...]:
    """Switches off, on the deep copy about to be captured, what makes a transformers model's
    output uncapturable; returns what it changed. Only a transformers-style config (an object
    with ``use_cache`` and ``to_dict``) is touched: a KV cache (``DynamicCache``) in the output
    is not a pytree torch.export knows, and not part of the compressed model's function."""
    notes = []
    config = getattr(work, "config", None)
    if config is not None and hasattr(config, "to_dict") and getattr(config, "use_cache", False) is True:
        config.use_cache = False  # the copy's own config object: deepcopy copied it
        notes.append("config.use_cache=False (on the captured copy: the KV cache is not captured)")
    return tuple(notes)


def _vmap_markers() -> tuple[set, set]:
    """The functions torch.export records for entering and leaving a vmap level (torch 2.14:
    the wrappers of ``torch._functorch.predispatch``; the ``torch._C._functorch`` ones too)."""
    enter, leave = {torch._C._functorch._vmap_increment_nesting}, {torch._C._functorch._vmap_decrement_nesting}
    if _predispatch is not None:
        enter.add(getattr(_predispatch, "_vmap_increment_nesting", None))
        leave.add(getattr(_predispatch, "_vmap_decrement_nesting", None))
    return enter - {None}, leave - {None}


def outline_vmap_regions(gm: fx.GraphModule) -> int:
    """Moves every outermost vmap region of ``gm`` (from a ``_vmap_increment_nesting`` call to
    the matching ``_vmap_decrement_nesting``, in graph order) into one ``call_module`` of a
    sub-GraphModule ``l2fx_vmap_<i>`` that runs the region's nodes in their recorded order and
    returns the values used after it. Returns how many regions it outlined. Idempotent.

    Before::

        n = _vmap_increment_nesting(s, 'error'); a = _add_batch_dim(q, 0, 1); m = le(a, k)
        r = _remove_batch_dim(m, 1, s, 0); _vmap_decrement_nesting(); y = and_(r, pad)

    After::

        o = call_module[l2fx_vmap_0](s, q, k); r = getitem(o, 0); y = and_(r, pad)
    """
    enter, leave = _vmap_markers()
    regions: list[list[fx.Node]] = []
    depth, current = 0, []
    for node in gm.graph.nodes:
        is_call = node.op == "call_function"
        if is_call and node.target in enter:
            depth += 1
        if depth > 0 and node.op not in ("placeholder", "get_attr", "output"):
            current.append(node)
        if is_call and node.target in leave and depth > 0:
            depth -= 1
            if depth == 0:
                regions.append(current)
                current = []
    if depth:
        raise CaptureError("the exported graph opens a vmap level it never closes")
    taken = {name for name, _ in gm.named_children()}
    index = 0
    for region in regions:
        members = set(region)
        inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in members))
        outputs = [n for n in region if any(u not in members for u in n.users)]
        sub = fx.Graph()
        env = {a: sub.placeholder(a.name) for a in inputs}
        for a in inputs:
            env[a].meta.update({k: v for k, v in a.meta.items() if k == "val"})
        for n in region:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(tuple(env[o] for o in outputs))
        while f"l2fx_vmap_{index}" in taken:
            index += 1
        name = f"l2fx_vmap_{index}"
        taken.add(name)
        gm.add_submodule(name, fx.GraphModule(torch.nn.Module(), sub, class_name="L2fxVmapRegion"))
        with gm.graph.inserting_after(region[-1]):
            call = gm.graph.call_module(name, tuple(inputs))
        call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
        anchor = call
        for i, o in enumerate(outputs):
            with gm.graph.inserting_after(anchor):
                item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta.update({k: v for k, v in o.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
            o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in members)
            anchor = item
        for n in reversed(region):
            gm.graph.erase_node(n)
    if regions:
        gm.graph.lint()
        gm.recompile()
    return len(regions)


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    auto = torch.export.Dim.AUTO
    dyn_args = tuple({d: auto for d in range(a.dim())} for a in args)
    dyn_kwargs = {k: {d: auto for d in range(v.dim())} for k, v in kwargs.items()}
    dynamic: Any = {**dict(zip(_arg_names(model, len(args)), dyn_args)), **dyn_kwargs} if kwargs else dyn_args
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception:
        ep = torch.export.export(model, args, kwargs, strict=False)
    return ep.module()


def _arg_names(model: torch.nn.Module, n: int) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params[:n]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def copy_as(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy of ``model``; with ``dtype``, every floating parameter and buffer of another
    dtype is cast to it as it is copied (shared tensors stay shared), so the copy costs the cast
    weights only, never a copy in the model's own dtype first. The caller's model is untouched.

    Tensors that keep their dtype are copied on write (:func:`l2fx.memory.lazy_clone`): the copy costs no
    memory for the weights the passes only read (a float32 model's weights are not held twice
    while it compiles), and a pass that rewrites a weight in place (BatchNorm folding, a
    solver's update, a fp16 round trip) gets its own storage at that write, the caller's
    tensor keeping its values."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) in memo:
            continue
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            c = t.detach().to(dtype)
        elif can_lazy_clone(t) and not (t.requires_grad and not t.is_leaf):
            c = lazy_clone(t)
        else:
            continue  # the deep copy clones it
        memo[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else c
    return copy.deepcopy(model, memo)


def capture(model: torch.nn.Module, example: Batch, frontend: str = "auto",
            dtype: torch.dtype | None = None) -> tuple[fx.GraphModule, CaptureInfo]:
    """Deep-copies ``model`` (eval mode; with ``dtype``, its floating tensors cast to it: see
    :func:`copy_as`) and captures it; raises CaptureError naming what failed."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if frontend not in ("auto", "fx", "export"):
        raise CaptureError(f"unknown frontend {frontend!r}: expected 'auto', 'fx' or 'export'")
    work = copy_as(model, dtype).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    notes = _prepare_copy(work)
    fx_error = export_error = None
    if frontend in ("auto", "fx"):
        try:
            gm = fx.symbolic_trace(work)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, AttributeError...)
            fx_error = exc
        else:
            mismatch = _mismatch(work, gm, example)
            if mismatch is None:
                return gm, CaptureInfo("fx", notes=notes)
            fx_error = CaptureError(f"its graph does not reproduce the model on the example batch ({mismatch})")
    if frontend in ("auto", "export"):
        args, kwargs = _split(example)
        try:
            gm = _export(work, args, kwargs)
            for p in gm.parameters():
                p.requires_grad_(False)
            outlined = outline_vmap_regions(gm)
            if outlined:
                notes += (f"{outlined} vmap region(s) outlined into call_module nodes",)
            return gm, CaptureInfo("export", _input_spec(example), notes)
        except Exception as exc:
            export_error = exc
    parts = []
    if fx_error is not None:
        parts.append(f"torch.fx.symbolic_trace failed with {_first_line(fx_error)}")
    if export_error is not None:
        parts.append(f"torch.export.export failed with {_first_line(export_error)}")
    raise CaptureError(f"cannot capture {type(model).__name__}: " + "; ".join(parts)) from (export_error or fx_error)


def _mismatch(model: torch.nn.Module, gm: fx.GraphModule, example: Batch | None) -> str | None:
    """How ``gm`` differs from ``model`` on ``example`` (None: it does not, or it cannot be told).

    symbolic_trace can record a graph that computes something else without a word: ``y += 1`` on
    a view ``y`` of the input is traced as ``y = y + 1``, so what eager mode wrote through the
    view is lost. Both run on copies of ``example``; a model that fails on it is left to the
    calibration check that follows capture.
    """
    if example is None:
        return None
    def run(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return output_vector(call_model(m, clone_batch(example))).double()

    try:
        want, got = run(model), run(gm)
    except Exception:  # noqa: BLE001 - not this check's to report (check_runs names the failure)
        return None
    if want.shape != got.shape:
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = float(want[torch.isfinite(want)].abs().max()) if torch.isfinite(want).any() else 0.0
    err = (got - want).abs().nan_to_num(nan=float("inf"))
    err = err.masked_fill(torch.isnan(want) & torch.isnan(got), 0.0)
    worst = float(err.max()) if err.numel() else 0.0
    if worst > 1e-5 * max(scale, 1e-30):
        return f"largest output difference {worst:.3g} against outputs up to {scale:.3g}"
    return None


def recapture(model: torch.nn.Module, info: CaptureInfo) -> fx.GraphModule:
    """Captures ``model`` the way ``info`` says (used by :func:`l2fx.load`)."""
    if info.frontend == "fx":
        gm, _ = capture(model, None, frontend="fx")
        return gm
    args, kwargs = example_from_spec(info)
    example: Batch = kwargs if kwargs else args
    gm, _ = capture(model, example, frontend="export")
    return gm


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the captured model's tensor names, shapes and dtypes (architecture identity).

    Ops are left out on purpose: torch.export's op spelling changes between torch releases,
    and an artifact written with one must load with another.
    """
    h = hashlib.sha256()
    state = {k: [list(v.shape), str(v.dtype)] for k, v in gm.state_dict().items()}
    h.update(json.dumps(state, sort_keys=True).encode())
    return h.hexdigest()[:32]


def tree_tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
