"""Fused dequant-matmul vs cuBLAS bf16 and vs dequantise-then-matmul (GPU benchmark).

    python bench/kernel_speed.py                      # on a CUDA machine: the issue's full grid
    python bench/kernel_speed.py --smoke              # CPU, TRITON_INTERPRET=1, tiny shapes: checks the script only

For every weight shape (N, K), batch M and bit width b: time y = x @ W^T with
  * ``fused``   : dequant_matmul(method="fused") on packed b-bit codes (joint transform): the
                  weight decoded in registers, never written,
  * ``decode``  : dequant_matmul(method="decode"): the Triton dequantize kernel writes W in
                  bf16, then cuBLAS (the default above FUSED_MAX_M rows),
  * ``cublas``  : torch.matmul(x_bf16, W_bf16^T) on a dense bf16 weight,
  * ``deq+mm``  : decode the codes with the torch reference, then torch.matmul in bf16,
with weights rotating through enough copies to exceed the 50 MB L2 cache (no cache hits), timed
by ``triton.testing.do_bench``. Reported as speed-ups over cuBLAS. Writes
``bench/results/kernels.{md,json}`` with the command. ``--smoke`` timings mean nothing: it
exists so the script's code paths are exercised where no GPU is available.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from _results import RESULTS, command_line, write_results

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096),
          # EfficientNet-Lite0 (1x1 convs as GEMM: N = out, K = in) and MiniLM linears.
          (1280, 320), (1152, 192), (192, 1152), (1000, 1280), (1536, 384), (384, 1536), (384, 384)]
BATCHES = [1, 16, 64, 256, 1024, 4096]
BITS = [3, 4, 8]
L2_BYTES = 50 * 2 ** 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (checks the script)")
    p.add_argument("--out", default=str(RESULTS / "kernels"))
    p.add_argument("--shapes", nargs="+", metavar="NxK", help="weight shapes (default: the full grid)")
    p.add_argument("--batches", nargs="+", type=int, help=f"batch sizes M (default {BATCHES})")
    p.add_argument("--bits", nargs="+", type=int, help=f"bit widths (default {BITS})")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from l2fx.triton_kernels.dequant_matmul import _decode_torch, dequant_matmul
    from l2fx.triton_kernels.packing import pack_codes, unpack_codes

    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        shapes, batches, bits_list = [(40, 70), (33, 64)], [1, 17], [3, 4]
    else:
        shapes, batches, bits_list = SHAPES, BATCHES, BITS
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in text.lower().split("x")) for text in args.shapes]
        except ValueError:
            p.error(f"--shapes takes NxK pairs such as 4096x4096, got {args.shapes}")
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            p.error(f"--shapes takes positive NxK pairs such as 4096x4096, got {args.shapes}")
    batches, bits_list = args.batches or batches, args.bits or bits_list
    if any(not 2 <= b <= 8 for b in bits_list) or any(m < 1 for m in batches):
        p.error("--bits must lie in 2..8 and --batches must be positive")
    dtype = torch.float32 if args.smoke else torch.bfloat16

    def bench(fn) -> float:
        if args.smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)

    command = command_line()
    device_name = "CPU (interpreter smoke run: timings meaningless)" if args.smoke else torch.cuda.get_device_name()

    def write(rows: list[dict], complete: bool) -> None:
        lines = [f"Command: `{command}` on {device_name}" + ("" if complete else " (partial: run cut short)"), "",
                 "| N | K | M | bits | fused ms | decode+cuBLAS ms | cuBLAS bf16 ms | deq+mm ms | fused vs cuBLAS "
                 "| decode vs cuBLAS | fused vs deq+mm |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['k']} | {r['m']} | {r['bits']} | {r['fused_ms']:.4f} | {r['decode_ms']:.4f} | "
                  f"{r['cublas_ms']:.4f} | {r['deq_mm_ms']:.4f} | {r['fused_vs_cublas']:.2f} | "
                  f"{r['decode_vs_cublas']:.2f} | {r['fused_vs_deq_mm']:.2f} |" for r in rows]
        write_results(args.out + ("_smoke" if args.smoke else ""), "\n".join(lines) + "\n",
                      {"command": command, "device": device_name, "complete": complete, "rows": rows})
        if complete:
            print("\n".join(lines))

    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for n, k in shapes:
        for bits in bits_list:
            qmax = 2 ** (bits - 1) - 1
            copies = 1 if args.smoke else max(2, -(-4 * L2_BYTES // (n * k * 2)))  # bf16 W copies > 4x L2
            packs, dense = [], []
            for _ in range(copies):
                q = torch.randint(-qmax, qmax + 1, (n, k), generator=g, dtype=torch.int16)
                packs.append(pack_codes(q, bits).to(device))
            step = (torch.rand(n, generator=g) * 0.01 + 0.001).to(device)
            thr = 0.6 * step
            for pk in packs:
                dense.append(_decode_torch(unpack_codes(pk).to(device), "joint", step, thr).to(dtype))
            for m in batches:
                x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
                state = {"i": 0}

                def nxt() -> int:
                    state["i"] = (state["i"] + 1) % copies
                    return state["i"]

                fused = bench(lambda: dequant_matmul(x, packs[nxt()], step, thr, "joint", method="fused"))
                decode = bench(lambda: dequant_matmul(x, packs[nxt()], step, thr, "joint", method="decode"))
                cublas = bench(lambda: torch.matmul(x, dense[nxt()].t()))
                deqmm = bench(lambda: torch.matmul(x, _decode_torch(unpack_codes(packs[nxt()]), "joint", step, thr)
                                                   .to(dtype).t()))
                row = {"n": n, "k": k, "m": m, "bits": bits, "fused_ms": fused, "decode_ms": decode,
                       "cublas_ms": cublas, "deq_mm_ms": deqmm, "fused_vs_cublas": cublas / fused,
                       "decode_vs_cublas": cublas / decode, "fused_vs_deq_mm": deqmm / fused}
                rows.append(row)
                print(f"N={n:<6} K={k:<6} M={m:<5} b={bits}: fused {fused:8.3f} ms  decode {decode:8.3f}  "
                      f"cuBLAS {cublas:8.3f}  deq+mm {deqmm:8.3f}", flush=True)
                write(rows, complete=False)  # a run cut short still leaves its rows
    write(rows, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
