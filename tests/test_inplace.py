"""l2fx.inplace: recognising in-place writes into graph inputs, and reading a copy instead."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from l2fx.inplace import clone_written_inputs, is_impure, written_arguments, written_inputs


class _ModuleInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Hardswish(inplace=True)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.lin(self.act(x)) + y


class _FunctionInplace(nn.Module):
    def forward(self, x, y):
        a = F.relu(x, True)                  # positional inplace
        b = torch.sigmoid_(y.view(-1))       # through a view of y
        return a.sum() + b.sum()


class _MethodAndOperator(nn.Module):
    def forward(self, x, y, z):
        x.mul_(2)                            # a statement: nothing reads its result
        y.t().clamp_(max=0.5)                # through a view, as a statement
        w = z * 3                            # z itself is not written
        w += 1                               # operator.iadd on an intermediate
        return x + y + w


class _NoWrites(nn.Module):
    def forward(self, x):
        h = torch.relu(x).view(-1)
        h = h.add_(1)                        # writes an intermediate only
        return h.reshape(x.shape) * 2


def _names(nodes):
    return sorted(n.name for n in nodes)


def test_written_inputs_module_function_method_operator():
    assert _names(written_inputs(fx.symbolic_trace(_ModuleInplace()))) == ["x"]
    assert _names(written_inputs(fx.symbolic_trace(_FunctionInplace()))) == ["x", "y"]
    assert _names(written_inputs(fx.symbolic_trace(_MethodAndOperator()))) == ["x", "y"]
    assert written_inputs(fx.symbolic_trace(_NoWrites())) == []


def test_aten_schema_writes():
    gm = fx.symbolic_trace(lambda x: x + 1)
    g = fx.Graph()
    x = g.placeholder("x")
    r = g.call_function(torch.ops.aten.relu_.default, (x,))
    out = g.call_function(torch.ops.aten.add.Tensor, (r, 1))
    g.output(out)
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert written_arguments(gm, r) == [x]
    assert written_arguments(gm, out) == []
    assert written_inputs(gm) == [x]


@pytest.mark.parametrize("model, args", [
    (_ModuleInplace(), lambda: (torch.randn(3, 4), torch.randn(3, 4))),
    (_FunctionInplace(), lambda: (torch.randn(5), torch.randn(5))),
    (_MethodAndOperator(), lambda: (torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3))),
])
def test_clone_written_inputs_keeps_outputs_and_inputs(model, args):
    gm = fx.symbolic_trace(model)
    inputs = args()
    expected = model(*[a.clone() for a in inputs])
    assert clone_written_inputs(gm)
    gm.recompile()
    kept = [a.clone() for a in inputs]
    out = gm(*inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for a, b in zip(inputs, kept):
        assert torch.equal(a, b)
    assert written_inputs(gm) == []  # the clones are written now, not the inputs
    assert not clone_written_inputs(gm)  # idempotent


def test_statement_inplace_is_impure():
    gm = fx.symbolic_trace(_MethodAndOperator())
    mul_ = next(n for n in gm.graph.nodes if n.target == "mul_")
    assert not mul_.users and is_impure(gm, mul_)


def test_operator_setitem_and_iadd_write_their_first_argument():
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    v = g.call_method("view", (x, -1))
    s = g.call_function(operator.setitem, (v, 0, 1.0))
    a = g.call_function(operator.iadd, (y, 1.0))
    g.output(g.call_function(operator.add, (x, a)))
    gm = fx.GraphModule(nn.Module(), g)
    assert written_arguments(gm, s) == [v] and written_arguments(gm, a) == [y]
    assert _names(written_inputs(gm)) == ["x", "y"]
    inputs = (torch.zeros(2, 2), torch.zeros(2, 2))
    clone_written_inputs(gm)
    gm.recompile()
    out = gm(*inputs)
    assert out[0, 0] == 2.0 and float(out.sum()) == 5.0
    assert all(float(t.abs().sum()) == 0 for t in inputs)


# (``t += 1`` is not here: fx traces it as ``operator.add``, out of place, whatever eager did.)
_OPS = {
    "relu_module": lambda t, m: m.relu(t),
    "relu_fn": lambda t, m: F.relu(t, inplace=True),
    "add_": lambda t, m: t.add_(0.5),
    "clamp_": lambda t, m: t.clamp_(-1, 1),
    "pure": lambda t, m: t * 2 - 1,
}
_VIEWS = {
    "none": lambda t: t,
    "view": lambda t: t.view(-1),
    "transpose": lambda t: t.transpose(0, 1),
    "getitem": lambda t: t[1:],
}


class _Composed(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        acc = x.sum() * 0
        for view, op in self.ops:
            acc = acc + _OPS[op](_VIEWS[view](x), self).sum()
        return acc + x.sum()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(_VIEWS)), st.sampled_from(sorted(_OPS))), min_size=1, max_size=4))
def test_property_cloned_graph_leaves_input_and_matches_eager(ops):
    """Any chain of (view, op) on the input: after clone_written_inputs the graph's output equals
    the eager model's and its input is untouched exactly when some op wrote into it."""
    model = _Composed(ops)
    gm = fx.symbolic_trace(model, concrete_args=None)
    x = torch.linspace(-2, 2, 12).reshape(3, 4)
    expected = model(x.clone())
    writes = any(op != "pure" for _, op in ops)
    assert bool(written_inputs(gm)) == writes
    clone_written_inputs(gm)
    gm.recompile()
    kept = x.clone()
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    assert torch.equal(x, kept)
