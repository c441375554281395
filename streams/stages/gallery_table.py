"""The gallery as a global table: every worker reads the whole compacted gallery topic.

This is the table side of the stream-table join (Kafka Streams calls it a GlobalKTable). The reader has
no consumer group and commits nothing: it starts at the beginning of every partition on each start,
so a new or restarted matcher rebuilds the whole gallery, and then follows live updates and tombstones.

Offsets mean nothing once the topic is deleted and created again (the in-memory development broker loses
every topic when it restarts). The reader checks the topic's id every few seconds; when it changes, the
table is emptied and rebuilt from the beginning of the new topic, as a worker started now would build it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

from speakerflow.gallery.matcher import Gallery
from speakerflow.gallery.voiceprint import Voiceprint
from speakerflow.schemas import codec
from speakerflow.streams.limits import NAME_MAX, check_id, check_text
from speakerflow.streams.runtime import TopicReader
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import GALLERY

log = logging.getLogger(__name__)

Listener = Callable[[str, Voiceprint | None], None]


class GalleryTable(threading.Thread):
    TOPIC_CHECK_S = 5.0  # how often the topic's id is checked

    def __init__(self, settings: Settings, gallery: Gallery, listeners: list[Listener] | None = None) -> None:
        super().__init__(name="speakerflow-gallery", daemon=True)
        self.settings = settings
        self.gallery = gallery
        self.listeners = listeners or []
        self.ready = threading.Event()  # set once the records present at start have been read
        self.stopping = threading.Event()
        self.applied = 0

    def run(self) -> None:
        reader = TopicReader(self.settings)
        admin = AdminClient(self.settings.kafka_common())
        topic = self.settings.topic(GALLERY)
        try:
            topic_id = self._topic_id(admin, topic)
            targets = self._read_from_start(reader, topic)
            positions = dict.fromkeys(targets, 0)
            next_check = time.monotonic() + self.TOPIC_CHECK_S
            while not self.stopping.is_set():
                for msg in reader.poll(500, 0.1):
                    self._apply(msg.key(), msg.value())
                    positions[msg.partition()] = msg.offset() + 1
                if not self.ready.is_set() and all(positions[p] >= end for p, end in targets.items()):
                    log.info("gallery table ready: %d voiceprints", len(self.gallery))
                    self.ready.set()
                if time.monotonic() >= next_check:
                    current = self._topic_id(admin, topic)
                    if current is not None and topic_id is not None and current != topic_id:
                        log.warning("gallery topic %s was created anew: rebuilding the table from it", topic)
                        self._forget_all()
                        targets = self._read_from_start(reader, topic)
                        positions = dict.fromkeys(targets, 0)
                    topic_id = current or topic_id
                    next_check = time.monotonic() + self.TOPIC_CHECK_S
        except Exception:
            log.exception("gallery table reader failed")
            raise
        finally:
            reader.close()

    @staticmethod
    def _topic_id(admin: AdminClient, topic: str) -> str | None:
        """The topic's id (a new one once it is deleted and created again); None while unknown."""
        try:
            description = admin.describe_topics(TopicCollection([topic]), request_timeout=5)[topic].result()
        except KafkaException:  # the broker is away, or the topic does not exist (yet)
            return None
        topic_id = str(description.topic_id)
        return None if set(topic_id) == {"A"} else topic_id  # all zeros: a broker without topic ids

    @staticmethod
    def _read_from_start(reader: TopicReader, topic: str) -> dict[int, int]:
        """Read every partition of the topic from its first record; returns each partition's end offset."""
        partitions = reader.partitions(topic, timeout_s=30) or []
        reader.assign([(topic, p, OFFSET_BEGINNING) for p in partitions])
        return {p: reader.watermarks(topic, p)[1] for p in partitions}

    def _forget_all(self) -> None:
        for voiceprint in self.gallery.speakers():
            self.gallery.delete(voiceprint.speaker_id)
            for listener in self.listeners:
                listener(voiceprint.speaker_id, None)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        # Whatever a gallery record holds, the reader goes on: one bad record must not empty the table.
        try:
            speaker_id = (key or b"").decode()
            if value is None:  # tombstone: the speaker was deleted
                self.gallery.delete(speaker_id)
                voiceprint = None
            else:
                voiceprint = Voiceprint.from_record(codec.decode("Voiceprint", value))
                _check(voiceprint, speaker_id)
                self.gallery.upsert(voiceprint)
        except Exception as exc:
            log.warning("skipping unusable gallery record for %r: %s", (key or b"")[:80], exc)
            return
        self.applied += 1
        for listener in self.listeners:
            listener(speaker_id, voiceprint)


def _check(voiceprint: Voiceprint, key: str) -> None:
    """A voiceprint's ids and name end up in every segment it labels (and their candidates): one with a
    NUL or a 9,000-character id would make the sink refuse every one of them."""
    check_id("speaker_id", voiceprint.speaker_id)
    if voiceprint.speaker_id != key:
        raise ValueError(f"record key {key!r} is not its speaker id {voiceprint.speaker_id!r}")
    check_text("name", voiceprint.name, NAME_MAX)
    if not np.isfinite(voiceprint.embedding).all():
        raise ValueError("embedding holds NaN or infinity")
