"""``install_decoded_weights`` (load): the artifact's decoded weights and plain tensors go into the
re-captured graph.

Before (the caller's architecture after the structural passes)::

    w = get_attr[fc.weight]                      # the caller's instance's own fp32 tensor
    y = linear(x, w, b)

After::

    w = call_module[l2fx_weights.fc__weight]()   # CodedWeight: the file's codes and stored (s, e)
    y = linear(x, w, b)                          # b: the file's plain tensor

The pass is built with what it installs (:class:`DecodedLayer` s and the plain tensors); it runs
in ``l2fx.load``'s pass manager after ``normalize``, ``fold_batchnorm`` and
``prune_unused_state``, before lowering. Each weight decodes in float32 and returns the dtype the
model has for it.

Pre: every decoded layer names a ``get_attr`` of a floating tensor in the graph. Post: every
decoded layer is a ``CodedWeight`` site carrying ``l2fx.site`` and ``l2fx.coded``; the graph's
tensors are exactly the coded layers plus the plain tensors, each plain tensor of the file's
shape and dtype; the graph is on ``ctx.device``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from l2fx.errors import ArchitectureMismatchError
from l2fx.ir import CodedInfo, WeightSite, fetch_attr, replace_weight, set_meta, weight_sites
from l2fx.modules import CodedWeight
from l2fx.pipeline import L2fxPass, PassContext, PassResult
from l2fx.transform import TransformKind

__all__ = ["InstallDecodedWeights", "DecodedLayer"]


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedLayer:
    """One layer of an artifact, decoded: its CodedInfo, its symbols and its stored (s, e)."""

    info: CodedInfo
    symbols: np.ndarray
    step_s: torch.Tensor
    threshold_e: torch.Tensor


class InstallDecodedWeights(L2fxPass):
    name = "install_decoded_weights"

    def __init__(self, layers: list[DecodedLayer], plain: dict[str, torch.Tensor], source: str | Path = "artifact"):
        self.layers, self.plain, self.source = layers, plain, str(source)

    def requires(self, gm: fx.GraphModule) -> None:
        nodes = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for layer in self.layers:
            if layer.info.param not in nodes:
                raise ArchitectureMismatchError(f"{self.source}: layer {layer.info.param!r} has no counterpart in the "
                                                "model")

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "get_attr"}
        for layer in self.layers:
            entry = layer.info.entry
            node = nodes[entry["param"]]
            codes = torch.from_numpy(layer.symbols.astype(np.int8)).reshape(entry["shape"])
            axis = entry["axis"]
            set_meta(node, WeightSite(entry["param"], "loaded", axis if axis is not None else 0, tuple(entry["shape"])))
            dtype = fetch_attr(gm, entry["param"]).dtype  # the loaded model's own dtype for this weight
            if not dtype.is_floating_point:
                raise ArchitectureMismatchError(f"{self.source}: layer {entry['param']!r} is {dtype} in the model, "
                                                "not floating point")
            module = CodedWeight(codes, TransformKind(entry["kind"]), layer.step_s, layer.threshold_e, axis, dtype,
                                 entry.get("group"))
            set_meta(replace_weight(gm, node, module, recompile=False), layer.info)
        state = gm.state_dict(keep_vars=True)
        coded = {k for k in state if k.startswith("l2fx_weights.")}
        missing, extra = set(state) - coded - set(self.plain), set(self.plain) - set(state)
        if missing or extra:
            raise ArchitectureMismatchError(f"{self.source}: tensors differ from the model's: missing "
                                            f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        for name, value in self.plain.items():
            target = state[name]
            if target.shape != value.shape or target.dtype != value.dtype:
                raise ArchitectureMismatchError(f"{self.source}: tensor {name!r} is {value.dtype} of shape "
                                                f"{tuple(value.shape)} in the artifact, {target.dtype} of shape "
                                                f"{tuple(target.shape)} in the model")
            target.copy_(value)
        gm.to(PassContext.current().device)
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        installed = {site.param for node, site in weight_sites(gm)
                     if isinstance(gm.get_submodule(str(node.target)), CodedWeight) and CodedInfo.META_KEY in node.meta}
        for layer in self.layers:
            if layer.info.param not in installed:
                self.fail(f"layer {layer.info.param!r} was not installed as a coded weight")
