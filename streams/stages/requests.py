"""Request stages: enrollment (gallery writes) and 1:1 verification."""

from __future__ import annotations

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
from speakerflow.streams.runtime import Metrics, Processor, Publisher, decode_or_dead_letter, now_ms
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import ENROLLMENT_RESULTS, GALLERY, VERIFICATION_RESULTS, stage

log = logging.getLogger(__name__)

# EnrollmentRequest metadata key: "true" runs the quality gate and answers without storing anything.
CHECK_ONLY = "check_only"


def sample_audio(sample: dict) -> np.ndarray:
    """Decode an AudioSample record (inline payload, or a file path/`file://` URI on this worker)."""
    if sample.get("payload") is not None:
        return decode_pcm(sample["payload"], sample["encoding"], sample["sample_rate"], sample["channels"])
    uri = sample.get("uri")
    if not uri:
        raise AudioDecodeError("sample has neither a payload nor a URI")
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise AudioDecodeError(f"sample URI {uri!r} is not a readable file on this worker")
    return decode_file(path)


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
            if request is not None:
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
                samples = [sample_audio(s) for s in request["samples"]]
                outcome = enroll(
                    speaker_id,
                    request["name"],
                    samples,
                    self.embedder,
                    now_ms(),
                    self.policy,
                    request["metadata"],
                )
                if request["metadata"].get(CHECK_ONLY) == "true":  # the gate's verdict, nothing stored
                    result |= {
                        "accepted": True,
                        "reason": "passes the quality gate (not stored)",
                        "speech_seconds": round(outcome.speech_seconds, 2),
                        "quality": round(outcome.quality, 4),
                        "sample_count": len(samples),
                    }
                    self._reply(request, result, publisher)
                    return
                voiceprint = outcome.voiceprint
                previous = self._written.get(speaker_id, self.gallery.get(speaker_id))
                if (
                    request["mode"] == "ADD"
                    and previous is not None
                    and previous.model_id == voiceprint.model_id
                ):
                    voiceprint = previous.merged_with(voiceprint)
                publisher.publish(gallery_topic, speaker_id, "Voiceprint", voiceprint.to_record())
                self._written[speaker_id] = voiceprint
                result |= {
                    "accepted": True,
                    "speech_seconds": round(voiceprint.speech_seconds, 2),
                    "quality": round(outcome.quality, 4),
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
            audio = speech_or_error(sample_audio(request["sample"]))
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
