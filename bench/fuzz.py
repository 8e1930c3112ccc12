"""Fuzzes the artifact reader: N mutations of a good artifact, the outcome table.

    python bench/fuzz.py --mutations 100000            # about 40 ms a mutation on a free core
    python bench/fuzz.py --mutations 100000 --seconds 3600   # whatever an hour reaches, reported as such
    python bench/fuzz.py --mutations 2000 --tag quick
    python bench/fuzz.py --mutations 100000 --workers 2     # the same mutations, shared by two processes

Mutation classes and outcomes are those of ``tests/artifact_fuzz.py``: every file is loaded
(``l2fx.load`` into a fresh instance of the model) and inspected, under RLIMIT_DATA at the
data size the process has before each file plus ``--budget-mib``, with a wall-clock alarm of ``--timeout`` seconds as
the hang detector. Writes ``bench/results/fuzz[_TAG].md/.json``: per class and outcome, the
count; the failures in full (with the seed that reproduces each); the largest time a file took;
and the largest peak of numpy allocations a load made (tracemalloc, where every allocation the
file's sizes drive happens), as a multiple of the model's float32 bytes.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import resource
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

import l2fx  # noqa: E402
from _results import write_results  # noqa: E402
from artifact_fuzz import V3_RULES, CLASSES, Chooser, Parts, is_failure, mutate, outcome, state_of  # noqa: E402
from conftest import DictInputNet, make_tiny_convnet  # noqa: E402
from l2fx.config import CompileConfig, ReconstructionConfig, SensitivityConfig  # noqa: E402


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _data_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))


def make_corpus(tmp: Path, name: str) -> dict:
    """A good artifact to mutate: the tests' tiny ConvNet (captured by fx; "v3": with fc in MXFP4
    and group-wise convs, format version 3) or their DictInputNet (keyword inputs, captured by
    torch.export, so the manifest records its example inputs)."""
    config = CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=10),
                           reconstruction=ReconstructionConfig(enabled=False), layers=V3_RULES if name == "v3" else ())
    g = torch.Generator().manual_seed(0)
    if name in ("fx", "v3"):
        make, calib = make_tiny_convnet, torch.randn(16, 1, 28, 28, generator=g)
    else:
        def make():
            torch.manual_seed(0)
            return DictInputNet().eval()
        calib = {"input_ids": torch.randint(0, 200, (8, 12), generator=g), "attention_mask": torch.ones(8, 12)}
    path = tmp / f"good_{name}.l2fx"
    l2fx.save(l2fx.compile(make(), target_cr=8, calib=calib, config=config), path)
    l2fx.inspect(path)
    reference = state_of(l2fx.load(path, model=make()))
    tracemalloc.start()
    outcome(path, make, reference)
    baseline = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"name": name, "make": make, "reference": reference, "baseline_peak": baseline,
            "data": path.read_bytes(), "parts": Parts.of(path),
            "model_nbytes": 4 * sum(p.numel() for p in make().parameters())}


def _worker_share(args, tmp: Path, worker: int) -> dict:
    """One worker process (spawned: the parent's OpenMP state must not be forked): its own
    corpora, made as the parent makes them (same models, seeds and artifacts), then its share."""
    torch.set_num_threads(1)
    sub = tmp / f"worker_{worker}"
    sub.mkdir()
    corpora = [make_corpus(sub, name) for name in ("fx", "export", "v3")]
    return run_share(args, corpora, sub, worker, args.workers, time.perf_counter())


def run_share(args, corpora: list[dict], tmp: Path, worker: int, workers: int, t_start: float) -> dict:
    """Mutations ``worker, worker + workers, ...`` below ``args.mutations`` (each its own seed,
    ``args.seed * 1_000_000_007 + i``, so the set run does not depend on ``workers``)."""
    torch.set_num_threads(1)
    counts: dict[tuple[str, str], int] = collections.Counter()
    errors: dict[str, int] = collections.Counter()
    failures, slowest, peak_ratio = [], (0.0, ""), (0.0, "", 0.0)
    signal.signal(signal.SIGALRM, _alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    bad = tmp / f"mutated_{worker}.l2fx"
    done = 0
    for i in range(worker, args.mutations, workers):
        if args.seconds and time.perf_counter() - t_start > args.seconds:
            break
        done += 1
        seed = args.seed * 1_000_000_007 + i
        rng = np.random.default_rng(seed)
        u = rng.random()
        corpus = corpora[1] if u < args.export_share else corpora[2] if u < args.export_share + args.v3_share else corpora[0]
        cls, what, mutated = mutate(Chooser.from_rng(rng), corpus["data"], corpus["parts"])
        what = f"[{corpus['name']}] {what}"
        bad.write_bytes(mutated)
        tracemalloc.start()
        t0 = time.perf_counter()
        # The cap is re-armed per file: the process's data size drifts up over thousands of
        # loads (torch.export's caches), and what is bounded is what one file makes a load allocate.
        resource.setrlimit(resource.RLIMIT_DATA, (_data_size() + (args.budget_mib << 20), hard))
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
        try:
            result, detail = outcome(bad, corpus["make"], corpus["reference"])
        except Hang:
            result, detail = "hang", f"over {args.timeout} s"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if peak / corpus["baseline_peak"] > peak_ratio[0]:
            peak_ratio = (peak / corpus["baseline_peak"], f"{cls}: {what}", peak / corpus["model_nbytes"])
        if dt > slowest[0]:
            slowest = (dt, f"{cls}: {what}")
        counts[(cls, result)] += 1
        if result == "error":
            errors[detail.split(":")[1].strip()] += 1
        if is_failure(cls, result) or result == "hang":
            failures.append({"seed": seed, "class": cls, "mutation": what, "outcome": result, "detail": detail})
            print(f"FAILURE seed {seed}: {cls} ({what}): {result}: {detail}", flush=True)
        if done % max(1, 5000 // workers) == 0:
            print(f"worker {worker}: {done} mutations, {len(failures)} failures, {time.perf_counter() - t_start:.0f} s, "
                  f"data size {_data_size() >> 20} MiB", flush=True)
    return {"counts": counts, "errors": errors, "failures": failures, "slowest": slowest, "peak_ratio": peak_ratio,
            "done": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutations", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--tag", default="")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="stop after this many seconds (0: never) and report the mutations run by then")
    ap.add_argument("--export-share", type=float, default=0.05,
                    help="share of the mutations made of the export-captured corpus (its loads re-run torch.export)")
    ap.add_argument("--v3-share", type=float, default=0.3,
                    help="share made of the version-3 corpus (MXFP4 layer with E8M0 scales, group-wise convs)")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the mutations (the same ones, any count)")
    args = ap.parse_args()
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="l2fx-fuzz-"))
    t_start = time.perf_counter()
    if args.workers == 1:
        corpora = [make_corpus(tmp, name) for name in ("fx", "export", "v3")]
        parts = [run_share(args, corpora, tmp, 0, 1, time.perf_counter())]
    else:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            parts = pool.starmap(_worker_share, [(args, tmp, k) for k in range(args.workers)])
    counts: dict[tuple[str, str], int] = collections.Counter()
    errors: dict[str, int] = collections.Counter()
    for part in parts:
        counts.update(part["counts"])
        errors.update(part["errors"])
    failures = sorted((f for part in parts for f in part["failures"]), key=lambda f: f["seed"])
    slowest = max((part["slowest"] for part in parts), key=lambda x: x[0])
    peak_ratio = max((part["peak_ratio"] for part in parts), key=lambda x: x[0])
    done = sum(part["done"] for part in parts)

    outcomes = ["error", "identical", "different", "unexpected", "escaped", "hang"]
    rows = [f"| class | {' | '.join(outcomes)} | total |", "|---|" + "---|" * (len(outcomes) + 1)]
    for cls in CLASSES:
        n = [counts[(cls, o)] for o in outcomes]
        rows.append(f"| {cls} | {' | '.join(map(str, n))} | {sum(n)} |")
    total = [sum(counts[(c, o)] for c in CLASSES) for o in outcomes]
    rows.append(f"| **all** | {' | '.join(map(str, total))} | {sum(total)} |")
    stopped = (f" (stopped by --seconds {args.seconds:g} after {done:,} of {args.mutations:,})"
               if done < args.mutations else "")
    lines = [f"# Artifact fuzzing: {done:,} mutations{stopped}", "",
             f"`python bench/fuzz.py --mutations {args.mutations} --seed {args.seed} --v3-share {args.v3_share} "
             f"--export-share {args.export_share}{f' --seconds {args.seconds:g}' if args.seconds else ''}"
             f"{f' --workers {args.workers}' if args.workers > 1 else ''}` "
             f"({time.perf_counter() - t_start:.0f} s on this machine). Corpora: the tests' tiny ConvNet "
             f"(110k weights, fx; format version 2), for {args.v3_share:.0%} of the mutations the same with fc in "
             f"MXFP4 (E8M0 scales) and group-wise convs (version 3), and for {args.export_share:.0%} their DictInputNet "
             f"(13k weights, torch.export, keyword inputs), all at CR 8. 'different' is allowed for the content class only (weight-defining "
             f"values changed within the format's rules); a failure is any escaped or unexpected outcome, a hang, or "
             f"a different load outside the content class.", "", *rows, "",
             f"Failures: **{len(failures)}**. Slowest file: {slowest[0]:.2f} s ({slowest[1]}). Largest "
             f"allocation peak (tracemalloc: Python objects and numpy arrays) of a load and inspect: {peak_ratio[0]:.2f}x "
             f"that of the good file ({peak_ratio[2]:.1f}x its model's float32 bytes), for {peak_ratio[1]}. Every "
             f"file ran under RLIMIT_DATA at the start's data size + {args.budget_mib} MiB.", "",
             "Errors raised, by type:", "", *[f"- {k}: {v}" for k, v in errors.most_common()], ""]
    if failures:
        lines += ["## Failures", "", *[f"- seed {f['seed']}: {f['class']} ({f['mutation']}): {f['outcome']}: "
                                        f"{f['detail']}" for f in failures[:50]]]
    text = "\n".join(lines)
    print(text)
    write_results(ROOT / "bench" / "results" / ("fuzz" + (f"_{args.tag}" if args.tag else "")), text,
                  {"mutations": done, "requested": args.mutations, "seed": args.seed, "counts": {f"{c}/{o}": n for (c, o), n in counts.items()},
                   "failures": failures, "errors": dict(errors), "slowest_s": slowest[0],
                   "peak_traced_over_model": peak_ratio})


if __name__ == "__main__":
    main()
