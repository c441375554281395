"""What the command modules share."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from speakerflow.processors.embedding import Embedder
    from speakerflow.streams.settings import Settings


def settings() -> Settings:
    from speakerflow.streams.settings import Settings

    return Settings.for_cli()


def group(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    """A command with sub-commands (`speakers list`, `bench embed`, ...); returns their action."""
    return sub.add_parser(name, help=help_text).add_subparsers(
        dest=f"{name}_command", required=True, metavar="COMMAND"
    )


def embedder(name: str = "") -> Embedder:
    """The embedder `name` (default SPEAKERFLOW_EMBEDDER) on this process's configured torch threads."""
    import torch

    from speakerflow.processors.embedding import load_embedder

    config = settings()
    if config.torch_threads:  # one thread each is what a loaded worker gives a stream's VAD
        torch.set_num_threads(config.torch_threads)
    return load_embedder(name or config.embedder, config.device, config.embedding_model_path)


@contextmanager
def database(config: Settings) -> Iterator[str]:
    """The PostgreSQL URL to use; an embedded server started for it is stopped when the block ends."""
    from speakerflow.streams.database import resolve_database_url

    url, embedded = resolve_database_url(config.database_url, config.data_dir)
    try:
        yield url
    finally:
        if embedded:
            embedded.stop()


def diarizer_arguments(p: argparse.ArgumentParser) -> None:
    """`--diarizer` and `--set` of `eval diarize` and `bench diarize`."""
    p.add_argument(
        "--diarizer",
        choices=["light", "segmentation"],
        default="",
        help="light: VAD + windows; segmentation: pyannote segmentation-3.0 + overlap (default: "
        "SPEAKERFLOW_DIARIZER)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a segmentation-diarizer setting (OverlapConfig field), e.g. --set delta_new=0.3",
    )
