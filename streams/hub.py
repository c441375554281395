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
from collections import defaultdict
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
        with self._lock:
            targets = list(self._subscribers.get((name, record[key_field]), ()))
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
