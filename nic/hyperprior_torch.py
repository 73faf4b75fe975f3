"""The hyperprior family's network in torch: what trains it (h_a, h_s and the z
densities on a factorized model's transforms) and exports it (the integer h_s, the
tables, the weights' arrays).

The architecture, the integer hyper-decoder and the file format are described in
:mod:`nic.hyperprior`, which codes files without torch; this module is its trainable
twin. Every name here is also reachable as ``nic.hyperprior.<name>`` (imported on first
use).

Math only: tensors and arrays in, tensors and arrays out; no I/O.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from torch import Tensor, nn

from . import context, factorized
from .entropy import FactorizedDensity, GaussianConditional, IntegerTables, integer_tables
from .hyperprior import (Config, HyperAnalysisArrays, IntegerHyperSynthesis, IntegerLayer, _get_tables,
                         _integer_network, check_slices, compact_kernel, hyper_shapes, integer_shapes,
                         read_context_networks, rounded_z)
from .integer import BIAS_LIMIT, MAX_SHIFT, MEAN_BITS, WEIGHT_MAX, ACTIVATION_MAX
from .layers import conv, deconv
from .weights import weights_hash

INITIAL_INDEX = 24.0
"""Where a fresh h_s puts every scale index: σ ≈ 2 in the default table."""

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


class ContextNetwork(nn.Module):
    """One context pass's correction to h_s's (μ, t) of a slice (nic.context): 1x1 on h_s's
    (μ, t) of every channel plus k x k on ŷ's context, ReLU, 1x1, ReLU, 1x1. The last
    layer starts at zero, so a fresh context model codes exactly as h_s alone."""

    def __init__(self, M: int, channels: int, c: int, width: int, kernel: int):
        super().__init__()
        self.hyper = nn.Conv2d(2 * M, width, 1)
        self.context = nn.Conv2d(channels, width, kernel, padding=kernel // 2, bias=False) if channels else None
        self.hidden = nn.Conv2d(width, width, 1)
        self.out = nn.Conv2d(width, 2 * c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def first(self, hyper: Tensor, context: Tensor) -> Tensor:
        value = self.hyper(hyper)
        return value + self.context(context) if self.context is not None else value

    def forward(self, hyper: Tensor, context: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(torch.relu(self.first(hyper, context)))))


def _input(value: Tensor) -> Tensor:
    """What an integer context network sees of a value: clipped to ±INPUT_LIMIT·2**−MEAN_BITS."""
    limit = context.INPUT_LIMIT / (1 << MEAN_BITS)
    return value.clamp(-limit, limit)


class Context(nn.Module):
    """One quality's context networks, one per pass but the first (nic.context)."""

    def __init__(self, M: int, config: Config):
        super().__init__()
        self.M, self.slices, self.checkerboard = M, config.slices, config.checkerboard
        c = M // config.slices
        self.nets = nn.ModuleDict({
            f"{s}_{p}": ContextNetwork(M, context.context_channels(M, config.slices, s, p, config.checkerboard), c,
                                       config.context_width, config.context_kernel)
            for s, p in context.passes(config.slices, config.checkerboard) if context.has_network(s, p)})

    def bits(self, conditional: GaussianConditional, y: Tensor, mean: Tensor, index: Tensor,
             rounded: bool) -> tuple[Tensor, Tensor]:
        """(bits of ŷ per latent, ŷ) pass by pass, as the coder does: each pass's (μ, t) is
        h_s's plus its network's correction from what earlier passes decoded. ``index`` is
        h_s's real t; its round is what the coder uses (straight-through)."""
        c = self.M // self.slices
        t = torch.clamp(index + (torch.round(index) - index).detach(), 0, conditional.count - 1)
        hyper = _input(torch.cat([mean, t], 1))
        # Per slice, what is decoded so far (zero elsewhere) and its bits (no in-place
        # writes: later passes differentiate through earlier ones).
        decoded = [torch.zeros_like(y[:, :c]) for _ in range(self.slices)]
        bits: list[Tensor | float] = [0.0] * self.slices
        for s, p in context.passes(self.slices, self.checkerboard):
            channels = slice(s * c, (s + 1) * c)
            mu, t_s = mean[:, channels], t[:, channels]
            if context.has_network(s, p):
                # The slices before s and, in phase 1, slice s's anchors.
                seen = torch.cat(decoded[: s + p], 1)
                correction = self.nets[f"{s}_{p}"](hyper, _input(seen))
                mu = mu + correction[:, :c]
                t_s = t_s + correction[:, c:]
            residual = y[:, channels] - mu
            residual_hat = residual + (torch.round(residual) - residual).detach()
            coded = residual_hat if rounded else residual + torch.empty_like(residual).uniform_(-0.5, 0.5)
            where = self._mask(y, p)
            bits[s] = bits[s] + conditional.bits(coded, conditional.scale(t_s)) * where
            decoded[s] = decoded[s] + (residual_hat + mu) * where
        return torch.cat(bits, 1), torch.cat(decoded, 1)

    def _mask(self, y: Tensor, phase: int) -> Tensor:
        rows, cols = y.shape[-2:]
        return torch.from_numpy(context.phase_mask(rows, cols, phase, self.checkerboard)).to(y.dtype)

    @torch.no_grad()
    def hidden_activations(self, conditional: GaussianConditional, y: Tensor, mean: Tensor,
                           index: Tensor) -> dict[str, list[Tensor]]:
        """Each network's two hidden activations on gained latents y (for integerizing)."""
        seen: dict[str, list[Tensor]] = {}
        hooks = []
        for name, net in self.nets.items():
            seen[name] = []
            hooks.append(net.hidden.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0])))
            hooks.append(net.out.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0])))
        try:
            self.bits(conditional, y, mean, index, rounded=True)
        finally:
            for hook in hooks:
                hook.remove()
        return seen


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
        if config.has_context:
            check_slices(M, config)
            self.context = nn.ModuleList([Context(M, config) for _ in range(Q)])
        self.integer_context: list[dict] | None = None
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
        the default. With ``rounded``, h_s also sees round(z) (straight-through), as the
        coder's does: for fine-tuning a trained model; a fresh one needs the noise (below).
        g_s always gets round(y − μ) + μ (straight-through)."""
        self._check_trainable()
        hyper = self.hyper[quality - 1]
        z = hyper.h_a(y)
        z_noisy = z + torch.empty_like(z).uniform_(-0.5, 0.5)
        p = self.z_density.probability(z_noisy, self.z_rows(quality, len(z), z.device))
        z_bits = -torch.log2(p).sum(dim=(1, 2, 3))
        # h_s sees z + U(−½, ½), as in Ballé et al. 2018: with round(z) instead (straight
        # through), a fresh h_a's small z all round to 0, no information reaches h_s, and
        # training settles on not using z at all (measured: z's rate went to ~0).
        # With ``rounded``, h_s sees round(z) in training too (straight-through): what the
        # coder sends, and what the context networks were trained on (in eval mode); fed
        # z + U(−½, ½) instead, training the context networks alone raised their own
        # training crops' real rate by 0.6 % in 150 steps (measured).
        if not self.training:
            z_hat = torch.round(z)
        elif rounded:
            z_hat = z + (torch.round(z) - z).detach()
        else:
            z_hat = z_noisy
        mean, index = self.means_and_indices(hyper.h_s(z_hat), y.shape[-2:])
        if self.config.has_context:
            bits, y_hat = self.context[quality - 1].bits(self.conditional, y, mean, index, rounded)
            return z_bits, bits.sum(dim=(1, 2, 3)), y_hat
        sigma = self.conditional.scale(index)
        residual = y - mean
        residual_hat = residual + (torch.round(residual) - residual).detach()
        coded = residual_hat if rounded else residual + torch.empty_like(residual).uniform_(-0.5, 0.5)
        y_bits = self.conditional.bits(coded, sigma).sum(dim=(1, 2, 3))
        return z_bits, y_bits, residual_hat + mean

    def _check_trainable(self) -> None:
        if self.config.coding_only:
            raise ValueError("these weights are for coding only (integer networks, no float h_s): "
                             "train from a run's states")

    def quality_state(self, quality: int) -> dict:
        """What one quality has of its own (h_a, h_s, its rows of the z density), as tensors:
        a training run saves each quality apart."""
        rows = slice((quality - 1) * self.config.Z, quality * self.config.Z)
        state = {"hyper": self.hyper[quality - 1].state_dict(),
                 "z_density": [p.detach()[rows].clone() for p in self.z_density.parameters()]}
        if self.config.has_context:
            state["context"] = self.context[quality - 1].state_dict()
            state["config"] = self.config.to_json()  # the context's shape, for tools that load the state
        return state

    @torch.no_grad()
    def load_quality_state(self, quality: int, state: dict) -> None:
        """Inverse of :meth:`quality_state`."""
        self.hyper[quality - 1].load_state_dict(state["hyper"])
        rows = slice((quality - 1) * self.config.Z, quality * self.config.Z)
        for p, values in zip(self.z_density.parameters(), state["z_density"], strict=True):
            p[rows] = values
        if self.config.has_context and "context" in state:  # a stage-1 state has none: it starts fresh
            self.context[quality - 1].load_state_dict(state["context"])

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

    def export_tables(self, calibration: list[Tensor] | None = None, context_weight_max: int = WEIGHT_MAX) -> None:
        """Integer tables of every z density and of the Gaussian conditional, and the
        integer h_s of every quality (:func:`integerize`, its activation ranges measured on
        ``calibration``: gained latents (1, M, h, w) per quality, or None for a default).
        The context networks' weights stay within ±``context_weight_max`` (127: int8 in
        coding-only weights, measured at no cost; h_s needs its 16 bits)."""
        self._check_trainable()
        self.y_tables = self.conditional.integer_tables()
        self.z_tables = [None] * self.qualities
        self.integer_h_s = [None] * self.qualities
        self.integer_context = [None] * self.qualities if self.config.has_context else None
        tables = integer_tables(self.z_density)
        for q in range(self.qualities):
            self._export(q + 1, tables, None if calibration is None else calibration[q], context_weight_max)

    def export_quality(self, quality: int, calibration: Tensor | None = None,
                       context_weight_max: int = WEIGHT_MAX) -> None:
        """:meth:`export_tables` for one quality, every other quality's integer networks
        and tables kept as they are (a quality trained on after the weights shipped: the
        other qualities' files stay byte for byte the same)."""
        self._check_trainable()
        if self.z_tables is None or self.integer_h_s is None:
            raise ValueError("export_tables() first")
        self._export(quality, integer_tables(self.z_density), calibration, context_weight_max)

    def _export(self, quality: int, z_tables: IntegerTables, calibration: Tensor | None,
                context_weight_max: int) -> None:
        """One quality's ẑ tables (its rows of ``z_tables``), integer h_s and context networks."""
        Z, q = self.config.Z, quality - 1
        self.z_tables[q] = z_tables.select(q * Z, (q + 1) * Z)
        self.integer_h_s[q] = integerize(self.hyper[q].h_s, self.config.scales,
                                         None if calibration is None else self._h_s_activations(quality, calibration))
        if self.config.has_context:
            self.integer_context[q] = self._integer_context(quality, calibration, context_weight_max)

    @torch.no_grad()
    def _integer_context(self, quality: int, y: Tensor | None, weight_max: int = WEIGHT_MAX
                         ) -> dict[str, context.IntegerContextNetwork]:
        ctx = self.context[quality - 1]
        seen = None
        if y is not None:
            hyper = self.hyper[quality - 1]
            mean, index = self.means_and_indices(hyper.h_s(torch.round(hyper.h_a(y))), y.shape[-2:])
            seen = ctx.hidden_activations(self.conditional, y, mean, index)
        return {name: integerize_context(net, None if seen is None else seen[name], weight_max)
                for name, net in ctx.nets.items()}

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

    def z_table(self, quality: int) -> IntegerTables:
        """ẑ's integer tables at a quality (export_tables() first)."""
        if self.z_tables is None:
            raise ValueError("export_tables() first")
        return self.z_tables[quality - 1]

    def hyper_encode(self, y: np.ndarray, quality: int) -> np.ndarray:
        """ẑ = round(h_a(y)) (int64, (Z, h, w)) for gained latents y (float32 (M, rows, cols))."""
        with torch.inference_mode():
            z = self.hyper[quality - 1].h_a(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None])[0]
        return rounded_z(z.numpy())

    def context_networks(self, quality: int) -> dict[str, context.IntegerContextNetwork]:
        """The quality's integer context networks by pass ("s_p"; none without context)."""
        if not self.config.has_context:
            return {}
        if self.integer_context is None:
            raise ValueError("export_tables() first")
        return self.integer_context[quality - 1]

    def hyper_decode(self, z_hat: np.ndarray, quality: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """(μ as float64 (M, rows, cols), scale indices as int64) from ẑ, exactly: the
        integer h_s of the quality."""
        if self.integer_h_s is None:
            raise ValueError("export_tables() first")
        return self.integer_h_s[quality - 1](z_hat, rows, cols)


def integerize(h_s: nn.Sequential, scales: int, activations: list[Tensor] | None = None) -> IntegerHyperSynthesis:
    """The integer network of a trained float h_s.

    Each hidden activation a is represented as round(a / s) in 0 … ACTIVATION_MAX, s set
    from its largest value seen on calibration data (or a default); each layer's weights
    become round(w · s_in / s_out · 2**shift) with the largest shift that keeps them within
    ±WEIGHT_MAX, per output channel. The output is μ·2**MEAN_BITS and t, so s_out is
    2**−MEAN_BITS for the means and 1 for the scale index."""
    convs = [layer for layer in h_s if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))]
    hidden = len(convs) - 1
    steps = [_step(None if activations is None else activations[n]) for n in range(hidden)]
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
        (w_int,), b_int, shift = integer_weights([weight], layer.bias, s_in, s_out)
        layers.append(IntegerLayer(w_int, b_int, shift, transposed, relu=n < hidden))
        s_in = steps[n] if n < hidden else 1.0
    return IntegerHyperSynthesis(layers, scales)


def integer_weights(weights: list[Tensor], bias: Tensor | None, s_in: float, s_out: Tensor,
                    weight_max: int = WEIGHT_MAX) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One layer's integer weights (int32, each of ``weights`` (out, in, …), summed into the
    same outputs), bias (int64) and per-output shift (int64), for inputs represented as
    round(a / s_in) and outputs as round(a / s_out): round(w · s_in / s_out · 2**shift) with
    the largest shift that keeps the weights within ±``weight_max`` and the bias below
    BIAS_LIMIT (a zero or tiny kernel, as a fresh last layer has, must not push the bias
    past it)."""
    s_out = s_out.double()
    scaled = [w.detach().double() * (s_in / s_out).reshape(-1, *[1] * (w.dim() - 1)) for w in weights]
    b = (bias.detach().double() if bias is not None else torch.zeros_like(s_out)) / s_out
    largest = torch.stack([w.abs().reshape(len(w), -1).amax(dim=1) if w.numel() else torch.zeros_like(s_out)
                           for w in scaled]).amax(dim=0)
    by_weight = torch.log2(weight_max / largest.clamp_min(1e-12))
    by_bias = torch.log2((BIAS_LIMIT - 1) / b.abs().clamp_min(1e-12))
    shift = torch.floor(torch.minimum(by_weight, by_bias)).clamp(0, MAX_SHIFT).long()
    factor = torch.exp2(shift.double())
    ints = [torch.round(w * factor.reshape(-1, *[1] * (w.dim() - 1))).clamp(-weight_max, weight_max)
            .numpy().astype(np.int32) for w in scaled]
    b_int = torch.round(b * factor).clamp(-(BIAS_LIMIT - 1), BIAS_LIMIT - 1)
    return ints, b_int.numpy().astype(np.int64), shift.numpy().astype(np.int64)


def _step(activation: Tensor | None) -> float:
    """The integer step of a hidden activation: its 0.9999 quantile over ACTIVATION_MAX
    (1/64 without calibration data)."""
    if activation is None:
        return 1.0 / 64
    return max(float(torch.quantile(activation.flatten().float()[: 1 << 24], 0.9999)), 1e-3) / ACTIVATION_MAX


def integerize_context(net: ContextNetwork, activations: list[Tensor] | None = None,
                       weight_max: int = WEIGHT_MAX) -> context.IntegerContextNetwork:
    """The integer network of a trained :class:`ContextNetwork` (as :func:`integerize`:
    inputs × 2**MEAN_BITS, hidden activations at their calibrated steps, outputs μ·2**MEAN_BITS and t)."""
    steps = [_step(None if activations is None else a) for a in (activations or [None, None])]
    c = net.out.out_channels // 2
    s_in = 2.0 ** -MEAN_BITS
    parts = [net.hyper.weight[:, :, 0, 0]]
    if net.context is not None:
        parts.append(net.context.weight)
    first, b0, shift0 = integer_weights(parts, net.hyper.bias, s_in, torch.full((net.hyper.out_channels,), steps[0]),
                                        weight_max)
    (hidden,), b1, shift1 = integer_weights([net.hidden.weight[:, :, 0, 0]], net.hidden.bias, steps[0],
                                            torch.full((net.hidden.out_channels,), steps[1]), weight_max)
    s_out = torch.cat([torch.full((c,), 2.0 ** -MEAN_BITS), torch.ones(c)])
    (out,), b2, shift2 = integer_weights([net.out.weight[:, :, 0, 0]], net.out.bias, steps[1], s_out, weight_max)
    k = net.context.kernel_size[0] if net.context is not None else 1
    first_context = first[1] if net.context is not None else np.zeros((len(first[0]), 0, k, k), np.int32)
    return context.IntegerContextNetwork(first[0], first_context, (b0, b1, b2), (shift0, shift1, shift2),
                                         (hidden, out))



@torch.no_grad()
def trainable_again(model: Codec) -> Codec:
    """A coding-only model (shipped weights: integer h_s and context networks, no float
    copies) made trainable again: each float network is its integer network read back,
    every layer computing the integer layer's output in its own units (weights and bias
    ÷ 2**shift), the means ÷ 2**MEAN_BITS at the end, then each hidden layer's units
    rescaled (:func:`_balance`). It differs from the integer network only by the
    rounding and clipping of activations, so training resumes from what nic ships
    without a run's states. Always a copy (loaded models are shared within a process)."""
    model = copy.deepcopy(model)
    if not model.config.coding_only:
        return model
    config = dataclasses.replace(model.config, coding_only=False, base="", extends="")
    model.config = config
    M = model.M
    for hyper, network in zip(model.hyper, model.integer_h_s):
        convs = [layer for layer in hyper.h_s if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))]
        for n, (layer, integer) in enumerate(zip(convs, network.layers, strict=True)):
            weight, bias = _read_back(integer.weight, integer.bias, integer.shift)
            if n == len(convs) - 1:
                weight[:M] /= 1 << MEAN_BITS
                bias[:M] /= 1 << MEAN_BITS
            if integer.transposed:  # a correlation kernel (out, in, k, k) back to (in, out, k, k)
                weight = weight.flip(-1, -2).transpose(0, 1)
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        _balance([[layer] for layer in convs])
    if config.has_context:
        for nets, integer_nets in zip(model.context, model.integer_context, strict=True):
            for name, net in nets.nets.items():
                _context_read_back(net, integer_nets[name])
                _balance([[net.hyper] + ([net.context] if net.context is not None else []), [net.hidden], [net.out]])
    return model


def _balance(layers: list[list[nn.Module]], sweeps: int = 4) -> None:
    """Rescale the hidden units of a chain of layers with ReLU between them (each entry:
    the modules that sum into one layer's output) so that every layer's weights have
    about the same RMS, the function unchanged (ReLU(c·a) = c·ReLU(a) for c > 0: a
    layer's weights and bias × c, the next layer's weights ÷ c). Read back from
    integers, a layer's units are its activation step (~1/4096 of its range): the last
    layer's weights came out ~10^4 times smaller than the first's, and Adam, which
    moves every parameter by about the learning rate, changed them by half their size
    a step (measured: training h_s alone raised held-out J by 1.1 % in 150 steps).
    Balanced, the product of the RMS is what it was, as in the float network the
    integers were made from."""
    def rms(modules: list[nn.Module]) -> float:
        squares = sum(float(m.weight.double().pow(2).sum()) for m in modules)
        return math.sqrt(squares / sum(m.weight.numel() for m in modules))

    for _ in range(sweeps):
        for n in range(len(layers) - 1):
            before, after = rms(layers[n]), rms(layers[n + 1])
            if before == 0 or after == 0:
                continue
            c = math.sqrt(after / before)
            for m in layers[n]:
                m.weight.mul_(c)
                if m.bias is not None:
                    m.bias.mul_(c)
            for m in layers[n + 1]:
                m.weight.div_(c)


def _read_back(weight: np.ndarray, bias: np.ndarray, shift: np.ndarray) -> tuple[Tensor, Tensor]:
    """An integer layer's weights and bias as floats in units of its own output."""
    scale = torch.from_numpy(np.ldexp(1.0, -shift.astype(np.int64)))
    w = torch.from_numpy(weight.astype(np.float64)) * scale.reshape(-1, *[1] * (weight.ndim - 1))
    return w.float(), (torch.from_numpy(bias.astype(np.float64)) * scale).float()


def _context_read_back(net: ContextNetwork, integer: context.IntegerContextNetwork) -> None:
    """Inverse of :func:`integerize_context` up to its rounding: the inputs are floats, the
    integer network sees them × 2**MEAN_BITS, and its outputs are (μ·2**MEAN_BITS, t)."""
    first_hyper, b0 = _read_back(integer.first_hyper, integer.biases[0], integer.shifts[0])
    net.hyper.weight.copy_(first_hyper[:, :, None, None] * (1 << MEAN_BITS))
    net.hyper.bias.copy_(b0)
    if net.context is not None:
        first_context, _ = _read_back(integer.first_context, integer.biases[0], integer.shifts[0])
        net.context.weight.copy_(first_context * (1 << MEAN_BITS))
    hidden, b1 = _read_back(integer.hidden[0], integer.biases[1], integer.shifts[1])
    out, b2 = _read_back(integer.hidden[1], integer.biases[2], integer.shifts[2])
    c = len(out) // 2
    out[:c] /= 1 << MEAN_BITS
    b2[:c] /= 1 << MEAN_BITS
    net.hidden.weight.copy_(hidden[:, :, None, None])
    net.hidden.bias.copy_(b1)
    net.out.weight.copy_(out[:, :, None, None])
    net.out.bias.copy_(b2)


# ---- weights as plain arrays (no pickle) -----------------------------------------------

def to_arrays(model: Codec, half: bool = False, separate_base: bool = False,
              coding_only: bool = False) -> dict[str, np.ndarray]:
    """The base transforms (``base.*``, a factorized weights file of their own), every
    quality's h_a/h_s (float, to train on from here) and integer h_s, the z densities,
    and all integer tables, as named arrays.

    With ``separate_base`` the transforms stay out and the config names them by their
    weights hash (they must be installed as factorized weights of their own: the shipped
    hyperprior weights share the shipped factorized ones). With ``coding_only`` the float
    h_s and context networks stay out too: the file codes, through the integer networks,
    but cannot be trained further (train from the run's states instead); h_a's kernels
    are int8 with a scale per output channel (nic.hyperprior.HyperAnalysisArrays) and
    context weights that fit 8 bits (``export_tables(context_weight_max=127)``) int8."""
    if model.integer_h_s is None or model.z_tables is None or model.y_tables is None:
        raise ValueError("export_tables() first")
    if model.config.coding_only:
        raise ValueError("coding-only weights cannot be exported again")
    base = factorized.to_arrays(model.base, half)
    config = dataclasses.replace(model.config, base=weights_hash(base).hex() if separate_base else "",
                                 coding_only=coding_only, extends="")  # it holds everything itself
    arrays = {} if separate_base else {f"base.{name}": value for name, value in base.items()}
    for name, tensor in model.state_dict().items():
        if name.startswith("base.") or (coding_only and (".h_s." in name or name.startswith("context."))):
            continue
        value = tensor.detach().cpu().numpy()
        if coding_only and ".h_a." in name and value.ndim == 4:
            arrays[name], arrays[name + "_scale"] = compact_kernel(value)
            continue
        if half and value.ndim == 4:
            value = value.astype(np.float16)
        arrays[name] = value
    for q, (tables, network) in enumerate(zip(model.z_tables, model.integer_h_s)):
        _put_tables(arrays, f"z_tables.{q}", tables)
        for n, layer in enumerate(network.layers):
            arrays[f"integer_h_s.{q}.{n}.weight"] = layer.weight.astype(np.int16)
            arrays[f"integer_h_s.{q}.{n}.bias"] = layer.bias.astype(np.int64)
            arrays[f"integer_h_s.{q}.{n}.shift"] = layer.shift.astype(np.int8)
    if model.config.has_context:
        if model.integer_context is None:
            raise ValueError("export_tables() first")
        for q, networks in enumerate(model.integer_context):
            for name, network in networks.items():
                context.put_network(arrays, f"integer_context.{q}.{name}", network, narrow=coding_only)
    _put_tables(arrays, "y_tables", model.y_tables)
    arrays["config"] = np.frombuffer(config.to_json().encode(), dtype=np.uint8)
    return arrays


def extension_arrays(model: Codec, qualities: list[int], earlier: dict[str, np.ndarray],
                     earlier_hash: bytes) -> dict[str, np.ndarray]:
    """Coding-only weights that extend ``earlier`` (the arrays of the weights file of hash
    ``earlier_hash``, as loaded: its base joined) with what ``qualities`` were trained to
    since: each one's pair (under ``base.``), h_a, integer h_s, context networks and ẑ
    tables, and the arrays those qualities share rows of (the gains, the ẑ density, the
    base's config). Every other array stays the earlier file's, so every other quality
    codes exactly as it did. Export the trained qualities first (:meth:`Codec.export_quality`)."""
    if not qualities or any(not 1 <= q <= model.qualities for q in qualities):
        raise ValueError(f"qualities {qualities} are not among this model's 1..{model.qualities}")
    full = to_arrays(model, half=True, coding_only=True)
    others = [q - 1 for q in range(1, model.qualities + 1) if q not in qualities]
    for name in ("base.gain", "base.inverse_gain"):  # whole arrays: every other row must stay as it was
        if not np.array_equal(full[name][others], np.asarray(earlier[name])[others]):
            raise ValueError(f"{name} changed for qualities other than {qualities}")
    prefixes = tuple(p for q in qualities for p in (f"hyper.{q - 1}.", f"integer_h_s.{q - 1}.",
                                                    f"integer_context.{q - 1}.", f"z_tables.{q - 1}.",
                                                    f"base.own.q{q}."))
    arrays = {name: value for name, value in full.items()
              if name.startswith(prefixes + ("z_density.",)) or name in ("base.gain", "base.inverse_gain")}
    if not np.array_equal(full["base.config"], earlier["base.config"]):
        arrays["base.config"] = full["base.config"]
    for name, value in arrays.items():
        if name in earlier and earlier[name].dtype != value.dtype and value.dtype.kind == "f":
            raise ValueError(f"array {name} would change its precision: {earlier[name].dtype} -> {value.dtype}")
    config = dataclasses.replace(model.config, base="", coding_only=True, extends=earlier_hash.hex())
    arrays["config"] = np.frombuffer(config.to_json().encode(), dtype=np.uint8)
    return arrays


def _put_tables(arrays: dict[str, np.ndarray], prefix: str, tables: IntegerTables) -> None:
    arrays[f"{prefix}.offsets"] = tables.offsets
    arrays[f"{prefix}.lengths"] = tables.lengths
    arrays[f"{prefix}.frequencies"] = tables.frequencies


def from_arrays(arrays: dict[str, np.ndarray]) -> Codec:
    """Inverse of :func:`to_arrays`; raises ValueError on anything inconsistent, before
    anything is built from the file's numbers."""
    try:
        config = Config.from_json(bytes(arrays["config"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"weights have no valid config ({exc})") from None
    base = factorized.from_arrays({name[5:]: arrays[name] for name in arrays if name.startswith("base.")})
    M, Q, N, Z = base.config.M, base.config.qualities, config.hyper_N, config.Z
    for part in ("h_a.", "h_s.") if not config.coding_only else ("h_a.",):  # coding only: no float h_s
        factorized.check_arrays(arrays, {f"hyper.{q}.{name}": shape for q in range(Q)
                                         for name, shape in hyper_shapes(M, N, Z).items() if name.startswith(part)},
                                "fi" if config.coding_only and part == "h_a." else "f")  # int8 h_a kernels
    networks = [_integer_network(arrays, q, integer_shapes(M, N, Z), config.scales) for q in range(Q)]
    z_tables = [_get_tables(arrays, f"z_tables.{q}", Z) for q in range(Q)]
    y_tables = _get_tables(arrays, "y_tables", config.scales)
    model = Codec(base, config)
    # The hyper-networks' parameters only: base's own pairs stay unbuilt until used.
    state = {f"{part}.{name}": tensor for part in ("hyper", "z_density", "context")[: 3 if config.has_context else 2]
             for name, tensor in getattr(model, part).state_dict().items()}
    if config.coding_only:  # the float h_s and context were left out (to_arrays)
        state = {name: tensor for name, tensor in state.items()
                 if ".h_s." not in name and not name.startswith("context.")}
    for name in state:
        if name not in arrays or tuple(arrays[name].shape) != tuple(state[name].shape):
            raise ValueError(f"weights lack tensor {name} of shape {tuple(state[name].shape)}")
    factorized.fill(state, HyperAnalysisArrays(arrays))
    model.z_tables, model.y_tables, model.integer_h_s = z_tables, y_tables, networks
    if config.has_context:
        model.integer_context = [read_context_networks(arrays, q, M, config) for q in range(Q)]
    return model.eval()
