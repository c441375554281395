"""What the gateway remembers for the console: running streams, their latest segments, deletions; and the
clip cut from a live call's kept PCM."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from speakerflow.streams.api.live import cut_recording
from speakerflow.streams.hub import LiveRegistry


def _segment(stream: str, n: int, revision: int = 0, speaker: str | None = "ann", **extra) -> dict:
    return {
        "segment_id": f"{stream}:{n:05d}" if revision == 0 else f"{stream}:r{revision}:{n:05d}",
        "stream_id": stream,
        "label": "SPEAKER_00",
        "start_s": float(n),
        "end_s": n + 0.9,
        "speaker_id": speaker,
        "name": speaker or "UNKNOWN",
        "confidence": 0.9,
        "score": 0.8,
        "candidates": [],
        "is_final": True,
        "revision": revision,
        "model_id": "m",
        "emitted_at_ms": 1000 + n,
    } | extra


def _event(stream: str, kind: str, revision: int = 0) -> dict:
    return {
        "stream_id": stream,
        "event": kind,
        "at_ms": 5,
        "audio_seconds": 3.0,
        "speakers": 1,
        "revision": revision,
        "segments": 2,
        "reason": None,
    }


def test_latest_record_per_segment_and_revision_and_stream_state():
    live = LiveRegistry()
    live.stream_event(_event("a", "STARTED"))
    live.segment(_segment("a", 0, is_final=False))
    live.segment(_segment("a", 0))  # the final update replaces the provisional one
    live.segment(_segment("a", 0, revision=1))  # a revision is kept beside; the reader shows the highest
    assert [(s["segment_id"], s["is_final"]) for s in live.segments("a")] == [
        ("a:00000", True),
        ("a:r1:00000", True),
    ]
    assert live.streams()[0]["state"] == "RUNNING"
    live.stream_event(_event("a", "ENDED", revision=1))
    live.stream_event(_event("a", "STARTED"))  # a late STARTED does not reopen an ended stream
    assert live.streams()[0] | {"updated_at_ms": 0} == {
        "stream_id": "a",
        "state": "ENDED",
        "audio_seconds": 3.0,
        "speakers": 1,
        "revision": 1,
        "reason": None,
        "updated_at_ms": 0,
    }


def test_forgetting_a_speaker_makes_their_segments_unknown():
    live = LiveRegistry()
    live.segment(_segment("a", 0, speaker="ann"))
    live.segment(_segment("a", 1, speaker="bob"))
    changed = live.forget_speaker("ann")
    assert [(c["segment_id"], c["name"], c["speaker_id"]) for c in changed] == [("a:00000", "UNKNOWN", None)]
    assert sorted(s["name"] for s in live.segments("a")) == ["UNKNOWN", "bob"]


def test_only_the_most_recent_streams_are_kept():
    live = LiveRegistry(max_streams=2)
    for stream in ("a", "b", "c"):
        live.segment(_segment(stream, 0))
    assert [s["stream_id"] for s in live.streams()] == ["c", "b"]
    assert live.segments("a") == []


def test_a_segment_is_cut_from_a_kept_recording(tmp_path):
    rate = 16000
    pcm = (np.arange(3 * rate) % 1000).astype("<i2")
    path = tmp_path / f"recording-{rate}.s16le"
    path.write_bytes(pcm.tobytes())
    clip, clip_rate = sf.read(io.BytesIO(cut_recording(path, 1.0, 1.5)), dtype="int16")
    assert clip_rate == rate and np.array_equal(clip, pcm[rate : rate + rate // 2])
