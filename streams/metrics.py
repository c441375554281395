"""Worker metrics: Prometheus series on a per-worker registry, plus plain counters for logs and tests."""

from __future__ import annotations

import threading
from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client import Counter as PromCounter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Counters by event name (`chunks`, `windows`, `deadletter.diarize`, ...), histograms and gauges."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self._events = PromCounter(
            "speakerflow_events", "Things a worker counted, by event", ["event"], registry=self.registry
        )
        self.embed_seconds = Histogram(
            "speakerflow_embedding_batch_seconds",
            "Time to embed one batch of windows",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "speakerflow_embedding_batch_size",
            "Windows per embedding batch",
            registry=self.registry,
            buckets=BATCH_BUCKETS,
        )
        self.segment_latency = Histogram(
            "speakerflow_segment_latency_seconds",
            "Audio capture to identified segment emitted",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.gallery_size = Gauge(
            "speakerflow_gallery_size", "Voiceprints in this worker's gallery", registry=self.registry
        )
        self.lag = Gauge(
            "speakerflow_consumer_lag",
            "Records not yet consumed, by stage",
            ["stage"],
            registry=self.registry,
        )

    def inc(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount
        self._events.labels(name).inc(amount)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP for Prometheus."""
        start_http_server(port, addr=host, registry=self.registry)
