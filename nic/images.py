"""Image files in and out through Pillow, with the input policy of nic.

Inputs become uint8 arrays of shape (H, W, 3) for colour or (H, W, 1) for grayscale:

* EXIF orientation is applied, so pixels are as a viewer shows them;
* palette, 1-bit, CMYK, YCbCr, LAB and HSV images are converted to RGB (or L);
* 16-bit and 32-bit grayscale are scaled to 8 bits (nic codes 8-bit samples): 16-bit
  ones (and a PGM's of any maxval, which Pillow gives on 0..65535) from 0..65535, others
  by their range (0..255, else 0..65535); float samples all within 0..1 from 0..1, as
  image editors write float TIFFs, others as integers;
* alpha (an alpha channel, or a PNG tRNS colour key, which is transparency too):
  an alpha channel that is fully opaque carries nothing and is dropped;
  real transparency is refused unless a ``background`` colour is given to flatten
  onto (``nic encode --background white``). nic never drops transparency silently;
* an image of several frames (an animation, a multi-page TIFF) gives its first, with
  a :class:`FramesWarning` saying how many were left out (the CLI prints it as one
  ``nic: warning:`` line).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from .container import profile_space

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".pnm": "PPM"}


class ImageError(ValueError):
    """The input image cannot be read or is not acceptable; the message says why."""


class FramesWarning(UserWarning):
    """The input has several frames (an animation, pages) and only the first is coded."""


def background_colour(background) -> tuple[int, int, int]:
    """(R, G, B) of a colour name or #hex (Pillow's ImageColor), or of an (R, G, B[, A])
    tuple of 0..255; ImageError for anything else."""
    if isinstance(background, str):
        try:
            return ImageColor.getrgb(background)[:3]
        except ValueError:
            raise ImageError(f"unknown background colour {background!r}") from None
    if (isinstance(background, (tuple, list)) and len(background) in (3, 4)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in background)):
        return tuple(background[:3])
    raise ImageError(f"a background colour is a name, #hex or an (R, G, B) of 0..255, not {background!r}")


def pixels_from_image(im: Image.Image, background: str | tuple | None = None) -> np.ndarray:
    """uint8 (H, W, 3 or 1) pixels from a Pillow image, by the policy above."""
    source_format = im.format  # a turned image has none
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not stop encoding the pixels
        pass
    mode = im.mode
    key = im.info.get("transparency")  # a PNG tRNS colour key is transparency too
    if mode in ("1", "L", "RGB") and key is not None:
        im = im.convert("RGBA" if mode == "RGB" else "LA")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("1",):
        im = im.convert("L")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        raw = np.asarray(im)
        array = np.nan_to_num(raw.astype(np.float64), nan=0.0)  # NaN (float TIFF) → 0, ±inf clip below
        # 16-bit samples, and a PGM's of any maxval above 255 (Pillow scales them to 0..65535),
        # whatever their content; other integer or float samples by their range.
        sixteen = mode.startswith("I;16") or (mode == "I" and source_format == "PPM")
        top = array.max(initial=0)
        peak = 65535.0 if sixteen or top > 255 else 1.0 if mode == "F" and 0 < top <= 1 else 255.0
        gray = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        if not isinstance(key, int) or not (raw == key).any():
            return gray[..., None]
        alpha = np.where(raw == key, 0, 255).astype(np.uint8)
        im = Image.merge("LA", (Image.fromarray(gray, "L"), Image.fromarray(alpha, "L")))
    elif mode == "CMYK" and profile_space(im.info.get("icc_profile")) == b"CMYK":
        im = _cmyk_to_srgb(im)
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min(initial=255) < 255:
            if background is None:
                raise ImageError("input has transparency, which nic does not store; flatten it onto a "
                                 "colour with --background (e.g. --background white; in Python, "
                                 "background=\"white\")")
            colour = background_colour(background)
            base = Image.new("RGB", im.size, colour)
            base.paste(im.convert("RGBA"), mask=im.getchannel("A"))
            im = base if im.mode == "RGBA" or len(set(colour)) > 1 else base.convert("L")
        else:
            im = im.convert("RGB" if im.mode == "RGBA" else "L")
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8)[..., None]
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _cmyk_to_srgb(im: Image.Image) -> Image.Image:
    """A CMYK image in sRGB through its own CMYK profile (Photoshop's CMYK JPEGs carry
    one); Pillow's own conversion, which ignores the profile, where that fails."""
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # no LittleCMS in this Pillow, or a profile it cannot use
        return im.convert("RGB")


REFUSED_FORMATS = frozenset({"EPS"})
"""Pillow reads EPS by running Ghostscript on it: never for untrusted input."""

ORIENTATION = 0x0112
"""The EXIF orientation tag: nic stores pixels upright, so stored EXIF goes without it."""

LAYOUT_TAGS = (256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 280, 281, 284, 317, 320, 322, 323, 324, 325,
               338, 339, 347, 34675)
"""Tags of a TIFF's first IFD that describe that file's own pixels, not the picture:
its size, bit depth, compression, strips and tiles, sample format and layout, and its
ICC profile (kept as the ICC). A TIFF input's getexif() holds them; stored in the .nic
EXIF, they would tell readers of the decoded image a wrong size (before the turn
upright) and depth (16 for 8) and offsets into a file that is not there."""


def input_formats() -> list[str]:
    """The Pillow formats nic reads: all it has, less REFUSED_FORMATS."""
    Image.init()
    return [name for name in Image.OPEN if name not in REFUSED_FORMATS]


def _open_image(data: bytes) -> Image.Image:
    """Pillow's image of ``data``. The formats Pillow registers before loading its other
    plugins (PNG, JPEG, GIF, BMP, PPM) are tried first, as Pillow's own ``open`` does:
    loading every plugin costs a fresh process ~37 ms."""
    Image.preinit()
    try:
        return Image.open(io.BytesIO(data), formats=[name for name in Image.OPEN if name not in REFUSED_FORMATS])
    except UnidentifiedImageError:
        return Image.open(io.BytesIO(data), formats=input_formats())


def read_image_with_metadata(data: bytes, background: str | None = None, max_pixels: int | None = None
                             ) -> tuple[np.ndarray, bytes | None, bytes | None]:
    """(pixels, ICC profile, EXIF) of image bytes (PNG, JPEG, WebP, TIFF, …); raises ImageError."""
    if not data:
        raise ImageError("input is empty")
    try:
        with warnings.catch_warnings():
            # nic applies its own limit below; Pillow's stays as the backstop at 2x.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            try:
                if max_pixels is not None:
                    Image.MAX_IMAGE_PIXELS = max_pixels
                im = _open_image(data)
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise ImageError(f"image of {im.width}x{im.height} exceeds the limit of {max_pixels} "
                                     "pixels (raise it with --max-pixels)")
                im.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("input is not an image Pillow can read") from None
    except Image.DecompressionBombError:
        if max_pixels is not None:  # Pillow's check at 2x the caller's limit fired first: the same refusal
            raise ImageError(f"image exceeds the limit of {max_pixels} pixels (raise it with --max-pixels)") from None
        raise ImageError("image is too large (decompression bomb limit; raise it with --max-pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read image: {exc}") from None
    if im.format == "PNG":
        _check_png_data(data)
    frames = _frames(im)
    if frames > 1:
        warnings.warn(FramesWarning(f"input has {frames} frames (an animation or pages); nic codes the first"),
                      stacklevel=2)
    return image_input(im, background)


def image_input(im: Image.Image, background: str | None = None, strip: bool = False
                ) -> tuple[np.ndarray, bytes | None, bytes | None]:
    """(pixels, ICC profile, EXIF) of a Pillow image by the input policy; no metadata
    with ``strip``."""
    pixels = pixels_from_image(im, background)
    return (pixels, None, None) if strip else (pixels, *image_metadata(im))


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""An interlaced PNG's passes: (first column, first row, column step, row step)."""


def _check_png_data(data: bytes) -> None:
    """ImageError where a PNG's image data ends before its last row. Pillow's loader fills
    the missing rows with black where the zlib stream ends early but cleanly; nic's
    streaming reader (nic.streaming) refuses such a file, and so does the whole-image
    path, so that a file gives the same pixels or the same refusal on both. Called after
    Pillow has read the file, so its chunks and its zlib stream are sound."""
    if data[12:16] != b"IHDR":  # Pillow takes a chunk before IHDR; the streaming reader refuses it
        return
    width, height, depth, colour, interlace = struct.unpack(">IIBBxxB", data[16:29])
    bits = depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            expected += rows * (1 + (columns * bits + 7) // 8)
    inflate, got, at, view = zlib.decompressobj(), 0, 8, memoryview(data)
    while got < expected and at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IEND":
            break
        # In pieces of 64 KiB, each inflated to at most 1 MiB: bounded memory, and the
        # tail that zlib keeps between calls stays small (one chunk can be the whole file).
        for piece in range(at + 8, min(at + 8 + length, len(data)), 1 << 16) if kind == b"IDAT" else ():
            pending = view[piece:min(piece + (1 << 16), at + 8 + length)]
            while pending and got < expected and not inflate.eof:
                try:
                    got += len(inflate.decompress(pending, min(expected - got, 1 << 20)))
                except zlib.error:
                    return  # Pillow read it: not this check's to judge
                pending = inflate.unconsumed_tail
        at += 12 + length
    if got < expected:
        raise ImageError("cannot read image: PNG image data is too short for the image size")


def _frames(im: Image.Image) -> int:
    """How many frames an opened image has (1 where Pillow cannot tell), its first one
    current again after counting."""
    try:
        frames = int(getattr(im, "n_frames", 1))
        if frames > 1:
            im.seek(0)
        return frames
    except (OSError, ValueError, EOFError, TypeError):
        return 1


def read_image(data: bytes, background: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Pixels of image bytes (PNG, JPEG, WebP, TIFF, …); raises ImageError."""
    return read_image_with_metadata(data, background, max_pixels)[0]


def image_metadata(im: Image.Image) -> tuple[bytes | None, bytes | None]:
    """(ICC profile, EXIF) of an image, EXIF without its orientation tag, since nic
    stores pixels already turned upright, and without a TIFF's layout (LAYOUT_TAGS)."""
    icc = im.info.get("icc_profile") or None
    try:
        exif_bytes = stored_exif(im.getexif())  # the image's own (Pillow caches it), left as it was
    except Exception:  # unreadable EXIF is dropped, not fatal: the pixels are what matter
        exif_bytes = None
    return icc, exif_bytes


def stored_exif(exif: Image.Exif) -> bytes | None:
    """EXIF bytes as nic stores them: without the orientation tag (the pixels are stored
    upright) and a TIFF's layout (LAYOUT_TAGS); None when nothing is left. ``exif`` keeps
    its tags (a caller's image turns again on a second encode)."""
    taken = {tag: exif.pop(tag) for tag in (ORIENTATION, *LAYOUT_TAGS) if tag in exif}
    try:
        return exif.tobytes() if len(exif) else None
    finally:
        exif.update(taken)


def image_from_pixels(pixels: np.ndarray) -> Image.Image:
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[..., 0], mode="L")
    return Image.fromarray(pixels, mode="RGB")


def output_format(name: str | None) -> str:
    """Pillow format for an output name by its extension; PNG for stdout."""
    if name is None or name == "-":
        return "PNG"
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix not in OUTPUT_FORMATS:
        raise ImageError(f"cannot tell the output format from {name!r}; use one of "
                         + ", ".join(sorted(OUTPUT_FORMATS)))
    return OUTPUT_FORMATS[suffix]


SIDE_LIMITS = {"WEBP": 16383, "JPEG": 65500}
"""The most pixels a side an output format holds (libwebp's and libjpeg's limits)."""

METADATA_FORMATS = {"PNG", "JPEG", "WEBP", "TIFF"}
"""Output formats that can carry an ICC profile and EXIF through Pillow."""


def write_image(pixels: np.ndarray, fmt: str, icc_profile: bytes | None = None, exif: bytes | None = None) -> bytes:
    """Encode pixels as ``fmt``; metadata goes along where the format can hold it."""
    buffer = io.BytesIO()
    options: dict = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if fmt in METADATA_FORMATS:
        if icc_profile:
            options["icc_profile"] = icc_profile
        if exif:
            options["exif"] = exif
    image_from_pixels(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()
