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

import numpy as np
import constriction

from .entropy import PRECISION, IntegerTables

LATENT_LIMIT = 2**31 - 1
"""Largest magnitude a latent may have (zig-zag code must fit in 32 bits)."""


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
        values = latents.astype(np.int64).reshape(self.channels, -1)
        if np.abs(values).max(initial=0) > LATENT_LIMIT:
            raise ValueError("latent magnitude exceeds 2**31 - 1")
        encoder = constriction.stream.queue.RangeEncoder()
        escaped = []
        for c in range(self.channels):
            symbols = values[c] - int(self.tables.offsets[c])
            length = int(self.tables.lengths[c])
            outside = (symbols < 0) | (symbols >= length)
            symbols[outside] = length
            encoder.encode(symbols.astype(np.int32), self.models[c])
            escaped.append(values[c][outside])
        _encode_escapes(encoder, np.concatenate(escaped))
        return encoder.get_compressed().astype("<u4").tobytes()

    def decode(self, payload: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        channels, rows, cols = shape
        if channels != self.channels:
            raise CorruptStream(f"stream has {channels} latent channels, tables have {self.channels}")
        if len(payload) % 4:
            raise CorruptStream("payload length is not a multiple of 4 bytes")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        count = rows * cols
        out = np.empty((channels, count), dtype=np.int64)
        try:
            decoder = constriction.stream.queue.RangeDecoder(words)
            escape_mask = []
            for c in range(channels):
                symbols = decoder.decode(self.models[c], count).astype(np.int64)
                length = int(self.tables.lengths[c])
                out[c] = symbols + int(self.tables.offsets[c])
                escape_mask.append(symbols == length)
            mask = np.stack(escape_mask)
            n_escapes = int(mask.sum())
            if n_escapes:
                out[mask] = _decode_escapes(decoder, n_escapes)
        except CorruptStream:
            raise
        except Exception as exc:  # constriction reports corrupt data with its own errors
            raise CorruptStream(f"range decoder failed ({exc})") from None
        return out.reshape(channels, rows, cols)


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
