"""No installed l2fx module starts a process: no ``subprocess``, no ``pip``, no ``os.system``.

Compiling, loading and the model zoo run offline with what is installed; installing data or
packages is ``scripts/setup.sh``'s job. Checked on the source (ast), not by importing, so a
module imported only on some code path is covered too. The last test shows the check fails
on each way of spelling the fault.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders installed as l2fx, l2fx.passes and l2fx.triton_kernels (pyproject.toml).
SOURCES = (ROOT / "l2fx", ROOT / "passes", ROOT / "triton_kernels")
FORBIDDEN_MODULES = frozenset({"subprocess", "pip"})
# os functions that run a program or fork the interpreter.
FORBIDDEN_OS = ("system", "popen", "exec", "spawn", "posix_spawn", "fork")


def _top(name: str) -> str:
    return name.split(".")[0]


def process_starts(source: str) -> list[tuple[int, str]]:
    """(line, what) for every import of a forbidden module and every process-starting os call."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _top(a.name) in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if _top(module) in FORBIDDEN_MODULES:
                found.append((node.lineno, f"from {module} import ..."))
            elif module == "os":
                found += [(node.lineno, f"from os import {a.name}") for a in node.names
                          if a.name.startswith(FORBIDDEN_OS)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            if node.attr.startswith(FORBIDDEN_OS):
                found.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.Call):  # importlib.import_module("subprocess"), __import__("pip")
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _top(arg.value) in FORBIDDEN_MODULES:
                    found.append((node.lineno, f"{name}({arg.value!r})"))
    return found


def test_no_installed_module_starts_a_process():
    files = [path for folder in SOURCES for path in sorted(folder.rglob("*.py"))]
    assert len(files) > 20  # the folders were found
    problems = [f"{path.relative_to(ROOT)}:{line}: {what}"
                for path in files for line, what in process_starts(path.read_text())]
    assert problems == []


@pytest.mark.parametrize("source", [
    "import subprocess",
    "import subprocess as sp",
    "def f():\n    from subprocess import run\n    run(['ls'])",
    "import os\nos.system('pip install x')",
    "from os import popen",
    "import os\nos.execv('/bin/sh', [])",
    "import importlib\nimportlib.import_module('subprocess')",
    "__import__('pip')",
    "from pip._internal.cli.main import main",
])
def test_the_check_finds_each_fault(source):
    assert process_starts(source), source


def test_the_check_passes_clean_code():
    assert process_starts("import os\nimport importlib.util\nos.environ.get('X')\nos.path.join('a', 'b')\n"
                          "importlib.util.find_spec('foolbox')\nfrom . import subprocess_free") == []
