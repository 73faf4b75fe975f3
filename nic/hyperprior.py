"""The mean-scale hyperprior family: Minnen, Ballé and Toderici, "Joint autoregressive
and hierarchical priors for learned image compression" (NeurIPS 2018), without the
autoregressive context, so decoding stays parallel; its hyper-decoder runs in
integer arithmetic (Ballé, Johnston and Minnen, "Integer networks for data
compression with latent-variable models", ICLR 2019).

    x ──g_a──▶ y ──h_a──▶ z ──round──▶ ẑ (factorized density, integer tables)
                                        │
                          (μ, t) ◀─h_s──┘   integer network: the same μ and t everywhere
    residual k = round(y − μ), coded with the integer table of scale index t
    x̂ ◀──g_s── ŷ = k + μ

g_a and g_s (with each quality's gains, and own pairs) are a factorized model's
(:mod:`nic.factorized`): the family starts from the shipped transforms. Each quality has
its own h_a/h_s and z density, as it has its own gains. h_s predicts, for every latent,
a mean μ and a real *scale index* t into the Gaussian conditional's fixed table of
scales (:class:`nic.entropy.GaussianConditional`); the coder uses round(t).

Determinism. Whatever picks a table or a mean at the decoder must come out the same
on every machine and thread count, so the exported h_s is an integer network
(:class:`IntegerHyperSynthesis`, within the bounds of :mod:`nic.integer`): integer
weights, integer activations, and sums that are exact in float64 (every partial sum is
an integer below 2**53, so any summation order of any BLAS gives the same result). h_a
runs only at the encoder, in float: what it computes is sent (ẑ), not recomputed.

This module codes files without torch: :class:`Model` runs g_a, g_s and h_a in numpy
(:mod:`nic.engine`) and h_s in integers. The trainable network (:class:`Codec`,
``from_arrays``, ``to_arrays``, ``integerize``) is in :mod:`nic.hyperprior_torch`; its
names are reachable here too, imported on first use.

Math only: arrays in, bytes out. No I/O.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from . import context, engine, factorized, overlay, trellis
from .coding import (DISTRIBUTIONS, LATENT_LIMIT, SCALE_COUNT, SCALE_MAX, SCALE_MIN, CodeLengths, CorruptStream,
                     IndexedCoder, IntegerTables, LatentCoder)
from .container import UNIT_STEP, FormatError, Substream
from .families import expect_substreams, import_with_torch, trainable_names
from .integer import (BIAS_LIMIT, MAX_SHIFT, MEAN_BITS, NARROW_WEIGHT_MAX,  # noqa: F401
                      WEIGHT_MAX, finish, scale_of)  # h_s's bounds, its layers' last step
from .tiling import (LatentStore, PixelRows, Progress, analysis_into, analysis_latents, latent_store,
                     reconstruct_into, squared_error)

MODEL_ID = 2
NAME = "hyperprior"
FORMAT_VERSION = 2
"""The container version this family writes: substreams ẑ and ŷ."""
HYPER_DOWNSAMPLING = 4
"""h_a halves the latent grid twice: z has ceil(rows/4) x ceil(cols/4) positions."""

BLOCK = 64
"""ŷ is coded in blocks of BLOCK x BLOCK latents (1,024 x 1,024 pixels), in raster order,
one after the other in the ``yhat`` substream: the coder holds one block's means, scale
indices and context at a time, whatever the image's size. Context passes see only their
own block (a block's edge is like the image's). An image of up to 1,024 x 1,024 pixels
is one block."""

STEP_SPAN = 0.625
"""A quality q between two trained ones, n − 1 < q < n, codes with quality n's networks and
a coarser step Δ = 2**(span·(n − q)): the span is the interval's own where the weights
have measured spans (:data:`STEP_SPANS`), else this one (measured on Kodak with earlier
weights: Δ = 2**0.625 took quality 4's files to about quality 3's size, and the points in
between lay 0.03–0.10 dB below the line through the trained qualities' points;
docs/results/hyperprior.md, section 13)."""

STEP_SPANS = {
    "4a9658ae22f8a830": (1.05, 0.80, 0.52, 0.59, 0.52, 0.49, 0.48),
}
"""Per weights hash, the span of each interval (1, 2) … (7, 8): the one that takes quality
n's networks to quality n − 1's file size, so that the size grows on through a trained
quality (measured on training photos by tools/step_spans.py; docs/results/hyperprior.md,
section 13). The shipped weights' q1 is a larger step down than the others (λ 0.0011)."""


def step_for(quality: float, weights_hash: bytes) -> tuple[int, tuple[int, int]]:
    """(the trained quality whose networks code, (Δ·256, table shift)) for a quality that
    may lie between two trained ones, with the spans of the weights ``weights_hash``
    where measured. The shift is how many entries of the log-spaced scale table Δ spans,
    so a residual in units of Δ gets the table of σ/Δ."""
    n = int(np.ceil(quality))
    if n == quality:
        return n, UNIT_STEP
    spans = STEP_SPANS.get(weights_hash.hex())
    span = spans[n - 2] if spans is not None and 2 <= n <= len(spans) + 1 else STEP_SPAN
    delta = 2.0 ** (span * (n - quality))
    ratio = (SCALE_MAX / SCALE_MIN) ** (1.0 / (SCALE_COUNT - 1))
    return n, (int(round(256 * delta)), int(round(np.log(delta) / np.log(ratio))))


Z_LIMIT = 32767
"""ẑ is clipped to ±Z_LIMIT before h_s (after coding: escapes still round-trip)."""


@dataclass(frozen=True)
class Config:
    """The hyperprior family's own fields; the transforms keep their factorized config."""

    model_id: int = MODEL_ID
    name: str = "mbt2018-mean-int"
    hyper_N: int = 128  # hidden channels of h_a and h_s
    Z: int = 128  # channels of z
    scales: int = SCALE_COUNT
    distribution: str = "gaussian"  # of the conditional: "gaussian" or "laplace" (nic.entropy)
    slices: int = 1  # ŷ's channels in this many slices, each the next one's context (nic.context)
    checkerboard: bool = False  # each slice in two phases, anchors first (nic.context)
    context_width: int = 128  # hidden channels of the context networks
    context_kernel: int = 3  # their spatial reach over ŷ (5 measured no better at q4, for 2.5x the work)
    base: str = ""  # weights hash of the factorized weights whose transforms these share (not held here)
    coding_only: bool = False  # integer networks only: codes files, cannot be trained further
    extends: str = ""  # weights hash of earlier hyperprior weights whose arrays complete these (nic.weights)

    @property
    def has_context(self) -> bool:
        return self.slices > 1 or self.checkerboard

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        # Fields at their first values are left out, so the first weights keep their bytes (and hash).
        if fields["distribution"] == "gaussian":
            del fields["distribution"]
        if not self.has_context:
            for name in ("slices", "checkerboard", "context_width", "context_kernel"):
                del fields[name]
        for name in ("base", "coding_only", "extends"):
            if not fields[name]:
                del fields[name]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("config is not an object")
        config = cls(**fields)
        for name in ("hyper_N", "Z", "scales", "slices", "context_width"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= factorized.MAX_CHANNELS:
                raise ValueError(f"config field {name} = {value!r} is out of range")
        if not isinstance(config.checkerboard, bool) or type(config.context_kernel) is not int or \
                config.context_kernel not in (1, 3, 5):
            raise ValueError("config fields checkerboard or context_kernel are invalid")
        if not isinstance(config.base, str) or not isinstance(config.coding_only, bool) or \
                not isinstance(config.extends, str):
            raise ValueError("config fields base, coding_only or extends are invalid")
        if config.model_id != MODEL_ID or config.scales != SCALE_COUNT or \
                config.distribution not in DISTRIBUTIONS:
            raise ValueError("config is not a mean-scale hyperprior of this nic")
        return config


def z_shape(Z: int, rows: int, cols: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of ẑ for a latent grid of rows x cols."""
    return Z, -(-rows // HYPER_DOWNSAMPLING), -(-cols // HYPER_DOWNSAMPLING)


# ---- the integer hyper-decoder ------------------------------------------------------------

@dataclass(frozen=True)
class IntegerLayer:
    """A convolution (``transposed``: stride-2 transposed) with integer weights: the output
    is floor((Σ w·a + b) / 2**shift + ½), then clipped to 0 … ACTIVATION_MAX if ``relu``."""

    weight: np.ndarray  # int32, (out, in, k, k) as a Conv2d's, for transposed ones too
    bias: np.ndarray  # int64 (out,)
    shift: np.ndarray  # int64 (out,): per output channel
    transposed: bool
    relu: bool

    @cached_property
    def scale(self) -> np.ndarray:
        """2**−shift per output channel, float64 (a power of two: multiplying by it is exact)."""
        return scale_of(self.shift)

    @cached_property
    def taps(self) -> np.ndarray:
        """The kernel as float64 taps (k, k, O, C), made once: a correlation's own taps, or
        for a transposed layer the transposed convolution's (W_t[a, b] = weight[:, :, k−1−a, k−1−b])."""
        weight = self.weight.astype(np.float64)
        if self.transposed:
            weight = weight[:, :, ::-1, ::-1]
        return np.ascontiguousarray(weight.transpose(2, 3, 0, 1))


class IntegerHyperSynthesis:
    """h_s in exact integer arithmetic; its output is μ·2**MEAN_BITS (first M channels)
    and the scale index (last M), both integers, the same on every machine."""

    def __init__(self, layers: list[IntegerLayer], scales: int):
        self.layers = layers
        self.scales = scales

    def __call__(self, z_hat: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        value = np.clip(z_hat, -Z_LIMIT, Z_LIMIT).astype(np.float64)
        for layer in self.layers:
            value = _integer_layer(layer, value)
        value = value[:, :rows, :cols]
        M = len(value) // 2
        mean = value[:M] / float(1 << MEAN_BITS)
        index = np.clip(value[M:], 0, self.scales - 1).astype(np.int64)
        return mean, index


OUTPUTS_AT_ONCE = 64
"""An integer layer's output channels are computed this many at a time, the groups side
by side on the engine's threads (every sum is exact: the same integers in any order)."""


def _integer_layer(layer: IntegerLayer, value: np.ndarray) -> np.ndarray:
    """One exact integer layer on integer-valued float64 activations (C, h, w)."""
    taps = layer.taps
    out_channels = taps.shape[2]
    h, w = value.shape[1:]
    acc = np.empty((out_channels, 2 * h, 2 * w) if layer.transposed else (out_channels, h, w))

    def group(n: int) -> None:
        part = slice(n * OUTPUTS_AT_ONCE, (n + 1) * OUTPUTS_AT_ONCE)
        acc[part] = (_transposed if layer.transposed else _correlate)(value, taps[:, :, part])

    engine.parallel(group, -(-out_channels // OUTPUTS_AT_ONCE))
    return finish(acc, layer.bias.astype(np.float64)[:, None, None], layer.scale[:, None, None], layer.relu)


def _correlate(value: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """'Same' cross-correlation (stride 1, zero padding k//2) of (C, H, W) with a kernel
    given as its taps (k, k, O, C) in float64 (:attr:`IntegerLayer.taps`): k·k shifted
    matrix products, each exact (integer values, sums below 2**53, so any BLAS, in any
    order, gives the same result)."""
    k, _, out_channels, c = taps.shape
    h, w = value.shape[1:]
    padded = np.pad(value, ((0, 0), (k // 2, k // 2), (k // 2, k // 2))) if k > 1 else value
    acc = np.zeros((out_channels, h * w))
    for i in range(k):
        for j in range(k):
            acc += taps[i, j] @ padded[:, i:i + h, j:j + w].reshape(c, -1)
    return acc.reshape(out_channels, h, w)


def _transposed(value: np.ndarray, taps: np.ndarray, rows: int = 16) -> np.ndarray:
    """The stride-2 transposed convolution (padding k//2, output padding 1: the size
    doubles) whose own kernel's taps are ``taps`` (k, k, O, C) (:attr:`IntegerLayer.taps`):
    a matrix product of every tap with the input, then each tap's plane added where it
    lands (exact, as in :func:`_correlate`). No zeros are multiplied. ``rows`` input rows
    at a time, so that the taps' planes stay small for any image."""
    k, _, out_channels, c = taps.shape
    h, w = value.shape[1:]
    taps = taps.reshape(k * k * out_channels, c)
    full = np.zeros((out_channels, 2 * h + k, 2 * w + k))
    for r0 in range(0, h, rows):
        n = min(rows, h - r0)
        planes = (taps @ value[:, r0:r0 + n].reshape(c, -1)).reshape(k, k, out_channels, n, w)
        for a in range(k):
            for b in range(k):
                full[:, 2 * r0 + a:2 * (r0 + n) + a:2, b:b + 2 * w:2] += planes[a, b]
    p = k // 2
    return full[:, p:p + 2 * h, p:p + 2 * w]


# ---- weights as plain arrays (no pickle) -----------------------------------------------

def hyper_shapes(M: int, N: int, Z: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one quality's h_a and h_s ("h_a.0.weight": ...), nothing allocated
    (the layers of hyper_analysis and hyper_synthesis, in order)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (out, inp, k) in zip((0, 2, 4), ((N, M, 3), (N, N, 5), (Z, N, 5))):
        shapes[f"h_a.{index}.weight"], shapes[f"h_a.{index}.bias"] = (out, inp, k, k), (out,)
    # ConvTranspose2d weights are (in, out, k, k).
    for index, (first, second, k, out) in zip((0, 2, 4), ((Z, N, 5, N), (N, N, 5, N), (2 * M, N, 1, 2 * M))):
        shapes[f"h_s.{index}.weight"], shapes[f"h_s.{index}.bias"] = (first, second, k, k), (out,)
    return shapes


def integer_shapes(M: int, N: int, Z: int) -> list[tuple[int, int, int]]:
    """(out, in, k) of each layer of the integer h_s, as correlations."""
    return [(N, Z, 5), (N, N, 5), (2 * M, N, 1)]


def _get_tables(arrays: dict[str, np.ndarray], prefix: str, count: int) -> IntegerTables:
    try:
        tables = IntegerTables(*(arrays[f"{prefix}.{part}"].astype(np.int32)
                                 for part in ("offsets", "lengths", "frequencies")))
    except KeyError:
        raise ValueError(f"weights lack the integer tables {prefix}") from None
    if tables.offsets.shape != (count,) or tables.lengths.shape != (count,) or (tables.lengths < 1).any() or \
            len(tables.frequencies) != int((tables.lengths.astype(np.int64) + 1).sum()):
        raise ValueError(f"integer tables {prefix} are inconsistent")
    return tables


def _integer_network(arrays: dict[str, np.ndarray], q: int, shapes: list[tuple[int, int, int]],
                     scales: int) -> IntegerHyperSynthesis:
    layers = []
    for n, (out, inp, k) in enumerate(shapes):
        prefix = f"integer_h_s.{q}.{n}"
        try:
            weight, bias, shift = (arrays[f"{prefix}.{part}"] for part in ("weight", "bias", "shift"))
        except KeyError:
            raise ValueError(f"weights lack the integer hyper-decoder layer {prefix}") from None
        if weight.shape != (out, inp, k, k) or bias.shape != (out,) or shift.shape != (out,) or \
                any(a.dtype.kind != "i" for a in (weight, bias, shift)):
            raise ValueError(f"integer hyper-decoder layer {prefix} has the wrong shapes or types")
        # These bounds keep every sum of h_s an integer below 2**53 (exact in float64).
        if weight.min() < -WEIGHT_MAX or weight.max() > WEIGHT_MAX or bias.min() <= -BIAS_LIMIT or \
                bias.max() >= BIAS_LIMIT or shift.min() < 0 or shift.max() > MAX_SHIFT:
            raise ValueError(f"integer hyper-decoder layer {prefix} is out of range")
        layers.append(IntegerLayer(weight.astype(np.int32), bias.astype(np.int64), shift.astype(np.int64),
                                   transposed=n < len(shapes) - 1, relu=n < len(shapes) - 1))
    return IntegerHyperSynthesis(layers, scales)


def check_slices(M: int, config: Config) -> None:
    """ValueError unless the config's slices split M latent channels evenly."""
    if config.has_context and M % config.slices:
        raise ValueError(f"{M} latent channels do not split into {config.slices} slices")


def read_context_networks(arrays, q: int, M: int, config: Config) -> dict[str, "context.IntegerContextNetwork"]:
    """Quality q's (0-based) integer context networks, by pass ("s_p"), checked."""
    check_slices(M, config)
    return {f"{s}_{p}": context.read_network(
                arrays, f"integer_context.{q}.{s}_{p}",
                context.network_shapes(M, config.slices, config.checkerboard, config.context_width,
                                       config.context_kernel, s, p))
            for s, p in context.passes(config.slices, config.checkerboard) if context.has_network(s, p)}


# ---- coding without torch ------------------------------------------------------------

_BUILDING = threading.RLock()


class Prefixed:
    """The arrays of a weights file whose names start with ``prefix``, under their names
    without it (the base transforms' ``base.*``: a factorized weights file of their own)."""

    def __init__(self, arrays: dict[str, np.ndarray], prefix: str):
        self.arrays, self.prefix = arrays, prefix

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[self.prefix + name]

    def __contains__(self, name) -> bool:
        return self.prefix + name in self.arrays

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        if hasattr(self.arrays, "describe"):
            return self.arrays.describe(self.prefix + name)
        value = self.arrays[self.prefix + name]
        return value.shape, value.dtype


class HyperAnalysisArrays:
    """A weights file's arrays with h_a's kernels as float32: coding-only weights hold them
    as int8 with a float32 scale per output channel (``….weight_scale``); h_a runs only at
    the encoder, so this changes nothing a decoder computes (measured on Kodak: files
    within ±0.1 % of those of the fp16 kernels)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        value = self.arrays[name]
        if value.dtype.kind != "i":
            return value
        scale = self.arrays.get(name + "_scale") if hasattr(self.arrays, "get") else None
        if scale is None or scale.shape != value.shape[:1] or scale.dtype.kind != "f":
            raise ValueError(f"weights lack the scales of the int8 kernel {name}")
        return value.astype(np.float32) * scale.astype(np.float32).reshape(-1, *[1] * (value.ndim - 1))


def compact_kernel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 kernel, float32 scale per output channel) of a float kernel (HyperAnalysisArrays)."""
    weight = weight.astype(np.float32)
    scale = np.abs(weight).reshape(len(weight), -1).max(axis=1) / NARROW_WEIGHT_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.round(weight / scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.int8), scale


def read_config(arrays: dict[str, np.ndarray]) -> Config:
    """The family's config of a weights file's arrays; ValueError if missing or invalid."""
    try:
        return Config.from_json(bytes(arrays["config"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"weights have no valid config ({exc})") from None


class Model:
    """The hyperprior family as the coder runs it: the base transforms
    (:class:`nic.factorized.Model`), each quality's h_a in numpy (:mod:`nic.engine`; the
    encoder's, float), its integer h_s and its z tables, and the conditional's tables.
    No torch. A quality's networks and tables are read and checked when it is first used."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        config = read_config(arrays)
        self.base = factorized.Model(Prefixed(arrays, "base."))
        self.config = config
        M, N, Z = self.base.config.M, config.hyper_N, config.Z
        h_a = {name: shape for name, shape in hyper_shapes(M, N, Z).items() if name.startswith("h_a.")}
        factorized.check_arrays(arrays, {f"hyper.{q}.{name}": shape
                                         for q in range(self.qualities) for name, shape in h_a.items()}, "fi")
        self.y_tables = _get_tables(arrays, "y_tables", config.scales)
        self._arrays = arrays
        self._h_a: dict[int, engine.Network] = {}
        self._h_s: dict[int, IntegerHyperSynthesis] = {}
        self._z_tables: dict[int, IntegerTables] = {}
        self._context: dict[int, dict] = {}
        check_slices(M, config)
        self._network = None
        self._views = {"fp32": self}

    @property
    def qualities(self) -> int:
        return self.base.config.qualities

    @property
    def precision(self) -> str:
        return self.base.precision

    def at_precision(self, precision: str) -> "Model":
        """This model with g_a and g_s in ``precision`` (nic.precision; h_a stays fp32, the
        rest is integer), sharing everything else."""
        base = self.base.at_precision(precision)
        with _BUILDING:
            if precision not in self._views:
                view = copy.copy(self)
                view.base = base
                self._views[precision] = view
        return self._views[precision]

    @property
    def latent_channels(self) -> int:
        return self.base.config.M

    @property
    def M(self) -> int:
        return self.base.config.M

    def z_table(self, quality: int) -> IntegerTables:
        """ẑ's integer tables at a quality."""
        if quality not in self._z_tables:
            with _BUILDING:
                if quality not in self._z_tables:
                    self._z_tables[quality] = _get_tables(self._arrays, f"z_tables.{quality - 1}", self.config.Z)
        return self._z_tables[quality]

    def h_a(self, quality: int) -> engine.Network:
        if quality not in self._h_a:
            with _BUILDING:
                if quality not in self._h_a:
                    prefix = f"hyper.{quality - 1}.h_a"
                    arrays = HyperAnalysisArrays(self._arrays)
                    self._h_a[quality] = engine.Network(lambda: [
                        engine.Conv(arrays[f"{prefix}.0.weight"], arrays[f"{prefix}.0.bias"], 1), engine.ReLU(),
                        engine.Conv(arrays[f"{prefix}.2.weight"], arrays[f"{prefix}.2.bias"], 2), engine.ReLU(),
                        engine.Conv(arrays[f"{prefix}.4.weight"], arrays[f"{prefix}.4.bias"], 2)])
        return self._h_a[quality]

    def h_s(self, quality: int) -> "IntegerHyperSynthesis":
        if quality not in self._h_s:
            with _BUILDING:
                if quality not in self._h_s:
                    M, N, Z = self.M, self.config.hyper_N, self.config.Z
                    self._h_s[quality] = _integer_network(self._arrays, quality - 1, integer_shapes(M, N, Z),
                                                          self.config.scales)
        return self._h_s[quality]

    def context_networks(self, quality: int) -> dict[str, "context.IntegerContextNetwork"]:
        """The quality's integer context networks by pass ("s_p"; none without context)."""
        if not self.config.has_context:
            return {}
        if quality not in self._context:
            with _BUILDING:
                if quality not in self._context:
                    self._context[quality] = read_context_networks(self._arrays, quality - 1, self.M, self.config)
        return self._context[quality]

    def network(self):
        """The same weights as a torch ``Codec`` (nic.hyperprior_torch), built on first use:
        for what differentiates through the transforms (the encoder's effort 2..4); once for
        all precisions."""
        if self.precision != "fp32":
            return self._views["fp32"].network()
        if self._network is None:
            with _BUILDING:
                if self._network is None:
                    self._network = import_with_torch("nic.hyperprior_torch").from_arrays(self._arrays)
        return self._network

    def hyper_encode(self, y: np.ndarray, quality: int) -> np.ndarray:
        """ẑ = round(h_a(y)) (int64, (Z, h, w)) for gained latents y (float32 (M, rows, cols))."""
        z = self.h_a(quality)(np.ascontiguousarray(y.transpose(1, 2, 0), dtype=np.float32))
        return rounded_z(z.transpose(2, 0, 1))

    def hyper_decode(self, z_hat: np.ndarray, quality: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """(μ as float64 (M, rows, cols), scale indices as int64) from ẑ, exactly: the
        integer h_s of the quality."""
        return self.h_s(quality)(z_hat, rows, cols)



def rounded_z(z: np.ndarray) -> np.ndarray:
    """round(z) as int64; ValueError for non-finite values."""
    if not np.isfinite(z).all():
        raise ValueError("hyper-analysis produced non-finite values")
    return np.clip(np.round(z.astype(np.float64)), -2**31 + 1, 2**31 - 1).astype(np.int64)


def load(arrays: dict[str, np.ndarray]) -> Model:
    """The model that codes files (nic.families): numpy only."""
    return Model(arrays)


def trainable(model):
    """The torch ``Codec`` of a model (itself if it is one)."""
    return model.network() if isinstance(model, Model) else model


# The trainable network's names (``Codec``, ``from_arrays``, ``to_arrays``,
# ``integerize``, …) from nic.hyperprior_torch, imported on first use: coding never
# imports torch.
__getattr__ = trainable_names("nic.hyperprior_torch", "nic.hyperprior")


# ---- the family: pixels to substreams and back (nic.families) --------------------------

_CODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def coders(model: Model, quality: int) -> tuple[LatentCoder, IndexedCoder]:
    """(ẑ's coder, ŷ's coder) of a quality, built once per model."""
    cache = _CODERS.setdefault(model, {})
    if quality not in cache:
        if "y" not in cache:
            cache["y"] = IndexedCoder(model.y_tables)
        cache[quality] = LatentCoder(model.z_table(quality))
    return cache[quality], cache["y"]


def analysis(model: Model, source: np.ndarray | PixelRows, quality: int,
             progress: Progress | None = None) -> np.ndarray:
    """Gained latents y (float32 (M, rows, cols)) of an image, g_a in tiles (nic.tiling)."""
    return analysis_latents(model.base, source, quality, progress=progress)


def hyper_decode_block(model, z_hat: np.ndarray, quality: int, rows: tuple[int, int], cols: tuple[int, int]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``model.hyper_decode``'s latents in rows × cols (each a (start, stop)), from the ẑ
    they depend on and a margin (latent o reads ẑ o//4 − 1 … o//4 + 2 along each axis,
    through the two stride-2 transposed 5x5 layers): exactly the whole image's values."""
    d = HYPER_DOWNSAMPLING
    (r0, r1), (c0, c1) = rows, cols
    z_r0, z_r1 = max(0, r0 // d - 2), min(z_hat.shape[1], (r1 - 1) // d + 3)
    z_c0, z_c1 = max(0, c0 // d - 2), min(z_hat.shape[2], (c1 - 1) // d + 3)
    mean, index = model.hyper_decode(z_hat[:, z_r0:z_r1, z_c0:z_c1], quality, d * (z_r1 - z_r0), d * (z_c1 - z_c0))
    window = (slice(None), slice(r0 - d * z_r0, r1 - d * z_r0), slice(c0 - d * z_c0, c1 - d * z_c0))
    return mean[window], index[window]


def tcq_coder(model: Model) -> IndexedCoder:
    """ŷ's coder for trellis-coded files: Q0's tables, then Q1's (nic.trellis)."""
    cache = _CODERS.setdefault(model, {})
    if "tcq" not in cache:
        cache["tcq"] = IndexedCoder(trellis.quantizer_tables(model.y_tables))
    return cache["tcq"]


def tcq_rate(model: Model) -> CodeLengths:
    cache = _CODERS.setdefault(model, {})
    if "tcq rate" not in cache:
        cache["tcq rate"] = CodeLengths(tcq_coder(model).tables)
    return cache["tcq rate"]


def bands(rows: int) -> list[tuple[int, int]]:
    """Runs of BLOCK latent rows, top to bottom (the last shorter)."""
    if BLOCK % HYPER_DOWNSAMPLING:  # z's grid and the checkerboard's parity must line up with a block's
        raise ValueError(f"BLOCK must be a multiple of {HYPER_DOWNSAMPLING}")
    return [(r0, min(rows, r0 + BLOCK)) for r0 in range(0, rows, BLOCK)]


def blocks(rows: int, cols: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """ŷ's blocks as ((row start, stop), (column start, stop)), in raster order."""
    return [(r, c) for r in bands(rows) for c in bands(cols)]


def hyper_encode_bands(model: Model, y: LatentStore, quality: int) -> np.ndarray:
    """ẑ of gained latents in a store, h_a run band by band on y's rows with a halo that
    covers its receptive field (±7 latent rows), so only one band of y is in memory."""
    _, rows, cols = y.shape
    parts = []
    for r0, r1 in bands(rows):
        a, b = max(0, r0 - 8), min(rows, r1 + 8)  # a is a multiple of 4: z's grid stays aligned
        z = model.hyper_encode(y.rows(a, b), quality)
        parts.append(z[:, (r0 - a) // HYPER_DOWNSAMPLING:(r0 - a) // HYPER_DOWNSAMPLING + -(-(r1 - r0) // HYPER_DOWNSAMPLING)])
    return np.concatenate(parts, axis=1)


def compress(model: Model, source: np.ndarray | PixelRows, quality: int, effort: int = 1,
             progress: Progress | None = None, spill_bytes: int | None = None,
             step: tuple[int, int] = UNIT_STEP, tcq: np.ndarray | None = None,
             on_y_hat: Callable[[LatentStore], None] | None = None) -> list[Substream]:
    """The substreams of an image: ẑ, then the residuals k = round((y − μ)/Δ) (``yhat``)
    block by block, or at effort 2..4 the residuals chosen by D + λR with ẑ fixed
    (nic.quantization). With context (nic.context), each block's passes one after the
    other. ``step``: (Δ·256, table shift) of a quality between the trained ones
    (:func:`step_for`; the file's STEP section), effort 1 only. ``on_y_hat`` is handed
    ŷ (float32, in memory) exactly as the decoder will make it: its synthesis is the
    file's decode (nic.api's choices use it instead of decoding the file)."""
    if on_y_hat is not None and tcq is not None:
        raise ValueError("ŷ of trellis-coded residuals is not handed back")
    if effort not in (1, 2, 3, 4):
        raise ValueError(f"effort must be 1..4, got {effort}")
    if effort != 1 and step != UNIT_STEP:
        raise ValueError("a quality between the trained ones is encoded at effort 1")
    if effort != 1 and not isinstance(source, np.ndarray):
        raise ValueError("images read strip by strip are encoded at effort 1")
    height, width = (source.shape[:2] if isinstance(source, np.ndarray) else (source.height, source.width))
    shape = factorized.latent_shape(model.base.config, height, width)
    z_coder, _ = coders(model, quality)
    with latent_store(shape, spill_bytes, np.float32) as y:
        analysis_into(model.base, source, quality, y, progress=None if effort > 1 else progress)
        z_hat = hyper_encode_bands(model, y, quality)
        target: LatentStore = y
        context_search = effort != 1 and model.config.has_context and tcq is None
        if effort != 1:  # torch: the search differentiates through g_s; the image is in memory
            quantize_residuals = import_with_torch("nic.quantization").quantize_residuals

            whole = y.rows(0, shape[1])
            if context_search:  # each latent's (μ, t) as the passes code effort 1's latents
                mean, index = _pass_means(model, quality, z_hat, y)
            else:
                mean, index = model.hyper_decode(z_hat, quality, shape[1], shape[2])
            residual, ended = quantize_residuals(trainable(model), source, quality, effort, whole, mean, index,
                                                 progress, continuous=True)
            # The passes code what the search chose, each latent rounded to the nearest value
            # its own pass can send (without context: exactly the search's residuals).
            target = LatentStore(shape, array=residual + mean)
        if context_search:
            # The passes' means move as the search changes the latents before them: where
            # the search's latent optimization ended, rounded by the passes, and its
            # integers rounded again, are measured against effort 1's file.
            ended = LatentStore(shape, array=(ended.astype(np.float64) + mean).astype(np.float32))
            payload, y_hat = _cheaper(model, quality, source, z_hat, (y, ended, target))
        else:
            y_hat = None if on_y_hat is None else LatentStore(shape, np.float32)
            payload = _encode_blocks(model, quality, z_hat, target, step, tcq, y_hat)
    if on_y_hat is not None:
        on_y_hat(y_hat)
    return [Substream(b"zhat", z_hat.shape, z_coder.encode(z_hat)), Substream(b"yhat", shape, payload.tobytes())]


def _cheaper(model: Model, quality: int, pixels: np.ndarray, z_hat: np.ndarray,
             targets: tuple[LatentStore, ...]) -> tuple[np.ndarray, LatentStore]:
    """(payload, ŷ) of whichever target's file has the lowest J = bits + λ·SSE/channels,
    measured on the file itself (its ŷ synthesized as the decoder will), the first of
    equals. With context the search weighs rates under means and scales that the passes
    recompute from the latents it changes, and the passes round its choice again: its
    file can cost more than effort 1's, so each candidate is kept only where it costs
    less."""
    weight = model.base.config.lambdas[quality - 1] / pixels.shape[2]
    height, width = pixels.shape[:2]
    best = None
    for target in targets:
        y_hat = LatentStore(target.shape, np.float32)
        payload = _encode_blocks(model, quality, z_hat, target, y_hat=y_hat)
        error = squared_error(lambda sink, y_hat=y_hat: reconstruct_into(model.base, y_hat, quality, height, width,
                                                                         pixels.shape[2] == 1, sink), pixels)
        cost = 8.0 * payload.nbytes + weight * error
        if best is None or cost < best[0]:
            best = (cost, payload, y_hat)
    return best[1], best[2]


def _pass_means(model: Model, quality: int, z_hat: np.ndarray, target: LatentStore
                ) -> tuple[np.ndarray, np.ndarray]:
    """(μ, t) of every latent (float64 and int64, (M, rows, cols)) as the passes code
    ``target``: each pass's means and table indices, from the latents before it as the
    encoder rounds them (at the unit step)."""
    mean, index = np.empty(target.shape), np.empty(target.shape, np.int64)
    config = model.config
    c = model.M // config.slices
    for r, cs, hyper_mean, hyper_index, y in _target_blocks(model, quality, z_hat, target):
        means, indices = mean[:, r[0]:r[1], cs[0]:cs[1]], index[:, r[0]:r[1], cs[0]:cs[1]]

        def residuals(s: int, where: np.ndarray, mu: np.ndarray, t: np.ndarray, y=y, means=means,
                      indices=indices) -> np.ndarray:
            means[s * c:(s + 1) * c][:, where] = mu
            indices[s * c:(s + 1) * c][:, where] = t
            return _rounded(y[s * c:(s + 1) * c, where], mu)

        context.run_passes(model.context_networks(quality), hyper_mean, hyper_index, config.slices,
                           config.checkerboard, config.scales, residuals, keep=False)
    return mean, index


def _target_blocks(model: Model, quality: int, z_hat: np.ndarray, target: LatentStore):
    """Per block of latents, in the order the file codes them: (its rows, its columns,
    h_s's (μ, t) there, ``target`` there as float64)."""
    _, rows, cols = target.shape
    for r in bands(rows):
        band = target.rows(*r)
        for cs in bands(cols):
            yield (r, cs, *hyper_decode_block(model, z_hat, quality, r, cs),
                   band[:, :, cs[0]:cs[1]].astype(np.float64))


def _rounded(y: np.ndarray, mu: np.ndarray, size: int = UNIT_STEP[0]) -> np.ndarray:
    k = np.round((y - mu) * (256.0 / size))  # × 1.0, exactly, at the unit step
    if not np.abs(k).max(initial=0) <= LATENT_LIMIT:  # NaN too
        raise ValueError("latent magnitude exceeds 2**31 - 1")
    return k.astype(np.int64)


def _encode_blocks(model: Model, quality: int, z_hat: np.ndarray, target: LatentStore,
                   step: tuple[int, int] = UNIT_STEP, tcq: np.ndarray | None = None,
                   y_hat: LatentStore | None = None) -> np.ndarray:
    """ŷ's payload: per block, its residuals round((target − μ)/Δ) under the block's (μ, t),
    one part per context pass (without context, one pass: the whole block). With ``tcq``
    (each channel's distortion weight, bits per squared unit of y), the trellis chooses
    the indices instead (nic.trellis), coded slot by slot. ``y_hat`` is given ŷ block by
    block, as :func:`_decode_blocks` makes it."""
    _, y_coder = coders(model, quality)
    if tcq is not None:
        y_coder = tcq_coder(model)
        rate = tcq_rate(model)
    writer = y_coder.encoder()
    config = model.config
    c = model.M // config.slices
    delta = step[0] / 256.0
    for r, cs, mean, index, y in _target_blocks(model, quality, z_hat, target):

        def residuals(s: int, where: np.ndarray, mu: np.ndarray, t: np.ndarray, y=y) -> np.ndarray:
            if tcq is not None:
                e = (y[s * c:(s + 1) * c, where] - mu) / delta
                return trellis.encode_pass(writer, e, where, t, tcq[s * c:(s + 1) * c] * delta**2, rate,
                                           config.scales)
            k = _rounded(y[s * c:(s + 1) * c, where], mu, step[0])
            writer.encode(k.ravel(), t.ravel())
            return k

        decoded = context.run_passes(model.context_networks(quality), mean, index, config.slices,
                                     config.checkerboard, config.scales, residuals, keep=y_hat is not None,
                                     step=step, keep_residuals=False)
        if y_hat is not None:
            y_hat.put(slice(*r), slice(*cs), decoded[0])
    if y_hat is not None:
        y_hat.finish()
    return writer.finish()


def decompress(model: Model, quality: int, height: int, width: int, gray: bool, substreams: list[Substream],
               sink: Callable[[np.ndarray], None], progress: Progress | None = None,
               spill_bytes: int | None = None, on_latents: Callable[[LatentStore], None] | None = None,
               step: tuple[int, int] = UNIT_STEP, tcq: bool = False) -> None:
    """Decode ẑ, then block by block the integer h_s and the residuals (pass by pass with
    context), and hand ``sink`` the pixel rows, with an overlay's pixel tiles pasted over
    them where the file has one (nic.overlay). ``on_latents`` sees the residuals
    (integers) before the synthesis runs; ``step`` is the file's STEP section's; ``tcq``
    reads trellis-coded residuals (nic.trellis: no file carries them)."""
    y_shape = factorized.latent_shape(model.base.config, height, width)
    tiles = substreams[:len(overlay.NAMES)]
    if [s.name for s in tiles] != list(overlay.NAMES):
        tiles = []
    z, y = expect_substreams(substreams[len(tiles):],
                             [(b"zhat", z_shape(model.config.Z, *y_shape[1:])), (b"yhat", y_shape)])
    if tiles:  # pixel tiles over the model's, decoded after the cheap checks (their decode is not cheap)
        tile_map, tiled = overlay.decode(tiles, height, width, gray)
        sink = overlay.paster(sink, tiled, tile_map)
    z_coder, y_coder = coders(model, quality)
    try:
        z_hat = z_coder.decode(z.data, z.shape)
    except CorruptStream as exc:
        raise FormatError(f"substream zhat is corrupt: {exc}") from None
    kept = latent_store(y_shape, spill_bytes) if on_latents is not None else contextlib.nullcontext()
    with latent_store(y_shape, spill_bytes, np.float32) as y_hat, kept as residual:
        try:
            reader = (tcq_coder(model) if tcq else y_coder).decoder(y.data)
            _decode_blocks(model, quality, z_hat, reader, y_hat, residual, step, tcq)
        except CorruptStream as exc:
            raise FormatError(f"substream yhat is corrupt: {exc}") from None
        if on_latents is not None:
            on_latents(residual)
        reconstruct_into(model.base, y_hat, quality, height, width, gray, sink, progress=progress)


def _decode_blocks(model: Model, quality: int, z_hat: np.ndarray, reader, y_hat: LatentStore,
                   residual: LatentStore | None, step: tuple[int, int] = UNIT_STEP, tcq: bool = False) -> None:
    """Fill ``y_hat`` (ŷ = μ + k·Δ, float32: elementwise IEEE, the same everywhere) and
    ``residual`` (k; None: not kept) block by block from the payload's parts."""
    _, rows, cols = y_hat.shape
    config = model.config

    def residuals(s: int, where: np.ndarray, mu: np.ndarray, t: np.ndarray) -> np.ndarray:
        if tcq:
            return trellis.decode_pass(reader, where, t, config.scales)
        return reader.decode(t.ravel()).reshape(t.shape)

    for r, cs in blocks(rows, cols):
        mean, index = hyper_decode_block(model, z_hat, quality, r, cs)
        block, k = context.run_passes(model.context_networks(quality), mean, index, config.slices,
                                      config.checkerboard, config.scales, residuals, step=step,
                                      keep_residuals=residual is not None)
        y_hat.put(slice(*r), slice(*cs), block)
        if residual is not None:
            residual.put(slice(*r), slice(*cs), k)
    reader.finish()
    y_hat.finish()
    if residual is not None:
        residual.finish()
