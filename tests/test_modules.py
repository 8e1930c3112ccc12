"""l2fx/modules.py: CodedWeight's decode modes (``BackendConfig.decode``: cache / per_call / auto).

before     a CodedWeight (codes, step_s, threshold_e) or a model loaded from an artifact
transform  decode once into a cache (``"cache"``, ``"auto"`` on CPU) or on every call (``"per_call"``)
expected   bit-identical weights and outputs; ``state_dict()`` and the saved artifact's bytes
           unchanged; the cache re-decoded when dtype, device or the buffers change; no graph
           break under ``torch.compile`` on the cached path.

One small l2fx.compile (reconstruction off, ~1 s), shared by the module.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import l2fx
from l2fx.config import BackendConfig, CompileConfig, ReconstructionConfig, SensitivityConfig
from l2fx.errors import ConfigError
from l2fx.modules import CodedWeight, configure_decode, decode_cache_nbytes
from l2fx.transform import TransformKind

CACHE, PER_CALL = BackendConfig(decode="cache"), BackendConfig(decode="per_call")


def _coded(kind: TransformKind = TransformKind.JOINT, axis: int | None = 0, group: int | None = None,
           dtype: torch.dtype = torch.float32, decode: str = "auto", shape=(6, 10)) -> CodedWeight:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-9, 10, shape, generator=g, dtype=torch.int8)
    if group is not None:
        pshape = (shape[0], -(-shape[1] // group))
    else:
        pshape = (1,) if axis is None else (shape[axis],)
    s = torch.rand(pshape, generator=g) * 0.1 + 0.01
    e = s * (0.5 + torch.rand(pshape, generator=g))
    return CodedWeight(codes, kind, s, e, axis, dtype, group, decode)


# --------------------------------------------------------------------------------------------
# BackendConfig.decode


def test_backend_config_decode_validates_and_round_trips():
    assert BackendConfig().decode == "auto"
    for mode in ("auto", "cache", "per_call"):
        config = BackendConfig(decode=mode)
        assert BackendConfig.from_json(config.to_json()) == config
    for bad in ("always", "", None, 1):
        with pytest.raises(ConfigError, match="BackendConfig: decode must be one of"):
            BackendConfig(decode=bad)
    assert BackendConfig.from_dict({"use_triton": "auto"}).decode == "auto"  # a config written before the field
    with pytest.raises(ConfigError, match="decode must be one of"):
        CodedWeight(torch.zeros(2, 2, dtype=torch.int8), TransformKind.LINEAR, torch.ones(1), torch.ones(1), None,
                    decode="once")


# --------------------------------------------------------------------------------------------
# CodedWeight alone


@pytest.mark.parametrize("kind", list(TransformKind))
@pytest.mark.parametrize("layout", [(None, None), (0, None), (1, None), (0, 4)], ids=["tensor", "axis0", "axis1", "g4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cache_is_bit_identical_to_per_call(kind, layout, dtype):
    axis, group = layout
    cached, per_call = _coded(kind, axis, group, dtype, "cache"), _coded(kind, axis, group, dtype, "per_call")
    first, again = cached(), cached()
    assert again is first and first.dtype == dtype  # decoded once, then the same tensor
    assert torch.equal(first, per_call()) and per_call() is not per_call()
    assert cached.cache_nbytes == first.numel() * first.element_size() and per_call.cache_nbytes == 0


def test_the_cache_is_not_state_and_not_pickled():
    cached, per_call = _coded(decode="cache"), _coded(decode="per_call")
    cached()
    assert cached.state_dict().keys() == per_call.state_dict().keys() == {"codes", "step_s", "threshold_e"}
    assert all(torch.equal(cached.state_dict()[k], v) for k, v in per_call.state_dict().items())
    assert [n for n, _ in cached.named_buffers()] == ["codes", "step_s", "threshold_e"]
    for copied in (copy.deepcopy(cached), pickle.loads(pickle.dumps(cached))):
        assert copied.cache_nbytes == 0 and copied.decode == "cache"
        assert torch.equal(copied(), cached())


def test_auto_caches_on_cpu_only():
    module = _coded(decode="auto")
    assert module.caches() and module() is module()
    module.to("meta")  # any other device: per call (the meta device stands in for an accelerator)
    assert not module.caches() and module.cache_nbytes == 0 and module().device.type == "meta"
    assert _coded(decode="cache").to("meta").caches()


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_a_cast_re_decodes_the_cache_in_the_new_dtype(cast):
    module = _coded(decode="cache")
    module()
    getattr(module, cast)()
    expected = _coded(decode="per_call")
    expected.dtype = module.dtype
    assert module.step_s.dtype == torch.float32 and module.cache_nbytes > 0  # stored params stay fp32
    assert module._cache.dtype == module.dtype and torch.equal(module(), expected())


def test_to_the_same_device_and_float_keep_correct_values():
    module = _coded(decode="cache")
    before = module().clone()
    assert torch.equal(module.to("cpu")(), before) and torch.equal(module.float()(), before)


def _edited(module: CodedWeight) -> torch.Tensor:
    fresh = _coded(decode="per_call")
    fresh.load_state_dict(module.state_dict())
    fresh.dtype = module.dtype
    return fresh()


@pytest.mark.parametrize("edit", ["copy_", "load_state_dict", "reassign", "step_s", "threshold_e", "dtype"])
def test_an_edit_of_the_buffers_or_dtype_invalidates_the_cache(edit):
    module = _coded(decode="cache")
    old = module().clone()
    with torch.no_grad():
        if edit == "copy_":
            module.codes.copy_(-module.codes)
        elif edit == "load_state_dict":
            module.load_state_dict({**module.state_dict(), "codes": module.codes.flip(0).clone()})
        elif edit == "reassign":
            module.codes = module.codes.flip(1).clone()
        elif edit == "step_s":
            module.step_s.mul_(2)
        elif edit == "threshold_e":
            module.threshold_e.mul_(2)
        else:
            module.dtype = torch.float16
    new = module()
    assert not torch.equal(new.float(), old) and torch.equal(new, _edited(module))
    assert module() is new  # and cached again


def test_a_cache_filled_under_inference_mode_serves_autograd_later():
    module = _coded(decode="cache")
    with torch.inference_mode():
        module()
    x = torch.randn(3, 10, requires_grad=True)
    (x @ module().t()).sum().backward()  # an inference tensor cannot be saved for backward
    assert x.grad is not None and not module().is_inference()


def test_configure_decode_sets_fills_and_drops():
    root = nn.ModuleDict({"a": _coded(decode="per_call"), "b": _coded(kind=TransformKind.LOG, decode="per_call")})
    assert decode_cache_nbytes(root) == 0
    nbytes = configure_decode(root, "cache")
    assert nbytes == 2 * 60 * 4 == decode_cache_nbytes(root) and all(m.decode == "cache" for m in root.values())
    assert configure_decode(root, "per_call") == 0
    with pytest.raises(ConfigError, match="decode must be one of"):
        configure_decode(root, "lazy")


# --------------------------------------------------------------------------------------------
# A loaded model


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3)
        self.fc = nn.Linear(16 * 6 * 6, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net().eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    x = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    config = CompileConfig(sensitivity=SensitivityConfig(num_samples=4, num_steps=8),
                           reconstruction=ReconstructionConfig(enabled=False))
    compiled = l2fx.compile(_net(), target_cr=6, calib=[x], config=config)
    path = tmp_path_factory.mktemp("modules") / "net.l2fx"
    l2fx.save(compiled, path)
    return path, x[:1]


def _coded_modules(model) -> list[CodedWeight]:
    return [m for m in model.modules() if isinstance(m, CodedWeight)]


def test_load_applies_the_backend_decode_and_outputs_are_bit_identical(artifact):
    path, x = artifact
    cached = l2fx.load(path, _net(), backend=CACHE)
    per_call = l2fx.load(path, _net(), backend=PER_CALL)
    default = l2fx.load(path, _net())
    assert {m.decode for m in _coded_modules(cached)} == {"cache"} and len(_coded_modules(cached)) == 3
    assert {m.decode for m in _coded_modules(default)} == {"auto"}
    # Decoded at load, not at the first call: torch.compile of a fresh load reads the caches.
    assert decode_cache_nbytes(cached) == decode_cache_nbytes(default) == sum(
        m.codes.numel() * 4 for m in _coded_modules(cached))
    assert decode_cache_nbytes(per_call) == 0
    with torch.no_grad():
        y = per_call(x)
        assert torch.equal(cached(x), y) and torch.equal(default(x), y)


def test_a_cached_model_saves_the_same_bytes(artifact, tmp_path):
    path, x = artifact
    cached = l2fx.load(path, _net(), backend=CACHE)
    with torch.no_grad():
        cached(x)
    assert cached.state_dict().keys() == l2fx.load(path, _net(), backend=PER_CALL).state_dict().keys()
    l2fx.save(cached, tmp_path / "again.l2fx")
    assert (tmp_path / "again.l2fx").read_bytes() == path.read_bytes()
    lowered = l2fx.lower(cached, BackendConfig(use_triton="never", decode="per_call"))
    assert decode_cache_nbytes(lowered) == 0 and decode_cache_nbytes(cached) > 0
    assert lowered.artifact_bytes() == path.read_bytes()


def test_half_after_load_keeps_the_cache_in_half(artifact):
    path, x = artifact
    model = l2fx.load(path, _net(), backend=CACHE).half()
    reference = l2fx.load(path, _net(), backend=PER_CALL).half()
    assert {m._cache.dtype for m in _coded_modules(model)} == {torch.float16}
    with torch.no_grad():
        assert torch.equal(model(x.half()), reference(x.half()))


def test_torch_compile_reads_the_cache_without_a_graph_break(artifact):
    path, x = artifact
    model = l2fx.load(path, _net(), backend=CACHE)
    dynamo.reset()
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    inputs = [n.name for n in explained.graphs[0].graph.nodes if n.op == "placeholder"]
    assert sum(name.endswith("_cache") for name in inputs) == 3 and not any("codes" in n for n in inputs)
    dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    dynamo.reset()


@pytest.mark.parametrize("backend, filled", [(CACHE, True), (PER_CALL, False)])
def test_compile_returns_the_backends_decode_and_counts_the_bytes_it_writes(backend, filled):
    """compile makes the artifact's bytes before the decode caches fill (they are the model's
    size in fp32): the returned model still has the backend's decode, and the report the bytes."""
    x = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    config = CompileConfig(sensitivity=SensitivityConfig(num_samples=4, num_steps=8),
                           reconstruction=ReconstructionConfig(enabled=False))
    compiled = l2fx.compile(_net(), target_cr=6, calib=[x], config=config, backend=backend)
    coded = _coded_modules(compiled.graph_module)
    assert coded and all(m.cache_fresh() == filled for m in coded)
    assert (decode_cache_nbytes(compiled.graph_module) > 0) == filled
    assert compiled.report.file_nbytes == len(compiled.artifact_bytes())
