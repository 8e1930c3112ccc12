"""In-memory bit packing of integer codes for the Triton dequant-matmul kernels.

A compressed layer stores one integer code ``q`` in ``[-qmax, qmax]`` (``qmax <= 127``) per
weight of ``W[N, K]`` (N output channels, K the reduction dimension).  The kernels read the
codes packed at ``b`` bits (``2 <= b <= 8``) along K:

Layout ("floor(32 / b) fields per int32 word, little-endian fields, no field straddles a word")
    * every code is stored as the unsigned field ``u = q + 2**(b-1)``, ``0 <= u < 2**b``;
    * ``F = 32 // b`` fields share one 32-bit word (b=2: 16, 3: 10, 4: 8, 5: 6, 6: 5,
      7: 4, 8: 4); code ``k`` of row ``n`` lives in word ``k // F`` at bit offset
      ``(k % F) * b``;
    * the last word of each row is padded with ``u = 2**(b-1)`` (``q = 0``), which every
      transform decodes to exactly 0 (Eq. 13 and friends map 0 to 0);
    * words are stored as ``torch.int32`` (the bit pattern; for b=2 the top field reaches
      the sign bit, so consumers must mask after shifting, which the kernel does anyway).

Why this layout: the kernel unpacks a [BLOCK_K, BLOCK_N] tile with one gather load of the
word ``k // F`` and one shift-and-mask ``(w >> (k % F) * b) & (2**b - 1)``; ``F`` is a
compile-time constant, so ``//`` and ``%`` become multiply-high/shift sequences, and every
bit width uses the same code path.  For b = 3, 5, 6, 7 a few bits per word are wasted
(b=3: 30 of 32 bits used, 6.7 % overhead; b=5: 30/32; b=6: 30/32; b=7: 28/32, 14 %), which
is the price of never splitting a field across two words.  The *artifact* on disk is
entropy-coded separately; this format only has to be cheap to decode in registers.
"""
from __future__ import annotations

import dataclasses

import torch

from l2fx.accounting import bits_for_magnitude
from l2fx.errors import BackendError

#: Bit widths the kernels support.
MIN_BITS = 2
MAX_BITS = 8
#: Largest |q| representable at MAX_BITS (2**7 - 1).
MAX_ABS_CODE = (1 << (MAX_BITS - 1)) - 1
WORD_BITS = 32


def fields_per_word(bits: int) -> int:
    """Number of ``bits``-wide fields in one int32 word (``32 // bits``)."""
    _check_bits(bits)
    return WORD_BITS // bits


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise BackendError(
            f"packed codes support bit widths {MIN_BITS}..{MAX_BITS}, got bits={bits!r}"
        )


@dataclasses.dataclass(frozen=True)
class PackedCodes:
    """Codes of one layer, packed along K (see the module docstring for the layout).

    Attributes:
        words: ``torch.int32 [N, ceil(K / F)]``, contiguous, ``F = 32 // bits``; field
            ``k % F`` of ``words[n, k // F]`` holds ``q[n, k] + 2**(bits-1)``.
        bits: field width ``b``, ``2 <= b <= 8``.
        k: the unpadded reduction length ``K`` (the last word of a row may hold padding).
    """

    words: torch.Tensor
    bits: int
    k: int

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.words.dtype != torch.int32 or self.words.dim() != 2:
            raise BackendError(
                "PackedCodes.words must be a 2-D torch.int32 tensor, got "
                f"{self.words.dtype} with shape {tuple(self.words.shape)}"
            )
        if self.k < 0 or self.words.shape[1] != -(-self.k // self.fields_per_word):
            raise BackendError(
                f"PackedCodes.words has {self.words.shape[1]} words per row, but K={self.k} "
                f"at {self.bits} bits needs ceil(K / {self.fields_per_word}) = "
                f"{-(-self.k // self.fields_per_word)}"
            )

    @property
    def fields_per_word(self) -> int:
        return WORD_BITS // self.bits

    @property
    def n(self) -> int:
        return self.words.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(N, K)`` of the code matrix this packs."""
        return (self.words.shape[0], self.k)

    def to(self, device: torch.device | str) -> "PackedCodes":
        return PackedCodes(self.words.to(device), self.bits, self.k)


def pack_codes(q: torch.Tensor, bits: int | None = None) -> PackedCodes:
    """Pack integer codes ``q [N, K]`` (any integer dtype) at ``bits`` bits per code.

    ``bits=None`` takes the fewest that hold them (:func:`l2fx.accounting.bits_for_magnitude`).  Raises :class:`BackendError` if a code does not
    fit in ``bits`` bits (``|q| > 2**(bits-1) - 1``) or ``q`` is not a 2-D integer tensor.
    """
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise BackendError(
            f"pack_codes expects a 2-D integer tensor [N, K], got {q.dtype} {tuple(q.shape)}"
        )
    if bits is None:
        bits = bits_for_magnitude(int(q.abs().max()) if q.numel() else 0)
    _check_bits(bits)
    qmax = (1 << (bits - 1)) - 1
    if q.numel() and int(q.abs().max()) > qmax:
        raise BackendError(
            f"codes up to |q|={int(q.abs().max())} do not fit in {bits} bits (|q| <= {qmax})"
        )
    n, k = q.shape
    f = WORD_BITS // bits
    n_words = -(-k // f)
    offset = 1 << (bits - 1)
    # int64 arithmetic: the packed word may need all 32 bits (b=2), which overflows int32.
    u = torch.full((n, n_words * f), offset, dtype=torch.int64, device=q.device)
    u[:, :k] = q.to(torch.int64) + offset
    shifts = torch.arange(f, dtype=torch.int64, device=q.device) * bits
    words = (u.view(n, n_words, f) << shifts).sum(-1)  # fields are disjoint: sum == or
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # wrap to int32 range
    return PackedCodes(words.to(torch.int32).contiguous(), bits, k)


def unpack_codes(packed: PackedCodes) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``torch.int16 [N, K]`` codes (pure torch)."""
    bits, f = packed.bits, packed.fields_per_word
    n = packed.n
    shifts = torch.arange(f, dtype=torch.int64, device=packed.words.device) * bits
    w = packed.words.to(torch.int64) & 0xFFFFFFFF
    u = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    q = u.reshape(n, -1)[:, : packed.k] - (1 << (bits - 1))
    return q.to(torch.int16)
