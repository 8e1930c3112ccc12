"""The compound DP (l2fx/solvers/compound.py) against brute force, and its option arithmetic."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.errors import ConfigError, TargetCRError
from l2fx.solvers import Grid
from l2fx.solvers.compound import OPTIONS, Option, choose_options, option_bops, option_errors


def _brute(costs, errors, budget):
    """The least summed error over every plan whose summed cost is within ``budget``."""
    best = None
    for choice in itertools.product(*[range(len(r)) for r in costs]):
        c = sum(costs[i][j] for i, j in enumerate(choice))
        if c <= budget:
            e = sum(errors[i][j] for i, j in enumerate(choice))
            best = e if best is None else min(best, e)
    return best


_table = st.integers(1, 5).flatmap(lambda layers: st.tuples(
    st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=4), min_size=layers, max_size=layers),
    st.lists(st.lists(st.floats(0, 100, allow_nan=False), min_size=4, max_size=4), min_size=layers,
             max_size=layers)))


@given(_table, st.integers(1, 120))
def test_the_dp_is_exact_when_the_costs_are_whole_units(table, budget):
    """Integer costs and resolution = budget: the unit is 1, no rounding, so the DP's error is
    brute force's minimum (or both find no plan)."""
    costs, errs = table
    errors = [e[: len(c)] for c, e in zip(costs, errs)]
    want = _brute(costs, errors, budget)
    if want is None:
        with pytest.raises(TargetCRError):
            choose_options(costs, errors, budget, resolution=budget)
        return
    plan = choose_options(costs, errors, budget, resolution=budget)
    assert plan.cost <= budget
    assert math.isclose(plan.error, want, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(plan.error, sum(errors[i][j] for i, j in enumerate(plan.choice)), rel_tol=1e-12)


@given(st.lists(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=4, max_size=4), min_size=1, max_size=5),
       st.lists(st.lists(st.floats(0, 100, allow_nan=False), min_size=4, max_size=4), min_size=5, max_size=5),
       st.floats(0.5, 40.0), st.integers(1, 2000))
def test_with_real_costs_the_plan_meets_the_budget_and_is_within_the_rounding_of_optimal(costs, errs, budget,
                                                                                         resolution):
    """Costs rounded up: every plan the DP returns fits the real budget, and no plan whose real
    cost fits ``budget - layers * unit`` (the most the rounding can add) has a smaller error."""
    errors = errs[: len(costs)]
    try:
        plan = choose_options(costs, errors, budget, resolution)
    except TargetCRError:
        unit = budget / resolution
        assert _brute(costs, errors, budget - len(costs) * unit) is None
        return
    assert plan.cost <= budget * (1 + 1e-9)
    assert plan.units <= resolution
    tight = _brute(costs, errors, budget - len(costs) * budget / resolution)
    if tight is not None:
        assert plan.error <= tight + 1e-9
    assert plan.error >= _brute(costs, errors, budget) - 1e-9


def test_ties_go_to_the_cheaper_plan():
    plan = choose_options([[1, 3], [2, 5]], [[1.0, 1.0], [0.0, 0.0]], 8, resolution=8)
    assert plan.choice == (0, 0) and plan.cost == 3


def test_bad_tables_and_budgets_are_config_errors_naming_the_problem():
    with pytest.raises(ConfigError, match="one cost and one error row per layer"):
        choose_options([[1]], [], 3)
    with pytest.raises(ConfigError, match="layer 0 has 2 costs and 1 errors"):
        choose_options([[1, 2]], [[0.0]], 3)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        choose_options([[-1.0]], [[0.0]], 3)
    with pytest.raises(ConfigError, match="budget must be finite"):
        choose_options([[1.0]], [[0.0]], 0.0)
    with pytest.raises(ConfigError, match="resolution"):
        choose_options([[1.0]], [[0.0]], 1.0, resolution=0)
    with pytest.raises(TargetCRError, match="out of reach"):
        choose_options([[5.0, 4.0]], [[0.0, 1.0]], 3.0)


def test_option_bops_count_the_pattern_and_the_bits():
    """Against dense fp32 (32 x 32 per MAC, activations fp32): 4x, 8x, 8x, 16x."""
    reductions = [option_bops(100, None) / option_bops(100, o) for o in OPTIONS]
    assert reductions == [4.0, 8.0, 8.0, 16.0]
    assert [o.name for o in OPTIONS] == ["dense-w8", "dense-w4", "2:4-w8", "2:4-w4"]
    with pytest.raises(ConfigError, match="bits"):
        Option(1)
    with pytest.raises(ConfigError, match="prune_n/prune_m"):
        Option(4, 4, 4)


def test_option_errors_are_the_layer_losses_of_the_recipe_and_grow_with_compression():
    """OBC's table on one random layer: more compression, more loss (4-bit 2:4 the most)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(256, 16, generator=g)
    H = (2 * X.T @ X / 256).double()
    amax = W.abs().amax(1)
    grids = {b: Grid.from_steps(amax / ((1 << (b - 1)) - 1), (1 << (b - 1)) - 1) for b in (8, 4)}
    errs = option_errors("obc-compound", W, H, grids, OPTIONS, {"percdamp": 0.01, "max_cost": 1e12, "block": 1,
                                                                 "blocksize": 128})
    d8, d4, s8, s4 = errs
    assert 0 <= d8 < d4 < s4 and d8 < s8 < s4


@given(st.integers(2, 8), st.sampled_from(["dense", "2:4", "1:4", "4:8", "4block50", "4block62.5", "4block25"]))
def test_option_names_parse_back_to_the_same_option(bits, pattern):
    opt = Option.parse(f"{pattern}-w{bits}")
    assert opt.name == f"{pattern}-w{bits}"
    assert Option.parse(opt.name) == opt
    assert option_bops(64, opt) == pytest.approx(64 * opt.density * bits * 32)


def test_four_block_options_count_their_density_and_bad_names_are_config_errors():
    o = Option.parse("4block50-w3")
    assert (o.block_sparsity, o.group, o.density, o.dense) == (0.5, 4, 0.5, False)
    assert dict(o.solver_options())["block"] == 4
    assert dict(Option(6).solver_options())["block"] == 1
    assert option_bops(100, None) / option_bops(100, Option.parse("dense-w6")) == pytest.approx(32 / 6)
    assert Option.parse("mxfp4_e2m1").format == "mxfp4_e2m1"
    for bad, match in [("dense-w9", "bits"), ("4block0-w4", "percentage"), ("4block100-w4", "percentage"),
                       ("sparse-w4", "not an option name"), (4, "is a name")]:
        with pytest.raises(ConfigError, match=match):
            Option.parse(bad)
    with pytest.raises(ConfigError, match="not both"):
        Option(4, 2, 4, block_sparsity=0.5)
    with pytest.raises(ConfigError, match="block_sparsity"):
        Option(4, block_sparsity=1.0)


def test_four_block_options_prune_whole_blocks_under_both_solvers():
    """OBC's OBS and the baseline's magnitude AdaPrune, asked for 4-blocks at 50%: half of each
    layer's 4-blocks of consecutive columns are exact zeros, the rest kept whole; the table's
    3- and 6-bit rows sit on either side of the 4-bit ones."""
    from l2fx.solvers.recipes import options_for, solve
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(256, 16, generator=g)
    H = (2 * X.T @ X / 256).double()
    amax = W.abs().amax(1)
    grids = {b: Grid.from_steps(amax / ((1 << (b - 1)) - 1), (1 << (b - 1)) - 1) for b in (3, 4, 6)}
    opts = [Option.parse(n) for n in ("dense-w6", "dense-w4", "dense-w3", "4block50-w4")]
    for recipe in ("obc-compound", "adaprune+adaquant-compound"):
        base = options_for({"max_cost": 1e12, "iters": 20})
        d6, d4, d3, b4 = option_errors(recipe, W, H, grids, opts, base)
        assert d6 < d4 < d3 and d4 < b4
        res = solve(recipe, W, H, grids[4], {**base, **dict(opts[3].solver_options())})
        blocks = (res.w_hat.reshape(8, 4, 4) != 0).any(dim=2)
        zeros = (res.w_hat.reshape(8, 4, 4) == 0).all(dim=2)
        assert int(zeros.sum()) == 16 and bool((blocks | zeros).all()) and int(blocks.sum()) == 16
    with pytest.raises(ConfigError, match="single weights"):
        solve("wanda", W, H, grids[4], options_for({"sparsity": 0.5, "block": 4}))


def test_option_errors_refuse_wa_options():
    """A w+a option's loss is not a function of one Hessian: refused, not returned as the weights-only loss."""
    from l2fx.solvers.compound import WA_OPTIONS
    W, H = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ConfigError, match="dense-w8a8 quantises activations"):
        option_errors("obc-compound", W, H, {}, WA_OPTIONS[:1], {})
