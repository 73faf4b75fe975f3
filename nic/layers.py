"""Neural-network layers of the Ballé et al. codec.

GDN (generalized divisive normalization) is from Ballé, Laparra and Simoncelli,
"Density modeling of images using a generalized normalization transformation"
(ICLR 2016), used as the nonlinearity of "End-to-end optimized image compression"
(ICLR 2017). No I/O here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F


def bf16_is_fast(device: str) -> bool:
    """Whether bf16 autocast speeds the transforms up on ``device``: on CUDA, and on CPUs
    with bf16 instructions (AVX-512 BF16 or AMX), where a training step is 2.5x faster
    than in fp32. A CPU without them emulates bf16: 10-25x slower than fp32 on an AVX2-only AMD
    EPYC (tools/train_speed.py, docs/results/training.md)."""
    if device.startswith("cuda"):
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private probes of torch 2.x; without them, the safe choice
        return False


class LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still flows when x is below the bound but the
    gradient pushes it upward (Ballé et al. 2018, appendix 6.2). Without this, a
    parameter that hits its bound is stuck there forever."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return torch.clamp_min(x, bound)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through.to(grad.dtype), None


class NonNegative(nn.Module):
    """The reparameterization v = max(p, sqrt(min + eps²))² - eps² of Ballé 2017
    that keeps GDN's β and γ non-negative (β ≥ ``minimum``) and well conditioned
    near zero. Stores p; ``forward(p)`` gives v, ``init(v)`` gives p."""

    def __init__(self, minimum: float = 0.0, reparam_offset: float = 2.0**-18):
        super().__init__()
        self.pedestal = reparam_offset**2
        self.bound = (minimum + self.pedestal) ** 0.5

    def init(self, value: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp_min(value + self.pedestal, self.pedestal))

    def forward(self, p: Tensor) -> Tensor:
        return LowerBound.apply(p, self.bound) ** 2 - self.pedestal


class GDN(nn.Module):
    r"""Generalized divisive normalization (Ballé et al. 2016, eq. 3):

        y_i = x_i / sqrt(β_i + Σ_j γ_ij · x_j²)

    and its approximate inverse IGDN (``inverse=True``), used in the synthesis
    transform: y_i = x_i · sqrt(β_i + Σ_j γ_ij · x_j²).

    Fresh layers have β = 1 and γ = 0.1·I, so GDN starts as x / sqrt(1 + 0.1 x²).
    β ≥ 1e-6 and γ ≥ 0 through :class:`NonNegative`.
    """

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1):
        super().__init__()
        self.inverse = inverse
        self.beta_reparam = NonNegative(minimum=beta_min)
        self.gamma_reparam = NonNegative()
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(channels)))
        self.gamma = nn.Parameter(self.gamma_reparam.init(gamma_init * torch.eye(channels)))

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        beta = self.beta_reparam(self.beta)
        gamma = self.gamma_reparam(self.gamma).reshape(channels, channels, 1, 1)
        # Σ_j γ_ij x_j² is a 1x1 convolution of x² with γ.
        norm = F.conv2d(x * x, gamma.to(x.dtype), beta.to(x.dtype))
        if not torch.is_grad_enabled():
            # Inference: the same operations in place, so the full-resolution layers do not
            # write two more fresh tensors (they are ≈ 48 MiB each for a Kodak image and
            # freshly page-faulted memory is slow; docs/speed.md). Bit-identical results.
            norm.sqrt_()
            return norm.mul_(x) if self.inverse else torch.div(x, norm, out=norm)
        norm = torch.sqrt(norm)
        return x * norm if self.inverse else x / norm


def conv(in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> nn.Conv2d:
    """Strided 'same' convolution: halves height and width for stride 2."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """Transposed convolution that exactly doubles height and width for stride 2."""
    return nn.ConvTranspose2d(
        in_channels, out_channels, kernel_size, stride=stride,
        output_padding=stride - 1, padding=kernel_size // 2,
    )
