"""Compile time and peak memory of the default pipeline on a ResNet-18-size model (issue goal:
under 3 minutes on one GPU at 224 px, 1000 calibration inputs, CR 12; the paper reports about
10 minutes on a V100).

    python bench/compile_time.py                          # CUDA if present, else CPU
    python bench/compile_time.py --model efficientnet-lite0 --num-calib 1000
    python bench/compile_time.py --smoke                  # CPU, 16 inputs, 2+2 iterations: checks the script

``resnet18`` is torchvision's architecture with random (seeded) weights: no pretrained
ResNet-18 is available offline, and compile time does not depend on the weights' values.
Calibration inputs are 224 px crops of real photos (the zoo's EfficientNet-Lite0 calibration
set). Reports the total and per-pass seconds, peak RSS and peak CUDA memory; writes
``bench/results/compile_time.{md,json}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

import l2fx
from l2fx import zoo
from l2fx.config import CompileConfig

from _results import RESULTS, command_line, write_results


def build(name: str) -> torch.nn.Module:
    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval()
    return zoo.get(name).build()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--target-cr", type=float, default=12.0)
    p.add_argument("--num-calib", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "compile_time"))
    args = p.parse_args(argv)
    config = CompileConfig()
    if args.smoke:
        args.num_calib, args.batch_size, args.device = 16, 8, "cpu"
        config = config.replace(reconstruction=dataclasses.replace(config.reconstruction, transform_iters=2,
                                                                   weight_iters=2, batch_size=4))
    device = torch.device(args.device)
    calib = [b.to(device) for b in zoo.get("efficientnet-lite0").calib(args.num_calib, args.batch_size, 0)]
    model = build(args.model).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    compiled = l2fx.compile(model, target_cr=args.target_cr, calib=calib, config=config, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    r = compiled.report
    row = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "num_calib": args.num_calib, "target_cr": args.target_cr, "cr": r.compressed_cr, "compile_s": seconds,
           "pass_seconds": r.pass_seconds, "peak_rss_mib": r.peak_rss_mib,
           "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
           "weights": sum(layer.numel for layer in r.layers)}
    command = command_line()
    lines = [f"Command: `{command}`", "",
             f"{args.model} ({row['weights']:,} compressed weights) on {row['device']}, {args.num_calib} calibration "
             f"inputs at 224 px, target CR {args.target_cr:g} (reached {r.compressed_cr:.3f}): **{seconds:.1f} s**, "
             f"peak RSS {r.peak_rss_mib:.0f} MiB" + (f", peak CUDA {row['peak_cuda_mib']:.0f} MiB"
                                                      if row["peak_cuda_mib"] is not None else ""), "",
             "| pass | s |", "|---|---|"]
    lines += [f"| {name} | {s:.1f} |" for name, s in r.pass_seconds.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, text, {"command": command, **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
