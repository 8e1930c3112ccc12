"""The stored T parameter vectors of a layer: one per tensor, per output channel (or per group).

A per-tensor candidate ``(step_s, threshold_e)`` of sensitivity analysis becomes the stored
vector of the layer's granularity, either as is (one step for every channel) or scaled per
channel by the channel's range (:func:`channel_ratio`: every channel keeps the same relative
precision). Shared by ``sensitivity_analysis`` (which measures both) and ``insert_transforms``
(which installs the one allocated).
"""
from __future__ import annotations

import torch

from l2fx.config import CompileConfig, Granularity
from l2fx.ir import WeightSite

__all__ = ["channel_ratio", "stored_vector"]


def channel_ratio(w: torch.Tensor, site: WeightSite) -> torch.Tensor:
    """r_c = max|w_c| / max|w| per channel (1 for an all-zero channel), shape [C]."""
    dims = [d for d in range(w.dim()) if d != site.channel_axis % w.dim()]
    amax_c = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
    amax = amax_c.max().clamp_min(1e-30)
    return torch.where(amax_c > 0, (amax_c / amax).clamp_min(1e-4), torch.ones_like(amax_c)).float()


def stored_vector(value: float, site: WeightSite, cfg: CompileConfig, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """The stored parameter vector: one value per channel ([C]) or per tensor ([1])."""
    if ratio is not None:
        return float(value) * ratio
    n = site.channels if cfg.granularity is Granularity.PER_CHANNEL else 1
    return torch.full((n,), float(value))
