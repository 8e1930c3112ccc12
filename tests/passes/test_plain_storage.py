"""plain_storage: float16 only where it holds the tensor."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from l2fx.accounting import fits_fp16, round_to_fp16


def test_float16_must_hold_range_and_precision():
    assert fits_fp16(torch.randn(100))
    assert not fits_fp16(torch.tensor([1.0, 7e4]))  # beyond float16's range
    assert not fits_fp16(torch.randn(100) * 1e-7)  # subnormal: digits lost
    with_tiny = torch.randn(100)
    with_tiny[:3] = 1e-9  # a few negligible entries beside unit-scale ones
    assert fits_fp16(with_tiny)
    assert fits_fp16(torch.zeros(5)) and fits_fp16(torch.zeros(0))


@settings(max_examples=50, deadline=None)
@given(st.floats(-30, 15), st.integers(1, 64))
def test_rounding_keeps_a_tensor_within_2_pow_minus_10_of_its_rms(log2_scale, n):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 2.0 ** log2_scale
    x = t.clone()
    if round_to_fp16(x):
        assert (x - t).pow(2).mean() <= t.pow(2).mean() * 2.0 ** -20
        assert torch.equal(x, x.half().float())  # idempotent: what the artifact stores
    else:
        assert torch.equal(x, t)  # kept in float32, untouched
