"""The ``pixels`` family: no model, the pixels themselves, each within a step of the
original (lossless at step 1).

The learned transforms never saw text, line art, hatching or screenshots and cannot
reproduce them at any rate (docs/results/hard-content.md). A predictive pixel coder
can: every pixel comes back within ±⌊step/2⌋ of the original, the near-lossless mode
of JPEG-LS in spirit. ``nic encode`` without ``--model`` codes with the model first and
then tries this family (nic.api): its file is kept only where it is exact and no
larger, or worth its extra bits (``nic.api._worth``). ``--model pixels -q Q`` forces it, at the step ``STEPS[Q]``.

How a plane is coded. Gray images have one plane; colour ones G, then R and B, each
of those two predicted by G's decoded residual at the same pixel. A plane's values
e = x − 128 are visited in two passes over a checkerboard: pass A (the pixels with
i + j even) row by row, then pass B (i + j odd) a band of rows at a time. An image
taller than it is wide is scanned transposed, so that the rows, which pass A visits one
at a time, are the shorter side (at most 4,096 of them):

* pass A predicts from the A pixels a = (i − 1, j − 1), b = (i − 1, j + 1) and
  c = (i − 2, j): the median of a, b and a + b − c (LOCO-I's edge detector turned 45°;
  (a + b)/2 in the second row, the A pixel two to the left in the first). With the
  GRADIENT predictor (every file written since the thirteenth session), from the fourth
  row on it predicts c instead where the image changes downward no more than across:
  |a − a'| + |b − b'| ≤ |a − b|, a' and b' the A pixels two rows above a and b. Vertical
  strokes, stripes and window edges, which the 45° median cuts across, are then
  predicted along;
* pass B from its four A neighbours: the mean of the pair, up and down or left and
  right, whose difference is smaller (along an edge, not across it; left and right
  in an image one row high).

The index k = round((e − prediction) / step) (halves toward zero) is what is coded;
the decoded value is prediction + k·step. Everything is integer arithmetic, so the
decoder repeats the encoder's predictions exactly. Each index is coded with the integer
table of its *context*: the plane, the pass and how large the indices of its already
coded neighbours are (``CONTEXT_BOUNDS``). A context's table is one of ``TABLES`` fixed
ones (two-sided geometric, made by integer arithmetic alone, :func:`tables`) or the
file's own, described in the file (``CUSTOM``), whichever codes the context's indices
in fewer bits, description included. Range coding is nic.coding's, one part per row of
pass A and per band of pass B.

Payload (format version 2): two substreams,

| name   | shape                  | content                                                      |
|--------|------------------------|--------------------------------------------------------------|
| ``pset`` | (1, 1, 1)              | bytes, zero-padded to 4: the step (1..255), or ``EXTENDED`` (0), the predictor (``GRADIENT``) and the step; then each context's table (plane, pass, context, in that order): a fixed table's index, or ``CUSTOM`` and the table |
| ``pixl`` | (1, latent rows, columns) | the range-coded indices, plane after plane: pass A's, the first row as one part and then one part per row, then pass B's, one part per band (:func:`_pass_b_pieces`) |

A reader older than the GRADIENT predictor takes ``EXTENDED`` for a step and refuses the
file ("pset gives step 0") instead of decoding it wrongly.

The dictionary codings (``INTERLEAVED``, ``PLANES`` in place of the predictor) skip the
scan: ``pset`` is EXTENDED, the coding and the step, with no tables, and ``pixl`` one
LZMA2 stream (raw, fixed dictionary: ``DICTIONARY_BYTES``) of the pixel values quantized
to the step, zero-padded to 4 bytes. The scan predicts each pixel from its neighbours
and cannot see a glyph, an icon or a stripe repeated elsewhere; LZMA2's matches can (2-50x
fewer bits on text, screenshots, line art and patterns: docs/results/hard-content.md,
section 9). The default encoder tries it lossless and, where an estimate at the quality's
step says it could pay, at the ladder's steps (a chirp or large text, whose quantized
values repeat where the exact ones do not: section 11), and keeps whichever file is
cheaper; ``--model pixels`` (:func:`compress`) takes the smaller coding at its step. Pixel tiles
over a model's file (nic.overlay) take either coding, by rate + λ·distortion. Images above ``MAX_PIXELS``
pixels are not coded this way (the decoder holds the whole
image); a file that claims one is refused. Math only: no I/O.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

from .coding import PRECISION, CodeLengths, CorruptStream, IndexedCoder, IntegerTables
from .container import FormatError, Substream

MODEL_ID = 3
NAME = "pixels"
FORMAT_VERSION = 2

MAX_PIXELS = 1 << 24
"""Largest image (16.7 megapixels) this family codes: the decoder holds it whole."""

STEPS = (None, 40, 28, 20, 14, 10, 6, 3, 1)
"""The step of ``--model pixels -q Q`` (index Q; a fractional quality takes the one below)."""

LADDER = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 18, 20, 22, 24, 28, 32, 40, 48, 64)
"""Steps the encoder's choice against the model searches (nic.api)."""

MAX_STEP = 255
CENTRE = 128
LIMIT = 4096
"""Decoded residuals are clipped to ±LIMIT (honest ones stay within ±1024): a hostile
stream cannot grow them without bound."""

TABLES = 48
CONTEXT_BOUNDS = np.array([0, 1, 2, 4, 8, 16, 40])
"""Context of an index: how many bounds lie below the sum of its coded neighbours' |k|."""
CONTEXTS = len(CONTEXT_BOUNDS) + 1
PASSES = 2
MEDIAN, GRADIENT = 0, 1
"""Pass A's predictors: MEDIAN, the median of a, b and a + b − c (the files of the first
version); GRADIENT, that median or the pixel c two rows up, whichever the gradients
around say (what the encoder writes now: 10-18 % fewer bits on text, line art and
screenshots, 43 % on the gratings, docs/results/hard-content.md section 7)."""
EXTENDED = 0
"""A ``pset`` that begins with this byte (a step no reader accepts) gives the predictor
in its second byte and the step in its third; one that begins with the step (1..255)
has the MEDIAN predictor."""
INTERLEAVED, PLANES = 2, 3
"""The dictionary codings, in place of a predictor: no scan and no tables, the pixel
values quantized to the step, q = ⌊(x + ⌊(step − 1)/2⌋) / step⌋ (decoded min(q·step,
255): within ±⌊step/2⌋), as bytes in the image's order, the channels of a pixel side by
side (INTERLEAVED) or plane after plane (PLANES), compressed as one LZMA2 stream (raw,
with a DICTIONARY_BYTES dictionary, fixed by the format, so that no file can make the
decoder allocate more). Repeated glyphs, icons, hatching and stripes cost nearly
nothing this way; the predictive scan cannot see them (docs/results/hard-content.md
section 9). Readers older than these codings refuse such a file ("predictor 2")."""
DICTIONARIES = (INTERLEAVED, PLANES)
DICTIONARY_BYTES = 1 << 23
DICTIONARY_PRESET = 2
"""The encoder's LZMA2 preset at effort 1 (768x512: 15-90 ms)."""
EFFORT_PRESETS = (None, DICTIONARY_PRESET, 6, 9 | lzma.PRESET_EXTREME, 9 | lzma.PRESET_EXTREME)
"""The LZMA2 preset of each encoder effort (index 1..4). A preset is the encoder's alone:
the stream's chunks carry their own settings, and every preset decodes with the format's
dictionary size. Stronger presets find longer and older matches (the hatching: 0.224 bpp
at 2, 0.119 at 6, 0.047 at 9e; docs/results/hard-content.md section 10) for 3-40x the time."""
BAND_PIXELS = 1 << 17
"""Pass B runs a band of rows at a time, as many as hold about this many pixels (a row
wider than that in parts of this many of its pass-B pixels)."""
SPAN = 2047
"""Support of the widest table: |k| ≤ SPAN; beyond, an escape (nic.coding)."""


@dataclass(frozen=True)
class Config:
    model_id: int = MODEL_ID
    name: str = NAME


class Model:
    """The family's stand-in for a weights file: nothing to load."""

    config = Config()
    qualities = 8
    latent_channels = 1


MODEL = Model()
NO_WEIGHTS = bytes(8)
"""The weights hash a pixels file carries."""


# -- tables ---------------------------------------------------------------------------

def _powers() -> np.ndarray:
    """p[t, k] = 2^40 · r_t^k, k = 0..SPAN, each step floored as in integers, for the
    decay r_t = 1 − D_t/2^16 of table t, D_t = (16, 13, 11, 9)[t % 4]·2^12 >> t // 4
    (t = 0: r = 0). All below 2^41: exact in int64."""
    t = np.arange(TABLES)
    decay = 65536 - ((np.array([16, 13, 11, 9])[t % 4] << 12) >> (t // 4))
    p = np.empty((TABLES, SPAN + 1), dtype=np.int64)
    p[:, 0] = 1 << 40
    for k in range(1, SPAN + 1):
        p[:, k] = (p[:, k - 1] * decay) >> 16
    return p


def _table(p: np.ndarray) -> np.ndarray:
    """Frequencies over k = −L..L, then the escape, of one row of :func:`_powers`
    (p(k) ∝ r^|k|), in integers only, summing to 2**PRECISION, each ≥ 1."""
    total = 1 << PRECISION
    mass = int(p[0]) + 2 * int(p[1:].sum())
    budget = total - (2 * SPAN + 2)
    raw = p * budget // mass  # below 2^57
    half = max(1, int(np.flatnonzero(raw >= 1)[-1]))
    tail = max(1, 2 * int(p[half + 1:].sum()) * budget // mass)
    side = np.maximum(1, raw[1:half + 1])
    freq = np.concatenate([side[::-1], raw[:1], side, [tail]])
    freq[half] += total - int(freq.sum())
    return freq


@lru_cache(maxsize=1)
def tables() -> IntegerTables:
    """The ``TABLES`` integer tables (made once per process)."""
    made = [_table(row) for row in _powers()]
    lengths = np.array([len(f) - 1 for f in made], dtype=np.int32)
    return IntegerTables(offsets=-(lengths // 2), lengths=lengths, frequencies=np.concatenate(made).astype(np.int32))


@lru_cache(maxsize=1)
def _costs() -> np.ndarray:
    """Bits of k = −SPAN..SPAN under each table (TABLES, 2·SPAN + 1), escapes included."""
    return CodeLengths(tables())(np.arange(-SPAN, SPAN + 1)[None, :], np.arange(TABLES)[:, None])


MAX_LEVEL = 61
CUSTOM = 255
"""A context's table is one of the fixed ones (its index, a byte) or, after the byte
CUSTOM, the file's own: the count n, then n values with a level each (value v₁ as a
zig-zag varint, then the gaps v_i − v_{i−1} ≥ 1 as varints; a level is a byte 0..MAX_LEVEL).
Its frequencies over v₁..v_n are 1 + ⌊w·(2^16 − L − 1)/Σw⌋ (L = v_n − v₁ + 1, w = (2 |
level & 1) << (level >> 1) for a listed value, 0 for the others), the escape's 1, and
what is left of 2^16 to the largest w (:func:`custom_table`). Varints are canonical (no
trailing zero byte)."""


def _level_weights(levels: np.ndarray) -> np.ndarray:
    levels = levels.astype(np.int64)
    return (2 | (levels & 1)) << (levels >> 1)


def custom_table(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Frequencies (support values[0]..values[-1], then the escape), summing to 2**PRECISION."""
    low, length = int(values[0]), int(values[-1] - values[0]) + 1
    w = np.zeros(length, dtype=np.int64)
    w[values - low] = _level_weights(levels)
    total = 1 << PRECISION
    freq = np.append(1 + w * (total - length - 1) // int(w.sum()), 1)
    freq[int(np.argmax(w))] += total - int(freq.sum())
    return freq


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(3):  # every field here is below 2**21
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and shift > 7:
                raise FormatError("substream pset has a number with a trailing zero byte")
            return value, at
    raise FormatError("substream pset has a number longer than 3 bytes")


def _spec_bytes(spec) -> bytes:
    if spec[0] == "fixed":
        return bytes([spec[1]])
    values, levels = spec[1], spec[2]
    first = int(values[0])
    out = [bytes([CUSTOM]), _varint(len(values)), _varint(2 * first if first >= 0 else -2 * first - 1),
           bytes([int(levels[0])])]
    for gap, level in zip(np.diff(values), levels[1:]):
        out += [_varint(int(gap)), bytes([int(level)])]
    return b"".join(out)


def _parse_spec(data: bytes, at: int):
    kind = data[at]
    at += 1
    if kind != CUSTOM:
        if kind >= TABLES:
            raise FormatError(f"substream pset names table {kind} (0..{TABLES - 1} or {CUSTOM})")
        return ("fixed", kind), at
    count, at = _read_varint(data, at)
    if not 1 <= count <= 2 * SPAN:
        raise FormatError(f"substream pset has a table of {count} values")
    u, at = _read_varint(data, at)
    values, levels = [u // 2 if u % 2 == 0 else -(u + 1) // 2], [data[at]]
    at += 1
    for _ in range(count - 1):
        gap, at = _read_varint(data, at)
        if gap < 1:
            raise FormatError("substream pset has a table whose values do not increase")
        values.append(values[-1] + gap)
        levels.append(data[at])
        at += 1
    if values[0] < -SPAN or values[-1] > SPAN or values[-1] - values[0] >= 2 * SPAN or max(levels) > MAX_LEVEL:
        raise FormatError("substream pset has a table outside the allowed values or levels")
    return ("custom", np.array(values, dtype=np.int64), np.array(levels, dtype=np.int64)), at


def _choose(row: np.ndarray) -> tuple:
    """(spec, bits) of one context's histogram over k = −SPAN..SPAN: the fixed table of
    least code length, or the context's own table where that codes it in fewer bits,
    description included."""
    costs = _costs() @ row if row.any() else np.zeros(TABLES)
    best = int(np.argmin(costs))
    found = (("fixed", best), float(costs[best]))
    present = np.flatnonzero(row[1:-1]) + 1  # the end bins hold clipped values: escapes
    if len(present) and not row[0] and not row[-1]:
        counts = row[present]
        levels = np.clip(np.searchsorted(_level_weights(np.arange(MAX_LEVEL + 1)), 2 * counts, side="right") - 1,
                         0, MAX_LEVEL)
        values = present - SPAN
        freq = custom_table(values, levels)
        bits = float(-(counts * np.log2(freq[values - values[0]] / (1 << PRECISION))).sum())
        spec = ("custom", values, levels)
        if bits + 8 * len(_spec_bytes(spec)) < found[1] + 8:
            found = (spec, bits)
    return found


def _tables_of(specs: list) -> tuple[IntegerTables, np.ndarray]:
    """The file's tables, in the order the contexts first use them (a fixed table once,
    however many contexts use it; each custom table), and each context's position among
    them."""
    fixed = tables()
    made, position, seen = [], [], {}
    for spec in specs:
        if spec[0] == "fixed":
            if spec[1] not in seen:
                seen[spec[1]] = len(made)
                f = fixed.channel(spec[1]).astype(np.int64)
                made.append((int(fixed.offsets[spec[1]]), f))
            position.append(seen[spec[1]])
        else:
            position.append(len(made))
            made.append((int(spec[1][0]), custom_table(spec[1], spec[2])))
    return (IntegerTables(offsets=np.array([o for o, _ in made], dtype=np.int32),
                          lengths=np.array([len(f) - 1 for _, f in made], dtype=np.int32),
                          frequencies=np.concatenate([f for _, f in made]).astype(np.int32)),
            np.array(position, dtype=np.int64))


# -- the scan: one routine for both sides ----------------------------------------------

Take = Callable[[int, "np.ndarray | None", np.ndarray, np.ndarray], np.ndarray]
"""take(part, prediction, context, positions) → the part's indices k. ``part`` is
plane·2 + pass; the encoder quantizes there, the decoder decodes. A prediction of None
is a chain (:func:`_chain`): each value predicted by the one decoded before it."""


_CONTEXT_OF = np.searchsorted(CONTEXT_BOUNDS, np.arange(CONTEXT_BOUNDS[-1] + 2), side="left").astype(np.int32)
"""The context of each activity 0 … CONTEXT_BOUNDS[-1] + 1 (any larger one has the last's)."""


def _context(activity: np.ndarray) -> np.ndarray:
    """How many CONTEXT_BOUNDS lie below each activity (≥ 0), int32: a table look-up."""
    return _CONTEXT_OF.take(activity, mode="clip")


def _neighbours(cols: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns left and right of ``cols``, mirrored at the edges (keeping the parity where
    the row has two pixels or more)."""
    left = np.where(cols >= 1, cols - 1, np.minimum(cols + 1, width - 1))
    right = np.where(cols + 1 < width, cols + 1, np.maximum(cols - 1, 0))
    return left, right


def _clip(values: np.ndarray) -> np.ndarray:
    """values within ±LIMIT (np.clip is several times slower on short rows)."""
    return np.minimum(np.maximum(values, -LIMIT), LIMIT)


def _chain(k: np.ndarray, step: int) -> np.ndarray:
    """Decoded values of a chain: each predicted by the one before (the first by 0)."""
    d = np.cumsum(k.astype(np.int64) * step)
    if np.abs(d).max(initial=0) <= LIMIT:
        return d
    out, value = np.empty(len(k), dtype=np.int64), 0
    for n, v in enumerate(k.tolist()):  # only a hostile stream gets here: clip as the encoder would
        value = min(LIMIT, max(-LIMIT, value + v * step))
        out[n] = value
    return out


def _chained_indices(values: np.ndarray, step: int) -> np.ndarray:
    """The encoder's side of :func:`_chain`: each index against the value decoded before it."""
    out, value, half = [], 0, (step - 1) // 2
    for v in values.tolist():
        magnitude = (abs(v - value) + half) // step
        q = magnitude if v >= value else -magnitude
        out.append(q)
        value = min(LIMIT, max(-LIMIT, value + q * step))
    return np.array(out, dtype=np.int64)


def _pass_b_pieces(height: int, width: int, columns: list[np.ndarray]):
    """(rows, columns) of pass B's pixels in coding order, a piece of at most about
    BAND_PIXELS positions at a time: bands of whole rows, or a very wide row in parts."""
    band = BAND_PIXELS // width
    for start in range(0, height, max(1, band)):
        if band >= 1:
            rows = np.arange(start, min(height, start + band))
            cols = np.concatenate([columns[(n + 1) % 2] for n in rows])
            if len(cols):
                yield np.repeat(rows, [len(columns[(n + 1) % 2]) for n in rows]), cols
        else:
            row = columns[(start + 1) % 2]
            for first in range(0, len(row), BAND_PIXELS):
                cols = row[first:first + BAND_PIXELS]
                yield np.full(len(cols), start), cols


def _predict_a(d: np.ndarray, magnitude: np.ndarray, i: int, cols: np.ndarray, left: np.ndarray,
               right: np.ndarray, predictor: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, activity) of pass A's pixels in row i ≥ 1, columns ``cols`` (every
    second one from cols[0]: the row's A pixels)."""
    # int16 throughout: decoded residuals lie within ±LIMIT, so a + b − c, the gradients
    # (each ≤ 4·LIMIT) and the activities (five magnitudes) stay within its range.
    up, above = d[i - 1], magnitude[i - 1]
    activity = above.take(left) + above.take(right)
    a, b = up.take(left), up.take(right)
    if i == 1:
        return (a + b) >> 1, activity
    c = d[i - 2, cols[0]::2]
    # the median of a, b and the plane through a, b and the pixel two rows up
    low, high = np.minimum(a, b), np.maximum(a, b)
    prediction = np.maximum(low, np.minimum(high, a + b - c))
    if predictor == GRADIENT and i >= 3:
        # the pixel two rows up where the image changes downward no more than across
        third = d[i - 3]
        down = np.abs(a - third.take(left)) + np.abs(b - third.take(right))
        prediction = np.where(down <= high - low, c, prediction)
    return prediction, activity + magnitude[i - 2, cols[0]::2]


def _predict_b(d: np.ndarray, magnitude: np.ndarray, r: np.ndarray, cols: np.ndarray, height: int,
               width: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, activity) of pass B's pixels at rows ``r``, columns ``cols``."""
    left, right = _neighbours(cols, width)
    up = np.where(r >= 1, r - 1, np.minimum(r + 1, height - 1))
    down = np.where(r + 1 < height, r + 1, np.maximum(r - 1, 0))
    here = r * width
    at = (up * width + cols, down * width + cols, here + left, here + right)  # in the flattened planes
    flat, size = d.reshape(-1), magnitude.reshape(-1)
    u, v, w, x = (flat.take(n) for n in at)  # int16, as in :func:`_predict_a`
    vertical = (np.abs(u - v) <= np.abs(w - x)) if height > 1 else False  # one row: no pixel above
    prediction = np.where(vertical, (u + v) >> 1, (w + x) >> 1)
    activity = size.take(at[0]) + size.take(at[1]) + size.take(at[2]) + size.take(at[3])
    return prediction, activity


def _scan_plane(height: int, width: int, step: int, plane: int, side: np.ndarray | None, take: Take,
                keep: bool = False, predictor: int = GRADIENT):
    """(d, |k|, k) of one plane (H, W): the decoded residuals and the indices' magnitudes
    (int16: both within ±LIMIT, all a prediction and a context need) and, if ``keep``,
    the indices (int32). ``side``: the magnitudes of the plane this one is predicted
    from, added to every context but the first row's (sums of five magnitudes stay
    below 2^15)."""
    d = np.zeros((height, width), dtype=np.int16)
    k = np.zeros((height, width) if keep else (1, 1), dtype=np.int32)
    magnitude = np.zeros((height, width), dtype=np.int16)
    columns = [np.arange(0, width, 2), np.arange(1, width, 2)]
    sides = [_neighbours(c, width) for c in columns]

    flat_d, flat_magnitude, flat_k = d.reshape(-1), magnitude.reshape(-1), k.reshape(-1)
    flat_side = None if side is None else side.reshape(-1)

    def settle(at, positions: np.ndarray, prediction: np.ndarray | None, activity: np.ndarray, part: int) -> None:
        """Take the indices at flat ``positions`` (``at``: the same as an index of the
        flattened planes: a slice for a row's A pixels; prediction None: a chain along
        them, :func:`_chain`)."""
        if flat_side is not None and prediction is not None:
            activity = activity + flat_side[at]
        got = _clip(take(part, prediction, _context(activity), positions))
        if keep:
            flat_k[at] = got
        flat_magnitude[at] = np.abs(got)
        flat_d[at] = _chain(got, step) if prediction is None else _clip(prediction + got * step)

    for i in range(height):  # pass A, row by row: each row predicts from the one above
        cols = columns[i % 2]
        if not len(cols):
            continue
        at = slice(i * width + i % 2, (i + 1) * width, 2)
        if i == 0:  # along the row, each from the A pixel two to the left
            settle(at, cols, None, np.zeros(len(cols), np.int64), plane * 2)
        else:
            settle(at, i * width + cols, *_predict_a(d, magnitude, i, cols, *sides[i % 2], predictor), plane * 2)
    for r, cols in _pass_b_pieces(height, width, columns):  # pass B, from A pixels only
        positions = r * width + cols
        settle(positions, positions, *_predict_b(d, magnitude, r, cols, height, width), plane * 2 + 1)
    return d, magnitude, k


def _scan(height: int, width: int, planes: int, step: int,
          take_for: Callable[[int, np.ndarray | None], Take], keep: bool = False, predictor: int = GRADIENT):
    """(decoded pixels uint8 (H, W, planes), if ``keep`` the indices int32 (planes, H, W),
    else None) of a scan (R and B's residuals, G's plus theirs, stay within int16). ``take_for(channel, base)`` gives a channel's Take; ``base`` is
    G's decoded residual (flat) for R and B, which are coded on top of it, else None."""
    pixels = np.empty((height, width, planes), dtype=np.uint8)
    indices = np.empty((planes, height, width), dtype=np.int32) if keep else None
    base = side = None
    for n, channel in enumerate([1, 0, 2] if planes == 3 else [0]):
        d, magnitude, k = _scan_plane(height, width, step, n, side,
                                      take_for(channel, None if base is None else base.reshape(-1)), keep,
                                      predictor)
        if base is None:
            base, side = d, magnitude
        else:
            d = d + base
        pixels[..., channel] = np.clip(d + CENTRE, 0, 255)
        if keep:
            indices[channel] = k
    return pixels, indices


def _quantize(values: np.ndarray, step: int) -> np.ndarray:
    """round(values / step), halves toward zero (no flip-flop between two levels), in
    integers: |values − k·step| ≤ ⌊step/2⌋."""
    if step == 1:
        return values
    magnitude = np.abs(values)
    magnitude += (step - 1) // 2
    magnitude //= step
    return magnitude * np.sign(values)


# -- encoder --------------------------------------------------------------------------

@dataclass
class Trial:
    """One step's scan of an image: what the encoder needs to choose and to code."""

    step: int
    squared_error: int  # of the pixels the decoder will give, against the original
    histogram: np.ndarray  # int64 (parts · CONTEXTS, 2·SPAN + 1)
    parts: list  # (part, indices int16, contexts uint8) in coding order, if kept
    columns: tuple[np.ndarray, np.ndarray] | None = None  # (bits, squared error) of each column, if asked
    predictor: int = GRADIENT  # or a dictionary coding (DICTIONARIES), whose bytes are ``packed``
    packed: bytes | None = None

    @cached_property
    def specs(self) -> list:
        """Each context's (table, bits) (:func:`_choose`), chosen once."""
        return [_choose(row) for row in self.histogram]

    def bits(self) -> float:
        """Code length of the indices, the parameters and the tables' description, in bits."""
        if self.packed is not None:  # pset and pixl as written: each zero-padded to whole words
            head, body = len(_parameters(self.step, self.predictor)), len(self.packed)
            return 8.0 * (head + -head % 4 + body + -body % 4)
        described = len(_parameters(self.step, self.predictor)) + sum(len(_spec_bytes(spec)) for spec, _ in self.specs)
        return 8.0 * described + sum(b for _, b in self.specs)


def _scanned(pixels: np.ndarray) -> np.ndarray:
    """The image as it is scanned: transposed where it is taller than wide."""
    return np.ascontiguousarray(pixels.transpose(1, 0, 2)) if pixels.shape[0] > pixels.shape[1] else pixels


def trial(pixels: np.ndarray, step: int, keep: bool = False, per_column: bool = False,
          counted: np.ndarray | None = None, predictor: int = GRADIENT) -> Trial:
    """Scan uint8 pixels (H, W, 1|3) at ``step`` with pass A's ``predictor``; ``keep`` the parts, for coding;
    ``per_column``: also each column's bits (its indices under the tables the whole image
    chooses, descriptions left out) and squared error (:attr:`Trial.columns`), the
    latter only over the pixels ``counted`` (bool (H, W)) where that is given."""
    if not 1 <= step <= MAX_STEP:
        raise ValueError(f"step must be 1..{MAX_STEP}, got {step}")
    original = pixels
    pixels = _scanned(pixels)
    height, width, planes = pixels.shape
    located: list[tuple[np.ndarray, np.ndarray]] = []  # per_column: (codes, positions)
    parts: list = []
    bins = 2 * SPAN + 1
    histogram = np.zeros(planes * PASSES * CONTEXTS * bins, dtype=np.int64)
    codes: list[np.ndarray] = []

    def count() -> None:  # a plane's indices into the histogram, then forget them
        if codes:
            histogram[:] += np.bincount(np.concatenate(codes), minlength=len(histogram))
            codes.clear()

    def take_for(channel: int, base: np.ndarray | None) -> Take:
        count()
        target = pixels[..., channel].reshape(-1).astype(np.int32) - CENTRE
        if base is not None:
            target = target - base

        def take(part: int, prediction, context: np.ndarray, positions: np.ndarray) -> np.ndarray:
            if prediction is None:
                k = _chained_indices(target[positions], step)
            else:
                k = _quantize(target.take(positions) - prediction, step)
            if keep:
                parts.append((part, k.astype(np.int16), context.astype(np.uint8)))
            code = context * bins
            code += part * CONTEXTS * bins + SPAN
            code += np.minimum(np.maximum(k, -SPAN), SPAN)
            codes.append(code.astype(np.int32, copy=False))
            if per_column:
                located.append((codes[-1], positions))
            return k

        return take

    decoded, _ = _scan(height, width, planes, step, take_for, predictor=predictor)
    count()
    squared = (decoded.astype(np.int32) - pixels) ** 2
    del decoded
    found = Trial(step, int(np.sum(squared, dtype=np.int64)), histogram.reshape(planes * PASSES * CONTEXTS, bins),
                  parts, predictor=predictor)
    if per_column:
        if counted is not None:
            squared *= _scanned(counted[..., None])
        found.columns = _column_costs(found.specs, located, squared, original.shape[1], pixels is not original)
    return found


def _column_costs(specs: list, located: list[tuple[np.ndarray, np.ndarray]], squared: np.ndarray, columns: int,
                  transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(bits, squared error) of each of an image's ``columns``: the code lengths of the
    indices ``located`` ((codes, flat positions) in the scanned image) under ``specs``,
    and ``squared`` (the scanned image's (H, W, planes) errors) summed per column.
    Where the image was scanned ``transposed``, its columns are the scanned rows."""
    width = squared.shape[1]
    code = np.concatenate([c for c, _ in located])
    at = np.concatenate([p for _, p in located])
    bits = np.bincount(at // width if transposed else at % width,
                       weights=_code_lengths(specs).reshape(-1)[code], minlength=columns)
    return bits, squared.sum(axis=(1 if transposed else 0, 2), dtype=np.int64)


def _code_lengths(specs: list) -> np.ndarray:
    """Bits of each k = −SPAN..SPAN (float64 (contexts, 2·SPAN + 1)) under each context's
    chosen table (:func:`_choose`'s (spec, bits)); inf where a custom table has no such
    value (no index of that context has it)."""
    out = np.full((len(specs), 2 * SPAN + 1), np.inf)
    for n, (spec, _) in enumerate(specs):
        if spec[0] == "fixed":
            out[n] = _costs()[spec[1]]
        else:
            values = spec[1]
            freq = custom_table(values, spec[2])
            out[n, values + SPAN] = -np.log2(freq[values - values[0]] / (1 << PRECISION))
    return out


def _latent_grid(height: int, width: int) -> tuple[int, int]:
    return -(-height // 16), -(-width // 16)


def encode_trial(found: Trial, height: int, width: int) -> list[Substream]:
    """The substreams of a trial of ``height`` x ``width`` pixels, kept for coding."""
    if found.packed is not None:
        head = _parameters(found.step, found.predictor)
        return [Substream(b"pset", (1, 1, 1), head + bytes(-len(head) % 4)),
                Substream(b"pixl", (1, *_latent_grid(height, width)), found.packed + bytes(-len(found.packed) % 4))]
    if not found.parts:
        raise ValueError("the trial was not kept for coding")
    specs = [spec for spec, _ in found.specs]
    coded, position = _tables_of(specs)
    writer = IndexedCoder(coded).encoder()
    for part, k, context in found.parts:
        writer.encode(k.astype(np.int64), position[part * CONTEXTS + context])
    head = _parameters(found.step, found.predictor) + b"".join(_spec_bytes(spec) for spec in specs)
    return [Substream(b"pset", (1, 1, 1), head + bytes(-len(head) % 4)),
            Substream(b"pixl", (1, *_latent_grid(height, width)), writer.finish().tobytes())]


def step_of(quality: float) -> int:
    """The step of ``--model pixels`` at a quality (1..8; fractional: the one below)."""
    return STEPS[int(quality)]


def compress(model: Model, source, quality: int, effort: int = 1, progress=None, spill_bytes=None,
             step: int | None = None) -> list[Substream]:
    """The substreams of a uint8 image (H, W, 1|3) at the quality's step (or ``step``), in
    the smaller of the scan's coding and the dictionary coding at the ``effort``'s preset
    (each pixel within ±step/2 either way)."""
    if not isinstance(source, np.ndarray):
        raise ValueError("the pixels family codes images held in memory (at most "
                         f"{MAX_PIXELS} pixels)")
    height, width = source.shape[:2]
    if height * width > MAX_PIXELS:
        raise ValueError(f"the pixels family codes images of at most {MAX_PIXELS} pixels")
    step = step or step_of(quality)
    scanned, packed = trial(source, step, keep=True), stronger(dictionary_trial(source, step), source, effort)
    return encode_trial(packed if packed.bits() < scanned.bits() else scanned, height, width)


KEEP_PIXELS = 1 << 22
"""Up to this many pixels (4.2 MP) the search keeps every scan's indices, for coding the
one it picks; above, it keeps one scan's at a time and scans the chosen step again."""

LOSSLESS_GATE = 4.0
"""The search goes on only where the image's lossless code (:func:`lossless_bits`) is at
most this many times the model's file (:func:`cheapest`'s ``gate_bits``): photos cost 5x
and more (their model file is the one to keep); text, line art, screenshots, hatching
and flat colour less (docs/results/hard-content.md)."""


def residuals(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(residuals k, A positions) of one plane (int32 values − CENTRE, (H, W)) at step 1,
    vectorized: every prediction made from the original values, as the scan makes it at
    step 1 with the GRADIENT predictor, but with a reflected border where the scan has its own edge rules: an
    estimate (also nic.overlay's), not the scan."""
    height, width = target.shape
    t = np.pad(target, 3, mode="reflect") if min(height, width) > 3 else np.pad(target, 3, mode="edge")
    ii, jj = np.indices((height, width))
    a_pixels = (ii + jj) % 2 == 0

    def at(di: int, dj: int, grid: np.ndarray) -> np.ndarray:
        return grid[3 + di:3 + di + height, 3 + dj:3 + dj + width]

    a, b, c = at(-1, -1, t), at(-1, 1, t), at(-2, 0, t)
    planar = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), a + b - c))
    down = np.abs(a - at(-3, -1, t)) + np.abs(b - at(-3, 1, t))
    planar[3:] = np.where(down <= np.abs(a - b), c, planar)[3:]  # GRADIENT from the fourth row
    planar[1:2] = (a[1:2] + b[1:2]) >> 1
    k = np.where(a_pixels, target - planar, 0)
    k[0, 0::2] = np.diff(target[0, 0::2], prepend=0)
    u, v, w, x = at(-1, 0, t), at(1, 0, t), at(0, -1, t), at(0, 1, t)
    vertical = np.abs(u - v) <= np.abs(w - x)
    return np.where(a_pixels, k, target - np.where(vertical, (u + v) >> 1, (w + x) >> 1)), a_pixels


def _plane_histogram(target: np.ndarray, side: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(each context's histogram of k over −SPAN..SPAN, (CONTEXTS·2, 2·SPAN + 1), |k|) of
    one plane's lossless scan, estimated from :func:`residuals`."""
    height, width = target.shape
    k, a_pixels = residuals(target)

    def at(di: int, dj: int, grid: np.ndarray) -> np.ndarray:
        return grid[2 + di:2 + di + height, 2 + dj:2 + dj + width]

    m = np.pad(np.where(a_pixels, np.abs(k), 0), 2)
    activity = np.where(a_pixels, at(-1, -1, m) + at(-1, 1, m) + at(-2, 0, m),
                        at(-1, 0, m) + at(1, 0, m) + at(0, -1, m) + at(0, 1, m))
    if side is not None:
        activity = activity + side
    keys = (~a_pixels).astype(np.int64) * CONTEXTS + _context(activity)
    bins = 2 * SPAN + 1
    histogram = np.bincount((keys * bins + np.clip(k, -SPAN, SPAN) + SPAN).ravel(),
                            minlength=2 * CONTEXTS * bins).reshape(-1, bins)
    return histogram, np.abs(k)


def _entropy_bits(histogram: np.ndarray) -> float:
    """Σ over the rows of count · entropy: no table codes a row in fewer bits (fixed or
    the context's own, which :func:`_choose` counts without its description)."""
    counts = histogram[histogram > 0].astype(np.float64)
    totals = np.repeat(histogram.sum(axis=1), (histogram > 0).sum(axis=1)).astype(np.float64)
    return float(-(counts * np.log2(counts / totals)).sum())


SAMPLE_EVERY = 4
SAMPLE_ROWS = 16
""":func:`lossless_bits` looks at bands of SAMPLE_ROWS rows, one in SAMPLE_EVERY."""


def lossless_bits(pixels: np.ndarray, above: float = np.inf) -> float:
    """An estimate of the indices' code length at step 1 (vectorized, no scan), from a
    quarter of the rows, in bands; or, where a lower bound of it is already more than
    ``above``, that bound: the histograms' entropy, no table cost (those are a third of
    the cost), and G's alone where that suffices (a photo's answer, without R and B)."""
    pixels = _scanned(pixels)
    height = pixels.shape[0]
    factor = 1.0
    if height > 2 * SAMPLE_EVERY * SAMPLE_ROWS:
        starts = range(0, height - SAMPLE_ROWS + 1, SAMPLE_EVERY * SAMPLE_ROWS)
        pixels = np.concatenate([pixels[a:a + SAMPLE_ROWS] for a in starts])
        factor = height / pixels.shape[0]
    values = pixels.astype(np.int32) - CENTRE
    if pixels.shape[2] == 1:
        histograms = [_plane_histogram(values[..., 0], None)[0]]
    else:
        first, side = _plane_histogram(values[..., 1], None)
        bound = factor * _entropy_bits(first)  # R's and B's entropies only add to it
        if bound > above:
            return bound
        histograms = [first] + [_plane_histogram(values[..., channel] - values[..., 1], side)[0]
                                for channel in (0, 2)]
    bound = factor * sum(_entropy_bits(h) for h in histograms)
    if bound > above:
        return bound
    return factor * sum(sum(b for _, b in map(_choose, h)) for h in histograms)


def _quantized_values(pixels: np.ndarray, step: int) -> np.ndarray:
    """The dictionary codings' values q of uint8 pixels at ``step`` (uint8)."""
    if step == 1:
        return pixels
    return ((pixels.astype(np.int32) + (step - 1) // 2) // step).astype(np.uint8)


def _dequantized(values: np.ndarray, step: int) -> np.ndarray:
    """The pixels (uint8) that a dictionary coding's values q stand for: min(q·step, 255)."""
    return values if step == 1 else np.minimum(np.arange(256) * step, 255).astype(np.uint8)[values]


def _dictionary_bytes(values: np.ndarray, coding: int) -> bytes:
    """(H, W, C) values in a dictionary coding's order."""
    return (values if coding == INTERLEAVED else values.transpose(2, 0, 1)).tobytes()


def dictionary_trial(pixels: np.ndarray, step: int = 1, effort: int = 1, limit_bits: float | None = None
                     ) -> Trial | None:
    """The pixels (H, W, 1|3) in the smaller of the dictionary codings (DICTIONARIES) at
    ``step``, compressed with the ``effort``'s preset (EFFORT_PRESETS), kept for coding.
    Given ``limit_bits``, a coding stops once its code outgrows them (None: neither fits)."""
    values = _quantized_values(pixels, step)
    squared = 0
    if step > 1:
        squared = int(np.sum((_dequantized(values, step).astype(np.int32) - pixels) ** 2, dtype=np.int64))
    filters = [{"id": lzma.FILTER_LZMA2, "preset": _preset(effort), "dict_size": _dictionary_size(values.size)}]
    found = None
    for coding in (INTERLEAVED, PLANES) if pixels.shape[2] > 1 else (INTERLEAVED,):
        data = _dictionary_bytes(values, coding)
        if limit_bits is None:
            packed = lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
        else:
            packed = _compressed_within(data, filters, limit_bits / 8)
            if packed is None:
                continue
        if found is None or len(packed) < len(found.packed):
            found = Trial(step, squared, np.zeros((0, 2 * SPAN + 1), np.int64), [], predictor=coding, packed=packed)
    return found


LIMITED_PIECE = 1 << 16
"""Bytes fed to LZMA2 at a time where a trial stops at a size (:func:`_compressed_within`)."""


def _compressed_within(data: bytes, filters: list, limit: float) -> bytes | None:
    """``lzma.compress(data)`` in raw LZMA2, or None once its output passes ``limit`` bytes
    (seen a chunk late: LZMA2 writes its output in chunks of up to 64 KiB). liblzma's
    output does not depend on how its input is cut."""
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=filters)
    out = []
    size = 0
    view = memoryview(data)
    for start in range(0, len(data), LIMITED_PIECE):
        out.append(compressor.compress(view[start:start + LIMITED_PIECE]))
        size += len(out[-1])
        if size > limit:
            return None
    out.append(compressor.flush())
    packed = b"".join(out)
    return packed if len(packed) <= limit else None


def _dictionary_size(count: int) -> int:
    """The encoder's LZMA2 dictionary for ``count`` values: the smallest power of two that
    holds them all (at least LZMA2's 4 KiB), at most DICTIONARY_BYTES. A dictionary larger
    than the data finds no other matches, but its match finder's tables (tens of MB at
    DICTIONARY_BYTES) are allocated and cleared on every call: 9 ms for a 16x16 image.
    The stream decodes with the format's DICTIONARY_BYTES, as any smaller one does."""
    return min(DICTIONARY_BYTES, max(4096, 1 << max(0, count - 1).bit_length()))


def _preset(effort: int) -> int:
    """The LZMA2 preset of an encoder effort (EFFORT_PRESETS); ValueError outside 1..4."""
    if not isinstance(effort, (int, np.integer)) or not 1 <= effort < len(EFFORT_PRESETS):
        raise ValueError(f"effort must be 1..{len(EFFORT_PRESETS) - 1}, got {effort!r}")
    return EFFORT_PRESETS[effort]


def stronger(found: Trial, pixels: np.ndarray, effort: int) -> Trial:
    """``found`` or, where it is a dictionary coding and ``effort``'s preset is stronger
    than effort 1's, the same values compressed with that preset if smaller: the same
    pixels decoded, in fewer bits."""
    if found.predictor not in DICTIONARIES or _preset(effort) == DICTIONARY_PRESET:
        return found
    again = dictionary_trial(pixels, found.step, effort)
    return again if again.bits() < found.bits() else found


def _unpacked(data: bytes, height: int, width: int, planes: int, coding: int) -> np.ndarray:
    """A dictionary coding's values (H, W, planes) uint8 from its LZMA2 stream; FormatError
    where it is corrupt, or holds more or fewer values than the image has."""
    expected = height * width * planes
    reader = lzma.LZMADecompressor(format=lzma.FORMAT_RAW,
                                   filters=[{"id": lzma.FILTER_LZMA2, "dict_size": DICTIONARY_BYTES}])
    try:
        raw = reader.decompress(data, max_length=expected)
        if len(raw) == expected and not reader.eof:  # the stream's end marker, after the values
            raw += reader.decompress(b"", max_length=1)
    except lzma.LZMAError:
        raise FormatError("substream pixl is corrupt (its LZMA2 stream)") from None
    # The substream is padded to whole words with zeros after the stream's end.
    if len(raw) != expected or not reader.eof or len(reader.unused_data) > 3 or any(reader.unused_data):
        raise FormatError(f"substream pixl holds other than the {expected} values of the image")
    values = np.frombuffer(raw, dtype=np.uint8)
    if coding == INTERLEAVED:
        return values.reshape(height, width, planes)
    return values.reshape(planes, height, width).transpose(1, 2, 0)


SMALL_PIXELS = 1 << 14
""":func:`cheapest` tries the dictionary coding of an image of at most this many pixels
whatever the gates say (a 128x128 icon: a few milliseconds)."""

DICTIONARY_SAMPLE = 1 << 17
"""Bytes of an image that :func:`cheapest` deflates (zlib level 1) to tell whether a
dictionary coding could be small where the scan's estimate says it is not (a photo's
answer, ~2-3 ms). Deflate looks 32 KB back where LZMA2 looks 8 MiB: content that
repeats only from further away is underestimated and not tried."""
SAMPLE_BLOCK = (16, 256)
"""Rows and columns of each block of that sample, one at the centre of each cell of a grid
shaped like the image. (Full-width bands, as before the sixteenth session, gave a 6 MP
photo one band of its sky, whose estimate was 1/20 of its real size; blocks at the
grid's edges would judge a picture by its margins.)"""


def _dictionary_estimate(pixels: np.ndarray, step: int = 1) -> float:
    """Bits that a dictionary coding at ``step`` might take, from the deflated size of
    about DICTIONARY_SAMPLE bytes of blocks (SAMPLE_BLOCK), one at the centre of each
    cell of a grid shaped like the image, quantized to the step, scaled."""
    height, width, planes = pixels.shape
    rows, cols = min(height, SAMPLE_BLOCK[0]), min(width, SAMPLE_BLOCK[1])
    count = max(1, DICTIONARY_SAMPLE // (rows * cols * planes))
    across = max(1, min(width // cols, round(float(np.sqrt(count * width / height)))))
    down = max(1, min(height // rows, count // across))
    across = max(1, min(width // cols, count // down))

    def starts(size: int, cells: int, block: int) -> np.ndarray:  # centred in their cells: never overlapping
        return ((np.arange(cells) + 0.5) * size / cells - block / 2).clip(0, size - block).astype(int)

    sample = np.concatenate([pixels[a:a + rows, b:b + cols].reshape(-1)
                             for a in starts(height, down, rows) for b in starts(width, across, cols)])
    deflated = len(zlib.compress(_quantized_values(sample, step).tobytes(), 1))
    return 8.0 * deflated * height * width / (down * across * rows * cols)


WALK = 4
"""Coarser steps :func:`cheapest` scans past the finest one that fits, while the cost falls."""


def cheapest(pixels: np.ndarray, gate_bits: float, limit_bits: float, cost: Callable[[Trial], float | None],
             step: int = 1, exhaustive: bool = False) -> Trial | None:
    """A trial (kept) of least ``cost(trial)`` (None: not a choice) among those whose
    code fits in ``limit_bits``: the dictionary coding's, lossless (:func:`dictionary_trial`;
    taken as it is where it fits ``gate_bits``: exact, and no larger than the model's)
    and, given the quality's pixel ``step`` above 1, at a coarser step of the ladder
    (:func:`_dictionary_cheapest`), and the scan's, at a step of the ladder
    (:func:`_scanned_cheapest`); or None. A photo costs two or three estimates: where
    the scan's lossless code and the dictionary's (:func:`_dictionary_estimate`, lossless
    and at ``step``) are all more than :data:`LOSSLESS_GATE` times ``gate_bits`` (the
    model's file), nothing is tried. ``exhaustive`` (effort 2 and up): every step of the
    ladder past the finest that fits is priced, not only the walk's while the cost falls."""
    height, width = pixels.shape[:2]
    if height * width > MAX_PIXELS:
        return None
    gate = LOSSLESS_GATE * gate_bits
    estimate = lossless_bits(pixels, above=gate)
    options = []
    # A small image's model file is mostly its overhead (gate_bits near 0): its lossless
    # dictionary coding costs milliseconds, and is always tried.
    if estimate <= gate or height * width <= SMALL_PIXELS or _dictionary_estimate(pixels) <= gate:
        packed = dictionary_trial(pixels)
        if packed.bits() <= gate_bits:  # exact, in no more bits than the model's file: kept, or the scan's if smaller
            if estimate < packed.bits():  # flat colour, gradients: the scan's lossless code may be smaller still
                lossless = trial(pixels, 1, keep=True)
                if lossless.bits() < packed.bits():
                    return lossless
            return packed
        if packed.bits() <= limit_bits:
            options.append(packed)
    # Smooth or patterned content the model cannot follow (a chirp, gratings, large text):
    # its values quantized to a step repeat where the exact ones do not. Up to 10 trials:
    # only where the estimate at the quality's step says they could pay, small images too.
    if step > 1 and _dictionary_estimate(pixels, step) <= gate:
        options.append(_dictionary_cheapest(pixels, limit_bits, cost, exhaustive))
    if estimate <= gate:
        options.append(_scanned_cheapest(pixels, estimate, gate_bits, limit_bits, cost, exhaustive))
    priced = [(price, n, found) for n, found in enumerate(options)
              if found is not None and (price := cost(found)) is not None]
    return min(priced)[2] if priced else None


def _dictionary_cheapest(pixels: np.ndarray, limit_bits: float, cost: Callable[[Trial], float | None],
                         exhaustive: bool = False) -> Trial | None:
    """The dictionary coding at the ladder step above 1 of least ``cost(trial)`` among
    those whose code fits in ``limit_bits``, or None (:func:`_ladder_cheapest`)."""
    return _ladder_cheapest(lambda n: dictionary_trial(pixels, LADDER[n]), 1, limit_bits, cost, None, exhaustive)


def _scanned_cheapest(pixels: np.ndarray, estimate: float, gate_bits: float, limit_bits: float,
                      cost: Callable[[Trial], float | None], exhaustive: bool = False) -> Trial | None:
    """The scan's trial (kept) of the ladder step of least ``cost(trial)`` among those
    whose code fits in ``limit_bits``, or None: a scan at step 1 where the lossless
    ``estimate`` fits the limit (taken as it is where it fits ``gate_bits``: exact, and
    no larger than the model's, else the walk of :func:`_ladder_cheapest` from it), else
    :func:`_ladder_cheapest`'s search."""
    height, width = pixels.shape[:2]
    keep = height * width <= KEEP_PIXELS

    def scan(n: int) -> Trial:
        return trial(pixels, LADDER[n], keep)

    found = scan(0) if estimate <= limit_bits else None  # lossless often fits outright
    if found is not None and found.bits() <= limit_bits:
        if found.bits() <= gate_bits:  # exact, in no more bits than the model's file: kept as it is
            return found if keep else trial(pixels, found.step, keep=True)
        best = _ladder_cheapest(scan, 0, limit_bits, cost, found, exhaustive)
    else:
        best = _ladder_cheapest(scan, 1 if found is not None else 0, limit_bits, cost, None, exhaustive)
    if best is None:
        return None
    return best if keep else trial(pixels, best.step, keep=True)


def _ladder_cheapest(make: Callable[[int], Trial], low: int, limit_bits: float,
                     cost: Callable[[Trial], float | None], start: Trial | None = None,
                     exhaustive: bool = False) -> Trial | None:
    """The trial (``make(n)``: LADDER[n]'s) of least ``cost(trial)`` among those whose
    code fits in ``limit_bits``, or None: a bisection over LADDER[low:] for the finest
    step that fits (sizes fall with the step only roughly: a step that fits, not always
    the finest), or LADDER[low] itself given its trial ``start`` (which fits), then a
    trial per coarser step not made yet, up to :data:`WALK` of them, until one costs more
    than the best so far; with ``exhaustive``, every coarser step (the cost is not convex
    in the step: the zone plate at q4 has a cheaper minimum further on)."""
    # The bisection's trials that fit and lie within the walk's reach of the finest so far:
    # the walk comes back to them (a few at a time, however large the image).
    fitting: dict[int, Trial] = {}

    def at(n: int) -> Trial:
        return fitting[n] if n in fitting else make(n)

    n, found = low, start
    if found is None:
        high = len(LADDER) - 1
        found = at(high)
        if found.bits() > limit_bits:
            return None
        fitting[high] = found
        while low < high:  # invariant: LADDER[high] fits, and ``found`` is its trial
            middle = (low + high) // 2
            attempt = at(middle)
            if attempt.bits() <= limit_bits:
                high, found = middle, attempt
                fitting = {m: t for m, t in fitting.items() if m <= high + WALK}
                fitting[high] = found
            else:
                low = middle + 1
        n = high
    best, least = found, cost(found)
    for m in range(n + 1, len(LADDER) if exhaustive else min(len(LADDER), n + 1 + WALK)):
        attempt = at(m)
        price = cost(attempt)
        if price is None:
            continue
        if least is not None and price >= least:
            if exhaustive:
                continue
            break
        best, least = attempt, price
    return best if least is not None else None


# -- decoder --------------------------------------------------------------------------

def _parameters(step: int, predictor: int) -> bytes:
    """The bytes ``pset`` begins with: the step alone (MEDIAN), or EXTENDED, the predictor
    and the step."""
    return bytes([step]) if predictor == MEDIAN else bytes([EXTENDED, predictor, step])


def parameters_in(substreams: list[Substream]) -> tuple[int, int, int]:
    """(step, predictor, bytes read) of a pixels file's substreams (``nic info``);
    FormatError if ``pset`` is missing, or gives an unknown predictor or no step."""
    if not substreams or substreams[0].name != b"pset" or not substreams[0].data:
        raise FormatError("a pixels file must begin with substream pset")
    data = substreams[0].data
    step, predictor, at = data[0], MEDIAN, 1
    if step == EXTENDED:
        if len(data) < 3:
            raise FormatError("substream pset ends inside its parameters")
        predictor, step, at = data[1], data[2], 3
        if predictor != GRADIENT and predictor not in DICTIONARIES:  # MEDIAN has one spelling: the step alone
            raise FormatError(f"substream pset gives predictor {predictor}, which this nic does not know")
    if not 1 <= step <= MAX_STEP:
        raise FormatError(f"substream pset gives step {step} (1..{MAX_STEP})")
    return step, predictor, at


def _read_parameters(stream: Substream, planes: int) -> tuple[int, int, list]:
    """(step, predictor, each context's table spec) from ``pset``; FormatError on anything else."""
    data = stream.data
    if stream.shape != (1, 1, 1) or len(data) < 4:
        raise FormatError("substream pset has the wrong shape or is empty")
    step, predictor, at = parameters_in([stream])
    specs = []
    try:
        for _ in range(0 if predictor in DICTIONARIES else planes * PASSES * CONTEXTS):
            spec, at = _parse_spec(data, at)
            specs.append(spec)
    except IndexError:
        raise FormatError("substream pset ends inside its tables") from None
    if len(data) - at >= 4 or any(data[at:]):
        raise FormatError("substream pset has bytes after its tables")
    return step, predictor, specs


def decompress(model: Model, quality: int, height: int, width: int, gray: bool, substreams: list[Substream],
               sink: Callable[[np.ndarray], None], progress=None, spill_bytes=None, on_latents=None) -> None:
    """Decode the indices, then hand ``sink`` the rows (``on_latents`` sees the indices,
    (planes, H, W), first)."""
    from .families import expect_substreams
    from .tiling import LatentStore

    if height * width > MAX_PIXELS:
        raise FormatError(f"a pixels file of {width}x{height} is larger than the family's {MAX_PIXELS} pixels")
    planes = 1 if gray else 3
    expect_substreams(substreams, [(b"pset", (1, 1, 1)), (b"pixl", (1, *_latent_grid(height, width)))])
    step, predictor, specs = _read_parameters(substreams[0], planes)
    if predictor in DICTIONARIES:  # the values are the indices (uint8, not copied)
        values = _unpacked(substreams[1].data, height, width, planes, predictor)
        pixels, indices = _dequantized(values, step), values.transpose(2, 0, 1)
    else:
        pixels, indices = _decoded_scan(substreams[1], specs, height, width, planes, step, predictor,
                                        keep=on_latents is not None)
    if on_latents is not None:
        on_latents(LatentStore(indices.shape, array=indices))
    for start in range(0, height, 256):
        sink(pixels[start:start + 256])
        if progress is not None:
            progress(min(height, start + 256), height)


def _decoded_scan(payload: Substream, specs: list, height: int, width: int, planes: int, step: int,
                  predictor: int, keep: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(pixels (H, W, planes), if ``keep`` the indices (planes, H, W)) of the scan's
    coding, range-decoded from ``payload`` under the tables of ``specs``."""
    coded, position = _tables_of(specs)
    try:
        reader = IndexedCoder(coded).decoder(payload.data)

        def take_for(channel: int, base) -> Take:
            def take(part: int, prediction: np.ndarray, context: np.ndarray, positions: np.ndarray) -> np.ndarray:
                return reader.decode(position[part * CONTEXTS + context])
            return take

        tall = height > width  # scanned transposed (:func:`_scanned`)
        pixels, indices = _scan(width if tall else height, height if tall else width, planes, step, take_for,
                                keep=keep, predictor=predictor)
        reader.finish()
    except CorruptStream as exc:
        raise FormatError(f"substream pixl is corrupt: {exc}") from None
    if tall:
        pixels = pixels.transpose(1, 0, 2)
        indices = None if indices is None else np.ascontiguousarray(indices.transpose(0, 2, 1))
    return pixels, indices
