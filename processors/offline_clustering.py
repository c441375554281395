"""End-of-stream re-clustering: all window embeddings of a stream at once, speaker count found automatically.

1. Average-linkage agglomerative clustering (cosine) cut at a distance threshold: the number of
   speakers is whatever the threshold leaves.
2. Clusters holding less than `min_speaker_s` of speech are folded into their nearest big cluster
   (a few stray windows are not a speaker).
3. Refinement: windows are re-assigned to the cluster centroids with a Viterbi pass whose switch
   penalty keeps a speaker's turn in one piece (adjacent windows rarely change speaker), repeated a
   few times as the centroids move.
4. Overlap: a window in the middle of a speaker change that is nearly as close to the neighbouring
   turn's speaker as to its own gets both (`second_labels`), since overlapped speech is scored.

Long streams are first reduced to runs of consecutive windows with the same live label (at most
`run_windows` per run) so that the distance matrix stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import pdist


@dataclass(frozen=True)
class OfflineConfig:
    """threshold: AHC cut (cosine distance, average linkage): higher finds fewer speakers.
    min_speaker_s, min_speaker_share: a cluster owning less speech than min_speaker_s, or than
        min_speaker_share of the stream's speech when that is less (short recordings), is not a
        speaker of its own (never less than a second).
    switch_penalty: cost (in cosine similarity) of changing speaker between adjacent windows.
    overlap_margin: a change-point window gets a second speaker when that speaker's similarity is
        within this margin of its own speaker's (0 disables overlap labelling).
    """

    threshold: float = 0.35
    min_speaker_s: float = 4.0
    min_speaker_share: float = 0.1
    switch_penalty: float = 0.15
    refine_iterations: int = 3
    overlap_margin: float = 0.15
    max_items: int = 1500
    run_windows: int = 8


def ahc(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster ids (0..K-1) from average-linkage AHC on cosine distance, cut at `threshold`."""
    if len(embeddings) == 1:
        return np.zeros(1, np.int64)
    tree = linkage(pdist(embeddings.astype(np.float64), metric="cosine"), method="average")
    return fcluster(tree, t=threshold, criterion="distance").astype(np.int64) - 1


def _unit(mat: np.ndarray) -> np.ndarray:
    return mat / np.maximum(np.linalg.norm(mat, axis=-1, keepdims=True), 1e-12)


def centroids(embeddings: np.ndarray, labels: np.ndarray, weights: np.ndarray, count: int) -> np.ndarray:
    out = np.zeros((count, embeddings.shape[1]))
    np.add.at(out, labels, embeddings * weights[:, None])
    return _unit(out)


def _compact(labels: np.ndarray) -> np.ndarray:
    """Relabel to 0..K-1 in order of first appearance."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(x), len(mapping)) for x in labels], np.int64)


def fold_small(
    embeddings: np.ndarray, labels: np.ndarray, weights: np.ndarray, min_total: float
) -> np.ndarray:
    """Clusters with less total weight than `min_total` join their nearest big cluster."""
    labels = _compact(labels)
    count = int(labels.max()) + 1
    totals = np.bincount(labels, weights=weights, minlength=count)
    big = np.flatnonzero(totals >= min_total)
    if len(big) == 0:
        big = np.array([int(np.argmax(totals))])
    if len(big) == count:
        return labels
    cents = centroids(embeddings, labels, weights, count)
    small = np.isin(labels, big, invert=True)
    nearest = big[np.argmax(embeddings[small] @ cents[big].T, axis=1)]
    out = labels.copy()
    out[small] = nearest
    return _compact(out)


def viterbi(scores: np.ndarray, contiguous: np.ndarray, penalty: float) -> np.ndarray:
    """Best label path for per-item `scores` (N, K) with `penalty` per change between contiguous items."""
    n, k = scores.shape
    back = np.zeros((n, k), np.int64)
    total = scores[0].copy()
    for i in range(1, n):
        cost = penalty if contiguous[i - 1] else 0.0
        stay = total
        best_prev = int(np.argmax(total))
        switch = total[best_prev] - cost
        choose_switch = switch > stay
        back[i] = np.where(choose_switch, best_prev, np.arange(k))
        total = np.maximum(stay, switch) + scores[i]
    path = np.zeros(n, np.int64)
    path[-1] = int(np.argmax(total))
    for i in range(n - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    return path


def _initial_labels(embeddings: np.ndarray, weights: np.ndarray, runs: np.ndarray, config: OfflineConfig):
    """AHC labels per item; long streams cluster run means instead of single windows."""
    if len(embeddings) <= config.max_items:
        return ahc(embeddings, config.threshold)
    run_ids = _compact(runs)
    count = int(run_ids.max()) + 1
    means = centroids(embeddings, run_ids, weights, count)
    return ahc(means, config.threshold)[run_ids]


def recluster(
    embeddings: np.ndarray,
    weights: np.ndarray,
    contiguous: np.ndarray,
    runs: np.ndarray | None = None,
    config: OfflineConfig = OfflineConfig(),
) -> np.ndarray:
    """Speaker labels (0..K-1) for every window of a stream.

    embeddings: (N, D) unit rows in time order; weights: seconds of speech each window owns;
    contiguous[i]: window i+1 directly follows window i (no pause); runs: ids grouping consecutive
    windows (used only to shrink long streams).
    """
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, np.int64)
    embeddings = _unit(embeddings.astype(np.float64))
    if runs is None:
        runs = np.arange(n) // config.run_windows
    labels = _initial_labels(embeddings, weights, runs, config)
    min_total = max(1.0, min(config.min_speaker_s, config.min_speaker_share * float(weights.sum())))
    labels = fold_small(embeddings, labels, weights, min_total)
    for _ in range(config.refine_iterations):
        count = int(labels.max()) + 1
        cents = centroids(embeddings, labels, weights, count)
        refined = viterbi(embeddings @ cents.T, contiguous, config.switch_penalty)
        refined = fold_small(embeddings, refined, weights, min_total)
        if np.array_equal(refined, labels):
            break
        labels = refined
    return labels


def second_labels(
    embeddings: np.ndarray, labels: np.ndarray, weights: np.ndarray, contiguous: np.ndarray, margin: float
) -> np.ndarray:
    """For each window, a second speaker talking at the same time, or -1.

    Only windows next to a speaker change inside continuous speech qualify (that is where turns
    overlap), and only with the speaker on the other side of the change, when the window is about as
    close to that speaker's centroid as to its own.
    """
    out = np.full(len(labels), -1, np.int64)
    if margin <= 0 or len(labels) < 2:
        return out
    embeddings = _unit(embeddings.astype(np.float64))
    cents = centroids(embeddings, labels, weights, int(labels.max()) + 1)
    sims = embeddings @ cents.T
    for i in range(len(labels) - 1):
        if not contiguous[i] or labels[i] == labels[i + 1]:
            continue
        # Walk away from the change on both sides while windows still sound like both speakers.
        for first, step, other in ((i, -1, labels[i + 1]), (i + 1, 1, labels[i])):
            j = first
            while 0 <= j < len(labels) and labels[j] == labels[first]:
                if sims[j, labels[j]] - sims[j, other] > margin:
                    break
                out[j] = other
                next_j = j + step
                if not (0 <= next_j < len(labels)) or not contiguous[min(j, next_j)]:
                    break
                j = next_j
    return out


def align_to(labels: np.ndarray, reference: np.ndarray, weights: np.ndarray, first_free: int) -> np.ndarray:
    """Rename `labels` to the `reference` labels they overlap most (Hungarian on shared weight).

    Keeps the live names (SPEAKER_01 stays SPEAKER_01) where the revision agrees; clusters with no
    partner get fresh ids from `first_free` on.
    """
    ours = np.unique(labels)
    theirs = np.unique(reference[reference >= 0]) if np.any(reference >= 0) else np.zeros(0, np.int64)
    mapping: dict[int, int] = {}
    if len(theirs):
        shared = np.zeros((len(ours), len(theirs)))
        for i, a in enumerate(ours):
            for j, b in enumerate(theirs):
                shared[i, j] = weights[(labels == a) & (reference == b)].sum()
        rows, cols = linear_sum_assignment(-shared)
        mapping = {int(ours[r]): int(theirs[c]) for r, c in zip(rows, cols, strict=True) if shared[r, c] > 0}
    next_id = first_free
    for a in ours:
        if int(a) not in mapping:
            mapping[int(a)] = next_id
            next_id += 1
    return np.array([mapping[int(x)] for x in labels], np.int64)
