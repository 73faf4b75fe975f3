import math

import numpy as np
import pytest
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


def test_gaussian_tables_sum_exactly_and_cover_each_scale():
    from nic.entropy import GaussianConditional

    conditional = GaussianConditional()
    tables = conditional.integer_tables()
    assert tables.offsets.shape == (conditional.count,) == tables.lengths.shape
    scales = conditional.scales()
    for t in range(conditional.count):
        freq = tables.channel(t)
        assert freq.sum() == 1 << PRECISION and (freq >= 1).all()
        assert tables.lengths[t] == -2 * tables.offsets[t] + 1  # symmetric around 0
        k = -int(tables.offsets[t])  # less than 1e-6 of the mass lies beyond ±(k + ½)
        assert 2 * 0.5 * math.erfc((k + 0.5) / scales[t] / math.sqrt(2)) < 1e-6 or 2 * k + 1 >= 4095
    # The narrowest scale makes a zero almost free: what flat regions cost.
    zero = tables.channel(0)[-tables.offsets[0]]
    assert -np.log2(zero / (1 << PRECISION)) < 1e-4


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_conditional_bits_match_the_tables(distribution):
    from nic.entropy import GaussianConditional

    conditional = GaussianConditional(distribution=distribution)
    tables = conditional.integer_tables()
    for t in range(conditional.count):
        assert tables.channel(t).sum() == 1 << PRECISION and (tables.channel(t) >= 1).all()
    t = 40
    sigma = torch.tensor(conditional.scales()[t], dtype=torch.float64)
    residuals = torch.arange(-5, 6, dtype=torch.float64)
    bits = conditional.bits(residuals, sigma).numpy()
    table_bits = -np.log2(tables.channel(t)[residuals.numpy().astype(int) - tables.offsets[t]] / (1 << PRECISION))
    np.testing.assert_allclose(bits, table_bits, atol=0.03)  # the tables' rounding to 16 bits
    # Training sees the scale of the rounded index (straight-through).
    index = torch.tensor([39.6], requires_grad=True)
    assert float(conditional.scale(index).detach()) == pytest.approx(conditional.scales()[40], rel=1e-6)
    conditional.scale(index).sum().backward()
    assert index.grad is not None and float(index.grad) > 0


def test_a_laplacian_has_heavier_tails():
    """At the same scale a Laplacian gives a far residual more mass (fewer bits)."""
    from nic.entropy import GaussianConditional

    sigma, far = torch.tensor(0.5, dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    assert GaussianConditional(distribution="laplace").bits(far, sigma) < GaussianConditional().bits(far, sigma)
    with pytest.raises(ValueError, match="distribution"):
        GaussianConditional(distribution="cauchy")
