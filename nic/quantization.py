"""Entropy-constrained quantization at the encoder: choose the integer latents by
D + λ·R instead of rounding them.

Borzechowski, Schäfer, Schwarz et al., "Optimizing Learned Image Compression on Scalar
and Entropy-Constraint Quantization": rounding g_a(x) to the nearest integer ignores
what each value costs in bits and what it does to the picture after g_s. The encoder
is free to send any integers; the decoder is unchanged. The cost minimized is the one
the network was trained on, in bits for the whole image:

    J(ŷ) = R(ŷ) + κ·SSE(clip(g_s(ŷ)), x),    κ = λ_q · 255² / channels,

with R(ŷ) the exact code length under the integer tables that the range coder uses
(−log2 of each symbol's frequency / 2¹⁶, plus the bypass bits of escaped values) and
SSE over pixels in [0, 1] (so J / pixels is the training loss bpp + λ·255²·MSE).

Effort levels; effort e runs the searches of efforts 2 … e in order and keeps a
result only when its exactly evaluated J is lower, so (within a tile) a higher effort
never has a higher J than a lower one:

1. plain rounding (the default);
2. latent optimization (Campos et al., "Content adaptive optimization for neural image
   compression", CVPRW 2019; Yang, Bamler and Mandt, "Improving inference for neural
   image compression", NeurIPS 2020): 8 Adam steps on continuous latents that the
   forward pass rounds (straight-through gradient), with the learned density of the
   quality as rate and the distortion through g_s; the cheapest rounded latents seen
   are kept;
3. 24 more steps, restarted from where effort 2 stopped;
4. 64 more steps, then greedy RDOQ: latents move by ±1 or to 0 where the exact rate
   difference, the distortion gradient through g_s and a per-channel curvature
   predict a gain, at most one change per local maximum of the predicted gain, each
   pass checked with a real decode.

Work is done in tiles of the latent grid, so memory stays bounded. Changing the core
latents of a tile changes the pixels of the core's 16-pixel blocks widened by the
reach of g_s; those pixels are decoded from the core plus its neighbours, with every
other latent fixed at its current value. A tile's J change is therefore exactly the
image's, and tiles are visited in order, each seeing its already optimized neighbours.

This module is math only: tensors in, tensors out. No I/O.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .coding import PRECISION, IntegerTables
from .layers import bf16_is_fast
from .tiling import DOWNSAMPLING

EFFORTS = (1, 2, 3, 4)
"""Encoder effort levels; 1 is plain rounding and the default."""

TILE_LATENTS = 32
"""Core of an optimization tile, in latents (512 pixels)."""


RDOQ_PASSES = 3
"""Greedy RDOQ passes per search (each pass is one decode with its gradient)."""

GREEDY_EFFORT = 4
"""The effort from which greedy RDOQ passes refine the optimized latents."""

SEARCHES = {2: (8, 0.02), 3: (24, 0.01), 4: (64, 0.01)}
"""(Adam steps, first step size in quantization steps) of the latent optimization
that each effort adds, restarting from where the effort below it stopped."""


# ---- rate from the integer tables ------------------------------------------------------

class TableRate:
    """Exact code length in bits of each latent under one quality's integer tables."""

    def __init__(self, tables: IntegerTables):
        channels = len(tables.lengths)
        width = int(tables.lengths.max()) + 1
        bits = np.zeros((channels, width), dtype=np.float64)
        for c in range(channels):
            frequencies = tables.channel(c).astype(np.float64)
            bits[c, : len(frequencies)] = PRECISION - np.log2(frequencies)
        self.bits = torch.from_numpy(bits)
        self.offsets = torch.from_numpy(tables.offsets.astype(np.int64)).reshape(-1, 1, 1)
        self.lengths = torch.from_numpy(tables.lengths.astype(np.int64)).reshape(-1, 1, 1)

    def __call__(self, values: Tensor) -> Tensor:
        """Bits (float64) of integer-valued ``values`` of shape (C, h, w) or (k, C, h, w)."""
        values = values.to(torch.int64)
        symbols = values - self.offsets
        inside = (symbols >= 0) & (symbols < self.lengths)
        index = torch.where(inside, symbols, self.lengths.expand_as(symbols))
        shape = index.shape
        flat = index.reshape(-1, shape[-3], shape[-2] * shape[-1]).transpose(0, 1).reshape(shape[-3], -1)
        bits = torch.gather(self.bits, 1, flat).reshape(shape[-3], -1, shape[-2] * shape[-1])
        bits = bits.transpose(0, 1).reshape(shape)
        return bits + (~inside) * _escape_bits(values)  # escaped values: the escape symbol, then these


class IndexedRate:
    """Exact code length in bits of each latent under the table its own index picks (the
    hyperprior family's conditional: one integer table per scale index, nic.entropy)."""

    def __init__(self, tables: IntegerTables):
        self.tables = TableRate(tables)  # row t: the table of scale index t

    def at(self, index: Tensor) -> "Callable[[Tensor], Tensor]":
        """The rate function of latents whose scale indices are ``index`` (C, h, w)."""
        table = self.tables
        offsets, lengths = table.offsets.reshape(-1)[index], table.lengths.reshape(-1)[index]
        width = table.bits.shape[1]

        def rate(values: Tensor) -> Tensor:
            values = values.to(torch.int64)
            symbols = values - offsets
            inside = (symbols >= 0) & (symbols < lengths)
            column = torch.where(inside, symbols, lengths.expand_as(symbols))
            bits = table.bits.reshape(-1)[index * width + column]
            return bits + (~inside) * _escape_bits(values)

        return rate


def _escape_bits(values: Tensor) -> Tensor:
    """Bits after the escape symbol: a 33-way uniform bit length, then the bits."""
    zigzag = torch.where(values >= 0, 2 * values, -2 * values - 1).to(torch.float64)
    bit_length = torch.where(zigzag > 0, torch.floor(torch.log2(zigzag.clamp_min(1))) + 1, torch.zeros_like(zigzag))
    return math.log2(33) + bit_length


_RATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CURVATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _table_rate(model, quality: int) -> TableRate:
    cache = _RATES.setdefault(model, {})
    if quality not in cache:
        cache[quality] = TableRate(model.tables[quality - 1])
    return cache[quality]


@torch.no_grad()
def impulse_energy(model, quality: int) -> Tensor:
    """(C, 1, 1) squared norm of g_s's response to a unit change of one latent of each
    channel, on a zero background: the diagonal curvature of SSE in ŷ, up to a
    context-dependent scale that :class:`_Tile` calibrates."""
    cache = _CURVATURES.setdefault(model, {})
    if quality not in cache:
        channels = model.config.M
        # A latent reaches pixel blocks i−2 … i+1 (nic.tiling): a 4x4 canvas holds it all.
        impulses = torch.zeros(channels, channels, 4, 4)
        impulses[torch.arange(channels), torch.arange(channels), 2, 2] = 1.0
        background = model.synthesis(torch.zeros(1, channels, 4, 4), quality)
        response = model.synthesis(impulses, quality) - background
        cache[quality] = response.pow(2).sum(dim=(1, 2, 3)).reshape(-1, 1, 1).double()
    return cache[quality]


# ---- one tile ---------------------------------------------------------------------------

class _Tile:
    """The part of the problem that a tile's core latents can change."""

    def __init__(self, model, quality: int, pixels: np.ndarray, latents: Tensor,
                 rows: tuple[int, int], cols: tuple[int, int], kappa: float, coding: "Coding | None" = None):
        from .tiling import synthesis_halo

        self.model, self.quality, self.kappa = model, quality, kappa
        n_rows, n_cols = latents.shape[1:]
        height, width = pixels.shape[:2]
        before, after = synthesis_halo(model.g_s)  # a pixel block reads latents b−before … b+after
        # Pixel blocks that the core's latents reach, and the latents those blocks read.
        block_r = (max(0, rows[0] - after), min(n_rows, rows[1] + before))
        block_c = (max(0, cols[0] - after), min(n_cols, cols[1] + before))
        self.win_r = (max(0, block_r[0] - before), min(n_rows, block_r[1] + after))
        self.win_c = (max(0, block_c[0] - before), min(n_cols, block_c[1] + after))
        self.core = (slice(rows[0] - self.win_r[0], rows[1] - self.win_r[0]),
                     slice(cols[0] - self.win_c[0], cols[1] - self.win_c[0]))
        d = DOWNSAMPLING
        p0, p1 = block_r[0] * d, min(block_r[1] * d, height)
        q0, q1 = block_c[0] * d, min(block_c[1] * d, width)
        self.crop = (slice(p0 - self.win_r[0] * d, p1 - self.win_r[0] * d),
                     slice(q0 - self.win_c[0] * d, q1 - self.win_c[0] * d))
        target = torch.from_numpy(np.array(pixels[p0:p1, q0:q1], dtype=np.float32) / 255.0)
        self.target = target.permute(2, 0, 1).unsqueeze(0)  # (1, 1|3, h, w)
        self.gray = pixels.shape[2] == 1
        window = (slice(None), slice(*self.win_r), slice(*self.win_c))
        self.window = latents[window].to(torch.float32)
        if coding is None:  # the factorized family: each channel's table, ŷ the integers themselves
            self.rate, self.offset, self.soft_bits = _table_rate(model, quality), None, None
        else:
            core = (slice(None), slice(*rows), slice(*cols))
            self.rate, self.soft_bits = coding.rate.at(coding.index[core]), coding.soft_bits(core)
            self.offset = coding.mean[window]

    def _with_core(self, core: Tensor) -> Tensor:
        window = self.window.clone()
        window[:, self.core[0], self.core[1]] = core
        if self.offset is not None:
            window = window + self.offset
        return window.unsqueeze(0)

    def _sse(self, window: Tensor) -> Tensor:
        x_hat = self.model.synthesis(window, self.quality)[:, :, self.crop[0], self.crop[1]].float()
        if self.gray:
            x_hat = x_hat.mean(dim=1, keepdim=True)
        return (x_hat.clamp(0.0, 1.0) - self.target).pow(2).sum()

    def cost(self, core: Tensor) -> float:
        """Exact J of the tile's part (bits of the core + κ·SSE of the reached pixels)."""
        with torch.no_grad():
            return float(self.rate(core).sum()) + self.kappa * float(self._sse(self._with_core(core.float())))

    def cost_and_gradient(self, core: Tensor) -> tuple[float, Tensor]:
        """J and ∂(κ·SSE)/∂ŷ of the core (float64)."""
        variable = core.float().clone().requires_grad_(True)
        with torch.enable_grad():
            sse = self._sse(self._with_core(variable))
            sse.backward()
        bits = float(self.rate(core).sum())
        return bits + self.kappa * float(sse.detach()), variable.grad.double() * self.kappa

    def curvature(self, core: Tensor, gradient: Tensor, generator: torch.Generator) -> Tensor:
        """Per-channel ½·∂²J/∂ŷ² (κ-scaled impulse energy), calibrated on this tile by
        one probe: a sparse random ±1 change, whose exact SSE change is compared with
        the prediction of the gradient and the zero-background impulse energy."""
        energy = impulse_energy(self.model, self.quality) * self.kappa
        probe = (torch.rand(core.shape, generator=generator) < 1 / 64).to(torch.int64)
        probe = probe * (2 * torch.randint(0, 2, core.shape, generator=generator) - 1)
        if probe.abs().sum() == 0:
            return energy
        with torch.no_grad():
            before = float(self._sse(self._with_core(core.float())))
            after = float(self._sse(self._with_core((core + probe).float())))
        actual = self.kappa * (after - before) - float((gradient * probe).sum())
        predicted = float((energy * probe.pow(2)).sum())
        scale = actual / predicted if predicted > 0 else 1.0
        return energy * min(max(scale, 0.25), 16.0)

    # ---- the two searches ------------------------------------------------------------

    def greedy(self, core: Tensor, passes: int, generator: torch.Generator) -> tuple[Tensor, float]:
        """Greedy RDOQ: each pass moves latents of the integer ``core`` by ±1 or to 0
        where the predicted change of J is negative, at most one latent per local
        maximum of the predicted gain (a 3x3 neighbourhood of positions, all channels:
        the footprints of neighbouring latents overlap, and changes made together
        there would each cancel the same error), and keeps the pass only if the
        exactly evaluated J went down."""
        cost, gradient = self.cost_and_gradient(core)
        if passes <= 0:
            return core, cost
        half_h = self.curvature(core, gradient, generator)
        for _ in range(passes):
            candidates = torch.stack([core - 1, core + 1, torch.zeros_like(core)])
            delta = (candidates - core).double()
            change = self.rate(candidates) - self.rate(core) + gradient * delta + half_h * delta.pow(2)
            change = torch.where(delta == 0, torch.full_like(change, math.inf), change)
            best, which = change.min(dim=0)  # best candidate of each latent
            gain, channel = best.min(dim=0)  # best latent of each position
            local = -torch.nn.functional.max_pool2d(-gain[None, None].float(), 3, 1, 1)[0, 0].double()
            keep = (gain < 0) & (gain <= local)
            if not keep.any():
                break
            where = keep.nonzero()
            trial = core.clone()
            pick = which[channel[keep], where[:, 0], where[:, 1]]
            trial[channel[keep], where[:, 0], where[:, 1]] = candidates[pick, channel[keep], where[:, 0], where[:, 1]]
            trial_cost, trial_gradient = self.cost_and_gradient(trial)
            if trial_cost >= cost:
                break
            core, cost, gradient = trial, trial_cost, trial_gradient
        return core, cost

    def optimize(self, start: Tensor, steps: int, step_size: float) -> tuple[Tensor, Tensor]:
        """Latent optimization: ``steps`` Adam steps on continuous latents that the
        forward pass rounds (straight-through gradient), with the learned density of
        the quality as rate and a cosine-decayed step size. The forward pass thus
        evaluates J of the rounded latents (to bf16 precision where the CPU has bf16
        instructions; elsewhere fp32: emulated bf16 is 10-25x slower), and the cheapest
        rounded state seen is returned, with the continuous latents at the end (from
        which a further search can restart)."""
        if self.soft_bits is None:
            density, M = self.model.density, self.model.config.M
            rows = ((self.quality - 1) * M + torch.arange(M)).unsqueeze(0)

            def soft_bits(quantized: Tensor) -> Tensor:
                return -torch.log2(density.probability(quantized.unsqueeze(0), rows)).sum()
        else:
            soft_bits = self.soft_bits
        variable = start.float().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([variable], lr=step_size)
        bf16 = bf16_is_fast("cpu")
        best, best_loss = torch.round(start).to(torch.int64), math.inf
        with torch.enable_grad():
            for step in range(steps + 1):
                rounded = torch.round(variable.detach())
                quantized = variable + (rounded - variable).detach()
                bits = soft_bits(quantized)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    sse = self._sse(self._with_core(quantized))
                loss = bits + self.kappa * sse
                if float(loss.detach()) < best_loss:
                    best, best_loss = rounded.to(torch.int64), float(loss.detach())
                if step == steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = step_size * 0.5 * (1 + math.cos(math.pi * step / steps))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return best, variable.detach()


# ---- the whole image -----------------------------------------------------------------------

def kappa(model, quality: int, channels: int) -> float:
    """Weight of the SSE (pixels in [0, 1]) against bits: λ·255² per colour channel."""
    return model.config.lambdas[quality - 1] * 255.0**2 / channels


def quantize(model, pixels: np.ndarray, quality: int, effort: int, tile: int | None = None,
             progress=None) -> np.ndarray:
    """int64 latents (M, rows, cols) of uint8 pixels (H, W, 1|3) at an effort level."""
    from .tiling import analysis_latents, check_pixels, quantize_tiled

    if effort not in EFFORTS:
        raise ValueError(f"effort must be one of {EFFORTS}, got {effort}")
    if effort == 1:
        return quantize_tiled(model, pixels, quality, tile, progress)
    check_pixels(pixels)
    continuous = torch.from_numpy(analysis_latents(model, pixels, quality, tile))
    return _search(model, pixels, quality, effort, continuous, None, progress)


@dataclass
class Coding:
    """What the hyperprior family codes the residuals k = ŷ − μ with, for the search:
    the means μ (float, (M, rows, cols)), the scale index of each latent, the rate of the
    conditional's integer tables, and the conditional itself (its continuous bits, for the
    Adam steps)."""

    mean: Tensor
    index: Tensor
    rate: IndexedRate
    conditional: object  # nic.entropy.GaussianConditional

    def soft_bits(self, core: tuple[slice, slice, slice]):
        sigma = torch.from_numpy(self.conditional.scales()).float()[self.index[core]]
        return lambda values: self.conditional.bits(values, sigma).sum()


def quantize_residuals(model, pixels: np.ndarray, quality: int, effort: int, y: np.ndarray, mean: np.ndarray,
                       index: np.ndarray, progress=None, continuous: bool = False):
    """The hyperprior family's residuals k (int64 (M, rows, cols)), ŷ = k + μ, chosen by
    D + λR at an effort level, with ẑ (so μ and the scale indices) fixed: the same
    searches as :func:`quantize`, the rate that of each latent's own table. ``model`` is
    a torch hyperprior Codec, ``y`` the gained latents g_a(x). With ``continuous``, also
    the residuals the latent optimization ended at, before their rounding (float32):
    where the means are not μ alone (context), rounding those under the real means
    serves better than the integers chosen under μ."""
    if effort not in EFFORTS:
        raise ValueError(f"effort must be one of {EFFORTS}, got {effort}")
    start = torch.from_numpy(y.astype(np.float64) - mean).float()
    if effort == 1:
        rounded = torch.round(start).to(torch.int64).numpy()
        return (rounded, start.numpy()) if continuous else rounded
    if model.conditional.distribution != "gaussian":
        raise ValueError("effort 2..4 needs the Gaussian conditional")
    coding = Coding(torch.from_numpy(mean).float(), torch.from_numpy(index.astype(np.int64)), _indexed_rate(model),
                    model.conditional)
    found = _search(model.base, pixels, quality, effort, start, coding, progress, keep_continuous=True)
    return found if continuous else found[0]


def _indexed_rate(model) -> IndexedRate:
    cache = _RATES.setdefault(model, {})
    if "indexed" not in cache:
        cache["indexed"] = IndexedRate(model.y_tables)
    return cache["indexed"]


def _search(model, pixels: np.ndarray, quality: int, effort: int, continuous: Tensor, coding: Coding | None,
            progress=None, keep_continuous: bool = False):
    """The integers of ``continuous`` (M, rows, cols) chosen tile by tile by the searches
    of efforts 2 … ``effort`` (``coding``: the hyperprior family's, else the factorized
    family's tables); with ``keep_continuous`` also the continuous latents the last
    search ended at."""
    from .tiling import tiles

    shape = continuous.shape
    latents = torch.round(continuous).to(torch.int64)
    ended = continuous.clone() if keep_continuous else None
    k = kappa(model, quality, pixels.shape[2])
    generator = torch.Generator().manual_seed(quality)  # the same bytes on every run
    grid = tiles(shape[1], shape[2], TILE_LATENTS * DOWNSAMPLING)
    for done, ((r0, r1), (c0, c1)) in enumerate(grid, 1):
        part = _Tile(model, quality, pixels, latents, (r0, r1), (c0, c1), k, coding)
        core = latents[:, r0:r1, c0:c1]
        cost = part.cost(core)
        # Effort e runs the searches of efforts 2 … e, each restarting where the one
        # below stopped, and keeps a result only if its exact J is lower: so effort e
        # is never worse than effort e − 1.
        continuous_core = continuous[:, r0:r1, c0:c1]
        for level in range(2, effort + 1):
            candidate, continuous_core = part.optimize(continuous_core, *SEARCHES[level])
            candidate_cost = part.cost(candidate)
            if candidate_cost < cost:
                core, cost = candidate, candidate_cost
        if effort >= GREEDY_EFFORT:
            core, cost = part.greedy(core, RDOQ_PASSES, generator)
        latents[:, r0:r1, c0:c1] = core
        if ended is not None:
            ended[:, r0:r1, c0:c1] = continuous_core
        if progress is not None:
            progress(done, len(grid))
    return (latents.numpy(), ended.numpy()) if keep_continuous else latents.numpy()


def image_cost(model, pixels: np.ndarray, latents: np.ndarray, quality: int) -> tuple[float, float]:
    """(bits, κ·SSE) of integer latents for an image, decoded whole: J = bits + κ·SSE.
    The whole latent grid as one tile, so J is measured exactly as the search measures it."""
    grid = torch.from_numpy(latents)
    part = _Tile(model, quality, pixels, grid, (0, grid.shape[1]), (0, grid.shape[2]),
                 kappa(model, quality, pixels.shape[2]))
    with torch.no_grad():
        return float(part.rate(grid).sum()), part.kappa * float(part._sse(part._with_core(grid.float())))
