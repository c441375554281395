"""Matcher stage: diarized segments joined with the gallery table, identified segments out."""

from __future__ import annotations

import time

from confluent_kafka import Message

from gallery.matcher import Matcher
from streams.runtime import Metrics, Processor, Publisher, decode_or_dead_letter, now_ms
from streams.settings import Settings

FORGET_AFTER_S = 3600.0  # evidence of a stream is dropped after this long without a segment


class MatchProcessor(Processor):
    role = "match"
    topics = ("segments.diarized",)
    max_batch = 256

    def __init__(self, settings: Settings, matcher: Matcher, metrics: Metrics) -> None:
        self.settings = settings
        self.matcher = matcher
        self.metrics = metrics
        self._out_topic = settings.topic("segments.identified")
        self._last_seen: dict[str, float] = {}

    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        for msg in messages:
            segment = decode_or_dead_letter(msg, "DiarizedSegment", self.role, publisher, self.metrics)
            if segment is None:
                continue
            if segment["model_id"] != self.matcher.gallery.model_id:
                # Never compare vectors of different models; say so on every segment instead.
                ident = None
            else:
                ident = self.matcher.identify_turn(
                    segment["stream_id"],
                    segment["label"],
                    segment["segment_id"],
                    segment["embedding"],
                    segment["window_count"],
                )
            publisher.publish(
                self._out_topic, segment["stream_id"], "IdentifiedSegment", _record(segment, ident)
            )
            self._last_seen[segment["stream_id"]] = time.monotonic()
            self.metrics.inc("segments.identified")

    def tick(self, publisher: Publisher) -> None:
        cutoff = time.monotonic() - FORGET_AFTER_S
        for stream_id in [s for s, t in self._last_seen.items() if t < cutoff]:
            self.matcher.end_stream(stream_id)
            del self._last_seen[stream_id]


def _record(segment: dict, ident: object) -> dict:
    base = {
        k: segment[k]
        for k in (
            "segment_id",
            "stream_id",
            "label",
            "start_s",
            "end_s",
            "model_id",
            "is_final",
            "revision",
            "source_capture_ts_ms",
        )
    }
    if ident is None:
        return base | {
            "speaker_id": None,
            "name": "UNKNOWN",
            "confidence": 0.0,
            "score": 0.0,
            "candidates": [],
            "emitted_at_ms": now_ms(),
        }
    return base | {
        "speaker_id": ident.speaker_id,
        "name": ident.name,
        "confidence": round(ident.confidence, 4),
        "score": round(ident.score, 4),
        "candidates": [{"speaker_id": s, "name": n, "score": round(sc, 4)} for s, n, sc in ident.candidates],
        "emitted_at_ms": now_ms(),
    }
