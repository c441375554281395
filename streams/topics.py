"""Every topic of the system: name, key, Avro value record and the configs it is created with."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient, NewTopic

from speakerflow.streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str  # without the prefix
    key: str
    record: str  # Avro record of the value (schemas/)
    configs: dict[str, str] = field(default_factory=dict)
    doc: str = ""


DAY_MS = 24 * 3600 * 1000
# Requests carry whole audio samples inline (FLAC): allow up to 16 MB records on those topics only.
LARGE_RECORDS = {"max.message.bytes": str(16 * 1024 * 1024)}

TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec("audio", "stream id", "AudioChunk", {"retention.ms": str(DAY_MS)}, "Live audio chunks."),
    TopicSpec("segments.diarized", "stream id", "DiarizedSegment", {}, "Who spoke when (SPEAKER_nn)."),
    TopicSpec(
        "segments.identified", "stream id", "IdentifiedSegment", {}, "Segments with a name or UNKNOWN."
    ),
    TopicSpec(
        "enrollment.requests",
        "speaker id",
        "EnrollmentRequest",
        LARGE_RECORDS,
        "Enroll, add to or delete a speaker.",
    ),
    TopicSpec(
        "enrollment.results", "speaker id", "EnrollmentResult", {}, "Accepted or rejected, with the reason."
    ),
    TopicSpec(
        "gallery",
        "speaker id",
        "Voiceprint",
        {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"},
        "Compacted changelog of voiceprints; a tombstone deletes a speaker.",
    ),
    TopicSpec(
        "verification.requests", "request id", "VerificationRequest", LARGE_RECORDS, "1:1 verification asks."
    ),
    TopicSpec("verification.results", "request id", "VerificationResult", {}, "1:1 verification decisions."),
    TopicSpec("streams", "stream id", "StreamEvent", {}, "Stream (job) lifecycle: started, ended, failed."),
    TopicSpec(
        "diarizer.state",
        "stream id (blocks: <stream id>#windows-<n>)",
        "DiarizerState",
        {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"},
        "Compacted snapshots of each live stream's diarizer; restored after a restart or rebalance.",
    ),
    TopicSpec(
        "deadletter",
        "original key",
        "DeadLetter",
        {"retention.ms": str(7 * DAY_MS)},
        "Bad input with the reason.",
    ),
)


def create_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create every topic that does not exist yet; returns the full names of those created."""
    admin = AdminClient(settings.kafka_common())
    existing = set(admin.list_topics(timeout=min(timeout_s, 10.0)).topics)
    wanted = [
        NewTopic(
            settings.topic(spec.name),
            num_partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            config=spec.configs,
        )
        for spec in TOPIC_SPECS
        if settings.topic(spec.name) not in existing
    ]
    if not wanted:
        return []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:  # a concurrent creator is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        log.info("created topic %s", name)
    _wait_for_metadata(admin, [t.topic for t in wanted], timeout_s)
    return [t.topic for t in wanted]


def _wait_for_metadata(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=timeout_s).topics
        if all(n in topics and not topics[n].error for n in names):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {names} not visible in metadata after {timeout_s} s")
