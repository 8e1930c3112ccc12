"""Lossless range coding of integer weight symbols (the "lossless" half of L2).

(Past 400 lines on purpose: the frequency table, the encoder, the exact payload prediction and
the stream arrays are one format, and the prediction must mirror the coder operation for
operation; split, they would drift apart.)

One :class:`CodedStream` per weight tensor: the tensor's integer symbols (flattened in C
order, values in ``[-qmax, qmax]`` with ``qmax <= 127``) are entropy coded with a static,
per-tensor 16-bit :class:`FrequencyTable` using constriction's range coder, in independent
chunks of ``chunk_size`` symbols. Every chunk carries a CRC32 so that a corrupted file is
reported as :class:`~l2fx.errors.CorruptArtifactError` naming the chunk, never decoded into
silently wrong weights.

Measured on this repository's CI machine (2 CPU cores, constriction 0.5.0, numpy, Python
3.11), symbols ``round(Laplace(0, b))`` clipped to [-127, 127], default ``chunk_size =
65536``, table built from the stream itself; "bound" is :func:`shannon_bits` / 8, "predict"
is :func:`predict_payload_nbytes` minus the real payload:

==================  ========  ===========  ===========  ========  =====  ===================
stream              bits/sym  bound (B)    payload (B)  overhead  table  predict (B)
==================  ========  ===========  ===========  ========  =====  ===================
(a) 1M, b = 1.45    3.000       374 964      375 016    +0.014 %  80 B   -12 (chunks -4..0)
(b) 100k, b = 0.70  2.001        25 011       25 016    +0.020 %  36 B     0 (chunks 0..0)
(c) 5M, b = 5.87    4.999     3 124 147    3 124 912    +0.024 %  360 B  -80 (chunks -4..0)
==================  ========  ===========  ===========  ========  =====  ===================

The overhead over the bound comes from the 16-bit table (the KL loss of quantising the
counts; none when numel <= 65535 because the counts are then stored exactly), from
constriction's re-quantisation of that table to 24 bits, and per chunk from the flush plus
rounding up to a 32-bit word (about 2 bits + half a word on average). Besides the payload,
:func:`stream_to_arrays` stores the table and 8 bytes per chunk (length + CRC32).

Throughput on the same machine (3 to 5 bits/symbol, 1M to 8M symbols): encode_symbols
41-47 M symbols/s including the histogram and table (constriction's encode alone: ~80 M/s;
53-55 M/s since the histogram is taken chunk by chunk), decode_symbols 20-23 M symbols/s (a
CDF search per symbol), predict_payload_nbytes 364-384 M symbols/s and predict_coding (table
and prediction) 354-361 M symbols/s, both from per-chunk histograms (:func:`chunk_histograms`;
42-56 M symbols/s before, with one bincount over every symbol's chunk and value).
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Union

import constriction
import numpy as np

from l2fx import rangedec
from l2fx.errors import ConfigError, CorruptArtifactError

__all__ = [
    "QMAX",
    "TABLE_TOTAL",
    "FrequencyTable",
    "SymbolHistogram",
    "CodedStream",
    "build_table",
    "histogram",
    "encode_symbols",
    "decode_symbols",
    "decode_streams",
    "predict_payload_nbytes",
    "predict_coding",
    "chunk_histograms",
    "shannon_bits",
    "stream_to_arrays",
    "stream_from_arrays",
]

#: Largest magnitude of a symbol (int8-sized alphabets; symbols are decoded into int16).
QMAX = 127
#: Frequencies are stored as uint16, so a table sums to at most this.
TABLE_TOTAL = 65535
#: Fixed-point precision of constriction's default range coder (``RangeEncoder`` is
#: ``Word = u32, State = u64, PRECISION = 24``): the table is re-quantised to 2^24.
_CODER_PRECISION = 24
#: Measured flush overhead of constriction's ``RangeEncoder.get_compressed()``: a chunk of
#: code length ``L`` bits occupies ``ceil((L + 2) / 32)`` words. Fitted on 3000 random
#: Laplace streams of 1..20000 symbols coded with their own table: exact for 98 % of them,
#: off by one word otherwise (c = 1 or 3 misses 3 %). On 533 streams of 1..65536 symbols,
#: a third of them coded with a foreign table: exact for 94 %, never off by more than one
#: word, for any c in [1, 3].
_FLUSH_BITS = 2.0

# The range coder's words are stored little-endian regardless of the host.
_WORD = np.dtype("<u4")


# --------------------------------------------------------------------------------------
# Frequency tables
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FrequencyTable:
    """Static probability model of one stream: ``P(qmin + i) = freqs[i] / sum(freqs)``.

    Attributes:
        qmin: the smallest symbol in the table.
        freqs: uint16, shape ``(K,)``, one entry per symbol ``qmin .. qmin + K - 1``. Every
            symbol that occurs in the stream has ``freq >= 1``; ``sum(freqs) <= 65535``.
            ``K == 0`` only for the table of an empty stream.
    """

    qmin: int
    freqs: np.ndarray

    def __post_init__(self) -> None:
        freqs = np.asarray(self.freqs)
        if freqs.ndim != 1 or freqs.dtype != np.uint16:
            raise ConfigError(
                f"FrequencyTable.freqs must be a 1-D uint16 array, got {freqs.dtype} "
                f"with shape {freqs.shape}"
            )
        freqs = freqs.copy()
        freqs.setflags(write=False)
        object.__setattr__(self, "freqs", freqs)
        object.__setattr__(self, "qmin", int(self.qmin))
        if freqs.size == 0:
            return
        if self.qmin < -QMAX or self.qmin + freqs.size - 1 > QMAX:
            raise ConfigError(
                f"FrequencyTable covers [{self.qmin}, {self.qmin + freqs.size - 1}], "
                f"outside [-{QMAX}, {QMAX}]"
            )
        total = int(freqs.sum(dtype=np.int64))
        if not 0 < total <= TABLE_TOTAL:
            raise ConfigError(f"FrequencyTable frequencies sum to {total}, not in [1, {TABLE_TOTAL}]")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrequencyTable):
            return NotImplemented
        return self.qmin == other.qmin and np.array_equal(self.freqs, other.freqs)

    __hash__ = None  # type: ignore[assignment]  # holds an array

    @property
    def qmax(self) -> int:
        """The largest symbol in the table."""
        return self.qmin + self.freqs.size - 1

    def probabilities(self) -> np.ndarray:
        """``freqs / sum(freqs)`` in float64: exactly what encoder and decoder give constriction.

        Both sides compute it from the same integers with the same float operations, so the
        model constriction builds from it is bit-identical on both sides.
        """
        freqs = self.freqs.astype(np.float64)
        if freqs.size == 0:
            return freqs
        return freqs / freqs.sum()

    def coder_cdf(self) -> np.ndarray:
        """The 24-bit cumulative table constriction's ``Categorical(perfect=False)`` derives.

        uint64, ``K + 1`` entries from 0 to ``2^24``. Mirrors constriction's
        ``fast_quantized_cdf`` (``src/stream/model/categorical.rs``) operation for operation:
        ``left[i] = floor(c[i-1] * (2^24 - K) / n) + i`` where ``c`` are the sequential float64
        partial sums of :meth:`probabilities` and ``n`` their sequential total, so every
        symbol in the table, even one with ``freq == 0``, gets weight >= 1. The fast decoder
        (:mod:`l2fx.rangedec`) decodes with it; tests check it against constriction.
        """
        p = self.probabilities()
        k = p.size
        if k < 2:
            return np.array([0, 1 << _CODER_PRECISION][: k + 1], dtype=np.uint64)
        cumulative = np.cumsum(p)  # np.cumsum adds sequentially, like Rust's iterator sum
        scale = float((1 << _CODER_PRECISION) - k) / float(cumulative[-1])
        left = np.floor(np.concatenate([[0.0], cumulative[:-1]]) * scale).astype(np.int64) + np.arange(k)
        return np.append(left, 1 << _CODER_PRECISION).astype(np.uint64)

    def coder_weights(self) -> np.ndarray:
        """The 24-bit integer weight of each symbol (differences of :meth:`coder_cdf`)."""
        if self.freqs.size < 2:
            return np.full(self.freqs.size, 1 << _CODER_PRECISION, dtype=np.int64)
        return np.diff(self.coder_cdf().astype(np.int64))

    def code_lengths_bits(self) -> np.ndarray:
        """Bits the range coder spends on each symbol of the table, ``24 - log2(weight)``."""
        return _CODER_PRECISION - np.log2(self.coder_weights().astype(np.float64))

    def nbytes(self) -> int:
        """Bytes the table occupies when stored: ``freqs`` as uint16 plus ``qmin`` as int16."""
        return 2 * self.freqs.size + 2

    def _model(self):
        # perfect=False is pinned explicitly (constriction's default changed between 0.3.5
        # and 0.5, and encoder and decoder must agree): the fast quantisation is a
        # deterministic closed form (see coder_weights) that takes microseconds, whereas
        # perfect=True runs an iterative optimisation per table; its bit-rate gain is
        # negligible next to the 16-bit table quantisation already applied.
        return constriction.stream.model.Categorical(self.probabilities(), perfect=False)


@dataclasses.dataclass(frozen=True, eq=False)
class SymbolHistogram:
    """Counts of the symbols ``qmin .. qmin + len(counts) - 1`` of a stream (no order).

    Lets the bit allocator predict payload sizes of candidate quantisations without
    keeping their symbol arrays around; see :func:`predict_payload_nbytes`.
    """

    qmin: int
    counts: np.ndarray  # int64, shape (K,)

    @property
    def numel(self) -> int:
        return int(self.counts.sum())


def histogram(symbols: np.ndarray) -> SymbolHistogram:
    """Counts of each symbol between the smallest and the largest that occur."""
    return chunk_histograms(symbols)[0]


def build_table(symbols: np.ndarray) -> FrequencyTable:
    """The 16-bit frequency table of ``symbols``, trimmed to ``[min, max]`` of what occurs.

    If there are at most 65535 symbols the counts are stored exactly (no quantisation loss).
    Otherwise the counts are scaled to sum 65535 with largest-remainder rounding, present
    symbols are kept at >= 1, and then units are moved between symbols while doing so lowers
    the cross entropy ``-sum_i c_i log f_i`` (the KL loss of quantisation, up to a constant);
    that greedy exchange is optimal for this separable concave objective.
    """
    hist = histogram(symbols)
    counts = hist.counts
    if counts.size == 0:
        return FrequencyTable(0, np.zeros(0, dtype=np.uint16))
    total = int(counts.sum())
    if total <= TABLE_TOTAL:
        return FrequencyTable(hist.qmin, counts.astype(np.uint16))
    return FrequencyTable(hist.qmin, _quantise_counts(counts, TABLE_TOTAL).astype(np.uint16))


def _quantise_counts(counts: np.ndarray, target: int) -> np.ndarray:
    present = counts > 0
    c = counts.astype(np.float64)
    ideal = c * (target / c.sum())
    freqs = np.floor(ideal).astype(np.int64)
    freqs[present & (freqs == 0)] = 1
    # Largest remainder: hand out what is left to the largest fractional parts.
    short = target - int(freqs.sum())
    if short > 0:
        remainder = np.where(present, ideal - freqs, -np.inf)
        order = np.argsort(-remainder, kind="stable")[:short]
        freqs[order] += 1
    # KL refinement: cost of symbol i is -c_i log f_i. gain = drop in cost for f_i + 1,
    # loss = rise in cost for f_i - 1 (never below 1 for present symbols).
    def gain(f: np.ndarray) -> np.ndarray:
        return np.where(present, c * np.log1p(1.0 / np.maximum(f, 1)), -np.inf)

    def loss(f: np.ndarray) -> np.ndarray:
        return np.where(present & (f > 1), -c * np.log1p(-1.0 / np.maximum(f, 2)), np.inf)

    while int(freqs.sum()) > target:  # forced ones overshot the total
        freqs[int(np.argmin(loss(freqs)))] -= 1
    for _ in range(4 * counts.size + 16):  # converges in far fewer steps; the cap is a guard
        g, l_ = gain(freqs), loss(freqs)
        buyer, seller = int(np.argmax(g)), int(np.argmin(l_))
        if buyer == seller or g[buyer] <= l_[seller] * (1 + 1e-12):
            break
        freqs[buyer] += 1
        freqs[seller] -= 1
    return freqs


def shannon_bits(symbols: np.ndarray | SymbolHistogram) -> float:
    """``numel * H(empirical distribution)`` in bits: no static code can be shorter."""
    counts = symbols.counts if isinstance(symbols, SymbolHistogram) else histogram(symbols).counts
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    n = counts.sum()
    return float(-(counts * np.log2(counts / n)).sum())


# --------------------------------------------------------------------------------------
# Coded streams
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodedStream:
    """One weight tensor's symbols, range coded in independent chunks.

    Attributes:
        table: the static model shared by all chunks.
        numel: number of symbols.
        chunk_size: symbols per chunk; the last chunk may be shorter.
        chunks: ``ceil(numel / chunk_size)`` independently decodable range-coder streams,
            each a sequence of little-endian uint32 words. Empty when the table has a single
            symbol (the stream is then fully determined by ``table`` and ``numel``).
        crc32: ``zlib.crc32`` of each chunk's bytes.
    """

    table: FrequencyTable
    numel: int
    chunk_size: int
    chunks: tuple[bytes, ...]
    crc32: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return _num_chunks(self.numel, self.chunk_size)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of coded symbols (the sum of the chunk lengths)."""
        return sum(len(chunk) for chunk in self.chunks)

    @property
    def stored_nbytes(self) -> int:
        """Everything :func:`stream_to_arrays` stores: payload, table, and per chunk a
        uint32 length and a uint32 CRC. ``numel``/``chunk_size`` live with the artifact."""
        return self.payload_nbytes + self.table.nbytes() + 8 * len(self.chunks)


def _num_chunks(numel: int, chunk_size: int) -> int:
    return -(-numel // chunk_size)


def _flat_symbols(symbols: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``symbols`` flattened (C order, own integer dtype) with their min and max (0, -1 if empty);
    ConfigError unless they are integers in [-QMAX, QMAX]."""
    arr = np.asarray(symbols)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"symbols must have an integer dtype, got {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size == 0:
        return flat, 0, -1
    qmin, qmax = int(flat.min()), int(flat.max())
    if qmin < -QMAX or qmax > QMAX:
        raise ConfigError(f"symbols must lie in [-{QMAX}, {QMAX}], got [{qmin}, {qmax}]")
    return flat, qmin, qmax


def _as_symbols(symbols: np.ndarray) -> np.ndarray:
    return _flat_symbols(symbols)[0].astype(np.int32, copy=False)


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def encode_symbols(
    symbols: np.ndarray, table: FrequencyTable | None = None, chunk_size: int = 1 << 16
) -> CodedStream:
    """Range code ``symbols`` (any shape, flattened in C order) under ``table``.

    ``table`` defaults to :func:`build_table` of ``symbols``; a given table must give every
    occurring symbol a frequency >= 1 (else :class:`ConfigError`).
    """
    chunk_size = _check_chunk_size(chunk_size)
    flat = _as_symbols(symbols)
    if table is None:
        table = build_table(flat)
    if flat.size:
        shifted = flat - table.qmin
        lo, hi = int(shifted.min()), int(shifted.max())
        if lo < 0 or hi >= table.freqs.size:
            raise ConfigError(
                f"symbols span [{flat.min()}, {flat.max()}] but the table covers "
                f"[{table.qmin}, {table.qmax}]"
            )
        if np.any(table.freqs[shifted] == 0):
            missing = np.unique(flat[table.freqs[shifted] == 0])
            raise ConfigError(f"symbols {missing[:8].tolist()} have frequency 0 in the table")
    n_chunks = _num_chunks(flat.size, chunk_size)
    if table.freqs.size == 1:  # a single possible symbol carries no information
        chunks = (b"",) * n_chunks
    else:
        model = table._model() if flat.size else None
        out = []
        for i in range(n_chunks):
            encoder = constriction.stream.queue.RangeEncoder()
            encoder.encode(shifted[i * chunk_size : (i + 1) * chunk_size], model)
            out.append(encoder.get_compressed().astype(_WORD, copy=False).tobytes())
        chunks = tuple(out)
    return CodedStream(
        table=table,
        numel=int(flat.size),
        chunk_size=chunk_size,
        chunks=chunks,
        crc32=tuple(zlib.crc32(c) for c in chunks),
    )


def decode_symbols(stream: CodedStream, threads: int | None = None, decoder: str = "auto") -> np.ndarray:
    """Decode ``stream`` into an int16 array of length ``stream.numel``.

    Every chunk's CRC32 is verified before anything is decoded; a mismatch, a chunk that
    is not a whole number of 32-bit words, a decoder error, or decoded garbage (a symbol
    whose table frequency is 0, or data left over after the chunk's symbols) raises
    :class:`CorruptArtifactError` naming the chunk index.

    ``decoder``: ``"numba"`` decodes the chunks in parallel threads with :mod:`l2fx.rangedec`
    (``threads`` of them, default all cores); ``"constriction"`` decodes them one after the
    other with constriction, which holds the GIL; ``"auto"`` takes numba where it is
    installed. Both return the same symbols (tested). Measured on the 2-core CI machine,
    8M symbols at 3 and 5 bits/symbol in chunks of 65536: constriction 22 M symbols/s;
    numba 61-63 M symbols/s on one thread, 115-117 M symbols/s on two.
    """
    return decode_streams([stream], threads, decoder)[0]


def decode_streams(streams: list[CodedStream], threads: int | None = None, decoder: str = "auto",
                   names: list[str] | None = None) -> list[np.ndarray]:
    """:func:`decode_symbols` of many streams at once: with numba, all their chunks are
    decoded in one parallel sweep (a model's tensors keep every core busy, whatever their
    sizes). Errors name the stream (``names[i]``, when given) and the chunk."""
    if decoder not in ("auto", "numba", "constriction"):
        raise ConfigError(f"decoder must be 'auto', 'numba' or 'constriction', got {decoder!r}")
    if decoder == "numba" and not rangedec.available():
        raise ConfigError("decoder='numba' needs numba (pip install numba)")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
    if names is not None and len(names) != len(streams):
        raise ConfigError(f"{len(names)} names for {len(streams)} streams")
    use_numba = decoder != "constriction" and rangedec.available()

    def prefix(i: int) -> str:
        return f"{names[i]}: " if names is not None else ""

    results: list[np.ndarray | None] = [None] * len(streams)
    jobs, job_streams = [], []
    for i, stream in enumerate(streams):
        try:
            trivial = _check_stream(stream)
            if trivial is not None:
                results[i] = trivial
            elif use_numba:
                jobs.append(_job(stream))
                job_streams.append(i)
            else:
                results[i] = _decode_constriction(stream)
        except CorruptArtifactError as exc:
            raise CorruptArtifactError(prefix(i) + str(exc)) from exc
    if jobs:
        outs, statuses = rangedec.decode_jobs(jobs, threads)
        for i, out, status in zip(job_streams, outs, statuses):
            bad = np.flatnonzero(status)
            if bad.size:
                index = int(bad[0])
                raise CorruptArtifactError(f"{prefix(i)}chunk {index}: {rangedec.STATUS_TEXT[int(status[index])]}")
            results[i] = out
    return results  # type: ignore[return-value]


def _check_stream(stream: CodedStream) -> np.ndarray | None:
    """Checks chunk count, CRCs and word alignment; returns the symbols when no decoding is
    needed (an empty stream, a single-symbol table), else None."""
    table, numel, chunk_size = stream.table, stream.numel, stream.chunk_size
    n_chunks = _num_chunks(numel, chunk_size)
    if len(stream.chunks) != n_chunks or len(stream.crc32) != n_chunks:
        raise CorruptArtifactError(
            f"stream of {numel} symbols in chunks of {chunk_size} needs {n_chunks} chunks, "
            f"has {len(stream.chunks)} chunks and {len(stream.crc32)} CRCs"
        )
    for index, (chunk, crc) in enumerate(zip(stream.chunks, stream.crc32)):
        if zlib.crc32(chunk) != crc:
            raise CorruptArtifactError(f"chunk {index}: CRC32 mismatch")
        if len(chunk) % _WORD.itemsize:
            raise CorruptArtifactError(f"chunk {index}: {len(chunk)} bytes is not whole 32-bit words")
    if numel == 0:
        return np.empty(0, dtype=np.int16)
    if table.freqs.size == 0:
        raise CorruptArtifactError(f"stream of {numel} symbols has an empty frequency table")
    if table.freqs.size == 1:
        for index, chunk in enumerate(stream.chunks):
            if chunk:
                raise CorruptArtifactError(f"chunk {index}: data for a single-symbol table")
        return np.full(numel, table.qmin, dtype=np.int16)
    return None


def _job(stream: CodedStream) -> "rangedec.Job":
    words = np.frombuffer(b"".join(stream.chunks), dtype=_WORD).astype(np.uint32, copy=False)
    offsets = np.zeros(len(stream.chunks) + 1, dtype=np.int64)
    np.cumsum([len(chunk) // _WORD.itemsize for chunk in stream.chunks], out=offsets[1:])
    counts = np.full(len(stream.chunks), stream.chunk_size, dtype=np.int64)
    counts[-1] = stream.numel - stream.chunk_size * (len(stream.chunks) - 1)
    return rangedec.Job(words, offsets, counts, stream.table.coder_cdf(), stream.table.freqs > 0, stream.table.qmin)


def _decode_constriction(stream: CodedStream) -> np.ndarray:
    table, numel, chunk_size = stream.table, stream.numel, stream.chunk_size
    out = np.empty(numel, dtype=np.int16)
    model = table._model()
    for index, chunk in enumerate(stream.chunks):
        start = index * chunk_size
        count = min(chunk_size, numel - start)
        words = np.frombuffer(chunk, dtype=_WORD).astype(np.uint32)
        try:
            range_decoder = constriction.stream.queue.RangeDecoder(words)
            decoded = range_decoder.decode(model, count)
            exhausted = range_decoder.maybe_exhausted()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pyo3 panics derive from BaseException
            raise CorruptArtifactError(f"chunk {index}: range decoder failed: {exc}") from exc
        if decoded.shape != (count,):
            raise CorruptArtifactError(f"chunk {index}: decoded {decoded.shape} symbols, expected {count}")
        if not exhausted:
            raise CorruptArtifactError(f"chunk {index}: data left over after {count} symbols")
        if np.any(table.freqs[decoded] == 0):
            raise CorruptArtifactError(f"chunk {index}: decoded a symbol with frequency 0")
        out[start : start + count] = decoded + table.qmin
    return out


def chunk_histograms(symbols: np.ndarray, chunk_size: int = 1 << 16) -> tuple[SymbolHistogram, np.ndarray]:
    """The histogram of ``symbols`` (flattened in C order) and, per chunk of ``chunk_size``
    symbols, the counts over the same symbol range: an int64 array of shape (chunks, K).

    One bincount per chunk: on a 2.4M-symbol layer 6 ms, where a histogram plus one bincount
    over ``chunk * K + symbol`` took 54 ms (2-core CPU, numpy).
    """
    chunk_size = _check_chunk_size(chunk_size)
    flat, qmin, qmax = _flat_symbols(symbols)
    if flat.size == 0:
        return SymbolHistogram(0, np.zeros(0, dtype=np.int64)), np.zeros((0, 0), dtype=np.int64)
    k = qmax - qmin + 1
    shifted = flat.astype(np.int16, copy=False) - np.int16(qmin)  # in [0, 254]
    n_chunks = _num_chunks(flat.size, chunk_size)
    if chunk_size >= 4096 or n_chunks <= 64:
        per_chunk = np.stack([np.bincount(shifted[start: start + chunk_size], minlength=k)
                              for start in range(0, flat.size, chunk_size)]).astype(np.int64, copy=False)
    else:  # many small chunks: one bincount over (chunk, symbol) pairs instead of a Python loop
        chunk_of = np.arange(flat.size, dtype=np.int64) // chunk_size
        per_chunk = np.bincount(chunk_of * k + shifted, minlength=n_chunks * k).reshape(n_chunks, k)
    return SymbolHistogram(qmin, per_chunk.sum(axis=0)), per_chunk


def predict_coding(symbols: np.ndarray, chunk_size: int = 1 << 16) -> tuple[FrequencyTable, int]:
    """``(build_table(symbols), predict_payload_nbytes(symbols, that table, chunk_size))`` from
    one pass over the symbols: what byte accounting asks of every candidate grid."""
    hist, per_chunk = chunk_histograms(symbols, chunk_size)
    if hist.numel == 0:
        return FrequencyTable(0, np.zeros(0, dtype=np.uint16)), 0
    table = _table_from_histogram(hist)
    return table, _payload_nbytes(hist, per_chunk, table, chunk_size)


def predict_payload_nbytes(
    symbols: Union[np.ndarray, SymbolHistogram],
    table: FrequencyTable | None = None,
    chunk_size: int = 1 << 16,
) -> int:
    """Predict ``encode_symbols(symbols, table, chunk_size).payload_nbytes`` without coding.

    Per chunk: code length ``L = sum(24 - log2 w[s])`` with constriction's 24-bit weights
    ``w`` (:meth:`FrequencyTable.coder_weights`, exact), then ``4 * ceil((L + 2) / 32)``
    bytes for the flush and the 32-bit words. Measured error: at most one word (4 bytes)
    per chunk, exact for 94-98 % of chunks. Given a :class:`SymbolHistogram` (no order), the
    symbols are assumed spread evenly over the chunks. For bit allocation only; the real
    encode decides the final size.
    """
    chunk_size = _check_chunk_size(chunk_size)
    if isinstance(symbols, SymbolHistogram):
        hist, per_chunk = symbols, None
    else:
        hist, per_chunk = chunk_histograms(symbols, chunk_size)
    if hist.numel == 0:
        return 0
    if table is None:
        table = _table_from_histogram(hist)
    return _payload_nbytes(hist, per_chunk, table, chunk_size)


def _payload_nbytes(hist: SymbolHistogram, per_chunk: np.ndarray | None, table: FrequencyTable,
                    chunk_size: int) -> int:
    numel = hist.numel  # > 0: both callers return 0 for no symbols first
    n_chunks = _num_chunks(numel, chunk_size)
    if table.freqs.size <= 1:
        return 0
    lengths = table.code_lengths_bits()
    offset = hist.qmin - table.qmin
    if offset < 0 or offset + hist.counts.size > lengths.size:
        raise ConfigError(
            f"symbols span [{hist.qmin}, {hist.qmin + hist.counts.size - 1}] but the table "
            f"covers [{table.qmin}, {table.qmax}]"
        )
    lengths = lengths[offset : offset + hist.counts.size]
    if per_chunk is not None:
        bits = per_chunk.astype(np.float64) @ lengths
    else:
        sizes = np.full(n_chunks, chunk_size, dtype=np.float64)
        sizes[-1] = numel - chunk_size * (n_chunks - 1)
        bits = sizes * (float(hist.counts @ lengths) / numel)
    words = np.ceil((bits + _FLUSH_BITS) / 32.0)
    return int(4 * words.sum())


def _table_from_histogram(hist: SymbolHistogram) -> FrequencyTable:
    present = np.nonzero(hist.counts)[0]
    counts = hist.counts[present[0] : present[-1] + 1]
    qmin = hist.qmin + int(present[0])
    if int(counts.sum()) <= TABLE_TOTAL:
        return FrequencyTable(qmin, counts.astype(np.uint16))
    return FrequencyTable(qmin, _quantise_counts(counts, TABLE_TOTAL).astype(np.uint16))


# --------------------------------------------------------------------------------------
# Serialisation (the artifact layer stores these arrays in a safetensors file)
# --------------------------------------------------------------------------------------


def stream_to_arrays(stream: CodedStream) -> dict[str, np.ndarray]:
    """Flatten ``stream`` into arrays: ``payload`` (uint8, the chunks concatenated),
    ``chunk_nbytes`` (uint32), ``crc32`` (uint32), ``table_qmin`` (int16, shape (1,)) and
    ``table_freqs`` (uint16). ``numel`` and ``chunk_size`` are kept by the caller."""
    chunk_nbytes = np.array([len(c) for c in stream.chunks], dtype=np.uint32)
    payload = np.frombuffer(b"".join(stream.chunks), dtype=np.uint8).copy()
    return {
        "payload": payload,
        "chunk_nbytes": chunk_nbytes,
        "crc32": np.array(stream.crc32, dtype=np.uint32),
        "table_qmin": np.array([stream.table.qmin], dtype=np.int16),
        "table_freqs": np.asarray(stream.table.freqs, dtype=np.uint16).copy(),
    }


def stream_from_arrays(arrays: dict[str, np.ndarray], numel: int, chunk_size: int) -> CodedStream:
    """Inverse of :func:`stream_to_arrays`; inconsistent arrays raise CorruptArtifactError.

    Only structure is checked here; chunk contents are checked (CRC) by :func:`decode_symbols`.
    """
    names = ("payload", "chunk_nbytes", "crc32", "table_qmin", "table_freqs")
    missing = [name for name in names if name not in arrays]
    if missing:
        raise CorruptArtifactError(f"coded stream is missing arrays {missing}")
    try:
        numel, chunk_size = int(numel), int(chunk_size)
    except (TypeError, ValueError) as exc:
        raise CorruptArtifactError(f"bad numel/chunk_size {numel!r}/{chunk_size!r}") from exc
    if numel < 0 or chunk_size < 1:
        raise CorruptArtifactError(f"bad numel {numel} or chunk_size {chunk_size}")
    payload, chunk_nbytes, crc = (np.asarray(arrays[n]) for n in names[:3])
    qmin, freqs = np.asarray(arrays["table_qmin"]), np.asarray(arrays["table_freqs"])
    expected = {
        "payload": (np.uint8, 1), "chunk_nbytes": (np.uint32, 1), "crc32": (np.uint32, 1),
        "table_qmin": (np.int16, 1), "table_freqs": (np.uint16, 1),
    }
    for name, arr in zip(names, (payload, chunk_nbytes, crc, qmin, freqs)):
        dtype, ndim = expected[name]
        if arr.dtype != dtype or arr.ndim != ndim:
            raise CorruptArtifactError(
                f"coded stream array {name!r} is {arr.dtype} of shape {arr.shape}, "
                f"expected 1-D {np.dtype(dtype)}"
            )
    if qmin.size != 1:
        raise CorruptArtifactError(f"table_qmin must hold one value, holds {qmin.size}")
    n_chunks = _num_chunks(numel, chunk_size)
    if chunk_nbytes.size != n_chunks or crc.size != n_chunks:
        raise CorruptArtifactError(
            f"{numel} symbols in chunks of {chunk_size} need {n_chunks} chunks; got "
            f"{chunk_nbytes.size} chunk lengths and {crc.size} CRCs"
        )
    ends = np.cumsum(chunk_nbytes, dtype=np.int64)
    if (int(ends[-1]) if ends.size else 0) != payload.size:
        raise CorruptArtifactError(
            f"chunk lengths add up to {int(ends[-1]) if ends.size else 0} bytes, "
            f"payload holds {payload.size}"
        )
    if (numel == 0) != (freqs.size == 0):
        raise CorruptArtifactError(f"table of {freqs.size} symbols for a stream of {numel}")
    try:
        table = FrequencyTable(int(qmin[0]), freqs)
    except ConfigError as exc:
        raise CorruptArtifactError(f"invalid frequency table: {exc}") from exc
    raw = payload.tobytes()
    starts = np.concatenate([[0], ends[:-1]]) if ends.size else ends
    chunks = tuple(raw[int(s) : int(e)] for s, e in zip(starts, ends))
    return CodedStream(
        table=table,
        numel=numel,
        chunk_size=chunk_size,
        chunks=chunks,
        crc32=tuple(int(c) for c in crc),
    )
