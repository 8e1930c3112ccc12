"""The user-facing entry points: compile, save, load, inspect."""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import os
import tempfile
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from l2fx import coding, rangedec
from l2fx.accounting import bits_for_magnitude, layer_nbytes
from l2fx.artifact import ArtifactReader, check_fingerprint, coded_layers, write_atomic
from l2fx.compiled import CompiledModel
from l2fx.config import BackendConfig, CompileConfig
from l2fx.data import cast_floats, check_runs, normalize_calib
from l2fx.errors import (ArchitectureMismatchError, ArtifactError, CalibrationError, CorruptArtifactError, L2fxError,
                         NonFiniteWeightError)
from l2fx.frontend import capture, graph_fingerprint, recapture
from l2fx.into_model import CodedTensor, check_model, install
from l2fx.into_model import materialize as _materialize
from l2fx.ir import CodedInfo
from l2fx.manifest import INSPECT_SYMBOLS_PER_BYTE, LayerEntry
from l2fx.memory import release as release_memory
from l2fx.method import default_pipeline, structural_pipeline
from l2fx.modules import StoredParams, configure_decode
from l2fx.passes import DecodedLayer, InsertActQuant, InstallDecodedWeights, LowerKernels
from l2fx.pipeline import Instrument, PassContext, PassManager, PeakMemory, Timing, peak_rss_mib
from l2fx.report import CompressionReport, LayerReport, original_nbytes, packed_nbytes
from l2fx.transform import TransformKind

__all__ = ["compile", "save", "load", "load_into", "materialize", "inspect", "lower", "CompiledModel"]


def compile(
    model: nn.Module,
    target_cr: float,
    calib: Any = None,
    *,
    method: str | None = None,
    config: CompileConfig | None = None,
    backend: BackendConfig | None = None,
    pipeline: PassManager | None = None,
    instruments: Sequence[Instrument] = (),
    verify: bool = False,
    device: torch.device | str | None = None,
) -> CompiledModel:
    """Compresses ``model`` to ``target_cr`` and returns a :class:`CompiledModel`.

    ``calib``: a batch (Tensor, tuple of Tensors, dict of Tensors) or an iterable of batches.
    ``method``: a registered method (:func:`l2fx.methods`; default ``config.method``, ``"l2"``).
    ``config``: a :class:`CompileConfig` (``target_cr`` and ``method`` given here override its fields).
    ``pipeline``: a :class:`PassManager` to run instead of the method's.
    ``instruments``: e.g. ``[Timing(), DumpIR("ir/")]``; Timing and PeakMemory are always added.
    ``verify``: run the IR verifier after every pass. The caller's model is never modified.
    A float16/bfloat16/float64 model is compressed in float32 and returned in its own dtypes; one
    whose captured graph casts to its dtype inside (a transformers Llama in bfloat16) is
    compressed on a float32 copy, and what is returned is the artifact loaded on the model's own
    graph (the capture notes say so; docs/architecture.md, "Model dtypes").
    """
    if not isinstance(model, nn.Module):
        raise L2fxError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = (config or CompileConfig()).replace(target_cr=target_cr)
    if method is not None:
        config = config.replace(method=method)
    pipeline = pipeline or default_pipeline(config)  # an unknown method fails here, before any work
    batches = normalize_calib(calib)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gm, info = capture(model, batches[0])
    for name, t in gm.state_dict().items():  # before any pass (the verifier would name it first)
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            raise NonFiniteWeightError(f"parameter {name!r} holds NaN or inf values")
    check_runs(gm, batches[0])
    fingerprint = graph_fingerprint(gm)
    dtypes = float_dtypes(gm)
    on_copy = False  # compressed on a float32 capture; the result is then the artifact loaded (below)
    if any(d != torch.float32 for d in dtypes.values()):
        # Compression runs in fp32 (rounding, gradients, byte prediction); the result is cast
        # back to the model's own dtypes at the end (restore_dtypes).
        gm.float()
        batches = [cast_floats(b, torch.float32) for b in batches]
        try:
            check_runs(gm, batches[0])
        except CalibrationError:
            on_copy = True  # outside the except block: its traceback's frames hold this graph
        if on_copy:
            # Its graph casts to the model's dtype inside (torch.export records the dtype a
            # forward reads off a tensor as a constant): capture a float32 copy instead.
            del gm
            release_memory(collect=True)
            gm, _ = capture(model, batches[0], frontend=info.frontend, dtype=torch.float32)
            try:
                check_runs(gm, batches[0])
            except CalibrationError as exc:
                raise CalibrationError(f"the model runs in {sorted({str(d) for d in dtypes.values()})} but not in "
                                       f"float32, which l2fx compresses in: {exc}") from exc
            info = dataclasses.replace(info, notes=info.notes + (
                "compressed on a float32 copy captured in float32 (the graph traced in the model's dtype casts to "
                "it inside); the compiled model is the artifact loaded on the model's own graph (l2fx.load)",))
    gm.to(device)
    captured_peak = peak_rss_mib()
    timing, memory = Timing(), PeakMemory()
    backend = backend or BackendConfig()
    ctx = PassContext(config=config, backend=backend, calib=batches,
                      instruments=[timing, memory, *instruments], verify=verify, device=device)
    with ctx:
        gm = pipeline(gm).graph_module
    restore_dtypes(gm, dtypes)
    header = {
        "capture": info.to_dict(), "fingerprint": fingerprint, "config": config.to_dict(),
        "passes": pipeline.names, "fold_batchnorm": config.fold_batchnorm,
        "original_nbytes": original_nbytes(model), "torch": torch.__version__,
    }
    compiled = CompiledModel(gm, None, header)  # type: ignore[arg-type]
    data = compiled.artifact_bytes()
    nbytes = len(data)
    layers = [coded for _, coded, _ in coded_layers(gm)]
    if on_copy:  # a float32 capture's graph, its tensors cast back, is serialised, never run
        del compiled, gm
        compiled = _load_bytes(data, model, device=device, backend=backend, verify=verify)
    del data
    if not on_copy:
        # A runtime choice, after the final dtypes (no pass reads it) and after the artifact's
        # bytes are dropped: the decode caches (fp32 on CPU) are the size of the model, and filled
        # beside the serialised copy they added its size to the peak (1.10 B float32 Llama).
        configure_decode(gm, backend.decode)
    peaks = {"capture": captured_peak, **memory.mib, "artifact": peak_rss_mib()}
    compiled.report = _report(layers, config.target_cr, nbytes, header["original_nbytes"],
                              pass_seconds=dict(timing.seconds),
                              peak_rss_mib=peak_rss_mib(), pass_peak_rss_mib=peaks,
                              records={"capture": {"frontend": info.frontend, "notes": list(info.notes)}, **ctx.records})
    return compiled


def _load_bytes(data: bytes, model: nn.Module, **kwargs) -> CompiledModel:
    """:func:`load` of an artifact held in memory (``compile`` of a model compressed on a float32
    copy: what it returns is what loading its file on ``model`` gives, bit for bit)."""
    with tempfile.TemporaryDirectory(prefix="l2fx-") as tmp:
        path = os.path.join(tmp, "compiled.l2fx")
        write_atomic(path, data)
        return load(path, model, **kwargs)


def float_dtypes(gm: fx.GraphModule) -> dict[str, torch.dtype]:
    """The dtype of every floating parameter and buffer, by state_dict name."""
    return {name: t.dtype for name, t in gm.state_dict(keep_vars=True).items() if t.is_floating_point()}


@torch.no_grad()
def restore_dtypes(gm: fx.GraphModule, dtypes: dict[str, torch.dtype]) -> None:
    """Casts the compiled graph back to the model's dtypes: each plain floating tensor to the
    dtype it had (tensors the passes created, e.g. a folded BatchNorm's bias, to the model's
    most common floating dtype), and each coded weight returns the dtype of the weight it
    replaced. A float32 model is left as it is."""
    if all(d == torch.float32 for d in dtypes.values()):
        return
    default = collections.Counter(dtypes.values()).most_common(1)[0][0]
    for _, info, module in coded_layers(gm):
        module.dtype = dtypes.get(info.param, default)
    for path, module in gm.named_modules():
        if isinstance(module, StoredParams):  # codes and stored T parameters: what the artifact holds
            continue
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or not t.is_floating_point():
                    continue
                name = f"{path}.{key}" if path else key
                dtype = dtypes.get(name, default)
                if t.dtype != dtype:
                    if isinstance(t, nn.Parameter):
                        table[key] = nn.Parameter(t.detach().to(dtype), requires_grad=t.requires_grad)
                    else:
                        table[key] = t.to(dtype)


def save(compiled: CompiledModel, path: str | os.PathLike) -> int:
    """Writes the artifact atomically; returns its size in bytes."""
    if not isinstance(compiled, CompiledModel):
        raise ArtifactError(f"l2fx.save expects a CompiledModel from l2fx.compile/l2fx.load, got {type(compiled).__name__}")
    data = compiled.artifact_bytes()
    write_atomic(path, data)
    return len(data)


def _layer_info(reader: ArtifactReader, entry: LayerEntry, counts: np.ndarray) -> CodedInfo:
    """The loaded layer's CodedInfo (real byte counts) from the counts of its table's symbols."""
    stream = reader.stream(entry)
    s, e = (torch.from_numpy(a) for a in reader.tparams(entry))
    lb = layer_nbytes(entry.param, entry.kind, entry.shape, entry.axis, stream.table, stream.payload_nbytes,
                      entry.chunk, s, e, entry.group, entry.act.to_dict() if entry.act is not None else None)
    hist = coding.SymbolHistogram(entry.qmin, counts.astype(np.int64))
    present = np.flatnonzero(counts)
    amax = max(abs(entry.qmin + int(present[0])), abs(entry.qmin + int(present[-1]))) if present.size else 0
    zeros = int(counts[-entry.qmin]) if entry.qmin <= 0 < entry.qmin + entry.ntab else 0
    return CodedInfo(param=entry.param, stream=stream, entry=entry.to_dict(), layer_bytes=lb,
                     shannon_bits=coding.shannon_bits(hist), bits=bits_for_magnitude(amax),
                     sparsity=zeros / entry.numel if entry.numel else 0.0)


def _counts(entry: LayerEntry, symbols: np.ndarray) -> np.ndarray:
    return np.bincount(symbols.astype(np.int64) - entry.qmin, minlength=entry.ntab)[:entry.ntab]


def _decoded_layers(reader: ArtifactReader, threads: int | None = None) -> list[DecodedLayer]:
    """Every coded layer decoded, with its CodedInfo and stored (s, e).

    All layers' chunks are decoded in one parallel sweep (:func:`l2fx.coding.decode_streams`).
    The caller has bounded every layer's size (:meth:`ArtifactReader.check_against`).
    """
    decoded = coding.decode_streams([reader.stream(e) for e in reader.layers], threads=threads,
                                    names=[f"layer {e.param!r}" for e in reader.layers])
    return [DecodedLayer(_layer_info(reader, e, _counts(e, symbols)), symbols,
                         *(torch.from_numpy(a) for a in reader.tparams(e)))
            for e, symbols in zip(reader.layers, decoded)]


def _decoded_codes(reader: ArtifactReader, threads: int | None = None) -> list[CodedTensor]:
    """Every coded layer's int8 codes and stored (s, e), decoded in one parallel sweep, for
    :func:`load_into`: unlike :func:`_decoded_layers` no :class:`CodedInfo` is built, since
    ``load_into`` returns no report, and the symbol counts behind it (a bincount per layer) took
    2.6 s of a 12.2 s ``load_into`` of MiniLM (cProfile, 2 shared cores, 4-bit RTN artifact)."""
    decoded = coding.decode_streams([reader.stream(e) for e in reader.layers], threads=threads,
                                    names=[f"layer {e.param!r}" for e in reader.layers])
    out = []
    for e, symbols in zip(reader.layers, decoded):
        step_s, threshold_e = (torch.from_numpy(a) for a in reader.tparams(e))
        codes = torch.from_numpy(symbols.astype(np.int8, copy=False)).reshape(e.shape)
        out.append(CodedTensor(e.param, codes, TransformKind(e.kind), step_s, threshold_e, e.axis, e.group))
    return out


#: ``inspect`` decodes a layer this many symbols at a time (at least one chunk): 8 MB of int16.
_INSPECT_PIECE = 1 << 22


def _inspected_counts(reader: ArtifactReader, entry: LayerEntry) -> np.ndarray:
    """Symbol counts of one layer, decoded a piece at a time (memory: one piece, not the layer)."""
    if entry.ntab == 1:  # a tensor of one value: nothing to decode (its empty chunks are checked at open)
        return np.array([entry.numel], dtype=np.int64)
    stream = reader.stream(entry)
    per_piece = max(1, _INSPECT_PIECE // entry.chunk)
    counts = np.zeros(entry.ntab, dtype=np.int64)
    for first in range(0, entry.nchunks, per_piece):
        last = min(first + per_piece, entry.nchunks)
        numel = min(entry.numel, last * entry.chunk) - first * entry.chunk
        piece = dataclasses.replace(stream, numel=numel, chunks=stream.chunks[first:last],
                                    crc32=stream.crc32[first:last])
        try:
            symbols = coding.decode_streams([piece])[0]
        except CorruptArtifactError as exc:  # name the layer and the chunk within it
            text = str(exc)
            if text.startswith("chunk "):
                index, _, rest = text[len("chunk "):].partition(":")
                text = f"chunk {first + int(index)}:{rest}"
            raise CorruptArtifactError(f"{reader.path}: layer {entry.param!r}: {text}") from exc
        counts += _counts(entry, symbols)
    return counts


def _report(layers: Sequence[CodedInfo], target_cr: float, file_nbytes: int, original: int, **extra) -> CompressionReport:
    reports = tuple(LayerReport(
        param=info.param, shape=tuple(info.entry["shape"]), kind=info.entry["kind"], numel=info.stream.numel,
        nbytes=info.nbytes, payload_nbytes=info.stream.payload_nbytes, shannon_nbytes=info.shannon_bits / 8,
        bits=info.bits, sparsity=info.sparsity,
        packed_nbytes=packed_nbytes(tuple(info.entry["shape"]), info.bits, info.layer_bytes.params),
        act_bits=info.entry["act"]["bits"] if "act" in info.entry else None) for info in layers)
    return CompressionReport(target_cr=target_cr, layers=reports, file_nbytes=file_nbytes, original_nbytes=original,
                             **extra)


def inspect(path: str | os.PathLike, *, max_symbols: int | None = None) -> CompressionReport:
    """Reads an artifact (checking every checksum) and reports per-layer bytes and both CRs.

    Without a model to bound the layers by, it decodes at most ``max_symbols`` symbols (default
    :data:`l2fx.manifest.INSPECT_SYMBOLS_PER_BYTE` per byte of the file; a tensor of a single
    value needs no decoding and is not counted), a piece at a time: a crafted file claiming
    more is a :class:`CorruptArtifactError` before anything is decoded.
    """
    reader = ArtifactReader(path)
    limit = INSPECT_SYMBOLS_PER_BYTE * reader.file_nbytes if max_symbols is None else max_symbols
    claimed = sum(e.numel for e in reader.layers if e.ntab > 1)
    if claimed > limit:
        raise CorruptArtifactError(
            f"{path}: the layers claim {claimed:,} coded symbols, more than inspect decodes for a file of "
            f"{reader.file_nbytes:,} bytes ({limit:,}; pass max_symbols= to allow more, or load it into its model)")
    layers = [_layer_info(reader, e, _inspected_counts(reader, e)) for e in reader.layers]
    return _report(layers, reader.target_cr, reader.file_nbytes, reader.original_nbytes)


def load(path: str | os.PathLike, model: nn.Module, *, device: torch.device | str = "cpu",
         backend: BackendConfig | None = None, threads: int | None = None, verify: bool = False,
         instruments: Sequence[Instrument] = ()) -> CompiledModel:
    """Rebuilds the compiled model from ``path`` on an instance ``model`` of the original architecture.

    ``model``'s own weights are not used (nor modified): every tensor comes from the file. The
    graph is re-captured and goes through the structural passes, ``install_decoded_weights``
    and (where ``backend`` (default: "auto") and ``device`` allow it) ``lower_kernels``, in one
    pass manager: ``verify`` runs the IR verifier after each, ``instruments`` see each.
    ``threads``: decoder threads (default: all cores). ``backend.decode``: the weights left on
    the torch reference path decode once here into a cache ("cache"; "auto" on CPU) or on every
    call ("per_call", least memory); see :class:`l2fx.config.BackendConfig`.
    """
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"l2fx.load needs an instance of the uncompressed architecture, got {type(model).__name__}")
    reader = ArtifactReader(path)
    m = reader.manifest
    # Every layer must match a floating tensor of the model, by name and shape, before a symbol
    # is decoded: the file cannot make the loader decode more than the model holds.
    reader.check_against(model.state_dict(), type(model).__name__)
    backend = backend or BackendConfig()
    # The weights decode in worker threads (the numba decoder releases the GIL) while this
    # thread re-captures the architecture, which takes seconds for a transformer.
    rangedec.warm_up()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="l2fx-decode") as pool:
        decoding = pool.submit(_decoded_layers, reader, threads)
        try:
            gm = recapture(model, reader.capture)
        except L2fxError as exc:
            raise ArchitectureMismatchError(f"cannot capture the {type(model).__name__} passed to l2fx.load "
                                            f"the way the artifact was made: {exc}") from exc
        check_fingerprint(reader, graph_fingerprint(gm), type(model).__name__)
        with PassContext(config=reader.config, backend=backend, device=device, verify=verify,
                         instruments=list(instruments)):
            gm = structural_pipeline(reader.fold_batchnorm)(gm).graph_module
            layers = decoding.result()
            passes = PassManager([InstallDecodedWeights(layers, reader.plain(), reader.path)])
            if reader.act_specs:  # the w+a options' input quantisers, replayed before any lowering
                passes.append(InsertActQuant(reader.act_specs))
            if backend.use_triton != "never" and torch.device(device).type == "cuda":
                passes.append(LowerKernels())
            gm = passes(gm).graph_module
    configure_decode(gm, backend.decode)  # on CPU by default: the weights decode once, here, not per call
    header = {k: m[k] for k in ("capture", "fingerprint", "config", "passes", "fold_batchnorm", "original_nbytes", "torch")
              if k in m}
    compiled = CompiledModel(gm, None, header)
    compiled.report = _report([layer.info for layer in layers], reader.target_cr, reader.file_nbytes,
                              reader.original_nbytes)
    return compiled


def load_into(path: str | os.PathLike, model: nn.Module, *, backend: BackendConfig | None = None,
              threads: int | None = None) -> nn.Module:
    """Loads the artifact at ``path`` into ``model`` itself, an instance of the architecture it
    was compiled from, and returns ``model``: its own class, every method working (``generate()``
    on a causal LM, ``.config``, hooks, ``.to()``), each compressed weight replaced in place by a
    parametrization decoding the artifact's codes (:mod:`l2fx.into_model`: what
    ``state_dict()`` then holds), every other tensor overwritten with the artifact's values.

    Nothing is captured (no torch.export, no tracing): the model's tensors are checked against
    the artifact by name, shape and dtype (:class:`ArchitectureMismatchError` naming the first
    that differs) before a symbol is decoded. Its outputs equal those of :func:`load` bit for
    bit where the model's eager forward and its captured graph compute alike (the tests check
    a transformers decoder and a sentence encoder). Artifacts whose compile folded BatchNorm
    layers are refused (the error names them): use :func:`load`. Tensors of the model the
    artifact does not hold (pruned at compile: the compiled forward read nothing of them) are
    left as they are, with a warning naming them. ``backend.decode``: "auto" (default) decodes
    every weight once, here, into a cache on CPU and on every access elsewhere; "per_call",
    "cache" as for :func:`load`. :func:`materialize` turns the result into a plain module.
    """
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"l2fx.load_into needs an instance of the uncompressed architecture, got "
                            f"{type(model).__name__}")
    reader = ArtifactReader(path)
    decode = (backend or BackendConfig()).decode
    plain_spec = {p.name: (p.shape, getattr(torch, p.dtype)) for p in reader.plain_entries}
    unheld = check_model(model, {e.param: e.shape for e in reader.layers}, plain_spec,
                         fold_batchnorm=reader.fold_batchnorm, source=str(reader.path))
    rangedec.warm_up()
    install(model, _decoded_codes(reader, threads), reader.plain(), decode, reader.act_specs)
    if unheld:
        warnings.warn(f"l2fx.load_into: {len(unheld)} tensor(s) of the {type(model).__name__} are not in {reader.path} "
                      f"(the compiled forward read nothing of them) and keep the model's own values: "
                      f"{', '.join(unheld[:5])}{', ...' if len(unheld) > 5 else ''}", stacklevel=2)
    return model


def materialize(model: nn.Module) -> nn.Module:
    """``model`` (from :func:`load_into`) with every compressed weight decoded once into a dense
    ``nn.Parameter`` in the model's dtype under its original name, the parametrizations removed:
    a plain module whose ``state_dict()`` has the original keys (``save_pretrained`` works).
    In place; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"l2fx.materialize expects the module l2fx.load_into returned, got {type(model).__name__}")
    return _materialize(model)


def lower(compiled: CompiledModel, backend: BackendConfig | None = None) -> CompiledModel:
    """A copy of ``compiled`` whose supported layers run the fused dequant-matmul kernel.

    ``backend.use_triton``: "auto" (default) lowers layers that sit on a CUDA device when Triton
    imports; "always" lowers regardless (on CPU the op runs its torch reference); "never" copies.
    ``compiled`` is not modified (its GraphModule is deep-copied; ``CodedInfo`` streams are
    shared, being immutable). The header is kept, so ``artifact_bytes()`` of the result equals
    the input's: lowering is a runtime choice made from the device, not part of the stored model.
    ``backend.decode`` applies to the layers that stay ``CodedWeight`` (the copy's caches are
    decoded afresh).
    """
    if not isinstance(compiled, CompiledModel):
        raise ArtifactError(f"lower expects a CompiledModel from l2fx.compile/l2fx.load, got {type(compiled).__name__}")
    gm = copy.deepcopy(compiled.graph_module)
    with PassContext(backend=backend or BackendConfig(), verify=True):
        gm = PassManager([LowerKernels()])(gm).graph_module
    configure_decode(gm, (backend or BackendConfig()).decode)  # the layers left on the reference path
    out = CompiledModel(gm, compiled.report, copy.deepcopy(compiled._header))
    out.train(compiled.training)
    return out
