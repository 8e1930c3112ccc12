"""Block formats (OCP MX v1.0, HBFP) as storage kinds of l2fx layers.

``TransformKind.MXFP4_E2M1`` ... ``HBFP4`` (:data:`l2fx.transform.FORMAT_KINDS`): T maps a
weight to its element code, T^-1 reads the element table, rounding T is the spec's saturating
round-to-nearest-even cast. A layer given ``LayerRule(pattern, format=...)`` is stored exactly
as ``l2fx.formats`` quantises it (block scales of 32 along the reduction axis stored as E8M0,
one byte each), its symbols range coded, every byte counted; it saves, loads bit-exactly and
runs through the fused kernel.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import l2fx  # noqa: E402
from l2fx import formats  # noqa: E402
from l2fx.accounting import param_storage  # noqa: E402
from l2fx.artifact import ArtifactReader  # noqa: E402
from l2fx.config import CompileConfig, LayerRule  # noqa: E402
from l2fx.errors import ConfigError  # noqa: E402
from l2fx.transform import FORMAT_KINDS, TransformKind, fake_quant, forward_t, inverse_t  # noqa: E402
from l2fx.triton_kernels import dequant_matmul as dm  # noqa: E402
from l2fx.triton_kernels.packing import pack_codes  # noqa: E402

from conftest import make_fast_config, make_tiny_calib, make_tiny_convnet  # noqa: E402

KINDS = sorted(FORMAT_KINDS, key=lambda k: k.value)


def _spec(kind: TransformKind, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantised weight, per-block scale [rows, blocks]) of ``l2fx.formats`` along the last axis."""
    fmt = FORMAT_KINDS[kind]
    q = formats.quantize(w, fmt, axis=-1)
    scales = torch.ldexp(torch.ones(q.scales.shape), q.scales.to(torch.int32) - formats.E8M0_BIAS)
    return formats.dequantize(q.symbols, q.scales, fmt, axis=-1), scales.reshape(w.shape[0], -1)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_t_rounding_is_the_spec_cast(kind, seed, scale):
    """fake_quant at the spec's block scales equals l2fx.formats' quantise-dequantise bit for bit
    (saturation, subnormals, ties to even, zeros), and T^-1(T(w)) = w off the clamp."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 64, generator=g) * scale
    w[0, :8] = 0.0
    w[1, 3] *= 50  # one large element per block drives its scale; the rest fall to subnormals
    want, scales = _spec(kind, w)
    s = scales.repeat_interleave(32, dim=1)
    got = fake_quant(w, kind, s, torch.ones_like(s), len(FORMAT_KINDS[kind].magnitudes) - 1)
    assert torch.equal(got, want)
    t = forward_t(w, kind, s, torch.ones_like(s))
    inside = t.abs() < len(FORMAT_KINDS[kind].magnitudes) - 1
    back = inverse_t(t, kind, s, torch.ones_like(s))
    assert torch.allclose(back[inside], w[inside], rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_midpoints_and_their_neighbours_round_as_the_spec(kind):
    """Every midpoint between adjacent element values, and the float32 values one ulp either
    side, at scale 1: T's rounding equals the spec's cast (where i + frac rounds in float32 to
    a midpoint it is not, e.g. 121 + 0.4999990 in MXFP8 E4M3)."""
    v = FORMAT_KINDS[kind].magnitudes.to(torch.float64)
    mid = ((v[:-1] + v[1:]) / 2).float()
    pts = torch.cat([mid, torch.nextafter(mid, torch.zeros_like(mid)), torch.nextafter(mid, mid * 2 + 1)])
    w = torch.cat([pts, -pts])
    w = torch.nn.functional.pad(w, (0, -w.numel() % 32))
    # Each block's scale from its own maximum would vary; hold it at 1 (E8M0 code 127).
    s = torch.ones(w.numel())
    got = fake_quant(w[None], kind, s[None], s[None], len(v) - 1)[0]
    fmt = FORMAT_KINDS[kind]
    want = torch.tensor([float(fmt.magnitudes[int(torch.argmin((v - abs(float(x))).abs()))]) for x in w])
    ties = [(j, float(x)) for j, x in enumerate(w) if (v - abs(float(x))).abs().sort().values[:2].diff().abs() == 0]
    for j, x in ties:  # exact midpoints: to the even code, i.e. the even index
        lo = int((v <= abs(x)).nonzero().max())
        want[j] = float(v[lo if lo % 2 == 0 else lo + 1])
    assert torch.equal(got.abs(), want.float())


def test_format_kinds_are_layer_formats_not_learnt_transforms():
    with pytest.raises(ConfigError, match="block storage format"):
        CompileConfig(transform=TransformKind.MXFP4_E2M1)
    with pytest.raises(ConfigError, match="format=, not kind="):
        LayerRule("fc", kind=TransformKind.HBFP8)
    with pytest.raises(ConfigError, match="block format"):
        LayerRule("fc", format=TransformKind.JOINT)
    with pytest.raises(ConfigError, match="takes its grid from the format"):
        LayerRule("fc", format=TransformKind.MXINT8, bits=8)


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def _coded(c, kind):
    return c.graph_module.get_submodule(next(n for n, m in c.graph_module.named_modules()
                                             if getattr(m, "kind", None) == kind))


# fc holds 100k of the tiny ConvNet's 106k weights: an 8-bit format there bounds the whole CR.
@pytest.mark.parametrize("kind, target", [(TransformKind.MXFP4_E2M1, 8), (TransformKind.MXFP8_E4M3, 5.1),
                                          (TransformKind.MXINT8, 4.1), (TransformKind.HBFP4, 8)])
def test_format_layer_compiles_saves_loads_exactly_and_lowers(kind, target):
    x = make_tiny_calib()
    ref = make_tiny_convnet()
    w = make_tiny_convnet().fc.weight.detach()
    want, _ = _spec(kind, w)
    rules = (LayerRule("fc", format=kind),)
    # Without reconstruction the stored fc is the spec's quantisation of the original weight.
    plain = l2fx.compile(make_tiny_convnet(), target, x, verify=True, config=make_fast_config().replace(
        layers=rules, reconstruction=dataclasses.replace(make_fast_config().reconstruction, enabled=False)))
    assert torch.equal(_coded(plain, kind)(), want)
    # With it, the weight is tuned on the format's grid: still one E8M0 scale per block of 32
    # and elements of the format, so the spec's dequantisation of its codes gives it back.
    c = l2fx.compile(make_tiny_convnet(), target, x, config=make_fast_config().replace(layers=rules), verify=True)
    assert abs(c.report.compressed_cr / target - 1) <= 0.01
    fc = next(layer for layer in c.report.layers if layer.param == "fc.weight")
    assert fc.kind == kind.value
    coded = _coded(c, kind)
    exps = torch.log2(coded.step_s).round().to(torch.int32)
    assert torch.equal(torch.ldexp(torch.ones_like(coded.step_s), exps), coded.step_s)
    fmt = FORMAT_KINDS[kind]
    scale_codes = (exps + formats.E8M0_BIAS).to(torch.uint8)
    assert torch.equal(coded(), formats.dequantize(coded.codes.to(torch.int16), scale_codes, fmt, axis=-1))
    # Bits per weight: the elements' entropy-coded symbols plus one E8M0 byte per 32 weights.
    assert fc.bits_per_weight <= FORMAT_KINDS[kind].element_bits + 8 / 32 + 0.2
    assert param_storage(kind, coded.step_s) == "e8m0"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.l2fx")
        l2fx.save(c, path)
        reader = ArtifactReader(path)
        assert reader.version == 3
        entry = next(e for e in reader.layers if e.param == "fc.weight")
        assert entry.pdtype == "e8m0" and entry.kind is kind
        r = l2fx.load(path, model=make_tiny_convnet(), verify=True)
    with torch.no_grad():
        assert torch.equal(r(x[0]), c(x[0]))
        assert _relerr(c(x[0]), ref(x[0])) < 0.05
        low = l2fx.lower(r, l2fx.BackendConfig(use_triton="always"))
        assert float((low(x[0]) - r(x[0])).abs().max()) <= 1e-5 * float(r(x[0]).abs().max())


def test_cli_layer_rule_takes_a_format():
    from l2fx.cli import parse_layer_rule
    rule = parse_layer_rule("lm_head format=mxfp4_e2m1")
    assert rule.format is TransformKind.MXFP4_E2M1


@pytest.mark.skipif(not dm.HAS_TRITON or not (torch.cuda.is_available() or dm._INTERPRET),
                    reason="the kernel needs CUDA or TRITON_INTERPRET=1 before its import")
@pytest.mark.parametrize("kind", sorted(dm.FP_FORMATS))
@pytest.mark.parametrize("m", [1, 5])
def test_fused_kernel_decodes_fp_elements_exactly(kind, m):
    """The kernel's bit-level FP element decode equals the table for every code, and the matmul
    matches float64 as closely as torch in fp32 does (factor 4, as the other kinds)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(len(kind) * 100 + m)
    n, k = 37, 96
    qmax = len(formats.FORMATS[kind].magnitudes) - 1
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=g)
    s = (2.0 ** torch.randint(-12, -2, (n, k // 32), generator=g)).float()
    e = torch.ones_like(s)
    x = torch.randn(m, k, generator=g)
    packed = pack_codes(q, int(qmax).bit_length() + 1)
    w64 = dm._decode_torch(q, kind, s.double(), e.double(), 32)
    y64 = F.linear(x.double(), w64)
    torch_err = (F.linear(x, dm._decode_torch(q, kind, s, e, 32)).double() - y64).abs().max().item()
    dense = dm.dequantize(packed.to(device), s.to(device), e.to(device), kind, group=32)
    assert torch.equal(dense.cpu(), w64.float())  # every element value and scale is exact in fp32
    y = dm.dequant_matmul(x.to(device), packed.to(device), s.to(device), e.to(device), kind, None,
                          method="fused", group=32)
    floor = torch.finfo(torch.float32).eps * y64.abs().max().item()
    assert (y.cpu().double() - y64).abs().max().item() <= 4 * max(torch_err, floor)


def test_rows_shorter_than_a_block_have_one_scale_per_row(tmp_path):
    """A Linear with 20 inputs: each row is one partial MX block (the spec's last-block rule)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    calib = [torch.randn(16, 20)]
    cfg = make_fast_config().replace(layers=(LayerRule("0", format=TransformKind.MXFP4_E2M1),),
                                     reconstruction=dataclasses.replace(make_fast_config().reconstruction,
                                                                        enabled=False))
    c = l2fx.compile(model, 6, calib, config=cfg, verify=True)
    want, _ = _spec(TransformKind.MXFP4_E2M1, model[0].weight.detach())
    assert torch.equal(_coded(c, TransformKind.MXFP4_E2M1)(), want)
    path = tmp_path / "mlp.l2fx"
    l2fx.save(c, path)
    assert next(e for e in ArtifactReader(path).layers if e.param == "0.weight").group == 20
    fresh = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    with torch.no_grad():
        assert torch.equal(l2fx.load(path, model=fresh)(calib[0]), c(calib[0]))


def test_a_crafted_table_beyond_the_element_codes_is_refused(tmp_path):
    """Symbols an MXFP4 layer cannot hold (|q| > 7), with every size and CRC consistent."""
    from artifact_fuzz import Parts, write
    x = make_tiny_calib()
    cfg = make_fast_config().replace(layers=(LayerRule("fc", format=TransformKind.MXFP4_E2M1),),
                                     reconstruction=dataclasses.replace(make_fast_config().reconstruction,
                                                                        enabled=False))
    path = tmp_path / "good.l2fx"
    l2fx.save(l2fx.compile(make_tiny_convnet(), 8, x, config=cfg), path)
    parts = Parts.of(path)
    fc = next(layer for layer in parts.layers if layer.entry["param"] == "fc.weight")
    fc.entry["qmin"] = -100
    bad = tmp_path / "bad.l2fx"
    bad.write_bytes(write(*parts.arrays(), version=parts.version))
    with pytest.raises(l2fx.L2fxError, match="element codes"):
        l2fx.load(bad, model=make_tiny_convnet())
    with pytest.raises(l2fx.L2fxError, match="element codes"):
        l2fx.inspect(bad)


def _on_mxfp4_lattice_mlp() -> torch.nn.Module:
    """Six Linear(128, 128) layers; two hold weights on the MXFP4 lattice with block scales 2^-6 ..
    2^6 apart (no per-channel grid fits them), the others Gaussian."""
    torch.manual_seed(0)
    mods = []
    for _ in range(6):
        mods += [torch.nn.Linear(128, 128), torch.nn.ReLU()]
    m = torch.nn.Sequential(*mods[:-1])
    fmt = FORMAT_KINDS[TransformKind.MXFP4_E2M1]
    with torch.no_grad():
        for i in (0, 4):
            w = m[i].weight
            blocks = 2.0 ** torch.randint(-6, 7, (128, 4)).repeat_interleave(32, 1)
            q = formats.quantize(w * blocks, fmt, axis=-1)
            w.copy_(formats.dequantize(q.symbols, q.scales, fmt, axis=-1))
    return m.eval()


def _offering(*kinds, recon: bool = False) -> CompileConfig:
    base = make_fast_config()
    return base.replace(sensitivity=dataclasses.replace(base.sensitivity, formats=kinds),
                        reconstruction=dataclasses.replace(base.reconstruction, enabled=recon))


def test_allocation_picks_an_offered_format_where_it_wins_and_stores_it_as_a_rule_would(tmp_path):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    c = l2fx.compile(_on_mxfp4_lattice_mlp(), 6, x, config=_offering("mxfp4_e2m1"), verify=True)
    assert abs(c.report.compressed_cr / 6 - 1) <= 0.01
    chosen = c.report.records["entropy_allocation"]["formats_chosen"]
    assert chosen and set(chosen.values()) == {"mxfp4_e2m1"}
    kinds = {layer.param: layer.kind for layer in c.report.layers}
    assert all(kinds[p] == "mxfp4_e2m1" for p in chosen)
    assert any(k != "mxfp4_e2m1" for k in kinds.values())  # the others keep their allocated grids
    # The layer is stored exactly as LayerRule(format=) stores it: for weights on the lattice, losslessly.
    path = tmp_path / "m.l2fx"
    l2fx.save(c, path)
    reader = ArtifactReader(path)
    original = dict(_on_mxfp4_lattice_mlp().named_parameters())
    loaded = l2fx.load(path, model=_on_mxfp4_lattice_mlp(), verify=True)
    for param in chosen:
        entry = next(e for e in reader.layers if e.param == param)
        assert entry.kind is TransformKind.MXFP4_E2M1 and entry.pdtype == "e8m0"
        assert torch.equal(_coded_weight(loaded, param), original[param].detach())
    with torch.no_grad():
        assert torch.equal(loaded(x), c(x))


def _coded_weight(compiled, param: str) -> torch.Tensor:
    gm = compiled.graph_module
    from l2fx.ir import weight_sites
    node = next(n for n, site in weight_sites(gm) if site.param == param)
    return gm.get_submodule(str(node.target))()


def test_a_format_the_other_layers_cannot_balance_is_dropped_with_the_reason():
    # fc is 94 % of the tiny ConvNet: HBFP4 there leaves the target to two small layers that
    # cannot fill it, so the allocation is redone on the grids alone and says why.
    c = l2fx.compile(make_tiny_convnet(), 7, make_tiny_calib(), config=_offering(TransformKind.HBFP4), verify=True)
    rec = c.report.records["entropy_allocation"]
    assert rec["formats_chosen"] == {} and "allocated without the offered formats" in rec["formats_dropped"]
    assert abs(c.report.compressed_cr / 7 - 1) <= 0.01


def test_sensitivity_formats_are_validated_and_round_trip():
    from l2fx.config import SensitivityConfig
    c = SensitivityConfig(formats=("mxfp4_e2m1", TransformKind.MXFP8_E4M3))
    assert c.formats == (TransformKind.MXFP4_E2M1, TransformKind.MXFP8_E4M3)
    assert SensitivityConfig.from_json(c.to_json()) == c
    for bad in (("int4",), ("mxfp4_e2m1", "mxfp4_e2m1"), "mxfp4_e2m1"):
        with pytest.raises(ConfigError, match="formats"):
            SensitivityConfig(formats=bad)


def test_format_pipeline_stores_every_unruled_weight_in_the_format(tmp_path):
    from l2fx.method import format_pipeline
    x = make_tiny_calib()
    config = make_fast_config().replace(layers=(LayerRule("out", bits=8),))
    c = l2fx.compile(make_tiny_convnet(), 4, x, pipeline=format_pipeline("mxfp4_e2m1", config), config=config,
                     verify=True)
    kinds = {layer.param: layer.kind for layer in c.report.layers}
    assert kinds == {"c2.weight": "mxfp4_e2m1", "fc.weight": "mxfp4_e2m1", "out.weight": "linear"}
    want, _ = _spec(TransformKind.MXFP4_E2M1, make_tiny_convnet().fc.weight.detach())
    assert torch.equal(_coded_weight(c, "fc.weight"), want)
    path = tmp_path / "m.l2fx"
    l2fx.save(c, path)
    with torch.no_grad():
        assert torch.equal(l2fx.load(path, model=make_tiny_convnet())(x[0]), c(x[0]))
    with pytest.raises(ConfigError, match="not a block format"):
        format_pipeline("int4")
