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
from datetime import UTC, datetime

import psycopg
from confluent_kafka import Consumer, Message

from schemas import codec
from streams.runtime import Metrics, Publisher, send_to_dead_letter
from streams.settings import Settings

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


class PostgresSink(threading.Thread):
    role = "sink"

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
        self.max_batch = max_batch
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self._segments_topic = settings.topic("segments.identified")
        self._gallery_topic = settings.topic("gallery")
        self._conn: psycopg.Connection | None = None

    def run(self) -> None:
        consumer = Consumer(self.settings.consumer_config(self.settings.group(self.role)))
        consumer.subscribe([self._segments_topic, self._gallery_topic])
        try:
            while not self.stopping.is_set():
                messages = [m for m in consumer.consume(self.max_batch, timeout=0.2) if m.error() is None]
                if not messages:
                    continue
                self._write_with_retry(messages)
                self.publisher.flush()  # dead letters of the batch
                consumer.commit(asynchronous=False)
        except BaseException as exc:
            self.failure = exc
            log.exception("sink failed")
        finally:
            consumer.close()
            if self._conn is not None:
                self._conn.close()

    def _write_with_retry(self, messages: list[Message]) -> None:
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self._write(messages)
                return
            except psycopg.OperationalError as exc:
                log.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
                self._conn = None
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        raise InterruptedError("sink stopped before the batch was written; offsets not committed")

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, connect_timeout=5)
        return self._conn

    def _write(self, messages: list[Message]) -> None:
        segments: dict[tuple[str, int], tuple] = {}
        speakers: dict[str, tuple | None] = {}
        for msg in messages:
            try:
                if msg.topic() == self._gallery_topic:
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
            deleted = [sid for sid, row in speakers.items() if row is None]
            if deleted:
                cur.execute("DELETE FROM speakers WHERE speaker_id = ANY(%s)", (deleted,))
        self.metrics.inc("sink.segments", len(segments))
