"""``plain_storage``: round every tensor that is not range coded to its storage dtype.

Biases, norms and small weights are stored "plainly" (``config.plain_dtype``): as float16
when float16 holds them (:func:`fits_fp16`: range, and no precision lost to subnormals), else as float32. Rounding them here, before any
measurement, means sensitivity, reconstruction and the final model all see the values the
artifact will hold, and a loaded model reproduces the compiled one bit for bit.

Pre: ``mark_weights`` ran (sites are known and are left alone). Post: every floating-point
tensor outside the sites is float16-representable or recorded as kept in float32. Idempotent.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from l2fx.accounting import round_to_fp16
from l2fx.config import PlainDtype
from l2fx.ir import weight_sites
from l2fx.pipeline import L2fxPass, PassContext, PassResult


class PlainStorage(L2fxPass):
    name = "plain_storage"

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        if ctx.config.plain_dtype is PlainDtype.FLOAT32:
            return PassResult(gm, False)
        sites = {site.param for _, site in weight_sites(gm)}
        kept = []
        for name, t in gm.state_dict(keep_vars=True).items():
            if name in sites or not t.is_floating_point() or t.dtype == torch.float16:
                continue
            if not round_to_fp16(t):
                kept.append(name)
        ctx.records[self.name] = {"kept_float32": kept}
        return PassResult(gm, True)
