"""memory.release: freed heap memory goes back to the OS (glibc), so a pass's peak does not
start from the previous pass's high-water mark."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from l2fx import memory


def _resident_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._trim() is None, reason="glibc malloc_trim")
def test_release_returns_freed_heap_chunks():
    big = torch.empty(64 * 2 ** 20 // 4)  # a freed 64 MB chunk raises glibc's dynamic mmap threshold,
    del big                               # so the 1 MB tensors below come from the heap
    chunks = [torch.ones(2 ** 18) for _ in range(300)]
    held = _resident_mib()
    del chunks
    after_free = _resident_mib()
    memory.release()
    released = _resident_mib()
    assert held - released > 200  # of the 300 MB freed, most is returned by the trim ...
    assert after_free - released > 100  # ... not by free() alone


def test_release_is_safe_to_call_anytime():
    memory.release()
    memory.release()
