"""The ``nic`` command line: all I/O and every exit code live here.

Exit codes: 0 success, 1 error (one line on stderr, no traceback), 2 usage error,
130 interrupted. Outputs are written to a temporary file beside the target and
renamed into place, so a failure or Ctrl-C never leaves a partial or clobbered file.
torch is imported only by the commands that run the model, so ``nic --help`` and
``nic info`` stay fast.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click

from . import __version__
from .container import DEFAULT_MAX_PIXELS, VERSION as FORMAT_VERSION


class NicError(click.ClickException):
    """An expected failure: printed as one line, exit code 1."""

    def show(self, file=None) -> None:
        click.echo(f"nic: error: {self.format_message()}", err=True)


def _domain_errors():
    from .container import FormatError
    from .images import ImageError
    from .weights import WeightsError

    return (FormatError, ImageError, WeightsError, ValueError)


def read_input(name: str, limit: int | None = None) -> bytes:
    """Bytes of a file, or of stdin for '-'."""
    try:
        if name == "-":
            if sys.stdin.isatty():
                raise NicError("refusing to read binary data from a terminal; pipe something in")
            return sys.stdin.buffer.read()
        path = Path(name)
        if path.is_dir():
            raise NicError(f"{name}: is a directory")
        return path.read_bytes()
    except FileNotFoundError:
        raise NicError(f"{name}: no such file") from None
    except PermissionError:
        raise NicError(f"{name}: permission denied") from None
    except OSError as exc:
        raise NicError(f"{name}: {exc.strerror or exc}") from None


def write_output(name: str, data: bytes) -> None:
    """Write all of ``data`` to a file atomically, or to stdout for '-'."""
    if name == "-":
        if sys.stdout.isatty():
            raise NicError("refusing to write binary data to a terminal; use -o FILE or a pipe")
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): not our error; stay quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        return
    path = Path(name)
    if path.is_dir():
        raise NicError(f"{name}: is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except FileNotFoundError:
        raise NicError(f"{name}: directory does not exist") from None
    except PermissionError:
        raise NicError(f"{name}: permission denied") from None
    except OSError as exc:
        raise NicError(f"{name}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_output(source: str, suffix: str) -> str:
    if source == "-":
        return "-"
    return str(Path(source).with_suffix(suffix))


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


threads_option = click.option("-j", "--threads", type=click.IntRange(1, 1024), default=None,
                              help="CPU threads for the transforms [default: all cores].")
weights_option = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                              help="Weights file to use instead of the installed ones.")
max_pixels_option = click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS,
                                 show_default=True, help="Refuse images with more pixels than this.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nic",
                      message=f"%(prog)s %(version)s (container format {FORMAT_VERSION})")
def cli() -> None:
    """nic: a learned image codec (Ballé et al. 2017).

    \b
      nic encode photo.png -q 4 -o photo.nic
      nic decode photo.nic -o photo.png
      cat a.png | nic encode - -o - | nic decode - -o - > b.png
    """


@cli.command()
@click.argument("input", metavar="IN")
@click.option("-o", "--output", metavar="OUT", default=None,
              help="Output .nic file, '-' for stdout [default: IN with .nic, stdout for '-'].")
@click.option("-q", "--quality", type=click.IntRange(1, 8), default=4, show_default=True,
              help="Quality 1..8: higher is larger and better.")
@click.option("--background", metavar="COLOUR", default=None,
              help="Flatten transparent input onto this colour (e.g. white, #808080).")
@threads_option
@weights_option
@max_pixels_option
@click.option("-v", "--verbose", is_flag=True, help="Print size, bpp and time on stderr.")
def encode(input: str, output: str | None, quality: int, background: str | None, threads: int | None,
           weights: str | None, max_pixels: int, verbose: bool) -> None:
    """Encode image IN (PNG, JPEG, WebP, TIFF, …; '-' for stdin) to .nic."""
    output = output or default_output(input, ".nic")
    started = time.perf_counter()
    data = read_input(input)
    try:
        from .images import read_image

        pixels = read_image(data, background=background, max_pixels=max_pixels)
        set_threads(threads)
        from .api import encode_pixels

        encoded = encode_pixels(pixels, quality, weights)
    except _domain_errors() as exc:
        raise NicError(f"{input}: {exc}") from None
    write_output(output, encoded)
    if verbose:
        h, w = pixels.shape[:2]
        seconds = time.perf_counter() - started
        stderr_console().print(f"{input} → {output}: {w}x{h}, quality {quality}, {len(encoded)} bytes, "
                               f"{8 * len(encoded) / (w * h):.4f} bpp, {seconds:.2f} s")


@cli.command()
@click.argument("input", metavar="IN")
@click.option("-o", "--output", metavar="OUT", default=None,
              help="Output image; the format follows the extension, PNG for '-' "
                   "[default: IN with .png, stdout for '-'].")
@threads_option
@weights_option
@max_pixels_option
@click.option("-v", "--verbose", is_flag=True, help="Print size, bpp and time on stderr.")
def decode(input: str, output: str | None, threads: int | None, weights: str | None, max_pixels: int,
           verbose: bool) -> None:
    """Decode .nic file IN ('-' for stdin) to an image."""
    output = output or default_output(input, ".png")
    started = time.perf_counter()
    data = read_input(input)
    try:
        from .images import output_format, write_image

        fmt = output_format(output)
        set_threads(threads)
        from .api import decode_pixels

        decoded = decode_pixels(data, weights, max_pixels)
        image_bytes = write_image(decoded.pixels, fmt)
    except _domain_errors() as exc:
        raise NicError(f"{input}: {exc}") from None
    write_output(output, image_bytes)
    if verbose:
        h = decoded.header
        seconds = time.perf_counter() - started
        stderr_console().print(f"{input} → {output}: {h.width}x{h.height}, quality {h.quality}, "
                               f"{len(data)} bytes, {8 * len(data) / (h.width * h.height):.4f} bpp, "
                               f"{seconds:.2f} s")


@cli.command()
@click.argument("file", metavar="FILE")
@max_pixels_option
def info(file: str, max_pixels: int) -> None:
    """Print the header fields of .nic FILE ('-' for stdin) and its bpp."""
    from .container import COLOUR_NAMES, FormatError, unpack

    data = read_input(file)
    try:
        parsed = unpack(data, max_pixels)
    except FormatError as exc:
        raise NicError(f"{file}: {exc}") from None
    h = parsed.header
    rows = [
        ("format version", str(h.version)),
        ("model id", str(h.model_id)),
        ("quality", str(h.quality)),
        ("size", f"{h.width}x{h.height}"),
        ("colour", COLOUR_NAMES[h.colour]),
        ("weights", h.weights_hash.hex()),
        ("latent shape", "x".join(map(str, h.latent_shape))),
        ("payload bytes", str(h.payload_length)),
        ("file bytes", str(len(data))),
        ("bpp", f"{8 * len(data) / (h.width * h.height):.4f}"),
    ]
    for kind, body in parsed.sections:
        rows.append((f"section {kind.decode()}", f"{len(body)} bytes (skipped)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run folder: checkpoint.pt, log.csv (resumed if it exists).")
@click.option("--minutes", type=float, default=None, help="Time budget (training time, summed over resumes).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Step budget (instead of --minutes).")
@click.option("--quality", "qualities", type=click.IntRange(1, 8), multiple=True,
              help="Train only these qualities [default: all].")
@click.option("--N", "N", type=click.IntRange(8), default=128, show_default=True, help="Hidden channels.")
@click.option("--M", "M", type=click.IntRange(8), default=192, show_default=True, help="Latent channels.")
@click.option("--patch", type=click.IntRange(16), default=128, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Initial learning rate (cosine decay).")
@click.option("--lr-final", type=float, default=1e-5, show_default=True)
@click.option("--init", type=click.Path(dir_okay=False), default=None, help="Start from these weights.")
@click.option("--finetune-decoder", is_flag=True,
              help="Freeze g_a and densities; train g_s on hard-rounded latents (distortion only).")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-every", type=click.IntRange(1), default=100, show_default=True, help="Steps per log line.")
@threads_option
def train(data, out, minutes, steps, qualities, N, M, patch, batch, lr, lr_final, init, finetune_decoder,
          bf16, channels_last, device, seed, log_every, threads) -> None:
    """Train (or resume) on the images under DATA folders (never on Kodak)."""
    from .train import TrainOptions, train as run_training

    if minutes is None and steps is None:
        raise click.UsageError("give --minutes or --steps")
    set_threads(threads)
    opts = TrainOptions(
        data=[Path(d) for d in data], out=Path(out), N=N, M=M, patch=patch, batch=batch, lr=lr,
        lr_final=lr_final, minutes=minutes, steps=steps, qualities=list(qualities) or None, seed=seed,
        bf16=bf16, channels_last=channels_last, device=device, init=Path(init) if init else None,
        finetune_decoder=finetune_decoder, log_every=log_every,
    )
    console = stderr_console()

    def report(row: dict) -> None:
        console.print(f"step {row['step']:>7}  {row['elapsed_s'] / 60:7.1f} min  loss {row['loss']:8.3f}  "
                      f"bpp {row['bpp']:.3f}  PSNR {row['psnr']:.2f}  lr {row['lr']}  "
                      f"{row['kpx_per_s']:.0f} kpx/s")

    try:
        path = run_training(opts, report)
    except ValueError as exc:
        raise NicError(str(exc)) from None
    console.print(f"checkpoint: {path}")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Weights file (.npz).")
@click.option("--half/--no-half", default=False, show_default=True, help="Store conv kernels as fp16.")
def export(checkpoint: str, output: str, half: bool) -> None:
    """Turn a training CHECKPOINT into a weights file with integer CDF tables."""
    from .train import export_checkpoint

    digest = export_checkpoint(Path(checkpoint), Path(output), half)
    click.echo(f"{output}: weights {digest.hex()}")


def main() -> None:
    try:
        cli.main(prog_name="nic", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("nic: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: still one line, unless debugging
        if os.environ.get("NIC_DEBUG"):
            raise
        click.echo(f"nic: internal error: {type(exc).__name__}: {exc} (NIC_DEBUG=1 shows where)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
