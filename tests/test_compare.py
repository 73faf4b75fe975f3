"""nic compare: every codec at the same byte budget, on one sheet."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from conftest import smooth_image
from nic import compare
from nic.cli import cli


def test_every_codec_fits_the_budget_and_is_labelled(tiny_weights):
    pixels = smooth_image(48, 64)
    shown, skipped = compare.panels(pixels, 1500, "jpeg,webp,jpeg2000,avif", tiny_weights)
    names = [p.name for p in shown]
    assert names[:2] == ["original", "nic"] and set(names[2:]) | {s.split()[0] for s in skipped} == \
        {"jpeg", "webp", "jpeg2000", "avif"}
    for panel in shown[1:]:
        assert panel.pixels.shape == pixels.shape
        if panel.name != "nic":  # nic's smallest file is all it can offer below its lowest quality
            assert len(panel.data) <= 1500
        first, second = compare.label(panel, pixels)
        assert first.startswith(panel.name) and f"{len(panel.data):,} B" in second and " dB" in second
        assert "bpp" in second and "MS-SSIM" in second
    image = compare.sheet(shown, (8, 4, 40, 30), 3, columns=3)
    rows = -(-len(shown) // 3)
    assert image.size == (3 * 120 + 4 * compare.GAP, rows * (90 + compare.LABEL_HEIGHT) + (rows + 1) * compare.GAP)


def test_the_default_crop_is_where_the_detail_is():
    pixels = np.full((96, 128, 3), 128, np.uint8)
    pixels[40:72, 80:120] = np.random.default_rng(0).integers(0, 256, (32, 40, 3))
    x, y, w, h = compare.detailed_crop(pixels, 32, 24)
    assert (w, h) == (32, 24) and 80 <= x <= 88 and 40 <= y <= 48


def test_command_writes_a_sheet_and_refuses_bad_options(tmp_path, tiny_weights):
    Image.fromarray(smooth_image(48, 64)).save(tmp_path / "a.png")
    runner = CliRunner()
    result = runner.invoke(cli, ["compare", str(tmp_path / "a.png"), "--size", "2KB", "-o", str(tmp_path / "s.png"),
                                 "--weights", tiny_weights, "--codecs", "jpeg", "--crop", "0,0,32,16"])
    assert result.exit_code == 0, result.output
    # original, nic and JPEG side by side: three 64x32 crops (32x16 enlarged twice)
    assert Image.open(tmp_path / "s.png").size == (3 * 64 + 4 * compare.GAP, 32 + compare.LABEL_HEIGHT + 2 * compare.GAP)
    assert runner.invoke(cli, ["compare", str(tmp_path / "a.png"), "-o", str(tmp_path / "t.png")]).exit_code == 2
    # The sheet in its name's format; transparency flattened onto --background, as nic encode does.
    rgba = np.dstack([smooth_image(48, 64), np.full((48, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    args = ["compare", str(tmp_path / "alpha.png"), "--size", "2KB", "--weights", tiny_weights, "--codecs", "none"]
    refused = runner.invoke(cli, [*args, "-o", str(tmp_path / "s.jpg")])
    assert refused.exit_code == 1 and "--background" in refused.output
    assert runner.invoke(cli, [*args, "--background", "white", "-o", str(tmp_path / "s.jpg")]).exit_code == 0
    assert Image.open(tmp_path / "s.jpg").format == "JPEG"
    unnamed = runner.invoke(cli, [*args, "--background", "white", "-o", str(tmp_path / "sheet")])
    assert unnamed.exit_code == 0 and Image.open(tmp_path / "sheet").format == "PNG"  # no extension: PNG
    unknown = runner.invoke(cli, [*args, "--background", "white", "-o", str(tmp_path / "sheet.xyz")])
    assert unknown.exit_code == 1 and "cannot tell the output format" in unknown.output
    gray = runner.invoke(cli, [*args, "--background", "white", "-o", str(tmp_path / "sheet.pgm")])
    assert gray.exit_code == 1 and "a .pgm file is gray and the sheet is in colour" in gray.output
    bad = runner.invoke(cli, ["compare", str(tmp_path / "a.png"), "--bpp", "1", "-o", str(tmp_path / "t.png"),
                              "--crop", "40,40,64,64", "--weights", tiny_weights])
    assert bad.exit_code == 1 and "not inside the 64x48 image" in bad.output
    tiny = runner.invoke(cli, ["compare", str(tmp_path / "a.png"), "--bpp", "0.001", "-o", str(tmp_path / "t.png")])
    assert tiny.exit_code == 1 and "too small" in tiny.output
    for crop in ("", "1,2", "a,b,c,d"):
        assert runner.invoke(cli, ["compare", str(tmp_path / "a.png"), "--bpp", "1", "--crop", crop,
                                   "-o", str(tmp_path / "t.png")]).exit_code == 2
    itself = runner.invoke(cli, ["compare", str(tmp_path / "a.png"), "--bpp", "1", "-o", str(tmp_path / "./a.png")])
    assert itself.exit_code == 1 and "overwrite its own input" in itself.output and len(itself.output.splitlines()) == 1
    huge = runner.invoke(cli, ["compare", str(tmp_path / "a.png"), "--bpp", "1", "--codecs", "none", "--scale", "16",
                               "--max-pixels", "100000", "-o", str(tmp_path / "t.png"), "--weights", tiny_weights])
    assert huge.exit_code == 1 and "more than the limit" in huge.output
    assert not (tmp_path / "t.png").exists()


def test_bench_report_is_a_folder_to_open(tmp_path, tiny_weights):
    """nic bench --report: index.html with the tables, the plot, the JSON and one sheet per
    image at 0.25, 0.5 and 1 bpp, written whole; an existing folder is refused."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(smooth_image(48, 64, seed=i)).save(folder / f"a{i}.png")
    runner = CliRunner()
    out = tmp_path / "report"
    result = runner.invoke(cli, ["bench", str(folder), "--report", str(out), "--weights", tiny_weights,
                                 "-q", "1,4,8", "--codecs", "jpeg,jpeg2000"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["index.html", "rd.png", "report.json", "sheet-a0-0.25bpp.png", "sheet-a2-0.5bpp.png",
                     "sheet-a3-1bpp.png"]
    page = (out / "index.html").read_text()
    for text in ("rd.png", "report.json", "sheet-a2-0.5bpp.png", "JPEG 2000 (this run)", "BD-rate"):
        assert text in page
    again = runner.invoke(cli, ["bench", str(folder), "--report", str(out), "--weights", tiny_weights])
    assert again.exit_code == 1 and "exists" in again.output
    for clash in (["--hard", "--report", str(tmp_path / "r2")], [str(folder), "--report", str(tmp_path / "r2"),
                                                                 "--json", str(tmp_path / "r.json")]):
        assert runner.invoke(cli, ["bench", *clash]).exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "report"]  # no half-built folder left
