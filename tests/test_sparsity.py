"""Invariants of l2fx.sparsity: exact counts, N:M group invariants, block structure, scores
equivalence, errors, and mask entropy against direct enumeration. Mirrors l2fx/sparsity.py."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError, FormatError, NonFiniteWeightError
from l2fx.sparsity import (
    NM,
    Blocks,
    Unstructured,
    as_rows_cols,
    block_mask,
    from_rows_cols,
    magnitude_mask,
    mask_entropy_bits,
    nm_mask,
)


def rand(shape, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties
        return torch.randint(-3, 4, shape, generator=g).float()
    return torch.randn(shape, generator=g)


def test_rows_cols_view_of_conv_weight():
    w = torch.randn(8, 3, 3, 3)
    v = as_rows_cols(w)
    assert v.shape == (8, 27) and v.data_ptr() == w.data_ptr()
    assert torch.equal(from_rows_cols(v, w.shape), w)
    assert as_rows_cols(torch.randn(5)).shape == (1, 5)
    with pytest.raises(ConfigError):
        as_rows_cols(torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# magnitude_mask


@given(rows=st.integers(1, 6), cols=st.integers(1, 40), sparsity=st.floats(0, 1),
       scope=st.sampled_from(["tensor", "row"]), seed=st.integers(0, 10**6),
       ties=st.booleans())
def test_magnitude_mask_exact_count_and_order(rows, cols, sparsity, scope, seed, ties):
    w = rand((rows, cols), seed, ties)
    mask = magnitude_mask(w, sparsity, scope)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    a = w.abs()
    if scope == "tensor":
        assert int((~mask).sum()) == round(sparsity * w.numel())
        groups = [(a.reshape(-1), mask.reshape(-1))]
    else:
        assert ((~mask).sum(1) == round(sparsity * cols)).all()
        groups = list(zip(a, mask))
    for s, k in groups:
        if k.any() and (~k).any():
            assert s[~k].max() <= s[k].min()  # everything pruned scores <= everything kept
    assert torch.equal(magnitude_mask(w, sparsity, scope), mask)  # deterministic
    assert torch.equal(magnitude_mask(w, sparsity, scope, scores=w.abs()), mask)


def test_magnitude_ties_prune_lower_index_first():
    w = torch.ones(2, 5)
    mask = magnitude_mask(w, 0.4)
    assert mask.reshape(-1).tolist() == [False] * 4 + [True] * 6
    assert magnitude_mask(w, 0.4, "row").tolist() == [[False, False, True, True, True]] * 2


def test_magnitude_mask_uses_scores_and_conv_shape():
    w = rand((4, 2, 3, 3), 1)
    col_norm = torch.tensor([100.0, 0.01]).reshape(1, 2, 1, 1)  # Wanda: |w| * ||x_j||
    mask = magnitude_mask(w, 0.5, "row", scores=w.abs() * col_norm)
    assert mask.shape == w.shape
    assert mask[:, 0].all() and not mask[:, 1].any()  # input channel 1 pruned everywhere


def test_magnitude_mask_bad_arguments():
    w = torch.randn(3, 4)
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ConfigError):
            magnitude_mask(w, bad, name="fc.weight")
    with pytest.raises(ConfigError, match="scope"):
        magnitude_mask(w, 0.5, scope="column")
    with pytest.raises(ConfigError, match="scores"):
        magnitude_mask(w, 0.5, scores=torch.ones(4, 3))
    with pytest.raises(NonFiniteWeightError, match="fc.weight"):
        magnitude_mask(torch.tensor([1.0, float("nan")]), 0.5, name="fc.weight")


# ---------------------------------------------------------------------------------------------
# nm_mask


@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (1, 3)]),
       rows=st.integers(1, 5), groups=st.integers(1, 8), seed=st.integers(0, 10**6),
       ties=st.booleans())
def test_nm_group_invariants(nm, rows, groups, seed, ties):
    n, m = nm
    w = rand((rows, groups * m), seed, ties)
    mask = nm_mask(w, n, m)
    g_mask = mask.reshape(rows, groups, m)
    g_abs = w.abs().reshape(rows, groups, m)
    assert (g_mask.sum(-1) == n).all()
    kept_min = torch.where(g_mask, g_abs, math.inf).amin(-1)
    pruned_max = torch.where(~g_mask, g_abs, -math.inf).amax(-1)
    assert (pruned_max <= kept_min).all()
    assert torch.equal(nm_mask(w, n, m, scores=w.abs()), mask)
    assert mask_entropy_bits(mask, NM(n, m)) == pytest.approx(
        rows * groups * math.log2(math.comb(m, n)))


def test_nm_on_conv_groups_along_flattened_reduction_axis():
    w = rand((4, 2, 2, 2), 7)  # cols = 8
    mask = nm_mask(w, 2, 4)
    assert (as_rows_cols(mask).reshape(4, 2, 4).sum(-1) == 2).all()
    assert torch.equal(as_rows_cols(mask), nm_mask(as_rows_cols(w), 2, 4))


def test_nm_ties_and_errors():
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[False, False, True, True]]
    with pytest.raises(FormatError) as e:
        nm_mask(torch.randn(4, 3, 3, 3), 2, 4, name="conv1.weight")
    assert "conv1.weight" in str(e.value) and "27" in str(e.value) and "m = 4" in str(e.value)
    for n, m in ((4, 4), (0, 4), (5, 4)):
        with pytest.raises(ConfigError):
            nm_mask(torch.randn(2, 8), n, m)


# ---------------------------------------------------------------------------------------------
# block_mask


def _tiles(rows, cols, br, bc):
    for i in range(0, rows, br):
        for j in range(0, cols, bc):
            yield slice(i, i + br), slice(j, j + bc)


@given(rows=st.integers(1, 9), cols=st.integers(1, 13), block=st.sampled_from(
       [(2, 2), (1, 4), (4, 4), (3, 2), (1, 1)]), sparsity=st.floats(0, 1),
       seed=st.integers(0, 10**6), ties=st.booleans())
def test_block_mask_structure_and_count(rows, cols, block, sparsity, seed, ties):
    w = rand((rows, cols), seed, ties)
    br, bc = block
    mask = block_mask(w, sparsity, block)
    tiles = list(_tiles(rows, cols, br, bc))
    kept, norms = [], []
    for r, c in tiles:
        t = mask[r, c]
        assert t.all() or not t.any()  # constant on every tile, partial ones included
        kept.append(bool(t.all()))
        norms.append(float(w[r, c].double().square().sum().sqrt()))
    assert kept.count(False) == round(sparsity * len(tiles))
    if any(kept) and not all(kept):
        pruned_norms = [x for x, k in zip(norms, kept) if not k]
        kept_norms = [x for x, k in zip(norms, kept) if k]
        assert max(pruned_norms) <= min(kept_norms)
    assert torch.equal(block_mask(w, sparsity, block, scores=w.abs()), mask)
    assert mask_entropy_bits(mask, Blocks(br, bc)) == pytest.approx(
        len(tiles) * _h2_direct(sum(kept), len(tiles)))


def test_block_mask_partial_edge_and_bad_block():
    w = torch.ones(3, 5)
    # 2 x 3 tiles of 2x2; norms [[2, 2, sqrt2], [sqrt2, sqrt2, 1]]: the 1x1 corner goes first,
    # then the sqrt2 ties in row-major tile order (the 2x1 tile at (0, 2) first).
    mask = block_mask(w, 1 / 6, (2, 2))
    assert (~mask).nonzero().tolist() == [[2, 4]]
    mask = block_mask(w, 2 / 6, (2, 2))
    assert (~mask).nonzero().tolist() == [[0, 4], [1, 4], [2, 4]]
    with pytest.raises(ConfigError):
        block_mask(w, 0.5, (0, 4))
    with pytest.raises(ConfigError):
        block_mask(w, 0.5, [1, 4])


# ---------------------------------------------------------------------------------------------
# mask_entropy_bits against direct enumeration


def _h2_direct(k: int, n: int) -> float:
    """-log2 P(mask) per the i.i.d. Bernoulli(k/n) model, one factor per element, / n * n."""
    if n == 0:
        return 0.0
    p = k / n
    bits = 0.0
    for i in range(n):
        q = p if i < k else 1 - p
        bits -= math.log2(q) if q > 0 else 0.0
    return bits / n


def test_unstructured_entropy_equals_code_length_of_the_mask():
    for bits in itertools.product([False, True], repeat=6):
        mask = torch.tensor(bits).reshape(2, 3)
        k = sum(bits)
        p = k / 6
        direct = -sum(math.log2(p if b else 1 - p) for b in bits if (p if b else 1 - p) > 0)
        got = mask_entropy_bits(mask, Unstructured())
        assert got == pytest.approx(direct, abs=1e-12)
        # never below the exact enumerative bound log2 C(n, k)
        assert got >= math.log2(math.comb(6, k)) - 1e-12


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (1, 4), (3, 8), (4, 8)])
def test_nm_entropy_equals_log2_of_enumerated_group_count(n, m):
    valid = [g for g in itertools.product([0, 1], repeat=m) if sum(g) == n]
    groups = 3
    rows = [list(valid[i % len(valid)]) for i in range(groups)]
    mask = torch.tensor([sum(rows, [])], dtype=torch.bool)
    assert mask_entropy_bits(mask, NM(n, m)) == pytest.approx(groups * math.log2(len(valid)))


def test_two_four_costs_log2_6_over_4_bits_per_weight():
    w = torch.randn(16, 64)
    mask = nm_mask(w, 2, 4)
    assert mask_entropy_bits(mask, NM(2, 4)) / w.numel() == pytest.approx(math.log2(6) / 4)


def test_block_entropy_equals_enumeration_over_tiles():
    # 2 x 3 tiles of 2x2 on a [3, 5] matrix (partial edges); enumerate all 2^6 tile choices.
    for choice in itertools.product([False, True], repeat=6):
        keep = torch.tensor(choice).reshape(2, 3)
        mask = keep.repeat_interleave(2, 0).repeat_interleave(2, 1)[:3, :5]
        k = sum(choice)
        p = k / 6
        direct = -sum(math.log2(p if c else 1 - p) for c in choice if (p if c else 1 - p) > 0)
        assert mask_entropy_bits(mask, Blocks(2, 2)) == pytest.approx(direct, abs=1e-12)


def test_entropy_rejects_masks_outside_the_pattern():
    with pytest.raises(FormatError, match="2:4"):
        mask_entropy_bits(torch.tensor([[True, True, True, False]]), NM(2, 4), name="w")
    with pytest.raises(FormatError):
        mask_entropy_bits(torch.ones(2, 6, dtype=torch.bool), NM(2, 4))
    with pytest.raises(FormatError, match="constant"):
        mask_entropy_bits(torch.tensor([[True, False], [True, True]]), Blocks(2, 2))
    with pytest.raises(ConfigError):
        mask_entropy_bits(torch.ones(2, 2), Unstructured())
    with pytest.raises(ConfigError):
        mask_entropy_bits(torch.ones(2, 2, dtype=torch.bool), "2:4")
    assert mask_entropy_bits(torch.ones(0, 4, dtype=torch.bool), Unstructured()) == 0.0
