"""A Pillow plugin for .nic files, registered by ``import nic``.

    >>> import nic
    >>> from PIL import Image
    >>> Image.open("photo.nic")              # decodes with the installed weights
    >>> im.save("photo.nic", quality=4)      # encodes; quality 1..8 (effort=1..4 optional)

Opening reads and validates only the header (cheap, no torch); the pixels are
decoded on first access, like any lazy Pillow format.
"""

from __future__ import annotations

from PIL import Image, ImageFile

from .container import COLOUR_GRAY, HEADER_SIZE, MAGIC, FormatError, parse_header

FORMAT = "NIC"
MIME = "image/x-nic"


def _accept(prefix: bytes) -> bool:
    return prefix[:4] == MAGIC


class NicImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "nic learned image codec"

    def _open(self) -> None:
        head = self.fp.read(HEADER_SIZE)
        try:
            header = parse_header(head)
        except FormatError as exc:
            raise SyntaxError(str(exc)) from None
        self._size = (header.width, header.height)
        self._mode = "L" if header.colour == COLOUR_GRAY else "RGB"
        self.info["quality"] = header.quality
        self.tile = []

    def load(self):
        if self.tile == [] and not getattr(self, "_nic_loaded", False):
            from .api import decode_pixels
            from .images import image_from_pixels

            self.fp.seek(0)
            decoded = decode_pixels(self.fp.read())
            image = image_from_pixels(decoded.pixels)
            self.im = image.im
            self._nic_loaded = True
            if self._exclusive_fp and self.fp:
                self.fp.close()
            self.fp = None
        return Image.Image.load(self)


def _save(im: Image.Image, fp, filename) -> None:
    from .api import encode

    quality = int(im.encoderinfo.get("quality", 4))
    effort = int(im.encoderinfo.get("effort", 1))
    fp.write(encode(im, quality=quality, background=im.encoderinfo.get("background"), effort=effort))


def register() -> None:
    Image.register_open(FORMAT, NicImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extension(FORMAT, ".nic")
    Image.register_mime(FORMAT, MIME)
