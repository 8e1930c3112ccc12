"""memory.release: freed heap memory goes back to the OS (glibc), so a pass's peak does not
start from the previous pass's high-water mark; memory.lazy_clone: copies that cost nothing
until written, and a write reaches one side only; TransformedWeight.hold_symbols: a solved
weight held as its symbols, read back bit-exactly."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from l2fx import memory
from l2fx.errors import ConfigError
from l2fx.modules import TransformedWeight
from l2fx.transform import TransformKind, encode

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


@pytest.mark.parametrize("layout", ["channel", "tensor", "group"])
def test_a_weight_held_as_symbols_reads_back_bit_exactly_at_a_quarter_of_the_bytes(layout):
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    before = w.clone()
    axis, group, n = {"channel": (0, None, (6,)), "tensor": (None, None, (1,)), "group": (0, 4, (6, 3))}[layout]
    m = TransformedWeight(w, TransformKind.JOINT, torch.full(n, 0.1), torch.full(n, 0.05), axis, 31, group)
    fp32 = TransformedWeight(w, TransformKind.JOINT, torch.full(n, 0.1), torch.full(n, 0.05), axis, 31, group)
    fp32.snap()
    s, e = m.params()
    m.hold_symbols(encode(w, m.kind, s, e, m.qmax))
    assert m.holds_symbols and "weight" not in dict(m.named_parameters())
    assert m.held_symbols.dtype == torch.int8 and m.held_symbols.element_size() * 4 == w.element_size()
    assert torch.equal(m.weight, fp32.weight) and torch.equal(m(), fp32())
    # T rescaled (rate_fit): the held weight re-rounds on the new grid as the fp32 one does.
    with torch.no_grad():
        for t in (m.step_s, m.threshold_e, fp32.step_s, fp32.threshold_e):
            t.mul_(1.37)
    assert torch.equal(m(), fp32())
    m.snap()
    fp32.snap()
    assert torch.equal(m.weight, fp32.weight) and m.holds_symbols
    assert torch.equal(w, before)  # the source is untouched
    assert "held as symbols" in repr(m)


def test_hold_symbols_refuses_what_is_not_the_weights_symbols():
    m = TransformedWeight(torch.randn(6, 10), TransformKind.LINEAR, torch.full((6,), 0.1), torch.full((6,), 0.05), 0, 7)
    with pytest.raises(ConfigError, match="integers of shape"):
        m.hold_symbols(torch.zeros(6, 10))
    with pytest.raises(ConfigError, match="integers of shape"):
        m.hold_symbols(torch.zeros(6, 9, dtype=torch.int16))
    with pytest.raises(ConfigError, match="qmax"):
        m.hold_symbols(torch.full((6, 10), 8, dtype=torch.int16))
    with pytest.raises(ConfigError, match="qmax"):  # int8's -128, whose abs() is -128 again
        m.hold_symbols(torch.full((6, 10), -128, dtype=torch.int8))
    assert not m.holds_symbols  # nothing changed
    wide = TransformedWeight(torch.randn(3, 4), TransformKind.LINEAR, torch.full((3,), 0.01), torch.full((3,), 0.005),
                             0, 300)
    wide.hold_symbols(torch.full((3, 4), -300, dtype=torch.int16))
    assert wide.held_symbols.dtype == torch.int16 and float(wide.weight.min()) == pytest.approx(-3.0)
