"""Compressed weights back into the caller's own module (:func:`l2fx.load_into`, :func:`l2fx.materialize`).

``l2fx.load`` returns a :class:`~l2fx.compiled.CompiledModel`: the captured graph, which runs
``forward`` and nothing else. A Hugging Face causal LM needs its own class back (``generate()``,
``.config``, hooks, ``save_pretrained`` after :func:`materialize`). Here each compressed weight
of the caller's instance is replaced *in place* by a ``torch.nn.utils.parametrize``
parametrization that decodes it (:class:`DecodeWeight`): the module keeps its class (torch
injects a subclass with a ``weight`` property), every method keeps working, and

* ``state_dict()`` holds what runs: for a compressed weight ``<path>.weight``, the int8 codes as
  ``<path>.parametrizations.weight.original`` and the stored T parameters as
  ``<path>.parametrizations.weight.0.step_s`` / ``.threshold_e`` (float32, the artifact's exact
  values); every other tensor under its own name, with the artifact's values. No dense copy of
  a compressed weight is in it (the CPU decode cache is a plain attribute, as in
  :class:`~l2fx.modules.CodedWeight`).
* ``.to(device)`` / ``.half()`` move the codes and T parameters; the T parameters stay float32
  (:class:`~l2fx.modules.StoredParams`) and the weight is returned in the new dtype.
* tied tensors (``lm_head.weight is embed_tokens.weight``) share one set of codes and one
  :class:`DecodeWeight` (one cache): the artifact holds them once, under the first of their
  names in ``state_dict()`` order (``normalize``), and both names decode the same tensor.

Why a parametrization, not a tensor subclass or a replaced module: a subclass would have to
implement every op the model and ``generate()`` apply to a weight (``t``, ``view``, ``to``,
``detach``, ``dtype`` checks...); replacing the owning ``nn.Linear`` with another class would
change what ``isinstance`` and the model's own code see. A parametrization is the mechanism
torch itself offers for "this attribute is computed from these tensors", and keeps
``state_dict()`` honest without monkey-patching ``module.__dict__``.

* an artifact of the compound methods' w+a options also stores, per layer, the static
  quantiser of the layer's input activations: each goes on the ``nn.Linear``/``nn.ConvNd``
  owning the weight as an :class:`~l2fx.modules.ActQuant` submodule ``l2fx_act_quant`` (no
  tensors: ``state_dict()`` is unchanged) applied by a forward pre-hook; a weight no such module
  owns (read by ``F.linear`` in the model's own code) is refused, naming it: use ``l2fx.load``.
  :func:`materialize` keeps the quantisers (they are part of what the compressed model computes).

No graph is captured here: the architecture is checked against the artifact by tensor names,
shapes and dtypes (:func:`check_model`), which is what the artifact's fingerprint hashes.
BatchNorm folding rewrote a conv's weight and bias into tensors the model does not have in
that form, and the artifact does not record which pairs were folded: such artifacts are
refused here (:class:`~l2fx.errors.ArchitectureMismatchError` naming the folded BatchNorm
layers) and load with ``l2fx.load``, which re-captures and replays the folding.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from l2fx.activations import ActQuantSpec
from l2fx.errors import ArchitectureMismatchError
from l2fx.modules import ActQuant, DecodeCache
from l2fx.transform import TransformKind

__all__ = ["DecodeWeight", "CodedTensor", "check_model", "install", "materialize", "decode_weights"]


class DecodeWeight(DecodeCache):
    """Parametrization ``weight = T^-1(codes)``: ``forward(codes int8 [shape]) -> [shape]`` in ``dtype``.

    Buffers: ``step_s`` and ``threshold_e``, float32, ``[1]`` (per tensor), ``[C]`` (per channel
    along ``channel_axis``) or ``[rows, groups]`` (per group of ``group_size``), exactly as the
    artifact stores them. The codes are the parametrization's ``original`` (owned by
    ``torch.nn.utils.parametrize``): one tensor however many names (tied weights) decode
    through this module; ``state_dict()``, as for any tied parameter, lists that one tensor
    under each owning module's name (``embed_tokens.parametrizations.weight.original`` and
    ``lm_head.parametrizations.weight.original`` are the same storage).

    The decode is :class:`~l2fx.modules.CodedWeight`'s (the same ``inverse_t`` on the same
    float32 values, then the cast): bit-identical to ``l2fx.load``'s graph. ``decode``
    (``BackendConfig.decode``): "cache" keeps the decoded weight as a plain attribute (not in
    ``state_dict()``, not pickled) while the codes, T parameters and dtype are the tensors and
    versions it was decoded from; "per_call" decodes on every access; "auto" caches on CPU.
    """

    def __init__(self, kind: TransformKind, step_s: torch.Tensor, threshold_e: torch.Tensor,
                 channel_axis: int | None, dtype: torch.dtype = torch.float32, group_size: int | None = None,
                 decode: str = "auto", weight_requires_grad: bool = True):
        super().__init__()
        self._init_decoder(kind, step_s, threshold_e, channel_axis, dtype, group_size, decode)
        self.weight_requires_grad = weight_requires_grad  # of the Parameter it replaced: materialize() restores it

    def decoded(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(codes)

    def caches(self, codes: torch.Tensor) -> bool:
        return self.caches_on(codes)

    def fill_cache(self, codes: torch.Tensor) -> torch.Tensor:
        return self.fill_from(codes)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.weight_from(codes)

    def _apply(self, fn, recurse=True):
        self.clear_cache()  # the codes move with the parametrization; re-decoded at the next access
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        group = f", group={self.group_size}" if self.group_size else ""
        return f"kind={self.kind.value}, axis={self.channel_axis}{group}, dtype={str(self.dtype).replace('torch.', '')}"


@dataclasses.dataclass(frozen=True, eq=False)
class CodedTensor:
    """One compressed weight to install: its state_dict name, int8 codes and stored (s, e)."""

    param: str
    codes: torch.Tensor  # int8 [shape]
    kind: TransformKind
    step_s: torch.Tensor
    threshold_e: torch.Tensor
    channel_axis: int | None
    group_size: int | None = None


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name, tied tensors under each name."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """name -> every name of the same tensor (tied weights), in registration order."""
    groups: dict[int, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(id(t), []).append(name)
    return {name: groups[id(t)] for name, t in tensors.items()}


def _batchnorm_folded(model: nn.Module, stored: set[str]) -> list[str]:
    """BatchNorm layers whose running statistics the artifact does not hold: folded into the
    conv/linear before them by ``fold_batchnorm`` (their tensors then pruned)."""
    return [path for path, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and f"{path}.running_mean" not in stored]


def check_model(model: nn.Module, coded: Mapping[str, tuple[int, ...]],
                plain: Mapping[str, tuple[tuple[int, ...], torch.dtype]], *, fold_batchnorm: bool,
                source: str) -> list[str]:
    """Checks that ``model`` has every tensor of the artifact, by name, shape and dtype.

    ``coded``: name -> shape of each compressed weight (of any floating dtype in the model: the
    weight is returned in the model's); ``plain``: name -> (shape, model dtype) of each plain
    tensor.
    Raises :class:`ArchitectureMismatchError` naming the first tensor that differs (or the
    BatchNorm layers folded at compile). Returns the model's own persistent tensors the artifact
    does not hold (read by nothing the compiled forward ran, so pruned at compile: e.g. BERT's
    pooler under a mean-pooling wrapper); they are left as they are.
    """
    tensors = _tensors(model)
    stored = set(coded) | set(plain)
    if fold_batchnorm:
        folded = _batchnorm_folded(model, stored)
        if folded:
            raise ArchitectureMismatchError(
                f"{source}: its compile folded BatchNorm into the layers before it ({', '.join(folded[:8])}"
                f"{', ...' if len(folded) > 8 else ''}); the artifact does not record the folded pairs, so it cannot "
                "be loaded into the model's own modules: use l2fx.load (it re-captures the model and folds them "
                "again), or compile with CompileConfig(fold_batchnorm=False)")
    name = type(model).__name__
    wanted = {**{k: (shape, None) for k, shape in coded.items()}, **plain}
    for param, (shape, dtype) in sorted(wanted.items()):
        t = tensors.get(param)
        if t is None:
            raise ArchitectureMismatchError(f"{source}: tensor {param!r} of the artifact has no tensor of that name "
                                            f"in the {name}")
        if tuple(t.shape) != tuple(shape):
            raise ArchitectureMismatchError(f"{source}: tensor {param!r} has shape {list(shape)} in the artifact, "
                                            f"{list(t.shape)} in the {name}")
        if dtype is None and not t.is_floating_point():
            raise ArchitectureMismatchError(f"{source}: compressed weight {param!r} is {t.dtype} in the {name}, "
                                            "not floating point")
        if dtype is not None and t.dtype != dtype:
            raise ArchitectureMismatchError(f"{source}: tensor {param!r} is {dtype} in the artifact, {t.dtype} in "
                                            f"the {name}")
    aliases = _aliases(tensors)
    covered = {alias for param in stored for alias in aliases[param]}
    return [k for k in model.state_dict() if k not in covered]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


#: Modules whose forward is one linear/conv op reading their ``weight``: where an activation
#: quantiser of the artifact can sit on the input without a captured graph.
ACT_QUANT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACT_QUANT_ATTR = "l2fx_act_quant"


def _quantise_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, ACT_QUANT_ATTR)(args[0]),) + tuple(args[1:])


def _act_owners(model: nn.Module, aliases: Sequence[str], param: str) -> list[nn.Module]:
    """The modules that read ``param`` as a linear/conv weight (one per tied name that is the
    ``weight`` of an :data:`ACT_QUANT_MODULES`); an error if there is none."""
    owners = []
    for alias in aliases:
        owner, attr = _owner(model, alias)
        if attr == "weight" and isinstance(owner, ACT_QUANT_MODULES):
            owners.append(owner)
    if not owners:
        raise ArchitectureMismatchError(
            f"layer {param!r} quantises the inputs of the ops reading it, but no nn.Linear/nn.ConvNd of the "
            f"{type(model).__name__} owns it (names: {', '.join(aliases)}), so its input cannot be found without the "
            f"captured graph: use l2fx.load")
    return owners


@torch.no_grad()
def install(model: nn.Module, coded: Sequence[CodedTensor], plain: Mapping[str, torch.Tensor],
            decode: str = "auto", acts: Mapping[str, ActQuantSpec] | None = None) -> nn.Module:
    """Replaces, in ``model``, each compressed weight by a :class:`DecodeWeight` parametrization
    of its codes (every name of a tied tensor sharing one) and copies the plain tensors in.
    ``acts``: the layers' activation quantisers (the artifact's ``act`` entries): each goes on
    the input of the ``nn.Linear``/``nn.ConvNd`` owning that weight, as an
    :class:`~l2fx.modules.ActQuant` submodule ``l2fx_act_quant`` (no tensors: ``state_dict()``
    is unchanged) applied by a forward pre-hook, which is what the captured graph's
    ``insert_act_quant`` computes for such a module. Checked for every layer before the model
    is touched. ``check_model`` must have passed. Each weight goes to the device its tensor was
    on and is returned in its dtype. Returns ``model``."""
    tensors = _tensors(model)
    aliases = _aliases(tensors)
    act_owners = {param: _act_owners(model, aliases[param], param) for param in (acts or {})}
    for param, owners in act_owners.items():
        for owner in owners:
            if hasattr(owner, ACT_QUANT_ATTR):
                raise ArchitectureMismatchError(f"{param!r}: its module already has an activation quantiser: load "
                                                f"into a fresh instance")
    for layer in coded:
        old = tensors[layer.param]
        codes = layer.codes.to(device=old.device, dtype=torch.int8).contiguous()
        decoder = DecodeWeight(layer.kind, layer.step_s.to(old.device), layer.threshold_e.to(old.device),
                               layer.channel_axis, old.dtype, layer.group_size, decode,
                               weight_requires_grad=bool(old.requires_grad))
        for alias in aliases[layer.param]:
            owner, attr = _owner(model, alias)
            if parametrize.is_parametrized(owner, attr):
                raise ArchitectureMismatchError(f"{alias!r} is already parametrized: load into a fresh instance")
            delattr(owner, attr)
            owner.register_buffer(attr, codes)
            parametrize.register_parametrization(owner, attr, decoder, unsafe=True)
        if decoder.caches(codes):
            decoder.fill_cache(codes)
    for param, value in plain.items():
        tensors[param].copy_(value)  # aliases share the storage
    for param, owners in act_owners.items():
        for owner in owners:
            owner.add_module(ACT_QUANT_ATTR, ActQuant(param, acts[param]))
            owner.register_forward_pre_hook(_quantise_input)
    return model


def decode_weights(model: nn.Module) -> list[tuple[nn.Module, str, DecodeWeight]]:
    """(owner module, attribute, decoder) of every weight :func:`install` parametrized."""
    out = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            if len(plist) == 1 and isinstance(plist[0], DecodeWeight):
                out.append((module, attr, plist[0]))
    return out


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """Decodes every :class:`DecodeWeight` weight of ``model`` once, in the model's dtype, into a
    plain ``nn.Parameter`` under its original name (tied names get the same Parameter), and
    removes the parametrizations: the modules get their own classes back and ``state_dict()``
    its original keys. In place; returns ``model``."""
    dense: dict[int, nn.Parameter] = {}
    for module, attr, decoder in decode_weights(model):
        if id(decoder) not in dense:
            # The decoded cache (or a fresh decode) becomes the Parameter: no second dense copy.
            weight = getattr(module, attr).detach()
            dense[id(decoder)] = nn.Parameter(weight, requires_grad=decoder.weight_requires_grad)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        if attr in module._buffers:  # the codes, put back under the weight's name by torch
            del module._buffers[attr]
        module.register_parameter(attr, dense[id(decoder)])
    return model
