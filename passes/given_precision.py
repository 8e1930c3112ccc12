"""``given_precision``: the precisions of a SMOL run made outside the pipeline, installed as if
``smol_precision`` had learned them.

Training-aware SMOL (:func:`l2fx.smol.train`) learns every precision with the task loss over
whole epochs, not block by block on calibration inputs; what the artifact needs from it is the
same as from ``smol_precision``: per weight, the continuous precision ``p >= 1`` (the weight's
shape, or ``[1]`` per layer) and the range the grid is laid over (``max|w|`` per cell of the
weight's layout, in the layout's shape, or one number for every cell). This pass
takes them by parameter name and sets each weight's :class:`~l2fx.precision.LearnedPrecision`;
``smol_round`` then rounds, fits the bytes and codes as for post-training SMOL.

Pre: every weight a ``TransformedWeight`` of ``bit_value_grid``; ``precisions`` names exactly
the compressed weights (an unknown or missing name, a precision of the wrong shape, not finite
or below 1, or a weight outside the given range is a ConfigError naming the layer). Post: as
``smol_precision``'s (:func:`l2fx.precision.check_learned_precisions`).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.fx as fx

from l2fx.errors import ConfigError
from l2fx.ir import set_meta, weight_sites
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassResult
from l2fx.precision import LearnedPrecision, check_learned_precisions

__all__ = ["GivenPrecision"]


class GivenPrecision(L2fxPass):
    name = "given_precision"
    requires_weight_modules = (TransformedWeight,)

    def __init__(self, precisions: Mapping[str, tuple[torch.Tensor, float | torch.Tensor]], per_layer: bool = False):
        if not isinstance(precisions, Mapping):
            raise ConfigError(f"given_precision: precisions must map parameter names to (precision, amax), "
                              f"got {type(precisions).__name__}")
        self.precisions = dict(precisions)
        self.per_layer = per_layer

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = list(weight_sites(gm))
        names = {site.param for _, site in sites}
        unknown = sorted(set(self.precisions) - names)
        if unknown:
            raise ConfigError(f"given_precision: {unknown[:4]} are not compressed weights of this graph "
                              f"(those are {sorted(names)[:6]}{' ...' if len(names) > 6 else ''})")
        for node, site in sites:
            if site.param not in self.precisions:
                raise ConfigError(f"given_precision: no precision given for layer {site.param!r}")
            p, amax = self.precisions[site.param]
            m = gm.get_submodule(str(node.target))
            want = (1,) if self.per_layer else tuple(m.weight.shape)
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != want:
                raise ConfigError(f"given_precision: layer {site.param!r} needs a precision tensor of shape {want}, "
                                  f"got {tuple(getattr(p, 'shape', ())) or type(p).__name__}")
            p = p.detach().float().cpu().contiguous()
            if not (bool(torch.isfinite(p).all()) and bool((p >= 1.0).all())):
                raise ConfigError(f"given_precision: layer {site.param!r}: precisions must be finite and >= 1")
            set_meta(node, LearnedPrecision(p.to(m.weight.device), self._range(site.param, amax, m), self.per_layer))
        return PassResult(gm, True)

    @staticmethod
    def _range(param: str, amax, m: TransformedWeight) -> torch.Tensor:
        """The given range as a tensor of the weight's layout, checked to hold its weights."""
        if isinstance(amax, (int, float)) and not isinstance(amax, bool):
            amax = torch.full(m.step_s.shape, float(amax))
        if not isinstance(amax, torch.Tensor) or amax.numel() != m.step_s.numel():
            raise ConfigError(f"given_precision: layer {param!r} needs a range as a number or a tensor of "
                              f"{m.step_s.numel()} elements (its layout {tuple(m.step_s.shape)}), got "
                              f"{tuple(amax.shape) if isinstance(amax, torch.Tensor) else type(amax).__name__}")
        amax = amax.detach().float().reshape(m.step_s.shape).to(m.weight.device).contiguous()
        held = bool(torch.isfinite(amax).all()) and not bool((m.weight.detach().abs() > m.view(amax)).any())
        if not held:
            raise ConfigError(f"given_precision: layer {param!r}: range does not hold its weights "
                              f"(max|w| = {float(m.weight.detach().abs().max()):.6g})")
        return amax

    def ensures(self, gm: fx.GraphModule) -> None:
        check_learned_precisions(gm, self.fail)
