"""RTN and magnitude-pruning+RTN baselines run in the same harness and byte accounting."""
from __future__ import annotations

import pytest
import torch

import l2fx
from l2fx.errors import ConfigError
from l2fx.method import rtn_pipeline
from l2fx.passes.baselines import RoundToNearest


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_symbols_and_roundtrip(tmp_path, tiny_convnet, tiny_calib, bits):
    compiled = l2fx.compile(tiny_convnet, target_cr=4, calib=tiny_calib, pipeline=rtn_pipeline(bits), verify=True)
    qmax = 2 ** (bits - 1) - 1
    for key, value in compiled.state_dict().items():
        if key.endswith(".codes"):
            assert int(value.abs().max()) <= qmax
    # Entropy coding makes RTN smaller than b bits per weight, never larger (plus overheads).
    report = compiled.report
    assert report.compressed_cr > 32 / bits * 0.9
    path = tmp_path / "rtn.l2fx"
    l2fx.save(compiled, path)
    restored = l2fx.load(path, model=type(tiny_convnet)())
    assert torch.equal(restored(tiny_calib[0]), compiled(tiny_calib[0]))


def test_pruned_rtn_is_sparser_and_smaller(tiny_convnet, tiny_calib):
    plain = l2fx.compile(tiny_convnet, target_cr=4, calib=tiny_calib, pipeline=rtn_pipeline(6))
    pruned = l2fx.compile(tiny_convnet, target_cr=4, calib=tiny_calib, pipeline=rtn_pipeline(6, prune_fraction=0.5))
    sparsity = {layer.param: layer.sparsity for layer in pruned.report.layers}
    assert all(s >= 0.5 for s in sparsity.values())
    assert pruned.report.compressed_cr > plain.report.compressed_cr


def test_bad_baseline_settings():
    with pytest.raises(ConfigError):
        RoundToNearest(1)
    with pytest.raises(ConfigError):
        RoundToNearest(4, prune_fraction=1.0)
