"""sensitivity_analysis: measured output errors for a few candidates, the rest interpolated."""
from __future__ import annotations

import math

import torch

from l2fx.passes.sensitivity import estimate_distortions


def test_decoded_weights_are_made_only_for_measured_candidates():
    """Each candidate carries a thunk, not its decoded weights (56 copies of a 4096x4096
    layer took 4.4 GB); only the ``measured_points`` per family are decoded and run."""
    made = []

    def thunk(i):
        return lambda: made.append(i) or torch.full((4,), float(i))

    # two dead-zone families (e/s = 0.5 and 1.0), 6 steps each
    points = [(s, r * s, 100 - s, s * s, thunk(k), False)
              for k, (s, r) in enumerate((s, r) for r in (0.5, 1.0) for s in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0))]
    result = estimate_distortions(points, 2, lambda w: float(w[0]) + 1.0)
    assert len(made) == 4 and len(set(made)) == 4
    assert sum(exact for _, exact in result) == 4
    assert all(math.isfinite(d) and d > 0 for d, _ in result)



def test_family_without_usable_anchor_borrows_the_layers_ratios():
    """Output error 0 at both measured points of one family (it measured every candidate of
    that family before); now it interpolates with the other family's ratios."""
    made = []

    def thunk(i):
        return lambda: made.append(i) or torch.full((4,), float(i))

    steps = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    points = [(s, r * s, 100 - s, s * s, thunk(k), False)
              for k, (s, r) in enumerate((s, r) for r in (0.5, 1.0) for s in steps)]
    # family e/s = 1.0 (indices 6..11) reads 0 at its measured points
    result = estimate_distortions(points, 2, lambda w: 0.0 if float(w[0]) >= 6 else float(w[0]) + 1.0)
    assert len(made) == 4
    assert all(math.isfinite(d) and d > 0 for i, (d, exact) in enumerate(result) if not exact)


def test_layer_whose_every_measurement_is_zero_measures_no_more():
    made = []
    points = [(s, 0.5 * s, 100 - s, s * s, (lambda k=k: made.append(k) or torch.zeros(4)), False)
              for k, s in enumerate((1.0, 2.0, 4.0, 8.0))]
    result = estimate_distortions(points, 2, lambda w: 0.0)
    assert len(made) == 2 and all(d == 0.0 for d, _ in result)


def test_least_squares_fit_puts_every_point_of_a_family_on_one_line():
    """fit="least_squares": with 3+ measured ratios the family's curve is the least-squares line of
    log(output error / weight MSE) in log weight MSE, measured points included; on noise-free
    measurements that follow such a line it returns them unchanged, and noisy ones are smoothed."""
    import numpy as np

    steps = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    mses = [s * s for s in steps]
    points = [(s, 0.5 * s, 100 - s, m, (lambda m=m: torch.full((1,), m)), False) for s, m in zip(steps, mses)]

    def clean(w):  # alpha = 3 * mse^0.25: a line in log-log
        m = float(w[0])
        return 3.0 * m ** 0.25 * m

    exact = estimate_distortions(points, 7, clean, fit="least_squares")
    assert all(math.isclose(d, clean(torch.full((1,), m)), rel_tol=1e-9) for (d, _), m in zip(exact, mses))
    noise = [1.3, 0.7, 1.2, 0.8, 1.25, 0.75, 1.0]

    def noisy(w):
        m = float(w[0])
        return clean(w) * noise[mses.index(m)]

    interp = estimate_distortions(points, 7, noisy)
    fitted = estimate_distortions(points, 7, noisy, fit="least_squares")
    assert [d for d, _ in interp] == [noisy(torch.full((1,), m)) for m in mses]  # each point as measured
    x = np.log(mses)
    y = np.log([d / m for (d, _), m in zip(fitted, mses)])
    slope, intercept = np.polyfit(x, y, 1)
    assert np.allclose(y, intercept + slope * x)  # one line
    assert all(exact_flag for _, exact_flag in fitted)  # all 7 measured
    # Two anchors: the same curve as interpolation.
    two = estimate_distortions(points, 2, noisy, fit="least_squares")
    assert two == estimate_distortions(points, 2, noisy)


# --------------------------------------------------------------------------------------------
# scope="layer": distortions at the weight's readers, from one run of the model


class _Tied(torch.nn.Module):
    """One weight read by two linear ops (a tied pair), and a weight read once."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 32)

    def forward(self, x):
        h = torch.relu(self.shared(x))
        return self.head(torch.nn.functional.linear(h, self.shared.weight))


def _readings(gm, batch):
    from l2fx.evaluate import visit_readers
    from l2fx.ir import weight_sites

    seen = {}
    out = visit_readers(gm, batch, [n for n, _ in weight_sites(gm)],
                        lambda node, readings: seen.setdefault(node.meta["l2fx.site"].param, readings))
    return out, seen


def test_visit_readers_gives_every_weights_readers_and_the_models_output():
    from tests.passes.pass_cases import marked

    torch.manual_seed(0)
    model = _Tied().eval()
    x = torch.randn(8, 64)
    gm = marked(model, x)
    out, seen = _readings(gm, x)
    assert torch.allclose(out if isinstance(out, torch.Tensor) else out[0], model(x), atol=1e-6)
    assert sorted(seen) == ["head.weight", "shared.weight"]
    assert len(seen["shared.weight"]) == 2 and len(seen["head.weight"]) == 1


def test_local_error_is_the_relative_error_of_the_readers_outputs():
    """LocalError(W_hat) = sum over readers ||op(x, W_hat) - op(x, W)||^2 / sum ||op(x, W)||^2,
    re-derived by hand for the tied weight (two readers) and the head."""
    from l2fx.evaluate import LocalError
    from tests.passes.pass_cases import marked

    F = torch.nn.functional
    torch.manual_seed(0)
    model = _Tied().eval()
    x = torch.randn(8, 64)
    _, seen = _readings(marked(model, x), x)
    W, b = model.shared.weight.detach(), model.shared.bias.detach()
    noise = 0.05 * torch.randn_like(W)
    h = torch.relu(F.linear(x, W, b))
    num = (F.linear(x, W + noise, b) - F.linear(x, W, b)).pow(2).sum() + (F.linear(h, W + noise) - F.linear(h, W)).pow(2).sum()
    den = F.linear(x, W, b).pow(2).sum() + F.linear(h, W).pow(2).sum()
    err = LocalError(seen["shared.weight"])
    assert math.isclose(err(W + noise), float(num / den), rel_tol=1e-5)
    assert err(W) == 0.0
    head = LocalError(seen["head.weight"])
    Wh = model.head.weight.detach()
    hh = F.linear(h, W)
    ref = (F.linear(hh, torch.zeros_like(Wh))).pow(2).sum()  # W_hat = 0 leaves the bias: error ||W h||^2
    assert math.isclose(head(torch.zeros_like(Wh)),
                        float((hh @ Wh.T).pow(2).sum() / F.linear(hh, Wh, model.head.bias.detach()).pow(2).sum()),
                        rel_tol=1e-5)
    assert float(ref) == 0.0


def test_layer_scope_curves_measure_local_errors_and_compile_to_target():
    """End to end with scope='layer': every weight has a curve whose measured points are its
    local errors (so they differ from the model-scope ones), and a one-shot compile meets the
    target on counted bytes."""
    import dataclasses

    import l2fx
    from l2fx.config import CompileConfig, SensitivityConfig
    from l2fx.ir import SensitivityCurve, get_meta, weight_sites
    from l2fx.passes import SensitivityAnalysis
    from tests.passes.pass_cases import make_mlp, marked, mlp_calib, run

    model = make_mlp()
    calib = mlp_calib()
    curves = {}
    for scope in ("model", "layer"):
        cfg = CompileConfig(sensitivity=SensitivityConfig(scope=scope, num_samples=16))
        gm, records, _ = run(marked(model, calib[0], cfg), [SensitivityAnalysis()], cfg, calib)
        assert records["sensitivity_analysis"]["scope"] == scope
        curves[scope] = {site.param: get_meta(n, SensitivityCurve).candidates for n, site in weight_sites(gm)}
    assert curves["model"].keys() == curves["layer"].keys()
    for param in curves["model"]:
        lay, mod = curves["layer"][param], curves["model"][param]
        assert [c.nbytes for c in lay] == sorted(c.nbytes for c in lay)
        assert {c.nbytes for c in lay} == {c.nbytes for c in mod}  # same candidates, other distortions
        assert all(math.isfinite(c.distortion) and c.distortion >= 0 for c in lay)
    # The last layer's readers' output is the model's: the two scopes differ only in the energy
    # they divide by (the model scope's is centred over the batch), for every candidate alike.
    out = model(calib[0]).detach().double()
    centred = float((out - out.mean(0, keepdim=True)).pow(2).sum() / out.pow(2).sum())
    key = lambda c: (c.nbytes, c.step_s, c.threshold_e)  # noqa: E731
    last = sorted(curves["model"])[-1]
    for a, b in zip(sorted(curves["layer"][last], key=key), sorted(curves["model"][last], key=key)):
        assert math.isclose(a.distortion, b.distortion * centred, rel_tol=1e-4)
    first = sorted(curves["model"])[0]  # its noise passes through two more layers to the output
    assert not all(math.isclose(a.distortion, b.distortion * centred, rel_tol=1e-2) for a, b in
                   zip(sorted(curves["layer"][first], key=key), sorted(curves["model"][first], key=key)))
    cfg = dataclasses.replace(CompileConfig(), sensitivity=SensitivityConfig(scope="layer"))
    compiled = l2fx.compile(model, 6.0, calib, method="gptq", config=cfg)
    assert abs(compiled.report.compressed_cr / 6.0 - 1) <= 0.01


def test_scope_is_validated():
    import pytest

    from l2fx.config import SensitivityConfig
    from l2fx.errors import ConfigError

    with pytest.raises(ConfigError, match="scope"):
        SensitivityConfig(scope="block")
    with pytest.raises(ConfigError, match="joint_rounds"):
        SensitivityConfig(scope="layer", joint_rounds=1)


def test_visit_readers_frees_values_after_their_last_use():
    """By the time the last layer's weight is visited, the first layer's output (and the
    activations between) are gone: what the run holds does not grow with depth."""
    import weakref

    from l2fx.evaluate import visit_readers
    from l2fx.ir import weight_sites
    from tests.passes.pass_cases import make_mlp, marked

    model = make_mlp((64, 128, 128, 128, 64))
    x = torch.randn(8, 64)
    gm = marked(model, x)
    refs, alive_at_last = {}, {}
    sites = list(weight_sites(gm))
    last = sites[-1][1].param

    def visit(node, readings):
        param = node.meta["l2fx.site"].param
        refs[param] = weakref.ref(readings[0][3])
        if param == last:
            alive_at_last.update({p: r() is not None for p, r in refs.items() if p != last})

    visit_readers(gm, x, [n for n, _ in sites], visit)
    assert alive_at_last and not any(alive_at_last.values())


def test_kl_distortion_is_the_mean_kl_of_the_softmax_and_ignores_improbable_logits():
    """output_metric='kl': the mean KL(softmax(ref) || softmax(out)) per position, against an
    independent computation; a shift of every logit costs nothing, a change of an improbable
    class's logit far less than the same change of the likely class's (where MSE sees them alike)."""
    import pytest
    import torch.nn.functional as F

    from l2fx.data import CalibrationError, output_distortion

    torch.manual_seed(0)
    ref = torch.randn(3, 5, 7) * 3
    out = ref + 0.3 * torch.randn_like(ref)
    kl = output_distortion(ref, "kl")
    p = F.softmax(ref.double(), -1)
    expected = float((p * (p.log() - F.log_softmax(out.double(), -1))).sum(-1).mean())
    assert math.isclose(kl(out), expected, rel_tol=1e-9)
    assert kl(ref) == 0.0 and kl(ref + 5.0) < 1e-12
    logits = torch.tensor([[2.0, 2.0, -8.0]])  # two likely classes, one improbable
    kl1, mse1 = output_distortion(logits, "kl"), output_distortion(torch.cat([logits, logits - 1]), "mse")
    likely, unlikely = logits.clone(), logits.clone()
    likely[0, 0] += 1.0
    unlikely[0, 2] += 1.0
    assert kl1(unlikely) < 1e-3 * kl1(likely)
    assert math.isclose(mse1(torch.cat([likely, logits - 1])), mse1(torch.cat([unlikely, logits - 1])), rel_tol=1e-6)
    masked = ref.clone()
    masked[..., 0] = -math.inf  # a class the reference rules out: no NaN, and only the rest counts
    out_masked = out.clone()
    out_masked[..., 0] = -math.inf
    assert math.isfinite(output_distortion(masked, "kl")(out_masked))
    assert output_distortion(masked, "kl")(masked) == 0.0
    with pytest.raises(CalibrationError, match="logits"):
        output_distortion(torch.randn(4, 1), "kl")
    with pytest.raises(CalibrationError, match="output metric"):
        output_distortion(ref, "l1")


def test_output_distortion_leaves_out_a_language_models_padding():
    """With a batch's attention_mask [batch, tokens] and logits [batch, tokens, vocab], the KL is
    the mean over the real positions only (what perplexity counts) and the MSE sees zeros at the
    padded ones: a change at a padded position costs nothing; without a mask, or one that does
    not match the logits, every position counts."""
    import pytest
    import torch.nn.functional as F

    from l2fx.data import CalibrationError, output_distortion, real_positions

    torch.manual_seed(0)
    ref = torch.randn(2, 6, 9) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": mask}
    out = ref + 0.5 * torch.randn_like(ref)
    kl = output_distortion({"logits": ref}, "kl", batch)
    keep = mask.bool()
    p = F.softmax(ref[keep].double(), -1)
    expected = float((p * (p.log() - F.log_softmax(out[keep].double(), -1))).sum(-1).mean())
    assert math.isclose(kl({"logits": out}), expected, rel_tol=1e-9)
    padded = out.clone()
    padded[~keep] += 10 * torch.randn_like(padded[~keep])
    assert kl({"logits": padded}) == kl({"logits": out})
    every = output_distortion(ref, "kl")(padded)
    assert every > 2 * kl({"logits": padded})
    mse = output_distortion({"logits": ref}, "mse", batch)  # MSE, too: padding counts nothing
    assert mse({"logits": padded}) == mse({"logits": out}) > 0
    assert output_distortion(ref, "mse")(padded) > 2 * mse({"logits": padded})
    assert real_positions(batch, torch.randn(2, 9)) is None  # a classifier's [batch, classes]
    assert real_positions({"attention_mask": mask}, torch.randn(2, 5, 9)) is None  # tokens differ
    assert real_positions(torch.zeros(2, 6), ref) is None
    for metric in ("mse", "kl"):
        with pytest.raises(CalibrationError, match="padding"):
            output_distortion(ref, metric, {"attention_mask": torch.zeros(2, 6)})


def test_mse_distortion_of_one_sample_is_relative_to_its_energy():
    """One sample has no spread about the batch mean: its MSE distortion is relative to the
    sample's own energy (before: to a clamped 1e-30, distortions near 1e35); a larger batch is
    relative to the spread about its mean, as before."""
    from l2fx.data import output_distortion, relative_error

    torch.manual_seed(0)
    ref = torch.randn(1, 7, 5)
    assert math.isclose(relative_error(1.1 * ref, ref), 0.01, rel_tol=1e-5)
    assert math.isclose(output_distortion(ref, "mse")(1.1 * ref), 0.01, rel_tol=1e-5)
    two = torch.randn(2, 4, dtype=torch.float64) + 100.0
    centred = float((two - two.mean(0)).pow(2).sum())
    assert math.isclose(relative_error(two + 0.1, two), float(0.01 * two.numel()) / centred, rel_tol=1e-5)


def test_kl_output_metric_gives_kl_curves_and_compiles_to_target():
    """End to end: with output_metric='kl' every measured distortion is the model output's KL
    (so the curves differ from the MSE ones on the same candidates) and a compile meets its CR."""
    import dataclasses

    import l2fx
    from l2fx.config import CompileConfig, SensitivityConfig
    from l2fx.ir import SensitivityCurve, get_meta, weight_sites
    from l2fx.passes import SensitivityAnalysis
    from tests.passes.pass_cases import make_mlp, marked, mlp_calib, run

    model, calib = make_mlp(), mlp_calib()
    curves = {}
    for metric in ("mse", "kl"):
        cfg = CompileConfig(sensitivity=SensitivityConfig(output_metric=metric, num_samples=16))
        gm, _, _ = run(marked(model, calib[0], cfg), [SensitivityAnalysis()], cfg, calib)
        curves[metric] = {site.param: get_meta(n, SensitivityCurve).candidates for n, site in weight_sites(gm)}
    for param, kl in curves["kl"].items():
        mse = curves["mse"][param]
        assert [c.nbytes for c in kl] == [c.nbytes for c in mse]
        assert all(math.isfinite(c.distortion) and c.distortion >= 0 for c in kl)
        assert [c.distortion for c in kl] != [c.distortion for c in mse]
    cfg = dataclasses.replace(CompileConfig(), sensitivity=SensitivityConfig(output_metric="kl", joint_rounds=1))
    compiled = l2fx.compile(model, 6.0, calib, method="gptq", config=cfg)
    assert abs(compiled.report.compressed_cr / 6.0 - 1) <= 0.01
    assert model(calib[0]).shape == compiled(calib[0]).shape


def test_output_metric_is_validated():
    import pytest

    from l2fx.config import SensitivityConfig
    from l2fx.errors import ConfigError

    with pytest.raises(ConfigError, match="output_metric"):
        SensitivityConfig(output_metric="ce")
    with pytest.raises(ConfigError, match="scope='model'"):
        SensitivityConfig(scope="layer", output_metric="kl")
