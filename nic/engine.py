"""Inference without torch: the transforms' layers in numpy.

The layers of g_a, g_s and the hyper-analysis, computed on images laid out as
(height, width, channels) float32 arrays, from the weights file's arrays:

* :class:`Conv`: a 'same' convolution (kernel k, stride s, padding k // 2), as
  torch's ``Conv2d``. The padded input is split into its s·s phase planes (rows and
  columns of each residue mod s), each flattened to (rows·width, C); every kernel tap
  is then one matrix product of a contiguous run of a plane's rows with the tap's
  (C, C_out) weights, added into the output. The output is computed over the plane's
  whole width and the k // s extra columns are dropped at the end: no im2col copy,
  only the taps' products.
* :class:`Deconv`: a transposed convolution that multiplies the size by its stride
  (``ConvTranspose2d`` with padding k // 2 and output padding s − 1), computed as s·s
  correlations of the input, one per output phase, each writing every s-th row and
  column of the output.
* :class:`GDN`: GDN or IGDN, one (C, C) matrix product per pixel row block.
* :class:`ReLU`.

A :class:`Network` is a list of them. The results agree with torch's to float
rounding (another summation order), so an integer that rounding picks may differ
where g_a's output lies within ~1e-6 of a half (measured in docs/results/engine.md).
Decoding never depends on that: what picks a table or a mean is integer
(nic.hyperprior's integer h_s, the families' integer tables).

Math only: arrays in, arrays out; no torch, no I/O.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 1 << 15
"""Rows of pixels a GDN or bias step handles at once (keeps its temporaries in cache)."""


class Conv:
    """Conv2d(C → C_out, k, stride s, padding k // 2) from torch's (C_out, C, k, k) weights."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int):
        out_channels, channels, k, k2 = weight.shape
        if k != k2 or k % 2 == 0:
            raise ValueError("convolutions must have square, odd kernels")
        self.k, self.stride, self.padding = k, stride, k // 2
        self.channels, self.out_channels = channels, out_channels
        s = stride
        # Tap (ky, kx) reads phase plane (ky mod s, kx mod s) at offset (ky // s, kx // s).
        # Grouped by (plane, ky): the horizontal taps of one kernel row read one plane at
        # consecutive columns.
        self.groups = [(a * s + b, ky) for a in range(s) for b in range(s) for ky in range(a, k, s)]
        self.widths = [len(range(b, k, s)) for b in range(s)]
        taps = [[ky * k + kx for kx in range(plane % s, k, s)] for plane, ky in self.groups]
        kernel = weight.astype(np.float32).transpose(2, 3, 1, 0).reshape(k * k, channels, out_channels)
        self.whole = channels * k < 64  # few input channels: one im2col group of every tap
        if self.whole:
            taps = [[t for group in taps for t in group]]
        self.weights = _Taps(kernel, bias, taps)

    transposed = False
    geometry = property(lambda self: (self.k, self.stride, self.padding))

    def output_size(self, n: int) -> int:
        return (n + 2 * self.padding - self.k) // self.stride + 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        height, width, _ = x.shape
        s, p, k = self.stride, self.padding, self.k
        rows, cols = self.output_size(height), self.output_size(width)
        reach = (k - 1) // s  # how far a tap reaches into a phase plane, in its own rows/columns
        plane_cols = cols + reach
        planes = np.zeros((s * s, rows + reach + 1, plane_cols, self.channels), dtype=np.float32)
        for a in range(s):
            for b in range(s):
                _fill_phase(planes[a * s + b], x, a - p, b - p, s)
        flat = planes.reshape(s * s, -1, self.channels)
        n = rows * plane_cols
        if not self.weights.gather:  # few output channels: every tap's input as it is
            out = self.weights.correlate([(flat[(ky % s) * s + kx % s], ky // s * plane_cols + kx // s)
                                          for ky in range(k) for kx in range(k)], n)
        elif self.whole:
            gathered = np.concatenate([_side_by_side(flat[plane], self.widths[plane % s])[
                ky // s * plane_cols:ky // s * plane_cols + n] for plane, ky in self.groups], axis=1)
            out = self.weights.correlate([(gathered, 0)], n)
        else:
            side = [_side_by_side(flat[plane], self.widths[plane % s]) for plane in range(s * s)]
            out = self.weights.correlate([(side[plane], ky // s * plane_cols) for plane, ky in self.groups], n)
        return out.reshape(rows, plane_cols, self.out_channels)[:, :cols]


def _fill_phase(plane: np.ndarray, x: np.ndarray, row0: int, col0: int, s: int) -> None:
    """plane[i, j] = x[row0 + s·i, col0 + s·j] where that is inside x (plane starts zero)."""
    height, width = x.shape[:2]
    i0 = -(-max(0, -row0) // s)  # first i with row0 + s·i ≥ 0
    j0 = -(-max(0, -col0) // s)
    i1 = min(plane.shape[0], -(-(height - row0) // s))  # first i with row0 + s·i ≥ height
    j1 = min(plane.shape[1], -(-(width - col0) // s))
    if i1 > i0 and j1 > j0:
        plane[i0:i1, j0:j1] = x[row0 + s * i0:row0 + s * (i1 - 1) + 1:s, col0 + s * j0:col0 + s * (j1 - 1) + 1:s]


class Deconv:
    """ConvTranspose2d(C → C_out, k, stride s, padding k // 2, output padding s − 1) from
    torch's (C, C_out, k, k) weights: the output is exactly s times the input's size."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int):
        channels, out_channels, k, k2 = weight.shape
        if k != k2 or k % 2 == 0:
            raise ValueError("transposed convolutions must have square, odd kernels")
        self.k, self.stride, self.padding = k, stride, k // 2
        self.channels, self.out_channels = channels, out_channels
        s, p = stride, k // 2
        # Output o = s·m + a receives input m − t through kernel position κ = s·t + a + p.
        phases = [[(kappa, (kappa - a - p) // s) for kappa in range(k) if (kappa - a - p) % s == 0]
                  for a in range(s)]
        shifts = [t for phase in phases for _, t in phase]
        self.before, self.after = max(shifts), -min(shifts)
        kernel = weight.astype(np.float32).transpose(2, 3, 0, 1)  # (ky, kx, C, C_out)
        self.phases = []  # per output phase (a, b): its kernel rows' and columns' (κ, t), and weights
        for a in range(s):
            for b in range(s):
                # Columns in order of rising input column (falling t): side by side they
                # read consecutive columns of the padded input.
                columns = sorted(phases[b], key=lambda tap: -tap[1])
                taps = np.stack([kernel[ky, kx] for ky, _ in phases[a] for kx, _ in columns])
                groups = [[i * len(columns) + j for j in range(len(columns))] for i in range(len(phases[a]))]
                self.phases.append((phases[a], columns, _Taps(taps, bias, groups)))

    transposed = True
    geometry = property(lambda self: (self.k, self.stride, self.padding))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        height, width, _ = x.shape
        s, before = self.stride, self.before
        padded_cols = width + before + self.after
        padded = np.zeros((height + before + self.after + 1, padded_cols, self.channels), dtype=np.float32)
        padded[before:before + height, before:before + width] = x
        flat = padded.reshape(-1, self.channels)
        out = np.empty((height * s, width * s, self.out_channels), dtype=np.float32)
        n = height * padded_cols
        side = {}
        for phase, (kernel_rows, columns, weights) in enumerate(self.phases):
            first = before - columns[0][1]  # the leftmost column the phase reads
            if weights.gather:
                if len(columns) not in side:
                    side[len(columns)] = _side_by_side(flat, len(columns))
                inputs = [(side[len(columns)], (before - ty) * padded_cols + first) for _, ty in kernel_rows]
            else:
                inputs = [(flat, (before - ty) * padded_cols + before - tx) for _, ty in kernel_rows
                          for _, tx in columns]
            result = weights.correlate(inputs, n)
            out[phase // s::s, phase % s::s] = result.reshape(height, padded_cols, -1)[:, :width]
        return out


_CHUNK_ROWS = 4096
"""Output rows (pixels) of one step of a correlation: its partial sums stay in cache."""


def _side_by_side(flat: np.ndarray, taps: int) -> np.ndarray:
    """(n − taps + 1, taps·C): row r is flat[r], flat[r + 1], … flat[r + taps − 1] side by
    side, so one matrix product covers a row of ``taps`` horizontal kernel positions."""
    if taps == 1:
        return flat
    n, channels = flat.shape
    out = np.empty((n - taps + 1, taps * channels), dtype=np.float32)
    for t in range(taps):
        out[:, t * channels:(t + 1) * channels] = flat[t:n - taps + 1 + t]
    return out


class _Taps:
    """The weights of a correlation and its bias: ``correlate`` computes

        out[r] = bias + Σ_g inputs[g][r + offset_g] @ W_g,   r < n,

    over groups g of kernel taps. A group is one row of horizontal kernel positions
    (its inputs side by side, :func:`_side_by_side`), or, for inputs with few channels
    (the pixels), the whole kernel (an im2col of it: a product with a tiny inner
    dimension wastes most of the multiplier). The products are summed a chunk of rows
    at a time, so the partial sums stay in cache. With few output channels (the last
    layer of g_s) it is the other way round: one product of the input with every tap's
    weights side by side, (C, T·C_out), whose columns are then shifted and summed."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, groups: list[list[int]]):
        count, channels, out_channels = kernel.shape
        self.out_channels = out_channels
        self.bias = bias.astype(np.float32)
        self.gather = out_channels * 4 > channels
        self.groups = groups
        if self.gather:
            self.stacked = [np.ascontiguousarray(kernel[group].reshape(-1, out_channels)) for group in groups]
        else:
            self.side = np.ascontiguousarray(kernel.transpose(1, 0, 2).reshape(channels, -1))

    def correlate(self, inputs: list[tuple[np.ndarray, int]], n: int) -> np.ndarray:
        """``inputs[g]`` = (array, offset) of group g: the array holds its taps' inputs side
        by side (rows of len(group)·C), or, without ``gather``, one tap's (rows, C) per
        tap of every group, in order."""
        out = np.empty((n, self.out_channels), dtype=np.float32)
        if not self.gather:
            return self._scatter(inputs, n, out)
        product = np.empty((min(n, _CHUNK_ROWS), self.out_channels), dtype=np.float32)
        for start in range(0, n, _CHUNK_ROWS):
            stop = min(n, start + _CHUNK_ROWS)
            part = out[start:stop]
            part[:] = self.bias
            for (array, offset), weights in zip(inputs, self.stacked):
                np.matmul(array[offset + start:offset + stop], weights, out=product[:stop - start])
                part += product[:stop - start]
        return out

    def _scatter(self, inputs: list[tuple[np.ndarray, int]], n: int, out: np.ndarray) -> np.ndarray:
        out[:] = self.bias
        c = self.out_channels
        products: dict[int, np.ndarray] = {}
        for t, (array, offset) in enumerate(inputs):
            if id(array) not in products:
                reach = max(o for a, o in inputs if a is array) + n
                products[id(array)] = np.matmul(array[:reach], self.side)
            out += products[id(array)][offset:offset + n, t * c:(t + 1) * c]
        return out


class GDN:
    """GDN (x / sqrt(β + γ·x²)) or IGDN (x · sqrt(…)) from the effective β and γ."""

    def __init__(self, beta: np.ndarray, gamma: np.ndarray, inverse: bool):
        self.beta = beta.astype(np.float32)
        self.gamma_t = np.ascontiguousarray(gamma.astype(np.float32).T)
        self.inverse = inverse

    @classmethod
    def from_parameters(cls, beta: np.ndarray, gamma: np.ndarray, inverse: bool,
                        beta_min: float = 1e-6, reparam_offset: float = 2.0**-18) -> "GDN":
        """From the stored parameters p of nic.layers.GDN: v = max(p, √(min + ε²))² − ε²."""
        pedestal = reparam_offset**2

        def value(p: np.ndarray, minimum: float) -> np.ndarray:
            bound = np.float32((minimum + pedestal) ** 0.5)
            return np.maximum(p.astype(np.float32), bound) ** 2 - np.float32(pedestal)

        return cls(value(beta, beta_min), value(gamma, 0.0), inverse)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        flat = x.reshape(-1, x.shape[-1])
        for start in range(0, len(flat), _BLOCK):
            block = flat[start:start + _BLOCK]
            norm = np.matmul(block * block, self.gamma_t)
            norm += self.beta
            np.sqrt(norm, out=norm)
            if self.inverse:
                block *= norm
            else:
                block /= norm
        return x


class ReLU:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0, out=np.ascontiguousarray(x))


class Network:
    """Layers applied in order to a (height, width, channels) float32 array."""

    def __init__(self, layers: list):
        self.layers = layers

    def modules(self) -> list:
        """The layers (as torch's ``Module.modules`` lists a network's; nic.tiling walks them)."""
        return list(self.layers)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x
