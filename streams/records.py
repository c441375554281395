"""One builder per request record: what a client (CLI, gateway, benchmark, test) sends to the request
and audio topics. The Avro schemas in schemas/ say what each field means."""

from __future__ import annotations

import uuid

import numpy as np

from speakerflow.processors.audio import encode_pcm
from speakerflow.streams.runtime import now_ms

SAMPLE_RATE = 16000
# EnrollmentRequest metadata the gateway sets: "true" = a new speaker only (the id must not exist yet);
# the enroll stage then rejects the request with a reason containing ALREADY_ENROLLED.
CREATE_ONLY = "speakerflow.create_only"
ALREADY_ENROLLED = "is already enrolled"


def pcm_sample(samples: np.ndarray) -> dict:
    """An AudioSample record carrying 16 kHz mono `samples` as PCM s16le."""
    return {
        "payload": encode_pcm(samples, "PCM_S16LE"),
        "uri": None,
        "encoding": "PCM_S16LE",
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
    }


def audio_chunk(
    stream_id: str,
    seq: int,
    capture_ts_ms: int,
    payload: bytes,
    end_of_stream: bool,
    metadata: dict[str, str] | None = None,
    encoding: str = "PCM_S16LE",
    sample_rate: int = SAMPLE_RATE,
) -> dict:
    """An AudioChunk record (mono) carrying `payload` in `encoding` at `sample_rate`."""
    return {
        "stream_id": stream_id,
        "seq": seq,
        "capture_ts_ms": capture_ts_ms,
        "sample_rate": sample_rate,
        "channels": 1,
        "encoding": encoding,
        "payload": payload,
        "end_of_stream": end_of_stream,
        "metadata": metadata or {},
    }


def pcm_chunk(
    stream_id: str,
    seq: int,
    capture_ts_ms: int,
    samples: np.ndarray,
    end_of_stream: bool,
    metadata: dict[str, str] | None = None,
) -> dict:
    """An AudioChunk record carrying 16 kHz mono `samples` as PCM s16le."""
    return audio_chunk(
        stream_id, seq, capture_ts_ms, encode_pcm(samples, "PCM_S16LE"), end_of_stream, metadata
    )


def enrollment_request(
    speaker_id: str,
    name: str,
    mode: str,
    samples: list[dict],
    request_id: str = "",
    metadata: dict[str, str] | None = None,
) -> dict:
    """An EnrollmentRequest (mode ADD, REPLACE or DELETE) with AudioSample records; a new request id
    unless one is given."""
    return {
        "request_id": request_id or uuid.uuid4().hex,
        "speaker_id": speaker_id,
        "name": name,
        "mode": mode,
        "samples": samples,
        "metadata": metadata or {},
        "requested_at_ms": now_ms(),
    }


def verification_request(speaker_id: str, sample: dict, request_id: str = "") -> dict:
    """A VerificationRequest: is the voice in `sample` (an AudioSample record) `speaker_id`?"""
    return {
        "request_id": request_id or uuid.uuid4().hex,
        "speaker_id": speaker_id,
        "sample": sample,
        "requested_at_ms": now_ms(),
    }
