"""Deletion is real: a deleted speaker leaves every matcher, the database and identification.

Real embedded broker, real PostgreSQL, real GE2E model, a real worker; nothing mocked. Enrollment
audio is never stored by speakerflow, so there is no audio to delete (see README, "Deletion").
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import psycopg
import pytest

from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest
from speakerflow.streams.client import await_record, await_result, publish_enrollment, read_gallery_snapshot
from speakerflow.streams.runtime import Publisher, now_ms
from speakerflow.streams.topology import ENROLLMENT_RESULTS, SEGMENTS_DIARIZED, SEGMENTS_IDENTIFIED
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration

DELETED, KEPT = "ls-1688", "ls-2033"


def _eventually(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> float:
    """Seconds until `check()` held; fails the test after `timeout_s`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(poll_s)
    return time.monotonic() - started


def _speaker_rows(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT speaker_id FROM speakers")}


def _identify_through_kafka(settings, publisher: Publisher, ge2e, audio) -> dict:
    """Publish one diarized segment carrying `audio`'s embedding; return its identified segment."""
    stream_id = f"probe-{uuid.uuid4().hex[:6]}"
    segment = {
        "segment_id": f"{stream_id}:00000",
        "stream_id": stream_id,
        "label": "SPEAKER_00",
        "start_s": 0.0,
        "end_s": len(audio) / 16000,
        "is_final": True,
        "revision": 0,
        "embedding": ge2e.embed([audio])[0].tolist(),
        "window_count": 10,
        "model_id": ge2e.model_id,
        "source_capture_ts_ms": now_ms(),
        "emitted_at_ms": now_ms(),
    }
    publisher.publish(settings.topic(SEGMENTS_DIARIZED), stream_id, "DiarizedSegment", segment)
    publisher.flush()
    return await_record(
        settings,
        settings.topic(SEGMENTS_IDENTIFIED),
        "IdentifiedSegment",
        lambda s: s["segment_id"] == segment["segment_id"],
        timeout_s=30,
    )


def _enroll(settings, publisher: Publisher, speaker_id: str, files: list) -> None:
    request_id = publish_enrollment(publisher, speaker_id, f"name-{speaker_id}", files)
    result = await_result(settings, ENROLLMENT_RESULTS, request_id, 60)
    assert result["accepted"], result["reason"]


def test_deleted_speaker_leaves_matcher_database_and_identification(
    settings, database_url, ge2e, shared_data
):
    groups = by_speaker(load_manifest(shared_data), prefix="librispeech/test-other")
    worker = Worker(settings, roles=("match", "enroll", "sink"), database_url=database_url, embedder=ge2e)
    worker.start()
    try:
        publisher = Publisher(settings)
        for speaker_id in (DELETED, KEPT):  # three utterances: more than 10 s of speech each
            _enroll(settings, publisher, speaker_id, [u.path for u in groups[speaker_id][:3]])
        _eventually(lambda: DELETED in worker.gallery and KEPT in worker.gallery, 30)
        _eventually(lambda: _speaker_rows(database_url) == {DELETED, KEPT}, 30)

        # Held-out speech of the speaker is recognised before the deletion...
        voice = load_audio(groups[DELETED][6])
        before = _identify_through_kafka(settings, publisher, ge2e, voice)
        assert before["speaker_id"] == DELETED, before

        request_id = publish_enrollment(publisher, DELETED, "", [], mode="DELETE")
        result = await_result(settings, ENROLLMENT_RESULTS, request_id, 30)
        assert result["accepted"] and result["reason"] == "deleted"
        # ... the matcher drops it within seconds, the database row goes, the other speaker stays ...
        _eventually(lambda: DELETED not in worker.gallery, 10)
        assert KEPT in worker.gallery and len(worker.gallery.index) == 1
        _eventually(lambda: _speaker_rows(database_url) == {KEPT}, 15)

        # ... and the same speech is now nobody.
        after = _identify_through_kafka(settings, publisher, ge2e, voice)
        assert after["speaker_id"] is None and after["name"] == "UNKNOWN", after
        assert DELETED not in {c["speaker_id"] for c in after["candidates"]}
        # A fresh reader of the compacted gallery topic (a new matcher) never sees it either.
        assert set(read_gallery_snapshot(settings)) == {KEPT}
    finally:
        worker.stop()
