"""The conversation simulator: deterministic for a seed, honest references, the manifest format."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakerflow.evaluation.corpus import load_manifest
from speakerflow.evaluation.diarization import load_rttm
from speakerflow.evaluation.simulation import (
    SimulationConfig,
    eligible_speakers,
    phrases,
    simulate,
    speaker_split,
    write_conversations,
)

CONFIG = SimulationConfig(speakers=(2, 3), minutes=0.6, file_minutes=0.5, overlap=0.1, split="tune", seed=3)


@pytest.fixture(scope="module")
def utterances(shared_data: Path):
    return load_manifest(shared_data)


def test_same_seed_same_conversations_other_seed_others(utterances) -> None:
    first = list(simulate(utterances, CONFIG))
    again = list(simulate(utterances, CONFIG))
    assert len(first) == len(again) >= 1
    for a, b in zip(first, again, strict=True):
        assert a.file_id == b.file_id and a.speakers == b.speakers and a.reference == b.reference
        np.testing.assert_array_equal(a.audio, b.audio)
    other = next(simulate(utterances, SimulationConfig(**{**CONFIG.__dict__, "seed": 4})))
    assert other.reference != first[0].reference


def test_reference_matches_the_audio(utterances) -> None:
    for conv in simulate(utterances, CONFIG):
        assert 2 <= len(conv.speakers) <= 3
        assert {t.speaker for t in conv.reference} == set(conv.speakers)
        assert all(0 <= t.start_s < t.end_s <= conv.duration_s for t in conv.reference)
        # Every reference turn is loud speech, the gaps between turns are (nearly) silent.
        speech = np.zeros(len(conv.audio), bool)
        for t in conv.reference:
            speech[int(t.start_s * 16000) : int(t.end_s * 16000)] = True
        rms_in = np.sqrt(np.mean(conv.audio[speech] ** 2))
        rms_out = np.sqrt(np.mean(conv.audio[~speech] ** 2))
        assert rms_in > 10 * rms_out
        # The overlap target is met roughly (it is a share of speech time).
        assert 0.03 < conv.overlap_s() / conv.speech_s() < 0.25


def test_no_overlap_means_no_overlap(utterances) -> None:
    config = SimulationConfig(**{**CONFIG.__dict__, "overlap": 0.0})
    for conv in simulate(utterances, config):
        assert conv.overlap_s() == 0.0


def test_files_rttm_and_manifest(utterances, tmp_path: Path) -> None:
    conversations = list(simulate(utterances, CONFIG))
    manifest = write_conversations(conversations, tmp_path, CONFIG)
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["speaker"] for r in rows] == ["multi"] * len(conversations)
    assert set(rows[0]) == {"path", "speaker", "duration_s", "sample_rate", "source_repo", "license"}
    for row, conv in zip(rows, conversations, strict=True):
        audio, rate = sf.read(tmp_path / row["path"])
        assert rate == 16000 and abs(len(audio) / rate - float(row["duration_s"])) < 1e-3
        reference = load_rttm(tmp_path / f"{conv.file_id}.rttm")[conv.file_id]
        assert sorted(reference.labels()) == sorted(conv.speakers)
        total = sum(t.end_s - t.start_s for t in conv.reference)
        assert abs(sum(s.duration for s, _ in reference.itertracks()) - total) < 0.01
        assert (tmp_path / f"{conv.file_id}.uem").is_file()
    assert [u.speaker for u in load_manifest(tmp_path)] == ["multi"] * len(rows)


def test_speaker_split_is_a_partition_and_eligibility_needs_speech(utterances) -> None:
    tune = eligible_speakers(utterances, 10.0, "tune")
    evaluate = eligible_speakers(utterances, 10.0, "eval")
    assert tune and evaluate and not set(tune) & set(evaluate)
    assert all(speaker_split(s) == "tune" for s in tune)
    for groups in (tune, evaluate):
        assert all(sum(u.duration_s for u in us) >= 10.0 for us in groups.values())
    assert "multi" not in eligible_speakers(utterances, 0.0)


def test_phrases_split_at_pauses() -> None:
    rng = np.random.default_rng(0)
    tone = 0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220).astype(np.float32)
    silence = (1e-4 * rng.standard_normal(8000)).astype(np.float32)
    audio = np.concatenate([silence, tone, silence, tone, silence])
    found = phrases(audio)
    assert len(found) == 2
    assert found[0][0] == pytest.approx(0.5, abs=0.03) and found[0][1] == pytest.approx(1.5, abs=0.03)
    assert found[1][0] == pytest.approx(2.0, abs=0.03)
