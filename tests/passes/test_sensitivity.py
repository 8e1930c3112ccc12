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
