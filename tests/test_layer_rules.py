"""Per-layer intent (CompileConfig.layers): keep, fixed bits, kind and layout per layer; first match wins."""
from __future__ import annotations

import pytest
import torch

import l2fx
from l2fx.artifact import ArtifactReader
from l2fx.cli import CLIError, parse_layer_rule
from l2fx.config import CompileConfig, Granularity, LayerRule
from l2fx.errors import ConfigError
from l2fx.ir import LayerIntent, get_meta, weight_sites
from l2fx.transform import TransformKind

from conftest import make_fast_config


def _compile(model, calib, rules, target=10, **changes):
    return l2fx.compile(model, target, calib, config=make_fast_config().replace(layers=tuple(rules), **changes),
                        verify=True)


def test_keep_and_fixed_bits_in_one_line(tiny_convnet, tiny_calib, tmp_path):
    """'Keep out and the first conv at 8 bits': c1 (144 weights) is under min_numel, so c2 plays the
    first conv; the target counts the fixed layer's bytes and the others meet it."""
    compiled = _compile(tiny_convnet, tiny_calib, [LayerRule(r"out", keep=True), LayerRule(r"c2", bits=8)])
    layers = {layer.param: layer for layer in compiled.report.layers}
    assert "out.weight" not in layers and compiled.report.records["mark_weights"]["kept_by_rule"] == ["out.weight"]
    c2 = layers["c2.weight"]
    assert c2.kind == "linear" and c2.bits <= 8
    assert abs(compiled.report.compressed_cr / 10 - 1) <= 0.01
    # The fixed grid is RTN at 8 bits per output channel, whatever the allocation wanted.
    mod = compiled.graph_module.get_submodule("l2fx_weights.c2__weight")
    w = tiny_convnet.state_dict()["c2.weight"]
    scale = tiny_convnet.b2.weight / torch.sqrt(tiny_convnet.b2.running_var + tiny_convnet.b2.eps)
    folded = w * scale[:, None, None, None]
    expected = (folded.abs().amax(dim=(1, 2, 3)) / 127).to(torch.float16).float()
    torch.testing.assert_close(mod.step_s, expected, rtol=2e-3, atol=0)
    assert int(mod.codes.abs().max()) <= 127
    # The kept weight is a plain tensor of the artifact, exact in float16.
    l2fx.save(compiled, tmp_path / "m.l2fx")
    reader = ArtifactReader(tmp_path / "m.l2fx")
    assert "out.weight" in {p.name for p in reader.plain_entries}
    loaded = l2fx.load(tmp_path / "m.l2fx", model=type(tiny_convnet)().eval())
    with torch.no_grad():
        assert torch.equal(loaded(tiny_calib[0]), compiled(tiny_calib[0]))


def test_first_match_wins_and_fields_fall_back_to_the_global_config(tiny_convnet, tiny_calib):
    rules = [LayerRule(r"fc", kind=TransformKind.LINEAR), LayerRule(r"fc|c2", granularity=Granularity.PER_TENSOR)]
    compiled = _compile(tiny_convnet, tiny_calib, rules)
    intents = {site.param: get_meta(n, LayerIntent) for n, site in weight_sites(compiled.graph_module)}
    assert intents["fc.weight"].rule == 0 and intents["fc.weight"].kind == "linear"
    assert intents["fc.weight"].granularity == "per_channel"  # rule 0 matched; rule 1 is not consulted
    assert intents["c2.weight"].rule == 1 and intents["c2.weight"].granularity == "per_tensor"
    assert intents["c2.weight"].kind == "joint"  # the global transform
    assert intents["out.weight"].rule is None
    fc = compiled.graph_module.get_submodule("l2fx_weights.fc__weight")
    c2 = compiled.graph_module.get_submodule("l2fx_weights.c2__weight")
    assert fc.kind is TransformKind.LINEAR and fc.step_s.shape == (64,) and c2.step_s.shape == (1,)


def test_a_per_group_rule_on_one_layer(tiny_convnet, tiny_calib):
    compiled = _compile(tiny_convnet, tiny_calib, [LayerRule(r"fc", granularity=Granularity.PER_GROUP, group_size=64)])
    fc = compiled.graph_module.get_submodule("l2fx_weights.fc__weight")
    assert fc.group_size == 64 and tuple(fc.step_s.shape) == (64, -(-(32 * 7 * 7) // 64))
    assert compiled.graph_module.get_submodule("l2fx_weights.out__weight").group_size is None


def test_rules_are_validated_and_round_trip():
    for bad in (dict(pattern="("), dict(pattern="x", bits=9), dict(pattern="x", keep=True, bits=4),
                dict(pattern="x", bits=4, kind=TransformKind.JOINT), dict(pattern="x", group_size=0),
                dict(pattern="x", options=(("a",),))):
        with pytest.raises(ConfigError):
            LayerRule(**bad)
    cfg = CompileConfig(layers=(LayerRule("lm_head", bits=8, options=(("act_order", True),)),
                                LayerRule(r"layers\.\d+\.mlp\..*", granularity=Granularity.PER_GROUP, group_size=64)))
    assert CompileConfig.from_json(cfg.to_json()) == cfg
    assert cfg.rule_for("lm_head.weight").bits == 8 and cfg.rule_for("layers.3.mlp.up.weight").group_size == 64
    assert cfg.rule_for("layers.3.attn.q.weight") is None


def test_the_cli_form():
    assert parse_layer_rule("lm_head|conv1 bits=8") == LayerRule("lm_head|conv1", bits=8)
    assert parse_layer_rule("classifier keep") == LayerRule("classifier", keep=True)
    assert parse_layer_rule("fc granularity=per_group group_size=64") == LayerRule(
        "fc", granularity=Granularity.PER_GROUP, group_size=64)
    for bad in ("lm_head", "x bits=12", "x colour=red"):
        with pytest.raises(CLIError):
            parse_layer_rule(bad)
