"""Named regressions of the hostile inputs of issue 15, through a real worker (all stages and the sink)
on the embedded broker and PostgreSQL: each bad record is dead-lettered with a reason, nothing is
retried forever, and good data after it is still processed."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import psycopg
import pytest
import soundfile as sf

from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest
from speakerflow.processors.audio import encode_pcm
from speakerflow.schemas import codec
from speakerflow.streams.client import await_result, file_sample, follow, play_audio
from speakerflow.streams.database import scratch_database
from speakerflow.streams.records import (
    CREATE_ONLY,
    audio_chunk,
    enrollment_request,
)
from speakerflow.streams.runtime import Publisher, now_ms
from speakerflow.streams.topology import (
    AUDIO,
    DEADLETTER,
    ENROLLMENT_REQUESTS,
    ENROLLMENT_RESULTS,
    GALLERY,
    SEGMENTS_IDENTIFIED,
)
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(broker, pg_server, ge2e, tmp_path_factory) -> Iterator[dict]:
    settings = broker.run_settings(tmp_path_factory.mktemp("hostile"), idle_timeout_s=4.0)
    with scratch_database(pg_server, "speakerflow_hostile", migrated=False) as url:
        worker = Worker(replace(settings, chunk_max_audio_s=60.0), database_url=url, embedder=ge2e)
        worker.start()
        yield {"settings": settings, "url": url, "worker": worker, "publisher": Publisher(settings)}
        worker.stop()


@pytest.fixture(scope="module")
def speech(shared_data) -> np.ndarray:
    return load_audio(by_speaker(load_manifest(shared_data), "librispeech/test-other")["ls-2033"][0])[
        : 16000 * 8
    ]


def send(stack: dict, topic: str, key: str, record_name: str, record: dict) -> None:
    stack["publisher"].publish(stack["settings"].topic(topic), key, record_name, record)
    stack["publisher"].flush()


def dead_letter(stack: dict, key: str, timeout_s: float = 60) -> dict:
    settings = stack["settings"]
    for letter in follow(settings, settings.topic(DEADLETTER), "DeadLetter", timeout_s=timeout_s):
        if letter["key"] == key.encode():
            return letter
    raise AssertionError(f"no dead letter for {key!r}")


def labelled(stack: dict, stream_id: str, timeout_s: float = 90) -> dict:
    settings = stack["settings"]
    topic = settings.topic(SEGMENTS_IDENTIFIED)
    for seg in follow(settings, topic, "IdentifiedSegment", timeout_s=timeout_s):
        if seg["stream_id"] == stream_id and seg["is_final"] and seg["label"]:
            return seg
    raise AssertionError(f"stream {stream_id!r} was not labelled")


def alive(stack: dict) -> bool:
    worker = stack["worker"]
    return all(t.is_alive() for t in [*worker.threads, worker.sink, worker.gallery_table])


def test_nul_in_a_stream_id_is_dead_lettered_and_the_worker_goes_on(stack, speech):
    send(stack, AUDIO, "nul-call", "AudioChunk", audio_chunk("call\x00evil", 0, now_ms(), b"", True))
    letter = dead_letter(stack, "nul-call")
    assert letter["error_class"] == "InvalidField" and "stream_id" in letter["error_message"]
    assert letter["source_topic"] == stack["settings"].topic(AUDIO) and letter["source_offset"] >= 0
    play_audio(stack["publisher"], "after-nul", speech, chunk_s=1.0, realtime=False)
    assert labelled(stack, "after-nul") and alive(stack)


@pytest.mark.parametrize(("field", "value"), [("seq", 2**63 - 1), ("capture_ts_ms", 2**63 - 2)])
def test_overflowing_seq_and_capture_ts_are_dead_lettered(stack, field, value):
    chunk = audio_chunk(f"overflow-{field}", 0, now_ms(), encode_pcm(np.zeros(1600), "PCM_S16LE"), False)
    send(stack, AUDIO, f"overflow-{field}", "AudioChunk", chunk | {field: value})
    assert field in dead_letter(stack, f"overflow-{field}")["error_message"]
    assert alive(stack)


def test_9000_character_name_and_id_are_refused_not_retried_forever(stack):
    """An enrollment request with a 9,000-character name is dead-lettered at the enroll stage; a voiceprint
    whose id is too large for the btree index, written straight to the gallery topic, is dead-lettered by
    the sink (a refused row, not an outage) and the sink stores the next voiceprint."""
    request = enrollment_request("long-name", "x" * 9000, "ADD", [], request_id="long-name")
    send(stack, ENROLLMENT_REQUESTS, "long-name", "EnrollmentRequest", request)
    assert "name" in dead_letter(stack, "long-name")["error_message"]

    def voiceprint(speaker_id: str) -> dict:
        return {
            "speaker_id": speaker_id,
            "name": "n",
            "model_id": "other-model",
            "dim": 2,
            "embedding": [1.0, 0.0],
            "sample_count": 1,
            "speech_seconds": 1.0,
            "updated_at_ms": now_ms(),
            "metadata": {},
        }

    huge = "".join(f"{i:x}" for i in range(3000))[:9000]  # not compressible: too large for the index
    send(stack, GALLERY, huge, "Voiceprint", voiceprint(huge))
    send(stack, GALLERY, "after-huge", "Voiceprint", voiceprint("after-huge"))
    letter = dead_letter(stack, huge[:1024])
    assert letter["processor"] == "sink" and letter["error_class"] == "ProgramLimitExceeded"
    with psycopg.connect(stack["url"]) as conn:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if conn.execute("SELECT 1 FROM speakers WHERE speaker_id = 'after-huge'").fetchone():
                break
            time.sleep(0.3)
        else:
            raise AssertionError("the sink did not store the voiceprint after the refused one")
    assert alive(stack)


def test_a_bad_first_chunk_does_not_fix_the_stream_format(stack, speech):
    pcm = encode_pcm(speech, "PCM_S16LE")
    send(
        stack,
        AUDIO,
        "bad-first",
        "AudioChunk",
        audio_chunk("bad-first", 0, now_ms(), pcm[:32000], False) | {"sample_rate": 0},
    )
    for seq, start in enumerate(range(0, len(pcm), 32000), start=1):
        last = start + 32000 >= len(pcm)
        send(
            stack,
            AUDIO,
            "bad-first",
            "AudioChunk",
            audio_chunk("bad-first", seq, now_ms(), pcm[start : start + 32000], last),
        )
    letter = dead_letter(stack, "bad-first")
    assert "sample_rate 0" in letter["error_message"]
    assert labelled(stack, "bad-first")["stream_id"] == "bad-first"


def test_a_decompression_bomb_chunk_is_refused_before_decoding(stack):
    """Five minutes of silence as one FLAC chunk (a few kB) is over the 60-s chunk limit: refused from the
    header, dead-lettered."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 8000, 1, format="FLAC") as f:
        for _ in range(300):
            f.write(np.zeros(8000, np.float32))
    bomb = buf.getvalue()
    assert len(bomb) < 200_000
    chunk = audio_chunk("bomb", 0, now_ms(), bomb, True, encoding="FLAC", sample_rate=8000)
    send(stack, AUDIO, "bomb", "AudioChunk", chunk)
    letter = dead_letter(stack, "bomb")
    assert letter["error_class"] == "AudioTooLong" and "300 s" in letter["error_message"]
    assert alive(stack)


def test_create_only_and_adding_the_same_samples_twice(stack, shared_data):
    """The gateway's CREATE cannot merge into an existing speaker (the takeover of issue 15), and an ADD of
    samples already enrolled adds no speech."""
    files = [u.path for u in by_speaker(load_manifest(shared_data), "librispeech/test-other")["ls-2609"][:3]]
    settings = stack["settings"]

    def enroll(mode: str, metadata: dict[str, str]) -> dict:
        record = enrollment_request("victim", "Victim", mode, [file_sample(f) for f in files])
        record["metadata"] = metadata
        send(stack, ENROLLMENT_REQUESTS, "victim", "EnrollmentRequest", record)
        return await_result(settings, ENROLLMENT_RESULTS, record["request_id"], 90)

    first = enroll("ADD", {CREATE_ONLY: "true"})
    assert first["accepted"], first["reason"]
    takeover = enroll("ADD", {CREATE_ONLY: "true"})
    assert not takeover["accepted"] and "already enrolled" in takeover["reason"]
    again = enroll("ADD", {})
    assert again["accepted"] and "already enrolled" in again["reason"]
    assert again["speech_seconds"] == first["speech_seconds"]
    assert again["sample_count"] == first["sample_count"]


def test_a_record_too_large_to_publish_is_dead_lettered():
    """The size check that turns a too-large output into a dead letter (not a crash at flush)."""
    from speakerflow.streams.runtime import RECORD_MAX_BYTES, RecordTooLarge

    class Nowhere(Publisher):
        def __init__(self) -> None:  # no producer: the check comes first
            pass

    record = audio_chunk("big", 0, 0, b"\0" * (RECORD_MAX_BYTES + 1), True)
    with pytest.raises(RecordTooLarge):
        Nowhere().publish("t", "big", "AudioChunk", record)
    assert codec.encode("AudioChunk", audio_chunk("ok", 0, 0, b"", True))


def test_the_runtime_guard_dead_letters_any_exception_of_any_stage(settings):
    """The guard is the loop's, not a stage's: a toy stage that raises a plain RuntimeError on one record
    of a batch gets that record dead-lettered and every other record of the batch handled."""
    from confluent_kafka import Message

    from speakerflow.streams.runtime import Processor, ProcessorThread
    from speakerflow.streams.topology import create_topics

    handled: list[bytes] = []

    class Fragile(Processor):
        role = "fragile"
        topics = (AUDIO,)

        def handle(self, messages: list[Message], publisher: Publisher) -> None:
            for msg in messages:
                if msg.value() == b"poison":
                    raise RuntimeError("no stage expects this")
            handled.extend(m.value() for m in messages)

    create_topics(settings)
    publisher = Publisher(settings)
    thread = ProcessorThread(Fragile(), settings, publisher)
    thread.start()
    try:
        for value in (b"a", b"poison", b"b"):
            publisher._send(settings.topic(AUDIO), b"same-partition", value)
        publisher.flush()
        letter = dead_letter({"settings": settings}, "same-partition")
        assert letter["error_class"] == "RuntimeError" and letter["payload_excerpt"] == b"poison"
        deadline = time.monotonic() + 30
        while len(handled) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(handled) == [b"a", b"b"] and thread.is_alive()
    finally:
        thread.stopping.set()
        thread.join(timeout=15)
        publisher.close()
