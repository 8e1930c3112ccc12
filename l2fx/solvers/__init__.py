"""Layer-wise one-shot compression solvers on pure tensors (no modules, no graph).

Every solver takes one layer's weight ``W`` ``[rows, cols]`` (rows = output channels, cols = the
reduction dimension in ``weight.flatten(1)`` order) and the Hessian ``H = 2 X^T X / n``
``[cols, cols]`` of its calibration inputs, minimises the layer loss ``tr(dW H dW^T)``, and
returns a :class:`SolverResult` (``w_hat``, ``symbols``, ``mask``, ``loss``, ``extra``).
Activations are never needed: :class:`HessianAccumulator` streams them (:func:`layer_rows`
unfolds conv inputs, one Hessian per group). Quantising solvers take a :class:`Grid` (L2's
LINEAR / JOINT transforms, per row or per group) and return symbols with
``w_hat == grid.decode(symbols)`` bit for bit.

==========================  ==========================================  ===========================================
solver                      what                                        cost (flops)
==========================  ==========================================  ===========================================
:func:`gptq`                quantise, OBS updates, lazy + Cholesky      ``cols^3`` + ``rows cols^2``
:func:`sparsegpt`           prune (unstructured / N:M), + quantise      ``cols^3`` + ``rows cols^2``
:func:`wanda` / masks       prune by ``|w| ||x||``, no update           ``rows cols log cols``
:func:`obs_prune`           exact greedy OBS per row (OBC): unstr.,     ``rows cols^3`` (bounded by ``max_cost``)
                            N:M, 4-blocks
:func:`obq_quantize`        exact greedy OBQ per row (OBC)              ``rows cols^3`` (bounded by ``max_cost``)
:func:`adaround`            learnt up/down rounding (Nagel et al.)      ``iters * rows cols^2``
:func:`adaquant`            learnt weights and steps via STE            ``iters * rows cols^2``
:func:`adaprune`            exact refit of a given/magnitude mask       ``rows min(kept, pruned)^3 / 3``
==========================  ==========================================  ===========================================

Measured on this project's 2-core CPU, shared with other jobs (load average 3-5), float32 W,
float64 H, 1 thread: GPTQ 4096x4096 4-bit 5.6 s (9.7 s with 2 threads), SparseGPT 4096x4096
50% 6.0 s (10.8 s with 2 threads); exact OBS on 256x2304: unstructured 50% 57 s, 2:4 47 s,
4-blocks 69 s, OBQ 4-bit 61 s (the cost is ``rows cols^3``: GEMM-bound at ~90 GFLOP/s).

Tensors are CPU tensors (index and work buffers are allocated on the CPU; no GPU was available
to test other devices).
"""
from l2fx.solvers.ada import adaprune, adaquant, adaround
from l2fx.solvers.gptq import gptq
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import (HessianAccumulator, inverse_cholesky, layer_loss, layer_rows, prepare_hessian,
                                  refit_masked, relative_layer_loss)
from l2fx.solvers.obc import DEFAULT_MAX_COST, obq_quantize, obs_cost, obs_prune
from l2fx.solvers.result import SolverResult
from l2fx.solvers.sparsegpt import sparsegpt
from l2fx.solvers.wanda import magnitude_mask, wanda, wanda_mask

__all__ = [
    "SolverResult", "Grid",
    "HessianAccumulator", "layer_rows", "prepare_hessian", "inverse_cholesky", "layer_loss", "relative_layer_loss",
    "refit_masked",
    "gptq", "sparsegpt", "wanda", "wanda_mask", "magnitude_mask",
    "obs_prune", "obq_quantize", "obs_cost", "DEFAULT_MAX_COST",
    "adaround", "adaquant", "adaprune",
]
