import numpy as np
import torch

from nic.entropy import PRECISION, FactorizedDensity, integer_tables, quantize_pmf


def test_probabilities_over_integers_sum_to_one():
    torch.manual_seed(1)
    density = FactorizedDensity(4)
    values = torch.arange(-200, 201, dtype=torch.float32).reshape(1, 1, 1, -1).expand(1, 4, 1, 401)
    totals = density.probability(values.contiguous()).sum(dim=-1)
    torch.testing.assert_close(totals, torch.ones_like(totals), atol=1e-4, rtol=0)


def test_quantize_pmf_sums_exactly_and_keeps_every_symbol():
    pmf = np.array([1e-12, 0.5, 0.3, 0.2 - 1e-6])
    freq = quantize_pmf(pmf, tail=1e-6)
    assert freq.sum() == 1 << PRECISION
    assert (freq >= 1).all() and len(freq) == 5


def test_integer_tables_are_consistent():
    torch.manual_seed(2)
    density = FactorizedDensity(6)
    tables = integer_tables(density)
    assert tables.offsets.shape == (6,) and tables.lengths.shape == (6,)
    assert len(tables.frequencies) == int((tables.lengths + 1).sum())
    for c in range(6):
        freq = tables.channel(c)
        assert freq.sum() == 1 << PRECISION and (freq >= 1).all()
    # Deterministic: the same density gives the same integers.
    again = integer_tables(density)
    assert np.array_equal(again.frequencies, tables.frequencies)
