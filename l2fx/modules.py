"""Weight modules inserted into the graph in place of a compressed weight's ``get_attr``.

Each is a zero-input module whose ``forward()`` returns the weight the consuming op uses, so
the graph reads ``w = self.l2fx_w3(); y = linear(x, w, b)`` and ``state_dict()`` holds exactly
what runs:

* :class:`TransformedWeight` (after ``insert_transforms``): fp32 weight plus learnable T
  parameters; returns T^-1(round_ste(T(w))) (Eq. 11), differentiable for reconstruction.
* :class:`CodedWeight` (after ``range_code``): the integer symbols and the stored T
  parameters; returns T^-1(q). No fp32 weight is stored any more; on CPU the decoded weight is
  kept as a cache beside the codes (``BackendConfig.decode``), outside ``state_dict()``.

and the runtime modules ``lower_kernels`` puts in place of a coded weight *and* the linear
op reading it (:class:`DequantLinear`, :class:`DequantConv1x1`), which call the fused
dequant-matmul kernel (``torch.ops.l2fx.dequant_matmul``, registered by importing
:mod:`l2fx.triton_kernels.dequant_matmul`).
"""
from __future__ import annotations

import torch
from torch import nn

from l2fx.activations import ActQuantSpec
from l2fx.config import DECODE_MODES
from l2fx.errors import BackendError, ConfigError
from l2fx.memory import lazy_clone
from l2fx.transform import TransformKind, channel_view, encode, fake_quant, inverse_laid_out
from l2fx.triton_kernels import dequant_matmul as _kernels  # registers torch.ops.l2fx.dequant_matmul
from l2fx.triton_kernels.packing import pack_codes

__all__ = ["ActQuant", "TransformedWeight", "StoredParams", "DecodeCache", "CodedWeight", "DequantLinear", "DequantConv1x1", "KERNEL_KINDS",
           "HAS_TRITON", "configure_decode", "decode_cache_nbytes"]

#: Transform kinds the fused kernel decodes (block formats with integer elements run as
#: "linear" with the element unit folded into the step), and whether Triton is importable here.
KERNEL_KINDS = tuple(_kernels.KINDS) + tuple(_kernels.INT_FORMAT_UNITS)
HAS_TRITON = _kernels.HAS_TRITON


class TransformedWeight(nn.Module):
    """Fake-quantised weight: ``weight`` [shape]; ``step_s`` and ``threshold_e`` [1] per tensor,
    [C] per channel, or [rows, groups] per group of ``group_size`` (:func:`l2fx.transform.channel_view`).

    ``weight`` is an fp32 ``nn.Parameter``, or, after :meth:`hold_symbols`, the same values held
    as their symbols on a frozen copy of T (``held_symbols`` int8 or int16, ``held_s``,
    ``held_e``: one or two bytes per weight instead of four) and decoded on every read. Held
    weights are read-only: the passes that write weights (``L2fxPass.writes_weights``) refuse
    them; T stays a parameter (``rate_fit`` may still rescale it, re-rounding the held weight as
    it would an fp32 one), and :meth:`snap` re-holds them on the current T.
    """

    def __init__(self, weight: torch.Tensor, kind: TransformKind, step_s: torch.Tensor,
                 threshold_e: torch.Tensor, channel_axis: int | None, qmax: int, group_size: int | None = None,
                 fixed: bool = False):
        """``fixed``: the grid is the user's (a ``layers`` rule's bits): T is neither trained nor
        rescaled by the byte fits (:func:`l2fx.bytefit.scaled`); the weights may still be tuned."""
        super().__init__()
        # Copy-on-write: not held twice while only read (sensitivity, the byte fits); the first
        # in-place write (a one-shot solver's w_hat, a reconstruction step) copies it then.
        self.weight = nn.Parameter(lazy_clone(weight) if weight.dtype == torch.float32 else weight.detach().float())
        self.step_s = nn.Parameter(step_s.detach().clone().float())
        self.threshold_e = nn.Parameter(threshold_e.detach().clone().float())
        self.kind = TransformKind(kind)
        self.channel_axis = channel_axis
        self.group_size = group_size
        self.qmax = int(qmax)
        self.fixed = bool(fixed)
        channel_view(self.step_s, self.weight, channel_axis, group_size)  # validates the layout

    @property
    def weight(self) -> torch.Tensor:
        """The fp32 weight: the parameter, or the held symbols decoded now (:meth:`hold_symbols`)."""
        p = self._parameters.get("weight")
        if p is not None:
            return p
        q = self._buffers.get("held_symbols")
        if q is None:  # nn.Module's attribute protocol: no weight yet (during __init__)
            raise AttributeError("weight")
        return inverse_laid_out(q, self.kind, self.held_s, self.held_e, self.channel_axis, self.group_size)

    @property
    def holds_symbols(self) -> bool:
        """Whether the weight is held as symbols (:meth:`hold_symbols`), not as an fp32 parameter."""
        return "held_symbols" in self._buffers

    @torch.no_grad()
    def hold_symbols(self, symbols: torch.Tensor) -> None:
        """From now on the weight is ``T^-1(symbols)`` on the current T, held as the symbols.

        ``symbols``: integers in ``[-qmax, qmax]`` of the weight's shape (:func:`l2fx.transform.encode`
        on the current T gives them back, so ``range_code`` codes exactly these). The fp32 parameter
        is dropped: a one-shot solve of a model of 1.1 B weights held 4.2 GB of fp32 weights until
        ``range_code``; as int8 symbols they take 1.05 GB.
        """
        shape = tuple(self._like().shape)
        if symbols.is_floating_point() or symbols.is_complex() or tuple(symbols.shape) != shape:
            raise ConfigError(f"TransformedWeight.hold_symbols: symbols must be integers of shape {shape}, got "
                              f"{symbols.dtype} {tuple(symbols.shape)}")
        if symbols.numel() and (int(symbols.min()) < -self.qmax or int(symbols.max()) > self.qmax):
            raise ConfigError(f"TransformedWeight.hold_symbols: a symbol is outside +-qmax ({self.qmax})")
        dtype = torch.int8 if self.qmax <= 127 else torch.int16 if self.qmax <= 32767 else torch.int32
        held = symbols.to(device=self.step_s.device, dtype=dtype).contiguous()
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.register_buffer("held_symbols", held)
        self.register_buffer("held_s", self.step_s.detach().clone())
        self.register_buffer("held_e", self.threshold_e.detach().clone())

    def _like(self) -> torch.Tensor:
        """A tensor of the weight's shape and device without decoding a held weight."""
        return self._buffers["held_symbols"] if self.holds_symbols else self.weight

    def view(self, p: torch.Tensor) -> torch.Tensor:
        """A parameter of this layer's layout, broadcast against the weight."""
        return channel_view(p, self._like(), self.channel_axis, self.group_size)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(self.step_s), self.view(self.threshold_e)

    def forward(self) -> torch.Tensor:
        s, e = self.params()
        return fake_quant(self.weight, self.kind, s, e, self.qmax)

    @torch.no_grad()
    def snap(self) -> None:
        """Move ``weight`` to the reconstruction point of its current symbol, T^-1(round(T(w))).

        The symbols (and so the forward output) are unchanged, but T(w) now sits on an integer,
        half a step from either rounding boundary. Fine-tuning through the STE leaves weights
        oscillating right at a boundary (the gradient flips sign as they cross it); without
        this, the rescale of ``rate_fit`` or rounding T to its storage dtype later re-rounds
        them at random (Fashion-MNIST ResNet, CR 20, 400 fine-tuning steps: calibration KL
        0.022 unsnapped).
        A held weight is re-held on the current T (its symbols there, as ``encode`` gives them).
        """
        if self.holds_symbols:
            s, e = self.params()
            self.hold_symbols(encode(self.weight, self.kind, s, e, self.qmax))
            return
        self.weight.copy_(self.forward())

    def extra_repr(self) -> str:
        group = f", group={self.group_size}" if self.group_size else ""
        fixed = ", fixed" if self.fixed else ""
        held = ", held as symbols" if self.holds_symbols else ""
        return (f"kind={self.kind.value}, shape={tuple(self._like().shape)}, axis={self.channel_axis}{group}, "
                f"qmax={self.qmax}{fixed}{held}")


class ActQuant(nn.Module):
    """Static per-tensor activation fake-quantiser on the input of the linear/conv op(s) reading
    weight ``layer`` (the w+a BOP setting: :mod:`l2fx.activations`): ``forward(x [any]) -> q(x)
    [same shape and dtype]``. Its three numbers are attributes, not tensors: the artifact stores
    them in the layer's manifest entry (``act``), and ``torch.compile`` sees constants."""

    def __init__(self, layer: str, spec: ActQuantSpec):
        super().__init__()
        if not isinstance(spec, ActQuantSpec):
            raise ConfigError(f"ActQuant needs an ActQuantSpec, got {type(spec).__name__}")
        self.layer, self.spec = str(layer), spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec(x)

    def extra_repr(self) -> str:
        s = self.spec
        return f"layer={self.layer!r}, bits={s.bits}, scale={s.scale:.6g}, zero_point={s.zero_point}"


class StoredParams(nn.Module):
    """Base of the modules whose floating buffers are the artifact's stored T parameters.

    ``.half()``, ``.to(torch.bfloat16)`` and the like move those buffers (device, sharing) but
    keep them float32: a cast would change the weights they decode, and the artifact saved from
    the result. What follows the cast is ``dtype``, the dtype of the weight returned.
    """

    dtype: torch.dtype = torch.float32

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype or not t.is_floating_point() else t.to(device=out.device)

        return super()._apply(keep_float32, recurse)


class DecodeCache(StoredParams):
    """``T^-1(codes)`` in ``dtype`` from the module's ``step_s``/``threshold_e``, decoded on every
    call or kept decoded (``decode``): the part :class:`CodedWeight` (codes a buffer of its own)
    and :class:`l2fx.into_model.DecodeWeight` (codes the parametrization's ``original``) share.

    The cache is keyed by the identity and version counter of the codes and both T-parameter
    tensors, and by ``dtype``; see :class:`CodedWeight` for when it is stale. Subclasses set
    ``kind``, ``channel_axis``, ``group_size``, ``dtype``, ``decode`` and call
    :meth:`_init_cache`.
    """

    kind: TransformKind
    channel_axis: int | None
    group_size: int | None
    decode: str

    def _init_decoder(self, kind: TransformKind, step_s: torch.Tensor, threshold_e: torch.Tensor,
                      channel_axis: int | None, dtype: torch.dtype, group_size: int | None, decode: str) -> None:
        """Validates and sets what both subclasses hold: the T-parameter buffers (float32), the
        layout, ``dtype``, ``decode`` and an empty cache."""
        if not dtype.is_floating_point:
            raise ConfigError(f"{type(self).__name__}: dtype must be a floating dtype, got {dtype}")
        _check_decode(decode)
        self.register_buffer("step_s", step_s.detach().float().contiguous())
        self.register_buffer("threshold_e", threshold_e.detach().float().contiguous())
        self.kind = TransformKind(kind)
        self.channel_axis = channel_axis
        self.group_size = group_size
        self.dtype = dtype
        self.decode = decode
        self._init_cache()

    def _init_cache(self) -> None:
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``T^-1(codes)`` in ``dtype``, computed now: the per-call path, and what the cache holds."""
        # Unchecked (inverse_laid_out, not decode): the parameters were validated at construction.
        w = inverse_laid_out(codes, self.kind, self.step_s, self.threshold_e, self.channel_axis, self.group_size)
        return w if self.dtype == torch.float32 else w.to(self.dtype)

    def caches_on(self, codes: torch.Tensor) -> bool:
        """Whether a weight decoded from ``codes`` is cached (``decode`` resolved on their device)."""
        mode = self.decode
        if mode == "auto":
            return codes.device.type == "cpu"
        if mode == "cache":
            return True
        if mode == "per_call":
            return False
        raise ConfigError(f"{type(self).__name__}: decode must be one of {DECODE_MODES}, got {mode!r}")

    def _sources(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return codes, self.step_s, self.threshold_e

    def fresh_for(self, codes: torch.Tensor) -> bool:
        """The cache holds ``T^-1(codes)`` for the current tensors, their contents and ``dtype``.

        Traced by ``torch.compile``, the version counters are not compared: dynamo turns a
        traced ``Tensor._version`` into a data-dependent integer, and branching on it breaks
        the graph at every weight (Fashion-MNIST ResNet: 11 breaks, torch 2.14). The identity
        and dtype checks trace as guards.
        """
        key = self._cache_key
        if key is None or self._cache is None or key[0] != self.dtype:
            return False
        if torch.compiler.is_compiling():
            return all(t is held for t, (held, _) in zip(self._sources(codes), key[1:]))
        return all(t is held and t._version == version for t, (held, version) in zip(self._sources(codes), key[1:]))

    @torch.no_grad()
    def fill_from(self, codes: torch.Tensor) -> torch.Tensor:
        """Decodes ``codes`` into the cache now (whatever ``decode`` says) and returns it."""
        # inference_mode(False): a cache first filled under inference_mode would be an inference
        # tensor, which a later autograd-recording op (a saliency gradient w.r.t. the input)
        # refuses to save for backward.
        # The key is taken before decoding and set after the cache: a reader in another thread
        # sees a new cache under the old (stale) key at worst, and decodes again.
        with torch.inference_mode(False):
            key = (self.dtype, *((t, t._version) for t in self._sources(codes)))
            cache = self._cache = self.decode_codes(codes)
        self._cache_key = key
        return cache

    def clear_cache(self) -> None:
        self._cache_key = None
        self._cache = None

    @property
    def cache_nbytes(self) -> int:
        """Bytes held by the cache now (0 when empty)."""
        return 0 if self._cache is None else self._cache.numel() * self._cache.element_size()

    def weight_from(self, codes: torch.Tensor) -> torch.Tensor:
        """The weight for ``codes``: the cache while fresh, else decoded (and cached, in eager)."""
        if not self.caches_on(codes):
            return self.decode_codes(codes)
        if not self.fresh_for(codes):
            if torch.compiler.is_compiling():
                return self.decode_codes(codes)  # no side effects in traced code
            self.fill_from(codes)
        return self._cache

    def __getstate__(self):
        # Pickling and deepcopy carry the codes, not the decoded weight (4x their bytes in fp32);
        # the copy re-decodes at its first call.
        state = super().__getstate__()
        state["_cache"] = state["_cache_key"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("decode", "auto")  # pickled before ``decode`` existed
        state.setdefault("_cache", None)
        state.setdefault("_cache_key", None)
        super().__setstate__(state)


class CodedWeight(DecodeCache):
    """Decoded weight: ``codes`` int8 [shape]; ``step_s``/``threshold_e`` fp32 in the layout of
    :class:`TransformedWeight` ([1], [C] or [rows, groups]).

    The T parameters hold exactly the values stored in the artifact (fp16-representable when
    stored as fp16), so a loaded model computes bit-identical weights. The weight is decoded
    in fp32 and returned in ``dtype``, the dtype of the weight it replaces (float16 for a
    float16 model); not stored: the model passed to :func:`l2fx.load` gives it again.

    ``decode`` (``BackendConfig.decode``, set by :func:`configure_decode`): "per_call" decodes
    on every forward; "cache" decodes once into a plain tensor attribute (not a buffer: it is
    in neither ``state_dict()`` nor ``buffers()``, nor pickled; the artifact is unchanged) and
    returns that tensor while it is fresh; "auto" caches on CPU and decodes per call on any
    other device. The cache is the same computation as the per-call path (bit-identical), in
    ``dtype``, on the codes' device: ``numel * itemsize(dtype)`` bytes beside the codes' one
    byte per weight. It is stale, and re-decoded at the next eager call, when ``dtype`` or any
    of ``codes``/``step_s``/``threshold_e`` is not the tensor it was decoded from (a buffer
    reassigned) or was written in place since (``Tensor._version``: ``load_state_dict``,
    ``copy_``). ``.to()``, ``.half()``, ``.cuda()`` (:meth:`_apply`) drop it and re-decode at
    once when the module still caches afterwards, so a model cast or moved and then handed to
    ``torch.compile`` reads a filled cache. Under ``torch.compile`` the freshness check traces
    without a graph break, and a fresh cache is a graph input (no decode ops in the graph);
    a stale one is decoded inside the graph, not stored (no side effects in traced code). The
    traced check compares identities and dtype but not versions (:meth:`cache_fresh`): after
    writing into the buffers of a compiled model in place, refresh its caches
    (:func:`configure_decode`, or any eager call); the compiled graph reads the new tensors.
    The returned cache is the module's own tensor: an op writing into its weight would
    corrupt it (the ops of ``WEIGHTED_OPS`` do not).
    """

    def __init__(self, codes: torch.Tensor, kind: TransformKind, step_s: torch.Tensor,
                 threshold_e: torch.Tensor, channel_axis: int | None, dtype: torch.dtype = torch.float32,
                 group_size: int | None = None, decode: str = "auto"):
        super().__init__()
        if not (torch.isfinite(step_s).all() and torch.isfinite(threshold_e).all()
                and (step_s > 0).all() and (threshold_e > 0).all()):
            raise ConfigError("CodedWeight: step_s and threshold_e must be finite and > 0")
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self._init_decoder(kind, step_s, threshold_e, channel_axis, dtype, group_size, decode)
        channel_view(self.step_s, self.codes, channel_axis, group_size)  # validates the layout

    def decoded(self) -> torch.Tensor:
        """``T^-1(codes)`` in ``dtype``, computed now: the per-call path, and what the cache holds."""
        return self.decode_codes(self.codes)

    def caches(self) -> bool:
        """Whether ``forward`` returns a cached weight (``decode`` resolved on the codes' device)."""
        return self.caches_on(self.codes)

    def cache_fresh(self) -> bool:
        """The cache holds ``T^-1(codes)`` for the current tensors (:meth:`DecodeCache.fresh_for`)."""
        return self.fresh_for(self.codes)

    def fill_cache(self) -> torch.Tensor:
        """Decodes into the cache now (whatever ``decode`` says) and returns it."""
        return self.fill_from(self.codes)

    def forward(self) -> torch.Tensor:
        return self.weight_from(self.codes)

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda() drop the cache and, where the module still caches, re-decode at
        # once (a model cast, then handed to torch.compile, reads a filled cache).
        refill = self._cache is not None
        self.clear_cache()
        out = super()._apply(fn, recurse)
        if refill and self.caches():
            self.fill_cache()
        return out

    def extra_repr(self) -> str:
        dtype = "" if self.dtype == torch.float32 else f", dtype={str(self.dtype).replace('torch.', '')}"
        group = f", group={self.group_size}" if self.group_size else ""
        decode = "" if self.decode == "auto" else f", decode={self.decode}"
        return (f"kind={self.kind.value}, shape={tuple(self.codes.shape)}, axis={self.channel_axis}{group}{dtype}"
                f"{decode}")


def _check_decode(mode: str) -> None:
    if not isinstance(mode, str) or mode not in DECODE_MODES:
        raise ConfigError(f"decode must be one of {', '.join(repr(m) for m in DECODE_MODES)}, got {mode!r}")


def configure_decode(root: nn.Module, mode: str) -> int:
    """Sets ``decode`` (``BackendConfig.decode``) on every :class:`CodedWeight` under ``root`` and
    decodes, now, the caches of those that cache (so a model handed to ``torch.compile`` before
    its first call reads them); drops the others'. Returns the bytes the caches hold."""
    _check_decode(mode)
    for module in root.modules():
        if isinstance(module, CodedWeight):
            module.decode = mode
            if not module.caches():
                module.clear_cache()
            elif not module.cache_fresh():
                module.fill_cache()
    return decode_cache_nbytes(root)


def decode_cache_nbytes(root: nn.Module) -> int:
    """Bytes of decoded-weight caches held under ``root`` (not counted by ``state_dict()``)."""
    return sum(m.cache_nbytes for m in root.modules() if isinstance(m, CodedWeight))


# --------------------------------------------------------------------------------------------
# Lowered weight modules (``lower_kernels``): a coded weight fused with the linear op reading it.


class DequantLinear(StoredParams):
    """``y = x @ T^-1(q)^T + bias`` with ``q`` decoded in registers (``torch.ops.l2fx.dequant_matmul``).

    Buffers (exactly what runs; ``state_dict()`` holds these and nothing else):

    * ``words``: ``torch.int32 [N, ceil(K / F)]``, ``F = 32 // bits``: the codes ``q [N, K]``
      packed along K (:mod:`l2fx.triton_kernels.packing`).
    * ``step_s``: ``torch.float32 [N]`` (per output channel, ``channel_axis == 0``), ``[1]``
      (per tensor, ``channel_axis is None``; expanded to ``[N]`` as a view at call time) or
      ``[N, ceil(K / group_size)]`` (per group of ``group_size`` consecutive codes of a row):
      the stored ``s`` of Eq. 13, the same values the artifact holds.
    * ``threshold_e``: same shape and meaning for ``e``.

    Attributes: ``kind`` (:class:`TransformKind`), ``bits`` (2..8), ``k`` (K), ``n`` (N),
    ``channel_axis`` (0 or None, as the CodedWeight it replaces), ``group_size`` (None or g).

    ``forward(x [..., K], bias [N] | None) -> [..., N]`` in ``x.dtype``.
    """

    def __init__(self, codes: torch.Tensor, kind: TransformKind, step_s: torch.Tensor,
                 threshold_e: torch.Tensor, channel_axis: int | None, bits: int | None = None,
                 group_size: int | None = None):
        super().__init__()
        if codes.dim() != 2:
            raise BackendError(f"DequantLinear packs 2-D codes [N, K], got shape {tuple(codes.shape)}")
        packed = pack_codes(codes, bits)
        shape = (-1,) if group_size is None else tuple(step_s.shape)
        self.register_buffer("words", packed.words)
        self.register_buffer("step_s", step_s.detach().float().reshape(shape).contiguous())
        self.register_buffer("threshold_e", threshold_e.detach().float().reshape(shape).contiguous())
        self.kind = TransformKind(kind)
        self.bits = packed.bits
        self.k = packed.k
        self.n = packed.n
        self.channel_axis = channel_axis
        self.group_size = group_size

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.group_size is not None:
            return self.step_s, self.threshold_e
        return self.step_s.expand(self.n), self.threshold_e.expand(self.n)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s, e = self._params()
        kind = self.kind.value
        unit = _kernels.INT_FORMAT_UNITS.get(kind)
        if unit is not None:  # MXINT8 / HBFP: q * unit * s, a power of two times s: exact
            kind, s = "linear", s * unit
        return torch.ops.l2fx.dequant_matmul(x, self.words, self.bits, self.k, s, e, kind, bias,
                                             self.group_size or 0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._matmul(x, bias)

    def extra_repr(self) -> str:
        group = f", group={self.group_size}" if self.group_size else ""
        return f"kind={self.kind.value}, n={self.n}, k={self.k}, bits={self.bits}, axis={self.channel_axis}{group}"


class DequantConv1x1(DequantLinear):
    """A 1x1, stride-1, unpadded, ungrouped ``conv2d``: the same GEMM over channels.

    Buffers as :class:`DequantLinear` with ``N = C_out``, ``K = C_in`` (the ``[C_out, C_in,
    1, 1]`` codes flattened to ``[C_out, C_in]``). ``forward(x [B, C_in, H, W], bias [C_out] |
    None) -> [B, C_out, H, W]``, computed as ``x`` in channels-last rows ``[B*H*W, C_in]``.
    """

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, self.k)
        return self._matmul(rows, bias).reshape(b, h, w, self.n).permute(0, 3, 1, 2)
