"""The service benchmarks run end to end (their figures go to the README, not into assertions)."""

from __future__ import annotations

from dataclasses import replace

import psycopg
import pytest

from speakerflow.evaluation.service_bench import run_sink_bench, scratch_database

pytestmark = pytest.mark.integration


def test_sink_bench_drains_the_whole_backlog(settings, pg_server, tmp_path):
    bench = replace(settings, database_url=pg_server)
    results = run_sink_bench(bench, segments=500, batch_sizes=[50], log_dir=tmp_path)
    assert [(r.batch_size, r.segments, r.records) for r in results] == [(50, 500, 1000)]
    assert results[0].segments_per_s > 0


def test_scratch_database_is_migrated_then_dropped(settings, pg_server):
    bench = replace(settings, database_url=pg_server)
    with scratch_database(bench) as url:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM segments").fetchone()[0] == 0
    with psycopg.connect(pg_server) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()[0] == 0
