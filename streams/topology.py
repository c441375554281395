"""The topology in one place: every topic (name, key, value record, configs) and every stage (the topics
it consumes in its consumer group, the topics it reads without a group, the topics it writes).

The worker builds its stages from `STAGES`, `create_topics` and the compose file's kafka-init create
`TOPIC_SPECS`, and the README's tables are checked against both (tests/test_topology.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient, NewTopic

from speakerflow.streams.settings import Settings

log = logging.getLogger(__name__)

# Topic names without the prefix (`Settings.topic` adds it).
AUDIO = "audio"
SEGMENTS_DIARIZED = "segments.diarized"
SEGMENTS_IDENTIFIED = "segments.identified"
ENROLLMENT_REQUESTS = "enrollment.requests"
ENROLLMENT_RESULTS = "enrollment.results"
GALLERY = "gallery"
VERIFICATION_REQUESTS = "verification.requests"
VERIFICATION_RESULTS = "verification.results"
STREAMS = "streams"
DIARIZER_STATE = "diarizer.state"
DEADLETTER = "deadletter"


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
    TopicSpec(AUDIO, "stream id", "AudioChunk", {"retention.ms": str(DAY_MS)}, "Live audio chunks."),
    TopicSpec(SEGMENTS_DIARIZED, "stream id", "DiarizedSegment", {}, "Who spoke when (SPEAKER_nn)."),
    TopicSpec(SEGMENTS_IDENTIFIED, "stream id", "IdentifiedSegment", {}, "Segments with a name or UNKNOWN."),
    TopicSpec(
        ENROLLMENT_REQUESTS,
        "speaker id",
        "EnrollmentRequest",
        LARGE_RECORDS,
        "Enroll, add to or delete a speaker.",
    ),
    TopicSpec(
        ENROLLMENT_RESULTS, "speaker id", "EnrollmentResult", {}, "Accepted or rejected, with the reason."
    ),
    TopicSpec(
        GALLERY,
        "speaker id",
        "Voiceprint",
        {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"},
        "Compacted changelog of voiceprints; a tombstone deletes a speaker.",
    ),
    TopicSpec(
        VERIFICATION_REQUESTS, "request id", "VerificationRequest", LARGE_RECORDS, "1:1 verification asks."
    ),
    TopicSpec(VERIFICATION_RESULTS, "request id", "VerificationResult", {}, "1:1 verification decisions."),
    TopicSpec(STREAMS, "stream id", "StreamEvent", {}, "Stream (job) lifecycle: started, ended, failed."),
    TopicSpec(
        DIARIZER_STATE,
        "stream id (blocks: <stream id>#windows-<n>)",
        "DiarizerState",
        {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"},
        "Compacted snapshots of each live stream's diarizer; restored after a restart or rebalance.",
    ),
    TopicSpec(
        DEADLETTER,
        "original key",
        "DeadLetter",
        {"retention.ms": str(7 * DAY_MS)},
        "Bad input with the reason.",
    ),
)


@dataclass(frozen=True)
class StageSpec:
    """One stage of a worker. `consumes`: topics read in the stage's consumer group (each record once per
    group); `reads`: topics read whole, without a group, by every instance; `writes`: topics produced."""

    role: str  # the worker role (`speakerflow worker --roles`) and the consumer group's suffix
    consumes: tuple[str, ...]
    writes: tuple[str, ...]
    reads: tuple[str, ...] = ()
    doc: str = ""


# In dataflow order. Every stage also writes unreadable input to DEADLETTER.
STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "diarize",
        consumes=(AUDIO,),
        writes=(SEGMENTS_DIARIZED, STREAMS, DIARIZER_STATE, DEADLETTER),
        reads=(DIARIZER_STATE, AUDIO),
        doc="VAD, windows, batched embeddings, online clustering; snapshots for restore "
        "(reads its state and replays audio when it takes over a stream)",
    ),
    StageSpec(
        "match",
        consumes=(SEGMENTS_DIARIZED,),
        writes=(SEGMENTS_IDENTIFIED, DEADLETTER),
        reads=(GALLERY,),
        doc="stream-table join of segments against the gallery table",
    ),
    StageSpec(
        "enroll",
        consumes=(ENROLLMENT_REQUESTS,),
        writes=(ENROLLMENT_RESULTS, GALLERY, DEADLETTER),
        reads=(GALLERY,),
        doc="quality gates, voiceprints (ADD / REPLACE / DELETE)",
    ),
    StageSpec(
        "verify",
        consumes=(VERIFICATION_REQUESTS,),
        writes=(VERIFICATION_RESULTS, DEADLETTER),
        reads=(GALLERY,),
        doc="1:1 decisions against an enrolled voiceprint",
    ),
    StageSpec(
        "sink",
        consumes=(SEGMENTS_IDENTIFIED, GALLERY, STREAMS),
        writes=(DEADLETTER,),
        doc="idempotent upserts into PostgreSQL (segments, speakers, streams)",
    ),
)
ROLES = tuple(stage.role for stage in STAGES)


def stage(role: str) -> StageSpec:
    """The declaration of the stage called `role`."""
    for spec in STAGES:
        if spec.role == role:
            return spec
    raise KeyError(f"unknown stage {role!r}; choose from {ROLES}")


def stages_markdown() -> str:
    """The README's stage table, generated from `STAGES` (tests/test_topology.py keeps them equal)."""
    rows = [
        "| stage (`--roles`) | consumes (group `<prefix>-<stage>`) | also reads (no group) | writes | job |"
    ]
    rows.append("|---|---|---|---|---|")
    for spec in STAGES:
        cells = [
            ", ".join(f"`{t}`" for t in topics) or "" for topics in (spec.consumes, spec.reads, spec.writes)
        ]
        rows.append(f"| `{spec.role}` | {' | '.join(cells)} | {spec.doc} |")
    return "\n".join(rows)


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
