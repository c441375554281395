"""PostgreSQL sink: identified segments and voiceprints into tables, losing and duplicating nothing.

Writes are idempotent upserts on natural keys ((segment_id, revision) for segments, speaker_id for
speakers), one transaction per polled batch, and the batch's offsets are committed only after the
database commit. A crash between the two replays the batch, and the upserts make the replay harmless.
While the database is unreachable the batch is retried with backoff and nothing is committed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
from confluent_kafka import Consumer, Message

from speakerflow.schemas import codec
from speakerflow.streams.database import migrate
from speakerflow.streams.runtime import Metrics, Publisher, send_to_dead_letter
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import GALLERY, STREAMS, stage

log = logging.getLogger(__name__)

UPSERT_SEGMENT = """
INSERT INTO segments (segment_id, revision, stream_id, label, start_s, end_s, speaker_id, name, confidence,
                      score, candidates, model_id, is_final, source_capture_at, emitted_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (segment_id, revision) DO UPDATE SET
    label = EXCLUDED.label, start_s = EXCLUDED.start_s, end_s = EXCLUDED.end_s,
    speaker_id = EXCLUDED.speaker_id, name = EXCLUDED.name, confidence = EXCLUDED.confidence,
    score = EXCLUDED.score, candidates = EXCLUDED.candidates, model_id = EXCLUDED.model_id,
    is_final = EXCLUDED.is_final, source_capture_at = EXCLUDED.source_capture_at,
    emitted_at = EXCLUDED.emitted_at, written_at = now()
WHERE NOT segments.is_final OR EXCLUDED.is_final
"""

UPSERT_SPEAKER = """
INSERT INTO speakers (speaker_id, name, model_id, dim, embedding, sample_count, speech_seconds, metadata,
                      updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (speaker_id) DO UPDATE SET
    name = EXCLUDED.name, model_id = EXCLUDED.model_id, dim = EXCLUDED.dim, embedding = EXCLUDED.embedding,
    sample_count = EXCLUDED.sample_count, speech_seconds = EXCLUDED.speech_seconds,
    metadata = EXCLUDED.metadata, updated_at = EXCLUDED.updated_at
"""


UPSERT_EMBEDDING = """
INSERT INTO speaker_embeddings (speaker_id, model_id, dim, embedding, updated_at)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (speaker_id, model_id) DO UPDATE SET
    dim = EXCLUDED.dim, embedding = EXCLUDED.embedding, updated_at = EXCLUDED.updated_at
"""

# Lifecycle events only move a stream forward: a replayed STARTED never reopens a finished stream.
UPSERT_STREAM = """
INSERT INTO streams (stream_id, status, started_at, ended_at, audio_seconds, speakers, final_revision, error)
VALUES (%(stream_id)s, %(status)s, %(started_at)s, %(ended_at)s, %(audio_seconds)s, %(speakers)s,
        %(revision)s, %(error)s)
ON CONFLICT (stream_id) DO UPDATE SET
    status = CASE WHEN streams.status IN ('DONE', 'FAILED') AND EXCLUDED.status = 'RUNNING'
                  THEN streams.status ELSE EXCLUDED.status END,
    started_at = coalesce(streams.started_at, EXCLUDED.started_at),
    ended_at = coalesce(EXCLUDED.ended_at, streams.ended_at),
    audio_seconds = greatest(coalesce(EXCLUDED.audio_seconds, 0), coalesce(streams.audio_seconds, 0)),
    speakers = coalesce(EXCLUDED.speakers, streams.speakers),
    final_revision = greatest(EXCLUDED.final_revision, streams.final_revision),
    error = coalesce(EXCLUDED.error, streams.error)
"""

FORGET_SPEAKERS = """
UPDATE segments SET
    speaker_id = CASE WHEN speaker_id = ANY(%s) THEN NULL ELSE speaker_id END,
    name = CASE WHEN speaker_id = ANY(%s) THEN 'UNKNOWN' ELSE name END,
    candidates = coalesce((SELECT jsonb_agg(c) FROM jsonb_array_elements(candidates) c
                           WHERE NOT (c->>'speaker_id' = ANY(%s))), '[]'::jsonb)
WHERE speaker_id = ANY(%s)
   OR EXISTS (SELECT 1 FROM jsonb_array_elements(candidates) c WHERE c->>'speaker_id' = ANY(%s))
"""

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


class PostgresSink(threading.Thread):
    role = "sink"
    topics = stage("sink").consumes

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        publisher: Publisher,
        metrics: Metrics,
        max_batch: int = 500,
    ) -> None:
        super().__init__(name="speakerflow-sink", daemon=True)
        self.settings = settings
        self.database_url = database_url
        self.publisher = publisher
        self.metrics = metrics
        self.max_batch = settings.sink_batch_size
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self._gallery_topic = settings.topic(GALLERY)
        self._streams_topic = settings.topic(STREAMS)
        self._conn: psycopg.Connection | None = None

    def run(self) -> None:
        consumer = Consumer(self.settings.consumer_config(self.settings.group(self.role)))
        try:
            # The schema first (the database may still be starting): nothing is consumed before it exists.
            self._retry(lambda: migrate(self.database_url))
            consumer.subscribe([self.settings.topic(t) for t in self.topics])
            while not self.stopping.is_set():
                messages = [m for m in consumer.consume(self.max_batch, timeout=0.2) if m.error() is None]
                if not messages:
                    continue
                self._retry(lambda batch=messages: self._write(batch))
                self.publisher.flush()  # dead letters of the batch
                consumer.commit(asynchronous=False)
        except BaseException as exc:
            self.failure = exc
            log.exception("sink failed")
        finally:
            consumer.close()
            if self._conn is not None:
                self._conn.close()

    def _retry(self, action: Callable[[], object]) -> None:
        """Run `action` until it succeeds, backing off while the database is unreachable."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                action()
                return
            except psycopg.OperationalError as exc:
                log.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
                self._conn = None
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        raise InterruptedError("sink stopped while the database was unavailable; offsets not committed")

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, connect_timeout=5)
        return self._conn

    def _write(self, messages: list[Message]) -> None:
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
                send_to_dead_letter(msg, self.role, exc, self.publisher, self.metrics)
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            if segments:
                cur.executemany(UPSERT_SEGMENT, list(segments.values()))
            live = [row for row in speakers.values() if row is not None]
            if live:
                cur.executemany(UPSERT_SPEAKER, live)
                cur.executemany(UPSERT_EMBEDDING, [(r[0], r[2], r[3], r[4], r[8]) for r in live])
            deleted = [sid for sid, row in speakers.items() if row is None]
            if deleted:
                # speaker_embeddings rows go with them (ON DELETE CASCADE); segments keep their time
                # ranges but lose the identity, candidates included (right to erasure).
                cur.execute("DELETE FROM speakers WHERE speaker_id = ANY(%s)", (deleted,))
                cur.execute(FORGET_SPEAKERS, (deleted,) * 5)
            if stream_events:
                cur.executemany(UPSERT_STREAM, stream_events)
        self.metrics.inc("sink.segments", len(segments))
