"""Pooling identification figures over several speaker splits."""

from __future__ import annotations

from speakerflow.evaluation.gallery import EvalReport, Scores, pool_scores


def _scores(
    variant: str, enrolled_s: float, correct: float, strangers_s: float, stranger_unknown: float
) -> Scores:
    return Scores(variant, "revision", enrolled_s, correct, 0.0, round(1 - correct, 4), strangers_s,
                  stranger_unknown, 10, 0.9, 0.9, correct, 0)  # fmt: skip


def _report(*scores: Scores) -> EvalReport:
    return EvalReport("m", "model", 0.75, 10, 8, 2, {}, 3, 60.0, 50.0, {}, list(scores))


def test_pooling_weights_each_run_by_its_speech_time():
    reports = [
        _report(_scores("default", 100.0, 0.99, 50.0, 1.0), _scores("other", 100.0, 0.5, 50.0, 0.5)),
        _report(_scores("default", 300.0, 0.95, 150.0, 0.9), _scores("other", 300.0, 0.5, 150.0, 0.5)),
    ]
    pooled = {row["variant"]: row for row in pool_scores(reports)}
    default = pooled["default"]
    assert default["runs"] == 2 and default["enrolled_speech_s"] == 400.0
    assert default["enrolled_correct"] == round((99 + 285) / 400, 4)  # not the mean of 0.99 and 0.95
    assert default["enrolled_unknown"] == round((1 + 15) / 400, 4)
    assert default["stranger_unknown"] == round((50 + 135) / 200, 4)
    assert pooled["other"]["enrolled_correct"] == 0.5
