"""Bad input never stops a stream or a worker: each bad message goes to the dead-letter topic with its
coordinates and a reason, and the good data around it is processed as usual."""

from __future__ import annotations

import numpy as np
import pytest

from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest
from speakerflow.processors.audio import encode_pcm
from speakerflow.schemas import codec
from speakerflow.streams.client import await_result, file_sample, follow, play_audio, publish_enrollment
from speakerflow.streams.runtime import Publisher, now_ms
from speakerflow.streams.topology import AUDIO, DEADLETTER, ENROLLMENT_RESULTS, SEGMENTS_IDENTIFIED
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration


def chunk(
    stream: str, seq: int, payload: bytes, rate: int = 16000, encoding: str = "PCM_S16LE", end: bool = False
) -> dict:
    return {
        "stream_id": stream,
        "seq": seq,
        "capture_ts_ms": now_ms(),
        "sample_rate": rate,
        "channels": 1,
        "encoding": encoding,
        "payload": payload,
        "end_of_stream": end,
        "metadata": {},
    }


@pytest.fixture
def worker(settings, ge2e):
    from dataclasses import replace

    w = Worker(replace(settings, idle_timeout_s=4.0), roles=("diarize", "match", "enroll"), embedder=ge2e)
    w.start()
    yield w
    w.stop()


def dead_letters(settings, count: int, timeout_s: float = 60) -> list[dict]:
    out = []
    for record in follow(settings, settings.topic(DEADLETTER), "DeadLetter", timeout_s=timeout_s):
        out.append(record)
        if len(out) >= count:
            break
    return out


def test_bad_audio_goes_to_the_dead_letter_topic_and_streams_go_on(settings, worker, shared_data):
    speech = load_audio(by_speaker(load_manifest(shared_data), "librispeech/test-other")["ls-2033"][0])[
        : 16000 * 8
    ]
    pcm = encode_pcm(speech, "PCM_S16LE")
    publisher = Publisher(settings)
    audio = settings.topic(AUDIO)
    second = 32000  # bytes of one second of s16le at 16 kHz
    bad = [
        ("not Avro at all", b"\x00garbage"),
        (
            "undecodable FLAC",
            codec.encode("AudioChunk", chunk("bad-flac", 0, b"fLaC-not-really", encoding="FLAC")),
        ),
        ("odd PCM length", codec.encode("AudioChunk", chunk("bad-len", 0, b"\x01\x02\x03"))),
        ("unsupported rate", codec.encode("AudioChunk", chunk("bad-rate", 0, pcm[:second], rate=1000))),
    ]
    for _, value in bad:
        publisher._send(audio, b"bad", value)
    # A good stream with a duplicate, a reordering, a rate change mid-stream and an empty chunk in it.
    good = "good-call"
    pieces = [pcm[i : i + second] for i in range(0, len(pcm), second)]
    order = [0, 1, 1, 3, 2, *range(4, len(pieces))]  # seq 1 twice, 2 and 3 swapped
    for seq in order:
        publisher.publish(audio, good, "AudioChunk", chunk(good, seq, pieces[seq]))
    publisher.publish(audio, good, "AudioChunk", chunk(good, len(pieces), pcm[:second], rate=8000))
    publisher.publish(audio, good, "AudioChunk", chunk(good, len(pieces) + 1, b"", end=True))
    publisher.flush()

    letters = dead_letters(settings, len(bad) + 1)
    reasons = " | ".join(f"{d['error_class']}: {d['error_message']}" for d in letters)
    assert len(letters) == len(bad) + 1, reasons
    assert all(d["source_topic"] == audio and d["source_offset"] >= 0 for d in letters)
    assert "format changed mid-stream" in reasons
    assert any(d["payload_excerpt"] == b"\x00garbage" for d in letters)
    finals = []
    for seg in follow(settings, settings.topic(SEGMENTS_IDENTIFIED), "IdentifiedSegment", timeout_s=60):
        if seg["stream_id"] == good and seg["is_final"]:
            finals.append(seg)
            break
    assert finals, "the good stream produced no final segment"
    assert worker.metrics.counters["chunks.duplicate"] >= 1
    assert all(t.is_alive() for t in worker.threads)
    # The good stream's windows went through the worker's shared batcher, and the histograms saw them.
    assert worker.embedder.stats.windows > 0
    assert worker.metrics.registry.get_sample_value("speakerflow_embedding_batch_size_count") > 0
    assert worker.metrics.registry.get_sample_value("speakerflow_embedding_batch_seconds_count") > 0
    assert worker.metrics.registry.get_sample_value("speakerflow_segment_latency_seconds_count") > 0


def test_streams_that_never_end_are_closed_by_the_idle_timeout(settings, worker, shared_data):
    speech = load_audio(by_speaker(load_manifest(shared_data), "librispeech/test-other")["ls-1688"][1])
    publisher = Publisher(settings)
    audio = np.concatenate([speech[: 16000 * 6], np.zeros(8000, np.float32)])
    # Play without the end-of-stream flag: drop the last chunk, which carries it.
    play_audio(publisher, "silent-hangup", audio[: len(audio) - 8000], chunk_s=0.5, realtime=False)
    finals = []
    for seg in follow(settings, settings.topic(SEGMENTS_IDENTIFIED), "IdentifiedSegment", timeout_s=60):
        if seg["stream_id"] == "silent-hangup" and seg["is_final"]:
            finals.append(seg)
            break
    assert finals


def test_bad_enrollment_audio_is_rejected_with_a_reason(settings, worker, shared_data, tmp_path):
    import soundfile as sf

    rng = np.random.default_rng(0)
    groups = by_speaker(load_manifest(shared_data), "librispeech/test-other")
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(16000 * 15, np.float32), 16000)
    noise = tmp_path / "music.wav"  # broadband tones + noise: not speech
    t = np.arange(16000 * 15) / 16000
    sf.write(
        noise,
        (
            0.2 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 0.5 * t)
            + 0.05 * rng.standard_normal(len(t))
        ).astype(np.float32),
        16000,
    )
    two = tmp_path / "two-voices.wav"
    a = load_audio(groups["ls-2033"][1])
    b = load_audio(groups["ls-1998"][1])
    sf.write(two, np.concatenate([a, b]), 16000)
    publisher = Publisher(settings)
    outcomes = {}
    for name, path in (("silence", silence), ("music", noise), ("two", two)):
        request_id = publish_enrollment(publisher, f"spk-{name}", name, [path])
        outcomes[name] = await_result(settings, ENROLLMENT_RESULTS, request_id, 60)
    assert not outcomes["silence"]["accepted"] and "speech" in outcomes["silence"]["reason"]
    assert not outcomes["music"]["accepted"], outcomes["music"]
    assert not outcomes["two"]["accepted"] and "two voices" in outcomes["two"]["reason"]
    # the worker still enrolls good audio afterwards
    request_id = publish_enrollment(publisher, "ls-2609", "ok", [u.path for u in groups["ls-2609"][:3]])
    ok = await_result(settings, ENROLLMENT_RESULTS, request_id, 60)
    assert ok["accepted"], ok["reason"]
    assert file_sample(two)["encoding"] == "WAV"
