"""The PostgreSQL sink loses nothing and duplicates nothing, through a kill -9 and a database outage."""

from __future__ import annotations

import signal
import subprocess
import time

import psycopg
import pytest
from processes import start_worker, wait_until

from speakerflow.streams.database import migrate
from speakerflow.streams.runtime import ProcessorThread, Publisher
from speakerflow.streams.topology import GALLERY, SEGMENTS_IDENTIFIED

pytestmark = pytest.mark.integration

STREAMS = 8
SEGMENTS_PER_STREAM = 150


def segment(stream: int, index: int, revision: int, final: bool) -> dict:
    return {
        "segment_id": f"s{stream}:{index:05d}",
        "stream_id": f"s{stream}",
        "label": f"SPEAKER_0{index % 3}",
        "start_s": float(index),
        "end_s": index + 0.5 + 0.25 * final,
        "speaker_id": None if index % 4 else "ada",
        "name": "UNKNOWN" if index % 4 else "Ada",
        "confidence": 0.9,
        "score": 0.8 + revision / 100,
        "candidates": [{"speaker_id": "ada", "name": "Ada", "score": 0.8}],
        "model_id": "ge2e-test",
        "is_final": final,
        "revision": revision,
        "source_capture_ts_ms": 1_700_000_000_000 + index,
        "emitted_at_ms": 1_700_000_000_500 + index,
    }


def publish_segments(settings) -> dict[tuple[str, int], dict]:
    """Provisional then final updates of every segment, and a revision 1 for half of them.

    Returns what the table must equal: the last record of each (segment_id, revision)."""
    publisher = Publisher(settings)
    topic = settings.topic(SEGMENTS_IDENTIFIED)
    expected = {}
    for index in range(SEGMENTS_PER_STREAM):
        for stream in range(STREAMS):
            records = [segment(stream, index, 0, False), segment(stream, index, 0, True)]
            if index % 2:
                records.append(segment(stream, index, 1, True))
            for record in records:
                publisher.publish(topic, record["stream_id"], "IdentifiedSegment", record)
                expected[(record["segment_id"], record["revision"])] = record
        publisher.poll()
    publisher.flush()
    return expected


def start_sink(settings, database_url: str, log_path) -> subprocess.Popen:
    # Batches of 5: hundreds of small transactions, so a kill lands between them.
    return start_worker(settings, "sink", log_path, DATABASE_URL=database_url, SPEAKERFLOW_SINK_BATCH="5")


def table(database_url: str) -> dict[tuple[str, int], tuple]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT segment_id, revision, stream_id, end_s, is_final, score, name FROM segments"
        )
        return {(r[0], r[1]): r for r in rows}


def assert_rows_match(rows: dict[tuple[str, int], tuple], expected: dict[tuple[str, int], dict]) -> None:
    """Every stored row holds the values of the last record published for its (segment id, revision)."""
    for key, record in expected.items():
        assert rows[key][2:] == (
            record["stream_id"],
            record["end_s"],
            record["is_final"],
            record["score"],
            record["name"],
        ), key


def test_kill_9_mid_stream_then_restart_leaves_table_equal_to_topic(settings, database_url, tmp_path):
    from speakerflow.streams.topology import create_topics

    create_topics(settings)
    migrate(database_url)
    expected = publish_segments(settings)
    log = tmp_path / "sink.log"
    sink = start_sink(settings, database_url, log)
    try:
        assert wait_until(lambda: len(table(database_url)) > 0, 90, poll_s=0.02), log.read_text()[-2000:]
        sink.send_signal(signal.SIGKILL)  # mid-stream: some batches written, later ones not
        sink.wait(timeout=10)
        written_before_restart = len(table(database_url))
        sink = start_sink(settings, database_url, log)
        assert wait_until(lambda: len(table(database_url)) == len(expected), 120), log.read_text()[-2000:]
        time.sleep(2)  # anything replayed after catching up must not add or change rows
    finally:
        sink.terminate()
        sink.wait(timeout=20)
    rows = table(database_url)
    assert 0 < written_before_restart < len(expected)  # the kill really happened mid-stream
    assert set(rows) == set(expected)
    assert_rows_match(rows, expected)
    with psycopg.connect(database_url) as conn:
        current = conn.execute("SELECT count(*) FROM current_segments WHERE stream_id = 's0'").fetchone()[0]
    assert current == SEGMENTS_PER_STREAM // 2  # revision 1 replaces the live labelling of the stream


def test_sink_waits_out_a_database_outage(settings, database_url, pg_server, tmp_path):
    """The database refuses connections for a while: the sink retries, commits nothing, loses nothing."""
    from speakerflow.streams.topology import create_topics

    create_topics(settings)
    migrate(database_url)
    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
    log = tmp_path / "sink.log"
    sink = start_sink(settings, database_url, log)
    try:
        expected = publish_segments(settings)
        # The outage lasts until the sink has met it (a child process takes seconds to start here).
        assert wait_until(lambda: "database unavailable" in log.read_text(), 120), log.read_text()[-2000:]
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        assert wait_until(lambda: len(table(database_url)) == len(expected), 120), log.read_text()[-2000:]
    finally:
        sink.terminate()
        sink.wait(timeout=20)
    assert "database unavailable" in log.read_text()
    assert set(table(database_url)) == set(expected)


def test_deleting_a_speaker_erases_voiceprint_embeddings_and_identity(settings, database_url):
    from speakerflow.streams.metrics import Metrics
    from speakerflow.streams.stages.sink import PostgresSink
    from speakerflow.streams.topology import create_topics

    create_topics(settings)
    migrate(database_url)
    publisher = Publisher(settings)
    voiceprint = {
        "speaker_id": "ada",
        "name": "Ada",
        "model_id": "ge2e-test",
        "dim": 3,
        "embedding": [0.6, 0.8, 0.0],
        "sample_count": 1,
        "speech_seconds": 12.0,
        "updated_at_ms": 1_700_000_000_000,
        "metadata": {},
    }
    publisher.publish(settings.topic(GALLERY), "ada", "Voiceprint", voiceprint)
    for index in range(4):
        publisher.publish(
            settings.topic(SEGMENTS_IDENTIFIED), "s0", "IdentifiedSegment", segment(0, index, 0, True)
        )  # every 4th names Ada; all list her as a candidate
    publisher.flush()
    metrics = Metrics()
    sink = ProcessorThread(PostgresSink(settings, database_url, metrics), settings, publisher, metrics)
    sink.start()
    try:

        def count(sql: str) -> int:
            with psycopg.connect(database_url) as conn:
                return conn.execute(sql).fetchone()[0]

        assert wait_until(lambda: count("SELECT count(*) FROM segments") == 4, 60)
        assert count("SELECT count(*) FROM speaker_embeddings WHERE speaker_id = 'ada'") == 1
        publisher.publish(settings.topic(GALLERY), "ada", "Voiceprint", None)  # tombstone
        publisher.flush()
        assert wait_until(lambda: count("SELECT count(*) FROM speakers") == 0, 60)
    finally:
        sink.stopping.set()
        sink.join(timeout=20)
    assert count("SELECT count(*) FROM speaker_embeddings") == 0
    assert count("SELECT count(*) FROM segments WHERE speaker_id = 'ada' OR name = 'Ada'") == 0
    assert count("SELECT count(*) FROM segments WHERE candidates::text LIKE '%ada%'") == 0
    assert count("SELECT count(*) FROM segments") == 4  # the time ranges stay
