"""Fan-out of output topics to waiting requests: one consumer per gateway process.

The HTTP and WebSocket gateway publishes a request (an enrollment, a verification, a file as a stream)
and then waits for what the workers emit about it. One background consumer reads the result topics and
hands each record to the asyncio queues subscribed to its key (request id or stream id).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from speakerflow.schemas import codec
from speakerflow.streams.runtime import consume_available, group_consumer
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import (
    ENROLLMENT_RESULTS,
    SEGMENTS_IDENTIFIED,
    STREAMS,
    VERIFICATION_RESULTS,
)

log = logging.getLogger(__name__)

# topic name (without prefix) -> (Avro record, field that routes it)
ROUTES = {
    SEGMENTS_IDENTIFIED: ("IdentifiedSegment", "stream_id"),
    STREAMS: ("StreamEvent", "stream_id"),
    ENROLLMENT_RESULTS: ("EnrollmentResult", "request_id"),
    VERIFICATION_RESULTS: ("VerificationResult", "request_id"),
}


class ResultHub(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="speakerflow-hub", daemon=True)
        self.settings = settings
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._subscribers: dict[tuple[str, str], list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = (
            defaultdict(list)
        )
        self._by_topic = {settings.topic(name): (name, *route) for name, route in ROUTES.items()}
        self.live = LiveRegistry()

    def run(self) -> None:
        # Only new results matter. The embedded broker reports wrong end offsets, so there the hub reads
        # from the beginning instead (the profile decides; records for nobody are dropped).
        consumer = group_consumer(
            self.settings,
            f"{self.settings.group_prefix}-gateway-{uuid.uuid4().hex[:8]}",
            list(self._by_topic),
            offset_reset="earliest" if self.settings.embedded else "latest",
            on_assign=lambda *_: self.ready.set(),
        )
        try:
            while not self.stopping.is_set():
                for msg in consume_available(consumer, 200, 0.1):
                    if msg.error() is None and msg.value() is not None:
                        self._dispatch(msg.topic(), msg.value())
        finally:
            consumer.close()

    def _dispatch(self, topic: str, value: bytes) -> None:
        name, record_name, key_field = self._by_topic[topic]
        try:
            record = codec.decode(record_name, value)
        except codec.SchemaError:
            return
        self._deliver(name, record[key_field], record)
        if name == SEGMENTS_IDENTIFIED:
            self.live.segment(record)
        elif name == STREAMS:
            self.live.stream_event(record)
        elif name == ENROLLMENT_RESULTS and record["accepted"] and record["reason"] == "deleted":
            # Watchers of ended streams see the erasure too (the matcher re-states only live ones).
            for forgotten in self.live.forget_speaker(record["speaker_id"]):
                self._deliver(SEGMENTS_IDENTIFIED, forgotten["stream_id"], forgotten)

    def _deliver(self, topic: str, key: str, record: dict) -> None:
        with self._lock:
            targets = list(self._subscribers.get((topic, key), ()))
        for loop, queue in targets:
            loop.call_soon_threadsafe(queue.put_nowait, record)

    @contextmanager
    def subscribe(self, topic: str, key: str, queue: asyncio.Queue | None = None) -> Iterator[asyncio.Queue]:
        """Records of `topic` (short name) routed to `key`, while the context is open. Pass the queue of
        another subscription to receive several topics in arrival order on one queue."""
        queue = queue if queue is not None else asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._subscribers[(topic, key)].append(entry)
        try:
            yield queue
        finally:
            with self._lock:
                self._subscribers[(topic, key)].remove(entry)
                if not self._subscribers[(topic, key)]:
                    del self._subscribers[(topic, key)]


class LiveRegistry:
    """What the `streams` and `segments.identified` topics said about the most recent streams, for the
    console: which streams run, and the latest record of each (segment id, revision) of each stream.

    Bounded: only the `max_streams` streams heard of most recently are kept.
    """

    def __init__(self, max_streams: int = 200) -> None:
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._streams: OrderedDict[str, dict] = OrderedDict()
        self._segments: dict[str, dict[tuple[str, int], dict]] = {}

    def _touch(self, stream_id: str) -> dict:
        entry = self._streams.pop(stream_id, None) or {
            "stream_id": stream_id,
            "state": "RUNNING",
            "audio_seconds": 0.0,
            "speakers": 0,
            "revision": 0,
            "reason": None,
            "updated_at_ms": 0,
        }
        self._streams[stream_id] = entry
        while len(self._streams) > self.max_streams:
            gone, _ = self._streams.popitem(last=False)
            self._segments.pop(gone, None)
        return entry

    def stream_event(self, event: dict) -> None:
        with self._lock:
            entry = self._touch(event["stream_id"])
            state = {"STARTED": "RUNNING"}.get(event["event"], event["event"])
            if not (entry["state"] in ("ENDED", "FAILED") and state == "RUNNING"):
                entry["state"] = state
            entry["audio_seconds"] = max(entry["audio_seconds"], event["audio_seconds"])
            entry["speakers"] = event["speakers"] or entry["speakers"]
            entry["revision"] = max(entry["revision"], event["revision"])
            entry["reason"] = event["reason"]
            entry["updated_at_ms"] = event["at_ms"]

    def segment(self, record: dict) -> None:
        with self._lock:
            entry = self._touch(record["stream_id"])
            entry["audio_seconds"] = max(entry["audio_seconds"], record["end_s"])
            entry["updated_at_ms"] = max(entry["updated_at_ms"], record["emitted_at_ms"])
            self._segments.setdefault(record["stream_id"], {})[(record["segment_id"], record["revision"])] = (
                record
            )

    def forget_speaker(self, speaker_id: str) -> list[dict]:
        """Make the speaker's cached segments UNKNOWN; returns the changed records."""
        changed = []
        with self._lock:
            for segments in self._segments.values():
                for key, record in segments.items():
                    if record["speaker_id"] == speaker_id:
                        segments[key] = record | {"speaker_id": None, "name": "UNKNOWN", "candidates": []}
                        changed.append(segments[key])
        return changed

    def streams(self) -> list[dict]:
        """Newest first."""
        with self._lock:
            return [dict(s) for s in reversed(self._streams.values())]

    def segments(self, stream_id: str) -> list[dict]:
        with self._lock:
            return list(self._segments.get(stream_id, {}).values())
