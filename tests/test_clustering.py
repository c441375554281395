"""Online clustering (discovery, outliers, merges, stable labels, snapshots) and the offline re-clustering."""

from __future__ import annotations

import numpy as np
import pytest

from speakerflow.processors.clustering import OnlineClustering
from speakerflow.processors.offline_clustering import (
    OfflineConfig,
    align_to,
    fold_small,
    recluster,
    second_labels,
    viterbi,
)

DIM = 64


def speakers(count: int, seed: int = 0) -> np.ndarray:
    """`count` unit vectors, mutually far apart (random directions in 64 dimensions)."""
    rng = np.random.default_rng(seed)
    return _unit(rng.standard_normal((count, DIM)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def windows_of(centre: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.08) -> np.ndarray:
    return _unit(centre + noise * rng.standard_normal((n, DIM)))


def test_new_speakers_are_discovered_and_labels_stay_stable() -> None:
    rng = np.random.default_rng(1)
    centres = speakers(3)
    clustering = OnlineClustering(new_speaker_distance=0.3)
    turns = [0, 1, 0, 2, 1, 2, 0]
    seen: dict[int, int] = {}
    for speaker in turns:
        embs = windows_of(centres[speaker], 6, rng)
        labels = [clustering.assign(e, embs[i + 1 : i + 2]) for i, e in enumerate(embs)]
        assert len(set(labels)) == 1, labels  # one turn, one label
        # The same speaker always gets the label it got the first time.
        assert seen.setdefault(speaker, labels[0]) == labels[0]
    assert sorted(seen.values()) == [0, 1, 2]
    assert len(clustering.alive()) == 3


def test_an_unconfirmed_outlier_does_not_open_a_speaker() -> None:
    rng = np.random.default_rng(2)
    a, stranger = speakers(2, seed=3)
    clustering = OnlineClustering(new_speaker_distance=0.3)
    for e in windows_of(a, 5, rng):
        clustering.assign(e)
    # A far window followed by windows of the known speaker: labelled, but no new speaker.
    label = clustering.assign(stranger, windows_of(a, 1, rng))
    assert label == 0 and clustering.alive() == [0]
    # The same far window confirmed by the next one opens speaker 1.
    label = clustering.assign(stranger, windows_of(stranger, 1, rng))
    assert label == 1 and clustering.alive() == [0, 1]


def test_close_centroids_merge_into_the_older_label() -> None:
    rng = np.random.default_rng(4)
    a = speakers(1)[0]
    near = _unit(a + 0.9 * _unit(rng.standard_normal(DIM)))  # a's voice, badly estimated at first
    clustering = OnlineClustering(new_speaker_distance=0.2, merge_distance=0.2, confirm_windows=0)
    clustering.assign(a)
    assert clustering.assign(near) == 1  # opened as a second speaker
    for e in windows_of(a, 12, rng, noise=0.05):
        clustering.sums[1] = clustering.sums[1] + e  # speaker 1's centroid drifts towards a
    clustering.assign(windows_of(a, 1, rng)[0])
    assert clustering.alive() == [0]
    assert clustering.resolve(1) == 0


def test_state_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(5)
    centres = speakers(3)
    stream = np.concatenate([windows_of(c, 5, rng) for c in centres[[0, 1, 2, 1, 0]]])
    original = OnlineClustering(new_speaker_distance=0.3)
    for e in stream[:12]:
        original.assign(e, [stream[12]])
    copy = OnlineClustering(new_speaker_distance=0.3)
    copy.load_state(original.state())
    for i, e in enumerate(stream[12:], start=12):
        ahead = stream[i + 1 : i + 2]
        assert original.assign(e, ahead) == copy.assign(e, ahead)
    np.testing.assert_array_equal(original.state()["sums"], copy.state()["sums"])


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_offline_reclustering_finds_the_speaker_count(count: int) -> None:
    rng = np.random.default_rng(10 + count)
    centres = speakers(count, seed=count)
    order = rng.integers(0, count, size=8 * count)
    truth = np.repeat(order, 6)
    embeddings = np.concatenate([windows_of(centres[s], 6, rng, noise=0.05) for s in order])
    weights = np.full(len(truth), 0.5)
    contiguous = np.repeat([True], len(truth) - 1)
    labels = recluster(embeddings, weights, contiguous, config=OfflineConfig(overlap_margin=0.0))
    assert len(np.unique(labels)) == count
    # Same partition as the truth (labels are arbitrary names).
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth, strict=True)}
    assert len(pairs) == count


def test_small_clusters_fold_into_their_nearest_speaker() -> None:
    rng = np.random.default_rng(7)
    a, b = speakers(2)
    embeddings = np.concatenate([windows_of(a, 20, rng), windows_of(b, 20, rng), windows_of(a, 2, rng)])
    labels = np.array([0] * 20 + [1] * 20 + [2] * 2)
    folded = fold_small(embeddings, labels, np.full(42, 0.5), min_total=3.0)
    assert list(np.unique(folded)) == [0, 1]
    assert set(folded[40:]) == {0}


def test_viterbi_removes_a_one_window_blip_but_keeps_real_changes() -> None:
    scores = np.array([[1, 0], [1, 0], [0.45, 0.55], [1, 0], [0, 1], [0, 1], [0, 1]], float)
    path = viterbi(scores, np.ones(6, bool), penalty=0.15)
    assert list(path) == [0, 0, 0, 0, 1, 1, 1]
    # Across a pause (not contiguous) a change costs nothing.
    assert list(viterbi(scores[:3], np.array([True, False]), penalty=0.15)) == [0, 0, 1]


def test_second_labels_mark_ambiguous_windows_at_a_change() -> None:
    a, b = speakers(2)
    mixed = _unit(a + b)
    embeddings = np.stack([a, a, a, mixed, b, b, b])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    second = second_labels(embeddings, labels, np.ones(7), np.ones(6, bool), margin=0.15)
    assert list(second) == [-1, -1, -1, 1, -1, -1, -1]
    assert (second_labels(embeddings, labels, np.ones(7), np.ones(6, bool), margin=0.0) == -1).all()


def test_align_to_keeps_live_names() -> None:
    live = np.array([3, 3, 3, 5, 5, 5, 5, -1])
    revised = np.array([0, 0, 1, 1, 1, 1, 1, 2])
    named = align_to(revised, live, np.ones(8), first_free=6)
    assert list(named) == [3, 3, 5, 5, 5, 5, 5, 6]
