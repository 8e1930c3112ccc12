"""Times the differentiable counter (l2fx/counter.py's module docstring quotes these figures).

    python bench/counter.py
"""
from __future__ import annotations

import math
import time

import torch

from l2fx.counter import CounterConfig, estimate_bits
from l2fx.transform import TransformKind, forward_t


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def best_ms(fn) -> float:
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    print(f"{'n':>9} {'max_samples':>11} {'counter ms':>10} {'T+counter ms':>12} {'bits/w':>7}")
    for n, cfg in ((1_000_000, CounterConfig()), (11_700_000, CounterConfig()),
                   (1_000_000, CounterConfig(max_samples=1 << 24))):
        w = torch.distributions.Laplace(0.0, 0.02).sample((n,)).requires_grad_()
        s = torch.tensor(0.01, requires_grad=True)
        e = torch.tensor(0.005)
        t_leaf = (w.detach() / s.detach()).requires_grad_()
        only = best_ms(lambda: estimate_bits(t_leaf, 15, cfg, gen).backward())
        full = best_ms(lambda: estimate_bits(forward_t(w, TransformKind.LINEAR, s, e), 15, cfg, gen).backward())
        bits = float(estimate_bits(t_leaf, 15, cfg, gen).detach())
        print(f"{n:>9} {cfg.max_samples:>11} {only:>10.1f} {full:>12.1f} {bits / n:>7.3f}")


if __name__ == "__main__":
    main()
