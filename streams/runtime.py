"""The Kafka plumbing in one place: the consume-process-produce loop every stage runs in its own thread,
the producer they share, and the readers everything else uses (a group consumer, a reader that joins
no group, a compacted-topic read from the start).

Delivery is at-least-once: a batch's outputs are produced and flushed, and only then are its input
offsets committed. A message that cannot be processed goes to the dead-letter topic with its
coordinates and the reason, and its offset is committed with the batch: bad input never blocks a
partition, and good input is never skipped.

The guard is in the loop itself, not in each stage: when a stage's `handle` raises on a batch, the loop
hands it the batch's records one at a time, and a record that still raises, whatever the exception
(a poison pill: a value no encoder, index or decoder accepts), goes to the dead-letter topic while the
stage goes on. Only an outage stops a stage: records not delivered (`DeliveryFailed`), or a stage told
to stop while waiting for its database (`InterruptedError`); the worker then exits without committing
and its supervisor restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from speakerflow.schemas import codec
from speakerflow.streams.metrics import Metrics
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import DEADLETTER

__all__ = ["Metrics", "Processor", "ProcessorThread", "Publisher"]

log = logging.getLogger(__name__)

PAYLOAD_EXCERPT_BYTES = 1024
KEY_EXCERPT_BYTES = 1024
# The request and audio topics accept 16 MB (topology.py); the margin leaves room for the batch framing.
RECORD_MAX_BYTES = 16 * 1024 * 1024 - 64 * 1024


class DeliveryFailed(KafkaException):
    """Records were not acknowledged by the broker: an outage, not a bad record."""


class RecordTooLarge(ValueError):
    """An encoded record larger than any topic accepts (refused before it reaches the producer)."""


OUTAGES = (DeliveryFailed, InterruptedError)


def consume_available(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Up to `max_messages` records: waits at most `timeout_s` for the first, then takes what is queued.

    `Consumer.consume(n, timeout)` returns early only once it holds n records, so with a partial batch
    it always waits the whole timeout; on a quiet stage that adds the timeout to every hop's latency.
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)] if max_messages > 1 else [first]


def now_ms() -> int:
    return int(time.time() * 1000)


class Publisher:
    """Avro-encoding producer shared by the processors of a worker (librdkafka is thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = Producer(settings.producer_config())
        self._errors: list[str] = []
        self._closed = False

    def publish(self, topic: str, key: str | bytes | None, record_name: str, record: dict | None) -> None:
        """Produce `record` (None = tombstone) to the full topic name `topic`."""
        value = None if record is None else codec.encode(record_name, record)
        size = len(value or b"") + len(key or b"")
        if size > RECORD_MAX_BYTES:
            raise RecordTooLarge(
                f"{record_name} of {size} bytes is larger than the {RECORD_MAX_BYTES}-byte record limit"
            )
        self._send(topic, key, value)

    def _send(self, topic: str, key: str | bytes | None, value: bytes | None) -> None:
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, on_delivery=self._delivered)
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.1)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery callbacks without blocking (call now and then while producing a lot)."""
        self._producer.poll(timeout_s)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every record to be acknowledged; raises if any failed (so offsets stay put)."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise DeliveryFailed(f"{remaining} records not delivered within {timeout_s} s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryFailed(f"delivery failed: {errors[:3]}")

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (for up to `timeout_s`), then release the broker connections.

        Records still queued then are dropped with a warning: they belong to input whose offsets were
        not committed, so they are produced again after a restart."""
        if self._closed:
            return
        self._closed = True
        undelivered = self._producer.flush(timeout_s)
        if undelivered:
            log.warning(
                "closing the producer with %d records not delivered in %.0f s", undelivered, timeout_s
            )
            self._producer.purge()  # close() would otherwise wait out message.timeout.ms for them
        self._producer.close()

    def dead_letter(self, msg: Message, processor: str, error: BaseException) -> None:
        value = msg.value() or b""
        key = None if msg.key() is None else msg.key()[:KEY_EXCERPT_BYTES]
        record = {
            "source_topic": msg.topic() or "",
            "source_partition": msg.partition() or 0,
            "source_offset": msg.offset() or 0,
            "key": key,
            "processor": processor,
            "error_class": type(error).__name__,
            "error_message": str(error)[:2000],
            "payload_excerpt": value[:PAYLOAD_EXCERPT_BYTES],
            "failed_at_ms": now_ms(),
        }
        self.publish(self.settings.topic(DEADLETTER), key, "DeadLetter", record)


# --------------------------------------------------------------------------------------------------
# Readers: every other consumer of the project is one of these, so the Kafka plumbing lives here.
# --------------------------------------------------------------------------------------------------


def group_consumer(
    settings: Settings,
    group: str,
    topics: list[str],
    offset_reset: str = "",
    on_assign: Callable[[Consumer, list[TopicPartition]], None] | None = None,
    on_revoke: Callable[[Consumer, list[TopicPartition]], None] | None = None,
) -> Consumer:
    """A consumer subscribed to `topics` (full names) in consumer group `group` (full id);
    `offset_reset` ("earliest"/"latest") overrides where a group without offsets starts."""
    conf = settings.consumer_config(group)
    if offset_reset:
        conf["auto.offset.reset"] = offset_reset
    consumer = Consumer(conf)
    callbacks = {k: v for k, v in (("on_assign", on_assign), ("on_revoke", on_revoke)) if v is not None}
    consumer.subscribe(topics, **callbacks)
    return consumer


class TopicReader:
    """A consumer that joins no group and commits nothing: it reads the partitions it is given from
    the offsets it is given (a compacted topic from its first record, a replay from an offset), and can
    look up a group's committed offsets without joining it."""

    def __init__(self, settings: Settings, group: str | None = None) -> None:
        self.consumer = Consumer(settings.consumer_config(group))

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions(self, topic: str, timeout_s: float = 10.0) -> list[int] | None:
        """The topic's partition numbers, or None when it does not exist (or has none)."""
        metadata = self.consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return None
        return list(metadata.partitions)

    def watermarks(self, topic: str, partition: int, timeout_s: float = 10.0) -> tuple[int, int]:
        """(first, end) offsets of one partition."""
        return self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)

    def assign(self, positions: list[tuple[str, int, int]]) -> None:
        """Read (topic, partition, offset) from that offset on; OFFSET_BEGINNING for the first record."""
        self.consumer.assign([TopicPartition(t, p, o) for t, p, o in positions])

    def poll(self, max_messages: int = 500, timeout_s: float = 0.1) -> list[Message]:
        """Up to `max_messages` records (errors dropped), waiting at most `timeout_s` for the first."""
        return [m for m in consume_available(self.consumer, max_messages, timeout_s) if m.error() is None]

    def committed(
        self, group_partitions: list[tuple[str, int]], timeout_s: float = 10.0
    ) -> list[TopicPartition]:
        """The committed offsets of this reader's group (given at construction) for (topic, partition)s."""
        return self.consumer.committed([TopicPartition(t, p) for t, p in group_partitions], timeout=timeout_s)

    def close(self) -> None:
        self.consumer.close()


def read_compacted(
    settings: Settings, topic: str, partitions: list[int] | None = None, timeout_s: float = 30.0
) -> Iterator[Message]:
    """Every record of `topic` (full name; only `partitions` if given) from the first one up to the end
    offsets taken when the read starts, tombstones included: the caller folds them into the latest value
    per key. Nothing when the topic does not exist; TimeoutError if the end is not reached in `timeout_s`."""
    with TopicReader(settings) as reader:
        existing = reader.partitions(topic)
        if existing is None:
            return
        ends = {}
        for p in existing if partitions is None else [p for p in partitions if p in existing]:
            low, high = reader.watermarks(topic, p)
            if high > low:
                ends[p] = high
        reader.assign([(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to its end within {timeout_s} s")
            for msg in reader.poll(1000, 0.2):
                yield msg
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)


class Processor:
    """One stage: subclasses set `role` and `topics` and implement `handle`."""

    role: str = ""
    topics: tuple[str, ...] = ()
    max_batch: int = 64

    def open(self, stopping: threading.Event) -> None:
        """Called in the stage's thread before it subscribes (`stopping` is set when it should stop)."""

    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        raise NotImplementedError

    def tick(self, publisher: Publisher) -> None:
        """Called after every poll, also when nothing arrived (timers, idle streams)."""

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions moved to another worker: drop their state."""

    def close(self) -> None:
        """The stage stops (after its consumer closed): deliver anything it still holds."""


class ProcessorThread(threading.Thread):
    LAG_EVERY_S = 5.0

    def __init__(
        self, processor: Processor, settings: Settings, publisher: Publisher, metrics: Metrics | None = None
    ) -> None:
        super().__init__(name=f"speakerflow-{processor.role}", daemon=True)
        self.processor = processor
        self.settings = settings
        self.publisher = publisher
        self.stopping = threading.Event()
        self.assigned = threading.Event()
        self.failure: BaseException | None = None
        self.metrics = metrics
        self._lag_due = 0.0

    def run(self) -> None:
        consumer = None
        try:
            self.processor.open(self.stopping)
            consumer = group_consumer(
                self.settings,
                self.settings.group(self.processor.role),
                [self.settings.topic(t) for t in self.processor.topics],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
            )
            while not self.stopping.is_set():
                messages = consume_available(consumer, self.processor.max_batch, 0.1)
                good = [m for m in messages if not self._is_error(m)]
                if good:
                    self._handle(good)
                self._tick()
                if good:
                    self.publisher.flush()
                    consumer.commit(asynchronous=False)
                self._report_lag(consumer)
        except BaseException as exc:  # a bug or a lost broker: stop this worker loudly, commit nothing
            self.failure = exc
            log.exception("processor %s failed", self.processor.role)
        finally:
            if consumer is not None:
                consumer.close()  # revokes the partitions: stages hand their state over
            self.processor.close()

    def _handle(self, messages: list[Message]) -> None:
        """The stage's `handle`, with every record that makes it raise sent to the dead-letter topic."""
        try:
            self.processor.handle(messages, self.publisher)
        except OUTAGES:
            raise
        except Exception as exc:
            if len(messages) == 1:
                send_to_dead_letter(messages[0], self.processor.role, exc, self.publisher, self._metrics())
                return
            log.warning(
                "%s: a batch of %d records failed (%r); retrying them one at a time",
                self.processor.role,
                len(messages),
                exc,
            )
            for msg in messages:
                self._handle([msg])

    def _tick(self) -> None:
        """Timers have no record to blame: a failure is logged and counted, and the stage goes on."""
        try:
            self.processor.tick(self.publisher)
        except OUTAGES:
            raise
        except Exception:
            log.exception("%s: timer work failed", self.processor.role)
            if (metrics := self._metrics()) is not None:
                metrics.inc(f"tick_errors.{self.processor.role}")

    def _metrics(self) -> Metrics | None:
        return getattr(self.processor, "metrics", None) or self.metrics

    def _report_lag(self, consumer: Consumer) -> None:
        """Records behind the end of the assigned partitions, from the offsets of the last fetches.
        (The embedded Tansu broker reports end offsets wrongly, so there this gauge is approximate.)"""
        if self.metrics is None or time.monotonic() < self._lag_due:
            return
        self._lag_due = time.monotonic() + self.LAG_EVERY_S
        lag = 0
        for tp in consumer.position(consumer.assignment()):
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                lag += max(high - tp.offset, 0)
        self.metrics.lag.labels(self.processor.role).set(lag)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s assigned %s", self.processor.role, [f"{p.topic}[{p.partition}]" for p in partitions])
        self.assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.processor.on_revoke(partitions)

    @staticmethod
    def _is_error(msg: Message) -> bool:
        if msg.error() is None:
            return False
        log.warning("consumer error: %s", msg.error())
        return True


def decode_or_dead_letter(
    msg: Message, record_name: str, role: str, publisher: Publisher, metrics: Metrics
) -> dict[str, Any] | None:
    """The decoded value, or None after sending the message to the dead-letter topic."""
    try:
        if msg.value() is None:
            raise codec.SchemaError(f"{record_name}: empty value (tombstone) where a record was expected")
        return codec.decode(record_name, msg.value())
    except codec.SchemaError as exc:
        send_to_dead_letter(msg, role, exc, publisher, metrics)
        return None


def send_to_dead_letter(
    msg: Message, role: str, error: BaseException, publisher: Publisher, metrics: Metrics | None
) -> None:
    log.warning(
        "dead letter from %s[%s]@%s (%s): %s: %s",
        msg.topic(),
        msg.partition(),
        msg.offset(),
        role,
        type(error).__name__,
        str(error)[:300],
    )
    if metrics is not None:
        metrics.inc(f"deadletter.{role}")
    publisher.dead_letter(msg, role, error)


def run_until(
    stop: threading.Event,
    threads: list[ProcessorThread],
    poll_s: float = 0.2,
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Block until `stop` is set or a processor thread dies."""
    while not stop.is_set():
        dead = [t for t in threads if not t.is_alive()]
        if dead:
            raise RuntimeError(f"processor {dead[0].processor.role} stopped: {dead[0].failure!r}")
        if on_idle:
            on_idle()
        stop.wait(poll_s)
