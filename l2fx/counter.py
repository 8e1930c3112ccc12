"""The differentiable counter of L2 (paper Sec. 4.3, Eq. 14-19).

The entropy term of the objective needs the probability mass of the integer symbols
``round(t)`` (``t = T(w)``, see :mod:`l2fx.transform`) as a differentiable function of
``t``. The counter ``C(t, x) = #{t_i <= x}`` (Eq. 15-16) is relaxed by replacing the step
function with the CDF of a kernel of half-width ``delta`` (Eq. 17-18), and the mass of
symbol ``k`` is ``f(k + 0.5) - f(k - 0.5)`` (Eq. 19).

Because ``delta <= 0.5``, a value ``t`` only puts mass into bins ``round(t) - 1``,
``round(t)`` and ``round(t) + 1``, so the soft histogram is two kernel-CDF evaluations
per value and one ``index_add``: O(n) work and memory instead of the paper's sort +
binary search (A.2). Layers with more than ``max_samples`` weights are estimated from a
uniform sample (A.2).

Accuracy (tests/test_counter.py, 100k Laplace weights, resolution 64, so delta = 0.5):
the relaxation only spreads mass across bin edges, so it overestimates. LINEAR layers at
3.8-4.7 bits/weight: within 0.1 % of :func:`empirical_bits`; JOINT with e = 1.5 s (dead
zone) at 3.4-4.5 bits/weight: +0.6 .. +2.4 %; JOINT at ~1.3 bits/weight: +5 .. +18 %,
because the density of ``t`` jumps at the dead-zone edge +-0.5 and delta = 0.5 smears it.

Measured on this project's 2-core CPU (torch 2.14, cosine kernel, qmax=15, Laplace
weights, best of 5; ``python bench/counter.py`` re-measures), :func:`estimate_bits`
forward + backward, "counter" with ``t`` a leaf, "T+counter" with T = LINEAR on ``w``:

    weights  max_samples   quiet machine (2 threads)      loaded, load avg ~4.7 (1 thread)
                           counter     T+counter          counter     T+counter
    1M       2**16         16 ms       22 ms              34 ms       53 ms
    11.7M    2**16         31 ms       141 ms (T: 110)    95 ms       470 ms
    1M       no sampling   71 ms       69 ms              214 ms      215 ms

Sampling uses deduplicated i.i.d. draws instead of ``torch.randperm(n)``, which alone
took 0.9 s for n = 11.7M here.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import torch
from torch import Tensor

from l2fx.errors import ConfigError

__all__ = [
    "CounterKernel",
    "CounterConfig",
    "kernel_cdf",
    "soft_pmf",
    "estimate_bits",
    "empirical_bits",
]

# Lower bound of delta: keeps u = x / delta finite when all t are equal.
_MIN_DELTA = 1e-6
# log2 is taken of max(p, _P_FLOOR): gradient stays finite for empty bins.
_P_FLOOR = 1e-30


class CounterKernel(str, enum.Enum):
    """Relaxation kernel ``K`` of Eq. 17 (paper Table 3 compares all three)."""

    COSINE = "cosine"  # Eq. 18: pi/(4 delta) cos(pi x / (2 delta)) on [-delta, delta]
    LINEAR = "linear"  # uniform box 1/(2 delta) on [-delta, delta] (CDF is linear)
    TRIANGLE = "triangle"  # (1 - |x|/delta)/delta on [-delta, delta]


@dataclasses.dataclass(frozen=True)
class CounterConfig:
    """How the differentiable counter relaxes the symbol histogram.

    ``delta = min(0.5, (max t - min t) / resolution)`` in symbol (T) space (Table 3),
    computed on ``t`` clamped to ``[-qmax, qmax]``. ``max_samples``: layers with more
    weights are estimated from a uniform sample of this size (A.2).
    """

    kernel: CounterKernel = CounterKernel.COSINE
    resolution: int = 64
    max_samples: int = 1 << 16

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, CounterKernel):
            try:
                object.__setattr__(self, "kernel", CounterKernel(self.kernel))
            except ValueError:
                raise ConfigError(
                    f"unknown counter kernel {self.kernel!r}; "
                    f"expected one of {[k.value for k in CounterKernel]}"
                ) from None
        for name in ("resolution", "max_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"CounterConfig.{name} must be a positive int, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel.value, "resolution": self.resolution, "max_samples": self.max_samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CounterConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"CounterConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown CounterConfig keys {sorted(unknown)}")
        return cls(**d)


def _kernel(kernel: CounterKernel | str) -> CounterKernel:
    try:
        return CounterKernel(kernel)
    except ValueError:
        raise ConfigError(f"unknown counter kernel {kernel!r}") from None


def kernel_cdf(u: Tensor, kernel: CounterKernel | str) -> Tensor:
    """CDF ``int_{-inf}^{u} K`` of the kernel on normalised ``u = x / delta`` (support [-1, 1]).

    0 below -1, 1 above 1 (zero gradient there).
    """
    kernel = _kernel(kernel)
    u = u.clamp(-1.0, 1.0)
    if kernel is CounterKernel.COSINE:  # Eq. 18 integrated
        return 0.5 * (1.0 + torch.sin((0.5 * math.pi) * u))
    if kernel is CounterKernel.LINEAR:
        return 0.5 * (u + 1.0)
    if kernel is CounterKernel.TRIANGLE:
        lo = 0.5 * (1.0 + u) ** 2
        hi = 1.0 - 0.5 * (1.0 - u) ** 2
        return torch.where(u < 0, lo, hi)
    raise AssertionError(kernel)  # pragma: no cover


def soft_pmf(t: Tensor, qmax: int, delta: float | Tensor, kernel: CounterKernel | str) -> Tensor:
    """Relaxed probability mass of the symbols ``-qmax..qmax`` of ``round(t)`` (Eq. 17-19).

    Returns a float32 tensor of shape ``[2 qmax + 1]`` summing to 1 (index ``k + qmax``
    holds symbol ``k``). ``t`` is clamped to ``[-qmax, qmax]`` first (saturating symbols,
    as :func:`l2fx.transform.fake_quant` does). Requires ``0 < delta <= 0.5``.
    Differentiable with respect to ``t``.
    """
    if isinstance(qmax, bool) or not isinstance(qmax, int) or qmax < 1:
        raise ConfigError(f"qmax must be a positive int, got {qmax!r}")
    kernel = _kernel(kernel)
    if not isinstance(delta, Tensor):
        if not 0.0 < float(delta) <= 0.5:
            raise ConfigError(f"delta must be in (0, 0.5], got {delta!r}")
    t = t.reshape(-1).to(torch.float32).clamp(-qmax, qmax)
    nbins = 2 * qmax + 1
    out = torch.zeros(nbins, dtype=torch.float32, device=t.device)
    if t.numel() == 0:
        return out + t.sum()  # all zeros, still attached to the graph
    inv_delta = 1.0 / delta
    r = torch.round(t).detach()
    # |t - r| <= 0.5 and delta <= 0.5, so F((r + 1.5 - t)/delta) = 1 and F((r - 1.5 - t)/delta) = 0:
    # two CDF evaluations give the masses of bins r - 1, r, r + 1 (and they sum to exactly 1).
    f_lo = kernel_cdf((r - 0.5 - t) * inv_delta, kernel)
    f_hi = kernel_cdf((r + 0.5 - t) * inv_delta, kernel)
    mass = torch.cat((f_lo, f_hi - f_lo, 1.0 - f_hi))
    base = r + qmax
    # Bins -qmax-1 and qmax+1 only ever receive exactly 0 (t is clamped to [-qmax, qmax]);
    # clamping their index keeps index_add in range without changing the sums.
    idx = torch.cat((base - 1, base, base + 1)).clamp(0, nbins - 1).to(torch.long)
    out = out.index_add(0, idx, mass)
    return out / t.numel()


def _delta(t: Tensor, qmax: int, resolution: int) -> float:
    with torch.no_grad():
        lo, hi = torch.aminmax(t)
        # Range of t clamped to [-qmax, qmax] (clamp is monotone, so clamp the extremes only).
        span = min(float(hi), qmax) - max(float(lo), -qmax)
    return max(_MIN_DELTA, min(0.5, span / resolution))


def _sample_without_replacement(n: int, k: int, generator: torch.Generator | None, device) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(n)`` (``k < n``).

    ``torch.randperm(n)`` costs 0.9 s for n = 11.7M on the 2-core CPU; this costs < 2 ms.
    Draw i.i.d. indices until at least ``k`` are distinct, then keep a uniform ``k``-subset
    of the distinct ones. By symmetry over index labels the distinct set is a uniform subset
    of its size, so the result is a uniform ``k``-subset of ``range(n)``.
    """
    dev = generator.device if generator is not None else device
    # Expected i.i.d. draws to see k distinct values: -n ln(1 - k/n); 10% + 64 headroom.
    m = int(math.ceil(-n * math.log1p(-k / n) * 1.1)) + 64
    # int32 indices: torch.unique (a sort) on int32 is 4x faster than on int64 on CPU.
    dtype = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
    idx = torch.unique(torch.randint(0, n, (m,), generator=generator, device=dev, dtype=dtype))
    while idx.numel() < k:  # rare: only when the headroom was not enough
        more = torch.randint(0, n, (m,), generator=generator, device=dev, dtype=dtype)
        idx = torch.unique(torch.cat((idx, more)))
    keep = torch.randperm(idx.numel(), generator=generator, device=dev)[:k]
    return idx[keep].to(torch.long)


def estimate_bits(
    t: Tensor, qmax: int, config: CounterConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Differentiable estimate of the entropy-coded size of ``round(t)`` in bits.

    ``numel(t) * H(soft_pmf(t))`` (Eq. 9 with Eq. 14-19); when ``numel(t)`` exceeds
    ``config.max_samples`` the pmf is estimated from that many elements drawn uniformly
    without replacement (``generator`` makes the draw reproducible). Returns a float32
    scalar, differentiable with respect to ``t``.
    """
    if not isinstance(config, CounterConfig):
        raise ConfigError(f"config must be a CounterConfig, got {type(config).__name__}")
    flat = t.reshape(-1)
    n = flat.numel()
    if n == 0:
        return flat.to(torch.float32).sum()
    if n > config.max_samples:
        idx = _sample_without_replacement(n, config.max_samples, generator, flat.device)
        flat = flat[idx.to(flat.device)]
    delta = _delta(t, qmax, config.resolution)
    p = soft_pmf(flat, qmax, delta, config.kernel)
    h = -(p * torch.log2(p.clamp(min=_P_FLOOR))).sum()
    return n * h


def empirical_bits(q: Tensor) -> float:
    """Exact ``numel(q) * H(empirical distribution of q)`` in bits (Shannon bound, Eq. 14-16)."""
    if q.is_floating_point() or q.is_complex():
        raise ConfigError(f"empirical_bits expects an integer tensor, got dtype {q.dtype}")
    n = q.numel()
    if n == 0:
        return 0.0
    _, counts = torch.unique(q.reshape(-1), return_counts=True)
    p = counts.to(torch.float64) / n
    return float(-(p * torch.log2(p)).sum() * n)
