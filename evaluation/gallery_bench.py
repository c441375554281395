"""Gallery search benchmark: synthetic voiceprints with cluster structure, exact vs IVF (vs HNSW).

The synthetic gallery imitates what speaker embeddings look like: every vector shares a common
direction (embeddings of one model are not centred, GE2E cosines between strangers sit around 0.3-0.6),
speakers fall into a few "accent" clusters (language, gender, channel), and each speaker adds an
individual direction. A query is a new recording of an enrolled speaker: a vector at cosine 0.70-0.85
to its speaker's voiceprint (what a few seconds of speech give with GE2E/ECAPA), the rest of it noise
orthogonal to the voiceprint.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from speakerflow.gallery.index import ExactIndex, IvfIndex, default_nlist

_CHUNK = 100_000


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def synthetic_gallery(
    size: int,
    dim: int = 192,
    seed: int = 0,
    accents: int = 16,
    common: float = 0.5,
    accent_share: tuple[float, float] = (0.15, 0.45),
) -> np.ndarray:
    """(size, dim) L2-normalised float32 voiceprints with a shared offset and accent clusters."""
    rng = np.random.default_rng(seed)
    offset = _unit_rows(rng.standard_normal((1, dim)).astype(np.float32))
    centres = _unit_rows(rng.standard_normal((accents, dim)).astype(np.float32))
    out = np.empty((size, dim), np.float32)
    for first in range(0, size, _CHUNK):
        n = min(_CHUNK, size - first)
        accent = rng.integers(0, accents, n)
        share = rng.uniform(*accent_share, (n, 1)).astype(np.float32)
        own = _unit_rows(rng.standard_normal((n, dim)).astype(np.float32))
        out[first : first + n] = _unit_rows(
            common * offset + np.sqrt(share) * centres[accent] + np.sqrt(1.0 - share) * own
        )
    return out


def synthetic_queries(
    gallery: np.ndarray, count: int, seed: int = 1, cosine: tuple[float, float] = (0.70, 0.85)
) -> tuple[np.ndarray, np.ndarray]:
    """`count` queries at a cosine drawn from `cosine` to a random gallery row; returns (queries, rows)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(gallery), count)
    targets = gallery[rows]
    cos = rng.uniform(*cosine, (count, 1)).astype(np.float32)
    noise = rng.standard_normal(targets.shape).astype(np.float32)
    noise -= np.sum(noise * targets, axis=1, keepdims=True) * targets  # orthogonal to the target
    noise = _unit_rows(noise)
    return _unit_rows(cos * targets + np.sqrt(1.0 - cos * cos) * noise).astype(np.float32), rows


def rss_bytes() -> int:
    """Resident memory of this process now (Linux), or the peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = np.asarray(seconds) * 1000.0
        return cls(
            round(float(np.percentile(ms, 50)), 4),
            round(float(np.percentile(ms, 99)), 4),
            round(float(ms.mean()), 4),
        )


@dataclass
class IndexResult:
    kind: str
    build_s: float
    memory_mb: float
    single: Latency
    batch_size: int
    batch: Latency  # per batch
    batch_per_query_ms: float
    recall_at_1: float | None  # against exact search (None for exact itself)
    params: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)  # recall/latency per nprobe or efSearch
    update_ms: float | None = None  # mean time of one upsert of an existing key
    delete_ms: float | None = None  # mean time of one delete


@dataclass
class SizeResult:
    size: int
    dim: int
    queries: int
    target_is_exact_top1: float  # how often exact search finds the speaker the query was made from
    results: list[IndexResult]


def _time_single(search: Callable[[np.ndarray], object], queries: np.ndarray, count: int) -> Latency:
    for q in queries[:5]:  # warm caches and code paths
        search(q[None])
    times = []
    for q in queries[:count]:
        started = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - started)
    return Latency.of(times)


def _time_batched(
    search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, rounds: int
) -> Latency:
    times = []
    for r in range(rounds):
        block = queries[(r * batch) % len(queries) :][:batch]
        if len(block) < batch:
            block = queries[:batch]
        started = time.perf_counter()
        search(block)
        times.append(time.perf_counter() - started)
    return Latency.of(times)


def _recall(found_top1: list[str], truth_top1: list[str]) -> float:
    return round(float(np.mean([a == b for a, b in zip(found_top1, truth_top1, strict=True)])), 4)


def bench_size(
    size: int,
    dim: int = 192,
    queries: int = 1000,
    single_queries: int = 500,
    batch: int = 64,
    k: int = 5,
    nprobes: tuple[int, ...] = (8, 16, 32, 64, 128),
    hnsw: bool = False,
    hnsw_m: int = 32,
    hnsw_ef_construction: int = 64,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> SizeResult:
    """Build exact and IVF (and optionally HNSW) over `size` synthetic voiceprints and measure them."""
    keys = [f"spk{i:07d}" for i in range(size)]
    progress(f"{size}: generating vectors")
    vectors = synthetic_gallery(size, dim, seed)
    query_vectors, rows = synthetic_queries(vectors, queries, seed + 1)
    work = _Workload(keys, vectors, query_vectors, k, batch, single_queries, progress)
    exact, exact_result = _bench_exact(work)
    truth_top1 = [hits[0][0] for hits in exact.search(query_vectors, 1)]
    target_found = float(np.mean([t == keys[r] for t, r in zip(truth_top1, rows, strict=True)]))
    results = [exact_result, _bench_ivf(work, exact, exact_result.memory_mb, truth_top1, nprobes)]
    exact = None
    gc.collect()
    if hnsw:
        results.append(_bench_hnsw(work, truth_top1, hnsw_m, hnsw_ef_construction))
    return SizeResult(size, dim, queries, round(target_found, 4), results)


@dataclass
class _Workload:
    keys: list[str]
    vectors: np.ndarray
    queries: np.ndarray
    k: int
    batch: int
    single_queries: int
    progress: Callable[[str], None]


def _finish(result: IndexResult) -> IndexResult:
    result.batch_per_query_ms = round(result.batch.mean_ms / result.batch_size, 4)
    return result


def _bench_exact(work: _Workload) -> tuple[ExactIndex, IndexResult]:
    size, dim = work.vectors.shape
    work.progress(f"{size}: exact index")
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    exact = ExactIndex(dim, capacity=size)
    exact.upsert_many(work.keys, work.vectors)
    build_s = time.perf_counter() - started
    memory = (rss_bytes() - before) / 2**20

    def search(q: np.ndarray) -> object:
        return exact.search(q, work.k)

    # A single exact query over 10^6 rows reads 768 MB: fewer samples keep the run short.
    single_count = work.single_queries if size <= 200_000 else min(work.single_queries, 50)
    result = IndexResult(
        "exact",
        round(build_s, 3),
        round(memory, 1),
        _time_single(search, work.queries, single_count),
        work.batch,
        _time_batched(search, work.queries, work.batch, 10 if size <= 200_000 else 3),
        0.0,
        None,
        {"matrix_mb": round(exact.memory_bytes() / 2**20, 1)},
    )
    return exact, _finish(result)


def _bench_ivf(
    work: _Workload,
    exact: ExactIndex,
    store_mb: float,
    truth_top1: list[str],
    nprobes: tuple[int, ...],
) -> IndexResult:
    size, dim = work.vectors.shape
    work.progress(f"{size}: IVF index (nlist {default_nlist(size)})")
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    ivf = IvfIndex(dim, store=exact, background=False, min_build_size=1)
    build_s = time.perf_counter() - started
    memory = (rss_bytes() - before) / 2**20 + store_mb  # the float32 store is shared with exact

    def search(q: np.ndarray) -> object:
        return ivf.search(q, work.k)

    def recall() -> float:
        return _recall([hits[0][0] if hits else "" for hits in ivf.search(work.queries, 1)], truth_top1)

    default = ivf._index.nprobe
    sweep = []
    for nprobe in sorted({*nprobes, default}):
        ivf._index.nprobe = nprobe
        lat = _time_single(search, work.queries, min(work.single_queries, 300))
        sweep.append({"nprobe": nprobe, "recall_at_1": recall(), **asdict(lat)})
        work.progress(f"{size}: nprobe {nprobe}: recall@1 {sweep[-1]['recall_at_1']}, p99 {lat.p99_ms} ms")
    ivf._index.nprobe = default
    result = IndexResult(
        "ivf-sq8",
        round(build_s, 3),
        round(memory, 1),
        _time_single(search, work.queries, work.single_queries),
        work.batch,
        _time_batched(search, work.queries, work.batch, 20),
        0.0,
        recall(),
        {"nlist": ivf._index.nlist, "nprobe": default, "candidates": ivf.candidates},
        sweep,
    )
    result.update_ms, result.delete_ms = _time_updates(ivf, work.keys, dim)
    return _finish(result)


def _time_updates(ivf: IvfIndex, keys: list[str], dim: int) -> tuple[float, float]:
    """Mean ms of one in-place update (a speaker's voiceprint moves) and of one deletion."""
    rng = np.random.default_rng(99)
    picks = rng.choice(len(keys), min(200, len(keys) // 2), replace=False)
    moved = _unit_rows(rng.standard_normal((len(picks), dim)).astype(np.float32))
    started = time.perf_counter()
    for i, vector in zip(picks, moved, strict=True):
        ivf.upsert(keys[i], vector)
    update_ms = (time.perf_counter() - started) * 1000 / len(picks)
    started = time.perf_counter()
    for i in picks:
        ivf.delete(keys[i])
    delete_ms = (time.perf_counter() - started) * 1000 / len(picks)
    return round(update_ms, 4), round(delete_ms, 4)


def _bench_hnsw(work: _Workload, truth_top1: list[str], m: int, ef_construction: int) -> IndexResult:
    """HNSW for comparison only: it cannot delete, so the gallery does not use it."""
    import faiss

    vectors, keys, queries = work.vectors, work.keys, work.queries
    work.progress(f"{len(vectors)}: HNSW M={m} efConstruction={ef_construction} (comparison only)")
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    for first in range(0, len(vectors), _CHUNK):
        index.add(vectors[first : first + _CHUNK])
        work.progress(f"HNSW: {min(first + _CHUNK, len(vectors))}/{len(vectors)} added")
    build_s = time.perf_counter() - started
    memory = (rss_bytes() - before) / 2**20

    def search(q: np.ndarray) -> object:
        return index.search(q, work.k)

    sweep = []
    for ef in (16, 32, 64, 128, 256):
        index.hnsw.efSearch = ef
        _, found = index.search(queries, 1)
        lat = _time_single(search, queries, min(work.single_queries, 300))
        recall = _recall([keys[i] for i in found[:, 0]], truth_top1)
        sweep.append({"ef_search": ef, "recall_at_1": recall, **asdict(lat)})
        work.progress(f"HNSW efSearch {ef}: recall@1 {recall}, p99 {lat.p99_ms} ms")
    best = max(sweep, key=lambda s: (s["recall_at_1"], -s["p99_ms"]))
    index.hnsw.efSearch = best["ef_search"]
    result = IndexResult(
        "hnsw (comparison only: no deletion)",
        round(build_s, 3),
        round(memory, 1),
        _time_single(search, queries, work.single_queries),
        work.batch,
        _time_batched(search, queries, work.batch, 20),
        0.0,
        best["recall_at_1"],
        {"M": m, "efConstruction": ef_construction, "efSearch": best["ef_search"]},
        sweep,
    )
    return _finish(result)


def plot_gallery(report: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, rec) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = sorted({r["kind"] for size in report for r in size["results"]})
    for kind in kinds:
        points = [(s["size"], r) for s in report for r in s["results"] if r["kind"] == kind]
        sizes = [p[0] for p in points]
        lat.plot(sizes, [p[1]["single"]["p99_ms"] for p in points], marker="o", label=f"{kind} p99")
        lat.plot(sizes, [p[1]["single"]["p50_ms"] for p in points], marker=".", ls="--", label=f"{kind} p50")
        if kind != "exact":
            rec.plot(sizes, [p[1]["recall_at_1"] for p in points], marker="o", label=kind)
    for ax in (lat, rec):
        ax.set_xscale("log")
        ax.set_xlabel("voiceprints in the gallery")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lat.set_yscale("log")
    lat.set_ylabel("single-query latency (ms)")
    rec.set_ylabel("recall@1 vs exact")
    fig.suptitle("speakerflow bench gallery")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
