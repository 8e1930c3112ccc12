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

from l2fx.accounting import FP16_MAX
from l2fx.config import PlainDtype
from l2fx.ir import weight_sites
from l2fx.pipeline import L2fxPass, PassContext, PassResult


def fits_fp16(t: torch.Tensor) -> bool:
    """Whether float16 holds ``t``: every value within its range, and the rounding error's RMS
    within 2^-10 of the tensor's RMS. Normal float16 numbers err by at most 2^-11 relative, so
    only a tensor whose values lie mostly below float16's normal range (6.1e-5) fails the
    second test: biases of a model at 1e-7 scale lost their digits to subnormals (relative
    output error 6e4 before any weight was compressed), while a tensor at unit scale with a
    few tiny entries passes, as it should."""
    a = t.detach().float()
    if a.numel() == 0:
        return True
    if float(a.abs().max()) > FP16_MAX:
        return False
    err = (a - a.to(torch.float16).float()).pow(2).mean()
    return bool(err <= a.pow(2).mean() * 2.0 ** -20)


@torch.no_grad()
def round_to_fp16(t: torch.Tensor) -> bool:
    """Rounds ``t`` in place to float16-representable values when they fit float16's range;
    returns whether it did (otherwise the tensor is stored as float32, unchanged)."""
    if not fits_fp16(t):
        return False
    t.copy_(t.to(torch.float16).to(t.dtype))
    return True


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
