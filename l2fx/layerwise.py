"""Layer-wise calibration statistics, streamed block by block: what one-shot solvers run on.

GPTQ, SparseGPT, Wanda, OBC and AdaRound/AdaQuant/AdaPrune minimise each layer's
reconstruction loss ``tr(dW H dW^T)`` with ``H = 2 X^T X / n`` of the layer's inputs ``X``.
:func:`stream_blocks` runs the model's blocks (``l2fx.blocks``) in order over the calibration
set, holding only the current block's inputs (the outputs of the already compressed prefix:
the "sequential" setting of the references), and for each block

1. :func:`block_hessians` runs the block with its *uncompressed* weights (each
   ``TransformedWeight``'s ``.weight``) on those inputs and accumulates, per compressed weight,
   the Hessian of the inputs its op sees (linear: the last dimension; conv: the unfolded
   patches, one Hessian per conv group: a depthwise conv gets one per channel), in float64 up to
   8192 columns (``l2fx.solvers.HessianAccumulator``);
2. hands them to the caller, who compresses the block's weights;
3. runs the block again, now compressed, to make the next block's inputs.

A language model's padding counts nothing: where a calibration batch carries a 2-D
``attention_mask`` ``[batch, tokens]``, a linear layer's input ``[batch, tokens, ...]`` adds
only its real tokens' rows (:func:`l2fx.data.real_rows`), in both settings below.

Weights used by an op other than linear/conv (embeddings: their inputs are indices) get no
Hessian: the caller decides (the one-shot pass rounds them to nearest, and records it).

:func:`model_hessians` is the independent setting instead (OBC's per-layer error tables): the
whole uncompressed model (weights still ``get_attr`` s) run batch by batch, every weight's
Hessian from the fp32 model's own activations, and every linear/conv op's MACs per sample;
for the w+a options, :func:`input_histograms` (to calibrate activation quantisers), the
Hessians of the quantised inputs, and :func:`joint_errors` (weights and inputs both quantised).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx

from l2fx import distributed, memory
from l2fx.activations import ActQuantSpec, RangeHistogram
from l2fx.blocks import BlockProgram, RawWeights, build_programs, calibration_inputs, calibration_masks
from l2fx.data import batch_size, real_rows
from l2fx.ir import WeightSite, arg_of, weighted_op
from l2fx.modules import TransformedWeight
from l2fx.solvers import HessianAccumulator, layer_rows

__all__ = ["LayerStats", "block_hessians", "stream_blocks", "DenseLayerStats", "model_hessians", "input_histograms",
           "joint_errors"]


@dataclasses.dataclass
class LayerStats:
    """One compressed weight of a block and its calibration statistics.

    ``hessians``: ``[groups, cols, cols]`` (one per conv group; 1 for linear and ungrouped
    convs), cols = the weight's ``flatten(1)`` width per group; None when the weight feeds no
    linear/conv op (then ``reason`` says what). ``input_sq_norms``: diag of ``X^T X`` per group
    (Wanda's ``||x_j||^2``), same leading shape.
    """

    node: fx.Node
    module: TransformedWeight
    site: WeightSite
    hessians: torch.Tensor | None
    nsamples: int
    reason: str = ""

    @property
    def groups(self) -> int:
        return 1 if self.hessians is None else self.hessians.shape[0]


def _conv_params(op_node: fx.Node) -> dict[str, Any]:
    names = ("stride", "padding", "dilation", "groups")
    defaults = (1, 0, 1, 1)
    return {n: (arg_of(op_node, 3 + i) if arg_of(op_node, 3 + i) is not None else op_node.kwargs.get(n, d))
            for i, (n, d) in enumerate(zip(names, defaults))}


class _Capture(RawWeights):
    """Runs a block program with raw (fp32) weights and feeds each weighted op's input to the
    accumulator of its weight."""

    def __init__(self, gm: fx.GraphModule, accumulators: dict[str, tuple]):
        super().__init__(gm)
        self.accumulators = accumulators  # weight module path -> (accumulator, family, shape, conv params)
        self.keep: torch.Tensor | None = None  # the current batch's real tokens

    def run_node(self, n: fx.Node) -> Any:
        op = weighted_op(n)
        if op is not None and op.family in ("linear", "conv"):
            w = arg_of(n, op.weight_arg)
            entry = self.accumulators.get(str(w.target)) if isinstance(w, fx.Node) and w.op == "call_module" else None
            if entry is not None:
                acc, family, shape, conv = entry
                x = self.env[n.args[0]]
                if family == "linear":
                    x = real_rows(x, self.keep)
                rows = layer_rows(x.float(), family, shape, **conv)
                if rows.dim() == 2:
                    rows = rows.unsqueeze(0)
                for g in range(rows.shape[0]):
                    acc[g].add(rows[g])
        return super().run_node(n)


@torch.no_grad()
def block_hessians(prog: BlockProgram, inputs: list[list[Any]],
                   keep: Sequence[torch.Tensor | None] | None = None) -> list[LayerStats]:
    """The Hessians of the block's compressed weights over the calibration inputs (``inputs``:
    per calibration batch, the block program's arguments), with the weights uncompressed.
    ``keep``: per batch, its real tokens (:func:`l2fx.blocks.calibration_masks`): a linear
    layer's input ``[batch, tokens, ...]`` counts those rows only (padding adds nothing)."""
    accumulators, reasons = {}, {}
    for node, module, site in prog.weights:
        consumers = [u for u in prog.quant.graph.nodes if weighted_op(u) is not None
                     and isinstance(arg_of(u, weighted_op(u).weight_arg), fx.Node)
                     and str(arg_of(u, weighted_op(u).weight_arg).target) == str(node.target)]
        families = {weighted_op(u).family for u in consumers}
        if families - {"linear", "conv"} or not families:
            reasons[str(node.target)] = f"read by a {'/'.join(sorted(families)) or 'non-weighted'} op: no input Hessian"
            continue
        shape = tuple(module.weight.shape)
        if "conv" in families:
            conv = _conv_params(consumers[0])
            family = "conv1d" if len(shape) == 3 else "conv2d"
            groups = conv["groups"]
        else:
            conv, family, groups = {}, "linear", 1
        cols = int(torch.tensor(shape[1:]).prod())
        accumulators[str(node.target)] = ([HessianAccumulator(cols) for _ in range(groups)], family, shape, conv)
    capture = _Capture(prog.quant, accumulators)
    for i, args in enumerate(inputs):
        capture.keep = keep[i] if keep is not None else None
        capture.run(*args)
    out = []
    for node, module, site in prog.weights:
        entry = accumulators.get(str(node.target))
        if entry is None:
            out.append(LayerStats(node, module, site, None, 0, reasons[str(node.target)]))
            continue
        accs = entry[0]
        out.append(LayerStats(node, module, site, torch.stack([a.hessian() for a in accs]), accs[0].nsamples))
    return out


def stream_blocks(gm: fx.GraphModule, calib: Any, device: torch.device, max_samples: int = 0
                  ) -> Iterator[tuple[BlockProgram, list[list[Any]], list[torch.Tensor | None], Callable[[], None]]]:
    """Yields ``(block program, its inputs per calibration batch, each batch's real tokens,
    advance)`` in block order (the real tokens: :func:`l2fx.blocks.calibration_masks`, for
    :func:`block_hessians` and the block losses to leave a language model's padding out).

    ``inputs`` are the arguments of ``prog.quant`` / ``prog.fp32``: the model inputs the block
    reads, then the outputs of the (already compressed) earlier blocks. Call ``advance()`` once
    the block's weights are final: it runs the compressed block to make the next blocks'
    inputs and frees what no later block reads. At most one block's inputs are held.
    """
    programs = build_programs(gm)
    ph_vals = calibration_inputs(gm, calib, max_samples, device)
    keep = calibration_masks(calib, max_samples, device)
    last_use = {n: p.block.index for p in programs for n in p.inputs}
    cache: dict[fx.Node, list[Any]] = {}
    for prog in programs:
        inputs = [[pv[p] for p in prog.placeholders] + [cache[n][i] for n in prog.inputs]
                  for i, pv in enumerate(ph_vals)]

        def advance(prog=prog, inputs=inputs) -> None:
            with torch.no_grad():
                outs = [tuple(prog.quant(*args)) for args in inputs]
            for j, n in enumerate(prog.outputs):
                if last_use.get(n, -1) > prog.block.index:
                    cache[n] = [o[j] for o in outs]
            for n in [n for n in cache if last_use.get(n, -1) <= prog.block.index]:
                del cache[n]
            memory.release()

        yield prog, inputs, keep, advance


@dataclasses.dataclass
class DenseLayerStats:
    """A linear/conv weight of the uncompressed model (:func:`model_hessians`): ``hessians``
    ``[groups, cols, cols]`` (None when not asked for), ``macs``: multiply-accumulates per
    calibration sample (output elements x the weight's ``flatten(1)`` width, summed over the ops
    reading the weight); ``act_hessians``: per activation bit width asked for, the Hessian of
    the same inputs through that width's quantiser (same shape as ``hessians``)."""

    param: str
    family: str
    shape: tuple[int, ...]
    hessians: torch.Tensor | None
    nsamples: int
    macs: float
    act_hessians: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


#: ``visit(param, family, shape, conv params, the op's input, the weight)``: what a pass over the
#: uncompressed model does with each linear/conv input of a wanted weight.
Visit = Callable[[str, str, tuple, dict, torch.Tensor, torch.Tensor], None]


class _DenseCapture(fx.Interpreter):
    """Runs the uncompressed graph; per linear/conv op counts MACs and, for a wanted weight,
    hands its input to ``visit``."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str], visit: Visit):
        super().__init__(gm)
        self.wanted, self.visit = wanted, visit
        self.keep: torch.Tensor | None = None  # the current batch's real tokens
        self.macs: dict[str, float] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        op = weighted_op(n)
        w = arg_of(n, op.weight_arg) if op is not None else None
        if op is None or op.family not in ("linear", "conv") or not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return out
        param, weight = str(w.target), self.env[w]
        shape = tuple(weight.shape)
        self.macs[param] = self.macs.get(param, 0.0) + float(out.numel()) * float(weight[0].numel())
        family = "linear" if op.family == "linear" else ("conv1d" if len(shape) == 3 else "conv2d")
        self.meta[param] = (family, shape)
        if param in self.wanted:
            x = self.env[n.args[0]]
            self.visit(param, family, shape, _conv_params(n) if op.family == "conv" else {},
                       real_rows(x, self.keep) if family == "linear" else x, weight)
        return out


@torch.no_grad()
def _dense_pass(gm: fx.GraphModule, calib: Any, device: torch.device, wanted: set[str], visit: Visit,
                max_samples: int = 0) -> tuple[_DenseCapture, int]:
    """One run of the uncompressed model over the calibration set, one batch's activations at a
    time (the interpreter frees each value after its last use); returns the capture and the
    number of samples."""
    cap = _DenseCapture(gm, wanted, visit)
    samples = 0
    for pv, keep in zip(calibration_inputs(gm, calib, max_samples, device),
                        calibration_masks(calib, max_samples, device)):
        args = list(pv.values())
        cap.keep = keep
        cap.run(*args)
        samples += batch_size(args)
    return cap, samples


def _grouped_rows(x: torch.Tensor, family: str, shape: tuple, conv: dict) -> torch.Tensor:
    rows = layer_rows(x.float(), family, shape, **conv)
    return rows.unsqueeze(0) if rows.dim() == 2 else rows


@torch.no_grad()
def model_hessians(gm: fx.GraphModule, calib: Any, device: torch.device, wanted: set[str],
                   max_samples: int = 0, act: Mapping[str, Mapping[int, ActQuantSpec]] | None = None
                   ) -> dict[str, DenseLayerStats]:
    """Every linear/conv weight of ``gm`` (weights as ``get_attr`` s, before ``insert_transforms``):
    its MACs per calibration sample, and for the parameters in ``wanted`` the Hessian of its
    inputs in the uncompressed model; ``act``: per parameter, the activation quantisers whose
    quantised-input Hessians to accumulate as well (``act_hessians``)."""
    act = act or {}
    accumulators: dict[tuple[str, int], list[HessianAccumulator]] = {}

    def visit(param, family, shape, conv, x, weight):
        for bits, xq in [(0, x)] + [(b, spec(x)) for b, spec in sorted(act.get(param, {}).items())]:
            rows = _grouped_rows(xq, family, shape, conv)
            accs = accumulators.setdefault((param, bits), [HessianAccumulator(rows.shape[-1])
                                                           for _ in range(rows.shape[0])])
            for g in range(rows.shape[0]):
                accs[g].add(rows[g])

    cap, samples = _dense_pass(gm, calib, device, wanted, visit, max_samples)
    out = {}
    for param, (family, shape) in cap.meta.items():
        accs = accumulators.get((param, 0))
        hess = torch.stack([a.hessian() for a in accs]) if accs else None
        act_h = {b: torch.stack([a.hessian() for a in accumulators[(param, b)]]) for b in sorted(act.get(param, {}))
                 if (param, b) in accumulators}
        out[param] = DenseLayerStats(param, family, shape, hess, accs[0].nsamples if accs else 0,
                                     cap.macs[param] / max(samples, 1), act_h)
    return out


@torch.no_grad()
def input_histograms(gm: fx.GraphModule, calib: Any, device: torch.device, wanted: set[str],
                     max_samples: int = 0) -> dict[str, RangeHistogram]:
    """Per wanted linear/conv weight, the histogram of the input values its ops read in the
    uncompressed model (two passes: the range, then the counts; both reduced over the ranks of
    a distributed compile), from which :func:`l2fx.activations.fit_spec` chooses a quantiser."""
    hists: dict[str, RangeHistogram] = {}

    def observe_range(param, family, shape, conv, x, weight):
        hists.setdefault(param, RangeHistogram()).observe_range(x)

    _dense_pass(gm, calib, device, wanted, observe_range, max_samples)
    for param in sorted(hists):
        h = hists[param]
        lo, hi = distributed.all_reduce_max(torch.tensor([-h.lo, h.hi], dtype=torch.float64)).tolist()
        h.lo, h.hi = -lo, hi
        h.freeze()
    _dense_pass(gm, calib, device, set(hists), lambda param, f, s, c, x, w: hists[param].observe(x), max_samples)
    for param in sorted(hists):
        distributed.all_reduce_sum(hists[param].counts)
    return hists


@torch.no_grad()
def joint_errors(gm: fx.GraphModule, calib: Any, device: torch.device,
                 candidates: Mapping[str, Sequence[tuple[ActQuantSpec, torch.Tensor]]],
                 max_samples: int = 0) -> dict[str, list[float]]:
    """Per parameter and candidate ``(quantiser, W_hat [rows, cols])``, the layer loss of
    ``W_hat`` reading quantised inputs against ``W`` reading the real ones,
    ``2/N sum ||W x - W_hat q(x)||^2`` over the ``N`` input rows (per conv group, summed),
    in the units of ``tr(dW H dW^T)``: the error a w+a option's table entry needs, which no
    single Hessian gives. Summed over the ranks of a distributed compile."""
    sums = {p: torch.zeros(len(c), dtype=torch.float64) for p, c in candidates.items()}
    counts = {p: torch.zeros(1, dtype=torch.float64) for p in candidates}

    def visit(param, family, shape, conv, x, weight):
        rows = _grouped_rows(x, family, shape, conv)
        groups = rows.shape[0]
        W2 = weight.detach().float().reshape(shape[0], -1)
        per = shape[0] // groups
        ref = [rows[g] @ W2[g * per:(g + 1) * per].T for g in range(groups)]
        quantised: dict[ActQuantSpec, torch.Tensor] = {}  # options of one activation width share their rows
        for i, (spec, w_hat) in enumerate(candidates[param]):
            if spec not in quantised:
                quantised[spec] = _grouped_rows(spec(x), family, shape, conv)
            rq = quantised[spec]
            sums[param][i] += sum(float(((ref[g] - rq[g] @ w_hat[g * per:(g + 1) * per].T).double() ** 2).sum())
                                  for g in range(groups))
        counts[param] += rows.shape[1]

    _dense_pass(gm, calib, device, set(candidates), visit, max_samples)
    out = {}
    for param in sorted(candidates):
        total, n = distributed.all_reduce_sum(sums[param]), distributed.all_reduce_sum(counts[param])
        out[param] = (2.0 * total / n.clamp(min=1)).tolist()
    return out
