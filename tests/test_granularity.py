"""Per-tensor, per-channel and per-group T parameters through compile, save, load and lowering."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import l2fx
from l2fx.artifact import MANIFEST, ArtifactReader
from l2fx.config import CompileConfig, Granularity, ReconstructionConfig, SensitivityConfig
from l2fx.errors import ConfigError, CorruptArtifactError
from l2fx.transform import TransformKind

from artifact_fuzz import Parts, write


class Mlp(nn.Module):
    """K = 120, 96 and 27: groups of 16, 32 and 64 leave shorter last groups, and the conv's rows
    are shorter than two of the group sizes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(120, 96)
        self.b = nn.Linear(96, 40)
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, img):
        return self.b(torch.relu(self.a(x))).sum(1, keepdim=True) + self.c(img).mean((1, 2, 3))[:, None]


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 120, generator=g), torch.randn(16, 3, 6, 6, generator=g)) for _ in range(2)]


def _config(granularity, group, kind, recon):
    return CompileConfig(granularity=granularity, group_size=group, transform=kind, min_numel=200,
                         sensitivity=SensitivityConfig(num_samples=8, num_steps=10),
                         reconstruction=ReconstructionConfig(enabled=recon, transform_iters=3, weight_iters=3,
                                                             batch_size=8))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(granularity=st.sampled_from(list(Granularity)), group=st.sampled_from([16, 32, 64]),
       kind=st.sampled_from([TransformKind.JOINT, TransformKind.LINEAR, TransformKind.LOG]), recon=st.booleans())
def test_compile_save_load_round_trips_bit_exactly(tmp_path, granularity, group, kind, recon):
    torch.manual_seed(0)
    model = Mlp().eval()
    calib = _data()
    compiled = l2fx.compile(model, 8, calib, config=_config(granularity, group, kind, recon), verify=True)
    assert abs(compiled.report.compressed_cr / 8 - 1) <= 0.01
    path = tmp_path / "m.l2fx"
    l2fx.save(compiled, path)
    torch.manual_seed(1)
    loaded = l2fx.load(path, model=Mlp().eval(), verify=True)
    with torch.no_grad():
        assert torch.equal(loaded(*calib[0]), compiled(*calib[0]))
    assert l2fx.save(loaded, tmp_path / "again.l2fx") and (tmp_path / "again.l2fx").read_bytes() == path.read_bytes()
    reader = ArtifactReader(path)
    grouped = granularity is Granularity.PER_GROUP
    assert reader.version == (3 if grouped else 2)
    for e in reader.layers:
        rows, k = e.shape[0], int(np.prod(e.shape[1:]))
        assert e.group == (min(group, k) if grouped else None)  # a group past the row is the row
        assert e.param_shape == ((rows, -(-k // min(group, k))) if grouped else (1,) if granularity is Granularity.PER_TENSOR
                                 else (rows,))
    lowered = l2fx.lower(loaded, l2fx.BackendConfig(use_triton="always"))
    with torch.no_grad():
        torch.testing.assert_close(lowered(*calib[0]), loaded(*calib[0]), rtol=1e-5, atol=1e-5)
    assert l2fx.inspect(path).compressed_cr == compiled.report.compressed_cr


def test_per_group_parameters_cost_what_the_report_says(tmp_path):
    """Every byte counted: a per-group layer stores 2 * rows * ceil(K / g) T parameters."""
    torch.manual_seed(0)
    compiled = l2fx.compile(Mlp().eval(), 6, _data(), config=_config(Granularity.PER_GROUP, 16, TransformKind.JOINT,
                                                                      False))
    l2fx.save(compiled, tmp_path / "g.l2fx")
    reader = ArtifactReader(tmp_path / "g.l2fx")
    stored = sum(e.nparams for e in reader.layers)
    assert stored == sum(2 * e.shape[0] * -(-int(np.prod(e.shape[1:])) // 16) for e in reader.layers)
    itemsize = {"f16": 2, "f32": 4}
    counted = sum(layer.nbytes - layer.payload_nbytes for layer in compiled.report.layers)
    assert counted >= sum(itemsize[e.pdtype] * e.nparams for e in reader.layers)


def test_a_group_field_needs_format_version_3(tmp_path):
    torch.manual_seed(0)
    compiled = l2fx.compile(Mlp().eval(), 6, _data(), config=_config(Granularity.PER_GROUP, 16, TransformKind.JOINT,
                                                                      False))
    l2fx.save(compiled, tmp_path / "g.l2fx")
    manifest, arrays = Parts.of(tmp_path / "g.l2fx").arrays()
    manifest["version"] = 2
    (tmp_path / "v2.l2fx").write_bytes(write(manifest, arrays, version=2))
    with pytest.raises(CorruptArtifactError, match="unknown \\['group'\\]"):
        l2fx.inspect(tmp_path / "v2.l2fx")
    manifest["version"] = 3
    manifest["layers"][0]["axis"] = None
    (tmp_path / "axis.l2fx").write_bytes(write(manifest, arrays, version=3))
    with pytest.raises(CorruptArtifactError, match="'axis' must be 0"):
        l2fx.inspect(tmp_path / "axis.l2fx")


def test_groups_too_small_for_the_target_say_what_is_reachable():
    """Groups of 4 store 2 float16 parameters per 4 weights (8 bits/weight before any symbol):
    CR 6 is out of reach, and the error says how far."""
    torch.manual_seed(0)
    with pytest.raises(l2fx.errors.TargetCRError, match="reachable range"):
        l2fx.compile(Mlp().eval(), 6, _data(), config=_config(Granularity.PER_GROUP, 4, TransformKind.JOINT, False))


def test_group_size_is_validated():
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ConfigError, match="group_size"):
            CompileConfig(group_size=bad)
    cfg = CompileConfig(granularity=Granularity.PER_GROUP, group_size=32)
    assert CompileConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["granularity"] == "per_group"
