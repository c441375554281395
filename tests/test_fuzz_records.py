"""Property-based fuzz of every record type a stage consumes, over every field, through a real worker
(all stages and the sink) on the embedded broker and a real PostgreSQL database.

The strategies come from the Avro schemas in schemas/: for each field of each record, hostile values of
the field's Avro type (NUL bytes, 9,000 characters, 2**63-1, NaN, empty, huge maps...) replace the field
of an otherwise valid record. Afterwards the worker must still run every stage, each client-facing
record outside its limits must be in the dead-letter topic (matched by its key), and a good stream
played after the fuzz must still be labelled and reach PostgreSQL.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest
from speakerflow.processors.audio import encode_pcm
from speakerflow.schemas import codec
from speakerflow.streams import limits
from speakerflow.streams.client import follow, play_audio
from speakerflow.streams.records import audio_chunk, enrollment_request, pcm_sample, verification_request
from speakerflow.streams.runtime import Publisher, now_ms
from speakerflow.streams.topology import (
    AUDIO,
    DEADLETTER,
    ENROLLMENT_REQUESTS,
    GALLERY,
    SEGMENTS_DIARIZED,
    SEGMENTS_IDENTIFIED,
    STREAMS,
    VERIFICATION_REQUESTS,
)
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration

EXAMPLES_PER_FIELD = 3
HOSTILE_TEXT = ["", "   ", "a\x00b", "x" * 9000, "a/b", "\u202e\ud7ff", "call\x00evil"]
HOSTILE_LONG = [-1, -(2**63), 2**63 - 1, 2**53 + 1, 10**13 + 1]
HOSTILE_INT = [-1, 0, -(2**31), 2**31 - 1, 10**7]


def hostile(avro_type) -> st.SearchStrategy:
    """Values of an Avro type, biased to the ones that broke encoders, indexes and decoders."""
    if isinstance(avro_type, list):  # a union
        return st.one_of(*(hostile(t) for t in avro_type))
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "enum":
            return st.sampled_from(avro_type["symbols"])
        if kind == "array":
            return st.lists(hostile(avro_type["items"]), max_size=3)
        if kind == "map":
            return st.dictionaries(hostile("string"), hostile("string"), max_size=3) | st.just(
                {f"k{i}": "v" for i in range(40)}
            )
        if kind == "record":
            return st.fixed_dictionaries({f["name"]: hostile(f["type"]) for f in avro_type["fields"]})
        return hostile(kind)  # a logical type over a primitive
    return {
        "null": st.none(),
        "string": st.sampled_from(HOSTILE_TEXT) | st.text(max_size=30),
        "long": st.sampled_from(HOSTILE_LONG) | st.integers(-(2**63), 2**63 - 1),
        "int": st.sampled_from(HOSTILE_INT) | st.integers(-(2**31), 2**31 - 1),
        "double": st.floats(),
        "float": st.floats(width=32),
        "boolean": st.booleans(),
        "bytes": st.binary(max_size=64) | st.just(b"fLaC\x00\x00\x00\x22" + b"\xff" * 40),
    }[avro_type]


def templates(key: str, dim: int, model_id: str) -> dict[str, tuple[str, dict]]:
    """A valid record of each consumed type (topic, record), ids made from `key`, embeddings of the
    worker's model (so fuzzed ones reach the matcher and the gallery index)."""
    quiet = np.zeros(1600, np.float32)
    now = now_ms()
    diarized = {
        "segment_id": f"{key}:00000",
        "stream_id": key,
        "label": "S0",
        "start_s": 0.0,
        "end_s": 1.0,
        "is_final": True,
        "revision": 0,
        "embedding": [1.0] + [0.0] * (dim - 1),
        "window_count": 1,
        "model_id": model_id,
        "source_capture_ts_ms": now,
        "emitted_at_ms": now,
    }
    identified = {k: v for k, v in diarized.items() if k not in ("embedding", "window_count")} | {
        "speaker_id": None,
        "name": "",
        "confidence": 0.0,
        "score": 0.0,
        "candidates": [],
    }
    return {
        "AudioChunk": (AUDIO, audio_chunk(key, 0, now, encode_pcm(quiet, "PCM_S16LE"), True)),
        "EnrollmentRequest": (
            ENROLLMENT_REQUESTS,
            enrollment_request(key, "Fuzz", "ADD", [pcm_sample(quiet)], request_id=key),
        ),
        "VerificationRequest": (
            VERIFICATION_REQUESTS,
            verification_request(key, pcm_sample(quiet), request_id=key),
        ),
        "DiarizedSegment": (SEGMENTS_DIARIZED, diarized),
        "IdentifiedSegment": (SEGMENTS_IDENTIFIED, identified),
        "StreamEvent": (
            STREAMS,
            {
                "stream_id": key,
                "event": "ENDED",
                "at_ms": now,
                "audio_seconds": 1.0,
                "speakers": 1,
                "revision": 0,
                "segments": 1,
                "reason": None,
                "metadata": {},
            },
        ),
        "Voiceprint": (
            GALLERY,
            {
                "speaker_id": key,
                "name": "Fuzz",
                "model_id": model_id,
                "dim": dim,
                "embedding": [1.0] + [0.0] * (dim - 1),
                "sample_count": 1,
                "speech_seconds": 1.0,
                "updated_at_ms": now,
                "metadata": {},
            },
        ),
    }


# Records clients send: their limits are checked at the stage's entry, so out-of-limit ones must be
# dead-lettered. (The others are written by the stages themselves; for them the test asserts that the
# worker survives whatever they hold.)
ENTRY_CHECKS = {
    "AudioChunk": limits.check_audio_chunk,
    "EnrollmentRequest": limits.check_enrollment_request,
    "VerificationRequest": limits.check_verification_request,
}


def out_of_limits(record_name: str, record: dict) -> bool:
    check = ENTRY_CHECKS.get(record_name)
    if check is None:
        return False
    try:
        check(record)
    except limits.InvalidField:
        return True
    return False


@pytest.fixture
def _hide_lazy_speechbrain_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypothesis scans sys.modules for constants; SpeechBrain's lazy placeholders raise when touched."""
    if "speechbrain.utils.importutils" not in sys.modules:
        return
    from speechbrain.utils.importutils import LazyModule

    for name, module in list(sys.modules.items()):
        if isinstance(module, LazyModule):
            monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def worker(settings, ge2e, database_url) -> Iterator[Worker]:
    from dataclasses import replace

    w = Worker(replace(settings, idle_timeout_s=4.0), database_url=database_url, embedder=ge2e)
    w.start()
    yield w
    w.stop()


def test_fuzzed_records_of_every_type_never_stop_the_worker(
    settings, worker, database_url, shared_data, _hide_lazy_speechbrain_modules
):
    publisher = Publisher(settings)
    sent: dict[str, tuple[str, str, dict]] = {}  # key -> (record, field, value)
    counter = iter(range(10**6))
    model = (worker.embedder.dim, worker.embedder.model_id)

    def fuzz_field(record_name: str, field: dict) -> None:
        @hypothesis_settings(
            max_examples=EXAMPLES_PER_FIELD,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(value=hostile(field["type"]))
        def publish_one(value) -> None:
            key = f"fuzz-{next(counter)}"
            topic, record = templates(key, *model)[record_name]
            record[field["name"]] = value
            try:
                encoded = codec.encode(record_name, record)
            except codec.SchemaError:
                return  # not even Avro (e.g. an int out of range): no client can send it
            publisher._send(settings.topic(topic), key.encode(), encoded)
            sent[key] = (record_name, field["name"], value)

        publish_one()

    for record_name in templates("x", *model):
        for field in codec.schema(record_name)["fields"]:
            fuzz_field(record_name, field)
    publisher.flush()
    expected = {
        key
        for key, (name, field, value) in sent.items()
        if out_of_limits(name, templates(key, *model)[name][1] | {field: value})
    }
    assert expected, "the fuzz produced no out-of-limit record"

    # A good stream afterwards is still diarized, labelled and stored.
    speech = load_audio(by_speaker(load_manifest(shared_data), "librispeech/test-other")["ls-2033"][0])
    play_audio(publisher, "after-the-fuzz", speech[: 16000 * 8], chunk_s=1.0, realtime=False)
    labelled = None
    for seg in follow(settings, settings.topic(SEGMENTS_IDENTIFIED), "IdentifiedSegment", timeout_s=120):
        if seg["stream_id"] == "after-the-fuzz" and seg["is_final"] and seg["label"]:
            labelled = seg
            break
    assert labelled is not None, "the good stream was not labelled after the fuzz"

    missing = set(expected)
    letters = follow(
        settings, settings.topic(DEADLETTER), "DeadLetter", timeout_s=120, stop=lambda: not missing
    )
    for letter in letters:
        missing.discard((letter["key"] or b"").decode(errors="replace"))
    assert not missing, [sent[k] for k in sorted(missing)][:5]

    assert all(t.is_alive() for t in worker.threads), [t.failure for t in worker.threads]
    assert worker.sink.is_alive(), worker.sink.failure
    assert worker.gallery_table.is_alive()
    with psycopg.connect(database_url) as conn:
        stored = _wait_rows(conn, "after-the-fuzz")
    assert stored, "the sink did not store the good stream after the fuzz"


def _wait_rows(conn: psycopg.Connection, stream_id: str, timeout_s: float = 60) -> int:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = conn.execute("SELECT count(*) FROM segments WHERE stream_id = %s", (stream_id,)).fetchone()[0]
        if n:
            return n
        time.sleep(0.5)
    return 0
