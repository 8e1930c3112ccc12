"""block_partition: blocks found on ResNet-18, MobileNetV2 and an exported transformer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2fx.config import CompileConfig
from l2fx.ir import Allocation, get_meta, set_meta, weight_sites
from l2fx.method import structural_pipeline
from l2fx.passes import BlockPartition, InsertTransforms, MarkWeights
from l2fx.blocks import block_key, is_weight_node, side_nodes
from l2fx.ir import Block
from l2fx.frontend import capture
from l2fx.pipeline import PassContext, PassManager


class EncoderLayer(nn.Module):
    """Pre-LN self-attention + MLP: two residual regions that make one block."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, bias):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, -1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyEncoder(nn.Module):
    """Embedding, layers sharing an attention bias computed from the mask input, a head.

    The shape-dependent branch makes fx give up, so it is captured by torch.export (aten ops,
    ``sym_size`` nodes of the inputs).
    """

    def __init__(self, n: int = 3, d: int = 32, vocab: int = 100):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(EncoderLayer(d) for _ in range(n))
        self.head = nn.Linear(d, 8)

    def forward(self, input_ids, attention_mask):
        bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        x = self.emb(input_ids)
        if x.shape[1] > 0:
            for layer in self.layers:
                x = layer(x, bias)
        return self.head(x[:, 0])


def encoder_batch(n: int = 4, t: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 100, (n, t), generator=g), (torch.rand(n, t, generator=g) > 0.2).long())


def transformed(model: nn.Module, batch, config: CompileConfig = CompileConfig()):
    """The graph as insert_transforms leaves it, with a fixed allocation (no sensitivity run)."""
    gm, _ = capture(model, batch)
    with PassContext(config=config, calib=[batch], verify=True):
        gm = PassManager([*structural_pipeline().passes, MarkWeights()])(gm).graph_module
        for node, site in weight_sites(gm):
            set_meta(node, Allocation("joint", 0.01, 0.01, site.numel // 4))
        gm = InsertTransforms()(gm).graph_module
    return gm


def partition(model: nn.Module, batch):
    gm = transformed(model, batch)
    with PassContext(config=CompileConfig(), calib=[batch], verify=True) as ctx:
        pm = PassManager([BlockPartition()])
        gm = pm(gm).graph_module
    return gm, ctx.records["block_partition"]["blocks"]


def names(blocks) -> list[str]:
    return [b["name"] for b in blocks]


def test_block_key():
    assert block_key("layer1.0.conv1.weight") == "layer1.0"
    assert block_key("features.2.conv.1.0.weight") == "features.2"
    assert block_key("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert block_key("fc.weight") == "fc"
    assert block_key("weight") == "weight"


def test_resnet18_basic_blocks():
    torchvision = pytest.importorskip("torchvision")
    gm, blocks = partition(torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64))
    layers = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert names(blocks) == ["conv1", *layers, "fc"]
    by_name = {b["name"]: b["weights"] for b in blocks}
    assert by_name["layer1.0"] == ["l2fx_weights.layer1__0__conv1__weight", "l2fx_weights.layer1__0__conv2__weight"]
    assert len(by_name["layer2.0"]) == 3  # conv1, conv2 and the downsample conv
    # The residual add and its ReLU close the block; the stem's ReLU/maxpool open layer1.0.
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    assert get_meta(add, Block).name == "layer1.0"
    # Every compressed weight is in exactly one block, and data flows from earlier blocks to later.
    for node, _ in weight_sites(gm):
        assert is_weight_node(gm, node) and get_meta(node, Block) is not None
    for node in gm.graph.nodes:
        b = get_meta(node, Block)
        for a in node.all_input_nodes:
            ab = get_meta(a, Block)
            assert b is None or ab is None or ab.index <= b.index


def test_mobilenet_v2_inverted_residual_blocks():
    torchvision = pytest.importorskip("torchvision")
    _, blocks = partition(torchvision.models.mobilenet_v2(weights=None).eval(), torch.randn(1, 3, 64, 64))
    # Residual or not (features.2 has stride 2, no skip), each inverted-residual block is one block.
    assert names(blocks) == [f"features.{i}" for i in range(19)] + ["classifier.1"]
    assert [len(b["weights"]) for b in blocks[1:4]] == [2, 3, 3]


def test_exported_transformer_one_block_per_layer():
    torch.manual_seed(0)
    gm, blocks = partition(TinyEncoder().eval(), encoder_batch())
    assert names(blocks) == ["emb", "layers.0", "layers.1", "layers.2", "head"]
    assert all(len(b["weights"]) == 4 for b in blocks[1:4])
    # The attention bias is computed from an input only: a side value in no block, read by all layers.
    side = side_nodes(gm)
    bias_users = [n for n in gm.graph.nodes if n in side and n.op == "call_function"
                  and {get_meta(u, Block).index for u in n.users if get_meta(u, Block)} == {1, 2, 3}]
    assert bias_users, "the mask-derived bias should be a side input of every layer"
    assert all(get_meta(n, Block) is None for n in side)


def test_running_twice_changes_nothing(tiny_convnet, tiny_calib):
    gm = transformed(tiny_convnet, tiny_calib[0])
    with PassContext(config=CompileConfig(), calib=tiny_calib):
        BlockPartition()(gm)
        first = {n.name: get_meta(n, Block) for n in gm.graph.nodes}
        BlockPartition()(gm)
        assert {n.name: get_meta(n, Block) for n in gm.graph.nodes} == first
    # c1 (144 weights < min_numel) is not compressed: it is a side value of the first block.
    assert [b.name for b in sorted({b for b in first.values() if b}, key=lambda b: b.index)] == ["c2", "fc", "out"]
