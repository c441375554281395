"""Nearest-voiceprint search. Exact search is one matrix product over the gallery."""

from __future__ import annotations

import threading

import numpy as np


class ExactIndex:
    """Thread-safe exact cosine index: upserts and deletes are O(1) amortised, search is one GEMV."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._matrix = np.zeros((0, dim), np.float32)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def upsert(self, key: str, vector: np.ndarray) -> None:
        vector = np.asarray(vector, np.float32).reshape(1, self.dim)
        with self._lock:
            row = self._row.get(key)
            if row is None:
                self._row[key] = len(self._ids)
                self._ids.append(key)
                self._matrix = np.concatenate([self._matrix, vector])
            else:
                self._matrix = self._matrix.copy()  # searches in flight keep the old snapshot
                self._matrix[row] = vector

    def delete(self, key: str) -> bool:
        with self._lock:
            row = self._row.pop(key, None)
            if row is None:
                return False
            last = len(self._ids) - 1
            matrix = self._matrix.copy()
            if row != last:  # move the last row into the hole
                moved = self._ids[last]
                matrix[row] = matrix[last]
                self._ids[row] = moved
                self._row[moved] = row
            self._ids.pop()
            self._matrix = matrix[:last]
            return True

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (key, cosine) per query row, best first."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        with self._lock:
            matrix, ids = self._matrix, list(self._ids)
        if not ids:
            return [[] for _ in range(len(queries))]
        scores = queries @ matrix.T
        k = min(k, len(ids))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        results = []
        for q, cols in enumerate(top):
            order = cols[np.argsort(-scores[q, cols])]
            results.append([(ids[c], float(scores[q, c])) for c in order])
        return results
