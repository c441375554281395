"""A speaker's voiceprint: the L2-normalised centroid of their enrolled speech, and how to grow it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Voiceprint:
    speaker_id: str
    name: str
    model_id: str
    embedding: np.ndarray  # float32, L2-normalised
    sample_count: int
    speech_seconds: float
    updated_at_ms: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[0])

    def merged_with(self, other: Voiceprint) -> Voiceprint:
        """Add `other`'s samples: the centroid is weighted by speech seconds, so one long sample
        counts more than a short one, and the order of additions does not matter."""
        if other.model_id != self.model_id:
            raise ValueError(f"cannot merge voiceprints of models {self.model_id} and {other.model_id}")
        total = self.speech_seconds + other.speech_seconds
        mixed = self.embedding * self.speech_seconds + other.embedding * other.speech_seconds
        mixed = mixed / max(float(np.linalg.norm(mixed)), 1e-12)
        return Voiceprint(
            self.speaker_id,
            other.name or self.name,
            self.model_id,
            mixed.astype(np.float32),
            self.sample_count + other.sample_count,
            total,
            other.updated_at_ms,
            self.metadata | other.metadata,
        )

    def to_record(self) -> dict:
        """The Avro `Voiceprint` record (schemas/Voiceprint.avsc)."""
        return {
            "speaker_id": self.speaker_id,
            "name": self.name,
            "model_id": self.model_id,
            "dim": self.dim,
            "embedding": self.embedding.astype(np.float32).tolist(),
            "sample_count": self.sample_count,
            "speech_seconds": float(self.speech_seconds),
            "updated_at_ms": int(self.updated_at_ms),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_record(cls, record: dict) -> Voiceprint:
        embedding = np.asarray(record["embedding"], np.float32)
        if embedding.shape != (record["dim"],):
            raise ValueError(f"voiceprint {record['speaker_id']}: embedding length {embedding.shape} != dim")
        return cls(
            record["speaker_id"],
            record["name"],
            record["model_id"],
            embedding,
            record["sample_count"],
            record["speech_seconds"],
            record["updated_at_ms"],
            dict(record.get("metadata") or {}),
        )
