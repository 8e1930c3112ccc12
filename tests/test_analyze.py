"""l2fx.analyze: the interplay report's numbers against direct computations on tiny models.

Every quantity :func:`interplay` reports is recomputed here the plain way: the layer error by
running the layer on its recorded fp32 inputs with the compressed weight (not through ``H``),
the accumulated error and the output error by running an eager copy of the model whose weights
were set to the scheme's. Tolerances: both sides compute in float64 from float32 inputs except
the accumulated errors (float32 activations, float64 sums); measured agreement on these models:
7e-16 relative for the isolated errors, 1.5e-8 for the accumulated ones; the tolerances are
about 1000x and 70x that.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_convnet
from l2fx import formats as fmts
from l2fx import sparsity as sp
from l2fx.analyze import SCHEMES, Format, InterplayReport, Pattern, apply_scheme, interplay
from l2fx.cli import main
from l2fx.errors import ConfigError, FormatError

ISO_RTOL = 1e-12
ACC_RTOL = 1e-6


def tiny_model() -> nn.Module:
    return make_tiny_convnet()


def tiny_calib() -> list[torch.Tensor]:
    return [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]


class GroupedNet(nn.Module):
    """A grouped and a depthwise conv (one H per group), a 1x1 conv, an in-place add into a copy of
    the input (the twin runner must not share that copy), a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 16)

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.c1(x))))
        y = x.clone()
        y.add_(self.pw(h))
        return self.fc(y.flatten(1))


def grouped_calib() -> list[torch.Tensor]:
    return [torch.randn(6, 4, 6, 6, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]


def _weighted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _op(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer without its bias, in float64."""
    if isinstance(mod, nn.Linear):
        return F.linear(x.double(), w.double())
    return F.conv2d(x.double(), w.double(), None, mod.stride, mod.padding, mod.dilation, mod.groups)


def _inputs(model: nn.Module, calib) -> dict[str, list[torch.Tensor]]:
    """Each weighted module's fp32 inputs over the calibration batches."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach().clone()))
             for n, m in _weighted(model).items()]
    with torch.no_grad():
        for b in calib:
            model(b)
    for h in hooks:
        h.remove()
    return seen


def _scheme_model(model: nn.Module, scheme: str, pattern: Pattern, fmt: Format) -> nn.Module:
    """An eager copy with every weight under ``scheme``; a pattern that does not fit leaves the
    layer fp32 in S and quantised only in S->Q / Q->S (analyze's documented fallback)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in _weighted(out).items():
            try:
                w_hat, _ = apply_scheme(mod.weight, scheme, pattern, fmt, name)
            except FormatError:
                w_hat = mod.weight.clone() if scheme == "S" else fmt.quantize(mod.weight, name)
            mod.weight.copy_(w_hat)
    return out


def _outputs(model: nn.Module, calib) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: seen.setdefault(n, []).append(y.detach().clone()))
             for n, m in _weighted(model).items()]
    with torch.no_grad():
        logits = [model(b) for b in calib]
    for h in hooks:
        h.remove()
    return seen, logits


def _bias_free(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if mod.bias is None:
        return y
    return y - (mod.bias.detach() if isinstance(mod, nn.Linear) else mod.bias.detach().reshape(-1, 1, 1))


@pytest.fixture(scope="module")
def tiny_report() -> InterplayReport:
    return interplay(tiny_model(), tiny_calib(), patterns=("50%", "2:4"), formats=("mxfp8_e4m3", "mxfp4_e2m1",
                                                                                    "int4_channel"))


@pytest.mark.parametrize("make, calib", [(tiny_model, tiny_calib), (GroupedNet, grouped_calib)])
def test_layer_errors_match_a_direct_computation(make, calib):
    torch.manual_seed(0)
    model = make().eval()
    batches = calib()
    report = tiny_report_for(model, batches)
    xs = _inputs(model, batches)
    mods = _weighted(model)
    keys = {"S": "err_s", "Q": "err_q", "S->Q": "err_sq", "Q->S": "err_qs"}
    assert report.layers
    for row in report.layers:
        name = row.layer.removesuffix(".weight")
        mod, w = mods[name], mods[name].weight.detach()
        for scheme in SCHEMES:
            w_hat, _ = apply_scheme(w, scheme, Pattern.parse(row.pattern), Format(row.format), row.layer)
            num = sum(float((_op(mod, x, w_hat) - _op(mod, x, w)).square().sum()) for x in xs[name])
            den = sum(float(_op(mod, x, w).square().sum()) for x in xs[name])
            assert getattr(row, keys[scheme]) == pytest.approx(num / den, rel=ISO_RTOL, abs=1e-15), (row, scheme)
        for scheme, key in (("S->Q", "werr_sq"), ("Q->S", "werr_qs")):
            w_hat, _ = apply_scheme(w, scheme, Pattern.parse(row.pattern), Format(row.format), row.layer)
            want = float((w_hat.double() - w.double()).square().sum() / w.double().square().sum())
            assert getattr(row, key) == pytest.approx(want, rel=ISO_RTOL)


def tiny_report_for(model, batches) -> InterplayReport:
    return interplay(model, batches, patterns=("50%", "2:4"), formats=("mxfp6_e3m2", "int4_channel"))


@pytest.mark.parametrize("make, calib", [(tiny_model, tiny_calib), (GroupedNet, grouped_calib)])
def test_accumulated_and_output_errors_match_the_compressed_model_run_eagerly(make, calib):
    torch.manual_seed(0)
    model = make().eval()
    batches = calib()
    report = tiny_report_for(model, batches)
    ref, ref_logits = _outputs(model, batches)
    mods = _weighted(model)
    keys = {"S": "acc_s", "Q": "acc_q", "S->Q": "acc_sq", "Q->S": "acc_qs"}
    for pattern in report.patterns:
        for fmt in report.formats:
            for scheme in SCHEMES:
                got, logits = _outputs(_scheme_model(model, scheme, Pattern.parse(pattern), Format(fmt)), batches)
                for row in report.layer_rows(pattern, fmt):
                    name = row.layer.removesuffix(".weight")
                    num = sum(float((b.double() - a.double()).square().sum()) for a, b in zip(ref[name], got[name]))
                    den = sum(float(_bias_free(mods[name], a).double().square().sum()) for a in ref[name])
                    assert getattr(row, keys[scheme]) == pytest.approx(num / den, rel=ACC_RTOL, abs=1e-12)
                num = sum(float((b - a).double().square().sum()) for a, b in zip(ref_logits, logits))
                den = sum(float(a.double().square().sum()) for a in ref_logits)
                row = report.model_row(scheme, pattern if scheme != "Q" else "", fmt if scheme != "S" else "")
                assert row.output_error == pytest.approx(num / den, rel=ACC_RTOL)


def test_the_first_layer_accumulates_nothing(tiny_report):
    first = [r for r in tiny_report.layers if r.depth == 0]
    assert first
    for r in first:
        for a, b in ((r.acc_s, r.err_s), (r.acc_q, r.err_q), (r.acc_sq, r.err_sq), (r.acc_qs, r.err_qs)):
            assert a == pytest.approx(b, rel=ACC_RTOL)


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "hbfp8", "int8_channel",
                                 "int4_channel"])
@pytest.mark.parametrize("pattern", ["50%", "50%/row", "2:4", "4:8", "1x4@50%", "4x4@50%"])
def test_s_then_q_quantises_the_masked_weight_and_keeps_its_zeros(pattern, fmt):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    p, f = Pattern.parse(pattern), Format(fmt)
    w_hat, mask = apply_scheme(w, "S->Q", p, f)
    assert torch.equal(mask, p.mask(w))
    assert torch.equal(w_hat, f.quantize(w * mask))
    assert bool((w_hat[~mask] == 0).all())
    s_hat, s_mask = apply_scheme(w, "S", p, f)
    assert torch.equal(s_mask, mask) and torch.equal(s_hat, w * mask)
    assert torch.equal(apply_scheme(w, "Q", p, f)[0], f.quantize(w))


def test_q_then_s_prunes_by_the_quantised_magnitudes_ties_by_index():
    # One MXFP4 block: max 6.0 sets the scale 2^0; 2.9 and 2.6 both round to 3.0 (a collision).
    w = torch.tensor([[2.9, 2.6, 0.1, 6.0] + [0.0] * 28])
    f, p = Format("mxfp4_e2m1"), Pattern.parse("2:4")
    wq = f.quantize(w)
    assert wq[0, 0] == wq[0, 1] == 3.0
    qs, qs_mask = apply_scheme(w, "Q->S", p, f)
    sq, sq_mask = apply_scheme(w, "S->Q", p, f)
    assert torch.equal(qs_mask, sp.nm_mask(wq, 2, 4))
    # Q->S: 3.0 vs 3.0 is a tie, the lower index (2.9, the larger weight) goes; S->Q prunes 2.6.
    assert qs_mask[0, :4].tolist() == [False, True, False, True]
    assert sq_mask[0, :4].tolist() == [True, False, False, True]
    assert torch.equal(qs, wq * qs_mask)
    assert float((qs - w).square().sum()) > float((sq - w).square().sum())


def test_orthogonality_quantities_are_consistent(tiny_report):
    for r in tiny_report.layers:
        assert r.sum_single == r.err_s + r.err_q
        assert r.excess_sq == r.err_sq - (r.err_s + r.err_q)
        assert r.excess_qs == r.err_qs - (r.err_s + r.err_q)
        assert r.ratio_sq == pytest.approx(r.err_sq / (r.err_s + r.err_q), rel=1e-15)
        assert r.ratio_qs == pytest.approx(r.err_qs / (r.err_s + r.err_q), rel=1e-15)
        assert r.order_gap == r.err_qs - r.err_sq
        assert (r.excess_sq > 0) == (r.ratio_sq > 1)
    for c in tiny_report.claims():
        rows = tiny_report.layer_rows(c.pattern, c.format)
        assert c.layers == len(rows)
        assert c.sq_le_qs == sum(r.err_sq <= r.err_qs for r in rows)
        assert c.nonorth_sq == sum(r.excess_sq > 0 for r in rows)
        s = tiny_report.model_row("S", c.pattern, "").output_error
        q = tiny_report.model_row("Q", "", c.format).output_error
        assert c.output_single_sum == s + q
        assert c.claim2 == (tiny_report.model_row("S->Q", c.pattern, c.format).output_error > s + q)


def test_report_round_trips_through_json_and_renders(tiny_report, tmp_path):
    again = InterplayReport.from_json(tiny_report.to_json())
    assert again == tiny_report
    assert [c.claim1 for c in again.claims()] == [c["claim1"] for c in json.loads(tiny_report.to_json())["claims"]]
    text = tiny_report.table(layers=True)
    assert "| S->Q | 2:4 | mxfp4_e2m1 |" in text and "(1) S->Q <= Q->S" in text and "c2.weight" in text
    paths = tiny_report.plot(tmp_path / "r")
    assert [p.name for p in paths] == ["r_layers.png", "r_gap.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_a_pattern_that_does_not_divide_a_layer_raises_or_is_recorded(tiny_report):
    with pytest.raises(FormatError, match=r"layer 'c1.weight': pattern '2:4'.*cols = 9.*m = 4"):
        interplay(tiny_model(), tiny_calib(), patterns=("2:4",), formats=("mxint8",), on_unfit="raise")
    skipped = [(s.layer, s.pattern) for s in tiny_report.skipped]
    assert skipped == [("c1.weight", "2:4")]
    assert "not divisible by m = 4" in tiny_report.skipped[0].reason
    assert {r.layer for r in tiny_report.layer_rows("2:4", "mxfp8_e4m3")} == \
        {"c2.weight", "fc.weight", "out.weight"}
    assert {r.layer for r in tiny_report.layer_rows("50%", "mxfp8_e4m3")} == {"c1.weight", "c2.weight", "fc.weight",
                                                                                "out.weight"}


def test_max_layers_and_embeddings_are_recorded_not_silent():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 8)

        def forward(self, ids):
            return self.b(torch.relu(self.a(self.emb(ids)))).mean(1)

    torch.manual_seed(0)
    ids = [torch.randint(0, 50, (4, 6))]
    r = interplay(WithEmbedding().eval(), ids, patterns=("2:4",), formats=("mxint8",), max_layers=1)
    assert {(s.layer, s.pattern) for s in r.skipped} == {("emb.weight", ""), ("b.weight", "")}
    assert "embedding" in next(s.reason for s in r.skipped if s.layer == "emb.weight")
    assert "max_layers=1" in next(s.reason for s in r.skipped if s.layer == "b.weight")
    assert [row.layer for row in r.layers] == ["a.weight"]


def test_the_callers_model_is_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    interplay(model, tiny_calib(), patterns=("50%",), formats=("mxfp4_e2m1",), evaluate=lambda m: {"x": 1.0})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_evaluate_sees_each_schemes_weights():
    seen = []

    def evaluate(m):
        w = m.get_parameter("fc.weight")
        seen.append(w.detach().clone())
        return {"zeros": float((w == 0).double().mean())}

    model = tiny_model()
    r = interplay(model, tiny_calib(), patterns=("50%",), formats=("mxfp8_e4m3",), evaluate=evaluate)
    assert [(m.scheme, m.metric("zeros")) for m in r.models][:2] == [("fp32", 0.0), ("S", pytest.approx(0.5, abs=0.02))]
    assert torch.equal(seen[0], model.fc.weight)
    assert torch.equal(seen[2], Format("mxfp8_e4m3").quantize(model.fc.weight))  # fp32, S, Q, S->Q, Q->S
    assert len(seen) == 5


def test_counted_bits():
    f8, f4, i4 = Format("mxfp8_e4m3"), Format("mxfp4_e2m1"), Format("int4_channel")
    assert f8.nbits((16, 64), 16 * 64) == 8 * fmts.raw_nbytes((16, 64), fmts.FORMATS["mxfp8_e4m3"]) \
        == 16 * 64 * 8 + 16 * 2 * 8
    assert f4.nbits((16, 64), 512) == 16 * 64 * 4 + 32 * 8 - 512 * 4
    assert i4.nbits((16, 64), 512) == 512 * 4 + 16 * 32
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    r = interplay(model, [torch.randn(8, 64)], patterns=("2:4", "50%"), formats=("mxfp8_e4m3",))
    n = 32 * 64
    sq24 = r.model_row("S->Q", "2:4", "mxfp8_e4m3")
    assert sq24.bits_ideal == pytest.approx(n / 2 * 8 + 32 * 2 * 8 + n / 4 * math.log2(6))
    assert sq24.bits_bitmap == n / 2 * 8 + 32 * 2 * 8 + n
    sq50 = r.model_row("Q->S", "50%", "mxfp8_e4m3")
    assert sq50.bits_ideal == pytest.approx(sq50.bits_bitmap)  # H(0.5) = 1 bit per weight
    assert r.model_row("fp32").cr_ideal == 1.0
    assert r.model_row("Q", "", "mxfp8_e4m3").bits_per_weight == 8.25


def test_format_and_pattern_names():
    assert [Pattern.parse(t).name for t in ("50%", "50%/row", "2:4", "4:8", "1x4@50%", "4x4@25%")] == \
        ["50%", "50%/row", "2:4", "4:8", "1x4@50%", "4x4@25%"]
    assert Format("hbfp8").block_format == fmts.hbfp(8, 64)
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(2))
    assert torch.equal(Format("hbfp8_b32").quantize(w), Format("mxint8").quantize(w))  # formats.py's claim
    for bad in ("50", "2:2", "4:2", "0x4@50%", "50%/col", "150%"):
        with pytest.raises(ConfigError):
            Pattern.parse(bad)
    for bad in ("mxfp3", "int9_channel", "int1_channel", "hbfp1"):
        with pytest.raises(ConfigError):
            Format(bad)
    with pytest.raises(ConfigError, match="given twice"):
        interplay(tiny_model(), tiny_calib(), patterns=("50%", "50%"), formats=("mxint8",))


def test_int_per_channel_is_symmetric_max_scaled_rtn():
    w = torch.tensor([[1.0, -0.5, 0.26, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = Format("int2_channel").quantize(w)  # qmax 1: step = max|row|
    assert got.tolist() == [[1.0, -0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    w = torch.tensor([[7.0, -3.5, 2.5, 0.3]])
    got = Format("int4_channel").quantize(w)  # qmax 7, step 1: ties go to the even integer
    assert got.tolist() == [[7.0, -4.0, 2.0, 0.0]]


def test_cli_analyze_on_a_module_function_model(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "rep"
    rc = main(["analyze", "test_analyze:tiny_model", "--calib", "test_analyze:tiny_calib", "--patterns", "50%", "2:4",
               "--formats", "mxfp8_e4m3", "mxfp4_e2m1", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| Q->S | 2:4 | mxfp4_e2m1 |" in text and "Claims:" in text
    assert sorted(p.name for p in out.iterdir()) == ["interplay.json", "interplay.md", "interplay_gap.png",
                                                      "interplay_layers.png"]
    report = InterplayReport.from_json((out / "interplay.json").read_text())
    assert report.model == "test_analyze:tiny_model" and report.formats == ("mxfp8_e4m3", "mxfp4_e2m1")
    assert main(["analyze", "test_analyze:tiny_model", "--calib", "test_analyze:tiny_calib", "--patterns", "2:4",
                 "--on-unfit", "raise", "-o", str(out)]) == 2
    assert "c1.weight" in capsys.readouterr().err
