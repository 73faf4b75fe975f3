"""A Pillow plugin for .nic files, registered by ``import nic``.

    >>> import nic
    >>> from PIL import Image
    >>> im = Image.open("photo.nic")         # decodes with the installed weights
    >>> im.info["icc_profile"], im.info["exif"]   # present when the file carries them
    >>> im.save("photo.nic", quality=4)      # encodes; quality 1..8 (effort=1..4 optional)

Opening reads the file and validates its header (cheap, no torch), and puts the
ICC profile and EXIF the file carries in ``info["icc_profile"]`` and ``info["exif"]``
straight away, as Pillow's JPEG plugin does; the pixels are decoded on first access,
like any lazy Pillow format, at the precision of the image's ``precision`` attribute
("auto" unless set before the pixels are read; ``NicImageFile.precision`` for all) and
with the weights file of its ``weights`` attribute (None: the installed ones, which is
also where a file names weights that are not installed: OSError).
A damaged file still opens; reading its pixels raises OSError naming the damage, as
Pillow's own formats do, and ``verify()`` checks its CRCs without decoding it.

Saving takes ``quality=`` (1..8, default 4; 3.5 lies between two), ``effort=`` (1..4, default 1),
``model=`` (the model family, "factorized" or "hyperprior"), ``weights=`` (a weights
file, as ``nic encode --weights``), ``precision=`` ("auto",
"fp32" or "bf16": the transforms' arithmetic, nic.precision) and ``background=``
(a colour to flatten transparency onto), as :func:`nic.encode` does,
and Pillow's usual metadata keywords: ``icc_profile=`` and ``exif=`` (bytes, or an
:class:`PIL.Image.Exif` for ``exif``) replace what the image carries, ``None``
leaves it out, and ``strip=True`` leaves out both. Without them the image's own ICC
profile and EXIF are kept. A profile is stored only where its colour space is the
pixels' (RGB, or GRAY for a gray image: nic.container.profile_for). Like Pillow's PNG and JPEG writers, other formats do not
copy ``info["exif"]`` on their own: ``im.save("out.png", exif=im.getexif())``.
nic stores one image: ``save_all=True`` saves an image of one frame and refuses more.
"""

from __future__ import annotations

import numbers
from typing import IO

from PIL import Image, ImageFile

from .container import (COLOUR_GRAY, HEADER_SIZE, MAGIC, SECTION_EXIF, SECTION_GRAY_RGB, SECTION_ICC, FormatError,
                        max_file_size, parse_header, unpack)

FORMAT = "NIC"
MIME = "image/x-nic"


def _accept(prefix: bytes) -> bool:
    return prefix[:4] == MAGIC


class NicImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "nic learned image codec"
    precision = "auto"  # g_s's arithmetic when the pixels are decoded (nic.precision)
    weights = None  # a weights file to decode with (None: the installed ones)

    def _open(self) -> None:
        head = self.fp.read(HEADER_SIZE)
        try:
            header = parse_header(head)
        except FormatError as exc:
            raise SyntaxError(str(exc)) from None
        self._size = (header.width, header.height)
        self._mode = "L" if header.colour == COLOUR_GRAY else "RGB"
        self.info["quality"] = header.quality
        # The metadata sections follow the payload, so the whole file is read now for
        # info to have them after open. The header bounds how much that is, and the
        # payload is compressed: far less than the pixels that load() will allocate.
        self._nic_data = head + _read_at_most(self.fp, max_file_size(header) - HEADER_SIZE)
        try:
            sections = dict(unpack(self._nic_data).sections)
        except FormatError:
            # A damaged file still opens, as in Pillow's own formats: load() raises
            # the FormatError that says what is wrong, where a caller asks for pixels.
            sections = {}
        if sections.get(SECTION_ICC):
            self.info["icc_profile"] = sections[SECTION_ICC]
        if sections.get(SECTION_EXIF):
            self.info["exif"] = sections[SECTION_EXIF]
        if SECTION_GRAY_RGB in sections:  # an all-gray RGB source: decodes to RGB
            self._mode = "RGB"
        self.tile = []

    def load(self):
        # Not after a copy or unpickling: Pillow restores the pixels, not the file's bytes.
        if self.tile == [] and not getattr(self, "_nic_loaded", False) and hasattr(self, "_nic_data"):
            from .api import decode_pixels
            from .images import image_from_pixels
            from .weights import WeightsError

            try:
                decoded = decode_pixels(self._nic_data, self.weights, precision=self.precision)
            except FormatError as exc:  # what Pillow's formats raise for a broken file
                raise OSError(f"broken .nic file: {exc}") from exc
            except WeightsError as exc:  # the weights it needs are not installed: no pixels either
                raise OSError(f"cannot decode this .nic file: {exc}") from exc
            image = image_from_pixels(decoded.pixels)
            self.im = image.im
            self._nic_loaded = True
            self._nic_data = b""  # the pixels are what is kept from here on
            if self._exclusive_fp and self.fp:
                self.fp.close()
            self.fp = None
        return Image.Image.load(self)

    def verify(self) -> None:
        """SyntaxError where the file is damaged (its header, payload or a section fails
        its CRC, or it is cut short), without decoding it; as Pillow's PNG plugin checks."""
        if getattr(self, "_nic_loaded", False):  # load() has let go of the file's bytes
            raise RuntimeError("verify must be called directly after open")
        try:
            unpack(self._nic_data)
        except FormatError as exc:
            raise SyntaxError(f"broken .nic file: {exc}") from exc
        super().verify()


def _read_at_most(fp: IO[bytes], limit: int) -> bytes:
    # In chunks: one read(limit) would allocate all of a hostile header's claim up front.
    chunks = []
    left = limit
    while left > 0:
        chunk = fp.read(min(left, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _exif_bytes(exif: bytes | Image.Exif) -> bytes | None:
    """An ``exif=`` save argument as nic stores EXIF: without its orientation tag, since
    nic stores pixels as they are shown (see nic.images.image_metadata)."""
    from .images import ORIENTATION  # here, not above: importing nic does not load numpy
    if isinstance(exif, Image.Exif):
        parsed = exif
    else:
        parsed = Image.Exif()
        try:
            parsed.load(bytes(exif))
        except Exception:  # Pillow raises various errors on a malformed block
            raise ValueError("exif= is not a readable EXIF block") from None
    if ORIENTATION in parsed:
        # Copied, not popped in place: the caller's Exif object stays as it was.
        kept = Image.Exif()
        kept.load(parsed.tobytes())
        del kept[ORIENTATION]
        parsed = kept
    return parsed.tobytes() if len(parsed) else None


def _save(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    from .api import encode_pixels
    from .images import image_metadata, pixels_from_image

    options = im.encoderinfo
    quality, effort = options.get("quality", 4), options.get("effort", 1)
    if isinstance(quality, bool) or not isinstance(quality, numbers.Real):
        raise ValueError(f"quality must be a number, got {quality!r}")
    if isinstance(effort, bool) or not isinstance(effort, numbers.Integral):
        raise ValueError(f"effort must be an integer 1..4, got {effort!r}")
    icc_profile, exif = (None, None) if options.get("strip") else image_metadata(im)
    if not options.get("strip"):
        # Present but None (or empty) means "leave it out", as with Pillow's PNG writer.
        if "icc_profile" in options:
            if isinstance(options["icc_profile"], str):
                raise ValueError("icc_profile= must be bytes, not str")
            icc_profile = bytes(options["icc_profile"]) if options["icc_profile"] else None
        if "exif" in options:
            exif = _exif_bytes(options["exif"]) if options["exif"] else None
    # nic.api.encode reads metadata only from the image, so the pieces it is made of
    # are called here, in the same order, to put explicit metadata in their place.
    pixels = pixels_from_image(im, options.get("background"))
    fp.write(encode_pixels(pixels, quality, options.get("weights"), icc_profile, exif, effort,
                           family=options.get("model"), precision=options.get("precision", "auto")))


def _save_all(im: Image.Image, fp: IO[bytes], filename: str | bytes) -> None:
    """``save_all=True``: nic stores one image, so only an image of one frame is saved."""
    frames = getattr(im, "n_frames", 1) + len(im.encoderinfo.get("append_images", []))
    if frames > 1:
        raise ValueError(f"nic stores one image, not {frames} frames; save without save_all=True "
                         "to store the first")
    _save(im, fp, filename)


def register() -> None:
    Image.register_open(FORMAT, NicImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_save_all(FORMAT, _save_all)
    Image.register_extension(FORMAT, ".nic")
    Image.register_mime(FORMAT, MIME)
