"""EmbeddingBatcher: many threads share batches of the real GE2E model and get their own rows back."""

from __future__ import annotations

import csv
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from speakerflow.processors.audio import decode_file
from speakerflow.processors.batcher import BatcherClosed, EmbeddingBatcher


@pytest.fixture(scope="module")
def windows(shared_data: Path) -> list[np.ndarray]:
    """48 windows of real speech from several files, lengths 0.5 to 3 s."""
    with open(shared_data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["speaker"].startswith("ls-")][::11][:6]
    out = []
    for k, row in enumerate(rows):
        audio = decode_file(shared_data / row["path"])
        for j in range(8):
            length = 8000 + 4000 * ((k + j) % 11)
            start = j * 8000
            out.append(audio[start : start + length])
    return out


class Recording:
    """Wraps a real embedder; records each batch's window lengths, can hold a call, can fail on NaN."""

    def __init__(self, embedder, gate: threading.Event | None = None) -> None:
        self.inner = embedder
        self.name, self.model_id, self.dim, self.device = (
            embedder.name,
            embedder.model_id,
            embedder.dim,
            embedder.device,
        )
        self.batches: list[list[int]] = []
        self.gate = gate
        self.entered = threading.Event()

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        self.batches.append([len(w) for w in waveforms])
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if any(np.isnan(w).any() for w in waveforms):
            raise ValueError("window contains NaN")
        return self.inner.embed(waveforms)


def test_many_threads_get_their_own_rows(ge2e, windows: list[np.ndarray]) -> None:
    expected = ge2e.embed(windows)
    recorder = Recording(ge2e)
    with EmbeddingBatcher(recorder, max_batch_size=16, max_wait_ms=30) as batcher:

        def one_stream(offset: int) -> list[tuple[int, np.ndarray]]:
            indices = range(offset, len(windows), 8)
            futures = [(i, batcher.submit(windows[i])) for i in indices]
            return [(i, f.result(timeout=60)) for i, f in futures]

        with ThreadPoolExecutor(8) as pool:
            results = [pair for part in pool.map(one_stream, range(8)) for pair in part]
    assert sorted(i for i, _ in results) == list(range(len(windows)))
    for i, row in results:
        np.testing.assert_allclose(row, expected[i], atol=1e-5)
    assert max(len(b) for b in recorder.batches) <= 16
    assert len(recorder.batches) < len(windows), "windows of different threads should share batches"
    assert batcher.stats.windows == len(windows)


def test_embed_many_and_the_embedder_interface(ge2e, windows: list[np.ndarray]) -> None:
    with EmbeddingBatcher(ge2e, max_batch_size=8, max_wait_ms=5) as batcher:
        assert (batcher.name, batcher.model_id, batcher.dim) == (ge2e.name, ge2e.model_id, ge2e.dim)
        out = batcher.embed(windows[:10])
        assert batcher.embed_many([]).shape == (0, ge2e.dim)
    np.testing.assert_allclose(out, ge2e.embed(windows[:10]), atol=1e-5)


def test_a_lone_window_does_not_wait_for_a_full_batch(ge2e, windows: list[np.ndarray]) -> None:
    with EmbeddingBatcher(ge2e, max_batch_size=1000, max_wait_ms=20) as batcher:
        row = batcher.submit(windows[0]).result(timeout=30)
    np.testing.assert_allclose(row, ge2e.embed(windows[:1])[0], atol=1e-5)


def test_a_failing_window_fails_alone(ge2e, windows: list[np.ndarray]) -> None:
    bad = windows[3].copy()
    bad[100] = np.nan
    gate = threading.Event()
    recorder = Recording(ge2e, gate)
    with EmbeddingBatcher(recorder, max_batch_size=8, max_wait_ms=1) as batcher:
        first = batcher.submit(windows[0])
        assert recorder.entered.wait(10)  # the first batch is running; the next ones queue up together
        good = [batcher.submit(w) for w in windows[1:4]]
        failing = batcher.submit(bad)
        gate.set()
        with pytest.raises(ValueError, match="NaN"):
            failing.result(timeout=30)
        for future, window in zip([first, *good], windows[:4], strict=True):
            np.testing.assert_allclose(future.result(timeout=30), ge2e.embed([window])[0], atol=1e-5)
    assert batcher.stats.failed_windows == 1


def test_an_embedder_that_always_fails_fails_every_future(ge2e, windows: list[np.ndarray]) -> None:
    broken = [w.copy() for w in windows[:5]]
    for w in broken:
        w[0] = np.nan
    with EmbeddingBatcher(Recording(ge2e), max_batch_size=8, max_wait_ms=5) as batcher:
        futures = [batcher.submit(w) for w in broken]
        for f in futures:
            assert isinstance(f.exception(timeout=30), ValueError)
        with pytest.raises(ValueError):
            batcher.embed_many(broken)


def test_bad_input_is_refused_per_window(ge2e) -> None:
    with EmbeddingBatcher(ge2e) as batcher:
        assert isinstance(batcher.submit(np.zeros((2, 100), np.float32)).exception(timeout=5), ValueError)
        assert isinstance(batcher.submit(np.zeros(0, np.float32)).exception(timeout=5), ValueError)


def test_full_queue_batches_by_length_and_oldest_goes_first(ge2e, windows: list[np.ndarray]) -> None:
    gate = threading.Event()
    recorder = Recording(ge2e, gate)
    lengths = [16000, 48000, 8000, 47000, 15000, 46000, 9000, 16500]
    audio = windows[0] if len(windows[0]) >= 48000 else np.tile(windows[0], 10)
    with EmbeddingBatcher(recorder, max_batch_size=3, max_wait_ms=1) as batcher:
        blocker = batcher.submit(audio[:4000])
        assert recorder.entered.wait(10)
        futures = [batcher.submit(audio[:n]) for n in lengths]
        gate.set()
        blocker.result(timeout=30)
        for f in futures:
            f.result(timeout=30)
    # After the blocker: the oldest (16000) with its two nearest lengths, then the next oldest, ...
    assert recorder.batches[1:] == [[16000, 15000, 16500], [48000, 47000, 46000], [8000, 9000]]


def test_close_finishes_queued_windows_then_refuses_new_ones(ge2e, windows: list[np.ndarray]) -> None:
    batcher = EmbeddingBatcher(ge2e, max_batch_size=4, max_wait_ms=1000)
    futures = [batcher.submit(w) for w in windows[:6]]
    batcher.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(BatcherClosed):
        batcher.submit(windows[0])


def test_with_no_wait_one_call_is_one_batch_and_a_busy_model_gathers_the_rest(ge2e, windows) -> None:
    gate = threading.Event()
    recorder = Recording(ge2e, gate)
    with EmbeddingBatcher(recorder, max_batch_size=64, max_wait_ms=0) as batcher:
        first = batcher.submit_many(windows[:5])  # one caller's windows arrive together
        assert recorder.entered.wait(10)
        # While the model is busy, two other callers queue up: they share the next batch.
        later = batcher.submit_many(windows[5:8]) + batcher.submit_many(windows[8:12])
        gate.set()
        rows = [f.result(timeout=30) for f in first + later]
    assert [len(b) for b in recorder.batches] == [5, 7]
    np.testing.assert_allclose(np.stack(rows), ge2e.embed(windows[:12]), atol=1e-5)
