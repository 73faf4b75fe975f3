import numpy as np
import pytest
import torch

from nic.coding import LATENT_LIMIT, CorruptStream, LatentCoder
from nic.entropy import FactorizedDensity, integer_tables


@pytest.fixture(scope="module")
def coder() -> LatentCoder:
    torch.manual_seed(3)
    return LatentCoder(integer_tables(FactorizedDensity(5)))


def test_round_trip_is_bit_exact(coder):
    rng = np.random.default_rng(0)
    latents = rng.integers(-3, 4, size=(5, 7, 9))
    payload = coder.encode(latents)
    assert np.array_equal(coder.decode(payload, latents.shape), latents)


def test_out_of_range_latents_round_trip_through_escapes(coder):
    rng = np.random.default_rng(1)
    latents = rng.integers(-2, 3, size=(5, 4, 6))
    extremes = [LATENT_LIMIT, -LATENT_LIMIT, 65535, -65536, 65536, 1000, -1000, 2**16 + 1, -(2**31 - 1)]
    latents.flat[: len(extremes)] = extremes
    payload = coder.encode(latents)
    decoded = coder.decode(payload, latents.shape)
    assert np.array_equal(decoded, latents)


def test_every_escape_magnitude_round_trips(coder):
    values = np.array([0] + [s * (1 << k) + d for k in range(31) for s in (1, -1) for d in (-1, 0, 1)])
    values = values[np.abs(values) <= LATENT_LIMIT]
    latents = np.zeros((5, 1, len(values)), dtype=np.int64)
    latents[0, 0] = values
    assert np.array_equal(coder.decode(coder.encode(latents), latents.shape), latents)


def test_encoding_is_deterministic(coder):
    latents = np.random.default_rng(2).integers(-5, 6, size=(5, 8, 8))
    assert coder.encode(latents) == coder.encode(latents)


def test_latents_beyond_32_bits_are_refused(coder):
    latents = np.zeros((5, 1, 1), dtype=np.int64)
    latents[0, 0, 0] = 2**31
    with pytest.raises(ValueError):
        coder.encode(latents)


def test_garbage_payload_never_crashes(coder):
    rng = np.random.default_rng(4)
    for size in (0, 4, 8, 64):
        payload = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
        try:
            out = coder.decode(payload, (5, 3, 3))
            assert out.shape == (5, 3, 3)
        except CorruptStream:
            pass
    with pytest.raises(CorruptStream):
        coder.decode(b"abc", (5, 1, 1))


def test_indexed_coder_round_trips_with_escapes_in_any_index_order():
    from nic.coding import IndexedCoder
    from nic.entropy import GaussianConditional

    conditional = GaussianConditional()
    indexed = IndexedCoder(conditional.integer_tables())
    rng = np.random.default_rng(4)
    indices = rng.integers(0, conditional.count, 5000)
    values = np.round(rng.normal(0, conditional.scales()[indices])).astype(np.int64)
    values[[3, 99, 4000]] = [LATENT_LIMIT, -LATENT_LIMIT, 70000]  # escapes
    payload = indexed.encode(values, indices)
    assert np.array_equal(indexed.decode(payload.tobytes(), indices), values)
    # The indices are part of the code: other indices do not give the values back.
    other = np.roll(indices, 1)
    try:
        assert not np.array_equal(indexed.decode(payload.tobytes(), other), values)
    except CorruptStream:
        pass


def test_indexed_coder_reports_truncation():
    from nic.coding import IndexedCoder
    from nic.entropy import GaussianConditional

    indexed = IndexedCoder(GaussianConditional().integer_tables())
    indices = np.full(4000, 63)
    values = np.random.default_rng(5).integers(-200, 200, 4000)
    payload = indexed.encode(values, indices).tobytes()
    with pytest.raises(CorruptStream):
        indexed.decode(payload[:-8] + b"\xff" * 3, indices)


def test_indexed_coder_refuses_indices_without_a_table():
    from nic.coding import IndexedCoder
    from nic.entropy import GaussianConditional

    indexed = IndexedCoder(GaussianConditional().integer_tables())
    for bad in (64, -1):
        with pytest.raises(ValueError, match="table indices"):
            indexed.encode(np.zeros(3, np.int64), np.array([0, bad, 1]))
