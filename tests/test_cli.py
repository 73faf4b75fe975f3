"""The command line, in-process (CliRunner) and as real processes with pipes."""

from __future__ import annotations

import array
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nic.cli import cli
from conftest import icc_profile, smooth_image


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.write_bytes(png_bytes(pixels))
    return path


def run_cli(*args: str, input: bytes | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def test_version_names_package_and_format():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert "0.1.0" in result.output and "container formats 1, 2" in result.output


@pytest.mark.parametrize("quality", range(1, 9))
def test_every_quality_round_trips_with_shipped_weights(tmp_path, quality):
    pixels = smooth_image(40, 56, seed=quality)
    src = write_png(tmp_path / "in.png", pixels)
    assert run_cli("encode", str(src), "-q", str(quality), "-o", str(tmp_path / "a.nic")).exit_code == 0
    assert run_cli("decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "out.png")).exit_code == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == pixels.shape
    assert psnr(out, pixels) > 15


def test_rate_and_quality_rise_with_quality(tmp_path):
    pixels = smooth_image(64, 96, seed=7)
    src = write_png(tmp_path / "in.png", pixels)
    sizes, scores = [], []
    for quality in (1, 4, 8):
        nic_path = tmp_path / f"{quality}.nic"
        run_cli("encode", str(src), "-q", str(quality), "-o", str(nic_path))
        run_cli("decode", str(nic_path), "-o", str(tmp_path / f"{quality}.png"))
        sizes.append(nic_path.stat().st_size)
        scores.append(psnr(np.asarray(Image.open(tmp_path / f"{quality}.png")), pixels))
    assert sizes == sorted(sizes) and scores == sorted(scores)


@pytest.mark.parametrize("height,width", [(1, 1), (17, 33), (3, 1000), (1000, 3), (16, 16)])
def test_odd_sizes_round_trip(tmp_path, tiny_weights, height, width):
    pixels = smooth_image(height, width, seed=height + width)
    src = write_png(tmp_path / "in.png", pixels)
    assert run_cli("encode", str(src), "--weights", tiny_weights, "-o", str(tmp_path / "a.nic")).exit_code == 0
    info = run_cli("info", str(tmp_path / "a.nic")).output
    assert f"{width}x{height}" in info
    assert run_cli("decode", str(tmp_path / "a.nic"), "--weights", tiny_weights,
                   "-o", str(tmp_path / "b.png")).exit_code == 0
    assert np.asarray(Image.open(tmp_path / "b.png")).shape == pixels.shape


def test_grayscale_in_grayscale_out(tmp_path):
    pixels = smooth_image(24, 40, channels=1)
    src = write_png(tmp_path / "gray.png", pixels)
    run_cli("encode", str(src), "-o", str(tmp_path / "g.nic"))
    assert "grayscale" in run_cli("info", str(tmp_path / "g.nic")).output
    run_cli("decode", str(tmp_path / "g.nic"), "-o", str(tmp_path / "g.png"))
    out = Image.open(tmp_path / "g.png")
    assert out.mode == "L" and out.size == (40, 24)


def test_gray_rgb_is_coded_as_gray_and_decodes_to_rgb_without_fringes(tmp_path):
    """An RGB image whose pixels are all gray (a scanned page saved as RGB) is stored as
    grayscale and decodes to RGB with three equal channels, by the streamed path (PNG) and
    the whole-image one (JPEG) alike; one coloured pixel keeps it RGB."""
    gray = np.repeat(smooth_image(40, 56, channels=1), 3, axis=2)
    for name, data in (("a.png", png_bytes(gray)), ("a.bmp", None)):
        src = tmp_path / name
        if data is None:
            Image.fromarray(gray).save(src)
        else:
            src.write_bytes(data)
        run_cli("encode", str(src), "-o", str(tmp_path / "a.nic"))
        assert "grayscale (of an all-gray RGB image" in run_cli("info", str(tmp_path / "a.nic")).output
        for out in ("a.png", "a.bmp"):
            run_cli("decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / f"out-{out}"))
            decoded = Image.open(tmp_path / f"out-{out}")
            assert decoded.mode == "RGB" and decoded.size == (56, 40)
            channels = np.asarray(decoded)
            assert (channels[..., 0] == channels[..., 1]).all() and (channels[..., 1] == channels[..., 2]).all()
    coloured = gray.copy()
    coloured[5, 7] = (200, 10, 10)
    run_cli("encode", str(write_png(tmp_path / "c.png", coloured)), "-o", str(tmp_path / "c.nic"))
    (colour,) = [line for line in run_cli("info", str(tmp_path / "c.nic")).output.splitlines()
                 if line.startswith("colour")]
    assert colour.split()[1:] == ["RGB"]


def test_alpha_is_refused_unless_flattened(tmp_path):
    rgba = np.dstack([smooth_image(20, 20), np.full((20, 20), 128, np.uint8)])
    src = tmp_path / "a.png"
    src.write_bytes(png_bytes(rgba, "RGBA"))
    result = CliRunner().invoke(cli, ["encode", str(src), "-o", str(tmp_path / "a.nic")])
    assert result.exit_code == 1 and "transparency" in result.output and "--background" in result.output
    assert not (tmp_path / "a.nic").exists()
    result = run_cli("encode", str(src), "--background", "white", "-o", str(tmp_path / "a.nic"))
    assert result.exit_code == 0 and (tmp_path / "a.nic").exists()
    # Fully opaque alpha carries nothing: accepted as RGB.
    opaque = np.dstack([smooth_image(20, 20), np.full((20, 20), 255, np.uint8)])
    src.write_bytes(png_bytes(opaque, "RGBA"))
    assert run_cli("encode", str(src), "-o", str(tmp_path / "b.nic")).exit_code == 0
    # A colour that is none: a usage error before any image is read, opaque or not.
    result = CliRunner().invoke(cli, ["encode", str(src), "--background", "notacolour", "-o", str(tmp_path / "c.nic")])
    assert result.exit_code == 2 and "Invalid value for '--background': unknown background colour" in result.output


def test_same_input_gives_same_bytes_with_1_and_2_threads(tmp_path):
    src = write_png(tmp_path / "in.png", smooth_image(64, 80, seed=3))
    outputs = []
    for threads in ("1", "2", "1"):
        out = tmp_path / f"t{threads}-{len(outputs)}.nic"
        run_cli("encode", str(src), "-q", "5", "-j", threads, "-o", str(out))
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_errors_are_one_line_with_exit_code_1(tmp_path):
    runner = CliRunner()
    cases = [
        ["encode", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.nic")],
        ["encode", str(tmp_path), "-o", str(tmp_path / "x.nic")],
        ["decode", str(write_png(tmp_path / "img.png", smooth_image(8, 8))), "-o", str(tmp_path / "x.png")],
        ["info", str(tmp_path / "img.png")],
    ]
    (tmp_path / "empty.png").write_bytes(b"")
    cases.append(["encode", str(tmp_path / "empty.png"), "-o", str(tmp_path / "x.nic")])
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    cases.append(["encode", str(tmp_path / "junk.png"), "-o", str(tmp_path / "x.nic")])
    for args in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("nic: error: ") and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "x.nic").exists() and not (tmp_path / "x.png").exists()


def test_usage_errors_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["encode", "x.png", "-q", "0"])
    assert result.exit_code == 2


def test_quality_beyond_the_weights_is_a_usage_error(tmp_path):
    """-q takes up to 255 (weights may have more qualities than the shipped 8); the
    weights decide, before any input is read: a usage error (exit 2, as -q 0 is) that
    says their range, once for a batch."""
    source = write_png(tmp_path / "img.png", smooth_image(16, 16))
    for args in (["encode", str(source), "-q", "9", "-o", str(tmp_path / "x.nic")],
                 ["encode", "-", "-q", "9", "-o", str(tmp_path / "x.nic")],
                 ["encode", str(source), str(source), "-q", "9", "-d", str(tmp_path / "out")]):
        result = CliRunner().invoke(cli, args, input=source.read_bytes())
        assert result.exit_code == 2, result.output
        assert result.output.count("9 is above 8, the highest quality of the hyperprior model") == 1, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
    result = CliRunner().invoke(cli, ["encode", str(source), "-q", "8.5", "-e", "2", "-o", str(tmp_path / "x.nic")])
    assert result.exit_code == 2 and "8.5 is above 8" in result.output  # (not "effort 1 only")


def test_failed_encode_never_clobbers_existing_output(tmp_path):
    target = tmp_path / "keep.nic"
    target.write_bytes(b"precious")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = CliRunner().invoke(cli, ["encode", str(tmp_path / "bad.png"), "-o", str(target)])
    assert result.exit_code == 1
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "keep.nic"]


def test_unwritable_destination_is_a_clean_error_before_any_work(tmp_path, monkeypatch):
    """A missing folder or a terminal for binary output is said before the encode (a
    --size search of a large photo takes a minute), not after it."""
    from nic import api

    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    monkeypatch.setattr(api, "encode_pixels", lambda *a, **k: pytest.fail("encoded before the output was checked"))
    monkeypatch.setattr(api, "encode_to_target", lambda *a, **k: pytest.fail("encoded before the output was checked"))
    for extra in ([], ["--size", "1KB"]):
        result = CliRunner().invoke(cli, ["encode", str(src), "-o", str(tmp_path / "no" / "dir" / "x.nic"), *extra])
        assert result.exit_code == 1 and result.output.endswith("x.nic: directory does not exist\n"), result.output
    from nic import cli as cli_module

    monkeypatch.setattr(cli_module, "_isatty", lambda fd: fd == 1)  # /dev/stdout: a terminal
    result = CliRunner().invoke(cli, ["encode", str(src), "-o", "/dev/stdout"])
    assert result.exit_code == 1 and result.output == "nic: error: /dev/stdout: refusing to write binary data to " \
                                                      "a terminal\n"


def test_corrupt_file_is_refused_by_decode(tmp_path):
    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    run_cli("encode", str(src), "-o", str(tmp_path / "a.nic"))
    data = bytearray((tmp_path / "a.nic").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "b.nic").write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["decode", str(tmp_path / "b.nic"), "-o", str(tmp_path / "b.png")])
    assert result.exit_code == 1 and "corrupt" in result.output
    assert not (tmp_path / "b.png").exists()


def test_wrong_weights_are_named(tmp_path, tiny_weights):
    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    run_cli("encode", str(src), "--weights", tiny_weights, "-o", str(tmp_path / "a.nic"))
    result = CliRunner().invoke(cli, ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 1 and "needs weights" in result.output


def test_given_weights_that_do_not_match_are_not_called_missing(tmp_path, tiny_weights):
    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    run_cli("encode", str(src), "--weights", tiny_weights, "-o", str(tmp_path / "a.nic"))
    from nic.weights import candidates

    other = str(candidates()[0])
    result = CliRunner().invoke(cli, ["decode", str(tmp_path / "a.nic"), "--weights", other,
                                      "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 1 and "needs weights" in result.output
    assert "not installed" not in result.output and "pass them with --weights" not in result.output


def test_file_names_with_brackets_are_printed_as_given(tmp_path):
    """rich must not read '[...]' in a file name as markup (MarkupError, or lost text)."""
    src = write_png(tmp_path / "a[bold]b.png", smooth_image(16, 16))
    missing = tmp_path / "no[/x].png"
    result = CliRunner().invoke(cli, ["encode", str(missing), str(src), "-d", str(tmp_path / "out"), "-v"])
    assert result.exit_code == 1, result.output
    assert f"nic: error: {missing}: no such file" in result.stderr
    assert f"{src} → {tmp_path / 'out' / 'a[bold]b.nic'}: quality 4" in result.stderr
    assert "internal error" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a[bold]b.nic"]


def _nic(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nic", *args], input=input, capture_output=True, timeout=120)


def test_real_processes_in_a_pipeline(tmp_path):
    pixels = smooth_image(33, 47, seed=11)
    src = png_bytes(pixels)
    encoded = _nic("encode", "-", "-q", "3", "-o", "-", input=src)
    assert encoded.returncode == 0 and encoded.stderr == b""
    assert encoded.stdout[:4] == b"\x89NIC"
    decoded = _nic("decode", "-", "-o", "-", input=encoded.stdout)
    assert decoded.returncode == 0 and decoded.stderr == b""
    out = np.asarray(Image.open(io.BytesIO(decoded.stdout)))
    assert out.shape == pixels.shape
    # The same bytes as an in-process encode.
    (tmp_path / "in.png").write_bytes(src)
    run_cli("encode", str(tmp_path / "in.png"), "-q", "3", "-o", str(tmp_path / "a.nic"))
    assert (tmp_path / "a.nic").read_bytes() == encoded.stdout


def test_a_reader_that_goes_away_mid_write_fails_the_command(tmp_path):
    """`nic decode … -o - | head -c 1000`: the reader leaves while nic is blocked writing a
    large image, the write takes part of it without an error, and nic writes the rest
    again, so the pipe's error ends it: exit 1, quietly, not 0 with the output cut short."""
    src = write_png(tmp_path / "in.png", smooth_image(600, 800, seed=5))
    assert run_cli("encode", str(src), "-o", str(tmp_path / "a.nic")).exit_code == 0
    process = subprocess.Popen([sys.executable, "-m", "nic", "decode", str(tmp_path / "a.nic"), "-o", "-",
                                "--format", "bmp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert len(process.stdout.read(1000)) == 1000
        time.sleep(0.5)  # nic blocked in its write of the 1.4 MB image into the 64 KiB pipe
        process.stdout.close()
        assert process.wait(timeout=120) == 1
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_a_write_taken_in_part_is_finished_or_fails():
    from nic.cli import _CountingStream

    class Partial(io.BytesIO):  # takes at most 7 bytes a call, without an error
        def write(self, data):
            return super().write(bytes(data[:7]))

    stream = _CountingStream(Partial(), "-")
    assert stream.write(b"0123456789" * 5) == 50 and stream.stream.getvalue() == b"0123456789" * 5
    assert stream.written == 50

    class Gone(Partial):  # then the reader goes away
        def write(self, data):
            if self.tell():
                raise BrokenPipeError()
            return super().write(data)

    with pytest.raises(BrokenPipeError):
        _CountingStream(Gone(), "-").write(b"0123456789")


def _unread_bytes(pipe) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, count)
    return count[0]


@pytest.mark.skipif(sys.platform != "linux", reason="FIONREAD on a pipe's write end is Linux behaviour")
@pytest.mark.parametrize("signum,code,line", [(signal.SIGINT, 130, "nic: interrupted\n"),
                                              (signal.SIGTERM, 143, "nic: terminated\n"),
                                              (signal.SIGHUP, 129, "nic: hung up\n")])
def test_ctrl_c_sigterm_and_sighup_are_one_line_and_their_exit_codes(tmp_path, signum, code, line):
    target = tmp_path / "out.png"
    process = subprocess.Popen(
        [sys.executable, "-m", "nic", "decode", "-", "-o", str(target)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # A shell without job control starts background jobs with SIGINT ignored, and
        # Python keeps an ignored SIGINT ignored: the test would then hang, not fail.
        # (SIGHUP too, where the tests run under nohup.)
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP)],
    )
    try:
        # Part of a header: once nic has read it, it is blocked waiting for the rest,
        # inside the command (a SIGINT during start-up would hit the imports instead).
        process.stdin.write(b"\x89NIC")
        process.stdin.flush()
        deadline = time.monotonic() + 120
        while _unread_bytes(process.stdin) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _unread_bytes(process.stdin) == 0, "nic never started reading"
        process.send_signal(signum)
        assert process.wait(timeout=60) == code
        assert process.stderr.read().decode() == line
        assert process.stdout.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    """SIGTERM is raised in the main thread as Terminated (nic.cli's handler), so the
    temporary output beside the target goes, as it does for Ctrl-C."""
    from nic import api
    from nic.cli import Terminated

    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    assert run_cli("encode", str(src), "-o", str(tmp_path / "a.nic")).exit_code == 0

    def terminated(*args, **kwargs):
        assert any(p.name.startswith(".out.png.") for p in tmp_path.iterdir())  # the output is open
        raise Terminated()

    monkeypatch.setattr(api, "decode_rows", terminated)
    result = CliRunner().invoke(cli, ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 143 and result.output == "nic: terminated\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nic", "in.png"]


def test_real_process_errors_have_no_traceback(tmp_path):
    result = _nic("decode", "-", "-o", "-", input=b"garbage that is not nic")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "nic: error: -: not a .nic file (bad magic bytes)"
    assert result.stdout == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_behind_stdout_is_the_outputs_one_line_error(tmp_path):
    source = write_png(tmp_path / "img.png", smooth_image(16, 16))
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "nic", "encode", str(source), "-o", "-"],
                                stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 1
    assert result.stderr.decode() == "nic: error: -: cannot write (No space left on device)\n"


@pytest.mark.parametrize("closed", [0, 1])
def test_a_closed_stdin_or_stdout_is_a_one_line_error(tmp_path, closed):
    """`nic … <&-` / `>&-`: the command that needs the closed stream says so in one line
    (Python starts with None for it); one that does not need it runs."""
    source = write_png(tmp_path / "img.png", smooth_image(16, 16))
    needs = {0: [["encode", "-", "-o", str(tmp_path / "x.nic")], ["decode", "-", "-o", str(tmp_path / "x.png")]],
             1: [["encode", str(source), "-o", "-"], ["info", str(tmp_path / "a.nic")]]}[closed]
    assert run_cli("encode", str(source), "-o", str(tmp_path / "a.nic")).exit_code == 0
    which = ("input", "output")[closed]
    for args in needs:
        result = subprocess.run([sys.executable, "-m", "nic", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if closed == 0 else None, stderr=subprocess.PIPE,
                                preexec_fn=lambda: os.close(closed), timeout=120)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.decode() == f"nic: error: -: standard {which} is closed\n"
    result = subprocess.run([sys.executable, "-m", "nic", "decode", str(tmp_path / "a.nic"), "-o",
                             str(tmp_path / "a.png")], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.close(closed), timeout=120)
    assert result.returncode == 0 and (tmp_path / "a.png").is_file(), result.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_what_info_prints_into_a_full_disk_is_a_one_line_error(tmp_path):
    source = write_png(tmp_path / "img.png", smooth_image(16, 16))
    assert run_cli("encode", str(source), "-o", str(tmp_path / "a.nic")).exit_code == 0
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "nic", "info", str(tmp_path / "a.nic")],
                                stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 1
    assert result.stderr.decode() == "nic: error: -: cannot write (No space left on device)\n"


# ---- files streamed a strip at a time (nic.streaming) give what whole images give ----------

def test_streamed_encode_and_decode_equal_the_whole_image_path(tmp_path, monkeypatch):
    import nic
    from nic import tiling

    monkeypatch.setattr(tiling, "DEFAULT_TILE", 48)  # several strips even for a small image
    pixels = smooth_image(130, 75, seed=9)
    exif = Image.Exif()
    exif[0x010F] = "nic test camera"
    Image.fromarray(pixels).save(tmp_path / "a.png", icc_profile=icc_profile(b"fake-icc"), exif=exif.tobytes())
    assert run_cli("encode", str(tmp_path / "a.png"), "-q", "2", "-o", str(tmp_path / "a.nic")).exit_code == 0
    with Image.open(tmp_path / "a.png") as im:
        expected = nic.encode(im, quality=2)
    assert (tmp_path / "a.nic").read_bytes() == expected  # streamed file input, same bytes
    (tmp_path / "a.ppm").write_bytes(b"P6\n75 130\n255\n" + pixels.tobytes())
    assert run_cli("encode", str(tmp_path / "a.ppm"), "-q", "2", "-o", str(tmp_path / "p.nic")).exit_code == 0
    assert (tmp_path / "p.nic").read_bytes() == nic.encode(pixels, quality=2)

    whole = np.asarray(nic.decode(expected))
    for name in ("b.png", "b.ppm", "b.bmp"):  # PNG and PPM are streamed out, BMP goes through Pillow
        assert run_cli("decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / name)).exit_code == 0
        with Image.open(tmp_path / name) as out:
            assert np.array_equal(np.asarray(out), whole)
    with Image.open(tmp_path / "b.png") as out:
        assert out.info["icc_profile"] == icc_profile(b"fake-icc")
        assert out.getexif().get(0x010F) == "nic test camera"


def test_streamed_input_that_is_rotated_or_transparent_follows_the_policy(tmp_path):
    import nic

    pixels = smooth_image(24, 40, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view: pixels must be turned upright
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif.tobytes())
    assert run_cli("encode", str(tmp_path / "r.png"), "-o", str(tmp_path / "r.nic")).exit_code == 0
    assert nic.decode((tmp_path / "r.nic").read_bytes()).size == (24, 40)
    rgba = np.concatenate([pixels, np.full((24, 40, 1), 255, np.uint8)], axis=2)
    rgba[3, 5, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    result = CliRunner().invoke(cli, ["encode", str(tmp_path / "t.png"), "-o", str(tmp_path / "t.nic")])
    assert result.exit_code == 1 and "transparency" in result.output and not (tmp_path / "t.nic").exists()
    assert run_cli("encode", str(tmp_path / "t.png"), "--background", "white",
                   "-o", str(tmp_path / "t.nic")).exit_code == 0


def test_progress_bar_only_for_big_images_on_a_terminal(monkeypatch):
    from nic import cli as cli_module

    with cli_module.image_progress(10**9, "big") as progress:  # pytest's stderr is no terminal
        assert progress is None

    from rich.console import Console

    monkeypatch.setattr(cli_module, "stderr_console", lambda: Console(file=io.StringIO(), force_terminal=True))
    with cli_module.image_progress(100, "small") as progress:
        assert progress is None
    with cli_module.image_progress(10**9, "big", show=False) as progress:  # inside a batch's own bar
        assert progress is None
    with cli_module.image_progress(10**9, "big") as progress:
        progress(1, 4)
        progress(4, 4)


LIGHT_COMMANDS_PROBE = """
import sys
from nic.cli import main
sys.argv = ["nic", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "numpy") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["encode", "--help"], ["info", "FILE"]])
def test_help_and_info_do_not_import_torch(tmp_path, args):
    """`nic --help` and `nic info` stay fast (docs/speed.md) by never importing torch or numpy."""
    if args == ["info", "FILE"]:
        image = tmp_path / "a.png"
        Image.fromarray(smooth_image(24, 32)).save(image)
        assert _nic("encode", str(image), "-o", str(tmp_path / "a.nic")).returncode == 0
        args = ["info", str(tmp_path / "a.nic")]
    proc = subprocess.run([sys.executable, "-c", LIGHT_COMMANDS_PROBE, *args], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().strip().splitlines()[-1] == "HEAVY:", proc.stderr


def test_named_pipe_input_is_opened_once(tmp_path):
    """A FIFO cannot be read twice: the streaming reader's refusal (not seekable) must
    not close it and open it again (that would kill the writer and block for good)."""
    import threading

    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    data = png_bytes(smooth_image(24, 40))

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    proc = _nic("encode", str(fifo), "-o", str(tmp_path / "a.nic"))
    writer.join(10)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.nic").stat().st_size > 0


def test_no_output_is_named_after_a_pipe_or_a_device(tmp_path):
    """`nic encode /dev/stdin`, `nic encode <(…)`, a FIFO: no /dev/stdin.nic (made as a
    file by root), no /dev/fd/63.nic, no in.nic beside a pipe; -o names it, and -d
    names it after the input."""
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    for source in (str(fifo), "/dev/stdin", "/dev/fd/0"):
        for command in ("encode", "decode"):
            result = CliRunner().invoke(cli, [command, source])
            assert result.exit_code == 1, result.output
            assert result.output == f"nic: error: {source}: not a file to write an output beside; name the " \
                                    "output with -o\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):  # files there are files like any
        shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
        try:
            write_png(shm / "a.png", smooth_image(16, 16))
            assert run_cli("encode", str(shm / "a.png")).exit_code == 0 and (shm / "a.nic").is_file()
        finally:
            shutil.rmtree(shm)


def test_temporary_file_errors_are_not_blamed_on_the_output(tmp_path, monkeypatch):
    import tempfile

    from nic import tiling

    src = write_png(tmp_path / "in.png", smooth_image(24, 40))
    assert run_cli("encode", str(src), "-o", str(tmp_path / "a.nic")).exit_code == 0
    monkeypatch.setattr(tiling, "SPILL_BYTES", 0)  # every image's latents go to a file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    for args in (["encode", str(src), "-o", str(tmp_path / "b.nic")],
                 ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "out.png")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        message = result.stderr.strip()
        assert "temporary file for the latents in" in message and "cannot write" not in message, message
        assert len(message.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nic", "in.png"]


# ---- where outputs go: devices, pipes, links, the input itself, files already there -------

def test_devices_pipes_and_links_are_written_not_replaced(tmp_path):
    """A rename would put a regular file in place of /dev/null, a FIFO or a link."""
    import threading

    from nic.container import MAGIC

    src = write_png(tmp_path / "in.png", smooth_image(16, 24))
    assert run_cli("encode", str(src), "-o", os.devnull).exit_code == 0
    assert not Path(os.devnull).is_file()
    fifo = tmp_path / "out.nic"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert run_cli("encode", str(src), "-o", str(fifo)).exit_code == 0
    reader.join(10)
    assert fifo.is_fifo() and received and received[0].startswith(MAGIC)
    (tmp_path / "real.nic").write_bytes(b"old")
    (tmp_path / "link.nic").symlink_to("real.nic")
    assert run_cli("encode", str(src), "-o", str(tmp_path / "link.nic")).exit_code == 0
    assert (tmp_path / "link.nic").is_symlink() and (tmp_path / "real.nic").read_bytes() == received[0]


def test_an_open_files_name_is_appended_to_and_write_errors_name_the_output(tmp_path):
    """-o /dev/stdout with `>> log`: the descriptor's file gets the bytes after the log's,
    not a new file renamed over it. A full device is the output's one-line error."""
    src = write_png(tmp_path / "in.png", smooth_image(16, 24))
    log = tmp_path / "log"
    log.write_bytes(b"log\n")
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, "-m", "nic", "encode", str(src), "-o", "/dev/stdout"], stdout=out,
                              stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 0, done.stderr
    assert log.read_bytes().startswith(b"log\n\x89NIC")
    if os.path.exists("/dev/full"):
        result = CliRunner().invoke(cli, ["encode", str(src), "-o", "/dev/full"])
        assert result.exit_code == 1 and result.output == "nic: error: /dev/full: cannot write (No space left on device)\n"
    nic_file = log.read_bytes()[len(b"log\n"):]
    assert run_cli("decode", "-", "-o", os.devnull, input=nic_file).exit_code == 0  # PNG, by --format


def test_format_applies_to_stdout(tmp_path):
    """`nic decode x.nic -o - --format jpg > x.jpg` writes a JPEG, as -o /dev/stdout does."""
    src = write_png(tmp_path / "in.png", smooth_image(16, 24))
    nic_file = run_cli("encode", str(src), "-o", "-").stdout_bytes
    for args in (["decode", "-", "--format", "jpg"], ["decode", "-", "-o", "-", "--format", "ppm"], ["decode", "-"]):
        out = run_cli(*args, input=nic_file).stdout_bytes
        assert Image.open(io.BytesIO(out)).format == {"jpg": "JPEG", "ppm": "PPM"}.get(args[-1], "PNG")


def test_an_image_larger_than_its_output_format_holds_is_refused_before_decoding(tmp_path, monkeypatch):
    """WebP holds at most 16383 pixels a side: a 20000-wide panorama was refused by libwebp
    after its whole decode (27 s); the header says it first."""
    from nic import api, images

    src = write_png(tmp_path / "in.png", smooth_image(16, 24))
    assert run_cli("encode", str(src), "-o", str(tmp_path / "a.nic")).exit_code == 0
    monkeypatch.setitem(images.SIDE_LIMITS, "WEBP", 20)  # a 24-wide image over it
    monkeypatch.setattr(api, "decode_pixels", lambda *a, **k: pytest.fail("decoded before the size was checked"))
    result = CliRunner().invoke(cli, ["decode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "a.webp")])
    assert result.exit_code == 1 and result.output.endswith(
        "a.webp: WEBP holds at most 20 pixels a side, the image is 24x16; use .png or .tif\n"), result.output
    assert not (tmp_path / "a.webp").exists()


def test_format_names_the_format_of_an_output_without_an_extension_and_may_not_contradict_one(tmp_path):
    src = write_png(tmp_path / "in.png", smooth_image(16, 24))
    assert run_cli("encode", str(src), "-o", str(tmp_path / "a.nic")).exit_code == 0
    nic_file = str(tmp_path / "a.nic")
    assert run_cli("decode", nic_file, "-o", str(tmp_path / "plain"), "--format", "jpg").exit_code == 0
    assert Image.open(tmp_path / "plain").format == "JPEG"
    assert run_cli("decode", nic_file, "-o", str(tmp_path / "same.png"), "--format", "png").exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    contradicted = CliRunner().invoke(cli, ["decode", nic_file, "-o", str(tmp_path / "x.png"), "--format", "jpg"])
    assert contradicted.exit_code == 2 and "--format jpg asks for JPEG, and" in contradicted.output
    gray = CliRunner().invoke(cli, ["decode", nic_file, "-o", str(tmp_path / "x.pgm")])  # Pillow would write P6
    assert gray.exit_code == 1 and "a .pgm file is gray and the image is in colour" in gray.output
    folder = CliRunner().invoke(cli, ["decode", nic_file, "-o", str(tmp_path)])
    assert folder.exit_code == 1 and folder.output == f"nic: error: {tmp_path}: is a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_output_that_is_its_input_by_another_name_is_refused(tmp_path, monkeypatch):
    src = write_png(tmp_path / "a.png", smooth_image(16, 16))
    (tmp_path / "l.png").symlink_to("a.png")
    monkeypatch.chdir(tmp_path)
    for output in ("./a.png", str(src), "l.png", "../" + tmp_path.name + "/a.png"):
        result = CliRunner().invoke(cli, ["encode", "a.png", "-o", output])
        assert result.exit_code == 1 and result.output == f"nic: error: {output}: would overwrite its own input a.png\n"
    assert CliRunner().invoke(cli, ["encode", "l.png", "-o", "a.png"]).exit_code == 1
    assert (tmp_path / "a.png").read_bytes() == png_bytes(smooth_image(16, 16))


def test_an_output_beside_its_input_is_not_replaced_without_force(tmp_path):
    """`nic decode photo.nic` names photo.png: often the original the file was made from."""
    src = write_png(tmp_path / "photo.png", smooth_image(16, 16))
    original = src.read_bytes()
    assert run_cli("encode", str(src)).exit_code == 0
    result = CliRunner().invoke(cli, ["decode", str(tmp_path / "photo.nic")])
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert src.read_bytes() == original
    assert CliRunner().invoke(cli, ["encode", str(src)]).exit_code == 1
    assert run_cli("decode", str(tmp_path / "photo.nic"), "--force").exit_code == 0
    assert src.read_bytes() != original
    assert run_cli("decode", str(tmp_path / "photo.nic"), "-o", str(src)).exit_code == 0  # named: replaced
    other = write_png(tmp_path / "other.png", smooth_image(8, 8))  # a batch: the others are still done
    result = CliRunner().invoke(cli, ["encode", str(src), str(other)])
    assert result.exit_code == 1 and "write into a folder with -d" in result.output
    assert (tmp_path / "other.nic").exists()


@pytest.mark.parametrize("args,message", [
    (["encode", ""], "input name is empty"), (["info", ""], "input name is empty"),
    (["encode", "."], "is a directory"), (["decode", "/"], "is a directory"),
    (["encode", "IN", "-o", ""], "output name is empty"),
    (["encode", "IN", "-o", "OUT/missing/"], "no such directory"),
    (["encode", "IN", "-o", "OUT/"], "is a directory"),
    (["encode", "IN", "-o", "OUT/loop"], "Too many levels of symbolic links"),
])
def test_names_that_are_no_files_are_one_line_errors(tmp_path, args, message):
    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    (tmp_path / "loop").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop")
    args = [a.replace("IN", str(src)).replace("OUT", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and result.output.startswith("nic: error: "), result.output
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "loop", "loop2"]
    assert (tmp_path / "loop").is_symlink()


@pytest.mark.parametrize("option,value", [("-q", "nan"), ("--bpp", "inf"), ("--bpp", "nan"), ("--size", "9" * 400)])
def test_numbers_that_are_not_finite_are_usage_errors(tmp_path, option, value):
    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    result = CliRunner().invoke(cli, ["encode", str(src), option, value, "-o", str(tmp_path / "x.nic")])
    assert result.exit_code == 2 and ("not a finite number" in result.output or "too large" in result.output)


def png_of_rows(pixels: np.ndarray, interlaced: bool = False, cut: int = 0) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (Adam7 passes where ``interlaced``), unfiltered, its
    image data less its last ``cut`` bytes in a zlib stream that ends cleanly."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b"".join(b"\x00" + row.tobytes() for x0, y0, dx, dy in (passes if interlaced else ((0, 0, 1, 1),))
                   for row in pixels[y0::dy, x0::dx] if row.size)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlaced))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw[:len(raw) - cut]))
            + chunk(b"IEND", b""))


def test_short_png_data_is_refused_on_every_route(tmp_path):
    """Pillow fills rows missing from a PNG whose zlib stream ends early with black; the
    streamed route refuses the file, and so do stdin and efforts 2..4 (Pillow's route)."""
    pixels = smooth_image(24, 13)
    for interlaced in (False, True):
        whole = png_of_rows(pixels, interlaced)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(whole))), pixels)
        assert run_cli("encode", "-", "-o", str(tmp_path / "x.nic"), input=whole).exit_code == 0
        (tmp_path / "x.nic").unlink()
        for cut in (3 * (1 + 3 * 13), 3):  # three whole rows, or part of one
            short = png_of_rows(pixels, interlaced, cut)
            (tmp_path / "short.png").write_bytes(short)
            for args, stdin in ((["encode", str(tmp_path / "short.png")], None), (["encode", "-"], short),
                                (["encode", str(tmp_path / "short.png"), "-e", "2"], None)):
                result = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "x.nic")], input=stdin)
                assert result.exit_code == 1 and "cannot read image" in result.output, (interlaced, cut, args)
                assert "too short" in result.output or "truncated" in result.output, result.output
        assert not (tmp_path / "x.nic").exists()


def test_batches_name_clashing_inputs_and_count_what_was_coded(tmp_path):
    a = write_png(tmp_path / "a.png", smooth_image(8, 8))
    Image.fromarray(smooth_image(8, 8)).save(tmp_path / "a.jpg")
    result = CliRunner().invoke(cli, ["encode", str(a), str(tmp_path / "a.jpg"), "-d", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{a} and {tmp_path / 'a.jpg'} would write" in result.output
    assert CliRunner().invoke(cli, ["encode", str(a), "-d", ""]).exit_code == 2
    (tmp_path / "bad.png").write_bytes(b"no")
    result = CliRunner().invoke(cli, ["encode", str(a), str(tmp_path / "bad.png"), "-d", str(tmp_path / "out")])
    assert result.exit_code == 1 and "coded" in result.output


def test_an_output_that_appears_meanwhile_is_kept(tmp_path, monkeypatch):
    """Without -o, -d or --force the output is linked into place, not renamed: of two
    processes that found the name free, the second fails instead of replacing the first."""
    from nic import api

    src = write_png(tmp_path / "a.png", smooth_image(16, 16))
    encode_rows = api.encode_rows

    def meanwhile(*args, **kwargs):
        (tmp_path / "a.nic").write_bytes(b"the other process's file")
        return encode_rows(*args, **kwargs)

    monkeypatch.setattr(api, "encode_rows", meanwhile)
    result = CliRunner().invoke(cli, ["encode", str(src)])
    assert result.exit_code == 1 and "already exists (made meanwhile)" in result.output, result.output
    assert (tmp_path / "a.nic").read_bytes() == b"the other process's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nic", "a.png"]


def test_names_of_255_bytes_are_written(tmp_path):
    src = write_png(tmp_path / ("k" * 251 + ".png"), smooth_image(8, 8))
    assert run_cli("encode", str(src)).exit_code == 0
    assert (tmp_path / ("k" * 251 + ".nic")).exists()


def test_only_an_open_descriptors_name_or_a_device_is_written_in_place(tmp_path):
    """/dev/stdout and /dev/fd/N name the file a descriptor holds (also through a link to
    them); /dev/shm holds files."""
    import stat as st

    from nic.cli import _in_place

    (tmp_path / "out").symlink_to("/dev/stdout")
    assert _in_place(str(tmp_path / "out"), st.S_IFREG | 0o644)

    for name in ("/dev/stdout", "/dev/fd/63", "/proc/self/fd/1", "/proc/123/task/124/fd/5"):
        assert _in_place(name, st.S_IFREG | 0o644), name
    for name in ("/dev/shm/x.nic", "/proc/x.nic", "/dev/fd"):
        assert not _in_place(name, st.S_IFREG | 0o644) and not _in_place(name, None), name
    assert _in_place("/tmp/a-fifo", st.S_IFIFO | 0o644) and _in_place("/tmp/x", st.S_IFCHR | 0o666)


def test_a_second_sigterm_does_not_interrupt_the_clean_up():
    from nic.cli import Terminated, _raise_terminated

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Terminated):
            _raise_terminated(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_replaced_output_keeps_its_permissions_and_a_read_only_one_is_refused(tmp_path, monkeypatch):
    """As writing into the file would: a private (600) output stays private; one this
    process may not write is refused, though the folder would let a rename replace it."""
    src = write_png(tmp_path / "in.png", smooth_image(16, 16))
    out = tmp_path / "out.nic"
    out.write_bytes(b"old")
    out.chmod(0o600)
    assert run_cli("encode", str(src), "-o", str(out)).exit_code == 0
    assert out.read_bytes()[:4] == b"\x89NIC" and (out.stat().st_mode & 0o777) == 0o600
    fresh = tmp_path / "fresh.nic"
    assert run_cli("encode", str(src), "-o", str(fresh)).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(out) else access(path, mode, **kw))
    before = out.read_bytes()
    result = CliRunner().invoke(cli, ["encode", str(src), "-q", "2", "-o", str(out)])
    assert result.exit_code == 1 and result.output == f"nic: error: {out}: the file is not writable\n"
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["fresh.nic", "in.png", "out.nic"]


def test_encoding_a_nic_file_warns_of_the_second_generation(tmp_path):
    src = write_png(tmp_path / "in.png", smooth_image(16, 24))
    assert run_cli("encode", str(src), "-o", str(tmp_path / "a.nic")).exit_code == 0
    result = CliRunner().invoke(cli, ["encode", str(tmp_path / "a.nic"), "-o", str(tmp_path / "b.nic")])
    assert result.exit_code == 0 and "the input is a .nic file" in result.stderr
    assert result.stderr.count("warning") == 1


def test_a_quality_between_two_at_a_higher_effort_is_a_usage_error_before_any_work(tmp_path):
    result = CliRunner().invoke(cli, ["encode", str(tmp_path / "missing.png"), "-q", "3.5", "-e", "2"])
    assert result.exit_code == 2 and "coded at effort 1" in result.output
