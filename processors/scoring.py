"""Scores to decisions: cosine similarity, AS-norm, calibrated confidence and operating points.

A calibration belongs to one model id (scores of different models live on different scales). It is
fitted on labelled trials (`fit_calibration` in evaluation/roc.py), saved as JSON (`save_calibration`)
and found again by `default_calibration`, which falls back to the per-family defaults below when no
file exists.

Confidence is `sigmoid(slope * (score - threshold))`. The slope comes from a logistic regression of
the trial labels on the score with balanced class weights, so `slope * score + offset` estimates the
log-likelihood ratio of "same speaker". Moving the offset so that the sigmoid crosses 0.5 at the
operating threshold is the same as choosing the target prior for which that threshold is the Bayes
decision: the confidence is then the posterior under that prior, and 0.5 exactly at the threshold.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Cosine thresholds per embedder family, used until a calibration for the exact model id exists
# (`speakerflow calibrate`). GE2E at 0.75 on all ../shared/data trials (`speakerflow eval verify`):
# 2.3 % false accepts, 11 % false rejects per trial; 55 % of unknown probes pass in 1:138
# identification, so calibrate before trusting UNKNOWN. ECAPA-TDNN's usual cosine point is ~0.3.
# CAM++ 0.50: the `far0.01` threshold (the default operating point) that `speakerflow calibrate --crop
# full,3,2` fits on the tuning speakers only (35 LibriSpeech speakers, 8,772 non-target trials: 0.502).
DEFAULT_THRESHOLDS = {"campplus": 0.50, "ge2e": 0.75, "ecapa": 0.30}

# Operating points: name -> target false-accept rate per trial (None = equal error rate).
OPERATING_POINTS: dict[str, float | None] = {"eer": None, "far1": 0.01, "far0.1": 0.001, "far0.01": 0.0001}
# Identification is 1:N: an unknown voice is compared with every enrolled speaker, so the chance that
# one of them passes grows about N-fold. A per-trial FAR of 0.01 % keeps open-set false accepts near
# 1 % for a gallery of ~100 speakers; plain 1:1 verification may prefer `far1` or `eer`.
DEFAULT_OPERATING_POINT = "far0.01"
# Identification points, fitted on 1:N identification itself rather than on 1:1 trials: name -> the
# share of unknown voices (each calibration speaker left out of the gallery in turn) that may pass
# against someone. Only a calibration file has them (`speakerflow calibrate`); they hold for galleries
# about the size of the calibration's, since false accepts grow with the number of voiceprints.
OPEN_SET_POINTS: dict[str, float] = {"open1": 0.01}
DEFAULT_SLOPE = 25.0


def cosine_scores(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(Q, R) cosine similarities of L2-normalised rows."""
    return np.asarray(queries, np.float32) @ np.asarray(references, np.float32).T


# --------------------------------------------------------------------------------------------------
# Adaptive symmetric score normalisation (AS-norm)
# --------------------------------------------------------------------------------------------------


def top_n_stats(cohort_scores: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the `top_n` highest scores of each row (NaN = excluded)."""
    scores = np.where(np.isnan(cohort_scores), -np.inf, np.asarray(cohort_scores, np.float64))
    n = min(top_n, scores.shape[1])
    top = -np.sort(-scores, axis=1)[:, :n]
    valid = np.isfinite(top)
    count = np.maximum(valid.sum(axis=1), 1)
    top = np.where(valid, top, 0.0)
    mean = top.sum(axis=1) / count
    var = np.where(valid, (top - mean[:, None]) ** 2, 0.0).sum(axis=1) / count
    return mean, np.sqrt(np.maximum(var, 1e-12))


def as_norm(
    raw: np.ndarray,
    enrol_stats: tuple[np.ndarray, np.ndarray],
    test_stats: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """AS-norm: the mean of the score z-normalised by each side's top-N impostor cohort statistics."""
    (mu_e, sd_e), (mu_t, sd_t) = enrol_stats, test_stats
    return 0.5 * ((raw - mu_e) / sd_e + (raw - mu_t) / sd_t)


@dataclass(frozen=True)
class Cohort:
    """Impostor cohort for AS-norm: embeddings (one row per cohort speaker) and their speaker ids."""

    embeddings: np.ndarray
    speakers: tuple[str, ...]
    top_n: int = 50

    def stats(self, embeddings: np.ndarray, exclude: list[set[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Top-N statistics of each row of `embeddings`, ignoring the cohort speakers in `exclude[i]`
        (the speakers of the trial, so that a target never counts as its own impostor)."""
        scores = cosine_scores(embeddings, self.embeddings).astype(np.float64)
        for row, names in enumerate(exclude):
            mask = np.fromiter((s in names for s in self.speakers), bool, len(self.speakers))
            scores[row, mask] = np.nan
        return top_n_stats(scores, self.top_n)

    def normalise(
        self, enrol: np.ndarray, test: np.ndarray, trial_speakers: set[str] | None = None
    ) -> np.ndarray:
        """AS-norm scores of every enrol row against every test row, shape (E, T)."""
        names = trial_speakers or set()
        raw = cosine_scores(enrol, test).astype(np.float64)
        mu_e, sd_e = self.stats(enrol, [names] * len(enrol))
        mu_t, sd_t = self.stats(test, [names] * len(test))
        return as_norm(raw, (mu_e[:, None], sd_e[:, None]), (mu_t[None, :], sd_t[None, :]))


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Logistic map from a cosine score to a probability that the two voices are the same speaker.

    confidence = sigmoid(slope * (score - threshold)): 0.5 exactly at the decision threshold.
    """

    threshold: float
    slope: float = DEFAULT_SLOPE
    model_id: str = ""
    operating_point: str = ""
    source: str = "default"  # "default" or the calibration file it came from

    def confidence(self, score: float) -> float:
        z = self.slope * (score - self.threshold)
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def accepts(self, score: float) -> bool:
        return score >= self.threshold


def calibration_file(directory: Path | str, model_id: str) -> Path:
    """Where the calibration of `model_id` lives (one JSON file per model id)."""
    return Path(directory) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', model_id)}.json"


def save_calibration(record: dict[str, Any], directory: Path | str) -> Path:
    path = calibration_file(directory, record["model_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a worker starting meanwhile never reads half a file
    return path


def load_calibration(directory: Path | str, model_id: str) -> dict[str, Any] | None:
    """The stored calibration record of `model_id`, or None when there is none."""
    path = calibration_file(directory, model_id)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("model_id") != model_id:
        raise ValueError(f"{path} holds the calibration of {record.get('model_id')!r}, not {model_id!r}")
    return record


def calibration_from_record(
    record: dict[str, Any], operating_point: str = DEFAULT_OPERATING_POINT, source: str = ""
) -> Calibration:
    if operating_point not in record["thresholds"]:
        raise ValueError(
            f"operating point {operating_point!r} is not in the calibration; "
            f"choose from {sorted(record['thresholds'])}"
        )
    return Calibration(
        threshold=float(record["thresholds"][operating_point]),
        slope=float(record["slope"]),
        model_id=record["model_id"],
        operating_point=operating_point,
        source=source or "record",
    )


def default_calibration(
    model_id: str,
    threshold: float = 0.0,
    calibration_dir: Path | str | None = None,
    operating_point: str = DEFAULT_OPERATING_POINT,
) -> Calibration:
    """The calibration for `model_id`: the fitted file in `calibration_dir` at `operating_point` when
    one exists, else the family default; `threshold` > 0 overrides the threshold either way."""
    known = [*OPERATING_POINTS, *OPEN_SET_POINTS]
    if operating_point not in known:
        raise ValueError(f"unknown operating point {operating_point!r}; choose from {known}")
    record = load_calibration(calibration_dir, model_id) if calibration_dir else None
    if record is not None:
        fitted = calibration_from_record(
            record, operating_point, str(calibration_file(calibration_dir, model_id))
        )
        if threshold > 0:
            return Calibration(threshold, fitted.slope, model_id, "manual", fitted.source)
        return fitted
    family = model_id.split("-", 1)[0]
    if threshold > 0:
        return Calibration(threshold, model_id=model_id, operating_point="manual")
    return Calibration(DEFAULT_THRESHOLDS.get(family, 0.5), model_id=model_id, operating_point="default")
