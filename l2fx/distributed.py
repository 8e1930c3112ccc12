"""Compiling with the calibration set sharded across ``torch.distributed`` ranks.

Launch one process per rank (``torchrun --nproc-per-node 2 script.py``; gloo on CPU, NCCL on
GPUs), initialise the process group, and call :func:`l2fx.compile` on every rank with the same
model, target and config and *that rank's shard* of the calibration batches. Wherever a pass
reduces over calibration data, the ranks' partial sums are all-reduced, so every rank computes
the same result, and any rank (by convention rank 0) saves it:

* input Hessians (:class:`l2fx.solvers.hessian.HessianAccumulator`): ``sum_r n_r H_r / sum_r
  n_r``, the Hessian of the union of the shards (``oneshot_solve``, ``compound_plan``);
* the w+a options' activation ranges (max), histograms and joint errors (sums)
  (``compound_plan``, :mod:`l2fx.layerwise`);
* the sensitivity analysis's output errors (``sensitivity_analysis``): numerator and the
  reference's energy (about the union's mean) summed over the ranks, each rank measuring its
  first ``num_samples`` samples, so the curves are those of ``world_size x num_samples``
  samples;
* block reconstruction: the loss scale (the fp32 targets' mean square) and the calibration
  loss that decides a revert, summed with their batch counts; the gradients of every step,
  averaged in :class:`l2fx.optim.Adam`, so every rank takes the same steps.

Passes that read calibration data declare whether they do this (``L2fxPass.supports_distributed``);
a pipeline holding one that does not (network distillation with ``distill_iters`` > 0, SMOL's
precision learning) is refused with a ConfigError before any work, on every rank alike, and so
is the allocation's ``joint_rounds``. The one-shot methods (``gptq``, ``sparsegpt``, ``wanda``,
``obq`` ...), the compound ones, ``l2`` and ``gptq+l2`` run distributed.

What differs from one process on the union of the shards: the summation order of the
all-reduce (float64 Hessians: differences of order 1e-16 relative, which can flip a rounding
at a tie), which samples the sensitivity analysis measures (each rank's first
``num_samples``, against the union's first), and reconstruction's minibatches (one per rank,
their gradients averaged, against one drawn from the union). ``tests/test_distributed.py``
compares the two.
Compilation is not sped up where it is not data-bound: every rank solves every layer.
"""
from __future__ import annotations

import torch

__all__ = ["active", "world_size", "rank", "all_reduce_sum", "all_reduce_max", "all_reduce_scalars"]


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """``t`` reduced in place over the ranks by ``torch.distributed.ReduceOp.<op>``."""
    if not active():
        return t
    op = getattr(torch.distributed.ReduceOp, op)
    backend = torch.distributed.get_backend()
    if backend == "nccl" and t.device.type != "cuda":
        moved = t.to(f"cuda:{torch.cuda.current_device()}")
        torch.distributed.all_reduce(moved, op=op)
        t.copy_(moved.to(t.device))
    elif backend == "gloo" and t.device.type != "cpu":
        moved = t.cpu()
        torch.distributed.all_reduce(moved, op=op)
        t.copy_(moved.to(t.device))
    else:
        torch.distributed.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place where a group is active; ``t`` itself otherwise).
    NCCL reduces device tensors; gloo CPU ones: a tensor on another device than the backend's
    goes through a copy."""
    return _all_reduce(t, "SUM")


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elementwise maximum over the ranks (as :func:`all_reduce_sum`)."""
    return _all_reduce(t, "MAX")


def all_reduce_scalars(*values: float) -> tuple[float, ...]:
    """Python numbers summed over the ranks (float64)."""
    if not active():
        return tuple(float(v) for v in values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return tuple(float(v) for v in all_reduce_sum(t).tolist())
