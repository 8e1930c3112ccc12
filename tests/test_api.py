"""End-to-end compile/save/load/inspect on small models (fast); real models are in test_real_models.py."""
from __future__ import annotations

import copy

import pytest
import torch

import l2fx
from l2fx.errors import (CalibrationError, CaptureError, NoCompressibleLayersError, NonFiniteWeightError,
                         TargetCRError)

from conftest import DictInputNet, make_tiny_convnet


@pytest.mark.parametrize("target", [6.0, 10.0])
def test_compile_hits_target_on_real_bytes_and_roundtrips(tmp_path, tiny_convnet, tiny_calib, fast_config, target):
    before = copy.deepcopy(tiny_convnet.state_dict())
    compiled = l2fx.compile(tiny_convnet, target_cr=target, calib=tiny_calib, config=fast_config, verify=True)
    report = compiled.report
    assert abs(report.compressed_cr / target - 1) <= 0.01
    # The caller's model is untouched.
    after = tiny_convnet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    path = tmp_path / "m.l2fx"
    nbytes = l2fx.save(compiled, path)
    assert nbytes == path.stat().st_size == report.file_nbytes
    restored = l2fx.load(path, model=make_tiny_convnet(seed=123))  # weights of the instance are irrelevant
    x = tiny_calib[0]
    assert torch.equal(restored(x), compiled(x))
    again = l2fx.inspect(path)
    assert again.compressed_nbytes == report.compressed_nbytes
    assert again.file_cr == pytest.approx(report.file_cr)
    # Saving a loaded model gives the same bytes.
    assert restored.artifact_bytes() == path.read_bytes()


def test_state_dict_holds_what_runs(tiny_convnet, tiny_calib, fast_config):
    compiled = l2fx.compile(tiny_convnet, target_cr=8, calib=tiny_calib, config=fast_config)
    sd = compiled.state_dict()
    coded = [k for k in sd if k.endswith(".codes")]
    assert coded and all(sd[k].dtype == torch.int8 for k in coded)
    # No fp32 copy of a compressed weight remains.
    assert not any(k.endswith("fc.weight") for k in sd)


def test_export_frontend_with_dict_inputs(tmp_path, fast_config):
    torch.manual_seed(0)
    model = DictInputNet().eval()
    ids = torch.randint(0, 200, (8, 12))
    mask = torch.ones(8, 12, dtype=torch.long)
    calib = [{"input_ids": ids, "attention_mask": mask}]
    compiled = l2fx.compile(model, target_cr=6, calib=calib, config=fast_config, verify=True)
    assert abs(compiled.report.compressed_cr / 6 - 1) <= 0.01
    assert "emb.weight" in {layer.param for layer in compiled.report.layers}
    path = tmp_path / "d.l2fx"
    l2fx.save(compiled, path)
    torch.manual_seed(5)
    restored = l2fx.load(path, model=DictInputNet())
    other = {"input_ids": torch.randint(0, 200, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    assert torch.equal(restored(**other), compiled(**other))
    assert torch.equal(restored(other["input_ids"], other["attention_mask"]), compiled(**other))
    # Evaluation code calls .eval(); torch.export's modules raise on it, ours must not.
    assert restored.eval() is restored and not restored.training


def test_bad_target_cr(tiny_convnet, tiny_calib, fast_config):
    for bad in (1.0, 0.5, -3):
        with pytest.raises(TargetCRError):
            l2fx.compile(tiny_convnet, target_cr=bad, calib=tiny_calib, config=fast_config)
    with pytest.raises(TargetCRError, match="reachable range"):
        l2fx.compile(tiny_convnet, target_cr=5000, calib=tiny_calib, config=fast_config)


def test_nonfinite_weight_named(tiny_convnet, tiny_calib, fast_config):
    with torch.no_grad():
        tiny_convnet.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="fc.weight"):
        l2fx.compile(tiny_convnet, target_cr=8, calib=tiny_calib, config=fast_config)


@pytest.mark.parametrize("calib, match", [
    (None, "required"), ([], "empty"), (torch.zeros(0, 1, 28, 28), "batch dimension"),
    ([torch.zeros(4, 1, 28, 28), "x"], "str"), ([torch.zeros(4, 1, 28, 28), torch.zeros(4, 1, 28, 28, 2)], None),
])
def test_bad_calibration(tiny_convnet, fast_config, calib, match):
    with pytest.raises((CalibrationError, CaptureError)) as info:
        l2fx.compile(tiny_convnet, target_cr=8, calib=calib, config=fast_config)
    assert isinstance(info.value, l2fx.L2fxError)
    if match:
        assert match in str(info.value)


def test_a_later_batch_of_other_features_is_a_calibration_error(fast_config):
    # 2-d float features of another width: not a token batch whose sequence length may vary.
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with pytest.raises(CalibrationError, match="batch 1 .*unlike batch 0"):
        l2fx.compile(model, target_cr=6, calib=[torch.randn(8, 64), torch.randn(8, 32)], config=fast_config)


def test_wrong_shaped_calibration_is_a_clear_error(tiny_convnet, fast_config):
    with pytest.raises(l2fx.L2fxError):
        l2fx.compile(tiny_convnet, target_cr=8, calib=torch.zeros(4, 3, 28, 28), config=fast_config)


def test_model_without_weights(fast_config):
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten())
    with pytest.raises(NoCompressibleLayersError):
        l2fx.compile(model, target_cr=8, calib=torch.zeros(2, 4), config=fast_config)


def test_uncapturable_model_names_the_construct(fast_config):
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return self.fc(x).item()

    with pytest.raises(CaptureError, match="symbolic_trace.*export"):
        l2fx.compile(Bad(), target_cr=8, calib=torch.randn(4, 64), config=fast_config)
