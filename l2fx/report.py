"""The compression report: per-layer bits/weight, sparsity, bytes; both CRs; pass timings."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class LayerReport:
    param: str
    shape: tuple[int, ...]
    kind: str
    numel: int
    nbytes: int  # everything written for the layer
    payload_nbytes: int
    shannon_nbytes: float  # lower bound of the payload: numel * empirical entropy / 8
    bits: int  # bits per symbol in memory (2..8)
    sparsity: float
    # The same symbols at a fixed width instead of range coded: ``bits`` per code packed into
    # 32-bit words along each row (the in-memory layout of the fused kernel), plus the T
    # parameters: what a format without entropy coding would store.
    packed_nbytes: int = 0
    # Bits of the static quantiser on the input activations of the ops reading this weight (the
    # compound methods' w+a options); None: they stay in the model's dtype.
    act_bits: int | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def cr(self) -> float:
        return 4.0 * self.numel / self.nbytes


@dataclasses.dataclass(frozen=True)
class CompressionReport:
    """What a compile (or an artifact) achieved, measured on real bytes.

    ``compressed_cr``: fp32 bytes of the compressed weights over every byte written for them.
    ``file_cr``: fp32 bytes of every parameter and buffer of the original model (non-float
    buffers at their own size) over the artifact's file size. ``pass_peak_rss_mib``: the
    process's peak resident memory (a high-water mark) after the capture and after each pass:
    the step where it rises is the one that set it.
    """

    target_cr: float
    layers: tuple[LayerReport, ...]
    file_nbytes: int
    original_nbytes: int
    pass_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_rss_mib: float | None = None
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    pass_peak_rss_mib: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def compressed_fp32_nbytes(self) -> int:
        return sum(4 * layer.numel for layer in self.layers)

    @property
    def compressed_nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def compressed_cr(self) -> float:
        return self.compressed_fp32_nbytes / self.compressed_nbytes

    @property
    def file_cr(self) -> float:
        return self.original_nbytes / self.file_nbytes

    @property
    def packed_cr(self) -> float:
        """The compressed weights' fp32 bytes over their fixed-width packed bytes (no entropy coding)."""
        packed = sum(layer.packed_nbytes for layer in self.layers)
        return self.compressed_fp32_nbytes / packed if packed else float("nan")

    @property
    def payload_nbytes(self) -> int:
        return sum(layer.payload_nbytes for layer in self.layers)

    @property
    def shannon_nbytes(self) -> float:
        return sum(layer.shannon_nbytes for layer in self.layers)

    @property
    def coding_overhead(self) -> float:
        """Payload bytes over the Shannon bound of the same symbols, minus one."""
        return self.payload_nbytes / self.shannon_nbytes - 1.0 if self.shannon_nbytes else 0.0

    def table(self) -> str:
        act = any(layer.act_bits is not None for layer in self.layers)
        rows = [f"{'layer':<44} {'shape':<20} {'kind':<6} {'bits/w':>7} {'sparsity':>8} {'bytes':>10} {'CR':>7}"
                + (f" {'act bits':>8}" if act else "")]
        for layer in self.layers:
            rows.append(f"{layer.param[:44]:<44} {str(list(layer.shape))[:20]:<20} {layer.kind:<6} "
                        f"{layer.bits_per_weight:7.3f} {layer.sparsity:8.1%} {layer.nbytes:10d} {layer.cr:7.2f}"
                        + (f" {layer.act_bits or '-':>8}" if act else ""))
        rows.append("")
        rows.append(f"compressed weights: {self.compressed_fp32_nbytes:,} fp32 bytes -> {self.compressed_nbytes:,} bytes: "
                    f"CR {self.compressed_cr:.3f} (target {self.target_cr:g})")
        rows.append(f"whole file:         {self.original_nbytes:,} fp32 bytes -> {self.file_nbytes:,} bytes: "
                    f"CR {self.file_cr:.3f}")
        rows.append(f"fixed-width packed: CR {self.packed_cr:.3f} (the same symbols at their bits/symbol, no range "
                    "coding)")
        rows.append(f"payload {self.payload_nbytes:,} bytes vs Shannon bound {self.shannon_nbytes:,.0f} "
                    f"(+{self.coding_overhead:.3%})")
        if self.pass_seconds:
            rows.append("pass times: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.pass_seconds.items()))
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(compressed_cr=self.compressed_cr, file_cr=self.file_cr, coding_overhead=self.coding_overhead,
                 packed_cr=self.packed_cr)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)


def packed_nbytes(shape: tuple[int, ...], bits: int, params_nbytes: int) -> int:
    """Bytes of a layer's symbols at ``bits`` each, 32 // bits per int32 word along each row,
    plus its T parameters (``params_nbytes``)."""
    rows = shape[0] if shape else 1
    k = math.prod(shape[1:]) if len(shape) > 1 else 1
    return 4 * rows * -(-k // (32 // bits)) + params_nbytes


def original_nbytes(model: torch.nn.Module) -> int:
    """fp32 size of every parameter and buffer (state_dict) of the user's model, each tensor
    once (a tied embedding and LM head are one tensor under two names)."""
    total, seen = 0, set()
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += 4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
    return total
