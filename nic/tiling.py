"""Tiled inference: g_a and g_s over overlapping tiles, so that peak memory stays flat
as the image grows, with the same latents and pixels as whole-image inference.

Tiles live on the latent grid (1 latent = 16 pixels), so every tile seam is a latent
seam. A tile is a *core* of latents plus a *halo* of neighbouring latents (or of the
16-pixel blocks under them) that is computed and thrown away.

Halo arithmetic (derived from the modules by :func:`analysis_halo` and
:func:`synthesis_halo`, so it follows the architecture if that changes):

* g_a is four Conv2d(k=5, s=2, p=2). Output j of such a conv reads inputs
  2j−2 … 2j+2, so latent i reads, layer by layer down to the pixels,
  [2i−2, 2i+2] → [4i−6, 4i+6] → [8i−14, 8i+14] → [16i−30, 16i+30]:
  a receptive field of 61 pixels, 30 either side of the latent's 16-pixel block start.
  Pixel 16i−30 lies in the 16-pixel block i−2 and pixel 16i+30 in block i+1, so a
  tile that starts 2 blocks before its first core latent and ends 1 block after its
  last gives every core latent exactly its full-image value: nothing it depends on,
  at any layer, touches the tile's (wrong) zero padding (an intermediate index
  outside the tile would itself read pixels outside it). Halo: 2 latents before, 1 after.
* g_s is four ConvTranspose2d(k=5, s=2, p=2, output_padding=1). Output o receives
  input i when o = 2i − 2 + κ, κ ∈ 0…4, i.e. i ∈ [⌈(o−2)/2⌉, ⌊(o+2)/2⌋]. Pixels
  16A … 16B−1 (latent blocks A … B−1) read, layer by layer up to the latents,
  [8A−1, 8B] → [4A−1, 4B+1] → [2A−1, 2B+1] → [A−1, B+1]. Inputs missing from a tile
  act as zeros, so the halo is 1 latent before and 2 after.

At a real image border a tile takes no halo on that side, so it sees exactly what the
whole image sees there: the replicate padding of :func:`nic.model.pad_to_multiple`
(bottom/right, up to a multiple of 16) and then the convolutions' own zero padding
(g_a) or absent inputs (g_s) at the same place. GDN/IGDN are 1x1 across space, so
only the convolutions count.

Whole-image inference is the one-tile case of the same code (any image whose latent
grid fits in one tile core). Floating-point results could still differ in the last
bits between tile shapes (a convolution backend may pick another algorithm or
summation order for another size), and a latent within ~1e-6 of a rounding boundary
would then round the other way; measured: 0 of 7.08 M latents differ (24 Kodak
images, quality 8, tiles of 128 and 768 px against the whole image). Tiling never
touches the container: a file is decodable with any tile size.

Memory: the input stays uint8; each tile is converted to float32 on its own, and the
decoder writes each tile's uint8 pixels into one preallocated output array. Peak
memory is the uint8 image, the latents and one tile's activations. No I/O here.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .model import DOWNSAMPLING

DEFAULT_TILE = 768
"""Tile core in pixels (a multiple of 16). Read at call time, so a caller or a
measurement script may change it; see docs/speed.md for how it was chosen."""

MEMORY_FORMAT = torch.channels_last
"""Layout of every tile tensor; channels_last is the faster one for oneDNN here
(docs/speed.md). The results do not depend on it beyond float rounding."""

Progress = Callable[[int, int], None]
"""progress(tiles_done, tiles_total), called after each tile."""


# ---- halo from the architecture ------------------------------------------------------

def _spatial_layers(transform: nn.Module) -> list[nn.Module]:
    layers = []
    for module in transform.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            k, s, p, d = module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0]
            if module.kernel_size[0] != module.kernel_size[1] or module.stride[0] != module.stride[1] or \
                    module.padding[0] != module.padding[1] or d != 1 or module.dilation[1] != 1:
                raise ValueError(f"tiling supports square, undilated convolutions, not {module}")
            if k == 1 and s == 1 and p == 0:
                continue  # pointwise (GDN is computed with F.conv2d, not a module, anyway)
            layers.append(module)
    return layers


def analysis_halo(g_a: nn.Module) -> tuple[int, int]:
    """(latents before, latents after) a core that g_a's receptive field reaches.

    Walks the Conv2d layers from the latent down to the pixels: output j of a conv
    (k, s, p) reads inputs s·j − p … s·j − p + k − 1."""
    lo, hi = 0, 0  # the interval of latent 0, in the coordinates of the current layer
    total_stride = 1
    for layer in reversed(_spatial_layers(g_a)):
        if not isinstance(layer, nn.Conv2d):
            raise ValueError("g_a must be made of Conv2d layers")
        k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        lo, hi = s * lo - p, s * hi - p + k - 1
        total_stride *= s
    if total_stride != DOWNSAMPLING:
        raise ValueError(f"g_a downsamples by {total_stride}, expected {DOWNSAMPLING}")
    # latent 0 reads pixels lo … hi; pixel block b covers b·16 … b·16 + 15.
    return -(lo // DOWNSAMPLING), hi // DOWNSAMPLING


def synthesis_halo(g_s: nn.Module) -> tuple[int, int]:
    """(latents before, latents after) a core that g_s's pixels of the core read.

    Walks the ConvTranspose2d layers from the pixels up to the latents: output o of
    a transposed conv (k, s, p) reads inputs ⌈(o + p − k + 1)/s⌉ … ⌊(o + p)/s⌋."""
    lo, hi = 0, DOWNSAMPLING - 1  # pixels of latent block 0
    total_stride = 1
    for layer in reversed(_spatial_layers(g_s)):
        if not isinstance(layer, nn.ConvTranspose2d):
            raise ValueError("g_s must be made of ConvTranspose2d layers")
        k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        if layer.output_padding[0] != s - 1:
            raise ValueError("g_s layers must exactly multiply the size by their stride")
        lo, hi = -((-(lo + p - k + 1)) // s), (hi + p) // s
        total_stride *= s
    if total_stride != DOWNSAMPLING:
        raise ValueError(f"g_s upsamples by {total_stride}, expected {DOWNSAMPLING}")
    return max(0, -lo), max(0, hi)


# ---- the tile grid ------------------------------------------------------------------

def check_tile(tile: int) -> int:
    if tile < DOWNSAMPLING or tile % DOWNSAMPLING:
        raise ValueError(f"tile must be a positive multiple of {DOWNSAMPLING} pixels, got {tile}")
    return tile // DOWNSAMPLING


def _splits(n: int, core: int) -> list[tuple[int, int]]:
    """Cut 0 … n−1 into ⌈n/core⌉ near-equal runs of at most ``core``."""
    parts = -(-n // core)
    bounds = [(k * n) // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def tiles(rows: int, cols: int, tile: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Latent core ranges ((r0, r1), (c0, c1)) covering a rows x cols latent grid.

    A grid that fits in one core is one tile: that is whole-image inference."""
    core = check_tile(tile)
    return [(r, c) for r in _splits(rows, core) for c in _splits(cols, core)]


def _with_halo(start: int, stop: int, n: int, halo: tuple[int, int]) -> tuple[int, int]:
    return max(0, start - halo[0]), min(n, stop + halo[1])


# ---- g_a ----------------------------------------------------------------------------

def _pixel_block(pixels: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """pixels[r0:r1, c0:c1] with rows/columns past the image replicated (the
    bottom/right replicate padding of pad_to_multiple)."""
    height, width = pixels.shape[:2]
    block = pixels[r0:min(r1, height), c0:min(c1, width)]
    if r1 > height or c1 > width:
        rows = np.minimum(np.arange(r0, r1), height - 1) - r0
        cols = np.minimum(np.arange(c0, c1), width - 1) - c0
        block = block[rows][:, cols]
    return block


def _to_input(block: np.ndarray) -> Tensor:
    """uint8 (h, w, 1|3) → float (1, 3, h, w) in [0, 1], in MEMORY_FORMAT.

    Built as NHWC and permuted, so a channels_last result has true channels_last
    strides (stride[0] = h·w·3). ``permute(2, 0, 1).unsqueeze(0)`` instead leaves
    stride[0] = 3: is_contiguous(channels_last) still says yes, but the convolutions
    then see an NCHW tensor and run (and answer) in NCHW, ~25% slower here."""
    x = torch.from_numpy(np.array(block, copy=True)).unsqueeze(0).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(1, 3, *x.shape[2:])
    return x.to(dtype=torch.float32, memory_format=MEMORY_FORMAT).div_(255.0)


def analysis_tiles(model, pixels: np.ndarray, quality: int, tile: int | None = None
                   ) -> Iterator[tuple[tuple[slice, slice], Tensor]]:
    """Yield (latent core slices, y·gain of that core as float (M, h, w)) tile by tile."""
    tile = DEFAULT_TILE if tile is None else tile
    height, width = pixels.shape[:2]
    rows, cols = -(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)
    halo = analysis_halo(model.g_a)
    d = DOWNSAMPLING
    for (r0, r1), (c0, c1) in tiles(rows, cols, tile):
        a0, a1 = _with_halo(r0, r1, rows, halo)
        b0, b1 = _with_halo(c0, c1, cols, halo)
        x = _to_input(_pixel_block(pixels, a0 * d, a1 * d, b0 * d, b1 * d))
        with torch.inference_mode():
            y = model.analysis(x, quality)[0, :, r0 - a0:r1 - a0, c0 - b0:c1 - b0]
        yield (slice(r0, r1), slice(c0, c1)), y


def check_pixels(pixels: np.ndarray) -> None:
    """Raise ValueError unless ``pixels`` is what g_a takes: uint8 of shape (H, W, 1|3)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError("pixels must be uint8 of shape (H, W, 3) or (H, W, 1)")


def quantize_tiled(model, pixels: np.ndarray, quality: int, tile: int | None = None,
                   progress: Progress | None = None) -> np.ndarray:
    """int64 latents round(g_a(x)·gain) of uint8 pixels (H, W, 1|3), computed in tiles.

    Raises ValueError if the analysis transform produces non-finite values."""
    check_pixels(pixels)
    height, width = pixels.shape[:2]
    latents = np.empty((model.config.M, -(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)), dtype=np.int64)
    grid = tiles(latents.shape[1], latents.shape[2], DEFAULT_TILE if tile is None else tile)
    for done, (where, y) in enumerate(analysis_tiles(model, pixels, quality, tile), 1):
        if not torch.isfinite(y).all():
            raise ValueError("analysis transform produced non-finite values")
        latents[:, where[0], where[1]] = torch.round(y).numpy()
        if progress is not None:
            progress(done, len(grid))
    return latents


# ---- g_s ----------------------------------------------------------------------------

def reconstruct_tiled(model, latents: np.ndarray, quality: int, height: int, width: int, gray: bool,
                      tile: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """uint8 pixels (H, W, 1|3) from integer latents (M, rows, cols), computed in tiles
    and written tile by tile into the output array."""
    tile = DEFAULT_TILE if tile is None else tile
    _, rows, cols = latents.shape
    d = DOWNSAMPLING
    if rows * d < height or cols * d < width:
        raise ValueError(f"latents of {rows}x{cols} cannot cover {height}x{width} pixels")
    halo = synthesis_halo(model.g_s)
    out = np.empty((height, width, 1 if gray else 3), dtype=np.uint8)
    grid = [t for t in tiles(rows, cols, tile) if t[0][0] * d < height and t[1][0] * d < width]
    for done, ((r0, r1), (c0, c1)) in enumerate(grid, 1):
        a0, a1 = _with_halo(r0, r1, rows, halo)
        b0, b1 = _with_halo(c0, c1, cols, halo)
        y_hat = torch.from_numpy(latents[:, a0:a1, b0:b1].astype(np.float32)).unsqueeze(0)
        y_hat = y_hat.contiguous(memory_format=MEMORY_FORMAT)
        # The core's pixels, cropped to the image (the padding is never written).
        p0, p1 = r0 * d, min(r1 * d, height)
        q0, q1 = c0 * d, min(c1 * d, width)
        with torch.inference_mode():
            x_hat = model.synthesis(y_hat, quality)[0, :, p0 - a0 * d:p1 - a0 * d, q0 - b0 * d:q1 - b0 * d]
            if gray:
                x_hat = x_hat.mean(dim=0, keepdim=True)
            x = torch.nan_to_num(x_hat, nan=0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        out[p0:p1, q0:q1] = x.permute(1, 2, 0).numpy()
        if progress is not None:
            progress(done, len(grid))
    return out
