"""memory.release: freed heap memory goes back to the OS (glibc), so a pass's peak does not
start from the previous pass's high-water mark; memory.lazy_clone: copies that cost nothing
until written, and a write reaches one side only."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from l2fx import memory
from l2fx.modules import TransformedWeight
from l2fx.transform import TransformKind

# In a fresh interpreter: the heap's state in a long test session decides what free() alone
# returns, so the same check inside it measures the session, not release().
_SCRIPT = r"""
import json, os, torch
from l2fx import memory
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
big = torch.empty(64 * 2 ** 20 // 4)  # a freed 64 MB chunk raises glibc's dynamic mmap threshold,
del big                               # so the 1 MB tensors below come from the heap
chunks = [torch.ones(2 ** 18) for _ in range(300)]
pin = torch.ones(2 ** 18)  # allocated last, on top of the heap: free() cannot shrink the heap past it
held = resident()
del chunks
after_free = resident()
memory.release()
print(json.dumps([held, after_free, resident()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._trim() is None, reason="glibc malloc_trim")
def test_release_returns_freed_heap_chunks():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    held, after_free, released = json.loads(out.stdout.strip().splitlines()[-1])
    assert held - after_free < 100  # free() alone kept most of the 300 MB in the process ...
    assert after_free - released > 200  # ... which release() gave back


def test_release_is_safe_to_call_anytime():
    memory.release()
    memory.release(collect=True)


def test_lazy_clone_is_a_copy_whichever_side_is_written():
    w = torch.randn(8, 16)
    before = w.clone()
    c = memory.lazy_clone(w)
    assert torch.equal(c, w) and c.dtype == w.dtype and not c.requires_grad
    c.mul_(3)
    assert torch.equal(w, before) and torch.equal(c, 3 * before)
    d = memory.lazy_clone(w)
    w.add_(1)
    assert torch.equal(d, before)
    sparse = torch.randn(4).to_sparse()  # not a dense tensor: an ordinary clone
    assert not memory.can_lazy_clone(sparse) and torch.equal(memory.lazy_clone(sparse).to_dense(), sparse.to_dense())


def test_a_transformed_weight_trained_in_place_leaves_the_weight_it_was_made_from():
    w = torch.randn(6, 10)
    before = w.clone()
    m = TransformedWeight(w, TransformKind.LINEAR, torch.full((6,), 0.1), torch.full((6,), 0.05), 0, 7)
    if memory.can_lazy_clone(w) and hasattr(torch._C, "_is_cow_tensor"):
        assert torch._C._is_cow_tensor(m.weight)  # shares w's storage until a write
    with torch.no_grad():
        m.weight.add_(0.3)   # a reconstruction step
    m.snap()
    assert torch.equal(w, before)
