"""The gallery indexes: exact search, IVF search kept in sync with updates and deletions, switching."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from speakerflow.evaluation.gallery_bench import synthetic_gallery, synthetic_queries
from speakerflow.gallery.index import AutoIndex, ExactIndex, IvfIndex, default_nlist, make_index

DIM = 32


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(keys: list[str], vectors: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    scores = vectors @ query
    return [keys[i] for i in np.argsort(-scores)[:k]]


def test_exact_index_matches_brute_force_through_upserts_and_deletes():
    rng = np.random.default_rng(0)
    index = ExactIndex(DIM, capacity=4)  # small capacity: growth is exercised
    truth: dict[str, np.ndarray] = {}
    for i in range(300):
        key = f"s{rng.integers(0, 120)}"
        if rng.random() < 0.2 and truth:
            victim = sorted(truth)[int(rng.integers(0, len(truth)))]
            assert index.delete(victim)
            del truth[victim]
        vector = _unit(rng, 1)[0]
        index.upsert(key, vector)
        truth[key] = vector
        assert len(index) == len(truth), i
    assert not index.delete("never-there")
    keys = sorted(truth)
    matrix = np.stack([truth[k] for k in keys])
    for query in _unit(rng, 20):
        hits = index.search(query, 5)[0]
        assert [key for key, _ in hits] == _brute_force(keys, matrix, query, 5)
        assert hits[0][1] == pytest.approx(float(np.max(matrix @ query)), abs=1e-5)


def test_exact_index_batched_search_and_small_galleries():
    index = ExactIndex(DIM)
    assert index.search(np.ones(DIM), 3) == [[]]
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 3)
    index.upsert_many(["a", "b", "c"], vectors)
    hits = index.search(vectors, 10)  # k larger than the gallery
    assert [h[0][0] for h in hits] == ["a", "b", "c"]
    assert all(len(h) == 3 for h in hits)
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-5)


def _ivf_with(keys: list[str], vectors: np.ndarray) -> IvfIndex:
    index = IvfIndex(vectors.shape[1], background=False, min_build_size=256)
    index.upsert_many(keys, vectors)
    assert index.wait_built() and "nlist" in index.kind
    return index


def test_ivf_recall_against_exact_on_clustered_vectors():
    vectors = synthetic_gallery(4000, DIM, seed=0)
    keys = [f"spk{i}" for i in range(len(vectors))]
    queries, _ = synthetic_queries(vectors, 200, seed=1)
    ivf = _ivf_with(keys, vectors)
    exact = ExactIndex(DIM)
    exact.upsert_many(keys, vectors)
    ivf_top = [h[0][0] for h in ivf.search(queries, 3)]
    exact_hits = exact.search(queries, 3)
    recall = np.mean([a == b[0][0] for a, b in zip(ivf_top, exact_hits, strict=True)])
    assert recall >= 0.95, recall
    # Scores are exact cosines (re-scored from float32), not quantised approximations.
    for hit, query in zip(ivf.search(queries[:10], 1), queries[:10], strict=True):
        key, score = hit[0]
        assert score == pytest.approx(float(vectors[int(key[3:])] @ query), abs=1e-5)


def test_ivf_never_returns_deleted_keys_and_sees_updates():
    vectors = synthetic_gallery(3000, DIM, seed=2)
    keys = [f"spk{i}" for i in range(len(vectors))]
    ivf = _ivf_with(keys, vectors)
    for i in range(0, 3000, 3):
        assert ivf.delete(keys[i])
    assert len(ivf) == 2000
    hits = ivf.search(vectors[:300], 5)
    for i, row in enumerate(hits):
        found = [key for key, _ in row]
        assert all(int(key[3:]) % 3 != 0 for key in found)
        if i % 3:
            assert found[0] == keys[i]  # the vector itself is its own best match
    # Move a speaker: the old place no longer finds it, the new one does (with the exact score).
    moved = _unit(np.random.default_rng(3), 1)[0]
    ivf.upsert(keys[1], moved)
    assert ivf.search(moved, 1)[0][0] == (keys[1], pytest.approx(1.0, abs=1e-5))
    assert ivf.search(vectors[1], 1)[0][0][0] != keys[1]
    # Deleted keys can come back.
    ivf.upsert(keys[0], vectors[0])
    assert ivf.search(vectors[0], 1)[0][0][0] == keys[0]


def test_ivf_rebuild_in_background_keeps_changes_made_meanwhile():
    vectors = synthetic_gallery(6000, DIM, seed=4)
    keys = [f"spk{i}" for i in range(len(vectors))]
    index = IvfIndex(DIM, min_build_size=1000, background=True)
    index.upsert_many(keys[:1000], vectors[:1000])  # triggers the first build in a thread
    # Changes while it builds: new keys, deletions, an update.
    index.upsert_many(keys[1000:1500], vectors[1000:1500])
    for i in range(0, 1000, 10):
        index.delete(keys[i])
    moved = _unit(np.random.default_rng(5), 1)[0]
    index.upsert(keys[5], moved)
    assert index.wait_built(60)
    index.wait_built(60)
    assert index.build_error is None
    assert len(index) == 1400
    for i in (1001, 1200, 1499, 7, 999):
        assert index.search(vectors[i], 1)[0][0][0] == keys[i]
    for i in range(0, 1000, 10):
        assert keys[i] not in {key for key, _ in index.search(vectors[i], 5)[0]}
    assert index.search(moved, 1)[0][0][0] == keys[5]
    # Growing 4-fold past the last training retrains (in the background) and still finds everyone.
    builds = index.builds
    index.upsert_many(keys[1500:], vectors[1500:])
    index.wait_built(120)
    assert index.builds > builds
    assert index._index.ntotal == len(index)  # no stale or duplicate codes left behind
    assert index.search(vectors[5999], 1)[0][0][0] == keys[5999]


def test_concurrent_searches_during_writes_are_consistent():
    vectors = synthetic_gallery(2000, DIM, seed=6)
    keys = [f"spk{i}" for i in range(len(vectors))]
    index = _ivf_with(keys, vectors)
    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            for q in vectors[1000:1400]:
                for key, _ in index.search(q, 3)[0]:
                    assert key in keys
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=searcher)
    thread.start()
    for i in range(0, 1000, 2):
        index.delete(keys[i])
        index.upsert(keys[i + 1], vectors[i + 1])
    thread.join(30)
    assert not errors


def test_auto_index_switches_to_ivf_and_back():
    vectors = synthetic_gallery(1200, DIM, seed=7)
    keys = [f"spk{i}" for i in range(len(vectors))]
    index = AutoIndex(DIM, exact_max=1000, background=False, min_build_size=100)
    index.upsert_many(keys[:1000], vectors[:1000])
    assert isinstance(index.current, ExactIndex)
    index.upsert_many(keys[1000:], vectors[1000:])
    assert isinstance(index.current, IvfIndex) and index.wait_built()
    assert index.search(vectors[1100], 1)[0][0][0] == keys[1100]
    for key in keys[:800]:
        index.delete(key)
    assert isinstance(index.current, ExactIndex) and len(index) == 400
    assert index.search(vectors[900], 1)[0][0][0] == keys[900]
    assert keys[10] not in {k for k, _ in index.search(vectors[10], 5)[0]}


def test_make_index_and_nlist_defaults():
    assert isinstance(make_index(8, exact_max=0), ExactIndex)
    assert isinstance(make_index(8, exact_max=10), AutoIndex)
    assert default_nlist(1_000_000) == 2048
    assert default_nlist(10) == 16


def test_synthetic_queries_sit_at_the_asked_cosine_and_the_benchmark_runs():
    from speakerflow.evaluation.gallery_bench import bench_size

    gallery = synthetic_gallery(2000, DIM, seed=8)
    queries, rows = synthetic_queries(gallery, 300, seed=9, cosine=(0.7, 0.85))
    cosines = np.sum(queries * gallery[rows], axis=1)
    assert cosines.min() >= 0.699 and cosines.max() <= 0.851
    assert np.allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    # Strangers are alike but not too alike, as speaker embeddings are.
    stranger_cos = np.sum(gallery[:1000] * gallery[1000:], axis=1)
    assert 0.1 < stranger_cos.mean() < 0.6

    result = bench_size(3000, DIM, queries=200, single_queries=30, batch=16, nprobes=(8,), hnsw=True)
    kinds = [r.kind for r in result.results]
    assert kinds[0] == "exact" and kinds[1] == "ivf-sq8" and kinds[2].startswith("hnsw")
    ivf = result.results[1]
    assert ivf.recall_at_1 >= 0.9 and ivf.single.p99_ms > 0 and ivf.delete_ms is not None
    assert {p["nprobe"] for p in ivf.sweep} >= {8, ivf.params["nprobe"]}
