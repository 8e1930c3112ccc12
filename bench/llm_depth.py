"""Compile time and peak memory against depth: a randomly initialised Llama (``LlamaForCausalLM``,
TinyLlama-1.1B's widths by default: hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocabulary
32000; 22 layers are 1.1 B parameters) built at several depths and compiled with a one-shot
method, each depth in a fresh process (spawned) so its peak RSS is its own.

    nice -n 10 python bench/llm_depth.py --depths 8 16 22
    nice -n 10 python bench/llm_depth.py --depths 22 --dtype bfloat16 --append
    python bench/llm_depth.py --depths 2 4 --hidden 512 --intermediate 1408   # a quick look

Weights are random: the rows measure time and memory, not quality. Calibration is
``--num-calib`` random token sequences of ``--seq-len`` tokens. The method's sensitivity analysis
runs with ``scope="layer"`` (``SensitivityConfig``: one run of the model, each weight's error at
its readers' outputs; the default ``"model"`` scope re-runs the model downstream of every weight,
O(depth^2)); ``--scope model`` measures that instead. Per row: parameters, the model's bytes in the
caller's dtype (``--dtype``; the caller's model stays in memory, unmodified) and in fp32 (l2fx's
working copy: cast for another dtype, copied on write for float32, so it costs only what the
passes rewrite), the process's peak RSS, the peak less the caller's model (what the compile
adds), compile seconds and seconds per layer, the
slowest passes and the steps that raised the peak (``CompressionReport.pass_peak_rss_mib``).
``--append`` adds rows to the tag's results file (e.g. a bfloat16 row beside float32 ones).

Writes ``bench/results/llm_depth[_TAG].{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time

import torch

from _results import RESULTS, command_line, write_results


def llama(depth: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int):
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=depth,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_row(job: dict) -> dict:
    import l2fx

    torch.set_num_threads(job["threads"] or torch.get_num_threads())
    model = llama(job["depth"], job["hidden"], job["intermediate"], job["heads"], job["kv_heads"], job["vocab"])
    model = model.to(DTYPES[job["dtype"]])  # the caller's copy; l2fx compresses a float32 copy of its own
    params = sum(p.numel() for p in model.parameters())
    model_nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, job["vocab"], (job["batch_size"], job["seq_len"]), generator=g)}
             for _ in range(job["num_calib"] // job["batch_size"])]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = l2fx.CompileConfig(transform=l2fx.TransformKind(job["transform"]), sensitivity=l2fx.SensitivityConfig(scope=job["scope"], num_samples=job["sens_samples"],
                                                                   measured_points=1, deadzones=(0.5,)))
    t0 = time.perf_counter()
    compiled = l2fx.compile(model, job["target"], calib, method=job["method"], config=config)
    compile_s = time.perf_counter() - t0
    r = compiled.report
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slowest = sorted(r.pass_seconds.items(), key=lambda kv: -kv[1])[:4]
    steps = list(r.pass_peak_rss_mib.items())  # the high-water mark after each step: the rises say who set it
    rises = sorted(((name, mib - (steps[i - 1][1] if i else rss_before)) for i, (name, mib) in enumerate(steps)),
                   key=lambda kv: -kv[1])[:3]
    return {**job, "params": params, "model_mib": model_nbytes / 2 ** 20, "rss_before_compile_mib": rss_before,
            "peak_rss_mib": peak, "compile_s": compile_s, "cr": r.compressed_cr, "layers_coded": len(r.layers),
            "pass_seconds": r.pass_seconds, "slowest": slowest,
            "pass_peak_rss_mib": r.pass_peak_rss_mib, "peak_rises": rises}


def markdown(rows: list[dict], command: str) -> str:
    j = rows[0]
    lines = ["# Compile time and peak memory against depth: random Llama", "",
             f"Command: `{command}` ({os.cpu_count()} CPU cores, shared; torch threads {j['threads'] or 'default'})", "",
             f"Widths: hidden {j['hidden']}, MLP {j['intermediate']}, heads {j['heads']} / KV {j['kv_heads']}, "
             f"vocabulary {j['vocab']}, untied lm_head; random weights. Method `{j['method']}` at CR {j['target']:g} "
             f"(transform {j['transform']}), "
             f"sensitivity scope `{j['scope']}` ({j['sens_samples']} sample(s), 1 measured point, no dead zone); "
             f"calibration {j['num_calib']} random sequences of {j['seq_len']} tokens in batches of {j['batch_size']}.",
             "", "| layers | caller's dtype | parameters | model MiB (caller's dtype) | model fp32 MiB | peak RSS MiB | "
             "peak RSS - caller's model MiB | compile s | "
             "s per layer | CR coded | slowest passes (s) | steps raising the peak (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['depth']} | {r.get('dtype', 'float32')} | {r['error']} |" + " |" * 9)
            continue
        slow = ", ".join(f"{k} {v:.0f}" for k, v in r["slowest"])
        rises = ", ".join(f"{k} +{v:.0f}" for k, v in r.get("peak_rises", []) if v > 0)
        fp32_mib = r["params"] * 4 / 2 ** 20
        lines.append(f"| {r['depth']} | {r.get('dtype', 'float32')} | {r['params'] / 1e6:.0f} M | {r['model_mib']:.0f} | "
                     f"{fp32_mib:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['model_mib']:.0f} | "
                     f"{r['compile_s']:.0f} | {r['compile_s'] / r['depth']:.1f} | "
                     f"{r['cr']:.2f} | {slow} | {rises} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", nargs="+", type=int, default=[4, 8, 16, 22])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--method", default="gptq")
    p.add_argument("--target", type=float, default=8.0)
    p.add_argument("--scope", choices=["layer", "model"], default="layer")
    p.add_argument("--transform", default="linear", help="CompileConfig.transform (GPTQ's grid is linear)")
    p.add_argument("--sens-samples", type=int, default=2)
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the caller's model's dtype")
    p.add_argument("--tag", default="")
    p.add_argument("--append", action="store_true", help="add the rows to the tag's results file")
    args = p.parse_args()
    base = {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab", "method", "target",
                                         "scope", "transform", "sens_samples", "num_calib", "batch_size", "seq_len",
                                         "threads", "dtype")}
    out = RESULTS / ("llm_depth" + (f"_{args.tag}" if args.tag else ""))
    rows, command = [], command_line()
    if args.append:  # rows of an earlier run of this tag first (each row says its own settings)
        rows = json.loads(out.with_name(out.name + ".json").read_text())["rows"]
        command = json.loads(out.with_name(out.name + ".json").read_text())["command"] + "; " + command
    ctx = multiprocessing.get_context("spawn")
    for depth in args.depths:
        job = {**base, "depth": depth}
        with ctx.Pool(1) as pool:
            try:
                row = pool.apply(run_row, (job,))
            except Exception as exc:  # an L2fxError or a worker killed for memory: the row says which
                row = {**job, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        rows.append(row)
        print(markdown(rows, command).splitlines()[-1], flush=True)
        write_results(out, markdown(rows, command), {"command": command, "rows": rows})
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
