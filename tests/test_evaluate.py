"""DownstreamRunner: cached re-evaluation equals running the whole model with the change."""
from __future__ import annotations

import torch

from l2fx.data import call_model, call_model_with, output_vector
from l2fx.evaluate import DownstreamRunner
from l2fx.frontend import capture
from l2fx.method import structural_pipeline
from l2fx.pipeline import PassContext

from conftest import DictInputNet


def _check(model, batch):
    gm, _ = capture(model, batch)
    with PassContext():
        gm = structural_pipeline()(gm).graph_module
    runner = DownstreamRunner(gm, batch)
    assert torch.equal(output_vector(runner.output), output_vector(call_model(gm, batch)))
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        value = getattr(gm.get_submodule(str(node.target).rpartition(".")[0]), str(node.target).rpartition(".")[2])
        changed = value * 0.5 + 0.01
        expected = call_model_with(gm, {str(node.target): changed}, batch)
        torch.testing.assert_close(output_vector(runner.run_with(node, changed)), output_vector(expected),
                                   rtol=0, atol=0)


def test_runner_matches_full_evaluation_fx(tiny_convnet, tiny_calib):
    _check(tiny_convnet, tiny_calib[0])


def test_runner_matches_full_evaluation_export():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 200, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    _check(DictInputNet().eval(), batch)
