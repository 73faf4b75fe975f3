"""nic bench: the math (PSNR, MS-SSIM, pchip, BD-rate) against closed forms, and the command end to end."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import smooth_image
from nic import bench
from nic.bench import (bd_metrics, bd_psnr, bd_rate, hermite_eval, hermite_integral, ms_ssim, nice_ticks,
                       pareto_front, pchip_slopes, psnr)

# --------------------------------------------------------------------------- PSNR


def test_psnr_closed_form():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0, 0] = 110  # one error of 10 over 192 samples: MSE = 100/192
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 * 192 / 100), abs=1e-12)
    assert psnr(a, (a + 5).astype(np.uint8)) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-12)
    assert psnr(a, a) == math.inf


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 4, 1)))


# --------------------------------------------------------------------------- MS-SSIM


def _direct_ssim_terms(x: np.ndarray, y: np.ndarray, c1: float, c2: float) -> tuple[float, float]:
    """SSIM and cs of one plane with an explicit 11x11 window at every position (slow, obvious)."""
    g = bench.gaussian_window(11, 1.5)
    window = np.outer(g, g)
    ssims, css = [], []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx = (window * (px - mx) ** 2).sum()
            vy = (window * (py - my) ** 2).sum()
            cov = (window * (px - mx) * (py - my)).sum()
            cs = (2 * cov + c2) / (vx + vy + c2)
            css.append(cs)
            ssims.append((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs)
    return float(np.mean(ssims)), float(np.mean(css))


def test_ssim_terms_match_a_direct_windowed_computation():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 23)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    ssim, cs = bench.ssim_terms(x[None], y[None])
    want_ssim, want_cs = _direct_ssim_terms(x, y, (0.01 * 255) ** 2, (0.03 * 255) ** 2)
    assert ssim[0] == pytest.approx(want_ssim, abs=1e-6)
    assert cs[0] == pytest.approx(want_cs, abs=1e-6)


def test_ms_ssim_identical_is_one_and_noise_lowers_it():
    image = smooth_image(64, 80, seed=3)
    assert ms_ssim(image, image) == pytest.approx(1.0, abs=1e-7)
    rng = np.random.default_rng(0)
    mild = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    strong = np.clip(image + rng.normal(0, 30, image.shape), 0, 255).astype(np.uint8)
    m_mild, m_strong = ms_ssim(image, mild), ms_ssim(image, strong)
    assert 0.0 < m_strong < m_mild < 1.0


def test_an_exact_image_counts_as_the_cap_in_a_mean():
    """A lossless image (PSNR inf) leaves the curve's mean finite, so its BD-rate exists."""
    from nic.bench import PSNR_CAP, Point

    point = Point("nic", 4, "q4", [{"psnr": 30.0, "bpp": 1.0}, {"psnr": math.inf, "bpp": 2.0}])
    assert point.mean("psnr") == (30.0 + PSNR_CAP) / 2 and point.mean("bpp") == 1.5


def test_ms_ssim_is_the_mean_over_channels():
    rng = np.random.default_rng(2)
    image = smooth_image(48, 48, seed=5)
    noisy = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    per_channel = [ms_ssim(image[..., c], noisy[..., c]) for c in range(3)]
    assert ms_ssim(image, noisy) == pytest.approx(np.mean(per_channel), abs=1e-12)


def test_ms_ssim_combines_scales_with_wang_weights():
    # With one scale the formula is plain SSIM; with weights (1, 0, ...) it is the
    # finest-scale cs alone (the ssim term of the last scale is raised to 0).
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    y = np.clip(x + rng.normal(0, 25, x.shape), 0, 255).astype(np.uint8)
    ssim, cs = bench.ssim_terms(x[None].astype(np.float64), y[None].astype(np.float64))
    assert ms_ssim(x, y, weights=(1.0,)) == pytest.approx(ssim[0], abs=1e-12)
    assert ms_ssim(x, y, weights=(1.0, 0.0)) == pytest.approx(max(cs[0], 0.0), abs=1e-12)
    assert bench.MS_SSIM_WEIGHTS == (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def test_ms_ssim_needs_16_pixels_per_side():
    with pytest.raises(ValueError):
        ms_ssim(np.zeros((15, 40, 3), np.uint8), np.zeros((15, 40, 3), np.uint8))


# --------------------------------------------------------------------------- pchip


def test_pchip_reproduces_a_line_exactly():
    x = np.array([0.0, 0.3, 1.0, 2.5, 4.0])
    y = 2.0 * x - 1.0
    d = pchip_slopes(x, y)
    assert np.allclose(d, 2.0, atol=1e-12)
    t = np.linspace(-0.5, 4.5, 41)
    assert np.allclose(hermite_eval(x, y, d, t), 2.0 * t - 1.0, atol=1e-12)
    assert hermite_integral(x, y, d, 0.2, 3.1) == pytest.approx((3.1**2 - 0.2**2) - (3.1 - 0.2), abs=1e-12)


def test_hermite_with_true_slopes_reproduces_a_cubic_exactly():
    # The Hermite form is exact for cubics given exact derivatives; pchip only
    # replaces those slopes by shape-preserving estimates.
    def f(t):
        return 0.5 * t**3 - t**2 + 3 * t + 1

    def df(t):
        return 1.5 * t**2 - 2 * t + 3

    def big_f(t):
        return 0.125 * t**4 - t**3 / 3 + 1.5 * t**2 + t

    x = np.array([-1.0, 0.0, 0.7, 2.0, 3.5])
    t = np.linspace(-1, 3.5, 37)
    assert np.allclose(hermite_eval(x, f(x), df(x), t), f(t), atol=1e-12)
    assert hermite_integral(x, f(x), df(x), -0.4, 3.1) == pytest.approx(big_f(3.1) - big_f(-0.4), abs=1e-11)


def test_pchip_interpolates_knots_and_does_not_overshoot():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([0.0, 0.0, 0.1, 5.0, 5.0, 5.05])  # monotone with flat parts
    d = pchip_slopes(x, y)
    assert np.allclose(hermite_eval(x, y, d, x), y, atol=1e-12)
    t = np.linspace(0, 5, 501)
    v = hermite_eval(x, y, d, t)
    assert np.all(np.diff(v) >= -1e-12)  # monotone data, monotone curve
    assert v.min() >= -1e-12 and v.max() <= 5.05 + 1e-12
    # At a local extremum of the data the slope is flat.
    assert pchip_slopes(np.array([0.0, 1, 2]), np.array([0.0, 1, 0]))[1] == 0.0


def test_pchip_rejects_unsorted_x():
    with pytest.raises(ValueError):
        pchip_slopes(np.array([0.0, 2.0, 1.0]), np.array([0.0, 1.0, 2.0]))


# --------------------------------------------------------------------------- BD-rate

REF_RATES = np.array([0.12, 0.2, 0.32, 0.48, 0.72, 1.06, 1.46, 1.96])
REF_PSNR = np.array([26.8, 28.3, 30.0, 31.7, 33.7, 35.8, 38.0, 40.1])


def test_bd_rate_of_a_curve_needing_10_percent_fewer_bits_is_minus_10():
    assert bd_rate(REF_RATES, REF_PSNR, 0.9 * REF_RATES, REF_PSNR) == pytest.approx(-10.0, abs=1e-9)
    assert bd_rate(REF_RATES, REF_PSNR, 1.25 * REF_RATES, REF_PSNR) == pytest.approx(25.0, abs=1e-9)
    assert bd_rate(REF_RATES, REF_PSNR, REF_RATES, REF_PSNR) == pytest.approx(0.0, abs=1e-12)


def test_bd_rate_at_equal_psnr_not_equal_points():
    # Test curve sampled at other PSNRs of the same straight line log R = a + b·PSNR,
    # shifted by 10 %: pchip reproduces lines, so the answer is still exact.
    def line(p):
        return np.exp(-6.0 + 0.15 * p)

    p_ref = np.array([26.0, 29.0, 33.0, 37.0, 41.0])
    p_test = np.array([27.3, 30.1, 31.9, 36.4, 39.0, 43.0])
    assert bd_rate(line(p_ref), p_ref, 0.9 * line(p_test), p_test) == pytest.approx(-10.0, abs=1e-9)


def test_bd_rate_uses_only_the_shared_psnr_range():
    def line(p):
        return np.exp(-6.0 + 0.15 * np.asarray(p))

    # Reference covers 26..34 dB, test 30..40 dB, 20 % fewer bits on the same line:
    # the shared range is 30..34 dB and the answer exactly -20 %.
    p_ref = np.array([26.0, 28.0, 30.0, 32.0, 34.0])
    p_test = np.array([30.0, 32.0, 34.0, 36.0, 40.0])
    exact = bd_metrics(line(p_ref), p_ref, 0.8 * line(p_test), p_test)
    assert exact.psnr_range == (30.0, 34.0)
    assert exact.bd_rate == pytest.approx(-20.0, abs=1e-9)

    # Now make the test curve absurd above 34 dB: only its shape inside 30..34 dB may
    # count. Compare with a brute-force quadrature of the two interpolants on that range.
    r_test = 0.8 * line(p_test) * np.array([1.0, 1.0, 1.0, 50.0, 500.0])
    result = bd_metrics(line(p_ref), p_ref, r_test, p_test)
    assert result.psnr_range == (30.0, 34.0)
    grid = np.linspace(30.0, 34.0, 400_001)

    def mean_log_rate(p, r):
        y = np.log(r)
        v = hermite_eval(p, y, pchip_slopes(p, y), grid)
        return np.sum((v[1:] + v[:-1]) / 2) * (grid[1] - grid[0]) / 4.0

    want = 100 * math.expm1(mean_log_rate(p_test, r_test) - mean_log_rate(p_ref, line(p_ref)))
    assert result.bd_rate == pytest.approx(want, abs=1e-6)
    assert result.bd_rate != pytest.approx(-20.0, abs=0.5)  # the 36 dB point bends the last segment

    # Curves that do not overlap in PSNR have no BD-rate.
    assert math.isnan(bd_rate(line(p_ref), p_ref, line(p_ref), p_ref + 20.0))
    assert bd_metrics(line(p_ref), p_ref, line(p_ref), p_ref + 20.0).note


def test_bd_rate_by_hand_on_two_segment_curves():
    # Two points per curve: pchip is the straight segment. Reference: ln R = ln2·(p−30)/5
    # (1 → 4 bpp over 30 → 40 dB); test: ln R = ln2·(−1 + (p−32)/2) (0.5 → 4 bpp over
    # 32 → 38 dB). Shared range 32..38 dB; the mean of a line is its midpoint value, at
    # 35 dB ln2·1 and ln2·0.5, so BD-rate = 2^−0.5 − 1 = −29.29 %.
    got = bd_rate([1.0, 4.0], [30.0, 40.0], [0.5, 4.0], [32.0, 38.0])
    assert got == pytest.approx(100 * (2**-0.5 - 1), abs=1e-9)


def test_bd_rate_by_hand_on_three_point_pchip_curves():
    """Curved, non-parallel curves, where pchip differs from other interpolants.

    x = PSNR 30, 32, 34 (h = 2), y = ln R. Reference y = 0, 1, 1.5: secants 0.5, 0.25;
    interior slope = harmonic mean 2/(1/0.5 + 1/0.25) = 1/3; end slopes by the
    three-point formula ((2h+h)·δ0 − h·δ1)/2h = 0.625 and (3h·δ1 − h·δ0)/2h = 0.125.
    A cubic Hermite segment integrates to h(y0+y1)/2 + h²(d0−d1)/12:
    1 + (0.625 − 1/3)/3 = 1.0972 and 2.5 + (1/3 − 0.125)/3 = 2.5694, total 11/3.
    Test y = −0.5, 0.25, 1.5: secants 0.375, 0.625; slopes 0.25, 0.46875, 0.75;
    segments −0.25 − 0.21875/3 and 1.75 − 0.28125/3, total 4/3.
    BD-rate = exp((4/3 − 11/3)/4) − 1 = exp(−7/12) − 1 = −44.20 %."""
    ref_rates = np.exp([0.0, 1.0, 1.5])
    test_rates = np.exp([-0.5, 0.25, 1.5])
    psnrs = [30.0, 32.0, 34.0]
    got = bd_rate(ref_rates, psnrs, test_rates, psnrs)
    assert got == pytest.approx(100 * (math.exp(-7 / 12) - 1), abs=1e-9)
    # Straight segments (trapezoids 3.5 and 1.5) would give exp(−0.5) − 1 = −39.35 %.
    assert got != pytest.approx(100 * (math.exp(-0.5) - 1), abs=1.0)


def test_jpeg2000_baseline_uses_the_colour_transform_and_the_9_7_wavelet():
    """Pillow's default mct=0 costs JPEG 2000 3-5 dB on RGB; the bench must not publish that."""
    data = bench.encode_baseline("jpeg2000", 0.5, smooth_image(64, 64))
    cod = data.index(b"\xff\x52")  # COD marker: Lcod(2) Scod(1) order(1) layers(2) MCT(1) …
    assert data[cod + 8] == 1, "multi-component transform is off"
    assert data[cod + 13] == 0, "not the 9/7 irreversible wavelet"
    gray = bench.encode_baseline("jpeg2000", 0.5, smooth_image(64, 64, channels=1))
    assert gray[gray.index(b"\xff\x52") + 8] == 0  # one component: nothing to transform


def test_bench_on_kodak_compares_with_the_published_anchors(tmp_path, request, monkeypatch):
    """The Kodak path end to end (on 2 tiny stand-ins): the three published curves are
    BD-rate references and the anchors are copied into the report."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(48, 64, seed=20 + i)).save(folder / f"kodim0{i + 1}.png")
    monkeypatch.setattr(bench, "looks_like_kodak", lambda paths: True)
    from nic.cli import cli

    out_json = tmp_path / "k.json"
    result = CliRunner().invoke(cli, ["bench", str(folder), "--codecs", "none", "-q", "1,4,8", "--json",
                                      str(out_json), *_weights_args(request)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    assert report["kodak"] is True and report["elapsed_s"] > 0
    anchors = bench.load_anchors()["anchors"]
    assert set(anchors) == {"balle2017", "bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean"}
    assert set(anchors) <= set(report["bd_rate"]["against"])
    assert report["anchors"]["anchors"] == anchors


def test_bd_psnr_of_a_curve_shifted_up_by_half_a_db():
    assert bd_psnr(REF_RATES, REF_PSNR, REF_RATES, REF_PSNR + 0.5) == pytest.approx(0.5, abs=1e-9)


def test_bd_rate_drops_dominated_points():
    r, p = pareto_front([0.1, 0.2, 0.3, 0.25, 0.5], [28.0, 30.0, 29.5, 31.0, 31.0])
    assert list(r) == [0.1, 0.2, 0.25] and list(p) == [28.0, 30.0, 31.0]
    assert math.isnan(bd_rate([0.1], [30.0], [0.1, 0.2], [30.0, 31.0]))


# --------------------------------------------------------------------------- plot helpers


def test_nice_ticks_are_round_and_cover_the_range():
    ticks = nice_ticks(0.0, 1.93, 10)
    assert ticks[0] == 0.0 and ticks[-1] >= 1.93 and len(ticks) <= 12
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    assert nice_ticks(26.3, 41.2, 9) == [26.0, 28.0, 30.0, 32.0, 34.0, 36.0, 38.0, 40.0, 42.0]
    assert nice_ticks(0.0, 0.5, 10) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]


def test_render_rd_plot_returns_an_image_of_the_asked_size():
    series = [bench.Series("a", [0.1, 0.5, 1.0], [28.0, 32.0, 35.0], (200, 0, 0)),
              bench.Series("b", [0.2, 0.6], [27.0, 31.0], (0, 0, 200), dashed=True)]
    image = bench.render_rd_plot(series, "test", size=(640, 480))
    assert image.size == (640, 480) and image.mode == "RGB"
    colours = {c for _, c in image.getcolors(1 << 20)}
    assert (200, 0, 0) in colours and (0, 0, 200) in colours


# --------------------------------------------------------------------------- the command


def _weights_args(request) -> list[str]:
    shipped = Path(__file__).resolve().parents[1] / "weights" / "default.npz"
    if shipped.is_file():
        return []
    return ["--weights", request.getfixturevalue("tiny_weights")]


def test_bench_command_writes_json_and_png(tmp_path, request):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(48, 64, seed=10 + i)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out_json, out_png = tmp_path / "r.json", tmp_path / "rd.png"
    from nic.cli import cli

    result = CliRunner().invoke(cli, ["bench", str(folder), "--codecs", "jpeg", "-q", "1,8", "--json",
                                      str(out_json), "--plot", str(out_png), *_weights_args(request)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "BD-rate" in result.output and "jpeg" in result.output
    report = json.loads(out_json.read_text())
    assert [im["name"] for im in report["images"]] == ["img0.png", "img1.png"]
    assert set(report["codecs"]) == {"nic", "jpeg"}
    nic_points = report["codecs"]["nic"]["points"]
    assert [p["setting"] for p in nic_points] == ["q=1", "q=8"]
    for point in nic_points + report["codecs"]["jpeg"]["points"]:
        assert len(point["images"]) == 2
        for record in point["images"]:
            assert record["bpp"] == pytest.approx(8 * record["bytes"] / (48 * 64))
            assert 0 < record["ms_ssim"] <= 1 and record["psnr"] > 5
        assert point["mean"]["bpp"] == pytest.approx(np.mean([r["bpp"] for r in point["images"]]))
    assert nic_points[1]["mean"]["bpp"] > nic_points[0]["mean"]["bpp"]
    assert "jpeg" in report["bd_rate"]["against"]
    assert report["kodak"] is False and "anchors" not in report
    image = Image.open(io.BytesIO(out_png.read_bytes()))
    assert image.format == "PNG" and image.size == (1000, 700)
    # A second run compared with the first: the same weights give a BD-rate of 0.
    result = CliRunner().invoke(cli, ["bench", str(folder), "--codecs", "none", "-q", "1,8", "--compare",
                                      str(out_json), "--json", str(tmp_path / "again.json"), *_weights_args(request)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again.json").read_text())
    (compared,) = [v for k, v in again["bd_rate"]["against"].items() if k.startswith("compare:")]
    assert compared["bd_rate_percent"] == pytest.approx(0.0, abs=1e-9)
    # A report to compare with that is not one stops the run before it measures anything.
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["bench", str(folder), "--codecs", "none", "-q", "1,8", "--compare",
                                      str(folder / "notes.txt"), *_weights_args(request)])
    assert result.exit_code == 1 and "not a nic bench JSON report" in result.output
    assert "bench took" not in result.output and time.perf_counter() - started < 5


def test_bench_command_speed_mode(tmp_path, request):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(smooth_image(48, 64, seed=3)).save(folder / "a.png")
    from nic.cli import cli

    out_json = tmp_path / "s.json"
    result = CliRunner().invoke(cli, ["bench", str(folder), "--speed", "--codecs", "jpeg", "--json",
                                      str(out_json), *_weights_args(request)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    assert report["mode"] == "speed" and report["model_load_ms"] >= 0
    # The installed default is timed beside the installed factorized family, image by image.
    assert [r["codec"] for r in report["rows"]] == (["nic", "jpeg"] if _weights_args(request) else
                                                   ["nic", "factorized", "jpeg"])
    assert all(r["median_enc_ms"] > 0 and r["enc_mpx_per_s"] > 0 for r in report["rows"])
    if not _weights_args(request):
        ratio = report["default_over_factorized"]["4"]
        assert ratio["encode"] > 0 and ratio["decode"] > 0 and "factorized family's time" in result.output


def test_bench_command_refuses_bad_options(tmp_path):
    from nic.cli import cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(smooth_image(32, 32)).save(folder / "a.png")
    runner = CliRunner()
    bad_codec = runner.invoke(cli, ["bench", str(folder), "--codecs", "gif"])
    assert bad_codec.exit_code == 2 and "unknown codec" in bad_codec.output  # usage errors, as encode's are
    beyond = runner.invoke(cli, ["bench", str(folder), "--codecs", "none", "-q", "9"])
    assert beyond.exit_code == 2 and "9 is above 8, the highest quality" in beyond.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in runner.invoke(cli, ["bench", str(empty)]).output
    for args in (["-q", "4-2"], ["-q", "nan"], ["--json", ""], ["--json", "-", "--plot", "-"]):
        result = runner.invoke(cli, ["bench", str(folder), "--codecs", "none", *args])
        assert result.exit_code == 2, (args, result.output)
    measured = runner.invoke(cli, ["bench", str(folder), "--codecs", "none", "--json", str(folder / "a.png")])
    assert measured.exit_code == 1 and "one of the images being measured" in measured.output
    late = runner.invoke(cli, ["bench", str(folder), "--codecs", "none", "--json", str(tmp_path / "no" / "r.json")])
    assert late.exit_code == 1 and "directory does not exist" in late.output  # before the sweep
    assert (folder / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_kodak_detection_and_anchor_file():
    names = [Path(f"kodim{i:02d}.png") for i in range(1, 25)]
    assert bench.looks_like_kodak(names)
    assert not bench.looks_like_kodak(names[:23])
    anchors = bench.load_anchors()["anchors"]
    for anchor in anchors.values():
        assert anchor["source"]["repository"].startswith("https://github.com/")
        assert len(anchor["bpp"]) == len(anchor["psnr"]) >= 4
        assert np.all(np.diff(anchor["bpp"]) > 0) and np.all(np.diff(anchor["psnr"]) > 0)


def test_parse_lists():
    assert bench.parse_qualities("8,1,4", 8) == [1, 4, 8]
    assert bench.parse_qualities("2-4", 8) == [2, 3, 4]
    assert bench.parse_qualities(None, 3) == [1, 2, 3]
    assert bench.parse_qualities("4,3.5,3.0", 8) == [3, 3.5, 4]
    for bad in ("9", "0.5", "nan", "inf", "1e400", "x"):
        with pytest.raises(ValueError):
            bench.parse_qualities(bad, 8)
    assert bench.parse_codecs("JPEG,j2k,jpeg") == ["jpeg", "jpeg2000"]
    assert bench.parse_codecs("none") == []


def test_bench_command_on_gray_odd_sized_input_with_one_point(tmp_path, request):
    # One nic point cannot make a BD-rate: the JSON says null, not NaN (strict JSON).
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(smooth_image(37, 41, channels=1, seed=8)[..., 0], "L").save(folder / "gray.png")
    out_json = tmp_path / "g.json"
    from nic.cli import cli

    result = CliRunner().invoke(cli, ["bench", str(folder), "--codecs", "jpeg,jpeg2000", "-q", "2", "--json",
                                      str(out_json), *_weights_args(request)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = out_json.read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    assert report["images"] == [{"name": "gray.png", "width": 41, "height": 37}]
    assert report["bd_rate"]["against"]["jpeg"]["bd_rate_percent"] is None
    for codec in ("nic", "jpeg", "jpeg2000"):
        record = report["codecs"][codec]["points"][0]["images"][0]
        assert record["psnr"] > 5 and 0 < record["ms_ssim"] <= 1


def test_rate_change_at_equal_psnr():
    rates, psnrs = [0.2, 0.4, 0.8, 1.6], [27.0, 30.0, 33.0, 36.0]
    assert bench.rate_change(rates, psnrs, 0.4, 30.0) == pytest.approx(0.0)
    assert bench.rate_change(rates, psnrs, 0.36, 30.0) == pytest.approx(-0.1)
    # Between knots the curve is the pchip of log-rate, as BD-rate integrates it: here a line.
    assert bench.rate_change(rates, psnrs, 0.4 * 2 ** 0.5, 31.5) == pytest.approx(0.0)
    assert math.isnan(bench.rate_change(rates, psnrs, 0.1, 26.9))  # no extrapolation
    assert math.isnan(bench.rate_change([0.2], [27.0], 0.2, 27.0))


def _tool_output(*args: str) -> str:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "tools" / args[0]), *args[1:]],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bd_curve_reads_the_shipped_line_from_the_committed_reports():
    """tools/bd_curve.py: the table in docs/results/training.md, from the JSON reports in docs/results."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = _tool_output("bd_curve.py")
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    shipped = json.loads((root / "docs" / "results" / "kodak.json").read_text())
    last = shipped["bd_rate"]["against"]["bmshj2018-factorized"]["bd_rate_percent"]
    assert len(rows) >= 12 and f"{last:+.1f} %" in rows[-1] and "points" in rows[-1]
    assert rows[-1].startswith(f"| `{shipped['weights'][:8]}`")  # the line ends at the shipped weights
    gaps = [line for line in out.splitlines() if line.startswith("| q=")]
    assert len(gaps) == len(shipped["codecs"]["nic"]["points"])
    assert all(line.endswith(" dB |") for line in gaps)


def test_bd_curve_prints_the_hyperprior_line_against_jpeg_2000():
    """--family hyperprior: the family's weights files in order, ending at the installed
    one, each with its own report's BD-rate against JPEG 2000."""
    import json
    from pathlib import Path

    from nic.weights import default_weights

    root = Path(__file__).resolve().parent.parent
    out = _tool_output("bd_curve.py", "--family", "hyperprior")
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    head = default_weights(None, "hyperprior", coding=True)[1].hex()[:8]
    assert rows[-1].startswith(f"| `{head}`") and "points" in rows[-1]
    report = json.loads((root / "docs" / "results" / f"kodak-{head}.json").read_text())
    assert f"{report['bd_rate']['against']['jpeg2000']['bd_rate_percent']:+.1f} %" in rows[-1]
    assert len([line for line in out.splitlines() if line.startswith("| q=")]) == 8


def test_readme_results_tables_are_the_reports():
    """The README's Kodak tables are printed by tools/results_markdown.py from
    docs/results/kodak.json: every table row it prints is in the README as it is, so a
    new bench report without a README update (or the reverse) fails here."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = [line for line in _tool_output("results_markdown.py", "docs/results/kodak.json").splitlines()
            if line.startswith("| ") and not line.startswith("| quality") and not line.startswith("| nic against")]
    assert len(rows) >= 8 + 4
    assert [row for row in rows if row not in readme] == []


def test_training_doc_curve_is_the_tool_output():
    """docs/results/training.md's BD-rate-against-CPU-time table is tools/bd_curve.py's, row for row."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "results" / "training.md").read_text()
    rows = [line.replace("-", "−") for line in _tool_output("bd_curve.py").splitlines() if line.startswith("| `")]
    assert [row for row in rows if row not in doc.replace("-", "−")] == []


def test_results_markdown_per_quality_compares_two_reports():
    out = _tool_output("results_markdown.py", "docs/results/kodak.json",
                       "--per-quality", "docs/results/kodak-6cbf82f6.json")
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 8
    assert all(row.count("|") == 8 for row in rows)
    assert "→" in rows[1] and "%" in rows[1]  # q2 changed between the two weights


def test_bench_hard_reports_nic_the_ceiling_and_codecs_at_the_same_bytes(tiny_weights):
    rows = bench.run_hard("1", "jpeg,jpeg2000", tiny_weights, None, ["flat", "text-black"])
    assert [(r["image"], r["quality"]) for r in rows] == [("flat", 1), ("text-black", 1)]
    for row in rows:
        assert row["bpp"] == pytest.approx(8 * row["bytes"] / (512 * 768))
        if row["family"] != "pixels":  # the model's file: rounding the latents only loses
            assert row["ceiling"] >= row["psnr"] - 0.5
        # None: JPEG 2000 cannot make a file that small (the flat image as pixels is ~70 bytes)
        assert row["jpeg2000"] is None or row["jpeg2000"] > 0
    assert rows[1]["jpeg2000"] is not None
    table = bench.hard_table(rows)
    assert table.splitlines()[0].startswith("| image | q | coded as | nic bpp | nic PSNR | ceiling | jpeg, same bytes")
    assert len(table.splitlines()) == 4


def test_same_bytes_never_exceeds_the_budget():
    pixels = smooth_image(64, 96)
    found = bench.same_bytes("jpeg", pixels, 900)
    assert found is not None and found["bytes"] <= 900
    assert bench.same_bytes("jpeg", pixels, 10) is None


def test_bench_needs_a_folder_or_hard(tmp_path):
    from nic.cli import cli

    result = CliRunner().invoke(cli, ["bench"])
    assert result.exit_code == 2 and "--hard" in result.output
    result = CliRunner().invoke(cli, ["bench", str(tmp_path), "--hard"])
    assert result.exit_code == 2
