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
