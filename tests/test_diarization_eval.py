"""DER/JER scoring on tiny known cases and the definition of the live labelling at a latency."""

from __future__ import annotations

import pytest
from pyannote.core import Segment, Timeline

from speakerflow.evaluation.diarization import (
    Emission,
    Scorer,
    annotation,
    final_live,
    live_at_latency,
    overlap_regions,
)


def test_der_of_a_known_case() -> None:
    reference = annotation([(0, 10, "A"), (10, 20, "B")])
    hypothesis = annotation([(0, 12, "x"), (12, 20, "y")])
    scorer = Scorer(collars=(0.0, 1.0))
    row = scorer.add("f", "h", reference, hypothesis, Timeline([Segment(0, 20)]))
    assert row["der@0.0"] == pytest.approx(2 / 20)  # 2 s of B labelled as A's speaker
    assert row["confusion@0.0"] == pytest.approx(2 / 20)
    assert row["missed@0.0"] == row["false_alarm@0.0"] == 0.0
    # pyannote's collar is the total width: 0.5 s either side of every reference boundary (0, 10 and
    # 20 s) leaves 18 s scored, of which 10.5-12 s is confused.
    assert row["der@1.0"] == pytest.approx(1.5 / 18)
    assert (row["ref_speakers"], row["hyp_speakers"], row["count_error"]) == (2, 2, 0)


def test_missed_false_alarm_and_overlap_are_scored() -> None:
    reference = annotation([(0, 10, "A"), (5, 10, "B")])  # 5 s of overlap
    hypothesis = annotation([(0, 10, "x"), (10, 12, "x")])
    scorer = Scorer(collars=(0.0,))
    row = scorer.add("f", "h", reference, hypothesis, Timeline([Segment(0, 12)]))
    assert row["missed@0.0"] == pytest.approx(5 / 15)
    assert row["false_alarm@0.0"] == pytest.approx(2 / 15)
    assert row["count_error"] == -1
    totals = scorer.totals()["h"]
    assert totals["der@0.0"] == pytest.approx(7 / 15) and totals["count_exact"] == 0.0


def test_live_labelling_at_a_latency() -> None:
    emissions = [
        Emission(1.0, "0", "S0", 0.0, 1.0, False),  # provisional: S0 up to 1 s
        Emission(2.0, "0", "S1", 0.0, 1.5, False),  # relabelled and grown at clock 2
        Emission(3.0, "0", "S1", 0.0, 1.2, True),  # final, a little shorter
    ]
    # Chunks of 0.5 s: frame 0.2 arrives at 0.5; judged at 1.0 (latency 0.5) it is S0.
    early = live_at_latency(emissions, 0.5, 0.5, 3.0)
    assert early.crop(Segment(0.0, 0.5)).labels() == ["S0"]
    # Latency 1: frames before 0.5 s arrive at 0.5 and are judged at clock 1.5 (S0, the version of
    # clock 1); later frames are judged at >= 2.0 (S1, grown to 1.5 s, not yet cut back at clock 3).
    mid = live_at_latency(emissions, 1.0, 0.5, 3.0)
    assert mid.label_timeline("S0").extent() == Segment(0.0, 0.5)
    assert mid.label_timeline("S1").extent() == Segment(0.5, 1.5)
    final = final_live(emissions)
    assert final.labels() == ["S1"] and final.get_timeline().extent().end == pytest.approx(1.2)
    # Latency infinity equals the last version of every segment.
    assert live_at_latency(emissions, 100.0, 0.5, 3.0).get_timeline().extent().end == pytest.approx(
        1.2, abs=0.011
    )


def spans(timeline: Timeline) -> list[tuple[float, float]]:
    return [(round(s.start, 6), round(s.end, 6)) for s in timeline]


def test_overlap_regions_are_where_two_labels_talk_at_once() -> None:
    ref = annotation([(0, 10, "A"), (8, 14, "B"), (12, 20, "C"), (13, 15, "A"), (22, 25, "A")])
    # 8-10 A+B; 12-14 B+C and 13-14 A+B+C (three voices: still one region); 14-15 A+C.
    assert spans(overlap_regions(ref)) == [(8, 10), (12, 15)]
    # Two turns of one label overlapping, or touching turns of two labels, are not overlap.
    assert spans(overlap_regions(annotation([(0, 5, "A"), (3, 8, "A"), (8, 9, "B")]))) == []
    assert spans(overlap_regions(annotation([]))) == []
    # A hypothesis giving two labels over the same frames (the segmentation mode).
    hyp = annotation([(0, 4, "S0"), (3.5, 6, "S1"), (5, 7, "S0")])
    assert spans(overlap_regions(hyp)) == [(3.5, 4), (5, 6)]
    assert overlap_regions(ref).duration() == pytest.approx(5.0)


def test_timeline_plot_with_overlap(tmp_path) -> None:
    from types import SimpleNamespace

    from speakerflow.evaluation.diarization import FileResult, plot_timeline

    ref = annotation([(0, 10, "A"), (8, 14, "B")], "f")
    hyps = {"revision": annotation([(0, 9, "S0"), (8.5, 14, "S1")], "f"), "live@2s": annotation([], "f")}
    result = FileResult(SimpleNamespace(file_id="f"), ref, hyps, SimpleNamespace(duration_s=15.0))
    plot_timeline(result, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
