"""The load test's latency accounting (which records count as news) and what a run says it measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from speakerflow.evaluation.loadtest import LoadResult, SegmentNews, measured, worker_modes
from speakerflow.streams.settings import Settings


def record(segment_id: str, end_s: float, final: bool, revision: int = 0, stream: str = "a") -> dict:
    return {
        "segment_id": segment_id,
        "stream_id": stream,
        "end_s": end_s,
        "is_final": final,
        "revision": revision,
    }


def test_first_labels_finals_corrections_and_revisions() -> None:
    news = SegmentNews()
    assert news.classify(record("a:0", 1.0, False)) == (True, False)  # provisional: new audio
    assert news.classify(record("a:0", 1.5, False)) == (True, False)  # grows: new audio again
    assert news.classify(record("a:0", 1.4, True)) == (False, True)  # final restates labelled audio
    assert news.classify(record("a:0", 1.4, True)) == (False, False)  # identity correction: no news
    assert news.classify(record("a:1", 1.8, True)) == (True, True)  # a short turn's first record is final
    assert news.classify(record("b:0", 0.5, False, stream="b")) == (True, False)  # streams are apart
    assert news.classify(record("a:r1:0", 9.0, True, revision=1)) == (False, False)  # revision: old audio


READY = "12:00:00 INFO speakerflow.worker: worker ready: roles=diarize,match model={model} gallery=0{mode}\n"


def test_the_report_names_the_diarizer_mode_and_model_the_workers_ran(tmp_path: Path) -> None:
    settings = Settings.from_env({"SPEAKERFLOW_DIARIZER": "segmentation", "SPEAKERFLOW_EMBEDDER": "campplus"})
    assert settings.child_env()["SPEAKERFLOW_DIARIZER"] == "segmentation"  # what the workers inherit
    assert measured(settings).startswith("diarizer segmentation, embedder campplus, SPEAKERFLOW_LATENCY_S")
    for i in range(2):
        (tmp_path / f"worker-4-{i}.log").write_text(
            READY.format(model="campplus-x", mode=" diarizer=segmentation")
        )
    assert worker_modes(tmp_path, "4", settings) == ("segmentation", "campplus-x")
    result = LoadResult(4, 1.0, 10, 0.1, 0.2, 0.3, 1.0, 2.0, 0, 0, 50.0, 900.0, 0)
    result.diarizer, result.model_id = "segmentation", "campplus-x"
    assert measured(settings, [result]).startswith("diarizer segmentation, model campplus-x, ")
    # A worker that ran the other mode (or announced none) fails the run instead of mislabelling it.
    (tmp_path / "worker-8-0.log").write_text(READY.format(model="campplus-x", mode=" diarizer=light"))
    with pytest.raises(RuntimeError, match="not diarizer segmentation"):
        worker_modes(tmp_path, "8", settings)
