"""A stream survives the loss of its diarize worker: state on the real broker, replay from the audio topic."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from speakerflow.evaluation.corpus import load_manifest
from speakerflow.evaluation.simulation import SimulationConfig, simulate
from speakerflow.processors.overlap_diarization import SegmentationDiarizer
from speakerflow.schemas import codec
from speakerflow.streams.client import play_audio
from speakerflow.streams.runtime import Metrics, Publisher, consume_available, group_consumer
from speakerflow.streams.stages.diarize import DiarizeProcessor
from speakerflow.streams.topology import AUDIO, create_topics

pytestmark = pytest.mark.integration
BATCH = 8


class RecordingPublisher(Publisher):
    """The real publisher, also keeping what the diarize stage published (to compare runs)."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.segments: list[dict] = []

    def publish(self, topic, key, record_name, record) -> None:
        super().publish(topic, key, record_name, record)
        if record_name == "DiarizedSegment":
            self.segments.append(record)


def _audio_messages(settings, count_eos: int = 1) -> list:
    consumer = group_consumer(settings, f"{settings.group_prefix}-test-reader", [settings.topic(AUDIO)])
    messages, ends = [], 0
    try:
        for _ in range(600):
            for msg in consume_available(consumer, 500, 0.1):
                if msg.error() is None:
                    messages.append(msg)
                    ends += codec.decode("AudioChunk", msg.value())["end_of_stream"]
            if ends >= count_eos:
                break
    finally:
        consumer.close()
    return sorted(messages, key=lambda m: m.offset())


def _run(processor: DiarizeProcessor, messages: list, publisher: Publisher) -> None:
    for start in range(0, len(messages), BATCH):
        processor.handle(messages[start : start + BATCH], publisher)
        processor.tick(publisher)
        publisher.flush()


def _final_view(segments: list[dict]) -> dict[str, tuple]:
    latest = {s["segment_id"]: s for s in segments}  # the last version of each segment
    return {
        k: (s["label"], s["start_s"], s["end_s"], s["revision"]) for k, s in latest.items() if s["is_final"]
    }


@pytest.mark.parametrize("diarizer", ["light", "segmentation"])
def test_stream_survives_a_crashed_worker(
    settings, ge2e, shared_data: Path, diarizer: str, monkeypatch
) -> None:
    # segmentation mode: window blocks hold only settled windows, since live re-clustering (every 10 s)
    # relabels the windows that still cover uncommitted frames; blocks of 8 windows (4 s) so that the
    # restored state is made of several
    monkeypatch.setattr(SegmentationDiarizer, "rows_per_block", 8)
    settings = replace(settings, partitions=1, state_every_s=4.0, diarizer=diarizer)
    create_topics(settings)
    config = SimulationConfig(speakers=(3, 3), minutes=1.0, file_minutes=1.0, split="tune", seed=11)
    audio = next(simulate(load_manifest(shared_data), config)).audio
    play_audio(Publisher(settings), "call-7", audio, chunk_s=0.5, realtime=False)
    messages = _audio_messages(settings)
    assert len(messages) == int(np.ceil(len(audio) / 8000))

    undisturbed = RecordingPublisher(replace(settings, state_every_s=1e9))
    _run(DiarizeProcessor(replace(settings, state_every_s=1e9), ge2e, Metrics()), messages, undisturbed)

    crash_at = (len(messages) // 2) // BATCH * BATCH + 3  # mid-batch offsets are committed up to here
    first, second = RecordingPublisher(settings), RecordingPublisher(settings)
    worker_a = DiarizeProcessor(settings, ge2e, Metrics())
    _run(worker_a, messages[:crash_at], first)
    assert worker_a.metrics.counters["state.snapshots"] >= 2
    # worker_a dies without a rebalance (kill -9): no hand-over snapshot. worker_b takes the partition.
    metrics_b = Metrics()
    worker_b = DiarizeProcessor(settings, ge2e, metrics_b)
    _run(worker_b, messages[crash_at:], second)
    assert metrics_b.counters["streams.restored"] == 1
    assert metrics_b.counters["chunks.gap"] == 0  # the replay filled what the snapshot lacked

    expected = _final_view(undisturbed.segments)
    got = _final_view(first.segments + second.segments)
    assert any(v[3] == 1 for v in expected.values())  # the revision is part of the comparison
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        label, start, end, revision = got[key]
        assert (label, revision) == (value[0], value[3]), key
        assert start == pytest.approx(value[1], abs=0.01) and end == pytest.approx(value[2], abs=0.01)


def test_finished_stream_leaves_no_state(settings, ge2e, shared_data: Path) -> None:
    settings = replace(settings, partitions=1, state_every_s=2.0)
    create_topics(settings)
    config = SimulationConfig(speakers=(2, 2), minutes=0.3, file_minutes=0.3, split="tune", seed=5)
    audio = next(simulate(load_manifest(shared_data), config)).audio
    play_audio(Publisher(settings), "call-8", audio, chunk_s=0.5, realtime=False)
    worker = DiarizeProcessor(settings, ge2e, Metrics())
    _run(worker, _audio_messages(settings), Publisher(settings))
    assert worker.metrics.counters["state.snapshots"] >= 1 and not worker.streams
    fresh = DiarizeProcessor(settings, ge2e, Metrics())
    assert fresh.store.load("call-8", 0) is None  # tombstoned
