"""``nic compare``: what nic's file looks like next to the other codecs' at the same size.

Each codec (nic and every baseline of ``nic bench``) codes the image at its largest
setting whose file is not above the byte budget; the sheet shows the same crop of the
original and of each decoded image, enlarged without smoothing, each labelled with the
codec, its exact bytes, bpp, PSNR and MS-SSIM. The crop is where the image has the most
detail (the window with the largest gradient energy) unless one is given.

Pixels in, pixels out: the CLI reads the image and writes the sheet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bench import _fonts, baseline_status, decode_baseline, ms_ssim, parse_codecs, psnr, same_bytes

LABEL_HEIGHT = 46
GAP = 8


@dataclass
class Panel:
    """One codec's decoded image and its figures (``data`` None for the original)."""

    name: str
    pixels: np.ndarray
    data: bytes | None
    setting: str = ""


def detailed_crop(pixels: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the window of at most width x height pixels with the most detail:
    the largest sum of absolute differences between neighbouring pixels, on a 8-pixel grid."""
    h, w = pixels.shape[:2]
    width, height = min(width, w), min(height, h)
    gray = pixels.astype(np.float64).mean(axis=2)
    energy = np.zeros((h, w))
    energy[:, 1:] += np.abs(np.diff(gray, axis=1))
    energy[1:, :] += np.abs(np.diff(gray, axis=0))
    table = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
    ys, xs = np.arange(0, h - height + 1, 8), np.arange(0, w - width + 1, 8)
    sums = (table[ys[:, None] + height, xs[None, :] + width] - table[ys[:, None], xs[None, :] + width]
            - table[ys[:, None] + height, xs[None, :]] + table[ys[:, None], xs[None, :]])
    row, col = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(xs[col]), int(ys[row]), width, height


def nic_at_most(pixels: np.ndarray, budget: int, weights: str | None, family: str | None) -> Panel:
    """nic's largest file not above ``budget`` bytes (its smallest if none fits)."""
    from .api import decode_pixels, encode_to_target

    data, quality = encode_to_target(pixels, budget, weights, family=family)
    return Panel("nic", decode_pixels(data, weights).pixels, data, f"q{quality:g}")


def baseline_at_most(codec: str, pixels: np.ndarray, budget: int) -> Panel | None:
    """A baseline codec's largest file not above ``budget`` bytes; None if none fits."""
    found = same_bytes(codec, pixels, budget, keep=True)
    if found is None:
        return None
    return Panel(codec, decode_baseline(found["data"], pixels.shape[2]), found["data"], found["setting"])


def panels(pixels: np.ndarray, budget: int, codecs: str | None, weights: str | None,
           family: str | None = None) -> tuple[list[Panel], list[str]]:
    """The original, nic and each baseline at the budget; and the codecs that could not
    get that small (or are not in this Pillow)."""
    result = [Panel("original", pixels, None), nic_at_most(pixels, budget, weights, family)]
    available, missing = baseline_status(parse_codecs(codecs))
    skipped = [f"{name} ({why})" for name, why in missing.items()]
    for codec in available:
        panel = baseline_at_most(codec, pixels, budget)
        if panel is None:
            skipped.append(f"{codec} (no file of {budget} bytes or fewer)")
        else:
            result.append(panel)
    return result, skipped


def label(panel: Panel, original: np.ndarray) -> list[str]:
    """Two lines: the codec and setting; bytes, bpp, PSNR and MS-SSIM."""
    if panel.data is None:
        return ["original", f"{original.shape[1]}x{original.shape[0]}"]
    pixels = original.shape[0] * original.shape[1]
    try:
        similarity = f"MS-SSIM {ms_ssim(original, panel.pixels):.4f}"
    except ValueError:  # under 16 px a side
        similarity = "MS-SSIM n/a"
    return [f"{panel.name} {panel.setting}".strip(),
            f"{len(panel.data):,} B  {8 * len(panel.data) / pixels:.3f} bpp  "
            f"{psnr(original, panel.pixels):.2f} dB  {similarity}"]


def sheet_size(count: int, crop: tuple[int, int, int, int], scale: int, columns: int = 3) -> tuple[int, int]:
    """(width, height) of :func:`sheet`'s image of ``count`` panels."""
    cell_w, cell_h = crop[2] * scale, crop[3] * scale + LABEL_HEIGHT
    columns = min(columns, count)
    rows = -(-count // columns)
    return columns * cell_w + (columns + 1) * GAP, rows * cell_h + (rows + 1) * GAP


def sheet(panels: list[Panel], crop: tuple[int, int, int, int], scale: int, columns: int = 3,
          labels: list[list[str]] | None = None):
    """A Pillow RGB image: each panel's crop enlarged ``scale`` times (nearest neighbour),
    with its label under it (``labels``, or :func:`label` of each), ``columns`` panels a row."""
    from PIL import Image, ImageDraw

    x, y, w, h = crop
    original = panels[0].pixels
    labels = labels or [label(panel, original) for panel in panels]
    (font,), _ = _fonts([15])
    cell_w, cell_h = w * scale, h * scale + LABEL_HEIGHT
    image = Image.new("RGB", sheet_size(len(panels), crop, scale, columns), "white")
    columns = min(columns, len(panels))
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(panels):
        left = GAP + (i % columns) * (cell_w + GAP)
        top = GAP + (i // columns) * (cell_h + GAP)
        part = panel.pixels[y:y + h, x:x + w]
        tile = Image.fromarray(part[..., 0] if part.shape[2] == 1 else part).convert("RGB")
        image.paste(tile.resize((w * scale, h * scale), Image.Resampling.NEAREST), (left, top))
        for line, text in enumerate(labels[i]):
            draw.text((left + 2, top + h * scale + 4 + 20 * line), text, fill="black", font=font)
    return image
