"""Client-side helpers: publish enrollments, play audio into the audio topic, follow output topics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer

from speakerflow.processors.audio import decode_file, encode_pcm
from speakerflow.schemas import codec
from speakerflow.streams.runtime import Publisher, consume_available, now_ms
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import (
    AUDIO,
    ENROLLMENT_REQUESTS,
    ENROLLMENT_RESULTS,
    GALLERY,
    VERIFICATION_REQUESTS,
    VERIFICATION_RESULTS,
)

SAMPLE_RATE = 16000


def file_sample(path: Path) -> dict:
    """An AudioSample record carrying the file's bytes; the worker decodes it (any supported format)."""
    suffix = path.suffix.lower().lstrip(".")
    encoding = {"flac": "FLAC", "wav": "WAV", "mp3": "MP3", "ogg": "OPUS_OGG", "opus": "OPUS_OGG"}.get(suffix)
    if encoding is None:  # other containers: decode here and send PCM
        return pcm_sample(decode_file(path))
    return {
        "payload": path.read_bytes(),
        "uri": None,
        "encoding": encoding,
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
    }


def pcm_sample(samples: np.ndarray) -> dict:
    """An AudioSample record carrying 16 kHz mono `samples` as PCM s16le."""
    return {
        "payload": encode_pcm(samples, "PCM_S16LE"),
        "uri": None,
        "encoding": "PCM_S16LE",
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
    }


def pcm_chunk(
    stream_id: str,
    seq: int,
    capture_ts_ms: int,
    samples: np.ndarray,
    end_of_stream: bool,
    metadata: dict[str, str] | None = None,
) -> dict:
    """An AudioChunk record carrying 16 kHz mono `samples` as PCM s16le."""
    return {
        "stream_id": stream_id,
        "seq": seq,
        "capture_ts_ms": capture_ts_ms,
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "encoding": "PCM_S16LE",
        "payload": encode_pcm(samples, "PCM_S16LE"),
        "end_of_stream": end_of_stream,
        "metadata": metadata or {},
    }


def publish_enrollment(
    publisher: Publisher, speaker_id: str, name: str, files: list[Path], mode: str = "ADD"
) -> str:
    """Publish an enrollment request; returns its request id."""
    request_id = uuid.uuid4().hex
    record = {
        "request_id": request_id,
        "speaker_id": speaker_id,
        "name": name,
        "mode": mode,
        "samples": [file_sample(f) for f in files],
        "metadata": {},
        "requested_at_ms": now_ms(),
    }
    publisher.publish(publisher.settings.topic(ENROLLMENT_REQUESTS), speaker_id, "EnrollmentRequest", record)
    publisher.flush()
    return request_id


def play_audio(
    publisher: Publisher,
    stream_id: str,
    samples: np.ndarray,
    chunk_s: float = 0.5,
    realtime: bool = True,
    on_chunk: Callable[[int, float], None] | None = None,
) -> int:
    """Send 16 kHz mono `samples` as PCM s16le chunks, at real-time pace if asked; returns chunks sent.

    Each chunk's capture time is when its first sample would have been captured live, so end-to-end
    latency can be measured from it.
    """
    topic = publisher.settings.topic(AUDIO)
    size = int(chunk_s * SAMPLE_RATE)
    starts = range(0, len(samples), size)
    origin_ms = now_ms()
    origin = time.monotonic()
    seq = 0
    for seq, start in enumerate(starts):
        chunk_offset_s = start / SAMPLE_RATE
        if realtime:  # a chunk can be sent once all its audio "has been spoken"
            wait = origin + chunk_offset_s + chunk_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        record = pcm_chunk(
            stream_id,
            seq,
            origin_ms + int(chunk_offset_s * 1000),
            samples[start : start + size],
            start + size >= len(samples),
        )
        publisher.publish(topic, stream_id, "AudioChunk", record)
        publisher.poll()
        if on_chunk:
            on_chunk(seq, chunk_offset_s)
    publisher.flush()
    return seq + 1


def follow(
    settings: Settings,
    topic: str,
    record_name: str,
    timeout_s: float | None = None,
    from_beginning: bool = True,
    stop: Callable[[], bool] | None = None,
) -> Iterator[dict]:
    """Decoded records of `topic` (full name) as they arrive, until `timeout_s` of total time or `stop()`."""
    conf = settings.consumer_config(f"{settings.group_prefix}-follow-{uuid.uuid4().hex[:8]}")
    conf["auto.offset.reset"] = "earliest" if from_beginning else "latest"
    consumer = Consumer(conf)
    consumer.subscribe([topic])
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while (deadline is None or time.monotonic() < deadline) and not (stop and stop()):
            msg = consumer.poll(0.1)
            if msg is None or msg.error() is not None or msg.value() is None:
                continue
            try:
                yield codec.decode(record_name, msg.value())
            except codec.SchemaError:
                continue
    finally:
        consumer.close()


def wait_for(
    settings: Settings, topic: str, record_name: str, predicate: Callable[[dict], bool], timeout_s: float
) -> dict:
    """The first record of `topic` matching `predicate`; raises TimeoutError."""
    for record in follow(settings, topic, record_name, timeout_s=timeout_s):
        if predicate(record):
            return record
    raise TimeoutError(f"no matching {record_name} on {topic} within {timeout_s} s")


# --- gallery helpers (issue 5) ---------------------------------------------------------------------


def publish_verification(publisher: Publisher, speaker_id: str, file: Path) -> str:
    """Publish a 1:1 verification request ("is this `speaker_id`?"); returns its request id."""
    request_id = uuid.uuid4().hex
    record = {
        "request_id": request_id,
        "speaker_id": speaker_id,
        "sample": file_sample(file),
        "requested_at_ms": now_ms(),
    }
    publisher.publish(
        publisher.settings.topic(VERIFICATION_REQUESTS), request_id, "VerificationRequest", record
    )
    publisher.flush()
    return request_id


def publish_voiceprints(publisher: Publisher, voiceprints: list) -> int:
    """Write `gallery.voiceprint.Voiceprint`s straight to the gallery topic (import); returns the count."""
    topic = publisher.settings.topic(GALLERY)
    for i, voiceprint in enumerate(voiceprints):
        publisher.publish(topic, voiceprint.speaker_id, "Voiceprint", voiceprint.to_record())
        if i % 1000 == 999:
            publisher.poll()
    publisher.flush()
    return len(voiceprints)


def read_gallery_snapshot(settings: Settings, timeout_s: float = 30.0) -> dict:
    """speaker id -> `Voiceprint` of every model, as the gallery topic says now (tombstones applied).

    Reads every partition of the compacted gallery topic from the beginning up to the end offsets taken
    at the start, like the gallery table does on a worker's start; raises TimeoutError if that takes
    longer than `timeout_s`.
    """
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from speakerflow.gallery.voiceprint import Voiceprint

    topic = settings.topic(GALLERY)
    consumer = Consumer(settings.consumer_config(None))
    speakers: dict = {}
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return speakers
        ends = {}
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gallery topic {topic} not read to its end within {timeout_s} s")
            for msg in consumer.consume(num_messages=1000, timeout=0.2):
                if msg.error() is not None:
                    continue
                key = (msg.key() or b"").decode()
                voiceprint = None if msg.value() is None else _voiceprint_or_none(Voiceprint, msg.value())
                if voiceprint is not None:
                    speakers[key] = voiceprint
                elif msg.value() is None:  # tombstone; unreadable records are skipped like the table does
                    speakers.pop(key, None)
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
    finally:
        consumer.close()
    return speakers


def _voiceprint_or_none(voiceprint_class: type, value: bytes):
    try:
        return voiceprint_class.from_record(codec.decode("Voiceprint", value))
    except (codec.SchemaError, ValueError):
        return None


RESULT_RECORDS = {ENROLLMENT_RESULTS: "EnrollmentResult", VERIFICATION_RESULTS: "VerificationResult"}


def await_result(settings: Settings, results_topic: str, request_id: str, timeout_s: float) -> dict:
    """The record answering `request_id` on a results topic (its short name, e.g. ENROLLMENT_RESULTS)."""
    return await_record(
        settings,
        settings.topic(results_topic),
        RESULT_RECORDS[results_topic],
        lambda r: r["request_id"] == request_id,
        timeout_s,
    )


def await_record(
    settings: Settings, topic: str, record_name: str, predicate: Callable[[dict], bool], timeout_s: float
) -> dict:
    """Like `wait_for`, but reads every partition of `topic` directly from the beginning instead of
    joining a consumer group, so it starts at once (a group join takes seconds)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    consumer = Consumer(settings.consumer_config(None))
    deadline = time.monotonic() + timeout_s
    try:
        metadata = consumer.list_topics(topic, timeout=max(timeout_s, 1.0)).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
        while time.monotonic() < deadline:
            for msg in consume_available(consumer, 500, 0.05):
                if msg.error() is not None or msg.value() is None:
                    continue
                try:
                    record = codec.decode(record_name, msg.value())
                except codec.SchemaError:
                    continue
                if predicate(record):
                    return record
    finally:
        consumer.close()
    raise TimeoutError(f"no matching {record_name} on {topic} within {timeout_s} s")
