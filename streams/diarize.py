"""Diarization stage: audio chunks in (keyed by stream id), diarized segments out.

All streams of the partitions this worker owns are handled together: the windows that a poll's
chunks complete, across streams, are embedded in one batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import Message, TopicPartition

from processors.audio import AudioDecodeError, decode_pcm
from processors.clustering import OnlineClustering
from processors.diarization import StreamDiarizer, TurnUpdate, Window
from processors.embedding import Embedder
from processors.vad import VadConfig
from streams.runtime import Metrics, Processor, Publisher, decode_or_dead_letter, now_ms, send_to_dead_letter
from streams.settings import Settings

log = logging.getLogger(__name__)

REORDER_LIMIT = 32  # chunks held while waiting for a missing sequence number


class ChunkRejected(ValueError):
    """A chunk that is well-formed Avro but cannot be used (wrong format for its stream, etc.)."""


@dataclass
class StreamState:
    stream_id: str
    diarizer: StreamDiarizer
    origin_capture_ms: int  # capture time of the stream's first sample
    sample_rate: int
    channels: int
    partition: int
    next_seq: int = 0
    held: dict[int, tuple[Message, dict]] = field(default_factory=dict)  # out-of-order chunks
    last_chunk_monotonic: float = field(default_factory=time.monotonic)
    ended: bool = False


class DiarizeProcessor(Processor):
    role = "diarize"
    topics = ("audio",)
    max_batch = 256

    def __init__(self, settings: Settings, embedder: Embedder, metrics: Metrics) -> None:
        self.settings = settings
        self.embedder = embedder
        self.metrics = metrics
        self.streams: dict[str, StreamState] = {}
        self._out_topic = settings.topic("segments.diarized")

    # -- input -----------------------------------------------------------------------------------
    def handle(self, messages: list[Message], publisher: Publisher) -> None:
        pending: list[tuple[StreamState, Window]] = []
        ended: list[StreamState] = []
        for msg in messages:
            chunk = decode_or_dead_letter(msg, "AudioChunk", self.role, publisher, self.metrics)
            if chunk is None:
                continue
            for ready_msg, ready_chunk in self._in_order(msg, chunk):
                try:
                    state, windows = self._push(ready_msg, ready_chunk)
                except (AudioDecodeError, ChunkRejected) as exc:
                    send_to_dead_letter(ready_msg, self.role, exc, publisher, self.metrics)
                    continue
                pending += [(state, w) for w in windows]
                if state.ended:
                    ended.append(state)
        self._embed_and_emit(pending, publisher)
        for state in ended:
            self._finish(state, publisher)

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
        samples = decode_pcm(chunk["payload"], chunk["encoding"], chunk["sample_rate"], chunk["channels"])
        self.metrics.inc("chunks")
        windows = state.diarizer.push_audio(samples) if samples.size else []
        if chunk["end_of_stream"]:
            windows += state.diarizer.end_audio()
            state.ended = True
        return state, windows

    def _open(self, msg: Message, chunk: dict) -> StreamState:
        s = self.settings
        diarizer = StreamDiarizer(
            window_s=s.window_s,
            hop_s=s.hop_s,
            vad_config=VadConfig(threshold=s.vad_threshold),
            clustering=OnlineClustering(new_speaker_distance=s.new_speaker_threshold),
        )
        state = StreamState(
            chunk["stream_id"],
            diarizer,
            chunk["capture_ts_ms"],
            chunk["sample_rate"],
            chunk["channels"],
            msg.partition() or 0,
            next_seq=chunk["seq"],
        )
        self.streams[state.stream_id] = state
        log.info("stream %s opened (%d Hz, %d ch)", state.stream_id, state.sample_rate, state.channels)
        return state

    # -- embedding and output --------------------------------------------------------------------
    def _embed_and_emit(self, pending: list[tuple[StreamState, Window]], publisher: Publisher) -> None:
        if pending:
            embeddings = self.embedder.embed([w.samples for _, w in pending])
            self.metrics.inc("windows", len(pending))
            by_stream: dict[str, tuple[StreamState, list[Window], list[np.ndarray]]] = {}
            for (state, window), emb in zip(pending, embeddings, strict=True):
                entry = by_stream.setdefault(state.stream_id, (state, [], []))
                entry[1].append(window)
                entry[2].append(emb)
            for state, windows, embs in by_stream.values():
                self._emit(state, state.diarizer.add_embeddings(windows, np.stack(embs)), publisher)
        for state in list(self.streams.values()):
            self._emit(state, state.diarizer.close_idle_turn(), publisher)

    def _emit(self, state: StreamState, updates: list[TurnUpdate], publisher: Publisher) -> None:
        for update in updates:
            record = {
                "segment_id": f"{state.stream_id}:{update.turn_index:05d}",
                "stream_id": state.stream_id,
                "label": update.label,
                "start_s": round(update.start_s, 3),
                "end_s": round(update.end_s, 3),
                "is_final": update.is_final,
                "revision": 0,
                "embedding": update.embedding.tolist(),
                "window_count": update.window_count,
                "model_id": self.embedder.model_id,
                "source_capture_ts_ms": state.origin_capture_ms + int(update.end_s * 1000),
                "emitted_at_ms": now_ms(),
            }
            publisher.publish(self._out_topic, state.stream_id, "DiarizedSegment", record)
            self.metrics.inc("segments.final" if update.is_final else "segments.provisional")

    def _finish(self, state: StreamState, publisher: Publisher) -> None:
        self._emit(state, state.diarizer.finish(), publisher)
        self.streams.pop(state.stream_id, None)
        log.info("stream %s ended", state.stream_id)

    # -- timers and rebalancing ------------------------------------------------------------------
    def tick(self, publisher: Publisher) -> None:
        cutoff = time.monotonic() - self.settings.idle_timeout_s
        idle = [s for s in self.streams.values() if s.last_chunk_monotonic < cutoff]
        for state in idle:
            log.info("stream %s idle for %.0f s: ending it", state.stream_id, self.settings.idle_timeout_s)
            windows = state.diarizer.end_audio()
            self._embed_and_emit([(state, w) for w in windows], publisher)
            self._finish(state, publisher)
        if idle:
            publisher.flush()

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        lost = {p.partition for p in partitions if p.topic == self.settings.topic("audio")}
        for stream_id in [k for k, s in self.streams.items() if s.partition in lost]:
            del self.streams[stream_id]
