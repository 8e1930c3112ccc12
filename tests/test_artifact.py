"""The artifact: corruption, truncation, version and architecture errors; safetensors compatibility."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import given
from hypothesis import strategies as st

import l2fx
from l2fx.artifact import MANIFEST, PLAIN_PREFIX, Chunks, decode_manifest, encode_manifest, safetensors_bytes

# The fixture has no per-group layer, so it is written in format version 2 (3 only adds groups).
VERSION = 2
from l2fx.errors import ArchitectureMismatchError, ArtifactError, ArtifactVersionError, CorruptArtifactError

from conftest import make_tiny_convnet


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from l2fx.config import CompileConfig, SensitivityConfig

    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    config = CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=10))
    compiled = l2fx.compile(make_tiny_convnet(), target_cr=8, calib=x, config=config)
    path = tmp_path_factory.mktemp("art") / "m.l2fx"
    l2fx.save(compiled, path)
    return path, compiled


def test_safetensors_library_reads_our_bytes():
    arrays = {"a": np.arange(5, dtype=np.float32), "b": np.arange(3, dtype=np.uint8), "c": np.ones((2, 2), np.float16)}
    data = safetensors_bytes(arrays, {"k": "v"})
    back = safetensors.numpy.load(data)
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())
    assert safetensors_bytes(arrays, {"k": "v"}) == data  # deterministic


def test_every_payload_byte_flip_is_detected(artifact, tmp_path):
    path, _ = artifact
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    for i, pos in enumerate(rng.integers(8 + header_len, len(data), size=25)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        p = tmp_path / f"bad{i}.l2fx"
        p.write_bytes(bytes(bad))
        with pytest.raises(CorruptArtifactError):
            l2fx.load(p, model=make_tiny_convnet())


def test_corrupt_payload_error_names_the_layer_and_chunk(artifact, tmp_path):
    path, _ = artifact
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + header_len])["l2fx.payload"]["data_offsets"]
    data[8 + header_len + start] ^= 0x01  # the first byte of the first layer's first chunk
    p = tmp_path / "payload.l2fx"
    p.write_bytes(bytes(data))
    for action in (lambda: l2fx.load(p, model=make_tiny_convnet()), lambda: l2fx.inspect(p)):
        with pytest.raises(CorruptArtifactError, match=r"layer '[\w.]+': chunk 0: CRC32 mismatch"):
            action()


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5, 0.999])
def test_truncated_file(artifact, tmp_path, keep):
    path, _ = artifact
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    p = tmp_path / "t.l2fx"
    p.write_bytes(data[:n])
    with pytest.raises(CorruptArtifactError):
        l2fx.load(p, model=make_tiny_convnet())
    with pytest.raises(CorruptArtifactError):
        l2fx.inspect(p)


def _manifest(arrays):
    return json.loads(decode_manifest(arrays[MANIFEST].tobytes(), VERSION))


def _rewrite_manifest(path, out, change, version=str(VERSION)):
    """Rewrites the artifact at ``path`` into ``out`` with ``change`` applied to its manifest,
    stored as format ``version`` stores it (metadata and checksum consistent)."""
    arrays = safetensors.numpy.load(path.read_bytes())
    manifest = _manifest(arrays)
    change(manifest)
    encoding = int(version) if version.isdigit() and int(version) in (1, 2, 3, 4) else VERSION
    arrays[MANIFEST] = np.frombuffer(encode_manifest(manifest, encoding), dtype=np.uint8)
    crc = zlib.crc32(arrays[MANIFEST].tobytes())
    out.write_bytes(safetensors_bytes(arrays, {"format": "l2fx", "version": version, "manifest_crc32": str(crc)}))


@pytest.mark.parametrize("version", ["1", "2", "99"])
def test_wrong_version(artifact, tmp_path, version):
    path, _ = artifact
    out = tmp_path / "v.l2fx"
    _rewrite_manifest(path, out, lambda m: m.update(version=99), version=version)
    with pytest.raises(ArtifactVersionError, match="version '?99"):
        l2fx.load(out, model=make_tiny_convnet())


def test_manifest_edit_without_checksum_is_corruption(artifact, tmp_path):
    path, _ = artifact
    arrays = safetensors.numpy.load(path.read_bytes())
    manifest = _manifest(arrays)
    manifest["original_nbytes"] += 1
    arrays[MANIFEST] = np.frombuffer(encode_manifest(manifest), dtype=np.uint8)
    out = tmp_path / "m.l2fx"
    out.write_bytes(safetensors_bytes(arrays, {"format": "l2fx", "version": str(VERSION), "manifest_crc32": "0"}))
    with pytest.raises(CorruptArtifactError, match="manifest"):
        l2fx.inspect(out)


def _as_version_1(path, out):
    """Writes the artifact at ``path`` as format version 1 did: manifest as plain JSON, every
    plain tensor under its own name (not packed per dtype), its CRC-32 and dtype in the manifest."""
    arrays = safetensors.numpy.load(path.read_bytes())
    manifest = _manifest(arrays)
    cursors = {}
    for name, (dtype, key, shape) in manifest["plain"].items():
        pack = arrays[PLAIN_PREFIX + key]
        start = cursors.get(key, 0)
        n = int(np.prod(shape))
        arrays[name] = pack[start: start + n].reshape(shape).copy()
        cursors[key] = start + n
        manifest["plain"][name] = dtype
        manifest["crc32"][name] = zlib.crc32(arrays[name].tobytes())
    for key in cursors:
        del arrays[PLAIN_PREFIX + key], manifest["crc32"][PLAIN_PREFIX + key]
    manifest["version"] = 1
    arrays[MANIFEST] = np.frombuffer(encode_manifest(manifest, 1), dtype=np.uint8)
    out.write_bytes(safetensors_bytes(arrays, {"format": "l2fx", "version": "1",
                                               "manifest_crc32": str(zlib.crc32(arrays[MANIFEST].tobytes()))}))


def test_version_1_artifact_still_loads(artifact, tmp_path):
    """Version 1 stored the manifest as plain JSON; a file written then loads as it did."""
    path, compiled = artifact
    out = tmp_path / "v1.l2fx"
    _as_version_1(path, out)
    assert safetensors.numpy.load(out.read_bytes())[MANIFEST][:1].tobytes() == b"{"
    restored = l2fx.load(out, model=make_tiny_convnet())
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored(x), l2fx.load(path, model=make_tiny_convnet())(x))
    v1, v2 = l2fx.inspect(out), l2fx.inspect(path)
    assert v1.compressed_cr == v2.compressed_cr and v1.file_cr < v2.file_cr


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                     max_leaves=30)


@given(manifest=st.dictionaries(st.text(), _json, max_size=6), version=st.sampled_from([1, 2]))
def test_manifest_encoding_round_trips(manifest, version):
    stored = encode_manifest(manifest, version)
    assert json.loads(decode_manifest(stored, version)) == manifest


@pytest.mark.parametrize("edit", ["shape", "dtype", "short", "extra"])
def test_bad_plain_entries_are_corruption(artifact, tmp_path, edit):
    path, _ = artifact

    def change(m):
        name = next(iter(m["plain"]))
        dtype, key, shape = m["plain"][name]
        m["plain"][name] = {"shape": [dtype, key, [s * 1000 for s in shape] or [1000]],
                            "dtype": ["load", key, shape], "short": [dtype, key],
                            "extra": [dtype, key, shape[:-1] + [max(shape[-1] - 1, 0)]] if shape else [dtype, key, [0]]}[edit]

    out = tmp_path / "p.l2fx"
    _rewrite_manifest(path, out, change)
    with pytest.raises(CorruptArtifactError, match="plain"):
        l2fx.load(out, model=make_tiny_convnet())


@pytest.mark.parametrize("key", ["layers", "plain", "crc32"])
def test_manifest_fields_of_the_wrong_type_are_corruption(artifact, tmp_path, key):
    path, _ = artifact
    out = tmp_path / "f.l2fx"
    _rewrite_manifest(path, out, lambda m: m.update({key: "oops"}))
    with pytest.raises(CorruptArtifactError, match=key):
        l2fx.inspect(out)
    _rewrite_manifest(path, out, lambda m: m.pop(key))
    with pytest.raises(CorruptArtifactError, match=key):
        l2fx.load(out, model=make_tiny_convnet())


@pytest.mark.parametrize("change", [lambda m: m.pop("original_nbytes"), lambda m: m["config"].pop("target_cr"),
                                    lambda m: m.update(config="x")])
def test_inspect_names_a_manifest_without_sizes(artifact, tmp_path, change):
    path, _ = artifact
    out = tmp_path / "s.l2fx"
    _rewrite_manifest(path, out, change)
    with pytest.raises(CorruptArtifactError, match="'original_nbytes'|'target_cr'|'config'"):
        l2fx.inspect(out)


def test_plain_tensors_are_packed_per_dtype(artifact):
    path, compiled = artifact
    arrays = safetensors.numpy.load(path.read_bytes())
    names = [k for k in arrays if not k.startswith("l2fx.")]
    assert names == [] and any(k.startswith(PLAIN_PREFIX) for k in arrays)
    plain = _manifest(arrays)["plain"]
    assert list(plain) == sorted(plain) and len(plain) > 0


def test_manifest_is_compressed(artifact):
    path, _ = artifact
    stored = safetensors.numpy.load(path.read_bytes())[MANIFEST].tobytes()
    text = decode_manifest(stored, VERSION)
    assert json.loads(text)["version"] == VERSION == 2
    assert len(stored) < 0.6 * len(text)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "trailing", "bomb"])
def test_bad_compressed_manifest_is_corruption(artifact, tmp_path, damage):
    path, _ = artifact
    arrays = safetensors.numpy.load(path.read_bytes())
    stored = arrays[MANIFEST].tobytes()
    bad = {"garbage": b"\x78\x9c not a deflate stream", "truncated": stored[: len(stored) // 2],
           "trailing": stored + b"xx", "bomb": zlib.compress(b" " * (300 << 20), 9)}[damage]
    arrays[MANIFEST] = np.frombuffer(bad, dtype=np.uint8)
    out = tmp_path / "z.l2fx"
    out.write_bytes(safetensors_bytes(arrays, {"format": "l2fx", "version": str(VERSION),
                                               "manifest_crc32": str(zlib.crc32(bad))}))
    with pytest.raises(CorruptArtifactError, match="manifest"):
        l2fx.inspect(out)


def test_wrong_architecture(artifact):
    path, _ = artifact
    with pytest.raises(ArchitectureMismatchError):
        l2fx.load(path, model=torch.nn.Sequential(torch.nn.Linear(4, 4)))

    class Wider(type(make_tiny_convnet())):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32 * 7 * 7, 65)
            self.out = torch.nn.Linear(65, 10)

    with pytest.raises(ArchitectureMismatchError):
        l2fx.load(path, model=Wider().eval())


def test_not_an_artifact(tmp_path):
    p = tmp_path / "x.l2fx"
    p.write_bytes(b"hello world, not safetensors")
    with pytest.raises(CorruptArtifactError):
        l2fx.load(p, model=make_tiny_convnet())
    with pytest.raises(ArtifactError):
        l2fx.load(tmp_path / "missing.l2fx", model=make_tiny_convnet())


def test_save_is_atomic_and_never_clobbers_on_error(artifact, tmp_path):
    path, compiled = artifact
    target = tmp_path / "keep.l2fx"
    target.write_bytes(b"user data")
    with pytest.raises(ArtifactError):
        l2fx.save(object(), target)
    assert target.read_bytes() == b"user data"
    with pytest.raises(ArtifactError):
        l2fx.save(compiled, tmp_path)  # a directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_does_not_modify_the_given_instance(artifact):
    path, _ = artifact
    model = make_tiny_convnet(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l2fx.load(path, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


_GOOD_ACT = {"bits": 8, "scale": 0.03125, "zero_point": 128}


@pytest.mark.parametrize("act, match", [
    ({"bits": 9, "scale": 0.03125, "zero_point": 0}, "bits"),
    ({"bits": 4, "scale": 0.03125, "zero_point": 16}, "zero_point"),
    ({"bits": 8, "scale": -1.0, "zero_point": 0}, "scale"),
    ({"bits": 8, "scale": 1, "zero_point": 0}, "scale"),  # an int, not the float the writer writes
    ({"bits": 8, "scale": 0.1, "zero_point": 0}, "float32"),  # 0.1 is no float32 value
    ({"bits": 8, "scale": 1e300, "zero_point": 0}, "scale"),
    ({"bits": 8, "scale": 0.03125}, "exactly the fields"),
    ("8", "exactly the fields"),
])
def test_bad_activation_quantisers_are_corruption(artifact, tmp_path, act, match):
    path, _ = artifact
    out = tmp_path / "a.l2fx"
    _rewrite_manifest(path, out, lambda m: (m.update(version=4), m["layers"][0].update(act=act)), version="4")
    with pytest.raises(CorruptArtifactError, match=match):
        l2fx.inspect(out)


def test_an_activation_quantiser_needs_format_version_4_and_load_replays_it(artifact, tmp_path):
    path, compiled = artifact
    out = tmp_path / "a.l2fx"
    _rewrite_manifest(path, out, lambda m: m["layers"][0].update(act=_GOOD_ACT))
    with pytest.raises(CorruptArtifactError, match="unknown.*act"):
        l2fx.inspect(out)
    layer = None

    def add(m):
        nonlocal layer
        m.update(version=4)
        m["layers"][0].update(act=_GOOD_ACT)
        layer = m["layers"][0]["param"]

    _rewrite_manifest(path, out, add, version="4")
    loaded = l2fx.load(out, model=make_tiny_convnet(), verify=True)
    module = loaded.graph_module.get_submodule("l2fx_act." + layer.replace(".", "__"))
    assert module.spec.to_dict() == _GOOD_ACT
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.equal(loaded(x), compiled(x))  # the input of that layer is now quantised
    # Saving the loaded model writes the quantiser back, as version 4.
    again = tmp_path / "b.l2fx"
    l2fx.save(loaded, again)
    assert l2fx.load(again, model=make_tiny_convnet()).graph_module.get_submodule(
        "l2fx_act." + layer.replace(".", "__")).spec.to_dict() == _GOOD_ACT


def test_a_quantiser_inserted_after_range_code_is_not_saved(artifact, tmp_path):
    """The artifact writes each layer's quantiser from its coded entry: a graph running one the
    entry does not hold (a user pass after range_code) is refused, not saved without it."""
    import copy
    from l2fx.activations import ActQuantSpec
    from l2fx.ir import weight_sites
    from l2fx.passes import InsertActQuant
    from l2fx.pipeline import PassContext, PassManager
    _, compiled = artifact
    c = copy.deepcopy(compiled)
    param = next(site.param for _, site in weight_sites(c.graph_module))
    with PassContext():
        PassManager([InsertActQuant({param: ActQuantSpec(8, 0.03125, 128)})])(c.graph_module)
    c.graph_module.recompile()
    out = tmp_path / "x.l2fx"
    with pytest.raises(ArtifactError, match="not the one its coded entry stores"):
        l2fx.save(c, out)
    assert not out.exists()


@given(st.lists(st.binary(max_size=40), max_size=6), st.binary(min_size=1, max_size=9))
def test_an_array_given_as_chunks_writes_the_bytes_of_its_concatenation(pieces, other):
    """The payload is written from its layers' chunks, never concatenated first: same file."""
    joined = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    extra = np.frombuffer(other, dtype=np.uint8)
    meta = {"format": "l2fx"}
    assert safetensors_bytes({"p": Chunks(pieces), "x": extra}, meta) == safetensors_bytes({"p": joined, "x": extra},
                                                                                          meta)
    loaded = safetensors.numpy.load(safetensors_bytes({"p": Chunks(pieces), "x": extra}, meta))
    assert loaded["p"].tobytes() == b"".join(pieces) and loaded["x"].tobytes() == other
