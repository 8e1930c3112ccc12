"""The artifact's manifest as typed, validated entries: what a reader may believe of a file.

A file can come from anyone. Every size, index, count and name the manifest holds is checked
here, against the format's limits and against the arrays the file really holds, *before*
anything is allocated from it or decoded (``docs/format.md``, "Threat model"). A value that
fails names the field and the layer in a :class:`CorruptArtifactError`.

What is checked:

* types: every field has the JSON type the writer writes (an int is an int, never a bool or a
  float; a name is a string of at most ``MAX_NAME`` characters); no unknown or missing keys;
* format limits: ``ndim <= MAX_NDIM``, every dim >= 1, ``numel <= MAX_NUMEL``,
  ``1 <= chunk <= MAX_CHUNK``, ``nchunks == ceil(numel / chunk)``, a table of
  ``1 <= ntab <= 255`` symbols from ``qmin`` inside ``[-127, 127]`` (the int8 codes that
  hold them in memory), a known transform ``kind``, ``axis`` None or a dim of the shape, a
  known ``pdtype`` (``e8m0`` from version 3, a block format's scales only); from version 3 an optional ``group`` (``1 <= group <= K``, ``axis`` 0: T
  parameters per group of ``group`` consecutive elements of each row);
* exact accounting: the layers' chunk counts, table sizes and T parameter counts add up to
  exactly the entries of ``l2fx.chunks``, ``l2fx.tables`` and ``l2fx.tparams16/32``; the chunk
  lengths add up to exactly the payload; the plain tensors to exactly their packs; every
  tensor of the file is one the format names, with the dtype it names;
* order: layers and plain tensors are sorted by name and unique (their order is what maps
  them to their slices of the packed arrays, so a reordered manifest would swap tensors).

What cannot be checked from the file alone is how many symbols a layer really decodes to: a
single-symbol table decodes any ``numel`` from zero bytes, and a skewed table nearly as many
from a few. ``l2fx.load`` bounds ``numel`` by the model it is given (every layer's shape and
dtype must match the model's tensor of that name before anything is decoded);
``l2fx.inspect`` by :data:`INSPECT_SYMBOLS_PER_BYTE` times the file's size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from l2fx.activations import ACT_BITS_RANGE, ActQuantSpec
from l2fx.errors import ConfigError, CorruptArtifactError
from l2fx.frontend import CaptureInfo
from l2fx.transform import FORMAT_KINDS, TransformKind, param_shape, uses_threshold

__all__ = [
    "MAX_NDIM", "MAX_NUMEL", "MAX_CHUNK", "MAX_NAME", "MAX_TABLE", "SYMBOL_LIMIT", "INSPECT_SYMBOLS_PER_BYTE",
    "MAX_EXAMPLE_NUMEL", "PLAIN_DTYPES", "LayerEntry", "PlainEntry", "parse_layers", "parse_plain_v1",
    "parse_plain_v2", "parse_capture", "check_tparams", "require", "int_field",
]

#: A coded weight has at most this many dimensions.
MAX_NDIM = 8
#: Structural bound on a layer's symbol count (2^40, a 4 TB float32 tensor); the real bound is
#: the model at load and the file's size at inspect (module docstring).
MAX_NUMEL = 1 << 40
#: Largest chunk (symbols per independently coded chunk): 16M symbols, 32 MB decoded at most per
#: chunk. The writer uses 65536 (``CodingConfig.chunk_size``).
MAX_CHUNK = 1 << 24
#: Longest tensor name.
MAX_NAME = 1024
#: Symbols are int8 in memory: a table covers at most [-127, 127].
SYMBOL_LIMIT = 127
MAX_TABLE = 2 * SYMBOL_LIMIT + 1
#: ``l2fx.inspect`` (which has no model to bound a layer by) decodes at most this many symbols
#: per byte of the file, unless told otherwise. Honest files hold 2-50 (EfficientNet-Lite0 at
#: CR 10: 2.4; all-MiniLM-L6-v2 at CR 15: 15; a 99 %-sparse model at CR 100 about 50);
#: single-symbol layers (a tensor of one value) are not decoded and not counted.
INSPECT_SYMBOLS_PER_BYTE = 256
#: An export-captured artifact records the example input it was captured with; ``l2fx.load``
#: makes zeros of that shape to re-capture, so each is bounded (64 MB of float32).
MAX_EXAMPLE_NUMEL = 1 << 24
#: dtypes a plain tensor or a captured input may have (torch names).
PLAIN_DTYPES = ("float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")
_PDTYPES = ("f16", "f32", "e8m0")  # e8m0 from format version 3
_LAYER_KEYS = ("param", "kind", "shape", "axis", "qmin", "ntab", "nchunks", "chunk", "pdtype")
#: Optional layer fields, by the first format version that has them.
_OPTIONAL_KEYS = {"group": 3, "act": 4}
_ACT_KEYS = ("bits", "scale", "zero_point")


def require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise CorruptArtifactError(f"{where}: {message}")


def int_field(d: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    """``d[key]`` as an int in ``[lo, hi]`` (a JSON int: not a bool, not a float)."""
    v = d.get(key)
    require(type(v) is int, where, f"field {key!r} must be an integer, got {_show(v)}")
    require(lo <= v <= hi, where, f"field {key!r} = {v} is outside [{lo}, {hi}]")
    return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(v: Any, where: str, what: str) -> str:
    require(isinstance(v, str) and 0 < len(v) <= MAX_NAME, where,
            f"{what} must be a non-empty string of at most {MAX_NAME} characters, got {_show(v)}")
    return v


def _shape(v: Any, where: str, field: str = "shape", min_dim: int = 1) -> tuple[int, ...]:
    require(isinstance(v, list) and 0 <= len(v) <= MAX_NDIM, where,
            f"field {field!r} must be a list of at most {MAX_NDIM} dimensions, got {_show(v)}")
    require(all(type(d) is int and min_dim <= d <= MAX_NUMEL for d in v), where,
            f"field {field!r} must hold integers in [{min_dim}, {MAX_NUMEL}], got {_show(v)}")
    numel = math.prod(v)
    require(numel <= MAX_NUMEL, where, f"field {field!r} = {v} holds {numel} elements, more than {MAX_NUMEL}")
    return tuple(v)


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    """One coded weight of the manifest, validated; ``to_dict()`` is the entry as written.

    The ``*_start`` offsets locate the layer's slices of the packed arrays (chunk-index rows,
    table entries, T parameters of its ``pdtype``), from the layers before it.
    """

    param: str
    kind: TransformKind
    shape: tuple[int, ...]
    axis: int | None
    qmin: int
    ntab: int
    nchunks: int
    chunk: int
    pdtype: str
    group: int | None = None
    act: ActQuantSpec | None = None  # from version 4: the static quantiser of the layer's input activations
    chunk_start: int = 0
    table_start: int = 0
    tparam_start: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the stored ``step_s`` (and ``threshold_e``): [1], [C] or [rows, groups]."""
        return param_shape(self.shape, self.axis, self.group)

    @property
    def channels(self) -> int:
        """How many (step_s, threshold_e) pairs the layer stores."""
        return math.prod(self.param_shape)

    @property
    def nparams(self) -> int:
        """T parameters stored: step_s per channel, and threshold_e except for the linear kind."""
        return self.channels * (2 if uses_threshold(self.kind) else 1)

    def to_dict(self) -> dict:
        out = {"param": self.param, "kind": self.kind.value, "shape": list(self.shape), "axis": self.axis,
               "qmin": self.qmin, "ntab": self.ntab, "nchunks": self.nchunks, "chunk": self.chunk,
               "pdtype": self.pdtype}
        if self.group is not None:
            out["group"] = self.group
        if self.act is not None:
            out["act"] = self.act.to_dict()
        return out


def _layer(raw: Any, index: int, version: int) -> LayerEntry:
    where = f"layer {index}"
    require(isinstance(raw, dict), where, f"entry must be an object, got {_show(raw)}")
    param = raw.get("param")
    if isinstance(param, str):
        where = f"layer {index} ({param[:80]!r})"
    keys = set(raw)
    allowed = set(_LAYER_KEYS) | {k for k, since in _OPTIONAL_KEYS.items() if version >= since}
    require(set(_LAYER_KEYS) <= keys <= allowed, where, f"fields must be {list(_LAYER_KEYS)} (and, from format "
            f"version 3, 'group'; from 4, 'act'): missing {sorted(set(_LAYER_KEYS) - keys)}, unknown "
            f"{sorted(k[:40] for k in keys - allowed)}")
    param = _name(param, where, "field 'param'")
    kind = raw["kind"]
    require(kind in [k.value for k in TransformKind], where,
            f"field 'kind' = {_show(kind)} is not a transform kind ({[k.value for k in TransformKind]})")
    shape = _shape(raw["shape"], where)
    require(len(shape) >= 1, where, "field 'shape' must have at least one dimension")
    axis = raw["axis"]
    require(axis is None or (type(axis) is int and 0 <= axis < len(shape)), where,
            f"field 'axis' = {_show(axis)} must be null or a dimension of shape {list(shape)}")
    ntab = int_field(raw, "ntab", where, 1, MAX_TABLE)
    qmin = int_field(raw, "qmin", where, -SYMBOL_LIMIT, SYMBOL_LIMIT)
    require(qmin + ntab - 1 <= SYMBOL_LIMIT, where,
            f"the table's symbols qmin .. qmin + ntab - 1 = {qmin} .. {qmin + ntab - 1} exceed {SYMBOL_LIMIT}")
    chunk = int_field(raw, "chunk", where, 1, MAX_CHUNK)
    nchunks = int_field(raw, "nchunks", where, 0, MAX_NUMEL)
    numel = math.prod(shape)
    require(nchunks == -(-numel // chunk), where,
            f"field 'nchunks' = {nchunks}, but {numel} symbols in chunks of {chunk} need {-(-numel // chunk)}")
    pdtype = raw["pdtype"]
    require(pdtype in _PDTYPES[:2] or (pdtype in _PDTYPES and version >= 3), where,
            f"field 'pdtype' = {_show(pdtype)} is not one of {list(_PDTYPES) if version >= 3 else list(_PDTYPES[:2])}")
    require(pdtype != "e8m0" or TransformKind(kind) in FORMAT_KINDS, where,
            "E8M0 parameters (pdtype 'e8m0') are a block format's scales; the kind is not a block format")
    group = None
    if "group" in raw:
        group = int_field(raw, "group", where, 1, max(1, numel // shape[0]))
        require(axis == 0, where, f"a per-group layer runs along its rows: field 'axis' must be 0, got {axis}")
    act = _act(raw["act"], where) if "act" in raw else None
    if TransformKind(kind) in FORMAT_KINDS:  # codes index the format's values; one scale per block
        fmt = FORMAT_KINDS[TransformKind(kind)]
        top = len(fmt.magnitudes) - 1
        require(max(abs(qmin), abs(qmin + ntab - 1)) <= top, where,
                f"the table's symbols {qmin} .. {qmin + ntab - 1} exceed the {fmt.name} element codes +-{top}")
        block = min(fmt.block_size, max(1, numel // shape[0]))  # rows shorter than a block: one per row
        require(group == block, where,
                f"a {fmt.name} layer has one scale per block of {fmt.block_size} along its rows: field 'group' "
                f"must be {block}, got {group}")
    return LayerEntry(param, TransformKind(kind), shape, axis, qmin, ntab, nchunks, chunk, pdtype, group, act)


def _act(raw: Any, where: str) -> ActQuantSpec:
    """A layer's ``act`` field: ``{"bits": 2..8, "scale": a float32 value > 0, "zero_point": int}``."""
    require(isinstance(raw, dict) and set(raw) == set(_ACT_KEYS), where,
            f"field 'act' must be an object with exactly the fields {list(_ACT_KEYS)}, got {_show(raw)}")
    bits = int_field(raw, "bits", where, *ACT_BITS_RANGE)
    zero_point = int_field(raw, "zero_point", where, 0, (1 << bits) - 1)
    scale = raw["scale"]
    require(type(scale) is float and math.isfinite(scale) and scale > 0, where,
            f"field 'act.scale' = {_show(scale)} must be a finite float > 0")
    try:
        spec = ActQuantSpec(bits, scale, zero_point)
    except ConfigError as exc:
        raise CorruptArtifactError(f"{where}: field 'act': {exc}") from exc
    require(spec.scale == scale, where, f"field 'act.scale' = {scale!r} is not a float32 value")
    return spec


def parse_layers(raw: Any, sizes: Mapping[str, int], version: int) -> tuple[LayerEntry, ...]:
    """The validated layer entries, with their offsets into the packed arrays.

    ``sizes``: entries in the file of ``"chunks"`` (index rows), ``"tables"``, ``"f16"`` and
    ``"f32"`` (T parameters); each must be used exactly.
    """
    require(isinstance(raw, list), "manifest", f"'layers' must be a list, got {_show(raw)}")
    out: list[LayerEntry] = []
    cursor = {"chunks": 0, "tables": 0, "f16": 0, "f32": 0, "e8m0": 0}
    for i, item in enumerate(raw):
        e = _layer(item, i, version)
        if out:
            require(e.param > out[-1].param, f"layer {i} ({e.param[:80]!r})",
                    f"layers must be sorted by name and unique; it follows {out[-1].param[:80]!r}")
        out.append(dataclasses.replace(e, chunk_start=cursor["chunks"], table_start=cursor["tables"],
                                       tparam_start=cursor[e.pdtype]))
        cursor["chunks"] += e.nchunks
        cursor["tables"] += e.ntab
        cursor[e.pdtype] += e.nparams
    names = {"chunks": "l2fx.chunks rows", "tables": "l2fx.tables entries", "f16": "l2fx.tparams16 values",
             "f32": "l2fx.tparams32 values", "e8m0": "l2fx.tparams8 values"}
    for key, used in cursor.items():
        require(used == sizes.get(key, 0), "manifest",
                f"the layers account for {used} {names[key]}, the file holds {sizes.get(key, 0)}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class PlainEntry:
    """A plain (not range-coded) tensor: its model dtype, the pack holding it, its slice there."""

    name: str
    dtype: str
    pack: str  # safetensors dtype key in lower case ("f16", "f32", "i64", ...); version 1: own tensor
    shape: tuple[int, ...]
    start: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _dtype(v: Any, where: str) -> str:
    require(v in PLAIN_DTYPES, where, f"dtype {_show(v)} is not one of {list(PLAIN_DTYPES)}")
    return v


def parse_plain_v2(raw: Any, pack_sizes: Mapping[str, int]) -> tuple[PlainEntry, ...]:
    """Version 2+: ``{name: [model dtype, pack key, shape]}``, sorted, using every pack exactly."""
    require(isinstance(raw, dict), "manifest", f"'plain' must be an object, got {_show(raw)}")
    out: list[PlainEntry] = []
    cursor = {k: 0 for k in pack_sizes}
    for name, spec in raw.items():
        where = f"plain tensor {name[:80]!r}"
        _name(name, where, "its name")
        if out:
            require(name > out[-1].name, where, f"plain tensors must be sorted by name; it follows {out[-1].name[:80]!r}")
        require(isinstance(spec, list) and len(spec) == 3, where,
                f"entry must be [model dtype, pack, shape], got {_show(spec)}")
        dtype, pack, shape = spec
        dtype = _dtype(dtype, where)
        require(isinstance(pack, str) and pack in cursor, where,
                f"pack {_show(pack)} is not a tensor of the file ({sorted(cursor)})")
        shape = _shape(shape, where, min_dim=0)
        out.append(PlainEntry(name, dtype, pack, shape, cursor[pack]))
        cursor[pack] += math.prod(shape)
    for key, used in cursor.items():
        require(used == pack_sizes[key], "manifest",
                f"the plain tensors account for {used} values of l2fx.plain.{key}, the file holds {pack_sizes[key]}")
    return tuple(out)


def parse_plain_v1(raw: Any, tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[PlainEntry, ...]:
    """Version 1: ``{name: model dtype}``; each tensor stored under its own name."""
    require(isinstance(raw, dict), "manifest", f"'plain' must be an object, got {_show(raw)}")
    out = []
    for name, dtype in raw.items():
        where = f"plain tensor {name[:80]!r}"
        _name(name, where, "its name")
        require(name in tensors, where, "is listed in the manifest but missing from the file")
        out.append(PlainEntry(name, _dtype(dtype, where), name, tensors[name][1]))
    return tuple(out)


def parse_capture(raw: Any) -> CaptureInfo:
    """The validated :class:`l2fx.frontend.CaptureInfo` (how ``l2fx.load`` re-captures)."""
    where = "manifest field 'capture'"
    require(isinstance(raw, dict) and set(raw) == {"frontend", "inputs"}, where,
            f"must be an object with 'frontend' and 'inputs', got {_show(raw)}")
    require(raw["frontend"] in ("fx", "export"), where, f"frontend {_show(raw['frontend'])} is not 'fx' or 'export'")
    inputs = raw["inputs"]
    require(isinstance(inputs, list) and len(inputs) <= 64, where, f"'inputs' must be a list, got {_show(inputs)}")
    spec = []
    for i, item in enumerate(inputs):
        w = f"{where}, input {i}"
        require(isinstance(item, list) and len(item) == 4, w, f"must be [kind, key, shape, dtype], got {_show(item)}")
        kind, key, shape, dtype = item
        require(kind in ("arg", "kwarg"), w, f"kind {_show(kind)} is not 'arg' or 'kwarg'")
        _name(key, w, "its key")
        shape = _shape(shape, w, min_dim=0)
        require(math.prod(shape) <= MAX_EXAMPLE_NUMEL, w,
                f"shape {list(shape)} is larger than the {MAX_EXAMPLE_NUMEL} elements a re-capture example may have")
        spec.append((kind, key, shape, _dtype(dtype, w)))
    return CaptureInfo(raw["frontend"], tuple(spec))


def check_tparams(entry: LayerEntry, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step_s, threshold_e) of a layer from its stored values: finite, > 0, and decoding every
    symbol of its table to a finite float32 weight."""
    where = f"layer {entry.param[:80]!r}"
    require(params.size == entry.nparams, where, "T parameters are truncated")
    p = params.astype(np.float32)
    require(bool(np.isfinite(p).all() and (p > 0).all()), where, "T parameters are not finite and > 0")
    s = p[:entry.channels].reshape(entry.param_shape)
    e = p[entry.channels:].reshape(entry.param_shape) if uses_threshold(entry.kind) else np.float32(0.5) * s
    amax = max(abs(entry.qmin), abs(entry.qmin + entry.ntab - 1))
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.float32(amax)
        if entry.kind is TransformKind.LOG:  # e * expm1(min(|q| s / e, 40)), as transform.inverse_t
            w = e * np.expm1(np.minimum(q * s / e, np.float32(40.0)))
        elif entry.kind is TransformKind.EXP:
            w = e * np.log1p(q * s / e)
        elif entry.kind in FORMAT_KINDS:  # the format's largest value at the block's scale
            w = np.float32(FORMAT_KINDS[entry.kind].max_normal) * s
        else:  # linear q s; joint/prune (|q| - 0.5) s + e
            w = q * s + e
    require(bool(np.isfinite(w).all()), where, f"T parameters decode symbol {amax} to a non-finite weight")
    return s, e
