"""End-to-end latency of compressed models against fp16 eager and torch.compile (GPU benchmark),
and on CPU against the fp32 model with the weights decoded per call or once (``--cpu``).

    python bench/latency.py                                   # CUDA: Lite0 and MiniLM, batch 1 and 32
    python bench/latency.py --artifacts /path/dir             # reuse <dir>/<model>.l2fx (made on a CPU box)
    python bench/latency.py --smoke                           # CPU, fp32, few repeats: checks the script only
    python bench/latency.py --cpu --threads 2                 # CPU: fp32 vs l2fx per_call vs l2fx cache, batch 1

``--cpu``: per model (default Lite0, the Fashion-MNIST ResNet, MiniLM at sequence ``--seq-len``),
batch 1, fp32, ``torch.set_num_threads(--threads)``: the original model (``fp32``), the artifact
loaded with ``BackendConfig(decode="per_call")`` (every weight decoded on every forward) and with
``decode="cache"`` (decoded once at load; what ``"auto"`` does on CPU). The three are timed
interleaved (one call of each per round, ``--warmup`` rounds first, median of ``--repeats``
rounds, wall clock), so load from other processes on a shared machine falls on all of them
alike. Also written: the bytes the caches hold (``decode_cache_nbytes``), the codes' bytes, and
whether per_call and cache give bit-identical outputs. Writes ``bench/results/latency_cpu.{md,json}``.

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
from l2fx.config import BackendConfig, CompileConfig, ReconstructionConfig
from l2fx.data import call_model, output_vector, to_device
from l2fx.modules import CodedWeight, decode_cache_nbytes

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


# --------------------------------------------------------------------------------------------
# --cpu: fp32 vs l2fx.load with the weights decoded per call / once.


def fixed_length_batch(entry, seq_len: int):
    """Batch 1 of ``entry``: an image, or for a token model one real paragraph of exactly
    ``seq_len`` tokens (the first calibration paragraph long enough to be truncated there)."""
    batch = entry.calib(1, 1, 1)[0]
    if not isinstance(batch, dict):
        return batch
    pool = entry.calib(64, 64, 1)[0]
    full = (pool["attention_mask"].sum(1) == seq_len).nonzero().flatten()
    if pool["input_ids"].shape[1] != seq_len or not len(full):
        raise SystemExit(f"{entry.name}: no calibration paragraph of {seq_len} tokens")
    return {k: v[full[:1]] for k, v in pool.items()}


def timed_interleaved(fns: dict, batch, repeats: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each ``fns[label](batch)``, one call of each per round
    (``warmup`` rounds untimed). CPU time is what the call itself ran: on a machine shared with
    other jobs it leaves out the time the scheduler gave them (with 2 threads it includes
    OpenMP's spin-waits)."""
    wall: dict[str, list[float]] = {label: [] for label in fns}
    cpu: dict[str, list[float]] = {label: [] for label in fns}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for label, fn in fns.items():
                c0, t0 = time.process_time(), time.perf_counter()
                call_model(fn, batch)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i >= warmup:
                    wall[label].append(dt)
                    cpu[label].append(dc)
    return wall, cpu


def codes_nbytes(model: torch.nn.Module) -> int:
    return sum(m.codes.numel() * m.codes.element_size() for m in model.modules() if isinstance(m, CodedWeight))


def run_cpu_model(name: str, args) -> list[dict]:
    entry = zoo.get(name)
    path = artifact_for(name, entry, Path(args.artifacts), args.target_cr, args.reconstruction)
    fp32 = entry.build().eval()
    per_call = l2fx.load(path, entry.build(), backend=BackendConfig(decode="per_call"))
    cache = l2fx.load(path, entry.build(), backend=BackendConfig(decode="cache"))
    fns = {"fp32": fp32, "l2fx per_call": per_call, "l2fx cache": cache}
    batch = fixed_length_batch(entry, args.seq_len)
    with torch.inference_mode():
        ref = output_vector(call_model(fp32, batch)).float()
        outs = {label: output_vector(call_model(fn, batch)).float() for label, fn in fns.items()}
    identical = bool(torch.equal(outs["l2fx per_call"], outs["l2fx cache"]))
    times, cpu_times = timed_interleaved(fns, batch, args.repeats, args.warmup)
    fp32_nbytes = sum(t.numel() * t.element_size() for t in fp32.state_dict().values())
    shape = {k: list(v.shape) for k, v in batch.items()} if isinstance(batch, dict) else list(batch.shape)
    rows = []
    for label, fn in fns.items():
        q = statistics.quantiles(times[label], n=4)
        ms = statistics.median(times[label]) * 1e3
        # Paired: this variant's time over fp32's in the same round, so a busy spell on a shared
        # machine that slows one round cancels out of its ratio.
        paired = statistics.median(t / f for t, f in zip(times[label], times["fp32"]))
        rows.append({"model": name, "batch": 1, "input": shape, "variant": label, "ms": ms,
                     "ms_p25": q[0] * 1e3, "ms_p75": q[2] * 1e3, "ms_min": min(times[label]) * 1e3,
                     "paired_ratio_vs_fp32": paired, "cpu_ms": statistics.median(cpu_times[label]) * 1e3,
                     "repeats": args.repeats,
                     "rel_error_vs_fp32": squared_error(outs[label], ref),
                     "cache_nbytes": decode_cache_nbytes(fn) if label != "fp32" else 0,
                     "codes_nbytes": codes_nbytes(fn) if label != "fp32" else 0,
                     "fp32_state_nbytes": fp32_nbytes, "per_call_cache_bit_identical": identical,
                     "artifact_nbytes": path.stat().st_size, "threads": torch.get_num_threads()})
        print(f"  {name:<20} {label:<14} {ms:9.3f} ms (p25 {q[0] * 1e3:.3f}, p75 {q[2] * 1e3:.3f}, paired "
              f"{paired:.3f}x)  "
              f"rel. error {rows[-1]['rel_error_vs_fp32']:.2e}  cache {rows[-1]['cache_nbytes']:,} B", flush=True)
    return rows


def cpu_markdown(rows: list[dict], command: str, note: str) -> str:
    lines = [f"Command: `{command}`", "", note, "",
             "| model | input | variant | median ms | p25-p75 ms | min ms | vs fp32 (medians) | vs fp32 (paired) "
             "| vs fp32 (min) | CPU ms (median) | vs fp32 (CPU) | rel. error vs fp32 | cache bytes | codes bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fp32_min = {r["model"]: r["ms_min"] for r in rows if r["variant"] == "fp32"}
    fp32_cpu = {r["model"]: r["cpu_ms"] for r in rows if r["variant"] == "fp32"}
    fp32 = {r["model"]: r["ms"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['variant']} | {r['ms']:.3f} | {r['ms_p25']:.3f}-{r['ms_p75']:.3f} "
                     f"| {r['ms_min']:.3f} | {r['ms'] / fp32[r['model']]:.3f}x | {r['paired_ratio_vs_fp32']:.3f}x "
                     f"| {r['ms_min'] / fp32_min[r['model']]:.3f}x | {r['cpu_ms']:.3f} "
                     f"| {r['cpu_ms'] / fp32_cpu[r['model']]:.3f}x "
                     f"| {r['rel_error_vs_fp32']:.2e} | {r['cache_nbytes']:,} | {r['codes_nbytes']:,} |")
    lines += ["", "Per_call and cache outputs bit-identical: "
              + ", ".join(f"{r['model']} {'yes' if r['per_call_cache_bit_identical'] else 'NO'}"
                          for r in rows if r["variant"] == "l2fx cache") + ".",
              "`vs fp32 (medians)`: ratio of the median times; `(paired)`: median over rounds of this variant's "
              "time over fp32's in the same round; `(min)`: ratio of the fastest calls; `CPU ms`: process CPU time "
              "of a call (lower is faster). The cache holds every coded weight decoded "
              "in the model's dtype, beside its int8 codes (the fp32 model's whole state_dict: "
              + ", ".join(f"{r['model']} {r['fp32_state_nbytes']:,} B" for r in rows if r["variant"] == "fp32") + ")."]
    return "\n".join(lines) + "\n"


def main_cpu(args) -> int:
    torch.set_num_threads(args.threads)
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    command = command_line()
    rows: list[dict] = []
    for name in args.models:
        rows += run_cpu_model(name, args)
    note = (f"CPU, fp32, batch 1, torch.set_num_threads({args.threads}), torch {torch.__version__}; "
            f"{args.warmup} warm-up rounds, median of {args.repeats} interleaved rounds. {args.note}").strip()
    text = cpu_markdown(rows, command, note)
    print(text)
    write_results(args.out, text, {"command": command, "note": note, "rows": rows})
    return 0


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
    p.add_argument("--cpu", action="store_true",
                   help="CPU, fp32, batch 1: fp32 vs l2fx decode='per_call' vs decode='cache'")
    p.add_argument("--threads", type=int, default=2, help="--cpu: torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=10, help="--cpu: untimed rounds first")
    p.add_argument("--seq-len", type=int, default=128, help="--cpu: tokens of the token models' input")
    p.add_argument("--note", default="", help="--cpu: a line on the machine (e.g. shared with other jobs)")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/latency[_cpu])")
    args = p.parse_args(argv)
    if args.cpu:
        if args.models == ["efficientnet-lite0", "minilm"]:
            args.models = ["efficientnet-lite0", "fmnist-resnet", "minilm"]
        args.out = args.out or str(RESULTS / "latency_cpu")
        return main_cpu(args)
    args.out = args.out or str(RESULTS / "latency")
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
