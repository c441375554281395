"""The `speakerflow` command line: `main` parses and runs one command."""

from speakerflow.streams.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
