"""SMOL, SMOL-L and L2 at matching counted bytes, the shuffled-precision control, the map's cost.

    nice python bench/smol.py --models fmnist-resnet --targets 8 12 16 --control-targets 12 --num-calib 128 \
        --option iters=100
    nice python bench/smol.py --models fmnist-resnet --targets 12 --methods smol smol-shuffled --option lam=0.05

Methods: ``smol`` (a precision per parameter), ``smol-l`` (per layer), ``smol-shuffled`` (the
seed's Table 6 control: SMOL's learned precisions permuted within each layer, the range refitted
to the same counted bytes, no retraining: the post-training analogue of its "re-trained with
shuffled precisions"), and ``l2``. Each (method, target) compiles in a fresh spawned process.
Columns: compressed-parameter CR on counted bytes (every byte of the artifact's layers, the
precision map included), the zoo's metrics on data disjoint from the calibration data, bpp
(counted bits per compressed weight), the mean integer precision, the fraction at zero
precision, the precision map's share (Shannon bits of the map under one table per layer,
``map_order0``, over the counted bytes and over the file), and what other map contexts
would cost (``l2fx.precision.map_code_bits``: one table per output row, order 1 in C order).
Writes ``bench/results/smol_<model>[_TAG].md/.json``, ``..._bpp.png`` (the task metric against
counted bpp, one line per method: the seed's accuracy-vs-bpp curve beside L2's) and
``..._histograms.png`` (per layer, the fraction of its weights at each integer precision, for
every SMOL / SMOL-L row). ``--replot RESULTS.json`` redraws both and rewrites the table from a
results file.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import l2fx
from l2fx import zoo
from l2fx.cli import apply_settings

from _results import RESULTS, command_line, write_results

DEFAULT_METHODS = ["smol", "smol-l", "smol-shuffled", "l2"]
# The zoo's metrics, in table order (Fashion-MNIST: accuracy; Lite0: agreement, KL, accuracy on
# the labelled photos; MiniLM: cosine to fp32, recall@1).
METRICS = ("accuracy", "kl_mean", "top1_agreement", "cosine_mean", "cosine_min", "recall@1")


def run_row(job: dict) -> dict:
    """One compile and its evaluation (runs in its own process)."""
    entry = zoo.get(job["model"])
    model = entry.build()
    calib = entry.calib(job["num_calib"], job["batch_size"], 0)
    config = l2fx.CompileConfig.from_json(job["config"])
    method = job["method"]
    if method.startswith("smol"):
        opts = tuple(job["smol_options"]) + ((("shuffle", True),) if method == "smol-shuffled" else ())
        config = config.replace(method_options=opts)
        method = "smol" if method == "smol-shuffled" else method
    t0 = time.perf_counter()
    try:
        compiled = l2fx.compile(model, job["target"], calib, method=method, config=config)
    except l2fx.L2fxError as exc:
        return {**job, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    seconds = time.perf_counter() - t0
    metrics = entry.evaluate(compiled, reference=model)
    r = compiled.report
    numel = sum(layer.numel for layer in r.layers)
    row = {**job, "cr": r.compressed_cr, "file_cr": r.file_cr, "file_nbytes": r.file_nbytes,
           "compressed_nbytes": r.compressed_nbytes, "bpp": 8.0 * r.compressed_nbytes / numel, "numel": numel,
           "compile_s": seconds, "metrics": metrics, "pass_seconds": r.pass_seconds}
    rnd = r.records.get("smol_round")
    if rnd is not None:
        code = [v["code_bits"] for v in rnd["layers"].values()]
        row.update(mean_precision=rnd["mean_precision"], zero_fraction=rnd["zero_fraction"], offset=rnd["offset"],
                   range_factor=rnd["range_factor"],
                   map_bits={k: sum(c[k] for c in code) for k in ("joint", "map_order0", "map_per_row", "map_order1",
                                                                   "values_given_p")},
                   layers={k: {f: v[f] for f in ("numel", "mean_precision", "zero_fraction", "histogram", "bpp")}
                           for k, v in rnd["layers"].items()},
                   learned=r.records.get("smol_precision", {}).get("layers", {}))
    return row


def markdown(model: str, fp32: dict, rows: list[dict], command: "str | list[str]") -> str:
    keys = [k for k in METRICS if any(k in r.get("metrics", {}) for r in rows)]
    commands = [command] if isinstance(command, str) else list(command)
    header = (f"Command: `{commands[0]}`" if len(commands) == 1 else
              "Rows of several runs of the same code, in order:\n\n" + "\n".join(f"- `{c}`" for c in commands))
    lines = [f"# {model}: SMOL vs SMOL-L vs L2 at matching counted bytes", "", header, "",
             "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), "",
             "| method | target | CR counted | file CR | " + " | ".join(keys) + " | bpp | mean p | zero p | "
             "map/counted | map/file | map per-row | map order-1 | compile s |",
             "|---|---|---|---|" + "---|" * len(keys) + "---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['target']:g} | {r['error']} |" + " |" * (len(keys) + 10))
            continue
        vals = " | ".join(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys)
        if "map_bits" in r:
            mb = r["map_bits"]
            smol = (f"{r['mean_precision']:.3f} | {r['zero_fraction']:.3f} | "
                    f"{mb['map_order0'] / 8 / r['compressed_nbytes']:.1%} | "
                    f"{mb['map_order0'] / 8 / r['file_nbytes']:.1%} | "
                    + (f"{mb['map_per_row'] / mb['map_order0']:.3f}x | {mb['map_order1'] / mb['map_order0']:.3f}x"
                       if mb["map_order0"] > 0 and r["method"] != "smol-l" else "- | -"))  # SMOL-L: only zero cells vary
        else:
            smol = " | | | | | "
        lines.append(f"| {r['method']} | {r['target']:g} | {r['cr']:.3f} | {r['file_cr']:.3f} | {vals} | "
                     f"{r['bpp']:.3f} | {smol} | {r['compile_s']:.1f} |")
    lines += ["", "bpp: counted bits per compressed weight (the map included). mean p / zero p: mean integer "
              "precision and fraction at precision 0 (pruned). map/counted, map/file: Shannon bits of the precision "
              "map under one table per layer (what the stored symbols spend on it: H(r) = H(p) + H(r|p)) over the "
              "counted bytes and over the file. map per-row / order-1: the map's bits with one table per output row, "
              "or conditioned on the previous precision (tables counted), relative to one table per layer.", "",
              f"Plots: `smol_{model}*_bpp.png` (the task metric vs bpp per method), `smol_{model}*_histograms.png` "
              "(per layer, the fraction of weights at each precision, every SMOL / SMOL-L row)."]
    return "\n".join(lines) + "\n"


def plot(model: str, fp32: dict, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if "metrics" in r]
    metric = next((k for k in ("accuracy", "recall@1", "top1_agreement") if ok and all(k in r["metrics"] for r in ok)),
                  None)
    if metric is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({r["method"] for r in ok}, key=lambda m: DEFAULT_METHODS.index(m) if m in DEFAULT_METHODS else 9):
        rs = sorted((r for r in ok if r["method"] == m), key=lambda r: r["bpp"])
        ax.plot([r["bpp"] for r in rs], [r["metrics"][metric] for r in rs], "o-" if len(rs) > 1 else "x",
                label=m, markersize=8)
    if metric in fp32:
        ax.axhline(fp32[metric], color="gray", ls="--", label="fp32")
    ax.set_xlabel("counted bits per compressed weight (precision map included)")
    ax.set_ylabel(metric)
    ax.set_title(f"{model}: {metric} vs bpp")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "_bpp.png"), dpi=110)
    plt.close(fig)
    hist = sorted((r for r in ok if r.get("layers")), key=lambda r: (r["method"], r["target"]))
    if not hist:
        return
    names = list(hist[0]["layers"])
    width = max(len(next(iter(r["layers"].values()))["histogram"]) for r in hist)
    cols = min(len(hist), 4)
    nrows = -(-len(hist) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols + 1.5, (0.22 * len(names) + 1.2) * nrows),
                             squeeze=False, sharey=True)
    for k, (ax, r) in enumerate(zip(axes.flat, hist)):
        grid = np.zeros((len(names), width))
        for i, n in enumerate(names):
            h = np.asarray(r["layers"][n]["histogram"], dtype=float)
            grid[i, : len(h)] = h / max(h.sum(), 1.0)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(width))
        if k >= len(hist) - cols:
            ax.set_xlabel("precision p (0 = pruned)", fontsize=8)
        if k % cols == 0:
            ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize=6)
        ax.set_title(f"{r['method']} CR {r['cr']:.1f}: {r['bpp']:.2f} bpp\n{metric} {r['metrics'][metric]:.4f}",
                     fontsize=8)
    for ax in list(axes.flat)[len(hist):]:
        ax.axis("off")
    fig.subplots_adjust(hspace=0.45, wspace=0.08)
    fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of the layer's weights")
    fig.savefig(out.with_name(out.name + "_histograms.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fmnist-resnet"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--targets", nargs="+", type=float, default=[8, 12, 16])
    p.add_argument("--control-targets", nargs="+", type=float, default=None,
                   help="targets at which smol-shuffled runs (default: all)")
    p.add_argument("--skip", nargs="+", default=[], metavar="METHOD@TARGET",
                   help="rows not to run (measured already, e.g. smol@12)")
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a SMOL option (l2fx.precision.SmolOptions), JSON value")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any CompileConfig field")
    p.add_argument("--tag", default="")
    p.add_argument("--append", action="store_true",
                   help="add this run's rows to the model's results file (same --tag) instead of replacing it")
    p.add_argument("--replot", type=Path, metavar="RESULTS.json",
                   help="only redraw the plots and rewrite the table of a results file")
    args = p.parse_args(argv)
    if args.replot:
        stored = json.loads(args.replot.read_text())
        rows = stored["rows"]
        model = rows[0]["model"] if rows else args.replot.stem
        plot(model, stored["fp32"], rows, args.replot.with_suffix(""))
        args.replot.with_suffix(".md").write_text(markdown(model, stored["fp32"], rows,
                                                            stored.get("commands") or stored.get("command") or "(not recorded)"))
        return 0
    config = apply_settings(l2fx.CompileConfig(), args.set)
    smol_options = [(k, json.loads(v)) for k, v in (o.split("=", 1) for o in args.option)]
    command = command_line()
    ctx = multiprocessing.get_context("spawn")
    for name in args.models:
        entry = zoo.get(name)
        fp32 = entry.evaluate(entry.build())
        rows, commands = [], [command]
        out = RESULTS / (f"smol_{name}" + (f"_{args.tag}" if args.tag else ""))
        stored_path = out.with_name(out.name + ".json")
        if args.append and stored_path.exists():
            stored = json.loads(stored_path.read_text())
            rows = stored["rows"]
            commands = (stored.get("commands") or [stored.get("command") or "(not recorded)"]) + [command]
        for target in args.targets:
            for method in args.methods:
                controls = args.control_targets
                if method == "smol-shuffled" and controls is not None and target not in controls:
                    continue
                if f"{method}@{target:g}" in args.skip:
                    continue
                job = {"model": name, "method": method, "target": target, "num_calib": args.num_calib,
                       "batch_size": args.batch_size, "config": config.to_json(), "smol_options": smol_options}
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    row = pool.apply(run_row, (job,))
                rows.append(row)
                print(markdown(name, fp32, [row], "").splitlines()[8], flush=True)
                write_results(out, markdown(name, fp32, rows, commands),
                              {"command": commands[0], "commands": commands, "fp32": fp32, "rows": rows})
        plot(name, fp32, rows, out)
        print(markdown(name, fp32, rows, commands))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
