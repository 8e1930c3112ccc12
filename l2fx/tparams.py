"""The stored T parameters of a layer: one per tensor, per output channel, or per group.

A per-tensor candidate ``(step_s, threshold_e)`` of sensitivity analysis becomes the stored
parameters of the layer's granularity, either as is (one step everywhere) or scaled by the
range of each channel or group (:func:`scale_ratio`: every channel or group keeps the same
relative precision). Shared by ``sensitivity_analysis`` (which measures both) and
``insert_transforms`` (which installs the one allocated).

Layouts (the weight's :class:`~l2fx.ir.LayerIntent`: ``CompileConfig.granularity`` unless a
``layers`` rule says otherwise; :func:`l2fx.transform.channel_view` broadcasts them):

=============  ===========================  ============================================
granularity    (axis, group)                stored shape
=============  ===========================  ============================================
per_tensor     (None, None)                 [1]
per_channel    (site.channel_axis, None)    [C]: C = shape[axis] (output channels; an
                                            embedding's hidden dimension)
per_group      (0, min(group_size, K))      [rows, ceil(K / g)]: g consecutive elements of
                                            each row of the weight viewed as [rows, K]
=============  ===========================  ============================================
"""
from __future__ import annotations

import torch

from l2fx import formats
from l2fx.config import Granularity
from l2fx.ir import LayerIntent, WeightSite
from l2fx.transform import FORMAT_KINDS, TransformKind, channel_view, decode, encode, param_shape

__all__ = ["layout", "format_intent", "allocated_params", "candidate_weight", "fixed_qmax", "format_scales", "cell_amax", "channel_ratio", "group_ratio", "scale_ratio",
           "stored_vector"]


def layout(site: WeightSite, intent: LayerIntent) -> tuple[int | None, int | None]:
    """(channel axis, group size) of the site's stored T parameters under its intent's
    granularity; a group longer than the weight's rows is one group per row."""
    granularity = Granularity(intent.granularity)
    if granularity is Granularity.PER_GROUP:
        return 0, min(intent.group_size, max(1, site.numel // site.shape[0]))
    if granularity is Granularity.PER_CHANNEL:
        return site.channel_axis, None
    return None, None


def format_intent(fmt: TransformKind, options: tuple = (), rule: int | None = None) -> LayerIntent:
    """The intent of a layer stored in block format ``fmt``: the format's blocks as groups along
    the rows, its own grid. What a ``layers`` rule's ``format=`` gives (``mark_weights``) and what
    ``entropy_allocation`` installs where it picked a format candidate."""
    fmt = TransformKind(fmt)
    return LayerIntent(kind=fmt.value, granularity=Granularity.PER_GROUP.value,
                       group_size=FORMAT_KINDS[fmt].block_size, options=tuple(options), rule=rule, format=fmt.value)


def fixed_qmax(intent: LayerIntent) -> int | None:
    """The largest symbol of a fixed grid: ``2^(bits-1) - 1`` for a user's bits, the largest
    element code of a block format; None for an allocated grid (then the alphabet's qmax)."""
    if intent.format is not None:
        return FORMAT_KINDS[TransformKind(intent.format)].max_symbol
    if TransformKind(intent.kind) in FORMAT_KINDS:  # L2 with a format's element set, scales allocated
        return FORMAT_KINDS[TransformKind(intent.kind)].max_symbol
    return None if intent.bits is None else (1 << (intent.bits - 1)) - 1


def format_scales(w: torch.Tensor, intent: LayerIntent) -> torch.Tensor:
    """A block-format layer's scales as its spec makes them (``l2fx.formats.quantize``: the
    block's ``2^(floor(log2 amax) - emax_elem)``), float32 ``[rows, blocks]``, exact powers of two."""
    fmt = FORMAT_KINDS[TransformKind(intent.format)]
    codes = formats.quantize(w.detach().float().reshape(w.shape[0], -1), fmt, axis=1).scales
    return torch.ldexp(torch.ones(codes.shape), codes.to(torch.int32) - formats.E8M0_BIAS)


def _ratio(amax_part: torch.Tensor) -> torch.Tensor:
    amax = amax_part.max().clamp_min(1e-30)
    return torch.where(amax_part > 0, (amax_part / amax).clamp_min(1e-4), torch.ones_like(amax_part)).float()


def cell_amax(w: torch.Tensor, axis: int | None, group: int | None = None) -> torch.Tensor:
    """max|w| over each cell of the layout ``(axis, group)`` (:func:`layout`), float32 in the
    stored shape: ``[1]`` per tensor, ``[C]`` per channel, ``[rows, ceil(K / group)]`` per group."""
    a = w.detach().abs().float()
    if group is not None:
        rows = a.reshape(a.shape[0], -1)
        k = rows.shape[1]
        groups = -(-k // group)
        padded = torch.nn.functional.pad(rows, (0, groups * group - k))
        return padded.reshape(a.shape[0], groups, group).amax(dim=2)
    if axis is None:
        return a.max().reshape(1)
    dims = [d for d in range(a.dim()) if d != axis % a.dim()]
    return a.amax(dim=dims) if dims else a


def channel_ratio(w: torch.Tensor, site: WeightSite) -> torch.Tensor:
    """r_c = max|w_c| / max|w| per channel (1 for an all-zero channel), shape [C]."""
    return _ratio(cell_amax(w, site.channel_axis))


def group_ratio(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """r = max|w_group| / max|w| per group of ``group_size`` elements of each row (1 for an
    all-zero group), shape [rows, ceil(K / group_size)]."""
    return _ratio(cell_amax(w, 0, group_size))


def scale_ratio(w: torch.Tensor, site: WeightSite, intent: LayerIntent) -> torch.Tensor | None:
    """The range ratios of the site's layout (per channel or per group), or None when there is
    only one scale (per tensor, or a single channel)."""
    axis, group = layout(site, intent)
    if group is not None:
        return group_ratio(w, group)
    if axis is not None and site.channels > 1:
        return channel_ratio(w, site)
    return None


def stored_vector(value: float, site: WeightSite, intent: LayerIntent,
                  ratio: torch.Tensor | None = None) -> torch.Tensor:
    """The stored parameters: ``value`` everywhere in the site's layout, or ``value * ratio``."""
    if ratio is not None:
        return float(value) * ratio
    return torch.full(param_shape(site.shape, *layout(site, intent)), float(value))


def allocated_params(w: torch.Tensor, site: WeightSite, intent: LayerIntent, step_s: float, threshold_e: float,
                     channel_scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (step, threshold) of an allocated per-tensor ``step_s``/``threshold_e``: a
    block-format intent's own scales (threshold half a step), else the values in the site's
    layout, scaled per channel or group when ``channel_scaled``."""
    if intent.format is not None:
        s = format_scales(w, intent)
        return s, 0.5 * s
    ratio = scale_ratio(w, site, intent) if channel_scaled else None
    return stored_vector(step_s, site, intent, ratio), stored_vector(threshold_e, site, intent, ratio)


def candidate_weight(w: torch.Tensor, site: WeightSite, intent: LayerIntent, kind: str, step_s: float,
                     threshold_e: float, channel_scaled: bool, qmax: int) -> torch.Tensor:
    """``w`` as the artifact would decode it under one rate-distortion candidate (its ``kind``,
    per-tensor ``step_s``/``threshold_e``, ``channel_scaled``), the T parameters laid out as
    ``insert_transforms`` stores them: a block-format kind under its format's intent and scales;
    ``qmax``: the alphabet's (a fixed grid's or a format's own applies instead)."""
    if kind in FORMAT_KINDS:
        intent = format_intent(TransformKind(kind), intent.options, intent.rule)
    s, e = allocated_params(w, site, intent, step_s, threshold_e, channel_scaled)
    axis, group = layout(site, intent)
    st = channel_view(s, like=w, channel_axis=axis, group_size=group)
    et = channel_view(e, like=w, channel_axis=axis, group_size=group)
    k = TransformKind(kind)
    return decode(encode(w, k, st, et, fixed_qmax(intent) or qmax), k, st, et).to(w.dtype)

