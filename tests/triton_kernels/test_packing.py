"""Packed-code format of l2fx.triton_kernels.packing: round trip, bit choice, layout, errors."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.accounting import bits_for_magnitude
from l2fx.errors import BackendError
from l2fx.triton_kernels.packing import (
    PackedCodes,
    fields_per_word,
    pack_codes,
    unpack_codes,
)


def _codes(n: int, k: int, bits: int, seed: int) -> torch.Tensor:
    qmax = (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=g, dtype=torch.int16)
    if q.numel():  # make sure the extreme codes, which use the edge fields, appear
        q.view(-1)[0] = qmax
        q.view(-1)[-1] = -qmax
    return q


@given(
    n=st.integers(1, 9),
    k=st.integers(0, 70),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]),
)
def test_unpack_inverts_pack_bit_for_bit(n, k, bits, seed, dtype):
    q = _codes(n, k, bits, seed).to(dtype)
    packed = pack_codes(q, bits)
    f = 32 // bits
    assert packed.words.dtype == torch.int32
    assert packed.words.shape == (n, -(-k // f))
    assert packed.shape == (n, k)
    out = unpack_codes(packed)
    assert out.dtype == torch.int16
    assert torch.equal(out, q.to(torch.int16))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 31, 33, 70])  # not multiples of any fields-per-word count
def test_round_trip_all_bits(bits, k):
    q = _codes(5, k, bits, seed=bits * 100 + k)
    assert torch.equal(unpack_codes(pack_codes(q, bits)), q)


def test_layout_is_documented_one():
    # b=4: 8 fields per word, field j at bit 4j holds q + 8.
    q = torch.tensor([[-7, -1, 0, 1, 2, 3, 4, 7, 5]], dtype=torch.int16)
    packed = pack_codes(q, 4)
    u = [v + 8 for v in q[0].tolist()]
    word0 = sum(x << (4 * j) for j, x in enumerate(u[:8]))
    word1 = u[8] | sum(8 << (4 * j) for j in range(1, 8))  # padding fields hold q = 0
    as_i32 = lambda v: v - (1 << 32) if v >= 1 << 31 else v  # noqa: E731
    assert packed.words.tolist() == [[as_i32(word0), as_i32(word1)]]
    assert [fields_per_word(b) for b in range(2, 9)] == [16, 10, 8, 6, 5, 4, 4]


@pytest.mark.parametrize(
    "max_abs, bits", [(0, 2), (1, 2), (2, 3), (3, 3), (4, 4), (7, 4), (8, 5), (63, 7), (64, 8), (127, 8)]
)
def test_default_bits_are_the_smallest_that_fit(max_abs, bits):
    q = torch.tensor([[0, -max_abs, 1 if max_abs else 0]])
    assert bits_for_magnitude(max_abs) == bits and pack_codes(q).bits == bits
    assert torch.equal(unpack_codes(pack_codes(q)), q.to(torch.int16))


def test_errors():
    with pytest.raises(BackendError, match="bit widths 2..8"):
        pack_codes(torch.tensor([[128]]))
    with pytest.raises(BackendError, match="do not fit in 3 bits"):
        pack_codes(torch.tensor([[4]]), 3)
    with pytest.raises(BackendError, match="bit widths 2..8"):
        pack_codes(torch.tensor([[1]]), 9)
    with pytest.raises(BackendError, match="integer tensor"):
        pack_codes(torch.tensor([[1.0]]), 4)
    with pytest.raises(BackendError, match="words per row"):
        PackedCodes(torch.zeros(2, 3, dtype=torch.int32), bits=4, k=40)
    with pytest.raises(BackendError, match="int32"):
        PackedCodes(torch.zeros(2, 5, dtype=torch.int64), bits=4, k=40)
