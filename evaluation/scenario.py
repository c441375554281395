"""The enrollment-plus-conversation scenario used by `make demo` and the end-to-end test.

Three LibriSpeech speakers are enrolled from some of their utterances; a conversation is built from
*other* utterances of those three plus a fourth speaker who is never enrolled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speakerflow.evaluation.corpus import Turn, build_conversation, by_speaker, load_audio, load_manifest

ENROLLED = ("ls-1688", "ls-2033", "ls-3080")
STRANGER = "ls-1998"


@dataclass
class Scenario:
    enrollments: dict[str, list[Path]]  # speaker id -> enrollment files
    audio: np.ndarray  # 16 kHz conversation
    reference: list[Turn]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / 16000


def librispeech_scenario(
    data_dir: Path | str,
    turns: int = 8,
    enroll_files: int = 4,
    max_turn_s: float = 8.0,
    seed: int = 0,
) -> Scenario:
    groups = by_speaker(load_manifest(data_dir), prefix="librispeech/test-other")
    missing = [s for s in (*ENROLLED, STRANGER) if s not in groups]
    if missing:
        raise FileNotFoundError(f"speakers {missing} not found in {data_dir}/manifest.csv")
    rng = np.random.default_rng(seed)
    enrollments = {s: [u.path for u in groups[s][:enroll_files]] for s in ENROLLED}
    held_out = {s: groups[s][enroll_files:] for s in (*ENROLLED, STRANGER)}
    order = _speaker_order((*ENROLLED, STRANGER), turns, rng)
    used: dict[str, int] = {}
    pieces = []
    for speaker in order:
        utterance = held_out[speaker][used.get(speaker, 0) % len(held_out[speaker])]
        used[speaker] = used.get(speaker, 0) + 1
        pieces.append((speaker, load_audio(utterance)[: int(max_turn_s * 16000)]))
    audio, reference = build_conversation(pieces, rng)
    return Scenario(enrollments, audio, reference)


def _speaker_order(speakers: tuple[str, ...], turns: int, rng: np.random.Generator) -> list[str]:
    """Every speaker at least once, never the same speaker twice in a row."""
    order = list(rng.permutation(speakers))
    while len(order) < turns:
        order.append(rng.choice([s for s in speakers if s != order[-1]]))
    return [str(s) for s in order]
