"""`speakerflow db segments`: the current labelling by default, every revision on request."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg

from speakerflow.streams.database import migrate
from speakerflow.streams.settings import REPO_ROOT

INSERT = (
    "INSERT INTO segments (segment_id, revision, stream_id, label, start_s, end_s, name, confidence, score, "
    "model_id, is_final, source_capture_at, emitted_at) "
    "VALUES (%s, %s, 'call', %s, %s, %s, %s, 0.9, 0.8, 'm', true, now(), now())"
)


def _segments(database_url: str, *flags: str) -> list[str]:
    env = os.environ | {"DATABASE_URL": database_url}
    result = subprocess.run(
        [sys.executable, "-m", "speakerflow.streams.cli", "db", "segments", *flags],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.strip().splitlines()[1:]  # below the header


def test_db_segments_shows_the_current_labelling_unless_asked_for_history(database_url: str) -> None:
    migrate(database_url)
    with psycopg.connect(database_url) as conn:
        for turn, (start, label, live_name, final_name) in enumerate(
            [(0.0, "S0", "Ada", "Ada"), (4.0, "S1", "UNKNOWN", "Bob"), (8.0, "S0", "Ada", "Ada")]
        ):
            conn.execute(INSERT, (f"call:{turn}", 0, label, start, start + 3, live_name))
            conn.execute(INSERT, (f"call:r1:{turn}", 1, label, start, start + 3, final_name))
    current = _segments(database_url)
    assert len(current) == 3
    assert all(line.split()[-1] == "1" for line in current)  # the revision column
    assert "UNKNOWN" not in "\n".join(current)
    history = _segments(database_url, "--all-revisions")
    assert len(history) == 6
    assert sorted(line.split()[-1] for line in history) == ["0"] * 3 + ["1"] * 3


def test_a_second_process_on_the_data_dir_says_it_reuses_the_embedded_server(tmp_path, caplog) -> None:
    import logging

    from speakerflow.streams.database import resolve_database_url

    caplog.set_level(logging.INFO, logger="speakerflow.streams.database")
    url, first = resolve_database_url("", str(tmp_path))
    try:
        assert first is not None and not first.reused
        # What `speakerflow api` does beside a running worker (a second handle on the same folder).
        again, second = resolve_database_url("", str(tmp_path))
        assert second is not None and second.reused and again == url
        assert "started embedded PostgreSQL" in caplog.text
        assert "reusing the embedded PostgreSQL" in caplog.text
    finally:
        first.stop()
