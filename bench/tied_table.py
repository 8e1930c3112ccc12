"""How much of a decoder LLM's error is its tied embedding/output table: SmolLM2-135M with only
that table compressed, every other weight fp32.

    python bench/tied_table.py --bits 3 4 5 6

Per bit width: the table (``model.embed_tokens.weight``, read by the embedding and by
``lm_head``) on a per-row asymmetric min-max grid, rounded to nearest and solved by GPTQ on
``lm_head``'s input Hessian (``H = 2 X^T X / n`` over the calibration paragraphs' final hidden
states), then the zoo's evaluation against the fp32 model (perplexity ratio, top-1 agreement,
KL on held-apart paragraphs). Bits here are the grid's, not coded bits (range coding takes
fewer). Writes ``bench/results/tied_table_smollm2[_TAG].md/.json``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from l2fx.solvers import HessianAccumulator  # noqa: E402
from l2fx.solvers.gptq import gptq  # noqa: E402
from l2fx.solvers.grid import Grid  # noqa: E402
from l2fx.zoo import smollm2  # noqa: E402

from _results import RESULTS, command_line, write_results  # noqa: E402


@torch.no_grad()
def lm_head_hessian(model: torch.nn.Module, calib: list[dict]) -> torch.Tensor:
    """lm_head's input Hessian over the calibration batches (padding positions included, as the
    one-shot methods' Hessians are)."""
    acc = HessianAccumulator(model.lm_head.in_features)
    hook = model.lm_head.register_forward_pre_hook(lambda _m, args: acc.add(args[0].reshape(-1, args[0].shape[-1])))
    try:
        for batch in calib:
            model(**batch, use_cache=False)
    finally:
        hook.remove()
    return acc.hessian()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5, 6])
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-eval", type=int, default=32)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    reference = smollm2.build().eval()
    if reference.lm_head.weight is not reference.model.embed_tokens.weight:
        raise SystemExit("SmolLM2's lm_head is not tied to embed_tokens in this build")
    H = lm_head_hessian(reference, smollm2.calib(args.num_calib, args.batch_size, 0))
    W = reference.model.embed_tokens.weight.detach().clone()
    rows = []
    for bits in args.bits:
        grid = Grid.minmax(W, bits, symmetric=False)
        t0 = time.perf_counter()
        solved = gptq(W, H, grid, layer="model.embed_tokens.weight")
        gptq_s = time.perf_counter() - t0
        for solver, w_hat in (("rtn", grid.quantize_all(W)[0]), ("gptq", solved.w_hat)):
            model = copy.deepcopy(reference)
            with torch.no_grad():
                model.model.embed_tokens.weight.copy_(w_hat)  # the tied lm_head reads the same tensor
            metrics = smollm2.evaluate(model, reference=reference, num_eval=args.num_eval)
            rows.append({"bits": bits, "solver": solver, "metrics": metrics,
                         "solve_s": gptq_s if solver == "gptq" else None})
            print(f"{bits} bits {solver}: ppl x{metrics['ppl_ratio']:.4f}, agreement {metrics['top1_agreement']:.4f}, "
                  f"KL {metrics['kl_mean']:.4f}", flush=True)
    command = command_line()
    lines = ["# SmolLM2-135M: only the tied embedding/output table compressed", "", f"Command: `{command}`", "",
             f"{W.shape[0]} x {W.shape[1]} table ({W.numel():,} of "
             f"{sum(p.numel() for p in reference.parameters()):,} weights), per-row asymmetric min-max grid; "
             f"GPTQ on lm_head's input Hessian from {args.num_calib} calibration paragraphs; evaluation on "
             f"{args.num_eval} held-apart paragraphs against fp32 (perplexity {rows[0]['metrics']['ref_perplexity']:.4f}). "
             "Every other weight fp32. Weights were Q4_1 before packaging.", "",
             "| grid bits | solver | ppl / fp32 | top-1 agreement | KL nats |", "|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['solver']} | {r['metrics']['ppl_ratio']:.4f} | {r['metrics']['top1_agreement']:.4f} | "
              f"{r['metrics']['kl_mean']:.4f} |" for r in rows]
    out = RESULTS / ("tied_table_smollm2" + (f"_{args.tag}" if args.tag else ""))
    write_results(out, "\n".join(lines) + "\n", {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
