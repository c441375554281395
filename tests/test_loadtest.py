"""The load test's latency accounting: which segment records count as news."""

from __future__ import annotations

from speakerflow.evaluation.loadtest import SegmentNews


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
