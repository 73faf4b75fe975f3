"""Context for the hyperprior family's ŷ: slices of channels (Minnen and Singh,
"Channel-wise autoregressive entropy models for learned image compression", ICIP 2020),
optionally with a checkerboard inside each slice (He et al., "Checkerboard context model
for efficient learned image compression", CVPR 2021). No serial scan: ŷ is decoded in a
few *passes*, each one parallel over its latents.

    pass (s, p): slice s = channels s·c … (s+1)·c − 1 (c = M / slices), phase p:
                 p = 0 the anchors ((row + column) even), p = 1 the others;
                 without the checkerboard one phase holds every position.
    (μ, t) of a pass = h_s's (μ, t) for the slice's channels
                      + an integer network's correction, from
                        h_s's (μ, t) of every channel (1x1) and
                        ŷ already decoded: the slices before s and, in phase 1,
                        slice s's anchors (k x k).
    The first pass (slice 0's anchors, or all of slice 0) has no context: h_s's own.

Determinism: like h_s (:mod:`nic.hyperprior`), every correction is computed in exact
integer arithmetic from integers: μ and ŷ = k + μ are multiples of 2**−MEAN_BITS and t
an integer, so the network's inputs are integers (× 2**MEAN_BITS, clipped to ±INPUT_LIMIT),
its weights integers, every sum exact in float64. The same μ and t on every machine.

The trainable twin is :class:`nic.hyperprior_torch.Context`. Math only; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import engine
from .container import UNIT_STEP
from .integer import BIAS_LIMIT, MAX_SHIFT, MEAN_BITS, NARROW_WEIGHT_MAX, WEIGHT_MAX, finish, scale_of

INPUT_LIMIT = 2**20
"""Inputs of a context network (μ, t and ŷ, × 2**MEAN_BITS) are clipped to ±INPUT_LIMIT."""

POSITIONS_AT_ONCE = 512
"""A context network runs on this many latent positions at a time (bounded memory), the
chunks side by side on the engine's threads."""


def passes(slices: int, checkerboard: bool) -> list[tuple[int, int]]:
    """(slice, phase) in decoding order."""
    return [(s, p) for s in range(slices) for p in ((0, 1) if checkerboard else (0,))]


def phase_mask(rows: int, cols: int, phase: int, checkerboard: bool) -> np.ndarray:
    """Where (rows x cols, bool) a pass's phase codes its latents."""
    if not checkerboard:
        return np.ones((rows, cols), dtype=bool)
    parity = (np.arange(rows)[:, None] + np.arange(cols)[None]) % 2
    return parity == phase


def context_channels(M: int, slices: int, s: int, p: int, checkerboard: bool) -> int:
    """Channels of ŷ a pass's network sees: the slices before s, and slice s's anchors in phase 1."""
    c = M // slices
    return s * c + (c if checkerboard and p == 1 else 0)


def has_network(s: int, p: int) -> bool:
    """Every pass but the first has a context network."""
    return (s, p) != (0, 0)


@dataclass(frozen=True)
class IntegerContextNetwork:
    """One pass's correction in integers: a first layer 1x1 on h_s's (μ, t) plus k x k on
    ŷ's context, ReLU, hidden 1x1 layers with ReLU, and a last 1x1 layer to the slice's
    (μ·2**MEAN_BITS, t) corrections. Each layer: floor((Σ w·a + b) / 2**shift + ½)."""

    first_hyper: np.ndarray  # int32 (W, 2M)
    first_context: np.ndarray  # int32 (W, C, k, k)
    biases: tuple[np.ndarray, ...]  # int64 (out,) per layer
    shifts: tuple[np.ndarray, ...]  # int64 (out,) per layer
    hidden: tuple[np.ndarray, ...]  # int32 (out, in) per 1x1 layer after the first, the last included

    @cached_property
    def _float(self) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """(first layer's h_s part (2M, W), later layers (in, out), each layer's bias and
        2**−shift), float64, transposed for position-major inputs and contiguous; made once."""
        later = [np.ascontiguousarray(w.T, dtype=np.float64) for w in self.hidden]
        return (np.ascontiguousarray(self.first_hyper.T, dtype=np.float64), later,
                [b.astype(np.float64) for b in self.biases],
                [scale_of(t) for t in self.shifts])

    @cached_property
    def _taps(self) -> dict[tuple[int, int], tuple[np.ndarray, list[int]]]:
        """:meth:`_first_taps` by (channels, anchored): made once for each way a pass calls
        the network."""
        return {}

    def _first_taps(self, channels: int, anchored: int) -> tuple[np.ndarray, list[int]]:
        """(the context taps' weights as (rows of the gathered inputs, W) float64, how many
        channels each tap reads), tap by tap, row-major over the k x k kernel: every seen
        channel at a tap that reads an anchor of the pass's own slice (odd di + dj), the
        first ``anchored`` elsewhere (the slice's other positions are still zero there:
        their products would add nothing)."""
        key = (channels, anchored)
        if key not in self._taps:
            k = self.first_context.shape[-1]
            counts = [channels if (i + j - 2 * (k // 2)) % 2 else anchored for i in range(k) for j in range(k)]
            taps = self.first_context.transpose(2, 3, 1, 0).reshape(k * k, -1, self.first_context.shape[0])
            self._taps[key] = (np.ascontiguousarray(np.concatenate([tap[:n] for tap, n in zip(taps, counts)]),
                                                    dtype=np.float64), counts)
        return self._taps[key]

    def __call__(self, hyper: np.ndarray, seen: np.ndarray, halo: int, channels: int,
                 where: np.ndarray, anchored: int | None = None) -> np.ndarray:
        """Integer corrections (2c, n) as float64 at the n positions of ``where`` (rows x
        cols, bool; in raster order). ``hyper``: h_s's (μ, t), channel by channel ((2M,
        rows·cols) float64), ``seen``: ŷ decoded so far, zero elsewhere, with a zero border
        of ``halo`` ((rows + 2·halo, cols + 2·halo, M) float32); both clipped to the inputs'
        limit (exact: multiples of 2**−MEAN_BITS below 2**12). ``channels``: how many of ``seen``'s
        channels the network reads; ``anchored``: in a checkerboard's second phase, where
        the channels from ``anchored`` on are decoded at the anchors only (at the other
        positions they are zero, and are not multiplied). A few hundred positions at a time."""
        rows, cols = np.nonzero(where)
        out = np.empty((len(self.hidden[-1]), len(rows)))
        taps = self._first_taps(channels, channels if anchored is None else anchored) if channels else None
        # Exact sums: the same integers whatever the chunks, so they are cut evenly over
        # the threads (768 positions of a Kodak pass: two of 384, not 512 and 256).
        size = max(1, min(POSITIONS_AT_ONCE, -(-len(rows) // engine.threads())))

        def chunk(i: int) -> None:
            start = i * size
            r, c = rows[start:start + size], cols[start:start + size]
            out[:, start:start + len(r)] = self._at(hyper, seen, halo, taps, r, c, where.shape[1]).T

        engine.parallel(chunk, -(-len(rows) // size))
        return out

    def _at(self, hyper: np.ndarray, seen: np.ndarray, halo: int, taps: tuple[np.ndarray, list[int]] | None,
            r: np.ndarray, c: np.ndarray, cols: int) -> np.ndarray:
        first_hyper, later, biases, scales = self._float
        # The inputs are multiples of 2**−MEAN_BITS; the sums of w·input are exact, and so
        # is their scaling by 2**MEAN_BITS to the integer network's units.
        acc = hyper[:, r * cols + c].T @ first_hyper  # BLAS reads the transpose in place
        if taps is not None:
            # Every tap's inputs side by side (im2col), then one matrix product: BLAS is
            # faster on one wide product than on k·k narrow ones, and the sum as exact.
            weights, counts = taps
            k = self.first_context.shape[-1]
            width = seen.shape[1]
            flat = seen.reshape(-1, seen.shape[2])
            patches = np.empty((len(r), len(weights)))
            column = 0
            for tap, n in enumerate(counts):
                i, j = divmod(tap, k)
                at = (r + halo + i - k // 2) * width + (c + halo + j - k // 2)
                patches[:, column:column + n] = flat[at, :n]
                column += n
            acc += patches @ weights
        acc *= float(1 << MEAN_BITS)
        value = finish(acc, biases[0], scales[0], relu=True)
        for n, weight in enumerate(later, 1):
            value = finish(value @ weight, biases[n], scales[n], relu=n < len(later))
        return value


# ---- weights as plain arrays -------------------------------------------------------------

PARTS = ("first_hyper", "first_context", "hidden1", "hidden2", "bias0", "bias1", "bias2", "shift0", "shift1",
         "shift2")


def put_network(arrays: dict[str, np.ndarray], prefix: str, network: IntegerContextNetwork,
                narrow: bool = False) -> None:
    """A network's integers as named arrays (``prefix.first_hyper`` …): weights int16, or
    with ``narrow`` int8 where they fit."""
    def stored(weight: np.ndarray) -> np.ndarray:
        fits = narrow and (weight.size == 0 or np.abs(weight).max() <= NARROW_WEIGHT_MAX)
        return weight.astype(np.int8 if fits else np.int16)

    arrays[f"{prefix}.first_hyper"] = stored(network.first_hyper)
    arrays[f"{prefix}.first_context"] = stored(network.first_context)
    for n, weight in enumerate(network.hidden, 1):
        arrays[f"{prefix}.hidden{n}"] = stored(weight)
    for n, (bias, shift) in enumerate(zip(network.biases, network.shifts)):
        arrays[f"{prefix}.bias{n}"] = bias.astype(np.int64)
        arrays[f"{prefix}.shift{n}"] = shift.astype(np.int8)


def network_shapes(M: int, slices: int, checkerboard: bool, width: int, kernel: int, s: int, p: int
                   ) -> dict[str, tuple[int, ...]]:
    """The arrays' shapes of pass (s, p)'s network."""
    c = M // slices
    C = context_channels(M, slices, s, p, checkerboard)
    return {"first_hyper": (width, 2 * M), "first_context": (width, C, kernel, kernel), "hidden1": (width, width),
            "hidden2": (2 * c, width), "bias0": (width,), "bias1": (width,), "bias2": (2 * c,),
            "shift0": (width,), "shift1": (width,), "shift2": (2 * c,)}


def read_network(arrays, prefix: str, shapes: dict[str, tuple[int, ...]]) -> IntegerContextNetwork:
    """The network of ``prefix`` in a weights file's arrays; ValueError if anything is
    missing, misshapen or out of the ranges that keep every sum exact."""
    try:
        parts = {name: arrays[f"{prefix}.{name}"] for name in PARTS}
    except KeyError:
        raise ValueError(f"weights lack the context network {prefix}") from None
    for name, value in parts.items():
        if tuple(value.shape) != shapes[name] or value.dtype.kind != "i":
            raise ValueError(f"context network {prefix} has the wrong shapes or types")
    weights = [parts[n] for n in ("first_hyper", "first_context", "hidden1", "hidden2")]
    biases = [parts[f"bias{n}"] for n in range(3)]
    shifts = [parts[f"shift{n}"] for n in range(3)]
    if any(w.size and (w.min() < -WEIGHT_MAX or w.max() > WEIGHT_MAX) for w in weights) or \
            any(b.size and (b.min() <= -BIAS_LIMIT or b.max() >= BIAS_LIMIT) for b in biases) or \
            any(t.size and (t.min() < 0 or t.max() > MAX_SHIFT) for t in shifts):
        raise ValueError(f"context network {prefix} is out of range")
    # Every sum exact: the first layer's inputs are within ±INPUT_LIMIT, the others' within
    # 0 … ACTIVATION_MAX.
    fan_in = shapes["first_hyper"][1] + int(np.prod(shapes["first_context"][1:]))
    if fan_in * INPUT_LIMIT * WEIGHT_MAX + BIAS_LIMIT >= 2**53:
        raise ValueError(f"context network {prefix} is too wide to sum exactly")
    return IntegerContextNetwork(weights[0].astype(np.int32), weights[1].astype(np.int32),
                                 tuple(b.astype(np.int64) for b in biases), tuple(t.astype(np.int64) for t in shifts),
                                 (weights[2].astype(np.int32), weights[3].astype(np.int32)))


# ---- the passes ----------------------------------------------------------------------------

def run_passes(networks: dict[str, IntegerContextNetwork], mean: np.ndarray, index: np.ndarray, slices: int,
               checkerboard: bool, scales: int, residuals, keep: bool = True, step: tuple[int, int] = UNIT_STEP,
               keep_residuals: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Code ŷ pass by pass: for each pass its (μ, t) at its positions, then
    ``residuals(s, where, mu, t)`` (the pass's (c, n) means and the indices of the
    tables it codes with) gives its integers k (c, n), and ŷ = μ + k·Δ there. Returns
    (ŷ, k), both (M, rows, cols): ŷ as g_s reads it (float32, rounded from the exact
    value), k int64 (None without ``keep_residuals``); or None without ``keep`` (the
    encoder's case: it needs neither). The encoder's ``residuals`` rounds (y − μ)/Δ and codes
    (k, t); the decoder's decodes k. ``step`` = (Δ·256, shift): the quantization step
    and how many scale-table entries narrower its tables are (container STEP; Δ = 1
    and no shift by default). ŷ stays a multiple of 1/256, exactly. Without context
    (one slice, no checkerboard, no networks) it is one pass over every latent, with
    h_s's (μ, t)."""
    size, shift = step
    M, rows, cols = mean.shape
    c = M // slices
    limit = INPUT_LIMIT / (1 << MEAN_BITS)
    halo = max((n.first_context.shape[-1] // 2 for n in networks.values()), default=0)
    # The networks' inputs: h_s's (μ, t) channel by channel, and ŷ as it is decoded,
    # position-major (each tap gathers its positions' channels in one run).
    hyper = seen = None
    if networks:
        hyper = np.empty((2 * M, rows * cols))
        np.clip(mean.reshape(M, -1), -limit, limit, out=hyper[:M])
        hyper[M:] = index.reshape(M, -1)
        seen = np.zeros((rows + 2 * halo, cols + 2 * halo, M), dtype=np.float32)
    y_hat = np.zeros(mean.shape, dtype=np.float32) if keep else None
    k_all = np.zeros(mean.shape, dtype=np.int64) if keep and keep_residuals else None
    for s, p in passes(slices, checkerboard):
        where = phase_mask(rows, cols, p, checkerboard)
        channels = slice(s * c, (s + 1) * c)
        mu, t = mean[channels][:, where], index[channels][:, where]
        network = networks.get(f"{s}_{p}")
        if network is not None:
            # What is decoded so far: the slices before s and, in phase 1, slice s's anchors
            # (its other positions are still zero).
            correction = network(hyper, seen, halo, context_channels(M, slices, s, p, checkerboard), where,
                                 anchored=s * c if p == 1 else None)
            mu = mu + correction[:c] / float(1 << MEAN_BITS)
            t = np.clip(t + correction[c:].astype(np.int64), 0, scales - 1)
        k = residuals(s, where, mu, np.clip(t - shift, 0, scales - 1))
        value = (k * size) / 256.0 + mu  # exact: k·size is an integer (k itself at the unit step)
        if y_hat is not None:
            y_hat[channels, where] = value
        if k_all is not None:
            k_all[channels, where] = k
        if seen is not None:
            seen[halo:halo + rows, halo:halo + cols, channels][where] = np.clip(value, -limit, limit).T
    return (y_hat, k_all) if keep else None
