"""Giving freed host memory back to the operating system between the large steps of a compile.

A compile allocates and frees many tensors between 128 KB and 32 MB (activations, decoded
candidates, a layer's symbols). glibc serves those from its heap once its dynamic mmap threshold
has risen, and a freed heap chunk stays in the process until ``malloc_trim``: on a random
Llama of 1024 x 2816 widths (148 MB of weights), the resident set after sensitivity analysis
stood 1.1 GB above what was alive, and the next pass's peak started from there. :func:`release`
trims the heap; the pass manager calls it (after a cycle collection on large models) after every
pass, and the passes that loop over layers or blocks call it per step. Elsewhere than glibc the
trim does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

__all__ = ["release"]


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
