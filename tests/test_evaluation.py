"""Evaluation: items and trials, metrics with known values, AS-norm over trials, identification, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from speakerflow.evaluation.corpus import Utterance
from speakerflow.evaluation.verification import (
    Item,
    build_items,
    build_trials,
    crop,
    cross_fitted_open_set,
    det_curve,
    excluded_cohort_stats,
    identification_metrics,
    identification_split,
    min_dcf,
    open_set_calibration,
    parse_crops,
    plot_det,
    probe_results,
    source_masks,
    speaker_folds,
    speech_of,
    trial_scores,
    verification_metrics,
)
from speakerflow.processors.scoring import top_n_stats

ROOT = Path("/corpus")


def utterances() -> list[Utterance]:
    rows = [
        ("librispeech/a/1.flac", "ls-a"),
        ("librispeech/a/2.flac", "ls-a"),
        ("librispeech/a/3.flac", "ls-a"),
        ("librispeech/b/1.flac", "ls-b"),  # a single-utterance speaker: split in halves
        ("vctk/c/1.flac", "vctk-c"),
        ("vctk/c/2.flac", "vctk-c"),
        ("ami/meeting.flac", "multi"),  # never an item
    ]
    return [Utterance(ROOT / path, speaker, 3.0) for path, speaker in rows]


def test_items_split_single_utterance_speakers_and_skip_multi() -> None:
    items = build_items(utterances(), ROOT)
    assert [it.part for it in items] == ["full", "full", "full", "first-half", "second-half", "full", "full"]
    assert {it.source for it in items} == {"librispeech", "vctk"}
    assert len({it.key for it in items}) == len(items)
    assert all(it.speaker != "multi" for it in items)


def test_trials_are_all_unordered_pairs_with_earlier_item_enrolled() -> None:
    items = build_items(utterances(), ROOT)
    trials = build_trials(items)
    n = len(items)
    assert len(trials) == n * (n - 1) // 2
    assert np.all(trials.enrol < trials.test)
    # Targets: ls-a 3 pairs, ls-b its two halves, vctk-c 1 pair.
    assert trials.counts == {"target": 5, "nontarget": n * (n - 1) // 2 - 5}
    pairs = zip(trials.enrol, trials.test, trials.target, strict=True)
    halves = [(items[e].part, items[t].part) for e, t, y in pairs if y]
    assert ("first-half", "second-half") in halves
    masks = source_masks(items, trials)
    assert set(masks) == {"librispeech", "vctk"}
    assert trials.subset(masks["vctk"]).counts["target"] == 1


def test_crop_is_deterministic_and_keeps_short_inputs_whole() -> None:
    audio = np.arange(16000 * 10, dtype=np.float32)
    a, b = crop(audio, 3.0, "x"), crop(audio, 3.0, "x")
    assert len(a) == 48000 and np.array_equal(a, b)
    assert not np.array_equal(a, crop(audio, 3.0, "y"))  # another item, another window
    assert not np.array_equal(a, crop(audio, 3.0, "x", seed=1))
    assert np.all(np.diff(a) == 1)  # one contiguous window
    short = audio[:8000]
    assert crop(short, 2.0, "x") is short


def test_parse_crops() -> None:
    assert parse_crops("2,3,full") == [2.0, 3.0, None]
    assert parse_crops("1.5s") == [1.5]
    with pytest.raises(ValueError):
        parse_crops("0")
    with pytest.raises(ValueError):
        parse_crops(" ,")


def test_det_curve_is_monotone() -> None:
    rng = np.random.default_rng(0)
    pfa, pmiss, thresholds = det_curve(rng.normal(1, 1, 500), rng.normal(-1, 1, 2000))
    assert np.all(np.diff(thresholds) > 0)
    assert np.all(np.diff(pfa) <= 0) and np.all(np.diff(pmiss) >= 0)
    assert pfa[0] == 1.0 and pmiss[0] == 0.0


def test_min_dcf_of_hand_made_trials() -> None:
    target = np.array([0.1, 0.6, 0.7, 0.8, 0.9])
    nontarget = np.array([0.0, 0.2, 0.3, 0.4, 0.65])
    # p_target 0.5: min over thresholds of P_miss + P_fa = 0.4 (at 0.2 / 0.2 or at 0.4 / 0).
    assert min_dcf(target, nontarget, p_target=0.5)[0] == pytest.approx(0.4)
    # p_target 0.01: a false accept costs 99 misses, so refuse every non-target: P_miss 0.4.
    value, threshold = min_dcf(target, nontarget, p_target=0.01)
    assert value == pytest.approx(0.4) and threshold > 0.65
    assert min_dcf(np.array([0.9]), np.array([0.1]))[0] == 0.0
    # Never worse than the trivial "reject everything" system.
    assert min_dcf(np.array([0.1]), np.array([0.9]))[0] == pytest.approx(1.0)


def test_verification_metrics_on_scores_with_known_eer() -> None:
    rng = np.random.default_rng(2)
    target, nontarget = rng.normal(1.5, 1, 100_000), rng.normal(-1.5, 1, 100_000)
    metrics = verification_metrics(target, nontarget, threshold=0.0)
    assert metrics["eer"] == pytest.approx(norm.cdf(-1.5), abs=0.004)
    assert metrics["at_threshold"]["far"] == pytest.approx(norm.cdf(-1.5), abs=0.004)
    assert metrics["at_threshold"]["frr"] == pytest.approx(norm.cdf(-1.5), abs=0.004)
    assert 0.0 < metrics["min_dcf"] <= 1.0
    assert metrics["operating_points"]["far1"]["far"] == pytest.approx(0.01, abs=1e-4)
    assert "note" in verification_metrics(target, np.array([]))


def test_excluded_cohort_stats_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    speakers, dim, rows, top_n = 12, 16, 9, 4
    cohort = rng.normal(size=(speakers, dim))
    cohort /= np.linalg.norm(cohort, axis=1, keepdims=True)
    emb = rng.normal(size=(rows, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    own = rng.integers(0, speakers, rows)
    mean, std = excluded_cohort_stats(emb, own, cohort, top_n)
    scores = emb @ cohort.T
    for i in range(rows):
        for k in range(speakers):
            masked = scores[i].copy()
            masked[[own[i], k]] = np.nan
            mu, sd = top_n_stats(masked[None, :], top_n)
            assert mean[i, k] == pytest.approx(mu[0]) and std[i, k] == pytest.approx(sd[0])


def synthetic_identification() -> tuple[list[Item], np.ndarray]:
    """Four speakers, four items each, embeddings = speaker direction + small noise."""
    rng = np.random.default_rng(5)
    directions = np.eye(8)[:4]
    items, rows = [], []
    for s in range(4):
        for u in range(4):
            items.append(Item(f"s{s}/{u}", f"spk{s}", "synthetic", Path(f"s{s}/{u}"), "full"))
            v = directions[s] + rng.normal(0, 0.05, 8)
            rows.append(v / np.linalg.norm(v))
    return items, np.array(rows, np.float32)


def test_identification_split_enrols_half_of_each_speaker() -> None:
    items, _ = synthetic_identification()
    split = identification_split(items)
    assert all(len(v) == 2 for v in split.enrol.values())
    assert len(split.probes) == 8
    assert not set(split.probes) & {i for v in split.enrol.values() for i in v}


def test_identification_metrics_closed_and_open_set() -> None:
    items, emb = synthetic_identification()
    split = identification_split(items)
    report = identification_metrics(items, emb, split, {"loose": 0.5, "strict": 1.01}, "loose")
    assert report["closed_set"] == {"top1": 1.0, "top5": 1.0}
    loose, strict = report["open_set"]["loose"], report["open_set"]["strict"]
    # Own speaker ~1.0, others ~0.0: at 0.5 every known probe is accepted, no unknown one is.
    assert loose["false_reject"] == 0.0 and loose["false_accept"] == 0.0 and loose["correct_accept"] == 1.0
    # Above every possible cosine: everything is rejected.
    assert strict["false_reject"] == 1.0 and strict["false_accept"] == 0.0
    report = identification_metrics(items, emb, split, {"none": -1.01}, "none")
    assert report["open_set"]["none"]["false_accept"] == 1.0


def test_identification_counts_a_confusion() -> None:
    items, emb = synthetic_identification()
    split = identification_split(items)
    probe = split.probes[0]
    emb = emb.copy()
    emb[probe] = np.eye(8)[3]  # a probe of spk0 that sounds exactly like spk3
    report = identification_metrics(items, emb, split, {"t": 0.5}, "t")
    assert report["closed_set"]["top1"] == pytest.approx(7 / 8)
    assert report["open_set"]["t"]["misidentified"] == pytest.approx(1 / 8)
    assert report["top1_errors"][0]["predicted"] == "spk3"


def test_speech_of_keeps_audio_without_speech() -> None:
    silence = np.zeros(16000, np.float32)
    kept, found = speech_of(silence)
    assert not found and kept is silence


def test_trial_scores_and_det_plot(tmp_path: Path) -> None:
    items, emb = synthetic_identification()
    trials = build_trials(items)
    scores = trial_scores(emb, emb, trials)
    assert np.allclose(scores, np.sum(emb[trials.enrol] * emb[trials.test], axis=1))
    curves = {"synthetic": (scores[trials.target], scores[~trials.target])}
    path = plot_det(curves, tmp_path / "plots" / "det.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_set_calibration_lets_the_allowed_share_of_unknown_voices_pass() -> None:
    items, emb = synthetic_identification()
    fitted = open_set_calibration(items, emb)
    res = probe_results(items, emb, identification_split(items))
    threshold = fitted["thresholds"]["open1"]
    # 1 % of a handful of unknown probes is none: the threshold sits just above the best impostor.
    assert (res.best_other >= threshold).sum() == 0 and threshold <= res.best_other.max() + 1e-6
    assert fitted["rates"]["open1"]["false_accept"] == 0.0
    assert fitted["identification"] == {"speakers": len(res.speakers), "probes": len(res.probes)}


def test_cross_fitted_thresholds_never_see_the_probes_speakers() -> None:
    items, emb = synthetic_identification()
    folds = speaker_folds(items)
    assert sorted(folds.values()) == [0, 0, 1, 1]
    split = identification_split(items)
    report = cross_fitted_open_set(items, emb, split)
    assert set(report) == {"eer", "far1", "far0.1", "far0.01", "open1"}
    for rates in report.values():
        assert rates["probes"] == len(split.probes)
        assert len(rates["thresholds"]) == 2
        # Own speaker ~1, others ~0: thresholds fitted on the other fold sit in between, so no known
        # probe is rejected or confused (how many unknown ones pass depends on the noise tails).
        assert all(0.0 < t < 0.9 for t in rates["thresholds"])
        assert rates["false_reject"] == 0.0 and rates["misidentified"] == 0.0
        assert 0.0 <= rates["false_accept"] <= 1.0
