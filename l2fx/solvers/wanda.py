"""Wanda (Sun et al., ICLR 2024) and magnitude pruning masks; no weight update.

Wanda's score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2`` (the norm of input feature ``j`` over
all calibration rows, Sun et al. Eq. 1), compared per output row (unstructured, the paper's
"per output" comparison group) or per group of ``M`` consecutive inputs of a row (N:M). The
lowest-scoring weights are pruned. ``input_sq_norms`` are ``||X_j||^2 = (X^T X)_jj``;
``diag(H) * n / 2`` works, and so does ``diag(H)`` itself: only the order of the scores matters.

Scores are compared in float64: ``|w| * c`` of float32 weights with a common float64 ``c`` keeps
every strict order of ``|w|`` (float64 has 29 more mantissa bits), so with all norms equal the
mask is exactly magnitude pruning's; in float32 two neighbouring magnitudes could tie.
"""
from __future__ import annotations

import torch
from torch import Tensor

from l2fx.errors import ConfigError, SolverError
from l2fx.solvers.hessian import check_layer, layer_loss
from l2fx.solvers.result import SolverResult
from l2fx.solvers._common import check_sparsity, pruned_count

__all__ = ["wanda_mask", "magnitude_mask", "wanda"]


def _mask_from_scores(score: Tensor, sparsity: float, prune_n: int, prune_m: int, per_row: bool,
                      layer: str) -> Tensor:
    rows, cols = score.shape
    nm = check_sparsity(sparsity, prune_n, prune_m, cols, layer)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if nm:
        g = score.reshape(rows, cols // prune_m, prune_m)
        idx = torch.topk(g, prune_m - prune_n, dim=2, largest=False, sorted=False).indices
        keep.view(rows, cols // prune_m, prune_m).scatter_(2, idx, False)
    elif per_row:
        k = pruned_count(sparsity, cols)
        if k:
            idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
            keep.scatter_(1, idx, False)
    else:
        k = pruned_count(sparsity, rows * cols)
        if k:
            idx = torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices
            keep.view(-1)[idx] = False
    return keep


@torch.no_grad()
def wanda_mask(W: Tensor, input_sq_norms: Tensor, *, sparsity: float = 0.5, prune_n: int = 0,
               prune_m: int = 0, layer: str = "?") -> Tensor:
    """Wanda's mask (bool ``[rows, cols]``, True = kept). Unstructured: exactly
    ``round(sparsity * cols)`` pruned in every row; N:M: exactly ``prune_n`` kept of every
    ``prune_m`` consecutive columns (``cols % prune_m != 0`` is a SolverError)."""
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ConfigError(f"layer {layer!r}: W must be a 2-D tensor")
    cols = W.shape[1]
    if not isinstance(input_sq_norms, Tensor) or input_sq_norms.shape != (cols,):
        raise ConfigError(f"layer {layer!r}: input_sq_norms must be a tensor [{cols}], got "
                          f"{tuple(getattr(input_sq_norms, 'shape', ()))}")
    if bool((input_sq_norms < 0).any()) or not bool(torch.isfinite(input_sq_norms).all()):
        raise ConfigError(f"layer {layer!r}: input_sq_norms must be finite and >= 0")
    score = W.detach().double().abs() * input_sq_norms.detach().double().sqrt()[None, :]
    return _mask_from_scores(score, sparsity, prune_n, prune_m, True, layer)


@torch.no_grad()
def magnitude_mask(W: Tensor, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
                   per_row: bool = False, block: int = 1, layer: str = "?") -> Tensor:
    """Magnitude pruning's mask (True = kept): the smallest ``|w|`` of the layer
    (``per_row=False``, exactly ``round(sparsity * rows * cols)`` pruned), of each row, or of each
    N:M group. ``block=4`` (with ``sparsity``, per layer or per row): 4-blocks of consecutive
    columns scored by their squared norm, exactly ``round(sparsity * blocks)`` pruned whole."""
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ConfigError(f"layer {layer!r}: W must be a 2-D tensor")
    if isinstance(block, bool) or block not in (1, 4):
        raise ConfigError(f"layer {layer!r}: block must be 1 or 4, got {block!r}")
    if block == 1:
        return _mask_from_scores(W.detach().double().abs(), sparsity, prune_n, prune_m, per_row, layer)
    rows, cols = W.shape
    if prune_n or prune_m:
        raise ConfigError(f"layer {layer!r}: N:M sparsity works on single weights (block=1)")
    if cols % block:
        raise SolverError(f"layer {layer!r}: block={block} needs cols divisible by {block}, the layer has {cols}")
    score = W.detach().double().square().reshape(rows, cols // block, block).sum(dim=2)
    keep = _mask_from_scores(score, sparsity, 0, 0, per_row, layer)
    return keep.repeat_interleave(block, dim=1)


@torch.no_grad()
def wanda(W: Tensor, H: Tensor, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
          layer: str = "?") -> SolverResult:
    """Wanda as a solver: the mask from ``diag(H)``, ``w_hat = W * mask``, and its loss."""
    check_layer(W, H, layer)
    mask = wanda_mask(W, H.diagonal().clamp(min=0), sparsity=sparsity, prune_n=prune_n, prune_m=prune_m,
                      layer=layer)
    w_hat = (W.to(torch.float32) * mask).contiguous()
    return SolverResult(w_hat=w_hat, symbols=None, mask=mask, loss=layer_loss(W, w_hat, H))
