"""Every `speakerflow ...` command the README shows exists: each is parsed by the real parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from speakerflow.streams.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_commands() -> list[str]:
    """`speakerflow ...` in code spans and code blocks, up to a comment, pipe, `&&`, `&` or `;`."""
    found = re.findall(r"`(?:\.venv/bin/)?speakerflow ([^`]+)`", README)
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README, re.S):
        for line in block.splitlines():
            found += re.findall(r"(?:^|&&|&|;)\s*(?:flock -x \S+ )?speakerflow ([^#&;|]+)", line)
    return sorted({re.split(r"\s+#|&&|\||;", c)[0].strip() for c in found})


def _argv(command: str) -> list[str]:
    """The README writes placeholders and alternatives; fill them so that argparse can check the rest."""
    command = re.sub(r"\[[^\]]*\]", "", command)  # optional parts
    command = command.replace("...", "").replace("COMMAND --help", "--help")
    words = shlex.split(command)
    return [w.split("|")[0] for w in words]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(command)
    if argv[-1:] == ["--help"] or argv == []:
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        error = capsys.readouterr().err
        # Prose may name a command without its required options; anything else is a wrong command.
        if "the following arguments are required" not in error:
            pytest.fail(f"`speakerflow {command}` does not parse (exit {exc.code}): {error[-300:]}")


def test_readme_shows_commands() -> None:
    assert len(readme_commands()) > 30
