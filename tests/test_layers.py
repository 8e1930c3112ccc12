"""The import layers of the package: every module in a layer, imports downwards only, no cycles.

    (0) math and format: errors, config, transform, counter, coding, rangedec, accounting,
        formats, sparsity, activations, memory, the kernels (triton_kernels)
    (1) IR, runtime modules and infrastructure the passes share: ir, modules, compiled, pipeline,
        data, evaluate, frontend, inplace, manifest, artifact, report, blocks, bytefit, optim,
        tparams, solvers, layerwise
    (2) passes, which never import each other (the package's __init__ gathers them)
    (3) the methods registry, api, cli, the model zoo, and the package itself

An import from a module into a higher layer, an import between two passes, a cycle, an import
of an l2fx module inside a function, or a module in no layer fails ``check``; the last tests
show that it does, on import graphs with each fault added.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"l2fx": ROOT / "l2fx", "l2fx.passes": ROOT / "passes", "l2fx.triton_kernels": ROOT / "triton_kernels"}

LAYERS: dict[int, tuple[str, ...]] = {
    0: ("l2fx.errors", "l2fx.config", "l2fx.transform", "l2fx.counter", "l2fx.coding", "l2fx.rangedec",
        "l2fx.accounting", "l2fx.formats", "l2fx.sparsity", "l2fx.triton_kernels", "l2fx.distributed",
        "l2fx.activations", "l2fx.memory"),
    1: ("l2fx.ir", "l2fx.modules", "l2fx.compiled", "l2fx.pipeline", "l2fx.data", "l2fx.evaluate", "l2fx.frontend",
        "l2fx.inplace", "l2fx.manifest", "l2fx.artifact", "l2fx.report", "l2fx.blocks", "l2fx.bytefit", "l2fx.optim",
        "l2fx.tparams", "l2fx.solvers", "l2fx.layerwise", "l2fx.calibration", "l2fx.into_model",
        "l2fx.precision"),
    2: ("l2fx.passes",),
    3: ("l2fx.method", "l2fx.api", "l2fx.cli", "l2fx.zoo", "l2fx.analyze", "l2fx.smol", "l2fx"),
}


def layer_of(module: str) -> int | None:
    """The layer of ``module``: that of the longest name in LAYERS it is or lies under."""
    best = None
    for layer, names in LAYERS.items():
        for name in names:
            under = module.startswith(name + ".") and name != "l2fx"  # the package itself: only itself
            if (module == name or under) and (best is None or len(name) > len(best[1])):
                best = (layer, name)
    return None if best is None else best[0]


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, known: set[str]) -> str:
    """The module an imported name lives in (``l2fx.coding`` for ``from l2fx import coding``)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(module: str, path: Path, known: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
    """(l2fx modules imported at module level, [(line, module)] imported inside a function)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    is_package = path.name == "__init__.py"

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parent = module if is_package else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                parent = parent.rsplit(".", 1)[0]
            base = f"{parent}.{base}" if base else parent
        return [f"{base}.{a.name}" for a in node.names] + [base]

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [_resolve(t, known) for t in targets(child) if t == "l2fx" or t.startswith("l2fx.")]
                names = {n for n in names if n in known and n != module}
                if isinstance(child, ast.ImportFrom) and names - {child.module}:
                    names.discard(_resolve(child.module or "", known))  # `from pkg import submodule`
                if in_function:
                    nested.extend((child.lineno, n) for n in sorted(names))
                else:
                    top.update(names)
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, False)
    return top, nested


def check(graph: dict[str, set[str]], nested: dict[str, list[tuple[int, str]]] | None = None) -> list[str]:
    """Every violation of the layering in an import graph (module -> modules it imports)."""
    problems = []
    for module, targets in graph.items():
        mine = layer_of(module)
        if mine is None:
            problems.append(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)")
            continue
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs is None:
                continue  # reported as a module of its own
            if theirs > mine:
                problems.append(f"{module} (layer {mine}) imports {target} (layer {theirs}): upward")
            elif mine == theirs == 2 and module != "l2fx.passes" and target != module:
                problems.append(f"{module} imports {target}: passes never import each other; move what they "
                                "share to layer 1")
    for cycle in nx.simple_cycles(nx.DiGraph([(m, t) for m, ts in graph.items() for t in ts])):
        problems.append("import cycle: " + " -> ".join(cycle + cycle[:1]))
    for module, found in (nested or {}).items():
        problems.extend(f"{module}:{line} imports {target} inside a function: import it at module level"
                        for line, target in found)
    return problems


def package_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    found = modules()
    known = set(found)
    graph, nested = {}, {}
    for module, path in found.items():
        top, inner = imports(module, path, known)
        # The package's __init__ only gathers names; every import of a submodule runs it first,
        # which is Python's package semantics, not a dependency of the submodule.
        graph[module] = {t for t in top if t != "l2fx" or module == "l2fx"}
        if inner:
            nested[module] = inner
    return graph, nested


def test_the_package_is_layered():
    graph, nested = package_graph()
    assert check(graph, nested) == []


def test_every_module_is_in_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


@pytest.mark.parametrize("fault", ["upward", "cycle", "pass_to_pass", "nested", "unknown"])
def test_the_check_fails_on_each_fault(fault):
    graph, nested = package_graph()
    graph = {k: set(v) for k, v in graph.items()}
    nested = dict(nested)
    if fault == "upward":
        graph["l2fx.transform"].add("l2fx.api")
    elif fault == "cycle":
        graph["l2fx.coding"].add("l2fx.accounting")  # accounting imports coding
    elif fault == "pass_to_pass":
        graph["l2fx.passes.rate_fit"].add("l2fx.passes.sensitivity")
    elif fault == "nested":
        nested["l2fx.ir"] = [(1, "l2fx.data")]
    else:
        graph["l2fx.newthing"] = set()
    problems = check(graph, nested)
    assert problems, fault
    expected = {"upward": "upward", "cycle": "cycle", "pass_to_pass": "never import each other",
                "nested": "inside a function", "unknown": "in no layer"}[fault]
    assert any(expected in p for p in problems), problems
