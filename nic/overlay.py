"""Pixel tiles over a model's file: where the model reconstructs an image badly (text,
line art, a UI pasted into a photo) those 64x64 tiles are coded by the ``pixels`` family
(:mod:`nic.pixels`) and pasted over the model's pixels at decode.

A hyperprior file with an overlay has three more substreams, before ẑ and ŷ:

| name | shape | content |
|------|-------|---------|
| ``tmap`` | (1, tile rows, tile columns): ẑ's grid, one tile per ẑ position (64x64 pixels) | one bit per tile in raster order, least significant bit first, 1 = a pixel tile; zero bits pad it to a multiple of 4 bytes; at least one tile |
| ``pset`` | (1, 1, 1) | the pixels family's step and tables, as in a ``pixels`` file |
| ``pixl`` | (1, latent rows, latent columns): the image's grid | the pixels family's indices of the tiles' image: the n tiles in raster order, packed row by row ⌈√n⌉ to a row (:func:`packed_size`), FILL where a tile cut by the image's edge, or a slot after the last tile, has no pixels |

The model codes the image with the overlay's tiles flattened to their mean colour (it
spends almost nothing on them); the decoder decodes the tiles' image (what it costs
follows the tile count, within the pixels family's MAX_PIXELS) and pastes the tiles
over the model's rows as they stream out. The encoder's choice is :func:`choose`'s.

Math only: arrays in, arrays out. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import pixels
from .container import HEADER_SIZE, VERSION_SUBSTREAMS, FormatError, Substream

TILE = 64
"""Tile side in pixels: one ẑ position (nic.hyperprior.HYPER_DOWNSAMPLING latents of 16)."""
NAMES = (b"tmap", b"pset", b"pixl")
FILL = 128
"""What the pixel image holds outside the overlay's tiles."""

CANDIDATE_EXACT = 0.8
CANDIDATE_EDGES = 0.01
CANDIDATE_FLAT = 0.5
"""A tile is worth a look where, over its sampled pixels of the three planes, at least
CANDIDATE_EXACT are predicted exactly at step 1 and at least CANDIDATE_EDGES jump by
EDGE or more, and one colour covers at least CANDIDATE_FLAT of it: a flat background
with hard edges, which photos (sensor noise, soft edges, gradients) rarely have. On
Kodak 9 tiles of kodim20 and 1 of kodim24 qualify; on the 36 Debian photos, 4 tiles of
2 (docs/results/hard-content.md, section 4)."""
LEAST_CANDIDATES = 4
"""Fewer candidates than this are not looked at: a photo's odd flat tile is not worth a
decode of its model file (seconds for a large photo), text or UI takes several tiles."""
EDGE = 48
STEPS = (1, 4, 16)
"""Pixel steps tried for each candidate tile."""
LOOKED_AT = 1024
"""At most this many candidates are tried, those the model reconstructs worst first."""
STRIP_TILES = 256
"""Candidates are priced in strips of at most this many tiles side by side (:func:`strip`)."""
LEAST_GAIN = 1024
"""A tile is tried only where a perfect free pixel tile would lower J by this many bits:
where it would not, the model's tile is already close (pixel tiles of the hard set cost
~400 bits and more at step 16)."""


def grid(height: int, width: int) -> tuple[int, int]:
    """(tile rows, tile columns) of an image."""
    return -(-height // TILE), -(-width // TILE)


def tile_slices(tiles: np.ndarray) -> list[tuple[slice, slice]]:
    """The pixel slices of the True tiles of a tile map, in raster order."""
    return [(slice(i * TILE, (i + 1) * TILE), slice(j * TILE, (j + 1) * TILE)) for i, j in zip(*np.nonzero(tiles))]


# ---- the tile map ------------------------------------------------------------------------

HEAD_BYTES = HEADER_SIZE + 8
"""Bytes of a file :func:`has_tiles` reads: the header, the substream count, a name."""


def has_tiles(head: bytes) -> bool:
    """Whether a file that begins with ``head`` (HEAD_BYTES or more) has pixel tiles: a
    version-2 file whose first substream is ``tmap``."""
    return (len(head) >= HEAD_BYTES and head[4] == VERSION_SUBSTREAMS
            and bytes(head[HEADER_SIZE + 4:HEAD_BYTES]) == NAMES[0])


def pack_map(tiles: np.ndarray) -> Substream:
    """``tmap`` of a bool tile map (tile rows, tile columns)."""
    bits = np.packbits(tiles.ravel().astype(np.uint8), bitorder="little").tobytes()
    return Substream(NAMES[0], (1, *tiles.shape), bits + bytes(-len(bits) % 4))


def unpack_map(stream: Substream, height: int, width: int) -> np.ndarray:
    """The bool tile map of ``tmap``; FormatError unless it is exactly what pack_map writes."""
    shape = grid(height, width)
    if tuple(stream.shape) != (1, *shape):
        raise FormatError(f"substream tmap has shape {'x'.join(map(str, stream.shape))}, "
                          f"expected 1x{shape[0]}x{shape[1]}")
    count = shape[0] * shape[1]
    size = -(-count // 8)
    data = stream.data
    if len(data) != size + (-size % 4) or any(data[size:]):
        raise FormatError("substream tmap has the wrong length or non-zero padding")
    bits = np.unpackbits(np.frombuffer(data[:size], dtype=np.uint8), bitorder="little")
    if bits[count:].any():
        raise FormatError("substream tmap sets bits beyond its tiles")
    tiles = bits[:count].reshape(shape).astype(bool)
    if not tiles.any():
        raise FormatError("substream tmap selects no tile")
    return tiles


# ---- images ------------------------------------------------------------------------------

def packed_size(count: int) -> tuple[int, int]:
    """(rows, columns) of tiles of the pixel image that holds ``count`` tiles: about square."""
    columns = max(1, int(np.ceil(np.sqrt(count))))
    return -(-count // columns), columns


def pixel_image(image: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """The image the pixels family codes: the tiles in raster order, packed row by row
    into :func:`packed_size`'s grid; a tile cut by the image's edge, and the slots after
    the last tile, are FILL where they have no pixels."""
    places = tile_slices(tiles)
    return _packed(image, places, packed_size(len(places))[1])[0]


def _packed(image: np.ndarray, places: list[tuple[slice, slice]], columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(the tiles at ``places`` packed ``columns`` to a row, FILL where they have no
    pixels; bool: where they have)."""
    rows = -(-len(places) // columns)
    out = np.full((rows * TILE, columns * TILE, image.shape[2]), FILL, dtype=np.uint8)
    real = np.zeros(out.shape[:2], dtype=bool)
    for n, (r, c) in enumerate(places):
        block = image[r, c]
        top, left = (n // columns) * TILE, (n % columns) * TILE
        out[top:top + block.shape[0], left:left + block.shape[1]] = block
        real[top:top + block.shape[0], left:left + block.shape[1]] = True
    return out, real


def flattened(image: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """The image the model codes: each tile of the overlay at its mean colour."""
    out = image.copy()
    for rows, cols in tile_slices(tiles):
        block = image[rows, cols]
        out[rows, cols] = np.round(block.reshape(-1, block.shape[2]).mean(axis=0)).astype(np.uint8)
    return out


def paster(sink: Callable[[np.ndarray], None], packed: np.ndarray, tiles: np.ndarray
           ) -> Callable[[np.ndarray], None]:
    """A sink that pastes the overlay's tiles (from the decoded pixel image ``packed``,
    :func:`pixel_image`'s layout) over each strip of the model's rows before handing it on."""
    columns = packed_size(int(tiles.sum()))[1]
    places = [(r, c, (n // columns) * TILE, (n % columns) * TILE) for n, (r, c) in enumerate(tile_slices(tiles))]
    done = [0]

    def paste(rows: np.ndarray) -> None:
        start, stop = done[0], done[0] + len(rows)
        copied = False
        for r, c, top, left in places:
            first, last = max(start, r.start), min(stop, r.stop)
            if first >= last:
                continue
            if not copied:
                rows, copied = rows.copy(), True
            cols = slice(c.start, min(c.stop, rows.shape[1]))
            rows[first - start:last - start, cols] = packed[top + first - r.start:top + last - r.start,
                                                            left:left + cols.stop - cols.start, :rows.shape[2]]
        done[0] = stop
        sink(rows)

    return paste


def decode(streams: list[Substream], height: int, width: int, gray: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tile map, decoded pixel image of the tiles, packed) of an overlay's three substreams."""
    tiles = unpack_map(streams[0], height, width)
    grid_shape = (1, *pixels._latent_grid(height, width))
    if tuple(streams[2].shape) != grid_shape:
        raise FormatError(f"substream pixl has shape {'x'.join(map(str, streams[2].shape))}, "
                          f"expected {'x'.join(map(str, grid_shape))}")
    rows, columns = packed_size(int(tiles.sum()))
    size = (rows * TILE, columns * TILE)
    coded = Substream(streams[2].name, (1, *pixels._latent_grid(*size)), streams[2].data)
    out: list[np.ndarray] = []
    pixels.decompress(pixels.MODEL, 1, *size, gray, [streams[1], coded], out.append)
    return tiles, np.concatenate(out)


# ---- the encoder's choice --------------------------------------------------------------------

SAMPLED_ROWS = 16
""":func:`candidates` looks at the first SAMPLED_ROWS rows of each row of tiles."""


def candidates(image: np.ndarray) -> np.ndarray:
    """Bool tile map of the tiles worth a look (CANDIDATE_EXACT, CANDIDATE_EDGES from the
    residuals at step 1, nic.pixels.residuals, on the first SAMPLED_ROWS rows of each row
    of tiles; then CANDIDATE_FLAT on the whole tile; LEAST_CANDIDATES): a photo, answered
    from G's residuals alone, costs it ~4 ms at 768x512. A gray image gets the tiles its all-gray RGB
    version gets."""
    height, width = image.shape[:2]
    rows, cols = grid(height, width)
    band = min(SAMPLED_ROWS, TILE)
    sample = np.concatenate([image[r * TILE:r * TILE + band] for r in range(rows)])
    values = sample.astype(np.int32) - pixels.CENTRE
    # The planes the pixels family codes (G, then R and B on G); a gray image as the
    # all-gray RGB image it stands for (R − G = B − G = 0), so both are judged alike.
    green = values[..., 0] if image.shape[2] == 1 else values[..., 1]
    # Each row of tiles' sampled rows, in a (rows, band, cols·TILE) grid (the last band may be short).
    starts = np.cumsum([0] + [min(band, height - r * TILE) for r in range(rows)])
    pad = cols * TILE - width

    def share(values: np.ndarray) -> np.ndarray:
        out = np.zeros((rows, cols))
        for r in range(rows):
            part = np.pad(values[starts[r]:starts[r + 1]], ((0, 0), (0, pad)))
            count = np.pad(np.ones(part.shape[0:1] + (width,), np.float32), ((0, 0), (0, pad)))
            out[r] = (part.reshape(len(part), cols, TILE).sum(axis=(0, 2))
                      / count.reshape(len(part), cols, TILE).sum(axis=(0, 2)))
        return out

    magnitudes = [np.abs(pixels.residuals(green)[0])]
    if image.shape[2] == 3:
        # A tile's three shares of exact predictions average CANDIDATE_EXACT only where
        # G's is at least 3·CANDIDATE_EXACT − 2 (R's and B's are at most 1): a photo, with
        # fewer such tiles than LEAST_CANDIDATES, is answered from G alone.
        least = 3 * CANDIDATE_EXACT - 2 - 1e-3  # a margin for the shares' float rounding
        if (share((magnitudes[0] == 0).astype(np.float32)) >= least).sum() < LEAST_CANDIDATES:
            return np.zeros((rows, cols), dtype=bool)
        magnitudes += [np.abs(pixels.residuals(values[..., c] - green)[0]) for c in (0, 2)]
    else:  # R − G = B − G = 0: their residuals are 0, each exact and no edge
        magnitudes += [np.zeros_like(magnitudes[0])] * 2
    exact = sum((k == 0).astype(np.float32) for k in magnitudes) / 3
    edges = sum((k >= EDGE).astype(np.float32) for k in magnitudes) / 3
    looked = (share(exact) >= CANDIDATE_EXACT) & (share(edges) >= CANDIDATE_EDGES)
    for rows_, cols_ in tile_slices(looked):  # and a background: one colour on CANDIDATE_FLAT of the tile
        tile = image[rows_, cols_].reshape(-1, image.shape[2]).astype(np.int64)
        colour = (tile << np.arange(0, 8 * image.shape[2], 8)).sum(axis=1)
        if np.unique(colour, return_counts=True)[1].max() < CANDIDATE_FLAT * len(colour):
            looked[rows_.start // TILE, cols_.start // TILE] = False
    return looked if looked.sum() >= LEAST_CANDIDATES else np.zeros_like(looked)


@dataclass(frozen=True)
class Choice:
    tiles: np.ndarray  # bool (tile rows, tile columns)
    step: int


def strip(image: np.ndarray, places: list[tuple[slice, slice]]) -> tuple[np.ndarray, np.ndarray]:
    """(the tiles at ``places`` side by side, (TILE, n·TILE), FILL where a tile cut by
    the image's edge has no pixels; bool: where they have): one scan of the pixels
    family prices them all."""
    return _packed(image, places, len(places))


def choose(image: np.ndarray, model_pixels: np.ndarray, looked: np.ndarray, weight: float) -> Choice | None:
    """The tiles (among ``looked``: the LOOKED_AT the model reconstructs worst, where that
    could pay, LEAST_GAIN) and the one pixel step for which pixel tiles lower J = bits +
    weight·SSE against the model's decoded pixels; None where none does. The tiles are
    priced side by side, a strip of up to STRIP_TILES in one scan per step
    (:func:`strip`): each tile's bits under the tables the strip shares, whose
    description counts once per strip."""
    places = tile_slices(looked)
    errors = np.array([float(np.sum((model_pixels[rows, cols].astype(np.int64) - image[rows, cols]) ** 2))
                       for rows, cols in places])
    worst = sorted(n for n in np.argsort(-errors, kind="stable")[:LOOKED_AT] if weight * errors[n] >= LEAST_GAIN)
    if not worst:
        return None
    places = [places[n] for n in worst]
    errors = errors[worst]
    gains = np.zeros((len(STEPS), len(places)))
    totals = np.zeros(len(STEPS))
    for first in range(0, len(places), STRIP_TILES):
        part = slice(first, first + STRIP_TILES)
        tiles, real = strip(image, places[part])
        for s, step in enumerate(STEPS):
            found = pixels.trial(tiles, step, per_column=True, counted=real)  # no error counted on FILL
            bits, squared = (values.reshape(-1, TILE).sum(axis=1) for values in found.columns)
            gains[s, part] = bits + weight * (squared - errors[part])
            description = found.bits() - found.columns[0].sum()  # the parameters and the strip's tables
            totals[s] += np.minimum(gains[s, part], 0).sum() + description
    best = int(np.argmin(totals))
    chosen = gains[best] < 0
    if totals[best] >= 0 or not chosen.any():
        return None
    tiles = np.zeros_like(looked)
    for (rows, cols), take in zip(places, chosen):
        if take:
            tiles[rows.start // TILE, cols.start // TILE] = True
    return Choice(tiles, STEPS[best])


def encode(image: np.ndarray, choice: Choice, weight: float | None = None) -> list[Substream]:
    """The overlay's substreams (tmap, pset, pixl) for an image and a choice: ``pixl``
    declares the image's latent grid (its packed image's own size follows from the tile
    count). The tiles are coded with the pixels family's scan at the choice's step or,
    given ``weight`` (λ per squared error), in whichever of that and its dictionary coding,
    lossless or at the step, has the least bits + weight·squared error on the tiles' pixels."""
    places = tile_slices(choice.tiles)
    packed, real = _packed(image, places, packed_size(len(places))[1])
    found = pixels.trial(packed, choice.step, keep=True)
    if weight is not None:
        def price(candidate) -> float:
            decoded: list = []
            pixels.decompress(pixels.MODEL, 1, *packed.shape[:2], packed.shape[2] == 1,
                              pixels.encode_trial(candidate, *packed.shape[:2]), decoded.append)
            error = (np.concatenate(decoded).astype(np.int64) - packed)[real]
            return candidate.bits() + weight * float(np.sum(error ** 2))

        steps = sorted({1, choice.step})
        found = min([found] + [pixels.dictionary_trial(packed, step) for step in steps], key=price)
    pset, pixl = pixels.encode_trial(found, *packed.shape[:2])
    grid_shape = (1, *pixels._latent_grid(*image.shape[:2]))
    return [pack_map(choice.tiles), pset, Substream(pixl.name, grid_shape, pixl.data)]
