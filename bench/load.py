"""Load throughput: decoding the artifact's range-coded chunks, and the whole ``l2fx.load``.

For each model: compress with per-channel RTN at ``--bits`` (fast to make; the artifact format
and the symbol statistics are those of any l2fx artifact), save, then time

* decode: every coded tensor of the file through ``coding.decode_symbols``, with
  constriction (serial, it holds the GIL) and with the numba decoder on 1 and on all threads;
* recapture: tracing the caller's architecture again (fx or torch.export), which ``l2fx.load``
  does while worker threads decode;
* load: the whole ``l2fx.load`` (read and check the file, recapture the architecture, decode,
  rebuild the modules) into a fresh instance.

Each figure is the minimum over ``--repeats`` runs (the first numba call also compiles the
decoder, or loads it from numba's cache: reported separately as "first call").

    python bench/load.py                       # MiniLM and EfficientNet-Lite0 at 4 bits
    python bench/load.py --models minilm --bits 3 --repeats 7

Writes ``bench/results/load.{md,json}`` with the command that made them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import l2fx
from l2fx import coding, rangedec, zoo
from l2fx.artifact import ArtifactReader
from l2fx.frontend import CaptureInfo, recapture
from l2fx.method import rtn_pipeline

from _results import RESULTS, command_line, write_results


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_model(name: str, bits: int, repeats: int) -> list[dict]:
    entry = zoo.get(name)
    model = entry.build()
    calib = entry.calib(8, 8, 0)
    compiled = l2fx.compile(model, target_cr=4.0, calib=calib, pipeline=rtn_pipeline(bits))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.l2fx"
        file_nbytes = l2fx.save(compiled, path)
        streams = [stream for _, stream, _, _ in ArtifactReader(path).streams()]
        numel = sum(s.numel for s in streams)
        payload = sum(s.payload_nbytes for s in streams)
        common = {"model": name, "bits": bits, "weights": numel, "tensors": len(streams),
                  "bits_per_weight": 8 * payload / numel, "file_nbytes": file_nbytes}

        def decode(decoder: str, threads: int | None):  # all layers in one call, as l2fx.load does
            return lambda: coding.decode_streams(streams, threads=threads, decoder=decoder)

        cases = [("decode", "constriction", 1)]
        if rangedec.available():
            t0 = time.perf_counter()
            decode("numba", 1)()
            rows.append({**common, "step": "decode", "decoder": "numba (first call)", "threads": 1,
                         "seconds": time.perf_counter() - t0})
            cases += [("decode", "numba", 1), ("decode", "numba", os.cpu_count() or 1)]
        for step, decoder, threads in cases:
            seconds = best_of(decode(decoder, threads), repeats)
            rows.append({**common, "step": step, "decoder": decoder, "threads": threads, "seconds": seconds})
        instance = entry.build()
        reader = ArtifactReader(path)
        info = CaptureInfo.from_dict(reader.manifest["capture"])
        seconds = best_of(lambda: recapture(instance, info), repeats)
        rows.append({**common, "step": "recapture", "decoder": "-", "threads": 1, "seconds": seconds})
        seconds = best_of(lambda: l2fx.load(path, instance), repeats)
        rows.append({**common, "step": "l2fx.load", "decoder": "numba" if rangedec.available() else "constriction",
                     "threads": os.cpu_count() or 1, "seconds": seconds})
    for row in rows:
        row["weights_per_s"] = row["weights"] / row["seconds"]
        print(f"  {name:<20} {row['step']:<10} {row['decoder']:<20} threads {row['threads']}  "
              f"{row['seconds'] * 1e3:8.1f} ms  {row['weights_per_s'] / 1e6:7.1f} M weights/s", flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}` ({os.cpu_count()} CPU cores)", "",
             "| model | weights | tensors | bits/weight | step | decoder | threads | ms | M weights/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights']:,} | {r['tensors']} | {r['bits_per_weight']:.2f} | {r['step']} | "
                     f"{r['decoder']} | {r['threads']} | {r['seconds'] * 1e3:.1f} | {r['weights_per_s'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "efficientnet-lite0"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "load"))
    args = p.parse_args(argv)
    command = command_line()
    rows: list[dict] = []
    for name in args.models:
        rows += run_model(name, args.bits, args.repeats)
    text = markdown(rows, command)
    print(text)
    write_results(args.out, text, {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
