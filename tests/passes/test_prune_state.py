"""passes/prune_state.py: tensors no node reads are deleted, and only those.

before     a GraphModule holding tensors, some read by ``get_attr`` nodes or under a
           ``call_module`` target, the others read by nothing (e.g. a folded BatchNorm's)
transform  PruneUnusedState
expected   ``state_dict()`` holds exactly the tensors some node reads, their values untouched;
           running it again changes nothing.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from hypothesis import given, strategies as st
from torch import nn

from l2fx.passes import FoldBatchNorm, Normalize, PruneUnusedState

from conftest import make_tiny_convnet
from pass_cases import run, same_tensors, tensors

OWNERS = ("", "m0", "m1", "m1.inner")


@st.composite
def state_and_reads(draw):
    """Tensors spread over the root and nested modules (parameters and buffers), which of them
    a get_attr reads, and which modules a call_module targets."""
    n = draw(st.integers(1, 10))
    specs = [(draw(st.sampled_from(OWNERS)), f"t{i}", draw(st.booleans()), draw(st.booleans())) for i in range(n)]
    called = draw(st.sets(st.sampled_from(OWNERS[1:])))
    return specs, called


def build(specs, called) -> tuple[fx.GraphModule, set[str]]:
    """The GraphModule and the tensor names some node of its graph reads."""
    root = nn.Module()
    root.m0, root.m1 = nn.Module(), nn.Module()
    root.m1.inner = nn.Module()
    for owner, name, is_param, _ in specs:
        module = root.get_submodule(owner) if owner else root
        t = torch.randn(3, 2)
        if is_param:
            module.register_parameter(name, nn.Parameter(t, requires_grad=False))
        else:
            module.register_buffer(name, t)
    full = lambda owner, name: f"{owner}.{name}" if owner else name  # noqa: E731
    # A graph reading everything, so that GraphModule keeps every tensor; then the graph under test.
    everything = fx.Graph()
    x = everything.placeholder("x")
    outs = [everything.get_attr(full(o, n)) for o, n, _, _ in specs] + [everything.call_module(m, (x,)) for m in OWNERS[1:]]
    everything.output(tuple(outs))
    gm = fx.GraphModule(root, everything)
    g = fx.Graph()
    x = g.placeholder("x")
    outs = [g.get_attr(full(o, n)) for o, n, _, read in specs if read] + [g.call_module(m, (x,)) for m in sorted(called)]
    g.output(tuple(outs) if outs else x)
    gm.graph = g
    gm.recompile()
    read = {full(o, n) for o, n, _, r in specs if r}
    under_called = {full(o, n) for o, n, _, _ in specs if any(o == m or o.startswith(m + ".") for m in called)}
    return gm, read | under_called


@given(state_and_reads())
def test_exactly_the_tensors_some_node_reads_remain(case):
    gm, used = build(*case)
    before = tensors(gm)
    after, _, modified = run(gm, [PruneUnusedState()])
    assert set(after.state_dict()) == used
    assert modified == (used != set(before))
    assert same_tensors(tensors(after), {k: v for k, v in before.items() if k in used})


@given(state_and_reads())
def test_pruning_is_idempotent(case):
    once, _, _ = run(build(*case)[0], [PruneUnusedState()])
    state = tensors(once)
    twice, _, modified = run(once, [PruneUnusedState()])
    assert not modified and same_tensors(tensors(twice), state)


def test_folded_batchnorm_tensors_are_removed_from_the_tiny_convnet():
    model = make_tiny_convnet()
    folded, _, _ = run(fx.symbolic_trace(copy.deepcopy(model)), [Normalize(), FoldBatchNorm()])
    assert any(k.startswith("b1.") for k in folded.state_dict())  # still held after folding
    after, _, modified = run(folded, [PruneUnusedState()])
    assert modified
    expected = {"c1.weight", "c1.bias", "c2.weight", "c2.bias", "fc.weight", "fc.bias", "out.weight", "out.bias"}
    assert set(after.state_dict()) == expected
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(after(x), folded(x))
