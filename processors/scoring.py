"""Scores to decisions: cosine similarity, AS-norm, calibrated confidence and operating points.

A calibration belongs to one model id (scores of different models live on different scales). It is
fitted on labelled trials (`fit_calibration`), saved as JSON (`save_calibration`) and found again by
`default_calibration`, which falls back to the per-family defaults below when no file exists.

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
DEFAULT_THRESHOLDS = {"ge2e": 0.75, "ecapa": 0.30}

# Operating points: name -> target false-accept rate per trial (None = equal error rate).
OPERATING_POINTS: dict[str, float | None] = {"eer": None, "far1": 0.01, "far0.1": 0.001, "far0.01": 0.0001}
# Identification is 1:N: an unknown voice is compared with every enrolled speaker, so the chance that
# one of them passes grows about N-fold. A per-trial FAR of 0.01 % keeps open-set false accepts near
# 1 % for a gallery of ~100 speakers; plain 1:1 verification may prefer `far1` or `eer`.
DEFAULT_OPERATING_POINT = "far0.01"
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
# Operating points
# --------------------------------------------------------------------------------------------------


def equal_error_rate(target: np.ndarray, nontarget: np.ndarray) -> tuple[float, float]:
    """(EER, threshold): where the miss rate (target < t) meets the false-accept rate (nontarget >= t).

    Computed on the ROC convex hull (as BOSARIS' `rocch2eer`), so the value does not depend on how
    ties and steps of the empirical curve are interpolated.
    """
    target, nontarget = np.asarray(target, np.float64), np.asarray(nontarget, np.float64)
    if not len(target) or not len(nontarget):
        raise ValueError("EER needs at least one target and one non-target score")
    pmiss, pfa, thresholds = _roc_steps(target, nontarget)
    corners = _corners(pmiss, pfa)
    pmiss_h, pfa_h = _convex_hull(pmiss[corners], pfa[corners])
    eer = 0.0
    for i in range(len(pmiss_h) - 1):
        xx, yy = pfa_h[i : i + 2], pmiss_h[i : i + 2]
        dx, dy = xx[1] - xx[0], yy[1] - yy[0]
        # Segment of the hull; the EER is the largest y = x crossing over all segments' lower envelopes.
        if dx == 0 and dy == 0:
            continue
        denom = dx - dy
        if denom == 0:
            continue
        t = (yy[0] - xx[0]) / denom
        if 0 <= t <= 1:
            eer = max(eer, xx[0] + t * dx)
    # The threshold where the empirical rates are closest to each other.
    best = int(np.argmin(np.abs(pmiss - pfa)))
    return float(eer), float(thresholds[best])


def _roc_steps(target: np.ndarray, nontarget: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-accept rates at every distinct threshold (accept when score >= threshold),
    from 'accept everything' (pmiss 0, pfa 1) to 'accept nothing' (pmiss 1, pfa 0)."""
    scores = np.concatenate([target, nontarget])
    labels = np.concatenate([np.ones(len(target)), np.zeros(len(nontarget))])
    order = np.argsort(scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # Rejecting the k lowest scores: misses = targets among them, false accepts = the rest's non-targets.
    cum_tar = np.concatenate([[0], np.cumsum(labels)])
    cum_non = np.concatenate([[0], np.cumsum(1 - labels)])
    # Only cut between distinct scores.
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(scores)) + 1, [len(scores)]])
    pmiss = cum_tar[cuts] / len(target)
    pfa = 1 - cum_non[cuts] / len(nontarget)
    # Between the last rejected and the first accepted score: the middle generalises best.
    inner = (scores[cuts[1:-1] - 1] + scores[cuts[1:-1]]) / 2
    thresholds = np.concatenate([[scores[0]], inner, [np.nextafter(scores[-1], np.inf)]])
    return pmiss, pfa, thresholds


def _corners(pmiss: np.ndarray, pfa: np.ndarray) -> np.ndarray:
    """Indices of the ROC points where the curve turns; points inside a straight run of targets only
    or non-targets only cannot be hull vertices, and dropping them keeps the hull cheap."""
    d_miss, d_fa = np.diff(pmiss), np.diff(pfa)
    straight = ((d_fa[:-1] == 0) & (d_fa[1:] == 0)) | ((d_miss[:-1] == 0) & (d_miss[1:] == 0))
    return np.concatenate([[0], np.flatnonzero(~straight) + 1, [len(pmiss) - 1]])


def _convex_hull(pmiss: np.ndarray, pfa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower-left convex hull of the ROC points (pfa, pmiss), ordered by decreasing pfa."""
    points = sorted(set(zip(pfa.tolist(), pmiss.tolist(), strict=True)))  # increasing pfa
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or above the segment from hull[-2] to p.
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    xs, ys = np.array([h[0] for h in hull]), np.array([h[1] for h in hull])
    return ys[::-1], xs[::-1]


def threshold_at_far(nontarget: np.ndarray, far: float) -> float:
    """A threshold that accepts (>= t) as many non-target scores as a false-accept rate of `far`
    allows and no more: midway between the last allowed and the first refused non-target score."""
    ordered = np.sort(np.asarray(nontarget, np.float64))[::-1]
    allowed = math.floor(far * len(ordered) + 1e-9)
    if allowed >= len(ordered):
        return float(ordered[-1])
    if allowed == 0:
        return float(np.nextafter(ordered[0], np.inf))
    middle = (ordered[allowed - 1] + ordered[allowed]) / 2
    return float(middle if middle > ordered[allowed] else np.nextafter(ordered[allowed], np.inf))


def error_rates(target: np.ndarray, nontarget: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false-accept rate, false-reject rate) when accepting scores >= threshold."""
    far = float(np.mean(np.asarray(nontarget) >= threshold)) if len(nontarget) else 0.0
    frr = float(np.mean(np.asarray(target) < threshold)) if len(target) else 0.0
    return far, frr


def operating_thresholds(target: np.ndarray, nontarget: np.ndarray) -> dict[str, float]:
    """The threshold of every named operating point."""
    out = {}
    for name, far in OPERATING_POINTS.items():
        out[name] = (
            equal_error_rate(target, nontarget)[1] if far is None else threshold_at_far(nontarget, far)
        )
    return out


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


def fit_logistic(target: np.ndarray, nontarget: np.ndarray, c: float = 1.0) -> tuple[float, float]:
    """(slope, offset) of a logistic regression of the label on the score, classes weighted equally,
    so that slope * score + offset estimates the log-likelihood ratio. The L2 penalty (inverse
    strength `c`) keeps the slope finite when the trials are perfectly separable."""
    from sklearn.linear_model import LogisticRegression

    scores = np.concatenate([target, nontarget]).astype(np.float64)[:, None]
    labels = np.concatenate([np.ones(len(target)), np.zeros(len(nontarget))])
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    model.fit(scores, labels)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def fit_calibration(
    target: np.ndarray,
    nontarget: np.ndarray,
    model_id: str,
    manifest: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A calibration record (JSON-ready) fitted on labelled trial scores of one model."""
    target, nontarget = np.asarray(target, np.float64), np.asarray(nontarget, np.float64)
    slope, offset = fit_logistic(target, nontarget)
    thresholds = operating_thresholds(target, nontarget)
    rates = {}
    for name, t in thresholds.items():
        far, frr = error_rates(target, nontarget, t)
        rates[name] = {"far": far, "frr": frr}
    eer, _ = equal_error_rate(target, nontarget)
    return {
        "model_id": model_id,
        "score": "cosine",
        "slope": slope,
        "offset": offset,
        "thresholds": thresholds,
        "rates": rates,
        "eer": eer,
        "manifest": manifest,
        "trials": {"target": len(target), "nontarget": len(nontarget)},
        **(extra or {}),
    }


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
    if operating_point not in OPERATING_POINTS:
        raise ValueError(f"unknown operating point {operating_point!r}; choose from {list(OPERATING_POINTS)}")
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
