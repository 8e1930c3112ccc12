"""Structured fuzzing of the artifact reader (issue: untrusted artifacts).

Every mutation class of ``artifact_fuzz`` (manifest fields, self-consistent record edits such
as the single-symbol decompression bomb, weight content, the manifest's JSON and zlib bytes,
raw damage without checksums) must end in an L2fxError, or load to the same model, or (for
content edits within the format's rules) load to other weights; never another exception,
never the reader's safety net, and never beyond a memory cap: the loads run under
RLIMIT_DATA set to the process's current data size plus a small budget, so a file that made
the loader allocate more (the 2^34-symbol bomb asked for 32 GiB) fails with MemoryError.
"""
from __future__ import annotations

import contextlib
import copy
import resource
import signal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l2fx
from l2fx.config import CompileConfig, ReconstructionConfig, SensitivityConfig

from artifact_fuzz import V3_RULES, Chooser, Parts, bomb, is_failure, mutate, outcome, state_of, write
from conftest import DictInputNet, make_tiny_convnet

#: What a load may allocate above the data size it starts from: the tiny model is 0.44 MB of
#: float32; loading it (capture, passes, decode) peaks 30-60 MB above its start on this CPU.
BUDGET = 256 << 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    config = CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=10),
                           reconstruction=ReconstructionConfig(enabled=False))
    path = tmp_path_factory.mktemp("fuzz") / "good.l2fx"
    l2fx.save(l2fx.compile(make_tiny_convnet(), target_cr=8, calib=x, config=config), path)
    reference = state_of(l2fx.load(path, model=make_tiny_convnet()))
    return path, path.read_bytes(), Parts.of(path), reference


def _data_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData")


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a load took over {HANG_S} s")


#: A hang detector, not a timing: every file here loads or fails in well under a second.
HANG_S = 60


@contextlib.contextmanager
def memory_cap(budget: int):
    """RLIMIT_DATA at the current data size plus ``budget``, and an alarm at HANG_S seconds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (_data_size() + budget, hard))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def test_the_known_attacks_fail_cleanly(corpus, tmp_path):
    """The three cases of the issue, as measured on 4461327 (MemoryError, ValueError, OverflowError)."""
    path, _, parts, _ = corpus

    def edited(change) -> bytes:
        p = copy.deepcopy(parts)
        manifest, arrays = p.arrays()
        change(manifest["layers"][0])
        return write(manifest, arrays)

    cases = {
        "chunk": lambda e: e.update(axis=None, shape=[1 << 34], chunk=1 << 34, nchunks=1),
        "kind": lambda e: e.update(kind="bogus"),
        "qmin": lambda e: e.update(qmin=40000),
    }
    for field, change in cases.items():
        bad = tmp_path / f"{field}.l2fx"
        bad.write_bytes(edited(change))
        for action in (lambda: l2fx.load(bad, model=make_tiny_convnet()), lambda: l2fx.inspect(bad)):
            with memory_cap(BUDGET), pytest.raises(l2fx.errors.CorruptArtifactError, match=f"field '{field}'"):
                action()


def test_a_consistent_bomb_is_bounded_by_the_model(corpus, tmp_path):
    """A single-symbol layer of 2^34 symbols with table, chunks and T parameters rewritten to
    match passes every check of the file alone: load refuses it against the model's shape,
    inspect against the file's size, before allocating."""
    p = copy.deepcopy(corpus[2])
    bomb(p, 0, 34, 1 << 24)
    bad = tmp_path / "bomb.l2fx"
    bad.write_bytes(write(*p.arrays()))
    with memory_cap(BUDGET):
        with pytest.raises(l2fx.errors.ArchitectureMismatchError, match="shape"):
            l2fx.load(bad, model=make_tiny_convnet())
        report = l2fx.inspect(bad)  # a single-symbol layer is counted, not decoded
    assert report.layers[0].numel == 1 << 34


def _check(make, good, parts, reference, tmp_path, data) -> None:
    cls, what, mutated = mutate(Chooser.from_hypothesis(data), good, parts)
    bad = tmp_path / "mutated.l2fx"
    bad.write_bytes(mutated)
    with memory_cap(BUDGET):
        result, detail = outcome(bad, make, reference)
    assert not is_failure(cls, result), f"{cls} mutation ({what}): {result}: {detail}"


_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=300, **_FUZZ)
@given(data=st.data())
def test_mutated_artifacts_fail_cleanly(corpus, tmp_path, data):
    _path, good, parts, reference = corpus
    _check(make_tiny_convnet, good, parts, reference, tmp_path, data)


@pytest.fixture(scope="module")
def v3_corpus(tmp_path_factory):
    """A version-3 artifact: fc in MXFP4 (E8M0 scales, the uint8 parameter array) and the convs
    with group-wise parameters."""
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    config = CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=10),
                           reconstruction=ReconstructionConfig(enabled=False), layers=V3_RULES)
    path = tmp_path_factory.mktemp("fuzz") / "v3.l2fx"
    l2fx.save(l2fx.compile(make_tiny_convnet(), target_cr=8, calib=x, config=config), path)
    parts = Parts.of(path)
    assert parts.version == 3 and {layer.entry["pdtype"] for layer in parts.layers} >= {"e8m0"}
    return path.read_bytes(), parts, state_of(l2fx.load(path, model=make_tiny_convnet()))


@settings(max_examples=60, **_FUZZ)
@given(data=st.data())
def test_mutated_v3_artifacts_fail_cleanly(v3_corpus, tmp_path, data):
    good, parts, reference = v3_corpus
    _check(make_tiny_convnet, good, parts, reference, tmp_path, data)


def _dict_net():
    torch.manual_seed(0)
    return DictInputNet().eval()


@pytest.fixture(scope="module")
def export_corpus(tmp_path_factory):
    """A torch.export-captured artifact: its manifest records example input shapes and dtypes."""
    g = torch.Generator().manual_seed(0)
    calib = {"input_ids": torch.randint(0, 200, (8, 12), generator=g), "attention_mask": torch.ones(8, 12)}
    config = CompileConfig(sensitivity=SensitivityConfig(num_samples=8, num_steps=10),
                           reconstruction=ReconstructionConfig(enabled=False))
    path = tmp_path_factory.mktemp("fuzz") / "export.l2fx"
    l2fx.save(l2fx.compile(_dict_net(), target_cr=8, calib=calib, config=config), path)
    return path.read_bytes(), Parts.of(path), state_of(l2fx.load(path, model=_dict_net()))


@settings(max_examples=40, **_FUZZ)
@given(data=st.data())
def test_mutated_export_artifacts_fail_cleanly(export_corpus, tmp_path, data):
    good, parts, reference = export_corpus
    _check(_dict_net, good, parts, reference, tmp_path, data)


def test_inspect_bounds_what_it_decodes_by_the_file_size(corpus, tmp_path):
    """A coded (multi-symbol) layer claiming 2^30 symbols in a 50 kB file: inspect refuses it before
    decoding (a skewed table decodes millions of symbols from a few bytes); asked to allow it, it
    decodes a piece at a time and finds the chunks do not hold them."""
    p = copy.deepcopy(corpus[2])
    layer = p.layers[0]
    n = 64
    layer.entry.update(shape=[1 << 30], axis=None, chunk=1 << 24, nchunks=n)
    layer.rows = np.tile(layer.rows[:1], (n, 1))
    layer.payload = layer.payload[: int(layer.rows[0, 0])] * n
    layer.tparams = layer.tparams[:1 if layer.entry["kind"] == "linear" else 2]
    bad = tmp_path / "claims.l2fx"
    bad.write_bytes(write(*p.arrays()))
    with memory_cap(BUDGET):
        with pytest.raises(l2fx.errors.CorruptArtifactError, match="more than inspect decodes"):
            l2fx.inspect(bad)
        with pytest.raises(l2fx.errors.CorruptArtifactError, match="chunk 0"):
            l2fx.inspect(bad, max_symbols=1 << 31)
        with pytest.raises(l2fx.errors.ArchitectureMismatchError, match="shape"):
            l2fx.load(bad, model=make_tiny_convnet())


def test_a_repeated_manifest_key_is_refused(corpus, tmp_path):
    """A key twice in one JSON object (Python keeps the last, other parsers the first): the
    fuzzer's 'add key' of an existing field loaded another model before. Refused, named."""
    import json
    import zlib
    _path, _good, parts, _reference = corpus
    manifest, arrays = parts.arrays()
    text = json.dumps(manifest, separators=(",", ":"))
    first = manifest["layers"][0]
    dup = text.replace(f'"qmin":{first["qmin"]},', f'"qmin":{first["qmin"]},"qmin":{first["qmin"] + 1},', 1)
    assert dup != text
    bad = tmp_path / "dup.l2fx"
    bad.write_bytes(write(None, arrays, zlib.compress(dup.encode(), 9)))
    with pytest.raises(l2fx.errors.CorruptArtifactError, match="'qmin' appears twice"):
        l2fx.load(bad, model=make_tiny_convnet())
    with pytest.raises(l2fx.errors.CorruptArtifactError, match="appears twice"):
        l2fx.inspect(bad)
