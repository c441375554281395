"""Tests for processors.vad: whole-file regions, streaming events, and their agreement."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from speakerflow.processors.audio import decode_file
from speakerflow.processors.vad import (
    SpeechEvent,
    StreamingVad,
    VadConfig,
    frame_probabilities,
    new_vad_model,
    regions_from_probabilities,
    speech_mask,
    speech_regions,
)

SHARED_DATA = Path(os.environ.get("SPEAKERFLOW_SHARED_DATA", "/work/shared/data"))
SPEECH_FILE = SHARED_DATA / "librispeech/test-other/1688/1688-142285-0000.flac"
REPO_ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
LEAD_S = 2.0


@pytest.fixture(scope="module")
def padded_speech() -> np.ndarray:
    """A real utterance with 2 s of digital silence before and after."""
    if not SPEECH_FILE.is_file():
        pytest.skip(f"shared speech sample not found at {SPEECH_FILE} (set SPEAKERFLOW_SHARED_DATA)")
    silence = np.zeros(int(LEAD_S * RATE), np.float32)
    return np.concatenate([silence, decode_file(SPEECH_FILE), silence])


@pytest.fixture(scope="module")
def offline_regions(padded_speech: np.ndarray) -> list[tuple[float, float]]:
    return speech_regions(padded_speech)


def stream_in_chunks(vad: StreamingVad, samples: np.ndarray, seed: int) -> list[SpeechEvent]:
    rng = np.random.default_rng(seed)
    events, position = [], 0
    while position < samples.size:
        size = int(rng.integers(137, 4001))
        events += vad.push(samples[position : position + size])
        position += size
    return events + vad.flush()


def pair_up(events: list[SpeechEvent]) -> list[tuple[float, float]]:
    kinds = [event.kind for event in events]
    assert kinds == ["start", "end"] * (len(events) // 2), kinds
    return [(start.time_s, end.time_s) for start, end in zip(events[0::2], events[1::2], strict=True)]


def test_import_keeps_torch_thread_setting() -> None:
    # silero_vad calls torch.set_num_threads(1) on import; processors.vad must undo that.
    code = (
        "import torch; torch.set_num_threads(3); import speakerflow.processors.vad; "
        "print(torch.get_num_threads())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert result.stdout.strip() == "3"


def test_regions_bracket_the_speech(padded_speech: np.ndarray, offline_regions: list) -> None:
    duration = padded_speech.size / RATE
    assert offline_regions, "no speech found in a speech recording"
    assert abs(offline_regions[0][0] - LEAD_S) < 0.5
    assert abs(offline_regions[-1][1] - (duration - LEAD_S)) < 0.5
    bounds = [*(start for start, _ in offline_regions[1:]), duration]
    for (start, end), next_start in zip(offline_regions, bounds, strict=True):
        assert 0 <= start < end <= next_start <= duration


def test_hysteresis_matches_silero_reference(padded_speech: np.ndarray, offline_regions: list) -> None:
    from silero_vad import get_speech_timestamps

    config = VadConfig()
    reference = get_speech_timestamps(
        torch.from_numpy(padded_speech),
        new_vad_model(),
        threshold=config.threshold,
        min_speech_duration_ms=config.min_speech_ms,
        min_silence_duration_ms=config.min_silence_ms,
        speech_pad_ms=config.speech_pad_ms,
    )
    expected = [(r["start"] / RATE, r["end"] / RATE) for r in reference]
    np.testing.assert_allclose(offline_regions, expected, atol=1e-9)


def test_sequence_model_scores_like_the_jit_model(padded_speech: np.ndarray) -> None:
    # 16 kHz runs silero's sequence ONNX export in blocks; it must give silero's own per-frame outputs.
    frames = np.tile(padded_speech, 3)[: 512 * 700]  # more than one 512-frame block
    model = new_vad_model()
    with torch.inference_mode():
        expected = [
            float(model(torch.from_numpy(frames[i * 512 : (i + 1) * 512].copy()), RATE)) for i in range(700)
        ]
    np.testing.assert_allclose(frame_probabilities(frames), expected, atol=1e-5)


def test_silence_has_no_regions() -> None:
    assert speech_regions(np.zeros(3 * RATE, np.float32)) == []
    quiet = (1e-4 * np.random.default_rng(0).standard_normal(3 * RATE)).astype(np.float32)
    assert speech_regions(quiet) == []
    assert speech_regions(np.zeros(0, np.float32)) == []


def test_streaming_equals_whole_file(
    padded_speech: np.ndarray, offline_regions: list, capsys: pytest.CaptureFixture[str]
) -> None:
    # Same 512-sample frames, same model state, same hysteresis: only the chunking differs, so the
    # regions agree exactly (1 µs covers float formatting), not merely within 0.1 s.
    vad = StreamingVad()
    started = time.perf_counter()
    events = stream_in_chunks(vad, padded_speech, seed=7)
    elapsed = time.perf_counter() - started
    audio_s = padded_speech.size / RATE
    with capsys.disabled():  # a measurement to read, not a pass/fail criterion
        print(
            f"\nStreamingVad: {1000 * elapsed / audio_s:.2f} ms per second of audio "
            f"(RTF {elapsed / audio_s:.4f}, torch threads {torch.get_num_threads()})"
        )
    np.testing.assert_allclose(pair_up(events), offline_regions, atol=1e-6)
    assert vad.processed_s == pytest.approx(audio_s)
    assert not vad.in_speech


def test_streaming_state_and_probabilities(padded_speech: np.ndarray) -> None:
    head = padded_speech[: 4 * RATE]  # speech starts at ~2.5 s; the first region ends after 5 s
    vad = StreamingVad()
    assert vad.push(head[:1000]) == [] and vad.last_probs.size == 1  # 488 samples wait for a frame
    probs = [vad.last_probs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only buffer must not make torch warn
        assert vad.push(np.frombuffer(head[1000:1010].tobytes(), np.float32)) == []
    assert vad.last_probs.size == 0
    events = vad.push(head[1010:])
    probs.append(vad.last_probs)
    assert [e.kind for e in events] == ["start"] and vad.in_speech
    assert vad.processed_s == pytest.approx(4.0)
    end = vad.flush()
    probs.append(vad.last_probs)
    assert end == [SpeechEvent("end", 4.0)] and not vad.in_speech
    np.testing.assert_allclose(np.concatenate(probs), frame_probabilities(head), atol=1e-6)
    assert vad.flush() == []
    with pytest.raises(RuntimeError, match="after flush"):
        vad.push(np.zeros(10, np.float32))


def test_speech_mask_marks_speech_frames(padded_speech: np.ndarray, offline_regions: list) -> None:
    probs = frame_probabilities(padded_speech)
    assert regions_from_probabilities(probs, padded_speech.size) == offline_regions
    mask = speech_mask(probs, padded_speech.size)
    frame_s = 512 / RATE
    assert not mask[: int(LEAD_S / frame_s) - 5].any()
    assert mask[int(3.0 / frame_s)]


def test_short_regions_are_dropped_without_events(padded_speech: np.ndarray) -> None:
    # Regions shorter than min_speech must not leave a dangling 'start' behind.
    probs = np.zeros(200, np.float32)
    probs[50:60] = 0.9  # 320 ms of "speech"
    assert regions_from_probabilities(probs, 200 * 512, RATE, VadConfig(min_speech_ms=400)) == []
    assert regions_from_probabilities(probs, 200 * 512, RATE, VadConfig(min_speech_ms=300)) != []
    vad = StreamingVad(VadConfig(min_speech_ms=10_000))  # longer than any region of the utterance
    assert stream_in_chunks(vad, padded_speech, seed=2) == []


def test_eight_khz_and_other_rates(padded_speech: np.ndarray, offline_regions: list) -> None:
    from speakerflow.processors.audio import resample

    at_8k = resample(padded_speech, RATE, 8000)
    regions_8k = speech_regions(at_8k, 8000)
    assert regions_8k and abs(regions_8k[0][0] - offline_regions[0][0]) < 0.3
    streamed = pair_up(stream_in_chunks(StreamingVad(sample_rate=8000), at_8k, seed=1))
    np.testing.assert_allclose(streamed, regions_8k, atol=1e-6)
    with pytest.raises(ValueError, match="8000 or 16000"):
        StreamingVad(sample_rate=44100)
