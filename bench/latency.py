"""End-to-end latency of compressed models against fp16 eager and torch.compile (GPU benchmark).

    python bench/latency.py                                   # CUDA: Lite0 and MiniLM, batch 1 and 32
    python bench/latency.py --artifacts /path/dir             # reuse <dir>/<model>.l2fx (made on a CPU box)
    python bench/latency.py --smoke                           # CPU, fp32, few repeats: checks the script only

Per model and batch size, the median latency of one forward pass of

* ``fp16 eager``       : the original model in ``--dtype`` (float16 by default),
* ``fp16 compile``     : ``torch.compile`` of that,
* ``l2fx``             : the artifact loaded with ``l2fx.load(..., device)``, so on CUDA every
  linear and 1x1 conv it can lower runs the fused Triton dequant-matmul, in ``--dtype``,
* ``l2fx compile``     : ``torch.compile`` of that (the custom op stays one node),

and each one's output error ``||y - y_fp32||^2 / ||y_fp32||^2`` against the fp32 original on the same
batch. Artifacts are
compiled here if ``--artifacts`` lacks them (``--target-cr``, allocation and rounding only
unless ``--reconstruction``) and saved there. Timing: CUDA events around each call after
warm-up, median of ``--repeats`` (CPU: wall clock). Writes ``bench/results/latency.{md,json}``.
``--smoke`` timings mean nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import l2fx
from l2fx import zoo
from l2fx.config import CompileConfig, ReconstructionConfig
from l2fx.data import call_model, output_vector, to_device

from _results import RESULTS, command_line, write_results


def cast_inputs(batch, dtype: torch.dtype):
    """Floating-point inputs in ``dtype``; token ids and masks keep theirs."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, batch)


def squared_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||out - ref||^2 / ||ref||^2. Not ``l2fx.data.relative_error``: that one divides by the
    reference's variance over the batch, which is 0 at batch 1."""
    return float((output - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def timed(fn, batch, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn(batch)`` after 3 warm-up calls."""
    with torch.inference_mode():
        for _ in range(3):
            call_model(fn, batch)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call_model(fn, batch)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                call_model(fn, batch)
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def artifact_for(name: str, entry, directory: Path, target: float, reconstruction: bool) -> Path:
    path = directory / f"{name}.l2fx"
    if not path.exists():
        config = CompileConfig(reconstruction=ReconstructionConfig(enabled=reconstruction))
        compiled = l2fx.compile(entry.build(), target_cr=target, calib=entry.calib(64, 32, 0), config=config)
        l2fx.save(compiled, path)
    return path


def run_model(name: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    entry = zoo.get(name)
    path = artifact_for(name, entry, Path(args.artifacts), args.target_cr, args.reconstruction)
    fp32 = entry.build().eval()
    base = entry.build().eval().to(device=device, dtype=dtype)
    compressed = l2fx.load(path, entry.build(), device=device).to(dtype)
    variants = {f"{args.dtype} eager": base, "l2fx": compressed}
    if not args.no_compile:
        variants[f"{args.dtype} compile"] = torch.compile(base)
        variants["l2fx compile"] = torch.compile(compressed)
    rows = []
    for batch_size in args.batches:
        batch = entry.calib(batch_size, batch_size, 1)[0]
        with torch.inference_mode():
            ref = output_vector(call_model(fp32, batch)).float()
        inputs = cast_inputs(to_device(batch, device), dtype)
        for label, fn in variants.items():
            seconds = timed(fn, inputs, args.repeats, device)
            with torch.inference_mode():
                err = squared_error(output_vector(call_model(fn, inputs)).float().cpu(), ref)
            rows.append({"model": name, "batch": batch_size, "variant": label, "ms": seconds * 1e3,
                         "rel_error_vs_fp32": float(err), "artifact_nbytes": path.stat().st_size,
                         "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})
            print(f"  {name:<20} batch {batch_size:>3}  {label:<16} {seconds * 1e3:9.3f} ms  "
                  f"rel. error {float(err):.4f}", flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "", "| model | batch | variant | ms | vs eager | rel. error vs fp32 |",
             "|---|---|---|---|---|---|"]
    eager = {(r["model"], r["batch"]): r["ms"] for r in rows if r["variant"].endswith("eager")}
    for r in rows:
        speedup = eager[(r["model"], r["batch"])] / r["ms"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {speedup:.2f}x | "
                     f"{r['rel_error_vs_fp32']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["efficientnet-lite0", "minilm"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--target-cr", type=float, default=10.0)
    p.add_argument("--reconstruction", action="store_true")
    p.add_argument("--artifacts", default=str(zoo.cache_dir() / "latency"))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, 3 repeats, batch 2, no torch.compile")
    p.add_argument("--out", default=str(RESULTS / "latency"))
    args = p.parse_args(argv)
    if args.smoke:
        args.dtype, args.repeats, args.batches, args.no_compile = "float32", 3, [2], True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        p.error("no CUDA device: this benchmark measures GPU latency (use --smoke to check the script on CPU)")
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    command = command_line()
    rows: list[dict] = []
    for name in args.models:
        rows += run_model(name, args, device, getattr(torch, args.dtype))
    text = markdown(rows, command)
    print(text)
    write_results(args.out, text, {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
