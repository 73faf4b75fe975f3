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
whole image sees there: the replicate padding of :func:`nic.factorized.pad_to_multiple`
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

Memory: each tile is converted to float32 on its own. The pixels come from a
:class:`PixelRows` source read strip by strip (a whole uint8 array, or a file read a
few hundred rows at a time by :mod:`nic.streaming`), and the decoder hands each strip
of finished rows to a sink (an output array, or a streaming image writer). The
latents live in a :class:`LatentStore`: an array in memory, or, for images whose
latents would take more than ``SPILL_BYTES``, a temporary file (:class:`SpilledLatents`),
because the range coder's channel-major order needs every latent before the first
is coded (encoder) or after the last is decoded (decoder). Peak memory is then one
strip of pixels, one strip of latents and one tile's activations, whatever the image
size. The temporary file is the only I/O here.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterator, Protocol

import numpy as np

from .coding import LATENT_LIMIT

DOWNSAMPLING = 16
"""g_a halves height and width four times: one latent per 16x16 pixels."""

DEFAULT_TILE = 768
"""Tile core in pixels (a multiple of 16). Read at call time, so a caller or a
measurement script may change it; see docs/speed.md for how it was chosen."""

Progress = Callable[[int, int], None]
"""progress(tiles_done, tiles_total), called after each tile."""

SPILL_BYTES = 256 << 20
"""Latents (as int32) larger than this go to a temporary file instead of memory:
256 MiB is an image of about 87 megapixels (192 channels per 16x16 pixels)."""


# ---- pixel sources and latent stores -------------------------------------------------

class PixelRows(Protocol):
    """Rows of a uint8 image, read in order: ``read(n)`` returns the next n rows
    (fewer at the end) as (n, width, channels). nic.streaming's readers are these."""

    width: int
    height: int
    channels: int

    def read(self, count: int) -> np.ndarray: ...


class ArrayRows:
    """A whole uint8 image (H, W, 1|3) as :class:`PixelRows`."""

    def __init__(self, pixels: np.ndarray):
        check_pixels(pixels)
        self.pixels = pixels
        self.height, self.width, self.channels = pixels.shape
        self.position = 0

    def read(self, count: int) -> np.ndarray:
        start, self.position = self.position, min(self.height, self.position + count)
        return self.pixels[start:self.position]


def read_whole(source: PixelRows) -> np.ndarray:
    """Every row of a source, uint8 (H, W, C); ValueError if it ends early."""
    return _RowWindow(source).rows(0, source.height)


class _RowWindow:
    """Random access to rows start … stop−1 of a sequential source, for starts that
    never decrease: keeps only the rows from the last start on."""

    def __init__(self, source: PixelRows):
        self.source = source
        self.first = 0  # image row of buffer[0]
        self.buffer = np.empty((0, source.width, source.channels), dtype=np.uint8)
        self.whole = source.pixels if isinstance(source, ArrayRows) else None

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.whole is not None:  # no copy for an image already in memory
            return self.whole[start:stop]
        if start < self.first:
            raise ValueError("rows must be requested in order")
        end = self.first + len(self.buffer)
        first = min(start, end)  # image row of parts[0][0]; rows before ``start`` are dropped below
        parts = [self.buffer[first - self.first:]]
        have = end
        while have < stop:
            part = self.source.read(stop - have)
            if len(part) == 0:
                raise ValueError(f"image ended at row {have} of {self.source.height}")
            parts.append(part)
            have += len(part)
        buffer = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.buffer, self.first = buffer[start - first:], start
        return self.buffer[:stop - start]


class LatentStore:
    """Integer latents (M, rows, cols) in memory. The encoder puts tiles in raster
    order and the coder reads whole channels; the decoder puts whole channels and
    the synthesis reads strips of latent rows."""

    def __init__(self, shape: tuple[int, int, int], dtype=np.int64, array: np.ndarray | None = None):
        self.shape = tuple(shape)
        self.array = np.empty(self.shape, dtype=dtype) if array is None else array

    def put(self, rows: slice, cols: slice, values: np.ndarray) -> None:
        self.array[:, rows, cols] = values

    def finish(self) -> None:
        """Called once every tile is in."""

    def channel(self, c: int) -> np.ndarray:
        return self.array[c].reshape(-1)

    def put_channel(self, c: int, values: np.ndarray) -> None:
        self.array[c] = values.reshape(self.shape[1:])

    def patch(self, flat: np.ndarray, values: np.ndarray) -> None:
        """Set latents by flat index over the whole (M, rows, cols) grid, in increasing order."""
        self.array.reshape(-1)[flat] = values

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.array[:, start:stop]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SpilledLatents(LatentStore):
    """int32 (or float32) latents in an anonymous temporary file, channel-major like the
    array, so that a channel is one contiguous read and a strip of rows one read per
    channel. The file is unlinked at creation (nothing is left behind on a crash)."""

    ITEM = 4

    def __init__(self, shape: tuple[int, int, int], directory: str | None = None, dtype=np.int32):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        if self.dtype.itemsize != self.ITEM:
            raise ValueError(f"spilled latents are 4-byte values, not {self.dtype}")
        self.directory = directory or tempfile.gettempdir()
        try:
            self.file = tempfile.TemporaryFile(prefix="nic-latents-", dir=directory)
        except OSError as exc:
            raise self._failed(exc) from None
        self.fd = self.file.fileno()
        self.pending: tuple[int, int, np.ndarray] | None = None  # the strip being filled

    def _failed(self, exc: OSError) -> OSError:
        """The same error, saying which file failed (callers name only their own files)."""
        return OSError(exc.errno, f"temporary file for the latents in {self.directory}: "
                                  f"{exc.strerror or exc} (TMPDIR sets the folder)")

    def _offset(self, c: int, row: int) -> int:
        return (c * self.shape[1] * self.shape[2] + row * self.shape[2]) * self.ITEM

    def _write(self, offset: int, values: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(values, dtype=self.dtype)).cast("B")
        while len(view):
            try:
                done = os.pwrite(self.fd, view, offset)
            except OSError as exc:
                raise self._failed(exc) from None
            view, offset = view[done:], offset + done

    def _read(self, offset: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=self.dtype)
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise self._failed(exc) from None
            if got == 0:
                raise OSError(f"temporary file for the latents in {self.directory} is shorter than written")
            done += got
        return out

    def put(self, rows: slice, cols: slice, values: np.ndarray) -> None:
        if self.pending is None or self.pending[0] != rows.start:
            self.finish()
            strip = np.zeros((self.shape[0], rows.stop - rows.start, self.shape[2]), dtype=self.dtype)
            self.pending = (rows.start, rows.stop, strip)
        self.pending[2][:, :, cols] = values

    def finish(self) -> None:
        if self.pending is not None:
            start, _, strip = self.pending
            for c in range(self.shape[0]):
                self._write(self._offset(c, start), strip[c])
            self.pending = None

    def channel(self, c: int) -> np.ndarray:
        return self._read(self._offset(c, 0), self.shape[1] * self.shape[2])

    def put_channel(self, c: int, values: np.ndarray) -> None:
        self._write(self._offset(c, 0), values)

    def patch(self, flat: np.ndarray, values: np.ndarray) -> None:
        per_channel = self.shape[1] * self.shape[2]
        channels = flat // per_channel
        for c in np.unique(channels):
            take = channels == c
            data = self.channel(int(c))
            data[flat[take] - c * per_channel] = values[take]
            self.put_channel(int(c), data)

    def rows(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.shape[2]
        return np.stack([self._read(self._offset(c, start), count).reshape(stop - start, self.shape[2])
                         for c in range(self.shape[0])])

    def close(self) -> None:
        self.file.close()


def latent_store(shape: tuple[int, int, int], spill_bytes: int | None = None, dtype=np.int32) -> LatentStore:
    """Memory for small images, a temporary file above ``spill_bytes`` (default SPILL_BYTES);
    int32 latents, or float32 (the hyperprior family's ŷ, unrounded g_a outputs)."""
    limit = SPILL_BYTES if spill_bytes is None else spill_bytes
    if shape[0] * shape[1] * shape[2] * SpilledLatents.ITEM > limit:
        return SpilledLatents(shape, dtype=dtype)
    return LatentStore(shape, dtype)


# ---- halo from the architecture ------------------------------------------------------

def _spatial_layers(transform) -> list[tuple[bool, int, int, int, int]]:
    """(transposed, k, s, p, output padding) of each convolution of a transform: a torch
    module (its Conv2d / ConvTranspose2d) or a :class:`nic.engine.Network`."""
    layers = []
    for module in transform.modules():
        if hasattr(module, "geometry"):  # nic.engine
            k, s, p = module.geometry
            layers.append((module.transposed, k, s, p, s - 1 if module.transposed else 0))
            continue
        if not hasattr(module, "kernel_size"):
            continue  # a container, GDN, ReLU
        k, s, p, d = module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0]
        if module.kernel_size[0] != module.kernel_size[1] or module.stride[0] != module.stride[1] or \
                module.padding[0] != module.padding[1] or d != 1 or module.dilation[1] != 1:
            raise ValueError(f"tiling supports square, undilated convolutions, not {module}")
        if k == 1 and s == 1 and p == 0:
            continue  # pointwise (GDN is computed with F.conv2d, not a module, anyway)
        layers.append((bool(module.transposed), k, s, p, module.output_padding[0] if module.transposed else 0))
    return layers


def analysis_halo(g_a) -> tuple[int, int]:
    """(latents before, latents after) a core that g_a's receptive field reaches.

    Walks the Conv2d layers from the latent down to the pixels: output j of a conv
    (k, s, p) reads inputs s·j − p … s·j − p + k − 1."""
    lo, hi = 0, 0  # the interval of latent 0, in the coordinates of the current layer
    total_stride = 1
    for transposed, k, s, p, _ in reversed(_spatial_layers(g_a)):
        if transposed:
            raise ValueError("g_a must be made of convolutions")
        lo, hi = s * lo - p, s * hi - p + k - 1
        total_stride *= s
    if total_stride != DOWNSAMPLING:
        raise ValueError(f"g_a downsamples by {total_stride}, expected {DOWNSAMPLING}")
    # latent 0 reads pixels lo … hi; pixel block b covers b·16 … b·16 + 15.
    return -(lo // DOWNSAMPLING), hi // DOWNSAMPLING


def synthesis_halo(g_s) -> tuple[int, int]:
    """(latents before, latents after) a core that g_s's pixels of the core read.

    Walks the ConvTranspose2d layers from the pixels up to the latents: output o of
    a transposed conv (k, s, p) reads inputs ⌈(o + p − k + 1)/s⌉ … ⌊(o + p)/s⌋."""
    lo, hi = 0, DOWNSAMPLING - 1  # pixels of latent block 0
    total_stride = 1
    for transposed, k, s, p, output_padding in reversed(_spatial_layers(g_s)):
        if not transposed:
            raise ValueError("g_s must be made of transposed convolutions")
        if output_padding != s - 1:
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


def analysis_tiles(model, pixels: np.ndarray | PixelRows, quality: int, tile: int | None = None
                   ) -> Iterator[tuple[tuple[slice, slice], np.ndarray]]:
    """Yield (latent core slices, y·gain of that core as float (M, h, w)) tile by tile,
    in raster order; ``pixels`` is a uint8 array or a :class:`PixelRows` read in order."""
    source = ArrayRows(pixels) if isinstance(pixels, np.ndarray) else pixels
    window = _RowWindow(source)
    tile = DEFAULT_TILE if tile is None else tile
    height, width = source.height, source.width
    rows, cols = -(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)
    halo = analysis_halo(model.transforms(quality)[0])
    d = DOWNSAMPLING
    for r0, r1 in _splits(rows, check_tile(tile)):
        a0, a1 = _with_halo(r0, r1, rows, halo)
        strip = window.rows(a0 * d, min(a1 * d, height))
        for c0, c1 in _splits(cols, check_tile(tile)):
            b0, b1 = _with_halo(c0, c1, cols, halo)
            y = model.analysis_array(_pixel_block(strip, 0, (a1 - a0) * d, b0 * d, b1 * d), quality)
            yield (slice(r0, r1), slice(c0, c1)), y[:, r0 - a0:r1 - a0, c0 - b0:c1 - b0]


def check_pixels(pixels: np.ndarray) -> None:
    """Raise ValueError unless ``pixels`` is what g_a takes: uint8 of shape (H, W, 1|3)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError("pixels must be uint8 of shape (H, W, 3) or (H, W, 1)")


def analysis_latents(model, pixels: np.ndarray | PixelRows, quality: int, tile: int | None = None,
                     progress: Progress | None = None) -> np.ndarray:
    """Gained latents g_a(x)·gain, unrounded, float32 (M, rows, cols), computed in tiles
    (a uint8 array or :class:`PixelRows` read in order). ValueError for non-finite values."""
    height, width = (pixels.shape[:2] if isinstance(pixels, np.ndarray) else (pixels.height, pixels.width))
    store = LatentStore((model.config.M, -(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)), np.float32)
    analysis_into(model, pixels, quality, store, tile, progress)
    return store.array


def analysis_into(model, pixels: np.ndarray | PixelRows, quality: int, latents: LatentStore,
                  tile: int | None = None, progress: Progress | None = None, rounded: bool = False) -> None:
    """Put g_a(x)·gain of every tile into ``latents``, tile by tile: unrounded, or with
    ``rounded`` round(g_a(x)·gain). ValueError for non-finite values (and, rounded, for
    magnitudes an int32 store would wrap)."""
    _, rows, cols = latents.shape
    count = len(tiles(rows, cols, DEFAULT_TILE if tile is None else tile))
    for done, (where, y) in enumerate(analysis_tiles(model, pixels, quality, tile), 1):
        if not np.isfinite(y).all():
            raise ValueError("analysis transform produced non-finite values")
        if rounded:
            if float(np.abs(y).max()) >= LATENT_LIMIT:  # before an int32 store could wrap it
                raise ValueError("latent magnitude exceeds 2**31 - 1")
            y = np.round(y)
        latents.put(where[0], where[1], y)
        if progress is not None:
            progress(done, count)
    latents.finish()


def quantize_into(model, pixels: np.ndarray | PixelRows, quality: int, latents: LatentStore,
                  tile: int | None = None, progress: Progress | None = None) -> None:
    """Put round(g_a(x)·gain) of every tile into ``latents``, tile by tile.

    Raises ValueError if the analysis transform produces non-finite values."""
    analysis_into(model, pixels, quality, latents, tile, progress, rounded=True)


def quantize_tiled(model, pixels: np.ndarray, quality: int, tile: int | None = None,
                   progress: Progress | None = None) -> np.ndarray:
    """int64 latents round(g_a(x)·gain) of uint8 pixels (H, W, 1|3), computed in tiles."""
    check_pixels(pixels)
    height, width = pixels.shape[:2]
    store = LatentStore((model.config.M, -(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)))
    quantize_into(model, pixels, quality, store, tile, progress)
    return store.array


# ---- g_s ----------------------------------------------------------------------------

def squared_error(rows: Callable[[Callable[[np.ndarray], None]], None], pixels: np.ndarray) -> int:
    """Squared error against ``pixels`` of the rows that ``rows(sink)`` hands its sink,
    strip by strip, top to bottom: no second copy of the image."""
    error, row = [0], [0]

    def add(strip: np.ndarray) -> None:
        original = pixels[row[0]:row[0] + len(strip)]
        error[0] += int(np.sum((strip[..., :original.shape[2]].astype(np.int32) - original) ** 2, dtype=np.int64))
        row[0] += len(strip)

    rows(add)
    return error[0]


def reconstruct_into(model, latents: LatentStore, quality: int, height: int, width: int, gray: bool,
                     sink: Callable[[np.ndarray], None], tile: int | None = None,
                     progress: Progress | None = None) -> None:
    """Decode integer latents (M, rows, cols) in tiles and hand ``sink`` the uint8 pixel
    rows (n, width, 1|3) strip by strip, top to bottom: all ``height`` rows in all."""
    tile = DEFAULT_TILE if tile is None else tile
    _, rows, cols = latents.shape
    d = DOWNSAMPLING
    if rows * d < height or cols * d < width:
        raise ValueError(f"latents of {rows}x{cols} cannot cover {height}x{width} pixels")
    halo = synthesis_halo(model.transforms(quality)[1])
    core = check_tile(tile)
    row_runs = [(r0, r1) for r0, r1 in _splits(rows, core) if r0 * d < height]
    col_runs = [(c0, c1) for c0, c1 in _splits(cols, core) if c0 * d < width]
    done = 0
    for r0, r1 in row_runs:
        a0, a1 = _with_halo(r0, r1, rows, halo)
        band = latents.rows(a0, a1)
        p0, p1 = r0 * d, min(r1 * d, height)
        strip = np.empty((p1 - p0, width, 1 if gray else 3), dtype=np.uint8)
        for c0, c1 in col_runs:
            b0, b1 = _with_halo(c0, c1, cols, halo)
            # The core's pixels, cropped to the image (the padding is never written).
            q0, q1 = c0 * d, min(c1 * d, width)
            strip[:, q0:q1] = _core_pixels(model, band[:, :, b0:b1], quality, gray, p0 - a0 * d, p1 - a0 * d,
                                           q0 - b0 * d, q1 - b0 * d)
            done += 1
            if progress is not None:
                progress(done, len(row_runs) * len(col_runs))
        del band
        sink(strip)


def reconstruct_window(model, latents: LatentStore, quality: int, gray: bool, r0: int, r1: int, c0: int,
                       c1: int, tile: int | None = None) -> np.ndarray:
    """uint8 pixels (r1 − r0, c1 − c0, 1|3) of the image's rows r0..r1 and columns c0..c1
    (inside the image), decoded from the latents that reach them, a tile with g_s's halo
    at a time as :func:`reconstruct_into` decodes (memory bounded by the tile, not the
    window): its pixels there, without the rest of the image (to float rounding: the
    products are summed in blocks of other sizes)."""
    d = DOWNSAMPLING
    _, rows, cols = latents.shape
    halo = synthesis_halo(model.transforms(quality)[1])
    core = check_tile(DEFAULT_TILE if tile is None else tile)
    out = np.empty((r1 - r0, c1 - c0, 1 if gray else 3), dtype=np.uint8)
    first_row, first_col = r0 // d, c0 // d
    for s0, s1 in _splits(-(-r1 // d) - first_row, core):
        t0, t1 = first_row + s0, first_row + s1  # latent rows of this core
        a0, a1 = _with_halo(t0, t1, rows, halo)
        band = latents.rows(a0, a1)
        p0, p1 = max(r0, t0 * d), min(r1, t1 * d)  # its pixel rows inside the window
        for u0, u1 in _splits(-(-c1 // d) - first_col, core):
            v0, v1 = first_col + u0, first_col + u1
            b0, b1 = _with_halo(v0, v1, cols, halo)
            q0, q1 = max(c0, v0 * d), min(c1, v1 * d)
            out[p0 - r0:p1 - r0, q0 - c0:q1 - c0] = _core_pixels(model, band[:, :, b0:b1], quality, gray,
                                                                 p0 - a0 * d, p1 - a0 * d, q0 - b0 * d, q1 - b0 * d)
    return out


def _core_pixels(model, latents: np.ndarray, quality: int, gray: bool, y0: int, y1: int, x0: int,
                 x1: int) -> np.ndarray:
    """uint8 pixels (y1 − y0, x1 − x0, 1|3) of g_s on a tile's latents with their halo
    (M, rows, cols), cropped to the core's rows y0..y1 and columns x0..x1 of its output."""
    x_hat = model.synthesis_array(latents.astype(np.float32), quality)[:, y0:y1, x0:x1]
    if gray:
        x_hat = x_hat.mean(axis=0, keepdims=True, dtype=np.float32)
    return to_pixels(x_hat).transpose(1, 2, 0)


def to_pixels(x_hat: np.ndarray) -> np.ndarray:
    """uint8 of float pixels in [0, 1]: NaN → 0, clipped, ×255, rounded half to even."""
    x = np.fmax(x_hat, np.float32(0.0))  # NaN → 0 (fmax takes the number), and −inf
    np.fmin(x, np.float32(1.0), out=x)
    x *= np.float32(255.0)
    return np.round(x, out=x).astype(np.uint8)


def reconstruct_tiled(model, latents: np.ndarray, quality: int, height: int, width: int, gray: bool,
                      tile: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """uint8 pixels (H, W, 1|3) from integer latents (M, rows, cols), computed in tiles
    and written strip by strip into the output array."""
    out = np.empty((height, width, 1 if gray else 3), dtype=np.uint8)
    filled = 0

    def into_array(strip: np.ndarray) -> None:
        nonlocal filled
        out[filled:filled + len(strip)] = strip
        filled += len(strip)

    reconstruct_into(model, LatentStore(latents.shape, array=latents), quality, height, width, gray,
                     into_array, tile, progress)
    return out
