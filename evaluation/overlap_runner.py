"""Running the segmentation diarizer over a whole recording, as the diarize stage would (one
segmentation batch and one embedding batch per audio chunk), timing each compute step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from speakerflow.evaluation.diarization import Emission, StreamRun, emission_recorder, finish_run
from speakerflow.processors.diarization import DiarizerConfig
from speakerflow.processors.embedding import Embedder
from speakerflow.processors.overlap_diarization import (
    Chunk,
    OverlapConfig,
    SegmentationDiarizer,
)

STEPS = ("segment", "embed", "cluster", "revise")


def run_overlap_stream(
    audio: np.ndarray,
    config: OverlapConfig,
    segment: Callable[[np.ndarray], np.ndarray],
    embed: Callable[[list[np.ndarray]], np.ndarray],
    chunk_s: float = 0.5,
    sample_rate: int = 16000,
) -> StreamRun:
    """Feed `audio` chunk by chunk; `segment` maps (windows, samples) to (windows, frames, 3)."""
    diarizer = SegmentationDiarizer(config)
    emissions, seconds = feed_overlap_stream(diarizer, audio, segment, embed, chunk_s, sample_rate)
    return finish_run(diarizer, emissions, seconds, len(audio) / sample_rate)


def feed_overlap_stream(
    diarizer: SegmentationDiarizer,
    audio: np.ndarray,
    segment: Callable[[np.ndarray], np.ndarray],
    embed: Callable[[list[np.ndarray]], np.ndarray],
    chunk_s: float = 0.5,
    sample_rate: int = 16000,
) -> tuple[list[Emission], dict[str, float]]:
    """The whole of `audio` through `diarizer` up to its end of audio (not `finish`): (emissions, seconds
    per compute step), one segmentation batch and one embedding batch per chunk."""
    step = max(int(chunk_s * sample_rate), 1)
    seconds = dict.fromkeys(STEPS, 0.0)
    emissions: list[Emission] = []
    record = emission_recorder(diarizer, emissions)

    def process(chunks: list[Chunk]) -> None:
        t0 = time.perf_counter()
        activity = segment(np.stack([c.samples for c in chunks])) if chunks else np.zeros((0, 0, 3))
        t1 = time.perf_counter()
        speakers = diarizer.add_segmentation(chunks, activity)
        t2 = time.perf_counter()
        embeddings = embed([s.samples for s in speakers]) if speakers else np.zeros((0, 1), np.float32)
        t3 = time.perf_counter()
        record(diarizer.add_embeddings(speakers, embeddings))
        t4 = time.perf_counter()
        seconds["segment"] += t1 - t0
        seconds["embed"] += t3 - t2
        seconds["cluster"] += (t2 - t1) + (t4 - t3)

    for start in range(0, len(audio), step):
        process(diarizer.push_audio(audio[start : start + step]))
    process(diarizer.end_audio())
    return emissions, seconds


def configured_runner(
    mode: str, embedder: Embedder, overrides: Sequence[str] = (), chunk_s: float = 0.5
) -> tuple[Callable[[np.ndarray], StreamRun] | None, DiarizerConfig | OverlapConfig]:
    """(runner, config) of the diarizer `eval diarize` / `bench diarize` measure, built as the stage
    builds it: `mode` or SPEAKERFLOW_DIARIZER, with the settings' values for this embedder's family;
    runner None means the light diarizer (the caller's `run_stream`). `overrides` are NAME=VALUE
    settings of the segmentation diarizer (OverlapConfig fields), applied last."""
    from speakerflow.streams.settings import Settings
    from speakerflow.streams.stages.diarize import diarizer_config, segmentation_config

    settings = Settings.from_env()
    mode = mode or settings.diarizer
    if mode == "light":
        return None, diarizer_config(settings, embedder.name)
    if mode != "segmentation":
        raise ValueError(f"diarizer {mode!r}: choose 'light' or 'segmentation'")
    from speakerflow.processors.segmentation import Segmenter

    values = dict(item.split("=", 1) for item in overrides)
    config = segmentation_config(settings, embedder.name, values)
    segmenter = Segmenter()
    config.check_grid(segmenter.grid)
    runner = partial(
        run_overlap_stream, config=config, segment=segmenter, embed=embedder.embed, chunk_s=chunk_s
    )
    return runner, config
