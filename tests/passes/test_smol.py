"""SMOL and SMOL-L (seed 004): the bit-value grid, the precision map carried by the symbols,
the counted-byte target, save/load, options, and the shuffled-precision control."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import l2fx
from l2fx.errors import ConfigError, TargetCRError
from l2fx.ir import get_meta, weight_sites
from l2fx.modules import CodedWeight
from l2fx.precision import (PrecisionMap, SmolOptions, clip_range, grid_unit, integer_precisions, map_code_bits,
                            precision_of_s, precision_of_symbols, quantize_at, s_of_precision,
                            shuffle_within_layer)

from conftest import make_fast_config, make_tiny_calib, make_tiny_convnet

# Few Adam steps: the tests check the pipeline's contracts, not how well the precisions are learned.
FAST = (("iters", 2), ("batch_size", 8))
TARGET = 12.0


def _compile(method: str, extra: tuple = ()) -> l2fx.CompiledModel:
    config = make_fast_config().replace(method_options=FAST + extra)
    return l2fx.compile(make_tiny_convnet(), TARGET, make_tiny_calib(), method=method, config=config, verify=True)


@pytest.fixture(scope="module")
def smol():
    return _compile("smol")


@pytest.fixture(scope="module")
def smol_l():
    return _compile("smol-l")


# ---------------------------------------------------------------------------------------------
# The grid and the reparametrisation


def test_reparametrisation_inverts_and_penalty_is_bits():
    p = torch.tensor([1.25, 2.0, 3.5, 7.0])
    assert torch.allclose(precision_of_s(s_of_precision(p)), p, atol=1e-5)
    s = torch.linspace(-6, 6, 13)
    # sigmoid(s) = 2^(1-p): the noise amplitude of Eq. 11 at precision p.
    assert torch.allclose(torch.sigmoid(s), 2.0 ** (1 - precision_of_s(s)), atol=1e-6)


@pytest.mark.parametrize("P", [3, 7])
def test_quantize_at_is_the_bit_value_grid_and_its_precision_is_readable(P):
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(4000, generator=g) * 2 - 1) * (2 ** P - 1)
    p = torch.randint(0, P + 1, r.shape, generator=g, dtype=torch.int8)
    q = quantize_at(r, p, P)
    assert torch.equal(precision_of_symbols(q, P), p)  # the map is a function of the symbols
    nz = p > 0
    half = 2.0 ** (P - p[nz].float())  # half a cell of the precision-p grid
    assert ((q[nz].float() - r[nz]).abs() <= half + 1e-4).all()
    assert (q[~nz] == 0).all()
    # theta = sum_j b_j 2^(1-j), b_j = +-1: at precision p the 2^p odd multiples of 2^(1-p).
    for k in range(1, P + 1):
        values = torch.unique(quantize_at(torch.linspace(-(2 ** P - 1), 2 ** P - 1, 5000), torch.tensor(k), P))
        theta = values.double() / 2 ** (P - 1)
        assert values.numel() == 2 ** k
        assert torch.equal(theta * 2 ** (k - 1) % 2, torch.ones_like(theta))  # odd multiples of 2^(1-k)
    # Projection: rounding a grid point at its own precision gives it back.
    assert torch.equal(quantize_at(q.float(), p, P), q)


def test_clip_range_beats_the_full_range_at_low_precision():
    w = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    amax = float(w.abs().max())

    def mse(a: float, p: int) -> float:
        unit = grid_unit(a, 1.0, 7)
        return float((quantize_at(w.clamp(-a, a) / unit, torch.tensor(p), 7).float() * unit - w).pow(2).mean())

    for p in (1, 2, 3):
        a = clip_range(w, p, 7)
        assert 0 < a <= amax and mse(a, p) <= mse(amax, p)
    assert clip_range(w, 2, 7) < clip_range(w, 5, 7)  # finer grids afford a wider range
    assert clip_range(torch.zeros(10), 2, 7) == 0.0


def test_integer_precisions_offset_and_zero_precision():
    p = torch.tensor([1.0, 1.6, 2.4, 6.9])
    assert integer_precisions(p, 0.0, 7).tolist() == [1, 2, 2, 7]
    assert integer_precisions(p, 1.5, 7).tolist() == [0, 0, 1, 5]


def test_shuffle_control_keeps_histogram_and_moves_precisions():
    p = torch.arange(8, dtype=torch.int8).repeat(50).reshape(20, 20)
    out = shuffle_within_layer(p, torch.Generator().manual_seed(3))
    assert out.shape == p.shape and torch.equal(out.reshape(-1).sort().values, p.reshape(-1).sort().values)
    assert (out != p).float().mean() > 0.5


def test_map_code_bits_split_is_exact():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(64, 50, generator=g) * 30
    p = torch.randint(0, 8, r.shape, generator=g, dtype=torch.int8)
    bits = map_code_bits(quantize_at(r, p, 7), 7)
    # H(r) = H(p) + H(r | p): the precision is a function of the symbol.
    assert bits["joint"] == pytest.approx(bits["map_order0"] + bits["values_given_p"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# The methods


@pytest.mark.parametrize("which", ["smol", "smol_l"])
def test_target_met_on_counted_bytes_and_artifact_roundtrips(which, request, tmp_path):
    compiled = request.getfixturevalue(which)
    report = compiled.report
    assert abs(report.compressed_cr / TARGET - 1) <= 0.01
    gm = compiled.graph_module
    for node, site in weight_sites(gm):
        coded, pm = gm.get_submodule(str(node.target)), get_meta(node, PrecisionMap)
        assert isinstance(coded, CodedWeight) and pm is not None
        assert torch.equal(precision_of_symbols(coded.codes, pm.max_precision), pm.precision)
    path = tmp_path / "m.l2fx"
    assert l2fx.save(compiled, path) == path.stat().st_size
    restored = l2fx.load(path, model=make_tiny_convnet(seed=5))
    x = make_tiny_calib()[0]
    assert torch.equal(restored(x), compiled(x))
    assert restored.artifact_bytes() == path.read_bytes()
    # The precision map decodes from the loaded codes alone, exactly.
    loaded = dict(restored.graph_module.named_modules())
    for node, site in weight_sites(gm):
        pm = get_meta(node, PrecisionMap)
        assert torch.equal(precision_of_symbols(loaded[str(node.target)].codes, pm.max_precision), pm.precision)


def test_smol_l_has_one_precision_per_layer_and_smol_varies(smol, smol_l):
    for node, _ in weight_sites(smol_l.graph_module):
        assert get_meta(node, PrecisionMap).precision.unique().numel() == 1
    distinct = [get_meta(n, PrecisionMap).precision.unique().numel() for n, _ in weight_sites(smol.graph_module)]
    assert max(distinct) > 1
    rec = smol.report.records["smol_round"]
    assert 0.0 <= rec["zero_fraction"] < 1.0 and rec["map_bits"] <= rec["joint_bits"]


def test_caller_model_unmodified():
    model, calib = make_tiny_convnet(), make_tiny_calib()
    before = copy.deepcopy(model.state_dict())
    # With clip (off by default): the clipped range is on the weight copy, never on the model.
    config = make_fast_config().replace(method_options=(("iters", 1), ("batch_size", 4), ("clip", True)))
    compiled = l2fx.compile(model, TARGET, calib, method="smol-l", config=config)
    assert abs(compiled.report.compressed_cr / TARGET - 1) <= 0.01
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("options", [(("lambda", 0.1),), (("lam", -1.0),), (("max_precision", 8),),
                                     (("iters", True),), (("iters", "10"),), (("lr_s", float("nan")),),
                                     (("init_precision", 0.5),), (("schedule", "linear"),), (("shuffle", 1),),
                                     (("antithetic", 0),), (("clip", "yes"),), (("downstream", 1),)])
def test_bad_options_are_config_errors(options):
    config = make_fast_config().replace(method_options=options)
    with pytest.raises(ConfigError):
        l2fx.compile(make_tiny_convnet(), TARGET, make_tiny_calib(), method="smol", config=config)


def test_unreachable_target_is_a_target_cr_error():
    # CR 2 asks for 16 counted bits per weight; the finest grid (P = 3 here) gives about 3.
    config = make_fast_config().replace(method_options=(("iters", 1), ("batch_size", 4), ("max_precision", 3)))
    with pytest.raises(TargetCRError, match="highest precision 3"):
        l2fx.compile(make_tiny_convnet(), 2.0, make_tiny_calib(), method="smol-l", config=config)


def test_options_parse():
    o = SmolOptions.from_pairs((("lam", 0.5), ("schedule", "constant")), per_layer=True)
    assert o.per_layer and o.lam == 0.5 and o.schedule.value == "constant"
    assert SmolOptions().start_precision(8.0) == pytest.approx(5.0)


def test_shuffled_precision_control_compiles_on_target(smol):
    shuffled = _compile("smol", (("shuffle", True),))
    assert abs(shuffled.report.compressed_cr / TARGET - 1) <= 0.01
    a = {s.param: get_meta(n, PrecisionMap).precision for n, s in weight_sites(smol.graph_module)}
    b = {s.param: get_meta(n, PrecisionMap).precision for n, s in weight_sites(shuffled.graph_module)}
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert shuffled.report.records["smol_round"]["shuffle"] is True


# ---------------------------------------------------------------------------------------------
# The grid's layout: a range per cell of the layer's granularity


@pytest.mark.parametrize("granularity,group_size", [("per_channel", 128), ("per_tensor", 128), ("per_group", 32)])
def test_grid_layout_follows_the_granularity_and_roundtrips(granularity, group_size, tmp_path):
    config = make_fast_config().replace(method_options=FAST, granularity=l2fx.Granularity(granularity),
                                        group_size=group_size)
    compiled = l2fx.compile(make_tiny_convnet(), TARGET, make_tiny_calib(), method="smol-l", config=config,
                            verify=True)
    assert abs(compiled.report.compressed_cr / TARGET - 1) <= 0.01
    gm = compiled.graph_module
    for node, site in weight_sites(gm):
        coded, pm = gm.get_submodule(str(node.target)), get_meta(node, PrecisionMap)
        want = {"per_tensor": (1,), "per_channel": (site.shape[site.channel_axis],),
                "per_group": (site.shape[0], -(-(site.numel // site.shape[0]) // group_size))}[granularity]
        assert tuple(pm.unit.shape) == want
        assert torch.equal(precision_of_symbols(coded.codes, pm.max_precision), pm.precision)
    path = tmp_path / "m.l2fx"
    l2fx.save(compiled, path)
    x = make_tiny_calib()[0]
    assert torch.equal(l2fx.load(path, model=make_tiny_convnet(seed=5))(x), compiled(x))


class _Rows(torch.nn.Module):
    """One linear layer whose output rows span three orders of magnitude (as a depthwise conv's
    channels do after batch-norm folding)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 48)
        with torch.no_grad():
            self.fc.weight.mul_(torch.logspace(-2, 1, 48).unsqueeze(1))

    def forward(self, x):
        return self.fc(x)


def test_a_range_per_channel_keeps_the_small_channels():
    model = _Rows()
    calib = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    w = model.fc.weight.detach()
    errs = {}
    for granularity in ("per_tensor", "per_channel"):
        config = make_fast_config().replace(method_options=FAST, granularity=l2fx.Granularity(granularity))
        compiled = l2fx.compile(model, 6.0, calib, method="smol-l", config=config)
        assert abs(compiled.report.compressed_cr / 6.0 - 1) <= 0.01
        gm = compiled.graph_module
        (node, _), = weight_sites(gm)
        q = gm.get_submodule(str(node.target))().detach()
        errs[granularity] = ((q - w).norm(dim=1) / w.norm(dim=1)).max()  # the worst row's relative error
    # One range for the layer rounds the smallest rows to zero (relative error 1); a range per
    # row gives every row the same relative precision.
    assert errs["per_tensor"] > 0.9
    assert errs["per_channel"] < 0.3


def test_a_target_below_the_grids_own_bytes_is_a_target_cr_error():
    # Groups of 8 weights: one float16 unit each is 2 bits per weight, over CR 20's 1.6 before a
    # single symbol is coded; a clear error, not a fit outside the window.
    config = make_fast_config().replace(method_options=FAST, granularity=l2fx.Granularity("per_group"),
                                        group_size=8)
    with pytest.raises(TargetCRError, match="every weight pruned"):
        l2fx.compile(make_tiny_convnet(), 20.0, make_tiny_calib(), method="smol-l", config=config)


# ---------------------------------------------------------------------------------------------
# downstream: each layer's bits priced by how much of its block's error reaches the output


class _DeadBranch(torch.nn.Module):
    """A main path (fc0 -> fc2) and a branch (fc1 -> fc3) that a ReLU shuts: ``fc1``'s and
    ``fc3``'s weights can change without the output changing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.fc1 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 64)
        self.fc2, self.fc3 = torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        return self.fc2(h) + self.fc3(torch.relu(self.fc1(h) - 1e4))


def _downstream(compiled: l2fx.CompiledModel) -> dict[str, dict[str, float]]:
    return {k: v["downstream"] for k, v in compiled.report.records["smol_precision"]["layers"].items()}


def test_downstream_weights_are_normalised_and_bounded():
    compiled = _compile("smol-l", (("downstream", True),))
    assert abs(compiled.report.compressed_cr / TARGET - 1) <= 0.01
    assert compiled.report.records["smol_precision"]["downstream"] is True
    ds = _downstream(compiled)
    assert set(ds) == {s.param for _, s in weight_sites(compiled.graph_module)}
    for v in ds.values():
        assert v["d_out"] > 0 and v["d_blk"] > 0 and v["gain"] == pytest.approx(v["d_out"] / v["d_blk"])
        assert 1e-3 < v["weight"] < 1e3
    # The penalty weights' geometric mean over the weights is 1: lambda keeps its scale.
    log_mean = sum(v["numel"] * math.log(v["weight"]) for v in ds.values()) / sum(v["numel"] for v in ds.values())
    assert log_mean == pytest.approx(0.0, abs=1e-9)
    # The last layer's block output is the network's output: its gain is the ratio of the two
    # error measures alone (centred over the batch vs not), at least 1.
    assert ds["out.weight"]["gain"] >= 1.0


def test_a_weight_whose_error_never_reaches_the_output_gets_the_highest_price():
    model = _DeadBranch()
    calib = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = make_fast_config().replace(method_options=FAST + (("downstream", True),))
    compiled = l2fx.compile(model, 8.0, calib, method="smol-l", config=config)
    assert abs(compiled.report.compressed_cr / 8.0 - 1) <= 0.01
    ds = _downstream(compiled)
    for dead in ("fc1.weight", "fc3.weight"):
        assert ds[dead]["d_out"] == 0.0 and ds[dead]["weight"] == 1e3
    for live in ("fc0.weight", "fc2.weight"):
        assert ds[live]["d_out"] > 0 and ds[live]["weight"] < 1e3
