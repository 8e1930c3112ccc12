"""The compressed model type that :func:`l2fx.compile` and :func:`l2fx.load` return."""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from l2fx.artifact import serialize
from l2fx.report import CompressionReport

__all__ = ["CompiledModel"]


class CompiledModel(nn.Module):
    """A compressed model: the rewritten GraphModule, its report, and what save() writes.

    ``forward`` runs the graph (weights decoded from integer codes by the torch reference, or
    by the fused kernel once lowered). ``state_dict()`` holds the codes, the stored T
    parameters and the plain tensors: what runs, nothing else.
    """

    def __init__(self, graph_module: fx.GraphModule, report: CompressionReport | None, header: dict[str, Any]):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self._header = header
        # A model captured from keyword inputs (torch.export keeps that calling convention)
        # also accepts them positionally, in capture order, as the original model did.
        self._keyword_inputs = [key for kind, key, *_ in header.get("capture", {}).get("inputs", []) if kind == "kwarg"]

    def forward(self, *args, **kwargs):
        if args and self._keyword_inputs:
            kwargs = {**dict(zip(self._keyword_inputs, args)), **kwargs}
            args = args[len(self._keyword_inputs):]
        return self.graph_module(*args, **kwargs)

    def train(self, mode: bool = True) -> "CompiledModel":
        """Records the mode only: the graph was captured in eval mode (BatchNorm folded,
        dropout off) and graphs from torch.export refuse ``train()``/``eval()`` outright."""
        self.training = mode
        return self

    def artifact_bytes(self) -> bytes:
        return serialize(self.graph_module, self._header)
