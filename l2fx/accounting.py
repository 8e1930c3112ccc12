"""Exact byte accounting of a compressed layer, shared by allocation, lowering and the artifact.

A compressed weight writes, in the artifact (``docs/format.md``):

* its range-coded payload (all chunks, 32-bit words),
* its probability table: ``ntab`` uint16 frequencies,
* its chunk index: per chunk a uint32 byte length and a uint32 CRC-32,
* its T parameters: ``step_s`` and (for the kinds that use it) ``threshold_e``, one per
  channel, per group of ``g`` elements of a row, or per tensor, as float16 when every value is a
  normal float16, else float32; a block format's power-of-two scales as E8M0 (one byte each),
* its entry in the JSON manifest (:func:`manifest_entry`), byte for byte as uncompressed JSON
  (the artifact zlib-compresses the manifest, so the file holds less: a conservative count).

:func:`layer_nbytes` adds these up; the allocator predicts the payload, the lowering pass
measures it, and the artifact writer writes these bytes (the manifest entries compressed), so
the CR the report states is what the file holds, or a little better.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch

from l2fx import coding
from l2fx.transform import FORMAT_KINDS, TransformKind, uses_threshold

FP16_MIN_NORMAL = 6.103515625e-05
FP16_MAX = 65504.0


def bits_for_magnitude(amax: int) -> int:
    """Bits per symbol a layer needs in memory: the smallest ``b >= 2`` with
    ``amax <= 2^(b-1) - 1`` (symbols ``[-amax, amax]`` as offset-binary fields of ``b`` bits)."""
    return max(2, int(math.ceil(math.log2(amax + 1))) + 1)


def fits_fp16(t: torch.Tensor) -> bool:
    """Whether float16 holds ``t``: every value within its range, and the rounding error's RMS
    within 2^-10 of the tensor's RMS. Normal float16 numbers err by at most 2^-11 relative, so
    only a tensor whose values lie mostly below float16's normal range (6.1e-5) fails the
    second test: biases of a model at 1e-7 scale lost their digits to subnormals (relative
    output error 6e4 before any weight was compressed), while a tensor at unit scale with a
    few tiny entries passes, as it should."""
    a = t.detach().float()
    if a.numel() == 0:
        return True
    if float(a.abs().max()) > FP16_MAX:
        return False
    err = (a - a.to(torch.float16).float()).pow(2).mean()
    return bool(err <= a.pow(2).mean() * 2.0 ** -20)


@torch.no_grad()
def round_to_fp16(t: torch.Tensor) -> bool:
    """Rounds ``t`` in place to float16-representable values when float16 holds it
    (:func:`fits_fp16`); returns whether it did (otherwise it is stored as float32, unchanged)."""
    if not fits_fp16(t):
        return False
    t.copy_(t.to(torch.float16).to(t.dtype))
    return True


#: Bytes per stored T parameter by storage key: float16, float32, or E8M0 (a power of two as its
#: biased exponent, the MX scale encoding; for the block-format kinds).
PARAM_ITEMSIZE = {"f16": 2, "f32": 4, "e8m0": 1}


def _pow2_exponents(p: torch.Tensor) -> torch.Tensor | None:
    """The exponents of ``p`` when every value is an exact power of two in 2^-127 .. 2^127."""
    mant, exp = torch.frexp(p.detach().double())
    if p.numel() == 0 or not bool((mant == 0.5).all()):
        return None
    e = exp - 1
    return e if bool(((e >= -127) & (e <= 127)).all()) else None


def param_storage(kind: TransformKind, *params: torch.Tensor) -> str:
    """How a layer's T parameters are stored: ``"e8m0"`` for a block-format kind whose scales
    are all exact powers of two (MX's shared scales), ``"f16"`` when every value is a normal
    float16 number, else ``"f32"``."""
    if TransformKind(kind) in FORMAT_KINDS and all(_pow2_exponents(p) is not None for p in params):
        return "e8m0"
    for p in params:
        a = p.detach().abs()
        if a.numel() and (float(a.min()) < FP16_MIN_NORMAL or float(a.max()) > FP16_MAX):
            return "f32"
    return "f16"


def stored_params(kind: TransformKind, step_s: torch.Tensor, threshold_e: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The T parameters written to the artifact (``e`` only for kinds that use it)."""
    return (step_s, threshold_e) if uses_threshold(kind) else (step_s,)


def round_params(kind: TransformKind, step_s: torch.Tensor, threshold_e: torch.Tensor):
    """Rounds (s, e) to their storage; returns fp32 tensors holding the stored values and the
    storage key (:data:`PARAM_ITEMSIZE`)."""
    key = param_storage(kind, *stored_params(kind, step_s, threshold_e))
    if key == "e8m0":  # exact already
        s = step_s.detach().float()
    else:
        dtype = torch.float16 if key == "f16" else torch.float32
        s = step_s.detach().to(dtype).float()
    if uses_threshold(kind):
        e = threshold_e.detach().to(torch.float16 if key == "f16" else torch.float32).float()
    else:
        e = 0.5 * s
    return s, e, key


def e8m0_codes(p: torch.Tensor) -> torch.Tensor:
    """The biased exponents (uint8, bias 127) of exact powers of two (:func:`param_storage`)."""
    e = _pow2_exponents(p)
    if e is None:
        raise ValueError("E8M0 storage needs exact powers of two in 2^-127 .. 2^127")
    return (e + 127).to(torch.uint8)


def manifest_entry(param: str, kind: TransformKind, shape: tuple[int, ...], axis: int | None, qmin: int,
                   ntab: int, nchunks: int, chunk_size: int, pdtype: str, group: int | None = None,
                   act: dict | None = None) -> dict:
    """The layer's manifest entry (``docs/format.md``); ``group`` only for a per-group layer
    (format version 3), so per-channel and per-tensor entries are those of version 2; ``act``
    (``ActQuantSpec.to_dict()``) only for a layer whose input activations are quantised
    (version 4)."""
    entry = {
        "param": param, "kind": TransformKind(kind).value, "shape": list(shape), "axis": axis,
        "qmin": int(qmin), "ntab": int(ntab), "nchunks": int(nchunks), "chunk": int(chunk_size),
        "pdtype": pdtype,
    }
    if group is not None:
        entry["group"] = int(group)
    if act is not None:
        entry["act"] = dict(act)
    return entry


def entry_nbytes(entry: dict) -> int:
    """Bytes of the entry in the compact JSON manifest, plus its separating comma."""
    return len(json.dumps(entry, separators=(",", ":"))) + 1


@dataclasses.dataclass(frozen=True)
class LayerBytes:
    payload: int
    table: int
    chunk_index: int
    params: int
    manifest: int

    @property
    def total(self) -> int:
        return self.payload + self.table + self.chunk_index + self.params + self.manifest


def layer_nbytes(param: str, kind: TransformKind, shape: tuple[int, ...], axis: int | None,
                 table: coding.FrequencyTable, payload_nbytes: int, chunk_size: int,
                 step_s: torch.Tensor, threshold_e: torch.Tensor, group: int | None = None,
                 act: dict | None = None) -> LayerBytes:
    numel = math.prod(shape)
    nchunks = max(1, -(-numel // chunk_size))
    params = stored_params(kind, step_s, threshold_e)
    pdtype = param_storage(kind, *params)
    itemsize = PARAM_ITEMSIZE[pdtype]
    entry = manifest_entry(param, kind, shape, axis, table.qmin, table.freqs.size, nchunks, chunk_size, pdtype, group,
                           act)
    return LayerBytes(
        payload=int(payload_nbytes),
        table=2 * int(table.freqs.size),  # uint16 each; qmin lives in the manifest entry
        chunk_index=8 * nchunks,
        params=itemsize * sum(p.numel() for p in params),
        manifest=entry_nbytes(entry),
    )


def predict_layer_nbytes(param: str, kind: TransformKind, symbols: torch.Tensor, axis: int | None,
                         chunk_size: int, step_s: torch.Tensor, threshold_e: torch.Tensor,
                         group: int | None = None) -> LayerBytes:
    """Bytes the layer would take with these symbols, without range coding them."""
    flat = symbols.reshape(-1).numpy().astype(np.int16, copy=False)
    table, payload = coding.predict_coding(flat, chunk_size)
    return layer_nbytes(param, kind, tuple(symbols.shape), axis, table, payload, chunk_size, step_s, threshold_e,
                        group)
