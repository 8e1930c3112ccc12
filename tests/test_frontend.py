"""The capture's working copy of the caller's model (:func:`l2fx.frontend.copy_as`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import l2fx
from l2fx.frontend import copy_as

from conftest import make_fast_config, make_tiny_calib, make_tiny_convnet

_HAS_COW = hasattr(torch, "_lazy_clone") and hasattr(torch._C, "_is_cow_tensor")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.BatchNorm1d(8)
        self.register_buffer("table", torch.arange(8.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)) + self.table)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def test_copy_has_equal_values_keeps_ties_and_requires_grad():
    model = _Tied()
    model.emb.weight.requires_grad_(False)
    work = copy_as(model)
    assert work.head.weight is work.emb.weight and work.head.weight is not model.head.weight
    assert isinstance(work.emb.weight, nn.Parameter) and work.emb.weight.requires_grad is False
    assert work.norm.bias.requires_grad is True
    for (k, a), (_, b) in zip(model.state_dict().items(), work.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.skipif(not _HAS_COW, reason="this torch has no copy-on-write clone")
def test_copy_shares_storage_until_a_write_and_a_write_reaches_one_side_only():
    model = _Tied()
    before = _snapshot(model)
    work = copy_as(model)
    assert all(torch._C._is_cow_tensor(t) for t in (*work.parameters(), *work.buffers()))
    with torch.no_grad():
        work.emb.weight.mul_(2)      # a pass rewriting a weight in place (BatchNorm folding does)
        work.norm.running_var.add_(1)
        work.table.zero_()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the caller's {k} changed"
    assert torch.equal(work.head.weight, 2 * before["emb.weight"])  # still tied on the copy
    with torch.no_grad():
        model.norm.weight.fill_(3)   # and the other way: the caller writes, the copy keeps its values
    assert torch.equal(work.norm.weight, before["norm.weight"])


def test_compile_leaves_the_callers_tensors_bit_for_bit():
    """BatchNorm folding, the byte fit and reconstruction write into the working copy's weights:
    none of it may reach the caller's model (which shares storage with the copy until then)."""
    model = make_tiny_convnet()
    before = _snapshot(model)
    compiled = l2fx.compile(model, target_cr=8, calib=make_tiny_calib(), config=make_fast_config())
    assert compiled.report.compressed_cr > 7
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the caller's {k} changed"
