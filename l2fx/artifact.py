"""The artifact: a safetensors file holding the range-coded weights and everything else.

(Past 400 lines on purpose: the writer and the reader of one format side by side, so that a
change to one is seen next to the other; the reader's field checks live in l2fx/manifest.py.)

Layout (``docs/format.md`` is the normative description):

* ``l2fx.manifest`` (uint8): compact JSON, zlib-compressed (format version 2; version 1 stored
  it uncompressed, and is still read): format name and version, how the model was
  captured, the architecture fingerprint, the compile config, one entry per coded layer
  (``l2fx.accounting.manifest_entry``), the plain tensors' model dtypes, packs and shapes, and a CRC-32 of
  every tensor in the file other than the manifest and the payload (whose chunks carry their
  own CRC-32).
* ``l2fx.payload`` (uint8): every coded layer's chunks, concatenated in manifest order.
* ``l2fx.chunks`` (uint32): per chunk, its byte length and its CRC-32.
* ``l2fx.tables`` (uint16): every layer's symbol frequencies, concatenated.
* ``l2fx.tparams16`` (float16) / ``l2fx.tparams32`` (float32): every layer's step_s then
  (except for the linear kind) threshold_e, concatenated, by the layer's ``pdtype``.
* ``l2fx.plain.<dtype>`` (f16, f32, i64, ...): every other tensor of the compiled model, float16
  when that is exact, flattened and concatenated in name order per stored dtype (version 1 stored
  each under its own name).

Reading uses only safetensors and json: no pickle anywhere on the load path.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
import torch
import torch.fx as fx

from l2fx import coding
from l2fx.accounting import e8m0_codes, stored_params
from l2fx.config import CompileConfig
from l2fx.errors import (ArchitectureMismatchError, ArtifactError, ArtifactVersionError, ConfigError,
                         CorruptArtifactError, L2fxError)
from l2fx.ir import CodedInfo, get_meta, weight_sites
from l2fx.manifest import (LayerEntry, check_tparams, int_field, parse_capture, parse_layers, parse_plain_v1,
                           parse_plain_v2, require)
from l2fx.modules import ActQuant, CodedWeight

FORMAT = "l2fx"
# Version 2: the manifest is zlib-compressed (level 9) and the plain tensors are packed per dtype.
# Fashion-MNIST ResNet at CR 20: file 37,538 -> 34,005 bytes (whole-file CR 17.76 -> 19.60);
# EfficientNet-Lite0 at CR 10: manifest 12.9 -> 2.0 kB of 1.89 MB. Version 3: a layer may hold T
# parameters per group of ``group`` elements of each row. A file is written in the lowest version
# that holds its layers (3 only with a per-group layer), so readers of version 2 still read what
# they can; versions 1 and 2 are still read. Version 4: a layer entry may hold ``act``, the static
# quantiser of its ops' input activations (the compound methods' w+a options); written only then.
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# Refuse to inflate a manifest beyond this (a decompression bomb is a corrupt file, not a hang).
# An honest manifest takes ~100 bytes per layer and ~50 per plain tensor (EfficientNet-Lite0:
# 12.9 kB; a 1 B-parameter Llama: ~100 kB): 16 MiB leaves room for 100,000s of tensors while
# bounding what parsing the JSON can cost.
MAX_MANIFEST_NBYTES = 16 << 20
MANIFEST = "l2fx.manifest"
PAYLOAD = "l2fx.payload"
CHUNKS = "l2fx.chunks"
TABLES = "l2fx.tables"
TPARAMS = {"f16": "l2fx.tparams16", "f32": "l2fx.tparams32", "e8m0": "l2fx.tparams8"}
PLAIN_PREFIX = "l2fx.plain."


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).tobytes())


def _plain_array(t: torch.Tensor) -> np.ndarray:
    """Numpy array to store for a plain tensor: float16 when exact, else its own dtype (bf16 -> f32)."""
    t = t.detach().cpu()
    if t.is_floating_point():
        if t.dtype != torch.float16:
            half = t.to(torch.float16)
            if torch.equal(half.to(t.dtype), t):
                return half.numpy()
        if t.dtype == torch.bfloat16:
            return t.float().numpy()
    return t.contiguous().numpy()


def coded_layers(gm: fx.GraphModule) -> list[tuple[str, CodedInfo, CodedWeight]]:
    """(module path, CodedInfo, module) per coded weight, ordered by parameter name.

    The order does not follow the graph: lowering moves weight nodes, and the same model must
    give the same bytes however its graph is arranged.
    """
    out = []
    for node, _ in weight_sites(gm):
        info = get_meta(node, CodedInfo)
        if info is not None:
            out.append((str(node.target), info, gm.get_submodule(str(node.target))))
    return sorted(out, key=lambda item: item[1].param)


def _check_act_quant(gm: fx.GraphModule, entries: dict[str, dict]) -> None:
    """Every activation quantiser the graph runs is the one its coded layer's entry stores
    (``range_code`` writes it from the layer's ``l2fx.act_quant``), and no entry stores one the
    graph does not run: a loaded model computes what the compiled one did."""
    running = {m.layer: m.spec.to_dict() for m in gm.modules() if isinstance(m, ActQuant)}
    for param, spec in sorted(running.items()):
        if param not in entries:
            raise ArtifactError(f"the graph quantises the inputs of {param!r}, which is not a coded layer: an "
                                f"artifact stores activation quantisers only with their coded weights")
        if entries[param].get("act") != spec:
            raise ArtifactError(f"layer {param!r}: the activation quantiser the graph runs ({spec}) is not the one "
                                f"its coded entry stores ({entries[param].get('act')}); was it inserted after "
                                f"range_code, or its intent changed?")
    stored = sorted(p for p, e in entries.items() if "act" in e and p not in running)
    if stored:
        raise ArtifactError(f"layer {stored[0]!r} stores an activation quantiser the graph does not run")


def serialize(gm: fx.GraphModule, header: dict[str, Any]) -> bytes:
    """The artifact's bytes for a compiled GraphModule; ``header`` adds capture/config facts."""
    layers = coded_layers(gm)
    _check_act_quant(gm, {info.param: info.entry for _, info, _ in layers})
    coded_prefixes = tuple(path + "." for path, _, _ in layers)
    payload, chunk_index, tables = [], [], []
    tparams: dict[str, list[np.ndarray]] = {"f16": [], "f32": [], "e8m0": []}
    entries = []
    for _, info, module in layers:
        stream = info.stream
        payload.extend(stream.chunks)
        for c, crc in zip(stream.chunks, stream.crc32):
            chunk_index.extend((len(c), crc))
        tables.append(stream.table.freqs.astype(np.uint16))
        key = info.entry["pdtype"]
        for p in stored_params(module.kind, module.step_s, module.threshold_e):
            if key == "e8m0":
                tparams[key].append(e8m0_codes(p.cpu()).numpy().reshape(-1))
            else:
                tparams[key].append(p.cpu().numpy().astype(np.float16 if key == "f16" else np.float32).reshape(-1))
        entries.append(info.entry)
    arrays: dict[str, np.ndarray | Chunks] = {
        PAYLOAD: Chunks(payload),  # written chunk by chunk: never concatenated in memory
        CHUNKS: np.asarray(chunk_index, dtype=np.uint32),
        TABLES: np.concatenate(tables) if tables else np.zeros(0, np.uint16),
    }
    for key, parts in tparams.items():
        if parts:
            arrays[TPARAMS[key]] = np.concatenate(parts)
    # Plain tensors, packed: one flat tensor per stored dtype (``l2fx.plain.<dtype>``), in name
    # order; the manifest gives each its model dtype and shape. One safetensors header entry per
    # dtype instead of per tensor: Fashion-MNIST ResNet at CR 20, header 1,432 -> 512 bytes.
    plain_dtypes: dict[str, list] = {}
    packs: dict[str, list[np.ndarray]] = {}
    for name, t in sorted(gm.state_dict().items()):
        if name.startswith(coded_prefixes):
            continue
        a = _plain_array(t)
        if a.dtype not in _ST_DTYPES:
            raise ArtifactError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store")
        key = _ST_DTYPES[a.dtype].lower()
        packs.setdefault(key, []).append(a.reshape(-1))
        plain_dtypes[name] = [str(t.dtype).replace("torch.", ""), key, list(a.shape)]
    for key, parts in packs.items():
        arrays[PLAIN_PREFIX + key] = np.concatenate(parts)
    crcs = {k: _crc(v) for k, v in arrays.items() if k != PAYLOAD}
    if any("act" in e for e in entries):
        version = 4
    elif any("group" in e or e["pdtype"] == "e8m0" for e in entries):
        version = 3
    else:
        version = 2
    manifest = {"format": FORMAT, "version": version, **header, "layers": entries, "plain": plain_dtypes,
                "crc32": crcs}
    arrays[MANIFEST] = np.frombuffer(encode_manifest(manifest, version), dtype=np.uint8)
    return safetensors_bytes(arrays, {"format": FORMAT, "version": str(version),
                                      "manifest_crc32": str(_crc(arrays[MANIFEST]))})


def encode_manifest(manifest: dict[str, Any], version: int = VERSION) -> bytes:
    """The stored bytes of ``manifest`` in format ``version``: compact JSON, zlib-compressed from version 2."""
    text = json.dumps(manifest, separators=(",", ":")).encode()
    return text if version == 1 else zlib.compress(text, 9)


def manifest_inflate_limit(stored_nbytes: int) -> int:
    """The most a stored manifest of ``stored_nbytes`` may inflate to: 64 KiB plus 32 times its
    stored size, at most MAX_MANIFEST_NBYTES. Honest manifests deflate 4-7x (Fashion-MNIST
    ResNet 3,590 -> 977 bytes; EfficientNet-Lite0 12.9 -> 2.0 kB); a zlib bomb does ~1000x."""
    return min(MAX_MANIFEST_NBYTES, (64 << 10) + 32 * stored_nbytes)


def decode_manifest(data: bytes, version: int) -> bytes:
    """The manifest's JSON text from its stored bytes (inverse of :func:`encode_manifest`)."""
    if version == 1:
        return data
    limit = manifest_inflate_limit(len(data))
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise CorruptArtifactError(f"the manifest does not inflate: {exc}") from exc
    if inflater.unconsumed_tail:
        raise CorruptArtifactError(f"the manifest inflates to more than {limit} bytes (64 KiB + 32x its stored "
                                   f"{len(data)} bytes)")
    if not inflater.eof or inflater.unused_data:
        raise CorruptArtifactError("the manifest's zlib stream is truncated or followed by stray bytes")
    return text


_ST_DTYPES = {np.dtype(k): v for k, v in {
    "float16": "F16", "float32": "F32", "float64": "F64", "uint8": "U8", "int8": "I8", "uint16": "U16",
    "int16": "I16", "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64", "bool": "BOOL"}.items()}


class Chunks:
    """A 1-D uint8 array given as its consecutive pieces (``bytes``-like), for
    :func:`safetensors_bytes` to write one after the other: the payload of an LLM is hundreds of
    MB, held once in its layers' streams, and a concatenated copy would hold it twice more."""

    dtype = np.dtype(np.uint8)

    def __init__(self, pieces: list):
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.nbytes = sum(p.nbytes for p in self.pieces)
        self.shape = (self.nbytes,)


def safetensors_bytes(arrays: dict[str, np.ndarray | Chunks], metadata: dict[str, str]) -> bytes:
    """Serialises ``arrays`` in the safetensors format, deterministically.

    ``safetensors.numpy.save`` orders the metadata through a hash map, so two saves of the
    same model could differ byte for byte; this writer fixes every order (tensors by item
    size, largest first, which keeps each one aligned, then by name) and the library still
    reads the result (the tests check it).
    """
    names = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        a = arrays[name]
        if a.dtype not in _ST_DTYPES:
            raise ArtifactError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store")
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    parts = [len(text).to_bytes(8, "little"), text]
    # Buffers, not .tobytes() copies: join copies each once into the result (an LLM's payload
    # is hundreds of MB, and a copy per array doubled the peak of this step).
    for name in names:
        a = arrays[name]
        if isinstance(a, Chunks):
            parts.extend(a.pieces)
        else:
            parts.append(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
    return b"".join(parts)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes to a temporary file in the same folder, then renames: a crash never leaves half a file."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Reading. Nothing here trusts the file: ``l2fx.manifest`` validates every field against the
# format's limits and the arrays present before anything is allocated from it.

_ARRAY_DTYPES = {MANIFEST: "U8", PAYLOAD: "U8", CHUNKS: "U32", TABLES: "U16", TPARAMS["f16"]: "F16",
                 TPARAMS["f32"]: "F32", TPARAMS["e8m0"]: "U8"}
_TOP_KEYS_REQUIRED = ("format", "version", "capture", "fingerprint", "config", "original_nbytes", "layers",
                      "plain", "crc32")
_TOP_KEYS_OPTIONAL = ("passes", "fold_batchnorm", "torch")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a repeated key (which parsers resolve differently:
    Python keeps the last, others the first) is refused, so the manifest means one thing."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup[:40]!r} appears twice in one object")
    return out


class ArtifactReader:
    """Opens, checks and describes an artifact; decodes nothing until asked.

    After construction every layer entry (:attr:`layers`), plain tensor entry, the capture
    information and the config are validated, every checksum but the payload's (each chunk
    carries its own) matches, and every array is accounted for exactly. Any failure is a
    :class:`CorruptArtifactError` (or :class:`ArtifactVersionError`) naming what is wrong.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"no artifact at {self.path}")
        self.file_nbytes = self.path.stat().st_size
        try:
            self._open()
        except ArtifactError as exc:
            if not str(exc).startswith(str(self.path)):
                raise type(exc)(f"{self.path}: {exc}") from exc
            raise
        except L2fxError:
            raise
        except Exception as exc:  # noqa: BLE001 - the promise: a file can only make l2fx fail cleanly
            err = CorruptArtifactError(f"{self.path}: malformed artifact ({type(exc).__name__}: {exc})")
            err.unexpected = True  # a case the checks should have named: bench/fuzz.py counts these
            raise err from exc

    # -- parsing ------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            with safetensors.safe_open(str(self.path), framework="numpy") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise CorruptArtifactError("not an l2fx artifact (its safetensors metadata names no l2fx format)")
                version = metadata.get("version")
                if version not in [str(v) for v in READABLE_VERSIONS]:
                    raise ArtifactVersionError(f"format version {version!r}; this l2fx reads versions "
                                               f"{', '.join(map(str, READABLE_VERSIONS))}")
                self.version = int(version)
                specs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
                self._check_array_specs(specs)
                self.arrays = {k: f.get_tensor(k) for k in specs}
        except ArtifactError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError / ValueError / OSError on bad bytes
            raise CorruptArtifactError(f"not a readable safetensors file (truncated or corrupted?): {exc}") from exc
        if metadata.get("manifest_crc32") != str(_crc(self.arrays[MANIFEST])):
            raise CorruptArtifactError("checksum mismatch in the manifest")
        try:
            text = decode_manifest(self.arrays[MANIFEST].tobytes(), self.version)
            self.manifest = json.loads(text.decode(), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise CorruptArtifactError(f"the manifest is not valid JSON: {str(exc)[:200]}") from exc
        m = self.manifest
        require(isinstance(m, dict) and m.get("format") == FORMAT, "manifest", "does not describe an l2fx artifact")
        if m.get("version") != self.version:
            raise ArtifactVersionError(f"the manifest says format version {m.get('version')!r}, the file's "
                                       f"metadata {self.version}")
        missing = [k for k in _TOP_KEYS_REQUIRED if k not in m]
        unknown = [k[:40] for k in m if k not in _TOP_KEYS_REQUIRED + _TOP_KEYS_OPTIONAL]
        require(not missing and not unknown, "manifest", f"missing fields {missing}, unknown fields {unknown}")
        self._check_crcs(m["crc32"])
        sizes = {"chunks": self.arrays.get(CHUNKS, _EMPTY[CHUNKS]).size // 2,
                 "tables": self.arrays.get(TABLES, _EMPTY[TABLES]).size,
                 "f16": self.arrays.get(TPARAMS["f16"], _EMPTY[TPARAMS["f16"]]).size,
                 "f32": self.arrays.get(TPARAMS["f32"], _EMPTY[TPARAMS["f32"]]).size,
                 "e8m0": self.arrays.get(TPARAMS["e8m0"], _EMPTY[TPARAMS["e8m0"]]).size}
        self.layers = parse_layers(m["layers"], sizes, self.version)
        #: parameter name -> the static quantiser of its ops' input activations (format version 4)
        self.act_specs = {e.param: e.act for e in self.layers if e.act is not None}
        self._locate_payload()
        self._tables = {e.param: self._table(e) for e in self.layers}
        self._tparams = {e.param: check_tparams(e, self._stored_tparams(e)) for e in self.layers}
        if self.version == 1:
            self.plain_entries = parse_plain_v1(m["plain"], {k: v for k, v in self._specs.items()
                                                             if k not in _ARRAY_DTYPES})
        else:
            self.plain_entries = parse_plain_v2(m["plain"], {k[len(PLAIN_PREFIX):]: self.arrays[k].size
                                                             for k in self.arrays if k.startswith(PLAIN_PREFIX)})
        self.capture = parse_capture(m["capture"])
        require(isinstance(m["fingerprint"], str) and len(m["fingerprint"]) <= 128, "manifest",
                "field 'fingerprint' must be a short string")
        self.original_nbytes = int_field(m, "original_nbytes", "manifest", 0, 1 << 62)
        self.fold_batchnorm = m.get("fold_batchnorm", True)
        require(isinstance(self.fold_batchnorm, bool), "manifest", "field 'fold_batchnorm' must be true or false")
        require(isinstance(m["config"], dict) and "target_cr" in m["config"], "manifest",
                "field 'config' must be an object holding 'target_cr'")
        try:
            self.config = CompileConfig.from_dict(m["config"])
        except Exception as exc:  # noqa: BLE001 - from_dict of arbitrary JSON fails in many ways
            raise CorruptArtifactError(f"manifest field 'config' is not a valid CompileConfig: "
                                       f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def _check_array_specs(self, specs: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """Every tensor of the file is one the format names, 1-D, of the dtype it names."""
        if MANIFEST not in specs:
            raise CorruptArtifactError(f"has no {MANIFEST}: not an l2fx artifact")
        self._specs = specs
        for name, (dtype, shape) in specs.items():
            if name in _ARRAY_DTYPES:
                expected = _ARRAY_DTYPES[name]
            elif self.version >= 2 and name.startswith(PLAIN_PREFIX) and name[len(PLAIN_PREFIX):].upper() in _ST_NAMES:
                expected = name[len(PLAIN_PREFIX):].upper()
            elif self.version == 1:
                continue  # version 1 stores each plain tensor under its own name (checked by the manifest)
            else:
                raise CorruptArtifactError(f"tensor {name[:80]!r} is not part of the l2fx format")
            if dtype != expected or len(shape) != 1:
                raise CorruptArtifactError(f"tensor {name!r} is {dtype} of shape {list(shape)}, expected 1-D {expected}")
        if CHUNKS in specs and specs[CHUNKS][1][0] % 2:
            raise CorruptArtifactError(f"{CHUNKS} holds an odd number of values (pairs of length, CRC-32)")

    def _check_crcs(self, crcs: Any) -> None:
        require(isinstance(crcs, dict), "manifest", "field 'crc32' must be an object")
        covered = {k for k in self.arrays if k not in (MANIFEST, PAYLOAD)}
        require(set(crcs) == covered, "manifest", f"'crc32' must list exactly the file's tensors {sorted(covered)[:8]}; "
                f"missing {sorted(covered - set(crcs))[:5]}, unknown {sorted(k[:40] for k in set(crcs) - covered)[:5]}")
        for name, crc in crcs.items():
            if _crc(self.arrays[name]) != crc:
                raise CorruptArtifactError(f"checksum mismatch in tensor {name!r}")

    def _array(self, name: str) -> np.ndarray:
        return self.arrays.get(name, _EMPTY.get(name, _EMPTY[PAYLOAD]))

    def _locate_payload(self) -> None:
        """Each layer's byte range in the payload, from its chunk lengths; all bytes accounted for."""
        rows = self._array(CHUNKS).reshape(-1, 2).astype(np.int64)
        self._payload_start: dict[str, int] = {}
        cursor = 0
        for e in self.layers:
            mine = rows[e.chunk_start: e.chunk_start + e.nchunks]
            self._payload_start[e.param] = cursor
            if e.ntab == 1:  # its chunks are empty, and the CRC-32 of nothing is 0
                require(not mine.any(), f"layer {e.param[:80]!r}", "a single-symbol table has no payload, "
                        "but its chunk index claims bytes or non-zero CRCs")
            cursor += int(mine[:, 0].sum())
        payload = self._array(PAYLOAD).size
        require(cursor == payload, "manifest", f"the chunk index accounts for {cursor} payload bytes, "
                f"the payload holds {payload}")

    def _stored_tparams(self, e: LayerEntry) -> np.ndarray:
        """The layer's stored T parameters as float32 (E8M0 codes become 2^(code - 127); the NaN
        code 0xFF becomes NaN, which the checks refuse)."""
        raw = self._array(TPARAMS[e.pdtype])[e.tparam_start: e.tparam_start + e.nparams]
        if e.pdtype != "e8m0":
            return raw
        with np.errstate(over="ignore"):  # 0xFF: 2^128 overflows; it is NaN in E8M0
            out = np.ldexp(np.float32(1.0), raw.astype(np.int32) - 127).astype(np.float32)
        out[raw == 0xFF] = np.nan
        return out

    def _table(self, e: LayerEntry) -> coding.FrequencyTable:
        freqs = self._array(TABLES)[e.table_start: e.table_start + e.ntab]
        try:
            return coding.FrequencyTable(e.qmin, freqs)
        except ConfigError as exc:
            raise CorruptArtifactError(f"layer {e.param[:80]!r}: invalid frequency table: {exc}") from exc

    # -- what callers use ---------------------------------------------------------------------

    @property
    def target_cr(self) -> float:
        return float(self.config.target_cr)

    def stream(self, e: LayerEntry) -> coding.CodedStream:
        """The layer's range-coded stream (chunks still checked by their CRC-32 when decoded)."""
        if e.ntab == 1:  # empty chunks (checked at open)
            return coding.CodedStream(self._tables[e.param], e.numel, e.chunk, (b"",) * e.nchunks, (0,) * e.nchunks)
        rows = self._array(CHUNKS).reshape(-1, 2)[e.chunk_start: e.chunk_start + e.nchunks]
        payload = self._array(PAYLOAD)
        start, chunks = self._payload_start[e.param], []
        for n in rows[:, 0]:
            chunks.append(payload[start: start + int(n)].tobytes())
            start += int(n)
        return coding.CodedStream(self._tables[e.param], e.numel, e.chunk, tuple(chunks),
                                  tuple(int(c) for c in rows[:, 1]))

    def tparams(self, e: LayerEntry) -> tuple[np.ndarray, np.ndarray]:
        """(step_s, threshold_e) as stored: float32 arrays of shape ``e.param_shape``."""
        return self._tparams[e.param]

    def streams(self) -> list[tuple[dict, coding.CodedStream, np.ndarray, np.ndarray]]:
        """(entry as written, stream, step_s, threshold_e) per coded layer, in manifest order."""
        return [(e.to_dict(), self.stream(e), *self.tparams(e)) for e in self.layers]

    def check_against(self, state: Any, model_name: str) -> None:
        """Every coded layer has a floating tensor of the same name and shape in ``state``
        (the model's ``state_dict()``): checked before any layer is decoded, so a file cannot
        make the loader decode more symbols than the model holds."""
        for e in self.layers:
            t = state.get(e.param)
            if t is None:
                raise ArchitectureMismatchError(f"{self.path}: layer {e.param!r} of the artifact has no tensor of that "
                                                f"name in the {model_name}")
            if tuple(t.shape) != e.shape:
                raise ArchitectureMismatchError(f"{self.path}: layer {e.param!r} has shape {list(e.shape)} in the "
                                                f"artifact, {list(t.shape)} in the {model_name}")
            if not t.is_floating_point():
                raise ArchitectureMismatchError(f"{self.path}: layer {e.param!r} is {t.dtype} in the {model_name}, "
                                                "not floating point")

    def plain(self) -> dict[str, torch.Tensor]:
        """The plain (not range-coded) tensors by state_dict name, in their model dtype."""
        out = {}
        for p in self.plain_entries:
            if self.version == 1:
                a = np.array(self.arrays[p.name])
            else:
                a = self.arrays[PLAIN_PREFIX + p.pack][p.start: p.start + p.numel].reshape(p.shape).copy()
            out[p.name] = torch.from_numpy(a).to(getattr(torch, p.dtype))
        return out


_EMPTY = {PAYLOAD: np.zeros(0, np.uint8), CHUNKS: np.zeros(0, np.uint32), TABLES: np.zeros(0, np.uint16),
          TPARAMS["f16"]: np.zeros(0, np.float16), TPARAMS["f32"]: np.zeros(0, np.float32),
          TPARAMS["e8m0"]: np.zeros(0, np.uint8)}
_ST_NAMES = set(_ST_DTYPES.values())


def check_fingerprint(reader: ArtifactReader, fingerprint: str, model_name: str) -> None:
    if reader.manifest.get("fingerprint") != fingerprint:
        raise ArchitectureMismatchError(
            f"{reader.path} was compiled from a different architecture than the {model_name} passed to "
            f"l2fx.load (tensor names or shapes differ: architecture fingerprint "
            f"{reader.manifest.get('fingerprint')} != {fingerprint})")
