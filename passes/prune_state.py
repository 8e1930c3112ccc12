"""``prune_unused_state``: delete parameters and buffers that no node reads any more.

After BatchNorm folding the BN's mean/var/gamma/beta are dead; keeping them would store
bytes nothing uses. Pre: ``normalize`` ran. Post: every tensor in ``state_dict()`` is read by
a ``get_attr`` node or belongs to a ``call_module`` target. Idempotent.
"""
from __future__ import annotations

import torch.fx as fx

from l2fx.pipeline import L2fxPass, PassResult


def used_state_names(gm: fx.GraphModule) -> set[str]:
    used: set[str] = set()
    module_prefixes = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            used.add(str(node.target))
        elif node.op == "call_module":
            module_prefixes.append(str(node.target) + ".")
    for name in gm.state_dict(keep_vars=True):
        if any(name.startswith(p) for p in module_prefixes):
            used.add(name)
    return used


class PruneUnusedState(L2fxPass):
    name = "prune_unused_state"

    def call(self, gm: fx.GraphModule) -> PassResult:
        used = used_state_names(gm)
        modified = False
        for name in list(gm.state_dict(keep_vars=True)):
            if name in used:
                continue
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if attr in owner._parameters:
                del owner._parameters[attr]
            elif attr in owner._buffers:
                del owner._buffers[attr]
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        unused = set(gm.state_dict(keep_vars=True)) - used_state_names(gm)
        if unused:
            self.fail(f"unused tensors remain: {sorted(unused)[:5]}")
