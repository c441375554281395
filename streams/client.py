"""Client-side helpers: publish enrollments, play audio into the audio topic, follow output topics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_BEGINNING

from speakerflow.processors.audio import decode_file
from speakerflow.schemas import codec
from speakerflow.streams.records import enrollment_request, pcm_chunk, pcm_sample, verification_request
from speakerflow.streams.runtime import Publisher, TopicReader, group_consumer, now_ms, read_compacted
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


def publish_enrollment(
    publisher: Publisher, speaker_id: str, name: str, files: list[Path], mode: str = "ADD"
) -> str:
    """Publish an enrollment request; returns its request id."""
    record = enrollment_request(speaker_id, name, mode, [file_sample(f) for f in files])
    publisher.publish(publisher.settings.topic(ENROLLMENT_REQUESTS), speaker_id, "EnrollmentRequest", record)
    publisher.flush()
    return record["request_id"]


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
    consumer = group_consumer(
        settings,
        f"{settings.group_prefix}-follow-{uuid.uuid4().hex[:8]}",
        [topic],
        offset_reset="earliest" if from_beginning else "latest",
    )
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


# --- gallery helpers ---------------------------------------------------------------------


def publish_verification(publisher: Publisher, speaker_id: str, file: Path) -> str:
    """Publish a 1:1 verification request ("is this `speaker_id`?"); returns its request id."""
    record = verification_request(speaker_id, file_sample(file))
    publisher.publish(
        publisher.settings.topic(VERIFICATION_REQUESTS), record["request_id"], "VerificationRequest", record
    )
    publisher.flush()
    return record["request_id"]


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
    from speakerflow.gallery.voiceprint import Voiceprint

    topic = settings.topic(GALLERY)
    speakers: dict = {}
    for msg in read_compacted(settings, topic, timeout_s=timeout_s):
        key = (msg.key() or b"").decode()
        voiceprint = None if msg.value() is None else _voiceprint_or_none(Voiceprint, msg.value())
        if voiceprint is not None:
            speakers[key] = voiceprint
        elif msg.value() is None:  # tombstone; unreadable records are skipped like the table does
            speakers.pop(key, None)
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
    deadline = time.monotonic() + timeout_s
    with TopicReader(settings) as reader:
        partitions = reader.partitions(topic, timeout_s=max(timeout_s, 1.0)) or []
        reader.assign([(topic, p, OFFSET_BEGINNING) for p in partitions])
        while time.monotonic() < deadline:
            for msg in reader.poll(500, 0.05):
                if msg.value() is None:
                    continue
                try:
                    record = codec.decode(record_name, msg.value())
                except codec.SchemaError:
                    continue
                if predicate(record):
                    return record
    raise TimeoutError(f"no matching {record_name} on {topic} within {timeout_s} s")
