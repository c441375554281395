"""Scores to decisions: cosine similarity, calibrated confidence and default operating points."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Cosine thresholds per embedder family, used until a calibration for the exact model id exists.
# GE2E: on ../shared/data full utterances, same-speaker scores sit above 0.79 and different-speaker
# scores below 0.75 (see README "Accuracy"); ECAPA-TDNN's usual cosine operating point is ~0.3.
DEFAULT_THRESHOLDS = {"ge2e": 0.75, "ecapa": 0.30}


def cosine_scores(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(Q, R) cosine similarities of L2-normalised rows."""
    return np.asarray(queries, np.float32) @ np.asarray(references, np.float32).T


@dataclass(frozen=True)
class Calibration:
    """Logistic map from a cosine score to a probability that the two voices are the same speaker.

    confidence = sigmoid(slope * (score - threshold)): 0.5 exactly at the decision threshold.
    """

    threshold: float
    slope: float = 25.0

    def confidence(self, score: float) -> float:
        z = self.slope * (score - self.threshold)
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def default_calibration(model_id: str, threshold: float = 0.0) -> Calibration:
    """The calibration for `model_id`, with `threshold` overriding the family default when > 0."""
    family = model_id.split("-", 1)[0]
    return Calibration(threshold if threshold > 0 else DEFAULT_THRESHOLDS.get(family, 0.5))
