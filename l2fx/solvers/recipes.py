"""Recipes: one layer compressed by a named one-shot method, on a given grid, from (W, H).

Each recipe takes the layer's weight ``W [rows, cols]``, its Hessian ``H [cols, cols]``, the
:class:`~l2fx.solvers.Grid` the layer's symbols must lie on, the method's options, and returns a
:class:`~l2fx.solvers.SolverResult` whose ``w_hat`` lies on the grid (``extra["grid"]`` when the
recipe learnt other steps, as AdaQuant does). Options (defaults in :data:`DEFAULTS`):

===================  ====================================================================
recipe               what, options
===================  ====================================================================
``rtn``              round to nearest on the grid (no calibration; the fallback)
``gptq``             GPTQ (``blocksize``, ``percdamp``, ``act_order``)
``sparsegpt``        SparseGPT pruning, jointly with quantisation on the grid
                     (``sparsity`` or ``prune_n``/``prune_m``, ``blocksize``, ``percdamp``)
``wanda``            Wanda mask (|w| ||x||, per row or N:M), then RTN of the pruned weight (S->Q)
``magnitude``        magnitude mask per layer, then RTN (S->Q)
``obq``              exact greedy OBQ (OBC), for layers under ``max_cost``
``obc``              exact OBS pruning (unstructured, N:M, ``block`` 4), then OBQ of the kept
                     weights: the pruned ones are exact zeros (grid level 0, error 0), which
                     greedy OBQ takes first with no update, so it quantises the kept subset;
                     the mask is re-applied at the end in case an out-of-range first step
                     moved a zero
``adaround``         AdaRound (``iters``, ``lr``, ``reg_lambda``)
``adaquant``         AdaQuant: weights and steps through the STE (``iters``)
``adaprune``         AdaPrune: magnitude mask, exact refit of the kept weights, then RTN
``adaprune+adaquant``  the OBC paper's AdaPrune+AdaQuant baseline: AdaPrune, then AdaQuant of
                     the kept weights, the mask re-applied (pruned weights stay symbol 0)
``obc-compound``     per layer as its options say (compound methods): ``obq`` when they ask
                     no pruning (``sparsity`` 0 and no N:M), else ``obc`` with that pattern
``adaprune+adaquant-compound``  the same for the baseline: ``adaquant`` dense, else
                     ``adaprune+adaquant`` with the pattern, its refit on ``H`` damped by
                     ``percdamp`` like OBC's
===================  ====================================================================

Sparsity options: ``sparsity`` (fraction pruned, default 0 = none for the quantisers, 0.5 for
the pruners), ``prune_n``/``prune_m`` (N kept of every M consecutive columns), ``block`` (1, or
4: ``sparsity`` of the layer's 4-blocks of consecutive columns pruned; ``obc``, ``adaprune``,
``adaprune+adaquant``, ``magnitude`` and the compound recipes; the others raise a ConfigError).

``nm_unfit``: what a layer whose columns ``prune_m`` does not divide gets: ``"error"`` (the
default: a SolverError naming it) or ``"dense"`` (:data:`DENSE_RECIPE`: the recipe's quantiser
without pruning, recorded as the layer's fallback; 2:4 hardware leaves such layers dense too).

``bop_reduction``, ``bop_resolution``, ``bop_options`` (the option names offered to every layer,
default {dense, 2:4} x {8, 4}; :meth:`l2fx.solvers.compound.Option.parse`) and ``bop_formats``
(block formats offered as dense options beside them) are no recipe's: the compound methods' planning pass
(``compound_plan``) reads them from the same options (``CompileConfig.method_options``), which
is why they are known here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from l2fx.errors import ConfigError
from l2fx.solvers.ada import adaprune, adaquant, adaround
from l2fx.solvers.gptq import gptq
from l2fx.solvers.grid import Grid
from l2fx.solvers.hessian import layer_loss
from l2fx.solvers.obc import DEFAULT_MAX_COST, obq_quantize, obs_prune
from l2fx.solvers.result import SolverResult
from l2fx.solvers.sparsegpt import sparsegpt
from l2fx.solvers.wanda import magnitude_mask, wanda_mask

__all__ = ["RECIPES", "DEFAULTS", "DENSE_RECIPE", "dense_fallback", "solve", "options_for"]

DEFAULTS: dict[str, Any] = {
    "blocksize": 128, "percdamp": 0.01, "act_order": False, "sparsity": 0.0, "prune_n": 0, "prune_m": 0,
    "block": 1, "max_cost": DEFAULT_MAX_COST, "iters": 0, "lr": 1e-3, "reg_lambda": 0.01,
    "bop_reduction": 0.0, "bop_resolution": 10000, "bop_formats": (), "bop_options": (),
    "nm_unfit": "error",
}

#: What ``nm_unfit="dense"`` runs on a layer whose columns N:M does not divide (a conv stem's 27,
#: a depthwise 3x3's 9): each pruning recipe's own quantiser, without the pruning.
DENSE_RECIPE: dict[str, str] = {
    "sparsegpt": "gptq", "wanda": "rtn", "magnitude": "rtn", "obc": "obq", "adaprune": "rtn",
    "adaprune+adaquant": "adaquant", "obc-compound": "obq", "adaprune+adaquant-compound": "adaquant",
}


def dense_fallback(recipe: str, options: Mapping[str, Any], cols: int) -> tuple[str, str] | None:
    """``(recipe, reason)`` to run instead when ``options`` ask N:M that ``cols`` columns do not
    take and ``nm_unfit`` is ``"dense"``; None when the pattern fits, or nothing asks for it (the
    recipe then raises its SolverError, naming the layer)."""
    n, m = options["prune_n"], options["prune_m"]
    if not m or cols % m == 0 or options["nm_unfit"] != "dense" or recipe not in DENSE_RECIPE:
        return None
    dense = DENSE_RECIPE[recipe]
    return dense, f"N:M {n}:{m} does not divide its {cols} columns: left dense ({dense}; nm_unfit='dense')"


def _rtn(W: Tensor, grid: Grid, W0: Tensor, H: Tensor) -> SolverResult:
    w_hat, q = grid.quantize_all(W)
    return SolverResult(w_hat=w_hat, symbols=q, mask=None, loss=layer_loss(W0, w_hat, H))


def _pattern(o: Mapping[str, Any]) -> dict[str, Any]:
    if o["prune_m"]:
        return {"prune_n": o["prune_n"], "prune_m": o["prune_m"]}
    return {"sparsity": o["sparsity"]}


def _blocked(o: Mapping[str, Any], layer: str) -> dict[str, Any]:
    """``{"block": 4}`` when the options ask 4-blocks (with ``sparsity``), else ``{}``."""
    block = o["block"]
    if isinstance(block, bool) or block not in (1, 4):
        raise ConfigError(f"layer {layer!r}: option block must be 1 or 4, got {block!r}")
    if block == 1:
        return {}
    if o["prune_m"]:
        raise ConfigError(f"layer {layer!r}: block=4 prunes 4-blocks at a sparsity; it does not combine with "
                          f"N:M ({o['prune_n']}:{o['prune_m']})")
    return {"block": block}


def _single_weights(o: Mapping[str, Any], recipe: str, layer: str) -> None:
    if o["block"] != 1:
        raise ConfigError(f"layer {layer!r}: recipe {recipe!r} prunes single weights; option block={o['block']!r} "
                          f"works with obc, magnitude, adaprune and adaprune+adaquant")


def _masked_rtn(W: Tensor, H: Tensor, grid: Grid, mask: Tensor) -> SolverResult:
    res = _rtn(W * mask, grid, W, H)
    return SolverResult(res.w_hat, res.symbols, mask, res.loss)


def _with_mask(res: SolverResult, W: Tensor, H: Tensor, grid: Grid, mask: Tensor) -> SolverResult:
    """``res`` with the mask re-applied (zeros are grid level 0), symbols and loss recomputed."""
    w_hat = res.w_hat * mask
    _, q = grid.quantize_all(w_hat)
    return SolverResult(grid.decode(q), q, mask, layer_loss(W, grid.decode(q), H), res.extra)


def _gptq(W, H, grid, o, layer):
    return gptq(W, H, grid, blocksize=o["blocksize"], percdamp=o["percdamp"], act_order=o["act_order"], layer=layer)


def _sparsegpt(W, H, grid, o, layer):
    _single_weights(o, "sparsegpt", layer)
    pat = _pattern(o) if (o["prune_m"] or o["sparsity"]) else {"sparsity": 0.5}
    bs = o["blocksize"] - o["blocksize"] % o["prune_m"] if o["prune_m"] else o["blocksize"]
    return sparsegpt(W, H, grid=grid, blocksize=bs, percdamp=o["percdamp"], layer=layer, **pat)


def _wanda(W, H, grid, o, layer):
    _single_weights(o, "wanda", layer)
    pat = _pattern(o) if (o["prune_m"] or o["sparsity"]) else {"sparsity": 0.5}
    mask = wanda_mask(W, torch.diagonal(H).float(), layer=layer, **pat)
    return _masked_rtn(W, H, grid, mask)


def _magnitude(W, H, grid, o, layer):
    pat = _pattern(o) if (o["prune_m"] or o["sparsity"]) else {"sparsity": 0.5}
    return _masked_rtn(W, H, grid, magnitude_mask(W, layer=layer, **pat, **_blocked(o, layer)))


def _obq(W, H, grid, o, layer):
    return obq_quantize(W, H, grid, percdamp=o["percdamp"], max_cost=o["max_cost"], layer=layer)


def _obc(W, H, grid, o, layer):
    pat = _pattern(o) if (o["prune_m"] or o["sparsity"]) else {"sparsity": 0.5}
    _blocked(o, layer)
    pruned = obs_prune(W, H, block=o["block"], percdamp=o["percdamp"], max_cost=o["max_cost"], layer=layer, **pat)
    res = obq_quantize(pruned.w_hat, H, grid, percdamp=o["percdamp"], max_cost=o["max_cost"], layer=layer)
    return _with_mask(res, W, H, grid, pruned.mask)


def _adaround(W, H, grid, o, layer):
    return adaround(W, H, grid, iters=o["iters"] or 2000, lr=o["lr"], reg_lambda=o["reg_lambda"], layer=layer)


def _adaquant(W, H, grid, o, layer):
    return adaquant(W, H, grid, iters=o["iters"] or 100, layer=layer)


def _adaprune(W, H, grid, o, layer):
    pat = _pattern(o) if (o["prune_m"] or o["sparsity"]) else {"sparsity": 0.5}
    pruned = adaprune(W, H, layer=layer, **pat, **_blocked(o, layer))
    return _masked_rtn(pruned.w_hat, H, grid, pruned.mask)


def _adaprune_adaquant(W, H, grid, o, layer, percdamp: float = 0.0):
    pat = _pattern(o) if (o["prune_m"] or o["sparsity"]) else {"sparsity": 0.5}
    pruned = adaprune(W, H, layer=layer, percdamp=percdamp, **pat, **_blocked(o, layer))
    res = adaquant(pruned.w_hat, H, grid, iters=o["iters"] or 100, layer=layer)
    learnt = res.extra.get("grid", grid)
    out = _with_mask(res, W, H, learnt, pruned.mask)
    return SolverResult(out.w_hat, out.symbols, out.mask, out.loss, {**out.extra, "grid": learnt})


def _pruning(o: Mapping[str, Any]) -> bool:
    return bool(o["prune_m"] or o["sparsity"])


def _obc_compound(W, H, grid, o, layer):
    return _obc(W, H, grid, o, layer) if _pruning(o) else _obq(W, H, grid, o, layer)


def _ada_compound(W, H, grid, o, layer):
    # AdaPrune's refit on H damped by ``percdamp`` as OBC's is (the same H for both solvers):
    # undamped, a dead input (a ReLU channel never on in the calibration set) leaves H_SS
    # singular (measured: the tests' TinyConvNet fc).
    if _pruning(o):
        return _adaprune_adaquant(W, H, grid, o, layer, percdamp=o["percdamp"])
    return _adaquant(W, H, grid, o, layer)


RECIPES: dict[str, Callable[[Tensor, Tensor, Grid, Mapping[str, Any], str], SolverResult]] = {
    "rtn": lambda W, H, grid, o, layer: _rtn(W, grid, W, H),
    "gptq": _gptq,
    "sparsegpt": _sparsegpt,
    "wanda": _wanda,
    "magnitude": _magnitude,
    "obq": _obq,
    "obc": _obc,
    "adaround": _adaround,
    "adaquant": _adaquant,
    "adaprune": _adaprune,
    "adaprune+adaquant": _adaprune_adaquant,
    "obc-compound": _obc_compound,
    "adaprune+adaquant-compound": _ada_compound,
}


def options_for(*layers: Mapping[str, Any] | tuple) -> dict[str, Any]:
    """The defaults overridden in order by each mapping or tuple of (name, value) pairs;
    an unknown option is a ConfigError naming it."""
    out = dict(DEFAULTS)
    for given in layers:
        for key, value in (given.items() if isinstance(given, Mapping) else given):
            if key not in DEFAULTS:
                raise ConfigError(f"unknown one-shot option {key!r}; known: {sorted(DEFAULTS)}")
            if key == "nm_unfit" and value not in ("error", "dense"):
                raise ConfigError(f"one-shot option nm_unfit must be 'error' or 'dense', got {value!r}")
            out[key] = value
    return out


def solve(recipe: str, W: Tensor, H: Tensor, grid: Grid, options: Mapping[str, Any], layer: str = "?") -> SolverResult:
    """Compresses one layer by ``recipe`` (see the table above)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown one-shot recipe {recipe!r}; known: {sorted(RECIPES)}")
    return RECIPES[recipe](W, H, grid, options, layer)
