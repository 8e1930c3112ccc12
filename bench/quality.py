"""Quality of L2 against baselines at matching CR, ablations, and the paper's two figures.

    python bench/quality.py --models fmnist-resnet --targets 8 10 12 15 20
    python bench/quality.py --models efficientnet-lite0 --targets 10 --num-calib 256
    python bench/quality.py --models fmnist-resnet --targets 15 --baselines --prune-baseline 0 \
        --ablations transform counter finetune calib seed --tag ablations
    python bench/quality.py --models minilm --targets 8 --set reconstruction.weight_radius=0.25 --tag r025

For each model: fp32 metrics; L2 at every target CR; the baselines (per-channel RTN at 8..3
bits, and magnitude pruning 50% then RTN, all range coded in the same accounting) with their
achieved CR; optional ablation rows. Writes to ``bench/results/quality_<model>.{md,json}``:
a markdown table per model with the command that made it, a CR-vs-metric plot (paper Fig. 7)
and a per-layer bits/weight + sparsity chart of the highest-CR L2 run (paper Fig. 6).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import l2fx
from l2fx import zoo
from l2fx.cli import apply_settings
from l2fx.config import CompileConfig, ReconstructionConfig
from l2fx.counter import CounterKernel
from l2fx.method import rtn_pipeline
from l2fx.transform import TransformKind

from _results import RESULTS, command_line, write_results


def compile_row(entry, model, calib, label: str, target: float, config: CompileConfig | None = None,
                pipeline=None) -> dict:
    t0 = time.perf_counter()
    compiled = l2fx.compile(model, target_cr=target, calib=calib, config=config, pipeline=pipeline)
    seconds = time.perf_counter() - t0
    metrics = entry.evaluate(compiled, reference=model)
    r = compiled.report
    row = {"method": label, "target_cr": target if pipeline is None else None, "cr": r.compressed_cr,
           "file_cr": r.file_cr, "compile_s": seconds, "peak_rss_mib": r.peak_rss_mib, **metrics,
           "layers": [{"param": layer.param, "bits_per_weight": layer.bits_per_weight, "sparsity": layer.sparsity}
                      for layer in r.layers]}
    print(f"  {label:<28} CR {r.compressed_cr:7.3f}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
          + f"  ({seconds:.0f}s)", flush=True)
    return row


def ablation_configs(kind: str, base: CompileConfig) -> list[tuple[str, CompileConfig]]:
    rec = base.reconstruction
    if kind == "transform":  # paper Table 2
        return [(f"T={k.value}", dataclasses.replace(base, transform=k)) for k in TransformKind]
    if kind == "counter":  # paper Table 3
        return [(f"counter {k.value}/{res}", dataclasses.replace(base, reconstruction=dataclasses.replace(
            rec, counter=dataclasses.replace(rec.counter, kernel=k, resolution=res))))
            for k in CounterKernel for res in (16, 64)]
    if kind == "finetune":  # paper Table 6, and the network-level distillation of Sec. 5.1
        return [("no weight fine-tuning", dataclasses.replace(base, reconstruction=dataclasses.replace(
            rec, weight_iters=0))), ("no reconstruction", dataclasses.replace(
                base, reconstruction=dataclasses.replace(rec, enabled=False))),
            ("+ network distillation 200 it", dataclasses.replace(base, reconstruction=dataclasses.replace(
                rec, distill_iters=200))),
            ("no bias/norm tuning", dataclasses.replace(base, reconstruction=dataclasses.replace(
                rec, tune_plain=False)))]
    if kind == "seed":  # run-to-run spread: the same compile with other seeds
        return [(f"seed {k}", dataclasses.replace(base, seed=k)) for k in (1, 2)]
    raise ValueError(kind)


def plot(model: str, fp32: dict, rows: list[dict], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault("L2" if r["method"].startswith("L2") else r["method"].split(" ")[0], []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["cr"])
        ax.plot([r["cr"] for r in rs], [r[metric] for r in rs], "o-", label=name)
    ax.axhline(fp32[metric], color="gray", ls="--", label="fp32")
    ax.set_xlabel("compression ratio (compressed weights, real bytes)")
    ax.set_ylabel(metric)
    ax.set_title(f"{model}: {metric} vs CR")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "_cr_curve.png"), dpi=110)
    plt.close(fig)
    l2 = [r for r in rows if r["method"].startswith("L2")]
    if not l2:
        return
    top = max(l2, key=lambda r: r["cr"])
    fig, ax1 = plt.subplots(figsize=(max(6, len(top["layers"]) * 0.18), 4))
    xs = range(len(top["layers"]))
    ax1.bar(xs, [layer["bits_per_weight"] for layer in top["layers"]], color="tab:blue", label="bits/weight")
    ax1.set_ylabel("bits / weight (all bytes)")
    ax2 = ax1.twinx()
    ax2.plot(xs, [layer["sparsity"] for layer in top["layers"]], "r.-", label="sparsity")
    ax2.set_ylabel("sparsity")
    ax1.set_xlabel("layer (graph order)")
    ax1.set_title(f"{model} at CR {top['cr']:.2f}: per-layer bits and sparsity")
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "_layers.png"), dpi=110)
    plt.close(fig)


def markdown(model: str, fp32: dict, rows: list[dict], command: str) -> str:
    keys = [k for k in rows[0] if k not in ("method", "target_cr", "cr", "file_cr", "compile_s", "peak_rss_mib", "layers")]
    lines = [f"## {model}", "", f"Command: `{command}`", "",
             "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), "",
             "| method | target CR | CR (weights) | CR (file) | " + " | ".join(keys) + " | compile s | peak RSS MiB |",
             "|---|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for r in rows:
        target = f"{r['target_cr']:g}" if r["target_cr"] else "-"
        lines.append(f"| {r['method']} | {target} | {r['cr']:.3f} | {r['file_cr']:.3f} | "
                     + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in keys)
                     + f" | {r['compile_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fmnist-resnet"])
    p.add_argument("--targets", nargs="+", type=float, default=[8, 10, 12, 15, 20])
    p.add_argument("--baselines", nargs="*", type=int, default=[8, 6, 5, 4, 3], help="RTN bit widths")
    p.add_argument("--prune-baseline", type=float, default=0.5, help="magnitude pruning fraction before RTN (0: skip)")
    p.add_argument("--ablations", nargs="*", default=[], choices=["transform", "counter", "finetune", "calib", "seed"])
    p.add_argument("--num-calib", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-reconstruction", action="store_true")
    p.add_argument("--tag", default="", help="suffix for the result files (quality_<model>_<tag>.*)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a CompileConfig field for every L2 row, as in `l2fx compress --set` (repeatable)")
    args = p.parse_args(argv)
    command = command_line()
    base = apply_settings(CompileConfig(reconstruction=ReconstructionConfig(enabled=not args.no_reconstruction)),
                          args.set)
    for name in args.models:
        entry = zoo.get(name)
        model = entry.build()
        calib = entry.calib(args.num_calib, args.batch_size, 0)
        fp32 = entry.evaluate(model)
        print(f"== {name}: fp32 " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), flush=True)
        out = RESULTS / (f"quality_{name}_{args.tag}" if args.tag else f"quality_{name}")
        rows: list[dict] = []

        def add(row: dict) -> None:  # results are written after every row: a stopped run keeps its rows
            rows.append(row)
            plot(name, fp32, [r for r in rows if r["method"].startswith(("L2", "RTN", "prune"))],
                 entry.primary_metric, out)
            write_results(out, markdown(name, fp32, rows, command), {"command": command, "fp32": fp32, "rows": rows})

        for bits in args.baselines:  # fast: baselines first, so that every L2 row has its comparison
            add(compile_row(entry, model, calib, f"RTN {bits}b", 4.0, pipeline=rtn_pipeline(bits)))
            if args.prune_baseline > 0:
                add(compile_row(entry, model, calib, f"prune{args.prune_baseline:.0%}+RTN {bits}b", 4.0,
                                pipeline=rtn_pipeline(bits, args.prune_baseline)))
        for target in args.targets:
            add(compile_row(entry, model, calib, f"L2 @ {target:g}", target, base))
        middle = args.targets[len(args.targets) // 2]
        for ablation in args.ablations:
            # The seed rows (run-to-run spread) at every target; the other ablations at the middle one.
            for target in args.targets if ablation == "seed" else [middle]:
                if ablation == "calib":  # paper Table 5
                    for n in (64, 128, 256, args.num_calib):
                        add(compile_row(entry, model, entry.calib(n, args.batch_size, 0),
                                        f"calib {n} @ {target:g}", target, base))
                else:
                    for label, config in ablation_configs(ablation, base):
                        add(compile_row(entry, model, calib, f"{label} @ {target:g}", target, config))
        print(markdown(name, fp32, rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
