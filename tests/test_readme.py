"""The README agrees with the code: generated blocks are current and defaults quoted in prose match."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
from conftest import TEST_SERVER_URL

from speakerflow.streams.readme import BLOCK, BLOCKS, README, render
from speakerflow.streams.settings import Settings

TEXT = README.read_text()


def test_generated_blocks_are_current() -> None:
    assert {m.group(2) for m in BLOCK.finditer(TEXT)} == set(BLOCKS)
    assert render(TEXT) == TEXT, "run `make readme` (python -m speakerflow.streams.readme) and commit"


def _quoted_defaults() -> list[tuple[str, str]]:
    """(variable, value) wherever prose says "`VAR` (default V" or "`VAR` (V s)"."""
    quoted = re.findall(r"`([A-Z][A-Z0-9_]+)` \(default ([^),;]+)", TEXT)
    quoted += re.findall(r"`([A-Z][A-Z0-9_]+)` \(([0-9.,]+) s\)", TEXT)
    quoted += re.findall(r"`([A-Z][A-Z0-9_]+)` [a-z ]*\(default ([0-9.,]+)\)", TEXT)
    return quoted


def _same(text: str, default: object) -> bool:
    text = text.strip().replace(",", "")
    if isinstance(default, bool):
        return text == ("on" if default else "off")
    try:
        return float(text) == float(default)  # type: ignore[arg-type]
    except ValueError:
        return text.strip("`") == str(default)


@pytest.mark.parametrize("variable,value", _quoted_defaults())
def test_defaults_quoted_in_prose_are_the_code_defaults(variable: str, value: str) -> None:
    defaults = {f.metadata["env"]: f.default for f in fields(Settings)}
    defaults["SPEAKERFLOW_TEST_DATABASE_URL"] = TEST_SERVER_URL  # the tests' own setting
    assert variable in defaults, f"the README quotes a default of {variable}, which is no setting"
    assert _same(value, defaults[variable]), f"README: {variable} default {value}; code: {defaults[variable]}"


def test_prose_quotes_some_defaults() -> None:
    assert len(_quoted_defaults()) >= 4


def test_the_demo_excerpt_is_what_the_demo_prints() -> None:
    """Each segment line of the excerpt is rebuilt from its fields by the demo's own formatting."""
    from speakerflow.streams.demo import check_mark, format_segment

    line = re.compile(
        r"^(\S+) \[\s*([\d.]+) –\s*([\d.]+) s\] (\S+) → (\S+)\s+confidence ([\d.]+) \(score ([\d.]+)\) "
        r"final  (.*)$"
    )
    excerpt = TEXT[TEXT.index("An excerpt:") :].split("```")[1]
    rows = [m for m in map(line.match, excerpt.splitlines()) if m]
    assert len(rows) >= 3
    for m in rows:
        stream, start, end, label, who, confidence, score, mark = m.groups()
        unknown = who == "UNKNOWN"
        seg = {
            "stream_id": stream,
            "start_s": float(start),
            "end_s": float(end),
            "label": label,
            "name": who,
            "speaker_id": None if unknown else who,
            "confidence": float(confidence),
            "score": float(score),
            "is_final": True,
            "revision": 0,
        }
        assert m.group(0).startswith(format_segment(seg))
        truth = mark.split()[2]
        assert mark == check_mark(seg["speaker_id"], truth, set() if "(not enrolled" in mark else {truth})
