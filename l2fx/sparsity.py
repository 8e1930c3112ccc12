"""Pruning masks and their information content.

Every function views a weight as a matrix ``[rows, cols]`` whose ``cols`` axis is the
reduction axis of the layer: Linear ``[out, in]`` as is, Conv ``[Cout, Cin, kh, kw]`` as
``[Cout, Cin*kh*kw]`` (:func:`as_rows_cols`; :func:`from_rows_cols` goes back), a 1-D tensor
as ``[1, n]``. Masks are ``torch.bool`` tensors of the weight's own shape, **True = kept**.

Each mask function ranks by ``|w|`` unless ``scores`` (same shape as ``w``, non-negative by
convention, no NaN) is given, so that e.g. Wanda's ``|w| * ||x||`` reuses them; with
``scores=w.abs()`` the result is identical to the default.

Ties are broken deterministically: among equal scores the element (or block) with the lower
row-major index of the ``[rows, cols]`` view is pruned first (stable sort). Counts are exact:
``magnitude_mask`` prunes ``round(sparsity * count)`` elements (Python ``round``: nearest,
ties to even), per tensor or per row.

Patterns (for :func:`mask_entropy_bits`) are small frozen dataclasses: :class:`Unstructured`,
:class:`NM` and :class:`Blocks`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from l2fx.errors import ConfigError, FormatError, NonFiniteWeightError


# ---------------------------------------------------------------------------------------------
# Patterns


@dataclass(frozen=True)
class Unstructured:
    """Any subset of elements may be kept."""


@dataclass(frozen=True)
class NM:
    """In every group of ``m`` consecutive elements along cols exactly ``n`` are kept."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise ConfigError(f"N:M pattern needs integers 0 < n < m, got n={self.n!r}, "
                              f"m={self.m!r}")


@dataclass(frozen=True)
class Blocks:
    """Whole ``rows x cols`` tiles of the ``[rows, cols]`` view are kept or pruned; edge
    tiles may be partial (see :func:`block_mask`)."""

    rows: int
    cols: int

    def __post_init__(self):
        for v in (self.rows, self.cols):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"block shape must be two ints >= 1, got "
                                  f"({self.rows!r}, {self.cols!r})")


# ---------------------------------------------------------------------------------------------
# Views


def as_rows_cols(w: torch.Tensor, name: str = "?") -> torch.Tensor:
    """``[rows, cols]`` view of ``w``: rows = ``w.shape[0]``, cols = the product of the rest
    (``[1, n]`` for 1-D). A view when ``w`` is contiguous, else a copy."""
    if not isinstance(w, torch.Tensor) or w.dim() == 0:
        raise ConfigError(f"tensor {name!r}: need a tensor with at least one dimension")
    if w.dim() == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], math.prod(w.shape[1:]))


def from_rows_cols(x: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`as_rows_cols`: reshape ``[rows, cols]`` back to ``shape``."""
    return x.reshape(tuple(shape))


def _scores2d(w: torch.Tensor, scores: torch.Tensor | None, name: str) -> torch.Tensor:
    w2 = as_rows_cols(w, name)
    if scores is None:
        if not (w.dtype.is_floating_point or w.dtype in (torch.int8, torch.int16, torch.int32,
                                                          torch.int64)):
            raise ConfigError(f"tensor {name!r}: cannot rank dtype {w.dtype}")
        s = w2.detach().abs()
    else:
        if not isinstance(scores, torch.Tensor) or scores.shape != w.shape:
            raise ConfigError(f"tensor {name!r}: scores must be a tensor of shape "
                              f"{tuple(w.shape)}, got "
                              f"{tuple(getattr(scores, 'shape', ())) or type(scores).__name__}")
        s = as_rows_cols(scores.detach(), name)
    s = s.to(torch.float64)
    if torch.isnan(s).any():
        raise NonFiniteWeightError(f"tensor {name!r}: NaN in the pruning scores")
    return s


def _check_sparsity(sparsity: float, name: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"tensor {name!r}: sparsity must be a number in [0, 1], got "
                          f"{sparsity!r}")
    return float(sparsity)


def _prune_lowest(s: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask over the last dim of s: prune the n_prune lowest, ties -> lower index first."""
    order = torch.sort(s, dim=-1, stable=True).indices
    keep = torch.ones_like(s, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n_prune], False)
    return keep


# ---------------------------------------------------------------------------------------------
# Masks


def magnitude_mask(w: torch.Tensor, sparsity: float, scope: str = "tensor", *,
                   scores: torch.Tensor | None = None, name: str = "?") -> torch.Tensor:
    """bool [w.shape]: prune the ``round(sparsity * count)`` lowest-scoring elements, with
    ``count`` = numel (``scope='tensor'``) or cols, separately in every row (``scope='row'``)."""
    sparsity = _check_sparsity(sparsity, name)
    s = _scores2d(w, scores, name)
    if scope == "tensor":
        keep = _prune_lowest(s.reshape(-1), round(sparsity * s.numel()))
    elif scope == "row":
        keep = _prune_lowest(s, round(sparsity * s.shape[1]))
    else:
        raise ConfigError(f"tensor {name!r}: scope must be 'tensor' or 'row', got {scope!r}")
    return keep.reshape(w.shape)


def nm_mask(w: torch.Tensor, n: int, m: int, *, scores: torch.Tensor | None = None,
            name: str = "?") -> torch.Tensor:
    """bool [w.shape]: in every group of ``m`` consecutive elements along cols keep the ``n``
    highest scores (the ``m - n`` lowest are pruned; ties: lower index pruned first).
    ``cols % m != 0`` raises :class:`FormatError` naming the tensor, cols and m."""
    NM(n, m)  # validates 0 < n < m
    s = _scores2d(w, scores, name)
    rows, cols = s.shape
    if cols % m:
        raise FormatError(f"tensor {name!r}: cols = {cols} (the reduction dimension of shape "
                          f"{tuple(w.shape)}) is not divisible by m = {m} of the {n}:{m} "
                          f"pattern")
    keep = _prune_lowest(s.reshape(rows, cols // m, m), m - n)
    return keep.reshape(w.shape)


def _block_view(s: torch.Tensor, br: int, bc: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad s [rows, cols] to whole tiles; return [nbr, nbc, br*bc] and the tile counts."""
    rows, cols = s.shape
    nbr, nbc = -(-rows // br), -(-cols // bc)
    p = torch.nn.functional.pad(s, (0, nbc * bc - cols, 0, nbr * br - rows))
    return p.reshape(nbr, br, nbc, bc).permute(0, 2, 1, 3).reshape(nbr, nbc, br * bc), nbr, nbc


def block_mask(w: torch.Tensor, sparsity: float, block: tuple[int, int] = (1, 4), *,
               scores: torch.Tensor | None = None, name: str = "?") -> torch.Tensor:
    """bool [w.shape]: tile the ``[rows, cols]`` view into ``block = (br, bc)`` tiles (square
    ``(b, b)`` or row-vector ``(1, b)``, any sizes work), score each by the L2 norm of its
    scores, and prune ``round(sparsity * ntiles)`` lowest tiles (ties: lower row-major tile
    index first).

    Partial edge tiles (``rows % br`` or ``cols % bc`` nonzero) are kept as tiles of their own
    and scored by the norm over the elements they have, as if zero-padded; with equal element
    magnitudes they therefore rank below full tiles. Counts are in tiles, partial ones
    included, so the element sparsity reached can differ slightly from ``sparsity``.
    """
    sparsity = _check_sparsity(sparsity, name)
    if not (isinstance(block, tuple) and len(block) == 2):
        raise ConfigError(f"tensor {name!r}: block must be a (rows, cols) tuple, got {block!r}")
    pattern = Blocks(*block)
    s = _scores2d(w, scores, name)
    rows, cols = s.shape
    tiles, nbr, nbc = _block_view(s, pattern.rows, pattern.cols)
    norms = tiles.square().sum(-1).sqrt().reshape(-1)
    keep_tiles = _prune_lowest(norms, round(sparsity * norms.numel())).reshape(nbr, nbc)
    keep = keep_tiles.repeat_interleave(pattern.rows, 0).repeat_interleave(pattern.cols, 1)
    return keep[:rows, :cols].reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Information content


def _h2(p: float) -> float:
    """Binary entropy in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def mask_entropy_bits(mask: torch.Tensor, pattern, name: str = "?") -> float:
    """Information content in bits of ``mask`` under ``pattern`` (the ideal cost of storing it):

    * :class:`Unstructured`: ``numel * H(density)``, the code length of this mask under an
      i.i.d. Bernoulli(density) model (``H`` = binary entropy);
    * :class:`NM`: ``groups * log2(C(m, n))``, every valid group equally likely; the mask must
      keep exactly ``n`` of every ``m`` (else :class:`FormatError`);
    * :class:`Blocks`: ``tiles * H(tile density)``; the mask must be constant on every tile
      (partial edge tiles included), else :class:`FormatError`.

    A 2:4 mask costs ``log2(6) / 4 = 0.646`` bits per weight.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ConfigError(f"tensor {name!r}: mask must be a torch.bool tensor")
    m2 = as_rows_cols(mask, name)
    if isinstance(pattern, Unstructured):
        numel = m2.numel()
        return 0.0 if numel == 0 else numel * _h2(int(m2.sum()) / numel)
    if isinstance(pattern, NM):
        rows, cols = m2.shape
        if cols % pattern.m:
            raise FormatError(f"tensor {name!r}: cols = {cols} of mask shape "
                              f"{tuple(mask.shape)} not divisible by m = {pattern.m}")
        kept = m2.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        if not torch.all(kept == pattern.n):
            raise FormatError(f"tensor {name!r}: mask is not {pattern.n}:{pattern.m} (a group "
                              f"keeps {int(kept[kept != pattern.n][0])})")
        return kept.numel() * math.log2(math.comb(pattern.m, pattern.n))
    if isinstance(pattern, Blocks):
        tiles, nbr, nbc = _block_view(m2.to(torch.int8), pattern.rows, pattern.cols)
        # A tile is constant iff its padded area matches all-kept or all-pruned on the
        # elements it really has; compare against the padded all-ones mask.
        present, _, _ = _block_view(torch.ones_like(m2, dtype=torch.int8), pattern.rows,
                                    pattern.cols)
        nkept = tiles.sum(-1)
        npresent = present.sum(-1)
        if not torch.all((nkept == 0) | (nkept == npresent)):
            raise FormatError(f"tensor {name!r}: mask is not constant on "
                              f"{pattern.rows}x{pattern.cols} tiles")
        ntiles = nbr * nbc
        return 0.0 if ntiles == 0 else ntiles * _h2(int((nkept > 0).sum()) / ntiles)
    raise ConfigError(f"tensor {name!r}: pattern must be Unstructured(), NM(n, m) or "
                      f"Blocks(rows, cols), got {pattern!r}")
