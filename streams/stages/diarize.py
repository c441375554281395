"""Diarization stage: audio chunks in (keyed by stream id), diarized segments out.

All streams of the partitions this worker owns are handled together: the windows that a poll's
chunks complete, across streams, are embedded in one batch.

Segments: live turns have ids `<stream>:<turn>` and `revision` 0 (provisional updates and the final
version share the id); the end-of-stream re-clustering emits a complete new labelling with ids
`<stream>:r1:<turn>` and `revision` 1. A consumer shows, per stream, the rows of the highest revision
it has seen: once revision 1 arrives it replaces every revision-0 row of that stream.

State that survives a restart: in the batch that opens a stream, then every `state_every_s` seconds
of audio (and when a partition is revoked) each stream's diarizer is snapshotted to the compacted
`diarizer.state` topic, keyed by stream id, in the same partition number as the stream's audio. A
worker that meets a stream it does not know at a sequence number above 0 loads the snapshot and
replays the audio topic from the snapshot's resume offset, so nothing between the snapshot and the
crash is lost; segments of the replay carry the same ids as before, which the sink's upserts absorb.
The stream's end deletes its state (tombstones).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from confluent_kafka import Message, TopicPartition

from speakerflow.processors.audio import decode_pcm
from speakerflow.processors.diarization import (
    DiarizerConfig,
    StreamDiarizer,
    TurnUpdate,
    Window,
    config_for_embedder,
)
from speakerflow.processors.embedding import Embedder
from speakerflow.processors.overlap_diarization import (
    Chunk,
    LocalSpeaker,
    OverlapConfig,
    SegmentationDiarizer,
    overlap_config,
)
from speakerflow.processors.vad import VadConfig
from speakerflow.streams.limits import InvalidField, check_audio_chunk
from speakerflow.streams.runtime import (
    Metrics,
    Processor,
    Publisher,
    decode_or_dead_letter,
    now_ms,
    send_to_dead_letter,
)
from speakerflow.streams.settings import Settings
from speakerflow.streams.stages.diarize_state import DiarizerStateStore, StreamState
from speakerflow.streams.topology import AUDIO, SEGMENTS_DIARIZED, STREAMS, stage

log = logging.getLogger(__name__)

REORDER_LIMIT = 32  # chunks held while waiting for a missing sequence number
WINDOW_BLOCK = 256  # windows per immutable state block (keeps each state record well under 1 MB)
SEGMENT_BATCH = 32  # segmentation windows per model call (segmentation mode)


class ChunkRejected(ValueError):
    """A chunk that is well-formed Avro but cannot be used (wrong format for its stream, etc.)."""


def diarizer_config(settings: Settings, family: str = "") -> DiarizerConfig:
    """The diarizer of every stream, from the settings; clustering thresholds follow the embedder
    family (`family`, else the configured SPEAKERFLOW_EMBEDDER)."""
    explicit = (
        {"new_speaker_distance": settings.new_speaker_threshold} if settings.new_speaker_threshold else {}
    )
    return config_for_embedder(
        family or settings.embedder,
        window_s=settings.window_s,
        hop_s=settings.hop_s,
        latency_s=settings.latency_s,
        vad=VadConfig(threshold=settings.vad_threshold),
        **explicit,
    )


def segmentation_config(
    settings: Settings, family: str = "", overrides: dict[str, str] | None = None
) -> OverlapConfig:
    """The segmentation mode's diarizer: its tuned values for the embedder family, the configured
    latency and window step, then `overrides` (field -> value, e.g. from `eval diarize --set`)."""
    values = {"hop_s": str(settings.segmentation_hop_s), **(overrides or {})}
    return overlap_config(settings.latency_s, values, family or settings.embedder)


def _by_stream(
    pairs: Sequence[tuple[StreamState, Any]], rows: Sequence[np.ndarray]
) -> list[tuple[StreamState, list[Any], list[np.ndarray]]]:
    """A shared batch's items and their result rows, split back per stream (in order)."""
    groups: dict[str, tuple[StreamState, list[Any], list[np.ndarray]]] = {}
    for (state, item), row in zip(pairs, rows, strict=True):
        group = groups.setdefault(state.stream_id, (state, [], []))
        group[1].append(item)
        group[2].append(row)
    return list(groups.values())


def segment_id(stream_id: str, update: TurnUpdate) -> str:
    if update.revision == 0:
        return f"{stream_id}:{update.turn_index:05d}"
    return f"{stream_id}:r{update.revision}:{update.turn_index:05d}"


class DiarizeProcessor(Processor):
    role = "diarize"
    topics = stage("diarize").consumes
    max_batch = 256

    def __init__(self, settings: Settings, embedder: Embedder, metrics: Metrics) -> None:
        self.settings = settings
        self.embedder = embedder
        self.metrics = metrics
        self.config = diarizer_config(settings, embedder.name)
        self.segmenter = None
        if settings.diarizer == "segmentation":
            from speakerflow.processors.segmentation import Segmenter

            self.overlap_config = segmentation_config(settings, embedder.name)
            self.segmenter = Segmenter(device=settings.device)
            self.overlap_config.check_grid(self.segmenter.grid)
        elif settings.diarizer != "light":
            raise ValueError(f"SPEAKERFLOW_DIARIZER={settings.diarizer!r}: choose 'light' or 'segmentation'")
        self.streams: dict[str, StreamState] = {}
        self.store = DiarizerStateStore(settings)
        self._out_topic = settings.topic(SEGMENTS_DIARIZED)
        self._publisher: Publisher | None = None

    # -- input -----------------------------------------------------------------------------------
    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        self._publisher = publisher
        pending: list[tuple[StreamState, Window]] = []
        ended: list[StreamState] = []
        touched: dict[str, StreamState] = {}
        for msg in messages:
            chunk = decode_or_dead_letter(msg, "AudioChunk", self.role, publisher, self.metrics)
            if chunk is None:
                continue
            try:
                # Before the chunk touches any stream: a bad first chunk must not fix a stream's format.
                check_audio_chunk(chunk)
            except InvalidField as exc:
                send_to_dead_letter(msg, self.role, exc, publisher, self.metrics)
                continue
            if chunk["stream_id"] not in self.streams and chunk["seq"] > 0:
                pending += self._recover(msg, chunk, publisher, ended, touched)
            pending += self._accept(msg, chunk, publisher, ended, touched)
        self._embed_and_emit(pending, publisher)
        for state in ended:
            self._finish(state, publisher)
        if ended:
            self.store.flush()  # the finished streams' tombstones, before the input offsets are committed
        self._save_due(touched.values(), publisher)

    def _accept(
        self,
        msg: Message,
        chunk: dict,
        publisher: Publisher,
        ended: list[StreamState],
        touched: dict[str, StreamState],
    ) -> list[tuple[StreamState, Window]]:
        """Windows the chunk (and held chunks it releases) complete."""
        out: list[tuple[StreamState, Window]] = []
        for ready_msg, ready_chunk in self._in_order(msg, chunk):
            try:
                state, windows = self._push(ready_msg, ready_chunk)
            except Exception as exc:  # AudioDecodeError, ChunkRejected, or anything this chunk caused
                # Blamed here rather than by the runtime's guard: the batch's other chunks keep the
                # windows they already produced (a retry of the batch would drop them as duplicates).
                send_to_dead_letter(ready_msg, self.role, exc, publisher, self.metrics)
                continue
            touched[state.stream_id] = state
            out += [(state, w) for w in windows]
            if state.ended and state not in ended:
                ended.append(state)
        return out

    def _in_order(self, msg: Message, chunk: dict) -> list[tuple[Message, dict]]:
        """Chunks that can be processed now, in sequence order; duplicates are dropped."""
        state = self.streams.get(chunk["stream_id"])
        seq = chunk["seq"]
        expected = state.next_seq if state else 0
        if seq < expected or (state and seq in state.held):
            self.metrics.inc("chunks.duplicate")
            return []
        if state is None and seq != 0:
            log.warning("stream %s starts at seq %d (earlier chunks missing)", chunk["stream_id"], seq)
            self.metrics.inc("chunks.gap")
            return [(msg, chunk)]
        if seq > expected and state is not None:
            state.held[seq] = (msg, chunk)
            if len(state.held) <= REORDER_LIMIT:
                return []
            # Give up on the gap: continue from the oldest held chunk.
            log.warning("stream %s: gap before seq %d, continuing", state.stream_id, min(state.held))
            self.metrics.inc("chunks.gap")
            state.next_seq = min(state.held)
        ready = [(msg, chunk)] if state is None or seq == expected else []
        if state is not None:
            if ready:
                state.next_seq = seq + 1
            while state.next_seq in state.held:
                ready.append(state.held.pop(state.next_seq))
                state.next_seq += 1
        return ready

    def _push(self, msg: Message, chunk: dict) -> tuple[StreamState, list[Window]]:
        state = self.streams.get(chunk["stream_id"]) or self._open(msg, chunk)
        if (chunk["sample_rate"], chunk["channels"]) != (state.sample_rate, state.channels) and chunk[
            "payload"
        ]:
            raise ChunkRejected(
                f"stream {state.stream_id}: format changed mid-stream from {state.sample_rate} Hz x "
                f"{state.channels} to {chunk['sample_rate']} Hz x {chunk['channels']}"
            )
        state.next_seq = max(state.next_seq, chunk["seq"] + 1)
        state.last_chunk_monotonic = time.monotonic()
        state.applied_offset = max(state.applied_offset, msg.offset() or 0)
        samples = decode_pcm(
            chunk["payload"],
            chunk["encoding"],
            chunk["sample_rate"],
            chunk["channels"],
            max_seconds=self.settings.chunk_max_audio_s,
        )
        self.metrics.inc("chunks")
        windows = state.diarizer.push_audio(samples) if samples.size else []
        if chunk["end_of_stream"]:
            windows += state.diarizer.end_audio()
            state.ended = True
        return state, windows

    def _open(self, msg: Message, chunk: dict) -> StreamState:
        state = StreamState(
            chunk["stream_id"],
            self._new_diarizer(),
            chunk["capture_ts_ms"],
            chunk["sample_rate"],
            chunk["channels"],
            msg.partition() or 0,
            next_seq=chunk["seq"],
        )
        self.streams[state.stream_id] = state
        log.info("stream %s opened (%d Hz, %d ch)", state.stream_id, state.sample_rate, state.channels)
        if self._publisher is not None:
            self._stream_event(self._publisher, state, "STARTED")
        return state

    def _diarizer_class(self) -> type[StreamDiarizer] | type[SegmentationDiarizer]:
        return StreamDiarizer if self.segmenter is None else SegmentationDiarizer

    def _new_diarizer(self) -> StreamDiarizer | SegmentationDiarizer:
        if self.segmenter is None:
            return StreamDiarizer(self.config)
        return SegmentationDiarizer(self.overlap_config)

    def _stream_event(
        self,
        publisher: Publisher,
        state: StreamState,
        event: str,
        revised: list[TurnUpdate] = (),
        reason: str | None = None,
    ) -> None:
        """Lifecycle of the stream (the job downstream tables track); ENDED says which revision is final
        and how many segments it has, so a consumer knows when it holds the whole labelling."""
        finals = {u.turn_index: u.label for u in revised if u.is_final}
        record = {
            "stream_id": state.stream_id,
            "event": event,
            "at_ms": now_ms(),
            "audio_seconds": round(state.diarizer.audio_s, 3),
            "speakers": len(set(finals.values())),
            "revision": max((u.revision for u in revised), default=0),
            "segments": len(finals),
            "reason": reason,
            "metadata": {},
        }
        publisher.publish(self.settings.topic(STREAMS), state.stream_id, "StreamEvent", record)

    # -- recovery after a restart or a rebalance ---------------------------------------------------
    def _recover(
        self,
        msg: Message,
        chunk: dict,
        publisher: Publisher,
        ended: list[StreamState],
        touched: dict[str, StreamState],
    ) -> list[tuple[StreamState, Window]]:
        """Restore a stream met mid-way from its snapshot and replay the audio the snapshot lacks."""
        stream_id, partition = chunk["stream_id"], msg.partition() or 0
        saved = self.store.load(stream_id, partition)
        if saved is None:
            return []
        core, blocks = saved
        kind = self._diarizer_class()
        if core["model_id"] != self.embedder.model_id or core["snapshot_format"] != kind.snapshot_format:
            log.warning("stream %s: saved state is for another model or format; starting afresh", stream_id)
            return []
        diarizer = kind.restore(core["snapshot"], blocks)
        state = StreamState(
            stream_id,
            diarizer,
            core["origin_capture_ts_ms"],
            core["sample_rate"],
            core["channels"],
            partition,
            next_seq=core["next_seq"],
            applied_offset=core["resume_offset"] - 1,
            saved_audio_s=core["audio_s"],
            saved_blocks=len(blocks),
        )
        self.streams[stream_id] = state
        self.metrics.inc("streams.restored")
        log.info("stream %s restored at %.1f s (seq %d)", stream_id, core["audio_s"], core["next_seq"])
        out: list[tuple[StreamState, Window]] = []
        for old_msg, old_chunk in self.store.replay(
            msg.topic(), partition, core["resume_offset"], msg.offset()
        ):
            if old_chunk["stream_id"] == stream_id and _valid(old_chunk):
                out += self._accept(old_msg, old_chunk, publisher, ended, touched)
        return out

    def _save_due(self, states, publisher: Publisher) -> None:
        due = [
            s
            for s in states
            if not s.ended
            and s.stream_id in self.streams
            and s.diarizer.audio_s - s.saved_audio_s >= self.settings.state_every_s
        ]
        if due:
            publisher.flush()  # outputs first: a state never gets ahead of what was emitted
            for state in due:
                self._save(state)
            self.store.flush()

    def _save(self, state: StreamState) -> None:
        size = getattr(state.diarizer, "rows_per_block", WINDOW_BLOCK)
        # a block is immutable: only windows that can no longer change go into one
        full = getattr(state.diarizer, "stable_windows", state.diarizer.window_count) // size
        for block in range(state.saved_blocks, full):
            rows = state.diarizer.window_rows(block * size, (block + 1) * size)
            self.store.save_block(state, block, rows)
        state.saved_blocks = full
        self.store.save_core(state, state.diarizer.snapshot(windows_from=full * size), self.embedder)
        state.saved_audio_s = state.diarizer.audio_s
        self.metrics.inc("state.snapshots")

    # -- embedding and output --------------------------------------------------------------------
    def _segment(self, pending: list[tuple[StreamState, Chunk]]) -> list[tuple[StreamState, LocalSpeaker]]:
        """Segmentation mode: every stream's new windows through the model in shared batches; returns
        the local speakers to embed."""
        out: list[tuple[StreamState, LocalSpeaker]] = []
        for first in range(0, len(pending), SEGMENT_BATCH):
            batch = pending[first : first + SEGMENT_BATCH]
            activity = self.segmenter(np.stack([chunk.samples for _, chunk in batch]))
            for state, chunks, probs in _by_stream(batch, activity):
                out += [(state, s) for s in state.diarizer.add_segmentation(chunks, np.stack(probs))]
        self.metrics.inc("segmentation.windows", len(pending))
        return out

    def _embed_and_emit(self, pending: list[tuple[StreamState, Window]], publisher: Publisher) -> None:
        if pending and self.segmenter is not None:
            pending = self._segment(pending)
        if pending:
            embeddings = self.embedder.embed([w.samples for _, w in pending])
            self.metrics.inc("windows", len(pending))
            for state, windows, embs in _by_stream(pending, embeddings):
                self._emit(state, state.diarizer.add_embeddings(windows, np.stack(embs)), publisher)
        for state in list(self.streams.values()):
            if not state.ended:
                self._emit(state, state.diarizer.updates(), publisher)

    def _emit(self, state: StreamState, updates: list[TurnUpdate], publisher: Publisher) -> None:
        for update in updates:
            record = {
                "segment_id": segment_id(state.stream_id, update),
                "stream_id": state.stream_id,
                "label": update.label,
                "start_s": round(update.start_s, 3),
                "end_s": round(update.end_s, 3),
                "is_final": update.is_final,
                "revision": update.revision,
                "embedding": update.embedding.tolist(),
                "window_count": update.window_count,
                "model_id": self.embedder.model_id,
                "source_capture_ts_ms": state.origin_capture_ms + int(update.end_s * 1000),
                "emitted_at_ms": now_ms(),
            }
            publisher.publish(self._out_topic, state.stream_id, "DiarizedSegment", record)
            kind = "revision" if update.revision else ("final" if update.is_final else "provisional")
            self.metrics.inc(f"segments.{kind}")

    def _finish(self, state: StreamState, publisher: Publisher) -> None:
        self._emit(state, state.diarizer.finish(), publisher)
        revised = state.diarizer.revise()
        self._emit(state, revised, publisher)
        self._stream_event(publisher, state, "ENDED", revised)
        self.streams.pop(state.stream_id, None)
        self.store.delete(state)
        log.info("stream %s ended (%d windows)", state.stream_id, state.diarizer.window_count)

    # -- timers and rebalancing ------------------------------------------------------------------
    def tick(self, publisher: Publisher) -> None:
        self._publisher = publisher
        cutoff = time.monotonic() - self.settings.idle_timeout_s
        idle = [s for s in self.streams.values() if s.last_chunk_monotonic < cutoff]
        for state in idle:
            self.streams.pop(state.stream_id, None)  # a stream whose end fails is not retried forever
            log.info("stream %s idle for %.0f s: ending it", state.stream_id, self.settings.idle_timeout_s)
            windows = state.diarizer.end_audio()
            state.ended = True
            self._embed_and_emit([(state, w) for w in windows], publisher)
            self._finish(state, publisher)
        if idle:
            publisher.flush()
            self.store.flush()

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Hand streams over cleanly: snapshot them now, so the next owner replays nothing."""
        lost = {p.partition for p in partitions if p.topic == self.settings.topic(AUDIO)}
        leaving = [s for s in self.streams.values() if s.partition in lost]
        if leaving and self._publisher is not None:
            self._publisher.flush()
            for state in leaving:
                self._save(state)
            self.store.flush()
        for state in leaving:
            del self.streams[state.stream_id]
        self.store.forget(lost)

    def close(self) -> None:
        self.store.flush()


def _valid(chunk: dict) -> bool:
    try:
        check_audio_chunk(chunk)
    except InvalidField:
        return False
    return True
