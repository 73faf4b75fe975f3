import io
import pickle

import numpy as np
import pytest

from nic.weights import WeightsError, load_weights, read_arrays, weights_hash


def test_pickled_arrays_are_refused(tmp_path):
    buffer = io.BytesIO()
    np.savez(buffer, evil=np.array([object()], dtype=object))
    with pytest.raises(WeightsError):
        read_arrays(buffer.getvalue())["evil"]


def test_garbage_is_not_weights(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError):
        load_weights(path)
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(tmp_path / "missing.npz")


def test_hash_depends_on_content_not_on_zip_metadata(tiny_weights, tmp_path):
    arrays = read_arrays(open(tiny_weights, "rb").read())
    digest = weights_hash(arrays)
    assert load_weights(tiny_weights)[1] == digest
    copy = tmp_path / "copy.npz"
    np.savez_compressed(copy, **arrays)
    assert load_weights(copy)[1] == digest
    arrays["gain"] = arrays["gain"] + 1
    assert weights_hash(arrays) != digest


def test_incomplete_weights_are_refused(tiny_weights, tmp_path):
    arrays = read_arrays(open(tiny_weights, "rb").read())
    del arrays["tables.0.frequencies"]
    path = tmp_path / "w.npz"
    np.savez(path, **arrays)
    with pytest.raises(WeightsError, match="tables"):
        load_weights(path)


def _copy_with_digest(source, tmp_path, name="w.npz"):
    from nic.weights import save_weights

    path = tmp_path / name
    digest = save_weights(read_arrays(open(source, "rb").read()), path)
    return path, digest


def test_a_digest_file_lets_the_coder_read_only_what_it_uses(tiny_weights, tmp_path):
    from nic.weights import LazyArrays, digest_path

    path, digest = _copy_with_digest(tiny_weights, tmp_path)
    assert digest_path(path).is_file()
    model, found = load_weights(path, coding=True)
    assert found == digest and isinstance(model._arrays, LazyArrays)
    assert "g_s.0.weight" not in model._arrays._loaded  # read when a decoder first runs
    assert load_weights(path)[1] == digest  # the trainable model reads and hashes everything


def test_a_digest_file_that_no_longer_matches_is_ignored(tiny_weights, tmp_path):
    """Weights rewritten beside an old digest file: their own hash, from their content."""
    from nic.weights import LazyArrays

    path, digest = _copy_with_digest(tiny_weights, tmp_path)
    arrays = read_arrays(path.read_bytes())
    arrays["gain"] = arrays["gain"] * 2
    np.savez(path, **arrays)  # the old digest file stays
    model, found = load_weights(path, coding=True)
    assert found == weights_hash(arrays) != digest
    assert not isinstance(model._arrays, LazyArrays)


def test_a_member_that_fails_its_crc_is_one_clear_error(tiny_weights, tmp_path):
    """Bytes of a member changed in place (its CRC-32 in the zip directory is stale)."""
    path, _ = _copy_with_digest(tiny_weights, tmp_path)
    data = bytearray(path.read_bytes())
    marker = data.find(b"gain.npy")  # the local header; its array data follows
    data[marker + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="not a valid weights file"):
        load_weights(path, coding=True)
