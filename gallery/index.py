"""Nearest-voiceprint search for galleries of any size, behind one small interface.

- `ExactIndex`: every vector in one float32 matrix; a search is one matrix product. Exact, simple, and
  fast enough for small galleries (the size where IVF takes over is a setting).
- `IvfIndex`: a FAISS inverted-file index with 8-bit scalar-quantised codes (IVF-SQ8) proposes
  candidates, which are re-scored exactly against the float32 vectors, so the reported scores are exact
  cosines and only recall is approximate. It supports real deletion and in-place updates (the index's
  hash-table direct map removes an id in O(1)), which an HNSW graph cannot do.
- `AutoIndex` (made by `make_index`): exact below a configurable size, IVF above it, switching both
  ways as the gallery grows and shrinks.

Why IVF and not HNSW: on noisy queries far from every stored point, which graph search handles worst,
IVF built faster and reached a higher recall@1 in `speakerflow bench gallery` (the figures are in the
README's gallery section). And a gallery is mutable: IVF deletes for real.

All vectors are L2-normalised, so inner product = cosine. Every index is thread-safe: the gallery
table thread writes while matcher and verifier threads search.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

Hits = list[list[tuple[str, float]]]

# Scores of a (queries x vectors) block are computed in pieces of at most this many floats, so a
# large batched search over a large gallery never allocates gigabytes at once.
_MAX_SCORE_BLOCK = 1 << 24


class VectorIndex(Protocol):
    """What the gallery needs from an index: keyed upserts and deletes, top-k cosine search."""

    dim: int

    @property
    def kind(self) -> str: ...

    def __len__(self) -> int: ...

    def upsert(self, key: str, vector: np.ndarray) -> None: ...

    def upsert_many(self, keys: Sequence[str], vectors: np.ndarray) -> None: ...

    def delete(self, key: str) -> bool: ...

    def search(self, queries: np.ndarray, k: int) -> Hits: ...

    def memory_bytes(self) -> int: ...


def _normalised_rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    matrix = np.asarray(vectors, np.float32).reshape(-1, dim)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best scores of each row, best first."""
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        return np.argsort(-scores, axis=1)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


class ExactIndex:
    """Exact cosine search: one float32 matrix (grown by doubling), a key per row.

    A delete moves the last row into the hole, so rows stay dense and a search reads exactly
    `len(self)` rows.
    """

    kind = "exact"

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        self._keys: list[str] = []
        self._row: dict[str, int] = {}
        self._matrix = np.zeros((max(capacity, 1), dim), np.float32)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def memory_bytes(self) -> int:
        return int(self._matrix.nbytes)

    def upsert(self, key: str, vector: np.ndarray) -> None:
        self.upsert_many([key], np.asarray(vector).reshape(1, -1))

    def upsert_many(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        matrix = _normalised_rows(vectors, self.dim)
        if len(matrix) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(matrix)} vectors")
        with self._lock:
            self._reserve(len(self._keys) + len(keys))
            for key, vector in zip(keys, matrix, strict=True):
                row = self._row.get(key)
                if row is None:
                    row = len(self._keys)
                    self._row[key] = row
                    self._keys.append(key)
                self._matrix[row] = vector

    def _reserve(self, size: int) -> None:
        if size <= len(self._matrix):
            return
        grown = np.zeros((max(size, 2 * len(self._matrix)), self.dim), np.float32)
        grown[: len(self._keys)] = self._matrix[: len(self._keys)]
        self._matrix = grown

    def delete(self, key: str) -> bool:
        with self._lock:
            row = self._row.pop(key, None)
            if row is None:
                return False
            last = len(self._keys) - 1
            if row != last:  # move the last row into the hole
                moved = self._keys[last]
                self._matrix[row] = self._matrix[last]
                self._keys[row] = moved
                self._row[moved] = row
            self._keys.pop()
            if len(self._matrix) > 4096 and len(self._keys) < len(self._matrix) // 4:
                self._matrix = self._matrix[: len(self._matrix) // 2].copy()
            return True

    def vector(self, key: str) -> np.ndarray | None:
        with self._lock:
            row = self._row.get(key)
            return None if row is None else self._matrix[row].copy()

    def vectors_of(self, keys: Sequence[str]) -> np.ndarray:
        """Rows of `keys` (all must be present), in order."""
        with self._lock:
            return self._matrix[[self._row[k] for k in keys]]

    def key_list(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    def snapshot(self) -> tuple[list[str], np.ndarray]:
        """A copy of every (key, vector), for building another index without holding the lock."""
        with self._lock:
            return list(self._keys), self._matrix[: len(self._keys)].copy()

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """A copy of `count` random rows (all rows if there are fewer)."""
        with self._lock:
            n = len(self._keys)
            rows = np.sort(rng.choice(n, count, replace=False)) if count < n else np.arange(n)
            return self._matrix[rows].copy()

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """Top-k (key, cosine) per query row, best first."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if k <= 0:
            return [[] for _ in range(len(queries))]
        results: Hits = []
        with self._lock:
            n = len(self._keys)
            if n == 0:
                return [[] for _ in range(len(queries))]
            matrix = self._matrix[:n]
            step = max(1, _MAX_SCORE_BLOCK // n)
            for first in range(0, len(queries), step):
                scores = queries[first : first + step] @ matrix.T
                for row, cols in enumerate(_top_k(scores, k)):
                    results.append([(self._keys[c], float(scores[row, c])) for c in cols])
        return results


def default_nlist(size: int) -> int:
    """Inverted lists for `size` vectors: about 2*sqrt(n), a power of two, between 16 and 16384.

    About 500 vectors per list at a million keeps both the coarse search (over the list centroids)
    and the list scans short.
    """
    target = 2.0 * math.sqrt(max(size, 1))
    return int(min(max(2 ** round(math.log2(target)), 16), 16384))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 1/32 of them (at least 16). Measured: recall@1 >= 0.99 on the
    synthetic benchmark's clustered gallery at 10^4-10^6 voiceprints."""
    return int(min(nlist, max(16, nlist // 32)))


def _faiss():  # imported lazily: the worker starts faster and small galleries never need it
    import faiss

    return faiss


def faiss_gpu_count() -> int:
    """GPUs usable by FAISS (0 with faiss-cpu)."""
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@contextmanager
def _few_rows(rows: int) -> Iterator[None]:
    """Run FAISS single-threaded for a handful of rows: waking OpenMP threads costs more than the work
    (measured: adding one vector 0.01 ms on one thread, 1-12 ms with two on a busy machine). The
    OpenMP thread count is per calling thread, so other threads are not affected."""
    if rows > 16:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class IvfIndex:
    """IVF-SQ8 candidates (FAISS) + exact re-scoring from a float32 `ExactIndex` store.

    The store holds the truth; the FAISS index is an accelerator over it. Until the first build
    finishes (and if FAISS is unavailable) searches are exact over the store, so the index is
    always correct and only gets faster.

    Rebuilds (first build, and retraining once the gallery has grown or shrunk `retrain_factor`-fold
    since the last training, so that lists stay balanced) run in a background thread from a
    snapshot of the store; updates that arrive meanwhile are applied to the live index and recorded,
    and replayed on the new one before it replaces the old, so nothing is lost and searches never wait
    for a build. `background=False` builds in the calling thread (tests, benchmarks).
    """

    def __init__(
        self,
        dim: int,
        store: ExactIndex | None = None,
        *,
        nprobe: int | None = None,
        candidates: int = 16,
        retrain_factor: float = 4.0,
        min_build_size: int = 1024,
        background: bool = True,
        use_gpu: bool | None = None,
        seed: int = 0,
    ) -> None:
        self.dim = dim
        self.store = store if store is not None else ExactIndex(dim)
        self.fixed_nprobe = nprobe
        self.candidates = candidates
        self.retrain_factor = retrain_factor
        self.min_build_size = min_build_size
        self.background = background
        self.use_gpu = use_gpu
        self.seed = seed
        self._lock = threading.RLock()
        self._index = None  # faiss.IndexIVFScalarQuantizer once built
        self._trained_size = 0
        self._ids: dict[str, int] = {}  # stable FAISS id per key
        self._keys: dict[int, str] = {}
        self._next_id = 0
        self._touched: set[int] | None = None  # FAISS ids changed while a rebuild runs
        self._builder: threading.Thread | None = None
        self.builds = 0
        self.last_build_s = 0.0
        self.build_error: BaseException | None = None
        with self._lock:
            for key in self.store.key_list():
                self._id_of(key)
        self._maybe_build()

    # -- interface ---------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self._index is None:
            return "ivf-sq8 (building; exact meanwhile)"
        return f"ivf-sq8 nlist={self._index.nlist} nprobe={self._index.nprobe}"

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, key: str) -> bool:
        return key in self.store

    def memory_bytes(self) -> int:
        index = self._index
        faiss_bytes = (
            0 if index is None else index.ntotal * (index.code_size + 8 + 16) + index.nlist * 4 * self.dim
        )
        return self.store.memory_bytes() + faiss_bytes

    def upsert(self, key: str, vector: np.ndarray) -> None:
        self.upsert_many([key], np.asarray(vector).reshape(1, -1))

    def upsert_many(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        matrix = _normalised_rows(vectors, self.dim)
        with self._lock:
            self.store.upsert_many(keys, matrix)
            ids = np.array([self._id_of(k) for k in keys], np.int64)
            if self._index is not None:
                with _few_rows(len(ids)):
                    self._index.remove_ids(ids)  # an update must not leave the old code behind
                    self._index.add_with_ids(matrix, ids)
            if self._touched is not None:
                self._touched.update(ids.tolist())
        self._maybe_build()

    def delete(self, key: str) -> bool:
        with self._lock:
            if not self.store.delete(key):
                return False
            faiss_id = self._ids.pop(key)
            del self._keys[faiss_id]
            if self._index is not None:
                with _few_rows(1):
                    self._index.remove_ids(np.array([faiss_id], np.int64))
            if self._touched is not None:
                self._touched.add(faiss_id)
        self._maybe_build()
        return True

    def search(self, queries: np.ndarray, k: int) -> Hits:
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        with self._lock:
            if self._index is None or k <= 0:
                return self.store.search(queries, k)
            wanted = min(max(k, self.candidates), len(self.store))
            with _few_rows(len(queries)):
                _, found = self._index.search(queries, wanted)
            results: Hits = []
            for query, ids in zip(queries, found, strict=True):
                keys = [self._keys[i] for i in ids if i >= 0]
                if not keys:
                    results.append([])
                    continue
                scores = self.store.vectors_of(keys) @ query  # exact cosines of the candidates
                order = np.argsort(-scores)[:k]
                results.append([(keys[j], float(scores[j])) for j in order])
            return results

    # -- building ----------------------------------------------------------------------------------
    def _id_of(self, key: str) -> int:
        faiss_id = self._ids.get(key)
        if faiss_id is None:
            faiss_id = self._next_id
            self._next_id += 1
            self._ids[key] = faiss_id
            self._keys[faiss_id] = key
        return faiss_id

    def _maybe_build(self) -> None:
        """First build once there is enough to train on; a rebuild once the size has moved
        `retrain_factor`-fold since the last training (lists would be too long or too short)."""
        size, trained = len(self.store), self._trained_size
        if self._builder is not None or self.build_error is not None or size < self.min_build_size:
            return
        if (
            self._index is None
            or size > trained * self.retrain_factor
            or size * self.retrain_factor < trained
        ):
            self._request_build()

    def _request_build(self) -> None:
        with self._lock:
            if self._builder is not None:
                return
            self._touched = set()
            if not self.background:
                self._builder = threading.current_thread()
                self._build()
                return
            self._builder = threading.Thread(target=self._build, name="speakerflow-ivf-build", daemon=True)
            self._builder.start()

    def wait_built(self, timeout_s: float | None = None) -> bool:
        """Block until no build is running; True when the FAISS index is in use."""
        builder = self._builder
        if builder is not None and builder is not threading.current_thread():
            builder.join(timeout_s)
        return self._index is not None

    def _build(self) -> None:
        import time

        started = time.perf_counter()
        try:
            with self._lock:  # keys, vectors and ids from one instant
                keys, vectors = self.store.snapshot()
                ids = np.array([self._ids[k] for k in keys], np.int64)
            index = self._train_and_add(vectors, ids)
            del vectors
            with self._lock:
                self._replay(index)
                self._index = index
                self._trained_size = max(len(self.store), 1)
            self.builds += 1
            self.last_build_s = time.perf_counter() - started
            log.info(
                "IVF index built over %d vectors in %.1f s (%s)", len(keys), self.last_build_s, self.kind
            )
        except Exception as exc:  # keep serving exact results; say why
            self.build_error = exc
            log.exception("IVF index build failed; searches stay exact")
        finally:
            with self._lock:
                self._touched = None
                self._builder = None

    def _train_and_add(self, vectors: np.ndarray, ids: np.ndarray):
        faiss = _faiss()
        nlist = default_nlist(len(vectors))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        # 64 training points per list and 10 k-means iterations: enough for balanced lists, and
        # keeps a million-vector build around a minute on two cores.
        index.cp.niter = 10
        index.cp.max_points_per_centroid = 64
        index.cp.seed = self.seed
        index.cp.min_points_per_centroid = 4  # small galleries: no warning, lists are just short
        gpus = faiss_gpu_count() if self.use_gpu in (None, True) else 0
        if gpus:  # k-means (the costly part) on the GPU; the index itself stays on the CPU
            index.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.dim))
        rng = np.random.default_rng(self.seed)
        sample_size = min(len(vectors), 64 * nlist)
        sample = (
            vectors[rng.choice(len(vectors), sample_size, replace=False)]
            if sample_size < len(vectors)
            else vectors
        )
        index.train(np.ascontiguousarray(sample))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # O(1) remove_ids by id
        for first in range(0, len(vectors), 65536):
            index.add_with_ids(vectors[first : first + 65536], ids[first : first + 65536])
        index.nprobe = self.fixed_nprobe or default_nprobe(nlist)
        return index

    def _replay(self, index) -> None:
        """Apply to `index` the changes made since the snapshot it was built from (lock held).

        Ids are stable while a key exists (a deleted key's id is never reused), so removing every
        touched id and re-adding the keys that still exist, with their current vectors, is exact.
        """
        touched = np.array(sorted(self._touched or ()), np.int64)
        if not len(touched):
            return
        index.remove_ids(touched)
        alive = [(int(i), self._keys[int(i)]) for i in touched if int(i) in self._keys]
        if alive:
            vectors = self.store.vectors_of([key for _, key in alive])
            index.add_with_ids(vectors, np.array([i for i, _ in alive], np.int64))


class AutoIndex:
    """Exact search while the gallery is small, IVF once it passes `exact_max` voiceprints.

    It switches back to exact below `exact_max // 2` (the gap stops a gallery that hovers around
    the limit from rebuilding over and over). Switching never copies vectors: the IVF index adopts
    the exact index as its store, and gives it back.
    """

    def __init__(self, dim: int, exact_max: int = 50_000, **ivf_options) -> None:
        self.dim = dim
        self.exact_max = exact_max
        self.ivf_options = ivf_options
        self._current: ExactIndex | IvfIndex = ExactIndex(dim)
        self._lock = threading.RLock()

    @property
    def current(self) -> ExactIndex | IvfIndex:
        return self._current

    @property
    def kind(self) -> str:
        return self._current.kind

    def __len__(self) -> int:
        return len(self._current)

    def __contains__(self, key: str) -> bool:
        return key in self._current

    def memory_bytes(self) -> int:
        return self._current.memory_bytes()

    def upsert(self, key: str, vector: np.ndarray) -> None:
        self.upsert_many([key], np.asarray(vector).reshape(1, -1))

    def upsert_many(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            self._current.upsert_many(keys, vectors)
            self._rebalance()

    def delete(self, key: str) -> bool:
        with self._lock:
            deleted = self._current.delete(key)
            self._rebalance()
            return deleted

    def search(self, queries: np.ndarray, k: int) -> Hits:
        return self._current.search(queries, k)

    def wait_built(self, timeout_s: float | None = None) -> bool:
        current = self._current
        return isinstance(current, IvfIndex) and current.wait_built(timeout_s)

    def _rebalance(self) -> None:
        current, size = self._current, len(self._current)
        if isinstance(current, ExactIndex) and size > self.exact_max:
            log.info("gallery of %d voiceprints passed %d: switching to IVF search", size, self.exact_max)
            self._current = IvfIndex(self.dim, store=current, **self.ivf_options)
        elif isinstance(current, IvfIndex) and size < self.exact_max // 2:
            log.info("gallery shrank to %d voiceprints: switching to exact search", size)
            current.wait_built()  # let a running build finish before its store is taken back
            self._current = current.store


def make_index(dim: int, exact_max: int = 50_000, **ivf_options) -> VectorIndex:
    """The gallery's index: exact up to `exact_max` voiceprints (0 = always exact), IVF above."""
    if exact_max <= 0:
        return ExactIndex(dim)
    return AutoIndex(dim, exact_max, **ivf_options)
