"""Fine-tune one quality of the hyperprior family end to end (issue 21's second step).

    python tools/joint_hyperprior.py ../shared/data/train --run runs/stage1 -q 4 --minutes 90

Starts from the transforms of ``--init`` (default: the installed factorized weights) and
quality Q's hyper-networks of ``RUN/qQ.pt`` (``tools/train_hyperprior.py``, the transforms
frozen), then trains, on image crops, Q's own g_a/g_s pair (a quality on the shared pair
gets its own copy first), Q's gain and inverse gain, h_a, h_s and Q's rows of the z
density, for loss = bpp + λ·255²·MSE with Q's λ. ẑ's rate is the usual noisy one; y's
is that of the rounded residuals round(y − μ), what the coder spends, with a
straight-through gradient (``--rate noisy``: y − μ plus uniform noise, which overstates
the cost of near-constant latents by up to ~0.3 bit each; trained on it, the real cost
went up: docs/results/hyperprior.md). g_s decodes round(y − μ) + μ, the integers the
coder sends.

Every ``--validate-minutes`` (and at the start and end) it codes the held-out photos
(``--holdout`` training images, each downscaled to Kodak's size) exactly as the coder would
with the float h_s: bits of round(y − μ) under the Gaussian tables' own density, ẑ's
bits by its density, PSNR of the 8-bit output, and prints them next to the factorized
family's on the same photos. The state (``RUN/qQ-joint.pt``: the pair, the gains, the
hyper-networks, the optimizer, the step) is saved every few minutes and on SIGTERM or SIGHUP;
running the same command again resumes. ``tools/hyperprior_quality.py`` and
``tools/train_hyperprior.py --export`` take the joint state when it exists.

    python tools/joint_hyperprior.py ../shared/data/kodak --run runs/stage1 -q 4 --report

prints the start and the joint state side by side on Kodak and the hard set.

    python tools/joint_hyperprior.py ../shared/data/train --run runs/joint --extend weights/new.npz

writes weights that extend the hyperprior weights the run started from (``--weights``,
default: the installed ones) with every quality the run has a joint state of, each
integerized on the run's held-out photos: a small file that names the earlier weights
by hash and holds only what those qualities changed (nic.weights, "extends").
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nic import factorized, hyperprior  # noqa: E402
from nic.quantization import TableRate  # noqa: E402
from nic.layers import bf16_is_fast  # noqa: E402
from nic.train import CropSampler, find_images, load_rgb, save_atomic, split_holdout  # noqa: E402
from nic.weights import default_weights  # noqa: E402

DENSITY_LR_SCALE = 5.0


def joint_path(run: Path, quality: int) -> Path:
    return run / f"q{quality}-joint.pt"


def with_own_pair(base: factorized.Codec, quality: int) -> factorized.Codec:
    """``base``, or a copy in which ``quality`` has its own pair (so that training it moves no other quality)."""
    if quality in base.config.specialized:
        return base
    return factorized.specialize(base, [quality])


def load_joint(model: hyperprior.Codec, quality: int, state: dict) -> None:
    """Put a joint state's pair, gains and hyper-networks into ``model`` (whose base has
    ``quality`` specialized: :func:`with_own_pair`)."""
    model.load_quality_state(quality, state["hyper"])
    if quality not in model.base.config.specialized:
        raise ValueError(f"quality {quality} has no own pair in this model")
    model.base.transforms(quality)  # builds the pair if it is still unbuilt arrays
    model.base.own[f"q{quality}"].load_state_dict(state["pair"])
    with torch.no_grad():
        model.base.gain[quality - 1] = state["gain"]
        model.base.inverse_gain[quality - 1] = state["inverse_gain"]


def load_run_quality(model: hyperprior.Codec, run: Path, quality: int) -> None:
    """Put quality Q of a run into ``model``: its end-to-end state (RUN/qQ-joint.pt; the
    model's base must give Q its own pair, :func:`with_own_pair`) where there is one,
    else stage 1's hyper-networks (RUN/qQ.pt)."""
    path = joint_path(run, quality)
    if path.exists():
        load_joint(model, quality, torch.load(path, weights_only=True))
    else:
        model.load_quality_state(quality, torch.load(run / f"q{quality}.pt", weights_only=True))


def shipped_start(weights: str | None, quality: int) -> hyperprior.Codec:
    """The hyperprior weights ``weights`` (default: the installed ones) made trainable
    (:func:`nic.hyperprior.trainable_again`: the float networks read back from the integer
    ones), with an own pair for ``quality``: where a run without stage-1 states starts."""
    model = hyperprior.trainable_again(default_weights(weights, "hyperprior")[0])
    model.base = with_own_pair(model.base, quality).build_all()
    return model


def joint_model(init: str | None, run: Path, quality: int, start: bool = False,
                weights: str | None = None) -> hyperprior.Codec:
    """The hyperprior model of ``run`` at ``quality``: the joint state if there is one (and
    not ``start``), else the start: stage 1's hyper-networks on the frozen transforms of
    ``init`` (with an own pair for Q) where RUN/qQ.pt exists, else the hyperprior weights
    ``weights`` (:func:`shipped_start`)."""
    path = joint_path(run, quality)
    joint = path.exists() and not start
    if not (run / f"q{quality}.pt").exists():
        model = shipped_start(weights, quality)
        if joint:
            load_joint(model, quality, torch.load(path, weights_only=True))
        return model
    base = with_own_pair(default_weights(init, "factorized")[0], quality).build_all()
    state = torch.load(path if joint else run / f"q{quality}.pt", weights_only=True)
    hyper = state["hyper"]["hyper"] if joint else state["hyper"]
    # The hyper-networks' widths, as stage 1 trained them (tools/train_hyperprior.py --hyper-N, --Z).
    config = hyperprior.Config(hyper_N=hyper["h_a.0.weight"].shape[0], Z=hyper["h_a.4.weight"].shape[0])
    model = hyperprior.Codec(base, config)
    if joint:
        load_joint(model, quality, state)
    else:
        model.load_quality_state(quality, state)
    return model


def calibration_images(data: list[Path], holdout: int) -> list[torch.Tensor]:
    """16 of the run's held-out photos (``holdout`` of ``data``), to measure activation
    ranges on when integerizing (:func:`exported`)."""
    held = split_holdout(find_images(data, ["kodak", "kodim"]), holdout)[1]
    return held_out_images(held[:16], 256)


def exported(model: hyperprior.Codec, quality: int, images: list[torch.Tensor]) -> hyperprior.Codec:
    """``model`` with quality Q's integer networks and tables made from its float ones
    alone (:meth:`Codec.export_quality`; context weights within ±127, as shipped), their
    activation ranges measured on ``images`` (:func:`calibration_images`)."""
    with torch.no_grad():
        y = torch.cat([model.base.analysis(x, quality)[..., :16, :16] for x in images])
    model.export_quality(quality, y, context_weight_max=127)
    return model


def extend(args: argparse.Namespace) -> None:
    """Write weights extending ``--weights`` with every quality of the run's joint states."""
    from nic.weights import installed, joined_arrays, save_weights

    earlier, earlier_hash = default_weights(args.weights, "hyperprior")
    path = Path(args.weights or installed("hyperprior"))
    if args.extend.resolve() == path.resolve():
        raise SystemExit(f"{args.extend} is the file it would extend: write elsewhere, then rename the earlier "
                         "file (docs/hyperprior.md, 'Shipping a quality trained further')")
    qualities = sorted(q for q in range(1, earlier.qualities + 1) if joint_path(args.run, q).exists())
    if not qualities:
        raise SystemExit(f"{args.run} has no joint state (qQ-joint.pt)")
    model = hyperprior.trainable_again(earlier)
    images = calibration_images(args.data, args.holdout)
    for q in qualities:
        if (args.run / f"q{q}.pt").exists():
            raise SystemExit(f"{args.run} started quality {q} from a stage-1 state, not from weights: "
                             "export it with tools/train_hyperprior.py --export")
        model.base = with_own_pair(model.base, q).build_all()
        load_joint(model, q, torch.load(joint_path(args.run, q), weights_only=True))
        exported(model.eval(), q, images)
    arrays = hyperprior.extension_arrays(model, qualities, joined_arrays(path), earlier_hash)
    digest = save_weights(arrays, args.extend)
    size = sum(value.nbytes for value in arrays.values())
    print(f"{args.extend}: weights {digest.hex()}, qualities {qualities}, {len(arrays)} arrays, "
          f"{size / 1e6:.1f} MB, extending {earlier_hash.hex()}")


def held_out_images(paths: list[Path], size: int = 512) -> list[torch.Tensor]:
    """Each held-out photo downscaled (antialiased) so that its short side is ``size``, then
    the centre ``size`` x 1.5·``size`` of it (Kodak's shape, and about its detail per pixel:
    full-resolution crops of large photos are far smoother than what is coded at this size)."""
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            if scale < 1:
                im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                               Image.Resampling.LANCZOS)
            img = np.asarray(im)
        limits = (size * 3 // 2, size) if img.shape[0] > img.shape[1] else (size, size * 3 // 2)  # portrait or not
        h, w = (max(16, min(limit, d) // 16 * 16) for limit, d in zip(limits, img.shape[:2]))
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        x = torch.from_numpy(np.array(img[top:top + h, left:left + w]))
        out.append(x.permute(2, 0, 1).unsqueeze(0).float() / 255.0)
    return out


def psnr_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    decoded = torch.round(x_hat.clamp(0, 1) * 255)
    mse = float(((decoded - torch.round(x * 255)) ** 2).mean())
    return 10 * math.log10(255**2 / max(mse, 1e-10))


@torch.no_grad()
def evaluate(model: hyperprior.Codec, quality: int, crops: list[torch.Tensor]) -> dict[str, float]:
    """Mean bpp (ẑ noisy by its density, ŷ exactly as coded with the float h_s), of which ẑ, and PSNR."""
    model.eval()
    bpp = z_bpp = quality_db = 0.0
    for x in crops:
        y = model.base.analysis(x, quality)
        z_bits, y_bits, y_hat = model.latent_bits(y, quality, rounded=True)
        pixels = x.shape[2] * x.shape[3]
        bpp += float(z_bits.sum() + y_bits.sum()) / pixels
        z_bpp += float(z_bits.sum()) / pixels
        quality_db += psnr_8bit(x, model.base.synthesis(y_hat, quality))
    model.train()
    n = len(crops)
    return {"bpp": bpp / n, "z": z_bpp / n, "psnr": quality_db / n}


@torch.no_grad()
def evaluate_factorized(base: factorized.Codec, quality: int, crops: list[torch.Tensor]) -> dict[str, float]:
    base.export_tables()
    rate = TableRate(base.tables[quality - 1])
    bpp = quality_db = 0.0
    for x in crops:
        y_hat = torch.round(base.analysis(x, quality))
        bpp += float(rate(y_hat[0]).sum()) / (x.shape[2] * x.shape[3])
        quality_db += psnr_8bit(x, base.synthesis(y_hat, quality))
    return {"bpp": bpp / len(crops), "psnr": quality_db / len(crops)}


def trained_parameters(model: hyperprior.Codec, quality: int) -> tuple[list, list]:
    """(parameters at the base learning rate, the z density's) that Q's training moves."""
    own = model.base.own[f"q{quality}"]
    params = [*own.parameters(), model.base.gain, model.base.inverse_gain, *model.hyper[quality - 1].parameters()]
    if model.config.has_context:
        params += list(model.context[quality - 1].parameters())
    return params, list(model.z_density.parameters())


def keep_rows(model: hyperprior.Codec, quality: int) -> None:
    """Zero every gradient outside quality Q's rows of the gains and the z density."""
    Z = model.config.Z
    for tensor, rows in ((model.base.gain, slice(quality - 1, quality)),
                         (model.base.inverse_gain, slice(quality - 1, quality)),
                         *((p, slice((quality - 1) * Z, quality * Z)) for p in model.z_density.parameters())):
        if tensor.grad is not None:
            keep = torch.zeros_like(tensor.grad)
            keep[rows] = tensor.grad[rows]
            tensor.grad = keep


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("-q", "--quality", type=int, default=None, help="the quality to train (not with --extend)")
    parser.add_argument("--init", default=None, help="factorized weights [default: installed]")
    parser.add_argument("--weights", default=None,
                        help="hyperprior weights to start from where RUN has no stage-1 state qQ.pt "
                             "[default: installed]")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="the transforms in bf16 autocast (auto: where the CPU has bf16 units)")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time of this whole schedule")
    parser.add_argument("--steps", type=int, default=None, help="the schedule's length in steps instead of minutes")
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-final", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=200,
                        help="steps over which the learning rate rises from 0 (Adam's first steps move "
                             "every parameter by about the learning rate, whatever its gradient)")
    parser.add_argument("--holdout", type=int, default=16)
    parser.add_argument("--validate-minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", type=float, default=0.0,
                        help="share of crops that are generated hard content (nic.hardset.random_crop; "
                             "not resumed exactly: a resumed run draws other ones)")
    parser.add_argument("--rate", choices=["rounded", "noisy"], default="rounded",
                        help="y's rate in training: of the rounded residuals (what the coder spends; "
                             "straight-through) or of the residuals with uniform noise")
    parser.add_argument("--extend", type=Path, default=None,
                        help="train nothing: write weights that extend --weights with every quality RUN "
                             "has a joint state of")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: print the start (RUN/qQ.pt) and the end-to-end state "
                             "(RUN/qQ-joint.pt) on every second image of DATA (the Kodak folder) and on "
                             "the hard set (nic.hardset), coded as the coder would with the float h_s")
    args = parser.parse_args()
    if (args.quality is None) == (args.extend is None):
        parser.error("give -q QUALITY, or --extend OUT without it")
    return args


REPORTED = ("text-black", "text-colour", "line-art", "screenshot", "photo-with-text", "page-with-photo",
            "gratings", "zone-plate")
"""The hard set's images :func:`report` codes (the flat ones cost nothing either way)."""


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(1, 3, h, w) in [0, 1] of (h, w, 1 or 3) 8-bit pixels, cropped to multiples of 16."""
    pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    h, w = pixels.shape[0] // 16 * 16, pixels.shape[1] // 16 * 16
    return torch.from_numpy(np.array(pixels[:h, :w, :3])).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def report(args: argparse.Namespace) -> None:
    """bpp, PSNR and J of a run's quality before and after its end-to-end training: every
    second image of DATA together (Kodak), and each image of the hard set."""
    from PIL import Image

    from nic import hardset

    kodak = [image_tensor(np.asarray(Image.open(path).convert("RGB")))
             for path in sorted(p for folder in args.data for p in folder.glob("*.png"))[::2]]
    hard = [image_tensor(image) for image in hardset.generate(list(REPORTED)).values()]
    q = args.quality
    print(f"{'state':<6} {'Kodak ' + str(len(kodak)) + ': bpp':>14} {'dB':>7} {'J':>7}  "
          + "  ".join(f"{name}: bpp / dB" for name in REPORTED))
    for label in ("start", "joint"):
        if label == "joint" and not joint_path(args.run, q).exists():
            break
        model = joint_model(args.init, args.run, q, start=label == "start", weights=args.weights)
        photos = evaluate(model, q, kodak)
        cells = [evaluate(model, q, [x]) for x in hard]
        print(f"{label:<6} {photos['bpp']:14.4f} {photos['psnr']:7.3f} "
              f"{j_of(photos, model.base.config.lambdas[q - 1]):7.4f}  "
              + "  ".join(f"{c['bpp']:.3f} / {c['psnr']:.2f}" for c in cells), flush=True)


def j_of(result: dict[str, float], lam: float) -> float:
    """J = bpp + λ·255²·MSE of a result's bpp and (mean) PSNR."""
    return result["bpp"] + lam * 255**2 * 10 ** (-result["psnr"] / 10)


class Run:
    """One quality's end-to-end training: the model, its optimizer, the data, the log and
    the state file (resumed if it exists)."""

    def __init__(self, args: argparse.Namespace):
        self.args, q = args, args.quality
        self.q = q
        torch.manual_seed(args.seed)
        self.model = joint_model(args.init, args.run, q, weights=args.weights).train()
        self.bf16 = bf16_is_fast("cpu") if args.bf16 == "auto" else args.bf16 == "on"
        self.lam = self.model.base.config.lambdas[q - 1]
        self.params, density = trained_parameters(self.model, q)
        for p in self.model.parameters():
            p.requires_grad = False
        for p in [*self.params, *density]:
            p.requires_grad = True
        self.optimizer = torch.optim.Adam([{"params": self.params, "scale": 1.0},
                                           {"params": density, "scale": DENSITY_LR_SCALE}], lr=args.lr)
        self.path = joint_path(args.run, q)
        self.step, self.elapsed = 0, 0.0
        if self.path.exists():
            state = torch.load(self.path, weights_only=True)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError:
                raise SystemExit(f"{self.path} was saved by an earlier version of this tool (other parameters "
                                 "train now): start a new run folder") from None
            self.step, self.elapsed = state["step"], state["elapsed"]
        files, held = split_holdout(find_images(args.data, ["kodak", "kodim"]), args.holdout)
        self.crops = held_out_images(held)
        self.sampler = CropSampler([load_rgb(p) for p in files], args.patch, random.Random(args.seed + self.step),
                                   args.synthetic)
        self.log_file = open(args.run / f"q{q}-joint.log", "a")

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        base, q = self.model.base, self.q
        save_atomic({"hyper": self.model.quality_state(q), "pair": base.own[f"q{q}"].state_dict(),
                     "gain": base.gain[q - 1].detach().clone(), "inverse_gain": base.inverse_gain[q - 1].detach().clone(),
                     "optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed}, self.path)

    def validate(self) -> None:
        result = evaluate(self.model, self.q, self.crops)
        self.log(f"q{self.q} step {self.step} ({self.elapsed / 60:.1f} min) held out: {result['bpp']:.4f} bpp "
                 f"(z {result['z']:.4f}), {result['psnr']:.3f} dB, J {j_of(result, self.lam):.4f}")

    def reference(self) -> None:
        """The factorized family's figures on the same held-out photos, and the start's."""
        result = evaluate_factorized(self.model.base, self.q, self.crops)
        self.log(f"q{self.q} factorized on the {len(self.crops)} held-out crops: {result['bpp']:.4f} bpp, "
                 f"{result['psnr']:.3f} dB, J {j_of(result, self.lam):.4f}")
        self.model.base.tables = None
        self.validate()

    def train_step(self, lr: float) -> tuple[float, float, float]:
        """One step at learning rate ``lr``: (loss, bpp, PSNR) of the batch."""
        args, model, q = self.args, self.model, self.q
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        x = self.sampler.batch(args.batch).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            y = model.base.analysis(x, q)
        z_bits, y_bits, y_hat = model.latent_bits(y.float(), q, rounded=args.rate == "rounded")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            x_tilde = model.base.synthesis(y_hat, q)
        x_tilde = x_tilde.float()
        bpp = (z_bits + y_bits) / (x.shape[2] * x.shape[3])
        mse = ((x_tilde - x) ** 2).mean(dim=(1, 2, 3))
        loss = (bpp + self.lam * 255**2 * mse).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        keep_rows(model, q)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.item(), bpp.mean().item(), float(10 * torch.log10(1 / mse.detach()).mean())

    def train(self) -> None:
        """Steps until the schedule ends (cosine from --lr to --lr-final over --steps or
        --minutes), saving every 5 minutes and validating every --validate-minutes."""
        args = self.args
        budget = args.minutes * 60
        last_save = last_validation = time.monotonic()
        sums, window = np.zeros(3), 0  # the steps since the last log line (fewer after a resume)
        while (self.step < args.steps) if args.steps else (self.elapsed < budget):
            fraction = self.step / args.steps if args.steps else self.elapsed / budget
            lr = args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * fraction))
            lr *= min(1.0, (self.step + 1) / (args.warmup + 1))
            started = time.monotonic()
            sums += self.train_step(lr)
            self.step += 1
            window += 1
            self.elapsed += time.monotonic() - started
            if self.step % 20 == 0:
                loss, bpp, db = sums / window
                self.log(f"q{self.q} step {self.step} loss {loss:.4f} bpp {bpp:.4f} "
                         f"psnr {db:.2f} lr {lr:.1e} {self.elapsed / self.step:.2f} s/step")
                sums[:], window = 0, 0
            if time.monotonic() - last_save > 300:
                self.save()
                last_save = time.monotonic()
            if time.monotonic() - last_validation > args.validate_minutes * 60:
                self.validate()
                last_validation = time.monotonic()


def main() -> None:
    args = parse_args()
    if args.report:
        report(args)
        return
    if args.extend is not None:
        extend(args)
        return
    run = Run(args)
    if run.step == 0:
        run.reference()
    for signum in (signal.SIGTERM, signal.SIGHUP):  # saved as on Ctrl-C (SIGHUP: unless nohup ignores it)
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run.train()
    except KeyboardInterrupt:
        pass
    finally:
        run.save()
    run.validate()


if __name__ == "__main__":
    main()
