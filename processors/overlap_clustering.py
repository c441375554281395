"""Clustering and aggregation blocks of the segmentation diarizer (pure compute, explicit state).

- `IncrementalClustering`: maps the local speakers of one window to global speakers, online (the diart
  recipe). Two local speakers of one window never get the same global speaker (cannot-link): the
  assignment is a one-to-one Hungarian matching over cosine distance. `rebase` replaces its centroids
  with those of an offline pass over the history (live re-clustering); speakers the pass merged away are
  retired (never matched again; their ids stay taken, so labels never change meaning).
- `offline_assign`: the end-of-stream pass (the pyannote 3.1 recipe): every window's local-speaker
  embeddings clustered at once by centroid-linkage AHC with the count set by a distance threshold,
  then each window's local speakers matched one-to-one to the clusters (cannot-link again).
- `reconstruct`: per-frame global labels from overlapping windows: each frame's activation of a global
  speaker is the mean over the windows covering it of the mapped local activations, and the frame keeps
  as many speakers as the windows say are talking there (the mean local count, rounded), the most
  active first. Two simultaneous labels are the normal case in overlapped speech.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment

from speakerflow.processors.segmentation import FrameGrid


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - _unit(a) @ _unit(b).T


_UNREACHABLE = 10.0  # a cosine distance no match accepts (Hungarian needs finite costs)


@dataclass
class IncrementalClustering:
    """Online local -> global speaker mapping with centroids (sums of member embeddings).

    tau_active: a local speaker takes part only if its peak probability in the window reaches this.
    rho_update: a local speaker whose mean probability over the window reaches this is "long": only long
        speakers may open a new global speaker or move a centroid (short ones are too noisy).
    delta_new: cosine distance above which a local speaker is not matched to a centroid; it opens a new
        global speaker if it is long, else it takes the closest global speaker not used in the window.
    """

    tau_active: float = 0.6
    rho_update: float = 0.3
    delta_new: float = 0.3
    max_speakers: int = 20
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    retired: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def count(self) -> int:
        return len(self.centres)

    def _distance(self, embeddings: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Cosine distance to the centroids `ids` (all by default); retired ones are out of reach."""
        ids = np.arange(self.count) if ids is None else ids
        distance = cosine_distance(embeddings, self.centres[ids])
        distance[:, self.retired[ids]] = _UNREACHABLE
        return distance

    def assign(
        self, embeddings: np.ndarray, valid: np.ndarray, activity: np.ndarray, clean: np.ndarray | None = None
    ) -> np.ndarray:
        """Global speaker of each local speaker (-1: none).

        embeddings: (local, dim); valid: (local,) whether the embedding exists; activity: (frames, local)
        probabilities of the window; clean: (local,) whether the embedding comes from frames without
        overlap. An embedding of overlapped frames resembles the other voice too, so it never opens or
        moves a centroid: it only takes a global speaker left free by the clean ones, within delta_new.
        """
        local = embeddings.shape[0]
        mapping = np.full(local, -1, np.int64)
        clean = np.ones(local, bool) if clean is None else np.asarray(clean, bool)
        active = valid & (activity.max(axis=0) >= self.tau_active)
        long = activity.mean(axis=0) >= self.rho_update
        mixed = np.flatnonzero(active & ~clean)
        candidates = np.flatnonzero(active & clean)
        self._assign_clean(embeddings, candidates, long, mapping)
        if len(mixed) and self.count:
            used = set(mapping.tolist())
            free = np.array([g for g in range(self.count) if g not in used and not self.retired[g]], np.int64)
            if len(free):
                distance = self._distance(embeddings[mixed], free)
                for r, c in zip(*linear_sum_assignment(distance), strict=True):
                    if distance[r, c] <= self.delta_new:
                        mapping[mixed[r]] = free[c]
        return mapping

    def _assign_clean(
        self, embeddings: np.ndarray, candidates: np.ndarray, long: np.ndarray, mapping: np.ndarray
    ) -> None:
        if len(candidates) == 0:
            return
        if self.count == 0:
            self.centres = np.zeros((0, embeddings.shape[1]))
            for k in candidates[long[candidates]]:
                mapping[k] = self._add(embeddings[k])
            return
        distance = self._distance(embeddings[candidates])
        rows, cols = linear_sum_assignment(distance)
        for r, c in zip(rows, cols, strict=True):
            if distance[r, c] <= self.delta_new:
                mapping[candidates[r]] = c
        matched = [k for k in candidates if mapping[k] >= 0]
        for row, k in enumerate(candidates):
            if mapping[k] >= 0:
                continue
            if long[k] and self.count < self.max_speakers:
                mapping[k] = self._add(embeddings[k])
                continue
            used = set(mapping[mapping >= 0].tolist())
            free = [g for g in np.argsort(distance[row]) if g not in used and not self.retired[g]]
            if free:
                mapping[k] = free[0]
        for k in matched:
            if long[k]:
                self.centres[mapping[k]] += embeddings[k]

    def _add(self, embedding: np.ndarray) -> int:
        self.centres = np.vstack([self.centres, np.asarray(embedding, np.float64)[None]])
        self.retired = np.append(self.retired, False)
        return self.count - 1

    def rebase(self, centres: dict[int, np.ndarray]) -> None:
        """Centroids (sums of member embeddings) from an offline pass, keyed by global id: ids not in
        `centres` are retired, ids past the current count are added (with every id below them)."""
        count = max(self.count, max(centres, default=-1) + 1)
        dim = len(next(iter(centres.values()))) if centres else self.centres.shape[1]
        grown = np.zeros((count, dim))
        grown[: self.count] = self.centres
        retired = np.ones(count, bool)
        for gid, centre in centres.items():
            grown[gid], retired[gid] = centre, False
        self.centres, self.retired = grown, retired

    def state(self) -> dict[str, np.ndarray]:
        return {"centres": self.centres.copy(), "retired": self.retired.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.centres = np.asarray(state["centres"], np.float64)
        # snapshots from before live re-clustering have no retired ids
        self.retired = np.asarray(state.get("retired", np.zeros(len(self.centres), bool)), bool)


def cluster_sums(embeddings: np.ndarray, labels: np.ndarray, clean: np.ndarray) -> dict[int, np.ndarray]:
    """Per cluster id >= 0: the sum of its members' unit embeddings, over its clean members where it has
    any (the form `IncrementalClustering` keeps its centroids in)."""
    unit = _unit(embeddings)
    out = {}
    for label in np.unique(labels[labels >= 0]):
        members = labels == label
        chosen = members & clean if (members & clean).any() else members
        out[int(label)] = unit[chosen].sum(axis=0)
    return out


def offline_assign(
    embeddings: np.ndarray,
    owners: np.ndarray,
    threshold: float,
    min_cluster_size: int = 1,
    clean: np.ndarray | None = None,
    max_items: int = 0,
) -> np.ndarray:
    """Cluster id of each local-speaker embedding; `owners[i]` is the window embedding i comes from.

    Centroid-linkage AHC on unit vectors (euclidean, cut at `threshold`: higher finds fewer speakers);
    clusters with fewer than `min_cluster_size` members join the closest larger one; then within each
    window the members are matched one-to-one to cluster centroids (two local speakers of a window never
    share a cluster). `clean`: embeddings of frames without overlap; only those are clustered, the
    others join a cluster left free in their window (after the clean ones have chosen). `max_items` > 0:
    AHC (quadratic in memory and time) sees at most that many clean embeddings, an even stride through
    them, with `min_cluster_size` scaled alike; every embedding is still assigned.
    """
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, np.int64)
    unit = _unit(embeddings)
    clean = np.ones(n, bool) if clean is None else np.asarray(clean, bool)
    if not clean.any():
        clean = np.ones(n, bool)
    basis = unit[clean]
    if 0 < max_items < len(basis):
        min_cluster_size = max(1, round(min_cluster_size * max_items / len(basis)))
        basis = basis[np.linspace(0, len(basis) - 1, max_items).round().astype(np.int64)]
    if len(basis) == 1:
        labels = np.zeros(1, np.int64)
    else:
        tree = linkage(basis, method="centroid", metric="euclidean")
        labels = fcluster(tree, t=threshold, criterion="distance").astype(np.int64) - 1
    sizes = np.bincount(labels)
    large = np.flatnonzero(sizes >= min_cluster_size)
    if len(large) == 0:
        large = np.array([int(np.argmax(sizes))])
    centroids = _unit(np.stack([basis[labels == c].mean(axis=0) for c in large]))
    # clean members choose first: a mixed one costs more than any clean one
    distance = 1.0 - unit @ centroids.T + 4.0 * ~clean[:, None]
    out = np.full(n, -1, np.int64)
    for owner in np.unique(owners):
        members = np.flatnonzero(owners == owner)
        rows, cols = linear_sum_assignment(distance[members])
        out[members[rows]] = cols
    return out


@dataclass(frozen=True)
class Aggregation:
    """How windows are laid over the global frame grid (global frame k spans [k, k+1) * grid.step)."""

    grid: FrameGrid
    onset: float = 0.5  # a local speaker is talking in a frame when its probability reaches this


def reconstruct(
    starts: np.ndarray,
    activity: np.ndarray,
    mapping: np.ndarray,
    agg: Aggregation,
    frame_lo: int,
    frame_hi: int,
    speakers: int,
) -> np.ndarray:
    """(frame_hi - frame_lo, speakers) bool labels of global frames from windows.

    starts: (windows,) first sample of each window; activity: (windows, frames, local) probabilities;
    mapping: (windows, local) global speaker per local speaker (-1: dropped).
    """
    frames = frame_hi - frame_lo
    score = np.zeros((frames, max(speakers, 1)))
    talking = np.zeros(frames)
    cover = np.zeros(frames)
    step = agg.grid.step
    centres = (np.arange(frame_lo, frame_hi) + 0.5) * step
    local_frames = activity.shape[1]
    for c in range(len(starts)):
        x = (centres - starts[c] - agg.grid.first_centre) / step  # fractional frame index in window c
        inside = (x >= -0.5) & (x <= local_frames - 0.5)
        if not inside.any():
            continue
        x = np.clip(x[inside], 0, local_frames - 1)
        i0 = np.floor(x).astype(np.int64)
        i1 = np.minimum(i0 + 1, local_frames - 1)
        w = (x - i0)[:, None]
        values = activity[c, i0].astype(np.float64) * (1 - w) + activity[c, i1].astype(np.float64) * w
        cover[inside] += 1
        talking[inside] += (values >= agg.onset).sum(axis=1)
        for k, g in enumerate(mapping[c]):
            if g >= 0:
                score[inside, g] += values[:, k]
    out = np.zeros((frames, speakers), bool)
    if speakers == 0:
        return out
    seen = cover > 0
    count = np.zeros(frames, np.int64)
    count[seen] = np.rint(talking[seen] / cover[seen]).astype(np.int64)
    order = np.argsort(-score[:, :speakers], axis=1, kind="stable")
    for rank in range(min(int(count.max(initial=0)), speakers)):
        rows = np.flatnonzero(count > rank)
        picked = order[rows, rank]
        keep = score[rows, picked] > 0
        out[rows[keep], picked[keep]] = True
    return out
