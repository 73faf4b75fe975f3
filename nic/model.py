"""The codec of Ballé, Laparra and Simoncelli, "End-to-end optimized image
compression" (ICLR 2017), with one shared pair of transforms for all qualities.

    x ──g_a──▶ y ──·gain[q]──▶ round ──▶ ŷ (integers, range coded)
    x̂ ◀──g_s── ŷ · inv_gain[q] ◀──────────┘

g_a is conv5x5/2 → GDN → conv5x5/2 → GDN → conv5x5/2 → GDN → conv5x5/2 with N, N, N,
M channels; g_s mirrors it with transposed convolutions and IGDN (the layer shape of
CompressAI's bmshj2018-factorized). Each quality q has its own λ, a gain vector and
an inverse-gain vector over the M latent channels (Cui et al., "Asymmetric gained
deep image compression with continuous rate adaptation", CVPR 2021) and its own
factorized density, so one training run serves every rate. Training replaces
rounding by additive uniform noise and minimizes R + λ·255²·MSE (bits per pixel).

This module is math only: tensors in, tensors out. No I/O.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .entropy import FactorizedDensity, IntegerTables, integer_tables
from .layers import GDN, conv, deconv

MSE_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)
"""CompressAI's MSE λ per quality 1..8 (loss λ·255²·MSE + bpp)."""

MAX_CHANNELS = 1024
"""Largest N or M a weights file may declare (the shipped model has 128 and 192)."""

DOWNSAMPLING = 16
"""g_a halves height and width four times."""


@dataclass(frozen=True)
class Config:
    """Everything needed to rebuild the network; saved inside the weights file."""

    model_id: int = 1  # stable id written into every .nic file
    name: str = "bls2017-gained"
    N: int = 128
    M: int = 192
    lambdas: tuple[float, ...] = MSE_LAMBDAS
    decoder_finetuned: bool = False  # g_s retrained on rounded latents (nic train --finetune-decoder)

    @property
    def qualities(self) -> int:
        return len(self.lambdas)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        """Parse and validate (before anything is allocated from these numbers)."""
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("config is not an object")
        fields["lambdas"] = tuple(fields.get("lambdas", ()))
        config = cls(**fields)
        for name in ("model_id", "N", "M"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHANNELS:
                raise ValueError(f"config field {name} = {value!r} is out of range")
        if not isinstance(config.decoder_finetuned, bool):
            raise ValueError("config field decoder_finetuned must be true or false")
        if not 1 <= len(config.lambdas) <= 255 or not all(
                isinstance(v, (int, float)) and 0 < v < 1e6 for v in config.lambdas):
            raise ValueError("config lambdas must be 1..255 positive numbers")
        return config


def latent_shape(config: Config, height: int, width: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of ŷ for an image of height x width pixels."""
    return config.M, -(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)


class Codec(nn.Module):
    def __init__(self, config: Config = Config()):
        super().__init__()
        self.config = config
        N, M, Q = config.N, config.M, config.qualities
        self.g_a = nn.Sequential(
            conv(3, N), GDN(N),
            conv(N, N), GDN(N),
            conv(N, N), GDN(N),
            conv(N, M),
        )
        self.g_s = nn.Sequential(
            deconv(M, N), GDN(N, inverse=True),
            deconv(N, N), GDN(N, inverse=True),
            deconv(N, N), GDN(N, inverse=True),
            deconv(N, 3),
        )
        # Quantization step ∝ 1/sqrt(λ) is the high-rate optimum; start there.
        lam = torch.tensor(config.lambdas, dtype=torch.float32)
        gain = torch.sqrt(lam / lam[Q // 2]).reshape(Q, 1).expand(Q, M).clone()
        self.gain = nn.Parameter(gain)
        self.inverse_gain = nn.Parameter(1.0 / gain)
        # One module holds every quality's densities: rows (q−1)·M … q·M − 1 are quality q's.
        self.density = FactorizedDensity(Q * M)
        self.tables: list[IntegerTables] | None = None

    # ---- training ----------------------------------------------------------------

    def forward(self, x: Tensor, qualities: Tensor, hard: bool = False) -> tuple[Tensor, Tensor]:
        """(x̃, bits per sample) with ỹ = g_a(x)·gain + U(−½, ½).

        ``qualities`` (1-based, one per sample) may differ within a batch, so every
        gain and every density learns at every step. With ``hard``, ỹ = round(y)
        exactly as the encoder quantizes, with no gradient into g_a or the
        densities: the decoder fine-tuning of Borzechowski et al."""
        q = qualities.long() - 1
        if hard:
            # fp32 even under autocast: bf16 would round some latents the other way than
            # the encoder does, and the decoder must learn the encoder's exact integers.
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                y = self.g_a(x.float()) * self.gain[q].reshape(len(q), -1, 1, 1)
                y_tilde = torch.round(y)
                bits = self.latent_bits(y_tilde, qualities)
        else:
            y = self.g_a(x) * self.gain[q].reshape(len(q), -1, 1, 1).to(x.dtype)
            y = y.float()  # the density and the noise stay in fp32 under autocast
            y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            bits = self.latent_bits(y_tilde, qualities)
        x_tilde = self.g_s(y_tilde * self.inverse_gain[q].reshape(len(q), -1, 1, 1))
        return x_tilde, bits

    def density_rows(self, qualities: Tensor) -> Tensor:
        """(batch, M) rows of :attr:`density` that model each sample's channels."""
        M = self.config.M
        return (qualities.long().reshape(-1, 1) - 1) * M + torch.arange(M, device=qualities.device)

    def latent_bits(self, y_hat: Tensor, qualities: Tensor) -> Tensor:
        """−log2 p(ŷ) summed per sample, each sample under its quality's density."""
        p = self.density.probability(y_hat, self.density_rows(qualities))
        return -torch.log2(p).sum(dim=(1, 2, 3))

    # ---- inference -----------------------------------------------------------------

    def analysis(self, x: Tensor, quality: int) -> Tensor:
        """Scaled latent y·gain (float) for x in [0, 1] of shape (1, 3, H, W),
        H and W multiples of 16."""
        return self.g_a(x) * self.gain[quality - 1].reshape(1, -1, 1, 1)

    def synthesis(self, y_hat: Tensor, quality: int) -> Tensor:
        """x̂ in [0, 1] (not clipped) from integer latents."""
        return self.g_s(y_hat * self.inverse_gain[quality - 1].reshape(1, -1, 1, 1))

    def export_tables(self) -> None:
        """Freeze every density into integer tables (done once, saved with weights)."""
        tables = integer_tables(self.density)
        M = self.config.M
        self.tables = [tables.select(q * M, (q + 1) * M) for q in range(self.config.qualities)]


def rate_distortion_loss(x: Tensor, x_tilde: Tensor, bits: Tensor, lambdas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, bpp, mse) per sample, loss = bpp + λ·255²·MSE, x in [0, 1]."""
    pixels = x.shape[2] * x.shape[3]
    bpp = bits / pixels
    mse = ((x_tilde.float() - x.float()) ** 2).mean(dim=(1, 2, 3))
    return bpp + lambdas * 255.0**2 * mse, bpp, mse


def pad_to_multiple(x: Tensor, multiple: int = DOWNSAMPLING) -> Tensor:
    """Replicate-pad bottom/right so height and width are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


# ---- weights as plain arrays (no pickle) -------------------------------------------

def to_arrays(model: Codec, half: bool = False) -> dict[str, np.ndarray]:
    """All parameters, the config and the integer tables as named numpy arrays."""
    if model.tables is None:
        raise ValueError("export_tables() first")
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().numpy()
        if half and (name.startswith("g_a.") or name.startswith("g_s.")) and value.ndim == 4:
            value = value.astype(np.float16)  # conv kernels only: ≈ half the file
        arrays[name] = value
    for q, table in enumerate(model.tables):
        arrays[f"tables.{q}.offsets"] = table.offsets
        arrays[f"tables.{q}.lengths"] = table.lengths
        arrays[f"tables.{q}.frequencies"] = table.frequencies
    arrays["config"] = np.frombuffer(model.config.to_json().encode(), dtype=np.uint8)
    return arrays


def from_arrays(arrays: dict[str, np.ndarray]) -> Codec:
    """Inverse of :func:`to_arrays`; raises ValueError on anything inconsistent."""
    try:
        config = Config.from_json(bytes(arrays["config"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"weights have no valid config ({exc})") from None
    model = Codec(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name not in arrays:
            raise ValueError(f"weights lack tensor {name}")
        value = arrays[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"tensor {name} has shape {value.shape}, expected {tuple(tensor.shape)}")
        state[name] = torch.from_numpy(np.ascontiguousarray(value).astype(np.float32))
    model.load_state_dict(state)
    tables = []
    for q in range(config.qualities):
        try:
            table = IntegerTables(
                offsets=arrays[f"tables.{q}.offsets"].astype(np.int32),
                lengths=arrays[f"tables.{q}.lengths"].astype(np.int32),
                frequencies=arrays[f"tables.{q}.frequencies"].astype(np.int32),
            )
        except KeyError:
            raise ValueError(f"weights lack the integer tables of quality {q + 1}") from None
        if table.offsets.shape != (config.M,) or table.lengths.shape != (config.M,) or \
                len(table.frequencies) != int((table.lengths + 1).sum()) or (table.lengths < 1).any():
            raise ValueError(f"integer tables of quality {q + 1} are inconsistent")
        tables.append(table)
    model.tables = tables
    return model.eval()
