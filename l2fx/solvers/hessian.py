"""The layer Hessian ``H = 2 X^T X / n`` and the linear algebra every solver shares.

A layer ``y = W x`` with calibration inputs ``x_1..x_n`` (the rows of ``X`` ``[n, cols]``) has the
reconstruction loss ``sum_i ||(W - W_hat) x_i||^2 * 2/n = tr(dW H dW^T)`` with ``dW = W - W_hat``
and ``H = 2 X^T X / n`` (GPTQ, Frantar et al. 2023, Sec. 3; OBC, Frantar & Alistarh 2022, Eq. 1).
The solvers need only ``H``, so activations stream through :class:`HessianAccumulator` and are
never held.

Columns are the layer's reduction dimension: ``in_features`` for a linear layer,
``Cin/groups * kh * kw`` for a convolution, in the order of ``weight.flatten(1)``
(:func:`layer_rows` produces inputs in that order). A grouped convolution has one Hessian per group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from l2fx import distributed
from l2fx.errors import CalibrationError, ConfigError, NonFiniteWeightError, SolverError

__all__ = [
    "HessianAccumulator",
    "layer_rows",
    "prepare_hessian",
    "inverse_cholesky",
    "layer_loss",
    "relative_layer_loss",
    "refit_masked",
    "check_layer",
]

# A float64 H of a 14336-wide layer (a Llama-3-8B down_proj input) is 14336^2 * 8 B = 1.6 GB per
# layer, twice the float32 one; up to 8192 columns (537 MB in float64) the accuracy of float64 is
# worth the memory: in float32 the running average loses ~1e-7 relative per batch, which the
# Cholesky of a badly conditioned H (cond 1e6-1e8 is common for LLM inputs) amplifies.
_FLOAT64_MAX_COLS = 8192

_FAMILIES = ("linear", "conv1d", "conv2d")


def check_layer(W: Tensor, H: Tensor, layer: str) -> tuple[int, int]:
    """Validate a solver's ``(W, H)``; return ``(rows, cols)``. Errors name ``layer``."""
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point():
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ConfigError(f"layer {layer!r}: W must be a 2-D float tensor [rows, cols], got {shape}")
    rows, cols = W.shape
    if rows == 0 or cols == 0:
        raise ConfigError(f"layer {layer!r}: W is empty ({rows}x{cols})")
    if not isinstance(H, Tensor) or H.shape != (cols, cols) or not H.is_floating_point():
        shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise ConfigError(f"layer {layer!r}: H must be a float tensor [{cols}, {cols}] (cols of W), got {shape}")
    if not bool(torch.isfinite(W).all()):
        raise NonFiniteWeightError(f"layer {layer!r}: W holds NaN or inf")
    if not bool(torch.isfinite(H).all()):
        raise ConfigError(f"layer {layer!r}: H holds NaN or inf (calibration inputs overflowed?)")
    return rows, cols


class HessianAccumulator:
    """Running ``H = 2/N sum_i x_i x_i^T`` over all ``N`` input rows seen (GPTQ's ``add_batch``).

    Each :meth:`add` first rescales ``H`` by ``N_old / N_new`` and then adds
    ``(sqrt(2/N_new) X)^T (sqrt(2/N_new) X)``, so ``H`` stays an average of O(1) size whatever
    ``N`` grows to (no large sum that loses the small terms). Unlike GPTQ's ``add_batch``, which
    counts ``inp.shape[0]`` (sequences, not tokens, for a 3-D input), ``N`` counts rows, so ``H``
    is exactly ``2 X^T X / N`` (only a scale; every solver here is invariant to it).

    ``groups``: None for one Hessian ``[cols, cols]`` (``add`` takes ``[n, cols]``), or the
    number of conv groups: then ``H`` is ``[groups, cols, cols]`` and ``add`` takes
    ``[groups, n, cols]`` (what :func:`layer_rows` returns for a convolution).

    ``dtype`` defaults to float64 when ``cols <= 8192``, else float32 (memory: see above).
    """

    def __init__(self, cols: int, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 groups: int | None = None):
        if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
            raise ConfigError(f"cols must be a positive int, got {cols!r}")
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
            raise ConfigError(f"groups must be None or a positive int, got {groups!r}")
        if dtype is None:
            dtype = torch.float64 if cols <= _FLOAT64_MAX_COLS else torch.float32
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"HessianAccumulator dtype must be float32 or float64, got {dtype}")
        self.cols, self.groups, self.dtype = cols, groups, dtype
        shape = (cols, cols) if groups is None else (groups, cols, cols)
        self._H = torch.zeros(shape, dtype=dtype, device=device)
        self._n = 0
        self._reduced = False

    @property
    def nsamples(self) -> int:
        """Number of input rows seen so far."""
        return self._n

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        """Fold a batch of input rows ``[n, cols]`` (or ``[groups, n, cols]``) into ``H``."""
        want = (self.cols,) if self.groups is None else (self.groups, self.cols)
        if not isinstance(rows, Tensor) or rows.dim() != len(want) + 1 or \
                tuple(rows.shape[:-2]) + (rows.shape[-1],) != want:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            lead = "" if self.groups is None else f"{self.groups}, "
            raise ConfigError(f"HessianAccumulator.add expects rows [{lead}n, {self.cols}], got {got}")
        if self._reduced:
            raise CalibrationError("HessianAccumulator.add: the Hessian was already all-reduced across the "
                                   "torch.distributed ranks; rows cannot be added after hessian()")
        n = rows.shape[-2]
        if n == 0:
            return
        x = rows.to(device=self._H.device, dtype=self.dtype)
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError("HessianAccumulator.add: input rows hold NaN or inf")
        total = self._n + n
        self._H.mul_(self._n / total)
        x = x * math.sqrt(2.0 / total)
        self._H.add_(x.transpose(-1, -2) @ x)
        self._n = total

    def hessian(self) -> Tensor:
        """A copy of ``H`` (``[cols, cols]``, or ``[groups, cols, cols]``). Under
        ``torch.distributed`` (:mod:`l2fx.distributed`) the first call all-reduces the ranks'
        ``n_r H_r`` and ``n_r`` (every rank calls it in the same order, as the passes do), so
        ``H`` and :attr:`nsamples` are the union's; no rows can be added after that."""
        if distributed.active() and not self._reduced:
            (n_all,) = distributed.all_reduce_scalars(self._n)
            total = distributed.all_reduce_sum(self._H * self._n)
            self._H = total / n_all if n_all else total
            self._n, self._reduced = int(n_all), True
        if self._n == 0:
            raise CalibrationError("HessianAccumulator.hessian: no input rows were added")
        return self._H.clone()


def _pair(v, name: str, n: int) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        return tuple(v)
    raise ConfigError(f"{name} must be an int or a tuple of {n} ints, got {v!r}")


@torch.no_grad()
def layer_rows(x: Tensor, family: str, weight_shape, *, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """The rows of ``X`` whose products with ``weight.flatten(1)`` are the layer's outputs.

    * ``family="linear"``: ``x [..., K]`` -> ``[n, K]`` (``n`` = product of the leading dims).
    * ``family="conv1d"`` / ``"conv2d"``: ``x [B, C, L]`` / ``[B, C, H, W]`` (or unbatched) ->
      ``[groups, n, Cin/groups * k...]`` with ``n = B * L_out`` (``B * H_out * W_out``) unfolded
      patches, the columns of group ``g`` in ``weight[g*Cout/groups:(g+1)*Cout/groups].flatten(1)``
      order (channel slowest, kernel width fastest). Depthwise (``groups = C``): cols ``= kh*kw``.

    Then ``rows[g] @ W_g^T`` is ``F.conv2d(x, weight, ...)`` of group ``g``'s output channels,
    laid out ``[B, H_out, W_out, Cout/groups]``. Zero padding only (``padding`` may be an int, a
    tuple, ``"valid"`` or ``"same"``); another ``padding_mode`` must be applied to ``x`` first.
    """
    if family not in _FAMILIES:
        raise ConfigError(f"layer_rows: family must be one of {_FAMILIES}, got {family!r}")
    shape = tuple(int(s) for s in weight_shape)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ConfigError("layer_rows: x must be a float tensor")
    if family == "linear":
        if len(shape) != 2 or x.dim() < 1 or x.shape[-1] != shape[1]:
            k = shape[1] if len(shape) == 2 else "?"
            raise ConfigError(f"layer_rows: linear weight {shape} needs x [..., {k}], got {tuple(x.shape)}")
        return x.reshape(-1, shape[1])
    nd = 1 if family == "conv1d" else 2
    if len(shape) != nd + 2:
        raise ConfigError(f"layer_rows: {family} weight must be [Cout, Cin/groups, {', '.join('k' * nd)}], got {shape}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or shape[0] % groups:
        raise ConfigError(f"layer_rows: groups must be a positive int dividing Cout={shape[0]}, got {groups!r}")
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    if x.dim() != nd + 2 or x.shape[1] != shape[1] * groups:
        raise ConfigError(f"layer_rows: {family} weight {shape} with groups={groups} needs "
                          f"x [B, {shape[1] * groups}, ...], got {tuple(x.shape)}")
    kernel = shape[2:]
    stride_, dilation_ = _pair(stride, "stride", nd), _pair(dilation, "dilation", nd)
    if isinstance(padding, str):
        if padding == "valid":
            padding_ = (0,) * nd
        elif padding == "same":
            if any(s != 1 for s in stride_):
                raise ConfigError("layer_rows: padding='same' needs stride 1 (as torch's conv)")
            # torch pads 'same' with total = d*(k-1), the extra element on the right/bottom.
            pads = []
            for k, d in zip(reversed(kernel), reversed(dilation_)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding_ = (0,) * nd
        else:
            raise ConfigError(f"layer_rows: padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    else:
        padding_ = _pair(padding, "padding", nd)
    if nd == 1:
        x = x.unsqueeze(2)
        kernel, stride_, padding_, dilation_ = (1,) + kernel, (1,) + stride_, (0,) + padding_, (1,) + dilation_
    patches = F.unfold(x, kernel, dilation=dilation_, padding=padding_, stride=stride_)  # [B, C*kh*kw, L]
    b, _, length = patches.shape
    cols = shape[1] * kernel[0] * kernel[1]
    patches = patches.reshape(b, groups, cols, length)
    return patches.permute(1, 0, 3, 2).reshape(groups, b * length, cols)


@torch.no_grad()
def prepare_hessian(H: Tensor, W: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Damped copy of ``H`` and the mask of dead inputs, as GPTQ / SparseGPT / OBC prepare it.

    Dead inputs (``H_jj == 0``: the input is always 0, so ``W[:, j]`` does not matter) get
    ``H_jj = 1`` and ``W[:, j] = 0`` (``W`` is the solver's working copy and is modified in
    place). Then ``percdamp * mean(diag(H))`` is added to the diagonal (the references' damping,
    which keeps the Cholesky of a rank-deficient ``H`` from failing; 1% is their default).

    Returns ``(H_damped, dead)`` with ``H_damped`` in ``H``'s dtype and ``dead`` bool ``[cols]``.
    """
    if not isinstance(percdamp, (int, float)) or isinstance(percdamp, bool) or not 0.0 <= percdamp < 1e3:
        raise ConfigError(f"percdamp must be a float >= 0, got {percdamp!r}")
    Hd = H.clone()
    diag = Hd.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    diag.add_(percdamp * diag.mean())
    return Hd, dead


def _factor_dtype(H: Tensor, W: Tensor) -> torch.dtype:
    """float64 when H or W is float64 (the accumulator's H is, up to 8192 columns), else float32."""
    return torch.float64 if torch.float64 in (H.dtype, W.dtype) else torch.float32


@torch.no_grad()
def inverse_cholesky(Hd: Tensor, layer: str = "?", percdamp: float | None = None) -> Tensor:
    """Upper Cholesky factor ``U`` of ``Hd^-1`` (``U^T U = Hd^-1``), GPTQ's ``Hinv``.

    Row ``i`` of ``U``, divided by ``U_ii``, is row ``i`` of the inverse Hessian restricted to
    columns ``i..`` divided by its diagonal: the OBS update of the not yet processed columns after
    column ``i`` is fixed (GPTQ, Sec. 3 "Cholesky Reformulation"). Raises :class:`SolverError` if
    ``Hd`` is not positive definite.
    """
    # With J the reversal permutation and J Hd J = L L^T: Hd^-1 = (J L^-T J)(J L^-1 J), and
    # J L^-1 J is upper triangular, so it is U: one Cholesky and one triangular solve instead of
    # the references' Cholesky, cholesky_inverse and second Cholesky. Same time on an idle core
    # (4096 columns, float64, 1 thread: 2.1 s vs 2.2 s), but MKL's cholesky_inverse (potri)
    # scales badly when the machine is shared: with 2 threads while another process held one
    # of the 2 cores it took 9.0 s, the triangular solve 1.3 s.
    L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
    if int(info) == 0:
        eye = torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
        U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
        if not bool(torch.isfinite(U.diagonal()).all()):
            info = 1
    if int(info) != 0:
        hint = f" (percdamp={percdamp})" if percdamp is not None else ""
        raise SolverError(f"layer {layer!r}: the damped Hessian is not positive definite{hint}; "
                          f"raise percdamp or add calibration data")
    return U


@torch.no_grad()
def layer_loss(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` in float64: the layer's reconstruction loss."""
    if W.shape != W_hat.shape or W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ConfigError(f"layer_loss: shapes W {tuple(W.shape)}, W_hat {tuple(W_hat.shape)}, H {tuple(H.shape)} "
                          f"do not match")
    # In row chunks of ~4 M elements: whole, the float64 temporaries were ~10x the weight's fp32
    # bytes (1.3 GB for the lm_head of a 32000-word vocabulary at width 1024).
    Hd = H.double()
    step = max(1, (1 << 22) // max(W.shape[1], 1))
    total = 0.0
    for r in range(0, W.shape[0], step):
        dW = W[r:r + step].double() - W_hat[r:r + step].double()
        total += float(((dW @ Hd) * dW).sum())
    return total


@torch.no_grad()
def relative_layer_loss(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """:func:`layer_loss` divided by ``tr(W H W^T)`` (the loss of ``W_hat = 0``)."""
    ref = layer_loss(W, torch.zeros_like(W), H)
    loss = layer_loss(W, W_hat, H)
    if ref == 0.0:
        return 0.0 if loss == 0.0 else math.inf
    return loss / ref


@torch.no_grad()
def refit_masked(W: Tensor, H: Tensor, mask: Tensor, *, percdamp: float = 0.0, layer: str = "?",
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """The optimal kept weights for a fixed mask: per row, ``argmin tr(dW H dW^T)`` with the
    pruned weights (``mask`` False) held at 0. Returns ``[rows, cols]`` in ``dtype``.

    Per row ``r`` with kept set ``S`` and pruned set ``P`` the minimiser solves
    ``H_SS w'_S = (H w)_S`` (normal equations), or equivalently the OBS form
    ``w' = w - Hinv[:, P] (Hinv_PP)^-1 w_P`` (OBS, Hassibi & Stork 1993; OBC Eq. 3 for a set).
    Per row the smaller set is solved, so the cost is ``O(rows * min(|S|, |P|)^3 / 3)`` (plus one
    ``cols^3`` inverse if any row uses the ``P`` form). ``H`` is damped as :func:`prepare_hessian`
    does; ``percdamp = 0`` needs ``H_SS`` (``Hinv_PP``) positive definite.
    """
    rows, cols = check_layer(W, H, layer)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != W.shape:
        raise ConfigError(f"layer {layer!r}: mask must be bool of shape {tuple(W.shape)}")
    w = W.to(dtype).clone()
    Hd, _ = prepare_hessian(H.to(dtype), w, percdamp)  # dead columns of w become 0
    kept = mask.sum(1).tolist()
    out = torch.zeros_like(w)
    Hinv = None
    for r in range(rows):
        if kept[r] == cols:
            out[r] = w[r]
        elif kept[r] == 0:
            continue
        elif kept[r] <= cols - kept[r]:
            S = mask[r].nonzero()[:, 0]
            A = Hd.index_select(0, S).index_select(1, S)
            out[r, S] = _solve_pd(A, Hd.index_select(0, S) @ w[r], layer)
        else:
            if Hinv is None:
                L, info = torch.linalg.cholesky_ex(Hd)
                if int(info):
                    raise SolverError(f"layer {layer!r}: the damped Hessian is not positive definite; "
                                      f"use percdamp > 0")
                Hinv = torch.cholesky_inverse(L)
            P = (~mask[r]).nonzero()[:, 0]
            rows_p = Hinv.index_select(0, P)
            lam = _solve_pd(rows_p.index_select(1, P), w[r, P], layer)
            out[r] = w[r] - lam @ rows_p
            out[r, P] = 0.0
    return out


def _solve_pd(A: Tensor, b: Tensor, layer: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise SolverError(f"layer {layer!r}: a restricted Hessian is not positive definite; use percdamp > 0")
    return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
