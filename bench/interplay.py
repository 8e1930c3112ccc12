"""Seed 002 on our models: does sparsity before quantisation beat the reverse, are the two
orthogonal, and does Q->S accumulate error faster through depth?

    python bench/interplay.py                         # the four zoo models
    python bench/interplay.py --models fmnist-resnet --num-calib 128

For each model, :func:`l2fx.analyze.interplay` with {50 % unstructured (per tensor), 2:4} x
{MXFP8 E4M3, MXFP6 E3M2, MXFP4 E2M1, MXINT8, HBFP8 (hbfp8_b64: at k = 32 it is MXINT8 bit for
bit), INT8 and INT4 per channel}, every scheme evaluated with the zoo entry's task metrics and
fidelity to the fp32 model. Writes ``bench/results/interplay_<model>.{md,json}`` and
``interplay_<model>_{layers,gap}.png``, and prints the three claims per model with the numbers
and where each fails. SmolLM2's weights were Q4_1 before packaging (``l2fx/zoo/smollm2.py``):
its INT4 rows find a 4-bit grid already there, which flatters INT4 against the block formats.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from l2fx import zoo
from l2fx.analyze import InterplayReport, interplay

from _results import RESULTS, command_line, write_results

PATTERNS = ("50%", "2:4")
FORMATS = ("mxfp8_e4m3", "mxfp6_e3m2", "mxfp4_e2m1", "mxint8", "hbfp8", "int8_channel", "int4_channel")
# Calibration samples: every layer's H and the accumulated errors are measured on them. The
# schemes fit nothing to them (magnitude masks, round-to-nearest), so few are needed; the
# vision/text models' forward passes (twice per scheme, 37 schemes) set the cost.
NUM_CALIB = {"fmnist-resnet": 256, "efficientnet-lite0": 32, "minilm": 32, "smollm2": 16}
BATCH = {"fmnist-resnet": 64, "efficientnet-lite0": 16, "minilm": 16, "smollm2": 8}
METRICS = {"fmnist-resnet": ("accuracy", "top1_agreement", "kl_mean"),
           "efficientnet-lite0": ("accuracy", "top1_agreement", "kl_mean"),
           "minilm": ("recall@1", "cosine_mean"),
           "smollm2": ("perplexity", "ppl_ratio", "top1_agreement", "kl_mean")}
OUTPUT = {"minilm": "embeddings", "smollm2": "next-token logits"}


class MemoReference(nn.Module):
    """The fp32 reference with its outputs remembered per input: the zoo's evaluation inputs are
    cached tensors, the same on every call, and evaluating 37 compressed models would otherwise
    rerun the reference 37 times (MiniLM: 21 s each on this CPU). The key holds each input's
    storage, shape, strides and sum, so a different input never hits."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        self.reference = reference
        self._cache: dict[Any, Any] = {}

    def forward(self, *args, **kwargs):
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        key = tuple((t.data_ptr(), tuple(t.shape), t.stride(), str(t.dtype), float(t.double().sum()))
                    for t in leaves) + (tuple(sorted(kwargs)),)
        if hasattr(self.reference, "generation_config"):
            kwargs = {**kwargs, "use_cache": False}  # a transformers causal LM: keep no KV cache
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.reference(*args, **kwargs)
        return self._cache[key]


SATURATED = 1.0  # relative squared output error at which no signal of the fp32 output is left


def summary(report: InterplayReport, metrics: tuple[str, ...]) -> str:
    """The three claims, answered one by one over every pattern x format, with the numbers; pairs
    whose S->Q and Q->S outputs are both at saturation (relative squared error >= 1: the output
    keeps nothing of the fp32 one) are marked, and the model-level claims also counted without them."""
    claims = report.claims()
    n = len(claims)
    saturated = {(c.pattern, c.format) for c in claims if min(c.output_sq, c.output_qs) >= SATURATED}
    lines = [f"## {report.model}: the seed's claims over {n} pattern x format pairs", ""]
    if saturated:
        live = [c for c in claims if (c.pattern, c.format) not in saturated]
        lines += [f"{len(saturated)}/{n} pairs are at saturation (relative squared output error >= {SATURATED:g} "
                  f"for both S->Q and Q->S: the compressed model keeps no signal of the fp32 output), so their "
                  f"model-level comparisons (1) and (2) say nothing; marked [sat] below. "
                  + (f"Without them: (1) holds for {sum(c.claim1 for c in live)}/{len(live)}, (2) for "
                     f"{sum(c.claim2 for c in live)}/{len(live)}. " if live else "No pair is below saturation. ")
                  + "The per-layer counts are unaffected (each layer on the fp32 inputs).", ""]

    def sat(c) -> str:
        return " [sat]" if (c.pattern, c.format) in saturated else ""
    c1 = [c for c in claims if not c.claim1]
    lines.append(f"(1) S->Q <= Q->S at the model output: holds for {n - len(c1)}/{n}. Per layer: layer output error "
                 f"{sum(c.sq_le_qs for c in claims)}/{sum(c.layers for c in claims)} (layer, pair) rows, weight "
                 f"error {sum(c.sq_le_qs_weights for c in claims)}/{sum(c.layers for c in claims)}.")
    for c in c1:
        lines.append(f"    fails for {c.pattern} x {c.format}: output S->Q {c.output_sq:.4g} > Q->S {c.output_qs:.4g}"
                     + sat(c))
    c2 = [c for c in claims if not c.claim2]
    lines.append(f"(2) non-orthogonal at the model output, err(S->Q) > err(S) + err(Q): holds for {n - len(c2)}/{n}. "
                 f"Per layer: {sum(c.nonorth_sq for c in claims)}/{sum(c.layers for c in claims)} rows; median "
                 f"ratio S->Q/(S+Q) per pair " + ", ".join(f"{c.median_ratio_sq:.4g}" for c in claims) + ".")
    for c in c2:
        lines.append(f"    fails for {c.pattern} x {c.format}: output S->Q {c.output_sq:.4g} <= S + Q "
                     f"{c.output_single_sum:.4g}" + sat(c))
    c3 = [c for c in claims if not c.claim3]
    lines.append(f"(3) Q->S accumulates faster (slope of log10 accumulated error over depth): holds for "
                 f"{n - len(c3)}/{n}.")
    for c in c3:
        lines.append(f"    fails for {c.pattern} x {c.format}: slope Q->S {c.slope_qs:.3f} <= S->Q {c.slope_sq:.3f}"
                     + sat(c))
    lines += ["", f"Memory and task metric, 8-bit block formats + {' / '.join(report.patterns)} sparsity (counted "
                  "bits of the analysed layers; mask at its information content / as a 1-bit bitmap):", ""]
    base = report.model_row("fp32")
    lines.append(f"    fp32: 32 bits/weight; " + ", ".join(f"{k} {base.metric(k):.4f}" for k in metrics
                                                          if base.metric(k) is not None))
    for fmt in ("mxfp8_e4m3", "mxint8", "hbfp8", "int8_channel"):
        if fmt not in report.formats:
            continue
        q = report.model_row("Q", "", fmt)
        lines.append(f"    {fmt} dense: {q.bits_per_weight:.3f} bits/weight (CR {q.cr_ideal:.2f}); "
                     + ", ".join(f"{k} {q.metric(k):.4f}" for k in metrics if q.metric(k) is not None))
        for p in report.patterns:
            r = report.model_row("S->Q", p, fmt)
            lines.append(f"    {fmt} + {p} (S->Q): {r.bits_ideal / r.weights:.3f} / {r.bits_bitmap / r.weights:.3f} "
                         f"bits/weight, CR {r.cr_ideal:.2f} / {r.cr_bitmap:.2f}; "
                         + ", ".join(f"{k} {r.metric(k):.4f}" for k in metrics if r.metric(k) is not None))
    return "\n".join(lines)


def run(name: str, num_calib: int, batch: int, evaluate: bool, patterns: tuple[str, ...] = PATTERNS,
        formats: tuple[str, ...] = FORMATS, tag: str = "") -> tuple[InterplayReport, str]:
    entry = zoo.get(name)
    model = entry.build()
    calib = entry.calib(num_calib, batch, 0)
    reference = MemoReference(entry.build())
    report = interplay(model, calib, patterns=patterns, formats=formats, name=name,
                       evaluate=(lambda m: entry.evaluate(m, reference=reference)) if evaluate else None)
    out = RESULTS / (f"interplay_{name}" + (f"_{tag}" if tag else ""))
    command = (f"`{command_line()}`; {report.seconds:.0f} s on the shared 2-core CPU ({torch.get_num_threads()} "
               f"torch threads, nice {os.nice(0)})")
    return report, write_report(report, out, command)


def write_report(report: InterplayReport, out: Path, command: str) -> str:
    """Writes ``out`` .md / .json / plots; returns the claims' summary. ``command``: how it ran."""
    name = report.model
    text = summary(report, METRICS[name])
    md = "\n\n".join([
        f"# Sparsity x block quantisation interplay: {name}",
        f"{command}. "
        f"Definitions: `l2fx/analyze.py` and `docs/interplay.md`. One-shot, no fine-tuning; BatchNorm not folded. "
        f"Output error: relative squared error of the {OUTPUT.get(name, 'logits')} on the "
        f"{report.calib_samples} calibration samples; metrics: the zoo's evaluation "
        f"({', '.join(METRICS[name])}) against the fp32 model." + (" SmolLM2's weights were Q4_1 before packaging: "
        "its INT4 rows find a 4-bit grid already there." if name == "smollm2" else ""),
        "```\n" + text + "\n```",
        report.table(),
        "## Per layer, MXFP8 E4M3 and MXFP4 (every pair is in the JSON)",
        _layer_table(report, tuple(f for f in ("mxfp8_e4m3", "mxfp4_e2m1") if f in report.formats)
                     or report.formats[:2]),
    ]) + "\n"
    write_results(out, md, {**report.to_dict(), "command": command})
    report.plot(out)
    return text


def _layer_table(report: InterplayReport, formats: tuple[str, ...]) -> str:
    keep = InterplayReport(report.model, report.patterns, tuple(f for f in report.formats if f in formats),
                           tuple(r for r in report.layers if r.format in formats), report.models, (),
                           report.calib_samples, report.seconds)
    text = keep.table(layers=True)
    return text[text.index("| layer | depth |"):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(NUM_CALIB), choices=list(NUM_CALIB))
    ap.add_argument("--num-calib", type=int, help="calibration samples (default per model: fmnist-resnet 256, efficientnet-lite0 32, minilm 32, smollm2 16)")
    ap.add_argument("--no-eval", action="store_true", help="skip the zoo evaluation (output errors only)")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), help="sparsity patterns (default 50%% 2:4)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--tag", default="", help="results file suffix (interplay_<model>_<tag>)")
    ap.add_argument("--resummarize", type=Path, metavar="RESULTS.json",
                    help="rewrite a stored report's .md and plots from its .json (no run)")
    args = ap.parse_args()
    if args.resummarize:
        stored = json.loads(args.resummarize.read_text())
        command = stored.get("command") or "command not stored in the JSON"
        print(write_report(InterplayReport.from_dict(stored), args.resummarize.with_suffix(""),
                           f"{command}; summary rewritten from the stored JSON by `{command_line()}`"))
        return
    texts = []
    for name in args.models:
        t0 = time.perf_counter()
        _, text = run(name, args.num_calib or NUM_CALIB[name], BATCH[name], not args.no_eval,
                      tuple(args.patterns), tuple(args.formats), args.tag)
        stem = f"interplay_{name}" + (f"_{args.tag}" if args.tag else "")
        print(text, flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s, wrote {RESULTS / stem}.md/.json/_*.png]\n", flush=True)
        texts.append(text)


if __name__ == "__main__":
    main()
