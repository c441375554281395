"""How well scores separate same from different speakers, and the calibration fitted on them: the
equal error rate on the ROC convex hull, thresholds at a target false-accept rate, and the logistic fit
that `speakerflow calibrate` saves for the runtime's `Calibration` (processors/scoring.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from speakerflow.processors.scoring import OPERATING_POINTS


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
    # Kept in the scores' own precision: a threshold nudged past a float32 score in float64 would
    # round back onto it when compared with float32 scores (numpy compares in the array's dtype).
    scores = np.asarray(nontarget)
    ordered = np.sort(scores if scores.dtype.kind == "f" else scores.astype(np.float64))[::-1]
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
