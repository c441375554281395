"""StreamDiarizer on real speech with the real models: accuracy (CAM++ and GE2E), snapshots (GE2E), the
stage's chunk order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from speakerflow.evaluation.corpus import load_manifest
from speakerflow.evaluation.diarization import Scorer, annotation, final_live, run_stream
from speakerflow.evaluation.simulation import SimulationConfig, simulate
from speakerflow.processors.diarization import StreamDiarizer, config_for_embedder
from speakerflow.streams.runtime import Metrics
from speakerflow.streams.settings import Settings
from speakerflow.streams.stages.diarize import DiarizeProcessor

CHUNK = 8000  # 0.5 s


@pytest.fixture(scope="module")
def conversation(shared_data: Path):
    """A simulated conversation of three speakers (about a minute) and its reference turns."""
    config = SimulationConfig(speakers=(3, 3), minutes=1.0, file_minutes=1.0, split="tune", seed=11)
    conv = next(simulate(load_manifest(shared_data), config))
    return conv.audio, conv.reference


@pytest.mark.parametrize("family", ["campplus", "ge2e"])
def test_streamed_conversation_is_diarized(conversation, family, request) -> None:
    audio, reference_turns = conversation
    reference = annotation([(t.start_s, t.end_s, t.speaker) for t in reference_turns])
    embedder = request.getfixturevalue(family)
    run = run_stream(audio, config_for_embedder(family), embedder.embed, chunk_s=0.5)
    scorer = Scorer()
    revision = scorer.add("c", "revision", reference, annotation(run.revision), None)
    live = scorer.add("c", "live", reference, final_live(run.emissions), None)
    assert revision["hyp_speakers"] == 3
    assert revision["der@0.25"] < 0.10, revision
    assert live["der@0.25"] < 0.20, live
    # Provisional updates come before the final version of each turn, and finals never change.
    finals: dict[str, tuple] = {}
    for e in run.emissions:
        assert e.segment_id not in finals, f"segment {e.segment_id} changed after it was final"
        if e.is_final:
            finals[e.segment_id] = (e.label, e.start_s, e.end_s)
    assert len(finals) == len({e.segment_id for e in run.emissions})


def _feed(diarizer: StreamDiarizer, audio: np.ndarray, embed) -> list[tuple]:
    out = []
    for start in range(0, len(audio), CHUNK):
        windows = diarizer.push_audio(audio[start : start + CHUNK])
        embeddings = embed([w.samples for w in windows]) if windows else np.zeros((0, 256), np.float32)
        out += diarizer.add_embeddings(windows, embeddings)
    return [(u.turn_index, u.label, round(u.start_s, 6), round(u.end_s, 6), u.is_final) for u in out]


def _end(diarizer: StreamDiarizer, embed) -> list[tuple]:
    windows = diarizer.end_audio()
    embeddings = embed([w.samples for w in windows]) if windows else np.zeros((0, 256), np.float32)
    updates = diarizer.add_embeddings(windows, embeddings) + diarizer.finish() + diarizer.revise()
    return [
        (u.turn_index, u.label, round(u.start_s, 6), round(u.end_s, 6), u.is_final, u.revision)
        for u in updates
    ]


@pytest.mark.parametrize("split_s", [13.25, 27.0])
@pytest.mark.parametrize("windows_in_blocks", [False, True])
def test_restored_diarizer_continues_identically(conversation, ge2e, split_s, windows_in_blocks) -> None:
    audio, _ = conversation
    cut = int(split_s * 16000) // CHUNK * CHUNK
    original = StreamDiarizer()
    _feed(original, audio[:cut], ge2e.embed)
    keep = original.window_count // 2 if windows_in_blocks else 0
    blocks = [original.window_rows(0, keep)] if keep else []
    restored = StreamDiarizer.restore(original.snapshot(windows_from=keep), blocks)
    assert restored.window_count == original.window_count and restored.audio_s == original.audio_s
    assert _feed(restored, audio[cut:], ge2e.embed) == _feed(original, audio[cut:], ge2e.embed)
    assert _end(restored, ge2e.embed) == _end(original, ge2e.embed)


def test_snapshot_needs_its_window_blocks(conversation, ge2e) -> None:
    audio, _ = conversation
    diarizer = StreamDiarizer()
    _feed(diarizer, audio[: 10 * 16000], ge2e.embed)
    with pytest.raises(ValueError, match="first"):
        StreamDiarizer.restore(diarizer.snapshot(windows_from=3))
    pending = diarizer.push_audio(audio[10 * 16000 : 14 * 16000])
    if pending:  # windows out for embedding: not a consistent point for a snapshot
        with pytest.raises(RuntimeError, match="awaiting"):
            diarizer.snapshot()


# -- the stage's chunk ordering (pure logic: no broker needed) ------------------------------------------
@dataclass
class _Msg:
    """The three Message accessors the ordering logic reads."""

    _offset: int
    _partition: int = 0

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return self._partition


def _chunk(seq: int, eos: bool = False) -> dict:
    return {
        "stream_id": "s",
        "seq": seq,
        "capture_ts_ms": 0,
        "sample_rate": 16000,
        "channels": 1,
        "encoding": "PCM_S16LE",
        "payload": b"\x00\x00" * 1600,
        "end_of_stream": eos,
        "metadata": {},
    }


def _order(processor: DiarizeProcessor, seqs: list[int]) -> list[int]:
    applied = []
    for offset, seq in enumerate(seqs):
        for msg, chunk in processor._in_order(_Msg(offset), _chunk(seq)):
            processor._push(msg, chunk)
            applied.append(chunk["seq"])
    return applied


def test_chunks_are_reordered_deduplicated_and_gaps_reported(ge2e) -> None:
    metrics = Metrics()
    processor = DiarizeProcessor(Settings.from_env({}), ge2e, metrics)
    assert _order(processor, [0, 2, 1, 1, 3, 0, 5, 4]) == [0, 1, 2, 3, 4, 5]
    assert metrics.counters["chunks.duplicate"] == 2
    # A chunk that never comes: after REORDER_LIMIT held chunks the stream moves on and says so.
    from speakerflow.streams.stages.diarize import REORDER_LIMIT

    later = list(range(7, 7 + REORDER_LIMIT + 1))  # 6 is lost
    assert _order(processor, later) == later
    assert metrics.counters["chunks.gap"] == 1
    assert processor.streams["s"].next_seq == later[-1] + 1
    assert processor.streams["s"].applied_offset == len(later) - 1
