"""man/nic.1 is generated from the click definitions and must not drift."""

import shutil
import subprocess
from pathlib import Path

import click
import pytest

from nic.cli import cli
from nic.manpage import render

PAGE = Path(__file__).resolve().parent.parent / "man" / "nic.1"


def test_committed_page_is_the_generated_one():
    assert PAGE.read_text() == render(), "regenerate with: python -m nic.manpage > man/nic.1"


def test_every_command_and_option_is_documented():
    text = PAGE.read_text()
    for name, command in cli.commands.items():
        assert f".SS {name}" in text
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt.replace("-", "\\-") in text, (name, opt)


def test_the_groups_own_options_are_documented():
    """-V/--version and -h/--help belong to `nic` itself, not to any command."""
    text = PAGE.read_text()
    options = text.split(".SH OPTIONS\n", 1)[1].split("\n.SH ", 1)[0]
    ctx = click.Context(cli, info_name="nic", **cli.context_settings)
    names = [opt for param in cli.get_params(ctx) for opt in param.opts + param.secondary_opts]
    assert {"-V", "--version", "-h", "--help"} <= set(names)
    for opt in names:
        roff = opt.replace("-", "\\-")
        assert f"\\fB{roff}\\fR" in options, opt


def test_every_option_has_help_text():
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert (param.help or "").strip(), (name, param.opts)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_has_no_warnings():
    result = subprocess.run(["groff", "-man", "-ww", "-Tutf8", str(PAGE)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
