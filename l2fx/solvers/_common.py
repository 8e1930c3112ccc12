"""Argument checks the solvers share (sparsity requests, block sizes)."""
from __future__ import annotations

import math

from l2fx.errors import ConfigError, SolverError


def check_blocksize(blocksize: int, layer: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ConfigError(f"layer {layer!r}: blocksize must be a positive int, got {blocksize!r}")


def check_sparsity(sparsity: float, prune_n: int, prune_m: int, cols: int, layer: str) -> bool:
    """Validate a sparsity request; return True for N:M. N:M needs ``cols % M == 0``."""
    for v, name in ((prune_n, "prune_n"), (prune_m, "prune_m")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"layer {layer!r}: {name} must be an int >= 0, got {v!r}")
    if prune_m or prune_n:
        if not 0 < prune_n < prune_m:
            raise ConfigError(f"layer {layer!r}: N:M sparsity needs 0 < prune_n < prune_m "
                              f"(prune_n weights kept of every prune_m), got {prune_n}:{prune_m}")
        if cols % prune_m:
            raise SolverError(f"layer {layer!r}: N:M sparsity prune_m={prune_m} needs cols divisible by "
                              f"{prune_m}, the layer has {cols} columns; give that layer another pattern with a "
                              f"rule, e.g. LayerRule(<its module's name>, options=(('prune_n', 0), ('prune_m', 0))) "
                              f"(unstructured) or keep=True (not compressed), or leave every such layer dense with "
                              f"method_options=(('nm_unfit', 'dense'),)")
        return True
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"layer {layer!r}: sparsity must be a float in [0, 1], got {sparsity!r}")
    return False


def pruned_count(sparsity: float, n: int) -> int:
    """``round(sparsity * n)`` (half up): how many of ``n`` weights a sparsity prunes."""
    return int(math.floor(sparsity * n + 0.5))
