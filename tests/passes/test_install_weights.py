"""passes/install_weights.py: an artifact's decoded weights and plain tensors go into a re-captured graph.

before     the caller's architecture (any instance: its own weights are not used) after
           normalize, fold_batchnorm, prune_unused_state: ``w = get_attr[fc.weight]``
transform  InstallDecodedWeights(decoded layers, plain tensors of the artifact)
expected   ``w = call_module[l2fx_weights.fc__weight]()``, a CodedWeight site carrying
           ``l2fx.site`` and ``l2fx.coded``; the graph's tensors exactly the coded layers plus
           the plain tensors, so state_dict and outputs are the compiled model's bit for bit;
           a missing, unexpected, mis-shaped or mis-typed tensor is an
           ArchitectureMismatchError naming it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import l2fx
from l2fx import coding
from l2fx.artifact import ArtifactReader, coded_layers
from l2fx.errors import ArchitectureMismatchError
from l2fx.frontend import CaptureInfo, recapture
from l2fx.ir import CodedInfo, WeightSite, get_meta, weight_sites
from l2fx.method import structural_pipeline
from l2fx.modules import CodedWeight
from l2fx.passes import DecodedLayer, InstallDecodedWeights
from l2fx.pipeline import PassContext, PassManager

from conftest import make_fast_config, make_tiny_calib, make_tiny_convnet

CALIB = make_tiny_calib()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """(compiled TinyConvNet at CR 10, path of its artifact)."""
    compiled = l2fx.compile(make_tiny_convnet(), 10, CALIB, config=make_fast_config(), verify=True)
    path = tmp_path_factory.mktemp("install") / "tiny.l2fx"
    l2fx.save(compiled, path)
    return compiled, path


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def decoded(compiled, path) -> tuple[list[DecodedLayer], dict[str, torch.Tensor]]:
    """The artifact's layers decoded from its streams (stored (s, e) from the file), and its plain tensors."""
    reader = ArtifactReader(path)
    infos = {info.param: info for _, info, _ in coded_layers(compiled.graph_module)}
    layers = []
    for entry in reader.layers:
        s, e = reader.tparams(entry)
        symbols = coding.decode_symbols(reader.stream(entry), decoder="constriction")
        layers.append(DecodedLayer(infos[entry.param], symbols, torch.from_numpy(s), torch.from_numpy(e)))
    return layers, reader.plain()


def install(layers, plain, seed: int = 5):
    """The structural passes and InstallDecodedWeights on a fresh instance, under the verifier."""
    gm = recapture(make_tiny_convnet(seed), CaptureInfo("fx"))
    with PassContext(verify=True):
        return PassManager([*structural_pipeline().passes, InstallDecodedWeights(layers, plain, "tiny.l2fx")])(gm).graph_module


def test_load_reproduces_the_compiled_model_bit_for_bit(artifact):
    compiled, path = artifact
    loaded = l2fx.load(path, make_tiny_convnet(seed=3), verify=True)  # other weights: none of them is used
    assert same_state(loaded.state_dict(), compiled.state_dict())
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(x), compiled(x))


def test_the_pass_installs_coded_sites_and_exactly_the_files_tensors(artifact):
    compiled, path = artifact
    layers, plain = decoded(compiled, path)
    gm = install(layers, plain)
    sites = {site.param: (node, site) for node, site in weight_sites(gm)}
    assert set(sites) == {layer.info.param for layer in layers} == {"c2.weight", "fc.weight", "out.weight"}
    for layer in layers:
        node, site = sites[layer.info.param]
        module = gm.get_submodule(str(node.target))
        assert isinstance(module, CodedWeight) and get_meta(node, CodedInfo) is layer.info
        assert isinstance(site, WeightSite) and site.shape == tuple(layer.info.entry["shape"])
        assert np.array_equal(module.codes.reshape(-1).numpy(), layer.symbols.astype(np.int8))
    assert same_state(gm.state_dict(), compiled.graph_module.state_dict())
    x = CALIB[2]
    with torch.no_grad():
        assert torch.equal(gm(x), compiled(x))


def _renamed(layer: DecodedLayer, param: str) -> DecodedLayer:
    info = dataclasses.replace(layer.info, param=param, entry={**layer.info.entry, "param": param})
    return dataclasses.replace(layer, info=info)


@pytest.mark.parametrize("change, named", [
    ("missing", "fc.bias"),
    ("extra", "head.bias"),
    ("dtype", "c1.bias"),
    ("shape", "out.bias"),
])
def test_a_plain_tensor_that_does_not_fit_is_named(artifact, change, named):
    compiled, path = artifact
    layers, plain = decoded(compiled, path)
    if change == "missing":
        del plain[named]
    elif change == "extra":
        plain[named] = torch.zeros(10)
    elif change == "dtype":
        plain[named] = plain[named].double()
    else:
        plain[named] = torch.cat([plain[named], plain[named][:1]])
    with pytest.raises(ArchitectureMismatchError, match=rf"tiny.l2fx: .*'{named}'"):
        install(layers, plain)


def test_a_layer_without_a_counterpart_is_named(artifact):
    compiled, path = artifact
    layers, plain = decoded(compiled, path)
    layers[0] = _renamed(layers[0], "c3.weight")
    with pytest.raises(ArchitectureMismatchError, match=r"tiny.l2fx: layer 'c3.weight' has no counterpart"):
        install(layers, plain)


def test_a_layer_whose_model_tensor_is_not_floating_is_named(artifact):
    compiled, path = artifact
    layers, plain = decoded(compiled, path)
    gm = recapture(make_tiny_convnet(), CaptureInfo("fx"))
    gm.fc.weight = torch.nn.Parameter(torch.zeros(64, 1568, dtype=torch.int32), requires_grad=False)
    with PassContext(verify=True):
        gm = structural_pipeline()(gm).graph_module
        with pytest.raises(ArchitectureMismatchError, match=r"layer 'fc.weight' is torch.int32 in the model"):
            PassManager([InstallDecodedWeights(layers, plain, "tiny.l2fx")])(gm)
