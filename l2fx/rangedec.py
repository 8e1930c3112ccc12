"""Parallel, GIL-free decoder for l2fx's range-coded chunks (the fast load path).

constriction (0.5.0) holds the GIL while it decodes, so its decoder runs one chunk at a time
at ~22 M symbols/s on the CI machine. This module decodes the *same bit streams* (those of
constriction's ``RangeEncoder``: 32-bit words, 64-bit state, 24-bit precision, categorical
model quantised with ``perfect=False``) with a numba-compiled decoder that runs the chunks of
a tensor in parallel threads (``prange``, ``nogil``). Encoding stays with constriction;
``tests/test_rangedec.py`` checks, on random tables and streams, that both decoders return the
same symbols and reject the same corrupted chunks.

The decoder, per chunk (``lower``, ``range``, ``point`` are 64-bit, arithmetic wraps):

* ``point`` = the first two words, big-endian (one word: shifted up by 32; none: 0);
  ``lower = 0``, ``range = 2^64 - 1``;
* per symbol: ``scale = range >> 24``, ``q = (point - lower) // scale`` (``q >= 2^24`` is
  invalid data); the symbol ``s`` with ``left[s] <= q < left[s + 1]``; ``lower += scale *
  left[s]``, ``range = scale * (left[s + 1] - left[s])``; when ``range < 2^32``, ``lower``,
  ``range`` and ``point`` shift up by 32 bits and the next word (if any) enters ``point``;
* at the end every word must have been read and ``point - lower < 2^33 - 1`` (constriction's
  ``maybe_exhausted``), else the chunk carries data beyond its symbols.

``left`` is the 24-bit cumulative table constriction derives from the 16-bit frequency table
(:meth:`l2fx.coding.FrequencyTable.coder_cdf`). The symbol search starts from a 4096-entry
lookup table indexed by the top 12 bits of ``q``.

numba is optional (the ``fast`` extra, installed by ``scripts/setup.sh``): without it,
:func:`available` is False and :func:`l2fx.coding.decode_symbols` uses constriction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np

try:  # pragma: no cover - exercised by whichever environment runs the tests
    import numba
    from numba import prange
except ImportError:  # pragma: no cover
    numba = None

__all__ = ["available", "Job", "decode_jobs", "warm_up", "OK", "INVALID", "IMPOSSIBLE", "LEFTOVER", "STATUS_TEXT"]

#: Chunk status codes returned by :func:`decode_chunks`.
OK, INVALID, IMPOSSIBLE, LEFTOVER = 0, 1, 2, 3
STATUS_TEXT = {
    INVALID: "range decoder failed: invalid compressed data",
    IMPOSSIBLE: "decoded a symbol with frequency 0",
    LEFTOVER: "data left over after the chunk's symbols",
}
PRECISION = 24
LUT_BITS = 16


def available() -> bool:
    """Whether the numba decoder can run here."""
    return numba is not None


if numba is not None:
    _U32 = np.uint64(32)
    _ONE24 = np.uint64(1) << np.uint64(PRECISION)
    _SMALL = np.uint64(1) << np.uint64(32)
    _FULL = np.uint64(0xFFFFFFFFFFFFFFFF)
    _SLACK = (np.uint64(1) << np.uint64(33)) - np.uint64(1)
    _TWO_LESS = 2.0 * (1.0 - 2.0 ** -40)  # 2 (undoing diff >> 1), shaded down to a lower bound

    @numba.njit(nogil=True, cache=True, inline="always", error_model="numpy")
    def _start(words, w0, w1):  # pragma: no cover - jitted
        """(point, pos) after reading the first two words."""
        pos = w0
        point = np.uint64(0)
        nread = 0
        while pos < w1 and nread < 2:
            point = (point << _U32) | np.uint64(words[pos])
            pos += 1
            nread += 1
        if nread == 1:
            point = point << _U32
        return point, pos

    @numba.njit(nogil=True, cache=True, inline="always", error_model="numpy")
    def _step(words, w1, pos, point, lower, rng, left, lut, shift, present):  # pragma: no cover - jitted
        """Decodes one symbol: (index, point, lower, range, pos, error flags).

        Branch-free but for the symbol search, so that the four chunks decoded in lock step
        overlap in the out-of-order core instead of flushing it on every renormalisation.
        ``words`` must hold one readable word past the last chunk (a padding word).
        """
        scale = rng >> np.uint64(PRECISION)
        diff = point - lower
        # diff // scale without a 64-bit integer division (the slowest instruction here): a
        # float quotient scaled down by 2^-40 is a lower bound off by at most one, which a
        # multiply-compare corrects. diff >> 1 keeps the int64 -> float conversion signed.
        approx = np.float64(np.int64(diff >> np.uint64(1))) * _TWO_LESS / np.float64(np.int64(scale))
        quantile = np.uint64(np.int64(approx))
        quantile += np.uint64(diff - quantile * scale >= scale)
        err = np.uint8(quantile >= _ONE24)
        quantile = min(quantile, _ONE24 - np.uint64(1))
        s = np.int64(lut[quantile >> shift])
        while left[s + 1] <= quantile:
            s += 1
        lo = left[s]
        lower = lower + scale * lo
        rng = scale * (left[s + 1] - lo)
        renorm = rng < _SMALL
        by = np.uint64(renorm) << np.uint64(5)  # 32 or 0
        lower = lower << by
        rng = rng << by
        take = renorm & (pos < w1)
        point = (point << by) | (np.uint64(words[pos]) & (np.uint64(0) - np.uint64(take)))
        pos += np.int64(take)
        err |= np.uint8(not present[s]) << np.uint8(1)
        return s, point, lower, rng, pos, err

    @numba.njit(nogil=True, cache=True, inline="always", error_model="numpy")
    def _finish(pos, w1, point, lower, rng):  # pragma: no cover - jitted
        if pos < w1 or (rng != _FULL and (point - lower) >= _SLACK):
            return LEFTOVER
        return OK

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _tail(words, w1, pos, point, lower, rng, out, o0, i0, count, err, left, lut, shift, present, qmin):  # pragma: no cover
        """Decodes symbols i0..count of a chunk from a given state; returns its status."""
        for i in range(i0, count):
            s, point, lower, rng, pos, x = _step(words, w1, pos, point, lower, rng, left, lut, shift, present)
            out[o0 + i] = qmin + s
            err |= x
        if err:
            return _first_error(err)
        return _finish(pos, w1, point, lower, rng)

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _decode_quad(words, starts, ends, out, oofs, counts, c, tables, left_all, left_at, lut_all, lut_at, shifts,
                     present_all, present_at, qmins, status):  # pragma: no cover - jitted
        """Chunks c .. c + 3 (of any layers, each with its own table) in lock step: four
        independent dependency chains per iteration, which the core overlaps (one chain alone
        is latency bound: float divide, multiplies, table loads)."""
        t0, t1, t2, t3 = tables[c], tables[c + 1], tables[c + 2], tables[c + 3]
        f0, f1, f2, f3 = left_all[left_at[t0]:left_at[t0 + 1]], left_all[left_at[t1]:left_at[t1 + 1]], \
            left_all[left_at[t2]:left_at[t2 + 1]], left_all[left_at[t3]:left_at[t3 + 1]]
        u0, u1, u2, u3 = lut_all[lut_at[t0]:lut_at[t0 + 1]], lut_all[lut_at[t1]:lut_at[t1 + 1]], \
            lut_all[lut_at[t2]:lut_at[t2 + 1]], lut_all[lut_at[t3]:lut_at[t3 + 1]]
        v0, v1, v2, v3 = present_all[present_at[t0]:present_at[t0 + 1]], \
            present_all[present_at[t1]:present_at[t1 + 1]], present_all[present_at[t2]:present_at[t2 + 1]], \
            present_all[present_at[t3]:present_at[t3 + 1]]
        h0, h1, h2, h3 = shifts[t0], shifts[t1], shifts[t2], shifts[t3]
        q0, q1, q2, q3 = qmins[t0], qmins[t1], qmins[t2], qmins[t3]
        e0, e1, e2, e3 = ends[c], ends[c + 1], ends[c + 2], ends[c + 3]
        p0, i0 = _start(words, starts[c], e0)
        p1, i1 = _start(words, starts[c + 1], e1)
        p2, i2 = _start(words, starts[c + 2], e2)
        p3, i3 = _start(words, starts[c + 3], e3)
        l0 = l1 = l2 = l3 = np.uint64(0)
        r0 = r1 = r2 = r3 = _FULL
        x0 = x1 = x2 = x3 = np.uint8(0)
        o0, o1, o2, o3 = oofs[c], oofs[c + 1], oofs[c + 2], oofs[c + 3]
        n = min(min(counts[c], counts[c + 1]), min(counts[c + 2], counts[c + 3]))
        for i in range(n):
            s0, p0, l0, r0, i0, y0 = _step(words, e0, i0, p0, l0, r0, f0, u0, h0, v0)
            s1, p1, l1, r1, i1, y1 = _step(words, e1, i1, p1, l1, r1, f1, u1, h1, v1)
            s2, p2, l2, r2, i2, y2 = _step(words, e2, i2, p2, l2, r2, f2, u2, h2, v2)
            s3, p3, l3, r3, i3, y3 = _step(words, e3, i3, p3, l3, r3, f3, u3, h3, v3)
            out[o0 + i] = q0 + s0
            out[o1 + i] = q1 + s1
            out[o2 + i] = q2 + s2
            out[o3 + i] = q3 + s3
            x0 |= y0
            x1 |= y1
            x2 |= y2
            x3 |= y3
        status[c] = _tail(words, e0, i0, p0, l0, r0, out, o0, n, counts[c], x0, f0, u0, h0, v0, q0)
        status[c + 1] = _tail(words, e1, i1, p1, l1, r1, out, o1, n, counts[c + 1], x1, f1, u1, h1, v1, q1)
        status[c + 2] = _tail(words, e2, i2, p2, l2, r2, out, o2, n, counts[c + 2], x2, f2, u2, h2, v2, q2)
        status[c + 3] = _tail(words, e3, i3, p3, l3, r3, out, o3, n, counts[c + 3], x3, f3, u3, h3, v3, q3)

    @numba.njit(nogil=True, cache=True, inline="always", error_model="numpy")
    def _first_error(flags):  # pragma: no cover - jitted
        return INVALID if flags & INVALID else IMPOSSIBLE

    @numba.njit(nogil=True, parallel=True, cache=True)
    def _decode_all(words, starts, ends, counts, oofs, tables, left_all, left_at, lut_all, lut_at, shifts, present_all,
                    present_at, qmins, out, status):  # pragma: no cover - jitted
        """Chunks 4g .. 4g + 3 are work item g (the caller orders chunks by length, so the
        four of a group are about equally long); chunk c is ``words[starts[c]:ends[c]]`` and
        uses table ``tables[c]``."""
        n = counts.shape[0]
        for g in prange((n + 3) // 4):
            c = 4 * g
            if c + 3 < n:
                _decode_quad(words, starts, ends, out, oofs, counts, c, tables, left_all, left_at, lut_all, lut_at, shifts,
                             present_all, present_at, qmins, status)
            else:
                for j in range(c, n):
                    t = tables[j]
                    point, pos = _start(words, starts[j], ends[j])
                    status[j] = _tail(words, ends[j], pos, point, np.uint64(0), _FULL, out, oofs[j], 0, counts[j],
                                      np.uint8(0), left_all[left_at[t]:left_at[t + 1]],
                                      lut_all[lut_at[t]:lut_at[t + 1]], shifts[t],
                                      present_all[present_at[t]:present_at[t + 1]], qmins[t])


@contextlib.contextmanager
def _numba_threads(threads: int | None):
    if threads is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


@contextlib.contextmanager
def _one_item_at_a_time():
    """Hands prange iterations to threads one at a time (numba >= 0.57); by default numba
    splits the range into equal contiguous parts, which leaves a thread idle when the work
    items, ordered longest first, differ in size (EfficientNet-Lite0: 2 threads no faster
    than 1)."""
    setter = getattr(numba, "set_parallel_chunksize", None)
    if setter is None:
        yield
        return
    old = setter(1)
    try:
        yield
    finally:
        setter(old)


@dataclasses.dataclass(frozen=True)
class Job:
    """One tensor to decode: its chunks and its table.

    Attributes:
        words: uint32, the tensor's chunks concatenated (native byte order).
        word_offsets: ``num_chunks + 1`` offsets of the chunks into ``words``.
        counts: symbols per chunk.
        left: uint64, ``K + 1`` cumulative weights, ``left[0] == 0``, ``left[K] == 2^24``,
            strictly increasing (:meth:`l2fx.coding.FrequencyTable.coder_cdf`).
        present: bool, ``K``: whether a symbol may occur (table frequency >= 1).
        qmin: the symbol of index 0.
    """

    words: np.ndarray
    word_offsets: np.ndarray
    counts: np.ndarray
    left: np.ndarray
    present: np.ndarray
    qmin: int


def _lut(left: np.ndarray, numel: int) -> tuple[np.ndarray, int]:
    # Symbol search table: the symbol at the left edge of each of 2^bits buckets of the
    # 24-bit quantile range. 16 bits (64 KiB of uint8) leaves at most a few symbol edges per
    # bucket; small tensors use fewer buckets so that building it costs less than decoding.
    bits = int(np.clip(np.ceil(np.log2(max(numel, 1))) - 2, 8, LUT_BITS))
    # Bucket b starts at b << shift; its entry is the last symbol s with left[s] <= that, so
    # symbol s fills the buckets from ceil(left[s] / 2^shift) on.
    shift = PRECISION - bits
    first = -(-left[1:-1].astype(np.int64) // (1 << shift))
    edges = np.concatenate([[0], first, [1 << bits]])
    lut = np.repeat(np.arange(left.size - 1, dtype=np.uint8), np.diff(edges))
    return lut, shift


def _offsets(sizes) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


_warm = False
# numba's default threading layer (workqueue) aborts the process when two threads launch
# parallel kernels at once (e.g. two models loading concurrently): launches are serialised.
_launch = threading.Lock()


def warm_up() -> None:
    """Compiles (or loads from numba's cache) the decoder by decoding a tiny stream.

    :func:`l2fx.load` calls it before it decodes in a worker thread while the main thread
    runs ``torch.export``: numba builds its typing registries on first use by walking
    modules that ``torch.export`` is temporarily patching, which fails if the two overlap.
    """
    global _warm
    if _warm or numba is None:
        return
    # One chunk of one word: point 0 decodes to symbol 0 with range 2^63 (no renormalisation).
    job = Job(np.zeros(1, np.uint32), np.array([0, 1]), np.array([1]),
              np.array([0, 1 << (PRECISION - 1), 1 << PRECISION], np.uint64), np.ones(2, bool), 0)
    decode_jobs([job], 1)
    _warm = True


def decode_jobs(jobs: list[Job], threads: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Decodes every chunk of every job in one parallel sweep.

    All chunks of all jobs, longest first, are split into groups of four (decoded in lock
    step, each chunk with its own layer's table) spread over ``threads`` workers (default:
    numba's, i.e. all cores), so a model's many small layers and few large ones keep every
    core busy alike.

    Returns:
        ``(symbols, status)`` per job: int16 symbols of all its chunks in order, and one
        status code per chunk (:data:`OK` or an error code, see :data:`STATUS_TEXT`; the
        symbols of a failed chunk are unspecified).
    """
    if numba is None:
        raise RuntimeError("numba is not installed")
    if not jobs:
        return [], []
    word_base = _offsets([job.words.size for job in jobs])
    words = np.zeros(int(word_base[-1]) + 1, dtype=np.uint32)  # + 1: the decoder may read a word past the end
    starts, ends, counts, tables, luts, shifts = [], [], [], [], [], []
    for t, job in enumerate(jobs):
        words[word_base[t]:word_base[t + 1]] = job.words
        offsets = np.asarray(job.word_offsets, dtype=np.int64) + word_base[t]
        starts.append(offsets[:-1])
        ends.append(offsets[1:])
        counts.append(np.asarray(job.counts, dtype=np.int64))
        tables.append(np.full(job.counts.size, t, dtype=np.int64))
        lut, shift = _lut(job.left, int(np.sum(job.counts)))
        luts.append(lut)
        shifts.append(shift)
    counts_all = np.concatenate(counts)
    out_offsets = _offsets(counts_all)  # outputs stay in job order, whatever order chunks decode in
    # Decode order: longest chunks first, so the four chunks of a lock-step group match in length.
    order = np.argsort(-counts_all, kind="stable")
    starts_o, ends_o = np.concatenate(starts)[order], np.concatenate(ends)[order]
    status_o = np.zeros(counts_all.size, dtype=np.int8)
    out = np.empty(int(out_offsets[-1]), dtype=np.int16)
    lefts = [np.ascontiguousarray(job.left, dtype=np.uint64) for job in jobs]
    presents = [np.ascontiguousarray(job.present, dtype=np.bool_) for job in jobs]
    with _launch, _numba_threads(threads), _one_item_at_a_time():
        _decode_all(words, starts_o, ends_o, counts_all[order], out_offsets[:-1][order], np.concatenate(tables)[order],
                    np.concatenate(lefts), _offsets([x.size for x in lefts]), np.concatenate(luts),
                    _offsets([x.size for x in luts]), np.array(shifts, dtype=np.uint64), np.concatenate(presents),
                    _offsets([x.size for x in presents]), np.array([job.qmin for job in jobs], dtype=np.int16),
                    out, status_o)
    status = np.empty_like(status_o)
    status[order] = status_o
    chunk_at = _offsets([job.counts.size for job in jobs])
    symbol_at = out_offsets[chunk_at]
    return ([out[symbol_at[t]:symbol_at[t + 1]] for t in range(len(jobs))],
            [status[chunk_at[t]:chunk_at[t + 1]] for t in range(len(jobs))])
