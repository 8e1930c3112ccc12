"""``insert_act_quant``: before / transform / expected, idempotence, and what it refuses."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from l2fx.activations import ActQuantSpec
from l2fx.errors import ConfigError, PassError
from l2fx.ir import ActQuantIntent, set_meta, weight_sites
from l2fx.modules import ActQuant
from l2fx.passes import InsertActQuant

from l2fx.config import CompileConfig

from pass_cases import make_mlp, marked, mlp_calib, run

SMALL = CompileConfig(min_numel=16)

SPEC = ActQuantSpec(4, 0.25, 8)


def _quantised_inputs(gm):
    """op name -> the ActQuant path its input goes through (None: not quantised)."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            x = n.args[0]
            out[n.name] = str(x.target) if x.op == "call_module" and str(x.target).startswith("l2fx_act") else None
    return out


def test_the_intent_puts_the_quantiser_on_the_input_and_nothing_else_changes():
    model = make_mlp((8, 12, 4))
    x = mlp_calib(8)[0]
    gm = marked(model, x, SMALL)
    first = next(n for n, site in weight_sites(gm) if site.param == "0.weight")
    set_meta(first, ActQuantIntent(SPEC))
    out, _, modified = run(gm, [InsertActQuant()])
    assert modified
    assert sorted(v for v in _quantised_inputs(out).values() if v) == ["l2fx_act.0__weight"]
    assert isinstance(out.get_submodule("l2fx_act.0__weight"), ActQuant)
    with torch.no_grad():
        want = model[2](model[1](nn.functional.linear(SPEC(x), model[0].weight, model[0].bias)))
        assert torch.equal(out(x), want)
    again, _, modified = run(out, [InsertActQuant()])
    assert not modified and again.code == out.code


def test_given_specs_are_set_by_name_and_unknown_names_refused():
    gm = marked(make_mlp((8, 12, 4)), mlp_calib(8)[0], SMALL)
    out, _, _ = run(gm, [InsertActQuant({"2.weight": SPEC})])
    assert sorted(v for v in _quantised_inputs(out).values() if v) == ["l2fx_act.2__weight"]
    with pytest.raises(ConfigError, match="no compressed weight named 'zz.weight'"):
        run(marked(make_mlp((8, 12, 4)), mlp_calib(8)[0], SMALL), [InsertActQuant({"zz.weight": SPEC})])
    with pytest.raises(ConfigError, match="ActQuantSpec"):
        InsertActQuant({"0.weight": (4, 0.25, 8)})


def test_a_weight_read_by_an_embedding_only_is_refused_and_a_tied_lookup_left_alone():
    class _Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(50, 16)

        def forward(self, ids):
            return self.e(ids).sum(-1)

    ids = torch.randint(0, 50, (4, 6))
    with pytest.raises(PassError, match="no linear/conv op reads it.*embedding"):
        run(marked(_Emb(), ids, SMALL), [InsertActQuant({"e.weight": SPEC})])

    class _Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.e.weight

        def forward(self, ids):
            return self.head(self.e(ids))

    model = _Tied()
    gm = marked(model, ids, SMALL)
    out, _, _ = run(gm, [InsertActQuant({"e.weight": SPEC})])
    with torch.no_grad():
        assert torch.equal(out(ids), nn.functional.linear(SPEC(model.e(ids)), model.e.weight))
