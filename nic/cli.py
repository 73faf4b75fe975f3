"""The ``nic`` command line: all I/O and every exit code live here.

Exit codes: 0 success, 1 error (one line on stderr, no traceback), 2 usage error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 129 hung up (SIGHUP). Outputs are
written to a temporary file beside the target and renamed into place, so a failure,
Ctrl-C, SIGTERM or SIGHUP never leaves a partial or clobbered file.
torch is imported only by the commands that run the model, so ``nic --help`` and
``nic info`` stay fast.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, NoReturn

import click

from . import __version__
from .container import DEFAULT_MAX_PIXELS, SECTIONS_LIMIT, VERSIONS
from .families import DEFAULT as DEFAULT_FAMILY, NAMES as FAMILY_NAMES


class NicError(click.ClickException):
    """An expected failure: printed as one line, exit code 1."""

    def show(self, file=None) -> None:
        click.echo(f"nic: error: {self.format_message()}", err=True)


class Stopped(click.ClickException):
    """A signal that stopped the command: one line, and the shell's exit code for it
    (128 + the signal's number)."""

    def __init__(self, what: str, exit_code: int) -> None:
        super().__init__(what)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"nic: {self.message}", err=True)


def Interrupted() -> Stopped:  # noqa: N802 (raised like the exception it makes)
    """Ctrl-C (SIGINT): exit code 130."""
    return Stopped("interrupted", 130)


def TerminatedExit(signum: int = signal.SIGTERM) -> Stopped:  # noqa: N802
    """SIGTERM: exit code 143; SIGHUP (the terminal or the ssh session closed): 129."""
    return Stopped("terminated" if signum == signal.SIGTERM else "hung up", 128 + signum)


STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals whose default would kill nic outright: they raise Terminated instead."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so
    that every ``finally`` runs (a temporary output file is removed) before nic exits."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    for other in STOPPING_SIGNALS:  # a second one must not interrupt the clean-up
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


class NicGroup(click.Group):
    def invoke(self, ctx: click.Context):
        # click turns KeyboardInterrupt into a blank line, "Aborted!" and exit 1 before
        # main() could see it; converting it here keeps the one-line convention.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None
        except Terminated as exc:
            raise TerminatedExit(exc.signum) from None


def _domain_errors():
    from .container import FormatError
    from .images import ImageError
    from .weights import WeightsError

    return (FormatError, ImageError, WeightsError, ValueError)


IMAGE_INPUT_LIMIT = 1 << 30
"""Most bytes read from one input image (an uncompressed 178-megapixel RGB image is 534 MB)."""


def read_input(name: str, limit: int = IMAGE_INPUT_LIMIT, first: int | None = None,
               more: "callable | None" = None) -> bytes:
    """Bytes of a file, or of stdin for '-', read in chunks and never more than ``limit``.

    With ``first`` and ``more``, the first ``first`` bytes are read, then ``more(head)``
    gives the real limit (a .nic header says how long its file can be), so a stream of
    garbage is refused after a few bytes instead of after ``limit``."""
    if name == "-" and standard("input").isatty():
        raise NicError("refusing to read binary data from a terminal; pipe something in")
    with (open_input(name) if name != "-" else nullcontext(sys.stdin.buffer)) as stream:
        return read_stream(stream, name, limit, first, more)


def read_stream(stream, name: str, limit: int = IMAGE_INPUT_LIMIT, first: int | None = None,
                more: "callable | None" = None) -> bytes:
    """What :func:`read_input` reads, from a stream that is already open."""
    try:
        return _read_bounded(stream, name, limit, first, more)
    except OSError as exc:
        raise NicError(f"{name}: {exc.strerror or exc}") from None


def _read_bounded(stream, name: str, limit: int, first: int | None, more) -> bytes:
    data = bytearray()
    if first is not None:
        while len(data) < first:
            chunk = stream.read(first - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) < first:
            return bytes(data)
        limit = min(limit, more(bytes(data)))
    while len(data) <= limit:
        chunk = stream.read(min(1 << 22, limit + 1 - len(data)))
        if not chunk:
            return bytes(data)
        data += chunk
    raise NicError(f"{name}: input is larger than {limit} bytes")


def read_nic_input(name: str, max_pixels: int) -> bytes:
    """A .nic file's bytes, bounded by what its header declares."""
    from .container import HEADER_SIZE, FormatError, max_file_size, parse_header

    def limit(head: bytes) -> int:
        try:
            header = parse_header(head, max_pixels)
        except FormatError as exc:
            raise NicError(f"{name}: {exc}") from None
        return max_file_size(header)

    return read_input(name, IMAGE_INPUT_LIMIT + SECTIONS_LIMIT, HEADER_SIZE, limit)


def _write_error(name: str, exc: OSError) -> NicError:
    if isinstance(exc, PermissionError):
        return NicError(f"{name}: permission denied")
    return NicError(f"{name}: cannot write ({exc.strerror or exc})")


class _CountingStream:
    """Write-only wrapper that counts bytes (a pipe has no tell()) and names the output
    in its write errors (other errors of the work that feeds it keep their own names)."""

    def __init__(self, stream, name: str):
        self.stream = stream
        self.name = name
        self.written = 0

    def write(self, data) -> int:
        """Writes all of ``data``: a buffered stream may take only part of it and return
        the count without an error (stdout, when a pipe's reader goes away during the
        write), so the rest is written again, and the next write fails."""
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view.nbytes:
                taken = self.stream.write(view)
                if not taken:  # 0, or None from a non-blocking stream that took nothing
                    raise NicError(f"{self.name}: cannot write (the output takes no more bytes)")
                view = view[taken:]
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _write_error(self.name, exc) from None
        self.written += size
        return size


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail (and
    print a second error) on bytes still buffered for a broken or full output."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class PrintedOutput:
    """stdout for what a command prints (info's fields, bench's tables), as a text file
    whose write errors are the output's one-line NicError (a full disk behind ``> file``);
    a reader that went away stays BrokenPipeError (main(): a quiet exit 1)."""

    def _do(self, name: str, *args):
        try:
            return getattr(standard("output"), name)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            _detach_stdout()
            raise _write_error("-", exc) from None

    def write(self, text: str) -> int:
        return self._do("write", text)

    def flush(self) -> None:
        self._do("flush")

    def isatty(self) -> bool:
        return standard("output").isatty()

    def fileno(self) -> int:
        return standard("output").fileno()


def standard(which: str):
    """sys.stdin ("input") or sys.stdout ("output"), NicError where the process was
    started with it closed (``<&-``, ``>&-``: Python then has None for it)."""
    stream = sys.stdin if which == "input" else sys.stdout
    if stream is None:
        raise NicError(f"-: standard {which} is closed")
    return stream


@contextmanager
def atomic_output(name: str, exclusive: bool = False) -> Iterator[_CountingStream]:
    """A binary stream for an output file, or stdout for '-'.

    A file is written to a temporary file beside the target and renamed into place
    only when the block ends without an error, so a failure or Ctrl-C never leaves a
    partial or clobbered file (a symbolic link's target is the file replaced; a device
    or a named pipe is written in place). ``exclusive``: a file that appeared meanwhile
    is kept, and the output fails (the temporary file is linked, not renamed, into
    place: two processes cannot both find the name free)."""
    if name == "-":
        check_writable(name)  # not a terminal
        try:
            yield _CountingStream(sys.stdout.buffer, name)
            try:
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                raise
            except OSError as exc:  # e.g. a full disk behind `> file`: the output's error
                _detach_stdout()
                raise _write_error(name, exc) from None
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): not our error; stay quiet.
            _detach_stdout()
            sys.exit(1)
        return
    path = _output_path(name)
    if path is None:  # a device, a pipe or an open file's own name: written in place
        yield from _write_in_place(name)
        return
    folder = path.parent if str(path.parent) else Path(".")
    mode = _replaced_mode(path, name)
    tmp = None
    try:
        try:  # the name cut short: a 255-byte name is valid, and its temporary one must be too
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=folder)
        except FileNotFoundError as exc:
            if folder.is_dir():  # /proc: a folder where no file can be made
                raise _write_error(name, exc) from None
            raise NicError(f"{name}: directory does not exist") from None
        except OSError as exc:
            raise _write_error(name, exc) from None
        yield from _written(os.fdopen(fd, "wb"), name, sync=True)
        try:
            os.chmod(tmp, mode)
            if not exclusive or not _linked(tmp, path, name):
                os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(name, exc) from None
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def check_writable(name: str) -> None:
    """NicError, before any work, for what writing ``name`` would end in: binary data for
    a terminal, a folder that is not there or may not be written, a file that may not be
    replaced. (The write itself still reports what only it can find: a full disk.)"""
    if name == "-":
        if standard("output").isatty():
            raise NicError("refusing to write binary data to a terminal; use -o FILE or a pipe")
        return
    path = _output_path(name)
    if path is None:  # written in place: refused there too if it is this process's terminal
        fd = _descriptor(name)
        if fd is not None and _isatty(fd):
            raise NicError(f"{name}: refusing to write binary data to a terminal")
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise NicError(f"{name}: directory does not exist")
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise NicError(f"{name}: permission denied")
    _replaced_mode(path, name)


def _descriptor(name: str) -> int | None:
    """The descriptor of this process that an output name is (/dev/stdout: 1, /dev/fd/N,
    /proc/self/fd/N), or None."""
    for step in _link_chain(name):
        match = IN_PLACE.fullmatch(step)
        if match is None:
            continue
        if match["pid"] is not None and int(match["pid"]) != os.getpid():
            return None
        if match["named"]:
            return {"stdin": 0, "stdout": 1, "stderr": 2}[match["named"]]
        return int(match["fd"] if match["fd"] is not None else match["proc_fd"])
    return None


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _replaced_mode(path: Path, name: str) -> int:
    """The permissions of the file that will be at ``path``: those of the file it replaces,
    as writing into it would keep them (a private 600 file stays private), else the
    umask's. A file this process may not write is refused, as a shell's ``>`` refuses it,
    though the folder would let a rename replace it."""
    try:
        existing = os.stat(path)
    except OSError:
        return 0o666 & ~_umask()
    if not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise NicError(f"{name}: the file is not writable")
    return stat.S_IMODE(existing.st_mode) & 0o777


def _linked(tmp: str, path: Path, name: str) -> bool:
    """Link ``tmp`` at ``path`` where nothing is there (True, ``tmp`` removed), NicError
    where something is; False where the file system has no hard links (then nothing was
    there a moment ago, and a rename is left to do)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise NicError(f"{name}: already exists (made meanwhile); replace it with --force") from None
    except OSError:
        if os.path.lexists(path):
            raise NicError(f"{name}: already exists (made meanwhile); replace it with --force") from None
        return False
    os.unlink(tmp)
    return True


IN_PLACE = re.compile(r"/dev/(?P<named>stdin|stdout|stderr)|/dev/fd/(?P<fd>[0-9]+)"
                      r"|/proc/(?:self|thread-self|(?P<pid>[0-9]+))(?:/task/[0-9]+)?/fd/(?P<proc_fd>[0-9]+)")
"""Names of an open descriptor's file, written in place: /dev/stdout, /dev/fd/N (``>(…)``),
/proc/self/fd/N. Resolved, they name the file the descriptor holds, which a rename would
replace (and a redirection's ``>>`` would lose its earlier lines). Other names under
/dev (/dev/shm's files) are files like any."""


def _output_path(name: str) -> Path | None:
    """The file an output name writes: a symbolic link's target (the link stays), or
    None where the name is written in place (IN_PLACE, or an existing file that is not
    a regular one: a device, a named pipe). NicError for an empty name, a directory, a
    loop of links."""
    if not name:
        raise NicError("the output name is empty")
    if name.endswith(os.sep) or (os.altsep and name.endswith(os.altsep)):
        raise NicError(f"{name}: is a directory" if os.path.isdir(name) else f"{name}: no such directory")
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:  # not there yet, or a dangling link (its target is created)
        mode = None
    except OSError as exc:  # a loop of links, a path through a file, …
        raise _write_error(name, exc) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise NicError(f"{name}: is a directory")
    if _in_place(name, mode):
        return None
    return Path(os.path.realpath(name)) if os.path.islink(name) else Path(name)


def _in_place(name: str, mode: int | None) -> bool:
    """Whether an output name (of stat mode ``mode``, None where it is not there) is
    written in place: an open descriptor's name (IN_PLACE), or an existing file that is
    neither regular nor a folder (a device, a named pipe)."""
    return (any(IN_PLACE.fullmatch(step) for step in _link_chain(name))
            or (mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)))


def _link_chain(name: str, most: int = 40) -> Iterator[str]:
    """``name`` made absolute, then each name its symbolic links lead to, in turn."""
    current = os.path.abspath(name)
    for _ in range(most):
        yield current
        try:
            current = os.path.abspath(os.path.join(os.path.dirname(current), os.readlink(current)))
        except OSError:  # not a link (or not there): the end of the chain
            return


def _image_format(target: str, out_format: str, explicit: bool = False) -> str:
    """A decode's output format: its name's extension's, or ``--format``'s for stdout
    ('-'), for a name without an extension and for a device or a pipe (/dev/null, >(…)).
    ``explicit`` (--format given): a name whose extension says another format is a usage
    error, not silently the extension's."""
    from .images import OUTPUT_FORMATS, ImageError, output_format

    asked = OUTPUT_FORMATS["." + out_format]
    if target == "-":
        return asked
    if os.path.isdir(target):
        raise NicError(f"{target}: is a directory")
    try:
        found = output_format(target)
    except ImageError:
        try:
            mode = os.stat(target).st_mode
        except OSError:
            mode = None
        if _in_place(target, mode) or not os.path.splitext(os.path.basename(target))[1]:
            return asked
        raise
    if explicit and found != asked:
        raise click.UsageError(f"--format {out_format} asks for {asked}, and {target} names a {found} file")
    return found


def _gray_name(target: str, gray: bool, what: str) -> None:
    """NicError for colour pixels into a name that says gray (.pgm): Pillow would write a
    colour PPM under it."""
    if target.lower().endswith(".pgm") and not gray:
        raise NicError(f"{target}: a .pgm file is gray and {what} is in colour; name it .ppm or .pnm")


def _write_in_place(name: str) -> Iterator[_CountingStream]:
    """atomic_output for a device, a pipe or an open file: nothing to rename. Opened to
    append, so that a redirection's earlier bytes stay (``>> log``); a pipe without a
    reader blocks until one opens it, as with any program that writes to it."""
    try:
        stream = open(name, "ab")
    except OSError as exc:
        raise _write_error(name, exc) from None
    if stream.isatty():
        stream.close()
        raise NicError(f"{name}: refusing to write binary data to a terminal")
    yield from _written(stream, name, sync=False)


def _written(stream, name: str, sync: bool) -> Iterator[_CountingStream]:
    """Yield ``stream`` counted, then flush it (and fsync it with ``sync``) and close it.
    Only the output's own operations are its errors (an OSError of the work inside the
    block, e.g. reading the input, passes through), and a failed flush is said once:
    closing flushes what is left again."""
    done = False
    try:
        yield _CountingStream(stream, name)
        try:
            stream.flush()
            if sync:
                os.fsync(stream.fileno())
        except OSError as exc:
            raise _write_error(name, exc) from None
        done = True
    finally:
        try:
            stream.close()
        except OSError as exc:
            if done:
                raise _write_error(name, exc) from None


def write_output(name: str, parts: bytes | list, exclusive: bool = False) -> int:
    """Write bytes (or a list of buffers, in order) to a file atomically, or to stdout
    for '-'; returns the number of bytes written (``exclusive``: as atomic_output)."""
    with atomic_output(name, exclusive) as stream:
        for part in [parts] if isinstance(parts, (bytes, bytearray)) else parts:
            stream.write(part)
    return stream.written


def open_input(name: str):
    """An input file opened for binary reading, with nic's one-line errors."""
    if not name:
        raise NicError("the input name is empty")
    try:
        path = Path(name)
        if path.is_dir():
            raise NicError(f"{name}: is a directory")
        return open(path, "rb")
    except FileNotFoundError:
        raise NicError(f"{name}: no such file") from None
    except PermissionError:
        raise NicError(f"{name}: permission denied") from None
    except OSError as exc:
        raise NicError(f"{name}: {exc.strerror or exc}") from None


PROGRESS_PIXELS = 4_000_000
"""Images from this size on get a progress bar (on a terminal): over a second of work."""


@contextmanager
def image_progress(pixels: int, description: str, show: bool = True):
    """A tile progress callback drawing a rich bar on stderr, or None: never on a
    non-terminal stderr, never for small images, never inside a batch's own bar."""
    if not show or pixels < PROGRESS_PIXELS:  # before rich is imported: small images start fast
        yield None
        return
    console = stderr_console()
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_output(source: str, suffix: str) -> str:
    if source == "-":
        return "-"
    if not source:
        raise NicError("the input name is empty")
    if not Path(source).name:  # '.', '/': nothing to name an output after
        raise NicError(f"{source}: is a directory")
    if not _beside_ok(source):
        raise NicError(f"{source}: not a file to write an output beside; name the output with -o")
    return str(Path(source).with_suffix(suffix))


def _beside_ok(source: str) -> bool:
    """Whether an output may be named after ``source`` and put beside it: not for a pipe,
    a device or an open descriptor's name (/dev/stdin, /dev/fd/63 of ``<(…)``, which may
    even lead to a regular file: :func:`_in_place`), where the name beside it would be
    nonsense. A file that is not there passes: reading it says so."""
    try:
        mode = os.stat(source).st_mode
    except OSError:
        mode = None
    return not _in_place(source, mode)


def _same_file(a: str, b: str) -> bool:
    """Whether two names are one file (links, '.', '..' and hard links seen through)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there yet
        return os.path.realpath(a) == os.path.realpath(b)


def set_threads(threads: int | None) -> None:
    """Threads for the transforms: nic.engine's, and torch's if it runs."""
    if threads is None:
        return
    from .engine import set_threads as engine_threads

    engine_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch, if it is imported later
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


LOG_WIDTH = 160
"""Columns of rich's tables written to a file or a pipe (rich's own default there is 80,
which cut bench's codec names to 'factori…' in a log)."""


def stderr_console():
    from rich.console import Console

    # File names are printed as given: with markup on, 'a[bold]b.png' would lose its
    # brackets and 'no[/x].png' would raise MarkupError; ':fire:' would become an emoji.
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False,
                   width=None if sys.stderr is None or sys.stderr.isatty() else LOG_WIDTH)


threads_option = click.option("-j", "--threads", type=click.IntRange(1, 1024), default=None,
                              help="CPU threads for the transforms [default: all cores].")
weights_option = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                              help="Weights file to use instead of the installed ones.")
max_pixels_option = click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS,
                                 show_default=True, help="Refuse images with more pixels than this.")


def _colour(ctx, param, value: str | None) -> str | None:
    """--background checked when it is given, not when an image first needs it."""
    if value is not None:
        from .images import ImageError, background_colour

        try:
            background_colour(value)
        except ImageError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


background_option = click.option("--background", metavar="COLOUR", default=None, callback=_colour,
                                 help="Flatten transparent input onto this colour (e.g. white, #808080).")
force_option = click.option("-f", "--force", is_flag=True,
                            help="Replace an output beside IN that is already there (without -o or -d, "
                                 "nic does not replace a file).")


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


precision_option = click.option(
    "--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
    help="Arithmetic of the transforms: bf16 (needs PyTorch; ~3x faster on CPUs with AVX-512 BF16 or AMX), "
         "fp32, or auto: bf16 where the CPU has bf16 units, PyTorch is installed and the image is large enough "
         "to pay for loading it (3 MP). Files of every precision decode everywhere; efforts 2..4 search in fp32.")


def run_precision(precision: str, pixels: int) -> str:
    """The precision that runs ("fp32" or "bf16") for ``--precision`` and an image of
    ``pixels`` pixels; bf16's transforms keep freed memory for reuse (nic.precision)."""
    from .precision import choose, keep_freed_memory

    chosen = choose(precision, pixels)
    if chosen == "bf16":
        keep_freed_memory()
    return chosen


@click.group(cls=NicGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nic",
                      message=f"%(prog)s %(version)s (container formats {', '.join(map(str, VERSIONS))})")
def cli() -> None:
    """nic: a learned image codec (Ballé et al. 2017).

    \b
      nic encode photo.png -q 4 -o photo.nic
      nic decode photo.nic -o photo.png
      cat a.png | nic encode - -o - | nic decode - -o - > b.png
    """


SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
              "G": 1000**3, "GB": 1000**3, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """Bytes from '50KB', '1.5MB', '64KiB' or '20000' (K = 1000, Ki = 1024)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 50KB, 1.5MB, 64KiB or 20000", param_hint="'--size'")
    number = float(match.group(1)) * SIZE_UNITS[unit]
    if not math.isfinite(number):
        raise click.BadParameter(f"{text!r} is too large a size", param_hint="'--size'")
    size = int(number)
    if size < 1:
        raise click.BadParameter("the size must be at least 1 byte", param_hint="'--size'")
    return size


def plan_outputs(inputs: tuple[str, ...], output: str | None, out_dir: str | None, suffix: str
                 ) -> list[tuple[str, str]]:
    """(input, output) pairs; several inputs need -d DIR or go beside their sources."""
    if len(inputs) > 1:
        if output is not None:
            raise click.UsageError("-o names one output; with several inputs use -d DIR")
        if "-" in inputs:
            raise click.UsageError("'-' (stdin) can only be the sole input")
    if output is not None and out_dir is not None:
        raise click.UsageError("give -o or -d, not both")
    if out_dir == "":
        raise click.UsageError("-d names no folder")
    pairs = []
    for source in inputs:
        if out_dir is not None:
            if source == "-":
                raise click.UsageError("-d needs named inputs, not '-'")
            target = str(Path(out_dir) / (Path(source).stem + suffix))
        else:
            target = output if output is not None else default_output(source, suffix)
        pairs.append((source, target))
    seen: dict[str, str] = {}
    for source, target in pairs:
        if target != "-" and os.path.realpath(target) in seen:
            raise click.UsageError(f"{seen[os.path.realpath(target)]} and {source} would write the same output "
                                   f"file {target}")
        seen[os.path.realpath(target)] = source
    for source, target in pairs:
        if source != "-" and target != "-" and _same_file(source, target):
            raise NicError(f"{target}: would overwrite its own input {source}")
    return pairs


def _check_free(target: str, batch: bool) -> None:
    """NicError where an output beside its input (no -o, no -d) is already there: it is
    replaced only with --force, since a decode's default name is often the original
    image the .nic file was made from."""
    if target != "-" and os.path.lexists(target):
        other = "write into a folder with -d" if batch else "name the output with -o"
        raise NicError(f"{target}: already exists; {other}, or replace it with --force")


def run_jobs(pairs: list[tuple[str, str]], work, out_dir: str | None, verbose: bool,
             keep_existing: bool = False) -> None:
    """Run ``work(source, target, batch) -> (bytes in, bytes out, pixels, nic bytes, note)``
    on every pair; ``work`` reads its input and writes its output. With ``keep_existing``
    a pair whose output is already there fails (:func:`_check_free`) before any work.

    One input: an error is fatal (one line, exit 1). Several: every file is tried,
    with a progress bar on a terminal and a summary table (on a terminal, with -v, or
    where one failed); exit 1 if any failed."""
    if out_dir is not None:
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file, or a link to nowhere
            raise NicError(f"{out_dir}: not a directory") from None
        except OSError as exc:
            raise NicError(f"{out_dir}: cannot create directory ({exc.strerror or exc})") from None
    batch = len(pairs) > 1
    console = stderr_console() if batch or verbose else None  # rich only when it prints
    totals = {"files": 0, "failed": 0, "in": 0, "out": 0, "bits": 0, "pixels": 0}

    def one(source: str, target: str) -> None:
        started = time.perf_counter()
        if keep_existing:
            _check_free(target, batch)
        check_writable(target)
        try:
            with warnings.catch_warnings(record=True) as caught:  # one job at a time: named by its input
                warnings.simplefilter("always", UserWarning)
                size_in, size_out, pixels, nic_bytes, note = work(source, target, batch)
        except _domain_errors() as exc:
            raise NicError(f"{source}: {exc}") from None
        except OSError as exc:  # reading a streamed input failed midway
            raise NicError(f"{source}: {exc.strerror or exc}") from None
        finally:
            for warning in caught:
                line = f"nic: warning: {source}: {warning.message}"
                console.print(line, markup=False, highlight=False) if console else click.echo(line, err=True)
        totals["files"] += 1
        totals["in"] += size_in
        totals["out"] += size_out
        totals["bits"] += 8 * nic_bytes
        totals["pixels"] += pixels
        if verbose:
            console.print(f"{source} → {target}: {note}, {size_in} → {size_out} bytes, "
                          f"{8 * nic_bytes / pixels:.4f} bpp, {time.perf_counter() - started:.2f} s")

    if not batch:
        one(*pairs[0])
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # markup=False: the description is a file name (see stderr_console).
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("files", total=len(pairs))
        for source, target in pairs:
            progress.update(task, description=Path(source).name)
            try:
                one(source, target)
            except NicError as exc:
                totals["failed"] += 1
                console.print(f"nic: error: {exc.format_message()}")
            progress.advance(task)
    from rich.table import Table

    table = Table(title=None, show_header=True, header_style="bold")
    for column in ("coded", "failed", "bytes in", "bytes out", "bpp"):
        table.add_column(column, justify="right")
    # The batch's bits over its pixels: a mean per file would let a 1x1 image's 700 bpp dominate.
    bpp = f"{totals['bits'] / totals['pixels']:.4f}" if totals["pixels"] else "–"
    table.add_row(str(totals["files"]), str(totals["failed"]), str(totals["in"]), str(totals["out"]), bpp)
    if console.is_terminal or verbose or totals["failed"]:  # else quiet, as on success a cron job wants
        console.print(table)
    if totals["failed"]:
        sys.exit(1)


@cli.command()
@click.argument("inputs", metavar="IN...", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUT", default=None,
              help="Output .nic file, '-' for stdout [default: IN with .nic, stdout for '-'].")
@click.option("-d", "--out-dir", metavar="DIR", default=None,
              help="Write each IN's .nic into DIR (created if missing).")
@click.option("-q", "--quality", type=click.FloatRange(1, 255), default=None, callback=_finite,
              help="Quality 1..8 with the shipped weights (other weights may have more): "
                   "higher is larger and better. Between two (3.5) the hyperprior family codes with a "
                   "coarser step at effort 1; the factorized family, which cannot, at the quality below.  "
                   "[default: 4, or the weights' highest if lower]")
@click.option("--size", "target_size", metavar="SIZE", default=None,
              help="Pick the quality whose file is the largest not above SIZE (50KB, 1.5MB, 64KiB, 20000).")
@click.option("--bpp", "target_bpp", type=click.FloatRange(min=0, min_open=True), default=None, callback=_finite,
              help="Pick the quality whose file is the largest not above this many bits per pixel.")
@click.option("-e", "--effort", type=click.IntRange(1, 4), default=1, show_default=True,
              help="Encoder search: 1 rounds the latents; 2..4 choose them by distortion + λ·rate, 15-260x "
                   "slower (smaller files at the same quality: about 1 % on Kodak with the default, 2 % with "
                   "--model factorized) and compress pixels-family files (text, screenshots) harder. "
                   "Decoding is unchanged.")
@click.option("--model", "family", type=click.Choice(list(FAMILY_NAMES)), default=None,
              help=f"Model family to encode with [default: {DEFAULT_FAMILY}, or pixels where that file is worth "
                   "its bits: lower rate + λ·distortion, at most 1.5x the size]; 'pixels' codes the pixels themselves (no model; "
                   "lossless at -q 8). Decoding always follows the file.")
@background_option
@click.option("--strip", is_flag=True, help="Do not store the input's ICC profile and EXIF.")
@force_option
@threads_option
@weights_option
@max_pixels_option
@precision_option
@click.option("-v", "--verbose", is_flag=True,
              help="Print size, bpp, chosen quality, precision and time on stderr.")
def encode(inputs: tuple[str, ...], output: str | None, out_dir: str | None, quality: float | None,
           target_size: str | None, target_bpp: float | None, effort: int, family: str | None,
           background: str | None, strip: bool, force: bool, threads: int | None, weights: str | None,
           max_pixels: int, precision: str, verbose: bool) -> None:
    """Encode images IN... (PNG, JPEG, WebP, TIFF, …; '-' for stdin) to .nic."""
    if sum(x is not None for x in (quality, target_size, target_bpp)) > 1:
        raise click.UsageError("give one of -q, --size and --bpp")
    if quality is not None:
        _check_quality(quality, weights, family)
    if effort > 1 and quality is not None and quality != int(quality) and weights is None \
            and family in (None, DEFAULT_FAMILY):
        raise click.UsageError(f"a quality between the trained ones (-q {quality:g}) is coded at effort 1 only")
    max_bytes = parse_size(target_size) if target_size is not None else None
    pairs = plan_outputs(inputs, output, out_dir, ".nic")
    keep = output is None and out_dir is None and not force  # files beside the inputs stay

    def work(source: str, target: str, batch: bool):
        if source != "-" and effort == 1 and max_bytes is None and target_bpp is None:
            streamed, data = encode_streamed(source, target, batch)
            if streamed is not None:
                return streamed
        else:
            data = read_input(source)
        from .container import MAGIC
        from .images import read_image_with_metadata

        pixels, icc_profile, exif = read_image_with_metadata(data, background=background, max_pixels=max_pixels)
        if data[:len(MAGIC)] == MAGIC:  # decoded (the Pillow plugin): said once it has decoded
            warnings.warn("the input is a .nic file: its decoded pixels are coded again (where either coding is "
                          "lossy, a second generation of loss)")
        if strip:
            icc_profile = exif = None
        set_threads(threads)
        from .api import default_quality, encode_pixels, encode_to_target

        h, w = pixels.shape[:2]
        count = h * w
        arithmetic = run_precision(precision, count)
        if max_bytes is None and target_bpp is None:
            chosen = quality or default_quality(weights, family)
            with image_progress(count, f"encoding {Path(source).name}", not batch) as progress:
                result = encode_pixels(pixels, chosen, weights, icc_profile, exif, effort, progress, family,
                                       arithmetic)
            note = f"{_quality_note(result, chosen)}, effort {effort}"
        else:
            limit = max_bytes if max_bytes is not None else int(target_bpp * count / 8)
            result, chosen = encode_to_target(pixels, limit, weights, icc_profile, exif, effort, family, arithmetic)
            note = f"quality {chosen:g} chosen for ≤ {limit} bytes, effort {effort}"
            if len(result) > limit:
                note += " (not reached: even quality 1 is larger)"
            elif effort > 1 and chosen == int(chosen):
                note += " (above effort 1, only the trained qualities)"
        size = write_output(target, result, keep)
        return len(data), size, count, size, f"{note}, {arithmetic}{_coded_as([result])}, {w}x{h}"

    def encode_streamed(source: str, target: str, batch: bool):
        """(result, None) after encoding straight from the file, a strip of rows at a
        time (nic.streaming), or (None, the file's bytes) when the streaming readers do
        not take it. The file is opened once: a named pipe cannot be read twice."""
        from .streaming import open_rows

        with open_input(source) as stream:
            reader = open_rows(stream, background, max_pixels)
            if reader is None:
                return None, read_stream(stream, source)
            try:
                icc_profile, exif = (None, None) if strip else (reader.icc_profile, reader.exif)
                set_threads(threads)
                from .api import default_quality, encode_rows

                count = reader.width * reader.height
                arithmetic = run_precision(precision, count)
                chosen = quality or default_quality(weights, family)
                with image_progress(count, f"encoding {Path(source).name}", not batch) as progress:
                    parts = encode_rows(reader, chosen, weights, icc_profile, exif, progress, family=family,
                                        precision=arithmetic)
            finally:
                reader.close()
            size_in = os.fstat(stream.fileno()).st_size
        size = write_output(target, parts, keep)
        coded = _quality_note(_first_bytes(parts, 64), chosen)
        note = f"{coded}, effort {effort}, {arithmetic}{_coded_as(parts)}, {reader.width}x{reader.height}"
        return (size_in, size, count, size, note), None

    run_jobs(pairs, work, out_dir, verbose, keep_existing=keep)


@cli.command()
@click.argument("inputs", metavar="IN...", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUT", default=None,
              help="Output image; the format follows the extension, --format's for '-' "
                   "[default: IN with .png, stdout for '-'].")
@click.option("-d", "--out-dir", metavar="DIR", default=None,
              help="Write each IN's image into DIR (created if missing).")
@click.option("--format", "out_format", type=click.Choice(["png", "jpg", "webp", "tif", "bmp", "ppm"]),
              default="png", show_default=True,
              help="Image format with -d, a default output name, stdout ('-'), or an output named without "
                   "an extension (/dev/null, a pipe).")
@click.option("--strip", is_flag=True, help="Do not restore the ICC profile and EXIF stored in IN.")
@force_option
@threads_option
@weights_option
@max_pixels_option
@precision_option
@click.option("-v", "--verbose", is_flag=True, help="Print size, bpp, precision and time on stderr.")
def decode(inputs: tuple[str, ...], output: str | None, out_dir: str | None, out_format: str, strip: bool,
           force: bool, threads: int | None, weights: str | None, max_pixels: int, precision: str,
           verbose: bool) -> None:
    """Decode .nic files IN... ('-' for stdin) to images."""
    pairs = plan_outputs(inputs, output, out_dir, "." + out_format)
    keep = output is None and out_dir is None and not force  # files beside the inputs stay
    explicit = click.get_current_context().get_parameter_source("out_format") != click.core.ParameterSource.DEFAULT
    try:  # every output's format, before any work
        formats = {target: _image_format(target, out_format, explicit) for _, target in pairs}
    except _domain_errors() as exc:
        raise NicError(str(exc)) from None

    def work(source: str, target: str, batch: bool):
        from .container import COLOUR_GRAY, SECTION_STEP, parse_header, unpack, unpack_step
        from .images import SIDE_LIMITS, write_image
        from .streaming import STREAMED_FORMATS, row_writer

        data = read_nic_input(source, max_pixels)
        fmt = formats[target]
        set_threads(threads)
        from .api import decode_pixels, decode_rows

        h = parse_header(data, max_pixels)
        _gray_name(target, h.colour == COLOUR_GRAY, "the image")
        side = SIDE_LIMITS.get(fmt)
        if side is not None and max(h.width, h.height) > side:  # said now, not after the decode
            raise NicError(f"{target}: {fmt} holds at most {side} pixels a side, the image is {h.width}x{h.height}; "
                           "use .png or .tif")
        arithmetic = run_precision(precision, h.width * h.height)
        note = ""
        if verbose:  # the STEP section of a quality between two: the sections parsed for it
            step = dict(unpack(data, max_pixels).sections).get(SECTION_STEP)
            note = (f"{h.width}x{h.height}, quality "
                    f"{_stored_quality(h.quality, None if step is None else unpack_step(step))}, {arithmetic}")
        with image_progress(h.width * h.height, f"decoding {Path(source).name}", not batch) as progress:
            with atomic_output(target, keep) as stream:
                writers = []

                def open_sink(header, icc_profile, exif):
                    if strip:
                        icc_profile = exif = None
                    channels = 1 if header.colour == COLOUR_GRAY else 3
                    writers.append(row_writer(fmt, stream, header.width, header.height, channels,
                                              icc_profile, exif))
                    return writers[0].write

                if fmt in STREAMED_FORMATS:
                    decode_rows(data, open_sink, weights, max_pixels, progress, precision=arithmetic)
                    writers[0].close()
                else:  # Pillow writes these formats from a whole image
                    decoded = decode_pixels(data, weights, max_pixels, progress, arithmetic)
                    icc_profile, exif = (None, None) if strip else (decoded.icc_profile, decoded.exif)
                    stream.write(write_image(decoded.pixels, fmt, icc_profile, exif))
        return len(data), stream.written, h.width * h.height, len(data), note

    run_jobs(pairs, work, out_dir, verbose, keep_existing=keep)


@cli.command()
@click.argument("image", metavar="IMAGE")
@click.option("-o", "--output", metavar="OUT.png", required=True,
              help="The sheet, in its extension's format (PNG, JPEG at quality 95, …; PNG for '-', a name "
                   "without an extension, a device or a pipe).")
@click.option("--size", "target_size", metavar="SIZE", default=None,
              help="Byte budget of every codec's file, e.g. 20KB.")
@click.option("--bpp", "target_bpp", type=click.FloatRange(min=0, min_open=True), default=None, callback=_finite,
              help="Budget in bits per pixel instead of --size.")
@click.option("--crop", metavar="X,Y,W,H", default=None,
              help="The region shown [default: the most detailed 192x128 window].")
@click.option("--scale", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Enlargement of the crop (nearest neighbour, no smoothing).")
@click.option("--codecs", default="jpeg,webp,jpeg2000,avif", show_default=True,
              help="Pillow codecs to show next to nic ('none' for nic alone).")
@click.option("--model", "family", type=click.Choice(list(FAMILY_NAMES)), default=None,
              help=f"Model family [default: as nic encode, {DEFAULT_FAMILY} or pixels, whichever file is "
                   "worth its bits].")
@background_option
@threads_option
@weights_option
@max_pixels_option
def compare(image: str, output: str, target_size: str | None, target_bpp: float | None, crop: str | None,
            scale: int, codecs: str, family: str | None, background: str | None, threads: int | None,
            weights: str | None, max_pixels: int) -> None:
    """Write a sheet of IMAGE as nic and the other codecs code it at the same file size."""
    if (target_size is None) == (target_bpp is None):
        raise click.UsageError("give one of --size and --bpp")
    if image != "-" and output != "-" and _same_file(image, output):
        raise NicError(f"{output}: the sheet would overwrite its own input {image}")
    from .images import read_image, write_image

    try:
        fmt = _image_format(output, "png")  # a device, a pipe or stdout: PNG
        _gray_name(output, False, "the sheet")
    except _domain_errors() as exc:
        raise NicError(str(exc)) from None
    try:
        pixels = read_image(read_input(image), background=background, max_pixels=max_pixels)
    except _domain_errors() as exc:
        raise NicError(f"{image}: {exc}") from None
    height, width = pixels.shape[:2]
    budget = parse_size(target_size) if target_size is not None else int(target_bpp * width * height / 8)
    if budget < 1:
        raise NicError(f"a budget of {budget} bytes is too small for a {width}x{height} image")
    set_threads(threads)
    from .bench import parse_codecs
    from .compare import detailed_crop, panels, sheet, sheet_size

    region = parse_crop(crop, width, height) if crop is not None else detailed_crop(pixels, 192, 128)
    try:
        most = 2 + len(parse_codecs(codecs))  # the original, nic and every codec asked for
    except ValueError as exc:
        raise NicError(str(exc)) from None
    sheet_width, sheet_height = sheet_size(most, region, scale)
    if sheet_width * sheet_height > max_pixels:  # before any codec runs
        raise NicError(f"the sheet would have up to {sheet_width}x{sheet_height} pixels, more than the limit of "
                       f"{max_pixels}; "
                       "give a smaller --crop or --scale (or raise --max-pixels)")
    try:
        shown, skipped = panels(pixels, budget, codecs, weights, family)
    except _domain_errors() as exc:
        raise NicError(str(exc)) from None
    for line in skipped:
        click.echo(f"nic: {line}: not shown", err=True)
    if len(shown[1].data) > budget:  # nic's panel is what the sheet is for: shown, and said
        click.echo(f"nic: nic's smallest file ({len(shown[1].data)} bytes) is over the budget of {budget} bytes",
                   err=True)
    import numpy as np

    write_output(output, write_image(np.asarray(sheet(shown, region, scale).convert("RGB")), fmt))


def parse_crop(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) from 'X,Y,W,H', inside the image; a usage error for another form,
    NicError for a region outside the image."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"takes X,Y,W,H in pixels, not {text!r}", param_hint="--crop") from None
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > width or y + h > height:
        raise NicError(f"--crop {text} is not inside the {width}x{height} image")
    return x, y, w, h


@cli.command()
@click.argument("file", metavar="FILE")
@max_pixels_option
def info(file: str, max_pixels: int) -> None:
    """Print the header fields of .nic FILE ('-' for stdin) and its bpp."""
    from .container import (COLOUR_NAMES, SECTION_EXIF, SECTION_GRAY_RGB, SECTION_ICC, SECTION_STEP, FormatError, unpack,
                            unpack_step)
    from .families import name_of

    standard("output")  # what it is for
    data = read_nic_input(file, max_pixels)
    try:
        parsed = unpack(data, max_pixels)
        substreams = parsed.substreams()
        step = dict(parsed.sections).get(SECTION_STEP)
        step = None if step is None else unpack_step(step)
        h = parsed.header
        weights = (_pixel_rows(substreams) if name_of(h.model_id) == "pixels"
                   else [("weights", h.weights_hash.hex()), *_overlay_rows(substreams, h)])
    except FormatError as exc:
        raise NicError(f"{file}: {exc}") from None
    rows = [
        ("format version", str(h.version)),
        ("model id", f"{h.model_id} ({name_of(h.model_id)})"),
        ("quality", _stored_quality(h.quality, step)),
        ("size", f"{h.width}x{h.height}"),
        ("colour", COLOUR_NAMES[h.colour] + (" (of an all-gray RGB image: decodes to RGB)"
                                             if SECTION_GRAY_RGB in dict(parsed.sections) else "")),
        *weights,
        ("latent shape", "x".join(map(str, h.latent_shape))),
        ("payload bytes", str(h.payload_length)),
        *((f"substream {s.name.decode()}", f"{'x'.join(map(str, s.shape))}, {len(s.data)} bytes")
          for s in substreams),
        ("file bytes", str(len(data))),
        ("bpp", f"{8 * len(data) / (h.width * h.height):.4f}"),
    ]
    metadata = {SECTION_ICC: "the ICC profile, restored on decode", SECTION_EXIF: "the EXIF, restored on decode"}
    for kind, body in parsed.sections:
        if kind not in (SECTION_GRAY_RGB, SECTION_STEP):
            what = metadata.get(kind, "unknown to this nic, skipped when decoding")
            rows.append((f"section {kind.decode(errors='replace')}", f"{len(body)} bytes ({what})"))
    width = max(len(k) for k, _ in rows)
    printed = PrintedOutput()
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}", file=printed)


def _check_quality(quality: float, weights: str | None, family: str | None) -> None:
    """-q above the weights' highest quality: a usage error before any input is read
    (once, not once an input). The weights are loaded here for it (cached for the work)."""
    from .families import name_of
    from .weights import WeightsError, default_weights

    try:
        model, _ = default_weights(weights, family, coding=True)
    except WeightsError as exc:
        raise NicError(str(exc)) from None
    if quality > model.qualities:
        raise click.BadParameter(f"{quality:g} is above {model.qualities}, the highest quality of the "
                                 f"{name_of(model.config.model_id)} model", param_hint="'-q' / '--quality'")


def _stored_quality(quality: int, step: tuple[int, int] | None) -> str:
    """A file's quality as ``nic info`` and ``decode -v`` say it: the trained quality, or
    its networks with the STEP section's step (a quality between two trained ones)."""
    if step is None:
        return str(quality)
    return (f"{quality}'s networks, step {step[0] / 256:.3f}"
            + (f" (a quality between {quality - 1} and {quality})" if step[0] > 256 else ""))


def _first_bytes(parts, count: int) -> bytes:
    """The first ``count`` bytes of a file given as a list of buffers."""
    head = bytearray()
    for part in parts:
        head += memoryview(part).cast("B")[:count - len(head)]
        if len(head) >= count:
            break
    return bytes(head)


def _quality_note(data: bytes, asked: float) -> str:
    """``-v``'s quality: the one asked for, or the trained one the file holds where its
    family has no steps between qualities (the factorized family codes 3.5 as 3)."""
    from .container import HEADER_SIZE, parse_header
    from .families import name_of

    if asked == int(asked):
        return f"quality {asked:g}"
    header = parse_header(bytes(data[:HEADER_SIZE]), max_pixels=1 << 62)
    if name_of(header.model_id) == "hyperprior":
        from .container import UNIT_STEP
        from .hyperprior import step_for

        # A step between the two trained qualities (STEP), unless it rounds to none.
        stepped = step_for(asked, header.weights_hash)[1] != UNIT_STEP
        return f"quality {asked:g}" if stepped else f"quality {header.quality}"
    return f"quality {header.quality} ({asked:g} asked: {name_of(header.model_id)} files hold trained qualities)"


def _coded_as(parts) -> str:
    """``-v``'s note on a file where the default chose the pixels family, or pixel tiles
    over the model's (nic.overlay), from the file's first bytes (``parts``: its buffers,
    of which only the first bytes are read)."""
    from .container import HEADER_SIZE, parse_header
    from .families import name_of
    from .overlay import HEAD_BYTES, has_tiles

    head = _first_bytes(parts, HEAD_BYTES)
    header = parse_header(bytes(head[:HEADER_SIZE]), max_pixels=1 << 62)
    if name_of(header.model_id) == "pixels":
        return ", coded as pixels (no model)"
    return ", with pixel tiles over the model's" if has_tiles(bytes(head)) else ""


def _overlay_rows(substreams, header) -> list[tuple[str, str]]:
    """``nic info``'s line on pixel tiles over the model's (nic.overlay, whose table this
    reads without numpy), if the file has them."""
    if [s.name for s in substreams[:3]] != [b"tmap", b"pset", b"pixl"] or not substreams[1].data:
        return []
    tiles = -(-header.height // 64) * -(-header.width // 64)
    chosen = sum(bin(byte).count("1") for byte in substreams[0].data)
    pset = substreams[1].data  # the step first, or after EXTENDED (0) and the predictor: nic.pixels.parameters_in
    step = pset[2] if pset[0] == 0 and len(pset) > 2 else pset[0]
    return [("pixel tiles", f"{chosen} of {tiles} (64x64), step {step}")]


def _pixel_rows(substreams) -> list[tuple[str, str]]:
    """``nic info``'s lines on a pixels file: no weights, its step and its predictor."""
    from .pixels import GRADIENT, INTERLEAVED, PLANES, parameters_in

    step, predictor, _ = parameters_in(substreams)
    coding = {GRADIENT: ("pixel predictor", "gradient"), INTERLEAVED: ("pixel coding", "dictionary (LZMA2), interleaved"),
              PLANES: ("pixel coding", "dictionary (LZMA2), plane by plane")}
    return [("weights", "none (the pixels family has no model)"),
            ("pixel step", f"{step} (lossless)" if step == 1 else f"{step} (every pixel within ±{step // 2})"),
            coding.get(predictor, ("pixel predictor", "median (the first version's)"))]


def check_device(device: str) -> None:
    """Usage error for a device name other than cpu, cuda and cuda:N; NicError for CUDA
    where this PyTorch has none."""
    import re

    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise click.BadParameter(f"{device!r} is not cpu, cuda or cuda:N", param_hint="--device")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise NicError(f"--device {device}: this PyTorch has no CUDA device to use (torch {torch.__version__})")
        number = int(device.partition(":")[2] or 0)
        if number >= torch.cuda.device_count():
            raise NicError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0 on)")


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run folder: checkpoint.pt, log.csv (resumed if it exists).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None, callback=_finite,
              help="Time budget (training time, summed over resumes).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Step budget (instead of --minutes).")
@click.option("--quality", "qualities", type=click.IntRange(1, 255), multiple=True,
              help="Train only these qualities [default: all].")
@click.option("--lambda", "lambdas", type=click.FloatRange(0, 1e6, min_open=True, max_open=True), multiple=True,
              help="A new model's rate-distortion λ, one per quality, lowest first (repeatable) "
                   "[default: 8 qualities, λ 0.0018 … 0.18]; with --specialize, a new λ for each --quality.")
@click.option("--N", "N", type=click.IntRange(8), default=None, show_default="128",
              help="Hidden channels of a new model (a resumed run keeps its own).")
@click.option("--M", "M", type=click.IntRange(8), default=None, show_default="192",
              help="Latent channels of a new model (a resumed run keeps its own).")
@click.option("--patch", type=click.IntRange(16), default=128, show_default=True,
              help="Side of the square training crops, in pixels.")
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True, help="Crops per step.")
@click.option("--synthetic", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of crops that are generated hard content (text, line art, gratings, flat areas) "
                   "instead of photos.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True, callback=_finite,
              help="Initial learning rate (cosine decay).")
@click.option("--lr-final", type=click.FloatRange(min=0), default=1e-5, show_default=True, callback=_finite,
              help="Learning rate at the end of the budget.")
@click.option("--init", type=click.Path(dir_okay=False), default=None, help="Start from these weights.")
@click.option("--finetune-decoder", is_flag=True,
              help="Freeze g_a and densities; train g_s on hard-rounded latents (distortion only).")
@click.option("--mixed", is_flag=True,
              help="g_s learns from the rounded latents (straight-through gradient into g_a) while the rate "
                   "is learned on noisy ones (Minnen and Singh 2020), instead of noisy latents for both.")
@click.option("--finetune-effort", type=click.IntRange(1, 4), default=1, show_default=True,
              help="With --finetune-decoder: learn from the latents that encoder effort picks "
                   "(2..4 run nic encode's search on every crop: several times slower).")
@click.option("--specialize", is_flag=True,
              help="With --init and --quality: give those qualities a g_a/g_s pair of their own "
                   "(a copy of the shared one) and train only them; the other qualities stay as they are.")
@click.option("--own-N", "own_N", type=click.IntRange(8, 1024), default=None,
              help="With --specialize: give those pairs this many hidden channels (at least what they have; "
                   "the added channels start out changing nothing).")
@click.option("--bf16/--no-bf16", default=None,
              help="bf16 autocast [default: where the CPU has bf16 instructions (AVX-512 BF16, AMX) or on CUDA; "
                   "elsewhere bf16 is emulated, 10-25x slower than fp32].")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="NHWC (channels-last) tensors: faster with and without bf16.")
@click.option("--compile", "compiled", is_flag=True,
              help="torch.compile the network (needs a C++ compiler; compiling takes the first ~20 s).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed for the initial weights, the crops and the quality order.")
@click.option("--log-every", type=click.IntRange(1), default=100, show_default=True, help="Steps per log line.")
@click.option("--holdout", type=click.IntRange(0), default=0, show_default=True,
              help="Set aside this many DATA images for validation (real bpp and PSNR, validation.csv).")
@click.option("--validate", "validation", multiple=True, type=click.Path(exists=True),
              help="A folder (or file) of images to validate on as well, never trained on (repeatable).")
@click.option("--validate-minutes", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Minutes between validations.")
@threads_option
def train(data, out, minutes, steps, qualities, lambdas, N, M, patch, batch, synthetic, lr, lr_final, init,
          finetune_decoder, mixed, finetune_effort, specialize, own_N, bf16, channels_last, compiled, device, seed,
          log_every, holdout, validation, validate_minutes, threads) -> None:
    """Train (or resume) on the images under DATA folders (never on Kodak)."""
    from .train import (CHECKPOINT_NAME, TrainOptions, bf16_is_fast, checked_lambdas, checked_own_N,
                        train as run_training)

    if minutes is None and steps is None:
        raise click.UsageError("give --minutes or --steps")
    try:
        checked_lambdas(list(lambdas), init, specialize)  # train() checks again; here a misuse exits 2
        checked_own_N(own_N, specialize)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    check_device(device)
    if compiled and device == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise NicError("--compile needs a C++ compiler (g++ or clang++; or set CXX); train without it")
    set_threads(threads)
    opts = TrainOptions(
        data=[Path(d) for d in data], out=Path(out), N=N, M=M, patch=patch, batch=batch, synthetic=synthetic,
        lr=lr, lr_final=lr_final, minutes=minutes, steps=steps,
        qualities=list(qualities) or None, seed=seed, lambdas=list(lambdas) or None,
        bf16=bf16, channels_last=channels_last, compile=compiled, device=device, init=Path(init) if init else None,
        finetune_decoder=finetune_decoder, mixed=mixed, finetune_effort=finetune_effort, specialize=specialize,
        own_N=own_N, log_every=log_every, holdout=holdout, validation=[Path(v) for v in validation],
        validate_minutes=validate_minutes,
    )
    console = stderr_console()
    if bf16 is None:
        console.print("bf16 autocast (this CPU has bf16 instructions)" if bf16_is_fast(device) else
                      "fp32 (no bf16 instructions here: emulated bf16 is far slower; --bf16 forces it)")

    def report(row: dict) -> None:
        console.print(f"step {row['step']:>7}  {row['elapsed_s'] / 60:7.1f} min  loss {row['loss']:8.3f}  "
                      f"bpp {row['bpp']:.3f}  PSNR {row['psnr']:.2f}  lr {row['lr']}  "
                      f"{row['kpx_per_s']:.0f} kpx/s")

    def report_validation(step: int, rows: list[dict]) -> None:
        console.print(f"validation at step {step}: " + ", ".join(
            f"q{r['quality']} {r['bpp']:.3f} bpp {r['psnr']:.2f} dB" for r in rows))

    made = []  # the folders the run would make: OUT and its missing parents, deepest first
    folder = Path(out)
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)
        folder = folder.parent

    def forget_empty_run() -> None:  # a run stopped before it saved anything leaves no folder
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                if os.path.lexists(folder):  # not empty: it and its parents stay
                    return

    try:
        path = run_training(opts, report, report_validation)
    except ValueError as exc:
        forget_empty_run()
        raise NicError(str(exc)) from None
    except OSError as exc:  # the run folder or a data file: named by the error
        forget_empty_run()
        raise NicError(f"{exc.filename or out}: {exc.strerror or exc}") from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or nic.train.Stopped by SIGTERM, SIGHUP: 128 + the signal
        saved = (Path(out) / CHECKPOINT_NAME).exists()
        if not saved:
            forget_empty_run()
        try:  # (after a SIGHUP the terminal may be gone)
            console.print(f"stopped; checkpoint saved in {out}, run the same command to resume" if saved
                          else "stopped before the first checkpoint: nothing saved")
        except OSError:
            pass
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
    console.print(f"checkpoint: {path}")


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Weights file (.npz).")
@click.option("--half/--no-half", default=False, show_default=True, help="Store conv kernels as fp16.")
def export(checkpoint: str, output: str, half: bool) -> None:
    """Turn a training CHECKPOINT into a weights file with integer CDF tables."""
    from .train import export_checkpoint

    target = _output_path(output)  # a link's target; NicError for '', a folder, a loop of links
    if target is None:
        raise NicError(f"{output}: weights are written to a file (with a .digest file beside it), not here")
    if _same_file(checkpoint, output):
        raise NicError("the weights would overwrite the checkpoint")
    if not target.parent.is_dir():
        raise NicError(f"{output}: directory does not exist")
    try:
        digest = export_checkpoint(Path(checkpoint), target, half)
    except ValueError as exc:
        raise NicError(str(exc)) from None
    except OSError as exc:
        raise _write_error(output, exc) from None
    click.echo(f"{output}: weights {digest.hex()}")


@cli.command()
@click.argument("folder", metavar="DIR", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("-q", "--quality", "qualities", metavar="LIST", default=None,
              help="nic qualities, e.g. 1,4,8 or 2-5 [default: all; --speed: the middle one].")
@click.option("--codecs", default="jpeg,webp,jpeg2000,avif", show_default=True,
              help="Pillow baselines to compare with ('none' for nic only).")
@click.option("--json", "json_out", metavar="OUT", default=None, help="Write every per-image figure as JSON.")
@click.option("--plot", "plot_out", metavar="OUT.png", default=None, help="Write the PSNR-vs-bpp plot as PNG.")
@click.option("--report", "report_dir", metavar="OUT", default=None,
              help="Write a folder to open in a browser: index.html with the tables, the RD plot, the JSON "
                   "and nic compare's sheets of three images at 0.25, 0.5 and 1 bpp.")
@click.option("--speed", is_flag=True,
              help="Time encode/decode (median ms, MP/s) instead of the RD sweep; without --model and --weights, "
                   "the default is timed beside --model factorized on each image, and their ratio printed.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N images.")
@click.option("--compare", metavar="JSON", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An earlier --json report whose nic curve is one more BD-rate reference (repeatable).")
@click.option("-e", "--effort", type=click.IntRange(1, 4), default=1, show_default=True,
              help="nic's encoder effort (as in nic encode).")
@click.option("--model", "family", type=click.Choice(list(FAMILY_NAMES)), default=None,
              help=f"Model family to measure [default: as nic encode, {DEFAULT_FAMILY} or pixels, whichever "
                   "file is worth its bits].")
@click.option("--hard", is_flag=True,
              help="Instead of DIR, the generated hard-content set (text, line art, gratings, flat areas): "
                   "nic's bpp and PSNR, its transforms' ceiling, and each codec's PSNR at the same bytes "
                   "[default -q 4,8].")
@threads_option
@weights_option
@precision_option
def bench(folder: str | None, qualities: str | None, codecs: str, json_out: str | None, plot_out: str | None,
          report_dir: str | None, speed: bool, limit: int | None, compare: tuple[str, ...], effort: int,
          family: str | None, hard: bool, threads: int | None, weights: str | None, precision: str) -> None:
    """Rate-distortion (bpp, PSNR, MS-SSIM, BD-rate) of nic and Pillow codecs on the images in DIR."""
    from .bench import BenchOptions, run_command

    standard("output")  # its tables
    if (folder is None) == (not hard):
        raise click.UsageError("give DIR, or --hard for the generated hard-content set (not both)")
    from .bench import parse_codecs, parse_qualities

    try:  # the options' own errors are usage errors, as encode's are
        parse_codecs(codecs)
        asked = parse_qualities(qualities, 255) if qualities is not None else []
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if asked:
        _check_quality(max(asked), weights, family)
    if hard and (report_dir or plot_out or speed or limit or compare or effort != 1):
        raise click.UsageError("--hard takes -q, --codecs, --json, --model and --weights only")
    if report_dir and (speed or json_out or plot_out):
        raise click.UsageError("--report writes its own report.json and rd.png, and goes with the RD sweep "
                               "(not --speed, --json or --plot)")
    for name in (json_out, plot_out, report_dir):
        if name == "":
            raise click.UsageError("an output name (--json, --plot, --report) is empty")
    if qualities is not None:
        from .bench import parse_qualities

        try:
            parse_qualities(qualities, 255)  # the form; the weights' range is checked when they load
        except ValueError as exc:
            raise click.BadParameter(str(exc).removeprefix("-q: "), param_hint="-q") from None
    if plot_out == "-" and json_out == "-":
        raise click.UsageError("only one of --json and --plot can go to stdout")
    for name in (json_out, plot_out):  # before the sweep, not after it
        if name not in (None, "-"):
            path = _output_path(name)
            if path is not None and not (path.parent if str(path.parent) else Path(".")).is_dir():
                raise NicError(f"{name}: directory does not exist")
            if folder is not None:
                from .bench import list_images

                if any(_same_file(name, str(p)) for p in list_images(Path(folder))):
                    raise NicError(f"{name} is one of the images being measured")
    set_threads(threads)
    try:
        run_precision(precision, 1 << 62)  # keeps freed memory if bf16 may run (auto: on large images)
        if hard:
            bench_hard(qualities, codecs, json_out, family, weights, precision)
            return
        opts = BenchOptions(Path(folder), qualities, codecs, json_out, plot_out, speed, weights, limit, compare,
                            effort, family, precision)
        if report_dir is not None:
            bench_report(opts, Path(report_dir))
            return
        err = stderr_console()
        # The tables go to stderr where stdout carries the JSON or the plot.
        from rich.console import Console

        printed = PrintedOutput()
        out = Console(file=printed, highlight=False, width=None if printed.isatty() else LOG_WIDTH)
        run_command(opts, out=err if "-" in (json_out, plot_out) else out, err=err)
    except _domain_errors() as exc:
        raise NicError(str(exc)) from None


def bench_report(opts, folder: Path) -> None:
    """``nic bench --report OUT``: the sweep, then the sheets, written into a new folder
    that appears whole (built beside it and renamed) or not at all."""
    import dataclasses

    from .bench import _read, list_images, run_command
    from .report import index_html, sheet_name, sheets

    if folder.exists():
        raise NicError(f"{folder} exists: give --report a new folder")
    try:
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as exc:
        raise NicError(f"cannot write the report {folder}: {exc.strerror or exc}") from None
    os.chmod(building, 0o755)  # mkdtemp's folder is private; the report is not
    try:
        opts = dataclasses.replace(opts, json_out=str(building / "report.json"), plot_out=str(building / "rd.png"))
        result = run_command(opts, err=stderr_console())
        paths = list_images(opts.folder)[:opts.limit]
        entries = sheets(paths, _read, opts.codecs, opts.weights, opts.family)
        for entry in entries:
            (building / sheet_name(entry)).write_bytes(entry["png"])
        command = "nic bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "nic bench"
        (building / "index.html").write_text(index_html(result, entries, command), encoding="utf-8")
        os.replace(building, folder)
    except OSError as exc:
        raise NicError(f"cannot write the report {folder}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    click.echo(f"report: {folder / 'index.html'}", err=True)


def bench_hard(qualities: str | None, codecs: str, json_out: str | None, family: str | None,
               weights: str | None, precision: str = "auto") -> None:
    """``nic bench --hard``: the table of nic.bench.run_hard, row by row on stderr, whole on stdout."""
    import json

    from .bench import hard_table, json_safe, run_hard

    def report(row: dict) -> None:
        click.echo(f"{row['image']} q{row['quality']}: {row['bpp']:.3f} bpp, {row['psnr']:.2f} dB", err=True)

    rows = run_hard(qualities, codecs, weights, family, report=report, precision=precision)
    click.echo(hard_table(rows), err=json_out == "-", file=None if json_out == "-" else PrintedOutput())
    if json_out:
        with atomic_output(json_out) as stream:
            stream.write(json.dumps(json_safe({"hard": rows}), indent=1).encode())


def _warnings_as_lines() -> None:
    """Python warnings outside a job's (:func:`run_jobs` names its input) as one
    ``nic: warning:`` line each on stderr, every time, not Python's two-line form once."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        click.echo(f"nic: warning: {message}", err=True)

    warnings.showwarning = show
    warnings.simplefilter("always", UserWarning)


def _said(exc: click.ClickException) -> NoReturn:
    """Say ``exc`` on stderr and exit with its code, which stands where stderr cannot be
    written (the terminal of a SIGHUP is gone: EIO)."""
    try:
        exc.show()
    except OSError:
        pass
    sys.exit(exc.exit_code)


def main() -> None:
    # Idle OpenMP threads sleep instead of spinning: measured faster when the machine
    # is busy (docs/speed.md), and it must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # nic.engine runs its own threads, each calling numpy's BLAS on a chunk of its own:
    # BLAS threads would only compete with them. Before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _warnings_as_lines()
    for signum in STOPPING_SIGNALS:  # `kill`, a closed terminal: cleaned up like Ctrl-C
        if signal.getsignal(signum) == signal.SIG_DFL:  # (not where nohup ignores SIGHUP)
            signal.signal(signum, _raise_terminated)
    # Not standalone: click would print "Aborted!" and exit 1 for Ctrl-C; every exit
    # code is decided here instead.
    try:
        code = cli.main(prog_name="nic", standalone_mode=False)
    except click.ClickException as exc:  # NicError, Interrupted, usage errors (exit 2)
        _said(exc)
    except (click.Abort, KeyboardInterrupt):  # Ctrl-C before a command started (still parsing)
        _said(Interrupted())
    except Terminated as exc:
        _said(TerminatedExit(exc.signum))
    except BrokenPipeError:  # stdout's reader went away (`nic info a.nic | head -1`): not our error
        _detach_stdout()
        sys.exit(1)
    except ModuleNotFoundError as exc:
        if exc.name != "torch" or os.environ.get("NIC_DEBUG"):
            raise
        from .families import NEEDS_TORCH

        click.echo(f"nic: error: {NEEDS_TORCH}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug, not bad input: still one line, unless debugging
        if os.environ.get("NIC_DEBUG"):
            raise
        click.echo(f"nic: internal error: {type(exc).__name__}: {exc} (NIC_DEBUG=1 shows where)", err=True)
        sys.exit(1)
    # --help and --version return click's exit code (0); a finished command returns None.
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
