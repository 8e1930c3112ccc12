"""Mutations of an artifact as an attacker makes them, and what loading each one must give.

Shared by ``tests/test_artifact_fuzz.py`` (hypothesis, a few hundred derandomized examples in
CI) and ``bench/fuzz.py`` (100,000 mutations, the outcome table). Not a test module itself.

A good artifact is taken apart into per-layer records (entry, chunk-index rows, payload bytes,
table, T parameters) and plain tensors. A mutation edits them and is written back with every
checksum recomputed (CRC-32 detects damage, not tampering: anyone can recompute it), so it
reaches the checks behind the checksums. Classes:

* ``field``: one manifest field (any depth) set to a value from a pool of the interesting (huge,
  negative, wrong type, unicode, nested, missing, unknown keys), after the records are written;
* ``record``: a self-consistent edit of a layer or plain tensor: a single-symbol layer claiming
  2^20..2^40 symbols with its table, chunks and T parameters rewritten to match (the
  decompression bomb), a reshape, two layers swapped, one duplicated or dropped, a plain
  tensor's declared dtype or shape changed with its pack;
* ``content``: weight-defining values changed within the format's rules (frequencies, qmin, T
  parameters, the kind, plain values): such a file may load, into other weights;
* ``json``: the manifest's bytes themselves (deep nesting, a 5000-digit integer, NaN tokens,
  invalid UTF-8, a zlib bomb, not an object);
* ``damage``: the file's bytes with no checksum recomputed (bit flips, truncation, header
  bytes, appended bytes, zeroed runs): CRCs must catch every one that changes a weight.

:func:`outcome` loads (and inspects) a mutated file and names what happened: ``error`` (an
L2fxError, as it should), ``identical`` (loads to the same model), ``different`` (loads to
other weights: allowed for ``content`` only, a failure otherwise), ``unexpected`` (an
L2fxError raised by the reader's safety net, i.e. a case its checks do not name), or
``escaped`` (any other exception: a failure).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import zlib
from typing import Any, Callable

import numpy as np
import torch

import l2fx
from l2fx.artifact import (CHUNKS, MANIFEST, PAYLOAD, PLAIN_PREFIX, TABLES, TPARAMS, ArtifactReader, _crc,
                           encode_manifest, safetensors_bytes)
from l2fx.errors import L2fxError
from l2fx.config import Granularity, LayerRule
from l2fx.transform import TransformKind, uses_threshold

CLASSES = ("field", "record", "content", "json", "damage")
#: Outcomes that are failures, by mutation class.
FAILURES = {"escaped", "unexpected"}


class Chooser:
    """The random decisions of a mutation: hypothesis's ``data.draw`` or a seeded RNG."""

    def __init__(self, draw_choice: Callable[[list], Any], draw_int: Callable[[int, int], int]):
        self.choice, self.integer = draw_choice, draw_int

    @classmethod
    def from_rng(cls, rng: np.random.Generator) -> "Chooser":
        return cls(lambda seq: seq[int(rng.integers(len(seq)))], lambda lo, hi: int(rng.integers(lo, hi + 1)))

    @classmethod
    def from_hypothesis(cls, data) -> "Chooser":
        from hypothesis import strategies as st

        return cls(lambda seq: data.draw(st.sampled_from(seq)), lambda lo, hi: data.draw(st.integers(lo, hi)))


#: The layer rules of the version-3 corpus (the tests' tiny ConvNet): fc stored in MXFP4 (E8M0
#: scales: the uint8 parameter array), the convs with parameters per group of 8.
V3_RULES = (LayerRule("fc", format=TransformKind.MXFP4_E2M1),
            LayerRule(r"c[12]", granularity=Granularity.PER_GROUP, group_size=8))


@dataclasses.dataclass
class Layer:
    entry: dict
    rows: np.ndarray  # [nchunks, 2] uint32: byte length, CRC-32
    payload: bytes
    table: np.ndarray  # uint16
    tparams: np.ndarray  # float16, float32 or uint8 E8M0 codes by entry["pdtype"]


@dataclasses.dataclass
class Parts:
    """An artifact taken apart: manifest fields, layer records and plain tensors; ``version`` is
    the file's (2, or 3 with group-wise or E8M0 parameters) and is written back."""

    manifest: dict
    layers: list[Layer]
    plain: dict[str, tuple[list, np.ndarray]]  # name -> (spec [dtype, key, shape], values)
    version: int = 2

    @classmethod
    def of(cls, path) -> "Parts":
        r = ArtifactReader(path)
        rows = r.arrays.get(CHUNKS, np.zeros(0, np.uint32)).reshape(-1, 2)
        layers = []
        for e in r.layers:
            stream = r.stream(e)
            tp = r.arrays[TPARAMS[e.pdtype]][e.tparam_start: e.tparam_start + e.nparams]
            layers.append(Layer(e.to_dict(), rows[e.chunk_start: e.chunk_start + e.nchunks].copy(),
                                b"".join(stream.chunks), stream.table.freqs.copy(), tp.copy()))
        plain = {}
        for p in r.plain_entries:
            pack = r.arrays[PLAIN_PREFIX + p.pack]
            plain[p.name] = ([p.dtype, p.pack, list(p.shape)], pack[p.start: p.start + p.numel].copy())
        manifest = {k: copy.deepcopy(v) for k, v in r.manifest.items() if k not in ("layers", "plain", "crc32")}
        return cls(manifest, layers, plain, r.version)

    def arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(manifest, arrays) with every CRC recomputed, as the writer lays them out."""
        payload = b"".join(layer.payload for layer in self.layers)
        arrays = {PAYLOAD: np.frombuffer(payload, dtype=np.uint8).copy(),
                  CHUNKS: np.concatenate([layer.rows.reshape(-1) for layer in self.layers] or
                                         [np.zeros(0, np.uint32)]).astype(np.uint32),
                  TABLES: np.concatenate([layer.table for layer in self.layers] or
                                         [np.zeros(0, np.uint16)]).astype(np.uint16)}
        for key, dtype in (("f16", np.float16), ("f32", np.float32), ("e8m0", np.uint8)):
            parts = [layer.tparams.astype(dtype) for layer in self.layers if layer.entry.get("pdtype") == key]
            if parts:
                arrays[TPARAMS[key]] = np.concatenate(parts)
        packs: dict[str, list] = {}
        for spec, values in self.plain.values():
            packs.setdefault(spec[1], []).append(values.reshape(-1))
        for key, parts in packs.items():
            arrays[PLAIN_PREFIX + key] = np.concatenate(parts)
        manifest = dict(self.manifest, layers=[layer.entry for layer in self.layers],
                        plain={name: spec for name, (spec, _) in self.plain.items()})
        manifest["crc32"] = {k: _crc(v) for k, v in arrays.items() if k != PAYLOAD}
        return manifest, arrays


def write(manifest: Any, arrays: dict[str, np.ndarray], stored: bytes | None = None, version: int = 2) -> bytes:
    """The file's bytes for a manifest (or its stored bytes, ``stored``) with consistent checksums."""
    arrays = dict(arrays)
    arrays[MANIFEST] = np.frombuffer(stored if stored is not None else encode_manifest(manifest, version),
                                     dtype=np.uint8)
    return safetensors_bytes(arrays, {"format": "l2fx", "version": str(version),
                                      "manifest_crc32": str(_crc(arrays[MANIFEST]))})


# --------------------------------------------------------------------------------------------
# Value pools

_INTS = [0, 1, -1, 2, 3, 7, 8, 127, 128, -127, -128, 255, 256, 1023, 1024, 65535, 65536, -65536, (1 << 24) - 1,
         1 << 24, (1 << 24) + 1, 1 << 31, 1 << 32, 1 << 34, 1 << 40, 1 << 48, 1 << 63, -(1 << 63), 10 ** 30]
_OTHERS = [None, True, False, 0.5, -0.0, 1e308, -1e308, float("nan"), float("inf"), "", "x", "joint", "linear", "log",
           "f16", "f32", "e8m0", "mxfp4_e2m1", "hbfp8", "float32", "int64", "\u00e9\u4e2d\U0001f600", "\ud800", "a" * 1100, [], [0], [1, 2, 3],
           [[1]], {}, {"a": 1}, [1 << 40], [-1], [0, 0], list(range(9))]


def _value(c: Chooser, old: Any) -> Any:
    kind = c.choice(["int", "other", "arith"] if type(old) is int else ["int", "other"])
    if kind == "int":
        return c.choice(_INTS)
    if kind == "arith":
        return c.choice([old + 1, old - 1, old * 2, -old, old * 65536, old // 2, old + (1 << 32)])
    return copy.deepcopy(c.choice(_OTHERS))


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, prefix + (i,)))
    return out


#: Manifest fields whose values define weights: a file with another value in range is another
#: valid model (the symbols' offset, the transform's formula, and the chunk size: with nchunks
#: unchanged, a chunk size between numel / nchunks and the next split makes each stream decode
#: a few symbols more or fewer; the decoder's exhaustion check catches fewer only when words
#: are left, and more decode from the stream's final state. Bounded by the layer's numel and
#: memory-safe, like any re-encoded content; found by the v3 corpus' fuzzing.)
CONTENT_FIELDS = ("qmin", "kind", "chunk")


def _mutate_field(c: Chooser, manifest: dict) -> str:
    paths = [p for p in _paths(manifest) if p]
    path = c.choice(paths)
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = c.choice(["set", "set", "set", "delete", "add_key", "duplicate"])
    where = "/".join(map(str, path))
    if op == "delete":
        del parent[key]
        return f"delete {where}"
    if op == "add_key" and isinstance(parent[key], dict):
        new = c.choice(["x", "qmin", "ü", "layers"])
        existed = new in parent[key]
        parent[key][new] = c.choice(_INTS)
        # An existing key is overwritten: a set of that field (a layer's qmin is content).
        return f"set {where}/{new}" if existed else f"add key under {where}"
    if op == "duplicate" and isinstance(parent[key], list) and parent[key]:
        parent[key].append(copy.deepcopy(parent[key][c.integer(0, len(parent[key]) - 1)]))
        return f"duplicate an element of {where}"
    parent[key] = _value(c, parent[key])
    return f"set {where}"


def _layer_index(c: Chooser, parts: Parts) -> int:
    return c.integer(0, len(parts.layers) - 1)


def bomb(parts: Parts, index: int, k: int, chunk: int, qmin: int = 0) -> str:
    """Layer ``index`` becomes a single-symbol layer claiming 2^k symbols, its table, chunk rows
    and T parameters rewritten to match (so every check of the file alone passes)."""
    layer = parts.layers[index]
    n = -(-(1 << k) // chunk)
    e = layer.entry
    e.update(shape=[1 << k], axis=None, ntab=1, qmin=qmin, chunk=chunk, nchunks=n)
    layer.rows = np.zeros((n, 2), np.uint32) if n <= (1 << 20) else layer.rows  # 2^40 / 2^16 rows: too many to write
    layer.payload, layer.table = b"", np.ones(1, np.uint16)
    nparams = 2 if uses_threshold(e["kind"]) else 1
    layer.tparams = layer.tparams[:nparams] if layer.tparams.size >= nparams else np.ones(nparams, layer.tparams.dtype)
    return f"single-symbol bomb of 2^{k} symbols in chunks of {chunk}"


def _mutate_record(c: Chooser, parts: Parts) -> str:
    op = c.choice(["bomb", "bomb", "reshape", "swap", "duplicate", "drop", "plain_dtype", "plain_shape",
                   "plain_drop", "chunk_rows"])
    if op == "bomb":
        return bomb(parts, _layer_index(c, parts), c.choice([20, 24, 30, 34, 40]), c.choice([65536, 1 << 24]),
                    c.choice([0, 1, -127]))
    i = _layer_index(c, parts)
    layer = parts.layers[i]
    if op == "reshape":
        shape = layer.entry["shape"]
        new = c.choice([[math.prod(shape)], list(reversed(shape)), shape + [1], [1] + shape])
        layer.entry["shape"] = new
        layer.entry["axis"] = None if layer.entry["axis"] is None else min(layer.entry["axis"], len(new) - 1)
        return f"reshape layer {i} to {new}"
    if op == "swap" and len(parts.layers) > 1:
        j = (i + 1) % len(parts.layers)
        a, b = parts.layers[i], parts.layers[j]
        a.entry["param"], b.entry["param"] = b.entry["param"], a.entry["param"]
        return f"swap the names of layers {i} and {j}"
    if op == "duplicate":
        parts.layers.insert(i, copy.deepcopy(layer))
        return f"duplicate layer {i}"
    if op == "drop":
        del parts.layers[i]
        return f"drop layer {i}"
    if op == "chunk_rows":
        layer.rows = layer.rows.copy()
        layer.rows[:, 0] = c.choice([0, 4, 1 << 20, 0xFFFFFFFF])
        return f"chunk lengths of layer {i} rewritten"
    names = list(parts.plain)
    name = c.choice(names)
    spec, values = parts.plain[name]
    if op == "plain_dtype":
        spec[0] = c.choice(["float16", "float64", "int64", "bfloat16", "bool"])
        return f"plain {name} declared {spec[0]}"
    if op == "plain_shape":
        spec[2] = c.choice([[values.size * 1000], [0], [values.size, 1], [-values.size], []])
        return f"plain {name} shape {spec[2]}"
    del parts.plain[name]
    return f"drop plain {name}"


def _mutate_content(c: Chooser, parts: Parts) -> str:
    op = c.choice(["freqs", "qmin", "tparams", "kind", "plain_values"])
    i = _layer_index(c, parts)
    layer = parts.layers[i]
    if op == "freqs":
        layer.table = layer.table.copy()
        j = c.integer(0, layer.table.size - 1)
        layer.table[j] = c.choice([0, 1, 2, 65535, int(layer.table[j]) + 1])
        return f"frequency {j} of layer {i}"
    if op == "qmin":
        layer.entry["qmin"] = layer.entry["qmin"] + c.choice([-1, 1, -100, 100])
        return f"qmin of layer {i}"
    if op == "tparams":
        layer.tparams = layer.tparams.copy()
        j = c.integer(0, layer.tparams.size - 1)
        with np.errstate(over="ignore"):
            if layer.tparams.dtype == np.uint8:  # E8M0 codes: 255 is NaN, 0 and 254 the extremes
                layer.tparams[j] = c.choice([0, 1, 126, 127, 128, 254, 255, int(layer.tparams[j]) ^ 1])
            else:
                layer.tparams[j] = c.choice([0.0, -1.0, np.inf, np.nan, 1e-8, 65504.0, 3e38,
                                             float(layer.tparams[j]) * 2])
        return f"T parameter {j} of layer {i}"
    if op == "kind":
        old = layer.entry["kind"]
        new = c.choice(["joint", "prune", "linear", "log", "exp"])
        layer.entry["kind"] = new
        nparams = layer.tparams.size // (1 if old == "linear" else 2)
        if old == "linear" and new != "linear":
            layer.tparams = np.concatenate([layer.tparams, 0.5 * layer.tparams])
        elif old != "linear" and new == "linear":
            layer.tparams = layer.tparams[:nparams]
        return f"kind of layer {i}: {old} -> {new}"
    name = c.choice(list(parts.plain))
    spec, values = parts.plain[name]
    values = values.copy()
    if values.size:
        values[c.integer(0, values.size - 1)] = c.choice([0, 1, -1, 7])
    parts.plain[name] = (spec, values)
    return f"a value of plain {name}"


_BLANK: list = []


def _blank_deflater():
    """A deflater that has compressed 64 MiB of spaces (made once, a MiB at a time); its output
    so far is ``_BLANK[0]``."""
    if not _BLANK:
        co = zlib.compressobj(9)
        block = b" " * (1 << 20)
        _BLANK.extend([b"".join(co.compress(block) for _ in range(64)), co])
    return _BLANK[1]


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _mutate_json(c: Chooser, manifest: dict, arrays: dict) -> tuple[bytes, str]:
    text = json.dumps(manifest, separators=(",", ":"))
    op = c.choice(["deep", "digits", "nan", "utf8", "bomb", "truncated", "not_object", "trailing", "huge_list"])
    if op == "deep":
        raw = text[:-1].encode() + b',"x":' + _deep(c.choice([1000, 100000])) + b"}"
    elif op == "digits":
        raw = text.replace('"original_nbytes":', '"original_nbytes":' + "9" * 5000 + "+0*", 1).encode()
        raw = raw.replace(b"+0*", b"")
    elif op == "nan":
        raw = text.replace('"qmin":', '"qmin":NaN,"q":', 1).encode()
    elif op == "utf8":
        raw = text.encode().replace(b'"param":"', b'"param":"\xff\xfe', 1)
    elif op == "bomb":
        co = _blank_deflater().copy()
        return _BLANK[0] + co.compress(text.encode()) + co.flush(), "a manifest inflating past 64 MiB"
    elif op == "truncated":
        data = zlib.compress(text.encode(), 9)
        return data[: c.integer(0, len(data) - 1)], "a truncated zlib stream"
    elif op == "not_object":
        raw = c.choice([b"[]", b"null", b"1", b'"l2fx"'])
    elif op == "trailing":
        raw = text.encode() + b"{}"
    else:
        raw = text[:-1].encode() + b',"x":[' + b"0," * 200000 + b"0]}"
    return zlib.compress(raw, 9), f"manifest JSON: {op}"


def _damage(c: Chooser, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    header = 8 + int.from_bytes(b[:8], "little")
    op = c.choice(["flip", "flip", "truncate", "header", "append", "zero_run"])
    if op == "flip":
        for _ in range(c.integer(1, 4)):
            pos = c.integer(0, len(b) - 1)
            b[pos] ^= 1 << c.integer(0, 7)
        return bytes(b), "bit flips"
    if op == "truncate":
        return bytes(b[: c.integer(0, len(b) - 1)]), "truncated"
    if op == "header":
        pos = c.integer(0, header - 1)
        b[pos] = c.integer(0, 255)
        return bytes(b), "header byte"
    if op == "append":
        return bytes(b) + bytes(c.integer(1, 64)), "appended bytes"
    start = c.integer(0, len(b) - 1)
    n = c.integer(1, 256)
    b[start: start + n] = bytes(len(b[start: start + n]))
    return bytes(b), "zeroed run"


def mutate(c: Chooser, good: bytes, parts: Parts) -> tuple[str, str, bytes]:
    """(class, description, mutated file bytes). A ``field`` mutation of a weight-defining field
    (:data:`CONTENT_FIELDS` of a layer) is reported as class ``content``."""
    cls = c.choice(list(CLASSES))
    if cls == "damage":
        data, what = _damage(c, good)
        return cls, what, data
    parts = copy.deepcopy(parts)
    if cls == "record":
        what = _mutate_record(c, parts)
    elif cls == "content":
        what = _mutate_content(c, parts)
    manifest, arrays = parts.arrays()
    if cls == "field":
        what = _mutate_field(c, manifest)
        if what.startswith("set layers/") and what.split("/")[-1] in CONTENT_FIELDS:
            cls = "content"
    if cls == "json":
        stored, what = _mutate_json(c, manifest, arrays)
        return cls, what, write(None, arrays, stored, parts.version)
    return cls, what, write(manifest, arrays, version=parts.version)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
                                        for k in a)


def outcome(path, make_model: Callable, reference: dict) -> tuple[str, str]:
    """(outcome, detail) of loading and inspecting the file at ``path``."""
    results = []
    for action in ("load", "inspect"):
        try:
            if action == "load":
                loaded = state_of(l2fx.load(path, model=make_model()))
            else:
                l2fx.inspect(path)
                results.append(("inspected", "inspect: read"))
        except L2fxError as exc:
            results.append(("unexpected" if getattr(exc, "unexpected", False) else "error",
                            f"{action}: {type(exc).__name__}: {str(exc)[:160]}"))
            continue
        except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
            results.append(("escaped", f"{action}: {type(exc).__name__}: {str(exc)[:160]}"))
            continue
        if action == "load":
            results.append(("identical" if same_state(loaded, reference) else "different", "load: loaded"))
    load_result, inspect_result = results
    for bad in ("escaped", "unexpected"):
        for r in results:
            if r[0] == bad:
                return r
    return load_result


def is_failure(cls: str, result: str) -> bool:
    """A failure: an escape, a case the checks did not name, or a file that loads into other
    weights without its mutation having changed weight-defining content."""
    return result in FAILURES or (result == "different" and cls != "content")
