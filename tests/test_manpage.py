"""man/nic.1 is generated from the click definitions and must not drift."""

import shutil
import subprocess
from pathlib import Path

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


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_has_no_warnings():
    result = subprocess.run(["groff", "-man", "-ww", "-Tutf8", str(PAGE)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
