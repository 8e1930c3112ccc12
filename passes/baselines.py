"""Baselines in the same harness and byte accounting (issue: compare L2 against them).

``round_to_nearest``: per output channel, step ``s_c = max|w_c| / (2^(b-1) - 1)``, symbols
``round(w / s_c)`` (the classic RTN int-b quantiser), optionally after magnitude pruning of the
``prune_fraction`` smallest weights of each layer (sparsity before quantisation, the order the
sparsity x quantisation study finds best). Its symbols are then range coded by ``range_code``
exactly like L2's, so the CR it reaches is measured the same way.

Pre: ``mark_weights`` ran. Post: every site is a ``TransformedWeight`` of the LINEAR kind.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from l2fx.errors import ConfigError
from l2fx.ir import fetch_attr, replace_weight, weight_sites
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.transform import TransformKind


class RoundToNearest(L2fxPass):
    name = "round_to_nearest"

    def __init__(self, bits: int, prune_fraction: float = 0.0):
        if not 2 <= bits <= 8:
            raise ConfigError(f"RTN bits must be in 2..8, got {bits}")
        if not 0.0 <= prune_fraction < 1.0:
            raise ConfigError(f"prune_fraction must be in [0, 1), got {prune_fraction}")
        self.bits, self.prune_fraction = bits, prune_fraction

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        qmax = 2 ** (self.bits - 1) - 1
        for node, site in list(weight_sites(gm)):
            w = fetch_attr(gm, str(node.target)).detach().float().clone()
            if self.prune_fraction > 0:
                k = int(self.prune_fraction * w.numel())
                if k > 0:
                    cut = w.abs().reshape(-1).kthvalue(k).values
                    w[w.abs() <= cut] = 0.0
            dims = [d for d in range(w.dim()) if d != site.channel_axis]
            amax = w.abs().amax(dim=dims) if dims else w.abs()
            step = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
            module = TransformedWeight(w, TransformKind.LINEAR, step, 0.5 * step, site.channel_axis,
                                       min(qmax, PassContext.current().config.coding.qmax))
            replace_weight(gm, node, module, recompile=False)
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if not isinstance(m, TransformedWeight) or m.kind is not TransformKind.LINEAR:
                self.fail("weight is not a LINEAR TransformedWeight", node)
