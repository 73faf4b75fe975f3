"""``nic bench``: rate-distortion and speed of nic against Pillow's codecs.

The module has three layers, so the numbers can be checked in isolation:

* pure math, no I/O: :func:`psnr`, :func:`ms_ssim` (Wang, Simoncelli and Bovik 2003),
  :func:`pchip_slopes` / :func:`hermite_eval` / :func:`hermite_integral`
  (Fritsch and Carlson 1980), :func:`bd_rate` and :func:`bd_psnr` (Bjøntegaard,
  VCEG-M33, 2001), :func:`nice_ticks` and :func:`render_rd_plot` (returns an image);
* in-memory codecs: :func:`encode_baseline` / :func:`decode_baseline` through Pillow;
* :func:`run_command`, the body of the ``nic bench`` command: files, progress bar,
  tables, JSON and PNG output.

Conventions follow the learned-compression literature (CompressAI, tensorflow/compression
results): bpp counts every byte of the file a user would store (the whole .nic file with
its header; the whole JPEG/WebP/JP2/AVIF file), PSNR and MS-SSIM are computed on the
8-bit decoded RGB output, and each point of a curve is the mean over images of the
per-image bpp, PSNR and MS-SSIM at one fixed setting.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import families

# --------------------------------------------------------------------------- metrics


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB over every sample (all of R, G and B together): 10·log10(peak² / MSE).

    Identical inputs give ``inf``.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of Wang, Simoncelli and Bovik (2003), finest scale first."""

MS_SSIM_METHOD = (
    "MS-SSIM of Wang, Simoncelli and Bovik (2003): 5 scales with exponents "
    "(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 11x11 Gaussian window (sigma 1.5, 'valid' "
    "filtering, local moments in float32 on mean-shifted samples), K1=0.01, K2=0.03, data range 255, "
    "2x2 average pooling between scales; "
    "contrast-structure and SSIM terms clamped at 0 before the powers (as tf.image.ssim_multiscale); "
    "computed per R, G, B channel on 8-bit values and averaged over the three channels. "
    "Scales smaller than 11 px use a truncated window (images under 176 px only)."
)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D normalized Gaussian taps; the 2-D window is its outer product (separable)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-(offsets**2) / (2.0 * sigma * sigma))
    return taps / taps.sum()


def _filter_valid(planes: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (..., H, W) with taps along H then W.

    Summing shifted slices keeps the work in numpy's vectorized loops: 2·len(taps)
    array operations per call, no Python loop over pixels.
    """
    k = len(taps)
    rows = planes.shape[-2] - k + 1
    cols = planes.shape[-1] - k + 1
    tmp = taps[0] * planes[..., 0:rows, :]
    for i in range(1, k):
        tmp += taps[i] * planes[..., i:i + rows, :]
    out = taps[0] * tmp[..., :, 0:cols]
    for i in range(1, k):
        out += taps[i] * tmp[..., :, i:i + cols]
    return out


def ssim_terms(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, size: int = 11,
               sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """Mean SSIM and mean contrast-structure term per plane of float (C, H, W) inputs.

    Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to
    structural similarity", IEEE TIP 2004 (the SSIM index), with a Gaussian window.
    Returns two float64 arrays of shape (C,).

    The local moments are filtered in float32, which is 3-4x faster than float64 here
    and what the usual PyTorch implementations do. To keep the variance
    E[x²] − E[x]² from losing digits to cancellation, both images are first shifted by
    the reference plane's mean (variances and covariance do not change; the local means
    get the shift added back for the luminance term). Against a float64 computation
    this moves MS-SSIM by about 1e-8 on Kodak.
    """
    size = min(size, x.shape[-2], x.shape[-1])
    if size % 2 == 0:
        size -= 1  # keep the window centred
    taps = gaussian_window(size, sigma).astype(np.float32)
    c1 = np.float32((k1 * data_range) ** 2)
    c2 = np.float32((k2 * data_range) ** 2)
    shift = x.mean(axis=(-2, -1), keepdims=True)
    xc = (x - shift).astype(np.float32)
    yc = (y - shift).astype(np.float32)
    # One filtering pass over the five moments at once (stacked on a new axis).
    mu_x, mu_y, xx, yy, xy = _filter_valid(np.stack([xc, yc, xc * xc, yc * yc, xc * yc]), taps)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    shift32 = shift.astype(np.float32)
    mu_x += shift32
    mu_y += shift32
    cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    ssim_map = luminance * cs_map
    return ssim_map.mean(axis=(-2, -1), dtype=np.float64), cs_map.mean(axis=(-2, -1), dtype=np.float64)


def _pool2(planes: np.ndarray) -> np.ndarray:
    """2x2 average pooling of (C, H, W); an odd last row/column is dropped."""
    c, h, w = planes.shape
    h2, w2 = h // 2, w // 2
    cropped = planes[:, : 2 * h2, : 2 * w2]
    return cropped.reshape(c, h2, 2, w2, 2).mean(axis=(2, 4))


def ms_ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0,
            weights: Sequence[float] = MS_SSIM_WEIGHTS) -> float:
    """Multi-scale SSIM of two images (H, W) or (H, W, C), averaged over channels.

    Z. Wang, E. P. Simoncelli, A. C. Bovik, "Multi-scale structural similarity for image
    quality assessment", 37th Asilomar Conference on Signals, Systems and Computers, 2003:

        MS-SSIM = [l_M · cs_M]^w_M · ∏_{j<M} cs_j^w_j

    computed on each channel separately (RGB MS-SSIM as reported by CompressAI and
    tensorflow/compression for Kodak), then averaged. Negative terms are clamped at 0
    before the fractional powers, so strongly anti-correlated images score 0 instead of NaN.
    The image must be at least 2^(scales-1) = 16 pixels on each side.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected (H, W) or (H, W, C) images, got shape {a.shape}")
    scales = len(weights)
    if min(a.shape[0], a.shape[1]) < 2 ** (scales - 1):
        raise ValueError(f"MS-SSIM needs at least {2 ** (scales - 1)} pixels per side, got "
                         f"{a.shape[1]}x{a.shape[0]}")
    x = np.ascontiguousarray(a.transpose(2, 0, 1))
    y = np.ascontiguousarray(b.transpose(2, 0, 1))
    result = np.ones(x.shape[0])
    for level, weight in enumerate(weights):
        ssim_mean, cs_mean = ssim_terms(x, y, data_range)
        last = level == scales - 1
        term = np.maximum(ssim_mean if last else cs_mean, 0.0)
        result *= term**weight
        if not last:
            x, y = _pool2(x), _pool2(y)
    return float(result.mean())


# --------------------------------------------------------------------------- pchip, BD-rate


def pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Knot derivatives of the monotone piecewise cubic Hermite interpolant.

    F. N. Fritsch and R. E. Carlson, "Monotone piecewise cubic interpolation", SIAM J.
    Numer. Anal. 17(2), 1980, with the weighted harmonic mean of Fritsch and Butland
    (1984) at interior knots and the shape-preserving three-point formula at the ends.
    Where the data change direction the slope is 0, so the curve never overshoots: a
    monotone rate-distortion curve stays monotone between the measured points.
    x must be strictly increasing.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2 or len(y) != n:
        raise ValueError("pchip needs at least two points and as many x as y")
    h = np.diff(x)
    if np.any(h <= 0):
        raise ValueError("x must be strictly increasing")
    delta = np.diff(y) / h
    d = np.empty(n)
    if n == 2:
        d[:] = delta[0]  # a single segment: the straight line
        return d
    # Interior knots: weighted harmonic mean of the neighbouring secant slopes when they
    # have the same sign, else a flat tangent (a local extremum of the data).
    h0, h1 = h[:-1], h[1:]
    d0, d1 = delta[:-1], delta[1:]
    w1 = 2.0 * h1 + h0
    w2 = h1 + 2.0 * h0
    same_sign = d0 * d1 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / d0 + w2 / d1)
    d[1:-1] = np.where(same_sign, harmonic, 0.0)
    d[0] = _end_slope(h[0], h[1], delta[0], delta[1])
    d[-1] = _end_slope(h[-1], h[-2], delta[-1], delta[-2])
    return d


def _end_slope(h0: float, h1: float, d0: float, d1: float) -> float:
    """Non-centred three-point end derivative, limited so the end segment stays monotone."""
    slope = ((2.0 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
    if np.sign(slope) != np.sign(d0):
        return 0.0
    if np.sign(d0) != np.sign(d1) and abs(slope) > abs(3.0 * d0):
        return 3.0 * d0
    return float(slope)


def _segment_coefficients(x: np.ndarray, y: np.ndarray, d: np.ndarray):
    """Per segment k, p_k(s) = y_k + d_k·s + c2_k·s² + c3_k·s³ with s = t - x_k."""
    h = np.diff(x)
    delta = np.diff(y) / h
    c2 = (3.0 * delta - 2.0 * d[:-1] - d[1:]) / h
    c3 = (d[:-1] + d[1:] - 2.0 * delta) / (h * h)
    return y[:-1], d[:-1], c2, c3


def hermite_eval(x: np.ndarray, y: np.ndarray, d: np.ndarray, at: np.ndarray | float) -> np.ndarray:
    """Value of the cubic Hermite interpolant with knot values y and slopes d at ``at``.

    Points outside [x_0, x_n] are extrapolated with the end cubics.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    t = np.asarray(at, dtype=np.float64)
    a0, a1, a2, a3 = _segment_coefficients(x, y, d)
    k = np.clip(np.searchsorted(x, t, side="right") - 1, 0, len(x) - 2)
    s = t - x[k]
    return a0[k] + s * (a1[k] + s * (a2[k] + s * a3[k]))


def hermite_integral(x: np.ndarray, y: np.ndarray, d: np.ndarray, lo: float, hi: float) -> float:
    """Exact ∫_lo^hi of the cubic Hermite interpolant, x_0 ≤ lo ≤ hi ≤ x_n.

    Each segment's cubic is integrated in closed form over its part of [lo, hi], so the
    result carries no quadrature error.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    if not x[0] - 1e-12 <= lo <= hi <= x[-1] + 1e-12:
        raise ValueError(f"[{lo}, {hi}] is not inside [{x[0]}, {x[-1]}]")
    a0, a1, a2, a3 = _segment_coefficients(x, y, d)
    start = np.clip(lo, x[:-1], x[1:]) - x[:-1]
    stop = np.clip(hi, x[:-1], x[1:]) - x[:-1]

    def antiderivative(s: np.ndarray) -> np.ndarray:
        return s * (a0 + s * (a1 / 2.0 + s * (a2 / 3.0 + s * a3 / 4.0)))

    return float(np.sum(antiderivative(stop) - antiderivative(start)))


def pareto_front(rates: Sequence[float], psnrs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The points of an RD curve not dominated by a cheaper one, by increasing rate.

    BD integrals need log-rate as a function of PSNR, so PSNR must rise strictly with
    rate. A setting that spends more bits for no more PSNR than a cheaper one (it happens
    at the ends of JPEG and WebP sweeps) is not on the codec's operational curve and is
    dropped. Non-finite values are dropped too.
    """
    r = np.asarray(rates, dtype=np.float64)
    p = np.asarray(psnrs, dtype=np.float64)
    keep = np.isfinite(r) & np.isfinite(p) & (r > 0)
    r, p = r[keep], p[keep]
    order = np.lexsort((-p, r))  # by rate, best PSNR first among equal rates
    front_r: list[float] = []
    front_p: list[float] = []
    for i in order:
        if not front_p or p[i] > front_p[-1]:
            if front_r and r[i] == front_r[-1]:
                continue
            front_r.append(float(r[i]))
            front_p.append(float(p[i]))
    return np.array(front_r), np.array(front_p)


@dataclass(frozen=True)
class BDResult:
    """BD-rate (percent), BD-PSNR (dB) and the ranges they were integrated over."""

    bd_rate: float  # % rate change of the test curve at equal PSNR; negative: fewer bits
    bd_psnr: float  # dB PSNR change of the test curve at equal rate; positive: better
    psnr_range: tuple[float, float] | None
    log_rate_range: tuple[float, float] | None
    note: str = ""


def rate_change(curve_rates: Sequence[float], curve_psnrs: Sequence[float], rate: float, psnr: float) -> float:
    """rate over what the curve needs for the same PSNR, minus 1 (pchip of log-rate over
    PSNR through the curve's Pareto points, as in :func:`bd_rate`); NaN outside the
    curve's PSNR range, where it would be extrapolation."""
    rates, x = pareto_front(curve_rates, curve_psnrs)
    if len(x) < 2 or not x[0] <= psnr <= x[-1]:
        return float("nan")
    y = np.log(rates)
    return float(rate / np.exp(hermite_eval(x, y, pchip_slopes(x, y), psnr)) - 1)


def bd_rate(ref_rates: Sequence[float], ref_psnrs: Sequence[float],
            test_rates: Sequence[float], test_psnrs: Sequence[float]) -> float:
    """Bjøntegaard delta rate of the test curve against the reference curve, in percent.

    G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves",
    ITU-T SG16/Q6 VCEG-M33, Austin, 2001: log-rate is interpolated as a function of PSNR
    for each curve, both are integrated over the PSNR range the two curves share, and the
    mean difference of the integrals gives the average rate ratio:

        BD-rate = exp( (∫ ln R_test − ∫ ln R_ref) / (PSNR_hi − PSNR_lo) ) − 1.

    The interpolant is the piecewise cubic Hermite (pchip) of :func:`pchip_slopes` rather
    than VCEG-M33's single cubic polynomial, the later practice (Bjøntegaard, VCEG-AL22,
    2008) that cannot oscillate between points. Points dominated on a curve are dropped
    (:func:`pareto_front`). Returns NaN when a curve has fewer than two points or the
    curves share no PSNR range. -10 means the test codec needs 10 % fewer bits.
    """
    return bd_metrics(ref_rates, ref_psnrs, test_rates, test_psnrs).bd_rate


def bd_psnr(ref_rates: Sequence[float], ref_psnrs: Sequence[float],
            test_rates: Sequence[float], test_psnrs: Sequence[float]) -> float:
    """Bjøntegaard delta PSNR (dB) of the test curve against the reference (VCEG-M33, 2001).

    PSNR is interpolated (pchip) as a function of log-rate over the shared log-rate range;
    positive means the test codec has higher PSNR at equal rate. NaN without overlap.
    """
    return bd_metrics(ref_rates, ref_psnrs, test_rates, test_psnrs).bd_psnr


def _mean_gap(x_ref: np.ndarray, y_ref: np.ndarray, x_test: np.ndarray, y_test: np.ndarray):
    """Mean of (test − ref) interpolants over the shared x range, and that range."""
    lo = max(x_ref[0], x_test[0])
    hi = min(x_ref[-1], x_test[-1])
    if not hi > lo:
        return math.nan, None
    ref = hermite_integral(x_ref, y_ref, pchip_slopes(x_ref, y_ref), lo, hi)
    test = hermite_integral(x_test, y_test, pchip_slopes(x_test, y_test), lo, hi)
    return (test - ref) / (hi - lo), (float(lo), float(hi))


def bd_metrics(ref_rates: Sequence[float], ref_psnrs: Sequence[float],
               test_rates: Sequence[float], test_psnrs: Sequence[float]) -> BDResult:
    """Both Bjøntegaard deltas (see :func:`bd_rate`, :func:`bd_psnr`) with their ranges."""
    ref_r, ref_p = pareto_front(ref_rates, ref_psnrs)
    test_r, test_p = pareto_front(test_rates, test_psnrs)
    if len(ref_r) < 2 or len(test_r) < 2:
        return BDResult(math.nan, math.nan, None, None, "needs two or more points on each curve")
    # Both fronts rise strictly in rate and PSNR, so either can be the abscissa.
    gap, psnr_range = _mean_gap(ref_p, np.log(ref_r), test_p, np.log(test_r))
    rate = math.expm1(gap) * 100.0 if psnr_range else math.nan
    gap_db, log_range = _mean_gap(np.log(ref_r), ref_p, np.log(test_r), test_p)
    note = "" if psnr_range else "the curves share no PSNR range"
    return BDResult(rate, gap_db, psnr_range, log_range, note)


# --------------------------------------------------------------------------- baselines

AVIF_SPEED = 6  # libavif's default effort: fair to AVIF, and about 0.4 s per Kodak image here


@dataclass(frozen=True)
class Baseline:
    name: str
    label: str
    feature: str  # PIL.features.check name
    params: tuple[float, ...]  # the RD sweep
    mid: float  # the setting used by --speed
    describe: str


BASELINES: dict[str, Baseline] = {
    "jpeg": Baseline("jpeg", "JPEG", "jpg", (2, 3, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95), 75,
                     "Pillow/libjpeg, quality sweep, 4:2:0, optimized Huffman tables"),
    "webp": Baseline("webp", "WebP", "webp", (0, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95), 75,
                     "Pillow/libwebp, method=6, quality sweep"),
    "jpeg2000": Baseline("jpeg2000", "JPEG 2000", "jpg_2000",
                         (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0), 1.0,
                         "Pillow/OpenJPEG, 9/7 irreversible wavelet, mct=1 (RGB→YCbCr), "
                         "one layer at a target rate (setting = target bpp)"),
    "avif": Baseline("avif", "AVIF", "avif", (10, 20, 30, 40, 50, 60, 70, 80, 90), 60,
                     f"Pillow/libavif, speed={AVIF_SPEED}, 4:2:0, quality sweep"),
}
CODEC_ALIASES = {"j2k": "jpeg2000", "jp2": "jpeg2000", "jpg": "jpeg", "jpeg-2000": "jpeg2000"}


def baseline_status(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(usable names, {name: why skipped}) for the baselines this Pillow can run."""
    from PIL import features

    usable, skipped = [], {}
    for name in names:
        feature = BASELINES[name].feature
        try:
            ok = bool(features.check(feature))
        except ValueError:  # a Pillow too old to know the feature at all
            ok = False
        if ok:
            usable.append(name)
        else:
            skipped[name] = f"this Pillow has no {feature} support (PIL.features.check({feature!r}) is False)"
    return usable, skipped


def setting_label(codec: str, param: float) -> str:
    """'q=4' for quality settings, '0.5 bpp' for JPEG 2000's target rates."""
    return f"{param:g} bpp" if codec == "jpeg2000" else f"q={param:g}"


def encode_baseline(codec: str, param: float, pixels: np.ndarray) -> bytes:
    """Bytes of a whole file of ``pixels`` (uint8 (H, W, 3|1)) in a baseline format."""
    from PIL import Image

    image = Image.fromarray(pixels[..., 0], "L") if pixels.shape[2] == 1 else Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    if codec == "jpeg":
        image.save(buffer, format="JPEG", quality=int(param), optimize=True)
    elif codec == "webp":
        image.save(buffer, format="WEBP", quality=int(param), method=6)
    elif codec == "jpeg2000":
        # Pillow's rates are compression ratios against the raw 8-bit samples.
        ratio = 8.0 * pixels.shape[2] / float(param)
        # mct=1: without the colour transform (Pillow's default) OpenJPEG codes R, G and B
        # independently, which costs 3-5 dB on photos (kodim01 at 1 bpp: 26.4 dB against
        # 30.8 dB with it); irreversible=True selects the 9/7 wavelet meant for lossy coding.
        image.save(buffer, format="JPEG2000", quality_mode="rates", quality_layers=[ratio],
                   irreversible=True, mct=1 if pixels.shape[2] == 3 else 0)
    elif codec == "avif":
        image.save(buffer, format="AVIF", quality=int(param), speed=AVIF_SPEED)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return buffer.getvalue()


def decode_baseline(data: bytes, channels: int) -> np.ndarray:
    """uint8 (H, W, channels) pixels of an encoded baseline file."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


# --------------------------------------------------------------------------- files, anchors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
KODAK_NAMES = frozenset(f"kodim{i:02d}.png" for i in range(1, 25))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix), sorted by name."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: p.name)


def looks_like_kodak(paths: Sequence[Path]) -> bool:
    """True for exactly the 24 files kodim01.png … kodim24.png."""
    return len(paths) == 24 and {p.name for p in paths} == KODAK_NAMES


def load_anchors() -> dict:
    """The published Kodak curves shipped in nic/anchors.json ({} if it is missing)."""
    from importlib.resources import files

    try:
        return json.loads(files("nic").joinpath("anchors.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, OSError):
        return {}


def load_nic_curve(path: Path) -> tuple[str, list[float], list[float]]:
    """(label, mean bpp, mean PSNR) of the nic curve in an earlier ``--json`` report, so
    two weights (say, before and after decoder fine-tuning) get a BD-rate."""
    import json

    try:
        report = json.loads(path.read_text())
        points = report["codecs"]["nic"]["points"]
        rates = [float(p["mean"]["bpp"]) for p in points]
        psnrs = [float(p["mean"]["psnr"]) for p in points]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a nic bench JSON report ({exc})") from None
    effort = report.get("effort", 1)
    return f"nic {report.get('weights', '?')}" + (f" effort {effort}" if effort != 1 else ""), rates, psnrs


def parse_qualities(text: str | None, available: int) -> list[float]:
    """'1,4,8', '2-5' or '3,3.5,4' (a quality between two trained ones) → sorted distinct
    qualities in 1..available (ints where whole); None → all."""
    if text is None or not text.strip():
        return list(range(1, available + 1))
    found: set[float] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(v) for v in part.split("-", 1))
                if first > last:
                    raise ValueError
                found.update(range(first, last + 1))
            else:
                value = float(part)
                found.add(int(value) if value == int(value) else value)
        except (ValueError, OverflowError):
            raise ValueError(f"-q: {part!r} is not a quality or a range like 2-5") from None
    bad = sorted(q for q in found if not 1 <= q <= available)
    if bad or not found:
        raise ValueError(f"-q: qualities must be in 1..{available}, got {text!r}")
    return sorted(found)


def parse_codecs(text: str | None) -> list[str]:
    """'jpeg,webp' → baseline names; '' or 'none' → no baselines."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    names: list[str] = []
    for part in text.split(","):
        name = CODEC_ALIASES.get(part.strip().lower(), part.strip().lower())
        if name not in BASELINES:
            raise ValueError(f"--codecs: unknown codec {part.strip()!r} (known: {', '.join(BASELINES)})")
        if name not in names:
            names.append(name)
    return names


# --------------------------------------------------------------------------- results

PSNR_CAP = 100.0
"""The PSNR an exactly decoded image counts as in a mean (its own is infinite): above any
lossy coding of 8-bit samples (one sample off by 1 in a 1,000-pixel RGB image is 69.5
dB), and finite, so that one lossless image (a screenshot the pixels family codes
exactly) leaves a curve's means and its BD-rate defined."""


@dataclass
class Point:
    """One setting of one codec: per-image figures and their means."""

    codec: str
    param: float
    setting: str
    images: list[dict] = field(default_factory=list)

    def mean(self, key: str) -> float:
        """The mean over the images; an image decoded exactly counts as PSNR_CAP dB."""
        values = [r[key] for r in self.images if r.get(key) is not None]
        if key == "psnr":
            values = [min(v, PSNR_CAP) for v in values]
        return float(np.mean(values)) if values else math.nan

    def summary(self) -> dict:
        return {k: self.mean(k) for k in ("bpp", "psnr", "ms_ssim", "enc_ms", "dec_ms")}


def round_trip(codec: str, param: float, pixels: np.ndarray, weights: str | None, effort: int = 1,
               family: str | None = None, precision: str = "auto") -> tuple[bytes, np.ndarray, float, float]:
    """(file bytes, decoded pixels, encode seconds, decode seconds) of one image.

    Both timings are in-process and start from pixels in memory (no file I/O, no PNG
    decoding), so nic and the Pillow codecs are timed the same way.
    """
    if codec == "nic":
        from .api import decode_pixels, encode_pixels

        start = time.perf_counter()
        data = encode_pixels(pixels, quality=param, weights=weights, effort=effort, family=family,
                             precision=precision)
        middle = time.perf_counter()
        out = decode_pixels(data, weights, precision=precision).pixels
    else:
        start = time.perf_counter()
        data = encode_baseline(codec, param, pixels)
        middle = time.perf_counter()
        out = decode_baseline(data, pixels.shape[2])
    return data, out, middle - start, time.perf_counter() - middle


def measure(codec: str, param: float, pixels: np.ndarray, weights: str | None, effort: int = 1,
            family: str | None = None, precision: str = "auto") -> dict:
    """Encode, decode and score one image at one setting (timings in milliseconds);
    ``family`` as for nic.api.encode_pixels (None: the default's choice)."""
    h, w, _ = pixels.shape
    data, out, enc, dec = round_trip(codec, param, pixels, weights, effort, family, precision)
    try:
        msssim: float | None = ms_ssim(pixels, out)
    except ValueError:  # under 16 px on a side: MS-SSIM is undefined
        msssim = None
    return {"bytes": len(data), "bpp": 8.0 * len(data) / (h * w), "psnr": psnr(pixels, out),
            "ms_ssim": msssim, "enc_ms": enc * 1e3, "dec_ms": dec * 1e3}


def json_safe(value):
    """JSON-safe copy: NaN and ±inf become null (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


# --------------------------------------------------------------------------- plot

PALETTE = {
    "nic": (214, 39, 40), "jpeg": (31, 119, 180), "webp": (44, 160, 44), "jpeg2000": (148, 103, 189),
    "avif": (255, 127, 14), "balle2017": (90, 90, 90), "bmshj2018-factorized": (23, 190, 207),
    "bmshj2018-hyperprior": (188, 189, 34),
}
EXTRA_COLOURS = [(140, 86, 75), (227, 119, 194), (127, 127, 127)]


@dataclass(frozen=True)
class Series:
    """One curve of the RD plot."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: tuple[int, int, int]
    dashed: bool = False
    width: int = 2


def nice_ticks(lo: float, hi: float, target: int = 8) -> list[float]:
    """Round, evenly spaced tick values (1, 2, 2.5 or 5 × 10^k apart), about ``target`` of them,
    from the last tick at or below ``lo`` to the first at or above ``hi``; the axis spans them."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(target, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def _fonts(sizes: Sequence[int]):
    """Fonts for the plot and whether text must be ASCII.

    DejaVu Sans where the system has it (full Latin coverage: "Ballé"); otherwise
    Pillow's built-in font, which lacks accented letters, with labels transliterated.
    """
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "Arial.ttf", "Helvetica.ttf"):
        try:
            return [ImageFont.truetype(name, size) for size in sizes], False
        except OSError:
            continue
    try:
        return [ImageFont.load_default(size=size) for size in sizes], True
    except TypeError:  # Pillow built without FreeType: one fixed bitmap size
        return [ImageFont.load_default() for _ in sizes], True


def _ascii(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _dashed_line(draw, points: list[tuple[float, float]], colour, width: int, dash: float = 10.0,
                 gap: float = 7.0) -> None:
    """A polyline drawn as dashes whose pattern runs on across the vertices."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            step = min(left, length - pos)
            if on:
                t0, t1 = pos / length, (pos + step) / length
                draw.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0),
                           (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)], fill=colour, width=width)
            pos += step
            left -= step
            if left <= 1e-9:
                on = not on
                left = dash if on else gap


def render_rd_plot(series: Sequence[Series], title: str, x_label: str = "bits per pixel (bpp)",
                   y_label: str = "PSNR RGB (dB)", size: tuple[int, int] = (1000, 700),
                   x_max: float | None = None):
    """A PSNR-vs-bpp chart as a Pillow RGB image: grid, ticks, labels, legend, one curve per series.

    The x axis runs from 0 to ``x_max`` (default: the largest rate of any series, padded);
    curves are clipped to the plot area. No I/O: the caller saves the image.
    """
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 78, 24, 52, 66
    pw, ph = width - left - right, height - top - bottom
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    (font, small, big), ascii_only = _fonts((15, 13, 19))

    def label(text: str) -> str:
        return _ascii(text) if ascii_only else text

    xs_all = [x for s in series for x in s.xs if math.isfinite(x)]
    if x_max is None:
        x_max = max(xs_all, default=1.0) * 1.05
    x_ticks = nice_ticks(0.0, x_max, 10)
    x_lo, x_hi = x_ticks[0], x_ticks[-1]
    ys_in = [y for s in series for x, y in zip(s.xs, s.ys) if math.isfinite(y) and x <= x_hi]
    y_lo, y_hi = (min(ys_in), max(ys_in)) if ys_in else (20.0, 40.0)
    pad = max((y_hi - y_lo) * 0.03, 0.3)
    y_ticks = nice_ticks(y_lo - pad, y_hi + pad, 9)
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        return ph - (y - y_lo) / (y_hi - y_lo) * ph

    # Grid, ticks and tick labels.
    for tx in x_ticks:
        gx = left + px(tx)
        draw.line([(gx, top), (gx, top + ph)], fill=(225, 225, 225))
        draw.line([(gx, top + ph), (gx, top + ph + 5)], fill="black")
        draw.text((gx, top + ph + 8), f"{tx:g}", fill="black", font=font, anchor="mt")
    for ty in y_ticks:
        gy = top + py(ty)
        draw.line([(left, gy), (left + pw, gy)], fill=(225, 225, 225))
        draw.line([(left - 5, gy), (left, gy)], fill="black")
        draw.text((left - 8, gy), f"{ty:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, left + pw, top + ph], outline="black", width=1)

    # Curves on their own layer, pasted inside the frame: that clips them to the axes.
    layer = Image.new("RGBA", (pw + 1, ph + 1), (0, 0, 0, 0))
    ldraw = ImageDraw.Draw(layer)
    for s in series:
        points = [(px(x), py(y)) for x, y in sorted(zip(s.xs, s.ys)) if math.isfinite(x) and math.isfinite(y)]
        if not points:
            continue
        if s.dashed:
            _dashed_line(ldraw, points, s.colour, s.width)
        elif len(points) > 1:
            ldraw.line(points, fill=s.colour, width=s.width, joint="curve")
        r = 3 if s.dashed else 4
        for x, y in points:
            if s.dashed:
                ldraw.rectangle([x - r, y - r, x + r, y + r], fill=s.colour)
            else:
                ldraw.ellipse([x - r, y - r, x + r, y + r], fill=s.colour, outline="white")
    image.paste(layer, (left, top), layer)

    # Title and axis labels (the y label rotated).
    draw.text((left + pw / 2, top / 2), label(title), fill="black", font=big, anchor="mm")
    draw.text((left + pw / 2, height - 18), label(x_label), fill="black", font=font, anchor="mm")
    box = draw.textbbox((0, 0), label(y_label), font=font)
    rotated = Image.new("RGBA", (box[2] + 4, box[3] + 4), (255, 255, 255, 0))
    ImageDraw.Draw(rotated).text((2, 2), label(y_label), fill="black", font=font)
    rotated = rotated.rotate(90, expand=True)
    image.paste(rotated, (10, int(top + ph / 2 - rotated.height / 2)), rotated)

    # Legend where it hides the least of the curves (a 9x9 grid of places), the lower
    # right first: rising, concave RD curves usually leave that corner empty.
    rows = [s for s in series if len(s.xs)]
    if rows:
        line_h = 22
        text_w = max(draw.textlength(label(s.label), font=small) for s in rows)
        box_w, box_h = int(text_w) + 62, line_h * len(rows) + 12
        # What the box would cover: each marker counts 10, each of 20 samples along
        # every drawn segment counts 1, so covering a curve's line also counts.
        weighted: list[tuple[float, float, int]] = []
        for s in rows:
            pts = [(left + px(x), top + py(y)) for x, y in sorted(zip(s.xs, s.ys))
                   if math.isfinite(x) and math.isfinite(y)]
            weighted += [(x, y, 10) for x, y in pts]
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                weighted += [(x0 + (x1 - x0) * t / 20, y0 + (y1 - y0) * t / 20, 1) for t in range(1, 20)]
        x_far, y_far = left + pw - box_w - 12, top + ph - box_h - 12

        def cost(corner: tuple[float, float]) -> float:
            cx, cy = corner
            covered = sum(w for x, y, w in weighted
                          if cx - 6 <= x <= cx + box_w + 6 and cy - 6 <= y <= cy + box_h + 6)
            # Among equally clear places, prefer the lower right corner.
            return covered + ((x_far - cx) + (y_far - cy)) / (pw + ph)

        grid = [(left + 12 + (x_far - left - 12) * i / 8, top + 12 + (y_far - top - 12) * j / 8)
                for i in range(9) for j in range(9)]
        bx, by = min(grid, key=cost)
        draw.rectangle([bx, by, bx + box_w, by + box_h], fill="white", outline=(150, 150, 150))
        for i, s in enumerate(rows):
            cy = by + 6 + line_h * i + line_h / 2
            if s.dashed:
                _dashed_line(draw, [(bx + 8, cy), (bx + 44, cy)], s.colour, s.width, dash=7, gap=4)
                draw.rectangle([bx + 23, cy - 3, bx + 29, cy + 3], fill=s.colour)
            else:
                draw.line([(bx + 8, cy), (bx + 44, cy)], fill=s.colour, width=s.width)
                draw.ellipse([bx + 22, cy - 4, bx + 30, cy + 4], fill=s.colour, outline="white")
            draw.text((bx + 52, cy), label(s.label), fill="black", font=small, anchor="lm")
    return image


# --------------------------------------------------------------------------- the hard-content set

HARD_QUALITIES = "4,8"
"""The qualities ``nic bench --hard`` measures unless told otherwise."""


def same_bytes(codec: str, pixels: np.ndarray, budget: int, keep: bool = False) -> dict | None:
    """{"bytes", "psnr"} (with ``keep`` also "data" and "setting") of a baseline codec's
    largest file of ``pixels`` not above ``budget`` bytes: JPEG 2000 by its own rate
    control (the rate lowered until the file fits), the others by a binary search over
    their quality 1..100. None if even the smallest is larger."""
    height, width, channels = pixels.shape
    found = None
    if budget < 1:
        return None
    if codec == "jpeg2000":
        rate = 8.0 * budget / (height * width)
        for _ in range(8):  # OpenJPEG lands within a few bytes of the rate, sometimes above
            data = encode_baseline(codec, rate, pixels)
            if len(data) <= budget:
                found = (data, setting_label(codec, rate))
                break
            rate *= 0.98 * budget / len(data)
    else:
        low, high = 1, 100
        while low <= high:
            middle = (low + high) // 2
            data = encode_baseline(codec, middle, pixels)
            if len(data) <= budget:
                found, low = (data, setting_label(codec, middle)), middle + 1
            else:
                high = middle - 1
    if found is None:
        return None
    result = {"bytes": len(found[0]), "psnr": psnr(pixels, decode_baseline(found[0], channels))}
    if keep:
        result.update(data=found[0], setting=found[1])
    return result


def ceiling_psnr(model, pixels: np.ndarray, quality: int) -> float | None:
    """PSNR of g_s(g_a(x)) without quantization: the best the transforms can do (None
    for a family without transforms)."""
    from .tiling import analysis_latents, reconstruct_tiled

    if families.name_of(model.config.model_id) in families.WEIGHTLESS:
        return None
    base = getattr(model, "base", model)  # a hyperprior model's transforms are its base's
    height, width = pixels.shape[:2]
    y = analysis_latents(base, pixels, quality)
    return psnr(pixels, reconstruct_tiled(base, y, quality, height, width, pixels.shape[2] == 1))


def run_hard(qualities: str | None, codecs: str | None, weights: str | None, family: str | None,
             names: list[str] | None = None, report=None, precision: str = "auto") -> list[dict]:
    """Measure the hard-content set (nic.hardset): per image and quality, nic's bytes, bpp
    and PSNR, the ceiling of its transforms, and each baseline's PSNR at nic's bytes.
    ``report(row)`` sees each row as it is measured."""
    from . import hardset
    from .api import decode_pixels, encode_pixels, is_gray
    from .container import parse_header
    from .families import name_of
    from .overlay import has_tiles
    from .weights import default_weights

    model, _ = default_weights(weights, family, coding=True)
    chosen = parse_qualities(qualities or HARD_QUALITIES, model.qualities)
    if any(q != int(q) for q in chosen):
        raise ValueError("-q: --hard measures the trained qualities only (whole numbers)")
    baselines, _ = baseline_status(parse_codecs(codecs))
    rows = []
    for name, pixels in hardset.generate(names).items():
        height, width = pixels.shape[:2]
        for quality in chosen:
            data = encode_pixels(pixels, quality, weights, family=family, precision=precision)
            decoded = decode_pixels(data, weights, precision=precision).pixels
            coded = name_of(parse_header(data).model_id) + (" + tiles" if has_tiles(data) else "")
            row = {"image": name, "quality": quality, "family": coded,
                   "bytes": len(data), "bpp": 8.0 * len(data) / (height * width),
                   "psnr": psnr(pixels, decoded), "ceiling": ceiling_psnr(model, pixels, quality)}
            # An all-gray image is one channel to the baselines too, as it is to nic (api.is_gray).
            plain = pixels[..., :1] if is_gray(pixels) else pixels
            for codec in baselines:
                found = same_bytes(codec, plain, len(data))
                row[codec] = None if found is None else found["psnr"]
            rows.append(row)
            if report is not None:
                report(row)
    return rows


def hard_table(rows: list[dict]) -> str:
    """The rows of :func:`run_hard` as a Markdown table (PSNR in dB; "-" where a baseline
    cannot get that small)."""
    codecs = [k for k in rows[0] if k not in ("image", "quality", "family", "bytes", "bpp", "psnr", "ceiling")] \
        if rows else []
    head = "| " + " | ".join(["image", "q", "coded as", "nic bpp", "nic PSNR", "ceiling"]
                            + [f"{c}, same bytes" for c in codecs]) + " |"
    lines = [head, "|---|---:|---|---:|---:|---:|" + "---:|" * len(codecs)]
    for row in rows:
        cells = [row["image"], str(row["quality"]), row["family"], f"{row['bpp']:.3f}", f"{row['psnr']:.2f}",
                 "-" if row["ceiling"] is None else f"{row['ceiling']:.2f}"]
        cells += ["-" if row[c] is None else f"{row[c]:.2f}" for c in codecs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


@dataclass
class BenchOptions:
    folder: Path
    qualities: str | None = None
    codecs: str | None = "jpeg,webp,jpeg2000,avif"
    json_out: str | None = None
    plot_out: str | None = None
    speed: bool = False
    weights: str | None = None
    limit: int | None = None
    compare: tuple[str, ...] = ()  # earlier `nic bench --json` files: their nic curves become references
    effort: int = 1  # nic's encoder effort (nic.quantization)
    family: str | None = None  # the model family of the installed weights (nic.families), without --weights
    precision: str = "auto"  # the transforms' arithmetic (nic.precision); the report records what ran


def _read(path: Path, warn: bool = True) -> np.ndarray:
    """Pixels of one image file by nic's input policy (nic.images); ValueError naming the
    file; its warnings (several frames) named by the file, or dropped without ``warn``
    (read again after a first read said them)."""
    import warnings

    from .images import ImageError, read_image

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            pixels = read_image(path.read_bytes())
        for warning in caught if warn else ():  # named by its file, as nic encode names its inputs'
            warnings.warn(type(warning.message)(f"{path}: {warning.message}"), stacklevel=2)
        return pixels
    except ImageError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


def _images(paths: Sequence[Path], sizes: list[dict]):
    """(name, pixels) one image at a time, so a large folder never sits in memory at once;
    appends each image's size to ``sizes`` for the report. The images were read once
    before (a check that each can be), which said their warnings."""
    for path in paths:
        pixels = _read(path, warn=False)
        sizes.append({"name": path.name, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
        yield path.name, pixels


def _warm_up(codecs: Sequence[tuple[str, float]], weights: str | None, effort: int = 1,
             family: str | None = None, precision: str = "auto") -> None:
    """One untimed round on a small image, so one-time setup (range-coder tables per
    quality, library initialisation, torch kernel selection) is not charged to image 1."""
    rng = np.random.default_rng(0)
    tiny = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for codec, param in codecs:
        measure(codec, param, tiny, weights, effort, family, precision)


def escape(text: str) -> str:
    """``text`` safe to show through rich markup (an image named 'a[b].png' stays as is)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    transient=False)


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if value is None or math.isnan(value) else "inf"
    return f"{value:.{digits}f}"


def run_command(opts: BenchOptions, out=None, err=None) -> dict:
    """The ``nic bench`` command: measure, print tables, write --json and --plot.

    ``out``/``err`` are rich consoles (stdout for tables, stderr for progress and
    notes). Raises ValueError (or nic's error types) for bad input; returns the report.
    """
    from rich.console import Console

    out = out or Console(highlight=False)
    err = err or Console(stderr=True, highlight=False)
    started = time.perf_counter()
    folder = Path(opts.folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    all_paths = list_images(folder)
    if not all_paths:
        raise ValueError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    kodak = looks_like_kodak(all_paths)
    paths = all_paths[: opts.limit] if opts.limit else all_paths
    for path in paths:  # an unreadable image stops the run now, not after the others' minutes
        _read(path)
    # As must a report to compare with that is not one: each read once (it may be a pipe).
    compared = {path: load_nic_curve(Path(path)) for path in opts.compare}
    baselines, skipped = baseline_status(parse_codecs(opts.codecs))
    for name, why in skipped.items():
        err.print(f"note: skipping {name}: {why}")

    from .weights import default_weights

    # torch's import is start-up cost too, but only measurable if nothing imported it yet.
    torch_ms: float | None = None
    if "torch" not in sys.modules:
        start = time.perf_counter()
        import torch  # noqa: F401

        torch_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    model, digest = default_weights(opts.weights, opts.family)
    load_ms = (time.perf_counter() - start) * 1e3
    from .precision import AUTO_PIXELS, bf16_units
    qualities = parse_qualities(opts.qualities, model.qualities)
    if opts.speed and opts.qualities is None:
        qualities = [(model.qualities + 1) // 2]  # a mid quality, like the baselines
    sizes: list[dict] = []  # filled as the images are read

    report = {
        "nic_version": _version(), "weights": digest.hex(), "model": model.config.name, "effort": opts.effort,
        "family": families.name_of(model.config.model_id),
        "folder": str(folder), "kodak": kodak, "images": sizes,
        "libraries": _library_versions(), "skipped": skipped,
        "model_load_ms": load_ms, "torch_import_ms": torch_ms,
        # What ran: "auto" is bf16 for images of AUTO_PIXELS or more on a CPU with bf16 units.
        "precision": opts.precision, "bf16_units": bf16_units(), "auto_pixels": AUTO_PIXELS,
    }
    if opts.speed:
        report.update(_run_speed(paths, sizes, qualities, baselines, opts, load_ms, torch_ms, out, err))
    else:
        report.update(_run_rd(paths, sizes, qualities, baselines, opts, kodak, len(all_paths), out, err, compared))
    report["elapsed_s"] = time.perf_counter() - started  # the whole command, model load included
    err.print(f"bench took {report['elapsed_s'] / 60:.1f} min")
    if opts.json_out:
        from .cli import write_output

        text = json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n"
        write_output(opts.json_out, text.encode())
        err.print(f"wrote {opts.json_out}")
    return report


def _version() -> str:
    from . import __version__

    return __version__


def _library_versions() -> dict:
    from PIL import __version__ as pillow, features

    versions = {"pillow": pillow}
    for name, feature in (("libjpeg", "jpg"), ("libwebp", "webp"), ("openjpeg", "jpg_2000"), ("libavif", "avif")):
        try:
            versions[name] = features.version(feature)
        except ValueError:
            versions[name] = None
    return versions


def _run_rd(paths: Sequence[Path], sizes: list[dict], qualities: list[int], baselines: list[str],
            opts: BenchOptions, kodak: bool, folder_count: int, out, err,
            compared: dict[str, tuple[str, list[float], list[float]]]) -> dict:
    """The RD sweep and its report; ``compared``: the curves of --compare's reports
    (load_nic_curve), by their names."""
    from rich.table import Table

    plan: list[tuple[str, float]] = [("nic", q) for q in qualities]
    for name in baselines:
        plan += [(name, p) for p in BASELINES[name].params]
    _warm_up([("nic", q) for q in qualities] + [(b, BASELINES[b].mid) for b in baselines], opts.weights,
             opts.effort, opts.family, opts.precision)
    points = {(codec, param): Point(codec, param, setting_label(codec, param)) for codec, param in plan}
    with _progress(err) as progress:
        task = progress.add_task("bench", total=len(paths) * len(plan))
        for name, pixels in _images(paths, sizes):
            for codec, param in plan:
                progress.update(task, description=f"{escape(name)} {codec} {setting_label(codec, param)}")
                record = measure(codec, param, pixels, opts.weights, opts.effort, opts.family, opts.precision)
                points[(codec, param)].images.append({"image": name, **record})
                progress.advance(task)

    codecs = ["nic"] + list(baselines)
    curves = {c: [points[k] for k in plan if k[0] == c] for c in codecs}

    table = Table(title=f"Rate-distortion on {Path(opts.folder).name}: mean over {len(paths)} image(s)")
    for col, justify in (("codec", "left"), ("setting", "left"), ("bpp", "right"), ("PSNR dB", "right"),
                         ("MS-SSIM", "right"), ("enc ms", "right"), ("dec ms", "right")):
        table.add_column(col, justify=justify)
    for codec in codecs:
        for i, point in enumerate(curves[codec]):
            m = point.summary()
            table.add_row(codec if i == 0 else "", point.setting, _fmt(m["bpp"], 4), _fmt(m["psnr"], 2),
                          _fmt(m["ms_ssim"], 4), _fmt(m["enc_ms"], 1), _fmt(m["dec_ms"], 1),
                          end_section=i == len(curves[codec]) - 1)
    out.print(table)

    nic_r = [p.mean("bpp") for p in curves["nic"]]
    nic_p = [p.mean("psnr") for p in curves["nic"]]
    # key → (table name, source, full label, rates, PSNRs)
    references: dict[str, tuple[str, str, str, list[float], list[float]]] = {}
    for codec in baselines:
        references[codec] = (BASELINES[codec].label, "this run", BASELINES[codec].label + " (this run)",
                             [p.mean("bpp") for p in curves[codec]], [p.mean("psnr") for p in curves[codec]])
    for path, (name, rates, psnrs) in compared.items():
        references[f"compare:{path}"] = (name, str(path), f"{name} ({path})", rates, psnrs)
    anchors = load_anchors().get("anchors", {}) if kodak else {}
    if kodak and not anchors:
        err.print("note: nic/anchors.json is missing; no published curves to compare with")
    for key, anchor in anchors.items():
        references[key] = (key, "published", anchor["label"] + " (published)", anchor["bpp"], anchor["psnr"])

    bd: dict[str, dict] = {}
    bd_table = Table(title="BD-rate of nic vs each reference (pchip; PSNR RGB)",
                     caption="negative BD-rate: nic needs fewer bits for the same PSNR")
    for col, justify in (("reference", "left"), ("source", "left"), ("BD-rate %", "right"),
                         ("BD-PSNR dB", "right"), ("PSNR range dB", "right")):
        bd_table.add_column(col, justify=justify)
    notes = []
    for key, (name, source, label, ref_r, ref_p) in references.items():
        result = bd_metrics(ref_r, ref_p, nic_r, nic_p)
        bd[key] = {"label": label, "bd_rate_percent": result.bd_rate, "bd_psnr_db": result.bd_psnr,
                   "psnr_range": result.psnr_range, "log_rate_range": result.log_rate_range,
                   "note": result.note}
        span = f"{result.psnr_range[0]:.2f}–{result.psnr_range[1]:.2f}" if result.psnr_range else "—"
        bd_table.add_row(name, source, _fmt(result.bd_rate, 2), _fmt(result.bd_psnr, 3), span)
        if result.note:
            notes.append(f"{name}: {result.note}")
    if references:
        out.print(bd_table)
    for note in dict.fromkeys(notes):
        err.print(f"note: BD-rate {note}")
    if anchors and len(paths) < folder_count:
        err.print(f"note: published curves average all 24 Kodak images; this run used {len(paths)}, "
                  "so their BD-rates are indicative only")

    if opts.plot_out:
        series = []
        for i, codec in enumerate(codecs):
            colour = PALETTE.get(codec, EXTRA_COLOURS[i % len(EXTRA_COLOURS)])
            label = "nic" if codec == "nic" else BASELINES[codec].label
            series.append(Series(label, [p.mean("bpp") for p in curves[codec]],
                                 [p.mean("psnr") for p in curves[codec]], colour,
                                 width=3 if codec == "nic" else 2))
        for key, anchor in anchors.items():
            series.append(Series(anchor["label"], anchor["bpp"], anchor["psnr"],
                                 PALETTE.get(key, (100, 100, 100)), dashed=True))
        nic_and_anchor_rates = [x for s in series if s.label == "nic" or s.dashed for x in s.xs
                                if math.isfinite(x)]
        # Zoom on the rates nic and the published curves cover (at least 0.1 to 2 bpp's
        # worth): a JPEG q=95 point at 4 bpp would otherwise squash every curve.
        x_max = max(max(nic_and_anchor_rates, default=1.0) * 1.08, 0.5)
        title = f"Rate-distortion on {Path(opts.folder).name or opts.folder} ({len(paths)} images)"
        png = io.BytesIO()
        render_rd_plot(series, title, x_max=x_max).save(png, format="PNG")
        from .cli import write_output

        write_output(opts.plot_out, png.getvalue())
        err.print(f"wrote {opts.plot_out}")

    report = {
        "mode": "rd", "ms_ssim_method": MS_SSIM_METHOD,
        "averaging": "each point is the mean over images of per-image bpp, PSNR and MS-SSIM",
        "codecs": {
            c: {"description": "nic, this build and weights" if c == "nic" else BASELINES[c].describe,
                "points": [{"setting": p.setting, "param": p.param, "mean": p.summary(), "images": p.images}
                           for p in curves[c]]}
            for c in codecs
        },
        "bd_rate": {"method": "Bjøntegaard VCEG-M33 (2001) with pchip interpolation of log-rate vs PSNR; "
                              "test = nic, negative = nic needs fewer bits", "against": bd},
    }
    if anchors:
        report["anchors"] = load_anchors()
    return report


def _run_speed(paths: Sequence[Path], sizes: list[dict], qualities: list[float], baselines: list[str],
               opts: BenchOptions, load_ms: float, torch_ms: float | None, out, err) -> dict:
    plan = [("nic", float(q)) for q in qualities]
    if opts.family is None and opts.weights is None:  # the default, beside the family it replaced, image by image
        plan += [(FACTORIZED_ROW, float(q)) for q in qualities if float(q).is_integer()]
    plan += [(b, float(BASELINES[b].mid)) for b in baselines]
    results = _timed(paths, sizes, plan, opts, err)
    rows = _speed_table(results, len(paths), out)
    ratios = _family_ratios(results, qualities)
    for q, (enc, dec) in ratios.items():
        out.print(f"{setting_label('nic', q)}: the default takes {enc:.2f}x the factorized family's time to encode "
                  f"and {dec:.2f}x to decode (median of the per-image ratios)")
    import torch

    torch_note = f", torch import {torch_ms:.0f} ms" if torch_ms is not None else ""
    out.print(f"nic model load (not in the timings above): weights {load_ms:.0f} ms{torch_note}; "
              f"torch threads: {torch.get_num_threads()}")
    return {"mode": "speed", "torch_threads": torch.get_num_threads(), "rows": rows,
            "default_over_factorized": {f"{q:g}": {"encode": enc, "decode": dec} for q, (enc, dec) in ratios.items()}}


def _timed(paths: Sequence[Path], sizes: list[dict], plan: list[tuple[str, float]], opts: BenchOptions,
           err) -> dict[tuple[str, float], list[dict]]:
    """Each (codec, setting) of ``plan``'s per-image records, image by image (every
    setting of one image before the next image)."""
    _warm_up([key for key in plan if key[0] != FACTORIZED_ROW], opts.weights, opts.effort, opts.family,
             opts.precision)
    _warm_up([("nic", q) for codec, q in plan if codec == FACTORIZED_ROW], None, opts.effort, "factorized",
             opts.precision)
    results: dict[tuple[str, float], list[dict]] = {key: [] for key in plan}
    with _progress(err) as progress:
        task = progress.add_task("speed", total=len(paths) * len(plan))
        for name, pixels in _images(paths, sizes):
            for codec, param in plan:
                progress.update(task, description=f"{escape(name)} {codec} {setting_label(codec, param)}")
                h, w, _ = pixels.shape
                if codec == FACTORIZED_ROW:  # the installed factorized weights
                    data, decoded, enc, dec = round_trip("nic", param, pixels, None, opts.effort, "factorized",
                                                         opts.precision)
                else:
                    data, decoded, enc, dec = round_trip(codec, param, pixels, opts.weights, opts.effort,
                                                         opts.family, opts.precision)
                results[(codec, param)].append({
                    "image": name, "megapixels": h * w / 1e6, "enc_ms": enc * 1e3, "dec_ms": dec * 1e3,
                    "bpp": 8.0 * len(data) / (h * w), "psnr": psnr(pixels, decoded)})
                progress.advance(task)
    return results


def _speed_table(results: dict[tuple[str, float], list[dict]], images: int, out) -> list[dict]:
    """The --speed report's rows (medians over images), printed as a table."""
    from rich.table import Table

    table = Table(title=f"Speed, median over {images} image(s) (model load excluded)")
    for col in ("codec", "setting", "enc ms", "dec ms", "enc MP/s", "dec MP/s", "bpp", "PSNR dB"):
        table.add_column(col, justify="left" if col in ("codec", "setting") else "right")
    rows = []
    for (codec, param), records in results.items():
        row = {
            "codec": codec, "setting": setting_label(codec, param), "param": param,
            "median_enc_ms": statistics.median(r["enc_ms"] for r in records),
            "median_dec_ms": statistics.median(r["dec_ms"] for r in records),
            # Per-image throughput, then the median: robust to one slow image.
            "enc_mpx_per_s": statistics.median(r["megapixels"] / (r["enc_ms"] / 1e3) for r in records),
            "dec_mpx_per_s": statistics.median(r["megapixels"] / (r["dec_ms"] / 1e3) for r in records),
            "mean_bpp": float(np.mean([r["bpp"] for r in records])),
            "mean_psnr": float(np.mean([r["psnr"] for r in records])),
            "images": records,
        }
        rows.append(row)
        table.add_row(codec, row["setting"], _fmt(row["median_enc_ms"], 1), _fmt(row["median_dec_ms"], 1),
                      _fmt(row["enc_mpx_per_s"], 2), _fmt(row["dec_mpx_per_s"], 2), _fmt(row["mean_bpp"], 3),
                      _fmt(row["mean_psnr"], 2))
    out.print(table)
    return rows


FACTORIZED_ROW = "factorized"
"""--speed's row of the installed factorized family, timed beside the installed default's on
each image at each trained quality (a quality between them is a step of the hyperprior
family's, but the quality below for the factorized family: not the same work)."""


def _family_ratios(results: dict, qualities: list[float]) -> dict[float, tuple[float, float]]:
    """Per quality, the median over images of the default's encode and decode time over
    the factorized family's on the same image (none where the factorized row was not run)."""
    ratios = {}
    for q in qualities:
        default, factorized = results.get(("nic", float(q))), results.get((FACTORIZED_ROW, float(q)))
        if default and factorized:
            ratios[float(q)] = tuple(statistics.median(a[key] / b[key] for a, b in zip(default, factorized))
                                     for key in ("enc_ms", "dec_ms"))
    return ratios
