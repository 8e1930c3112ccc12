"""Small graphs at the points of the pipeline where the pass tests start, and a runner.

Every helper runs its passes through :class:`PassManager` inside ``PassContext(verify=True)``,
so the verifier checks the graph a test starts from as well as the one it ends with. The
allocations set here by hand stand in for ``sensitivity_analysis`` + ``entropy_allocation``
(measured curves cost a model evaluation per candidate; the passes after them only read the
``Allocation`` entry).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from l2fx.config import CompileConfig
from l2fx.frontend import capture
from l2fx.ir import Allocation, fetch_attr, set_meta, weight_sites
from l2fx.method import structural_pipeline
from l2fx.passes import InsertTransforms, MarkWeights
from l2fx.pipeline import PassContext, PassManager


def make_mlp(widths: tuple[int, ...] = (64, 128, 64, 16), seed: int = 0) -> nn.Sequential:
    """Linear-ReLU stack in eval mode: (64, 128, 64, 16) is 17k weights in 3 compressed layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).eval()


def mlp_calib(width: int = 64, n: int = 16, batches: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=g) for _ in range(batches)]


def run(gm: fx.GraphModule, passes, config: CompileConfig | None = None, calib=()):
    """Runs ``passes`` on ``gm`` under the verifier; returns (graph module, records, result.modified)."""
    with PassContext(config=config or CompileConfig(), calib=list(calib), verify=True) as ctx:
        result = PassManager(list(passes))(gm)
    return result.graph_module, ctx.records, result.modified


def marked(model: nn.Module, batch, config: CompileConfig | None = None) -> fx.GraphModule:
    """The model captured, through the structural passes and ``mark_weights``."""
    gm, _ = capture(model, batch)
    return run(gm, [*structural_pipeline().passes, MarkWeights()], config, [batch])[0]


def allocate_by_levels(gm: fx.GraphModule, levels: float = 24.0, deadzone: float = 1.0, kind: str = "joint",
                       channel_scaled: bool = False) -> None:
    """Sets every site's Allocation to step ``max|w| / levels``, threshold ``deadzone * step``."""
    for node, site in weight_sites(gm):
        amax = float(fetch_attr(gm, site.param).abs().max())
        s = amax / levels
        set_meta(node, Allocation(kind, s, deadzone * s, site.numel // 4, channel_scaled))


def allocate_from_grid(gm: fx.GraphModule, kind: str, where: float, config: CompileConfig | None = None) -> None:
    """Sets every site's Allocation to a candidate of sensitivity analysis's grid
    (:func:`candidate_params`: from ~3 levels at ``where = 0`` to the finest the alphabet holds
    at ``where = 1``), the settings ``entropy_allocation`` chooses among. None saturates."""
    from l2fx.passes.sensitivity import candidate_params
    from l2fx.transform import TransformKind

    cfg = config or CompileConfig()
    for node, site in weight_sites(gm):
        grid = candidate_params(fetch_attr(gm, site.param).detach().float(), TransformKind(kind), cfg)
        s, e = grid[round(where * (len(grid) - 1))]
        set_meta(node, Allocation(kind, s, e, site.numel // 4))


def transformed(model: nn.Module, batch, config: CompileConfig | None = None, levels: float = 24.0,
                deadzone: float = 1.0, kind: str = "joint") -> fx.GraphModule:
    """The graph as ``insert_transforms`` leaves it, from a by-hand allocation."""
    gm = marked(model, batch, config)
    allocate_by_levels(gm, levels, deadzone, kind)
    return run(gm, [InsertTransforms()], config, [batch])[0]


def tensors(gm: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``gm`` (parameters and buffers), by state_dict name."""
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bits."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
