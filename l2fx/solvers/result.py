"""The value every layer-wise solver returns.

A solver sees one layer: its weight ``W`` ``[rows, cols]`` and the Hessian ``H = 2 X^T X / n``
``[cols, cols]`` of its calibration inputs, and returns a :class:`SolverResult`. The loss is the
layer's reconstruction loss ``tr((W - W_hat) H (W - W_hat)^T)`` (see
:func:`l2fx.solvers.hessian.layer_loss`), measured with the undamped ``H`` the solver was given.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from l2fx.errors import ConfigError

__all__ = ["SolverResult"]


@dataclasses.dataclass(frozen=True, eq=False)
class SolverResult:
    """What a solver made of one layer.

    * ``w_hat``: float32 ``[rows, cols]``, the compressed weight, in the caller's column order.
    * ``symbols``: int16 ``[rows, cols]`` or None. Set by the quantising solvers; then
      ``w_hat == grid.decode(symbols)`` bit for bit, with the grid in ``extra["grid"]`` when the
      solver changed it (AdaQuant), else the grid it was given.
    * ``mask``: bool ``[rows, cols]`` or None, True = weight kept. Set by the pruning solvers;
      ``w_hat`` is 0 wherever ``mask`` is False.
    * ``loss``: ``tr((W - w_hat) H (W - w_hat)^T)`` in float64 with the undamped ``H``.
    * ``extra``: solver-specific facts (documented by each solver), e.g. the act-order permutation.
    """

    w_hat: Tensor
    symbols: Tensor | None
    mask: Tensor | None
    loss: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.w_hat, Tensor) or self.w_hat.dim() != 2 or self.w_hat.dtype != torch.float32:
            raise ConfigError("SolverResult.w_hat must be a 2-D float32 tensor")
        shape = self.w_hat.shape
        if self.symbols is not None and (self.symbols.dtype != torch.int16 or self.symbols.shape != shape):
            raise ConfigError(f"SolverResult.symbols must be int16 of shape {tuple(shape)}")
        if self.mask is not None and (self.mask.dtype != torch.bool or self.mask.shape != shape):
            raise ConfigError(f"SolverResult.mask must be bool of shape {tuple(shape)}")
        if not isinstance(self.loss, float) or math.isnan(self.loss):
            raise ConfigError(f"SolverResult.loss must be a float (not NaN), got {self.loss!r}")

    @property
    def sparsity(self) -> float:
        """Fraction of weights the mask removes (0.0 without a mask)."""
        if self.mask is None:
            return 0.0
        return 1.0 - self.mask.float().mean().item()
