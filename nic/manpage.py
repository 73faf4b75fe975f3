"""Generate man/nic.1 from the click definitions, so the page cannot drift.

    python -m nic.manpage > man/nic.1

tests/test_manpage.py checks that the committed page equals this output and that
``groff -man -ww`` has nothing to say about it.
"""

from __future__ import annotations

import click

from . import __version__
from .cli import cli

DATE = "2026-12-05"

INTRO = r""".SH DESCRIPTION
nic compresses photographs with a learned transform codec: the convolutional analysis
and synthesis transforms with GDN of Ball\['e], Laparra and Simoncelli, \(lqEnd-to-end
optimized image compression\(rq (ICLR 2017), uniform scalar quantization, and range
coding from integer tables. By default the latents are coded with a mean-scale
hyperprior (Minnen, Ball\['e] and Toderici, NeurIPS 2018) and a context of channel
slices and a checkerboard, computed by exact integer networks (the \fBhyperprior\fR
family); \fB\-\-model factorized\fR encodes with the learned factorized entropy model of
the 2017 paper instead. Where the learned transforms cannot follow the image (text,
line art, screenshots, flat colour), the default stores the pixels themselves,
losslessly or each within a step (the \fBpixels\fR family: predicted pixel by pixel, or
as one LZMA2 stream that finds repeated glyphs, icons and patterns), whenever that file is worth
its bits (lower rate + lambda x distortion than the model's, at most 1.5 times its size); \fB\-\-model pixels\fR forces it (lossless at
\fB\-q 8\fR). Decoding follows the file.
.PP
nic is silent unless \fB\-v\fR is given, so it fits in pipelines: \fB\-\fR names
standard input or output. Errors are one line on standard error. Output files are
written to a temporary file and renamed, so a failure or an interrupt never leaves a
partial or clobbered file.
"""

OUTRO = r""".SH EXIT STATUS
.TP
.B 0
success
.TP
.B 1
an error: unreadable or invalid input, missing weights, unwritable output; with
several inputs, at least one of them failed (the others were still done)
.TP
.B 2
a usage error (unknown option, bad value)
.TP
.B 129
hung up (SIGHUP: the terminal closed)
.TP
.B 130
interrupted (Ctrl-C)
.TP
.B 143
terminated (SIGTERM)
.PP
A failure or a signal leaves no partial output file; \fBnic train\fR saves its checkpoint
when stopped by any of the three signals.
.SH ENVIRONMENT
.TP
.B NIC_WEIGHTS_DIR
a folder searched for weights files (\fIdefault.npz\fR first) before the installed ones;
\fB\-\-model\fR takes the first of the family it names
.TP
.B NIC_DEBUG
set to show a traceback for internal errors
.TP
.B TMPDIR
where the latents of images over about 87 megapixels wait during encoding and
decoding (an unlinked temporary file; default \fI/tmp\fR): a disk, not a RAM\-backed tmpfs
.SH FILES
A .nic file is a 38\-byte little\-endian header \(em magic
\fB89 4E 49 43\fR, format version, model id (the model family: 1 factorized,
2 hyperprior, 3 pixels), quality, colour layout, width, height, an
8\-byte weights hash, latent shape, payload length and a CRC\-32 of the header \(em
then the range\-coded payload, its CRC\-32, and optional PNG\-style sections:
\fBiCCP\fR (ICC profile), \fBeXIf\fR (EXIF), \fBgRGB\fR (a gray image that decodes to
RGB) and \fBSTEP\fR (the quantization step of a quality between two trained ones).
Sections whose type starts with a lowercase letter are skipped by readers that do not
know them; an unknown uppercase type makes a file unreadable. In format version 1 (the factorized family) the
payload is one range\-coded stream; in version 2 (the hyperprior and pixels families) it is a
directory of named substreams (\fBzhat\fR, then \fByhat\fR, after \fBtmap\fR, \fBpset\fR and \fBpixl\fR where
pixel tiles cover part of the image; \fBpset\fR, then \fBpixl\fR), each with its shape and length. The full table is in the module nic.container.
.SH EXAMPLES
.nf
nic encode photo.png \-q 4 \-o photo.nic
nic encode photo.png \-q 4 \-e 3 \-o smaller.nic
nic decode photo.nic \-o photo.png
nic info photo.nic
cat a.png | nic encode \- \-q 3 \-o \- | nic decode \- \-o \- > b.png
nic encode *.jpg \-d compressed/ \-\-size 50KB
nic decode compressed/*.nic \-d restored/ \-\-format png
nic bench ../shared/data/kodak \-\-plot rd.png \-\-json kodak.json
nic train ../shared/data/train \-\-out runs/main \-\-minutes 120
nic export runs/main/checkpoint.pt \-o weights/default.npz \-\-half
.fi
.SH SHELL COMPLETION
nic uses click's completion. For bash, add to \fI~/.bashrc\fR:
.PP
.nf
eval "$(_NIC_COMPLETE=bash_source nic)"
.fi
.PP
For zsh use \fBzsh_source\fR in \fI~/.zshrc\fR; for fish,
\fB_NIC_COMPLETE=fish_source nic | source\fR in \fI~/.config/fish/completions/nic.fish\fR.
.SH SEE ALSO
.BR cjpeg (1),
.BR cwebp (1),
.BR avifenc (1)
"""


def escape(text: str) -> str:
    """roff-safe text: backslashes, leading dots/quotes, hyphens as minus signs."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def option_lines(param: click.Parameter) -> list[str]:
    if not isinstance(param, click.Option) or param.hidden:
        return []
    names = ", ".join(f"\\fB{escape(n)}\\fR" for n in param.opts + param.secondary_opts)
    if not param.is_flag and not param.count:
        metavar = param.metavar or param.type.get_metavar(param, click.get_current_context())
        if metavar is None:
            metavar = {"integer range": "N", "float range": "X", "integer": "N", "float": "X"}.get(
                param.type.name, param.type.name.upper())
        names += f" \\fI{escape(metavar)}\\fR"
    help_text = (param.help or "").replace("\b", "")
    if param.show_default and param.default is not None and not param.is_flag:
        help_text += f" [default: {param.default}]"
    return [".TP", names, escape(help_text)]


def help_lines(param: click.Parameter, what: str) -> list[str]:
    """The help option, whose own text ("Show this message") reads wrongly in a man page."""
    return [".TP", ", ".join(f"\\fB{escape(n)}\\fR" for n in param.opts), f"Show {what} and exit."]


def group_context() -> click.Context:
    # With the group's context_settings, as `nic` itself makes it: they hold -h beside --help,
    # and click caches each command's help option from the first context that asks for it.
    return click.Context(cli, info_name="nic", **cli.context_settings)


def render() -> str:
    out = [f'.TH NIC 1 "{DATE}" "nic {__version__}" "User Commands"', ".SH NAME",
           "nic \\- a learned image codec", ".SH SYNOPSIS"]
    with group_context() as group_ctx:
        # The group's own options (-V, -h) work without a command.
        group_params = [p for p in cli.get_params(group_ctx) if isinstance(p, click.Option) and not p.hidden]
        out.append("\\fBnic\\fR " + " ".join(f"[\\fB{escape(p.opts[0])}\\fR]" for p in group_params))
        for name in sorted(cli.commands):
            command = cli.commands[name]
            with click.Context(command, info_name=name, parent=group_ctx):
                pieces = [escape(p) for p in command.collect_usage_pieces(click.get_current_context())]
            out += [".br", f"\\fBnic {name}\\fR {' '.join(pieces)}"]
    out.append(INTRO.rstrip())
    out.append(".SH OPTIONS")
    with group_context() as group_ctx:
        help_option = cli.get_help_option(group_ctx)
        for param in cli.get_params(group_ctx):
            out += help_lines(param, "the list of commands") if param is help_option else option_lines(param)
    out.append(".SH COMMANDS")
    with group_context() as group_ctx:
        for name in sorted(cli.commands):
            command = cli.commands[name]
            with click.Context(command, info_name=name, parent=group_ctx):
                out += [".SS " + name, escape((command.help or "").replace("\b", "").strip())]
                for param in command.params:
                    out += option_lines(param)
                out += help_lines(command.get_help_option(click.get_current_context()), "the command's help")
    out.append(OUTRO.rstrip())
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    click.echo(render(), nl=False)
