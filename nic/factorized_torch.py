"""The factorized family's network in torch: what trains it and exports it, and what
the encoder's search at effort 2..4 differentiates through (nic.quantization).

The architecture, the formulas and the file format are described in
:mod:`nic.factorized`, which codes files without torch (:class:`nic.factorized.Model`
runs the same transforms in numpy); this module is its trainable twin. Every name here
is also reachable as ``nic.factorized.<name>`` (imported on first use).

Math only: tensors and arrays in, tensors and arrays out; no I/O.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .coding import IntegerTables
from .entropy import FactorizedDensity, integer_tables
from .factorized import (_BUILDING, MAX_CHANNELS, Config, check_arrays, is_conv_kernel, pair_shapes, read_config,
                         read_tables)
from .layers import GDN, conv, deconv
from .tiling import DOWNSAMPLING

MEMORY_FORMAT = torch.channels_last
"""Layout of every tile tensor; channels_last is the faster one for oneDNN here
(docs/speed.md). The results do not depend on it beyond float rounding."""


def analysis_transform(N: int, M: int) -> nn.Sequential:
    """g_a: conv5x5/2 → GDN → conv5x5/2 → GDN → conv5x5/2 → GDN → conv5x5/2."""
    return nn.Sequential(
        conv(3, N), GDN(N),
        conv(N, N), GDN(N),
        conv(N, N), GDN(N),
        conv(N, M),
    )


def synthesis_transform(N: int, M: int) -> nn.Sequential:
    """g_s: g_a mirrored, transposed convolutions and IGDN."""
    return nn.Sequential(
        deconv(M, N), GDN(N, inverse=True),
        deconv(N, N), GDN(N, inverse=True),
        deconv(N, N), GDN(N, inverse=True),
        deconv(N, 3),
    )


class Transforms(nn.Module):
    """A specialized quality's own pair of transforms (N hidden channels, M latent)."""

    def __init__(self, N: int, M: int):
        super().__init__()
        self.g_a = analysis_transform(N, M)
        self.g_s = synthesis_transform(N, M)


@torch.no_grad()
def embed_transform(source: nn.Sequential, target: nn.Sequential) -> None:
    """Copy ``source`` into ``target``, a g_a or g_s as wide or wider (more hidden
    channels), so that ``target`` computes exactly what ``source`` does.

    The first channels of every layer are source's; what flows from a new channel
    into an old one is zero (convolution weights, and GDN's γ_ij of a new j), so the
    new channels cannot change the output. What flows into a new channel keeps
    ``target``'s fresh initialization: the new channels are active at once, so the
    weights out of them get gradients at the first step (as a zero-initialized
    residual branch does) and the wider pair learns to use them."""
    for mine, theirs in zip(target, source, strict=True):
        if isinstance(mine, GDN):
            n = theirs.beta.shape[0]
            mine.beta[:n] = theirs.beta
            mine.gamma[:n] = mine.gamma_reparam.init(torch.zeros_like(mine.gamma[:n]))  # γ_ij = 0
            mine.gamma[:n, :n] = theirs.gamma
            continue
        # Conv2d weights are (out, in, k, k); ConvTranspose2d weights are (in, out, k, k).
        out_axis = 1 if isinstance(mine, nn.ConvTranspose2d) else 0
        old_out, old_in = theirs.weight.shape[out_axis], theirs.weight.shape[1 - out_axis]
        into_old = mine.weight.narrow(out_axis, 0, old_out)
        into_old.zero_()  # from the new inputs too
        into_old.narrow(1 - out_axis, 0, old_in).copy_(theirs.weight)
        mine.bias[:old_out] = theirs.bias


class Codec(nn.Module):
    def __init__(self, config: Config = Config()):
        super().__init__()
        # Own pairs of a loaded weights file that nothing has run through yet (from_arrays):
        # a process that codes at one quality builds that pair only.
        self.unbuilt: dict[int, dict[str, np.ndarray]] = {}
        self.config = config
        N, M, Q = config.N, config.M, config.qualities
        self.g_a = analysis_transform(N, M)
        self.g_s = synthesis_transform(N, M)
        # Parameters "own.q3.g_a.0.weight" etc.: quality 3's own pair, if it has one; it
        # starts as (an embedding of) the shared pair (also ~5x faster than a random init).
        self.own = nn.ModuleDict({f"q{q}": Transforms(config.pair_N(q), M) for q in config.specialized})
        for pair in self.own.values():
            embed_transform(self.g_a, pair.g_a)
            embed_transform(self.g_s, pair.g_s)
        # Quantization step ∝ 1/sqrt(λ) is the high-rate optimum; start there.
        lam = torch.tensor(config.lambdas, dtype=torch.float32)
        gain = torch.sqrt(lam / lam[Q // 2]).reshape(Q, 1).expand(Q, M).clone()
        self.gain = nn.Parameter(gain)
        self.inverse_gain = nn.Parameter(1.0 / gain)
        # One module holds every quality's densities: rows (q−1)·M … q·M − 1 are quality q's.
        self.density = FactorizedDensity(Q * M)
        self.tables: list[IntegerTables] | None = None

    @property
    def qualities(self) -> int:
        return self.config.qualities

    @property
    def latent_channels(self) -> int:
        return self.config.M

    # ---- training ----------------------------------------------------------------

    def forward(self, x: Tensor, qualities: Tensor, hard: bool = False, mixed: bool = False
                ) -> tuple[Tensor, Tensor]:
        """(x̃, bits per sample) with ỹ = g_a(x)·gain + U(−½, ½).

        ``qualities`` (1-based, one per sample) may differ within a batch, so every
        gain and every density learns at every step. With ``hard``, ỹ = round(y)
        exactly as the encoder quantizes, with no gradient into g_a or the
        densities: the decoder fine-tuning of Borzechowski et al. With ``mixed``, the
        rate is still that of the noisy ỹ, but g_s decodes round(y), with a
        straight-through gradient into g_a (Minnen and Singh, "Channel-wise
        autoregressive entropy models for learned image compression", ICIP 2020): the
        whole codec trains on the integers it will send."""
        q = qualities.long() - 1
        if hard:
            # fp32 even under autocast: bf16 would round some latents the other way than
            # the encoder does, and the decoder must learn the encoder's exact integers.
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                y = self._each("g_a", x.float(), qualities) * self.gain[q].reshape(len(q), -1, 1, 1)
                y_tilde = torch.round(y)
                bits = self.latent_bits(y_tilde, qualities)
        else:
            y = self._each("g_a", x, qualities) * self.gain[q].reshape(len(q), -1, 1, 1).to(x.dtype)
            y = y.float()  # the density and the noise stay in fp32 under autocast
            y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            bits = self.latent_bits(y_tilde, qualities)
            if mixed:
                y_tilde = y + (torch.round(y) - y).detach()
        return self.synthesize(y_tilde, qualities), bits

    def synthesize(self, y_hat: Tensor, qualities: Tensor) -> Tensor:
        """x̃ of a batch of latents, each sample through its quality's inverse gain and g_s."""
        q = qualities.long() - 1
        return self._each("g_s", y_hat * self.inverse_gain[q].reshape(len(q), -1, 1, 1), qualities)

    def transforms(self, quality: int) -> tuple[nn.Module, nn.Module]:
        """(g_a, g_s) of a quality: its own pair if it is specialized, else the shared one."""
        if quality in self.unbuilt:
            with _BUILDING:
                if quality in self.unbuilt:  # not built by another thread meanwhile
                    self._build_pair(quality)
        owner = self.own[f"q{quality}"] if quality in self.config.specialized else self
        return owner.g_a, owner.g_s

    def _build_pair(self, quality: int) -> None:
        arrays = self.unbuilt[quality]
        # Often first reached under torch.inference_mode (nic encode), but the pair must be
        # made of normal tensors: encoder effort 2..4 and training differentiate through it.
        with torch.inference_mode(False):
            pair = Transforms(self.config.pair_N(quality), self.config.M).to(self.gain.device).train(self.training)
            fill(pair.state_dict(), arrays)
        self.own[f"q{quality}"] = pair
        del self.unbuilt[quality]  # last: another thread that finds it gone may use the pair

    def build_all(self) -> "Codec":
        """Build every own pair not built yet; whatever reads or moves all parameters does."""
        if self.unbuilt:
            with _BUILDING:
                for quality in sorted(self.unbuilt):
                    self._build_pair(quality)
        return self

    def state_dict(self, *args, **kwargs):
        self.build_all()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.build_all()
        return super().load_state_dict(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):  # parameters() too
        self.build_all()
        return super().named_parameters(*args, **kwargs)

    def _apply(self, *args, **kwargs):  # to(), float(), cuda() ...
        self.build_all()
        return super()._apply(*args, **kwargs)

    def _each(self, part: str, x: Tensor, qualities: Tensor) -> Tensor:
        """g_a or g_s (``part``) of each sample by its quality's transforms, in batch order."""
        if not self.config.specialized:
            return getattr(self, part)(x)  # one pair for all: no host sync, no graph break
        groups: dict[int, list[int]] = {}
        for i, quality in enumerate(qualities.tolist()):
            groups.setdefault(quality if quality in self.config.specialized else 0, []).append(i)
        which = ("g_a", "g_s").index(part)
        outputs, order = [], []
        for key, rows in groups.items():
            module = self.transforms(key)[which]  # key 0: the shared pair
            outputs.append(module(x if len(groups) == 1 else x[rows]))
            order.extend(rows)
        if len(groups) == 1:
            return outputs[0]
        return torch.cat(outputs)[torch.argsort(torch.tensor(order, device=x.device))]

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
        return self.transforms(quality)[0](x) * self.gain[quality - 1].reshape(1, -1, 1, 1)

    def synthesis(self, y_hat: Tensor, quality: int) -> Tensor:
        """x̂ in [0, 1] (not clipped) from integer latents."""
        return self.transforms(quality)[1](y_hat * self.inverse_gain[quality - 1].reshape(1, -1, 1, 1))

    # The tiles of nic.tiling: uint8 pixels in, float latents out, and back (numpy arrays).

    def analysis_array(self, block: np.ndarray, quality: int) -> np.ndarray:
        """y·gain, float32 (M, h/16, w/16), of uint8 pixels (h, w, 1|3), h and w multiples of 16."""
        with torch.inference_mode():
            return self.analysis(_to_input(block), quality)[0].numpy()

    def synthesis_array(self, y_hat: np.ndarray, quality: int) -> np.ndarray:
        """x̂, float32 (3, 16·h, 16·w) in [0, 1] (not clipped), of latents (M, h, w)."""
        y = torch.from_numpy(np.ascontiguousarray(y_hat, dtype=np.float32)).unsqueeze(0)
        with torch.inference_mode():
            return self.synthesis(y.contiguous(memory_format=MEMORY_FORMAT), quality)[0].numpy()

    def export_tables(self) -> None:
        """Freeze every density into integer tables (done once, saved with weights)."""
        tables = integer_tables(self.density)
        M = self.config.M
        self.tables = [tables.select(q * M, (q + 1) * M) for q in range(self.config.qualities)]


def _to_input(block: np.ndarray) -> Tensor:
    """uint8 (h, w, 1|3) → float (1, 3, h, w) in [0, 1], in MEMORY_FORMAT.

    Built as NHWC and permuted, so a channels_last result has true channels_last
    strides (stride[0] = h·w·3). ``permute(2, 0, 1).unsqueeze(0)`` instead leaves
    stride[0] = 3: is_contiguous(channels_last) still says yes, but the convolutions
    then see an NCHW tensor and run (and answer) in NCHW, ~25% slower here."""
    x = torch.from_numpy(np.array(block, copy=True)).unsqueeze(0).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(1, 3, *x.shape[2:])
    return x.to(dtype=torch.float32, memory_format=MEMORY_FORMAT).div_(255.0)


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


def specialize(model: Codec, qualities: list[int], donors: dict[int, Codec] | None = None,
               lambdas: dict[int, float] | None = None, widths: dict[int, int] | None = None) -> Codec:
    """A copy of ``model`` in which each of ``qualities`` has its own g_a/g_s.

    A quality's own pair starts as a copy of the shared pair (to be trained for that
    quality alone: ``nic train --specialize``), or, from ``donors[q]``, is that model's
    pair for q, with q's gain, inverse gain and density: a model trained for q alone
    is grafted in, with the donor's λ for q. ``lambdas`` gives some of ``qualities`` a
    new λ to be trained for (its gain and density then move to the new rate); the λ
    must still increase with the quality. ``widths`` gives some of ``qualities`` more
    hidden channels: their pair is embedded in a wider one that computes the same
    (:func:`embed_transform`). Qualities that are already specialized keep their pair
    unless a donor replaces it. Integer tables are re-exported if ``model`` had them."""
    donors, lambdas, widths = donors or {}, lambdas or {}, widths or {}
    for q in [*qualities, *donors, *lambdas, *widths]:
        if not 1 <= q <= model.config.qualities:
            raise ValueError(f"quality {q} is not one of the model's 1..{model.config.qualities}")
    table = list(model.config.lambdas)
    for q, donor in donors.items():
        if (donor.config.M, donor.config.qualities) != (model.config.M, model.config.qualities):
            raise ValueError(f"the model given for quality {q} has another M or number of qualities")
        table[q - 1] = donor.config.lambdas[q - 1]
    for q, value in lambdas.items():
        if q not in qualities:
            raise ValueError(f"a new λ for quality {q}, which is not being specialized")
        table[q - 1] = value
    if any(low >= high for low, high in zip(table, table[1:])):
        raise ValueError(f"λ must increase with the quality, got {', '.join(f'{v:g}' for v in table)}")
    sources = {q: donors.get(q, model) for q in sorted({*model.config.specialized, *qualities, *donors})}
    pair_N = {q: source.config.pair_N(q) for q, source in sources.items()}
    for q, width in widths.items():
        if q not in qualities:
            raise ValueError(f"a new width for quality {q}, which is not being specialized")
        if not pair_N[q] <= width <= MAX_CHANNELS:
            raise ValueError(f"quality {q}'s own pair can grow from {pair_N[q]} to at most "
                             f"{MAX_CHANNELS} hidden channels, not {width}")
        pair_N[q] = width
    config = dataclasses.replace(
        model.config, lambdas=tuple(table), specialized=tuple(sources),
        specialized_N=tuple(pair_N.values()) if any(n != model.config.N for n in pair_N.values()) else ())
    result = Codec(config)
    # The shared pair, gains and densities (own pairs are copied below: they may be wider).
    result.load_state_dict({name: tensor for name, tensor in model.state_dict().items()
                            if not name.startswith("own.")}, strict=False)
    M = config.M
    with torch.no_grad():
        for q, source in sources.items():
            own = result.own[f"q{q}"]
            g_a, g_s = source.transforms(q)
            embed_transform(g_a, own.g_a)
            embed_transform(g_s, own.g_s)
            if q in donors:
                result.gain[q - 1] = source.gain[q - 1]
                result.inverse_gain[q - 1] = source.inverse_gain[q - 1]
                rows = slice((q - 1) * M, q * M)
                for mine, theirs in zip(result.density.parameters(), source.density.parameters()):
                    mine[rows] = theirs[rows]
    if model.tables is not None:
        result.export_tables()
    return result.train(model.training)


def to_arrays(model: Codec, half: bool = False) -> dict[str, np.ndarray]:
    """All parameters, the config and the integer tables as named numpy arrays."""
    if model.tables is None:
        raise ValueError("export_tables() first")
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().numpy()
        if half and is_conv_kernel(name, value.ndim):
            value = value.astype(np.float16)  # conv kernels only: ≈ half the file
        arrays[name] = value
    for q, table in enumerate(model.tables):
        arrays[f"tables.{q}.offsets"] = table.offsets
        arrays[f"tables.{q}.lengths"] = table.lengths
        arrays[f"tables.{q}.frequencies"] = table.frequencies
    arrays["config"] = np.frombuffer(model.config.to_json().encode(), dtype=np.uint8)
    return arrays


@torch.no_grad()
def fill(state: dict[str, Tensor], arrays: dict[str, np.ndarray]) -> None:
    """Copy each array into the state-dict tensor of its name (shapes checked before).
    Into the parameter itself, converting as it copies: no fp32 copy of the file's fp16
    kernels on the side (a weights file with several pairs is ~45 MB of fp16)."""
    for name, tensor in state.items():
        tensor.copy_(torch.from_numpy(np.array(arrays[name])))


def from_arrays(arrays: dict[str, np.ndarray]) -> Codec:
    """Inverse of :func:`to_arrays`; raises ValueError on anything inconsistent."""
    config = read_config(arrays)
    model = Codec(dataclasses.replace(config, specialized=(), specialized_N=()))
    state = model.state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    # Check every own pair before anything is built from it: a config listing 255
    # specialized qualities of 1024 channels must bring 255 such pairs.
    own_shapes = {q: pair_shapes(config.pair_N(q), config.M) for q in config.specialized}
    for q, pair in own_shapes.items():
        shapes.update({f"own.q{q}.{name}": shape for name, shape in pair.items()})
    check_arrays(arrays, shapes)  # now: own pairs are filled later, when used
    fill(state, arrays)
    # The own pairs are built when a quality first runs through them (Codec.transforms),
    # or all at once by anything that reads every parameter (state_dict, parameters, to).
    model.config = config
    model.unbuilt = {q: {name: arrays[f"own.q{q}.{name}"] for name in pair} for q, pair in own_shapes.items()}
    model.tables = read_tables(arrays, config)
    return model.eval()
