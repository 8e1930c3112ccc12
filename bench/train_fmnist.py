"""Train a Fashion-MNIST zoo model from scratch and report its test accuracy.

    python bench/train_fmnist.py --model fmnist-cnn --epochs 2 --out /tmp/cnn.safetensors

Uses the same recipe as ``l2fx.zoo`` (``train_fmnist``); ``--out`` defaults to the zoo
cache file, so a run here also refreshes what ``zoo.get(name).build()`` loads. Prints one
table row and appends it as JSON to ``bench/results/train_fmnist.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

try:
    from l2fx import zoo
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from l2fx import zoo


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["fmnist-cnn", "fmnist-resnet"], default="fmnist-cnn")
    parser.add_argument("--epochs", type=int, default=None, help="default: the zoo recipe's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="safetensors file to write")
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).parent / "results" / "train_fmnist.jsonl")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model = zoo.train_fmnist(args.model, epochs=args.epochs, seed=args.seed)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = zoo.fmnist_accuracy(model)
    eval_s = time.perf_counter() - t0

    out = args.out or zoo._fmnist_weights_path(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))

    row = {
        "model": args.model,
        "epochs": args.epochs or zoo._FMNIST_RECIPES[args.model].epochs,
        "seed": args.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "test_accuracy": round(acc, 4),
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 2),
        "cpu_threads": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "weights": str(out),
    }
    print(f"{'model':<15}{'epochs':>7}{'params':>9}{'test acc':>10}{'train s':>9}{'eval s':>8}")
    print(f"{row['model']:<15}{row['epochs']:>7}{row['params']:>9}{acc:>10.4f}"
          f"{train_s:>9.1f}{eval_s:>8.2f}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
