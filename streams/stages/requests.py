"""Request stages: enrollment (gallery writes) and 1:1 verification."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from confluent_kafka import Message

from speakerflow.gallery.enrollment import EnrollmentPolicy, EnrollmentRejected, enroll
from speakerflow.gallery.matcher import Gallery
from speakerflow.gallery.voiceprint import Voiceprint
from speakerflow.processors.audio import AudioDecodeError, decode_file, decode_pcm
from speakerflow.processors.embedding import Embedder
from speakerflow.processors.scoring import Calibration
from speakerflow.processors.vad import speech_only
from speakerflow.streams.limits import (
    InvalidField,
    check_enrollment_request,
    check_verification_request,
)
from speakerflow.streams.records import ALREADY_ENROLLED, CREATE_ONLY
from speakerflow.streams.runtime import (
    Metrics,
    Processor,
    Publisher,
    decode_or_dead_letter,
    now_ms,
    send_to_dead_letter,
)
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import ENROLLMENT_RESULTS, GALLERY, VERIFICATION_RESULTS, stage

log = logging.getLogger(__name__)

# EnrollmentRequest metadata key: "true" runs the quality gate and answers without storing anything.
CHECK_ONLY = "check_only"
# Voiceprint metadata: hashes of the samples it was built from, so an ADD of the same audio adds nothing.
SAMPLE_HASHES = "sample_sha256"
HASHES_KEPT = 64


def sample_audio(sample: dict, max_seconds: float | None = None) -> np.ndarray:
    """Decode an AudioSample record (inline payload, or a file path/`file://` URI on this worker);
    compressed audio longer than `max_seconds` is refused before it is decoded."""
    if sample.get("payload") is not None:
        return decode_pcm(
            sample["payload"],
            sample["encoding"],
            sample["sample_rate"],
            sample["channels"],
            max_seconds=max_seconds,
        )
    uri = sample.get("uri")
    if not uri:
        raise AudioDecodeError("sample has neither a payload nor a URI")
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise AudioDecodeError(f"sample URI {uri!r} is not a readable file on this worker")
    return decode_file(path, max_seconds=max_seconds)


def sample_hash(sample: dict) -> str:
    """Content hash of an AudioSample (its payload, or its URI), 16 hex digits."""
    content = sample["payload"] if sample.get("payload") is not None else (sample.get("uri") or "").encode()
    return hashlib.sha256(content).hexdigest()[:16]


class EnrollProcessor(Processor):
    role = "enroll"
    topics = stage("enroll").consumes
    max_batch = 8

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        gallery: Gallery,
        metrics: Metrics,
        policy: EnrollmentPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.gallery = gallery
        self.metrics = metrics
        self.policy = policy or EnrollmentPolicy()
        # Voiceprints this stage wrote that the gallery table may not have read back yet (requests of
        # one speaker share a partition, so only this instance writes that speaker).
        self._written: dict[str, Voiceprint | None] = {}

    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        for msg in messages:
            request = decode_or_dead_letter(msg, "EnrollmentRequest", self.role, publisher, self.metrics)
            if request is None:
                continue
            try:
                check_enrollment_request(request)
            except InvalidField as exc:
                send_to_dead_letter(msg, self.role, exc, publisher, self.metrics)
                continue
            self._handle_request(request, publisher)

    def _handle_request(self, request: dict, publisher: Publisher) -> None:
        speaker_id = request["speaker_id"]
        gallery_topic = self.settings.topic(GALLERY)
        result = {
            "request_id": request["request_id"],
            "speaker_id": speaker_id,
            "name": request["name"],
            "accepted": False,
            "reason": None,
            "speech_seconds": 0.0,
            "quality": 0.0,
            "sample_count": 0,
            "model_id": self.embedder.model_id,
            "processed_at_ms": 0,
        }
        if request["mode"] == "DELETE":
            publisher.publish(gallery_topic, speaker_id, "Voiceprint", None)
            self._written[speaker_id] = None
            result |= {"accepted": True, "reason": "deleted"}
        else:
            try:
                if request["metadata"].get(CHECK_ONLY) == "true":  # the gate's verdict, nothing stored
                    self._reply(request, result | self._gate_verdict(request), publisher)
                    return
                voiceprint, quality = self._enrolled(request)
                if voiceprint is not self._previous(speaker_id):
                    publisher.publish(gallery_topic, speaker_id, "Voiceprint", voiceprint.to_record())
                    self._written[speaker_id] = voiceprint
                else:
                    result["reason"] = "these samples are already enrolled: nothing added"
                result |= {
                    "accepted": True,
                    "speech_seconds": round(voiceprint.speech_seconds, 2),
                    "quality": round(quality, 4),
                    "sample_count": voiceprint.sample_count,
                }
            except (AudioDecodeError, EnrollmentRejected) as exc:
                result["reason"] = str(exc)
                self.metrics.inc("enrollment.rejected")
        self._reply(request, result, publisher)

    def _reply(self, request: dict, result: dict, publisher: Publisher) -> None:
        result["processed_at_ms"] = now_ms()
        publisher.publish(
            self.settings.topic(ENROLLMENT_RESULTS), request["speaker_id"], "EnrollmentResult", result
        )
        log.info(
            "enrollment %s (%s): %s", request["speaker_id"], request["mode"], result["reason"] or "accepted"
        )

    def _gate_verdict(self, request: dict) -> dict:
        """The quality gate run on a request's samples, nothing stored; EnrollmentRejected or
        AudioDecodeError when the samples would be refused."""
        samples = [sample_audio(s, self.settings.chunk_max_audio_s) for s in request["samples"]]
        outcome = enroll(
            request["speaker_id"], request["name"], samples, self.embedder, now_ms(), self.policy, {}
        )
        return {
            "accepted": True,
            "reason": "passes the quality gate (not stored)",
            "speech_seconds": round(outcome.speech_seconds, 2),
            "quality": round(outcome.quality, 4),
            "sample_count": len(samples),
        }

    def _previous(self, speaker_id: str) -> Voiceprint | None:
        if speaker_id in self._written:
            return self._written[speaker_id]
        return self.gallery.get(speaker_id)

    def _enrolled(self, request: dict) -> tuple[Voiceprint, float]:
        """The speaker's voiceprint after the request (the previous one itself when nothing is new) and
        the quality of the added speech; EnrollmentRejected or AudioDecodeError when refused."""
        speaker_id = request["speaker_id"]
        metadata = dict(request["metadata"])
        create_only = metadata.pop(CREATE_ONLY, "") == "true"
        previous = self._previous(speaker_id)
        if create_only and previous is not None:
            raise EnrollmentRejected(
                f"speaker {speaker_id!r} {ALREADY_ENROLLED}; adding to it takes mode ADD or REPLACE"
            )
        adding = request["mode"] == "ADD" and previous is not None
        known = [h for h in previous.metadata.get(SAMPLE_HASHES, "").split(",") if h] if adding else []
        fresh = [s for s in request["samples"] if sample_hash(s) not in known]
        if adding and request["samples"] and not fresh:
            return previous, 0.0
        samples = [sample_audio(s, self.settings.chunk_max_audio_s) for s in fresh]
        outcome = enroll(speaker_id, request["name"], samples, self.embedder, now_ms(), self.policy, metadata)
        voiceprint = outcome.voiceprint
        hashes = [sample_hash(s) for s in fresh]
        if adding and previous.model_id == voiceprint.model_id:
            voiceprint = previous.merged_with(voiceprint)
            hashes = [*known, *hashes]
        voiceprint.metadata[SAMPLE_HASHES] = ",".join(hashes[-HASHES_KEPT:])
        return voiceprint, outcome.quality


class VerifyProcessor(Processor):
    role = "verify"
    topics = stage("verify").consumes
    max_batch = 32

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        gallery: Gallery,
        calibration: Calibration,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.gallery = gallery
        self.calibration = calibration
        self.metrics = metrics

    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        for msg in messages:
            request = decode_or_dead_letter(msg, "VerificationRequest", self.role, publisher, self.metrics)
            if request is None:
                continue
            try:
                check_verification_request(request)
            except InvalidField as exc:
                send_to_dead_letter(msg, self.role, exc, publisher, self.metrics)
                continue
            result = self._verify(request)
            publisher.publish(
                self.settings.topic(VERIFICATION_RESULTS),
                request["request_id"],
                "VerificationResult",
                result,
            )

    def _verify(self, request: dict) -> dict:
        result = {
            "request_id": request["request_id"],
            "speaker_id": request["speaker_id"],
            "accepted": False,
            "score": 0.0,
            "confidence": 0.0,
            "threshold": self.calibration.threshold,
            "model_id": self.embedder.model_id,
            "error": None,
            "processed_at_ms": 0,
        }
        voiceprint = self.gallery.get(request["speaker_id"])
        try:
            if voiceprint is None:
                raise LookupError(f"speaker {request['speaker_id']!r} is not enrolled")
            audio = speech_or_error(sample_audio(request["sample"], self.settings.chunk_max_audio_s))
            score = float(self.embedder.embed([audio])[0] @ voiceprint.embedding)
            result |= {
                "score": round(score, 4),
                "confidence": round(self.calibration.confidence(score), 4),
                "accepted": score >= self.calibration.threshold,
            }
        except (AudioDecodeError, LookupError) as exc:
            result["error"] = str(exc)
        result["processed_at_ms"] = now_ms()
        return result


def speech_or_error(samples: np.ndarray) -> np.ndarray:
    """The speech of a 16 kHz sample (VAD); AudioDecodeError when it holds none."""
    speech = speech_only(samples)
    if speech.size == 0:
        raise AudioDecodeError("no speech found in the sample")
    return speech
