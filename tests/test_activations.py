"""Static per-tensor activation quantisation (l2fx/activations.py): the quantiser's invariants and
its calibration from a histogram."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from l2fx.activations import HISTOGRAM_BINS, ActQuantSpec, RangeHistogram, expected_sq_error, fit_spec
from l2fx.errors import ConfigError

specs = st.builds(lambda bits, scale, z: ActQuantSpec(bits, scale, min(z, (1 << bits) - 1)),
                  st.integers(2, 8), st.floats(1e-4, 10.0), st.integers(0, 255))


def _x(seed: int, n: int = 500, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


@given(spec=specs, seed=st.integers(0, 2 ** 16))
def test_q_is_a_projection_onto_its_grid_holding_zero(spec, seed):
    x = _x(seed, scale=spec.scale * (1 << spec.bits))
    q = spec(x)
    assert torch.equal(spec(q), q)  # idempotent
    levels = q / spec.scale + spec.zero_point
    assert torch.equal(levels, levels.round()) or torch.allclose(levels, levels.round(), atol=1e-3)
    assert float(levels.min()) >= -1e-3 and float(levels.max()) <= (1 << spec.bits) - 1 + 1e-3
    assert float(spec(torch.zeros(3)).abs().max()) == 0.0  # 0 is exact: ReLU zeros and conv padding stay zero
    lo = -spec.zero_point * spec.scale
    hi = ((1 << spec.bits) - 1 - spec.zero_point) * spec.scale
    inside = (x >= lo) & (x <= hi)
    if bool(inside.any()):
        assert float((q - x)[inside].abs().max()) <= spec.scale / 2 * (1 + 1e-4) + 1e-6


@given(spec=specs, seed=st.integers(0, 2 ** 16))
def test_q_is_monotone_and_keeps_dtype_and_shape(spec, seed):
    x = _x(seed).sort().values.reshape(20, 25)
    q = spec(x.reshape(-1))
    assert bool((q[1:] >= q[:-1]).all())
    h = spec(x.half())
    assert h.dtype == torch.float16 and h.shape == x.shape


def test_spec_validation_names_the_field():
    with pytest.raises(ConfigError, match="bits"):
        ActQuantSpec(9, 1.0, 0)
    with pytest.raises(ConfigError, match="scale"):
        ActQuantSpec(8, 0.0, 0)
    with pytest.raises(ConfigError, match="scale"):
        ActQuantSpec(8, math.inf, 0)
    with pytest.raises(ConfigError, match="scale"):
        ActQuantSpec(8, 1e300, 0)  # no float32 value
    with pytest.raises(ConfigError, match="zero_point"):
        ActQuantSpec(4, 1.0, 16)
    # The scale is kept as the float32 value it is applied as.
    s = ActQuantSpec(8, 0.1, 3)
    assert s.scale == float(torch.tensor(0.1, dtype=torch.float32)) and s.scale != 0.1


def _hist(*batches: torch.Tensor) -> RangeHistogram:
    h = RangeHistogram()
    for b in batches:
        h.observe_range(b)
    h.freeze()
    for b in batches:
        h.observe(b)
    return h


@given(seed=st.integers(0, 2 ** 16), bits=st.sampled_from([2, 4, 8]))
def test_fitted_range_beats_min_max_and_estimates_the_real_error(seed, bits):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(4000, generator=g), 40 * torch.randn(4, generator=g)])  # a few outliers
    h = _hist(x[:2000], x[2000:])
    assert float(h.counts.sum()) == x.numel()
    spec = fit_spec(h, bits)
    minmax = ActQuantSpec.of_range(bits, float(x.min()), float(x.max()))
    real = lambda s: float(((s(x) - x) ** 2).mean())  # noqa: E731
    # The histogram's estimate is within two bin widths (in RMS) of the real error...
    width = (h.hi - h.lo) / HISTOGRAM_BINS
    for s in (spec, minmax):
        est = expected_sq_error(h, s)
        assert abs(math.sqrt(est) - math.sqrt(real(s))) <= 2 * width
    # ... so the range it picks (min/max is a candidate) is no worse than min/max beyond that
    # (at 8 bits a level is 8 bins wide and the estimate can rank near-ties either way) ...
    assert math.sqrt(real(spec)) <= math.sqrt(real(minmax)) + 4 * width



def test_clipping_pays_on_heavy_tails_at_four_bits():
    """Laplace inputs: min/max spends the 16 levels on the rare tails; the MSE range clips them."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(20000).exponential_(generator=g) * (torch.randint(0, 2, (20000,), generator=g) * 2 - 1)
    spec = fit_spec(_hist(x), 4)
    minmax = ActQuantSpec.of_range(4, float(x.min()), float(x.max()))
    err = lambda s: float(((s(x) - x) ** 2).mean())  # noqa: E731
    assert spec.scale < 0.7 * minmax.scale and err(spec) < 0.7 * err(minmax)


def test_relu_inputs_get_an_unsigned_grid_and_constant_inputs_are_exact():
    x = torch.relu(_x(0))
    spec = fit_spec(_hist(x), 4)
    assert spec.zero_point == 0 and float(spec(torch.zeros(1))) == 0.0
    zeros = _hist(torch.zeros(50))
    assert torch.equal(fit_spec(zeros, 8)(torch.zeros(5)), torch.zeros(5))


def test_histogram_use_out_of_order_is_a_config_error():
    h = RangeHistogram()
    with pytest.raises(ConfigError, match="freeze"):
        h.observe(torch.ones(3))
    with pytest.raises(ConfigError, match="observe"):
        fit_spec(h, 8)
    h.observe_range(torch.ones(3))
    h.freeze()
    with pytest.raises(ConfigError, match="frozen"):
        h.observe_range(torch.ones(3))
