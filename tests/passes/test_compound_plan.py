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
    assert rec["act_bits"] == [32]
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


_WA = ["dense-w8a8", "dense-w4a4", "2:4-w8a8", "2:4-w4a4"]


@pytest.fixture(scope="module")
def compiled_wa():
    cfg = _config(40.0).replace(method_options=(("bop_reduction", 40.0), ("bop_options", _WA)))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = {m: l2fx.compile(model, 8, _calib(), method=m, config=cfg, verify=True) for m in _METHODS}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return out


@pytest.mark.parametrize("method", _METHODS)
def test_wa_options_count_activation_bits_and_measure_the_joint_error(compiled_wa, method):
    """The seed's w+a setting: BOPs at weight x activation bits, every w+a table entry the
    measured loss ``2/N sum ||W x - W_hat q(x)||^2`` of the solved weight on quantised inputs
    (re-derived here from the plan's quantiser and the stored weight of the chosen option), and
    the chosen quantiser is what the graph runs on the layer's input."""
    from l2fx.activations import ActQuantSpec
    from l2fx.modules import ActQuant
    c = compiled_wa[method]
    rec = c.report.records["compound_plan"]
    assert rec["act_bits"] == [4, 8]
    assert rec["plan_bops"] <= rec["budget_bops"] * (1 + 1e-9) and rec["achieved_reduction"] >= 40.0
    macs = {"a.weight": 960, "b.weight": 1200, "c.weight": 480}
    for name, layer in rec["layers"].items():
        for opt, v in layer["options"].items():
            o = l2fx.solvers.compound.Option.parse(opt)
            assert v["bops"] == pytest.approx(macs[name] * o.density * o.bits * o.act_bits)
        spec = ActQuantSpec(**layer["act"])
        module = c.graph_module.get_submodule("l2fx_act." + name.replace(".", "__"))
        assert isinstance(module, ActQuant) and module.spec == spec
    # The first layer reads the model input: its measured error re-derived from scratch.
    model, x = _model(), torch.cat(_calib())
    a = rec["layers"]["a.weight"]
    spec = ActQuantSpec(**a["act"])
    w_hat = c.graph_module.get_submodule("l2fx_weights.a__weight")()
    # oneshot_solve re-solves on the compressed prefix's inputs (the first layer's are the
    # model's own), so the stored weight is the table's solution for the chosen option.
    want = 2 * float(((x @ model.a.weight.T - spec(x) @ w_hat.T).double() ** 2).sum()) / x.shape[0]
    assert a["options"][a["choice"]]["error"] == pytest.approx(want, rel=1e-3)


def test_wa_artifact_stores_the_quantisers_and_both_load_paths_run_them(compiled_wa, tmp_path):
    import json
    import zlib
    import safetensors.numpy
    c = compiled_wa["obc-compound"]
    path = tmp_path / "wa.l2fx"
    l2fx.save(c, path)
    arrays = safetensors.numpy.load(path.read_bytes())
    manifest = json.loads(zlib.decompress(arrays["l2fx.manifest"].tobytes()))
    assert manifest["version"] == 4
    rec = c.report.records["compound_plan"]["layers"]
    assert {e["param"]: e["act"] for e in manifest["layers"]} == {k: v["act"] for k, v in rec.items()}
    x = _calib()[1]
    with torch.no_grad():
        want = c(x)
        loaded = l2fx.load(path, model=_model(), verify=True)
        assert torch.equal(loaded(x), want)
        assert loaded.report.compressed_nbytes == c.report.compressed_nbytes
        assert l2fx.inspect(path).compressed_nbytes == c.report.compressed_nbytes
        assert {layer.param: layer.act_bits for layer in l2fx.inspect(path).layers} == {
            k: v["act"]["bits"] for k, v in rec.items()}
        assert "act bits" in c.report.table()
        into = l2fx.load_into(path, _model())
        assert torch.equal(into(x), want)
        assert set(into.state_dict()) == (set(_model().state_dict()) - {f"{n}.weight" for n in "abc"}) | {
            f"{n}.parametrizations.weight.{k}" for n in "abc" for k in ("original", "0.step_s", "0.threshold_e")}
        # Not the weights-only model: the inputs really are quantised.
        plain = l2fx.materialize(l2fx.load_into(path, _model()))
        for n in "abc":
            getattr(plain, n)._forward_pre_hooks.clear()
        assert not torch.equal(plain(x), want)
    # The stored quantiser is counted in the layer's bytes (its manifest entry).
    from l2fx.accounting import entry_nbytes
    from l2fx.ir import CodedInfo, get_meta, weight_sites
    for node, site in weight_sites(c.graph_module):
        info = get_meta(node, CodedInfo)
        assert info.entry["act"] == rec[site.param]["act"]
        assert info.layer_bytes.manifest == entry_nbytes(info.entry)


def test_wa_act_quantiser_on_a_module_load_into_cannot_place_is_refused(compiled_wa, tmp_path):
    from l2fx.errors import ArchitectureMismatchError

    class _Functional(nn.Module):  # same tensors, but a's weight read by F.linear outside nn.Linear
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.ParameterDict(), nn.Linear(40, 30), nn.Linear(30, 16)
            self.a["weight"], self.a["bias"] = nn.Parameter(torch.zeros(40, 24)), nn.Parameter(torch.zeros(40))

        def forward(self, x):
            x = torch.relu(nn.functional.linear(x, self.a["weight"], self.a["bias"]))
            return self.c(torch.relu(self.b(x)))

    path = tmp_path / "wa.l2fx"
    l2fx.save(compiled_wa["obc-compound"], path)
    fresh = _Functional()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ArchitectureMismatchError, match="a.weight.*use l2fx.load"):
        l2fx.load_into(path, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_act_bits_in_option_names():
    from l2fx.solvers.compound import WA_OPTIONS, Option
    assert [o.name for o in WA_OPTIONS] == _WA
    assert Option.parse("4block50-w3a4") == Option(3, block_sparsity=0.5, act_bits=4)
    assert Option.parse("dense-w8a32") == Option(8)
    for bad in ("dense-w8a1", "dense-w8a9"):
        with pytest.raises(ConfigError, match="act_bits"):
            Option.parse(bad)
    with pytest.raises(ConfigError, match="fp32 activations"):
        Option(4, format="mxfp4_e2m1", act_bits=4)
