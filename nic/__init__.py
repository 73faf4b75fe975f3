"""nic: a learned image codec (Ballé, Laparra and Simoncelli, ICLR 2017).

Library use::

    import nic
    data = nic.encode(pil_image_or_array, quality=4)
    image = nic.decode(data)

Importing nic is cheap: torch is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the hints only: importing nic stays cheap (no numpy, no torch)
    from pathlib import Path

    import numpy as np
    from numpy.typing import NDArray
    from PIL import Image

__version__ = "0.1.0"

from .container import VERSIONS as FORMAT_VERSIONS  # noqa: E402
from .container import VERSION as FORMAT_VERSION  # noqa: E402  (the first; files of both decode)


def encode(image: Image.Image | NDArray[np.uint8], quality: float = 4, weights: str | Path | None = None,
           background: str | None = None, strip: bool = False, effort: int = 1, model: str | None = None,
           precision: str = "auto") -> bytes:
    """Encode a Pillow image or uint8 array of shape (H, W), (H, W, 1|3|4) to .nic bytes
    (see :func:`nic.api.encode`) at ``quality`` 1..8 (3.5: between two, at effort 1), with the ``weights`` file given or
    the installed ones. Transparency is refused unless flattened onto ``background`` (a
    colour name, #hex, or an (R, G, B) tuple); a
    Pillow image's ICC profile and EXIF travel along unless ``strip``; ``effort`` 2..4
    searches for fewer bytes at the same quality (slower encode); ``model`` picks the model
    family of the installed weights ("factorized" or "hyperprior"); ``precision`` is the
    transforms' arithmetic ("auto", "fp32" or "bf16", which needs PyTorch; any precision's
    file decodes everywhere). Raises ValueError (TypeError for a file name or another type)."""
    from .api import encode as _encode

    return _encode(image, quality=quality, weights=weights, background=background, strip=strip, effort=effort,
                   family=model, precision=precision)


def decode(data: bytes, weights: str | Path | None = None, precision: str = "auto") -> Image.Image:
    """Decode .nic bytes to a Pillow image of mode RGB or L (see :func:`nic.api.decode`),
    with ``info["icc_profile"]`` and ``info["exif"]`` when the file carries them. ``data``
    is any bytes-like object (TypeError for a file name); ``precision`` as for
    :func:`encode`. Raises nic.container.FormatError or nic.weights.WeightsError (both
    ValueErrors) naming the problem."""
    from .api import decode as _decode

    return _decode(data, weights=weights, precision=precision)


__all__ = ["encode", "decode", "__version__", "FORMAT_VERSION", "FORMAT_VERSIONS"]


def _register_pillow_plugin() -> None:
    try:
        from .pillow_plugin import register
    except ImportError:  # Pillow missing: the CLI reports that where it matters
        return
    register()


_register_pillow_plugin()
