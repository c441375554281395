"""One embedding batcher per worker: windows from every stream and stage share the model's batches.

Callers `submit` waveforms from any thread and get a `Future`; a background thread collects them into
batches of at most `max_batch_size`, waiting at most `max_wait_ms` after the oldest pending window
arrived (so a lone window is never stuck), and calls `embedder.embed` once per batch. With no wait, the
batch is whatever queued up while the previous batch ran: no added latency when the model is idle, large
batches when it is busy. When more
windows are waiting than fit in one batch, the batch is the oldest window plus the windows closest to
it in length, which limits padding without starving anyone (the oldest always goes next).

A batch that fails is retried window by window, so one bad window fails only its own future and the
other streams' windows still get their embeddings.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from speakerflow.processors.embedding import Embedder

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts windows."""


@dataclass
class _Pending:
    waveform: np.ndarray
    future: Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatcherStats:
    """Counters for observability (batch sizes tell whether max_wait_ms is well chosen)."""

    windows: int = 0
    batches: int = 0
    failed_windows: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0


class EmbeddingBatcher:
    """Groups single-window embedding requests from many threads into batched `embedder.embed` calls.

    It also satisfies the `Embedder` protocol (`embed` = submit all and wait), so code written against
    an embedder can be handed the batcher and its windows then share batches with every other caller.
    """

    def __init__(
        self,
        embedder: Embedder,
        max_batch_size: int = 64,
        max_wait_ms: float = 20.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """`on_batch(windows, seconds)` is called after every batch (metrics)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self.embedder = embedder
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="embedding-batcher", daemon=True)
        self._thread.start()

    # The Embedder protocol, delegated, so the batcher can stand in for its embedder.
    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def device(self) -> torch.device:
        return self.embedder.device

    def submit(self, waveform: np.ndarray) -> Future:
        """Queue one 16 kHz mono waveform; the future resolves to its (dim,) float32 embedding."""
        return self.submit_many([waveform])[0]

    def submit_many(self, waveforms: Sequence[np.ndarray]) -> list[Future]:
        """Queue several waveforms at once, so they reach the same batch even with no wait configured."""
        pending = []
        futures: list[Future] = []
        for waveform in waveforms:
            future: Future = Future()
            wav = np.asarray(waveform, dtype=np.float32)
            if wav.ndim != 1 or wav.size == 0:
                future.set_exception(ValueError(f"expected a non-empty 1-D waveform, got shape {wav.shape}"))
            else:
                pending.append(_Pending(wav, future))
            futures.append(future)
        with self._cond:
            if self._closing:
                raise BatcherClosed("the embedding batcher is closed")
            self._queue.extend(pending)
            self._cond.notify()
        return futures

    def embed_many(self, waveforms: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """Submit every waveform and wait: (N, dim) float32 rows in input order."""
        futures = self.submit_many(waveforms)
        if not futures:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([f.result(timeout=timeout) for f in futures])

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        return self.embed_many(waveforms)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting windows, finish the queued ones, and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddingBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            self._embed(batch)
            elapsed = time.perf_counter() - started
            self.stats.busy_s += elapsed
            if self.on_batch is not None:
                self.on_batch(len(batch), elapsed)

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch is due (full, oldest waited max_wait, or closing); None when done."""
        with self._cond:
            while True:
                if self._queue:
                    waited = time.monotonic() - self._queue[0].enqueued
                    if self._closing or len(self._queue) >= self.max_batch_size or waited >= self.max_wait_s:
                        return self._take_batch()
                    self._cond.wait(self.max_wait_s - waited)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()

    def _take_batch(self) -> list[_Pending]:
        """The oldest window plus up to max_batch_size - 1 others, closest in length first."""
        if len(self._queue) <= self.max_batch_size:
            batch, self._queue = self._queue, []
            return batch
        anchor = math.log(len(self._queue[0].waveform))
        rest = sorted(
            range(1, len(self._queue)),
            key=lambda i: (abs(math.log(len(self._queue[i].waveform)) - anchor), i),
        )
        chosen = {0, *rest[: self.max_batch_size - 1]}
        batch = [p for i, p in enumerate(self._queue) if i in chosen]
        self._queue = [p for i, p in enumerate(self._queue) if i not in chosen]
        return batch

    def _embed(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            rows = self._checked_embed([p.waveform for p in batch])
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            log.warning("embedding a batch of %d failed (%s); retrying window by window", len(batch), exc)
            for pending in batch:
                try:
                    self._resolve([pending], self._checked_embed([pending.waveform]))
                except Exception as single_exc:
                    self._fail(pending, single_exc)
            return
        self._resolve(batch, rows)

    def _checked_embed(self, waveforms: list[np.ndarray]) -> np.ndarray:
        rows = np.asarray(self.embedder.embed(waveforms), dtype=np.float32)
        if rows.shape != (len(waveforms), self.dim):
            raise RuntimeError(f"embedder returned shape {rows.shape} for {len(waveforms)} windows")
        return rows

    def _resolve(self, batch: list[_Pending], rows: np.ndarray) -> None:
        for pending, row in zip(batch, rows, strict=True):
            pending.future.set_result(row)
        self.stats.windows += len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))

    def _fail(self, pending: _Pending, exc: BaseException) -> None:
        self.stats.failed_windows += 1
        pending.future.set_exception(exc)
