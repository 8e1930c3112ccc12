"""passes/allocation.py: equal-slope (Lagrangian) allocation over the sensitivity curves.

before     a marked graph whose every site carries a ``SensitivityCurve`` (here made by hand:
           candidates with exact bytes and a distortion)
transform  EntropyAllocation at ``target_cr``
expected   each site's ``Allocation`` is one of its candidates; all of them minimise
           ``distortion + lambda * bytes`` on their curves for one common lambda, the smallest
           lambda whose total fits the budget ``fp32 / target_cr``; a target out of the curves'
           reach is a TargetCRError stating the reachable range.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from l2fx.config import CompileConfig
from l2fx.errors import PassError, TargetCRError
from l2fx.ir import Allocation, Candidate, SensitivityCurve, get_meta, set_meta, weight_sites
from l2fx.passes import EntropyAllocation
from l2fx.passes.allocation import lagrangian_pick

from pass_cases import make_mlp, marked, mlp_calib, run


def marked_mlp():
    return marked(make_mlp(), mlp_calib()[0])


@st.composite
def curves_for(draw, numels: list[int]):
    """One curve per site: 1..8 candidates, bytes between numel/32 and 2 numel (distinct within a
    curve), distortions on a 1e-6 grid in [1e-6, 1] (no two slopes closer than float rounding)."""
    out = []
    for numel in numels:
        nbytes = draw(st.lists(st.integers(max(1, numel // 32), 2 * numel), min_size=1, max_size=8, unique=True))
        dist = [draw(st.integers(1, 10 ** 6)) * 1e-6 for _ in nbytes]
        out.append(tuple(Candidate("joint", 0.01 * (i + 1), 0.01 * (i + 1), b, d) for i, (b, d) in enumerate(zip(nbytes, dist))))
    return out


def attach(gm, curves) -> float:
    """Puts the curves on the sites; returns the fp32 bytes of the compressed weights."""
    sites = list(weight_sites(gm))
    for (node, _), curve in zip(sites, curves):
        set_meta(node, SensitivityCurve(curve))
    return float(sum(4 * site.numel for _, site in sites))


def lambda_interval(curves, picks) -> tuple[float, float]:
    """The lambdas >= 0 for which every pick minimises distortion + lambda * bytes on its curve."""
    lo, hi = 0.0, math.inf
    for curve, p in zip(curves, picks):
        for q in curve:
            if q.nbytes > p.nbytes:  # q must not be better: d_p + l b_p <= d_q + l b_q
                lo = max(lo, (p.distortion - q.distortion) / (q.nbytes - p.nbytes))
            elif q.nbytes < p.nbytes:
                hi = min(hi, (q.distortion - p.distortion) / (p.nbytes - q.nbytes))
    return lo, hi


MLP_NUMELS = [64 * 128, 128 * 64, 64 * 16]


@given(curves_for(MLP_NUMELS), st.floats(0.0, 1.0))
def test_picks_are_the_least_distortion_lagrangian_minimisers_that_fit(curves, where):
    gm = marked_mlp()
    assert [s.numel for _, s in weight_sites(gm)] == MLP_NUMELS
    fp32 = attach(gm, curves)
    smallest = sum(min(c.nbytes for c in curve) for curve in curves)
    largest = sum(max(c.nbytes for c in curve) for curve in curves)
    budget = smallest + where * (largest - smallest)
    cfg = CompileConfig(target_cr=fp32 / budget)
    gm, records, _ = run(gm, [EntropyAllocation()], cfg)
    picks = []
    for (node, _), curve in zip(weight_sites(gm), curves):
        alloc = get_meta(node, Allocation)
        pick = next(c for c in curve if (c.step_s, c.nbytes) == (alloc.step_s, alloc.predicted_nbytes))
        assert alloc == Allocation(pick.kind, pick.step_s, pick.threshold_e, pick.nbytes, pick.channel_scaled)
        picks.append(pick)
    total = sum(p.nbytes for p in picks)
    # fp32 / (fp32 / budget) need not give budget back to the last bit
    assert total <= budget * (1 + 1e-12)
    assert records["entropy_allocation"]["predicted_nbytes"] == total
    lo, hi = lambda_interval(curves, picks)
    assert lo <= hi * (1 + 1e-9), (lo, hi)  # one lambda for every curve: equal slopes
    # The least distortion for the budget among the Lagrangian solutions: just below that
    # lambda the picks no longer fit (or lambda = 0, the least distortion of all, fits).
    if lo > 0:
        assert sum(p.nbytes for p in lagrangian_pick(curves, lo * (1 - 1e-9))) > budget * (1 + 1e-12)
    else:
        assert picks == lagrangian_pick(curves, 0.0)


@given(curves_for(MLP_NUMELS), st.floats(0.0, 1.0), st.sampled_from([1e-40, 1e-12, 1e12, 1e35]))
def test_the_picks_do_not_depend_on_the_distortions_scale(curves, where, scale):
    """Distortions all scaled by one factor (another metric, or a relative error whose energy is
    tiny) give the same picks: the lambda search follows the curves' slopes."""
    from l2fx.passes.allocation import allocate

    smallest = sum(min(c.nbytes for c in curve) for curve in curves)
    largest = sum(max(c.nbytes for c in curve) for curve in curves)
    budget = smallest + where * (largest - smallest)
    scaled = [tuple(Candidate(c.kind, c.step_s, c.threshold_e, c.nbytes, c.distortion * scale) for c in curve)
              for curve in curves]
    picks = [curve.index(p) for curve, p in zip(curves, allocate(curves, budget))]
    assert [curve.index(p) for curve, p in zip(scaled, allocate(scaled, budget))] == picks


@given(curves_for(MLP_NUMELS), st.sampled_from(["above", "below"]))
def test_a_target_out_of_reach_names_the_reachable_range(curves, side):
    gm = marked_mlp()
    fp32 = attach(gm, curves)
    smallest = sum(min(c.nbytes for c in curve) for curve in curves)
    largest = sum(max(c.nbytes for c in curve) for curve in curves)
    lo_cr, hi_cr = fp32 / largest, fp32 / smallest
    tol = CompileConfig().cr_tolerance
    target = hi_cr * (1 + tol) * 1.01 if side == "above" else lo_cr * (1 - tol) * 0.99
    if target <= 1.0:
        return  # CompileConfig refuses it before any pass (test_config's)
    with pytest.raises(TargetCRError, match=f"reachable range .* is {lo_cr:.2f} .. {hi_cr:.2f}"):
        run(gm, [EntropyAllocation()], CompileConfig(target_cr=target))


def test_targets_just_past_the_grid_are_left_to_rate_fit():
    """Within cr_tolerance beyond either end of the curves, the allocation still runs:
    rate_fit's common factor moves every step a little further."""
    gm = marked_mlp()
    curves = [(Candidate("joint", 0.1, 0.1, n // 8, 0.5), Candidate("joint", 0.01, 0.01, n // 2, 0.01))
              for n in MLP_NUMELS]
    fp32 = attach(gm, curves)
    hi_cr = fp32 / sum(n // 8 for n in MLP_NUMELS)
    gm, _, _ = run(gm, [EntropyAllocation()], CompileConfig(target_cr=hi_cr * 1.005))
    assert [get_meta(n, Allocation).predicted_nbytes for n, _ in weight_sites(gm)] == [n // 8 for n in MLP_NUMELS]


def test_two_layers_share_the_slope_not_the_distortion():
    """before: layer A's distortion falls 10x faster per byte than layer B's; expected: at a
    budget that buys one refinement, A gets it."""
    gm = marked_mlp()
    n0, n1, n2 = MLP_NUMELS
    curves = [(Candidate("joint", 2.0, 2.0, 1000, 1.0), Candidate("joint", 1.0, 1.0, 2000, 0.5)),   # slope 5e-4
              (Candidate("joint", 2.0, 2.0, 1000, 1.0), Candidate("joint", 1.0, 1.0, 2000, 0.95)),  # slope 5e-5
              (Candidate("joint", 2.0, 2.0, 100, 0.1),)]
    fp32 = attach(gm, curves)
    gm, _, _ = run(gm, [EntropyAllocation()], CompileConfig(target_cr=fp32 / 3100))
    assert [get_meta(n, Allocation).predicted_nbytes for n, _ in weight_sites(gm)] == [2000, 1000, 100]


def test_without_curves_the_pass_names_itself_and_the_node():
    gm = marked_mlp()
    first = next(node for node, _ in weight_sites(gm))
    with pytest.raises(PassError, match=rf"'entropy_allocation' at node '{first.name}'.*l2fx.sensitivity"):
        run(gm, [EntropyAllocation()])


def test_joint_rounds_measure_the_picks_and_keep_only_what_lowers_the_joint_error():
    """joint_rounds: the chosen allocation's joint error is measured (all layers compressed), each
    round re-allocates on rescaled curves at the same budget and is kept only if its measured
    joint error is lower; predicted vs measured recorded per round."""
    import dataclasses

    import l2fx
    from conftest import make_fast_config, make_tiny_calib, make_tiny_convnet

    base = make_fast_config()
    cfg = base.replace(sensitivity=dataclasses.replace(base.sensitivity, joint_rounds=3),
                       reconstruction=dataclasses.replace(base.reconstruction, enabled=False))
    c = l2fx.compile(make_tiny_convnet(), 10, make_tiny_calib(), config=cfg, verify=True)
    joint = c.report.records["entropy_allocation"]["joint"]
    rounds = joint["rounds"]
    assert 1 <= len(rounds) <= 3
    assert all(r["accepted"] == (r["trial_measured"] < r["measured"]) for r in rounds)
    assert all(r["accepted"] for r in rounds[:-1])  # a dropped round ends the correction
    assert joint["final_measured"] <= rounds[0]["measured"]
    assert joint["final_measured"] == min([rounds[0]["measured"]] + [r["trial_measured"] for r in rounds if r["accepted"]])
    assert abs(c.report.compressed_cr / 10 - 1) <= 0.01
    with pytest.raises(l2fx.errors.ConfigError, match="joint_rounds"):
        l2fx.SensitivityConfig(joint_rounds=-1)
