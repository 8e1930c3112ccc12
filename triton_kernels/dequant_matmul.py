"""Fused dequantise + matmul: ``y[M, N] = x[M, K] @ W[N, K]^T + bias`` with ``W`` decoded in
registers from packed integer codes (see :mod:`.packing`) and ``step_s``, ``threshold_e`` per
output channel (``[N]``) or per group of ``g`` consecutive codes of each row (``[N, ceil(K/g)]``,
``group=g``: loaded with each weight tile; the "linear" kind then decodes in the tile too).

One kernel family per file (STYLE.md), in the fixed order below; that is why it runs past 400
lines.

Decoding ``W = T^-1(q)`` (the inverse transforms of the paper, Eq. 13 for "joint"), with
``s = step_s[n]``, ``e = threshold_e[n]`` of the weight's output row ``n``:

    ==========  =====================================================================
    kind        W
    ==========  =====================================================================
    "linear"    ``q * s``
    "joint"     ``0 if q == 0 else sign(q) * ((|q| - 0.5) * s + e)``
    "prune"     same as "joint"
    "log"       ``sign(q) * e * (exp(|q| * s / e) - 1)``     (needs ``e > 0``)
    "exp"       ``sign(q) * e * ln(1 + |q| * s / e)``        (needs ``e > 0``)
    MX FP       ``sign(q) * V[|q|] * s``: V the element format's values (``mxfp8_e4m3`` ...
                ``mxfp4_e2m1``), decoded from |q|'s exponent and mantissa bits
    ==========  =====================================================================

File layout (STYLE.md): autotune configs, ``_dequant_matmul_kernel``, launcher
:func:`dequant_matmul`, pure-torch :func:`dequant_matmul_ref`, op registration
(``torch.ops.l2fx.dequant_matmul``), then the 1x1-conv wrapper.

Design.  :func:`dequant_matmul` runs the fused kernel below for up to ``FUSED_MAX_M`` rows of
x and otherwise ``dequantize`` (a memory-bound Triton kernel writing the dense weight once)
followed by cuBLAS: measured on an H100 (``bench/results/gpu/kernels_before.md``), the fused
GEMM regime ran at 0.03-0.08x cuBLAS for 256-4096 rows, decoding each weight tile once per
row tile. The fused kernel serves both regimes when asked (``method="fused"``):

* GEMM (``M > 16``): classic tiled matmul, grouped program order for L2 reuse of the packed
  weight tiles, autotuned over BLOCK_M/N/K.  Decoding costs O(BLOCK_N * BLOCK_K) per K step
  and is amortised over BLOCK_M rows of x.
* GEMV / small batch (``M <= 16``, decode-time LLM inference, batch-1 CNNs): the work is
  reading the packed weight once; with BLOCK_M = 16 there are only ``cdiv(N, BLOCK_N)``
  tiles, far fewer than SMs for typical N, so K is split over ``SPLIT_K`` programs that write
  fp32 partial sums to a ``[SPLIT_K, M, N]`` workspace, reduced by one ``sum(0)``.  We use
  a workspace instead of ``atomic_add`` so results are deterministic (bit-identical run to
  run) and the autotuner can re-run the kernel without zeroing buffers.
* "linear" never decodes per weight: ``x @ (q * s)^T == (x @ q^T) * s`` per output column,
  and ``|q| <= 127`` is exact in fp16/bf16, so the kernel feeds the raw codes to ``tl.dot``
  and scales the accumulator once in the epilogue.
* "log"/"exp" use ``expm1``/``log1p`` evaluated with short series for small arguments
  (|q| s / e < 0.25) because ``exp(x) - 1`` and ``log(1 + x)`` lose all precision there,
  and the GPU's ``tl.exp``/``tl.log`` are approximate (``ex2.approx``/``lg2.approx``), so
  Kahan's ``(u - 1) * x / log(u)`` trick does not apply.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from l2fx.errors import BackendError
from l2fx.formats import FORMATS

from .packing import PackedCodes, unpack_codes

try:  # Triton is optional: CPU inference and torch.compile on CPU use the torch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

#: Transform kinds, mapped to the constexpr the kernel branches on. Block formats with
#: floating-point elements decode by kind 4 from their (exponent bits, mantissa bits, bias);
#: those with integer elements (MXINT8, HBFP) are "linear" with the step times the element unit
#: (:data:`INT_FORMAT_UNITS`, applied by the caller, a power of two: exact).
KINDS = {"linear": 0, "joint": 1, "prune": 1, "log": 2, "exp": 3,
         "mxfp8_e4m3": 4, "mxfp8_e5m2": 4, "mxfp6_e3m2": 4, "mxfp6_e2m3": 4, "mxfp4_e2m1": 4}
FP_FORMATS = {"mxfp8_e4m3": (4, 3, 7), "mxfp8_e5m2": (5, 2, 15), "mxfp6_e3m2": (3, 2, 3), "mxfp6_e2m3": (2, 3, 1),
              "mxfp4_e2m1": (2, 1, 1)}
INT_FORMAT_UNITS = {"mxint8": 2.0 ** -6, "hbfp8": 2.0 ** -6, "hbfp4": 2.0 ** -2}
#: Largest M handled by the split-K GEMV configs.
GEMV_MAX_M = 16
#: Largest M that ``dequant_matmul(method=None)`` runs fused; above it, dequantise + cuBLAS.
FUSED_MAX_M = GEMV_MAX_M
_SUPPORTED_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a function, i.e. at import of
# this module; read it the same way so the tiny interpreter configs go with interpreted kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# 1. Autotune configs
# --------------------------------------------------------------------------------------------
def _config(bm: int, bn: int, bk: int, group_m: int, warps: int, stages: int):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


if HAS_TRITON:
    # Not yet tuned on hardware: shapes of the Triton matmul tutorial's fp16 configs, with
    # BLOCK_K <= 64 in GEMM because decoding a [BLOCK_K, BLOCK_N] tile lives in registers.
    GEMM_CONFIGS = [
        _config(128, 128, 64, 8, 8, 3),
        _config(128, 64, 64, 8, 4, 4),
        _config(64, 128, 64, 8, 4, 4),
        _config(64, 64, 64, 8, 4, 4),
        _config(128, 256, 32, 8, 8, 3),
    ]
    # GEMV: BLOCK_M = 16 (the smallest tl.dot M), long K tiles to stream the packed weight.
    GEMV_CONFIGS = [
        _config(16, 64, 128, 1, 4, 4),
        _config(16, 128, 128, 1, 4, 3),
        _config(16, 32, 256, 1, 4, 4),
        _config(16, 64, 256, 1, 4, 3),
    ]
    # Interpreter (TRITON_INTERPRET=1, CPU tests): one config, so the autotuner never
    # benchmarks, and blocks small enough that test shapes (N=37, K=70) span several tiles.
    INTERPRET_CONFIGS = [_config(16, 32, 32, 2, 1, 1)]
    if _INTERPRET:
        GEMM_CONFIGS = GEMV_CONFIGS = INTERPRET_CONFIGS
    elif os.environ.get("L2FX_KERNEL_AUTOTUNE", "1") == "0":
        # Each new (shape, bit width) key costs the autotuner a compile and a timing of every
        # config; with this set (read at import, like TRITON_INTERPRET) the first config runs
        # untimed: first calls are fast (GPU test runs), later ones may be slower.
        GEMM_CONFIGS, GEMV_CONFIGS = GEMM_CONFIGS[:1], GEMV_CONFIGS[:1]
else:  # pragma: no cover
    GEMM_CONFIGS = GEMV_CONFIGS = INTERPRET_CONFIGS = []

_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "KIND", "BITS", "SPLIT_K", "GROUP"]


# --------------------------------------------------------------------------------------------
# 2. Kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _expm1_pos(x):
        """expm1 for x >= 0: Taylor series (degree 7) below 0.25, exp(x) - 1 above.

        Truncation below 0.25: x^8/8! / x < 0.25^7 / 40320 = 1.5e-9 relative (< fp32 ulp);
        above 0.25 the cancellation in exp(x) - 1 loses at most a factor 4.5.
        """
        p = 1.0 + x * (1.0 / 7.0) * (1.0 + x * (1.0 / 8.0))
        p = 1.0 + x * (1.0 / 6.0) * p
        p = 1.0 + x * (1.0 / 5.0) * p
        p = 1.0 + x * (1.0 / 4.0) * p
        p = 1.0 + x * (1.0 / 3.0) * p
        p = 1.0 + x * (1.0 / 2.0) * p
        series = x * p
        return tl.where(x < 0.25, series, tl.exp(x) - 1.0)

    @triton.jit
    def _log1p_pos(y):
        """log1p for y >= 0: 2 atanh(z), z = y / (2 + y), series to z^9 below 0.25.

        Below 0.25, z <= 1/9 and the dropped terms are < z^10 / 11 / z = 2.6e-10 relative.
        """
        z = y / (2.0 + y)
        z2 = z * z
        p = 1.0 + z2 * (1.0 / 3.0 + z2 * (1.0 / 5.0 + z2 * (1.0 / 7.0 + z2 * (1.0 / 9.0))))
        series = 2.0 * z * p
        return tl.where(y < 0.25, series, tl.log(1.0 + y))

    @triton.jit
    def _decode_magnitudes(q, s_col, e_col, KIND: tl.constexpr, EBITS: tl.constexpr = 0, MBITS: tl.constexpr = 0,
                           EBIAS: tl.constexpr = 0):
        """``T^-1(q)`` of an integer code tile for kinds 1..4 (joint/prune, log, exp, a block
        format's FP element: |q| is its exponent and mantissa fields) with the per-row (or per
        weight) ``s_col``, ``e_col``; fp32. Kind 0 (linear) is ``q * s``."""
        a = tl.abs(q).to(tl.float32)
        if KIND == 4:
            # value = m * 2^(1 - bias - M) (subnormal, exponent field 0) or (2^M + m) *
            # 2^(e - bias - M); the power of two built from its float32 bits: exact.
            ai = tl.abs(q)
            ef = ai >> MBITS
            mf = ai & ((1 << MBITS) - 1)
            mant = tl.where(ef == 0, mf, mf + (1 << MBITS)).to(tl.float32)
            k = tl.where(ef == 0, 1, ef) - EBIAS - MBITS
            pow2 = ((k + 127) << 23).to(tl.float32, bitcast=True)
            mag = mant * pow2 * s_col
        elif KIND == 1:
            mag = a * s_col + (e_col - 0.5 * s_col)  # (|q| - 1/2) s + e
        elif KIND == 2:
            mag = e_col * _expm1_pos(a * (s_col / e_col))
        else:
            mag = e_col * _log1p_pos(a * (s_col / e_col))
        wt = tl.where(q < 0, -mag, mag)
        return tl.where(q == 0, 0.0, wt)

    @triton.jit
    def _dequant_matmul_kernel(
        x_ptr, words_ptr, s_ptr, e_ptr, bias_ptr, out_ptr,
        M, N, K, M_BUCKET, N_GROUPS,
        stride_xm, stride_xk,
        stride_wn, stride_ww,
        stride_os, stride_om, stride_on,
        GROUP: tl.constexpr,         # 0: s, e per output channel [N]; g: per g codes of a row [N, N_GROUPS]
        KIND: tl.constexpr,          # 0 linear, 1 joint/prune, 2 log, 3 exp, 4 FP element (see KINDS)
        EBITS: tl.constexpr, MBITS: tl.constexpr, EBIAS: tl.constexpr,  # kind 4's element format
        BITS: tl.constexpr,          # field width b of the packed codes, 2..8
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,       # > 1: out is an fp32 [SPLIT_K, M, N] workspace
        INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 x ("ieee" or "tf32")
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        FIELDS: tl.constexpr = 32 // BITS
        OFFSET: tl.constexpr = 1 << (BITS - 1)
        MASK: tl.constexpr = (1 << BITS) - 1

        # Grouped ordering of (pid_m, pid_n): GROUP_M row tiles share each packed weight tile.
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N

        # Per-output-channel transform parameters, hoisted out of the K loop (per group: loaded
        # with each weight tile below).
        if GROUP == 0:
            s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            e = tl.load(e_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
            s_col = s[:, None]
            e_col = e[:, None]
            s_row = s[None, :]

        # This program's K range: SPLIT_K contiguous chunks of whole BLOCK_K tiles.
        k_tiles = tl.cdiv(K, BLOCK_K)
        tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
        k_begin = pid_k * tiles_per_split * BLOCK_K

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, tiles_per_split):
            offs_k = k_begin + t * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            # W tile [BLOCK_N, BLOCK_K] in memory order (a row's words are contiguous along K):
            # word k // FIELDS, then shift and mask. Masked-out lanes read word 0 -> u = 0 ->
            # q = -OFFSET, but x is 0 there (k >= K) or the row is discarded (n >= N).
            w = tl.load(
                words_ptr + offs_n[:, None] * stride_wn + (offs_k // FIELDS)[None, :] * stride_ww,
                mask=mask_n[:, None] & mask_k[None, :],
                other=0,
            )
            q = ((w >> ((offs_k % FIELDS) * BITS)[None, :]) & MASK) - OFFSET
            if GROUP > 0:  # the [BLOCK_N, BLOCK_K] tile of each weight's group parameters
                g_ptrs = offs_n[:, None] * N_GROUPS + (offs_k // GROUP)[None, :]
                g_mask = mask_n[:, None] & mask_k[None, :]
                s_t = tl.load(s_ptr + g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
                e_t = tl.load(e_ptr + g_ptrs, mask=g_mask, other=1.0).to(tl.float32)
                if KIND == 0:
                    wt = q.to(tl.float32) * s_t
                else:
                    wt = _decode_magnitudes(q, s_t, e_t, KIND, EBITS, MBITS, EBIAS)
            elif KIND == 0:
                wt = q.to(tl.float32)  # scaled by s in the epilogue
            else:
                wt = _decode_magnitudes(q, s_col, e_col, KIND, EBITS, MBITS, EBIAS)
            # fp16/bf16 x: decoded weights are rounded to x's dtype for the tensor cores,
            # the same rounding a plain torch fp16/bf16 linear applies to its weight.
            acc += tl.dot(x, tl.trans(wt.to(x.dtype)), input_precision=INPUT_PRECISION)

        if KIND == 0 and GROUP == 0:
            acc = acc * s_row
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :] * (pid_k == 0).to(tl.float32)  # bias once, in split 0

        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    _dequant_matmul_gemm = triton.autotune(configs=GEMM_CONFIGS, key=_AUTOTUNE_KEY)(
        _dequant_matmul_kernel
    )
    _dequant_matmul_gemv = triton.autotune(configs=GEMV_CONFIGS, key=_AUTOTUNE_KEY)(
        _dequant_matmul_kernel
    )

    @triton.jit
    def _dequantize_kernel(
        words_ptr, s_ptr, e_ptr, out_ptr,
        N, K, N_GROUPS,
        stride_wn, stride_ww, stride_on, stride_ok,
        GROUP: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
        EBITS: tl.constexpr, MBITS: tl.constexpr, EBIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``out[N, K] = T^-1(q)`` in out's dtype: one [BLOCK_N, BLOCK_K] tile per program,
        stored contiguously along K (the rows' words are read once from DRAM, then from L1)."""
        FIELDS: tl.constexpr = 32 // BITS
        OFFSET: tl.constexpr = 1 << (BITS - 1)
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        if GROUP > 0:
            g_ptrs = offs_n[:, None] * N_GROUPS + (offs_k // GROUP)[None, :]
            s_col = tl.load(s_ptr + g_ptrs, mask=mask, other=0.0).to(tl.float32)
            e_col = tl.load(e_ptr + g_ptrs, mask=mask, other=1.0).to(tl.float32)
        else:
            s_col = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            e_col = tl.load(e_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)[:, None]
        w = tl.load(words_ptr + offs_n[:, None] * stride_wn + (offs_k // FIELDS)[None, :] * stride_ww,
                    mask=mask, other=0)
        q = ((w >> ((offs_k % FIELDS) * BITS)[None, :]) & MASK) - OFFSET
        if KIND == 0:
            wt = q.to(tl.float32) * s_col
        else:
            wt = _decode_magnitudes(q, s_col, e_col, KIND, EBITS, MBITS, EBIAS)
        tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok,
                 wt.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# 3. Launcher
# --------------------------------------------------------------------------------------------
def _check_inputs(
    x: torch.Tensor,
    packed: PackedCodes,
    step_s: torch.Tensor,
    threshold_e: torch.Tensor,
    kind: str,
    bias: Optional[torch.Tensor],
    group: int = 0,
) -> None:
    """Shared validation of the launcher and the reference; raises BackendError."""
    if kind not in KINDS:
        raise BackendError(f"unknown transform kind {kind!r}; expected one of {sorted(KINDS)}")
    if not isinstance(packed, PackedCodes):
        raise BackendError(f"packed must be a PackedCodes, got {type(packed).__name__}")
    if x.dtype not in _SUPPORTED_X_DTYPES:
        raise BackendError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != packed.k:
        raise BackendError(
            f"x has shape {tuple(x.shape)} but the packed weight is [N, K] = {packed.shape}: "
            f"x.shape[-1] must equal K={packed.k}"
        )
    n = packed.n
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        raise BackendError(f"group must be 0 (per channel) or a group size >= 1, got {group!r}")
    want = (n,) if group == 0 else (n, -(-packed.k // group))
    for name, t in (("step_s", step_s), ("threshold_e", threshold_e)):
        if tuple(t.shape) != want:
            raise BackendError(f"{name} must have shape {list(want)} ({'[N]' if group == 0 else '[N, ceil(K / group)]'}), "
                               f"got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise BackendError(f"{name} must be float32, got {t.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != n:
            raise BackendError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
        if bias.dtype not in (x.dtype, torch.float32):
            raise BackendError(f"bias must be {x.dtype} or float32, got {bias.dtype}")
    tensors = {"x": x, "packed.words": packed.words, "step_s": step_s, "threshold_e": threshold_e}
    if bias is not None:
        tensors["bias"] = bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise BackendError(f"all inputs must be on one device, got {devices}")


def _fp_format(kind: str) -> dict[str, int]:
    """The kernel's constexprs for kind 4 (zeros otherwise: one compiled variant per kind)."""
    ebits, mbits, bias = FP_FORMATS.get(kind, (0, 0, 0))
    return {"EBITS": ebits, "MBITS": mbits, "EBIAS": bias}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number; only the regime matters for correctness


def _default_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K only in the GEMV regime, enough to give ~2 programs per SM (at most 16)."""
    if m > GEMV_MAX_M:
        return 1
    n_tiles = max(1, -(-n // 64))
    return max(1, min(16, (2 * _num_sms(device)) // n_tiles, -(-k // 256)))


def _check_launch(x, packed, step_s, threshold_e, kind, bias, what: str, group: int = 0) -> None:
    """Inputs, Triton and device checks of the launchers; raises BackendError."""
    if not HAS_TRITON:
        raise BackendError(f"{what} needs triton; install l2fx[triton] or use the torch path")
    _check_inputs(x, packed, step_s, threshold_e, kind, bias, group)
    if x.device.type != "cuda" and not _INTERPRET:
        raise BackendError(
            f"the Triton {what} kernel needs CUDA tensors, got them on {x.device} "
            "(set TRITON_INTERPRET=1 before importing l2fx.triton_kernels to run it on CPU)"
        )


def dequantize(
    packed: PackedCodes,
    step_s: torch.Tensor,
    threshold_e: torch.Tensor,
    kind: str,
    dtype: torch.dtype = torch.float32,
    group: int = 0,
) -> torch.Tensor:
    """Triton launcher: the dense weight ``T^-1(q)`` as ``[N, K]`` in ``dtype`` (decoded in
    fp32, rounded once). Its torch reference is ``_decode_torch(unpack_codes(packed), ...)``.
    ``group``: 0 for ``step_s``/``threshold_e`` per output channel ``[N]``, else the group size
    ``g`` of parameters ``[N, ceil(K / g)]``.

    Raises:
        BackendError: as :func:`dequant_matmul`; ``dtype`` must be float16, bfloat16 or float32.
    """
    if dtype not in _SUPPORTED_X_DTYPES:
        raise BackendError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    probe = torch.empty((0, packed.k) if isinstance(packed, PackedCodes) else (0, 0),
                        dtype=dtype, device=step_s.device)
    _check_launch(probe, packed, step_s, threshold_e, kind, None, "dequantize", group)
    n, k = packed.shape
    out = torch.empty((n, k), dtype=dtype, device=step_s.device)
    if n == 0 or k == 0:
        return out
    words = packed.words.contiguous()
    block_n, block_k = (16, 32) if _INTERPRET else (32, 128)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](
        words, step_s.contiguous(), threshold_e.contiguous(), out, n, k, -(-k // group) if group else 1,
        words.stride(0), words.stride(1), out.stride(0), out.stride(1),
        GROUP=group, KIND=KINDS[kind], BITS=packed.bits, BLOCK_N=block_n, BLOCK_K=block_k, **_fp_format(kind),
    )
    return out


def dequant_matmul(
    x: torch.Tensor,
    packed: PackedCodes,
    step_s: torch.Tensor,
    threshold_e: torch.Tensor,
    kind: str,
    bias: Optional[torch.Tensor] = None,
    *,
    split_k: Optional[int] = None,
    method: Optional[str] = None,
    group: int = 0,
) -> torch.Tensor:
    """Triton launcher: ``x[..., K] @ T^-1(q)[N, K]^T + bias`` -> ``[..., N]`` in ``x.dtype``.

    Two methods (``method=None`` picks by the number of rows ``M`` of ``x``):

    * ``"fused"`` (``M <= FUSED_MAX_M``): one kernel decodes the weight tiles in registers and
      multiplies; the dense weight never exists. ``split_k`` overrides its GEMV split-K
      heuristic (tests use it to exercise both code paths).
    * ``"decode"`` (larger ``M``): :func:`dequantize` writes the dense weight in ``x.dtype``
      (one memory-bound pass, no autotuning), then ``F.linear`` (cuBLAS). The weight is
      decoded on every call and freed after it, so memory holds only the packed codes between
      calls.

    ``group`` as :func:`dequantize`. Runs on CUDA tensors, or on CPU tensors when Triton runs in
    interpreter mode (``TRITON_INTERPRET=1`` set before this module is imported).

    Raises:
        BackendError: Triton missing, wrong device, unknown method, or inconsistent
        shapes/dtypes/devices.
    """
    _check_launch(x, packed, step_s, threshold_e, kind, bias, "dequant_matmul", group)
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise BackendError(f"split_k must be a positive int, got {split_k!r}")
    if method not in (None, "fused", "decode"):
        raise BackendError(f"method must be None, 'fused' or 'decode', got {method!r}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.k)
    m, k = x2.shape
    n = packed.n
    if method is None:
        method = "fused" if m <= FUSED_MAX_M else "decode"
    if method == "decode":
        if split_k not in (None, 1):
            raise BackendError(f"split_k={split_k} applies to method='fused' only")
        w = dequantize(packed, step_s, threshold_e, kind, x.dtype, group)
        return F.linear(x2, w, None if bias is None else bias.to(x.dtype)).reshape(*lead, n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if split_k is None:
        split_k = _default_split_k(m, n, k, x.device)
    words = packed.words.contiguous()
    step_s = step_s.contiguous()
    threshold_e = threshold_e.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    dest = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    # fp32 x follows torch's own switch for TF32 matmuls (off by default).
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    kernel = _dequant_matmul_gemv if m <= GEMV_MAX_M else _dequant_matmul_gemm
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
        split_k,
    )
    kernel[grid](
        x2, words, step_s, threshold_e, bias if bias is not None else step_s, dest,
        m, n, k, 1 << max(0, (m - 1).bit_length()), -(-k // group) if group else 1,
        x2.stride(0), x2.stride(1),
        words.stride(0), words.stride(1),
        dest.stride(0) if split_k > 1 else 0, dest.stride(-2), dest.stride(-1),
        GROUP=group, KIND=KINDS[kind], BITS=packed.bits, HAS_BIAS=bias is not None, SPLIT_K=split_k, **_fp_format(kind),
        INPUT_PRECISION=precision,
    )
    if split_k > 1:
        out = dest.sum(0).to(x.dtype)
    return out.reshape(*lead, n)


# --------------------------------------------------------------------------------------------
# 4. Pure-torch reference
# --------------------------------------------------------------------------------------------
def _decode_torch(
    q: torch.Tensor, kind: str, step_s: torch.Tensor, threshold_e: torch.Tensor, group: int = 0
) -> torch.Tensor:
    """``T^-1(q)`` for codes ``q [N, K]`` in the dtype of ``step_s`` (see the table above);
    ``group`` as :func:`dequantize`.

    Kept private so this file does not depend on ``l2fx.transform``; the tests check the two
    agree when both exist.
    """
    dtype = step_s.dtype
    if group:
        k = q.shape[1]
        s = step_s.repeat_interleave(group, dim=1)[:, :k]
        e = threshold_e.to(dtype).repeat_interleave(group, dim=1)[:, :k]
    else:
        s = step_s[:, None]
        e = threshold_e.to(dtype)[:, None]
    a = q.abs().to(dtype)
    sign = torch.sign(q).to(dtype)
    if kind == "linear":
        return q.to(dtype) * s
    if kind in ("joint", "prune"):
        return torch.where(q == 0, torch.zeros_like(a), sign * ((a - 0.5) * s + e))
    if kind == "log":
        return sign * e * torch.expm1(a * s / e)
    if kind == "exp":
        return sign * e * torch.log1p(a * s / e)
    if kind in FP_FORMATS:  # the element values from the format's table (l2fx.formats)
        table = FORMATS[kind].magnitudes.to(dtype).to(q.device)
        return sign * table[q.abs().long()] * s
    raise BackendError(f"unknown transform kind {kind!r}; expected one of {sorted(KINDS)}")


def dequant_matmul_ref(
    x: torch.Tensor,
    packed: PackedCodes,
    step_s: torch.Tensor,
    threshold_e: torch.Tensor,
    kind: str,
    bias: Optional[torch.Tensor] = None,
    group: int = 0,
) -> torch.Tensor:
    """Pure-torch reference: unpack, decode and ``F.linear`` in fp32, cast to ``x.dtype``."""
    _check_inputs(x, packed, step_s, threshold_e, kind, bias, group)
    w = _decode_torch(unpack_codes(packed), kind, step_s, threshold_e, group)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# 5. Op registration: torch.ops.l2fx.dequant_matmul
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("l2fx::dequant_matmul", mutates_args=())
def _dequant_matmul_op(
    x: torch.Tensor,
    words: torch.Tensor,
    bits: int,
    k: int,
    step_s: torch.Tensor,
    threshold_e: torch.Tensor,
    kind: str,
    bias: Optional[torch.Tensor],
    group: int = 0,
) -> torch.Tensor:
    """``torch.ops.l2fx.dequant_matmul(x, words, bits, k, step_s, threshold_e, kind, bias, group=0)``.

    The PackedCodes fields are passed flat because custom-op schemas take tensors and
    scalars only.  CUDA tensors (with Triton installed) run the kernel; everything else runs
    :func:`dequant_matmul_ref`, so CPU inference and ``torch.compile`` on CPU need no Triton.
    """
    packed = PackedCodes(words, bits, k)
    if x.device.type == "cuda" and HAS_TRITON:
        return dequant_matmul(x, packed, step_s, threshold_e, kind, bias, group=group)
    return dequant_matmul_ref(x, packed, step_s, threshold_e, kind, bias, group)


@_dequant_matmul_op.register_fake
def _dequant_matmul_fake(x, words, bits, k, step_s, threshold_e, kind, bias, group=0):
    return x.new_empty((*x.shape[:-1], words.shape[0]))


def dequant_matmul_op(
    x: torch.Tensor,
    packed: PackedCodes,
    step_s: torch.Tensor,
    threshold_e: torch.Tensor,
    kind: str,
    bias: Optional[torch.Tensor] = None,
    group: int = 0,
) -> torch.Tensor:
    """Convenience wrapper calling the registered op with a :class:`PackedCodes`."""
    return torch.ops.l2fx.dequant_matmul(
        x, packed.words, packed.bits, packed.k, step_s, threshold_e, kind, bias, group
    )


# --------------------------------------------------------------------------------------------
# 6. 1x1 convolution as the same GEMM
# --------------------------------------------------------------------------------------------
def dequant_conv2d_1x1(
    x: torch.Tensor,
    packed: PackedCodes,
    step_s: torch.Tensor,
    threshold_e: torch.Tensor,
    kind: str,
    bias: Optional[torch.Tensor] = None,
    group: int = 0,
) -> torch.Tensor:
    """1x1 conv (stride 1, no padding, groups 1) ``x[B, C_in, H, W]`` -> ``[B, C_out, H, W]``
    with the weight packed as ``[C_out, C_in]`` codes; runs through the registered op."""
    if x.dim() != 4 or x.shape[1] != packed.k:
        raise BackendError(
            f"dequant_conv2d_1x1 expects x [B, C_in={packed.k}, H, W], got {tuple(x.shape)}"
        )
    b, c, h, w = x.shape
    x2 = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
    y = dequant_matmul_op(x2, packed, step_s, threshold_e, kind, bias, group)
    return y.reshape(b, h, w, packed.n).permute(0, 3, 1, 2)
