"""Compress real models end to end and tabulate what a user sees.

For each (model, target CR): compile, save, load back into a fresh instance, check that the
loaded model's outputs equal the compiled model's bit for bit, evaluate fidelity against fp32,
and record the achieved CR (compressed weights, real bytes), the whole-file CR, compile time
per pass (from the Timing instrument), peak memory, and the payload against its Shannon bound.

    python bench/compress.py                                  # the issue's set
    python bench/compress.py --models fmnist-cnn --targets 8 12 16
    python bench/compress.py --models minilm --targets 8 --granularity per_channel per_group --group-size 128

Writes ``bench/results/compress.md`` and ``compress.json`` (with the command that made them).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import l2fx
from l2fx import zoo
from l2fx.data import call_model, output_vector

from _results import command_line, write_results

DEFAULT = [("fmnist-cnn", 8), ("fmnist-cnn", 12), ("fmnist-cnn", 16), ("efficientnet-lite0", 8),
           ("efficientnet-lite0", 12), ("minilm", 8)]


def run_one(name: str, target: float, num_calib: int, batch_size: int, config: l2fx.CompileConfig) -> dict:
    entry = zoo.get(name)
    model = entry.build()
    calib = entry.calib(num_calib, batch_size, 0)
    t0 = time.perf_counter()
    compiled = l2fx.compile(model, target_cr=target, calib=calib, config=config)
    compile_s = time.perf_counter() - t0
    report = compiled.report
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.l2fx"
        l2fx.save(compiled, path)
        t1 = time.perf_counter()
        loaded = l2fx.load(path, model=entry.build())
        load_s = time.perf_counter() - t1
    with torch.no_grad():
        probe = calib[0]
        identical = torch.equal(output_vector(call_model(loaded, probe)), output_vector(call_model(compiled, probe)))
    metrics = entry.evaluate(loaded, reference=model)
    return {
        "model": name, "target_cr": target, "achieved_cr": report.compressed_cr, "file_cr": report.file_cr,
        "file_nbytes": report.file_nbytes, "compressed_nbytes": report.compressed_nbytes,
        "payload_nbytes": report.payload_nbytes, "shannon_nbytes": report.shannon_nbytes,
        "coding_overhead": report.coding_overhead, "compile_s": compile_s, "load_s": load_s,
        "pass_seconds": report.pass_seconds, "peak_rss_mib": report.peak_rss_mib,
        "loaded_identical": identical, "metrics": metrics, "num_calib": num_calib,
        "granularity": config.granularity.value + (f" g={config.group_size}" if config.granularity.value == "per_group"
                                                   else ""),
    }


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| model | granularity | target CR | CR (weights) | CR (file) | fidelity | compile s | slowest passes | "
             "peak RSS MiB | payload vs Shannon | loaded == compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fid = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        slow = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["pass_seconds"].items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"| {r['model']} | {r['granularity']} | {r['target_cr']:g} | {r['achieved_cr']:.3f} | {r['file_cr']:.3f} | {fid} | "
                     f"{r['compile_s']:.1f} | {slow} | {r['peak_rss_mib']:.0f} | +{r['coding_overhead']:.3%} | "
                     f"{r['loaded_identical']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="zoo names (default: the issue's set)")
    p.add_argument("--targets", nargs="*", type=float, help="target CRs for --models")
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-reconstruction", action="store_true", help="allocation + rounding only")
    p.add_argument("--granularity", nargs="*", default=["per_channel"], choices=[g.value for g in l2fx.Granularity],
                   help="T-parameter layouts to compare (a row each)")
    p.add_argument("--group-size", type=int, default=128, help="group size of per_group")
    p.add_argument("--out", default="bench/results/compress")
    args = p.parse_args(argv)
    jobs = [(m, t) for m in args.models for t in (args.targets or [12])] if args.models else DEFAULT
    base = l2fx.CompileConfig(reconstruction=l2fx.ReconstructionConfig(enabled=not args.no_reconstruction),
                              group_size=args.group_size)
    command = command_line()
    out = Path(args.out)
    rows = []
    for (name, target), granularity in ((job, g) for job in jobs for g in args.granularity):
        print(f"== {name} @ {target:g} ({granularity})", flush=True)
        config = base.replace(granularity=l2fx.Granularity(granularity))
        rows.append(run_one(name, target, args.num_calib, args.batch_size, config))
        print(markdown(rows[-1:], "").splitlines()[-1], flush=True)
        # Written after every row: a long run that is stopped keeps what it measured.
        write_results(out, markdown(rows, command), {"command": command, "rows": rows})
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
