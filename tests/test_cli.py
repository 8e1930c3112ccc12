"""The command line: compress a user's module:function model, inspect the artifact, clear errors."""
from __future__ import annotations

import torch

from l2fx.cli import main


def tiny_model():
    from conftest import make_tiny_convnet

    return make_tiny_convnet()


def tiny_calib():
    return [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))]


def test_compress_then_inspect(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "t.l2fx"
    rc = main(["compress", "test_cli:tiny_model", "--calib", "test_cli:tiny_calib", "--target-cr", "6",
               "-o", str(out), "-q", "--verify", "--no-reconstruction"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "compressed weights" in text and "whole file" in text
    assert main(["inspect", str(out)]) == 0
    assert "fc.weight" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["compress", "no_such_module:f", "--calib", "x:y", "-q"]) == 2
    assert "cannot import module" in capsys.readouterr().err
    assert main(["compress", "not-a-model", "-q"]) == 2
    assert "neither a registered model" in capsys.readouterr().err
    bad = tmp_path / "bad.l2fx"
    bad.write_bytes(b"nope")
    assert main(["inspect", str(bad)]) == 2
    assert "l2fx: error:" in capsys.readouterr().err


def test_set_overrides_any_config_field_and_rejects_unknown_ones():
    import pytest

    from l2fx import CompileConfig
    from l2fx.cli import CLIError, apply_settings

    base = CompileConfig(target_cr=8)
    cfg = apply_settings(base, ["reconstruction.distill_iters=200", "transform=linear", "seed=3",
                                "sensitivity.deadzones=[0.5, 0.75]"])
    assert cfg.reconstruction.distill_iters == 200 and cfg.transform.value == "linear" and cfg.seed == 3
    assert cfg.sensitivity.deadzones == (0.5, 0.75) and cfg.target_cr == 8
    assert base.reconstruction.distill_iters == 0  # frozen: the base is untouched
    for bad, match in (("reconstruction.nope=1", "no field 'nope'"), ("seed", "KEY=VALUE"),
                       ("reconstruction.batch_size=0", "batch_size"), ("transform=cubic", "invalid value"),
                       ("seed.x=1", "no field 'x'")):
        with pytest.raises(CLIError, match=match):
            apply_settings(base, [bad])
