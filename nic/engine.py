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

import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

_BLOCK = 2048
"""Pixels a GDN step handles at once: its temporaries stay in cache."""

# ---- threads ----------------------------------------------------------------------------
#
# The work is cut into chunks of rows whose bounds depend only on the sizes (never on
# the thread count), and each chunk is one call of numpy's single-threaded kernels: the
# results are the same bits for any number of threads. numpy releases the GIL in its
# copies and matrix products, so Python threads run chunks side by side, each in its own
# core's cache (BLAS's own threads would share each product and leave the gathering
# copies to one core): BLAS runs one thread while they do (:func:`_one_blas_thread`).

_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def threads() -> int:
    return _threads


def set_threads(threads: int) -> None:
    """Threads the layers use (default: the CPUs this process may run on)."""
    global _threads
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be an integer, got {threads!r}")
    if threads < 1:
        raise ValueError("threads must be at least 1")
    _threads = threads


def parallel(work: Callable[[int], None], count: int) -> None:
    """work(0) … work(count − 1), spread over the threads (in order on one)."""
    threads = min(_threads, count)
    if threads <= 1:
        for item in range(count):
            work(item)
        return
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nic-engine")
        pool = _pool

    def run(first: int) -> None:
        for item in range(first, count, threads):
            work(item)

    with _one_blas_thread():
        for future in [pool.submit(run, first) for first in range(threads)]:
            future.result()


# BLAS's own threads would share each product with nic's threads: twice as many threads
# as cores, which took a 1920x1080 g_a from 1.65 to 3.0 s on 2 cores. nic's CLI starts
# BLAS single-threaded; a program that imports nic gets BLAS limited to one thread
# (threadpoolctl) while nic's threads run, and its own setting back after.
_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: list = []


@lru_cache(maxsize=1)
def _blas_libraries() -> list:
    if os.environ.get("OPENBLAS_NUM_THREADS") == "1" and "openblas" in _blas_name():
        return []  # started single-threaded (nic's CLI): nothing to limit, no import to pay
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # nothing to limit with: BLAS keeps its threads
        return []
    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


def _blas_name() -> str:
    try:
        return str(np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]).lower()
    except (AttributeError, KeyError, TypeError):
        return ""


@contextmanager
def _one_blas_thread():
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = [(lib, lib.get_num_threads()) for lib in _blas_libraries()]
            for lib, count in _blas_saved:
                if count != 1:
                    lib.set_num_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, count in _blas_saved:
                    if count != 1:
                        lib.set_num_threads(count)


class Conv:
    """Conv2d(C → C_out, k, stride s, padding k // 2) from torch's (C_out, C, k, k) weights."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int):
        out_channels, channels, k, k2 = weight.shape
        if k != k2 or k % 2 == 0:
            raise ValueError("convolutions must have square, odd kernels")
        self.source_weight, self.source_bias = weight, bias  # as given (nic.precision builds from them)
        self.k, self.stride, self.padding = k, stride, k // 2
        self.channels, self.out_channels = channels, out_channels
        s = stride
        # Tap (ky, kx) reads phase plane (ky mod s, kx mod s) at offset (ky // s, kx // s);
        # ordered by plane, then offset, a row's taps read consecutive pixels of a plane.
        order = sorted(((ky % s) * s + kx % s, ky // s, kx // s, ky, kx) for ky in range(k) for kx in range(k))
        self.taps = [(plane, dy, dx) for plane, dy, dx, _, _ in order]
        kernel = weight.astype(np.float32).transpose(2, 3, 1, 0)
        self.weights = _Taps(kernel[[ky for *_, ky, _ in order], [kx for *_, kx in order]], bias)

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
        planes = np.empty((s * s, rows + reach + 1, plane_cols, self.channels), dtype=np.float32)
        parallel(lambda plane: _fill_phase(planes[plane], x, plane // s - p, plane % s - p, s), s * s)
        flat = list(planes.reshape(s * s, -1, self.channels))  # one view per plane: taps of a plane share it
        inputs = [(flat[plane], dy * plane_cols + dx) for plane, dy, dx in self.taps]
        out = np.empty((rows, cols, self.out_channels), dtype=np.float32)

        def store(first: int, last: int, values: np.ndarray) -> None:
            out[first:last] = values[:, :cols]

        self.weights.correlate(inputs, rows, plane_cols, store)
        return out


def _fill_phase(plane: np.ndarray, x: np.ndarray, row0: int, col0: int, s: int) -> None:
    """plane[i, j] = x[row0 + s·i, col0 + s·j] where that is inside x, else 0."""
    height, width = x.shape[:2]
    i0 = -(-max(0, -row0) // s)  # first i with row0 + s·i ≥ 0
    j0 = -(-max(0, -col0) // s)
    i1 = max(i0, min(plane.shape[0], -(-(height - row0) // s)))  # first i with row0 + s·i ≥ height
    j1 = max(j0, min(plane.shape[1], -(-(width - col0) // s)))
    plane[:i0] = 0
    plane[i1:] = 0
    plane[i0:i1, :j0] = 0
    plane[i0:i1, j1:] = 0
    if i1 > i0 and j1 > j0:
        plane[i0:i1, j0:j1] = x[row0 + s * i0:row0 + s * (i1 - 1) + 1:s, col0 + s * j0:col0 + s * (j1 - 1) + 1:s]


class Deconv:
    """ConvTranspose2d(C → C_out, k, stride s, padding k // 2, output padding s − 1) from
    torch's (C, C_out, k, k) weights: the output is exactly s times the input's size."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int):
        channels, out_channels, k, k2 = weight.shape
        if k != k2 or k % 2 == 0:
            raise ValueError("transposed convolutions must have square, odd kernels")
        self.source_weight, self.source_bias = weight, bias  # as given (nic.precision builds from them)
        self.k, self.stride, self.padding = k, stride, k // 2
        self.channels, self.out_channels = channels, out_channels
        self.bias = bias.astype(np.float32)
        s, p = stride, k // 2
        # Output o = s·m + a receives input m − t through kernel position κ = s·t + a + p.
        phases = [[(kappa, (kappa - a - p) // s) for kappa in range(k) if (kappa - a - p) % s == 0]
                  for a in range(s)]
        shifts = [t for phase in phases for _, t in phase]
        self.before, self.after = max(shifts), -min(shifts)
        kernel = weight.astype(np.float32).transpose(2, 3, 0, 1)  # (ky, kx, C, C_out)
        # Per output phase (a, b): its taps' (row shift, column shift, kernel position),
        # ordered so that a row's taps read consecutive input pixels (one run to gather).
        self.phases = [sorted(((ty, tx, ky * k + kx) for ky, ty in phases[a] for kx, tx in phases[b]),
                              key=lambda tap: (-tap[0], -tap[1]))
                       for a in range(s) for b in range(s)]
        # Few output channels (the last layer of g_s): one product of every tap's weights
        # stacked, (k·k·C_out, C), with the input, giving each tap's outputs as rows over
        # the pixels, which are then shifted and summed as whole contiguous rows; gathering
        # the input (k·k/s² times its size) would cost more.
        self.gather = out_channels * 4 > channels
        if self.gather:
            self.weights = [_Taps(kernel.reshape(k * k, channels, out_channels)[[t for _, _, t in phase]], bias)
                            for phase in self.phases]
        else:
            self.side = np.ascontiguousarray(kernel.reshape(k * k, channels, out_channels)
                                             .transpose(0, 2, 1).reshape(-1, channels))

    transposed = True
    geometry = property(lambda self: (self.k, self.stride, self.padding))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        height, width, _ = x.shape
        before = self.before
        padded_cols = width + before + self.after
        padded = np.zeros((height + before + self.after + 1, padded_cols, self.channels), dtype=np.float32)
        padded[before:before + height, before:before + width] = x
        out = np.empty((height * self.stride, width * self.stride, self.out_channels), dtype=np.float32)
        (self._gathered if self.gather else self._sides)(padded.reshape(-1, self.channels), out, height, width)
        return out

    def _gathered(self, flat: np.ndarray, out: np.ndarray, height: int, width: int) -> None:
        """Each output phase a correlation of the padded input (``flat``: its pixels in rows
        of width + before + after) with the phase's taps."""
        s, before = self.stride, self.before
        padded_cols = width + before + self.after
        for phase, taps in enumerate(self.phases):
            a, b = divmod(phase, s)
            inputs = [(flat, (before - ty) * padded_cols + before - tx) for ty, tx, _ in taps]

            def store(first: int, last: int, values: np.ndarray, a: int = a, b: int = b) -> None:
                out[s * first + a:s * last + a:s, b::s] = values[:, :width]

            self.weights[phase].correlate(inputs, height, padded_cols, store)

    def _sides(self, flat: np.ndarray, out: np.ndarray, height: int, width: int) -> None:
        """Every tap's outputs at once (tap-major rows over the input's pixels), then each
        output phase the sum of its taps' rows, shifted."""
        s, before, c = self.stride, self.before, self.out_channels
        padded_cols = width + before + self.after
        n = height * padded_cols
        products = np.empty((len(self.side), len(flat)), dtype=np.float32)

        def product(index: int) -> None:
            pixels = slice(index * _SIDE_PIXELS, (index + 1) * _SIDE_PIXELS)
            np.matmul(self.side, flat[pixels].T, out=products[:, pixels])

        def phase_sum(phase: int) -> None:
            result = np.empty((c, n), dtype=np.float32)
            result[:] = self.bias[:, None]
            for ty, tx, t in self.phases[phase]:
                start = (before - ty) * padded_cols + before - tx
                result += products[t * c:(t + 1) * c, start:start + n]
            out[phase // s::s, phase % s::s] = result.reshape(c, height, padded_cols)[:, :, :width].transpose(1, 2, 0)

        parallel(product, -(-len(flat) // _SIDE_PIXELS))
        parallel(phase_sum, len(self.phases))


_SIDE_PIXELS = 4096
"""Input pixels of one product of a transposed convolution with few output channels."""
_CHUNK_ROWS = 512
_CHUNK_BYTES = 4 << 20
_CHUNK_MOST = 4096
"""Output pixels of one matrix product: at least _CHUNK_ROWS, more while the gathered input
stays within _CHUNK_BYTES, at most _CHUNK_MOST (g_a's first layer, 75 values a pixel:
4096 took it from 36 to 25 ms on kodim01, where 14,000 left its output out of cache):
large enough for an efficient product, small enough to stay in a core's caches."""


class _Taps:
    """The weights of a correlation, T kernel taps of (C, C_out) each, and its bias:
    ``correlate(inputs, n)`` computes

        out[r] = bias + Σ_t array_t[r + offset_t] @ W_t,   r < n,

    for ``inputs`` = [(array_t, offset_t)], arrays of rows of C values, n = rows·width
    (an image's rows, flattened). A chunk of rows of every tap's input is gathered side by side, (rows, T·C), and multiplied by the
    taps' weights stacked, (T·C, C_out): the whole kernel in one matrix product, no
    partial sums (an im2col, a chunk at a time)."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray):
        count, channels, out_channels = kernel.shape
        self.out_channels = out_channels
        self.bias = bias.astype(np.float32)
        self.stacked = np.ascontiguousarray(kernel.reshape(count * channels, out_channels))

    def correlate(self, inputs: list[tuple[np.ndarray, int]], rows: int, width: int,
                  store: Callable[[int, int, np.ndarray], None]) -> None:
        """out for r < rows·width, handed to ``store(first, last, values)`` a chunk of whole
        rows at a time (values: (last − first, width, C_out)), on the thread that made it."""
        channels = inputs[0][0].shape[1]
        # Image rows per chunk, from the sizes alone: at least _CHUNK_ROWS pixels, more
        # where the gathered rows are short (the pixels: 3 channels).
        pixels = max(_CHUNK_ROWS, min(_CHUNK_MOST, _CHUNK_BYTES // (4 * channels * len(inputs))))
        step = max(1, pixels // width)
        runs = _runs(inputs, rows * width)
        columns = np.cumsum([0] + [length * channels for _, _, length in runs]).tolist()
        buffers = threading.local()

        def chunk(index: int) -> None:
            first, last = index * step, min(rows, (index + 1) * step)
            start, stop = first * width, last * width
            if not hasattr(buffers, "gathered"):
                buffers.gathered = np.empty((step * width, len(inputs) * channels), dtype=np.float32)
                buffers.out = np.empty((step * width, self.out_channels), dtype=np.float32)
            gathered, out = buffers.gathered[:stop - start], buffers.out[:stop - start]
            for column, (array, offset, length) in zip(columns, runs):
                # A run of taps reads consecutive pixels: its values for a pixel are one
                # contiguous stretch of length·C values, a pixel's C further on for the next.
                gathered[:, column:column + length * channels] = as_strided(
                    array[offset + start:], (stop - start, length * channels), array.strides)
            np.matmul(gathered, self.stacked, out=out)
            out += self.bias
            store(first, last, out.reshape(last - first, width, -1))

        parallel(chunk, -(-rows // step))


def _runs(inputs: list[tuple[np.ndarray, int]], n: int) -> list[tuple[np.ndarray, int, int]]:
    """The taps as runs (array, offset, length): consecutive taps that read the same array
    at consecutive offsets are one run. Each run's reads are checked to lie inside its
    array (they are then taken through a strided view)."""
    runs: list[list] = []
    for array, offset in inputs:
        if runs and runs[-1][0] is array and runs[-1][1] + runs[-1][2] == offset:
            runs[-1][2] += 1
        else:
            runs.append([array, offset, 1])
    for array, offset, length in runs:
        if offset < 0 or offset + n + length - 1 > len(array) or not array.flags.c_contiguous:
            raise ValueError("a convolution tap reads outside its input")
    return [tuple(run) for run in runs]


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
        """GDN of x, in place where x is contiguous (a layer's own output)."""
        x = np.ascontiguousarray(x)
        flat = x.reshape(-1, x.shape[-1])
        buffers = threading.local()

        def block(index: int) -> None:
            part = flat[index * _BLOCK:(index + 1) * _BLOCK]
            if not hasattr(buffers, "norm"):
                buffers.square = np.empty((min(len(flat), _BLOCK), flat.shape[1]), dtype=np.float32)
                buffers.norm = np.empty_like(buffers.square)
            square, norm = buffers.square[:len(part)], buffers.norm[:len(part)]
            np.multiply(part, part, out=square)
            np.matmul(square, self.gamma_t, out=norm)
            norm += self.beta
            np.sqrt(norm, out=norm)
            if self.inverse:
                part *= norm
            else:
                part /= norm

        parallel(block, -(-len(flat) // _BLOCK))
        return x


class ReLU:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0, out=np.ascontiguousarray(x))


class Network:
    """Layers applied in order to a (height, width, channels) float32 array; given a
    function that makes them instead, they are made on first use (an encoder never
    builds its g_s)."""

    def __init__(self, layers: list | Callable[[], list]):
        self._layers = layers if isinstance(layers, list) else None
        self._build = None if isinstance(layers, list) else layers
        self._lock = threading.Lock()

    @property
    def layers(self) -> list:
        if self._layers is None:
            with self._lock:
                if self._layers is None:
                    self._layers = self._build()
        return self._layers

    def modules(self) -> list:
        """The layers (as torch's ``Module.modules`` lists a network's; nic.tiling walks them)."""
        return list(self.layers)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x
