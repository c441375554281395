"""Online speaker clustering: one window embedding at a time, stable labels, new-speaker discovery.

The state is a handful of numpy arrays (centroid sums, counts, aliases) so that a stream processor can
snapshot it (`state()`) and restore it (`from_state()`) exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class OnlineClustering:
    """Assigns window embeddings (L2-normalised) to speaker centroids, or opens a new speaker.

    new_speaker_distance: cosine distance to the closest centroid above which a window may be a
        speaker not heard yet. Lower splits one voice into several labels; higher merges voices.
    confirm_similarity: a far window opens a new speaker only if the windows after it (its lookahead)
        are far from every centroid too and at least this similar to it: one odd window (a laugh, a
        cough, a half-overlapped word) must not create a speaker that then lives for the whole stream.
    confirm_windows: how many lookahead windows must agree to confirm a new speaker.
    merge_distance: two centroids closer than this are one speaker and merge (the older label
        survives), which repairs a split made while a centroid still rested on few windows.
    max_speakers: upper bound on labels; past it a window joins its closest speaker.
    """

    new_speaker_distance: float = 0.35
    confirm_similarity: float = 0.6
    confirm_windows: int = 1
    merge_distance: float = 0.2
    max_speakers: int = 20
    sums: list[np.ndarray] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    # alias[i] = label that speaker i was merged into (itself while alive)
    alias: list[int] = field(default_factory=list)

    # -- queries ---------------------------------------------------------------------------------
    def alive(self) -> list[int]:
        return [i for i, a in enumerate(self.alias) if a == i]

    def resolve(self, label: int) -> int:
        while self.alias[label] != label:
            label = self.alias[label]
        return label

    def centroids(self) -> np.ndarray:
        """Unit centroids of the live speakers, in the order of `alive()`."""
        alive = self.alive()
        if not alive:
            return np.zeros((0, 0), np.float64)
        mat = np.stack([self.sums[i] for i in alive])
        return mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)

    def nearest(self, embedding: np.ndarray) -> tuple[int, float]:
        """(label, cosine distance) of the closest live speaker; (-1, 2.0) when there is none."""
        alive = self.alive()
        if not alive:
            return -1, 2.0
        distances = 1.0 - self.centroids() @ embedding
        best = int(np.argmin(distances))
        return alive[best], float(distances[best])

    # -- updates ---------------------------------------------------------------------------------
    def assign(self, embedding: np.ndarray, lookahead: Sequence[np.ndarray] = ()) -> int:
        """Label for one embedding, given the embeddings that follow it; updates the centroids.

        Without enough lookahead a far window joins its closest speaker (without moving its
        centroid), except for the very first window of the stream.
        """
        label, distance = self.nearest(embedding)
        if label < 0:
            return self._open(embedding)
        if distance <= self.new_speaker_distance or len(self.alive()) >= self.max_speakers:
            return self._add(label, embedding)
        if self._confirmed(embedding, lookahead):
            return self._open(embedding)
        return label  # an unconfirmed outlier: labelled, but kept out of the centroid

    def _confirmed(self, embedding: np.ndarray, lookahead: Sequence[np.ndarray]) -> bool:
        following = list(lookahead)[: self.confirm_windows]
        if len(following) < self.confirm_windows:
            return False
        for other in following:
            if float(other @ embedding) < self.confirm_similarity:
                return False
            if self.nearest(other)[1] <= self.new_speaker_distance:
                return False
        return True

    def _open(self, embedding: np.ndarray) -> int:
        self.sums.append(embedding.astype(np.float64).copy())
        self.counts.append(1)
        self.alias.append(len(self.alias))
        return len(self.alias) - 1

    def _add(self, label: int, embedding: np.ndarray) -> int:
        self.sums[label] = self.sums[label] + embedding
        self.counts[label] += 1
        self._merge_close(label)
        return self.resolve(label)

    def _merge_close(self, label: int) -> None:
        alive = self.alive()
        if len(alive) < 2:
            return
        mine = self.sums[label] / np.linalg.norm(self.sums[label])
        for other in alive:
            if other == label:
                continue
            theirs = self.sums[other] / np.linalg.norm(self.sums[other])
            if 1.0 - float(mine @ theirs) < self.merge_distance:
                keep, drop = min(label, other), max(label, other)
                self.sums[keep] = self.sums[keep] + self.sums[drop]
                self.counts[keep] += self.counts[drop]
                self.alias[drop] = keep
                return

    # -- snapshots -------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """The mutable state as arrays (exact: float64 sums)."""
        dim = self.sums[0].shape[0] if self.sums else 0
        return {
            "sums": np.stack(self.sums) if self.sums else np.zeros((0, dim), np.float64),
            "counts": np.asarray(self.counts, np.int64),
            "alias": np.asarray(self.alias, np.int64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.sums = [row.astype(np.float64).copy() for row in state["sums"]]
        self.counts = [int(c) for c in state["counts"]]
        self.alias = [int(a) for a in state["alias"]]
