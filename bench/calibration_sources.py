"""Calibration sources (``l2fx.calibration``) at one CR: which inputs make a compile generalise.

    python bench/calibration_sources.py --model fmnist-resnet --target 25
    python bench/calibration_sources.py --model efficientnet-lite0 --target 10 --no-reconstruction --num-real 16 --num-generated 32

Per source (``real``: the zoo's calibration samples; ``synthetic``: BatchNorm-statistics
synthesis, the real samples giving only shape, value range and input mean/std;
``synthetic+real``; ``real+augment``) one compile in a fresh process, evaluated by the zoo
entry's own evaluation, on data disjoint from every calibration sample (Fashion-MNIST: the test
split; Lite0: the labelled ImageNet photos, which no calibration source contains). Columns:
the counted CR, the fidelity and task metrics, how long building the inputs took, compile time,
peak RSS. Writes ``bench/results/calibration_<model>_cr<target>[_TAG].md/.json``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import torch

import l2fx
from l2fx import calibration, zoo

from _results import RESULTS, command_line, write_results

SOURCES = ["real", "synthetic", "synthetic+real", "real+augment"]


def run_row(job: dict) -> dict:
    """Builds one source's inputs, compiles, evaluates (in its own process)."""
    torch.manual_seed(job["seed"])
    entry = zoo.get(job["model"])
    model = entry.build()
    real = entry.calib(job["num_real"], job["batch_size"], job["seed"])
    t0 = time.perf_counter()
    calib = calibration.calibration_source(job["source"], model, real, None, job["num_generated"], job["seed"],
                                           batch_size=job["batch_size"])
    source_s = time.perf_counter() - t0
    n = sum(len(b) for b in calib)
    config = l2fx.CompileConfig(seed=job["seed"],
                                reconstruction=l2fx.ReconstructionConfig(enabled=job["reconstruction"]))
    t0 = time.perf_counter()
    try:
        compiled = l2fx.compile(model, job["target"], calib, config=config)
    except l2fx.L2fxError as exc:
        return {**job, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    compile_s = time.perf_counter() - t0
    r = compiled.report
    return {**job, "samples": n, "source_s": source_s, "compile_s": compile_s, "cr": r.compressed_cr,
            "peak_rss_mib": r.peak_rss_mib, "metrics": entry.evaluate(compiled, reference=model)}


def markdown(title: str, fp32: dict, rows: list[dict], command: str) -> str:
    keys = sorted({k for r in rows if "metrics" in r for k in r["metrics"]})
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), "",
             "| source | samples | CR | " + " | ".join(keys) + " | inputs s | compile s | peak RSS MiB |",
             "|---|---|---|" + "---|" * len(keys) + "---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']} | | {r['error']} |" + " |" * (len(keys) + 3))
            continue
        vals = " | ".join(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys)
        lines.append(f"| {r['source']} | {r['samples']} | {r['cr']:.3f} | {vals} | {r['source_s']:.0f} | "
                     f"{r['compile_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-resnet")
    p.add_argument("--target", type=float, default=25.0)
    p.add_argument("--sources", nargs="+", default=SOURCES, choices=calibration.SOURCES)
    p.add_argument("--num-real", type=int, default=128, help="real calibration samples (the zoo's)")
    p.add_argument("--num-generated", type=int, default=128, help="synthetic / augmented samples each")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reconstruction", action="store_true")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    command = command_line()
    entry = zoo.get(args.model)
    fp32 = entry.evaluate(entry.build())
    title = (f"{args.model} at CR {args.target:g}: calibration sources "
             f"({'no ' if args.no_reconstruction else ''}reconstruction)")
    out = RESULTS / (f"calibration_{args.model}_cr{args.target:g}" + (f"_{args.tag}" if args.tag else ""))
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for source in args.sources:
        job = {"model": args.model, "source": source, "target": args.target, "num_real": args.num_real,
               "num_generated": args.num_generated, "batch_size": args.batch_size, "seed": args.seed,
               "reconstruction": not args.no_reconstruction}
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            rows.append(pool.apply(run_row, (job,)))
        print(markdown(title, fp32, rows[-1:], "").splitlines()[-1], flush=True)
        write_results(out, markdown(title, fp32, rows, command), {"command": command, "fp32": fp32, "rows": rows})
    print(markdown(title, fp32, rows, command))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
