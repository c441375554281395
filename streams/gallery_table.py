"""The gallery as a global table: every worker reads the whole compacted gallery topic.

This is the table side of the stream-table join (Kafka Streams calls it a GlobalKTable). The reader has
no consumer group and commits nothing: it starts at the beginning of every partition on each start,
so a new or restarted matcher rebuilds the whole gallery, and then follows live updates and tombstones.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from gallery.matcher import Gallery
from gallery.voiceprint import Voiceprint
from schemas import codec
from streams.settings import Settings

log = logging.getLogger(__name__)

Listener = Callable[[str, Voiceprint | None], None]


class GalleryTable(threading.Thread):
    def __init__(self, settings: Settings, gallery: Gallery, listeners: list[Listener] | None = None) -> None:
        super().__init__(name="speakerflow-gallery", daemon=True)
        self.settings = settings
        self.gallery = gallery
        self.listeners = listeners or []
        self.ready = threading.Event()  # set once the records present at start have been read
        self.stopping = threading.Event()
        self.applied = 0

    def run(self) -> None:
        consumer = Consumer(self.settings.consumer_config(None))
        topic = self.settings.topic("gallery")
        try:
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            assignment = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
            consumer.assign(assignment)
            targets = {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
            }
            positions = dict.fromkeys(partitions, 0)
            while not self.stopping.is_set():
                for msg in consumer.consume(num_messages=500, timeout=0.1):
                    if msg.error() is None:
                        self._apply(msg.key(), msg.value())
                        positions[msg.partition()] = msg.offset() + 1
                if not self.ready.is_set() and all(positions[p] >= targets[p] for p in partitions):
                    log.info("gallery table ready: %d voiceprints", len(self.gallery))
                    self.ready.set()
        except Exception:
            log.exception("gallery table reader failed")
            raise
        finally:
            consumer.close()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        speaker_id = (key or b"").decode()
        if value is None:  # tombstone: the speaker was deleted
            self.gallery.delete(speaker_id)
            voiceprint = None
        else:
            try:
                voiceprint = Voiceprint.from_record(codec.decode("Voiceprint", value))
            except (codec.SchemaError, ValueError) as exc:
                log.warning("skipping unreadable gallery record for %r: %s", speaker_id, exc)
                return
            self.gallery.upsert(voiceprint)
        self.applied += 1
        for listener in self.listeners:
            listener(speaker_id, voiceprint)
