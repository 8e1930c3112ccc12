"""Every compression method on one model, at matching counted bytes: one table per model.

    python bench/methods.py --models fmnist-resnet --targets 8 10 12 15
    python bench/methods.py --models efficientnet-lite0 --targets 10 --methods l2 gptq rtn sparsegpt-2:4
    python bench/methods.py --models minilm --targets 8 12 --methods gptq rtn l2 --no-reconstruction

Each (method, target) row is compiled in a fresh process (spawned), so its peak RSS is its own.
Columns: the compressed-parameter CR on range-coded bytes (every byte of the artifact's layers)
and the same symbols packed at fixed width (no entropy coding), the fidelity to fp32 and the
task metric of the zoo entry (evaluated on data disjoint from the calibration data), compile
time, peak RSS. All methods share the allocation, byte accounting, artifact and runtime
(``l2fx.methods()``); L2 runs its default reconstruction unless ``--no-reconstruction``.
Writes ``bench/results/methods_<model>[_TAG].md/.json``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import l2fx
from l2fx import zoo
from l2fx.cli import apply_settings

from _results import RESULTS, command_line, write_results

DEFAULT_METHODS = ["l2", "gptq", "gptq+l2", "rtn", "sparsegpt", "sparsegpt-2:4", "wanda", "wanda-2:4", "obq",
                   "adaround", "adaquant"]


def run_row(job: dict) -> dict:
    """One compile and its evaluation (runs in its own process)."""
    entry = zoo.get(job["model"])
    model = entry.build()
    calib = entry.calib(job["num_calib"], job["batch_size"], 0)
    config = l2fx.CompileConfig.from_json(job["config"])
    t0 = time.perf_counter()
    try:
        compiled = l2fx.compile(model, job["target"], calib, method=job["method"], config=config)
    except l2fx.L2fxError as exc:
        return {**job, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    seconds = time.perf_counter() - t0
    metrics = entry.evaluate(compiled, reference=model)
    r = compiled.report
    return {**job, "cr": r.compressed_cr, "packed_cr": r.packed_cr, "file_cr": r.file_cr, "compile_s": seconds,
            "peak_rss_mib": r.peak_rss_mib, "metrics": metrics,
            "fallbacks": r.records.get("oneshot_solve", {}).get("fallbacks", {}),
            "allocation": r.records.get("entropy_allocation", {}), "pass_seconds": r.pass_seconds,
            "blocks": [{k: b[k] for k in ("name", "loss_before", "loss_after_transform", "loss_after", "seconds")}
                       for b in r.records.get("block_reconstruction", {}).get("blocks", [])]}


def markdown(model: str, fp32: dict, rows: list[dict], command: str) -> str:
    keys = sorted({k for r in rows if "metrics" in r for k in r["metrics"]})
    lines = [f"# {model}: methods at matching counted bytes", "", f"Command: `{command}`", "",
             "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), "",
             "| method | target | CR coded | CR packed | " + " | ".join(keys) + " | compile s | peak RSS MiB |",
             "|---|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['target']:g} | {r['error']} |" + " |" * (len(keys) + 3))
            continue
        vals = " | ".join(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys)
        lines.append(f"| {r['method']} | {r['target']:g} | {r['cr']:.3f} | {r['packed_cr']:.3f} | {vals} | "
                     f"{r['compile_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    fallbacks = {f"{r['method']}": r["fallbacks"] for r in rows if r.get("fallbacks")}
    if fallbacks:
        lines += ["", "Layers a one-shot method did not solve as asked (each reason says what ran instead):", ""]
        lines += [f"- {m}: " + ", ".join(f"{k} ({v})" for k, v in fb.items()) for m, fb in fallbacks.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fmnist-resnet"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--targets", nargs="+", type=float, default=[8, 10, 12, 15])
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-reconstruction", action="store_true", help="L2 without block reconstruction")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any CompileConfig field")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    config = apply_settings(l2fx.CompileConfig(reconstruction=l2fx.ReconstructionConfig(
        enabled=not args.no_reconstruction)), args.set)
    command = command_line()
    ctx = multiprocessing.get_context("spawn")
    for name in args.models:
        entry = zoo.get(name)
        fp32 = entry.evaluate(entry.build())
        rows = []
        out = RESULTS / (f"methods_{name}" + (f"_{args.tag}" if args.tag else ""))
        for target in args.targets:
            for method in args.methods:
                job = {"model": name, "method": method, "target": target, "num_calib": args.num_calib,
                       "batch_size": args.batch_size, "config": config.to_json()}
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    row = pool.apply(run_row, (job,))
                rows.append(row)
                print(markdown(name, fp32, [row], "").splitlines()[-1], flush=True)
                write_results(out, markdown(name, fp32, rows, command), {"command": command, "fp32": fp32,
                                                                        "rows": rows})
        print(markdown(name, fp32, rows, command))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
