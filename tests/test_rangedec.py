"""The numba range decoder (l2fx.rangedec) against constriction's, on the same bit streams.

Mirrors l2fx/rangedec.py. Encoding is always constriction's; the fast decoder must return the
same symbols on every stream, and accept or reject exactly what constriction accepts or
rejects when handed arbitrary words (with a matching CRC, so the decoder checks are reached).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from l2fx import rangedec
from l2fx.coding import CodedStream, FrequencyTable, decode_streams, decode_symbols, encode_symbols
from l2fx.errors import ConfigError, CorruptArtifactError

pytestmark = pytest.mark.skipif(not rangedec.available(), reason="numba is not installed")


@st.composite
def streams(draw):
    """Symbols and a table covering them, some table entries with frequency 0."""
    n = draw(st.integers(0, 5000))
    kind = draw(st.sampled_from(["laplace", "any", "two"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "laplace":
        x = np.clip(np.round(rng.laplace(0, draw(st.floats(0.05, 40.0)), n)), -127, 127)
    elif kind == "any":
        x = rng.integers(-127, 128, n)
    else:
        x = rng.choice([draw(st.integers(-127, 0)), draw(st.integers(1, 127))], n)
    x = x.astype(np.int16)
    table = None
    if n and draw(st.booleans()):  # a foreign table: wider range, holes, arbitrary weights
        lo, hi = int(x.min()) - draw(st.integers(0, 5)), int(x.max()) + draw(st.integers(0, 5))
        lo, hi = max(lo, -127), min(hi, 127)
        freqs = rng.integers(0, 300, hi - lo + 1)
        freqs[np.unique(x) - lo] = np.maximum(freqs[np.unique(x) - lo], 1)
        table = FrequencyTable(lo, freqs.astype(np.uint16))
    return x, table


chunk_sizes = st.sampled_from([1, 3, 64, 1000, 1 << 16])


@settings(max_examples=150, deadline=None)
@given(case=streams(), chunk_size=chunk_sizes, threads=st.sampled_from([None, 1, 2]))
def test_numba_decoder_returns_what_constriction_returns(case, chunk_size, threads):
    x, table = case
    stream = encode_symbols(x, table, chunk_size=chunk_size)
    fast = decode_symbols(stream, threads=threads, decoder="numba")
    slow = decode_symbols(stream, decoder="constriction")
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(fast, x)


def _outcome(stream: CodedStream, decoder: str):
    try:
        return decode_symbols(stream, decoder=decoder)
    except CorruptArtifactError as exc:
        return str(exc)


@settings(max_examples=150, deadline=None)
@given(case=streams().filter(lambda c: c[0].size > 0), data=st.data())
def test_both_decoders_agree_on_arbitrary_words(case, data):
    """Garbage with a valid CRC: both reject it (naming the same chunk) or both decode it alike."""
    x, table = case
    stream = encode_symbols(x, table, chunk_size=data.draw(st.sampled_from([7, 500])))
    if len(stream.table.freqs) < 2:
        return
    index = data.draw(st.integers(0, len(stream.chunks) - 1))
    words = data.draw(hnp.arrays(np.uint32, st.integers(0, 12)))
    chunk = words.astype("<u4").tobytes()
    chunks = stream.chunks[:index] + (chunk,) + stream.chunks[index + 1:]
    crcs = stream.crc32[:index] + (zlib.crc32(chunk),) + stream.crc32[index + 1:]
    bad = CodedStream(stream.table, stream.numel, stream.chunk_size, chunks, crcs)
    fast, slow = _outcome(bad, "numba"), _outcome(bad, "constriction")
    if isinstance(slow, str):
        assert isinstance(fast, str) and fast.split(":")[0] == slow.split(":")[0] == f"chunk {index}"
    else:
        assert not isinstance(fast, str), fast
        np.testing.assert_array_equal(fast, slow)


def test_large_stream_decodes_alike_on_one_and_two_threads():
    rng = np.random.default_rng(0)
    x = np.clip(np.round(rng.laplace(0, 3.0, 1_000_003)), -127, 127).astype(np.int16)
    stream = encode_symbols(x)
    one = decode_symbols(stream, threads=1, decoder="numba")
    two = decode_symbols(stream, threads=2, decoder="numba")
    np.testing.assert_array_equal(one, x)
    np.testing.assert_array_equal(two, x)


def test_coder_cdf_is_a_leaky_24_bit_cdf():
    table = FrequencyTable(-3, np.array([5, 0, 60000, 0, 7, 1], dtype=np.uint16))
    left = table.coder_cdf()
    assert left.dtype == np.uint64 and left[0] == 0 and left[-1] == 1 << 24
    assert np.all(np.diff(left.astype(np.int64)) >= 1)  # zero-frequency symbols keep weight >= 1
    np.testing.assert_array_equal(table.coder_weights(), np.diff(left.astype(np.int64)))


def test_decoder_choice_is_validated(monkeypatch):
    stream = encode_symbols(np.arange(-5, 5))
    with pytest.raises(ConfigError, match="decoder"):
        decode_symbols(stream, decoder="fast")
    monkeypatch.setattr(rangedec, "available", lambda: False)
    with pytest.raises(ConfigError, match="numba"):
        decode_symbols(stream, decoder="numba")
    np.testing.assert_array_equal(decode_symbols(stream), np.arange(-5, 5))  # auto falls back


def test_concurrent_decodes_from_several_threads_are_correct():
    """numba's workqueue layer aborts on concurrent parallel launches; decode_jobs serialises them."""
    import threading

    rng = np.random.default_rng(1)
    x = np.clip(np.round(rng.laplace(0, 2.0, 300_000)), -127, 127).astype(np.int16)
    stream = encode_symbols(x)
    results = []

    def work():
        for _ in range(3):
            results.append(np.array_equal(decode_symbols(stream, decoder="numba"), x))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 9


@settings(max_examples=40, deadline=None)
@given(cases=st.lists(streams(), min_size=1, max_size=6), chunk_size=st.sampled_from([3, 64, 1000]),
       threads=st.sampled_from([1, 2]))
def test_many_streams_decode_in_one_sweep_like_one_at_a_time(cases, chunk_size, threads):
    """decode_streams mixes chunks of different layers and lengths in its lock-step groups;
    every stream must still come back whole and in order (empty and one-symbol ones too)."""
    coded = [encode_symbols(x, table, chunk_size=chunk_size) for x, table in cases]
    decoded = decode_streams(coded, threads, "numba")
    for (x, _), y in zip(cases, decoded):
        np.testing.assert_array_equal(y, x)


def test_a_bad_chunk_among_many_streams_is_named_by_stream_and_chunk():
    rng = np.random.default_rng(2)
    xs = [np.clip(np.round(rng.laplace(0, 2.0, n)), -127, 127).astype(np.int16) for n in (5000, 300, 2500)]
    coded = [encode_symbols(x, chunk_size=1000) for x in xs]
    bad = coded[2]
    longer = bad.chunks[1] + bad.chunks[2]  # valid words, CRC recomputed: only the decoder can tell
    chunks = bad.chunks[:1] + (longer,) + bad.chunks[2:]
    crcs = bad.crc32[:1] + (zlib.crc32(longer),) + bad.crc32[2:]
    coded[2] = CodedStream(bad.table, bad.numel, 1000, chunks, crcs)
    with pytest.raises(CorruptArtifactError, match="^layer c: chunk 1: data left over"):
        decode_streams(coded, decoder="numba", names=["layer a", "layer b", "layer c"])
