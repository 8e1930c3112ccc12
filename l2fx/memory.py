"""Giving freed host memory back to the operating system between the large steps of a compile.

A compile allocates and frees many tensors between 128 KB and 32 MB (activations, decoded
candidates, a layer's symbols). glibc serves those from its heap once its dynamic mmap threshold
has risen, and a freed heap chunk stays in the process until ``malloc_trim``: on a random
Llama of 1024 x 2816 widths (148 MB of weights), the resident set after sensitivity analysis
stood 1.1 GB above what was alive, and the next pass's peak started from there. :func:`release`
trims the heap; the pass manager calls it (after a cycle collection on large models) after every
pass, and the passes that loop over layers or blocks call it per step. Elsewhere than glibc the
trim does nothing.

:func:`lazy_clone` is the copy the compile makes of what it only reads: copy-on-write, so the
caller's float32 weights are not held twice while the passes read them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import torch

__all__ = ["release", "lazy_clone", "can_lazy_clone"]


@functools.lru_cache(maxsize=1)
def _trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release(collect: bool = False) -> None:
    """Returns the heap's free memory to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).
    ``collect``: first run Python's cycle collector, which frees tensors only a reference cycle
    still holds (fx nodes and graphs are cycles: a weight a pass replaced can stay alive through
    one until the next collection; a whole model's worth on a random Llama). A full collection
    takes a few tens of ms on a transformer's graph: the pass manager asks for it between passes,
    the per-layer loops do not."""
    if collect:
        gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)


def can_lazy_clone(t: torch.Tensor) -> bool:
    """Whether :func:`lazy_clone` of ``t`` shares its storage (else it clones): a dense CPU
    tensor or parameter, on a torch that has ``torch._lazy_clone``."""
    return (hasattr(torch, "_lazy_clone") and t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter)
            and t.layout == torch.strided and not t.is_quantized)


def lazy_clone(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (detached, same dtype) that shares its storage until either of them is
    written in place: the first such write copies the written one's storage then, so a write
    never reaches the other (``torch._lazy_clone``, copy-on-write). Where that does not apply
    (:func:`can_lazy_clone`), or this torch refuses it, an ordinary clone."""
    t = t.detach()
    if can_lazy_clone(t):
        try:
            return torch._lazy_clone(t)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return t.clone()
