"""What the demo prints beside each segment so that its viewer can check it against the reference."""

from __future__ import annotations

from dataclasses import dataclass

from speakerflow.streams.demo import check_mark, true_speaker


@dataclass
class Turn:
    speaker: str
    start_s: float
    end_s: float


REFERENCE = [Turn("ada", 0.0, 5.0), Turn("bob", 5.5, 9.0), Turn("eve", 9.0, 12.0)]


def test_the_true_speaker_is_who_speaks_most_of_the_segment() -> None:
    assert true_speaker(REFERENCE, 0.5, 4.0) == "ada"
    assert true_speaker(REFERENCE, 4.0, 8.0) == "bob"  # 1 s of Ada, 2.5 s of Bob
    assert true_speaker(REFERENCE, 20.0, 21.0) is None


def test_a_name_or_unknown_is_marked_right_or_wrong() -> None:
    enrolled = {"ada", "bob"}
    assert check_mark("ada", "ada", enrolled).startswith("✓")
    assert check_mark("bob", "ada", enrolled).startswith("✗")
    assert check_mark(None, "ada", enrolled).startswith("✗")  # an enrolled voice left UNKNOWN
    assert check_mark(None, "eve", enrolled).startswith("✓ really eve (not enrolled")
    assert check_mark("ada", "eve", enrolled).startswith("✗")
    assert check_mark(None, None, enrolled).startswith("?")
