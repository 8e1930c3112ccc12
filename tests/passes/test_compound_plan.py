"""``compound_plan`` and the compound methods built on it (``obc-compound``,
``adaprune+adaquant-compound``: l2fx/method.py), on layers small enough for exact OBS."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import l2fx
from l2fx.config import LayerRule, SensitivityConfig
from l2fx.errors import ConfigError, TargetCRError

from conftest import make_fast_config


class _Mlp(nn.Module):
    """Three layers with 24, 40 and 30 input columns: the last cannot take 2:4 (30 % 4 != 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(24, 40)
        self.b = nn.Linear(40, 30)
        self.c = nn.Linear(30, 16)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _model() -> _Mlp:
    torch.manual_seed(0)
    return _Mlp().eval()


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 24, generator=g) @ torch.randn(24, 24, generator=g) for _ in range(2)]


def _config(reduction, **kw):
    opts = () if reduction is None else (("bop_reduction", reduction),)
    return make_fast_config().replace(min_numel=64, sensitivity=SensitivityConfig(num_samples=16, num_steps=10),
                                      method_options=opts, **kw)


_METHODS = ["obc-compound", "adaprune+adaquant-compound"]


_CALLERS: dict[str, tuple[nn.Module, dict]] = {}


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for m in _METHODS:
        model = _model()
        _CALLERS[m] = (model, {k: v.clone() for k, v in model.state_dict().items()})
        out[m] = l2fx.compile(model, 8, _calib(), method=m, config=_config(10.0), verify=True)
    return out


@pytest.mark.parametrize("method", _METHODS)
def test_the_plan_meets_the_bop_target_and_is_what_the_artifact_holds(compiled, method):
    c = compiled[method]
    rec = c.report.records["compound_plan"]
    assert rec["plan_bops"] <= rec["budget_bops"] * (1 + 1e-9) and rec["achieved_reduction"] >= 10.0
    assert rec["act_bits"] == 32
    layers = rec["layers"]
    assert "not a multiple of 4" in layers["c.weight"]["note"]
    assert set(layers["c.weight"]["options"]) == {"dense-w8", "dense-w4"}
    for name in ("a", "b", "c"):
        choice = layers[f"{name}.weight"]["choice"]
        codes = c.graph_module.get_submodule(f"l2fx_weights.{name}__weight").codes
        qmax = (1 << (int(choice.split("-w")[1]) - 1)) - 1
        assert int(codes.abs().max()) <= qmax, (name, choice)
        if choice.startswith("2:4"):
            assert bool(((codes.reshape(-1, 4) != 0).sum(1) <= 2).all()), (name, choice)
    # Every byte counted as for any method: the report's CR is the file's layers' CR.
    assert c.report.compressed_cr > 4
    assert c.report.records["oneshot_solve"]["fallbacks"] == {}


def test_the_plan_is_optimal_on_its_own_table(compiled):
    """Brute force over the recorded table: the DP's summed loss is the least within the budget,
    up to what rounding the costs up to budget / resolution can lose (3 layers: 3 units)."""
    for c in compiled.values():
        rec = c.report.records["compound_plan"]
        rows = [list(v["options"].values()) for v in rec["layers"].values()]
        unit = rec["budget_bops"] / rec["resolution"]

        def brute(budget):
            fits = [sum(o["error"] for o in p) for p in itertools.product(*rows) if sum(o["bops"] for o in p) <= budget]
            return min(fits) if fits else None

        assert brute(rec["budget_bops"]) - 1e-9 <= rec["summed_error"]
        tight = brute(rec["budget_bops"] - len(rows) * unit)
        assert tight is None or rec["summed_error"] <= tight + 1e-9


def test_the_artifact_loads_bit_exactly_and_the_callers_model_is_untouched(compiled, tmp_path):
    c = compiled["obc-compound"]
    for model, before in _CALLERS.values():
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    l2fx.save(c, tmp_path / "m.l2fx")
    loaded = l2fx.load(tmp_path / "m.l2fx", model=_model(), verify=True)
    x = _calib()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), c(x))


def test_a_kept_layer_counts_as_dense_fp32_bops():
    cfg = _config(1.5, layers=(LayerRule("a", keep=True),))
    c = l2fx.compile(_model(), 8, _calib(), method="obc-compound", config=cfg)
    rec = c.report.records["compound_plan"]
    assert rec["kept_layers"] == ["a.weight"] and "a.weight" not in rec["layers"]
    # a: 960 of 3360 MACs per sample at 32 x 32, the others at least 4x less.
    assert rec["dense_bops"] == pytest.approx((960 + 1200 + 480) * 1024)
    assert rec["achieved_reduction"] >= 1.5


def test_bad_targets_name_the_problem():
    with pytest.raises(ConfigError, match="bop_reduction > 1"):
        l2fx.compile(_model(), 8, _calib(), method="obc-compound", config=_config(None))
    with pytest.raises(ConfigError, match="bop_reduction > 1"):
        l2fx.compile(_model(), 8, _calib(), method="obc-compound", config=_config(0.5))
    # c cannot take 2:4, so the most is below 16x: 1/(2160/16 + 480/8) * 2640 = 13.5x.
    with pytest.raises(TargetCRError, match=r"out of reach: the options reach at most 13\.5"):
        l2fx.compile(_model(), 8, _calib(), method="obc-compound", config=_config(14.0))


def test_block_formats_join_the_options_and_are_stored_in_their_format(tmp_path):
    """``bop_formats``: MXFP4 / MXFP8 offered to every layer beside {dense, 2:4} x {8, 4}; a
    layer the plan puts in a format is stored as the spec quantises it (rounded to nearest,
    recorded), its loss in the table is that quantisation's, and the file loads bit-exactly."""
    from l2fx import formats
    from l2fx.errors import ConfigError
    from l2fx.solvers.compound import Option
    from l2fx.transform import FORMAT_KINDS, TransformKind
    from l2fx.passes import CompoundPlan
    cfg = _config(6.0).replace(method_options=(("bop_reduction", 6.0), ("bop_formats", ["mxfp4_e2m1", "mxfp8_e4m3"])))
    # Grids limited to dense 8-bit (4x): 6x needs some layer in MXFP4 (8x at 4-bit elements).
    pm = l2fx.method.pipeline("adaprune+adaquant-compound", cfg).remove("compound_plan").insert_before(
        "sensitivity_analysis", CompoundPlan("adaprune+adaquant-compound", options=(Option(8),)))
    c = l2fx.compile(_model(), 8, _calib(), pipeline=pm, config=cfg, verify=True)
    rec = c.report.records["compound_plan"]
    assert rec["plan_bops"] <= rec["budget_bops"] * (1 + 1e-9)
    for name in ("a", "b", "c"):
        assert {"mxfp4_e2m1", "mxfp8_e4m3"} <= set(rec["layers"][f"{name}.weight"]["options"])
        assert rec["layers"][f"{name}.weight"]["options"]["mxfp4_e2m1"]["bops"] * 2 == pytest.approx(
            rec["layers"][f"{name}.weight"]["options"]["mxfp8_e4m3"]["bops"])
    in_format = {n: rec["layers"][f"{n}.weight"]["choice"] for n in "abc"
                 if rec["layers"][f"{n}.weight"]["choice"] in ("mxfp4_e2m1", "mxfp8_e4m3")}
    assert "mxfp4_e2m1" in in_format.values()
    kinds = {layer.param: layer.kind for layer in c.report.layers}
    for n, fmt in in_format.items():
        assert kinds[f"{n}.weight"] == fmt
        assert f"{n}.weight" in c.report.records["oneshot_solve"]["fallbacks"]
        w = getattr(_model(), n).weight.detach()
        spec = FORMAT_KINDS[TransformKind(fmt)]
        q = formats.quantize(w, spec, axis=1)
        want = formats.dequantize(q.symbols, q.scales, spec, axis=1)
        assert torch.equal(c.graph_module.get_submodule(f"l2fx_weights.{n}__weight")(), want)
    path = tmp_path / "m.l2fx"
    l2fx.save(c, path)
    x = _calib()[0]
    with torch.no_grad():
        assert torch.equal(l2fx.load(path, model=_model())(x), c(x))
    with pytest.raises(ConfigError, match="not a block format"):
        Option.of_format("int4")
    with pytest.raises(ConfigError, match="bop_formats"):
        l2fx.compile(_model(), 8, _calib(), method="obc-compound",
                     config=_config(10.0).replace(method_options=(("bop_reduction", 10.0), ("bop_formats", "mxfp4_e2m1"))))


def test_planning_twice_is_planning_once():
    from l2fx.passes import CompoundPlan
    from l2fx.passes.compound_plan import CompoundChoice
    from l2fx.ir import get_meta, weight_sites
    from pass_cases import marked, run
    cfg = _config(10.0)
    gm = marked(_model(), _calib()[0], cfg)
    once, records, modified = run(gm, [CompoundPlan("adaprune+adaquant-compound")], cfg, _calib())
    assert modified
    chosen = {site.param: (get_meta(n, CompoundChoice).option, get_meta(n, l2fx.ir.LayerIntent))
              for n, site in weight_sites(once)}
    assert {c for c, _ in chosen.values()} <= {"dense-w8", "dense-w4", "2:4-w8", "2:4-w4"}
    twice, _, modified = run(once, [CompoundPlan("adaprune+adaquant-compound")], cfg, _calib())
    assert not modified
    assert {site.param: (get_meta(n, CompoundChoice).option, get_meta(n, l2fx.ir.LayerIntent))
            for n, site in weight_sites(twice)} == chosen


def test_bop_options_offer_six_and_three_bits_and_four_blocks(tmp_path):
    """``bop_options`` replaces the seed's four options: 6- and 3-bit grids and 4-blocks at 50%
    enter the table (a layer whose columns are not a multiple of 4 is offered the dense ones
    only, with the reason), the plan meets the target, a 4-block layer's stored weight has whole
    zero blocks, and the file loads bit-exactly."""
    names = ["dense-w8", "dense-w6", "dense-w4", "dense-w3", "4block50-w4", "4block50-w3"]
    cfg = _config(14.0).replace(method_options=(("bop_reduction", 14.0), ("bop_options", names)))
    c = l2fx.compile(_model(), 8, _calib(), method="obc-compound", config=cfg, verify=True)
    rec = c.report.records["compound_plan"]
    assert rec["plan_bops"] <= rec["budget_bops"] * (1 + 1e-9)
    assert set(rec["layers"]["a.weight"]["options"]) == set(names)
    assert set(rec["layers"]["c.weight"]["options"]) == set(names[:4])
    assert "not a multiple of 4" in rec["layers"]["c.weight"]["note"]
    choices = {k: v["choice"] for k, v in rec["layers"].items()}
    assert any(v.startswith("4block") for v in choices.values()), choices
    for name in ("a", "b"):
        if choices[f"{name}.weight"].startswith("4block"):
            w = c.graph_module.get_submodule(f"l2fx_weights.{name}__weight")()
            zero = (w.reshape(w.shape[0], -1, 4) == 0).all(dim=2)
            assert int(zero.sum()) == zero.numel() // 2
    path = tmp_path / "m.l2fx"
    l2fx.save(c, path)
    x = _calib()[0]
    with torch.no_grad():
        assert torch.equal(l2fx.load(path, model=_model())(x), c(x))
    with pytest.raises(ConfigError, match="bop_options"):
        l2fx.compile(_model(), 8, _calib(), method="obc-compound",
                     config=_config(10.0).replace(method_options=(("bop_reduction", 10.0), ("bop_options", "dense-w4"))))
