"""A stream's state in the diarize stage, and its store: the compacted `diarizer.state` topic, written as
the stream goes and read back when a worker takes over a stream it does not know (see the diarize
stage's docstring)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from confluent_kafka import Message, Producer

from speakerflow.processors.diarization import StreamDiarizer
from speakerflow.processors.embedding import Embedder
from speakerflow.processors.overlap_diarization import SegmentationDiarizer
from speakerflow.schemas import codec
from speakerflow.streams.runtime import TopicReader, now_ms, read_compacted
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import DIARIZER_STATE

log = logging.getLogger(__name__)


@dataclass
class StreamState:
    stream_id: str
    diarizer: StreamDiarizer | SegmentationDiarizer
    origin_capture_ms: int  # capture time of the stream's first sample
    sample_rate: int
    channels: int
    partition: int
    next_seq: int = 0
    held: dict[int, tuple[Message, dict]] = field(default_factory=dict)  # out-of-order chunks
    last_chunk_monotonic: float = field(default_factory=time.monotonic)
    ended: bool = False
    applied_offset: int = -1  # audio-topic offset of the last chunk applied to the diarizer
    # Audio position of the last snapshot; -inf: none yet, so the stream's first batch takes one. A
    # worker that crashed before a stream's first snapshot would otherwise leave the next owner a stream
    # it cannot restore, and it would go on without its beginning.
    saved_audio_s: float = float("-inf")
    saved_blocks: int = 0  # window blocks already in the state topic

    def resume_offset(self) -> int:
        """Where a replay must start so that no chunk missing from the state is skipped."""
        offsets = [self.applied_offset + 1] + [m.offset() for m, _ in self.held.values()]
        return min(offsets)


class DiarizerStateStore:
    """The compacted `diarizer.state` topic: per stream a core record (key = stream id) and immutable
    window blocks (key = `<stream id>#windows-<n>`), all in the stream's audio partition number."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(DIARIZER_STATE)
        self._producer: Producer | None = None
        self._loaded: dict[int, dict[str, dict]] = {}  # partition -> key -> record (latest)

    def _produce(self, key: str, partition: int, record: dict | None) -> None:
        if self._producer is None:
            self._producer = Producer(self.settings.producer_config())
        value = None if record is None else codec.encode("DiarizerState", record)
        while True:
            try:
                self._producer.produce(self.topic, key=key, value=value, partition=partition)
                return
            except BufferError:
                self._producer.poll(0.1)

    def _record(self, state: StreamState, part: str, snapshot: bytes, model_id: str) -> dict:
        return {
            "stream_id": state.stream_id,
            "part": part,
            "snapshot": snapshot,
            "snapshot_format": state.diarizer.snapshot_format,  # a worker in the other mode starts afresh
            "audio_s": state.diarizer.audio_s,
            "next_seq": state.next_seq,
            "resume_offset": state.resume_offset(),
            "origin_capture_ts_ms": state.origin_capture_ms,
            "sample_rate": state.sample_rate,
            "channels": state.channels,
            "model_id": model_id,
            "saved_at_ms": now_ms(),
        }

    def save_core(self, state: StreamState, snapshot: bytes, embedder: Embedder) -> None:
        self._produce(
            state.stream_id, state.partition, self._record(state, "core", snapshot, embedder.model_id)
        )

    def save_block(self, state: StreamState, block: int, rows: bytes) -> None:
        key = f"{state.stream_id}#windows-{block:05d}"
        self._produce(key, state.partition, self._record(state, f"windows-{block:05d}", rows, ""))

    def delete(self, state: StreamState) -> None:
        """Tombstones for every record of a finished stream."""
        for block in range(state.saved_blocks):
            self._produce(f"{state.stream_id}#windows-{block:05d}", state.partition, None)
        self._produce(state.stream_id, state.partition, None)

    def flush(self, timeout_s: float = 30.0) -> None:
        if self._producer is not None and self._producer.flush(timeout_s):
            raise RuntimeError(f"diarizer state not delivered within {timeout_s} s")

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self._loaded.pop(partition, None)

    def load(self, stream_id: str, partition: int) -> tuple[dict, list[bytes]] | None:
        """The stream's latest core record and its window blocks in order, or None."""
        if partition not in self._loaded:
            self._loaded[partition] = self._read_partition(partition)
        records = self._loaded[partition]
        core = records.get(stream_id)
        if core is None:
            return None
        blocks = []
        for block in range(len(records)):
            record = records.get(f"{stream_id}#windows-{block:05d}")
            if record is None:
                break
            blocks.append(record["snapshot"])
        return core, blocks

    def _read_partition(self, partition: int) -> dict[str, dict]:
        """Latest record per key of one state partition (tombstones remove keys)."""
        records: dict[str, dict] = {}
        try:
            for msg in read_compacted(self.settings, self.topic, [partition], timeout_s=30):
                key = (msg.key() or b"").decode()
                if msg.value() is None:
                    records.pop(key, None)
                else:
                    records[key] = codec.decode("DiarizerState", msg.value())
        except TimeoutError as exc:  # restore what was read; the stream goes on from there
            log.warning("diarizer state partition %d: %s", partition, exc)
        return records

    def replay(self, topic: str, partition: int, start: int, stop: int):
        """Audio chunks of one partition with offsets in [start, stop), decoded, in order."""
        if start >= stop:
            return
        with TopicReader(self.settings) as reader:
            reader.assign([(topic, partition, start)])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                for msg in reader.poll(500, 0.2):
                    if msg.value() is None:
                        continue
                    if msg.offset() >= stop:
                        return
                    try:
                        yield msg, codec.decode("AudioChunk", msg.value())
                    except codec.SchemaError:
                        continue  # it went to the dead-letter topic the first time
                    if msg.offset() + 1 >= stop:
                        return
