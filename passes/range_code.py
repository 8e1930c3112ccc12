"""``range_code`` (range-code lowering): T(w) becomes integer symbols, range coded in chunks.

Before::

    w = call_module[l2fx_weights.fc__weight]()    # TransformedWeight: fp32 w, learnable s, e

After::

    w = call_module[l2fx_weights.fc__weight]()    # CodedWeight: int8 codes, stored s, e

For each weight: the T parameters are rounded to their storage dtype, the symbols
``q = clamp(round(T(w)), -qmax, qmax)`` are computed with those stored values, a 16-bit
frequency table is built, and the symbols are range coded (constriction) in independently
decodable chunks of ``config.coding.chunk_size`` symbols with a CRC-32 each. The
``l2fx.coded`` entry holds the stream and the real byte counts; a layer with an activation
quantiser (``l2fx.act_quant``) stores it in its manifest entry (``act``), counted with it.

Pre: every site is a ``TransformedWeight``. Post: every site is a ``CodedWeight`` whose codes
decode from its stream; the compressed-parameter CR is within ``cr_tolerance`` of the target.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from l2fx import coding
from l2fx.accounting import bits_for_magnitude, layer_nbytes, manifest_entry, round_params
from l2fx.errors import PassError
from l2fx.ir import ActQuantIntent, CodedInfo, get_meta, set_meta, weight_sites
from l2fx.modules import CodedWeight, TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.transform import encode


class RangeCode(L2fxPass):
    name = "range_code"
    requires_weight_modules = (TransformedWeight, CodedWeight)

    def __init__(self, check_target: bool = True):
        # Baseline pipelines (fixed bit width, no allocation) reach whatever CR they reach.
        self.check_target = check_target

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        chunk_size = ctx.config.coding.chunk_size
        modified = False
        for i, (node, site) in enumerate(list(weight_sites(gm))):
            module = gm.get_submodule(str(node.target))
            if isinstance(module, CodedWeight):
                continue
            ctx.log(self.name, site.param)
            s, e, pdtype = round_params(module.kind, module.step_s, module.threshold_e)
            w = module.weight.detach()
            q = encode(w, module.kind, module.view(s.to(w.device)), module.view(e.to(w.device)), module.qmax).cpu()
            flat = q.reshape(-1).numpy().astype(np.int16)
            stream = coding.encode_symbols(flat, chunk_size=chunk_size)
            intent = get_meta(node, ActQuantIntent)
            act = intent.spec.to_dict() if intent is not None else None  # stored (and counted) in the entry
            lb = layer_nbytes(site.param, module.kind, site.shape, module.channel_axis, stream.table,
                              stream.payload_nbytes, chunk_size, s, e, module.group_size, act)
            entry = manifest_entry(site.param, module.kind, site.shape, module.channel_axis, stream.table.qmin,
                                   stream.table.freqs.size, stream.num_chunks, chunk_size, pdtype, module.group_size,
                                   act)
            coded = CodedWeight(q, module.kind, s, e, module.channel_axis, group_size=module.group_size).to(w.device)
            gm.add_submodule(str(node.target), coded)
            set_meta(node, CodedInfo(
                param=site.param, stream=stream, entry=entry, layer_bytes=lb,
                shannon_bits=coding.shannon_bits(flat), bits=bits_for_magnitude(int(q.abs().max()) if q.numel() else 0),
                sparsity=float((q == 0).float().mean()) if q.numel() else 0.0))
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        ctx = PassContext.current()
        fp32 = nbytes = 0
        for node, site in weight_sites(gm):
            info = get_meta(node, CodedInfo)
            if info is None or not isinstance(gm.get_submodule(str(node.target)), CodedWeight):
                self.fail("weight was not range coded", node)
            fp32 += 4 * site.numel
            nbytes += info.nbytes
        cr, target, tol = fp32 / nbytes, ctx.config.target_cr, ctx.config.cr_tolerance
        if self.check_target and abs(cr / target - 1) > tol:
            raise PassError(f"pass {self.name!r}: achieved compressed-parameter CR {cr:.3f} misses target "
                            f"{target} by more than {tol:.0%} (real bytes: {nbytes})")
