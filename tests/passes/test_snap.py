"""passes/snap.py: fine-tuned weights moved to their symbols' centres, only when on budget.

before     TransformedWeights whose weights sit anywhere in their symbols' cells (here: moved
           by noise of a few tenths of a step, as STE fine-tuning leaves them), the total on
           budget (``rate_fit`` put it there) or off it
transform  SnapWeights
expected   on budget: every weight a fixed point of T^-1(round(T(.))), its symbol, T and the
           graph's output unchanged, ``snapped`` recorded; off budget: nothing moves; a second
           run changes nothing.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, strategies as st

from l2fx.bytefit import budget_nbytes, total_nbytes, within_tolerance
from l2fx.config import CompileConfig
from l2fx.errors import PassError
from l2fx.ir import weight_sites
from l2fx.passes import InsertTransforms, RateFit, SnapWeights
from l2fx.transform import encode

from pass_cases import allocate_from_grid, make_mlp, marked, mlp_calib, run

KINDS = ["joint", "linear", "log", "exp", "prune"]
X = mlp_calib()[0]
_GRAPHS: dict = {}


def tuned(kind: str, where: float, seed: int, cfg: CompileConfig):
    """The MLP after insert_transforms, its weights moved by up to 0.3 of their local step
    (seeded noise), then put on budget by rate_fit."""
    key = (kind, where)
    if key not in _GRAPHS:
        gm = marked(make_mlp(), X, cfg)
        allocate_from_grid(gm, kind, where, cfg)
        _GRAPHS[key] = run(gm, [InsertTransforms()], cfg)[0]
    gm = copy.deepcopy(_GRAPHS[key])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules(gm):
            step = (m() - m.weight).abs().amax().clamp_min(1e-8)  # about half a step where it is coarsest
            m.weight.add_((torch.rand(m.weight.shape, generator=g) - 0.5) * 0.6 * step)
    return run(gm, [RateFit()], cfg)[0]


def modules(gm):
    return [gm.get_submodule(str(n.target)) for n, _ in weight_sites(gm)]


def symbols(m) -> torch.Tensor:
    s, e = m.params()
    return encode(m.weight, m.kind, s, e, m.qmax)


@given(st.sampled_from(KINDS), st.sampled_from([0.3, 0.7]), st.integers(0, 2 ** 31 - 1))
def test_on_budget_every_weight_moves_to_its_symbols_centre(kind, where, seed):
    cfg = CompileConfig(target_cr=10.0)
    gm = tuned(kind, where, seed, cfg)
    assert within_tolerance(total_nbytes(gm, 1.0, cfg.coding.chunk_size), budget_nbytes(gm, 10.0), cfg.cr_tolerance)
    before = [(symbols(m), m.step_s.detach().clone(), m.threshold_e.detach().clone(), m().detach())
              for m in modules(gm)]
    assert any(not torch.equal(w_hat, m.weight) for m, (_, _, _, w_hat) in zip(modules(gm), before))
    with torch.no_grad():
        out_before = gm(X)
    gm, records, modified = run(gm, [SnapWeights()], cfg)
    assert records["snap_weights"]["snapped"] is True and modified
    for m, (q, s, e, w_hat) in zip(modules(gm), before):
        assert torch.equal(m.step_s, s) and torch.equal(m.threshold_e, e)
        with torch.no_grad():
            assert torch.equal(m.weight, w_hat)  # moved to T^-1(round(T(w)))
            assert torch.equal(m(), m.weight)  # ... which is a fixed point
            assert torch.equal(symbols(m), q)  # with the same symbol
    with torch.no_grad():
        assert torch.equal(gm(X), out_before)


def test_off_budget_nothing_moves():
    """before: weights moved off their centres, T set for CR 10, asked for CR 20."""
    gm = tuned("joint", 0.5, 0, CompileConfig(target_cr=10.0))
    weights = [m.weight.detach().clone() for m in modules(gm)]
    assert any(not torch.equal(m(), m.weight) for m in modules(gm))
    gm, records, modified = run(gm, [SnapWeights()], CompileConfig(target_cr=20.0))
    assert records["snap_weights"]["snapped"] is False and not modified
    assert all(torch.equal(m.weight, w) for m, w in zip(modules(gm), weights))


def test_a_second_snap_changes_nothing():
    cfg = CompileConfig(target_cr=10.0)
    once, records, _ = run(tuned("joint", 0.5, 1, cfg), [SnapWeights()], cfg)
    assert records["snap_weights"]["snapped"] is True
    weights = [m.weight.detach().clone() for m in modules(once)]
    twice, records, _ = run(once, [SnapWeights()], cfg)
    assert records["snap_weights"]["snapped"] is True
    assert all(torch.equal(m.weight, w) for m, w in zip(modules(twice), weights))


def test_without_transformed_weights_the_pass_names_itself_and_the_node():
    gm = marked(make_mlp(), X)
    node = next(n for n, _ in weight_sites(gm))
    with pytest.raises(PassError, match=rf"'snap_weights' at node '{node.name}'.*TransformedWeight"):
        run(gm, [SnapWeights()])
