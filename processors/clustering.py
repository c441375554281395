"""Online speaker clustering: one embedding at a time, stable labels, new-speaker discovery.

State is plain numpy (centroid sums and counts) so that a stream processor can snapshot it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class OnlineClustering:
    """Assigns each window embedding to the closest speaker centroid, or opens a new speaker.

    new_speaker_distance: cosine distance to the closest centroid above which a window is taken to be
        a speaker not heard yet. Lower splits one voice into several labels; higher merges voices.
    merge_distance: two centroids closer than this are one speaker and are merged (the older label
        survives), which repairs early splits made while a centroid still rested on few windows.
    max_speakers: upper bound on labels; past it a window joins its closest speaker.
    """

    new_speaker_distance: float = 0.35
    merge_distance: float = 0.2
    max_speakers: int = 20
    sums: list[np.ndarray] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    # alias[i] = label that speaker i was merged into (itself when alive)
    alias: list[int] = field(default_factory=list)

    def centroids(self) -> np.ndarray:
        alive = self.alive()
        if not alive:
            return np.zeros((0, 0), np.float32)
        mat = np.stack([self.sums[i] for i in alive])
        return mat / np.linalg.norm(mat, axis=1, keepdims=True)

    def alive(self) -> list[int]:
        return [i for i, a in enumerate(self.alias) if a == i]

    def resolve(self, label: int) -> int:
        while self.alias[label] != label:
            label = self.alias[label]
        return label

    def assign(self, embedding: np.ndarray) -> int:
        """Label (0, 1, ...) for one L2-normalised embedding; updates the centroids."""
        alive = self.alive()
        if alive:
            distances = 1.0 - self.centroids() @ embedding
            best = int(np.argmin(distances))
            if distances[best] <= self.new_speaker_distance or len(alive) >= self.max_speakers:
                label = alive[best]
                self.sums[label] = self.sums[label] + embedding
                self.counts[label] += 1
                self._merge_close(label)
                return self.resolve(label)
        self.sums.append(embedding.astype(np.float64).copy())
        self.counts.append(1)
        self.alias.append(len(self.alias))
        return len(self.alias) - 1

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
