import io
import pickle

import numpy as np
import pytest

from nic import weights
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


def test_a_digest_file_reads_members_without_parsing_the_zip(tiny_weights, tmp_path):
    """The digest records the zip directory's SHA-256 and where each member's bytes begin:
    while the directory is unchanged, members are read straight from the file."""
    import json

    from nic.weights import digest_path

    path, digest = _copy_with_digest(tiny_weights, tmp_path)
    record = json.loads(digest_path(path).read_text())
    assert len(record["directory"]) == 3 and all(len(member) == 4 for member in record["members"])
    model, found = load_weights(path, coding=True)
    arrays = model._arrays
    assert found == digest and arrays._archive is None
    expected = read_arrays(path.read_bytes())
    assert arrays.describe("g_s.0.weight") == (expected["g_s.0.weight"].shape, expected["g_s.0.weight"].dtype)
    assert np.array_equal(arrays["g_s.0.weight"], expected["g_s.0.weight"])


def test_a_digest_file_of_the_earlier_form_still_serves(tiny_weights, tmp_path):
    """Members as [name, CRC, size] and no directory: checked against the zip's own list."""
    import json

    from nic.weights import LazyArrays, digest_path

    path, digest = _copy_with_digest(tiny_weights, tmp_path)
    record = json.loads(digest_path(path).read_text())
    digest_path(path).write_text(json.dumps({"weights_hash": record["weights_hash"],
                                             "members": [member[:3] for member in record["members"]]}))
    weights._lazy_checked.cache_clear()
    model, found = load_weights(path, coding=True)
    assert found == digest and isinstance(model._arrays, LazyArrays) and model._arrays._archive is not None


@pytest.mark.parametrize("damage", ["offset", "type", "size"])
def test_a_damaged_digest_file_costs_speed_not_the_weights(tiny_weights, tmp_path, damage):
    """Members the digest places wrongly are read through zipfile; malformed ones (a
    string offset, a negative size) make the reader check the zip's own member list."""
    import json

    from nic.weights import digest_path

    path, digest = _copy_with_digest(tiny_weights, tmp_path)
    record = json.loads(digest_path(path).read_text())
    for member in record["members"]:
        if damage == "offset":
            member[3] += 1
        elif damage == "type":
            member[3] = str(member[3])
        else:
            member[2] = -member[2]
    digest_path(path).write_text(json.dumps(record))
    weights._lazy_checked.cache_clear()
    model, found = load_weights(path, coding=True)
    expected = read_arrays(path.read_bytes())
    assert found == digest and np.array_equal(model._arrays["g_s.0.weight"], expected["g_s.0.weight"])


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


def test_weights_that_extend_earlier_ones_change_only_their_qualities(tmp_path, monkeypatch):
    """A hyperprior quality trained after its weights shipped goes out as a small file
    that names the earlier weights by hash and holds only what that quality changed
    (hyperprior.extension_arrays). The other qualities code byte for byte as before, the
    files of the earlier weights keep decoding with both installed, the family encodes
    with the file named after it, and without the earlier file the new one fails in one line."""
    import torch

    from conftest import smooth_image, tiny_hyperprior
    from nic import api, container, factorized, hyperprior
    from nic.weights import installed, joined_arrays, save_weights

    model = tiny_hyperprior(slices=2, checkerboard=True, context_width=8, context_kernel=3)
    ship = tmp_path / "ship"
    ship.mkdir()
    save_weights(factorized.to_arrays(model.base, half=True), ship / "default.npz")
    earlier_hash = save_weights(hyperprior.to_arrays(model, half=True, separate_base=True, coding_only=True),
                                ship / "hyperprior-v1.npz")
    trained = hyperprior.trainable_again(load_weights(ship / "hyperprior-v1.npz")[0])
    trained.base = factorized.specialize(trained.base, [3])
    with torch.no_grad():
        trained.base.own["q3"].g_s[0].bias.add_(0.01)
        trained.hyper[2].h_s[4].bias[16:].add_(2.0)
    image = smooth_image(64, 96)
    trained.export_quality(3, torch.from_numpy(hyperprior.analysis(trained, image, 3))[None], 127)
    arrays = hyperprior.extension_arrays(trained, [3], joined_arrays(ship / "hyperprior-v1.npz"), earlier_hash)
    allowed = ("hyper.2.", "integer_h_s.2.", "integer_context.2.", "z_tables.2.", "base.own.q3.", "z_density.")
    assert {name for name in arrays if not name.startswith(allowed)} == {"config", "base.config", "base.gain",
                                                                          "base.inverse_gain"}
    assert arrays["base.own.q3.g_s.0.weight"].dtype == np.float16 and "base.own.q3.g_s.0.bias" in arrays
    new_hash = save_weights(arrays, ship / "hyperprior.npz")

    monkeypatch.setenv("NIC_WEIGHTS_DIR", str(ship))
    assert installed("hyperprior") == ship / "hyperprior.npz"
    for quality, same in ((2, True), (3, False)):
        old = api.encode_pixels(image, quality, ship / "hyperprior-v1.npz")
        new = api.encode_pixels(image, quality)
        assert container.unpack(new).header.weights_hash == new_hash
        assert same == all(a.data == b.data for a, b in zip(container.unpack(old).substreams(),
                                                            container.unpack(new).substreams(), strict=True))
        assert np.array_equal(api.decode_pixels(old).pixels, api.decode_pixels(old, ship / "hyperprior-v1.npz").pixels)
        assert api.decode_pixels(new).pixels.shape == image.shape

    (ship / "hyperprior-v1.npz").unlink()
    (ship / "hyperprior-v1.npz.digest").unlink()
    weights._load_path.cache_clear()  # loaded models are cached per process
    with pytest.raises(WeightsError, match=f"extend weights {earlier_hash.hex()}, which are not installed"):
        load_weights(ship / "hyperprior.npz", coding=True)


def test_the_weights_a_family_encodes_with(tmp_path, monkeypatch, tiny_hyperprior_weights):
    """$NIC_WEIGHTS_DIR comes before the shipped weights whatever its files are named, and
    a weights file without a config among them blocks nothing."""
    import shutil

    from nic.weights import installed, weights_for

    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(tiny_hyperprior_weights, folder / "mine.npz")
    np.savez(folder / "aaa-broken.npz", x=np.zeros(3))
    monkeypatch.setenv("NIC_WEIGHTS_DIR", str(folder))
    assert installed("hyperprior") == folder / "mine.npz"
    shipped, digest = load_weights(installed("factorized"))
    assert weights_for(shipped.config.model_id, digest)[1] == digest


def test_a_weights_folder_named_in_the_environment_must_be_there(tmp_path, monkeypatch):
    from nic.weights import WeightsError, candidates

    monkeypatch.setenv("NIC_WEIGHTS_DIR", str(tmp_path / "missing"))
    with pytest.raises(WeightsError, match="NIC_WEIGHTS_DIR=.*no such folder"):
        candidates()
