"""Identification: the stream side of the stream-table join against the gallery.

For each diarized speaker of a stream (stream id, label) the matcher keeps the evidence seen so far,
one mean embedding per turn weighted by its windows, so that the identity becomes more certain as the
speaker keeps talking and repeated provisional updates of one turn never count twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from gallery.index import ExactIndex
from gallery.voiceprint import Voiceprint
from processors.scoring import Calibration

UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Identification:
    speaker_id: str | None
    name: str
    score: float
    confidence: float
    candidates: list[tuple[str, str, float]]  # (speaker id, name, score), best first


class Gallery:
    """The materialised gallery table: voiceprints of one model, searchable, updated live."""

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.index = ExactIndex(dim)
        self._voiceprints: dict[str, Voiceprint] = {}
        self._lock = threading.Lock()
        self.skipped_other_model = 0

    def __len__(self) -> int:
        return len(self._voiceprints)

    def get(self, speaker_id: str) -> Voiceprint | None:
        return self._voiceprints.get(speaker_id)

    def speakers(self) -> list[Voiceprint]:
        with self._lock:
            return list(self._voiceprints.values())

    def upsert(self, voiceprint: Voiceprint) -> bool:
        """Apply a gallery record; voiceprints of another model are ignored (never compared)."""
        if voiceprint.model_id != self.model_id:
            self.skipped_other_model += 1
            return False
        with self._lock:
            self._voiceprints[voiceprint.speaker_id] = voiceprint
            self.index.upsert(voiceprint.speaker_id, voiceprint.embedding)
        return True

    def delete(self, speaker_id: str) -> bool:
        with self._lock:
            self._voiceprints.pop(speaker_id, None)
            return self.index.delete(speaker_id)

    def name_of(self, speaker_id: str) -> str:
        vp = self._voiceprints.get(speaker_id)
        return vp.name if vp else speaker_id


@dataclass
class Matcher:
    gallery: Gallery
    calibration: Calibration
    top_k: int = 3
    margin: float = 0.0  # best must beat the runner-up by this much to be accepted
    _evidence: dict[tuple[str, str], dict[str, tuple[np.ndarray, int]]] = field(default_factory=dict)

    def identify_turn(
        self, stream_id: str, label: str, segment_id: str, embedding: np.ndarray, window_count: int
    ) -> Identification:
        turns = self._evidence.setdefault((stream_id, label), {})
        turns[segment_id] = (np.asarray(embedding, np.float32), max(window_count, 1))
        total = sum(emb * count for emb, count in turns.values())
        return self.identify(total / max(float(np.linalg.norm(total)), 1e-12))

    def identify(self, embedding: np.ndarray) -> Identification:
        hits = self.gallery.index.search(embedding, max(self.top_k, 2))[0]
        candidates = [(sid, self.gallery.name_of(sid), score) for sid, score in hits]
        if not hits:
            return Identification(None, UNKNOWN, 0.0, 0.0, [])
        best_id, best_score = hits[0]
        runner_up = hits[1][1] if len(hits) > 1 else -1.0
        confidence = self.calibration.confidence(best_score)
        accepted = best_score >= self.calibration.threshold and best_score - runner_up >= self.margin
        if not accepted:
            return Identification(None, UNKNOWN, best_score, 1.0 - confidence, candidates[: self.top_k])
        return Identification(
            best_id, self.gallery.name_of(best_id), best_score, confidence, candidates[: self.top_k]
        )

    def end_stream(self, stream_id: str) -> None:
        for key in [k for k in self._evidence if k[0] == stream_id]:
            del self._evidence[key]
