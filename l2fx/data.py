"""Calibration batches: validation, calling a model on one, and comparing outputs.

A batch is a Tensor (one positional input), a tuple/list of Tensors (positional inputs), or a
dict of Tensors (keyword inputs). ``calib`` given to :func:`l2fx.compile` is one batch or an
iterable of batches.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torch.utils._pytree as pytree

from l2fx import distributed
from l2fx.config import OUTPUT_METRICS
from l2fx.errors import CalibrationError

Batch = Any  # torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}:{batch.dtype}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def _check_batch(batch: Any, index: int) -> Batch:
    expected = "a Tensor, a tuple of Tensors, or a dict of str -> Tensor"
    if isinstance(batch, torch.Tensor):
        leaves = [batch]
    elif isinstance(batch, Mapping):
        if not batch or not all(isinstance(k, str) for k in batch):
            raise CalibrationError(f"calibration batch {index} is an empty dict or has non-str keys; expected {expected}")
        leaves = list(batch.values())
        batch = dict(batch)
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationError(f"calibration batch {index} is empty; expected {expected}")
        leaves = list(batch)
        batch = tuple(batch)
    else:
        raise CalibrationError(f"calibration batch {index} is a {type(batch).__name__}; expected {expected}")
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise CalibrationError(f"calibration batch {index} holds a {type(leaf).__name__}; expected {expected}")
        if leaf.dim() == 0 or leaf.shape[0] == 0:
            raise CalibrationError(
                f"calibration batch {index} has a tensor of shape {tuple(leaf.shape)}: expected a leading batch "
                "dimension of at least 1")
        if leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise CalibrationError(f"calibration batch {index} holds NaN or inf")
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise CalibrationError(f"calibration batch {index} mixes batch sizes {sorted(sizes)}: {_describe(batch)}")
    return batch


def _token_tensor(t: torch.Tensor) -> bool:
    """A 2-d integer or bool tensor ([batch, sequence]: token ids, attention masks), the one kind
    whose second dimension may vary between batches (``cat_batches`` right-pads it with 0)."""
    return t.dim() == 2 and not t.is_floating_point() and not t.is_complex()


def normalize_calib(calib: Any) -> list[Batch]:
    """Turns ``calib`` into a validated, non-empty list of batches (one structure throughout)."""
    if calib is None:
        raise CalibrationError(
            "calibration data is required: pass calib=<Tensor batch> or an iterable of batches "
            "(Tensors, tuples of Tensors, or dicts of Tensors)")
    if isinstance(calib, (torch.Tensor, Mapping)) or (
        isinstance(calib, tuple) and calib and all(isinstance(x, torch.Tensor) for x in calib)
    ):
        batches = [calib]
    elif isinstance(calib, Iterable):
        batches = list(calib)
    else:
        raise CalibrationError(f"calib must be a batch or an iterable of batches, got {type(calib).__name__}")
    if not batches:
        raise CalibrationError("calibration data is empty: expected at least one batch")
    batches = [_check_batch(b, i) for i, b in enumerate(batches)]
    first = pytree.tree_structure(batches[0])
    first_leaves = pytree.tree_leaves(batches[0])
    for i, b in enumerate(batches[1:], 1):
        leaves = pytree.tree_leaves(b)
        if pytree.tree_structure(b) != first or any(
                a.dim() != c.dim() or a.dtype != c.dtype or (a.shape[1:] != c.shape[1:] and not _token_tensor(a))
                for a, c in zip(first_leaves, leaves)):
            raise CalibrationError(
                f"calibration batch {i} is {_describe(b)}, unlike batch 0 {_describe(batches[0])}: batches may differ "
                "only in batch size (and sequence length for 2-d integer token tensors)")
    return batches


def clone_batch(batch: Batch) -> Batch:
    """``batch`` with every tensor copied: for running a model that may write into its inputs."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, batch)


def check_runs(model: torch.nn.Module, batch: Batch) -> None:
    """Runs ``model`` on ``batch`` once; a failure becomes a CalibrationError saying what was fed.
    The model sees a copy: one that writes into its input in place leaves ``batch`` as it was."""
    try:
        with torch.no_grad():
            call_model(model, clone_batch(batch))
    except Exception as exc:
        raise CalibrationError(f"the model fails on calibration batch 0 ({_describe(batch)}): "
                               f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                               ) from exc


def cast_floats(batch: Batch, dtype: torch.dtype) -> Batch:
    """``batch`` with every floating tensor cast to ``dtype`` (integer inputs, e.g. token ids, kept)."""
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                           batch)


def batch_size(batch: Batch) -> int:
    return pytree.tree_leaves(batch)[0].shape[0]


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return pytree.tree_map(lambda t: t[start:stop], batch)


def cat_batches(batches: list[Batch]) -> Batch:
    leaves0, spec = pytree.tree_flatten(batches[0])
    columns = list(zip(*[pytree.tree_flatten(b)[0] for b in batches]))
    # Sequences of different lengths (token batches padded per batch) are right-padded with 0.
    merged = []
    for col in columns:
        if all(c.shape[1:] == col[0].shape[1:] for c in col):
            merged.append(torch.cat(col))
        else:
            width = max(c.shape[1] for c in col)
            merged.append(torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in col]))
    return pytree.tree_unflatten(merged, spec)


def take_samples(batches: list[Batch], n: int) -> Batch:
    """The first ``n`` samples of the calibration set as one batch."""
    out, have = [], 0
    for b in batches:
        need = n - have
        if need <= 0:
            break
        size = batch_size(b)
        out.append(slice_batch(b, 0, min(size, need)))
        have += min(size, need)
    return cat_batches(out)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return pytree.tree_map(lambda t: t.to(device), batch)


def call_model(model: torch.nn.Module, batch: Batch) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch)


def _float_leaves(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output, in order (a transformers ModelOutput's
    fields in its own order: logits first)."""
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        output = output.to_tuple()
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise CalibrationError("the model's output holds no floating-point tensor to compare")
    return leaves


def output_vector(output: Any, keep: torch.Tensor | None = None) -> torch.Tensor:
    """All floating-point leaves of a model output, flattened per sample: [batch, features];
    with ``keep`` (:func:`real_positions`), the first leaf's padded positions are zeros."""
    leaves = _float_leaves(output)
    if keep is not None:
        first = leaves[0]
        leaves = [first * keep.reshape(*first.shape[:2], *(1,) * (first.dim() - 2)).to(first.dtype), *leaves[1:]]
    return torch.cat([t.reshape(t.shape[0], -1).float() for t in leaves], dim=1)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||out - ref||^2 / ||ref - mean(ref)||^2 over the batch: scale-free output distortion.
    A batch of one sample has no spread about its mean: then the energy is ||ref||^2."""
    centred = reference if reference.shape[0] == 1 else reference - reference.mean(dim=0, keepdim=True)
    ref_energy = centred.pow(2).sum().clamp_min(1e-30)
    return float((output - reference).pow(2).sum() / ref_energy)


def relative_error_to(reference: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """:func:`relative_error` against a fixed ``reference``, as a function of the output, over
    the union of the ``torch.distributed`` ranks' batches when a group is active (the mean and
    both sums all-reduced: :mod:`l2fx.distributed`); one process: exactly ``relative_error``."""
    if not distributed.active():
        return lambda output: relative_error(output, reference)
    ref = reference.double()
    n_all, = distributed.all_reduce_scalars(ref.shape[0])
    mean = distributed.all_reduce_sum(ref.sum(dim=0, keepdim=True)) / max(n_all, 1.0)
    energy, = distributed.all_reduce_scalars(float((ref - (mean if n_all > 1 else 0.0)).pow(2).sum()))
    energy = max(energy, 1e-30)

    def error(output: torch.Tensor) -> float:
        num, = distributed.all_reduce_scalars(float((output.double() - ref).pow(2).sum()))
        return num / energy

    return error


def output_logits(output: Any) -> torch.Tensor:
    """The model's first floating-point output as logits: ``[positions, classes]``, classes
    along its last dimension (a classifier's ``[batch, classes]``, a language model's
    ``[batch, tokens, vocabulary]``)."""
    t = _float_leaves(output)[0]
    if t.dim() < 2 or t.shape[-1] < 2:
        raise CalibrationError(f"output_metric='kl' reads the model's first output as logits over its last "
                               f"dimension, but it has shape {tuple(t.shape)}; use output_metric='mse'")
    return t.reshape(-1, t.shape[-1]).float()


def token_mask(batch: Any) -> torch.Tensor | None:
    """A language model batch's real tokens: where ``batch`` is a mapping with a 2-D
    ``attention_mask`` ``[batch, tokens]``, that mask as bool (True = a real token, False =
    padding); ``None`` otherwise (every position is real)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask != 0


def real_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x [batch, tokens, ...]`` at its real tokens only (``[n, ...]``, :func:`token_mask`)
    when ``keep`` ``[batch, tokens]`` is its leading shape; ``x`` itself otherwise: what a
    layer's statistics count of a padded language model batch."""
    if keep is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(keep.shape):
        return x
    return x[keep.to(x.device)]


def real_positions(batch: Any, output: Any) -> torch.Tensor | None:
    """The positions of a language model's logits that are not padding: where ``batch`` is a
    mapping with a 2-D ``attention_mask`` ``[batch, tokens]`` and the output's first floating
    tensor is ``[batch, tokens, vocabulary]``, the mask flattened to ``[batch * tokens]`` (bool);
    ``None`` otherwise (every position counts)."""
    mask = token_mask(batch)
    if mask is None:
        return None
    leaves = _float_leaves(output)
    if not leaves or leaves[0].dim() != 3 or tuple(leaves[0].shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(-1).to(device=leaves[0].device)


def kl_error_to(reference: torch.Tensor, keep: torch.Tensor | None = None) -> Callable[[torch.Tensor], float]:
    """Mean ``KL(softmax(reference) || softmax(output))`` in nats per position of ``[positions,
    classes]`` logits, as a function of the output; only the positions where ``keep`` is true
    when given (:func:`real_positions`: padding excluded); over the union of the
    ``torch.distributed`` ranks' positions when a group is active (sums all-reduced)."""
    if keep is not None and keep.shape != reference.shape[:1]:
        raise CalibrationError(f"a position mask of shape {tuple(keep.shape)} for logits of shape "
                               f"{tuple(reference.shape)}")
    shape = reference.shape
    select = (lambda t: t[keep]) if keep is not None else (lambda t: t)  # noqa: E731
    ref_logp = torch.log_softmax(select(reference).double(), dim=-1)
    ref_p = ref_logp.exp()
    n_all, = distributed.all_reduce_scalars(ref_logp.shape[0])
    if n_all < 1:
        raise CalibrationError("output_metric='kl': every position of the sensitivity samples is padding "
                               "(attention_mask 0)")

    def error(output: torch.Tensor) -> float:
        if output.shape != shape:
            raise CalibrationError(f"output logits of shape {tuple(output.shape)} against a reference of "
                                   f"{tuple(shape)}")
        logp = torch.log_softmax(select(output).double(), dim=-1)
        # A class the reference rules out (a -inf logit, p = 0) adds 0, not 0 * nan.
        terms = torch.where(ref_p > 0, ref_p * (ref_logp - logp), torch.zeros((), dtype=torch.float64))
        kl, = distributed.all_reduce_scalars(float(terms.sum()))
        return max(kl, 0.0) / n_all

    return error


def output_distortion(reference_output: Any, metric: str = "mse", batch: Any = None) -> Callable[[Any], float]:
    """The distortion of a model output against ``reference_output`` (the model's output on
    ``batch``), as a function of the output: ``"mse"``, the squared error of every floating output
    relative to the reference's energy (:func:`relative_error_to`); ``"kl"``, the mean KL
    divergence of the first output's softmax from the reference's (:func:`kl_error_to`: what
    perplexity and a classifier's top-1 feel, where logit MSE weighs the improbable classes as
    much as the likely ones). Both leave out the first output's positions that
    :func:`real_positions` marks as padding (a language model's, as its perplexity does)."""
    keep = real_positions(batch, reference_output)
    if keep is not None:
        real, = distributed.all_reduce_scalars(float(keep.sum()))
        if real < 1:
            raise CalibrationError("every position of the sensitivity samples is padding (attention_mask 0): "
                                   "there is no output to measure the distortion on")
    if metric == "mse":
        mse = relative_error_to(output_vector(reference_output, keep))
        return lambda output: mse(output_vector(output, keep))
    if metric == "kl":
        kl = kl_error_to(output_logits(reference_output), keep)
        return lambda output: kl(output_logits(output))
    raise CalibrationError(f"output metric must be one of {OUTPUT_METRICS}, got {metric!r}")


def call_model_with(model: torch.nn.Module, overrides: Mapping[str, torch.Tensor], batch: Batch) -> Any:
    """Calls ``model`` on ``batch`` with some parameters/buffers replaced (model untouched)."""
    from torch.func import functional_call

    if isinstance(batch, torch.Tensor):
        return functional_call(model, dict(overrides), (batch,), strict=False)
    if isinstance(batch, Mapping):
        return functional_call(model, dict(overrides), (), dict(batch), strict=False)
    return functional_call(model, dict(overrides), tuple(batch), strict=False)
