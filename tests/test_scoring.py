"""Scoring: operating points on scores with known error rates, AS-norm, calibration files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from speakerflow.evaluation.roc import (
    equal_error_rate,
    error_rates,
    fit_calibration,
    operating_thresholds,
    threshold_at_far,
)
from speakerflow.processors.scoring import (
    DEFAULT_THRESHOLDS,
    Calibration,
    Cohort,
    as_norm,
    calibration_file,
    cosine_scores,
    default_calibration,
    load_calibration,
    save_calibration,
    top_n_stats,
)

# Hand-made trials whose ROC convex hull crosses the diagonal at (0.2, 0.2).
TARGET = np.array([0.1, 0.6, 0.7, 0.8, 0.9])
NONTARGET = np.array([0.0, 0.2, 0.3, 0.4, 0.65])


def gaussian_scores(n: int, separation: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Targets N(+d/2, 1) and non-targets N(-d/2, 1): EER = Phi(-d/2)."""
    rng = np.random.default_rng(seed)
    return rng.normal(separation / 2, 1, n), rng.normal(-separation / 2, 1, n)


def test_cosine_scores_of_normalised_rows() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]], np.float32)
    assert np.allclose(cosine_scores(a, b), [[1.0, math.sqrt(0.5)], [0.0, math.sqrt(0.5)]])


def test_eer_of_hand_made_trials() -> None:
    eer, threshold = equal_error_rate(TARGET, NONTARGET)
    assert eer == pytest.approx(0.2)
    far, frr = error_rates(TARGET, NONTARGET, threshold)
    assert far == pytest.approx(0.2) and frr == pytest.approx(0.2)


@pytest.mark.parametrize("separation", [1.0, 2.0, 3.0])
def test_eer_of_gaussian_scores_matches_theory(separation: float) -> None:
    target, nontarget = gaussian_scores(200_000, separation)
    eer, threshold = equal_error_rate(target, nontarget)
    assert eer == pytest.approx(norm.cdf(-separation / 2), abs=0.004)
    assert threshold == pytest.approx(0.0, abs=0.03)


def test_eer_extremes() -> None:
    assert equal_error_rate(np.array([0.9, 0.8]), np.array([0.1, 0.2]))[0] == 0.0
    same = np.linspace(0, 1, 1001)
    assert equal_error_rate(same, same)[0] == pytest.approx(0.5, abs=0.002)
    assert equal_error_rate(np.array([0.1, 0.2]), np.array([0.8, 0.9]))[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        equal_error_rate(np.array([]), NONTARGET)


def test_threshold_at_far_accepts_exactly_the_allowed_non_targets() -> None:
    nontarget = np.random.default_rng(1).permutation(np.arange(1000) / 1000.0)
    for far in (0.1, 0.01, 0.001):
        threshold = threshold_at_far(nontarget, far)
        assert int((nontarget >= threshold).sum()) == round(far * 1000)
    # Below one allowed false accept: nothing may pass.
    assert (nontarget >= threshold_at_far(nontarget, 0.0001)).sum() == 0
    # float32 scores (what embedders give): the nudge past the best impostor survives the comparison.
    scores32 = nontarget.astype(np.float32)
    assert (scores32 >= threshold_at_far(scores32, 0.0001)).sum() == 0


def test_operating_thresholds_are_ordered() -> None:
    target, nontarget = gaussian_scores(50_000, 3.0)
    points = operating_thresholds(target, nontarget)
    assert set(points) == {"eer", "far1", "far0.1", "far0.01"}
    assert points["eer"] < points["far1"] < points["far0.1"] < points["far0.01"]
    assert error_rates(target, nontarget, points["far1"])[0] == pytest.approx(0.01, abs=1e-4)
    # Gaussians: the 1 % FAR threshold is the 99th percentile of N(-1.5, 1).
    assert points["far1"] == pytest.approx(-1.5 + norm.ppf(0.99), abs=0.05)


# --------------------------------------------------------------------------------------------------
# AS-norm
# --------------------------------------------------------------------------------------------------


def test_top_n_stats_ignore_excluded_entries() -> None:
    scores = np.array([[0.9, 0.1, 0.5, np.nan, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    mean, std = top_n_stats(scores, 3)
    assert mean[0] == pytest.approx(np.mean([0.9, 0.5, 0.3]))
    assert std[0] == pytest.approx(np.std([0.9, 0.5, 0.3]))
    assert mean[1] == pytest.approx(0.2)
    assert std[1] > 0  # floored, never a division by zero


def test_as_norm_removes_a_per_model_score_offset() -> None:
    # Two enrolment models whose scores live on shifted scales: raw pooling mixes them up,
    # AS-norm (which sees the same shift in the cohort scores) puts them on one scale.
    rng = np.random.default_rng(3)
    pooled_raw, pooled_norm, labels = [], [], []
    for offset in (0.0, 0.4):
        cohort_scores = rng.normal(0.2 + offset, 0.05, (1, 400))
        stats = top_n_stats(cohort_scores, 50)
        tar = rng.normal(0.6 + offset, 0.05, 500)
        non = rng.normal(0.2 + offset, 0.05, 500)
        raw = np.concatenate([tar, non])
        pooled_raw.append(raw)
        pooled_norm.append(as_norm(raw, stats, stats))
        labels.append(np.r_[np.ones(500), np.zeros(500)].astype(bool))
    raw, normed, label = np.concatenate(pooled_raw), np.concatenate(pooled_norm), np.concatenate(labels)
    eer_raw = equal_error_rate(raw[label], raw[~label])[0]
    eer_norm = equal_error_rate(normed[label], normed[~label])[0]
    assert eer_raw > 0.1
    assert eer_norm < eer_raw / 5


def test_cohort_leaves_out_the_trial_speakers() -> None:
    rng = np.random.default_rng(4)
    dim = 32
    enrol = rng.normal(size=(1, dim))
    enrol /= np.linalg.norm(enrol)
    others = rng.normal(size=(20, dim))
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    # The enrolled speaker is also in the cohort: a perfect "impostor" unless excluded.
    cohort = Cohort(
        np.vstack([enrol, others]).astype(np.float32), ("alice", *[f"s{i}" for i in range(20)]), 5
    )
    with_alice = cohort.stats(enrol, [set()])[0][0]
    without = cohort.stats(enrol, [{"alice"}])[0][0]
    assert with_alice > without + 0.1
    normalised = cohort.normalise(enrol, enrol, {"alice"})
    assert normalised.shape == (1, 1) and normalised[0, 0] > 3  # a target far above the impostors


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


def test_calibration_keeps_its_positional_form() -> None:
    cal = Calibration(0.7)
    assert cal.confidence(0.7) == pytest.approx(0.5)
    assert Calibration(0.7, 10.0).slope == 10.0


def test_fitted_calibration_round_trip(tmp_path: Path) -> None:
    target, nontarget = gaussian_scores(20_000, 3.0, seed=5)
    target, nontarget = 0.8 + 0.05 * target, 0.8 + 0.05 * nontarget  # a cosine-like scale
    record = fit_calibration(target, nontarget, "ge2e-test-1234", manifest="/data/manifest.csv")
    assert record["slope"] > 0
    assert record["trials"] == {"target": 20_000, "nontarget": 20_000}
    # Balanced logistic regression: the log-likelihood ratio is 0 where the two densities cross.
    assert -record["offset"] / record["slope"] == pytest.approx(0.8, abs=0.01)
    path = save_calibration(record, tmp_path)
    assert path == calibration_file(tmp_path, "ge2e-test-1234")
    assert json.loads(path.read_text())["thresholds"] == record["thresholds"]
    assert load_calibration(tmp_path, "ge2e-test-1234") == record

    for point in ("eer", "far1", "far0.1", "far0.01"):
        cal = default_calibration("ge2e-test-1234", calibration_dir=tmp_path, operating_point=point)
        assert cal.threshold == pytest.approx(record["thresholds"][point])
        assert cal.slope == pytest.approx(record["slope"])
        assert cal.source == str(path)
        assert cal.confidence(cal.threshold) == pytest.approx(0.5)
        grid = np.linspace(0.5, 1.2, 281)  # synthetic scores may pass 1
        conf = np.array([cal.confidence(s) for s in grid])
        assert np.all(np.diff(conf) >= 0) and conf[0] < 0.01 and conf[-1] > 0.99
        assert all(0.0 <= c <= 1.0 for c in conf)
    far = error_rates(target, nontarget, record["thresholds"]["far1"])[0]
    assert far == pytest.approx(0.01, abs=1e-4)


def test_default_calibration_without_a_file(tmp_path: Path) -> None:
    cal = default_calibration("ge2e-resemblyzer-abcd", calibration_dir=tmp_path)
    assert cal.threshold == DEFAULT_THRESHOLDS["ge2e"] and cal.source == "default"
    assert default_calibration("ecapa-1234").threshold == DEFAULT_THRESHOLDS["ecapa"]
    assert default_calibration("ge2e-x", threshold=0.66).threshold == 0.66


def test_manual_threshold_overrides_a_calibration_file(tmp_path: Path) -> None:
    target, nontarget = gaussian_scores(2000, 3.0)
    save_calibration(fit_calibration(target, nontarget, "ge2e-m"), tmp_path)
    cal = default_calibration("ge2e-m", threshold=0.42, calibration_dir=tmp_path)
    assert cal.threshold == 0.42 and cal.operating_point == "manual"


def test_calibration_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="operating point"):
        default_calibration("ge2e-x", operating_point="far5")
    record = fit_calibration(*gaussian_scores(500, 2.0), "ge2e-a")
    calibration_file(tmp_path, "ge2e-b").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="ge2e-a"):
        default_calibration("ge2e-b", calibration_dir=tmp_path)
