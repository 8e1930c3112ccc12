"""``block_partition``: cut the graph into reconstruction blocks (paper Sec. 5.1, A.1).

Block reconstruction distils each block's output from the fp32 model, so a block must be a
single-entry single-exit region of the main data path: a residual block, an inverted-residual
block, a transformer layer. The pass finds them in three steps.

1. *Main path.* A networkx DiGraph of data flow over the nodes that depend on a compressed
   weight (the "main" nodes), plus the output. Weight modules and ``get_attr`` nodes are not
   vertices: they belong to the block of their consumer. Nodes computed from the inputs alone
   (an attention mask, ``x.size(0)``, the input normalisation) are *side* values: a block that
   uses one recomputes it from the model inputs, so side values never join regions. Edges
   leaving non-tensor values (sizes computed from an activation) are also dropped, else one
   ``h.size(0)`` reused by every layer would make the whole network one region.
2. *Cut points.* A virtual source feeds the main path's entry nodes. A cut point dominates the
   output (every path from the source to the output passes through it) and post-dominates the
   source (computed with ``networkx.immediate_dominators`` on the reversed graph); both are
   computed and intersected. The regions between consecutive cut points partition the main
   path; a region without a compressed weight merges into the next one (trailing ones into
   the last).
3. *Module grouping.* Cut points alone split a non-residual inverted-residual block into one
   region per conv and a pre-LN transformer layer into its attention and MLP halves. Adjacent
   regions are merged when their weights share a *block key*: the parameter's module path up
   to and including its first numeric component (``layer1.0.conv1.weight`` -> ``layer1.0``,
   ``features.2.conv.1.0.weight`` -> ``features.2``, ``encoder.layer.3.attention...`` ->
   ``encoder.layer.3``), or its own module when the path has none (``fc.weight`` -> ``fc``).
   Items of a ModuleList/Sequential are the repeated units authors write as "blocks"; merging
   only along cut points keeps every block single-exit whatever the names say.

A weight belongs to the region of its first consumer, except a tied embedding/output table: the
region of its linear consumer (``lm_head``), where its error lands and where its input Hessian
is; the embedding's region reads its current value as an input.

Before: any graph after ``insert_transforms``. After: every main node and every compressed
weight node carries ``l2fx.block`` (:class:`Block`); block indices follow the topological
order; side nodes carry none. The graph itself is unchanged.

Pre: every compressed weight is a ``TransformedWeight`` call_module. Post: every compressed
weight node belongs to exactly one block; each block holds at least one compressed weight; no
node reads a later block's value except a weight (a tied table, above).
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from l2fx.blocks import block_key, is_state, is_weight_node, side_nodes, tensor_valued
from l2fx.data import to_device
from l2fx.ir import Block, get_meta, set_meta, weight_sites, weighted_op
from l2fx.modules import TransformedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult

__all__ = ["BlockPartition"]

_SOURCE = "__l2fx_source__"


class BlockPartition(L2fxPass):
    name = "block_partition"
    requires_weight_modules = (TransformedWeight,)

    def call(self, gm: fx.GraphModule) -> PassResult:
        ctx = PassContext.current()
        calib = ctx.calib[0] if ctx.calib else None
        if calib is not None:
            calib = to_device(calib, ctx.device)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        side = side_nodes(gm)
        is_tensor = tensor_valued(gm, calib)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        main = [n for n in gm.graph.nodes
                if n not in side and n.op not in ("placeholder", "output") and not is_state(gm, n)]
        main_set = set(main)

        g = nx.DiGraph()
        g.add_node(_SOURCE)
        g.add_nodes_from(main)
        g.add_node(output)
        for node in main + [output]:
            preds = [a for a in node.all_input_nodes if a in main_set and is_tensor[a]]
            for a in preds:
                g.add_edge(a, node)
            if not preds and node is not output:
                g.add_edge(_SOURCE, node)
        # Main nodes whose value reaches no output (dead ends, sizes whose edges were dropped)
        # take no part in the dominance; they join the region of their latest input below.
        live = nx.ancestors(g, output) | {output}
        h = g.subgraph(live).copy()
        dom = nx.immediate_dominators(h, _SOURCE)
        pdom = nx.immediate_dominators(h.reverse(copy=False), output)
        dominates_output, n = set(), output
        while n != _SOURCE:
            n = dom[n]
            dominates_output.add(n)
        postdominates_source, n = set(), _SOURCE
        while n != output:
            n = pdom[n]
            postdominates_source.add(n)
        cuts = sorted((dominates_output & postdominates_source) - {_SOURCE, output}, key=order.__getitem__)

        # Regions between consecutive cut points, by topological position (a cut closes its region).
        region_of: dict[fx.Node, int] = {}
        cut_pos = [order[c] for c in cuts]
        for node in main:
            if node in live:
                region_of[node] = next((i for i, p in enumerate(cut_pos) if order[node] <= p), len(cuts))
        for node in main:  # dead ends follow their latest live-or-assigned input
            if node not in region_of:
                ins = [region_of[a] for a in node.all_input_nodes if a in region_of]
                region_of[node] = max(ins) if ins else 0
        weights_of: dict[int, list[tuple[fx.Node, str]]] = {}
        for wnode, site in weight_sites(gm):
            users = [u for u in wnode.users if u in region_of]
            if not users:
                self.fail("compressed weight feeds no node on the main path", wnode)
            # A tied table (read by an embedding and a linear op, mark_weights) belongs to the
            # block of its linear read: its error lands in the logits, and there it has an input
            # Hessian for the one-shot solvers (the gather only copies rows). The embedding's
            # block reads its current (fake-quantised) value like any other input.
            hessian_users = [u for u in users if (op := weighted_op(u)) is not None and op.family != "embedding"]
            r = min(region_of[u] for u in (hessian_users or users))
            weights_of.setdefault(r, []).append((wnode, block_key(site.param)))

        # Group regions: a weightless region joins the next weighted one; adjacent weighted
        # regions sharing a block key merge. Each group is a list of region indices.
        groups: list[list[int]] = []
        pending: list[int] = []
        prev_keys: set[str] = set()
        for r in range(len(cuts) + 1):
            pending.append(r)
            if r not in weights_of:
                continue
            keys = {k for _, k in weights_of[r]}
            if groups and keys & prev_keys:
                groups[-1].extend(pending)
                prev_keys |= keys
            else:
                groups.append(pending)
                prev_keys = keys
            pending = []
        if pending:
            if not groups:
                self.fail("no region holds a compressed weight")
            groups[-1].extend(pending)

        group_of = {r: gi for gi, rs in enumerate(groups) for r in rs}
        blocks = []
        for gi, rs in enumerate(groups):
            first = min((w for r in rs for w in weights_of.get(r, [])), key=lambda wk: order[wk[0]])
            blocks.append(Block(gi, first[1]))
        for node in main:
            set_meta(node, blocks[group_of[region_of[node]]])
        for r, ws in weights_of.items():
            for wnode, _ in ws:
                set_meta(wnode, blocks[group_of[r]])
        ctx.records[self.name] = {"blocks": [
            {"index": b.index, "name": b.name,
             "weights": [str(w.target) for r in groups[b.index] for w, _ in weights_of.get(r, [])]}
            for b in blocks]}
        return PassResult(gm, False)

    def ensures(self, gm: fx.GraphModule) -> None:
        seen: dict[int, int] = {}
        for node, _ in weight_sites(gm):
            b = get_meta(node, Block)
            if b is None:
                self.fail("compressed weight belongs to no block", node)
            seen[b.index] = seen.get(b.index, 0) + 1
        for node in gm.graph.nodes:  # data flows from earlier blocks to later ones only
            b = get_meta(node, Block)
            if b is None:
                continue
            for a in node.all_input_nodes:
                ab = get_meta(a, Block)
                # A weight is a parameter, not data flow: a tied table owned by the lm_head block
                # is read by the embedding's block (module docstring).
                if ab is not None and ab.index > b.index and not is_weight_node(gm, a):
                    self.fail(f"block {b.index} reads {a.name!r} of the later block {ab.index}", node)
        if sorted(seen) != list(range(len(seen))):
            self.fail(f"blocks without a compressed weight: have weights in {sorted(seen)}")
