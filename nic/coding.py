"""Range coding of integer latents from integer frequency tables.

Layout of the coded stream (one constriction ``RangeEncoder``, a queue, so the
decoder reads in the order the encoder wrote):

1. for each channel c = 0 … C−1: the C·H·W latents of that channel in raster order,
   as symbols k − offsets[c] of that channel's categorical table; a value outside
   the table's support is sent as the escape symbol lengths[c];
2. for each escaped value, in the same order: its zig-zag code u (0, −1, 1, −2, … →
   0, 1, 2, 3, …) as a bit length L = bit_length(u) ∈ 0..32 (uniform over 33), then
   the bits of u in chunks of at most 16, least significant first (uniform).

Escapes make every 32-bit latent round-trip exactly, instead of being clipped.
The tables are integers (see :mod:`nic.entropy`); they reach constriction as
exact dyadic floats with ``perfect=False``, so encoder and decoder build the
same fixed-point model on every machine. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import constriction

PRECISION = 16
"""Bits of the integer frequency tables: every table sums to 2**PRECISION."""

SCALE_COUNT = 64
SCALE_MIN = 0.11
SCALE_MAX = 256.0
"""The scale table of the hyperprior family's conditional (CompressAI's: 64 scales,
log-spaced; nic.entropy.GaussianConditional makes one integer table per scale)."""

DISTRIBUTIONS = ("gaussian", "laplace")
"""Shapes of that conditional's distribution."""


@dataclass(frozen=True)
class IntegerTables:
    """Per-channel integer frequency tables of one quantized latent.

    Channel c codes the integers offsets[c] .. offsets[c] + lengths[c] − 1 as
    symbols 0 .. lengths[c] − 1; symbol lengths[c] is the escape. Its frequencies
    are frequencies[starts[c] : starts[c] + lengths[c] + 1], all ≥ 1, summing to
    2**PRECISION.
    """

    offsets: np.ndarray  # int32 (channels,)
    lengths: np.ndarray  # int32 (channels,)
    frequencies: np.ndarray  # int32 (Σ (lengths + 1),)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths + 1)[:-1]]).astype(np.int64)

    def select(self, start: int, stop: int) -> "IntegerTables":
        """The tables of channels start .. stop − 1."""
        starts = self.starts
        end = int(starts[stop - 1]) + int(self.lengths[stop - 1]) + 1
        return IntegerTables(self.offsets[start:stop].copy(), self.lengths[start:stop].copy(),
                             self.frequencies[int(starts[start]) : end].copy())

    def channel(self, c: int) -> np.ndarray:
        start = int(self.starts[c])
        return self.frequencies[start : start + int(self.lengths[c]) + 1]


LATENT_LIMIT = 2**31 - 1
"""Largest magnitude a latent may have (zig-zag code must fit in 32 bits)."""


class CodeLengths:
    """Exact code length in bits of integers under tables of an :class:`IntegerTables`:
    −log2(frequency / 2**PRECISION) of the symbol, or for a value outside its table the
    escape symbol's, then the escape's bit length (uniform over 33) and its bits, as
    :func:`_encode_escapes` sends them. numpy; the search's torch twin is
    nic.quantization.TableRate."""

    def __init__(self, tables: IntegerTables):
        self.offsets = tables.offsets.astype(np.int64)
        self.lengths = tables.lengths.astype(np.int64)
        self.starts = tables.starts
        self.bits = -np.log2(tables.frequencies.astype(np.float64) / (1 << PRECISION))

    def __call__(self, values: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Bits of int64 ``values`` under tables ``t`` (arrays that broadcast)."""
        symbol = values - self.offsets[t]
        inside = (symbol >= 0) & (symbol < self.lengths[t])
        bits = self.bits[self.starts[t] + np.where(inside, symbol, self.lengths[t])]
        if not inside.all():
            zigzag = np.where(values >= 0, 2 * values, -2 * values - 1)
            bits = bits + np.where(inside, 0.0, np.log2(33) + np.frexp(zigzag.astype(np.float64))[1])
        return bits


class CorruptStream(ValueError):
    """The payload does not decode with the tables it claims."""


def _models(tables: IntegerTables) -> list:
    scale = float(1 << PRECISION)
    return [
        constriction.stream.model.Categorical(tables.channel(c).astype(np.float64) / scale, perfect=False)
        for c in range(len(tables.lengths))
    ]


class LatentCoder:
    """Encodes/decodes int latents of shape (C, H, W) with one quality's tables."""

    def __init__(self, tables: IntegerTables):
        self.tables = tables
        self.models = _models(tables)
        self.channels = len(tables.lengths)

    def encode(self, latents: np.ndarray) -> bytes:
        if latents.ndim != 3 or latents.shape[0] != self.channels:
            raise ValueError(f"latents must have shape ({self.channels}, H, W), got {latents.shape}")
        return self.encode_channels(lambda c: latents[c].reshape(-1)).tobytes()

    def encode_channels(self, channel: Callable[[int], np.ndarray]) -> np.ndarray:
        """Payload as little-endian 32-bit words; ``channel(c)`` gives channel c's
        latents in raster order (from memory or from a spill file, one at a time)."""
        encoder = constriction.stream.queue.RangeEncoder()
        escaped = []
        for c in range(self.channels):
            values = channel(c).astype(np.int64)
            if np.abs(values).max(initial=0) > LATENT_LIMIT:
                raise ValueError("latent magnitude exceeds 2**31 - 1")
            escaped.append(_encode_with_table(encoder, values, self.tables, self.models, c))
        _encode_escapes(encoder, np.concatenate(escaped))
        return encoder.get_compressed().astype("<u4", copy=False)

    def decode(self, payload: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        channels, rows, cols = shape
        out = np.empty((channels, rows * cols), dtype=np.int64)

        def patch(flat: np.ndarray, values: np.ndarray) -> None:
            out.reshape(-1)[flat] = values

        self.decode_channels(payload, shape, out.__setitem__, patch)
        return out.reshape(channels, rows, cols)

    def decode_channels(self, payload: bytes, shape: tuple[int, int, int],
                        put_channel: Callable[[int, np.ndarray], None],
                        patch: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Decode channel by channel into ``put_channel(c, values)``, then hand the
        escaped values to ``patch(flat indices over (C, H, W), values)``."""
        channels, rows, cols = shape
        if channels != self.channels:
            raise CorruptStream(f"stream has {channels} latent channels, tables have {self.channels}")
        if len(payload) % 4:
            raise CorruptStream("payload length is not a multiple of 4 bytes")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32, copy=False)
        count = rows * cols
        try:
            decoder = constriction.stream.queue.RangeDecoder(words)
            escapes = []
            for c in range(channels):
                symbols = decoder.decode(self.models[c], count).astype(np.int64)
                length = int(self.tables.lengths[c])
                put_channel(c, symbols + int(self.tables.offsets[c]))
                # Flat positions, not a mask: memory in proportion to the escapes, not the image.
                escapes.append(np.flatnonzero(symbols == length) + c * count)
            flat = np.concatenate(escapes)
            if len(flat):
                patch(flat, _decode_escapes(decoder, len(flat)))
            _check_exhausted(decoder)
        except (CorruptStream, OSError, MemoryError):  # ours, or the spill file's: not the stream's fault
            raise
        except Exception as exc:  # constriction reports corrupt data with its own errors
            raise CorruptStream(f"range decoder failed ({exc})") from None


def _encode_with_table(encoder, values: np.ndarray, tables: IntegerTables, models: list, t: int) -> np.ndarray:
    """Encode int64 ``values`` as symbols of table t (the escape symbol outside it);
    returns the escaped values, to be sent after every table's symbols."""
    symbols = values - int(tables.offsets[t])
    length = int(tables.lengths[t])
    outside = (symbols < 0) | (symbols >= length)
    symbols[outside] = length
    encoder.encode(symbols.astype(np.int32), models[t])
    return values[outside]


def _check_exhausted(decoder) -> None:
    """A stream that ends early, or goes on after its last symbol, decodes to something:
    only the coder's final state tells. Every complete stream ends exhausted."""
    if not decoder.maybe_exhausted():
        raise CorruptStream("the stream is truncated or has data after its last symbol")


def _encode_escapes(encoder, values: np.ndarray) -> None:
    if len(values) == 0:
        return
    u = np.where(values >= 0, 2 * values, -2 * values - 1).astype(np.int64)
    # frexp gives u = m·2**e with ½ ≤ m < 1, so e is the exact bit length (u < 2**53).
    bit_lengths = np.frexp(u.astype(np.float64))[1].astype(np.int64)
    encoder.encode(bit_lengths.astype(np.int32), constriction.stream.model.Uniform(33))
    for shift in (0, 16):
        take = bit_lengths > shift
        if take.any():
            bits = np.minimum(bit_lengths[take] - shift, 16)
            chunk = (u[take] >> shift) & ((1 << bits) - 1)
            encoder.encode(chunk.astype(np.int32), constriction.stream.model.Uniform(), (1 << bits).astype(np.int32))


def _decode_escapes(decoder, count: int) -> np.ndarray:
    bit_lengths = decoder.decode(constriction.stream.model.Uniform(33), count).astype(np.int64)
    u = np.zeros(count, dtype=np.int64)
    for shift in (0, 16):
        take = bit_lengths > shift
        if take.any():
            bits = np.minimum(bit_lengths[take] - shift, 16)
            chunk = decoder.decode(constriction.stream.model.Uniform(), (1 << bits).astype(np.int32))
            u[take] |= chunk.astype(np.int64) << shift
    return np.where(u % 2 == 0, u // 2, -(u + 1) // 2)


class IndexedCoder:
    """Encodes/decodes integers each with the table its *index* picks, the indices known
    to both sides (the hyperprior family's scale indices; :mod:`nic.hyperprior`).

    Layout of one part: the values grouped by index, index 0 first, each group in raster
    order (a stable sort), as symbols k − offsets[t] of table t (the escape symbol
    lengths[t] outside it); then the part's escaped values, in the same order, as
    :class:`LatentCoder` sends them. Grouping lets every group go to the coder in one
    call. A stream is one part, or several in a row (:meth:`encoder`,
    :meth:`decoder`): the context passes of :mod:`nic.context`, where a part's indices
    depend on the values of the parts before it."""

    def __init__(self, tables: IntegerTables):
        self.tables = tables
        self.models = _models(tables)

    def _groups(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in coding order, group boundaries over the table indices);
        ValueError for an index without a table."""
        count = len(self.models)
        if len(indices) and (indices.min() < 0 or indices.max() >= count):
            raise ValueError(f"table indices must lie in 0 … {count - 1}")
        # A stable sort of small integers is a radix sort: several times faster on
        # uint8 than on int64 (a Kodak pass: 0.35 against 2.4 ms).
        narrow = indices.astype(np.uint8 if count <= 256 else np.uint16 if count <= 65536 else np.int64)
        order = np.argsort(narrow, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(narrow, minlength=count))])
        return order, bounds

    def encode(self, values: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Payload words (little-endian uint32) of int64 ``values`` with table ``indices``
        (both flat, the same length)."""
        writer = self.encoder()
        writer.encode(values, indices)
        return writer.finish()

    def encoder(self) -> "IndexedEncoder":
        """A writer of a payload's parts, one :meth:`IndexedEncoder.encode` per part: only
        the coded words are held, whatever the number of parts."""
        return IndexedEncoder(self)

    def decode(self, payload: bytes, indices: np.ndarray) -> np.ndarray:
        """int64 values (flat, in the order of ``indices``) from the payload."""
        reader = self.decoder(payload)
        out = reader.decode(indices)
        reader.finish()
        return out

    def decoder(self, payload: bytes) -> "IndexedDecoder":
        """A reader of the payload's parts, one :meth:`IndexedDecoder.decode` per part."""
        return IndexedDecoder(self, payload)


class IndexedEncoder:
    """The parts of one :class:`IndexedCoder` payload, written in order."""

    def __init__(self, coder: IndexedCoder):
        self.coder = coder
        self._encoder = constriction.stream.queue.RangeEncoder()

    def encode(self, values: np.ndarray, indices: np.ndarray) -> None:
        """The next part: int64 ``values`` with table ``indices`` (both flat)."""
        if np.abs(values).max(initial=0) > LATENT_LIMIT:
            raise ValueError("latent magnitude exceeds 2**31 - 1")
        coder, encoder = self.coder, self._encoder
        order, bounds = coder._groups(indices)
        escaped = []
        for t in np.flatnonzero(bounds[1:] != bounds[:-1]).tolist():  # the tables this part uses
            group = values[order[bounds[t]:bounds[t + 1]]]
            escaped.append(_encode_with_table(encoder, group, coder.tables, coder.models, t))
        _encode_escapes(encoder, np.concatenate(escaped) if escaped else np.zeros(0, np.int64))

    def finish(self) -> np.ndarray:
        """The payload words (little-endian uint32)."""
        return self._encoder.get_compressed().astype("<u4", copy=False)


class IndexedDecoder:
    """The parts of one :class:`IndexedCoder` payload, read in order; CorruptStream on
    anything the coder could not have written."""

    def __init__(self, coder: IndexedCoder, payload: bytes):
        if len(payload) % 4:
            raise CorruptStream("payload length is not a multiple of 4 bytes")
        self.coder = coder
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32, copy=False)
        try:
            self._decoder = constriction.stream.queue.RangeDecoder(words)
        except Exception as exc:
            raise CorruptStream(f"range decoder failed ({exc})") from None

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """The next part's int64 values (flat, in the order of ``indices``)."""
        coder, decoder = self.coder, self._decoder
        order, bounds = coder._groups(indices)
        out = np.empty(len(indices), dtype=np.int64)
        try:
            escapes = []
            for t in np.flatnonzero(bounds[1:] != bounds[:-1]).tolist():  # the tables this part uses
                count = int(bounds[t + 1] - bounds[t])
                symbols = decoder.decode(coder.models[t], count).astype(np.int64)
                where = order[bounds[t]:bounds[t + 1]]
                out[where] = symbols + int(coder.tables.offsets[t])
                escapes.append(where[symbols == int(coder.tables.lengths[t])])
            flat = np.concatenate(escapes) if escapes else np.zeros(0, np.int64)
            if len(flat):
                out[flat] = _decode_escapes(decoder, len(flat))
        except (CorruptStream, MemoryError):
            raise
        except Exception as exc:  # constriction reports corrupt data with its own errors
            raise CorruptStream(f"range decoder failed ({exc})") from None
        return out

    def finish(self) -> None:
        """CorruptStream unless the payload ended exactly after the last part."""
        _check_exhausted(self._decoder)
