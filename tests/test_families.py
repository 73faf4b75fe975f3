"""Model families (nic.families): the registry, choosing a family's weights, and
dispatch by the file's model id, through the API and the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import smooth_image
from nic import api, container, factorized, families, hyperprior
from nic.cli import cli
from nic.container import FormatError, Header
from nic.weights import WeightsError, default_weights


def test_registry_maps_model_ids_to_family_modules():
    assert families.family(1) is factorized and families.family(2) is hyperprior
    for module in (factorized, hyperprior):
        assert families.MODULES[module.MODEL_ID] == module.NAME
        assert module.FORMAT_VERSION in container.VERSIONS
    with pytest.raises(ValueError, match="unknown model family id 9"):
        families.family(9)
    assert families.name_of(9) == "unknown (9)"


@pytest.fixture
def both_installed(tmp_path, monkeypatch, tiny_weights, tiny_hyperprior_weights):
    """An installed weights folder with a (tiny) model of each family."""
    folder = tmp_path / "installed"
    folder.mkdir()
    shutil.copy(tiny_hyperprior_weights, folder / "a-hyperprior.npz")
    shutil.copy(tiny_weights, folder / "b-factorized.npz")
    monkeypatch.setenv("NIC_WEIGHTS_DIR", str(folder))
    monkeypatch.setattr("nic.weights.shipped_dir", lambda: tmp_path / "nothing-shipped")
    return folder


def test_family_picks_the_installed_weights_and_decoding_follows_the_file(both_installed):
    image = smooth_image(40, 56)
    default_file = api.encode_pixels(image, 2)
    factorized_file = api.encode_pixels(image, 2, family="factorized")
    hyper_file = api.encode_pixels(image, 2, family="hyperprior")
    assert container.unpack(default_file).header.model_id == families.model_id_named(families.DEFAULT)
    assert container.unpack(factorized_file).header.model_id == 1
    assert container.unpack(hyper_file).header.model_id == 2
    for data in (default_file, factorized_file, hyper_file):
        assert api.decode_pixels(data).pixels.shape == image.shape


def test_a_family_without_weights_or_other_weights_is_named(both_installed, tiny_weights, monkeypatch):
    with pytest.raises(WeightsError, match="holds weights of the factorized family, not of the hyperprior"):
        default_weights(tiny_weights, "hyperprior")
    (both_installed / "a-hyperprior.npz").unlink()
    with pytest.raises(WeightsError, match="no weights of the hyperprior family are installed"):
        api.encode_pixels(smooth_image(16, 16), 2, family="hyperprior")


def test_an_unknown_model_id_in_a_file_is_a_format_error(both_installed):
    data = api.encode_pixels(smooth_image(16, 16), 2)
    parsed = container.unpack(data)
    forged = container.pack(Header(**{**parsed.header.__dict__, "model_id": 9}), parsed.payload)
    with pytest.raises(FormatError, match="unknown model family id 9"):
        api.decode_pixels(forged)


def test_cli_encodes_with_model_and_info_names_the_family(both_installed, tmp_path):
    source = tmp_path / "a.png"
    Image.fromarray(smooth_image(40, 56)).save(source)
    runner = CliRunner()
    result = runner.invoke(cli, ["encode", str(source), "--model", "hyperprior", "-q", "2", "-o", str(tmp_path / "a.nic")])
    assert result.exit_code == 0, result.output
    info = runner.invoke(cli, ["info", str(tmp_path / "a.nic")]).output
    assert "2 (hyperprior)" in info and "substream zhat" in info and "substream yhat" in info
    decoded = runner.invoke(cli, ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "a2.png")])
    assert decoded.exit_code == 0, decoded.output
    assert np.asarray(Image.open(tmp_path / "a2.png")).shape == (40, 56, 3)
    bad = runner.invoke(cli, ["encode", str(source), "--model", "nonsense"])
    assert bad.exit_code == 2


def test_library_and_pillow_take_the_family(both_installed, tmp_path):
    import nic

    data = nic.encode(smooth_image(24, 24), quality=2, model="hyperprior")
    assert container.unpack(data).header.model_id == 2
    Image.fromarray(smooth_image(24, 24)).save(tmp_path / "p.nic", quality=2, model="hyperprior")
    assert container.unpack((tmp_path / "p.nic").read_bytes()).header.model_id == 2
    assert Image.open(tmp_path / "p.nic").size == (24, 24)


def test_bench_measures_the_family_asked_for(both_installed, tmp_path):
    import json

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(smooth_image(48, 64, seed=3)).save(folder / "a.png")
    result = CliRunner().invoke(cli, ["bench", str(folder), "--model", "hyperprior", "--codecs", "none", "-q", "1,3",
                                      "--json", str(tmp_path / "r.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["family"] == "hyperprior" and report["model"] == hyperprior.Config().name


def test_an_unknown_family_name_or_a_family_that_cannot_do_it_is_a_value_error(both_installed, tmp_path):
    import nic
    from nic.train import TrainOptions, train

    with pytest.raises(ValueError, match="unknown model family 'Hyperprior'"):
        nic.encode(smooth_image(16, 16), model="Hyperprior")
    hyper = str(both_installed / "a-hyperprior.npz")
    with pytest.raises(WeightsError, match="holds weights of the hyperprior family, not of the factorized"):
        train(TrainOptions(data=[tmp_path], out=tmp_path / "run", init=hyper, steps=1))
