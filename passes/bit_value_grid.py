"""``bit_value_grid``: every compressed weight on SMOL's bit-value grid over its layer's range.

Before::

    w = get_attr[fc.weight]; y = linear(x, w, b)

After::

    w = call_module[l2fx_weights.fc__weight]()   # TransformedWeight: LINEAR, one unit per tensor
    y = linear(x, w, b)

The layer's range ``a`` is ``max|w|`` (default), or with ``clip`` the range of least weight MSE
on the precision-p grid at the target's bits per weight (:func:`l2fx.precision.clip_range`;
weights beyond it are clipped: finer cells for the bulk, the tails lost; measured worse on the
Fashion-MNIST ResNet, :class:`~l2fx.precision.SmolOptions` gives the figures). The module holds the (clipped) weight and the symbol unit ``a / (2^P - 1)``
(:func:`l2fx.precision.grid_unit`, rounded to its storage dtype), ``qmax = 2^P - 1``, marked
``fixed`` (no byte fit rescales it: ``smol_round`` owns the grid). At this point it rounds to
the finest grid (precision P); ``smol_precision`` learns the precisions, ``smol_round`` rounds
to them. P is the method option ``max_precision`` (:class:`l2fx.precision.SmolOptions`).

Pre: ``mark_weights`` ran; no ``layers`` rule fixes a layer's bits or format (SMOL chooses
every layer's grid), ``coding.qmax >= 2^P - 1``. Post: every site is a per-tensor LINEAR
``TransformedWeight`` with ``qmax = 2^P - 1``. Idempotent (a site already transformed is left).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from l2fx.accounting import round_params
from l2fx.errors import ConfigError
from l2fx.ir import LayerIntent, fetch_attr, get_meta, replace_weight, weight_sites
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.precision import SmolOptions, clip_range, grid_unit
from l2fx.transform import TransformKind

__all__ = ["BitValueGrid"]


class BitValueGrid(L2fxPass):
    name = "bit_value_grid"
    requires_meta = (LayerIntent,)

    def __init__(self, per_layer: bool = False):
        self.per_layer = per_layer

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = PassContext.current().config
        opts = SmolOptions.from_pairs(cfg.method_options, self.per_layer)
        qmax = 2 ** opts.max_precision - 1
        if cfg.coding.qmax < qmax:
            raise ConfigError(f"smol: max_precision {opts.max_precision} needs coding.qmax >= {qmax}, "
                              f"got {cfg.coding.qmax}")
        modified = False
        for node, site in list(weight_sites(gm)):
            if node.op != "get_attr":
                continue
            intent = get_meta(node, LayerIntent)
            if intent.bits is not None or intent.format is not None:
                raise ConfigError(f"smol: layer {site.param!r} has a layers rule fixing its "
                                  f"{'bits' if intent.bits is not None else 'format'}; SMOL learns every layer's "
                                  f"precision (keep such layers out with a rule that leaves them uncompressed)")
            w = fetch_attr(gm, str(node.target)).detach().float()
            amax = float(w.abs().max())
            if opts.clip:
                amax = clip_range(w, opts.reference_precision(cfg.target_cr), opts.max_precision)
                w = w.clamp(-amax, amax)
            unit = torch.tensor([grid_unit(amax, 1.0, opts.max_precision)])
            s, e, _ = round_params(TransformKind.LINEAR, unit, 0.5 * unit)
            module = TransformedWeight(w, TransformKind.LINEAR, s, e, None, qmax, fixed=True).to(w.device)
            replace_weight(gm, node, module, recompile=False)
            modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if (not isinstance(m, TransformedWeight) or m.kind is not TransformKind.LINEAR
                    or m.channel_axis is not None):
                self.fail("weight is not a per-tensor LINEAR TransformedWeight", node)
