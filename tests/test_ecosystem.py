"""Python API, Pillow plugin, metadata, target size and batch use."""

from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import nic
from nic.cli import cli, parse_size
from conftest import icc_profile, smooth_image

FAKE_ICC = icc_profile(b"fake-icc-profile-for-tests")


def photo_with_metadata(path) -> None:
    image = Image.fromarray(smooth_image(40, 56, seed=5))
    exif = Image.Exif()
    exif[0x010F] = "nic test camera"  # Make
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes(), icc_profile=FAKE_ICC)


def test_python_api_round_trips_pil_images_and_arrays():
    pixels = smooth_image(30, 50, seed=2)
    from_array = nic.encode(pixels, quality=3)
    from_image = nic.encode(Image.fromarray(pixels), quality=3)
    assert from_array == from_image
    decoded = nic.decode(from_array)
    assert decoded.mode == "RGB" and decoded.size == (50, 30)
    gray = nic.decode(nic.encode(pixels[..., 0]))
    assert gray.mode == "L"
    with pytest.raises(ValueError):
        nic.encode(pixels.astype(np.float32))


def test_pillow_plugin_opens_and_saves(tmp_path):
    pixels = smooth_image(24, 40, seed=4)
    Image.fromarray(pixels).save(tmp_path / "a.nic", quality=6)
    with Image.open(tmp_path / "a.nic") as im:
        assert im.format == "NIC" and im.size == (40, 24) and im.mode == "RGB"
        assert im.info["quality"] == 6
        assert np.asarray(im).shape == (24, 40, 3)
    assert Image.MIME["NIC"] == "image/x-nic"


def test_gray_rgb_images_open_as_rgb(tmp_path):
    """An all-gray RGB image comes back as RGB from nic.decode and from Pillow's plugin."""
    gray = np.repeat(smooth_image(24, 40, seed=4)[..., :1], 3, axis=2)
    data = nic.encode(gray, quality=3)
    assert nic.decode(data).mode == "RGB"
    (tmp_path / "g.nic").write_bytes(data)
    with Image.open(tmp_path / "g.nic") as im:
        assert im.mode == "RGB" and np.asarray(im).shape == (24, 40, 3)


def test_metadata_survives_and_strip_drops_it(tmp_path):
    photo_with_metadata(tmp_path / "in.jpg")
    runner = CliRunner()
    assert runner.invoke(cli, ["encode", str(tmp_path / "in.jpg"), "-o", str(tmp_path / "a.nic")]).exit_code == 0
    info = runner.invoke(cli, ["info", str(tmp_path / "a.nic")]).output
    assert "iCCP" in info and "eXIf" in info and "the ICC profile, restored on decode" in info
    assert runner.invoke(cli, ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "a.png")]).exit_code == 0
    with Image.open(tmp_path / "a.png") as out:
        assert out.size == (40, 56)  # turned upright on encode
        assert out.info.get("icc_profile") == FAKE_ICC
        exif = out.getexif()
        assert exif.get(0x010F) == "nic test camera" and 0x0112 not in exif
    runner.invoke(cli, ["decode", str(tmp_path / "a.nic"), "--strip", "-o", str(tmp_path / "s.png")])
    with Image.open(tmp_path / "s.png") as out:
        assert "icc_profile" not in out.info and not out.getexif()
    runner.invoke(cli, ["encode", str(tmp_path / "in.jpg"), "--strip", "-o", str(tmp_path / "s.nic")])
    assert "iCCP" not in runner.invoke(cli, ["info", str(tmp_path / "s.nic")]).output


def nic_with_metadata(path) -> None:
    image = Image.fromarray(smooth_image(32, 48, seed=7))
    exif = Image.Exif()
    exif[0x010F] = "nic test camera"  # Make
    image.save(path, quality=3, exif=exif.tobytes(), icc_profile=FAKE_ICC)


def test_pillow_open_exposes_metadata_and_png_keeps_it(tmp_path):
    nic_with_metadata(tmp_path / "a.nic")
    with Image.open(tmp_path / "a.nic") as im:
        assert im.info["icc_profile"] == FAKE_ICC  # straight after open, before any decoding
        assert im.getexif().get(0x010F) == "nic test camera"
        # PNG keeps the ICC profile by itself; EXIF goes along when asked, as from any format.
        im.save(tmp_path / "b.png", exif=im.getexif())
    with Image.open(tmp_path / "b.png") as out:
        assert out.info["icc_profile"] == FAKE_ICC
        assert out.getexif().get(0x010F) == "nic test camera"
        assert out.size == (48, 32)
    assert nic.decode((tmp_path / "a.nic").read_bytes()).info["icc_profile"] == FAKE_ICC


def test_an_exif_rotated_image_is_turned_upright_every_time_and_left_as_it_was(tmp_path):
    """nic.encode twice on one opened image, and the Pillow plugin's save: upright each
    time (the image is shown 40 wide, 56 high), and the caller's image keeps its tag."""
    photo_with_metadata(tmp_path / "in.jpg")
    with Image.open(tmp_path / "in.jpg") as im:
        assert [nic.decode(nic.encode(im)).size for _ in range(2)] == [(40, 56), (40, 56)]
        assert im.getexif().get(0x0112) == 6
        im.save(tmp_path / "saved.nic")
        assert im.getexif().get(0x0112) == 6
    with Image.open(tmp_path / "saved.nic") as out:
        assert out.size == (40, 56) and 0x0112 not in out.getexif()
        assert out.getexif().get(0x010F) == "nic test camera"


def test_a_tiffs_layout_tags_are_not_kept_as_exif(tmp_path):
    """A TIFF's getexif() holds its own size, depth, strips and ICC profile: the .nic
    file's EXIF keeps the picture's tags (the camera) and not those, which would tell the
    decoded image's readers a wrong size and depth; the caller's image keeps them."""
    exif = Image.Exif()
    exif[0x010F] = "nic test camera"
    exif[0x0112] = 6
    Image.fromarray(smooth_image(24, 40)).save(tmp_path / "in.tif", exif=exif.tobytes(),
                                               icc_profile=icc_profile(b"fake-icc"))
    with Image.open(tmp_path / "in.tif") as im:
        assert {256, 257, 258, 273, 34675} <= set(im.getexif())
        data = nic.encode(im)
        assert {256, 257, 258, 273, 34675} <= set(im.getexif())
    with Image.open(io.BytesIO(data)) as out:
        assert sorted(out.getexif()) == [0x010F] and out.size == (24, 40)
        assert out.info.get("icc_profile") == icc_profile(b"fake-icc")


def test_pillow_save_strip_and_explicit_metadata(tmp_path):
    nic_with_metadata(tmp_path / "a.nic")
    with Image.open(tmp_path / "a.nic") as im:
        im.save(tmp_path / "stripped.nic", strip=True)
        other_icc = icc_profile(b"another-profile")
        rotated = Image.Exif()
        rotated[0x0131] = "nic tests"  # Software
        rotated[0x0112] = 6  # dropped: nic stores pixels as they are shown
        im.save(tmp_path / "explicit.nic", icc_profile=other_icc, exif=rotated)
        im.save(tmp_path / "no_icc.nic", icc_profile=None)
    with Image.open(tmp_path / "stripped.nic") as out:
        assert "icc_profile" not in out.info and "exif" not in out.info
    with Image.open(tmp_path / "explicit.nic") as out:
        assert out.info["icc_profile"] == other_icc
        exif = out.getexif()
        assert exif.get(0x0131) == "nic tests" and 0x010F not in exif and 0x0112 not in exif
    assert 0x0112 in rotated  # the caller's Exif is left as it was
    with Image.open(tmp_path / "no_icc.nic") as out:
        assert "icc_profile" not in out.info and out.getexif().get(0x010F) == "nic test camera"


def test_pillow_opens_a_damaged_file_and_load_names_the_damage(tmp_path):
    nic_with_metadata(tmp_path / "a.nic")
    data = (tmp_path / "a.nic").read_bytes()
    (tmp_path / "cut.nic").write_bytes(data[:-10])
    with Image.open(tmp_path / "cut.nic") as im:
        assert im.size == (48, 32) and "icc_profile" not in im.info
        with pytest.raises(OSError, match="truncated") as raised:
            im.load()
    assert isinstance(raised.value.__cause__, nic.container.FormatError)


@pytest.mark.parametrize("text,expected", [("20000", 20000), ("50KB", 50000), ("50k", 50000),
                                           ("1.5MB", 1500000), ("64KiB", 65536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("family", ["factorized", "hyperprior"])
def test_target_size_picks_the_largest_file_that_fits(tmp_path, family):
    """The factorized family picks the largest trained quality that fits; the hyperprior
    family (the default) then goes on between that quality and the next (nic.hyperprior,
    a coarser step), so its file is larger and still fits."""
    pixels = smooth_image(64, 96, seed=9)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    sizes = [len(nic.encode(pixels, quality=q, model=family)) for q in range(1, 9)]
    target = (sizes[3] + sizes[4]) // 2  # between quality 4 and 5
    result = CliRunner().invoke(cli, ["encode", str(tmp_path / "in.png"), "--size", str(target), "-v",
                                      "--model", family, "-o", str(tmp_path / "t.nic")])
    assert result.exit_code == 0, result.output
    size = (tmp_path / "t.nic").stat().st_size
    if family == "factorized":
        assert size == sizes[3] and "quality 4 chosen" in result.output
    else:
        assert sizes[3] < size <= target and "quality 4." in result.output
    bpp = 8 * sizes[2] / (64 * 96)
    CliRunner().invoke(cli, ["encode", str(tmp_path / "in.png"), "--bpp", f"{bpp:.6f}", "-o", str(tmp_path / "b.nic")])
    assert (tmp_path / "b.nic").stat().st_size <= sizes[2]
    assert CliRunner().invoke(cli, ["encode", str(tmp_path / "in.png"), "-q", "3", "--size", "1KB"]).exit_code == 2


def test_target_size_below_the_defaults_lowest_quality_tries_the_pixels_family(monkeypatch):
    """Text at a small budget: the default's quality 1 is over it, the pixels family's
    coarser steps fit; its largest file that fits is taken (other weights: not tried)."""
    from nic import api

    def sizes(pixels, quality, weights=None, icc_profile=None, exif=None, effort=1, family=None, precision="auto"):
        return bytes(100 * int(quality) if family == "pixels" else 1000 + int(quality))

    monkeypatch.setattr(api, "encode_pixels", sizes)
    pixels = smooth_image(16, 16)
    data, quality = api.encode_to_target(pixels, 540)
    assert (len(data), quality) == (500, 5)
    data, quality = api.encode_to_target(pixels, 50)  # none fits: the smallest miss
    assert (len(data), quality) == (100, 1)
    from nic.weights import installed

    assert len(api.encode_to_target(pixels, 540, weights=installed())[0]) == 1001  # over, as the CLI says


def test_batch_encode_and_decode_continue_past_failures(tmp_path):
    for i in range(3):
        Image.fromarray(smooth_image(16 + i, 20, seed=i)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    inputs = [str(tmp_path / f"img{i}.png") for i in range(3)] + [str(tmp_path / "broken.png")]
    result = CliRunner().invoke(cli, ["encode", *inputs, "-d", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "broken.png" in result.output and "bpp" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.nic", "img1.nic", "img2.nic"]
    # The summary's bpp is the batch's bits over its pixels, not a mean of the files' bpp.
    bits = sum(8 * p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert f"{bits / sum((16 + i) * 20 for i in range(3)):.4f}" in result.output
    nics = sorted(str(p) for p in (tmp_path / "out").iterdir())
    result = CliRunner().invoke(cli, ["decode", *nics, "-d", str(tmp_path / "dec")])
    assert result.exit_code == 0 and result.output == ""  # a batch that did it all is quiet off a terminal
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    with Image.open(tmp_path / "dec" / "img1.png") as im:
        assert im.size == (20, 17)


def test_batch_usage_errors(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["encode", "a.png", "b.png", "-o", "x.nic"]).exit_code == 2
    assert runner.invoke(cli, ["encode", "-", "b.png", "-d", str(tmp_path)]).exit_code == 2
    assert runner.invoke(cli, ["encode", "x/a.png", "y/a.png", "-d", str(tmp_path)]).exit_code == 2
    (tmp_path / "afile").write_bytes(b"")
    result = runner.invoke(cli, ["encode", "x/a.png", "y/b.png", "-d", str(tmp_path / "afile")])
    assert result.exit_code == 1 and result.output == f"nic: error: {tmp_path / 'afile'}: not a directory\n"


def test_pillow_verify_checks_the_crcs_without_decoding(tmp_path):
    nic_with_metadata(tmp_path / "a.nic")
    data = bytearray((tmp_path / "a.nic").read_bytes())
    with Image.open(tmp_path / "a.nic") as im:
        im.verify()
    data[60] ^= 0x01  # in the payload
    (tmp_path / "b.nic").write_bytes(bytes(data))
    with Image.open(tmp_path / "b.nic") as im:
        with pytest.raises(SyntaxError, match="CRC"):
            im.verify()


def test_pillow_save_refuses_an_effort_that_is_no_integer(tmp_path):
    with pytest.raises(ValueError, match="effort must be an integer"):
        Image.fromarray(smooth_image(16, 16)).save(tmp_path / "a.nic", effort=2.7)


def test_python_api_says_what_it_takes():
    with pytest.raises(TypeError, match="not a file"):
        nic.encode("photo.png")
    with pytest.raises(TypeError, match="quality must be a number"):
        nic.encode(smooth_image(8, 8), quality="4")
    with pytest.raises(TypeError, match="not its name"):
        nic.decode("photo.nic")
    with pytest.raises(TypeError, match="takes bytes"):
        nic.decode(None)
    data = nic.encode(smooth_image(8, 8), quality=2)
    as_array = np.frombuffer(data, np.uint8)
    assert np.array_equal(np.asarray(nic.decode(as_array)), np.asarray(nic.decode(bytearray(data))))


def test_pillow_save_all_stores_one_frame_or_refuses(tmp_path):
    single = Image.fromarray(smooth_image(16, 16))
    single.save(tmp_path / "one.nic", save_all=True)
    assert Image.open(tmp_path / "one.nic").size == (16, 16)
    with pytest.raises(ValueError, match="not 2 frames"):
        single.save(tmp_path / "two.nic", save_all=True, append_images=[single])


def test_pillow_verify_after_load_is_refused_as_pillow_does(tmp_path):
    nic_with_metadata(tmp_path / "a.nic")
    with Image.open(tmp_path / "a.nic") as im:
        im.load()
        with pytest.raises(RuntimeError, match="directly after open"):
            im.verify()


def test_a_loaded_image_survives_pickling_and_copies(tmp_path):
    """Pillow restores a copy's pixels, not the file's bytes: load() must not decode again."""
    import copy
    import pickle

    Image.fromarray(smooth_image(16, 24)).save(tmp_path / "a.nic")
    with Image.open(tmp_path / "a.nic") as im:
        im.load()
        pixels = np.asarray(im)
        for other in (pickle.loads(pickle.dumps(im)), copy.deepcopy(im)):
            assert np.array_equal(np.asarray(other), pixels)
    with Image.open(tmp_path / "a.nic") as im:
        assert np.array_equal(np.asarray(copy.deepcopy(im)), pixels)


def test_pillow_load_of_a_file_whose_weights_are_missing_is_an_oserror(tmp_path):
    import dataclasses

    from nic import container

    Image.fromarray(smooth_image(16, 24)).save(tmp_path / "a.nic", model="factorized")
    parsed = container.unpack((tmp_path / "a.nic").read_bytes())
    (tmp_path / "b.nic").write_bytes(container.pack(dataclasses.replace(parsed.header, weights_hash=b"\1" * 8),
                                                    parsed.payload, parsed.sections))
    with Image.open(tmp_path / "b.nic") as im:
        with pytest.raises(OSError, match="weights"):
            im.thumbnail((8, 8))


def test_background_takes_a_name_or_an_rgb_tuple():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red
    by_name = nic.decode(nic.encode(rgba, quality=8, background="white", model="pixels"))
    by_tuple = nic.decode(nic.encode(rgba, quality=8, background=(255, 255, 255), model="pixels"))
    assert np.array_equal(np.asarray(by_name), np.asarray(by_tuple))
    for bad in ((255, 0), (300, 0, 0), 0, "no such colour"):
        with pytest.raises(ValueError, match="background colour"):
            nic.encode(rgba, background=bad)


def test_metadata_and_pixels_of_the_wrong_type_are_type_errors():
    from nic import api

    with pytest.raises(TypeError, match="numpy array"):
        api.encode_pixels([[[1, 2, 3]]])
    for metadata in ({"exif": 5}, {"icc_profile": "profile"}):
        with pytest.raises(TypeError, match="must be bytes"):
            api.encode_pixels(smooth_image(8, 8), **metadata)
    with pytest.raises(TypeError):
        nic.encode(None)


def test_the_pillow_plugin_codes_with_other_weights(tmp_path, tiny_weights):
    """save(weights=) encodes with them; an image's ``weights`` attribute decodes with them
    (without it, a file of weights not installed raises OSError on load)."""
    pixels = smooth_image(32, 48, seed=3)
    Image.fromarray(pixels).save(tmp_path / "a.nic", quality=2, weights=tiny_weights)
    data = (tmp_path / "a.nic").read_bytes()
    assert data == nic.api.encode_pixels(pixels, 2, tiny_weights)
    with Image.open(tmp_path / "a.nic") as im:
        with pytest.raises(OSError, match="cannot decode"):
            im.load()
    with Image.open(tmp_path / "a.nic") as im:
        im.weights = tiny_weights
        assert np.array_equal(np.asarray(im), nic.api.decode_pixels(data, tiny_weights).pixels)


@pytest.mark.parametrize("effort,error", [("2", TypeError), (True, TypeError), (2.5, ValueError), (0, ValueError),
                                          (5, ValueError)])
def test_the_library_refuses_an_effort_that_is_not_1_to_4(effort, error):
    with pytest.raises(error, match=f"effort must be an integer 1..4, got {effort!r}"):
        nic.encode(smooth_image(16, 16), effort=effort, model="pixels")
    assert nic.encode(smooth_image(16, 16), effort=1.0, model="pixels") == nic.encode(smooth_image(16, 16),
                                                                                      model="pixels")
