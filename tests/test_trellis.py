"""Trellis-coded quantization (nic.trellis): the quantizers' integer tables, the Viterbi
search against brute force, and a hyperprior round trip through the trellis passes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import smooth_image, tiny_context_model
from nic import hyperprior, trellis
from nic.coding import PRECISION, CodeLengths, IndexedCoder, IntegerTables


def _unit_tables() -> IntegerTables:
    """Three unit tables: narrow, medium and wide two-sided geometric ones."""
    offsets, lengths, parts = [], [], []
    for half, decay in ((1, 0.01), (6, 0.5), (40, 0.9)):
        values = np.arange(-half, half + 1)
        p = decay ** np.abs(values)
        f = np.maximum(1, np.floor(p / p.sum() * ((1 << PRECISION) - 64))).astype(np.int64)
        f = np.append(f, (1 << PRECISION) - f.sum())
        offsets.append(-half)
        lengths.append(len(values))
        parts.append(f)
    return IntegerTables(np.array(offsets, np.int32), np.array(lengths, np.int32),
                         np.concatenate(parts).astype(np.int32))


def test_quantizer_tables_split_the_unit_cells_exactly():
    unit = _unit_tables()
    tables = trellis.quantizer_tables(unit)
    assert len(tables.lengths) == 2 * len(unit.lengths)
    for t in range(len(tables.lengths)):
        f = tables.channel(t)
        assert f.sum() == 1 << PRECISION and f.min() >= 1
    # Medium table: Q0's index 0 holds the unit value 0 and half of ±1; Q1's holds 0 alone.
    u = unit.channel(1).astype(np.int64)
    zero = 6  # symbol of value 0
    q0, q1 = tables.channel(1), tables.channel(4)
    assert q0[-tables.offsets[1]] == u[zero] + u[zero - 1] - u[zero - 1] // 2 + u[zero + 1] // 2
    assert q1[-tables.offsets[4]] == u[zero]
    # Q1's index 1 (level 1) holds the unit value 1 and the lower half of 2.
    assert q1[1 - tables.offsets[4]] == u[zero + 1] + u[zero + 2] // 2


def test_levels_interleave():
    k = np.arange(-3, 4)
    np.testing.assert_array_equal(trellis.levels(k, np.zeros_like(k)), [-6, -4, -2, 0, 2, 4, 6])
    np.testing.assert_array_equal(trellis.levels(k, np.ones_like(k)), [-5, -3, -1, 0, 1, 3, 5])


def _cost(k: np.ndarray, e: np.ndarray, weight: float, t: np.ndarray, rate: CodeLengths,
          count: int) -> float:
    states = trellis.follow(k[None], np.ones((1, len(k)), bool))[0]
    q = trellis.quantizer(states)
    v = trellis.levels(k, q)
    return float((weight * (e - v) ** 2).sum() + rate(k, t + q * count).sum())


def _every_path(e: np.ndarray, state: int = 0):
    """Every index sequence the search chooses from: at each latent, the candidates of
    the quantizer its state selects."""
    if not len(e):
        yield []
        return
    for k in trellis._candidates(e[:1], state >> 1):
        k = int(k[0])
        for rest in _every_path(e[1:], int(trellis.TRANSITIONS[state, k & 1])):
            yield [k] + rest


@pytest.mark.parametrize("weight", [0.05, 1.0, 100.0])
def test_search_finds_the_cheapest_sequence(weight):
    """The Viterbi search against every path through the same candidates."""
    rng = np.random.default_rng(3)
    unit = _unit_tables()
    count = len(unit.lengths)
    rate = CodeLengths(trellis.quantizer_tables(unit))
    for _ in range(6):
        e = rng.normal(0, 2.5, 6)
        t = rng.integers(0, count, 6)
        found = trellis.search(e[None], np.array([weight]), t[None], np.ones((1, 6), bool), rate, count)[0]
        best = min(_cost(np.array(k), e, weight, t, rate, count) for k in _every_path(e))
        assert _cost(found, e, weight, t, rate, count) == pytest.approx(best)


def test_a_pass_decodes_to_the_levels_it_was_searched_for():
    rng = np.random.default_rng(4)
    unit = _unit_tables()
    count = len(unit.lengths)
    tables = trellis.quantizer_tables(unit)
    coder = IndexedCoder(tables)
    where = (np.add.outer(np.arange(5), np.arange(7)) % 2) == 0  # a checkerboard phase, rows of 3 and 4
    n = int(where.sum())
    e = rng.normal(0, 6, (3, n))
    e[0, 0] = 900.0  # an escape
    t = rng.integers(0, count, (3, n))
    writer = coder.encoder()
    levels = trellis.encode_pass(writer, e, where, t, np.array([0.5, 2.0, 8.0]), CodeLengths(tables), count)
    reader = coder.decoder(writer.finish().tobytes())
    np.testing.assert_array_equal(trellis.decode_pass(reader, where, t, count), levels)
    reader.finish()
    assert abs(levels[0, 0] - 900) <= 2


def test_hyperprior_round_trip_through_the_trellis():
    """Trellis-coded residuals decode to the levels the encoder chose, pass by pass with
    context: ŷ = μ + v·Δ, v within a few steps of (y − μ)/Δ."""
    model = tiny_context_model()
    image = smooth_image(64, 96)
    step = (160, -4)
    y = hyperprior.analysis(model, image, 2)
    weight = np.full(model.M, 4.0)
    substreams = hyperprior.compress(model, image, 2, step=step, tcq=weight)
    seen = []
    rows = []
    hyperprior.decompress(model, 2, 64, 96, False, substreams, rows.append, step=step, tcq=True,
                          on_latents=lambda s: seen.append(s.array.copy()))
    assert np.concatenate(rows).shape == (64, 96, 3)
    z_hat = model.hyper_encode(y, 2)
    mean, _ = model.hyper_decode(z_hat, 2, *y.shape[1:])
    # The context corrects μ by little; the levels follow the residuals.
    assert np.abs(seen[0] * step[0] / 256 - (y - mean)).mean() < 1.0
