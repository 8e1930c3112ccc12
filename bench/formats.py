"""L2 (and GPTQ) against the block formats at the same counted bytes: one table per model.

    python bench/formats.py --models fmnist-resnet
    python bench/formats.py --models efficientnet-lite0 --formats mxfp4_e2m1 int4 --methods l2

For each format, a baseline row stores every weight in it (``l2fx.method.format_pipeline``: the
spec's quantisation of each block, element codes range coded, one E8M0 byte per block counted;
``int4`` / ``int8``: per-channel RTN, ``l2fx.method.rtn_pipeline``), and its measured
compressed-parameter CR becomes the target of each ``--methods`` row, compiled with l2fx's
default config (the L2 row with its block reconstruction). Every row in its own spawned process
(``bench/methods.py``'s ``run_row``); fidelity and task metrics from the zoo entry, on data
disjoint from the calibration data. Writes ``bench/results/formats_<model>[_TAG].md/.json``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import l2fx  # noqa: E402
from l2fx import zoo  # noqa: E402
from l2fx.cli import apply_settings  # noqa: E402
from l2fx.method import format_pipeline, rtn_pipeline  # noqa: E402

from _results import RESULTS, command_line, write_results  # noqa: E402
from methods import run_row  # noqa: E402

FORMATS = ["mxfp4_e2m1", "hbfp4", "int4", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8", "int8"]


def baseline_row(job: dict) -> dict:
    """Every weight in ``job["format"]``: its CR is what the format gives (own process)."""
    entry = zoo.get(job["model"])
    model = entry.build()
    calib = entry.calib(job["num_calib"], job["batch_size"], 0)
    config = l2fx.CompileConfig.from_json(job["config"])
    fmt = job["format"]
    pipe = rtn_pipeline(int(fmt[3:]), fold_batchnorm=config.fold_batchnorm) if fmt.startswith("int") \
        else format_pipeline(fmt, config)
    t0 = time.perf_counter()
    compiled = l2fx.compile(model, 4.0, calib, pipeline=pipe, config=config)
    seconds = time.perf_counter() - t0
    r = compiled.report
    return {**job, "method": fmt, "target": r.compressed_cr, "cr": r.compressed_cr, "packed_cr": r.packed_cr,
            "file_cr": r.file_cr, "compile_s": seconds, "peak_rss_mib": r.peak_rss_mib,
            "metrics": entry.evaluate(compiled, reference=model), "fallbacks": {}}


def markdown(model: str, fp32: dict, groups: list[list[dict]], command: str) -> str:
    keys = sorted({k for g in groups for r in g if "metrics" in r for k in r["metrics"]})
    lines = [f"# {model}: methods against block formats at the same counted bytes", "", f"Command: `{command}`", "",
             "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), "",
             "Each group: the format everywhere (its CR measured), then each method compiled at that CR.", "",
             "| format | row | CR coded | CR packed | " + " | ".join(keys) + " | compile s |",
             "|---|---|---|---|" + "---|" * len(keys) + "---|"]
    for group in groups:
        fmt = group[0]["format"]
        for r in group:
            name = "format" if r is group[0] else r["method"]
            if "error" in r:
                lines.append(f"| {fmt} | {name} | {r['error']} |" + " |" * (len(keys) + 2))
                continue
            vals = " | ".join(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys)
            lines.append(f"| {fmt} | {name} | {r['cr']:.3f} | {r['packed_cr']:.3f} | {vals} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fmnist-resnet"])
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--methods", nargs="+", default=["l2", "gptq"])
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any CompileConfig field")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    config = apply_settings(l2fx.CompileConfig(), args.set)
    command = command_line()
    ctx = multiprocessing.get_context("spawn")
    for name in args.models:
        entry = zoo.get(name)
        fp32 = entry.evaluate(entry.build())
        out = RESULTS / (f"formats_{name}" + (f"_{args.tag}" if args.tag else ""))
        groups = []
        for fmt in args.formats:
            job = {"model": name, "format": fmt, "num_calib": args.num_calib, "batch_size": args.batch_size,
                   "config": config.to_json()}
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                group = [pool.apply(baseline_row, (job,))]
            for method in args.methods:
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    group.append({**pool.apply(run_row, ({**job, "method": method, "target": group[0]["cr"]},)),
                                  "format": fmt})
            groups.append(group)
            print("\n".join(markdown(name, fp32, [group], "").splitlines()[-len(group):]), flush=True)
            write_results(out, markdown(name, fp32, groups, command), {"command": command, "fp32": fp32,
                                                                      "groups": groups})
        print(markdown(name, fp32, groups, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
