"""The allocation's additivity assumption, checked: predicted vs measured joint error, and what
the interaction correction (``SensitivityConfig.joint_rounds``) does to fidelity.

    python bench/joint.py --models fmnist-resnet --targets 12 15 20
    python bench/joint.py --models efficientnet-lite0 --targets 10 --rounds 2 --reconstruction

For each (model, target): one compile with ``joint_rounds=0`` and one with ``--rounds`` (the
method's default pipeline otherwise; L2 without block reconstruction unless ``--reconstruction``,
so the allocation's effect is not hidden by fine-tuning). Columns: the summed per-layer
distortions the allocation predicted, the joint error measured on the same sensitivity samples
(all layers compressed), each round's re-allocation and whether it was kept, and the zoo's task
metrics on held-apart data. Each compile in its own spawned process (``bench/methods.py``'s
``run_row``). Writes ``bench/results/joint_<model>[_TAG].md/.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import l2fx  # noqa: E402
from l2fx import zoo  # noqa: E402
from l2fx.cli import apply_settings  # noqa: E402

from _results import RESULTS, command_line, write_results  # noqa: E402
from methods import run_row  # noqa: E402


def markdown(model: str, fp32: dict, rows: list[dict], command: str) -> str:
    keys = sorted({k for r in rows if "metrics" in r for k in r["metrics"]})
    lines = [f"# {model}: additive prediction vs measured joint error, and the interaction correction", "",
             f"Command: `{command}`", "", "fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp32.items()), "",
             "Predicted: the allocation's summed per-layer output errors (additive); measured: all layers "
             "compressed at the picks, on the same sensitivity samples; rounds: measured after each re-allocation "
             "(kept / dropped).", "",
             "| target | rounds | CR coded | predicted | measured | rounds (measured) | " + " | ".join(keys) + " | compile s |",
             "|---|---|---|---|---|---|" + "---|" * len(keys) + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['target']:g} | {r['rounds']} | {r['error']} |" + " |" * (len(keys) + 4))
            continue
        joint = r["allocation"].get("joint")
        pred = r["allocation"].get("predicted_distortion", float("nan"))
        if joint:
            first = joint["rounds"][0]
            measured = f"{first['measured']:.4g}"
            trail = ", ".join(f"{x['trial_measured']:.4g} ({'kept' if x['accepted'] else 'dropped'})"
                              for x in joint["rounds"])
            pred = first["predicted"]
        else:
            measured, trail = "", ""
        vals = " | ".join(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys)
        lines.append(f"| {r['target']:g} | {r['rounds']} | {r['cr']:.3f} | {pred:.4g} | {measured} | {trail} | {vals} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fmnist-resnet"])
    p.add_argument("--targets", nargs="+", type=float, default=[12, 15, 20])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--method", default="l2")
    p.add_argument("--reconstruction", action="store_true")
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any CompileConfig field")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    base = apply_settings(l2fx.CompileConfig(reconstruction=l2fx.ReconstructionConfig(enabled=args.reconstruction)),
                          args.set)
    command = command_line()
    ctx = multiprocessing.get_context("spawn")
    for name in args.models:
        entry = zoo.get(name)
        fp32 = entry.evaluate(entry.build())
        out = RESULTS / (f"joint_{name}" + (f"_{args.tag}" if args.tag else ""))
        rows = []
        for target in args.targets:
            for rounds in (0, args.rounds):  # 0: the allocation as it is (nothing measured)
                config = base.replace(sensitivity=dataclasses.replace(base.sensitivity, joint_rounds=rounds))
                job = {"model": name, "method": args.method, "target": target, "num_calib": args.num_calib,
                       "batch_size": args.batch_size, "config": config.to_json()}
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    row = {**pool.apply(run_row, (job,)), "rounds": rounds}
                rows.append(row)
                print(markdown(name, fp32, [row], "").splitlines()[-1], flush=True)
                write_results(out, markdown(name, fp32, rows, command), {"command": command, "fp32": fp32, "rows": rows})
        print(markdown(name, fp32, rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
