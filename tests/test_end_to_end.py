"""The first real path: enrollment -> gallery -> live stream -> identified segments -> PostgreSQL.

Real speech, the real embedded broker, real PostgreSQL and the default model (CAM++); nothing mocked.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from speakerflow.evaluation.scenario import STRANGER, librispeech_scenario
from speakerflow.streams.client import await_result, follow, play_audio, publish_enrollment, wait_for
from speakerflow.streams.runtime import Publisher
from speakerflow.streams.topology import ENROLLMENT_RESULTS, SEGMENTS_IDENTIFIED, STREAMS
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def test_identifies_enrolled_speakers_and_flags_a_stranger(settings, database_url, campplus, shared_data):
    assert settings.embedder == campplus.name  # the default embedder
    scenario = librispeech_scenario(shared_data, turns=8)
    worker = Worker(settings, database_url=database_url, embedder=campplus)
    worker.start()
    try:
        publisher = Publisher(settings)
        for speaker_id, files in scenario.enrollments.items():
            request_id = publish_enrollment(publisher, speaker_id, f"name-{speaker_id}", files)
            result = await_result(settings, ENROLLMENT_RESULTS, request_id, 120)
            assert result["accepted"], result["reason"]
        deadline = time.monotonic() + 30
        while len(worker.gallery) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker.gallery) == 3

        play_audio(publisher, "call-1", scenario.audio, chunk_s=0.5, realtime=False)
        ended = wait_for(
            settings,
            settings.topic(STREAMS),
            "StreamEvent",
            lambda e: e["stream_id"] == "call-1" and e["event"] == "ENDED",
            timeout_s=180,
        )
        assert ended["revision"] == 1 and ended["segments"] > 0  # the end-of-stream re-clustering
        finals: dict[str, dict] = {}
        for seg in follow(settings, settings.topic(SEGMENTS_IDENTIFIED), "IdentifiedSegment", timeout_s=120):
            if seg["is_final"] and seg["revision"] == ended["revision"]:
                finals[seg["segment_id"]] = seg  # a later record of a segment corrects the earlier one
            if len(finals) == ended["segments"]:
                break
    finally:
        worker.stop()

    # Time-weighted accuracy against the reference turns.
    named_right = enrolled_total = stranger_unknown = stranger_total = 0.0
    for turn in scenario.reference:
        for seg in finals.values():
            overlap = _overlap(turn.start_s, turn.end_s, seg["start_s"], seg["end_s"])
            if turn.speaker == STRANGER:
                stranger_total += overlap
                stranger_unknown += overlap * (seg["speaker_id"] is None)
            else:
                enrolled_total += overlap
                named_right += overlap * (seg["speaker_id"] == turn.speaker)
    assert enrolled_total > 20 and stranger_total > 3
    assert named_right / enrolled_total >= 0.90, (named_right, enrolled_total)
    assert stranger_unknown / stranger_total >= 0.90, (stranger_unknown, stranger_total)
    assert all(s["name"] == f"name-{s['speaker_id']}" for s in finals.values() if s["speaker_id"])

    # The same final segments are rows in PostgreSQL.
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(database_url) as conn:
            rows = {
                r[0]: r
                for r in conn.execute(
                    "SELECT segment_id, speaker_id, name, start_s, end_s FROM current_segments"
                    " WHERE stream_id = 'call-1' AND is_final"
                )
            }
        if set(rows) >= set(finals) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(rows) == set(finals)
    for segment_id, seg in finals.items():
        assert rows[segment_id][1:] == (seg["speaker_id"], seg["name"], seg["start_s"], seg["end_s"])
    with psycopg.connect(database_url) as conn:
        speakers = {r[0] for r in conn.execute("SELECT speaker_id FROM speakers")}
    assert speakers == set(scenario.enrollments)
