"""Training-aware SMOL (seed 004's own setting): precisions and weights trained on the task loss,
then the weights fine-tuned at the fixed precisions, then coded into the same artifact as
post-training SMOL.

    compiled = l2fx.smol.train(model, train_batches, target_cr=12)     # batches of (x, y)
    l2fx.save(compiled, "model.l2fx")

Two phases, as the seed splits its budget (Appendix D.2: about half each):

1. **Precision training** (``epochs``): every compressed weight ``w`` gets a precision logit
   ``s`` (one per parameter, or one per layer with ``per_layer``: SMOL-L), and Adam minimises
   ``loss_fn(model(x; w + sigmoid(s) 2^(P-1) u eps), y) + lam * mean(p - 1)`` over the user's
   batches, ``eps ~ U(-1, 1)`` drawn per weight and step (Eq. 11-12: ``sigmoid(s) = 2^(1-p)``,
   the noise half a cell of the precision-p grid of unit ``u`` over the range
   ``[-max|w|, max|w|]`` of each cell of the weight's layout (per output channel by default, as
   ``bit_value_grid`` lays it), fixed at the start; ``p = 1 + log2(1 + e^-s)``). The penalty is the
   mean over all compressed weights (one lambda for any model size), against the task loss.
   The seed fixes lambda and reads off the bpp it gives; here the bytes are the target, so
   lambda follows the budget (``lam_rate``): every ``probe_every`` steps the bits per weight of
   the weights rounded at ``round(p)`` are estimated (each layer's order-0 entropy of its
   symbols: what its range-coder table spends, the precision map included since the map is a
   function of the symbols) and ``log lambda`` moves by ``lam_rate * (estimate - 32 /
   target_cr)``, a dual ascent that brings the rounded model to the target's bits while the task
   loss decides where the bits go; the rounding's offset then only closes what the estimate
   misses. Without it (``lam_rate=0``) the offset has to close the whole gap at once: measured
   on the Fashion-MNIST CNN at CR 12 (1 + 1 epochs, lambda 0.01), offset +2.49, 41 % of the
   weights pruned, accuracy 0.867; a dual ascent on the mean *precision* instead of the
   estimated bits still left an offset of +1.24 (the map's own bits are not in the mean).
2. **Fine-tuning** (``finetune_epochs``): the precisions are rounded once, exactly as the
   artifact will round them (``given_precision`` + ``smol_round``: one per-model offset and
   range factor so the counted bytes meet ``target_cr``), and the weights are trained under
   that quantisation with the straight-through estimator (the seed's "fine-tuning while
   applying quantization"). Where the fine-tuning moved the bytes out of the window, the
   precisions are rounded again on the fine-tuned weights and a quarter as many steps follow at
   that rounding (at most twice; ``records["smol_train"]["reroundings"]``).

The artifact is then compiled with that rounding (``smol_round``'s ``fixed``): its weights are
the fine-tuned model's quantised weights bit for bit when the bytes are still within the
tolerance window, which ``records["smol_train"]["artifact_is_finetuned"]`` states; if the
fine-tuning moved the bytes out of it, the rounding is searched again (recorded).

What is trained: the compressed weights (the same ones ``l2fx.compile`` picks: ``min_numel``,
``layers`` rules) and, in both phases, the model's other floating-point parameters (biases,
norms) by plain Adam at ``lr_other``. The model runs in eval mode throughout: BatchNorm keeps
its running statistics and is **not folded** (``fold_batchnorm=False``), so the precisions are
learned on the very weights the artifact stores, and the file loads into the user's own class
(``l2fx.load``, ``l2fx.load_into``). The caller's model is not modified.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from l2fx.api import CompiledModel, compile as _compile
from l2fx.config import CompileConfig
from l2fx.errors import CalibrationError, ConfigError, L2fxError, TargetCRError
from l2fx.frontend import capture
from l2fx.ir import get_meta, weight_sites
from l2fx.method import front_pipeline
from l2fx.passes import BitValueGrid, GivenPrecision, LowerKernels, RangeCode, SmolRound
from l2fx.pipeline import PassContext, PassManager
from l2fx.precision import (MAX_PRECISION, PrecisionMap, entropy_bits, grid_unit, precision_of_s, quantize_at,
                            s_of_precision)
from l2fx.tparams import cell_amax

__all__ = ["SmolTrainConfig", "train", "smol_train_pipeline"]


@dataclasses.dataclass(frozen=True)
class SmolTrainConfig:
    """Options of :func:`train`. ``lam``: lambda per bit of mean precision, against the task
    loss, at the start; ``lam_rate``: its dual-ascent rate toward the target's bits (0: fixed).
    ``init_precision``: p at the start (None: ``32 / target_cr + 1``). ``lr_s``: Adam's
    step on the logits; ``lr_w`` / ``lr_finetune``: on the weights, as a fraction of each layer's
    ``max|w|`` (precision training / fine-tuning); ``lr_other``: the other parameters.
    ``max_steps``: at most this many steps per phase (None: whole epochs)."""

    per_layer: bool = False
    epochs: int = 2
    finetune_epochs: int = 2
    lam: float = 0.1
    lam_rate: float = 0.3
    probe_every: int = 10
    init_precision: float | None = None
    lr_s: float = 0.05
    lr_w: float = 1e-4
    lr_finetune: float = 1e-4
    lr_other: float = 1e-4
    max_precision: int = MAX_PRECISION
    seed: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"SmolTrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check("per_layer", isinstance(self.per_layer, bool), "a bool")
        check("epochs", is_int(self.epochs) and self.epochs >= 0, "an int >= 0")
        check("finetune_epochs", is_int(self.finetune_epochs) and self.finetune_epochs >= 0, "an int >= 0")
        for name in ("lam", "lam_rate", "lr_s", "lr_w", "lr_finetune", "lr_other"):
            check(name, is_num(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
        check("init_precision", self.init_precision is None
              or (is_num(self.init_precision) and 1.0 < self.init_precision <= self.max_precision),
              f"None or in (1, max_precision]")
        check("max_precision", is_int(self.max_precision) and 1 <= self.max_precision <= MAX_PRECISION,
              f"an int in 1..{MAX_PRECISION}")
        check("seed", is_int(self.seed), "an int")
        check("probe_every", is_int(self.probe_every) and self.probe_every >= 1, "an int >= 1")
        check("max_steps", self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1),
              "None or an int >= 1")


def smol_train_pipeline(config: CompileConfig, precisions: dict[str, tuple[torch.Tensor, float]], per_layer: bool,
                        fixed: tuple[float, float] | None = None, code: bool = True) -> PassManager:
    """The pipeline that codes precisions learned outside it: the shared front, the bit-value
    grid, ``given_precision``, ``smol_round`` (``fixed``: its offset and range factor), and with
    ``code`` the range coder and lowering."""
    pm = front_pipeline(config)
    for p in (BitValueGrid(per_layer), GivenPrecision(precisions, per_layer), SmolRound(per_layer, fixed)):
        pm.append(p)
    if code:
        pm.append(RangeCode()).append(LowerKernels())
    return pm


def _inputs(batch: Any) -> tuple[tuple, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CalibrationError(f"l2fx.smol.train: every batch must be a pair (inputs, targets), got "
                               f"{type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")
    x, y = batch
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise CalibrationError("l2fx.smol.train: a batch's inputs must be a tensor or a tuple of tensors")
    return args, y


def _steps(data: Iterable, epochs: int, max_steps: int | None):
    done = 0
    for epoch in range(epochs):
        for batch in data:
            if max_steps is not None and done >= max_steps:
                return
            yield epoch, _inputs(batch)
            done += 1


def train(model: nn.Module, data: Iterable, target_cr: float, *,
          loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, options: SmolTrainConfig | None = None,
          config: CompileConfig | None = None, log: Callable[[str], None] | None = None) -> CompiledModel:
    """Training-aware SMOL (module docstring) on ``model`` over ``data`` (re-iterable batches of
    ``(inputs, targets)``, e.g. a DataLoader; ``loss_fn(outputs, targets)``, default cross
    entropy), coded at ``target_cr`` on counted bytes. Returns the compiled model; its report's
    ``records["smol_train"]`` holds the per-epoch losses, the rounding and whether the artifact
    holds the fine-tuned weights exactly."""
    if not isinstance(model, nn.Module):
        raise L2fxError(f"l2fx.smol.train: model must be a torch.nn.Module, got {type(model).__name__}")
    opts = options or SmolTrainConfig()
    if not isinstance(opts, SmolTrainConfig):
        raise ConfigError(f"options must be a SmolTrainConfig, got {type(opts).__name__}")
    if isinstance(target_cr, bool) or not isinstance(target_cr, (int, float)) or not target_cr > 1:
        raise ConfigError(f"target_cr must be a number > 1, got {target_cr!r}")
    loss_fn = loss_fn or F.cross_entropy
    try:
        first = next(iter(data))
    except TypeError:
        raise CalibrationError(f"l2fx.smol.train: data must be an iterable of (inputs, targets) batches, "
                               f"got {type(data).__name__}") from None
    except StopIteration:
        raise CalibrationError("l2fx.smol.train: data holds no batch") from None
    x0, _ = _inputs(first)
    P = opts.max_precision
    method = "smol-l" if opts.per_layer else "smol"
    cfg = (config or CompileConfig()).replace(target_cr=float(target_cr), method=method, fold_batchnorm=False,
                                              method_options=(("max_precision", P),))
    say = log or (lambda _m: None)
    t_start = time.perf_counter()

    work = copy.deepcopy(model).eval()
    gm, _ = capture(work, x0)
    with PassContext(config=cfg, calib=[x0]):  # the compressed weights and their grids' layouts
        grids0 = front_pipeline(cfg).append(BitValueGrid(opts.per_layer))(gm).graph_module
        layouts = {site.param: grids0.get_submodule(str(node.target)) for node, site in weight_sites(grids0)}
    names = list(layouts)
    params = dict(work.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"l2fx.smol.train: compressed weights {missing[:4]} are not parameters of the "
                          f"{type(model).__name__} (training-aware SMOL trains the model's own parameters)")
    if not names:
        raise ConfigError(f"l2fx.smol.train: the {type(model).__name__} has no weight to compress")
    for p in work.parameters():
        p.requires_grad_(False)
    ws = {n: params[n] for n in names}
    others = [p for n, p in params.items() if n not in ws and p.is_floating_point()]
    for n, w in ws.items():
        if tuple(w.shape) != tuple(layouts[n].weight.shape):
            raise ConfigError(f"l2fx.smol.train: weight {n!r} is captured as {tuple(layouts[n].weight.shape)}, not "
                              f"as its parameter's {tuple(w.shape)}")
    # The grid of each weight over each cell of its layout (per output channel by default), as
    # bit_value_grid lays it: the range max|w| of the cell, fixed at the start.
    amax = {n: cell_amax(w, layouts[n].channel_axis, layouts[n].group_size) for n, w in ws.items()}
    limit = {n: layouts[n].view(amax[n]).to(w.device) for n, w in ws.items()}
    units = {n: layouts[n].view(grid_unit(amax[n], 1.0, P)).to(w.device) for n, w in ws.items()}
    # theta's unit in weights (no noise on an all-zero cell: smol_round prunes it whole)
    amp = {n: units[n] * 2.0 ** (P - 1) * (limit[n] > 0) for n in ws}
    numel = sum(w.numel() for w in ws.values())
    p0 = opts.init_precision if opts.init_precision is not None else min(32.0 / target_cr + 1.0, P - 1e-3)
    s = {n: torch.full((1,) if opts.per_layer else tuple(w.shape), float(s_of_precision(p0)), device=w.device,
                       requires_grad=True) for n, w in ws.items()}
    for w in [*ws.values(), *others]:
        w.requires_grad_(True)
    gen = torch.Generator(device=next(iter(ws.values())).device).manual_seed(opts.seed)

    def penalty() -> torch.Tensor:
        return sum((precision_of_s(s[n]) - 1.0).mean() * w.numel() for n, w in ws.items()) / numel

    def clamp() -> None:
        with torch.no_grad():
            for n, w in ws.items():
                w.clamp_(-limit[n], limit[n])

    # 1. Precision training.
    groups = [{"params": list(s.values()), "lr": opts.lr_s}]
    groups += [{"params": [w], "lr": opts.lr_w * max(float(amax[n].max()), 1e-30)} for n, w in ws.items()]
    if others:
        groups.append({"params": others, "lr": opts.lr_other})
    opt = torch.optim.Adam(groups)
    @torch.no_grad()
    def rounded_bits() -> float:
        """Bits per compressed weight of the weights rounded at round(p): per layer, the order-0
        entropy of its symbols (the range coder's table and chunk words left out)."""
        bits = 0.0
        for n, w in ws.items():
            pint = torch.round(precision_of_s(s[n])).clamp(0, P)
            bits += entropy_bits(quantize_at(w / units[n], pint, P).reshape(-1).cpu().numpy())
        return bits / numel

    phase1: dict[int, list[float]] = {}
    probes: list[tuple[int, float, float]] = []  # (step, estimated bits per weight, lambda)
    lam, target_bits = float(opts.lam), 32.0 / float(target_cr)
    step = 0
    for epoch, (args, y) in _steps(data, opts.epochs, opts.max_steps):
        noisy = {n: w + torch.sigmoid(s[n]) * amp[n] * (torch.rand(w.shape, generator=gen, device=w.device) * 2 - 1)
                 for n, w in ws.items()}
        task = loss_fn(functional_call(work, noisy, args), y)
        pen = penalty()
        loss = task + lam * pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp()
        step += 1
        if opts.lam_rate and step % opts.probe_every == 0:
            est = rounded_bits()
            lam = min(max(lam * math.exp(opts.lam_rate * (est - target_bits)), 1e-8), 1e4)
            probes.append((step, est, lam))
        phase1.setdefault(epoch, []).append(float(task.detach()))
    with torch.no_grad():
        precisions = {n: (precision_of_s(s[n].detach()).float().contiguous(), amax[n]) for n in ws}
        mean_p = float(penalty()) + 1.0
    say(f"smol.train: precision training done, mean p {mean_p:.3f} ({time.perf_counter() - t_start:.0f} s)")

    # 2. The rounding the artifact will use, then fine-tuning under it.
    def rounding(fixed: tuple[float, float] | None) -> tuple[float, float, bool, dict]:
        """``smol_round`` on the current weights: (offset, range factor, whether ``fixed`` was
        used, per weight (integer precisions, unit)). Searched inside half the tolerance window
        where the grid allows it (a small model's bytes move in steps too coarse for that: then
        the full window), so that the fine-tuning's drift of the symbols' statistics leaves the
        same rounding within the full window."""
        with torch.no_grad():
            probe_model = copy.deepcopy(work)
        for tol in ((cfg.cr_tolerance,) if fixed else (cfg.cr_tolerance / 2, cfg.cr_tolerance)):
            gm1, _ = capture(probe_model, x0)
            try:
                with PassContext(config=cfg.replace(cr_tolerance=tol), calib=[x0]) as ctx:
                    gm1 = smol_train_pipeline(cfg, precisions, opts.per_layer, fixed, code=False)(gm1).graph_module
                break
            except TargetCRError:
                if tol == cfg.cr_tolerance:
                    raise
        rec = ctx.records["smol_round"]
        grid = {}
        for node, site in weight_sites(gm1):
            m1 = gm1.get_submodule(str(node.target))
            device = ws[site.param].device
            grid[site.param] = (get_meta(node, PrecisionMap).precision.to(device), m1.view(m1.step_s.detach()).to(device))
        return float(rec["offset"]), float(rec["range_factor"]), bool(rec["fixed_used"]), grid

    offset, factor, _, grid = rounding(None)

    def quantised(n: str, w: torch.Tensor) -> torch.Tensor:
        pint, unit = grid[n]
        return quantize_at(w.detach() / unit, pint, P).float() * unit

    groups = [{"params": [w], "lr": opts.lr_finetune * max(float(amax[n].max()), 1e-30)} for n, w in ws.items()]
    if others:
        groups.append({"params": others, "lr": opts.lr_other})
    opt = torch.optim.Adam(groups)
    phase2: dict[int, list[float]] = {}

    def finetune(epochs: int, max_steps: int | None, first_epoch: int = 0) -> int:
        steps = 0
        for epoch, (args, y) in _steps(data, epochs, max_steps):
            ste = {n: w + (quantised(n, w) - w).detach() for n, w in ws.items()}
            task = loss_fn(functional_call(work, ste, args), y)
            opt.zero_grad(set_to_none=True)
            task.backward()
            opt.step()
            clamp()  # within the range the grid was laid over (its unit stays what it was)
            phase2.setdefault(first_epoch + epoch, []).append(float(task.detach()))
            steps += 1
        return steps

    done = finetune(opts.finetune_epochs, opts.max_steps)
    # Where the fine-tuning moved the bytes out of the window, round again on the fine-tuned
    # weights and fine-tune a quarter as long at that rounding (at most twice).
    reroundings = []
    for attempt in range(2 if done else 0):
        *_, used, _g = rounding((offset, factor))
        if used:
            break
        offset, factor, _, grid = rounding(None)
        reroundings.append({"offset": offset, "range_factor": factor})
        finetune(1, max(1, done // 4), first_epoch=opts.finetune_epochs + attempt)
    for p in work.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        finetuned = {n: quantised(n, w) for n, w in ws.items()}
    say(f"smol.train: fine-tuning done ({time.perf_counter() - t_start:.0f} s)")

    # 3. The artifact, with that rounding.
    compiled = _compile(work, target_cr, [x0], config=cfg,
                        pipeline=smol_train_pipeline(cfg, precisions, opts.per_layer, fixed=(offset, factor)))
    exact = _holds(compiled, finetuned)
    final = compiled.report.records["smol_round"]
    compiled.report.records["smol_train"] = {
        "options": dataclasses.asdict(opts), "target_cr": float(target_cr), "init_precision": p0,
        "precision_epochs": {e: sum(v) / len(v) for e, v in phase1.items()},
        "finetune_epochs": {e: sum(v) / len(v) for e, v in phase2.items()},
        "steps": [sum(len(v) for v in phase1.values()), sum(len(v) for v in phase2.values())],
        "mean_learned_precision": mean_p, "final_lambda": lam, "target_bits": target_bits,
        "lambda_probes": probes[-20:], "rounding": {"offset": offset, "range_factor": factor},
        "reroundings": reroundings,
        "final_rounding": {"offset": final["offset"], "range_factor": final["range_factor"],
                           "fixed_used": final["fixed_used"]},
        "artifact_is_finetuned": exact, "seconds": time.perf_counter() - t_start}
    return compiled


def _holds(compiled: CompiledModel, weights: dict[str, torch.Tensor]) -> bool:
    """Whether the compiled model's coded weights are ``weights`` exactly (by parameter name)."""
    gm = compiled.graph_module
    coded = {site.param: gm.get_submodule(str(node.target))() for node, site in weight_sites(gm)}
    return all(n in coded and torch.equal(coded[n].detach().float().cpu(), w.cpu()) for n, w in weights.items())
