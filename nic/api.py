"""nic as a library: pixels or Pillow images in, .nic bytes out, and back.

    >>> import nic
    >>> data = nic.encode(Image.open("photo.png"), quality=4)
    >>> image = nic.decode(data)

This is where the pieces meet: the weights (:mod:`nic.weights`) name a model family
(:mod:`nic.families`: :mod:`nic.factorized`, :mod:`nic.hyperprior`, and
:mod:`nic.pixels`, which has none), whose module turns pixels into substreams and back,
and :mod:`nic.container` packs those into a file. Nothing here knows how a family codes.
Without a family the encoder codes with the default one, then tries the pixels family
(and pixel tiles over the model's image) and keeps whichever file is worth its bits
(:func:`_worth`). The model is loaded
once per process and per weights file.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # Pillow is imported where it is used, not with this module
    from numpy.typing import NDArray
    from PIL import Image

    from .tiling import PixelRows, Progress

from . import container
from .container import COLOUR_GRAY, COLOUR_RGB, FormatError, Header
from .tiling import squared_error


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (H, W, 3) or (H, W, 1)
    header: Header
    latents: np.ndarray  # int64 (C, rows, cols): the integers of the last substream, as decoded
    icc_profile: bytes | None = None
    exif: bytes | None = None


RowSink = Callable[[np.ndarray], None]


def _family(model):
    from .families import family

    return family(model.config.model_id)


def _has_steps(module) -> bool:
    """Whether a family codes qualities between its trained ones with a step (its
    ``step_for``), asked without importing its torch twin."""
    from .families import defines

    return defines(module, "step_for")


def _check_metadata(icc_profile, exif) -> None:
    """TypeError for an ICC profile or EXIF block that is not bytes (``bytes(5)`` would
    store five zeros)."""
    for name, value in (("icc_profile", icc_profile), ("exif", exif)):
        if value is not None and not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name} must be bytes, got {type(value).__name__}")


def _check_dimensions(width: int, height: int) -> None:
    if height < 1 or width < 1:
        raise ValueError("image has no pixels")
    if width > 0xFFFFFFFF or height > 0xFFFFFFFF or -(-height // 16) > 0xFFFF or -(-width // 16) > 0xFFFF:
        raise ValueError(f"image of {width}x{height} is larger than the format allows")


def _file_parts(model, digest: bytes, quality: int, channels: int, width: int, height: int,
                substreams: list, icc_profile: bytes | None, exif: bytes | None, gray_rgb: bool = False,
                step: tuple[int, int] | None = None) -> list:
    """The file's buffers. ``gray_rgb``: an RGB source whose pixels were all gray is stored
    as grayscale (its latents are the same: g_a sees a gray image's one channel three
    times) and marked to decode to RGB, so no colour fringes come back."""
    version = _family(model).FORMAT_VERSION
    payload = container.pack_substreams(substreams) if version != container.VERSION else [substreams[0].data]
    header = Header(
        model_id=model.config.model_id, quality=quality,
        colour=COLOUR_GRAY if channels == 1 or gray_rgb else COLOUR_RGB,
        width=width, height=height, weights_hash=digest,
        latent_shape=tuple(substreams[-1].shape), version=version,
        payload_length=sum(memoryview(part).nbytes for part in payload),
    )
    sections = []
    if step is not None and step != container.UNIT_STEP:  # critical: a reader without it must refuse the file
        sections.append((container.SECTION_STEP, container.pack_step(*step)))
    if icc_profile:
        sections.append((container.SECTION_ICC, bytes(icc_profile)))
    if exif:
        sections.append((container.SECTION_EXIF, bytes(exif)))
    if gray_rgb and channels == 3:
        sections.append((container.SECTION_GRAY_RGB, b""))
    return container.pack_parts(header, payload, sections)


def is_gray(pixels: np.ndarray) -> bool:
    """Whether uint8 pixels (..., 3) have R = G = B everywhere."""
    return bool(np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))


class _GrayWatch:
    """PixelRows that pass a source's rows through and note whether all were gray."""

    def __init__(self, source: PixelRows):
        self.source, self.gray = source, source.channels == 3
        self.width, self.height, self.channels = source.width, source.height, source.channels

    def read(self, count: int) -> np.ndarray:
        rows = self.source.read(count)
        if self.gray:
            self.gray = is_gray(rows)
        return rows


def default_quality(weights: str | Path | None = None, family: str | None = None) -> int:
    """The quality ``nic encode`` uses when none is given: 4, the middle of the shipped
    1..8, or the weights' highest quality when they have fewer (a one-rate model)."""
    from .weights import default_weights

    model, _ = default_weights(weights, family, coding=True)
    return min(4, model.qualities)


def _model(weights: str | Path | None, family: str | None, quality: float, precision: str = "auto",
           pixels: int = 0):
    """(model, weights hash, the trained quality that codes, the family's step or None):
    a quality between two trained ones is coded by the upper one's networks with a
    coarser step where the family has steps (nic.hyperprior.step_for), else by the
    trained quality below it. The model runs its transforms at ``precision`` for an
    image of ``pixels`` pixels (:func:`at_precision`)."""
    from .weights import default_weights

    model, digest = default_weights(weights, family, coding=True)
    model = at_precision(model, precision, pixels)
    if not 1 <= quality <= model.qualities:
        raise ValueError(f"quality must be 1..{model.qualities}, got {quality:g}")
    module = _family(model)
    if quality == int(quality) or not _has_steps(module):
        return model, digest, int(quality), None
    coded, step = module.step_for(quality, digest)
    return model, digest, coded, step


def at_precision(model, precision: str, pixels: int):
    """``model`` with g_a and g_s in ``precision`` ("auto", "fp32" or "bf16";
    nic.precision.choose decides "auto" for an image of ``pixels`` pixels). A family
    without transforms (the pixels family) is returned as it is."""
    from .precision import choose

    chosen = choose(precision, pixels)
    return model.at_precision(chosen) if hasattr(model, "at_precision") else model


def encode_pixels(pixels: np.ndarray, quality: float = 4, weights: str | Path | None = None,
                  icc_profile: bytes | None = None, exif: bytes | None = None, effort: int = 1,
                  progress: Progress | None = None, family: str | None = None, precision: str = "auto") -> bytes:
    """.nic bytes of uint8 pixels of shape (H, W, 3) or (H, W, 1), with optional
    metadata carried verbatim in ancillary sections (an ICC profile only where it
    describes pixels of their channels: nic.container.profile_for). ``effort`` 1..4 is the encoder's
    quantization search (1: rounding; see nic.quantization) and the pixels family's LZMA2
    preset (nic.pixels.EFFORT_PRESETS); any effort decodes the same way. ``family``
    (nic.families) picks the installed weights of that model family; without it, the
    default family's file or the pixels family's (or the model's with pixel tiles over
    it), whichever is worth its bits (:func:`_worth`). ``quality`` may lie between the
    trained ones (3.5): the hyperprior family codes it with a coarser step (effort 1), the
    factorized family at the quality below. ``precision`` is the transforms' arithmetic (nic.precision: "auto",
    "fp32" or "bf16"); every precision's files decode everywhere."""
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError("pixels must be uint8 of shape (H, W, 3) or (H, W, 1)")
    if isinstance(effort, bool) or not isinstance(effort, numbers.Real):
        raise TypeError(f"effort must be an integer 1..4, got {effort!r}")
    if not (float(effort).is_integer() and 1 <= effort <= 4):
        raise ValueError(f"effort must be an integer 1..4, got {effort!r}")
    effort = int(effort)
    _check_metadata(icc_profile, exif)
    height, width = pixels.shape[:2]
    _check_dimensions(width, height)
    icc_profile = container.profile_for(icc_profile, pixels.shape[2])
    requested = quality
    model, digest, quality, step = _model(weights, family, quality, precision, height * width)
    # Not with an ICC profile: a reader that skips gRGB would write it beside one channel.
    gray_rgb = pixels.shape[2] == 3 and not icc_profile and is_gray(pixels)
    if gray_rgb:
        pixels = pixels[..., :1]
    extra = {} if step is None else {"step": step}
    y_hat: list = []  # the default's later tries synthesize the model's file from its ŷ, not decode it
    if family is None and _synthesizes(model, pixels):
        extra["on_y_hat"] = y_hat.append
    substreams = _family(model).compress(model, pixels, quality, effort, progress, **extra)
    channels = 3 if gray_rgb else pixels.shape[2]
    data = b"".join(_file_parts(model, digest, quality, channels, width, height,
                                substreams, icc_profile, exif, gray_rgb, step))
    if family is None:
        kept = data
        rows = (_synthesized(model, y_hat[0], quality, pixels) if y_hat else
                lambda sink: decode_rows(kept, lambda header, icc, exif: sink, weights,
                                         precision=getattr(model, "precision", "fp32")))
        weight = _lambda(_lambdas(model), requested) / pixels.shape[2]
        model_error = _Error(rows, pixels)
        data = _or_pixels(pixels, data, quality, channels, gray_rgb, icc_profile, exif, model_error, weight, effort)
        if data is kept:
            data = _or_overlay(pixels, data, model, digest, quality, step, channels, gray_rgb, icc_profile, exif,
                               rows, model_error, weight, y_hat[0] if y_hat else None)
            if data is not kept:  # an overlay: text or line art; the exact file may be smaller still
                data = _or_exact(pixels, data, quality, channels, gray_rgb, icc_profile, exif, effort)
    return data


Rows = Callable[[Callable[[np.ndarray], None]], None]
"""rows(sink): hands ``sink`` a file's decoded pixel rows, strip by strip, top to bottom."""


class _Error:
    """The squared error of a file's decoded ``rows`` against ``pixels``, computed when
    first asked (a decode of the whole file), once for the default's tries."""

    def __init__(self, rows: Rows, pixels: np.ndarray):
        self._rows, self._pixels, self._value = rows, pixels, None

    def __call__(self) -> int:
        if self._value is None:
            self._value = squared_error(self._rows, self._pixels)
        return self._value

    def known(self, decoded: np.ndarray) -> None:
        """The whole file's decoded pixels, where a try made them anyway."""
        self._value = int(np.sum((decoded.astype(np.int64) - self._pixels) ** 2))


def _synthesizes(model, pixels: np.ndarray) -> bool:
    """Whether the default's later tries will want the model's file decoded: the model
    can hand back ŷ (the hyperprior family), and the image is one the pixels family
    and the overlay look at."""
    from .pixels import MAX_PIXELS

    return _family(model).NAME == "hyperprior" and pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS


def _synthesized(model, y_hat, quality: int, pixels: np.ndarray, paste=None) -> Rows:
    """The rows of a hyperprior file from the ŷ its encoder handed back: the synthesis the
    decoder runs after its entropy decoding (the same pixels, without that work); with
    ``paste`` (nic.overlay.paster's arguments) an overlay's tiles pasted over them."""
    from .tiling import reconstruct_into

    height, width = pixels.shape[:2]

    def rows(sink: Callable[[np.ndarray], None]) -> None:
        if paste is not None:
            from . import overlay

            sink = overlay.paster(sink, *paste)
        reconstruct_into(model.base, y_hat, quality, height, width, pixels.shape[2] == 1, sink)

    return rows


GROWTH = 1.5
SLOPE = 4.0
"""The default's other tries (the pixels family's file, an overlay: nic.overlay) replace
the model's file where their J = bits + λ·SSE/channels is lower, and where they are
larger, at most GROWTH times as large and better by at least SLOPE dB per doubling of
the size: what a quality step buys on photos (Kodak: q4 → q6 doubles the bits for
3.8 dB), so that it is worth more than asking the model for more quality."""


def _coded_bits(data: bytes) -> float:
    """Bits of a file without its sections (metadata, STEP): what :func:`_worth` compares."""
    return 8.0 * (container.parse_header(data).payload_length + container.HEADER_SIZE + 4)


def _worth(bits: float, error: int, model_bits: float, model_error: int, weight: float) -> bool:
    """Whether a file of ``bits`` and squared ``error`` beats the model's by :data:`GROWTH`
    and :data:`SLOPE`'s rule (``weight``: λ/channels)."""
    if bits > model_bits:
        gain = 10 * np.log10(max(model_error, 1) / max(error, 1))  # dB
        if bits > GROWTH * model_bits or gain < SLOPE * np.log2(bits / model_bits):
            return False
    return bits + weight * error < model_bits + weight * model_error


def _or_overlay(pixels: np.ndarray, data: bytes, model, digest: bytes, quality: int, step, channels: int,
                gray_rgb: bool, icc_profile: bytes | None, exif: bytes | None, rows: Rows,
                model_error: _Error, weight: float, y_hat=None) -> bytes:
    """The default's third try, where the model's file is kept: the same model with pixel
    tiles over the tiles it reconstructs worst (nic.overlay), where :func:`_worth` says so
    (``weight``: λ/channels of the requested quality). ``rows``: the model's file decoded,
    ``model_error`` their squared error, ``y_hat`` its latents (the candidate tiles' pixels
    are synthesized from them: :func:`_candidate_pixels`). The overlay's model
    part is coded at effort 1 whatever the effort of ``data``: a second search would
    double a slow encode."""
    from . import overlay

    if not _synthesizes(model, pixels) or y_hat is None:
        return data
    looked = overlay.candidates(pixels)
    if not looked.any():
        return data
    candidate_pixels = _candidate_pixels(model, y_hat, quality, pixels, looked, model_error)
    choice = overlay.choose(pixels, candidate_pixels, looked, weight)
    if choice is None:
        return data
    y_hat_overlay: list = []
    other = _overlay_file(pixels, choice, model, digest, quality, step, channels, gray_rgb, icc_profile, exif,
                          y_hat_overlay.append, weight)
    bits, model_bits = _coded_bits(other), _coded_bits(data)
    if bits > GROWTH * model_bits:
        return data
    # The overlay file's rows as its decoder makes them: its tiles decoded, pasted over
    # the synthesis of its model part.
    tile_map, packed = overlay.decode(container.unpack(other).substreams()[:len(overlay.NAMES)], *pixels.shape[:2],
                                      pixels.shape[2] == 1)
    error = squared_error(_synthesized(model, y_hat_overlay[0], quality, pixels, (packed, tile_map)), pixels)
    return other if _worth(bits, error, model_bits, model_error(), weight) else data


def _candidate_pixels(model, y_hat, quality: int, pixels: np.ndarray, looked: np.ndarray,
                      model_error: _Error) -> np.ndarray:
    """The model's decoded pixels where nic.overlay.choose reads them, the ``looked`` tiles
    (zero elsewhere): each run of rows of tiles with candidates, from its first candidate
    column to its last, synthesized from the latents that reach it
    (nic.tiling.reconstruct_window; a photo with one caption-like tile paid a whole g_s
    for it); the whole image, one window, where the windows and their halos would cover
    half of it or more (its error then goes to ``model_error``)."""
    from .overlay import TILE
    from .tiling import DOWNSAMPLING, reconstruct_window, synthesis_halo

    height, width, planes = pixels.shape
    halo = sum(synthesis_halo(model.base.transforms(quality)[1])) * DOWNSAMPLING
    windows = []
    with_candidates = np.flatnonzero(looked.any(axis=1))
    for run in np.split(with_candidates, np.flatnonzero(np.diff(with_candidates) > 1) + 1):
        columns = np.flatnonzero(looked[run].any(axis=0))
        windows.append((run[0] * TILE, min(height, (run[-1] + 1) * TILE),
                        columns[0] * TILE, min(width, (columns[-1] + 1) * TILE)))
    whole = sum((r1 - r0 + halo) * (c1 - c0 + halo) for r0, r1, c0, c1 in windows) >= height * width / 2
    if whole:
        windows = [(0, height, 0, width)]
    out = np.zeros_like(pixels)
    for r0, r1, c0, c1 in windows:
        out[r0:r1, c0:c1] = reconstruct_window(model.base, y_hat, quality, planes == 1, r0, r1, c0, c1)
    if whole:
        model_error.known(out)
    return out


def _lambdas(model) -> list[float]:
    """The λ of each trained quality of a model (the hyperprior family's are its transforms')."""
    return getattr(model, "base", model).config.lambdas


def _lambda(lambdas, quality: float) -> float:
    """λ of a quality, geometric between the trained ones around it."""
    upper = int(np.ceil(quality))
    if upper == quality or upper < 2:
        return lambdas[upper - 1]
    above = quality - (upper - 1)
    return lambdas[upper - 2] ** (1 - above) * lambdas[upper - 1] ** above


def _overlay_file(pixels: np.ndarray, choice, model, digest: bytes, quality: int, step, channels: int,
                  gray_rgb: bool = False, icc_profile: bytes | None = None, exif: bytes | None = None,
                  on_y_hat: Callable | None = None, weight: float | None = None) -> bytes:
    """A hyperprior file with an overlay (nic.overlay.Choice): the model codes the image with
    the overlay's tiles flattened (at effort 1), the pixels family the tiles (in the coding
    of least rate + ``weight``·distortion where given: nic.overlay.encode). ``on_y_hat``
    is handed the model part's ŷ (nic.hyperprior.compress)."""
    from . import overlay

    height, width = pixels.shape[:2]
    extra = {} if step is None else {"step": step}
    if on_y_hat is not None:
        extra["on_y_hat"] = on_y_hat
    substreams = _family(model).compress(model, overlay.flattened(pixels, choice.tiles), quality, 1, None, **extra)
    return b"".join(_file_parts(model, digest, quality, channels, width, height,
                                overlay.encode(pixels, choice, weight) + substreams, icc_profile, exif, gray_rgb,
                                step))


CODER_SLACK = 32
PIXELS_OVERHEAD = container.HEADER_SIZE + 4 + 4 + 2 * 16 + 4 + CODER_SLACK
"""Bytes of a pixels file beyond its coded indices and tables: header, payload CRC,
substream directory, padding, and CODER_SLACK, a margin for the range coder's last words
(the scan's code length is an estimate within ~25 bytes; a dictionary coding's, LZMA2's
output, is exact and needs none)."""


def _or_pixels(pixels: np.ndarray, data: bytes, quality: int, channels: int, gray_rgb: bool,
               icc_profile: bytes | None, exif: bytes | None, model_error: Callable[[], int], weight: float,
               effort: int = 1) -> bytes:
    """The default's second try: the ``pixels`` family's file (nic.pixels) instead of the
    model's ``data`` (decoded, the squared error ``model_error()``) where it is worth it (text, line art,
    screenshots, flat colour): exact and no larger, or of lower J by :func:`_worth`'s
    rule (``weight``: λ/channels of the requested quality); else ``data``. The pixel step
    of ``quality`` (nic.pixels.step_of; the quality whose networks coded ``data``, so 3.5
    takes 4's) tells the search whether lossy dictionary codings are worth a try. Above
    effort 1 every step of the search's ladder is priced (nic.pixels.cheapest's
    ``exhaustive``), and a dictionary coding, once chosen, is compressed again with the
    effort's stronger preset (nic.pixels.stronger)."""
    from . import pixels as family_pixels

    model_bits = _coded_bits(data)

    def kept(bits: float, squared: int) -> bool:  # exact and no larger: no need to decode the model's
        return (squared == 0 and bits <= model_bits) or _worth(bits, squared, model_bits, model_error(), weight)

    def cost(found) -> float | None:
        slack = 0 if found.predictor in family_pixels.DICTIONARIES else CODER_SLACK  # LZMA2's size is exact
        bits = found.bits() + 8.0 * (PIXELS_OVERHEAD - CODER_SLACK + slack)
        return bits + weight * found.squared_error if kept(bits, found.squared_error) else None

    quality = min(quality, family_pixels.MODEL.qualities)  # the step's hint: the step itself is in the file
    found = family_pixels.cheapest(pixels, model_bits - 8.0 * PIXELS_OVERHEAD,
                                   GROWTH * model_bits - 8.0 * PIXELS_OVERHEAD, cost, family_pixels.step_of(quality),
                                   exhaustive=effort > 1)
    if found is None:
        return data
    other = _pixels_file(found, pixels, quality, channels, gray_rgb, icc_profile, exif, effort)
    return other if kept(_coded_bits(other), found.squared_error) else data


def _pixels_file(found, pixels: np.ndarray, quality: float, channels: int, gray_rgb: bool,
                 icc_profile: bytes | None, exif: bytes | None, effort: int) -> bytes:
    """The pixels family's file of a trial (nic.pixels), its dictionary coding compressed
    again with ``effort``'s preset where that is stronger (nic.pixels.stronger)."""
    from . import pixels as family_pixels

    height, width = pixels.shape[:2]
    model = family_pixels.MODEL
    found = family_pixels.stronger(found, pixels, effort)
    return b"".join(_file_parts(model, family_pixels.NO_WEIGHTS, min(quality, model.qualities), channels, width,
                                height, family_pixels.encode_trial(found, height, width), icc_profile, exif, gray_rgb))


def _or_exact(pixels: np.ndarray, data: bytes, quality: int, channels: int, gray_rgb: bool,
              icc_profile: bytes | None, exif: bytes | None, effort: int = 1) -> bytes:
    """The pixels family's exact file (its lossless dictionary coding) where it is no
    larger than ``data``, an overlay's file; else ``data``. :func:`_or_pixels` tries it
    against the model's file only where its estimates say it could pay, and they can be
    10x over on text (its repeats lie far apart), while an overlay says the image has
    text the model cannot follow. The trial stops once its code outgrows ``data``: on a
    photo with a caption it reads a fraction of the image."""
    from . import pixels as family_pixels

    bits = _coded_bits(data)
    found = family_pixels.dictionary_trial(pixels, limit_bits=bits)
    if found is None:
        return data
    other = _pixels_file(found, pixels, quality, channels, gray_rgb, icc_profile, exif, effort)
    return other if _coded_bits(other) <= bits else data


def encode_rows(source: PixelRows, quality: float = 4, weights: str | Path | None = None,
                icc_profile: bytes | None = None, exif: bytes | None = None,
                progress: Progress | None = None, spill_bytes: int | None = None,
                family: str | None = None, precision: str = "auto") -> list:
    """The .nic file of an image read strip by strip (effort 1), as a list of buffers to
    write in order, so that no stage holds the whole image or a second copy of the file.

    Memory stays flat as the image grows: see nic.tiling (latents above ``spill_bytes``
    go to a temporary file). Gives the same bytes as :func:`encode_pixels` at effort 1:
    the default family, which also tries the pixels family, reads an image of up to
    nic.pixels.MAX_PIXELS whole (as ``--model pixels`` does); larger ones stream."""
    width, height = source.width, source.height
    _check_dimensions(width, height)
    _check_metadata(icc_profile, exif)
    if source.channels not in (1, 3):
        raise ValueError("images must have 1 or 3 channels")
    from .pixels import MAX_PIXELS, NAME as PIXELS

    icc_profile = container.profile_for(icc_profile, source.channels)
    from .tiling import read_whole

    if family in (None, PIXELS) and width * height <= MAX_PIXELS:
        whole = read_whole(source)
        return [encode_pixels(whole, quality, weights, icc_profile, exif, 1, progress, family, precision)]
    model, digest, quality, step = _model(weights, family, quality, precision, width * height)
    watched = _GrayWatch(source)
    extra = {} if step is None else {"step": step}
    substreams = _family(model).compress(model, watched, quality, 1, progress, spill_bytes, **extra)
    return _file_parts(model, digest, quality, source.channels, width, height, substreams, icc_profile, exif,
                       watched.gray and not icc_profile, step)


def encode_to_target(pixels: np.ndarray, max_bytes: int, weights: str | Path | None = None,
                     icc_profile: bytes | None = None, exif: bytes | None = None,
                     effort: int = 1, family: str | None = None, precision: str = "auto") -> tuple[bytes, float]:
    """(file, quality) of the largest file not above ``max_bytes``, as cwebp -size does:
    a binary search over the trained qualities, then, where the family codes qualities
    between them (effort 1), a bisection between the last that fits and the next; the
    smallest file if none fits. With neither ``family`` nor ``weights`` given, where the
    default's quality 1 is over, the pixels family's files too."""
    model, _, _, _ = _model(weights, family, 1)
    low, high = 1, model.qualities
    results: dict[float, bytes] = {}

    def size_at(quality: float) -> int:
        if quality not in results:
            results[quality] = encode_pixels(pixels, quality, weights, icc_profile, exif, effort, family=family,
                                             precision=precision)
        return len(results[quality])

    if size_at(low) > max_bytes:
        if family is None and weights is None:
            # The default's lowest quality is over: the pixels family's coarser steps may fit
            # (text, line art: the default's own file is often the pixels family's already).
            data, quality = encode_to_target(pixels, max_bytes, None, icc_profile, exif, effort, "pixels", precision)
            if len(data) < len(results[low]):  # it fits, or is the smaller miss
                return data, quality
        return results[low], low
    while low < high:  # invariant: size_at(low) fits
        middle = (low + high + 1) // 2
        if size_at(middle) <= max_bytes:
            low = middle
        else:
            high = middle - 1
    best: float = low
    if effort == 1 and low < model.qualities and _has_steps(_family(model)):
        above = low + 1.0
        for _ in range(TARGET_BISECTIONS):  # size grows with the quality; keep the largest that fits
            middle = round((best + above) / 2, 4)
            if size_at(middle) <= max_bytes:
                best = middle
            else:
                above = middle
    return results[best], best


TARGET_BISECTIONS = 6
"""Bisections between two trained qualities for a size target: 1/64 of a quality apart."""


def _open_for_decoding(data: bytes, weights: str | Path | None, max_pixels: int):
    parsed = container.unpack(data, max_pixels)  # garbage is refused before the weights load
    substreams = parsed.substreams()

    from .families import family, name_of
    from .weights import weights_for

    header = parsed.header
    try:
        version = family(header.model_id).FORMAT_VERSION
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    if header.version != version:
        raise FormatError(f"a file of the {name_of(header.model_id)} family must be format version {version}, "
                          f"not {header.version}")
    model, _ = weights_for(header.model_id, header.weights_hash, weights, coding=True)
    if not 1 <= header.quality <= model.qualities:
        raise FormatError(f"quality {header.quality} is not one of the weights' 1..{model.qualities}")
    if header.latent_shape[0] != model.latent_channels:
        raise FormatError(f"file has {header.latent_shape[0]} latent channels, the model has {model.latent_channels}")
    return parsed, substreams, model


def _decompress(data: bytes, weights: str | Path | None, max_pixels: int, progress: Progress | None,
                spill_bytes: int | None, open_sink, on_latents=None, precision: str = "auto") -> Header:
    """Decode, calling ``open_sink(header, icc_profile, exif)`` once every substream is
    decoded (so a corrupt file opens no output) and feeding the rows it returns. A
    grayscale file of an all-gray RGB source (section gRGB) decodes to RGB: ``open_sink``
    gets, and the caller gets back, its header with the colour layout RGB."""
    parsed, substreams, model = _open_for_decoding(data, weights, max_pixels)
    header = parsed.header
    model = at_precision(model, precision, header.width * header.height)
    known = dict(parsed.sections)
    sink: list[RowSink] = []
    to_rgb = header.colour == COLOUR_GRAY and container.SECTION_GRAY_RGB in known
    shown = dataclasses.replace(header, colour=COLOUR_RGB) if to_rgb else header

    def decoded(latents) -> None:
        if on_latents is not None:
            on_latents(latents)
        rows = open_sink(shown, known.get(container.SECTION_ICC), known.get(container.SECTION_EXIF))
        sink.append((lambda gray: rows(np.repeat(gray, 3, axis=2))) if to_rgb else rows)

    extra = {}
    if container.SECTION_STEP in known:
        if not _has_steps(_family(model)):
            raise FormatError(f"section STEP is not part of the {_family(model).NAME} family's files")
        extra["step"] = container.unpack_step(known[container.SECTION_STEP])
    _family(model).decompress(model, header.quality, header.height, header.width, header.colour == COLOUR_GRAY,
                              substreams, lambda rows: sink[0](rows), progress, spill_bytes, decoded, **extra)
    return shown


def decode_pixels(data: bytes, weights: str | Path | None = None,
                  max_pixels: int = container.DEFAULT_MAX_PIXELS, progress: Progress | None = None,
                  precision: str = "auto") -> Decoded:
    """Decode .nic bytes; raises FormatError or WeightsError naming the problem.
    ``precision``: g_s's arithmetic (nic.precision), as for :func:`encode_pixels`."""
    found: dict = {}

    def open_sink(header: Header, icc_profile: bytes | None, exif: bytes | None) -> RowSink:
        channels = 1 if header.colour == COLOUR_GRAY else 3
        found.update(pixels=np.empty((header.height, header.width, channels), dtype=np.uint8), filled=0,
                     icc_profile=icc_profile, exif=exif)

        def into_array(rows: np.ndarray) -> None:
            found["pixels"][found["filled"]:found["filled"] + len(rows)] = rows
            found["filled"] += len(rows)

        return into_array

    def keep(latents) -> None:
        found["latents"] = np.asarray(latents.array, dtype=np.int64)

    # The whole image is held anyway: its latents stay in memory (no spill file).
    header = _decompress(data, weights, max_pixels, progress, 1 << 62, open_sink, keep, precision)
    return Decoded(found["pixels"], header, found["latents"], found["icc_profile"], found["exif"])


def decode_rows(data: bytes, open_sink: Callable[[Header, bytes | None, bytes | None], RowSink],
                weights: str | Path | None = None, max_pixels: int = container.DEFAULT_MAX_PIXELS,
                progress: Progress | None = None, spill_bytes: int | None = None, precision: str = "auto") -> Header:
    """Decode .nic bytes strip by strip, for images too large to hold whole.

    Once the file is validated and its latents decoded, ``open_sink(header, icc_profile,
    exif)`` is called and returns the function that receives the uint8 pixel rows
    (n, width, 1|3), top to bottom. The same pixels as :func:`decode_pixels`."""
    return _decompress(data, weights, max_pixels, progress, spill_bytes, open_sink, precision=precision)


def encode(image: Image.Image | NDArray[np.uint8], quality: float = 4, weights: str | Path | None = None,
           background: str | None = None, strip: bool = False, effort: int = 1, family: str | None = None,
           precision: str = "auto") -> bytes:
    """Encode a Pillow image or a uint8 numpy array (H, W), (H, W, 1|3|4) to .nic bytes.

    A Pillow image's ICC profile and EXIF travel along unless ``strip``. ``effort`` 1..4
    spends more encoding time for a smaller file at the same quality (nic.quantization);
    ``family`` picks the model family (nic.families) and ``precision`` the transforms'
    arithmetic (nic.precision), as for :func:`encode_pixels`."""
    from PIL import Image

    from .images import image_input, pixels_from_image

    if isinstance(image, (str, os.PathLike)):
        raise TypeError("nic.encode takes a Pillow image or a uint8 array, not a file name: "
                        "pass PIL.Image.open(name)")
    if isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError("nic.encode takes a Pillow image or a uint8 array, not a file's bytes: "
                        "pass PIL.Image.open(io.BytesIO(data))")
    if isinstance(quality, bool) or not isinstance(quality, numbers.Real):
        raise TypeError(f"quality must be a number, got {quality!r}")
    if image is None or isinstance(image, numbers.Number):
        raise TypeError(f"nic.encode takes a Pillow image or a uint8 array, got {type(image).__name__}")
    icc_profile = exif = None
    if isinstance(image, Image.Image):
        pixels, icc_profile, exif = image_input(image, background, strip)
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"arrays must be uint8, got {array.dtype}")
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"array shape {array.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
        if array.shape[2] == 4:
            pixels = pixels_from_image(Image.fromarray(array, "RGBA"), background)
        else:
            pixels = array
    return encode_pixels(pixels, quality, weights, icc_profile, exif, effort, family=family, precision=precision)


def decode(data: bytes, weights: str | Path | None = None, precision: str = "auto") -> Image.Image:
    """Decode .nic bytes to a Pillow image (mode RGB or L), with ``info["icc_profile"]``
    and ``info["exif"]`` when the file carries them."""
    from .images import image_from_pixels

    if isinstance(data, (str, os.PathLike)):
        raise TypeError("nic.decode takes a .nic file's bytes, not its name: pass open(name, 'rb').read()")
    try:
        data = data if isinstance(data, bytes) else memoryview(data).tobytes()
    except TypeError:
        raise TypeError(f"nic.decode takes bytes, got {type(data).__name__}") from None
    decoded = decode_pixels(data, weights, precision=precision)
    image = image_from_pixels(decoded.pixels)
    if decoded.icc_profile:
        image.info["icc_profile"] = decoded.icc_profile
    if decoded.exif:
        image.info["exif"] = decoded.exif
    return image
