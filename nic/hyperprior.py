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
(:class:`IntegerHyperSynthesis`): integer weights, integer activations, and sums that
are exact in float64 (every partial sum is an integer below 2**53, so any summation
order of any BLAS gives the same result). h_a runs only at the encoder, in float:
what it computes is sent (ẑ), not recomputed.

This module is math only: tensors and arrays in, bytes out. No I/O.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import factorized, tiling
from .coding import LATENT_LIMIT, CorruptStream, IndexedCoder, LatentCoder
from .container import FormatError, Substream
from .entropy import DISTRIBUTIONS, FactorizedDensity, GaussianConditional, IntegerTables, integer_tables
from .families import expect_substreams
from .layers import conv, deconv
from .tiling import LatentStore, PixelRows, Progress, analysis_tiles, reconstruct_into, tiles

MODEL_ID = 2
NAME = "hyperprior"
FORMAT_VERSION = 2
"""The container version this family writes: substreams ẑ and ŷ."""
HYPER_DOWNSAMPLING = 4
"""h_a halves the latent grid twice: z has ceil(rows/4) x ceil(cols/4) positions."""

ACTIVATION_MAX = 4095
"""Integer activations of h_s are clipped to 0 … ACTIVATION_MAX (12 bits)."""

WEIGHT_MAX = 32767
"""Integer weights of h_s are within ±WEIGHT_MAX (16 bits)."""

BIAS_LIMIT = 2**40
MAX_SHIFT = 40
"""Integer biases are below BIAS_LIMIT in magnitude and shifts at most MAX_SHIFT: with the
weight and activation bounds, every sum of h_s stays an integer below 2**53."""

MEAN_BITS = 8
"""μ is an integer multiple of 2**−MEAN_BITS."""

INITIAL_INDEX = 24.0
"""Where a fresh h_s puts every scale index: σ ≈ 2 in the default table."""

MAX_PIXELS = 36_000_000
"""Largest image this family codes for now: it holds the whole latent grid, its means
and scale indices in memory (about 10 kB per latent position, 1.4 GiB at 36 MP),
where the factorized family streams and spills. Larger images: ``--model factorized``."""

Z_LIMIT = 32767
"""ẑ is clipped to ±Z_LIMIT before h_s (after coding: escapes still round-trip)."""


@dataclass(frozen=True)
class Config:
    """The hyperprior family's own fields; the transforms keep their factorized config."""

    model_id: int = MODEL_ID
    name: str = "mbt2018-mean-int"
    hyper_N: int = 128  # hidden channels of h_a and h_s
    Z: int = 128  # channels of z
    scales: int = GaussianConditional().count
    distribution: str = "gaussian"  # of the conditional: "gaussian" or "laplace" (nic.entropy)

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        if fields["distribution"] == "gaussian":
            del fields["distribution"]  # so the first weights keep their bytes (and hash)
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("config is not an object")
        config = cls(**fields)
        for name in ("hyper_N", "Z", "scales"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= factorized.MAX_CHANNELS:
                raise ValueError(f"config field {name} = {value!r} is out of range")
        if config.model_id != MODEL_ID or config.scales != GaussianConditional().count or \
                config.distribution not in DISTRIBUTIONS:
            raise ValueError("config is not a mean-scale hyperprior of this nic")
        return config


def hyper_analysis(M: int, N: int, Z: int) -> nn.Sequential:
    """h_a: conv3x3 → ReLU → conv5x5/2 → ReLU → conv5x5/2 (float; encoder only)."""
    return nn.Sequential(conv(M, N, 3, 1), nn.ReLU(), conv(N, N), nn.ReLU(), conv(N, Z))


def hyper_synthesis(M: int, N: int, Z: int) -> nn.Sequential:
    """h_s: deconv5x5/2 → ReLU → deconv5x5/2 → ReLU → conv1x1 to (μ, t) per latent.

    The last layer is 1x1 (CompressAI's is 3x3): it runs at the latents' resolution,
    in exact integer arithmetic, and is the hyper-decoder's largest cost."""
    return nn.Sequential(deconv(Z, N), nn.ReLU(), deconv(N, N), nn.ReLU(), conv(N, 2 * M, 1, 1))


class Hyper(nn.Module):
    """One quality's h_a and h_s."""

    def __init__(self, M: int, N: int, Z: int):
        super().__init__()
        self.h_a = hyper_analysis(M, N, Z)
        self.h_s = hyper_synthesis(M, N, Z)


def z_shape(Z: int, rows: int, cols: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of ẑ for a latent grid of rows x cols."""
    return Z, -(-rows // HYPER_DOWNSAMPLING), -(-cols // HYPER_DOWNSAMPLING)


class Codec(nn.Module):
    """Transforms of a factorized model (``base``) with a mean-scale hyperprior per quality."""

    def __init__(self, base: factorized.Codec, config: Config = Config()):
        super().__init__()
        self.base = base
        self.config = config
        M, Q = base.config.M, base.config.qualities
        self.hyper = nn.ModuleList([Hyper(M, config.hyper_N, config.Z) for _ in range(Q)])
        with torch.no_grad():  # start every scale index at σ ≈ 2, not at the narrowest scale
            for hyper in self.hyper:
                hyper.h_s[-1].bias[M:] = INITIAL_INDEX
        # One module holds every quality's z density: rows (q−1)·Z … q·Z − 1 are quality q's.
        self.z_density = FactorizedDensity(Q * config.Z)
        self.conditional = GaussianConditional(config.scales, distribution=config.distribution)
        self.z_tables: list[IntegerTables] | None = None
        self.y_tables: IntegerTables | None = None
        self.integer_h_s: list[IntegerHyperSynthesis] | None = None

    @property
    def qualities(self) -> int:
        return self.base.config.qualities

    @property
    def M(self) -> int:
        return self.base.config.M

    latent_channels = M

    # ---- training -------------------------------------------------------------------

    def z_rows(self, quality: int, batch: int, device) -> Tensor:
        Z = self.config.Z
        return ((quality - 1) * Z + torch.arange(Z, device=device)).expand(batch, Z)

    def latent_bits(self, y: Tensor, quality: int, rounded: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(bits of ẑ, bits of ŷ, ŷ for g_s) per sample, for gained latents y of one quality.

        The rate of z is that of z + U(−½, ½), and h_s sees that too (round(z) in eval
        mode). The rate of y is that of
        y + U(−½, ½) − μ, or, with ``rounded``, exactly what the coder spends: the
        rounded residual round(y − μ), with a straight-through gradient into μ. With the
        transforms frozen the latents are what they are, and the noisy rate overstates
        what near-constant channels cost by up to ~0.3 bit each (a Gaussian of σ ≥ 0.11
        spread over a unit of noise). Yet trained on the rounded rate, short runs on
        cached latents stopped using z (docs/results/hyperprior.md), so the noisy rate is
        the default. g_s always gets round(y − μ) + μ (straight-through)."""
        hyper = self.hyper[quality - 1]
        z = hyper.h_a(y)
        z_noisy = z + torch.empty_like(z).uniform_(-0.5, 0.5)
        p = self.z_density.probability(z_noisy, self.z_rows(quality, len(z), z.device))
        z_bits = -torch.log2(p).sum(dim=(1, 2, 3))
        # h_s sees z + U(−½, ½), as in Ballé et al. 2018: with round(z) instead (straight
        # through), a fresh h_a's small z all round to 0, no information reaches h_s, and
        # training settles on not using z at all (measured: z's rate went to ~0).
        z_hat = z_noisy if self.training else torch.round(z)
        mean, index = self.means_and_indices(hyper.h_s(z_hat), y.shape[-2:])
        sigma = self.conditional.scale(index)
        residual = y - mean
        residual_hat = residual + (torch.round(residual) - residual).detach()
        coded = residual_hat if rounded else residual + torch.empty_like(residual).uniform_(-0.5, 0.5)
        y_bits = self.conditional.bits(coded, sigma).sum(dim=(1, 2, 3))
        return z_bits, y_bits, residual_hat + mean

    def quality_state(self, quality: int) -> dict:
        """What one quality has of its own (h_a, h_s, its rows of the z density), as tensors:
        a training run saves each quality apart."""
        rows = slice((quality - 1) * self.config.Z, quality * self.config.Z)
        return {"hyper": self.hyper[quality - 1].state_dict(),
                "z_density": [p.detach()[rows].clone() for p in self.z_density.parameters()]}

    @torch.no_grad()
    def load_quality_state(self, quality: int, state: dict) -> None:
        """Inverse of :meth:`quality_state`."""
        self.hyper[quality - 1].load_state_dict(state["hyper"])
        rows = slice((quality - 1) * self.config.Z, quality * self.config.Z)
        for p, values in zip(self.z_density.parameters(), state["z_density"], strict=True):
            p[rows] = values

    @torch.no_grad()
    def start_from(self, y: Tensor, quality: int) -> None:
        """Start quality's h_s at exactly a per-channel Gaussian (or Laplacian) fitted to gained latents
        y (batch, M, h, w): the last layer's weights zero, its biases each channel's mean
        and the scale index of its spread. From a fixed start, Adam needs tens of
        thousands of steps just to move those biases to where most channels are (index
        ~0: σ ≈ 0.1); with the biases fitted but random weights, the noise those weights
        add to μ and t made training shut z off (measured, docs/results/hyperprior.md)."""
        last = self.hyper[quality - 1].h_s[-1]
        last.weight.zero_()
        channels = y.transpose(0, 1).reshape(y.shape[1], -1)
        if self.conditional.distribution == "laplace":  # its fit: the median and the mean |deviation|
            mean = channels.median(dim=1).values
            spread = (channels - mean[:, None]).abs().mean(dim=1)
        else:
            mean = channels.mean(dim=1)
            spread = (channels - mean[:, None]).pow(2).mean(dim=1).sqrt()
        index = torch.log(spread.clamp_min(self.conditional.minimum) / self.conditional.minimum) / self.conditional.step
        last.bias[: self.M] = mean
        last.bias[self.M:] = index.clamp(0, self.conditional.count - 1)

    def means_and_indices(self, h: Tensor, size) -> tuple[Tensor, Tensor]:
        """Split h_s's output into (μ, t), cropped to the latent grid."""
        h = h[..., : size[0], : size[1]]
        return h[:, : self.M], h[:, self.M :]

    # ---- inference: integer h_s and tables ------------------------------------------------

    def export_tables(self, calibration: list[Tensor] | None = None) -> None:
        """Integer tables of every z density and of the Gaussian conditional, and the
        integer h_s of every quality (:func:`integerize`, its activation ranges measured on
        ``calibration``: gained latents (1, M, h, w) per quality, or None for a default)."""
        tables = integer_tables(self.z_density)
        Z = self.config.Z
        self.z_tables = [tables.select(q * Z, (q + 1) * Z) for q in range(self.qualities)]
        self.y_tables = self.conditional.integer_tables()
        self.integer_h_s = [
            integerize(self.hyper[q].h_s, self.config.scales,
                       None if calibration is None else self._h_s_activations(q + 1, calibration[q]))
            for q in range(self.qualities)]

    @torch.no_grad()
    def _h_s_activations(self, quality: int, y: Tensor) -> list[Tensor]:
        hyper = self.hyper[quality - 1]
        z_hat = torch.round(hyper.h_a(y))
        outputs, value = [], z_hat
        for layer in hyper.h_s:
            value = layer(value)
            if isinstance(layer, nn.ReLU):
                outputs.append(value)
        return outputs

    def hyper_encode(self, y: Tensor, quality: int) -> np.ndarray:
        """ẑ = round(h_a(y)) (int64, (Z, h, w)) for gained latents y of shape (1, M, rows, cols)."""
        with torch.inference_mode():
            z = self.hyper[quality - 1].h_a(y)[0]
        if not torch.isfinite(z).all():
            raise ValueError("hyper-analysis produced non-finite values")
        return torch.round(z).to(torch.float64).clamp(-2**31 + 1, 2**31 - 1).numpy().astype(np.int64)

    def hyper_decode(self, z_hat: np.ndarray, quality: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """(μ as float64 (M, rows, cols), scale indices as int64) from ẑ, exactly: the
        integer h_s of the quality."""
        if self.integer_h_s is None:
            raise ValueError("export_tables() first")
        return self.integer_h_s[quality - 1](z_hat, rows, cols)


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


def _integer_layer(layer: IntegerLayer, value: np.ndarray) -> np.ndarray:
    """One exact integer layer on integer-valued float64 activations (C, h, w)."""
    weight = layer.weight.astype(np.float64)
    acc = _transposed(value, weight) if layer.transposed else _correlate(value, weight)
    acc += layer.bias.astype(np.float64)[:, None, None]
    scale = np.exp2(-layer.shift.astype(np.float64))[:, None, None]
    out = np.floor(acc * scale + 0.5)  # × 2**−shift is exact; so is floor of it
    if layer.relu:
        np.clip(out, 0, ACTIVATION_MAX, out=out)
    return out


def _correlate(value: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """'Same' cross-correlation (stride 1, zero padding k//2) of (C, H, W) with
    (O, C, k, k): k·k shifted matrix products, each exact (integer values, sums below
    2**53, so any BLAS, in any order, gives the same result)."""
    out_channels, c, k, _ = weight.shape
    h, w = value.shape[1:]
    padded = np.pad(value, ((0, 0), (k // 2, k // 2), (k // 2, k // 2))) if k > 1 else value
    acc = np.zeros((out_channels, h * w))
    for i in range(k):
        for j in range(k):
            acc += weight[:, :, i, j] @ padded[:, i:i + h, j:j + w].reshape(c, -1)
    return acc.reshape(out_channels, h, w)


def _transposed(value: np.ndarray, weight: np.ndarray, rows: int = 16) -> np.ndarray:
    """The stride-2 transposed convolution (padding k//2, output padding 1: the size
    doubles) whose equivalent correlation kernel is ``weight`` (O, C, k, k): a matrix
    product of every tap with the input, then each tap's plane added where it lands
    (exact, as in :func:`_correlate`). No zeros are multiplied. ``rows`` input rows at a
    time, so that the taps' planes stay small for any image."""
    out_channels, c, k, _ = weight.shape
    h, w = value.shape[1:]
    # The transposed convolution's own kernel, tap by tap: W_t[a, b] = weight[:, :, k−1−a, k−1−b].
    taps = weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(k * k * out_channels, c)
    full = np.zeros((out_channels, 2 * h + k, 2 * w + k))
    for r0 in range(0, h, rows):
        n = min(rows, h - r0)
        planes = (taps @ value[:, r0:r0 + n].reshape(c, -1)).reshape(k, k, out_channels, n, w)
        for a in range(k):
            for b in range(k):
                full[:, 2 * r0 + a:2 * (r0 + n) + a:2, b:b + 2 * w:2] += planes[a, b]
    p = k // 2
    return full[:, p:p + 2 * h, p:p + 2 * w]


def integerize(h_s: nn.Sequential, scales: int, activations: list[Tensor] | None = None) -> IntegerHyperSynthesis:
    """The integer network of a trained float h_s.

    Each hidden activation a is represented as round(a / s) in 0 … ACTIVATION_MAX, s set
    from its largest value seen on calibration data (or a default); each layer's weights
    become round(w · s_in / s_out · 2**shift) with the largest shift that keeps them within
    ±WEIGHT_MAX, per output channel. The output is μ·2**MEAN_BITS and t, so s_out is
    2**−MEAN_BITS for the means and 1 for the scale index."""
    convs = [layer for layer in h_s if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))]
    hidden = len(convs) - 1
    if activations is None:
        steps = [1.0 / 64] * hidden
    else:
        steps = [max(float(torch.quantile(a.flatten().float()[: 1 << 24], 0.9999)), 1e-3) / ACTIVATION_MAX
                 for a in activations]
    layers = []
    s_in = 1.0
    for n, layer in enumerate(convs):
        weight = layer.weight.detach().double()
        transposed = isinstance(layer, nn.ConvTranspose2d)
        if transposed:  # (in, out, k, k) → the equivalent correlation kernel (out, in, k, k)
            weight = weight.flip(-1, -2).transpose(0, 1)
        out_channels = weight.shape[0]
        if n < hidden:
            s_out = torch.full((out_channels,), steps[n], dtype=torch.float64)
        else:
            M = out_channels // 2
            s_out = torch.cat([torch.full((M,), 2.0 ** -MEAN_BITS, dtype=torch.float64),
                               torch.ones(M, dtype=torch.float64)])
        scaled = weight * (s_in / s_out).reshape(-1, 1, 1, 1)
        bias = layer.bias.detach().double() / s_out
        # The largest shift that keeps the weights within ±WEIGHT_MAX and the bias below
        # BIAS_LIMIT (a zero or tiny kernel, as a fresh h_s's last layer has, must not
        # push the bias past it).
        by_weight = torch.log2(WEIGHT_MAX / scaled.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12))
        by_bias = torch.log2((BIAS_LIMIT - 1) / bias.abs().clamp_min(1e-12))
        shift = torch.floor(torch.minimum(by_weight, by_bias)).clamp(0, MAX_SHIFT).long()
        factor = torch.exp2(shift.double())
        w_int = torch.round(scaled * factor.reshape(-1, 1, 1, 1)).clamp(-WEIGHT_MAX, WEIGHT_MAX)
        b_int = torch.round(bias * factor).clamp(-(BIAS_LIMIT - 1), BIAS_LIMIT - 1)
        layers.append(IntegerLayer(w_int.numpy().astype(np.int32), b_int.numpy().astype(np.int64),
                                   shift.numpy().astype(np.int64), transposed, relu=n < hidden))
        s_in = steps[n] if n < hidden else 1.0
    return IntegerHyperSynthesis(layers, scales)


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


def to_arrays(model: Codec, half: bool = False) -> dict[str, np.ndarray]:
    """The base transforms (``base.*``, a factorized weights file of their own), every
    quality's h_a/h_s (float, to train on from here) and integer h_s, the z densities,
    and all integer tables, as named arrays."""
    if model.integer_h_s is None or model.z_tables is None or model.y_tables is None:
        raise ValueError("export_tables() first")
    arrays = {f"base.{name}": value for name, value in factorized.to_arrays(model.base, half).items()}
    for name, tensor in model.state_dict().items():
        if name.startswith("base."):
            continue
        value = tensor.detach().cpu().numpy()
        if half and value.ndim == 4:
            value = value.astype(np.float16)
        arrays[name] = value
    for q, (tables, network) in enumerate(zip(model.z_tables, model.integer_h_s)):
        _put_tables(arrays, f"z_tables.{q}", tables)
        for n, layer in enumerate(network.layers):
            arrays[f"integer_h_s.{q}.{n}.weight"] = layer.weight.astype(np.int16)
            arrays[f"integer_h_s.{q}.{n}.bias"] = layer.bias.astype(np.int64)
            arrays[f"integer_h_s.{q}.{n}.shift"] = layer.shift.astype(np.int8)
    _put_tables(arrays, "y_tables", model.y_tables)
    arrays["config"] = np.frombuffer(model.config.to_json().encode(), dtype=np.uint8)
    return arrays


def _put_tables(arrays: dict[str, np.ndarray], prefix: str, tables: IntegerTables) -> None:
    arrays[f"{prefix}.offsets"] = tables.offsets
    arrays[f"{prefix}.lengths"] = tables.lengths
    arrays[f"{prefix}.frequencies"] = tables.frequencies


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


def from_arrays(arrays: dict[str, np.ndarray]) -> Codec:
    """Inverse of :func:`to_arrays`; raises ValueError on anything inconsistent, before
    anything is built from the file's numbers."""
    try:
        config = Config.from_json(bytes(arrays["config"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"weights have no valid config ({exc})") from None
    base = factorized.from_arrays({name[5:]: value for name, value in arrays.items() if name.startswith("base.")})
    M, Q, N, Z = base.config.M, base.config.qualities, config.hyper_N, config.Z
    shapes = {f"hyper.{q}.{name}": shape for q in range(Q) for name, shape in hyper_shapes(M, N, Z).items()}
    for name, shape in shapes.items():
        if name not in arrays:
            raise ValueError(f"weights lack tensor {name}")
        if tuple(arrays[name].shape) != shape or arrays[name].dtype.kind != "f":
            raise ValueError(f"tensor {name} has shape {arrays[name].shape} and dtype {arrays[name].dtype}, "
                             f"expected floating point of shape {shape}")
    networks = [_integer_network(arrays, q, integer_shapes(M, N, Z), config.scales) for q in range(Q)]
    z_tables = [_get_tables(arrays, f"z_tables.{q}", Z) for q in range(Q)]
    y_tables = _get_tables(arrays, "y_tables", config.scales)
    model = Codec(base, config)
    # The hyper-networks' parameters only: base's own pairs stay unbuilt until used.
    state = {f"{part}.{name}": tensor for part in ("hyper", "z_density")
             for name, tensor in getattr(model, part).state_dict().items()}
    for name in state:
        if name not in arrays or tuple(arrays[name].shape) != tuple(state[name].shape):
            raise ValueError(f"weights lack tensor {name} of shape {tuple(state[name].shape)}")
    factorized.fill(state, arrays)
    model.z_tables, model.y_tables, model.integer_h_s = z_tables, y_tables, networks
    return model.eval()


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


# ---- the family: pixels to substreams and back (nic.families) --------------------------

_CODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def coders(model: Codec, quality: int) -> tuple[LatentCoder, IndexedCoder]:
    """(ẑ's coder, ŷ's coder) of a quality, built once per model."""
    cache = _CODERS.setdefault(model, {})
    if quality not in cache:
        if "y" not in cache:
            cache["y"] = IndexedCoder(model.y_tables)
        cache[quality] = LatentCoder(model.z_tables[quality - 1])
    return cache[quality], cache["y"]


def _check_size(width: int, height: int, error: type) -> None:
    if width * height > MAX_PIXELS:
        raise error(f"the hyperprior family codes images of up to {MAX_PIXELS} pixels for now, not "
                    f"{width}x{height}; use --model factorized")


def analysis(model: Codec, source: np.ndarray | PixelRows, quality: int,
             progress: Progress | None = None) -> np.ndarray:
    """Gained latents y (float32 (M, rows, cols)) of an image, g_a in tiles (nic.tiling)."""
    shape = factorized.latent_shape(model.base.config, source.shape[0], source.shape[1]) \
        if isinstance(source, np.ndarray) else factorized.latent_shape(model.base.config, source.height, source.width)
    y = np.empty(shape, dtype=np.float32)
    count = len(tiles(shape[1], shape[2], tiling.DEFAULT_TILE))
    for done, (where, values) in enumerate(analysis_tiles(model.base, source, quality), 1):
        if not np.isfinite(values).all():
            raise ValueError("analysis transform produced non-finite values")
        y[:, where[0], where[1]] = values
        if progress is not None:
            progress(done, count)
    return y


def compress(model: Codec, source: np.ndarray | PixelRows, quality: int, effort: int = 1,
             progress: Progress | None = None, spill_bytes: int | None = None) -> list[Substream]:
    """The substreams of an image: ẑ, then the residuals k = round(y − μ) (``yhat``)."""
    if effort != 1:
        raise ValueError("the hyperprior family encodes at effort 1 only (for now)")
    height, width = (source.shape[:2] if isinstance(source, np.ndarray) else (source.height, source.width))
    _check_size(width, height, ValueError)
    y = analysis(model, source, quality, progress)
    _, rows, cols = y.shape
    z_hat = model.hyper_encode(torch.from_numpy(y).unsqueeze(0), quality)
    mean, index = model.hyper_decode(z_hat, quality, rows, cols)
    residual = np.round(y.astype(np.float64) - mean)
    if np.abs(residual).max(initial=0) > LATENT_LIMIT:
        raise ValueError("latent magnitude exceeds 2**31 - 1")
    z_coder, y_coder = coders(model, quality)
    return [Substream(b"zhat", z_hat.shape, z_coder.encode(z_hat)),
            Substream(b"yhat", y.shape, y_coder.encode(residual.astype(np.int64).ravel(), index.ravel()).tobytes())]


def decompress(model: Codec, quality: int, height: int, width: int, gray: bool, substreams: list[Substream],
               sink: Callable[[np.ndarray], None], progress: Progress | None = None,
               spill_bytes: int | None = None, on_latents: Callable[[LatentStore], None] | None = None) -> None:
    """Decode ẑ, run the integer h_s, decode the residuals, and hand ``sink`` the pixel rows.
    ``on_latents`` sees the residuals (integers) before the synthesis runs."""
    _check_size(width, height, FormatError)
    y_shape = factorized.latent_shape(model.base.config, height, width)
    z, y = expect_substreams(substreams, [(b"zhat", z_shape(model.config.Z, *y_shape[1:])),
                                                      (b"yhat", y_shape)])
    z_coder, y_coder = coders(model, quality)
    try:
        z_hat = z_coder.decode(z.data, z.shape)
    except CorruptStream as exc:
        raise FormatError(f"substream zhat is corrupt: {exc}") from None
    mean, index = model.hyper_decode(z_hat, quality, y_shape[1], y_shape[2])
    try:
        residual = y_coder.decode(y.data, index.ravel()).reshape(y_shape)
    except CorruptStream as exc:
        raise FormatError(f"substream yhat is corrupt: {exc}") from None
    if on_latents is not None:
        on_latents(LatentStore(y_shape, array=residual))
    y_hat = (residual + mean).astype(np.float32)  # elementwise IEEE: the same everywhere
    del residual, mean, index
    reconstruct_into(model.base, LatentStore(y_shape, array=y_hat), quality, height, width, gray, sink,
                     progress=progress)
