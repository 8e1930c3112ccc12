"""The artifact: a safetensors file holding the range-coded weights and everything else.

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
import math
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
from l2fx.errors import ArchitectureMismatchError, ArtifactError, ArtifactVersionError, CorruptArtifactError
from l2fx.ir import CodedInfo, get_meta, weight_sites
from l2fx.modules import CodedWeight
from l2fx.transform import TransformKind

FORMAT = "l2fx"
# Version 2: the manifest is zlib-compressed (level 9) and the plain tensors are packed per dtype.
# Fashion-MNIST ResNet at CR 20: file 37,538 -> 34,005 bytes (whole-file CR 17.76 -> 19.60);
# EfficientNet-Lite0 at CR 10: manifest 12.9 -> 2.0 kB of 1.89 MB. Version 1 is still read.
VERSION = 2
READABLE_VERSIONS = (1, 2)
# Refuse to inflate a manifest beyond this (a decompression bomb is a corrupt file, not a hang).
MAX_MANIFEST_NBYTES = 256 << 20
MANIFEST = "l2fx.manifest"
PAYLOAD = "l2fx.payload"
CHUNKS = "l2fx.chunks"
TABLES = "l2fx.tables"
TPARAMS = {"f16": "l2fx.tparams16", "f32": "l2fx.tparams32"}
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


def serialize(gm: fx.GraphModule, header: dict[str, Any]) -> bytes:
    """The artifact's bytes for a compiled GraphModule; ``header`` adds capture/config facts."""
    layers = coded_layers(gm)
    coded_prefixes = tuple(path + "." for path, _, _ in layers)
    payload, chunk_index, tables = [], [], []
    tparams: dict[str, list[np.ndarray]] = {"f16": [], "f32": []}
    entries = []
    for _, info, module in layers:
        stream = info.stream
        payload.extend(np.frombuffer(c, dtype=np.uint8) for c in stream.chunks)
        for c, crc in zip(stream.chunks, stream.crc32):
            chunk_index.extend((len(c), crc))
        tables.append(stream.table.freqs.astype(np.uint16))
        dtype = np.float16 if info.entry["pdtype"] == "f16" else np.float32
        tparams[info.entry["pdtype"]].append(module.step_s.cpu().numpy().astype(dtype))
        if module.kind is not TransformKind.LINEAR:
            tparams[info.entry["pdtype"]].append(module.threshold_e.cpu().numpy().astype(dtype))
        entries.append(info.entry)
    arrays: dict[str, np.ndarray] = {
        PAYLOAD: np.concatenate(payload) if payload else np.zeros(0, np.uint8),
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
    manifest = {"format": FORMAT, "version": VERSION, **header, "layers": entries, "plain": plain_dtypes,
                "crc32": crcs}
    arrays[MANIFEST] = np.frombuffer(encode_manifest(manifest, VERSION), dtype=np.uint8)
    return safetensors_bytes(arrays, {"format": FORMAT, "version": str(VERSION),
                                      "manifest_crc32": str(_crc(arrays[MANIFEST]))})


def encode_manifest(manifest: dict[str, Any], version: int = VERSION) -> bytes:
    """The stored bytes of ``manifest`` in format ``version``: compact JSON, zlib-compressed from version 2."""
    text = json.dumps(manifest, separators=(",", ":")).encode()
    return text if version == 1 else zlib.compress(text, 9)


def decode_manifest(data: bytes, version: int) -> bytes:
    """The manifest's JSON text from its stored bytes (inverse of :func:`encode_manifest`)."""
    if version == 1:
        return data
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_MANIFEST_NBYTES)
    except zlib.error as exc:
        raise CorruptArtifactError(f"the manifest does not inflate: {exc}") from exc
    if inflater.unconsumed_tail:
        raise CorruptArtifactError(f"the manifest inflates to more than {MAX_MANIFEST_NBYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise CorruptArtifactError("the manifest's zlib stream is truncated or followed by stray bytes")
    return text


_ST_DTYPES = {np.dtype(k): v for k, v in {
    "float16": "F16", "float32": "F32", "float64": "F64", "uint8": "U8", "int8": "I8", "uint16": "U16",
    "int16": "I16", "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64", "bool": "BOOL"}.items()}


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
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
    parts.extend(np.ascontiguousarray(arrays[name]).tobytes() for name in names)
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
# Reading


class ArtifactReader:
    """Parses and checks an artifact; gives the manifest, decoded layers and plain tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"no artifact at {self.path}")
        self.file_nbytes = self.path.stat().st_size
        try:
            with safetensors.safe_open(str(self.path), framework="numpy") as f:
                metadata = f.metadata() or {}
                self.arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises SafetensorError / ValueError on bad bytes
            raise CorruptArtifactError(f"{self.path} is not a readable safetensors file (truncated or "
                                       f"corrupted?): {exc}") from exc
        if MANIFEST not in self.arrays or metadata.get("format") != FORMAT:
            raise CorruptArtifactError(f"{self.path} has no {MANIFEST}: not an l2fx artifact")
        version = metadata.get("version")
        if version not in [str(v) for v in READABLE_VERSIONS]:
            raise ArtifactVersionError(f"{self.path} has format version {version!r}; this l2fx reads versions "
                                       f"{', '.join(map(str, READABLE_VERSIONS))}")
        self.version = int(version)
        if metadata.get("manifest_crc32") != str(_crc(self.arrays[MANIFEST])):
            raise CorruptArtifactError(f"{self.path}: checksum mismatch in the manifest")
        try:
            self.manifest = json.loads(decode_manifest(self.arrays[MANIFEST].tobytes(), self.version).decode())
        except CorruptArtifactError as exc:
            raise CorruptArtifactError(f"{self.path}: {exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptArtifactError(f"{self.path}: the manifest is not valid JSON: {exc}") from exc
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise CorruptArtifactError(f"{self.path}: manifest does not describe an l2fx artifact")
        if self.manifest.get("version") != self.version:
            raise ArtifactVersionError(f"{self.path}: the manifest says format version "
                                       f"{self.manifest.get('version')!r}, the file's metadata {self.version}")
        for key, kind in (("layers", list), ("plain", dict), ("crc32", dict)):
            if not isinstance(self.manifest.get(key), kind):
                raise CorruptArtifactError(f"{self.path}: the manifest's {key!r} is missing or not a {kind.__name__}")
        for name, crc in self.manifest["crc32"].items():
            if name not in self.arrays:
                raise CorruptArtifactError(f"{self.path}: tensor {name!r} listed in the manifest is missing")
            if _crc(self.arrays[name]) != crc:
                raise CorruptArtifactError(f"{self.path}: checksum mismatch in tensor {name!r}")

    def streams(self) -> list[tuple[dict, coding.CodedStream, np.ndarray, np.ndarray]]:
        """(entry, stream, step_s, threshold_e) per coded layer, in manifest order."""
        payload = self.arrays.get(PAYLOAD, np.zeros(0, np.uint8))
        chunk_index = self.arrays.get(CHUNKS, np.zeros(0, np.uint32)).reshape(-1, 2)
        tables = self.arrays.get(TABLES, np.zeros(0, np.uint16))
        cursors = {"payload": 0, "chunk": 0, "table": 0, "f16": 0, "f32": 0}
        out = []
        for entry in self.manifest["layers"]:
            try:
                numel = math.prod(entry["shape"])
                nchunks, ntab = entry["nchunks"], entry["ntab"]
                rows = chunk_index[cursors["chunk"]: cursors["chunk"] + nchunks]
                cursors["chunk"] += nchunks
                chunks = []
                for nbytes, crc in rows:
                    start = cursors["payload"]
                    chunks.append(payload[start: start + int(nbytes)].tobytes())
                    cursors["payload"] += int(nbytes)
                freqs = tables[cursors["table"]: cursors["table"] + ntab]
                cursors["table"] += ntab
                arrays = {"payload": np.frombuffer(b"".join(chunks), dtype=np.uint8),
                          "chunk_nbytes": rows[:, 0].astype(np.uint32), "crc32": rows[:, 1].astype(np.uint32),
                          "table_qmin": np.asarray([entry["qmin"]], dtype=np.int16), "table_freqs": freqs}
                stream = coding.stream_from_arrays(arrays, numel, entry["chunk"])
                axis = entry["axis"]
                channels = entry["shape"][axis] if axis is not None else 1
                nparams = channels * (1 if entry["kind"] == TransformKind.LINEAR.value else 2)
                tp = self.arrays[TPARAMS[entry["pdtype"]]]
                params = tp[cursors[entry["pdtype"]]: cursors[entry["pdtype"]] + nparams].astype(np.float32)
                cursors[entry["pdtype"]] += nparams
                if params.size != nparams:
                    raise CorruptArtifactError(f"layer {entry['param']!r}: T parameters are truncated")
                s = params[:channels]
                e = params[channels:] if nparams > channels else 0.5 * s
                if not (np.isfinite(params).all() and (params > 0).all()):
                    raise CorruptArtifactError(f"layer {entry['param']!r}: T parameters are not finite and > 0")
            except CorruptArtifactError:
                raise
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise CorruptArtifactError(f"{self.path}: malformed layer entry {entry!r}: {exc}") from exc
            out.append((entry, stream, s, e))
        if cursors["payload"] != payload.size:
            raise CorruptArtifactError(f"{self.path}: payload has {payload.size - cursors['payload']} stray bytes")
        return out

    def plain(self) -> dict[str, torch.Tensor]:
        """The plain (not range-coded) tensors by state_dict name, in their model dtype."""
        if self.version == 1:  # one safetensors tensor per plain tensor, under its own name
            out = {}
            for name, dtype in self.manifest["plain"].items():
                if name not in self.arrays:
                    raise CorruptArtifactError(f"{self.path}: plain tensor {name!r} is missing")
                out[name] = torch.from_numpy(np.array(self.arrays[name])).to(getattr(torch, dtype))
            return out
        out, cursors = {}, {}
        for name, spec in self.manifest["plain"].items():
            try:
                dtype, key, shape = spec
                pack = self.arrays[PLAIN_PREFIX + key]
                start = cursors.get(key, 0)
                n = math.prod(shape)
                if start + n > pack.size:
                    raise CorruptArtifactError(f"{self.path}: plain tensor {name!r} runs past {PLAIN_PREFIX + key}")
                cursors[key] = start + n
                out[name] = torch.from_numpy(pack[start: start + n].reshape(shape).copy()).to(getattr(torch, dtype))
            except CorruptArtifactError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise CorruptArtifactError(f"{self.path}: malformed plain tensor entry {name!r}: {spec!r} ({exc})") from exc
        for key, used in cursors.items():
            if used != self.arrays[PLAIN_PREFIX + key].size:
                raise CorruptArtifactError(f"{self.path}: {PLAIN_PREFIX + key} has stray values")
        return out


def check_fingerprint(reader: ArtifactReader, fingerprint: str, model_name: str) -> None:
    if reader.manifest.get("fingerprint") != fingerprint:
        raise ArchitectureMismatchError(
            f"{reader.path} was compiled from a different architecture than the {model_name} passed to "
            f"l2fx.load (tensor names or shapes differ: architecture fingerprint "
            f"{reader.manifest.get('fingerprint')} != {fingerprint})")
