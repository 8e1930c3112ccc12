"""The examples in docs/ run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import l2fx
from l2fx.errors import PassError
from l2fx.ir import weight_sites
from l2fx.method import pipeline

from conftest import make_fast_config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_custom_pass_example_in_passes_md_runs(tiny_convnet, tiny_calib, tmp_path, monkeypatch):
    """A pass with its own meta namespace, in a dozen lines: declared precondition checked, verified,
    dumped by DumpIR, carried through lowering; registered as a method like the built-ins."""
    (example,) = _python_blocks(DOCS / "passes.md")
    original = l2fx.compile

    def compile_fast(*args, **kwargs):  # the example as written, with the test suite's short settings
        return original(*args, config=make_fast_config(), **kwargs)

    monkeypatch.setattr(l2fx, "compile", compile_fast)
    scope = {"model": tiny_convnet, "batches": tiny_calib, "ir_dir": tmp_path / "ir"}
    try:
        exec(compile(example, "docs/passes.md", "exec"), scope)
    finally:
        l2fx.method._METHODS.pop("l2+fanout", None)
    compiled = scope["compiled"]
    dumps = sorted((tmp_path / "ir").iterdir())
    assert any(p.name.endswith("_count_users.txt") for p in dumps)
    assert "fanout.users" in next(p for p in dumps if p.name.endswith("_lower_kernels.txt")).read_text()
    assert "count_users" in compiled.report.pass_seconds
    assert all("fanout.users" in n.meta for n, _ in weight_sites(scope["lowered"].graph_module))


def test_a_raising_custom_pass_names_itself_and_what_ran_before(tiny_convnet, tiny_calib):
    class Broken(l2fx.L2fxPass):
        name = "broken"

        def call(self, gm):
            raise ZeroDivisionError("oops")

    pm = pipeline("l2", make_fast_config()).insert_after("mark_weights", Broken())
    with pytest.raises(PassError, match=r"pass 'broken' failed with ZeroDivisionError: oops \(passes run before it: "
                                        r"normalize, fold_batchnorm, prune_unused_state, mark_weights\)"):
        l2fx.compile(tiny_convnet, 8, tiny_calib, config=make_fast_config(), pipeline=pm)


def test_a_declared_precondition_is_checked_by_the_manager(tiny_convnet, tiny_calib):
    from l2fx.ir import Allocation

    class NeedsAllocation(l2fx.L2fxPass):
        name = "needs_allocation"
        requires_meta = (Allocation,)

        def call(self, gm):
            return l2fx.PassResult(gm, False)

    pm = pipeline("l2", make_fast_config()).insert_after("mark_weights", NeedsAllocation())
    with pytest.raises(PassError, match=r"pass 'needs_allocation' at node .*needs node.meta\['l2fx.allocation'\]"):
        l2fx.compile(tiny_convnet, 8, tiny_calib, config=make_fast_config(), pipeline=pm)
