"""``oneshot_solve`` and the one-shot methods built on it (l2fx/method.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import l2fx
from l2fx.config import CompileConfig, LayerRule, SensitivityConfig
from l2fx.errors import ConfigError, SolverError

from conftest import DictInputNet, make_fast_config, make_tiny_calib, make_tiny_convnet


def _error(compiled, model, x) -> float:
    with torch.no_grad():
        ref = model(x)
        return float((compiled(x) - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.fixture(scope="module")
def compiled_methods():
    """Every one-shot method that is quick on the tiny ConvNet, at CR 10 (OBQ/OBC/AdaRound are
    exercised on smaller layers below: their cost grows with cols^3 or iterations)."""
    x = make_tiny_calib()
    out = {}
    for method in ("rtn", "gptq", "sparsegpt", "sparsegpt-2:4", "wanda", "wanda-2:4", "gptq+l2"):
        out[method] = l2fx.compile(make_tiny_convnet(), 10, x, method=method, config=make_fast_config(), verify=True)
    return out, x


def test_every_method_meets_the_target_on_counted_bytes(compiled_methods):
    compiled, _ = compiled_methods
    for method, c in compiled.items():
        assert abs(c.report.compressed_cr / 10 - 1) <= 0.01, method
        assert c.report.records["oneshot_solve"]["fallbacks"] == {}, method


def test_gptq_beats_round_to_nearest_on_the_same_grids(compiled_methods):
    """GPTQ's error feedback against RTN at the same counted bytes: 0.0002 vs 0.0068 relative
    output error measured here (2-core CPU, the tests' calibration noise)."""
    compiled, x = compiled_methods
    model = make_tiny_convnet()
    assert _error(compiled["gptq"], model, x[0]) < 0.5 * _error(compiled["rtn"], model, x[0])



def test_gptq_then_l2_reconstructs_against_the_original_weights(compiled_methods):
    """gptq+l2's block targets are the original model's (keep_reference before the solve), so
    fine-tuning from GPTQ's symbols lowers every block's loss and the output error: 2.03e-4 ->
    1.54e-4 measured here. (Its targets were GPTQ's own outputs before: every loss 0, the
    artifact GPTQ's.) The references are dropped afterwards."""
    compiled, x = compiled_methods
    model = make_tiny_convnet()
    c = compiled["gptq+l2"]
    blocks = c.report.records["block_reconstruction"]["blocks"]
    assert all(b["loss_before"] > 0 and b["loss_after"] < b["loss_before"] for b in blocks), blocks
    assert _error(c, model, x[0]) < 0.9 * _error(compiled["gptq"], model, x[0])
    assert not any("l2fx.reference" in n.meta for n in c.graph_module.graph.nodes)


def test_two_four_methods_keep_two_of_every_four_in_every_layer(compiled_methods):
    compiled, _ = compiled_methods
    for method in ("sparsegpt-2:4", "wanda-2:4"):
        gm = compiled[method].graph_module
        for name in ("c2", "fc", "out"):
            codes = gm.get_submodule(f"l2fx_weights.{name}__weight").codes.reshape(-1, 4)
            assert bool(((codes != 0).sum(1) <= 2).all()), (method, name)
    sparse = compiled["sparsegpt"].report.records["oneshot_solve"]["layers"]
    assert all(layer["sparsity"] >= 0.5 for layer in sparse.values())


def test_a_one_shot_artifact_loads_bit_exactly(compiled_methods, tmp_path):
    compiled, x = compiled_methods
    l2fx.save(compiled["sparsegpt-2:4"], tmp_path / "m.l2fx")
    loaded = l2fx.load(tmp_path / "m.l2fx", model=make_tiny_convnet(), verify=True)
    with torch.no_grad():
        assert torch.equal(loaded(x[0]), compiled["sparsegpt-2:4"](x[0]))


class _Small(nn.Module):
    """Layers with few columns (OBQ and OBC cost rows * cols^3), K = 24 and 40."""

    def __init__(self, k: int = 24):
        super().__init__()
        self.a = nn.Linear(k, 40)
        self.b = nn.Linear(40, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _small_calib(k: int = 24):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, k, generator=g) @ torch.randn(k, k, generator=g) for _ in range(2)]


def _small_config():
    return make_fast_config().replace(min_numel=64, sensitivity=SensitivityConfig(num_samples=16, num_steps=10))


@pytest.mark.parametrize("method", ["obq", "obc-2:4", "adaround", "adaquant", "adaprune+adaquant-2:4"])
def test_the_exact_and_learned_methods_on_small_layers(method):
    torch.manual_seed(0)
    model = _Small().eval()
    calib = _small_calib()
    compiled = l2fx.compile(model, 6, calib, method=method, config=_small_config(), verify=True)
    assert abs(compiled.report.compressed_cr / 6 - 1) <= 0.01
    torch.manual_seed(0)
    rtn = l2fx.compile(_Small().eval(), 6, calib, method="rtn", config=_small_config())
    # OBQ and AdaRound keep the grid and minimise the layer loss on it: at the same counted bytes
    # their summed layer loss is at most RTN's. AdaQuant learns finer steps, which cost bytes the
    # block's byte fit takes back with a coarser grid: at matched bytes it lost to RTN here
    # (summed layer loss 39.4 against 30.4), so it is only held to the target.
    losses = compiled.report.records["oneshot_solve"]["layers"]
    rtn_losses = rtn.report.records["oneshot_solve"]["layers"]
    if method in ("obq", "adaround"):
        assert sum(v["loss"] for v in losses.values()) <= sum(v["loss"] for v in rtn_losses.values()) * 1.001
    elif "2:4" in method:
        for name in ("a", "b"):
            codes = compiled.graph_module.get_submodule(f"l2fx_weights.{name}__weight").codes.reshape(-1, 4)
            assert bool(((codes != 0).sum(1) <= 2).all())


def test_method_options_reach_the_recipe():
    torch.manual_seed(0)
    cfg = _small_config().replace(method_options=(("sparsity", 0.25),))
    compiled = l2fx.compile(_Small().eval(), 6, _small_calib(), method="sparsegpt", config=cfg)
    layers = compiled.report.records["oneshot_solve"]["layers"]
    assert all(0.25 <= v["sparsity"] < 0.5 for v in layers.values())
    with pytest.raises(ConfigError, match="unknown one-shot option 'sparsty'"):
        l2fx.compile(_Small().eval(), 6, _small_calib(), method="sparsegpt",
                     config=_small_config().replace(method_options=(("sparsty", 0.25),)))


def test_n_m_on_a_dimension_m_does_not_divide_names_the_layer_and_the_option():
    torch.manual_seed(0)
    with pytest.raises(SolverError, match=r"a\.weight.*(4|prune_m)"):
        l2fx.compile(_Small(k=30).eval(), 6, _small_calib(30), method="sparsegpt-2:4", config=_small_config())


def test_the_rule_the_n_m_error_suggests_gives_that_layer_an_unstructured_pattern():
    torch.manual_seed(0)
    with pytest.raises(SolverError) as info:
        l2fx.compile(_Small(k=30).eval(), 6, _small_calib(30), method="sparsegpt-2:4", config=_small_config())
    assert "LayerRule(" in str(info.value)
    rule = LayerRule("a", options=(("prune_n", 0), ("prune_m", 0)))
    compiled = l2fx.compile(_Small(k=30).eval(), 6, _small_calib(30), method="sparsegpt-2:4",
                            config=_small_config().replace(layers=(rule,)))
    assert abs(compiled.report.compressed_cr / 6 - 1) <= 0.01
    gm = compiled.graph_module
    b = gm.get_submodule("l2fx_weights.b__weight").codes.reshape(-1, 4)
    assert bool(((b != 0).sum(1) <= 2).all())  # the other layer keeps 2:4
    a = gm.get_submodule("l2fx_weights.a__weight").codes
    assert 0.4 <= float((a == 0).float().mean()) < 0.75  # SparseGPT's default half, plus zero symbols


@pytest.mark.parametrize("method, dense", [("sparsegpt-2:4", "gptq"), ("wanda-2:4", "rtn")])
def test_nm_unfit_dense_leaves_the_layers_n_m_cannot_take_dense_and_says_so(method, dense):
    torch.manual_seed(0)
    cfg = _small_config().replace(method_options=(("nm_unfit", "dense"),))
    compiled = l2fx.compile(_Small(k=30).eval(), 6, _small_calib(30), method=method, config=cfg)
    assert abs(compiled.report.compressed_cr / 6 - 1) <= 0.01
    record = compiled.report.records["oneshot_solve"]
    assert list(record["fallbacks"]) == ["a.weight"] and "30 columns" in record["fallbacks"]["a.weight"]
    assert record["layers"]["a.weight"]["recipe"] == dense
    gm = compiled.graph_module
    b = gm.get_submodule("l2fx_weights.b__weight").codes.reshape(-1, 4)
    assert bool(((b != 0).sum(1) <= 2).all())  # the layer that takes 2:4 keeps it
    a = gm.get_submodule("l2fx_weights.a__weight").codes
    assert float((a == 0).float().mean()) < 0.4  # not pruned: only the zero symbols of its grid
    with pytest.raises(ConfigError, match="nm_unfit"):
        l2fx.compile(_Small(k=30).eval(), 6, _small_calib(30), method=method,
                     config=cfg.replace(method_options=(("nm_unfit", "skip"),)))


def test_a_layer_without_an_input_hessian_falls_back_to_rounding_and_says_so():
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 200, (8, 12), generator=g), "attention_mask": torch.ones(8, 12)}
             for _ in range(2)]
    torch.manual_seed(0)
    compiled = l2fx.compile(DictInputNet().eval(), 6, calib, method="gptq", config=make_fast_config())
    fallbacks = compiled.report.records["oneshot_solve"]["fallbacks"]
    assert list(fallbacks) == ["emb.weight"] and "axis 1" in fallbacks["emb.weight"]
    assert abs(compiled.report.compressed_cr / 6 - 1) <= 0.01


def test_a_target_the_pruned_weights_cannot_fill_is_a_target_cr_error_naming_the_reach():
    """SparseGPT's 50 % zeros at CR 5: the kept weights would need more than +-127 to spend the
    budget, so rate_fit says the target is out of reach (with the CR the finest steps give)
    instead of range_code failing on the miss."""
    import l2fx
    from l2fx.errors import TargetCRError
    from conftest import make_fast_config
    from pass_cases import make_mlp, mlp_calib
    with pytest.raises(TargetCRError, match=r"out of reach after the passes of method 'sparsegpt'.*50% of them zero"):
        l2fx.compile(make_mlp((64, 256, 256, 16)), 5, mlp_calib(64, 64), method="sparsegpt",
                     config=make_fast_config().replace(min_numel=64))


def test_holding_the_solved_weights_as_symbols_gives_the_same_artifact():
    """The one-shot methods hold each solved weight as its symbols (a quarter of the fp32 bytes
    until range_code); the artifact is byte for byte the one of the fp32 path."""
    from l2fx.method import pipeline
    from passes import OneShotSolve

    x, cfg = make_tiny_calib(), make_fast_config()
    held = pipeline("gptq", cfg)
    assert held.passes[held.names.index("oneshot_solve")].hold_symbols
    fp32 = pipeline("gptq", cfg)
    i = fp32.names.index("oneshot_solve")
    fp32.passes[i] = OneShotSolve("gptq", hold_symbols=False)
    a = l2fx.compile(make_tiny_convnet(), 10, x, method="gptq", config=cfg, pipeline=held, verify=True)
    b = l2fx.compile(make_tiny_convnet(), 10, x, method="gptq", config=cfg, pipeline=fp32, verify=True)
    assert a.artifact_bytes() == b.artifact_bytes()


def test_a_pass_that_writes_weights_refuses_weights_held_as_symbols():
    from l2fx.errors import PassError
    from l2fx.method import pipeline
    from passes import BlockReconstruction

    cfg = make_fast_config()
    pm = pipeline("gptq", cfg).insert_after("oneshot_solve", BlockReconstruction())
    with pytest.raises(PassError, match="held as read-only symbols"):
        l2fx.compile(make_tiny_convnet(), 10, make_tiny_calib(), method="gptq", config=cfg, pipeline=pm)
