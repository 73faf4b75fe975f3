"""Trellis-coded quantization (TCQ): dependent scalar quantization as in VVC.

Borzechowski, Schäfer, Schwarz et al., "Optimizing Learned Image Compression on Scalar
and Entropy-Constraint Quantization"; the quantizer is H.266/VVC's dependent
quantization (Schwarz et al., "Hybrid video coding with trellis-coded quantization",
DCC 2019). Two scalar quantizers whose reconstruction levels interleave, in units of
a step Δ:

    Q0: v = 2k                 (…, −4, −2, 0, 2, 4, …)
    Q1: v = 2k − sgn(k)        (…, −3, −1, 0, 1, 3, …)

A state machine picks the quantizer of each latent from the parities of the indices k
sent before it along a *sequence* (here: one channel's latents of one row of a
context pass, left to right, starting in state 0):

    state 0, 1 → Q0;  state 2, 3 → Q1;   next state = TRANSITIONS[state][k & 1]

The decoder follows the states and reconstructs exactly; the encoder chooses the whole
sequence of indices by a Viterbi search of D + λ·R over the 4 states, R the exact code
length of the integer tables the decoder uses. Each quantizer has its own tables: the
conditional's table at the scale σ/Δ (:mod:`nic.coding`), its unit cells merged into
the quantizer's cells (half a unit cell where a boundary cuts one), all in integers, so
TCQ adds no tables to a weights file and stays deterministic.

Math only: arrays in, arrays out. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .coding import LATENT_LIMIT, PRECISION, CodeLengths, IntegerTables

TRANSITIONS = np.array([[0, 2], [2, 0], [1, 3], [3, 1]], dtype=np.int64)
"""Next state by (state, parity of k): VVC's 4-state machine."""

STATES = 4


def quantizer(state: np.ndarray) -> np.ndarray:
    """The quantizer (0 or 1) a state selects."""
    return state >> 1


def levels(k: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Reconstruction levels v (in units of Δ) of indices k under quantizers q."""
    return np.where(q == 0, 2 * k, 2 * k - np.sign(k))


# ---- the quantizers' tables ----------------------------------------------------------

def _split(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower half, upper half) of integer frequencies, summing to them exactly."""
    lower = value // 2
    return lower, value - lower


def _merged(offset: int, freq: np.ndarray, q: int) -> tuple[int, np.ndarray]:
    """One unit table (values offset … offset + n − 1, escape last) merged into quantizer
    q's cells: (its first index, frequencies with the escape last). A quantizer index is
    in the table when the unit value it holds whole is; the halves its neighbours cut
    off at the table's ends go to the escape, so the sum stays 2**PRECISION."""
    n = len(freq) - 1
    values = np.arange(offset, offset + n)
    f = freq[:n].astype(np.int64)
    # The unit values each quantizer splits between two cells: odd ones for Q0, even non-zero ones for Q1.
    split = (values % 2 == 1) if q == 0 else ((values % 2 == 0) & (values != 0))
    lower, upper = _split(np.where(split, f, 0))
    whole = np.where(split, 0, f)
    # The index whose cell holds each unit value whole:
    # Q0 2m → m; Q1 0 → 0, 2m − 1 → m (m > 0), 2m + 1 → m (m < 0).
    if q == 0:
        owner = np.where(split, 0, values // 2)
    else:
        owner = np.where(split, 0, np.where(values > 0, (values + 1) // 2, np.where(values < 0, (values - 1) // 2, 0)))
    held = ~split
    first, last = int(owner[held].min()), int(owner[held].max())
    out = np.zeros(last - first + 2, dtype=np.int64)
    np.add.at(out, owner[held] - first, whole[held])
    # A split value sends its lower half to the cell below it and its upper half to the one above.
    if q == 0:  # v = 2m + 1 lies between the levels 2m (index m) and 2m + 2 (index m + 1)
        below, above = (values - 1) // 2, (values + 1) // 2
    else:  # v = 2j lies between the levels 2j − 1 and 2j + 1: indices j, j + 1 (j > 0) or j − 1, j (j < 0)
        j = values // 2
        below, above = np.where(values > 0, j, j - 1), np.where(values > 0, j + 1, j)
    escape = int(freq[n])
    for side, half in ((below, lower), (above, upper)):
        inside = split & (side >= first) & (side <= last)
        np.add.at(out, side[inside] - first, half[inside])
        escape += int(half[split & ~inside].sum())
    out[-1] = escape
    return first, out


def quantizer_tables(unit: IntegerTables) -> IntegerTables:
    """Tables 0 … T − 1 for Q0 and T … 2T − 1 for Q1 from the T unit tables (residuals in
    units of Δ, cells of width 1): integers only, each summing to 2**PRECISION."""
    offsets, lengths, parts = [], [], []
    for q in (0, 1):
        for t in range(len(unit.lengths)):
            first, freq = _merged(int(unit.offsets[t]), unit.channel(t), q)
            offsets.append(first)
            lengths.append(len(freq) - 1)
            parts.append(freq)
    tables = IntegerTables(np.array(offsets, np.int32), np.array(lengths, np.int32),
                           np.concatenate(parts).astype(np.int32))
    if not all(int(tables.channel(t).sum()) == 1 << PRECISION and tables.channel(t).min() >= 1
               for t in range(len(offsets))):
        raise ValueError("the unit tables do not merge into valid quantizer tables")
    return tables


# ---- sequences ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sequences:
    """A pass's n positions (raster order over a rows x cols grid, the True ones of a
    mask) as one sequence per row: ``slot`` is a position's place in its row's sequence,
    ``row`` its sequence; ``length`` the longest sequence."""

    row: np.ndarray
    slot: np.ndarray
    rows: int
    length: int

    @classmethod
    def of(cls, where: np.ndarray) -> "Sequences":
        r, _ = np.nonzero(where)
        counts = where.sum(axis=1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(len(r)) - starts[r]
        return cls(r, slot, where.shape[0], int(counts.max(initial=0)))

    @cached_property
    def valid(self) -> np.ndarray:
        """(rows, length) bool: which slots hold a position."""
        out = np.zeros((self.rows, self.length), dtype=bool)
        out[self.row, self.slot] = True
        return out

    def spread(self, values: np.ndarray, fill=0) -> np.ndarray:
        """(c, n) → (c·rows, length): sequences of each channel, padded with ``fill``."""
        c = values.shape[0]
        out = np.full((c, self.rows, self.length), fill, dtype=values.dtype)
        out[:, self.row, self.slot] = values
        return out.reshape(c * self.rows, self.length)

    def gather(self, values: np.ndarray) -> np.ndarray:
        """(c·rows, length) → (c, n): the inverse of :meth:`spread`."""
        c = values.shape[0] // self.rows
        return values.reshape(c, self.rows, self.length)[:, self.row, self.slot]


# ---- the search -----------------------------------------------------------------------------

# The predecessors of each state: (state, parity) pairs with TRANSITIONS[state][parity] = next.
_PREDECESSORS = [[(s, p) for s in range(STATES) for p in (0, 1) if TRANSITIONS[s][p] == n] for n in range(STATES)]


def _candidates(e: np.ndarray, q: int) -> list[np.ndarray]:
    """Indices worth trying for residuals e (units of Δ) under quantizer q: the levels
    on each side of e, and zero."""
    if q == 0:
        below = np.floor(e / 2)
        return [below, below + 1, np.zeros_like(e)]
    odd = 2 * np.floor((e - 1) / 2) + 1  # the odd level at or below e
    to_index = lambda v: np.where(v > 0, (v + 1) / 2, (v - 1) / 2)  # noqa: E731
    return [to_index(odd), to_index(odd + 2), np.zeros_like(e)]


def search(e: np.ndarray, weight: np.ndarray, t: np.ndarray, valid: np.ndarray, rate: CodeLengths,
           count: int) -> np.ndarray:
    """The indices k (int64, like e) minimizing Σ weight·(e − v)² + bits, v the levels the
    states give them, for sequences e (S, L) of residuals in units of Δ; ``weight`` (S,)
    per sequence (distortion per unit², in bits), ``t`` (S, L) each latent's unit table
    index (quantizer q uses table q·count + t), ``valid`` (S, L) which slots hold latents."""
    S, L = e.shape
    cost = np.full((S, STATES), np.inf)
    cost[:, 0] = 0.0
    back = np.zeros((L, S, STATES), dtype=np.int8)
    chosen = np.zeros((L, S, STATES), dtype=np.int64)
    rows = np.arange(S)
    for j in range(L):
        best = {}  # (q, parity) → (cost, k) of the cheapest candidate
        for q in (0, 1):
            table = t[:, j] + q * count
            for k in _candidates(e[:, j], q):
                k = k.astype(np.int64)
                c = weight * (e[:, j] - levels(k, np.full_like(k, q))) ** 2 + rate(k, table)
                parity = k & 1
                for p in (0, 1):
                    here = np.where(parity == p, c, np.inf)
                    if (q, p) not in best:
                        best[q, p] = (here, np.where(parity == p, k, 0))
                    else:
                        old_c, old_k = best[q, p]
                        better = here < old_c
                        best[q, p] = (np.where(better, here, old_c), np.where(better, k, old_k))
        new = np.empty_like(cost)
        for n, preds in enumerate(_PREDECESSORS):
            options = np.stack([cost[:, s] + best[s >> 1, p][0] for s, p in preds])
            pick = np.argmin(options, axis=0)
            new[:, n] = options[pick, rows]
            back[j, :, n] = np.array([s for s, _ in preds])[pick]
            chosen[j, :, n] = np.stack([best[s >> 1, p][1] for s, p in preds])[pick, rows]
        keep = ~valid[:, j]
        if keep.any():  # no latent here: every state stays as it was
            new[keep] = cost[keep]
            back[j, keep] = np.arange(STATES)
            chosen[j, keep] = 0
        cost = new
    k = np.zeros((S, L), dtype=np.int64)
    state = np.argmin(cost, axis=1)
    for j in range(L - 1, -1, -1):
        k[:, j] = chosen[j, rows, state]
        state = back[j, rows, state].astype(np.int64)
    return k


def follow(k: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The state at each slot of sequences of indices k (S, L) (the decoder's view:
    state j is known before index j is read)."""
    S, L = k.shape
    states = np.zeros((S, L), dtype=np.int64)
    state = np.zeros(S, dtype=np.int64)
    for j in range(L):
        states[:, j] = state
        state = np.where(valid[:, j], TRANSITIONS[state, k[:, j] & 1], state)
    return states


# ---- one context pass ------------------------------------------------------------------------

def encode_pass(writer, e: np.ndarray, where: np.ndarray, t: np.ndarray, weight: np.ndarray,
                rate: CodeLengths, count: int) -> np.ndarray:
    """Search and code one pass: residuals e (c, n) in units of Δ at the positions of
    ``where``, their unit tables t (c, n), each channel's distortion weight (c,) in bits
    per squared unit of Δ. The indices go to ``writer`` (an IndexedEncoder) slot by slot,
    each slot's latents of every sequence one part; returns the levels v (c, n)."""
    seq = Sequences.of(where)
    c = len(e)
    tables = seq.spread(t)
    valid = np.tile(seq.valid, (c, 1))
    if not np.isfinite(e).all() or np.abs(e).max(initial=0) > LATENT_LIMIT / 2:
        raise ValueError("latent magnitude exceeds what the trellis can code")
    k = search(seq.spread(e), np.repeat(weight, seq.rows), tables, valid, rate, count)
    q = quantizer(follow(k, valid))
    for j in range(seq.length):
        v = valid[:, j]
        writer.encode(k[v, j], tables[v, j] + q[v, j] * count)
    return seq.gather(levels(k, q))


def decode_pass(reader, where: np.ndarray, t: np.ndarray, count: int) -> np.ndarray:
    """The levels v (c, n) of one pass from ``reader`` (an IndexedDecoder), following
    the states slot by slot as :func:`encode_pass` wrote them."""
    seq = Sequences.of(where)
    tables = seq.spread(t)
    valid = np.tile(seq.valid, (len(t), 1))
    k = np.zeros(tables.shape, dtype=np.int64)
    q = np.zeros(tables.shape, dtype=np.int64)
    state = np.zeros(len(k), dtype=np.int64)
    for j in range(seq.length):
        v = valid[:, j]
        q[v, j] = quantizer(state[v])
        k[v, j] = reader.decode(tables[v, j] + q[v, j] * count)
        state[v] = TRANSITIONS[state[v], k[v, j] & 1]
    return seq.gather(levels(k, q))
