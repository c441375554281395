"""Matcher stage: diarized segments joined with the gallery table, identified segments out.

The decisions (threshold, margin, exclusive assignment, re-labelling) live in gallery/matcher.py;
this stage decodes, calls the matcher and publishes what it returns. A re-labelled segment is
published again with a higher `revision`; consumers keep the highest revision of each segment id.
"""

from __future__ import annotations

import time

from confluent_kafka import Message

from speakerflow.gallery.matcher import Emission, Gallery, Identification, Matcher, rules_for
from speakerflow.processors.scoring import Calibration
from speakerflow.streams.runtime import Metrics, Processor, Publisher, decode_or_dead_letter, now_ms
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import SEGMENTS_IDENTIFIED, stage

FORGET_AFTER_S = 3600.0  # evidence of a stream is dropped after this long without a segment
_PASSED_THROUGH = (
    "segment_id",
    "stream_id",
    "label",
    "start_s",
    "end_s",
    "model_id",
    "is_final",
    "source_capture_ts_ms",
)


def build_gallery_and_matcher(
    settings: Settings, model_id: str, dim: int, calibration: Calibration
) -> tuple[Gallery, Matcher]:
    """The gallery table and matcher of a worker, configured from settings."""
    gallery = Gallery(model_id, dim, exact_max=settings.index_exact_max)
    rules = rules_for(model_id)
    if settings.match_margin >= 0:
        rules["margin"] = settings.match_margin
    matcher = Matcher(
        gallery,
        calibration,
        top_k=settings.top_k,
        exclusive=settings.match_exclusive,
        relabel=settings.match_relabel,
        **rules,
    )
    return gallery, matcher


class MatchProcessor(Processor):
    role = "match"
    topics = stage("match").consumes
    max_batch = 256

    def __init__(self, settings: Settings, matcher: Matcher, metrics: Metrics) -> None:
        self.settings = settings
        self.matcher = matcher
        self.metrics = metrics
        self._out_topic = settings.topic(SEGMENTS_IDENTIFIED)
        self._last_seen: dict[str, float] = {}

    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        for msg in messages:
            segment = decode_or_dead_letter(msg, "DiarizedSegment", self.role, publisher, self.metrics)
            if segment is None:
                continue
            for record, relabelled in self._identify(segment):
                publisher.publish(self._out_topic, segment["stream_id"], "IdentifiedSegment", record)
                self.metrics.inc("segments.relabelled" if relabelled else "segments.identified")
                if not relabelled and record["revision"] == 0:  # live news, not a re-statement
                    latency_s = (record["emitted_at_ms"] - record["source_capture_ts_ms"]) / 1000
                    self.metrics.segment_latency.observe(max(latency_s, 0.0))
            self._last_seen[segment["stream_id"]] = time.monotonic()

    def _identify(self, segment: dict) -> list[tuple[dict, bool]]:
        """(IdentifiedSegment record, is a re-labelling of an earlier segment) to publish."""
        payload = {k: segment[k] for k in _PASSED_THROUGH}
        if segment["model_id"] != self.matcher.gallery.model_id:
            # Never compare vectors of different models; say so on every segment instead.
            return [(identified_record(payload, None, segment["revision"]), False)]
        emissions = self.matcher.observe(
            segment["stream_id"],
            segment["segment_id"],
            segment["label"],
            segment["embedding"],
            segment["window_count"],
            is_final=segment["is_final"],
            revision=segment["revision"],
            payload=payload,
        )
        return [(_from_emission(e), e.relabelled) for e in emissions]

    def tick(self, publisher: Publisher) -> None:
        cutoff = time.monotonic() - FORGET_AFTER_S
        for stream_id in [s for s, t in self._last_seen.items() if t < cutoff]:
            self.matcher.end_stream(stream_id)
            del self._last_seen[stream_id]


def _from_emission(emission: Emission) -> dict:
    return identified_record(emission.payload, emission.identification, emission.revision)


def identified_record(payload: dict, ident: Identification | None, revision: int) -> dict:
    """The IdentifiedSegment record for a diarized segment's fields and its identity (None: no match
    was attempted, e.g. another model's embedding)."""
    if ident is None:
        identity = {"speaker_id": None, "name": "UNKNOWN", "confidence": 0.0, "score": 0.0, "candidates": []}
    else:
        identity = {
            "speaker_id": ident.speaker_id,
            "name": ident.name,
            "confidence": round(ident.confidence, 4),
            "score": round(ident.score, 4),
            "candidates": [
                {"speaker_id": s, "name": n, "score": round(sc, 4)} for s, n, sc in ident.candidates
            ],
        }
    return {**payload, **identity, "revision": revision, "emitted_at_ms": now_ms()}
