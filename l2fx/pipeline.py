"""Pass infrastructure: passes, a pass context with instruments, a manager, and the verifier.

Mirrors ``torch.fx.passes.infra``: a pass is a ``PassBase`` whose ``call(gm)`` returns
``PassResult(graph_module, modified)`` and whose ``requires``/``ensures`` bracket it. As in
TVM, options and debugging live in a :class:`PassContext` (``with PassContext(...):``) that
passes read through :func:`PassContext.current`, not in keyword arguments of every pass.

A custom pass::

    class CountNodes(L2fxPass):
        name = "count_nodes"
        def call(self, gm):
            PassContext.current().log(self.name, f"{len(gm.graph.nodes)} nodes")
            return PassResult(gm, False)

    pipeline = default_pipeline().insert_after("range_code", CountNodes())
"""
from __future__ import annotations

import abc
import contextvars
import dataclasses
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from l2fx import distributed, memory
from l2fx.config import BackendConfig, CompileConfig
from l2fx.data import take_samples, to_device
from l2fx.errors import CalibrationError, ConfigError, L2fxError, PassError, VerifierError
from l2fx.ir import namespace, owned_meta, registered_meta_types, weight_sites

__all__ = [
    "L2fxPass", "PassResult", "PassContext", "PassManager", "Instrument", "Timing", "DumpIR",
    "PeakMemory", "Progress", "verify", "VERIFIER_RULES",
]


class L2fxPass(PassBase, abc.ABC):
    """Base of every l2fx pass. Subclasses set ``name`` and implement ``call``.

    Preconditions are declared where they are data, and checked by the manager before ``call``:

    * ``requires_meta``: meta entry types every compressed weight must carry
      (``(Allocation,)``: the allocation ran);
    * ``requires_weight_modules``: module types every compressed weight must be produced by
      (``(TransformedWeight,)``: weights are fake-quantised, not yet coded);
    * ``requires_calib``: the context must hold calibration data;
    * ``writes_weights``: the pass writes or trains ``TransformedWeight.weight``, so no weight may
      be held as symbols (:meth:`~l2fx.modules.TransformedWeight.hold_symbols`: read-only).

    ``supports_distributed``: a pass that reads calibration data reduces what it measures over
    the ``torch.distributed`` ranks (:mod:`l2fx.distributed`); a manager refuses, before running
    anything, a pipeline holding a ``requires_calib`` pass without it while a group is active.

    ``requires(gm)`` and ``ensures(gm)`` state the rest of the pre- and postconditions and raise
    :class:`PassError` (use :meth:`fail`) when they do not hold.
    """

    name: str = ""
    requires_meta: tuple[type, ...] = ()
    requires_weight_modules: tuple[type, ...] = ()
    requires_calib: bool = False
    writes_weights: bool = False
    supports_distributed: bool = False

    def requires(self, graph_module: fx.GraphModule) -> None:  # noqa: D401 - PassBase API
        return None

    def ensures(self, graph_module: fx.GraphModule) -> None:
        return None

    def fail(self, message: str, node: fx.Node | None = None) -> None:
        where = f" at node {node.name!r} ({node.op} {node.target})" if node is not None else ""
        raise PassError(f"pass {self.name!r}{where}: {message}")

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


# --------------------------------------------------------------------------------------------
# Instruments


class Instrument:
    """Hooks called around every pass (TVM's PassInstrument)."""

    def enter(self, ctx: "PassContext") -> None: ...
    def before_pass(self, p: L2fxPass, gm: fx.GraphModule) -> None: ...
    def after_pass(self, p: L2fxPass, gm: fx.GraphModule, result: PassResult) -> None: ...
    def exit(self, ctx: "PassContext") -> None: ...
    def log(self, pass_name: str, message: str) -> None: ...


@dataclasses.dataclass
class Timing(Instrument):
    """Wall time per pass, in seconds, in pipeline order."""

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    _t0: float = 0.0

    def before_pass(self, p, gm):
        self._t0 = time.perf_counter()

    def after_pass(self, p, gm, result):
        self.seconds[p.name] = self.seconds.get(p.name, 0.0) + time.perf_counter() - self._t0


@dataclasses.dataclass
class PeakMemory(Instrument):
    """Process peak resident memory (MiB) seen after each pass (ru_maxrss: a high-water mark)."""

    mib: dict[str, float] = dataclasses.field(default_factory=dict)

    def after_pass(self, p, gm, result):
        self.mib[p.name] = peak_rss_mib()


#: Models from this many bytes of state on get a cycle collection between passes.
_COLLECT_NBYTES = 256 * 2 ** 20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclasses.dataclass
class DumpIR(Instrument):
    """Writes the graph's readable form after every pass to ``directory/NN_<pass>.txt``."""

    directory: str | os.PathLike
    _index: int = 0

    def enter(self, ctx):
        Path(self.directory).mkdir(parents=True, exist_ok=True)

    def after_pass(self, p, gm, result):
        self._index += 1
        path = Path(self.directory) / f"{self._index:02d}_{p.name}.txt"
        lines = [str(gm.graph)]
        for node in gm.graph.nodes:
            entries = owned_meta(node)  # every registered namespace, the user passes' included
            if entries:
                lines.append(f"# {node.name}: {entries}")
        path.write_text("\n".join(lines))


@dataclasses.dataclass
class Progress(Instrument):
    """A tqdm progress bar over the pipeline's passes, plus sub-steps logged by passes."""

    total: int = 0
    _bar: Any = None

    def enter(self, ctx):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total or None, desc="l2fx", unit="pass", leave=True)

    def before_pass(self, p, gm):
        self._bar.set_postfix_str(p.name)

    def after_pass(self, p, gm, result):
        self._bar.update(1)

    def log(self, pass_name, message):
        self._bar.set_postfix_str(f"{pass_name}: {message}")

    def exit(self, ctx):
        self._bar.close()


# --------------------------------------------------------------------------------------------
# Context


_CURRENT: contextvars.ContextVar["PassContext | None"] = contextvars.ContextVar("l2fx_pass_ctx", default=None)


@dataclasses.dataclass
class PassContext:
    """Everything a pass may read besides the graph: config, calibration data, instruments.

    ``calib`` is a list of batches (a Tensor, a tuple of Tensors, or a dict of Tensors);
    ``verify`` runs the IR verifier after every pass; ``device`` is where passes run models.
    """

    config: CompileConfig = dataclasses.field(default_factory=CompileConfig)
    backend: BackendConfig = dataclasses.field(default_factory=BackendConfig)
    calib: Sequence[Any] = ()
    instruments: Sequence[Instrument] = ()
    verify: bool = False
    device: torch.device | str = "cpu"
    # Facts a pass measured for the final report (e.g. the whole-model byte totals). Keyed by
    # pass name; values are plain JSON-able data, never read back by another pass.
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    _token: Any = None

    def sensitivity_batch(self) -> Any:
        """The first ``config.sensitivity.num_samples`` calibration samples as one batch on
        ``device``: what the passes that measure the model's output error run on."""
        return to_device(take_samples(list(self.calib), self.config.sensitivity.num_samples), self.device)

    @staticmethod
    def current() -> "PassContext":
        ctx = _CURRENT.get()
        if ctx is None:
            raise PassError("no active PassContext: run passes inside `with PassContext(...):`")
        return ctx

    def __enter__(self) -> "PassContext":
        self._token = _CURRENT.set(self)
        for inst in self.instruments:
            inst.enter(self)
        return self

    def __exit__(self, *exc) -> None:
        for inst in self.instruments:
            inst.exit(self)
        _CURRENT.reset(self._token)

    def log(self, pass_name: str, message: str) -> None:
        for inst in self.instruments:
            inst.log(pass_name, message)

    def instrument(self, cls: type) -> Any:
        for inst in self.instruments:
            if isinstance(inst, cls):
                return inst
        return None


# --------------------------------------------------------------------------------------------
# Verifier: rules are data, (name, check(gm, node) -> message or None).


def _rule_meta_types(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Every key of a registered namespace (``l2fx.*`` and each user pass's) is a registered
    entry holding its registered type; fx's own keys (``val``, ``stack_trace``) are not ours."""
    types = registered_meta_types()
    for key, value in owned_meta(node).items():
        expected = types.get(key)
        if expected is None:
            return f"node.meta[{key!r}] is not a registered meta entry of namespace {namespace(key)!r}"
        if not isinstance(value, expected):
            return f"node.meta[{key!r}] holds {type(value).__name__}, expected {expected.__name__}"
    return None


def _rule_targets_exist(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op in ("get_attr", "call_module"):
        obj: Any = gm
        for part in str(node.target).split("."):
            if not hasattr(obj, part):
                return f"{node.op} target {node.target!r} does not exist on the module"
            obj = getattr(obj, part)
    return None


def _rule_finite_params(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.numel() and not torch.isfinite(obj).all():
            return f"parameter {node.target!r} holds NaN or inf"
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        for pname, p in mod.named_parameters(recurse=False):
            if p.is_floating_point() and not torch.isfinite(p).all():
                return f"parameter {node.target}.{pname} holds NaN or inf"
    return None


VERIFIER_RULES: list[tuple[str, Callable[[fx.GraphModule, fx.Node], str | None]]] = [
    ("meta entries are registered and typed", _rule_meta_types),
    ("get_attr/call_module targets exist", _rule_targets_exist),
    ("parameters are finite", _rule_finite_params),
]


def verify(gm: fx.GraphModule, after: str = "?") -> None:
    """Checks the graph's structural lint and every rule; names the pass and the node."""
    for node in gm.graph.nodes:
        for rule_name, rule in VERIFIER_RULES:
            message = rule(gm, node)
            if message:
                raise VerifierError(f"after pass {after!r}, node {node.name!r}: {message} (rule: {rule_name})")
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError with its own wording, naming the node
        raise VerifierError(f"after pass {after!r}: graph lint failed: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Manager


def check_declared(p: L2fxPass, gm: fx.GraphModule, ctx: PassContext) -> None:
    """The pass's declared preconditions (``requires_meta``, ``requires_weight_modules``,
    ``requires_calib``, ``writes_weights``); the failure names the pass and the first node that
    lacks one."""
    if p.requires_calib and not ctx.calib:
        raise CalibrationError(f"pass {p.name!r} needs calibration data in the PassContext")
    if not (p.requires_meta or p.requires_weight_modules or p.writes_weights):
        return
    for node, _ in weight_sites(gm):
        if p.writes_weights and node.op == "call_module" and getattr(gm.get_submodule(str(node.target)),
                                                                     "holds_symbols", False):
            p.fail("writes the weights, but this one is held as read-only symbols (an earlier pass such as "
                   "oneshot_solve(hold_symbols=True) did that; build the pipeline with hold_symbols=False)", node)
        for cls in p.requires_meta:
            if cls.META_KEY not in node.meta:
                p.fail(f"needs node.meta[{cls.META_KEY!r}] ({cls.__name__}) on every compressed weight", node)
        if p.requires_weight_modules:
            module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if not isinstance(module, p.requires_weight_modules):
                names = " or ".join(t.__name__ for t in p.requires_weight_modules)
                p.fail(f"needs every compressed weight produced by a {names} module, found "
                       f"{type(module).__name__ if module is not None else node.op}", node)


class PassManager:
    """A named, ordered pipeline of passes.

    ``insert_before``/``insert_after`` place a user pass relative to a named one and return
    the manager (so calls chain). Running it applies, for each pass: instruments'
    ``before_pass``, the declared preconditions, ``requires``, ``call`` (an exception other than
    an :class:`L2fxError` becomes a :class:`PassError` naming the pass and those before it), a
    recompile when the pass says it modified the graph, ``ensures``, the verifier when the
    context asks for it, then ``after_pass``.
    """

    def __init__(self, passes: Iterable[L2fxPass] = ()):
        self.passes: list[L2fxPass] = []
        for p in passes:
            self.append(p)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _check_new(self, p: L2fxPass) -> None:
        if not isinstance(p, L2fxPass):
            raise PassError(f"{p!r} is not an L2fxPass")
        if not p.name:
            raise PassError(f"{type(p).__name__} has no name")
        if p.name in self.names:
            raise PassError(f"a pass named {p.name!r} is already in the pipeline")

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise PassError(f"no pass named {name!r} in the pipeline {self.names}") from None

    def append(self, p: L2fxPass) -> "PassManager":
        self._check_new(p)
        self.passes.append(p)
        return self

    def insert_before(self, name: str, p: L2fxPass) -> "PassManager":
        self._check_new(p)
        self.passes.insert(self._index(name), p)
        return self

    def insert_after(self, name: str, p: L2fxPass) -> "PassManager":
        self._check_new(p)
        self.passes.insert(self._index(name) + 1, p)
        return self

    def remove(self, name: str) -> "PassManager":
        del self.passes[self._index(name)]
        return self

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        if distributed.active():
            unsupported = [p.name for p in self.passes if p.requires_calib and not p.supports_distributed]
            if unsupported:
                raise ConfigError(f"passes {unsupported} read calibration data but do not reduce it over the "
                                  f"{distributed.world_size()} torch.distributed ranks (l2fx.distributed lists "
                                  f"what runs distributed: the one-shot and compound methods)")
        modified = False
        # A cycle collection between passes frees replaced weights still held by a reference
        # cycle (memory.release); it costs ~0.3 s on a Llama's graph, so only where it pays.
        collect = sum(t.numel() * t.element_size() for t in gm.state_dict().values()) >= _COLLECT_NBYTES
        for i, p in enumerate(self.passes):
            for inst in ctx.instruments:
                inst.before_pass(p, gm)
            check_declared(p, gm, ctx)
            p.requires(gm)
            try:
                result = p.call(gm)
            except L2fxError:
                raise
            except Exception as exc:
                before = ", ".join(q.name for q in self.passes[:i]) or "none"
                raise PassError(f"pass {p.name!r} failed with {type(exc).__name__}: {exc} (passes run before it: "
                                f"{before})") from exc
            if not isinstance(result, PassResult):
                raise PassError(f"pass {p.name!r} returned {type(result).__name__}, expected PassResult")
            gm = result.graph_module
            if result.modified:
                gm.recompile()
            p.ensures(gm)
            if ctx.verify:
                verify(gm, after=p.name)
            modified |= result.modified
            memory.release(collect)  # what the pass freed goes back to the OS before the next one's peak
            for inst in ctx.instruments:
                inst.after_pass(p, gm, result)
        return PassResult(gm, modified)
