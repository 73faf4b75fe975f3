"""nic as a library: pixels or Pillow images in, .nic bytes out, and back.

    >>> import nic
    >>> data = nic.encode(Image.open("photo.png"), quality=4)
    >>> image = nic.decode(data)

This is where the math modules meet: :mod:`nic.model` (transforms),
:mod:`nic.coding` (range coding), :mod:`nic.container` (file format). The model is
loaded once per process and per weights file.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Pillow is imported where it is used, not with this module
    from numpy.typing import NDArray
    from PIL import Image

from . import container
from .container import COLOUR_GRAY, COLOUR_RGB, FormatError, Header


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (H, W, 3) or (H, W, 1)
    header: Header
    latents: np.ndarray  # int64 (C, rows, cols), as decoded
    icc_profile: bytes | None = None
    exif: bytes | None = None


def _torch():
    import torch

    return torch


_CODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _coder(model, quality: int):
    from .coding import LatentCoder

    # Kept beside the model, not on it, so the model stays copyable (constriction's
    # models do not pickle).
    cache = _CODERS.setdefault(model, {})
    if quality not in cache:
        cache[quality] = LatentCoder(model.tables[quality - 1])
    return cache[quality]


def quantize_latents(model, pixels: np.ndarray, quality: int, effort: int = 1) -> np.ndarray:
    """Integer latents of uint8 pixels (H, W, 1|3): round(g_a(x)·gain) in tiles
    (nic.tiling) at effort 1, chosen by D + λR at higher efforts (nic.quantization)."""
    from .quantization import quantize

    return quantize(model, pixels, quality, effort)


def reconstruct(model, latents: np.ndarray, quality: int, height: int, width: int, gray: bool) -> np.ndarray:
    """uint8 pixels (H, W, 1|3) from integer latents, in tiles (nic.tiling)."""
    from .tiling import reconstruct_tiled

    return reconstruct_tiled(model, latents, quality, height, width, gray)


def encode_pixels(pixels: np.ndarray, quality: int = 4, weights: str | Path | None = None,
                  icc_profile: bytes | None = None, exif: bytes | None = None, effort: int = 1) -> bytes:
    """.nic bytes of uint8 pixels of shape (H, W, 3) or (H, W, 1), with optional
    metadata carried verbatim in ancillary sections. ``effort`` 1..4 is the encoder's
    quantization search (1: rounding; see nic.quantization); any effort decodes the same way."""
    from .weights import default_weights

    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError("pixels must be uint8 of shape (H, W, 3) or (H, W, 1)")
    height, width = pixels.shape[:2]
    if height < 1 or width < 1:
        raise ValueError("image has no pixels")
    if width > 0xFFFFFFFF or height > 0xFFFFFFFF or -(-height // 16) > 0xFFFF or -(-width // 16) > 0xFFFF:
        raise ValueError(f"image of {width}x{height} is larger than the format allows")
    model, digest = default_weights(weights)
    if not 1 <= quality <= model.config.qualities:
        raise ValueError(f"quality must be 1..{model.config.qualities}, got {quality}")
    latents = quantize_latents(model, pixels, quality, effort)
    payload = _coder(model, quality).encode(latents)
    header = Header(
        model_id=model.config.model_id, quality=quality,
        colour=COLOUR_GRAY if pixels.shape[2] == 1 else COLOUR_RGB,
        width=width, height=height, weights_hash=digest,
        latent_shape=tuple(latents.shape), payload_length=len(payload),
    )
    sections = []
    if icc_profile:
        sections.append((container.SECTION_ICC, bytes(icc_profile)))
    if exif:
        sections.append((container.SECTION_EXIF, bytes(exif)))
    return container.pack(header, payload, sections)


def encode_to_target(pixels: np.ndarray, max_bytes: int, weights: str | Path | None = None,
                     icc_profile: bytes | None = None, exif: bytes | None = None,
                     effort: int = 1) -> tuple[bytes, int]:
    """(file, quality) of the largest file not above ``max_bytes`` (binary search over the
    trained qualities, as cwebp -size does); the smallest file if none fits."""
    from .weights import default_weights

    model, _ = default_weights(weights)
    low, high = 1, model.config.qualities
    results: dict[int, bytes] = {}

    def size_at(quality: int) -> int:
        if quality not in results:
            results[quality] = encode_pixels(pixels, quality, weights, icc_profile, exif, effort)
        return len(results[quality])

    if size_at(low) > max_bytes:
        return results[low], low
    while low < high:  # invariant: size_at(low) fits
        middle = (low + high + 1) // 2
        if size_at(middle) <= max_bytes:
            low = middle
        else:
            high = middle - 1
    return results[low], low


def decode_pixels(data: bytes, weights: str | Path | None = None,
                  max_pixels: int = container.DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode .nic bytes; raises FormatError or WeightsError naming the problem."""
    parsed = container.unpack(data, max_pixels)  # garbage is refused before torch loads

    from .coding import CorruptStream
    from .weights import weights_for

    header = parsed.header
    model, _ = weights_for(header.model_id, header.weights_hash, weights)
    if not 1 <= header.quality <= model.config.qualities:
        raise FormatError(f"quality {header.quality} is not one of the weights' 1..{model.config.qualities}")
    if header.latent_shape[0] != model.config.M:
        raise FormatError(f"file has {header.latent_shape[0]} latent channels, the model has {model.config.M}")
    try:
        latents = _coder(model, header.quality).decode(parsed.payload, header.latent_shape)
    except CorruptStream as exc:
        raise FormatError(f"payload is corrupt: {exc}") from None
    pixels = reconstruct(model, latents, header.quality, header.height, header.width,
                         header.colour == COLOUR_GRAY)
    known = dict(parsed.sections)
    return Decoded(pixels, header, latents, known.get(container.SECTION_ICC), known.get(container.SECTION_EXIF))


def encode(image: Image.Image | NDArray[np.uint8], quality: int = 4, weights: str | Path | None = None,
           background: str | None = None, strip: bool = False, effort: int = 1) -> bytes:
    """Encode a Pillow image or a uint8 numpy array (H, W), (H, W, 1|3|4) to .nic bytes.

    A Pillow image's ICC profile and EXIF travel along unless ``strip``. ``effort`` 1..4
    spends more encoding time for a smaller file at the same quality (nic.quantization)."""
    from PIL import Image

    from .images import image_metadata, pixels_from_image

    icc_profile = exif = None
    if isinstance(image, Image.Image):
        if not strip:
            icc_profile, exif = image_metadata(image)
        pixels = pixels_from_image(image, background)
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
    return encode_pixels(pixels, quality, weights, icc_profile, exif, effort)


def decode(data: bytes, weights: str | Path | None = None) -> Image.Image:
    """Decode .nic bytes to a Pillow image (mode RGB or L), with ``info["icc_profile"]``
    and ``info["exif"]`` when the file carries them."""
    from .images import image_from_pixels

    decoded = decode_pixels(data, weights)
    image = image_from_pixels(decoded.pixels)
    if decoded.icc_profile:
        image.info["icc_profile"] = decoded.icc_profile
    if decoded.exif:
        image.info["exif"] = decoded.exif
    return image
