"""Training-aware SMOL (``l2fx.smol.train``): on target, the artifact is the fine-tuned model bit
for bit and loads into the user's class, training helps, the caller's model is untouched, and
bad input is an L2fxError naming the problem."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import l2fx
from l2fx.errors import CalibrationError, ConfigError
from l2fx.smol import SmolTrainConfig


class _Net(nn.Module):
    """Conv-BN-ReLU then a Linear head; BatchNorm stays unfolded in training-aware SMOL."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _task(n_batches: int = 12, seed: int = 0):
    """A learnable task: labels from a fixed random teacher of the same architecture."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    teacher = _Net().eval()
    data = []
    for _ in range(n_batches):
        x = torch.randn(32, 1, 8, 8, generator=g)
        with torch.no_grad():
            data.append((x, teacher(x).argmax(1)))
    return teacher, data


def _accuracy(model, data):
    with torch.no_grad():
        return sum(float((model(x).argmax(1) == y).float().mean()) for x, y in data) / len(data)


@pytest.fixture(scope="module")
def trained():
    teacher, data = _task()
    torch.manual_seed(5)
    student = _Net().eval()
    with torch.no_grad():  # the teacher plus noise: a trained model to compress
        for p, q in zip(student.parameters(), teacher.parameters()):
            p.copy_(q + 0.02 * torch.randn_like(q))
        student.bn.load_state_dict(teacher.bn.state_dict())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = {}
    for per_layer in (False, True):
        opts = SmolTrainConfig(per_layer=per_layer, epochs=3, finetune_epochs=3)
        out[per_layer] = l2fx.smol.train(student, data, 10, options=opts)
    return student, before, data, out


@pytest.mark.parametrize("per_layer", [False, True])
def test_on_target_and_the_artifact_is_the_finetuned_model(trained, per_layer, tmp_path):
    student, _, data, out = trained
    c = out[per_layer]
    rec = c.report.records["smol_train"]
    assert abs(c.report.compressed_cr / 10 - 1) <= 0.01
    assert rec["artifact_is_finetuned"] and rec["final_rounding"]["fixed_used"]
    assert rec["steps"][0] == 36 and rec["steps"][1] >= 36
    path = tmp_path / "t.l2fx"
    l2fx.save(c, path)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(l2fx.load(path, model=_Net())(x), c(x))
        assert torch.equal(l2fx.load_into(path, _Net()).eval()(x), c(x))
    pm = c.report.records["smol_round"]["layers"]
    if per_layer:
        assert all(sum(1 for h in v["histogram"] if h) == 1 for v in pm.values())


def test_fine_tuning_recovers_what_rounding_costs(trained):
    """At CR 10 the fine-tuned artifact classifies the task at least as well as the same
    precisions rounded without fine-tuning."""
    student, _, data, out = trained
    no_ft = l2fx.smol.train(student, data, 10, options=SmolTrainConfig(epochs=3, finetune_epochs=0))
    assert _accuracy(out[False], data) >= _accuracy(no_ft, data)


def test_the_callers_model_is_untouched(trained):
    student, before, _, _ = trained
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_bad_input_names_the_problem():
    _, data = _task(2)
    net = _Net().eval()
    with pytest.raises(CalibrationError, match="pair"):
        l2fx.smol.train(net, [x for x, _ in data], 8)
    with pytest.raises(CalibrationError, match="no batch"):
        l2fx.smol.train(net, [], 8)
    with pytest.raises(CalibrationError, match="iterable"):
        l2fx.smol.train(net, 3, 8)
    with pytest.raises(ConfigError, match="target_cr"):
        l2fx.smol.train(net, data, 1.0)
    with pytest.raises(ConfigError, match="epochs"):
        SmolTrainConfig(epochs=-1)
    with pytest.raises(ConfigError, match="lam_rate"):
        SmolTrainConfig(lam_rate=float("nan"))
    with pytest.raises(l2fx.L2fxError, match="nn.Module"):
        l2fx.smol.train("model", data, 8)
