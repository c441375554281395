"""Enrollment quality gates with the default embedder (CAM++): one voiceprint per voice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest
from speakerflow.gallery.enrollment import EnrollmentRejected, enroll


@pytest.fixture(scope="module")
def groups(shared_data: Path):
    return by_speaker(load_manifest(shared_data))


def test_a_meeting_excerpt_with_several_voices_is_refused(campplus, shared_data: Path) -> None:
    # AMI excerpt, four people talking in turns (reference in the .rttm beside it).
    meeting = next(u for u in load_manifest(shared_data) if str(u.path).endswith("ami_trn00.flac"))
    with pytest.raises(EnrollmentRejected, match=r"holds \d voices") as refused:
        enroll("meeting", "meeting", [load_audio(meeting)], campplus, 0)
    assert "enroll one speaker per request" in str(refused.value)


def test_two_librispeech_speakers_in_one_recording_are_refused(campplus, groups) -> None:
    joined = np.concatenate([load_audio(groups["ls-2033"][1]), load_audio(groups["ls-1998"][1])])
    with pytest.raises(EnrollmentRejected, match="voices"):
        enroll("two", "two", [joined], campplus, 0)


def test_one_librispeech_speaker_is_accepted(campplus, groups) -> None:
    samples = [load_audio(u) for u in groups["ls-2609"][:3]]
    outcome = enroll("ls-2609", "ok", samples, campplus, 0)
    assert outcome.speech_seconds >= 10.0
    assert outcome.voiceprint.model_id == campplus.model_id and outcome.voiceprint.dim == 192
