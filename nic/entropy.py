"""The learned factorized entropy model and its integer CDF tables.

Density: the "non-parametric" univariate density of Ballé, Minnen, Singh, Hwang
and Johnston, "Variational image compression with a scale hyperprior" (ICLR 2018),
appendix 6.1. Per latent channel c, a cumulative c(x) = sigmoid(f_K ∘ … ∘ f_1(x))
where each f_k(x) = h_k(H_k x + b_k) with H_k ≥ 0 (softplus) and
h_k(x) = x + tanh(a_k) ⊙ tanh(x), so that c is monotone in x. The probability of the
quantized value round(y) = k, smoothed by the uniform noise used in training, is

    p(k) = c(k + ½) − c(k − ½).

For coding, :func:`integer_tables` evaluates p once per channel on integers and
stores frequencies that sum to 2**PRECISION, with one extra *escape* symbol whose
frequency covers the tails. The range coder only ever sees those integers, so
decoding never depends on floating-point rounding in this network. No I/O here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .coding import PRECISION, IntegerTables  # noqa: F401  (the tables this module makes)


LIKELIHOOD_FLOOR = 1e-9


class FactorizedDensity(nn.Module):
    """One learned monotone cumulative per channel (Ballé 2018, appendix 6.1)."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        widths = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(widths) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for k in range(len(widths) - 1):
            init = float(np.log(np.expm1(1.0 / scale / widths[k + 1])))
            self.matrices.append(nn.Parameter(torch.full((channels, widths[k + 1], widths[k]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, widths[k + 1], 1) - 0.5))
            if k < len(widths) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, widths[k + 1], 1)))

    def logits_cumulative(self, x: Tensor) -> Tensor:
        """logit of c(x) for x of shape (channels, 1, n)."""
        logits = x
        for k, (matrix, bias) in enumerate(zip(self.matrices, self.biases)):
            logits = torch.matmul(F.softplus(matrix), logits) + bias
            if k < len(self.factors):
                logits = logits + torch.tanh(self.factors[k]) * torch.tanh(logits)
        return logits

    def probability(self, y: Tensor, rows: Tensor | None = None) -> Tensor:
        """p(y) = c(y + ½) − c(y − ½) for y of shape (batch, C, h, w).

        ``rows`` (batch, C) picks which of this module's channels models each
        sample's channel (default: channel c for c); one module can so hold the
        densities of several qualities and evaluate a mixed batch in one pass."""
        b, c, h, w = y.shape
        values = y.reshape(b * c, 1, h * w)
        if rows is None:
            rows = torch.arange(c, device=y.device).expand(b, c)
        lower = self._logits_cumulative_rows(values - 0.5, rows.reshape(-1))
        upper = self._logits_cumulative_rows(values + 0.5, rows.reshape(-1))
        # Subtract in whichever tail keeps the sigmoids away from 1, for precision.
        sign = -torch.sign(lower + upper).detach()
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return torch.clamp_min(p.reshape(b, c, h, w), LIKELIHOOD_FLOOR)

    def _logits_cumulative_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        logits = x
        for k, (matrix, bias) in enumerate(zip(self.matrices, self.biases)):
            logits = torch.matmul(F.softplus(matrix)[rows], logits) + bias[rows]
            if k < len(self.factors):
                logits = logits + torch.tanh(self.factors[k])[rows] * torch.tanh(logits)
        return logits


def quantize_pmf(pmf: np.ndarray, tail: float, precision: int = PRECISION) -> np.ndarray:
    """Integer frequencies (pmf…, escape) summing to 2**precision, each ≥ 1.

    Deterministic given the float64 input; this only runs at export time.
    """
    total = 1 << precision
    probs = np.append(np.clip(pmf, 0.0, None), max(tail, 0.0))
    probs = probs / probs.sum()
    freq = np.maximum(1, np.round(probs * total)).astype(np.int64)
    # Repair the sum by taking from / giving to the largest bins.
    while freq.sum() != total:
        diff = total - int(freq.sum())
        order = np.argsort(-freq, kind="stable")
        if diff > 0:
            freq[order[0]] += diff
        else:
            for i in order:
                take = min(-diff, int(freq[i]) - 1)
                freq[i] -= take
                diff += take
                if diff == 0:
                    break
    return freq.astype(np.int32)


@torch.no_grad()
def integer_tables(density: FactorizedDensity, tail_mass: float = 1e-6, search_radius: int = 1024,
                   max_length: int = 2048) -> IntegerTables:
    """Export per-channel integer tables from a trained density.

    The support of channel c is the smallest integer interval holding all but
    ``tail_mass`` of its probability (at most ``max_length`` values); the mass
    outside goes to the escape symbol.
    """
    grid = torch.arange(-search_radius, search_radius + 1, dtype=torch.float64)
    density64 = _as_float64(density)
    c = density.channels
    values = grid.reshape(1, 1, -1).expand(c, 1, -1).contiguous()
    upper = torch.sigmoid(density64.logits_cumulative(values + 0.5))[:, 0, :].numpy()
    lower = torch.sigmoid(density64.logits_cumulative(values - 0.5))[:, 0, :].numpy()
    offsets, lengths, freqs = [], [], []
    for ch in range(c):
        # c(k - ½) crosses tail/2 at the low end, c(k + ½) crosses 1 − tail/2 at the high end.
        lo = int(np.searchsorted(upper[ch], tail_mass / 2))
        hi = int(np.searchsorted(lower[ch], 1 - tail_mass / 2)) - 1
        lo, hi = min(lo, len(grid) - 1), max(hi, 0)
        if hi < lo:
            lo = hi = (lo + hi) // 2
        if hi - lo + 1 > max_length:
            centre = (lo + hi) // 2
            lo, hi = centre - max_length // 2, centre - max_length // 2 + max_length - 1
        pmf = upper[ch, lo : hi + 1] - lower[ch, lo : hi + 1]
        escape = max(0.0, 1.0 - float(pmf.sum()))
        offsets.append(int(grid[lo]))
        lengths.append(hi - lo + 1)
        freqs.append(quantize_pmf(pmf, escape))
    return IntegerTables(
        offsets=np.asarray(offsets, dtype=np.int32),
        lengths=np.asarray(lengths, dtype=np.int32),
        frequencies=np.concatenate(freqs).astype(np.int32),
    )


def _as_float64(density: FactorizedDensity) -> FactorizedDensity:
    import copy

    clone = copy.deepcopy(density)
    return clone.double()


# ---- the Gaussian conditional of the hyperprior family --------------------------------

from .coding import DISTRIBUTIONS, SCALE_COUNT, SCALE_MAX, SCALE_MIN  # noqa: E402,F401  (its scale table)


class GaussianConditional:
    """A Gaussian (or, with ``distribution="laplace"``, a Laplacian) of a given mean and
    scale, integrated over unit bins, for each latent (Minnen, Ballé and Toderici,
    "Joint autoregressive and hierarchical priors for learned image compression",
    NeurIPS 2018, without the autoregressive part).

    The scale is not a free float: the hyper-decoder picks an index t into a fixed,
    log-spaced table of ``SCALE_COUNT`` scales, σ_t = SCALE_MIN·(SCALE_MAX/SCALE_MIN)^(t/(T−1)),
    and each index has one integer frequency table (:meth:`integer_tables`) over the
    residual k = round(y − μ), with an escape symbol for the tails. Training sees the
    same scales: σ is taken at round(t) with a straight-through gradient. For a
    Laplacian σ is its scale b (density e^(−|x|/b)/2b); its heavier tails fit the
    sparse latents of transforms trained for a factorized prior better (measured in
    docs/results/hyperprior.md)."""

    def __init__(self, count: int = SCALE_COUNT, minimum: float = SCALE_MIN, maximum: float = SCALE_MAX,
                 distribution: str = "gaussian"):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, not {distribution!r}")
        self.count, self.minimum, self.maximum = count, minimum, maximum
        self.distribution = distribution
        self.step = math.log(maximum / minimum) / (count - 1)

    def scales(self) -> np.ndarray:
        """σ_t for t = 0 … count − 1, float64."""
        return self.minimum * np.exp(self.step * np.arange(self.count, dtype=np.float64))

    def scale(self, index: Tensor) -> Tensor:
        """σ at a (real) scale index, clamped to the table; round(index) with a
        straight-through gradient, so training sees the scales the coder uses. The
        clamp lets gradients through that push an index back into the table (a plain
        clamp would leave an index below 0 stuck at the narrowest scale)."""
        from .layers import LowerBound

        t = -LowerBound.apply(-LowerBound.apply(index, 0.0), -(self.count - 1.0))
        t = t + (torch.round(t) - t).detach()
        return self.minimum * torch.exp(self.step * t)

    def _cdf(self, z: Tensor) -> Tensor:
        """The standard distribution's CDF at z (no overflow for any z)."""
        if self.distribution == "gaussian":
            return torch.special.ndtr(z)
        tail = 0.5 * torch.exp(-z.abs())
        return torch.where(z < 0, tail, 1.0 - tail)

    def bits(self, residual: Tensor, sigma: Tensor) -> Tensor:
        """−log2 P(residual) elementwise: the mass of [residual − ½, residual + ½] at scale
        σ, computed in the lower tail for precision."""
        v = residual.abs()
        upper = self._cdf((0.5 - v) / sigma)
        lower = self._cdf((-0.5 - v) / sigma)
        return -torch.log2(torch.clamp_min(upper - lower, LIKELIHOOD_FLOOR))

    def integer_tables(self, tail_mass: float = 1e-6, max_length: int = 4095) -> IntegerTables:
        """One integer table per scale index: residuals −K … K, K the smallest with less
        than ``tail_mass`` outside, plus the escape. float64 here, integers from here on."""
        cdf = _normal_cdf if self.distribution == "gaussian" else _laplace_cdf
        # A Laplacian's long tail would be hundreds of bins below one count each, every one
        # raised to a count and paid for by the likely bins: it ends where a bin falls
        # below one count, and the escape codes the rest.
        floor = 0.0 if self.distribution == "gaussian" else 2.0**-PRECISION
        offsets, lengths, freqs = [], [], []
        for sigma in self.scales():
            k = 0
            while 2 * cdf(-(k + 0.5) / sigma) >= tail_mass and 2 * k + 1 < max_length and \
                    cdf(-(k + 0.5) / sigma) - cdf(-(k + 1.5) / sigma) >= floor:
                k += 1
            values = np.arange(-k, k + 1, dtype=np.float64)
            upper = np.array([cdf((0.5 - abs(v)) / sigma) for v in values])
            lower = np.array([cdf((-0.5 - abs(v)) / sigma) for v in values])
            pmf = upper - lower
            offsets.append(-k)
            lengths.append(2 * k + 1)
            freqs.append(quantize_pmf(pmf, max(0.0, 1.0 - float(pmf.sum()))))
        return IntegerTables(np.asarray(offsets, dtype=np.int32), np.asarray(lengths, dtype=np.int32),
                             np.concatenate(freqs).astype(np.int32))


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _laplace_cdf(x: float) -> float:
    tail = 0.5 * math.exp(-abs(x))
    return tail if x < 0 else 1.0 - tail
