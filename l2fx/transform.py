"""The unified weight transformation T of L2 (paper Sec. 4.2, Eq. 11-13).

Every lossy method is written as ``w_hat = T^-1(round(T(w)))`` (Eq. 11): ``T`` maps a
weight to a real number in *symbol space*, rounding picks the integer symbol that is
stored (and later entropy coded), and ``T^-1`` maps the symbol back to a weight.
``T`` is continuous, odd and monotone non-decreasing, and parametrised by a step
``step_s`` and a threshold ``threshold_e`` (both > 0, per tensor or per output channel).

Kinds (Figure 3 of the paper):

* ``LINEAR`` (Fig. 3a): ``T(w) = w / s``; ``T^-1(t) = t * s``; ``e`` is ignored.
* ``JOINT`` (Eq. 13, Fig. 3d): ``T(w) = (0.5/e) w`` for ``|w| < e``, else
  ``sign(w) ((|w| - e)/s + 0.5)``; ``T^-1(t) = 2 e t`` for ``|t| < 0.5``, else
  ``sign(t) ((|t| - 0.5) s + e)``. Everything in ``(-e, e)`` becomes symbol 0 (pruned);
  the reconstruction levels are ``sign(k) (e + (|k| - 0.5) s)``. With ``e = 0.5 s``
  (:func:`init_threshold_for_linear`) it is exactly ``LINEAR``.
* ``PRUNE`` (Eq. 12): the same formulas as ``JOINT``. Eq. 12 keeps weights with
  ``|w| >= e`` "intact" (``T(w) = w``), which is not literal once symbols are integers
  that must be entropy coded; the pruning pass therefore fixes ``s`` to the finest step
  of the symbol alphabet and learns only ``e``. The kind is kept separate so that passes
  and reports can say which method a layer uses.
* ``LOG`` (Fig. 3c): ``T(w) = sign(w) (e/s) ln(1 + |w|/e)``;
  ``T^-1(t) = sign(t) e (exp(|t| s/e) - 1)``. The step is ``s`` near 0 and grows
  (log-compressed) above the knee ``e``.
* ``EXP`` (Fig. 3b): ``T(w) = sign(w) (e/s) (exp(min(|w|/e, 80)) - 1)``;
  ``T^-1(t) = sign(t) e ln(1 + |t| s/e)``. Finer steps at large magnitudes.
* Block formats (``MXFP8_E4M3`` ... ``HBFP4``, :data:`FORMAT_KINDS`): with ``V`` the format's
  element values (``l2fx.formats``) and ``s`` the block's shared scale,
  ``T(w) = sign(w) (i + (|w|/s - V_i) / (V_{i+1} - V_i))`` for ``V_i <= |w|/s < V_{i+1}``
  (extrapolated past the last value, where the clamp at ``qmax = len(V) - 1`` saturates), and
  ``T^-1(q) = sign(q) V_|q| s``: rounding T is the spec's saturating round-to-nearest-even
  element cast (midpoints fall on ``i + 1/2``, and the even index is the even mantissa).

All arithmetic is float32 (inputs are converted). ``step_s`` and ``threshold_e`` must be
tensors broadcastable to ``w`` (see :func:`channel_view`: one per tensor, per output channel,
or per group of ``g`` consecutive elements of each row). Positivity of ``s`` and ``e``
is a precondition of the differentiable functions (checking it there would force a
device sync every training step); :func:`encode` and :func:`decode`, which sit on the
export path, check it.
"""
from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

from l2fx import formats
from l2fx.errors import ConfigError

__all__ = [
    "TransformKind",
    "channel_view",
    "FORMAT_KINDS",
    "uses_threshold",
    "element_table",
    "param_shape",
    "group_count",
    "forward_t",
    "inverse_t",
    "round_ste",
    "encode",
    "decode",
    "fake_quant",
    "init_threshold_for_linear",
]

# float32 exp overflows above ~88.7. 40 (exp = 2.4e17) leaves headroom for the gradients too,
# which multiply exp(x) by x, by the symbol and sum over a channel: with 80 the LOG kind's
# gradient in e overflowed to inf (hypothesis: seed 76, qmax 7). A weight 1e17 times its
# threshold e is no weight a layer holds, so no stored symbol changes meaning.
_EXP_ARG_MAX = 40.0
# Symbols are stored as int16.
_INT16_MAX = 32767


class TransformKind(str, enum.Enum):
    """Which ``T`` a layer uses (paper Fig. 3, Eq. 12, Eq. 13), or which block format's element
    code set (OCP MX v1.0, HBFP: :data:`FORMAT_KINDS`)."""

    LINEAR = "linear"
    LOG = "log"
    EXP = "exp"
    PRUNE = "prune"
    JOINT = "joint"
    MXFP8_E4M3 = "mxfp8_e4m3"
    MXFP8_E5M2 = "mxfp8_e5m2"
    MXFP6_E3M2 = "mxfp6_e3m2"
    MXFP6_E2M3 = "mxfp6_e2m3"
    MXFP4_E2M1 = "mxfp4_e2m1"
    MXINT8 = "mxint8"
    HBFP8 = "hbfp8"
    HBFP4 = "hbfp4"


#: Block-format kinds and their format (l2fx.formats): T maps a weight to its element code as a
#: signed magnitude index (continuous: linear between the format's representable values, so
#: round half to even is the spec's round-to-nearest-even), ``step_s`` is the block's shared
#: scale, ``threshold_e`` is unused (as for LINEAR, not stored).
FORMAT_KINDS: dict[TransformKind, formats.BlockFormat] = {
    TransformKind.MXFP8_E4M3: formats.FORMATS["mxfp8_e4m3"],
    TransformKind.MXFP8_E5M2: formats.FORMATS["mxfp8_e5m2"],
    TransformKind.MXFP6_E3M2: formats.FORMATS["mxfp6_e3m2"],
    TransformKind.MXFP6_E2M3: formats.FORMATS["mxfp6_e2m3"],
    TransformKind.MXFP4_E2M1: formats.FORMATS["mxfp4_e2m1"],
    TransformKind.MXINT8: formats.FORMATS["mxint8"],
    TransformKind.HBFP8: formats.hbfp(8, 32),
    TransformKind.HBFP4: formats.hbfp(4, 32),
}
_TABLES: dict[tuple[TransformKind, torch.device], Tensor] = {}


def uses_threshold(kind: TransformKind | str) -> bool:
    """Whether ``threshold_e`` enters T (and is stored): not for LINEAR and the block formats."""
    kind = _kind(kind)
    return kind is not TransformKind.LINEAR and kind not in FORMAT_KINDS


def element_table(kind: TransformKind, device: torch.device | str = "cpu") -> Tensor:
    """The non-negative element values of a block-format kind, increasing (float32, exact)."""
    key = (kind, torch.device(device))
    if key not in _TABLES:
        _TABLES[key] = FORMAT_KINDS[kind].magnitudes.to(torch.float32).to(device)
    return _TABLES[key]


def _table_forward(w: Tensor, kind: TransformKind, s: Tensor) -> Tensor:
    """Signed magnitude index, linear between representable values and past the last one."""
    v = element_table(kind, w.device)
    a = w.abs() / s
    i = (torch.searchsorted(v, a.detach().contiguous(), right=True) - 1).clamp(0, v.numel() - 2)
    lo, hi = v[i], v[i + 1]
    frac = (a - lo) / (hi - lo)  # exact: a and lo share a binade (or lo = 0), hi - lo is a power of two
    t = i.to(a.dtype) + frac
    # i + frac rounds to float32 at i's magnitude: 121 + 0.4999990 becomes 121.5 and would round
    # to the wrong neighbour. Where round(t) is not the correctly rounded index (half to even),
    # move t by one ulp to the right side (|change| <= 1 ulp; the gradient is frac's).
    f = frac.detach()
    want = i + (f > 0.5).long() + ((f == 0.5) & (i % 2 == 1)).long()
    r = torch.round(t.detach()).long()
    fixed = torch.where(r > want, torch.nextafter(t.detach(), torch.zeros_like(t)),
                        torch.where(r < want, torch.nextafter(t.detach(), torch.full_like(t, float("inf"))), t.detach()))
    t = t + (fixed - t.detach())
    return torch.sign(w) * t


def _table_inverse(t: Tensor, kind: TransformKind, s: Tensor) -> Tensor:
    v = element_table(kind, t.device)
    a = t.abs()
    i = a.detach().floor().long().clamp(0, v.numel() - 2)
    lo, hi = v[i], v[i + 1]
    return torch.sign(t) * (lo + (a - i.to(a.dtype)) * (hi - lo)) * s


def _kind(kind: TransformKind | str) -> TransformKind:
    if isinstance(kind, TransformKind):
        return kind
    if isinstance(kind, str):
        try:
            return TransformKind(kind)
        except ValueError:
            pass
    raise ConfigError(
        f"unknown transform kind {kind!r}; expected one of {[k.value for k in TransformKind]}"
    )


def _f32(x: Tensor | float) -> Tensor:
    if not isinstance(x, Tensor):
        return torch.tensor(float(x), dtype=torch.float32)
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _check_qmax(qmax: int) -> int:
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 1 <= qmax <= _INT16_MAX:
        raise ConfigError(f"qmax must be an int in [1, {_INT16_MAX}], got {qmax!r}")
    return qmax


def _odd(g, x: Tensor) -> Tensor:
    """``sign(x) g(|x|)`` for ``g(0) = 0``, written so that the gradient at 0 is g'(0).

    ``sign(x) * g(x.abs())`` would give gradient 0 at ``x = 0`` (torch's abs'(0) = 0).
    Both branches are finite everywhere, so ``torch.where`` passes no NaN gradient.
    """
    pos = g(x.clamp(min=0))
    neg = -g((-x).clamp(min=0))
    return torch.where(x < 0, neg, pos)


def group_count(shape: tuple[int, ...] | torch.Size, group_size: int) -> int:
    """Groups per row of a weight of ``shape`` viewed as ``[shape[0], K]``: ``ceil(K / group_size)``."""
    k = math.prod(shape[1:]) if len(shape) > 1 else 1
    return -(-k // group_size)


def param_shape(shape: tuple[int, ...] | torch.Size, channel_axis: int | None,
                group_size: int | None = None) -> tuple[int, ...]:
    """The stored shape of a layer's ``step_s`` (and ``threshold_e``): ``[1]`` per tensor,
    ``[C]`` per channel (``C = shape[channel_axis]``), ``[rows, groups]`` per group."""
    if group_size is not None:
        return (shape[0], group_count(shape, group_size))
    return (1,) if channel_axis is None else (shape[channel_axis],)


def channel_view(p: Tensor, like: Tensor, channel_axis: int | None, group_size: int | None = None) -> Tensor:
    """Reshape a parameter so it broadcasts against ``like``.

    ``channel_axis=None`` (per tensor): ``p`` holds one element and is returned 0-d.
    ``group_size=g`` (per group; ``channel_axis`` must be 0): ``like`` is viewed as rows
    ``[R, K]`` (``R = like.shape[0]``, ``K`` the rest flattened in C order) split into groups of
    ``g`` consecutive elements of each row (the last one shorter when ``g`` does not divide
    ``K``); ``p`` has shape ``[R, ceil(K / g)]`` and is returned expanded to ``like``'s shape.
    Otherwise ``p`` holds ``like.shape[channel_axis]`` elements (shape ``[C]``) and is
    returned with shape ``[1, .., C, .., 1]`` (``C`` at ``channel_axis``).
    """
    if not isinstance(p, Tensor):
        raise ConfigError(f"parameter must be a Tensor, got {type(p).__name__}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"group_size must be a positive int, got {group_size!r}")
        if channel_axis != 0 or like.dim() < 1:
            raise ConfigError(f"per-group parameters run along the rows (axis 0), got axis {channel_axis!r}")
        expected = param_shape(tuple(like.shape), 0, group_size)
        if tuple(p.shape) != expected:
            raise ConfigError(f"per-group parameter must have shape {list(expected)} (groups of {group_size} of "
                              f"{tuple(like.shape)}), got {tuple(p.shape)}")
        k = like.numel() // like.shape[0] if like.shape[0] else 0
        return p.repeat_interleave(group_size, dim=1)[:, :k].reshape(like.shape)
    if channel_axis is None:
        if p.numel() != 1:
            raise ConfigError(f"per-tensor parameter must hold 1 element, got shape {tuple(p.shape)}")
        return p.reshape(())
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
        raise ConfigError(f"channel_axis must be an int or None, got {channel_axis!r}")
    if not -like.dim() <= channel_axis < like.dim():
        raise ConfigError(f"channel_axis {channel_axis} out of range for a {like.dim()}-d tensor")
    axis = channel_axis % like.dim()
    c = like.shape[axis]
    if p.dim() > 1 or p.numel() != c:
        raise ConfigError(
            f"per-channel parameter must have shape [{c}] (axis {axis} of {tuple(like.shape)}), "
            f"got {tuple(p.shape)}"
        )
    shape = [1] * like.dim()
    shape[axis] = c
    return p.reshape(shape)


def forward_t(w: Tensor, kind: TransformKind | str, step_s: Tensor, threshold_e: Tensor) -> Tensor:
    """``T(w)`` (Eq. 11-13): weights to real-valued symbols. Continuous, monotone, odd."""
    kind = _kind(kind)
    w, s, e = _f32(w), _f32(step_s), _f32(threshold_e)
    if kind is TransformKind.LINEAR:
        return w / s
    if kind in (TransformKind.JOINT, TransformKind.PRUNE):
        a = w.abs()
        # w / (2e), not (0.5/e) * w: a correctly rounded quotient of |w| < e is <= 0.5, so
        # everything inside the dead zone rounds (half to even) to symbol 0. (0.5/e) * w
        # rounds twice and can give 0.5 + ulp for |w| = prev_float(e), i.e. symbol 1.
        inner = w / (2.0 * e)
        # |w| >= e > 0 on the branch where `outer` is used, so sign() is differentiable there.
        outer = torch.sign(w) * ((a - e) / s + 0.5)
        return torch.where(a < e, inner, outer)
    if kind is TransformKind.LOG:
        return _odd(lambda a: (e / s) * torch.log1p(a / e), w)
    if kind is TransformKind.EXP:
        return _odd(lambda a: (e / s) * torch.expm1((a / e).clamp(max=_EXP_ARG_MAX)), w)
    if kind in FORMAT_KINDS:
        return _table_forward(w, kind, s)
    raise AssertionError(kind)  # pragma: no cover - _kind() is exhaustive


def inverse_t(t: Tensor, kind: TransformKind | str, step_s: Tensor, threshold_e: Tensor) -> Tensor:
    """``T^-1(t)`` (Eq. 11): symbols back to weights."""
    kind = _kind(kind)
    t, s, e = _f32(t), _f32(step_s), _f32(threshold_e)
    if kind is TransformKind.LINEAR:
        return t * s
    if kind in (TransformKind.JOINT, TransformKind.PRUNE):
        a = t.abs()
        inner = (2.0 * e) * t
        outer = torch.sign(t) * ((a - 0.5) * s + e)
        return torch.where(a < 0.5, inner, outer)
    if kind is TransformKind.LOG:
        # Clamped like EXP's forward so that a huge |t| s/e yields a finite value and gradient.
        return _odd(lambda a: e * torch.expm1((a * s / e).clamp(max=_EXP_ARG_MAX)), t)
    if kind is TransformKind.EXP:
        return _odd(lambda a: e * torch.log1p(a * s / e), t)
    if kind in FORMAT_KINDS:
        return _table_inverse(t, kind, s)
    raise AssertionError(kind)  # pragma: no cover


def inverse_laid_out(q: Tensor, kind: TransformKind | str, step_s: Tensor, threshold_e: Tensor,
                     channel_axis: int | None, group_size: int | None = None) -> Tensor:
    """``T^-1(q)`` in float32 for integer symbols ``q``, the parameters in their stored layout
    (per tensor, per channel on ``channel_axis``, or per group of ``group_size``: :func:`param_shape`).

    The decode of a stored layer, unchecked: no positivity check, which reads tensor values (a
    graph break under ``torch.compile``); callers validated the parameters when they took them.
    """
    s = channel_view(step_s, q, channel_axis, group_size)
    e = channel_view(threshold_e, q, channel_axis, group_size)
    return inverse_t(q.to(torch.float32), kind, s, e)


def round_ste(t: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through, [3])."""
    return t + (torch.round(t) - t).detach()


def _check_positive(step_s: Tensor, threshold_e: Tensor) -> None:
    s, e = _f32(step_s), _f32(threshold_e)
    if not bool(torch.all(s > 0)) or not bool(torch.all(e > 0)):
        raise ConfigError("step_s and threshold_e must be > 0 (and finite) everywhere")
    if not bool(torch.all(torch.isfinite(s))) or not bool(torch.all(torch.isfinite(e))):
        raise ConfigError("step_s and threshold_e must be finite")


@torch.no_grad()
def encode(
    w: Tensor, kind: TransformKind | str, step_s: Tensor, threshold_e: Tensor, qmax: int
) -> Tensor:
    """Integer symbols ``clamp(round(T(w)), -qmax, qmax)`` as int16 (Eq. 11, no gradient)."""
    _check_qmax(qmax)
    _check_positive(step_s, threshold_e)
    t = forward_t(w, kind, step_s, threshold_e)
    return torch.round(t).clamp(-qmax, qmax).to(torch.int16)


@torch.no_grad()
def decode(q: Tensor, kind: TransformKind | str, step_s: Tensor, threshold_e: Tensor) -> Tensor:
    """Reconstructed float32 weights ``T^-1(q)`` from integer symbols (Eq. 11)."""
    if q.is_floating_point() or q.is_complex():
        raise ConfigError(f"decode expects integer symbols, got dtype {q.dtype}")
    _check_positive(step_s, threshold_e)
    return inverse_t(q.to(torch.float32), kind, step_s, threshold_e)


def fake_quant(
    w: Tensor, kind: TransformKind | str, step_s: Tensor, threshold_e: Tensor, qmax: int
) -> Tensor:
    """``T^-1(clamp(round(T(w)), -qmax, qmax))`` with STE rounding (Eq. 11).

    Equal in value to ``decode(encode(w))``; differentiable with respect to ``w``,
    ``step_s`` and ``threshold_e``. Symbols clamped at ``+-qmax`` pass no gradient to
    ``w`` (the usual saturation behaviour), but ``T^-1(+-qmax)`` still depends on s, e.
    """
    _check_qmax(qmax)
    t = forward_t(w, kind, step_s, threshold_e)
    q = round_ste(t).clamp(-qmax, qmax)
    return inverse_t(q, kind, step_s, threshold_e)


def init_threshold_for_linear(step_s: Tensor) -> Tensor:
    """``e = 0.5 s``: the threshold that makes ``JOINT`` identical to ``LINEAR`` (no dead zone)."""
    return 0.5 * _f32(step_s)
