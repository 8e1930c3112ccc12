"""``compound_plan``: each weight's option (by default the seed's {dense, 2:4} x {8, 4} bits;
``bop_options`` offers others: 6/3 bits, N:M, 4-blocks), chosen by a dynamic program over
per-layer error tables under a global BOP-reduction target (OBC appendix A.10).

Before: weights marked (``l2fx.site`` + ``l2fx.intent``, allocated grids), still ``get_attr`` s.
After: every weight's ``l2fx.intent`` fixes its grid (``bits`` of its option: RTN steps
``max|w_c| / (2^(bits-1) - 1)`` per channel or group, LINEAR, never rescaled) and carries the
one-shot options of its pattern (``prune_n``/``prune_m``, ``sparsity`` with ``block`` 4, or none
pruned), which ``oneshot_solve`` then applies; nothing else changes.

1. :func:`l2fx.layerwise.model_hessians`: the uncompressed model over the calibration set
   (one batch's activations at a time): every linear/conv weight's input Hessian and its MACs
   per sample. The tables are OBC's independent setting: each layer on the fp32 model's inputs.
   With w+a options (``dense-w8a8`` ...: :mod:`l2fx.activations`), first each layer's input
   quantiser per offered activation width (:func:`~l2fx.layerwise.input_histograms`, then
   :func:`~l2fx.activations.fit_spec`), and the Hessians of the quantised inputs as well.
2. Per weight and option, the layer loss ``tr(dW H dW^T)`` of the pass's recipe on that grid
   (``obc-compound``: OBQ dense, OBS 2:4 then OBQ; ``adaprune+adaquant-compound``: the
   baseline; 4-blocks: OBS of whole blocks / magnitude-of-block AdaPrune) and its BOPs
   ``MACs x density x weight bits x 32`` (density N/M, or 1 - the 4-block sparsity: BOPs assume
   a runtime that skips pruned blocks; l2fx's does not, it decodes them as zeros) x the
   option's activation bits (32: fp32). A w+a option is solved on its quantised inputs'
   Hessian and its entry is the measured joint loss ``2/N sum ||W x - W_hat q(x)||^2``
   (:func:`~l2fx.layerwise.joint_errors`, one pass over the calibration set for every layer).
3. :func:`l2fx.solvers.compound.choose_options`: the least summed loss whose BOPs are within
   ``dense fp32 BOPs / bop_reduction``, exact on costs rounded up to ``budget / bop_resolution``.

Options (``CompileConfig.method_options``): ``bop_reduction`` (required, > 1: the BOP reduction
against the dense fp32 model), ``bop_resolution`` (DP units, default 10000), ``bop_options``
(option names replacing the seed's four, :meth:`~l2fx.solvers.compound.Option.parse`:
``dense-w<b>``, ``<N>:<M>-w<b>``, ``4block<percent pruned>-w<b>``, bits 2..8), ``bop_formats``
(block formats offered to every layer as dense options, e.g. ``["mxfp4_e2m1", "mxfp8_e4m3"]``:
BOPs at their element bits, error of the spec's quantisation, stored as a ``layers`` rule's
``format=`` stores it; ``oneshot_solve`` rounds them to nearest, recorded as a fallback), and
the recipe's.
Layers that cannot take an option are recorded with the reason, never skipped silently: N:M
and 4-blocks need the column count to be a multiple of M (4) (else those options are not offered); a weight read by no linear/conv
op has no MACs and no Hessian (an embedding: dense 8-bit, outside the BOP count); a layer kept
uncompressed (a ``layers`` rule's ``keep``) counts as dense fp32 BOPs, one whose bits a rule
fixes counts its BOPs at those bits, dense. A block-format rule is a ConfigError (its grid is
not an option here), and so are T parameters along an axis other than the output rows. A
target the options cannot reach is a TargetCRError naming the range.

Pre: ``mark_weights`` ran; calibration data. Post: every site's intent has ``bits`` or a
block ``format`` and a ``compound_plan.choice`` (:class:`CompoundChoice`; a graph whose every
site has one is left unchanged, so the pass is idempotent); a site whose option quantises
activations, and only such a site, has ``l2fx.act_quant`` (its quantiser, which
``insert_act_quant`` then puts on the ops' inputs); the tables and the plan in
``ctx.records["compound_plan"]``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
import torch.fx as fx

from l2fx.accounting import round_params
from l2fx.errors import ConfigError, TargetCRError
from l2fx.activations import fit_spec
from l2fx.ir import ActQuantIntent, LayerIntent, fetch_attr, get_meta, meta_entry, set_meta, weight_sites
from l2fx.layerwise import input_histograms, joint_errors, model_hessians
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.solvers import Grid
from l2fx.solvers.compound import ACT_BITS, OPTIONS, Option, choose_options, format_loss, option_bops
from l2fx.solvers.recipes import RECIPES, options_for, solve
from l2fx.tparams import format_intent, layout, scale_ratio, stored_vector
from l2fx.transform import TransformKind

__all__ = ["CompoundPlan", "CompoundChoice"]


@meta_entry
@dataclasses.dataclass(frozen=True)
class CompoundChoice:
    """The option ``compound_plan`` chose for a weight (its name). A graph whose every weight
    carries one is planned: the pass leaves it as it is (idempotent)."""

    META_KEY = "compound_plan.choice"
    option: str


def _fixed_intent(intent: LayerIntent, option: Option) -> LayerIntent:
    """The intent that makes the later passes apply ``option``: a fixed LINEAR grid of its bits,
    its pattern as the last (winning) one-shot options; a format option: the format's intent,
    as a ``layers`` rule's ``format=`` gives it."""
    options = tuple(intent.options) + option.solver_options()
    if option.format is not None:
        return format_intent(TransformKind(option.format), options, intent.rule)
    return dataclasses.replace(intent, kind=TransformKind.LINEAR.value, bits=option.bits, options=options)


def _grids(w: torch.Tensor, site, intent: LayerIntent, bits: int, groups: int) -> list[Grid]:
    """The fixed grid of ``bits`` exactly as ``sensitivity_analysis`` and ``insert_transforms``
    build it (and ``oneshot_solve`` reads it back, storage-rounded), split per Hessian group."""
    intent_b = dataclasses.replace(intent, kind=TransformKind.LINEAR.value, bits=bits)
    qmax = (1 << (bits - 1)) - 1
    amax = float(w.abs().max()) or 1.0
    ratio = scale_ratio(w, site, intent_b)
    s = stored_vector(amax / qmax, site, intent_b, ratio)
    e = stored_vector(0.5 * amax / qmax, site, intent_b, ratio)
    s, e, _ = round_params(TransformKind.LINEAR, s, e)
    _, group = layout(site, intent_b)
    rows = w.shape[0]
    if group is None:
        s, e = s.reshape(-1).expand(rows), e.reshape(-1).expand(rows)
    per = rows // groups
    return [Grid(TransformKind.LINEAR, s[g * per:(g + 1) * per].contiguous(), e[g * per:(g + 1) * per].contiguous(),
                 -qmax, qmax, group) for g in range(groups)]


class CompoundPlan(L2fxPass):
    name = "compound_plan"
    requires_meta = (LayerIntent,)
    requires_calib = True
    supports_distributed = True  # output errors / Hessians all-reduced (l2fx.distributed)

    def __init__(self, recipe: str, options: tuple[Option, ...] = OPTIONS, **recipe_options: Any):
        if recipe not in RECIPES:
            raise ConfigError(f"compound_plan: unknown one-shot recipe {recipe!r}; known: {sorted(RECIPES)}")
        if not options or not all(isinstance(o, Option) for o in options):
            raise ConfigError(f"compound_plan: options must be a non-empty tuple of Option, got {options!r}")
        options_for(recipe_options)
        self.recipe, self.options, self.recipe_options = recipe, tuple(options), recipe_options

    def requires(self, gm: fx.GraphModule) -> None:
        for node, site in weight_sites(gm):
            if node.op != "get_attr":
                self.fail("compound_plan runs before insert_transforms (weights as get_attr)", node)
            if get_meta(node, LayerIntent).format is not None:
                raise ConfigError(f"compound_plan: layer {site.param!r} has a block-format rule; the compound "
                                  f"options are {', '.join(o.name for o in self.options)} (drop the format rule, "
                                  f"or offer formats to every layer with method_options bop_formats)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        cfg = ctx.config
        if all(get_meta(node, CompoundChoice) is not None for node, _ in weight_sites(gm)):
            ctx.log(self.name, "every weight already carries its compound option: nothing to plan")
            return PassResult(gm, False)
        opts = options_for(self.recipe_options, cfg.method_options)
        reduction, resolution = opts["bop_reduction"], opts["bop_resolution"]
        fmts = opts["bop_formats"]
        if isinstance(fmts, str) or not isinstance(fmts, (tuple, list)):
            raise ConfigError(f"bop_formats must be a list of block formats, got {fmts!r}")
        names = opts["bop_options"]
        if isinstance(names, str) or not isinstance(names, (tuple, list)):
            raise ConfigError(f"bop_options must be a list of option names (e.g. ['dense-w8', 'dense-w6', "
                              f"'2:4-w4', '4block50-w3']), got {names!r}")
        base = tuple(dict.fromkeys(Option.parse(n) for n in names)) if names else self.options
        offered = base + tuple(o for o in (Option.of_format(f) for f in fmts) if o not in base)
        if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not reduction > 1:
            raise ConfigError(f"method {cfg.method!r} needs method_options bop_reduction > 1 (the BOP reduction "
                              f"against the dense fp32 model), got {reduction!r}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ConfigError(f"bop_resolution must be an int >= 1, got {resolution!r}")
        t0 = time.perf_counter()
        sites = list(weight_sites(gm))
        site_params = {site.param for _, site in sites}
        device, max_samples = torch.device(ctx.device), cfg.reconstruction.max_samples
        # The w+a options: each layer's input quantiser per offered activation width, calibrated
        # on the fp32 model's inputs (l2fx.activations), and the Hessians of the quantised inputs.
        act_widths = sorted({o.act_bits for o in offered if o.act_bits != ACT_BITS})
        act_specs = {}
        if act_widths:
            hists = input_histograms(gm, ctx.calib, device, site_params, max_samples)
            act_specs = {p: {b: fit_spec(h, b) for b in act_widths} for p, h in hists.items()}
        stats = model_hessians(gm, ctx.calib, device, site_params, max_samples, act_specs)
        dense_bops = sum(option_bops(s.macs, None) for s in stats.values())
        # Linear/conv weights left uncompressed: dense fp32 in the plan as in the baseline.
        fixed_bops = sum(option_bops(s.macs, None) for p, s in stats.items() if p not in site_params)
        kept = sorted(p for p in stats if p not in site_params)
        layers: dict[str, dict[str, Any]] = {}
        chosen: dict[str, Option] = {}
        table_nodes, costs, errors, layer_opts = [], [], [], []
        pending: dict[str, tuple[int, list]] = {}  # w+a candidates: their errors are measured jointly
        for node, site in sites:
            intent = get_meta(node, LayerIntent)
            st = stats.get(site.param)
            if st is None:  # no linear/conv reads it: no MACs, no Hessian
                chosen[site.param] = Option(8)
                layers[site.param] = {"choice": Option(8).name, "macs": 0.0,
                                      "note": "read by no linear/conv op: no MACs and no Hessian, dense 8-bit, "
                                              "outside the BOP count"}
                continue
            if intent.bits is not None:  # a user's rule fixed its bits
                chosen[site.param] = Option(intent.bits)
                fixed_bops += option_bops(st.macs, Option(intent.bits))
                layers[site.param] = {"choice": Option(intent.bits).name, "macs": st.macs,
                                      "note": f"bits fixed at {intent.bits} by layers rule {intent.rule}"}
                continue
            w = fetch_attr(gm, site.param).detach().float()
            W2 = w.reshape(w.shape[0], -1)
            cols, groups = W2.shape[1], st.hessians.shape[0]
            if layout(site, intent)[0] not in (0, None):
                raise ConfigError(f"compound_plan: layer {site.param!r} has its T parameters along axis "
                                  f"{site.channel_axis}; the solvers' grids run along the output rows (axis 0)")
            usable, notes = [], []
            for o in offered:
                if cols % o.group:
                    notes.append(f"{o.name}: {cols} columns are not a multiple of {o.group}")
                else:
                    usable.append(o)
            if not usable:
                raise ConfigError(f"compound_plan: layer {site.param!r} takes none of the options: {'; '.join(notes)}")
            per = W2.shape[0] // groups
            grids = {b: _grids(w, site, intent, b, groups) for b in {o.bits for o in usable if o.format is None}}
            row_err, with_act = [], []
            for o in usable:
                if o.format is not None:  # the spec's quantisation, rounded to nearest (format_loss)
                    row_err.append(sum(format_loss(W2[g * per:(g + 1) * per], st.hessians[g], o.format)
                                       for g in range(groups)))
                    continue
                o_opts = {**opts, **dict(o.solver_options())}
                # A w+a option is solved on its quantised inputs' Hessian (the layer then sees
                # those inputs), its error measured below on both quantisations at once.
                hess = st.hessians if o.act_bits == ACT_BITS else st.act_hessians[o.act_bits]
                results = [solve(self.recipe, W2[g * per:(g + 1) * per], hess[g], grids[o.bits][g], o_opts,
                                 layer=site.param) for g in range(groups)]
                row_err.append(sum(float(r.loss) for r in results))
                if o.act_bits != ACT_BITS:
                    with_act.append((len(row_err) - 1, act_specs[site.param][o.act_bits],
                                     torch.cat([r.w_hat for r in results])))
            if with_act:
                pending[site.param] = (len(errors), with_act)
            table_nodes.append((node, site, intent))
            costs.append([option_bops(st.macs, o) for o in usable])
            errors.append(row_err)
            layer_opts.append(usable)
            layers[site.param] = {"macs": st.macs, "options": {o.name: {"bops": c, "error": e} for o, c, e in
                                                              zip(usable, costs[-1], row_err)},
                                  **({"note": "; ".join(notes)} if notes else {})}
        if pending:  # one pass over the calibration set measures every w+a candidate of every layer
            measured = joint_errors(gm, ctx.calib, device, {p: [(a, w) for _, a, w in c] for p, (_, c) in
                                                            pending.items()}, max_samples)
            for param, (i, cands) in pending.items():
                for (j, _, _), e in zip(cands, measured[param]):
                    errors[i][j] = e
                    layers[param]["options"][layer_opts[i][j].name]["error"] = e
        budget = dense_bops / reduction
        if not costs:
            raise ConfigError("compound_plan: no layer has options to choose from (every weight is kept, fixed or "
                              "read by no linear/conv op)")
        free = budget - fixed_bops
        cheapest = fixed_bops + sum(min(c) for c in costs)
        if free <= 0 or cheapest > budget:
            raise TargetCRError(f"bop_reduction={reduction} is out of reach: the options reach at most "
                                f"{dense_bops / cheapest:.3f}x against dense fp32")
        plan = choose_options(costs, errors, free, resolution,
                              describe=lambda i: f"layer {table_nodes[i][1].param!r}")
        for (node, site, intent), usable, j in zip(table_nodes, layer_opts, plan.choice):
            chosen[site.param] = usable[j]
            layers[site.param]["choice"] = usable[j].name
        for node, site in sites:
            option = chosen[site.param]
            set_meta(node, _fixed_intent(get_meta(node, LayerIntent), option))
            set_meta(node, CompoundChoice(option.name))
            if option.act_bits != ACT_BITS:
                spec = act_specs[site.param][option.act_bits]
                set_meta(node, ActQuantIntent(spec))
                layers[site.param]["act"] = spec.to_dict()
        plan_bops = fixed_bops + plan.cost
        ctx.records[self.name] = {
            "recipe": self.recipe, "bop_reduction": reduction, "resolution": resolution,
            "act_bits": act_widths or [ACT_BITS],
            "dense_bops": dense_bops, "budget_bops": budget, "plan_bops": plan_bops,
            "achieved_reduction": dense_bops / plan_bops if plan_bops else math.inf,
            "summed_error": plan.error, "dp_units": plan.units, "kept_layers": kept, "layers": layers,
            "seconds": time.perf_counter() - t0}
        ctx.log(self.name, f"{len(costs)} layers, BOP reduction {dense_bops / plan_bops:.3f}x "
                           f"(target {reduction}x), summed layer loss {plan.error:.4g}")
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        for node, _ in weight_sites(gm):
            intent = get_meta(node, LayerIntent)
            if intent.bits is None and intent.format is None:
                self.fail("weight left without a compound option (intent.bits and format unset)", node)
            choice = get_meta(node, CompoundChoice)
            quantised = choice is not None and Option.parse(choice.option).act_bits != ACT_BITS
            if quantised != (get_meta(node, ActQuantIntent) is not None):
                self.fail(f"option {choice.option if choice else None!r} and the activation quantiser disagree", node)
