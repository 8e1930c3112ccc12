"""Robustness across architectures: every torchvision classifier compiles, runs, saves and loads.

    python bench/architectures.py
    python bench/architectures.py --models mobilenet_v2 vgg11 --target 8

Each model is built with random weights (no hub offline; what is measured is that the
pipeline handles the architecture, not accuracy), in eval mode, and compiled at ``--target``
on a few random calibration images with a reduced sensitivity grid and few reconstruction
steps. Per model: the CR reached, the relative output error on a calibration batch with and
without block reconstruction (reconstruction must not make it worse), whether a save/load
round trip reproduces the outputs bit for bit, compile seconds and the process's peak RSS.
A model that fails is a row with the error, and the script goes on. Writes
``bench/results/architectures.{md,json}``.

Found this way (2026-11-27): depthwise nets at a small activation scale blowing up in
reconstruction (MobileNetV2: relative error 4e11), and VGG-11 killed at 24 GB in sensitivity
analysis (see ``docs/architecture.md``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import l2fx
from l2fx.config import CompileConfig, ReconstructionConfig, SensitivityConfig
from l2fx.pipeline import peak_rss_mib

from _results import RESULTS, command_line, write_results

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "squeezenet1_0", "shufflenet_v2_x0_5",
          "densenet121", "googlenet", "mnasnet0_5", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
          "alexnet", "vgg11", "vit_b_16", "swin_t"]
NEEDS_224 = ("vit", "swin", "maxvit")


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def measure(name: str, target: float, num_calib: int) -> dict:
    size = 224 if name.startswith(NEEDS_224) else 64
    model = build(name)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(2, 3, size, size, generator=gen) for _ in range(max(1, num_calib // 2))]
    with torch.no_grad():
        ref = model(calib[0])
    row = {"model": name, "input": size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    base = CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=12))
    for rec in (False, True):
        cfg = base.replace(reconstruction=ReconstructionConfig(enabled=rec, transform_iters=5, weight_iters=20))
        t0 = time.perf_counter()
        compiled = l2fx.compile(model, target, calib, config=cfg)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            out = compiled(calib[0])
        row["err_recon" if rec else "err_plain"] = float((out - ref).pow(2).sum() / ref.pow(2).sum())
        if rec:
            row["cr"], row["file_cr"], row["compile_s"] = compiled.report.compressed_cr, compiled.report.file_cr, seconds
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "m.l2fx"
                l2fx.save(compiled, path)
                with torch.no_grad():
                    row["reload_exact"] = bool(torch.equal(l2fx.load(path, build(name))(calib[0]), out))
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def markdown(rows: list[dict], command: str, target: float) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"## torchvision architectures at target CR {target:g} (random weights)", "",
             f"Command: `{command}`", "",
             "Relative output error on a calibration batch (squared error over the reference's squared norm: "
             "random-weight nets give near-identical outputs for every input, so not over its variance); "
             "peak RSS is the process's high-water mark so far (models run in order).", "",
             "| model | params M | input | CR | file CR | error, no reconstruction | error, reconstruction "
             "| reload exact | compile s | peak RSS MiB | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {num(r.get('params_m'), '.1f')} | {r.get('input', '-')} | {num(r.get('cr'), '.2f')} "
                     f"| {num(r.get('file_cr'), '.2f')} | {num(r.get('err_plain'), '.3g')} | {num(r.get('err_recon'), '.3g')} "
                     f"| {r.get('reload_exact', '-')} | {num(r.get('compile_s'), '.0f')} | {num(r.get('peak_rss_mib'), '.0f')} "
                     f"| {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="torchvision model names")
    p.add_argument("--target", type=float, default=8.0)
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--tag", default="", help="suffix for the result files")
    args = p.parse_args(argv)
    command = command_line()
    out = RESULTS / ("architectures" + (f"_{args.tag}" if args.tag else ""))
    rows = []
    for name in args.models:
        try:
            row = measure(name, args.target, args.num_calib)
        except Exception as e:  # noqa: BLE001 - a failing architecture is a result, not the end of the run
            row = {"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}".replace("|", "/").replace("\n", " ")}
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in row.items() if k != "model"), flush=True)
        write_results(out, markdown(rows, command, args.target), {"command": command, "target_cr": args.target,
                                                                  "rows": rows})
    print(markdown(rows, command, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
