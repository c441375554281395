"""PostgreSQL sink: identified segments and voiceprints into tables, losing and duplicating nothing.

Writes are idempotent upserts on natural keys ((segment_id, revision) for segments, speaker_id for
speakers), one transaction per polled batch, and the batch's offsets are committed only after the
database commit. A crash between the two replays the batch, and the upserts make the replay harmless.
While the database is unreachable the batch is retried with backoff and nothing is committed.

An outage and a refused row are told apart: connection failures and the SQLSTATE classes of a server
that is away (08 connection, 53 resources, 57 shutdown, 58 system) are retried forever; any other
database error (NUL in text, a key too large for its btree index, a value out of range) is the row's
fault, so it propagates, and the runtime's loop retries the batch record by record and sends the
refused record to the dead-letter topic.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
from confluent_kafka import Message

from speakerflow.schemas import codec
from speakerflow.streams import queries
from speakerflow.streams.database import is_outage, migrate
from speakerflow.streams.runtime import Metrics, Processor, Publisher, send_to_dead_letter
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import GALLERY, STREAMS, stage

log = logging.getLogger(__name__)

STREAM_STATUS = {"STARTED": "RUNNING", "ENDED": "DONE", "FAILED": "FAILED"}


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def segment_row(s: dict) -> tuple:
    return (
        s["segment_id"],
        s["revision"],
        s["stream_id"],
        s["label"],
        s["start_s"],
        s["end_s"],
        s["speaker_id"],
        s["name"],
        s["confidence"],
        s["score"],
        json.dumps(s["candidates"]),
        s["model_id"],
        s["is_final"],
        _ts(s["source_capture_ts_ms"]),
        _ts(s["emitted_at_ms"]),
    )


def speaker_row(v: dict) -> tuple:
    return (
        v["speaker_id"],
        v["name"],
        v["model_id"],
        v["dim"],
        v["embedding"],
        v["sample_count"],
        v["speech_seconds"],
        json.dumps(v["metadata"]),
        _ts(v["updated_at_ms"]),
    )


def stream_params(e: dict) -> dict:
    ended = e["event"] != "STARTED"
    return {
        "stream_id": e["stream_id"],
        "status": STREAM_STATUS[e["event"]],
        "started_at": _ts(e["at_ms"]) if not ended else None,
        "ended_at": _ts(e["at_ms"]) if ended else None,
        "audio_seconds": e["audio_seconds"],
        "speakers": e["speakers"] if ended else None,
        "revision": e["revision"],
        "error": e["reason"] if e["event"] == "FAILED" else None,
    }


class PostgresSink(Processor):
    """The sink stage: runs in the runtime's loop (`ProcessorThread`) like every other stage; `handle`
    writes one polled batch in one transaction, retrying while the database is unreachable, and the
    loop commits the batch's offsets only after it returns."""

    role = "sink"
    topics = stage("sink").consumes

    def __init__(
        self, settings: Settings, database_url: str, metrics: Metrics, max_batch: int | None = None
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.metrics = metrics
        self.max_batch = max_batch or settings.sink_batch_size
        self.stopping = threading.Event()
        self._gallery_topic = settings.topic(GALLERY)
        self._streams_topic = settings.topic(STREAMS)
        self._conn: psycopg.Connection | None = None

    def open(self, stopping: threading.Event) -> None:
        # The schema first (the database may still be starting): nothing is consumed before it exists.
        self.stopping = stopping
        self._retry(lambda: migrate(self.database_url))

    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        self._retry(lambda: self._write(messages, publisher))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _retry(self, action: Callable[[], object]) -> None:
        """Run `action` until it succeeds, backing off while the database is unreachable."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                action()
                return
            except psycopg.Error as exc:
                if not is_outage(exc):
                    raise
                log.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
                self._conn = None
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        raise InterruptedError("sink stopped while the database was unavailable; offsets not committed")

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, connect_timeout=5)
        return self._conn

    def _write(self, messages: list[Message], publisher: Publisher) -> None:
        segments: dict[tuple[str, int], tuple] = {}
        speakers: dict[str, tuple | None] = {}
        stream_events: list[dict] = []
        for msg in messages:
            try:
                if msg.topic() == self._streams_topic:
                    stream_events.append(stream_params(codec.decode("StreamEvent", msg.value() or b"")))
                elif msg.topic() == self._gallery_topic:
                    key = (msg.key() or b"").decode()
                    speakers[key] = (
                        None if msg.value() is None else speaker_row(codec.decode("Voiceprint", msg.value()))
                    )
                else:
                    row = segment_row(codec.decode("IdentifiedSegment", msg.value() or b""))
                    segments[(row[0], row[1])] = row  # the newest update of a segment wins
            except (codec.SchemaError, ValueError, UnicodeDecodeError) as exc:
                send_to_dead_letter(msg, self.role, exc, publisher, self.metrics)
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            if segments:
                cur.executemany(queries.UPSERT_SEGMENT, list(segments.values()))
            live = [row for row in speakers.values() if row is not None]
            if live:
                cur.executemany(queries.UPSERT_SPEAKER, live)
                cur.executemany(queries.UPSERT_EMBEDDING, [(r[0], r[2], r[3], r[4], r[8]) for r in live])
            deleted = [sid for sid, row in speakers.items() if row is None]
            if deleted:
                # speaker_embeddings rows go with them (ON DELETE CASCADE); segments keep their time
                # ranges but lose the identity, candidates included (right to erasure).
                cur.execute(queries.DELETE_SPEAKERS, (deleted,))
                cur.execute(queries.FORGET_SPEAKERS, (deleted,) * 5)
            if stream_events:
                cur.executemany(queries.UPSERT_STREAM, stream_events)
        self.metrics.inc("sink.segments", len(segments))
