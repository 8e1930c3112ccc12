"""Hypothesis profiles: ``ci`` is derandomized (set env CI), ``dev`` is the default.

``TRITON_INTERPRET=1`` is set here, before anything imports l2fx: importing l2fx imports its
kernel module, and Triton reads the variable when ``@triton.jit`` decorates a kernel. Only
where there is no GPU to run Triton on (``setdefault`` keeps an explicit choice).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


# ---------------------------------------------------------------------------------------------
# Small models and fast settings shared by the compiler tests.

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU x2 + two Linear layers: fx-traceable, BN foldable, ~110k weights."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.out(torch.relu(self.fc(x.flatten(1))))


class DictInputNet(nn.Module):
    """Takes keyword inputs and branches on a tensor value: fx cannot trace it, export can."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 32)
        self.proj = nn.Linear(32, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        if h.shape[1] > 0:  # shape-dependent branch: export specialises, fx cannot trace values
            h = torch.relu(self.proj(h))
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)


def make_tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    m = TinyConvNet().eval()
    with torch.no_grad():
        for b in (m.b1, m.b2):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)
            b.weight.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def tiny_convnet():
    return make_tiny_convnet()


def make_tiny_calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 1, 28, 28, generator=g)
    return [x[:16], x[16:32], x[32:]]


@pytest.fixture
def tiny_calib():
    return make_tiny_calib()


@pytest.fixture
def fast_config():
    return make_fast_config()


def make_fast_config():
    from l2fx.config import CompileConfig, ReconstructionConfig, SensitivityConfig

    # Reconstruction has its own tests (tests/passes/test_block_reconstruction.py); here it is
    # on with few iterations so the whole default pipeline runs, quickly.
    return CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=12),
                         reconstruction=ReconstructionConfig(transform_iters=5, weight_iters=5))
