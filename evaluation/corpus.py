"""Speech corpora in the manifest format, and conversations built from single-speaker utterances.

A corpus folder holds `manifest.csv` (`path,speaker,duration_s,sample_rate,source_repo,license`,
paths relative to the folder); rows with `speaker=multi` have an RTTM beside the audio.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speakerflow.processors.audio import decode_file

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Utterance:
    path: Path
    speaker: str
    duration_s: float
    license: str = ""


def load_manifest(folder: Path | str) -> list[Utterance]:
    """Rows of a corpus; `folder` is the corpus folder or its manifest file."""
    folder = Path(folder)
    manifest = folder if folder.suffix == ".csv" else folder / "manifest.csv"
    folder = manifest.parent
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: a corpus folder needs a manifest.csv")
    with manifest.open(newline="") as fh:
        return [
            Utterance(folder / row["path"], row["speaker"], float(row["duration_s"]), row.get("license", ""))
            for row in csv.DictReader(fh)
        ]


def by_speaker(utterances: list[Utterance], prefix: str = "") -> dict[str, list[Utterance]]:
    """Single-speaker utterances grouped by speaker (sorted by path, so splits are reproducible)."""
    groups: dict[str, list[Utterance]] = defaultdict(list)
    for u in sorted(utterances, key=lambda u: str(u.path)):
        if u.speaker != "multi" and str(u.path).find(prefix) >= 0:
            groups[u.speaker].append(u)
    return dict(groups)


@dataclass(frozen=True)
class Turn:
    speaker: str
    start_s: float
    end_s: float


def build_conversation(
    turns: list[tuple[str, np.ndarray]],
    rng: np.random.Generator,
    pause_s: tuple[float, float] = (0.3, 1.0),
    lead_s: float = 0.5,
) -> tuple[np.ndarray, list[Turn]]:
    """Concatenate (speaker, 16 kHz audio) turns with random pauses; returns audio and the reference."""
    pieces = [np.zeros(int(lead_s * SAMPLE_RATE), np.float32)]
    reference = []
    t = lead_s
    for speaker, audio in turns:
        reference.append(Turn(speaker, t, t + len(audio) / SAMPLE_RATE))
        pieces.append(audio.astype(np.float32))
        t += len(audio) / SAMPLE_RATE
        pause = float(rng.uniform(*pause_s))
        pieces.append(np.zeros(int(pause * SAMPLE_RATE), np.float32))
        t += pause
    return np.concatenate(pieces), reference


def load_audio(utterance: Utterance) -> np.ndarray:
    return decode_file(utterance.path)


def write_rttm(path: Path, file_id: str, reference: list[Turn]) -> None:
    with path.open("w") as fh:
        for turn in reference:
            duration = turn.end_s - turn.start_s
            fh.write(
                f"SPEAKER {file_id} 1 {turn.start_s:.3f} {duration:.3f} <NA> <NA> {turn.speaker} <NA> <NA>\n"
            )
