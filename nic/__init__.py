"""nic: a learned image codec (Ballé, Laparra and Simoncelli, ICLR 2017).

Library use::

    import nic
    data = nic.encode(pil_image_or_array, quality=4)
    image = nic.decode(data)

Importing nic is cheap: torch is loaded on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .container import VERSION as FORMAT_VERSION  # noqa: E402


def encode(image, quality: int = 4, weights=None, background: str | None = None, strip: bool = False,
           effort: int = 1) -> bytes:
    """Encode a Pillow image or uint8 array to .nic bytes (see :func:`nic.api.encode`);
    ``effort`` 2..4 searches for fewer bytes at the same quality (slower encode)."""
    from .api import encode as _encode

    return _encode(image, quality=quality, weights=weights, background=background, strip=strip, effort=effort)


def decode(data: bytes, weights=None):
    """Decode .nic bytes to a Pillow image (see :func:`nic.api.decode`)."""
    from .api import decode as _decode

    return _decode(data, weights=weights)


__all__ = ["encode", "decode", "__version__", "FORMAT_VERSION"]


def _register_pillow_plugin() -> None:
    try:
        from .pillow_plugin import register
    except ImportError:  # Pillow missing: the CLI reports that where it matters
        return
    register()


_register_pillow_plugin()
