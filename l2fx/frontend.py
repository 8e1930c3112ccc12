"""Front-ends: turn an ``nn.Module`` into an fx ``GraphModule`` the passes can rewrite.

``torch.fx.symbolic_trace`` is tried first (keeps module names and call_module nodes);
models it cannot trace (data-dependent control flow, HF transformers) go through
``torch.export.export`` with every input dimension marked ``Dim.AUTO``, and its unlifted
``ep.module()`` (parameters as ``get_attr`` nodes, aten ops). Both give parameter names equal
to the original model's ``state_dict`` keys, which the artifact uses. An fx graph must
reproduce the model's output on the example batch (within 1e-5 of its largest output), or it
counts as a failed trace and export is tried.

The caller's model is deep-copied first: fx shares submodules with the traced model, and
later passes (BatchNorm folding) rewrite parameters.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from l2fx.data import Batch, call_model, clone_batch, output_vector
from l2fx.errors import CaptureError


@dataclasses.dataclass(frozen=True)
class CaptureInfo:
    """How the graph was captured; stored in the artifact so :func:`l2fx.load` can redo it."""

    frontend: str  # "fx" | "export"
    # For export: per input leaf, (kind "arg"/"kwarg", key, shape, dtype) of the example batch.
    inputs: tuple[tuple[str, str, tuple[int, ...], str], ...] = ()

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


def capture(model: torch.nn.Module, example: Batch, frontend: str = "auto") -> tuple[fx.GraphModule, CaptureInfo]:
    """Deep-copies ``model`` (eval mode) and captures it; raises CaptureError naming what failed."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if frontend not in ("auto", "fx", "export"):
        raise CaptureError(f"unknown frontend {frontend!r}: expected 'auto', 'fx' or 'export'")
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    fx_error = export_error = None
    if frontend in ("auto", "fx"):
        try:
            gm = fx.symbolic_trace(work)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, AttributeError...)
            fx_error = exc
        else:
            mismatch = _mismatch(work, gm, example)
            if mismatch is None:
                return gm, CaptureInfo("fx")
            fx_error = CaptureError(f"its graph does not reproduce the model on the example batch ({mismatch})")
    if frontend in ("auto", "export"):
        args, kwargs = _split(example)
        try:
            gm = _export(work, args, kwargs)
            for p in gm.parameters():
                p.requires_grad_(False)
            return gm, CaptureInfo("export", _input_spec(example))
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
