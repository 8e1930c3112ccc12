"""``mark_weights``: find the weights l2fx compresses and attach a :class:`WeightSite` to each.

A weight is compressed when it is a floating-point ``get_attr`` read as the weight of an op
in :data:`l2fx.ir.WEIGHTED_OPS` (Linear, Conv1d/2d, Embedding), only as weights, with at
least ``config.min_numel`` elements (smaller tensors cost more in tables than they save;
they are stored plainly). Embedding tables are skipped when ``compress_embeddings`` is off.

A table read both by an embedding and by a linear op (tied input/output embeddings: a
transformers ``lm_head.weight is embed_tokens.weight``) is one site of the linear family,
per-channel along the linear's output axis (one step per vocabulary row, as an untied
``lm_head`` gets): the logits are where its error lands, and the gather only copies rows.
It is recorded in ``records["mark_weights"]["tied_embedding_linear"]``. Before, such a table
was left plain (families differ): SmolLM2-135M's 28.3 M-weight tied table (21 % of the model)
sat in float16 at "CR 8", which left the other layers about 0.8 bits per weight.

Each site also gets its :class:`~l2fx.ir.LayerIntent` (``l2fx.intent``): the global config's
transform and layout, overridden by the first ``CompileConfig.layers`` rule matching the weight;
a weight a rule keeps is not a site (it stays a plain tensor, recorded as ``kept_by_rule``).

Pre: ``normalize`` ran. Post: at least one node carries ``l2fx.site``, and every site an
``l2fx.intent``; no two get_attr nodes read the same tensor; every parameter is finite (else
NonFiniteWeightError naming it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from l2fx.errors import NoCompressibleLayersError, NonFiniteWeightError
from l2fx.config import CompileConfig, LayerRule
from l2fx.ir import LayerIntent, WeightSite, fetch_attr, set_meta, weight_consumers, weight_sites
from l2fx.tparams import format_intent
from l2fx.transform import TransformKind
from l2fx.pipeline import L2fxPass, PassContext, PassResult


def intent_of(cfg: CompileConfig, rule: LayerRule | None) -> LayerIntent:
    """The weight's intent: the rule's fields where it sets them, the global config's elsewhere."""
    def pick(name: str, default: Any) -> Any:
        value = getattr(rule, name) if rule is not None else None
        return default if value is None else value

    bits = rule.bits if rule is not None else None
    fmt = rule.format if rule is not None else None
    if fmt is not None:  # the format's blocks: per group of its block size, along the rows
        return format_intent(fmt, rule.options, cfg.layers.index(rule))
    kind = TransformKind.LINEAR if bits is not None else pick("kind", cfg.transform)
    return LayerIntent(kind=TransformKind(kind).value, granularity=pick("granularity", cfg.granularity).value,
                       group_size=pick("group_size", cfg.group_size), bits=bits,
                       options=rule.options if rule is not None else (),
                       rule=cfg.layers.index(rule) if rule is not None else None)


class MarkWeights(L2fxPass):
    name = "mark_weights"

    def requires(self, gm: fx.GraphModule) -> None:
        for name, t in gm.state_dict().items():
            if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
                raise NonFiniteWeightError(f"parameter {name!r} holds NaN or inf values")

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = PassContext.current().config
        # One get_attr per tensor, so that a tied weight is one site.
        first: dict[str, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.op != "get_attr":
                continue
            target = str(node.target)
            if target in first:
                node.replace_all_uses_with(first[target])
                gm.graph.erase_node(node)
            else:
                first[target] = node
        kept: list[str] = []
        tied: list[str] = []
        for target, node in first.items():
            tensor = fetch_attr(gm, target)
            consumers = weight_consumers(node)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or not consumers:
                continue
            if len(consumers) != len(node.users):
                continue  # also read as something other than a weight: keep it exact
            families = {op.family for _, op in consumers}
            axes = {op.channel_axis for _, op in consumers}
            if families == {"embedding", "linear"}:  # tied embeddings: compressed as the output projection
                if not cfg.compress_embeddings:
                    continue
                families, axes = {"linear"}, {op.channel_axis for _, op in consumers if op.family == "linear"}
                tied.append(target)
            if len(families) != 1 or len(axes) != 1 or tensor.numel() < cfg.min_numel:
                continue
            family = families.pop()
            if family == "embedding" and not cfg.compress_embeddings:
                continue
            rule = cfg.rule_for(target)
            if rule is not None and rule.keep:
                kept.append(target)
                continue
            set_meta(node, WeightSite(param=target, family=family, channel_axis=axes.pop(), shape=tuple(tensor.shape)))
            set_meta(node, intent_of(cfg, rule))
        PassContext.current().records[self.name] = {"kept_by_rule": kept, "tied_embedding_linear": tied}
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            if LayerIntent.META_KEY not in node.meta:
                self.fail("compressed weight without an l2fx.intent", node)
        if not any(True for _ in weight_sites(gm)):
            raise NoCompressibleLayersError(
                "the model has no Conv/Linear/Embedding weight l2fx can compress "
                "(floating point, >= min_numel elements, read only as a weight)")
