"""The transforms' arithmetic: fp32 (nic.engine, numpy, on every CPU) or bf16 (torch,
where the CPU multiplies bf16 in hardware: AVX-512 BF16 or AMX).

    precision   g_a, g_s                          what needs it
    fp32        nic.engine, float32               nothing beyond numpy
    bf16        torch, bfloat16, channels_last    torch, and a CPU with bf16 units to be fast
    auto        bf16 where it is fast, else fp32  (the default)

bf16 runs g_a and g_s about 3x faster on a CPU with AMX (docs/speed.md). Nothing that
picks a table or a mean runs in it: g_a's output is rounded to the integers the file
carries, h_s and the context networks are integer, and the coder's tables are
integer, so a file decodes the same way on every machine whatever precision wrote it.
What bf16 changes is numbers near a rounding boundary: g_a rounds a few latents in a
thousand the other way (a file's bytes differ from fp32's, never between thread
counts on one machine), and g_s moves a pixel by a level here and there.

Three choices keep bf16's error at fp32's level where it would show:

* g_a's first layer takes the pixels as integers 0..255 (exact in bf16) with its
  weights divided by 255, instead of x / 255 (not exact in bf16);
* g_a's output, the latents before rounding, and every hidden layer are bf16;
* g_s's last layer, whose output is the pixels, is computed twice on the bf16 units,
  as a stride-1 convolution whose channels are the output phases' pixels (bf16 inputs
  and weights, fp32 sums): once rounded to bf16 and once as the remainder of that
  rounding, so that the pixels are as exact as fp32 would make them from the same
  inputs (:class:`_ExactOutput`).

Efforts 2..4 search for the latents to send with the fp32 torch network (they
differentiate through g_s). Several Python threads running bf16 transforms at once each
get torch's OpenMP team of nic.engine.threads() threads (more threads than cores: the
results do not change, the speed does).

Math only, no I/O but reading the CPU's flags: arrays in, arrays out; torch is imported
when bf16 is chosen.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
import threading
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from . import engine

PRECISIONS = ("auto", "fp32", "bf16")

AUTO_PIXELS = 3_000_000
"""Below this many pixels ``auto`` is fp32: a fresh process would spend longer importing
torch (≈ 1.2 s) than bf16 saves (≈ 0.5 s per megapixel each way; docs/speed.md). The
choice depends on the image and the machine only, never on what a process has
imported: the same call gives the same bytes. A program that has torch loaded anyway
asks for bf16 by name."""


class PrecisionError(ValueError):
    """A precision that cannot run here (bf16 without torch) or is unknown."""


@lru_cache(maxsize=None)
def bf16_units() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX: x86 only). Read
    from /proc/cpuinfo where there is one (without importing torch), else asked of torch."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False  # torch's bf16 kernels here are for those two x86 extensions
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
        return False  # read, and no flags line
    except OSError:
        pass
    if not torch_installed():
        return False
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private probes of torch 2.x
        return False


def torch_installed() -> bool:
    if "torch" in sys.modules:
        return sys.modules["torch"] is not None  # None: imports of torch are blocked
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def choose(precision: str, pixels: int) -> str:
    """"fp32" or "bf16" for ``precision`` ("auto", "fp32" or "bf16") and an image of
    ``pixels`` pixels: ``auto`` is bf16 where the CPU has bf16 units and torch is
    installed, for images of at least :data:`AUTO_PIXELS`."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16" and not torch_installed():
        raise PrecisionError("bf16 needs PyTorch (pip install torch); fp32 runs without it")
    if precision == "fp32" or (precision == "auto" and not (pixels >= AUTO_PIXELS and bf16_units()
                                                           and torch_installed())):
        return "fp32"
    try:
        import torch  # noqa: F401  (what bf16 runs on: a broken install is found here, not mid-image)
    except ImportError as exc:
        if precision == "auto":
            return "fp32"
        raise PrecisionError(f"bf16 needs a working PyTorch ({exc})") from None
    return "bf16"


# ---- the transforms in bf16 --------------------------------------------------------------

class Transform:
    """A transform (g_a or g_s) in bf16, from the same layers as nic.engine's: called on a
    (height, width, channels) float32 array, it returns one, as :class:`nic.engine.Network`
    does. ``modules()`` gives the layers' geometry to nic.tiling. Built on first use."""

    def __init__(self, network: engine.Network, analysis: bool):
        self._network = network  # the fp32 transform, whose layers this one is built from
        self.analysis = analysis
        self._built: list | None = None
        self._lock = threading.Lock()

    def modules(self) -> list:
        return self._network.modules()

    def _layers(self) -> list:
        if self._built is None:
            with self._lock:
                if self._built is None:
                    self._built = _torch_layers(self._network.layers, self.analysis)
        return self._built

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        layers = self._layers()
        with torch.inference_mode(), _torch_threads(engine.threads()):
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
            for layer in layers:
                t = layer(t)
            if isinstance(t, np.ndarray):  # g_s's exact last layer hands back the pixels' array
                return t
            return t[0].permute(1, 2, 0).float().numpy()


@contextmanager
def _torch_threads(count: int):
    """torch's intra-op threads as nic.engine's for the duration (restored after)."""
    import torch

    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before != count:
            torch.set_num_threads(before)


def _torch_layers(layers: list, analysis: bool) -> list:
    """Callables on (1, C, H, W) tensors, one per engine layer, in bf16 channels_last."""
    import torch

    out = []
    for index, layer in enumerate(layers):
        first, last = index == 0, index == len(layers) - 1
        if isinstance(layer, engine.GDN):
            out.append(_GDN(torch, layer))
        elif isinstance(layer, engine.ReLU):
            out.append(torch.relu)
        elif last and not analysis and isinstance(layer, engine.Deconv) and not layer.gather:
            # It takes the IGDN before it, to write its output where it wants it.
            out.append(_ExactOutput(torch, layer, out.pop() if out and isinstance(out[-1], _GDN) else None))
        elif isinstance(layer, (engine.Conv, engine.Deconv)):
            out.append(_Convolution(torch, layer, pixels_in=first and analysis))
        else:
            raise TypeError(f"no bf16 form of {type(layer).__name__}")
    return out


def _cl(torch, t):
    return t.contiguous(memory_format=torch.channels_last)


class _Convolution:
    """A (transposed) convolution in bf16. With ``pixels_in`` its input is x / 255 and
    runs as the integers 0..255 with the weights divided by 255 (exact in bf16)."""

    def __init__(self, torch, layer, pixels_in: bool):
        self.torch = torch
        weight = layer.source_weight.astype(np.float32)
        if pixels_in:
            weight = weight / np.float32(255)
        self.pixels_in = pixels_in
        self.weight = _cl(torch, torch.from_numpy(weight).to(torch.bfloat16))
        self.bias = torch.from_numpy(layer.source_bias.astype(np.float32)).to(torch.bfloat16)
        self.transposed, (_, self.stride, self.padding) = layer.transposed, layer.geometry
        self.swapped = None  # the weights with rows and columns swapped, for narrow inputs

    def __call__(self, x):
        F = self.torch.nn.functional
        if self.pixels_in:
            x = x.mul(255).round_()
        x = _cl(self.torch, x.to(self.torch.bfloat16))
        if self.transposed:
            return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.stride - 1)
        if x.shape[3] <= NARROW:  # oneDNN's bf16 kernel is wrong here: the same sums, rows and columns swapped
            if self.swapped is None:
                self.swapped = _cl(self.torch, self.weight.transpose(2, 3))
            swapped = _cl(self.torch, x.transpose(2, 3))
            return _cl(self.torch, F.conv2d(swapped, self.swapped, self.bias, self.stride, self.padding).transpose(2, 3))
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


NARROW = 2
"""Widest input (columns) on which oneDNN's strided bf16 convolution (torch 2.13, AMX)
returns garbage (NaN or values of 1e19) for 9 rows or more: measured for every width
1..8 and height 1..199, and 150 random sizes, of nic's three convolution shapes; its
transposed convolutions and 1x1 convolutions are right at every size tried. Such an
input is convolved as its transpose (tests/test_precision.py checks many shapes)."""


class _GDN:
    """GDN / IGDN in bf16: x / sqrt(β + γ·x²) (or x · sqrt(…)), γ·x² a 1x1 convolution."""

    def __init__(self, torch, layer: engine.GDN):
        self.torch = torch
        channels = len(layer.beta)
        self.gamma = _cl(torch, torch.from_numpy(np.ascontiguousarray(layer.gamma_t.T))
                         .reshape(channels, channels, 1, 1).to(torch.bfloat16))
        self.beta = torch.from_numpy(layer.beta).to(torch.bfloat16)
        self.inverse = layer.inverse

    def __call__(self, x, into=None):
        """GDN of x, into ``into`` (a tensor of x's shape) if given."""
        norm = self.torch.nn.functional.conv2d(x * x, self.gamma, self.beta)
        norm.sqrt_()
        into = norm if into is None else into
        return self.torch.mul(norm, x, out=into) if self.inverse else self.torch.div(x, norm, out=into)


class _ExactOutput:
    """g_s's last layer (few output channels: the pixels), exact to fp32 from its bf16
    inputs and weights. The transposed convolution is written as a stride-1 convolution
    giving each output phase's pixels as channels (s·s·C_out of them at the input's
    size; a pixel shuffle puts them in place), computed twice on the bf16 units: once
    rounded to bf16, then, with the rounded result as C_out·s·s more input channels
    weighted −1 at the kernel's centre, the remainder of that rounding (the sums are
    fp32 inside, so only the remainder is rounded: 2^-9 of 2^-9). Their sum in fp32 plus
    the bias are the pixels. ``gdn``, the IGDN before it, writes straight into the
    channels the two convolutions read. Its output is a (height·s, width·s, C_out)
    float32 array."""

    def __init__(self, torch, layer: engine.Deconv, gdn: "_GDN | None"):
        if not isinstance(layer, engine.Deconv) or layer.before != layer.after:
            raise TypeError("the exact bf16 output is for a transposed convolution of a symmetric reach")
        self.torch, self.gdn, self.stride = torch, gdn, layer.stride
        s, reach, k = layer.stride, layer.before, layer.k
        weight = layer.source_weight.astype(np.float32)  # (C, C_out, k, k)
        channels, outputs = weight.shape[:2]
        size = 2 * reach + 1
        phases = np.zeros((outputs, s, s, channels, size, size), dtype=np.float32)
        for a in range(s):
            for b in range(s):
                # Output s·m + a reads input m − t through kernel position s·t + a + k // 2.
                for ty in range(-reach, reach + 1):
                    for tx in range(-reach, reach + 1):
                        ky, kx = s * ty + a + k // 2, s * tx + b + k // 2
                        if 0 <= ky < k and 0 <= kx < k:
                            phases[:, a, b, :, reach - ty, reach - tx] = weight[:, :, ky, kx].T
        phases = phases.reshape(outputs * s * s, channels, size, size)
        extra = outputs * s * s
        rounded = np.concatenate([phases, np.zeros((extra, extra, size, size), np.float32)], axis=1)
        remainder = rounded.copy()
        remainder[np.arange(extra), channels + np.arange(extra), reach, reach] = -1.0
        self.rounded, self.remainder = (_cl(torch, torch.from_numpy(w).to(torch.bfloat16)) for w in (rounded, remainder))
        self.extra, self.reach = extra, reach
        self.bias = torch.from_numpy(np.repeat(layer.source_bias.astype(np.float32), s * s)).reshape(1, -1, 1, 1)

    def __call__(self, x):
        torch = self.torch
        F = torch.nn.functional
        _, channels, height, width = x.shape
        both = torch.empty((1, height, width, channels + self.extra), dtype=torch.bfloat16).permute(0, 3, 1, 2)
        inside, tail = both[:, :channels], both[:, channels:]
        if self.gdn is None:
            inside.copy_(x)
        else:
            self.gdn(x, into=inside)
        tail.zero_()  # read by the first pass with zero weights: must not be NaN
        rounded = F.conv2d(both, self.rounded, None, 1, self.reach)
        tail.copy_(rounded)
        remainder = F.conv2d(both, self.remainder, None, 1, self.reach)
        pixels = rounded.float().add_(remainder).add_(self.bias)
        return F.pixel_shuffle(pixels, self.stride)[0].permute(1, 2, 0).numpy()


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed blocks for reuse: no mmap of large blocks (each
    would be returned on free and page-faulted and zeroed again on the next tile or
    layer), no trimming of the heap below 1 GiB. A setting of the whole process: nic's
    CLI makes it when bf16 runs (faster in nine of ten alternating runs of g_a and g_s
    on a Kodak image, g_s by ~20 %: docs/speed.md); a program may call it too. False
    where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    no_mmap, no_trim = libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    return bool(no_mmap and no_trim)
