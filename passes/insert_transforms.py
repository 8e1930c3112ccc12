"""``insert_transforms`` (joint T-insertion): each compressed weight becomes T^-1(round(T(w))).

Before::

    w = get_attr[features.0.weight]; y = conv2d(x, w, b, ...)

After::

    w = call_module[l2fx_weights.features__0__weight]()   # TransformedWeight (Eq. 11-13)
    y = conv2d(x, w, b, ...)

The module holds a copy of the fp32 weight and learnable per-channel (or per-tensor)
``step_s``/``threshold_e`` initialised from the allocation; the fp32 tensor leaves the
model's state. Pre: every site has an ``l2fx.allocation``. Post: every site is produced by a
``TransformedWeight``; no site is a get_attr. Idempotent (a site already transformed is left).
"""
from __future__ import annotations

import torch.fx as fx

from l2fx.ir import Allocation, LayerIntent, fetch_attr, get_meta, replace_weight, weight_sites
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.tparams import allocated_params, fixed_qmax, layout
from l2fx.transform import TransformKind


class InsertTransforms(L2fxPass):
    name = "insert_transforms"
    requires_meta = (Allocation, LayerIntent)

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = PassContext.current().config
        modified = False
        for node, site in list(weight_sites(gm)):
            if node.op != "get_attr":
                continue
            alloc = get_meta(node, Allocation)
            w = fetch_attr(gm, str(node.target)).detach()
            intent = get_meta(node, LayerIntent)
            axis, group = layout(site, intent)
            step, threshold = allocated_params(w, site, intent, alloc.step_s, alloc.threshold_e, alloc.channel_scaled)
            module = TransformedWeight(
                w, TransformKind(alloc.kind), step, threshold, axis, fixed_qmax(intent) or cfg.coding.qmax, group,
                fixed=intent.bits is not None or intent.format is not None).to(w.device)
            replace_weight(gm, node, module, recompile=False)
            modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), TransformedWeight):
                self.fail("compressed weight is not produced by a TransformedWeight", node)
