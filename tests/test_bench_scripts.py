"""The benchmark scripts run as ``python bench/<name>.py``, which puts bench/ first on sys.path:
a script named like an installed top-level module hides that module from everything the script
imports (bench/kernels.py once hid Hugging Face's ``kernels``, which transformers imports)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def test_no_benchmark_script_shadows_an_installed_module(monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if pathlib.Path(p or ".").resolve() != BENCH])
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    assert names, "no benchmark scripts found"
    shadowed = {n: spec.origin for n in names if (spec := importlib.util.find_spec(n)) is not None}
    assert not shadowed, f"bench scripts named like installed modules: {shadowed}"
