"""The codec of Ballé, Laparra and Simoncelli, "End-to-end optimized image
compression" (ICLR 2017), with one shared pair of transforms for all qualities
(and, optionally, a pair of its own for some of them).

    x ──g_a──▶ y ──·gain[q]──▶ round ──▶ ŷ (integers, range coded)
    x̂ ◀──g_s── ŷ · inv_gain[q] ◀──────────┘

g_a is conv5x5/2 → GDN → conv5x5/2 → GDN → conv5x5/2 → GDN → conv5x5/2 with N, N, N,
M channels; g_s mirrors it with transposed convolutions and IGDN (the layer shape of
CompressAI's bmshj2018-factorized). Each quality q has its own λ, a gain vector and
an inverse-gain vector over the M latent channels (Cui et al., "Asymmetric gained
deep image compression with continuous rate adaptation", CVPR 2021) and its own
factorized density, so one training run serves every rate. Training replaces
rounding by additive uniform noise and minimizes R + λ·255²·MSE (bits per pixel).

A shared pair of transforms is a compromise between the rates: fine-tuned for one
quality alone it codes that quality's images ~8-10 % smaller at equal PSNR at the low
rates (docs/results/training.md, "Compute strategy"). A *specialized* quality therefore has
its own g_a/g_s (``Config.specialized``), started from the shared pair and trained
for its λ alone; the others keep the shared pair. The bitstream does not change: ŷ
has the same M channels and is coded with the quality's own integer tables. An own
pair may be wider than the shared one (``Config.specialized_N``: more hidden channels
for the high rates, where the published models use N=192): it starts as the narrower
pair plus channels that do not change its output yet (:func:`embed_transform`).

Coding needs no torch: :class:`Model` runs the transforms with :mod:`nic.engine` (numpy)
from the weights file's arrays. The trainable network (``Codec``, training, export,
``specialize``) is :mod:`nic.factorized_torch`; its names are reachable from here too
(``nic.factorized.Codec``), torch being imported on first use.

This module is math only: arrays in, bytes out, no I/O of its own; the family
functions at the end keep the latents of very large images in
:func:`nic.tiling.latent_store` (a temporary file above ~87 megapixels).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import engine
from .coding import CorruptStream, IntegerTables, LatentCoder
from .container import FormatError, Substream
from .families import expect_substreams, import_with_torch, trainable_names
from .tiling import (DOWNSAMPLING, LatentStore, PixelRows, Progress, latent_store, quantize_into,
                     quantize_tiled, reconstruct_into, reconstruct_tiled)

MODEL_ID = 1
NAME = "factorized"
FORMAT_VERSION = 1
"""The container version this family writes: one substream, as every file since the first."""

MSE_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)
"""CompressAI's MSE λ per quality 1..8 (loss λ·255²·MSE + bpp)."""

MAX_CHANNELS = 1024
"""Largest N or M a weights file may declare (the shipped model has 128 and 192)."""

_BUILDING = threading.RLock()  # a loaded model is shared by every thread of a process (nic.weights)


@dataclass(frozen=True)
class Config:
    """Everything needed to rebuild the network; saved inside the weights file."""

    model_id: int = 1  # stable id written into every .nic file
    name: str = "bls2017-gained"
    N: int = 128
    M: int = 192
    lambdas: tuple[float, ...] = MSE_LAMBDAS
    decoder_finetuned: bool = False  # g_s retrained on rounded latents (nic train --finetune-decoder)
    specialized: tuple[int, ...] = ()  # qualities (1-based) with their own g_a/g_s, see specialize()
    specialized_N: tuple[int, ...] = ()  # hidden channels of each own pair (same order); () = all N

    def pair_N(self, quality: int) -> int:
        """Hidden channels of the transforms that ``quality`` runs through."""
        if self.specialized_N and quality in self.specialized:
            return self.specialized_N[self.specialized.index(quality)]
        return self.N

    @property
    def qualities(self) -> int:
        return len(self.lambdas)

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        for name in ("specialized", "specialized_N"):
            if not fields[name]:
                del fields[name]  # so weights without them keep the bytes (and hash) they had
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        """Parse and validate (before anything is allocated from these numbers)."""
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("config is not an object")
        fields["lambdas"] = tuple(fields.get("lambdas", ()))
        for name in ("specialized", "specialized_N"):
            if not isinstance(fields.get(name, []), list):
                raise ValueError(f"config field {name} must be a list")
            fields[name] = tuple(fields.get(name, ()))
        config = cls(**fields)
        for name in ("model_id", "N", "M"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHANNELS:
                raise ValueError(f"config field {name} = {value!r} is out of range")
        if not isinstance(config.decoder_finetuned, bool):
            raise ValueError("config field decoder_finetuned must be true or false")
        if not 1 <= len(config.lambdas) <= 255 or not all(
                isinstance(v, (int, float)) and 0 < v < 1e6 for v in config.lambdas):
            raise ValueError("config lambdas must be 1..255 positive numbers")
        if list(config.specialized) != sorted(set(config.specialized)) or not all(
                isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= config.qualities
                for q in config.specialized):
            raise ValueError(f"config field specialized must list qualities of 1..{config.qualities} in order")
        if config.specialized_N and (len(config.specialized_N) != len(config.specialized) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHANNELS
                for n in config.specialized_N)):
            raise ValueError(f"config field specialized_N must give 1..{MAX_CHANNELS} channels "
                             "for each specialized quality")
        return config


def latent_shape(config: Config, height: int, width: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of ŷ for an image of height x width pixels."""
    return config.M, -(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)


def pair_shapes(N: int, M: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a pair of transforms ("g_a.0.weight": ...), nothing allocated
    (the layers of analysis_transform and synthesis_transform, in order)."""
    kernel = (5, 5)
    shapes: dict[str, tuple[int, ...]] = {}
    # Conv2d weights are (out, in, k, k), ConvTranspose2d weights (in, out, k, k).
    for part, layers in (("g_a", ((N, 3), (N, N), (N, N), (M, N))), ("g_s", ((M, N), (N, N), (N, N), (N, 3)))):
        for i, (first, second) in enumerate(layers):
            shapes[f"{part}.{2 * i}.weight"] = (first, second, *kernel)
            shapes[f"{part}.{2 * i}.bias"] = (first if part == "g_a" else second,)
            if i < 3:
                shapes[f"{part}.{2 * i + 1}.beta"] = (N,)
                shapes[f"{part}.{2 * i + 1}.gamma"] = (N, N)
    return shapes


def transform_pair(name: str) -> tuple[str, str] | None:
    """(pair, part) of a transform parameter: pair "" for the shared one or "q3" for
    quality 3's own, part "g_a" or "g_s"; None for any other parameter."""
    fields = name.split(".")
    pair, part = (fields[1], fields[2]) if fields[0] == "own" and len(fields) > 2 else ("", fields[0])
    return (pair, part) if part in ("g_a", "g_s") else None


def transform_part(name: str) -> str | None:
    """"g_a" or "g_s" for a parameter of a (shared or own) transform, else None."""
    found = transform_pair(name)
    return found[1] if found else None


def is_conv_kernel(name: str, ndim: int) -> bool:
    """Whether a parameter is a g_a/g_s convolution kernel (stored as fp16 with ``half``)."""
    return ndim == 4 and transform_part(name) is not None


# ---- weights as plain arrays (no pickle) -------------------------------------------

def read_config(arrays: dict[str, np.ndarray]) -> Config:
    """The config of a weights file's arrays; ValueError if it is missing or invalid."""
    try:
        return Config.from_json(bytes(arrays["config"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"weights have no valid config ({exc})") from None


def check_arrays(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], kinds: str = "f") -> None:
    """ValueError unless ``arrays`` has an array of each name and shape, floating point
    (or of another of numpy's ``kinds``) (from the headers alone where ``arrays`` reads on
    use: nic.weights.LazyArrays)."""
    for name, expected in shapes.items():
        if name not in arrays:
            raise ValueError(f"weights lack tensor {name}")
        shape, dtype = arrays.describe(name) if hasattr(arrays, "describe") else (arrays[name].shape, arrays[name].dtype)
        if tuple(shape) != expected:
            raise ValueError(f"tensor {name} has shape {shape}, expected {expected}")
        if dtype.kind not in kinds:
            raise ValueError(f"tensor {name} has dtype {dtype}, expected floating point")


def read_tables(arrays: dict[str, np.ndarray], config: Config) -> list[IntegerTables]:
    """Each quality's integer tables; ValueError if missing or inconsistent."""
    tables = []
    for q in range(config.qualities):
        try:
            table = IntegerTables(
                offsets=arrays[f"tables.{q}.offsets"].astype(np.int32),
                lengths=arrays[f"tables.{q}.lengths"].astype(np.int32),
                frequencies=arrays[f"tables.{q}.frequencies"].astype(np.int32),
            )
        except KeyError:
            raise ValueError(f"weights lack the integer tables of quality {q + 1}") from None
        if table.offsets.shape != (config.M,) or table.lengths.shape != (config.M,) or \
                len(table.frequencies) != int((table.lengths + 1).sum()) or (table.lengths < 1).any():
            raise ValueError(f"integer tables of quality {q + 1} are inconsistent")
        tables.append(table)
    return tables


# ---- coding without torch ------------------------------------------------------------

class Model:
    """The factorized family as the coder runs it: the weights file's arrays, the
    transforms in numpy (:mod:`nic.engine`), the integer tables. No torch.

    A quality's own pair (``Config.specialized``) is checked and built when the quality
    is first used, each transform when it first runs (an encoder never builds its g_s).
    ``at_precision("bf16")`` is the same model with its transforms in bf16
    (:mod:`nic.precision`). ``network()`` is the same weights as a torch ``Codec``, built
    once, for what differentiates through the transforms (the encoder's effort 2..4)."""

    precision = "fp32"

    def __init__(self, arrays: dict[str, np.ndarray]):
        config = read_config(arrays)
        Q, M = config.qualities, config.M
        # The shared pair and the gains now; an own pair when its quality is first used.
        shapes = {name: shape for name, shape in pair_shapes(config.N, config.M).items()}
        shapes.update({"gain": (Q, M), "inverse_gain": (Q, M)})
        check_arrays(arrays, shapes)
        self.config = config
        self.tables = read_tables(arrays, config)
        self.gain = arrays["gain"].astype(np.float32)
        self.inverse_gain = arrays["inverse_gain"].astype(np.float32)
        self._arrays = arrays
        self._pairs: dict[tuple[int, str], tuple] = {}  # (own pair's quality or 0, precision): (g_a, g_s)
        self._views = {"fp32": self}
        self._network = None

    @property
    def qualities(self) -> int:
        return self.config.qualities

    @property
    def latent_channels(self) -> int:
        return self.config.M

    def transforms(self, quality: int) -> tuple:
        """(g_a, g_s) of a quality at the model's precision: its own pair if it is
        specialized, else the shared one (:class:`nic.engine.Network` in fp32,
        :class:`nic.precision.Transform` in bf16)."""
        return self._pair(quality if quality in self.config.specialized else 0, self.precision)

    def _pair(self, own: int, precision: str) -> tuple:
        """(g_a, g_s) of quality ``own``'s own pair (0: the shared one), built once."""
        key = (own, precision)
        if key not in self._pairs:
            with _BUILDING:
                if key not in self._pairs:
                    if precision == "bf16":
                        from .precision import Transform

                        g_a, g_s = self._pair(own, "fp32")  # their layers, unbuilt until used
                        self._pairs[key] = (Transform(g_a, analysis=True), Transform(g_s, analysis=False))
                    else:
                        self._pairs[key] = self._fp32_pair(own)
        return self._pairs[key]

    def _fp32_pair(self, own: int) -> tuple[engine.Network, engine.Network]:
        prefix = f"own.q{own}." if own else ""
        if own:
            pair = pair_shapes(self.config.pair_N(own), self.config.M)
            check_arrays(self._arrays, {prefix + name: shape for name, shape in pair.items()})
        return (engine.Network(lambda: _layers(self._arrays, prefix, "g_a")),
                engine.Network(lambda: _layers(self._arrays, prefix, "g_s")))

    def at_precision(self, precision: str) -> "Model":
        """This model with its transforms in ``precision`` ("fp32" or "bf16"), sharing its
        weights, tables and built transforms (one view per precision, kept)."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"no precision {precision!r}")
        with _BUILDING:
            if precision not in self._views:
                view = copy.copy(self)
                view.precision = precision
                self._views[precision] = view
        return self._views[precision]

    def analysis_array(self, block: np.ndarray, quality: int) -> np.ndarray:
        """y·gain, float32 (M, h/16, w/16), of uint8 pixels (h, w, 1|3), h and w multiples of 16."""
        x = block.astype(np.float32)
        x /= np.float32(255.0)
        if x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        y = self.transforms(quality)[0](x)
        y *= self.gain[quality - 1]
        return y.transpose(2, 0, 1)

    def synthesis_array(self, y_hat: np.ndarray, quality: int) -> np.ndarray:
        """x̂, float32 (3, 16·h, 16·w) in [0, 1] (not clipped), of latents (M, h, w)."""
        y = y_hat.transpose(1, 2, 0).astype(np.float32)
        y *= self.inverse_gain[quality - 1]
        return self.transforms(quality)[1](y).transpose(2, 0, 1)

    def network(self):
        """The same weights as a torch ``Codec`` (nic.factorized_torch), built on first use
        (once for all precisions: the efforts' search runs it in fp32)."""
        if self.precision != "fp32":
            return self._views["fp32"].network()
        if self._network is None:
            with _BUILDING:
                if self._network is None:
                    self._network = import_with_torch("nic.factorized_torch").from_arrays(self._arrays)
        return self._network


def _layers(arrays: dict[str, np.ndarray], prefix: str, part: str) -> list:
    """The layers of ``part`` ("g_a" or "g_s") of ``prefix`` ("" or "own.q3."): g_a is
    conv5x5/2, then GDN and conv5x5/2 three times; g_s the same with transposed
    convolutions and IGDN."""
    convolution = engine.Conv if part == "g_a" else engine.Deconv
    layers: list = []
    for i in range(4):
        name = f"{prefix}{part}.{2 * i}"
        layers.append(convolution(arrays[f"{name}.weight"], arrays[f"{name}.bias"], 2))
        if i < 3:
            name = f"{prefix}{part}.{2 * i + 1}"
            layers.append(engine.GDN.from_parameters(arrays[f"{name}.beta"], arrays[f"{name}.gamma"],
                                                     inverse=part == "g_s"))
    return layers


def load(arrays: dict[str, np.ndarray]) -> Model:
    """The model that codes files (nic.families): numpy only."""
    return Model(arrays)


def trainable(model):
    """The torch ``Codec`` of a model (itself if it is one)."""
    return model.network() if isinstance(model, Model) else model


# The trainable network's names (``Codec``, ``from_arrays``, ``specialize``, …) from
# nic.factorized_torch, imported on first use: coding never imports torch.
__getattr__ = trainable_names("nic.factorized_torch", "nic.factorized")


# ---- the family: pixels to substreams and back (nic.families) --------------------------

_CODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def coder(model: Model, quality: int) -> LatentCoder:
    """The range coder of a quality's integer tables, built once per model and quality.
    Kept beside the model, not on it, so the model stays copyable (constriction's models
    do not pickle)."""
    cache = _CODERS.setdefault(model, {})
    if quality not in cache:
        cache[quality] = LatentCoder(model.tables[quality - 1])
    return cache[quality]


def quantize_latents(model: Model, pixels: np.ndarray, quality: int, effort: int = 1,
                     progress: Progress | None = None) -> np.ndarray:
    """Integer latents of uint8 pixels (H, W, 1|3): round(g_a(x)·gain) in tiles
    (nic.tiling) at effort 1, chosen by D + λR at higher efforts (nic.quantization)."""
    if effort == 1:
        return quantize_tiled(model, pixels, quality, progress=progress)
    quantization = import_with_torch("nic.quantization")  # the search differentiates through g_s
    return quantization.quantize(trainable(model), pixels, quality, effort, progress=progress)


def reconstruct(model: Model, latents: np.ndarray, quality: int, height: int, width: int, gray: bool,
                progress: Progress | None = None) -> np.ndarray:
    """uint8 pixels (H, W, 1|3) from integer latents, in tiles (nic.tiling)."""
    return reconstruct_tiled(model, latents, quality, height, width, gray, progress=progress)


def compress(model: Model, source: np.ndarray | PixelRows, quality: int, effort: int = 1,
             progress: Progress | None = None, spill_bytes: int | None = None) -> list[Substream]:
    """The substreams of an image: ŷ alone. ``source`` is a uint8 array (H, W, 1|3), or
    rows read strip by strip (effort 1 only), whose latents wait in a
    :class:`nic.tiling.LatentStore` (a temporary file above ``spill_bytes``)."""
    if isinstance(source, np.ndarray):
        latents = quantize_latents(model, source, quality, effort, progress)
        return [Substream(b"yhat", latents.shape, coder(model, quality).encode(latents))]
    if effort != 1:
        raise ValueError("images read strip by strip are encoded at effort 1")
    shape = latent_shape(model.config, source.height, source.width)
    with latent_store(shape, spill_bytes) as latents:
        quantize_into(model, source, quality, latents, progress=progress)
        payload = coder(model, quality).encode_channels(latents.channel)
    return [Substream(b"yhat", shape, payload)]


def decompress(model: Model, quality: int, height: int, width: int, gray: bool, substreams: list[Substream],
               sink: Callable[[np.ndarray], None], progress: Progress | None = None,
               spill_bytes: int | None = None, on_latents: Callable[[LatentStore], None] | None = None) -> None:
    """Decode the substreams and hand ``sink`` the uint8 pixel rows, top to bottom.
    ``on_latents(store)`` sees the decoded integers before the synthesis runs."""
    (stream,) = expect_substreams(substreams, [(b"yhat", latent_shape(model.config, height, width))])
    with latent_store(stream.shape, spill_bytes) as latents:
        try:
            coder(model, quality).decode_channels(stream.data, stream.shape, latents.put_channel, latents.patch)
        except CorruptStream as exc:
            raise FormatError(f"substream yhat is corrupt: {exc}") from None
        if on_latents is not None:
            on_latents(latents)
        reconstruct_into(model, latents, quality, height, width, gray, sink, progress=progress)
