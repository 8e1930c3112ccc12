"""Models whose weights are not float32: compressed in fp32, served in their own dtypes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import l2fx
from l2fx.artifact import ArtifactReader
from l2fx.config import BackendConfig
from l2fx.errors import CalibrationError, ConfigError
from l2fx.modules import CodedWeight

from conftest import DictInputNet, make_fast_config, make_tiny_calib, make_tiny_convnet

DTYPES = [torch.float16, torch.bfloat16, torch.float64]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.fixture(scope="module")
def fp32_error() -> float:
    """Output error of the float32 tiny convnet compressed at CR 8: the bar for other dtypes."""
    model, calib = make_tiny_convnet(), make_tiny_calib()
    compiled = l2fx.compile(model, target_cr=8, calib=calib, config=make_fast_config())
    with torch.no_grad():
        return _rel_err(compiled(calib[0]), model(calib[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_and_high_precision_models_compile_save_and_load(tmp_path, tiny_calib, fast_config, fp32_error, dtype):
    model = make_tiny_convnet().to(dtype)
    before = copy.deepcopy(model.state_dict())
    calib = [x.to(dtype) for x in tiny_calib]
    compiled = l2fx.compile(model, target_cr=8, calib=calib, config=fast_config, verify=True)
    # The caller's model keeps its dtype and values.
    assert all(before[k].dtype == v.dtype and torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Every plain floating tensor of the result is in the model's dtype; coded weights return it.
    plain = {k: v for k, v in compiled.state_dict().items() if not k.startswith("graph_module.l2fx_weights.")}
    assert {v.dtype for v in plain.values() if v.is_floating_point()} == {dtype}
    coded = [m for m in compiled.modules() if isinstance(m, CodedWeight)]
    assert coded and all(m.dtype == dtype and m().dtype == dtype for m in coded)
    x = calib[0]
    y = compiled(x)
    assert y.dtype == dtype
    # Same fidelity as compressing the float32 model (a dtype does not change the method).
    with torch.no_grad():
        err = _rel_err(y, model(x))
    assert err < max(4 * fp32_error, 1e-3)
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01
    # The artifact records the model dtype of each plain tensor; loading on a model of the
    # same dtype gives the same outputs, bit for bit.
    path = tmp_path / "m.l2fx"
    l2fx.save(compiled, path)
    assert {spec[0] for spec in ArtifactReader(path).manifest["plain"].values()} >= {str(dtype).replace("torch.", "")}
    restored = l2fx.load(path, make_tiny_convnet(seed=5).to(dtype))
    assert torch.equal(restored(x), y)


def test_a_float16_model_captured_by_torch_export(tmp_path, fast_config):
    torch.manual_seed(0)
    model = DictInputNet().eval().half()
    batch = {"input_ids": torch.randint(0, 200, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    compiled = l2fx.compile(model, target_cr=6, calib=[batch], config=fast_config)
    y = compiled(**batch)
    assert y.dtype == torch.float16
    with torch.no_grad():
        assert _rel_err(y, model(**batch)) < 1e-2
    l2fx.save(compiled, tmp_path / "d.l2fx")
    assert torch.equal(l2fx.load(tmp_path / "d.l2fx", DictInputNet().half())(**batch), y)


def test_float64_layers_stay_on_the_torch_path_when_lowering(tiny_calib, fast_config):
    model = make_tiny_convnet().double()
    compiled = l2fx.compile(model, target_cr=8, calib=[x.double() for x in tiny_calib], config=fast_config)
    lowered = l2fx.lower(compiled, BackendConfig(use_triton="always"))
    x = tiny_calib[0].double()
    assert torch.equal(lowered(x), compiled(x))


class CastsInside(nn.Module):
    """Runs in float16 only: its forward casts its input to float16 itself."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.to(torch.float16))))


def test_a_model_that_only_runs_in_its_own_dtype_is_a_calibration_error():
    model = CastsInside().half()
    x = torch.randn(8, 32).half()
    with pytest.raises(CalibrationError, match="float32"):
        l2fx.compile(model, target_cr=4, calib=[x])


def test_coded_weight_rejects_a_non_floating_dtype():
    with pytest.raises(ConfigError, match="floating"):
        CodedWeight(torch.zeros(2, 2, dtype=torch.int8), l2fx.TransformKind("joint"), torch.ones(()), torch.ones(()),
                    None, torch.int32)


@pytest.mark.parametrize("lowered", [False, True], ids=["torch", "lowered"])
def test_a_compiled_model_casts_like_a_module_and_keeps_its_stored_parameters(tiny_calib, fast_config, lowered):
    compiled = l2fx.compile(make_tiny_convnet(), target_cr=8, calib=tiny_calib, config=fast_config)
    if lowered:
        compiled = l2fx.lower(compiled, BackendConfig(use_triton="always"))
    stored = {k: v.clone() for k, v in compiled.state_dict().items() if "l2fx_weights" in k}
    x = tiny_calib[0]
    y = compiled(x)
    half = copy.deepcopy(compiled).to(torch.bfloat16)
    yh = half(x.to(torch.bfloat16))
    assert yh.dtype == torch.bfloat16
    assert _rel_err(yh, y) < 1e-3
    # The codes and the stored T parameters are what the artifact holds: not cast.
    assert all(torch.equal(v, stored[k]) and v.dtype == stored[k].dtype
               for k, v in half.state_dict().items() if "l2fx_weights" in k)
    back = half.float()
    assert back(x).dtype == torch.float32
