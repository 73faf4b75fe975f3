"""``nic bench DIR --report OUT``: one folder a person can open, no server needed.

OUT holds the RD plot (``rd.png``), the whole report (``report.json``), a sheet of two
or three of the images at a low, a middle and a high rate (``nic compare``'s, one
image per rate), and ``index.html``, which shows them with the BD-rate table and each
codec's mean points. This module makes the pieces (HTML text, sheet images); the CLI
writes the files.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

RATES = (0.25, 0.5, 1.0)
"""Bits per pixel of the sheets: low, middle, high."""


def sheet_images(paths: list[Path]) -> list[Path]:
    """Up to three of the images, spread over the folder (first, middle, last)."""
    if len(paths) <= 3:
        return list(paths)
    return [paths[0], paths[len(paths) // 2], paths[-1]]


def sheets(paths: list[Path], read, codecs: str | None, weights: str | None, family: str | None) -> list[dict]:
    """[{"image", "bpp", "png": the sheet as PNG bytes, "shown": [labels]}], image i at
    RATES[i]; ``read(path)`` gives an image's pixels."""
    import io

    from .compare import detailed_crop, label, panels, sheet

    result = []
    for path, rate in zip(sheet_images(paths), RATES):
        pixels: np.ndarray = read(path)
        budget = int(rate * pixels.shape[0] * pixels.shape[1] / 8)
        shown, skipped = panels(pixels, budget, codecs, weights, family)
        labels = [label(p, pixels) for p in shown]  # MS-SSIM once per panel, for the sheet and the page
        buffer = io.BytesIO()
        sheet(shown, detailed_crop(pixels, 192, 128), 2, labels=labels).save(buffer, format="PNG")
        result.append({"image": path.name, "bpp": rate, "png": buffer.getvalue(),
                       "shown": [" ".join(lines) for lines in labels[1:]], "skipped": skipped})
    return result


def sheet_name(entry: dict) -> str:
    return f"sheet-{Path(entry['image']).stem}-{entry['bpp']:g}bpp.png"


def index_html(report: dict, entries: list[dict], command: str) -> str:
    """The page: the command, the RD plot, the BD-rate table, the mean points, the sheets."""
    e = html.escape
    parts = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>nic bench report</title>',
             "<style>body{font-family:sans-serif;max-width:1250px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
             "</style></head><body>",
             f"<h1>nic bench: {e(str(report.get('folder', '')))}</h1>",
             f"<p>Weights <code>{e(str(report.get('weights', '')))}</code> ({e(str(report.get('model', '')))}), "
             f"effort {e(str(report.get('effort', '')))}, nic {e(str(report.get('nic_version', '')))}. "
             f"Measured by <code>{e(command)}</code>; every number is in <a href=\"report.json\">report.json</a>.</p>",
             '<h2>Rate and distortion</h2><img src="rd.png" alt="PSNR against bpp" width="900">']
    against = report.get("bd_rate", {}).get("against", {})
    if against:
        parts.append("<h2>BD-rate of nic against each reference</h2><p>Negative: nic needs fewer bits for the "
                     "same PSNR.</p><table><tr><th>reference</th><th>BD-rate</th><th>BD-PSNR</th></tr>")
        for entry in against.values():
            rate, gain = entry.get("bd_rate_percent"), entry.get("bd_psnr_db")
            parts.append(f"<tr><td>{e(entry.get('label', ''))}</td><td>{_number(rate, '{:+.1f} %')}</td>"
                         f"<td>{_number(gain, '{:+.2f} dB')}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Mean over the images</h2><table><tr><th>codec</th><th>setting</th><th>bpp</th>"
                 "<th>PSNR (dB)</th><th>MS-SSIM</th></tr>")
    for codec, entry in report.get("codecs", {}).items():
        for point in entry.get("points", []):
            mean = point.get("mean", {})
            parts.append(f"<tr><td>{e(codec)}</td><td>{e(str(point.get('setting', '')))}</td>"
                         f"<td>{_number(mean.get('bpp'), '{:.4f}')}</td><td>{_number(mean.get('psnr'), '{:.2f}')}</td>"
                         f"<td>{_number(mean.get('ms_ssim'), '{:.4f}')}</td></tr>")
    parts.append("</table><h2>What the files look like</h2>")
    for entry in entries:
        parts.append(f"<h3>{e(entry['image'])} at {entry['bpp']:g} bpp</h3>"
                     f"<p>Each codec at its largest file of at most {entry['bpp']:g} bpp; the most detailed crop, "
                     f"enlarged twice without smoothing.</p><img src=\"{e(sheet_name(entry))}\" alt=\"sheet\">"
                     "<ul>" + "".join(f"<li>{e(line)}</li>" for line in entry["shown"] + entry["skipped"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _number(value, form: str) -> str:
    return "–" if value is None else form.format(value)
