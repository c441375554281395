"""A worker process: the gallery table plus the stages it was asked to run, until told to stop."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from speakerflow.processors.batcher import EmbeddingBatcher
from speakerflow.processors.embedding import Embedder, load_embedder
from speakerflow.processors.scoring import default_calibration
from speakerflow.streams.runtime import Metrics, ProcessorThread, Publisher, run_until
from speakerflow.streams.settings import Settings
from speakerflow.streams.stages.diarize import DiarizeProcessor
from speakerflow.streams.stages.gallery_table import GalleryTable
from speakerflow.streams.stages.match import MatchProcessor, build_gallery_and_matcher
from speakerflow.streams.stages.requests import EnrollProcessor, VerifyProcessor
from speakerflow.streams.stages.sink import PostgresSink
from speakerflow.streams.topology import ROLES, create_topics

log = logging.getLogger(__name__)

ALL_ROLES = ROLES  # streams/topology.py declares the stages
MODEL_ROLES = {"diarize", "match", "enroll", "verify"}  # roles that need the embedder and the gallery


class Worker:
    def __init__(
        self,
        settings: Settings,
        roles: tuple[str, ...] = ALL_ROLES,
        database_url: str = "",
        embedder: Embedder | None = None,
    ) -> None:
        unknown = set(roles) - set(ALL_ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; choose from {ALL_ROLES}")
        if "sink" in roles and not database_url:
            raise ValueError("the sink role needs a database URL")
        self.settings = settings
        self.roles = roles
        self.database_url = database_url
        self.metrics = Metrics()
        self.stop_event = threading.Event()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.publisher = Publisher(settings)
        self.gallery_table: GalleryTable | None = None
        self.embedder: EmbeddingBatcher | None = None
        if MODEL_ROLES & set(roles):  # a sink-only worker needs no model
            model = embedder or load_embedder(
                settings.embedder,
                settings.device,
                settings.embedding_model_path,
                cpu_workers=settings.embedding_workers or os.cpu_count() or 1,
            )
            # One batcher per worker: windows of every stream and stage share the model's batches.
            self.embedder = EmbeddingBatcher(
                model, settings.batch_max_size, settings.batch_max_wait_ms, on_batch=self._observe_batch
            )
            self.calibration = default_calibration(
                self.embedder.model_id,
                settings.match_threshold,
                settings.calibration_path,
                settings.operating_point,
            )
            self.gallery, self.matcher = build_gallery_and_matcher(
                settings, self.embedder.model_id, self.embedder.dim, self.calibration
            )
            self.gallery_table = GalleryTable(settings, self.gallery)
        self.threads: list[ProcessorThread] = []
        self.sink: ProcessorThread | None = None  # not waited for at start: the database may be down

    def _observe_batch(self, windows: int, seconds: float) -> None:
        self.metrics.batch_size.observe(windows)
        self.metrics.embed_seconds.observe(seconds)

    def start(self, ready_timeout_s: float = 60.0) -> None:
        create_topics(self.settings)
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        if self.gallery_table is not None:
            self.metrics.gallery_size.set_function(lambda: len(self.gallery))
            self.gallery_table.start()
            if not self.gallery_table.ready.wait(ready_timeout_s):
                raise TimeoutError("gallery table did not load in time")
        stages = {
            "diarize": lambda: DiarizeProcessor(self.settings, self.embedder, self.metrics),
            "match": lambda: MatchProcessor(self.settings, self.matcher, self.metrics),
            "enroll": lambda: EnrollProcessor(self.settings, self.embedder, self.gallery, self.metrics),
            "verify": lambda: VerifyProcessor(
                self.settings, self.embedder, self.gallery, self.calibration, self.metrics
            ),
        }
        for role in self.roles:
            if role in stages:
                thread = ProcessorThread(stages[role](), self.settings, self.publisher, self.metrics)
                thread.start()
                self.threads.append(thread)
        if "sink" in self.roles:
            sink = PostgresSink(self.settings, self.database_url, self.metrics)
            self.sink = ProcessorThread(sink, self.settings, self.publisher, self.metrics)
            self.sink.start()
        deadline = time.monotonic() + ready_timeout_s
        for thread in self.threads:
            if not thread.assigned.wait(max(deadline - time.monotonic(), 0.1)):
                raise TimeoutError(f"stage {thread.processor.role} got no partitions in time")
        model = f" model={self.embedder.model_id} gallery={len(self.gallery)}" if self.gallery_table else ""
        mode = f" diarizer={self.settings.diarizer}" if "diarize" in self.roles else ""
        log.info("worker ready: roles=%s%s%s", ",".join(self.roles), model, mode)

    def run_forever(self) -> None:
        try:
            run_until(self.stop_event, self.threads, on_idle=self._check_sink)
        finally:
            self.stop()

    def _check_sink(self) -> None:
        if self.sink is not None and not self.sink.is_alive():
            raise RuntimeError(f"sink stopped: {self.sink.failure!r}")

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.stopping.set()
        if self.sink is not None:
            self.sink.stopping.set()
        if self.gallery_table is not None:
            self.gallery_table.stopping.set()
        for thread in [*self.threads, self.sink, self.gallery_table]:
            if thread is not None and thread.is_alive():
                thread.join(timeout=15)
        if self.embedder is not None:
            self.embedder.close(timeout=15)
        self.publisher.close()
        log.info("worker stopped; counters: %s", dict(self.metrics.counters))
