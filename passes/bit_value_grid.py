"""``bit_value_grid``: every compressed weight on SMOL's bit-value grid over its layer's range.

Before::

    w = get_attr[fc.weight]; y = linear(x, w, b)

After::

    w = call_module[l2fx_weights.fc__weight]()   # TransformedWeight: LINEAR, a unit per output channel
    y = linear(x, w, b)

The grid is laid over a range per cell of the weight's layout (the layer's granularity:
``CompileConfig.granularity``, or a ``layers`` rule's; per output channel by default, as for
every other method; :func:`l2fx.tparams.layout`): ``a = max|w|`` over the cell (default). A
per-tensor range is what the seed describes, but one range for a whole layer wastes the grid
on channels far smaller than the largest (a depthwise conv after batch-norm folding, a
transformer's projections). Measured with SMOL-L at CR 12, per tensor -> per channel: Lite0 KL
5.52 -> 4.18, MiniLM (with ``clip``) cosine 0.646 -> 0.645; on the Fashion-MNIST ResNet better at CR 8,
worse at 12 and 16 (``bench/results/smol_*.md``, ``docs/methods.md``). With ``clip``, each cell's range is
scaled by one factor per layer, the one of least weight MSE on the precision-p grid at the
target's bits per weight (:func:`l2fx.precision.clip_range` over the weights in units of their
cell's range; weights beyond it are clipped: finer cells for the bulk, the tails lost; measured
worse on the Fashion-MNIST ResNet, :class:`~l2fx.precision.SmolOptions` gives the figures). The
module holds the (clipped) weight and the symbol units ``a / (2^P - 1)``
(:func:`l2fx.precision.grid_unit`, rounded to their storage dtype), ``qmax = 2^P - 1``, marked
``fixed`` (no byte fit rescales it: ``smol_round`` owns the grid). At this point it rounds to
the finest grid (precision P); ``smol_precision`` learns the precisions, ``smol_round`` rounds
to them. P is the method option ``max_precision`` (:class:`l2fx.precision.SmolOptions`).

Pre: ``mark_weights`` ran; no ``layers`` rule fixes a layer's bits or format (SMOL chooses
every layer's grid), ``coding.qmax >= 2^P - 1``. Post: every site is a LINEAR
``TransformedWeight`` in its intent's layout with ``qmax = 2^P - 1``. Idempotent (a site already
transformed is left).
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
from l2fx.tparams import cell_amax, layout
from l2fx.transform import TransformKind, channel_view

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
            axis, group = layout(site, intent)
            amax = cell_amax(w, axis, group)
            if opts.clip:  # one factor per layer on the weights in units of their cell's range
                r = w / channel_view(torch.where(amax > 0, amax, torch.ones_like(amax)), w, axis, group)
                amax = amax * clip_range(r, opts.reference_precision(cfg.target_cr), opts.max_precision)
                lim = channel_view(amax, w, axis, group)
                w = w.clamp(-lim, lim)
            unit = grid_unit(amax, 1.0, opts.max_precision)
            s, e, _ = round_params(TransformKind.LINEAR, unit, 0.5 * unit)
            module = TransformedWeight(w, TransformKind.LINEAR, s, e, axis, qmax, group, fixed=True).to(w.device)
            replace_weight(gm, node, module, recompile=False)
            modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, site in weight_sites(gm):
            m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if not isinstance(m, TransformedWeight) or m.kind is not TransformKind.LINEAR:
                self.fail("weight is not a LINEAR TransformedWeight", node)
            if (m.channel_axis, m.group_size) != layout(site, get_meta(node, LayerIntent)):
                self.fail(f"weight's layout (axis {m.channel_axis}, group {m.group_size}) is not its intent's", node)
