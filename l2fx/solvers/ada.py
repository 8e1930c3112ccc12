"""The OBC paper's layer-wise baselines: AdaRound, AdaQuant and AdaPrune, all on ``H`` alone.

Each optimises the layer loss ``tr(dW H dW^T)`` (:func:`l2fx.solvers.hessian.layer_loss`)
instead of the output error on stored activations: ``E_x ||dW x||^2 = tr(dW H dW^T) / 2`` for
``H = 2 E[x x^T]``, so full-batch steps on ``H`` are the reference methods' steps with the whole
calibration set as the batch (no sampling noise).

* :func:`adaround` (Nagel et al., ICML 2020): every weight is rounded down or up in symbol space,
  ``w~ = T^-1(clamp(floor(T(w)) + h(V), qmin, qmax))`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``
  (Eq. 23), minimising ``E||dW x||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)`` (Eq. 24-25) with
  ``beta`` annealed from 20 to 2 after a warm-up of 20% of the iterations without the regulariser
  (the schedule of the authors' and BRECQ's implementation). Defaults from the paper: 10,000
  Adam iterations, lr 1e-3, ``lambda = 0.01``. ``V`` is initialised so that ``h(V)`` is the
  fractional part of ``T(w)``, and the result is ``floor + (V >= 0)``. As in the paper (and
  AIMET / BRECQ, whose reconstruction term is the same per-sample sum over output channels),
  ``lambda`` is absolute, so its strength depends on the layer's scale: with trained-network
  weights (std ~0.01-0.1) 0.01 drives ``h`` to 0/1; with unit-scale weights the loss is ~10^3
  times larger and ``h`` can stay fractional, so that the hard rounding is barely better than
  RTN (measured: 8x24 layer, std-1 weights, 1000 iterations: 0.98 x RTN's loss with
  ``lambda = 0.01``, 0.66 x with ``lambda = 1``; GPTQ 0.69 x).
* :func:`adaquant` (Hubara et al., ICML 2021): the weights ``V`` and the steps ``s`` are learnt
  through the straight-through estimator of the fake quantiser ``T^-1(round_ste(T(V)))`` against
  the layer loss. Defaults from the authors' code (CalibTIP ``adaquant``): Adam, 100
  iterations, weight lr ``1e-2 * std(W)`` (their ``lr_w = 1e-5`` is that factor on a typical
  weight std; the comment in their code says so) and a relative step lr ``1e-2`` (their
  ``lr_qpw = 1e-3`` on the range, also written there as ``1e-2 * range``). The steps are learnt
  as ``s = s0 * r``, with the grid's ``e / s`` kept. The STE steps are noisy (measured: the
  last iterate was up to 1.3x RTN's loss on some 8x24 layers), so the best iterate seen is
  returned; the first one is RTN, so AdaQuant never loses to it.
* :func:`adaprune` (Hubara et al., NeurIPS 2021, "AdaPrune"): given a mask (by default magnitude
  pruning), the kept weights are re-optimised against the layer loss. The reference runs SGD on
  the kept weights; the objective restricted to them is a convex quadratic whose unique
  minimiser (for ``H_SS`` positive definite) solves ``H_SS w_S = (H w)_S`` per row, which is what
  that SGD converges to. It is solved exactly here (:func:`refit_masked`), ``O(rows *
  min(kept, pruned)^3 / 3)`` flops in float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from l2fx.errors import ConfigError
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import check_layer, layer_loss, refit_masked
from l2fx.solvers.result import SolverResult
from l2fx.solvers.wanda import magnitude_mask
from l2fx.transform import forward_t, inverse_t, round_ste

__all__ = ["adaround", "adaquant", "adaprune"]

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch (Nagel et al. Eq. 23)


def _check_iters(iters: int, layer: str) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"layer {layer!r}: iters must be an int >= 0, got {iters!r}")


def _check_grid(grid, rows: int, cols: int, layer: str) -> None:
    if not isinstance(grid, Grid):
        raise ConfigError(f"layer {layer!r}: grid must be a Grid, got {type(grid).__name__}")
    grid.check(rows, cols, layer)


def _rect_sigmoid(V: Tensor) -> Tensor:
    return (torch.sigmoid(V) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def adaround(W: Tensor, H: Tensor, grid: Grid, *, iters: int = 10000, lr: float = 1e-3, reg_lambda: float = 0.01,
             beta_start: float = 20.0, beta_end: float = 2.0, warmup: float = 0.2, layer: str = "?") -> SolverResult:
    """AdaRound on ``grid`` (see the module docstring). Returns ``symbols``, ``w_hat`` and the loss;
    ``extra["soft_loss"]``: the relaxed layer loss at the last iteration."""
    rows, cols = check_layer(W, H, layer)
    _check_grid(grid, rows, cols, layer)
    _check_iters(iters, layer)
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"layer {layer!r}: warmup must be in [0, 1), got {warmup!r}")
    s, e = grid.expand(cols)
    lo, hi = (b.to(torch.float32) for b in grid.bounds(cols))
    W32 = W.detach().to(torch.float32)
    Hf = H.detach().to(torch.float32)
    with torch.no_grad():
        t0 = forward_t(W32, grid.kind, s, e)
        base = torch.floor(t0)
        frac = ((t0 - base - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        V0 = torch.log(frac / (1 - frac))  # h(V0) = frac(T(w))
    V = V0.clone().requires_grad_(True)
    opt = torch.optim.Adam([V], lr=lr)
    start = int(warmup * iters)
    soft_loss = math.nan
    for it in range(iters):
        h = _rect_sigmoid(V)
        w_soft = inverse_t(torch.minimum(torch.maximum(base + h, lo), hi), grid.kind, s, e)
        dW = W32 - w_soft
        rec = 0.5 * ((dW @ Hf) * dW).sum()  # E_x ||dW x||^2
        loss = rec
        if it >= start:
            rel = (it - start) / max(1, iters - start)
            beta = beta_end + (beta_start - beta_end) * max(0.0, 1.0 - rel)
            loss = rec + reg_lambda * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        soft_loss = 2.0 * float(rec.detach())
    with torch.no_grad():
        q = torch.minimum(torch.maximum(base + (V >= 0).to(torch.float32), lo), hi)
        symbols = q.to(torch.int16)
        w_hat = grid.decode(symbols)
    return SolverResult(w_hat=w_hat, symbols=symbols, mask=None, loss=layer_loss(W, w_hat, H),
                        extra={"soft_loss": soft_loss})


def adaquant(W: Tensor, H: Tensor, grid: Grid, *, iters: int = 100, lr_w: float = 1e-2, lr_s: float = 1e-2,
             layer: str = "?") -> SolverResult:
    """AdaQuant on ``grid`` (see the module docstring). ``lr_w`` is relative to ``std(W)``,
    ``lr_s`` to the steps. Returns the best iterate's ``symbols``, ``w_hat`` and the loss; ``extra["grid"]`` is the
    grid with the learnt steps (``w_hat == extra["grid"].decode(symbols)``)."""
    rows, cols = check_layer(W, H, layer)
    _check_grid(grid, rows, cols, layer)
    _check_iters(iters, layer)
    W32 = W.detach().to(torch.float32)
    Hf = H.detach().to(torch.float32)
    s0, e0 = grid.step_s, grid.threshold_e
    lo, hi = (b.to(torch.float32) for b in grid.bounds(cols))
    V = W32.clone().requires_grad_(True)
    r = torch.ones_like(s0).requires_grad_(True)
    std = float(W32.std()) if W32.numel() > 1 else 1.0
    opt = torch.optim.Adam([{"params": [V], "lr": lr_w * (std if std > 0 else 1.0)},
                            {"params": [r], "lr": lr_s}])
    gi = None if grid.group_size is None else torch.div(torch.arange(cols), grid.group_size, rounding_mode="floor")

    def per_weight(p: Tensor) -> Tensor:
        return p[:, None].expand(rows, cols) if gi is None else p[:, gi]

    best = (math.inf, V.detach().clone(), r.detach().clone())
    for it in range(iters + 1):
        rr = r.clamp(min=1e-3)
        s, e = per_weight(s0 * rr), per_weight(e0 * rr)
        t = round_ste(forward_t(V, grid.kind, s, e))
        w_q = inverse_t(torch.minimum(torch.maximum(t, lo), hi), grid.kind, s, e)
        dW = W32 - w_q
        loss = ((dW @ Hf) * dW).sum()
        if float(loss.detach()) < best[0]:  # the loss of the current hard weights
            best = (float(loss.detach()), V.detach().clone(), r.detach().clone())
        if it == iters:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, Vb, rb = best
        rr = rb.clamp(min=1e-3)
        ge = grid.replace(step_s=s0 * rr, threshold_e=e0 * rr)
        w_hat, symbols = ge.quantize_all(Vb)
    return SolverResult(w_hat=w_hat, symbols=symbols, mask=None, loss=layer_loss(W, w_hat, H),
                        extra={"grid": ge})


@torch.no_grad()
def adaprune(W: Tensor, H: Tensor, mask: Tensor | None = None, *, sparsity: float = 0.5, prune_n: int = 0,
             prune_m: int = 0, block: int = 1, percdamp: float = 0.0, layer: str = "?") -> SolverResult:
    """AdaPrune in closed form (see the module docstring). ``mask`` (True = kept) defaults to
    per-layer magnitude pruning at ``sparsity`` (of single weights, or of 4-blocks of consecutive
    columns with ``block=4``) or N:M. ``percdamp`` (default 0: the exact optimum SGD converges
    to) damps ``H`` when ``H_SS`` is singular."""
    check_layer(W, H, layer)
    if mask is None:
        mask = magnitude_mask(W, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, block=block, layer=layer)
    w_hat = refit_masked(W, H, mask, percdamp=percdamp, layer=layer).to(torch.float32)
    return SolverResult(w_hat=w_hat, symbols=None, mask=mask.clone(), loss=layer_loss(W, w_hat, H))
