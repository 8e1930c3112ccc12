"""EfficientNet-Lite0: how much the calibration photos, not the method, limit fidelity.

    python bench/lite0_calibration.py --target 10 --num-calib 256
    python bench/lite0_calibration.py --target 10 --set reconstruction.weight_radius=0.25 --tag r025

The standard Lite0 benchmark (``bench/quality.py``) calibrates on crops of 16 generic photos
(sklearn/skimage: textures, astronomy, microscopy, a cat, ...) and evaluates on the 20
labelled ImageNet photos: calibration data unlike the deployment data. The paper calibrates
on 1024 ImageNet training images. No such set is offline here, so this script compares, at
one target CR and the default config:

* **generic**: the standard calibration, evaluated on every view;
* **ImageNet 2-fold**: two compiles, each calibrated on crops of half the labelled photos
  (``zoo.lite0_fold_calib``), each evaluated on the views of the *other* half (unseen photos)
  and, as a memorisation check, on other views of its own half (seen photos). The pooled row
  evaluates every view once, by the compile that never saw its photo.

Beside them, RTN int8 per channel (the issue's fidelity bar). Writes
``bench/results/lite0_calibration_cr<target>.{md,json}``.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import l2fx
from l2fx import zoo
from l2fx.cli import apply_settings
from l2fx.config import CompileConfig
from l2fx.method import rtn_pipeline

from _results import RESULTS, command_line, write_results

FOLDS = 2


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i: i + 50]).float() for i in range(0, len(x), 50)])


def row(calibration: str, evaluated: str, out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
        compiled=None, seconds: float | None = None) -> dict:
    fid = zoo.classifier_fidelity(out[mask], ref[mask])
    r = {"calibration": calibration, "evaluated_on": evaluated, "views": int(mask.sum()), **fid,
         "cr": compiled.report.compressed_cr if compiled is not None else None,
         "file_cr": compiled.report.file_cr if compiled is not None else None, "compile_s": seconds}
    print(f"  {calibration:<34} {evaluated:<34} views {r['views']:3d}  "
          + "  ".join(f"{k} {v:.4f}" for k, v in fid.items()), flush=True)
    return r


def markdown(target: float, num_calib: int, rows: list[dict], command: str, settings: list[str]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    config = "config " + ", ".join(settings) if settings else "default config"
    lines = [f"## EfficientNet-Lite0 at target CR {target:g}: calibration photos", "",
             f"Command: `{command}`", "",
             f"{num_calib} calibration crops per compile, {config}. Agreement and KL against fp32 "
             "on the 5 views of each labelled photo (`zoo.lite0_eval_views`).", "",
             "| calibration | evaluated on | views | top-1 agreement | top-5 agreement | mean KL | CR (weights) "
             "| CR (file) | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['calibration']} | {r['evaluated_on']} | {r['views']} | {r['top1_agreement']:.2f} | "
                     f"{r['top5_agreement']:.2f} | {r['kl_mean']:.4f} | {num(r['cr'], '.3f')} | "
                     f"{num(r['file_cr'], '.3f')} | {num(r['compile_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=10.0)
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-generic", action="store_true", help="only the ImageNet folds (and RTN int8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a CompileConfig field for the L2 compiles, as in `l2fx compress --set` (repeatable)")
    p.add_argument("--tag", default="", help="suffix for the result files")
    args = p.parse_args(argv)
    command = command_line()
    config = apply_settings(CompileConfig(target_cr=args.target), args.set)
    entry = zoo.get("efficientnet-lite0")
    model = entry.build()
    x, _, _ = zoo.lite0_eval_views()
    photo = torch.arange(len(x)) // (len(x) // len(zoo.imagenet_photos()))
    ref = logits(model, x)
    everything = torch.ones(len(x), dtype=torch.bool)
    out = RESULTS / (f"lite0_calibration_cr{args.target:g}" + (f"_{args.tag}" if args.tag else ""))
    rows: list[dict] = []

    def add(r: dict) -> None:  # written after every row: a stopped run keeps what it measured
        rows.append(r)
        write_results(out, markdown(args.target, args.num_calib, rows, command, args.set),
                      {"command": command, "target_cr": args.target, "num_calib": args.num_calib,
                       "config": config.to_dict(), "rows": rows})

    calib = entry.calib(args.num_calib, args.batch_size, 0)
    rtn = l2fx.compile(model, target_cr=4.0, calib=calib, pipeline=rtn_pipeline(8))
    add(row("RTN int8 per channel (no calibration)", "all photos", logits(rtn, x), ref, everything, rtn))

    if not args.skip_generic:
        t0 = time.perf_counter()
        compiled = l2fx.compile(model, target_cr=args.target, calib=calib, config=config)
        seconds = time.perf_counter() - t0
        y = logits(compiled, x)
        add(row("generic: 16 sklearn/skimage photos", "all photos", y, ref, everything, compiled, seconds))
        for fold in range(FOLDS):
            in_fold = zoo.lite0_fold_photos(fold, FOLDS)[photo]
            add(row("generic: 16 sklearn/skimage photos", f"fold-{fold} photos", y, ref, in_fold, compiled, seconds))

    pooled = torch.empty_like(ref)
    for fold in range(FOLDS):
        fold_photos = zoo.lite0_fold_photos(fold, FOLDS)
        in_fold = fold_photos[photo]
        t0 = time.perf_counter()
        compiled = l2fx.compile(model, target_cr=args.target, config=config,
                                calib=zoo.lite0_fold_calib(fold, args.num_calib, args.batch_size, 0, FOLDS))
        seconds = time.perf_counter() - t0
        y = logits(compiled, x)
        pooled[~in_fold] = y[~in_fold]
        label = f"ImageNet fold {fold}: {int(fold_photos.sum())} labelled photos"
        add(row(label, "other photos (unseen)", y, ref, ~in_fold, compiled, seconds))
        add(row(label, "own photos, eval views (seen)", y, ref, in_fold, compiled, seconds))
    add(row(f"ImageNet {FOLDS}-fold, pooled", "all photos, each by the compile that never saw it",
            pooled, ref, everything))
    print(markdown(args.target, args.num_calib, rows, command, args.set))
    return 0


if __name__ == "__main__":
    sys.exit(main())
