"""An elementwise quantisation grid per row or per group of columns, in L2's transform terms.

A :class:`Grid` quantises ``w_hat = T^-1(clamp(round(T(w)), qmin, qmax))`` (L2 Eq. 11) with
``T`` from :mod:`l2fx.transform`:

* ``LINEAR``: ``T(w) = w / s``, levels ``k * s``. An asymmetric integer grid (GPTQ's
  ``s * (clamp(round(w/s) + z, 0, maxq) - z)``) is LINEAR with bounds ``[-z, maxq - z]``.
* ``JOINT`` (Eq. 13): a dead zone ``(-e, e)`` mapped to symbol 0, levels
  ``sign(k) (e + (|k| - 0.5) s)``; ``e = 0.5 s`` is LINEAR.

Parameters are per row (``step_s`` ``[rows]``) or per group of ``group_size`` consecutive columns
(``[rows, ceil(cols / group_size)]``, the last group possibly shorter). Symbols are integers in
``[qmin, qmax]`` with ``-127 <= qmin <= 0 <= qmax <= 127`` (0 must be a level: a pruned weight is
symbol 0) and are returned as int16. ``w_hat`` is computed by :func:`l2fx.transform.inverse_t`
from the symbols with the parameters :meth:`Grid.expand` gives, so
``inverse_t(symbols, kind, *grid.expand(cols)) == w_hat`` bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from l2fx.errors import ConfigError, SolverError
from l2fx.transform import TransformKind, forward_t, init_threshold_for_linear, inverse_t

__all__ = ["Grid"]

_SYMBOL_MAX = 127
_KINDS = (TransformKind.LINEAR, TransformKind.JOINT)


# 1.5 * 2^23: for float32 |t| <= 2^22, (t + M) - M is t rounded half to even (the add rounds to
# the integer grid of [2^23, 2^24)). Used instead of torch.round on the per-column path of GPTQ:
# there torch.round (and round_) cost 0.7-2.4 ms per 4096-element column with 2 threads on this
# shared CPU (7 us in isolation), the two adds do not (GPTQ 4096x4096: 17.5 s -> 10.5 s). Bounds are integers, so clamp-then-round equals
# round-then-clamp, and after the clamp |t| <= 127.
_ROUND_MAGIC = 12582912.0


def _round(t: Tensor) -> Tensor:
    """In-place round half to even of a float32 tensor with |t| <= 2^22."""
    return t.add_(_ROUND_MAGIC).sub_(_ROUND_MAGIC)


def _as_param(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ConfigError(f"Grid.{name} must be a Tensor, got {type(x).__name__}")
    return x.detach().to(torch.float32)


def _as_bound(x, name: str) -> Tensor:
    if isinstance(x, bool):
        raise ConfigError(f"Grid.{name} must be an int or an integer tensor, got {x!r}")
    if isinstance(x, int):
        return torch.tensor(x, dtype=torch.int32)
    if isinstance(x, Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool:
        return x.detach().to(torch.int32)
    raise ConfigError(f"Grid.{name} must be an int or an integer tensor, got {x!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """Frozen description of an elementwise quantiser (see the module docstring).

    * ``kind``: ``TransformKind.LINEAR`` or ``TransformKind.JOINT``.
    * ``step_s``, ``threshold_e``: float32 ``[rows]`` (per row) or ``[rows, groups]``
      (``group_size`` set), > 0. For LINEAR, ``threshold_e`` is ``0.5 * step_s`` (unused by ``T``).
    * ``qmin``, ``qmax``: int32 symbol bounds, 0-d, ``[rows]`` or ``[rows, groups]``.
    * ``group_size``: None (one group per row) or the number of consecutive columns per group.
    """

    kind: TransformKind
    step_s: Tensor
    threshold_e: Tensor
    qmin: Tensor
    qmax: Tensor
    group_size: int | None = None

    def __post_init__(self):
        kind = self.kind
        if isinstance(kind, str) and not isinstance(kind, TransformKind):
            try:
                kind = TransformKind(kind)
            except ValueError:
                raise ConfigError(f"Grid.kind must be one of {[k.value for k in _KINDS]}, got {self.kind!r}") from None
        if kind not in _KINDS:
            raise ConfigError(f"Grid.kind must be LINEAR or JOINT, got {kind!r}")
        s, e = _as_param(self.step_s, "step_s"), _as_param(self.threshold_e, "threshold_e")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ConfigError(f"Grid.group_size must be None or a positive int, got {g!r}")
        want_dim = 1 if g is None else 2
        if s.dim() != want_dim or s.numel() == 0:
            raise ConfigError(f"Grid.step_s must be {'[rows]' if g is None else '[rows, groups]'} "
                              f"(group_size={g}), got shape {tuple(s.shape)}")
        if e.shape != s.shape:
            raise ConfigError(f"Grid.threshold_e shape {tuple(e.shape)} != step_s shape {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all() & (s > 0).all() & torch.isfinite(e).all() & (e > 0).all()):
            raise ConfigError("Grid.step_s and threshold_e must be finite and > 0")
        lo, hi = _as_bound(self.qmin, "qmin"), _as_bound(self.qmax, "qmax")
        for b, name in ((lo, "qmin"), (hi, "qmax")):
            if b.dim() > 0 and tuple(b.shape) not in (tuple(s.shape[:1]), tuple(s.shape)):
                raise ConfigError(f"Grid.{name} must be a scalar, [rows] or the shape of step_s "
                                  f"{tuple(s.shape)}, got {tuple(b.shape)}")
        if not bool((lo <= 0).all() & (hi >= 0).all() & (lo >= -_SYMBOL_MAX).all() & (hi <= _SYMBOL_MAX).all()):
            raise ConfigError(f"Grid bounds must satisfy -{_SYMBOL_MAX} <= qmin <= 0 <= qmax <= {_SYMBOL_MAX}")
        if not bool((hi > lo).all()):
            raise ConfigError("Grid bounds must satisfy qmin < qmax (at least two levels)")
        for name, v in (("kind", kind), ("step_s", s.contiguous()), ("threshold_e", e.contiguous()),
                        ("qmin", lo), ("qmax", hi)):
            object.__setattr__(self, name, v)
        # Per-row-shaped float views of the bounds for clamp (broadcast against [rows] / [rows, k]).
        object.__setattr__(self, "_lo", self._full(lo.to(torch.float32)))
        object.__setattr__(self, "_hi", self._full(hi.to(torch.float32)))

    # ------------------------------------------------------------------ shape helpers
    def _full(self, b: Tensor) -> Tensor:
        """A bound as a tensor of step_s's shape (contiguous, so per-column slices are cheap)."""
        if b.dim() == 0:
            return b.expand(self.step_s.shape).contiguous()
        if b.dim() == 1 and self.step_s.dim() == 2:
            return b[:, None].expand(self.step_s.shape).contiguous()
        return b.contiguous()

    @property
    def rows(self) -> int:
        return self.step_s.shape[0]

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size is None else self.step_s.shape[1]

    def check(self, rows: int, cols: int, layer: str = "?") -> None:
        """Raise :class:`SolverError` unless this grid fits a ``[rows, cols]`` weight."""
        if rows != self.rows:
            raise SolverError(f"layer {layer!r}: grid has {self.rows} rows, the weight {rows}")
        if self.group_size is not None and math.ceil(cols / self.group_size) != self.num_groups:
            raise SolverError(f"layer {layer!r}: grid has {self.num_groups} groups of {self.group_size} columns, "
                              f"the weight {cols} columns needs {math.ceil(cols / self.group_size)}")

    def _group_index(self, cols: Tensor) -> Tensor:
        return torch.div(cols, self.group_size, rounding_mode="floor")

    def _params(self, col_start: int, ncols: int | None):
        """(s, e, lo, hi) for one column (ncols None: [rows]) or a slice ([rows, ncols])."""
        if self.group_size is None:
            if ncols is None:
                return self.step_s, self.threshold_e, self._lo, self._hi
            return (self.step_s[:, None], self.threshold_e[:, None], self._lo[:, None], self._hi[:, None])
        if ncols is None:
            k = col_start // self.group_size
            return self.step_s[:, k], self.threshold_e[:, k], self._lo[:, k], self._hi[:, k]
        gi = self._group_index(torch.arange(col_start, col_start + ncols))
        return self.step_s[:, gi], self.threshold_e[:, gi], self._lo[:, gi], self._hi[:, gi]

    def expand(self, cols: int) -> tuple[Tensor, Tensor]:
        """``(step_s, threshold_e)`` per weight, each float32 ``[rows, cols]``."""
        s, e, _, _ = self._params(0, cols)
        return s.expand(self.rows, cols).contiguous(), e.expand(self.rows, cols).contiguous()

    def bounds(self, cols: int) -> tuple[Tensor, Tensor]:
        """``(qmin, qmax)`` per weight, each int32 ``[rows, cols]``."""
        _, _, lo, hi = self._params(0, cols)
        return lo.expand(self.rows, cols).to(torch.int32), hi.expand(self.rows, cols).to(torch.int32)

    # ------------------------------------------------------------------ quantisation
    @torch.no_grad()
    def quantize(self, w_cols: Tensor, col_start: int = 0) -> tuple[Tensor, Tensor]:
        """Quantise columns ``col_start ..`` of the layer: ``w_cols`` ``[rows]`` (one column,
        the cheap path GPTQ calls once per column) or ``[rows, k]``.

        Returns ``(w_hat float32, symbols int16)`` of ``w_cols``'s shape. ``col_start`` is the
        column's index in the layer's original order (it picks the group).
        """
        ncols = None if w_cols.dim() == 1 else w_cols.shape[1]
        s, e, lo, hi = self._params(col_start, ncols)
        t = forward_t(w_cols, self.kind, s, e)
        q = _round(t.clamp_(lo, hi))
        return inverse_t(q, self.kind, s, e), q.to(torch.int16)

    @torch.no_grad()
    def quantize_gathered(self, w: Tensor, cols: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Quantise ``w[i, j]`` as the weight at row ``rows[i]`` (default ``i``), column
        ``cols[i, j]`` of the layer; ``w`` and ``cols`` ``[r, k]``. Used by OBQ, whose rows keep
        their not yet quantised weights in a compacted order."""
        ri = torch.arange(w.shape[0]) if rows is None else rows
        gi = torch.zeros_like(cols) if self.group_size is None else self._group_index(cols)
        if self.group_size is None:
            s, e, lo, hi = (p[ri][:, None] for p in (self.step_s, self.threshold_e, self._lo, self._hi))
        else:
            s, e, lo, hi = (p[ri[:, None], gi] for p in (self.step_s, self.threshold_e, self._lo, self._hi))
        t = forward_t(w, self.kind, s, e)
        q = _round(t.clamp_(lo, hi))
        return inverse_t(q, self.kind, s, e), q.to(torch.int16)

    def quantize_all(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """Round to nearest (RTN) of a whole ``[rows, cols]`` weight on this grid."""
        if W.dim() != 2:
            raise ConfigError(f"Grid.quantize_all expects a 2-D weight, got {tuple(W.shape)}")
        self.check(W.shape[0], W.shape[1])
        return self.quantize(W, 0)

    @torch.no_grad()
    def decode(self, symbols: Tensor) -> Tensor:
        """``T^-1(symbols)`` float32 ``[rows, cols]`` (what every solver's ``w_hat`` equals)."""
        if symbols.is_floating_point() or symbols.dim() != 2:
            raise ConfigError("Grid.decode expects a 2-D integer symbol tensor")
        s, e = self.expand(symbols.shape[1])
        return inverse_t(symbols.to(torch.float32), self.kind, s, e)

    def replace(self, **changes) -> "Grid":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_steps(cls, step_s: Tensor, qmax, *, qmin=None, threshold_e: Tensor | None = None,
                   kind: TransformKind = TransformKind.LINEAR, group_size: int | None = None) -> "Grid":
        """A grid from given steps. ``qmin`` defaults to ``-qmax``; ``threshold_e`` defaults to
        ``0.5 * step_s`` (JOINT without a dead zone, i.e. LINEAR)."""
        step_s = _as_param(step_s, "step_s")
        e = init_threshold_for_linear(step_s) if threshold_e is None else threshold_e
        if qmin is None:
            qmin = -_as_bound(qmax, "qmax")
        return cls(kind=kind, step_s=step_s, threshold_e=e, qmin=qmin, qmax=qmax, group_size=group_size)

    @classmethod
    def from_scale_zero(cls, scale: Tensor, zero: Tensor, bits: int, *, group_size: int | None = None) -> "Grid":
        """GPTQ's quantiser ``scale * (clamp(round(w / scale) + zero, 0, 2^bits - 1) - zero)``
        as a LINEAR grid with bounds ``[-zero, maxq - zero]`` (``zero`` integer-valued)."""
        maxq = _check_bits(bits, 1, 7, "from_scale_zero")
        z = torch.as_tensor(zero).detach()
        if z.is_floating_point():
            if not bool((z == torch.round(z)).all()):
                raise ConfigError("Grid.from_scale_zero: zero must be integer-valued")
        z = z.to(torch.int32)
        s = _as_param(scale, "scale")
        return cls(kind=TransformKind.LINEAR, step_s=s, threshold_e=init_threshold_for_linear(s),
                   qmin=-z, qmax=maxq - z, group_size=group_size)

    @classmethod
    @torch.no_grad()
    def minmax(cls, W: Tensor, bits: int, symmetric: bool = True, group_size: int | None = None,
               kind: TransformKind = TransformKind.LINEAR) -> "Grid":
        """Min-max grid per row or per group of ``group_size`` columns (GPTQ's ``find_params``).

        With ``xmin = min(min w, 0)``, ``xmax = max(max w, 0)`` over the row/group (an all-zero
        row gets ``[-1, 1]`` as in GPTQ):

        * ``symmetric=True``: ``s = max(|xmin|, xmax) / qmax`` with ``qmax = 2^(bits-1) - 1``,
          symbols ``[-qmax, qmax]`` (bits 2..8). This is l2fx's symmetric convention (``encode``
          clamps to ``+-qmax``; the RTN baseline uses it), not GPTQ's ``sym``, which uses
          ``s = 2 max / (2^bits - 1)`` and zero ``2^(bits-1)``, i.e. symbols
          ``[-2^(bits-1), 2^(bits-1) - 1]`` (its 8-bit grid needs -128): build that one with
          :meth:`from_scale_zero`.
        * ``symmetric=False``: GPTQ's asymmetric grid, ``s = (xmax - xmin) / (2^bits - 1)``,
          zero ``z = round(-xmin / s)``, symbols ``[-z, 2^bits - 1 - z]`` (bits 1..7: at 8 bits
          the symbols would leave ``[-127, 127]``).

        For ``kind=JOINT`` the threshold is ``e = 0.5 s`` (no dead zone yet).
        """
        if not isinstance(W, Tensor) or W.dim() != 2:
            raise ConfigError(f"Grid.minmax expects a 2-D weight, got {getattr(W, 'shape', W)!r}")
        rows, cols = W.shape
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ConfigError(f"group_size must be None or a positive int, got {group_size!r}")
        w = W.detach().to(torch.float32)
        if group_size is None:
            xmin, xmax = w.amin(1), w.amax(1)
        else:
            ng = math.ceil(cols / group_size)
            pad = ng * group_size - cols
            # Pad the last group with its own last column, so its min and max do not change.
            lo = torch.cat([w, w[:, -1:].expand(rows, pad)], 1) if pad else w
            lo = lo.reshape(rows, ng, group_size)
            xmin, xmax = lo.amin(2), lo.amax(2)
        xmin, xmax = xmin.clamp(max=0.0), xmax.clamp(min=0.0)
        if symmetric:
            qmax = _check_bits(bits, 2, 8, "minmax(symmetric=True)") // 2  # 2^(b-1) - 1
            amax = torch.maximum(-xmin, xmax)
            amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            s = amax / qmax
            return cls(kind=kind, step_s=s, threshold_e=init_threshold_for_linear(s), qmin=-qmax, qmax=qmax,
                       group_size=group_size)
        maxq = _check_bits(bits, 1, 7, "minmax(symmetric=False)")
        both0 = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both0, torch.ones_like(xmax), xmax)
        s = (xmax - xmin) / maxq
        z = torch.round(-xmin / s).clamp(0, maxq).to(torch.int32)
        return cls(kind=kind, step_s=s, threshold_e=init_threshold_for_linear(s), qmin=-z, qmax=maxq - z,
                   group_size=group_size)


def _check_bits(bits: int, lo: int, hi: int, where: str) -> int:
    """``2^bits - 1`` after checking ``lo <= bits <= hi``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"Grid.{where}: bits must be an int in [{lo}, {hi}] (symbols stay in "
                          f"[-{_SYMBOL_MAX}, {_SYMBOL_MAX}]), got {bits!r}")
    return (1 << bits) - 1
