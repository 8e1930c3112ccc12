"""``assign_format``: every weight no ``layers`` rule names is stored in one block format.

The baseline "this model in MXFP4 (or MXFP8, MXINT8, HBFP ...)": each such weight gets the
intent a ``LayerRule(pattern, format=...)`` would give it (:func:`l2fx.tparams.format_intent`:
blocks of the format along the rows, the spec's scales, the format's element codes), so the
shared passes after it (one candidate per curve, no rescaling, range coding) store it exactly as
the format quantises it and count every byte. Weights a rule names keep the rule's intent.

Pre: ``mark_weights`` ran. Post: every site whose intent has no rule has ``format`` set to the
pass's format.
"""
from __future__ import annotations

import torch.fx as fx

from l2fx.errors import ConfigError
from l2fx.ir import LayerIntent, get_meta, set_meta, weight_sites
from l2fx.pipeline import L2fxPass, PassResult
from l2fx.tparams import format_intent
from l2fx.transform import FORMAT_KINDS, TransformKind

__all__ = ["AssignFormat"]


class AssignFormat(L2fxPass):
    name = "assign_format"
    requires_meta = (LayerIntent,)

    def __init__(self, fmt: TransformKind | str):
        if fmt not in FORMAT_KINDS:
            raise ConfigError(f"assign_format: {fmt!r} is not a block format; known: "
                              f"{[k.value for k in FORMAT_KINDS]}")
        self.format = TransformKind(fmt)

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node, _ in weight_sites(gm):
            intent = get_meta(node, LayerIntent)
            if intent.rule is None and intent.format != self.format.value:
                set_meta(node, format_intent(self.format, intent.options))
                modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            intent = get_meta(node, LayerIntent)
            if intent.rule is None and intent.format != self.format.value:
                self.fail(f"weight is not in {self.format.value}", node)
