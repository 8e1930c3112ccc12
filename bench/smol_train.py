"""Training-aware SMOL (``l2fx.smol.train``) on the Fashion-MNIST CNN from its trained checkpoint,
beside post-training SMOL and L2 at the same counted bytes.

    nice python bench/smol_train.py --targets 8 12 16 --epochs 1 --finetune-epochs 1
    python bench/smol_train.py --targets 12 --variants smol --epochs 2 --finetune-epochs 2 --post smol l2

Each row runs in a fresh spawned process. ``train:<variant>`` rows: precision training (noise
injection, Eq. 12, on the cross-entropy over the 60k training images, reshuffled each epoch) for
``--epochs``, then fine-tuning at the rounded precisions (STE) for ``--finetune-epochs``, coded
at the target; ``post:<method>`` rows: ``l2fx.compile`` of the same checkpoint with
``--num-calib`` training images (post-training, no labels). Columns: compressed-parameter CR on
counted bytes (the precision map included), bpp, test accuracy (10k images, never trained on)
and agreement / KL against the fp32 checkpoint, the mean integer precision and the fraction at
zero, whether the artifact holds the fine-tuned weights bit for bit, and the time.
Writes ``bench/results/smol_train_fmnist-cnn[_TAG].md/.json``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import torch

import l2fx
from l2fx import zoo
from l2fx.zoo.fmnist import fmnist_tensors

from _results import RESULTS, command_line, write_results

MODEL = "fmnist-cnn"


class Batches:
    """The training split in batches of ``batch_size`` (x, y), a new seeded order every pass."""

    def __init__(self, batch_size: int, seed: int = 0, limit: int | None = None):
        self.x, self.y = fmnist_tensors("train")
        if limit:
            self.x, self.y = self.x[:limit], self.y[:limit]
        self.batch_size, self.seed, self.passes = batch_size, seed, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.passes)
        self.passes += 1
        perm = torch.randperm(len(self.x), generator=gen)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


def train_fp32(model: torch.nn.Module, data: Batches, epochs: int, opts: "l2fx.smol.SmolTrainConfig") -> torch.nn.Module:
    """The control: the fp32 checkpoint trained as long as ``l2fx.smol.train`` trains it (its
    epochs of both phases, the same Adam steps: ``lr_w`` x max|w| per weight tensor, ``lr_other``
    for the rest, eval mode), uncompressed: what the extra training alone gives."""
    import copy

    import torch.nn.functional as F
    model = copy.deepcopy(model).eval()
    groups = [{"params": [p], "lr": (opts.lr_w * float(p.detach().abs().max()) if p.dim() > 1 else opts.lr_other)}
              for p in model.parameters()]
    opt = torch.optim.Adam(groups)
    for _ in range(epochs):
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def run_row(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    entry = zoo.get(MODEL)
    model = entry.build()
    kind, name = job["row"].split(":")
    t0 = time.perf_counter()
    if kind == "control":
        opts = l2fx.smol.SmolTrainConfig(epochs=job["epochs"], finetune_epochs=job["finetune_epochs"])
        tuned = train_fp32(model, Batches(job["batch_size"]), job["epochs"] + job["finetune_epochs"], opts)
        return {**job, "cr": 1.0, "bpp": 32.0, "seconds": time.perf_counter() - t0,
                "metrics": entry.evaluate(tuned, reference=model)}
    try:
        if kind == "train":
            opts = l2fx.smol.SmolTrainConfig(per_layer=name == "smol-l", epochs=job["epochs"],
                                             finetune_epochs=job["finetune_epochs"], lam=job["lam"])
            compiled = l2fx.smol.train(model, Batches(job["batch_size"]), job["target"], options=opts)
        else:
            calib = entry.calib(job["num_calib"], 32, 0)
            compiled = l2fx.compile(model, job["target"], calib, method=name)
    except l2fx.L2fxError as exc:
        return {**job, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    seconds = time.perf_counter() - t0
    r = compiled.report
    numel = sum(layer.numel for layer in r.layers)
    row = {**job, "cr": r.compressed_cr, "bpp": 8.0 * r.compressed_nbytes / numel, "seconds": seconds,
           "metrics": entry.evaluate(compiled, reference=model)}
    rnd = r.records.get("smol_round")
    if rnd:
        row.update(mean_precision=rnd["mean_precision"], zero_fraction=rnd["zero_fraction"],
                   histograms={k: v["histogram"] for k, v in rnd["layers"].items()})
    st = r.records.get("smol_train")
    if st:
        row.update(artifact_is_finetuned=st["artifact_is_finetuned"], precision_losses=st["precision_epochs"],
                   finetune_losses=st["finetune_epochs"], learned_mean_precision=st["mean_learned_precision"],
                   fixed_used=st["final_rounding"]["fixed_used"])
    return row


def markdown(fp32: dict, rows: list[dict], command: str) -> str:
    lines = [f"# {MODEL}: training-aware SMOL vs post-training SMOL and L2 at matching counted bytes", "",
             f"Command: `{command}`", "",
             "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), "",
             "| row | target | CR counted | bpp | accuracy | top1_agreement | kl_mean | mean p | zero p | "
             "artifact = fine-tuned | train loss (precision / fine-tune, last epoch) | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['target']:g} | {r['error']} |" + " |" * 9)
            continue
        m = r["metrics"]
        smol = (f"{r['mean_precision']:.3f} | {r['zero_fraction']:.3f}" if "mean_precision" in r else " | ")
        losses = (f"{list(r['precision_losses'].values())[-1]:.4f} / {list(r['finetune_losses'].values())[-1]:.4f}"
                  if r.get("precision_losses") and r.get("finetune_losses") else "")
        lines.append(f"| {r['row']} | {r['target']:g} | {r['cr']:.3f} | {r['bpp']:.3f} | {m['accuracy']:.4f} | "
                     f"{m['top1_agreement']:.4f} | {m['kl_mean']:.4f} | {smol} | "
                     f"{r.get('artifact_is_finetuned', '')} | {losses} | {r['seconds']:.0f} |")
    lines += ["", "train:<v>: `l2fx.smol.train` (labels, whole epochs); post:<m>: `l2fx.compile` post-training "
              "on calibration images only; control:fp32: the checkpoint trained as many epochs with the same "
              "optimiser, uncompressed (what the extra training alone gives; its metrics against the checkpoint). mean p / zero p: mean integer precision of the stored weights and the "
              "fraction pruned (p = 0). artifact = fine-tuned: the file's weights are the fine-tuned model's "
              "quantised weights bit for bit."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="*", type=float, default=[8, 12, 16])
    p.add_argument("--variants", nargs="+", default=["smol", "smol-l"], choices=["smol", "smol-l"])
    p.add_argument("--post", nargs="*", default=["smol", "l2"], help="post-training methods to compare")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lam", type=float, default=l2fx.smol.SmolTrainConfig.lam)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-control", action="store_true", help="skip the fp32 model trained as long, uncompressed")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    command = command_line()
    entry = zoo.get(MODEL)
    fp32 = entry.evaluate(entry.build())
    out = RESULTS / (f"smol_train_{MODEL}" + (f"_{args.tag}" if args.tag else ""))
    ctx = multiprocessing.get_context("spawn")
    rows = []
    if not args.no_control:
        job = {"row": "control:fp32", "target": 1.0, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
               "lam": args.lam, "batch_size": args.batch_size, "num_calib": args.num_calib, "threads": args.threads}
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            rows.append(pool.apply(run_row, (job,)))
        print(markdown(fp32, rows[-1:], "").splitlines()[-3], flush=True)
    for target in args.targets:
        for row_name in [f"train:{v}" for v in args.variants] + [f"post:{m}" for m in args.post]:
            job = {"row": row_name, "target": target, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
                   "lam": args.lam, "batch_size": args.batch_size, "num_calib": args.num_calib,
                   "threads": args.threads}
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                row = pool.apply(run_row, (job,))
            rows.append(row)
            print(markdown(fp32, [row], "").splitlines()[-3], flush=True)
            write_results(out, markdown(fp32, rows, command), {"command": command, "fp32": fp32, "rows": rows})
    print(markdown(fp32, rows, command))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
