"""kill -9 a worker in the middle of several streams: a second worker takes over, and the segments in
PostgreSQL equal those of an undisturbed run. Real worker processes, the embedded broker, PostgreSQL.

Two runs of the same four simulated calls, each with topics, consumer groups and a database of its own:

- undisturbed: one worker (diarize, match, sink) gets every call whole;
- crash: worker 1 gets the first half of three calls. Once it has committed them, each has rows in
  PostgreSQL and a diarizer snapshot, a little more of each is published (less than STATE_EVERY_S of
  audio since its snapshot, so worker 1 applies and commits it but snapshots none of it), and a fourth
  call begins (2 s). Then worker 1 is killed with SIGKILL: no rebalance, no hand-over snapshot, the
  match and sink stages caught wherever they were. The rest of every call is published and worker 2
  (same consumer groups) takes over: it must restore each call from its snapshot and replay the audio
  the snapshot lacks.

Publishing in parts makes "the kill lands mid-stream, after audio no snapshot holds" deterministic:
no call can end before the kill (no end-of-stream chunk exists yet), and the test reads the state topic
to know what the snapshots hold.

Compared, after every stage has committed all of its input: every row of `segments`, live (revision 0)
and final (revision 1): the same (segment id, revision) keys, so nothing is lost and nothing the killed
worker emitted is left over; the same `is_final` and label; start/end equal within TIME_TOLERANCE_S;
and for the final revision (the `current_segments` in force) the same speaker id and name. Each run's
final revision is also checked complete on its own: the call is DONE, and its rows are exactly the
ENDED event's count, numbered 0..n-1 (no gap, no duplicate).

Tolerance. Times: 1 ms, the resolution of the emitted times (rounded to 3 decimals). A restored
diarizer continues exactly (it stores and clusters embeddings at float16, and its snapshot holds the
VAD state), the windows are the same audio, and boundaries are window or VAD-region edges, so a
different decision would move a boundary by at least a quarter of a second; the only noise, embedding
a window in another batch, does not survive float16. Measured: equal to the millisecond, labels and
names identical. Live names are not compared: the matcher's per-call evidence is in memory only, so
after a takeover the live identities of new segments are decided on the evidence the new worker has
seen; the final revision's names depend only on the final revision's segments (the matcher counts only
a call's newest labelling), so those must be equal.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psycopg
import pytest
from processes import start_worker, stop_process, wait_until

from speakerflow.evaluation.corpus import load_audio, load_manifest
from speakerflow.evaluation.simulation import SimulationConfig, simulate
from speakerflow.gallery.voiceprint import Voiceprint
from speakerflow.streams.client import follow, publish_voiceprints
from speakerflow.streams.database import scratch_database
from speakerflow.streams.records import pcm_chunk
from speakerflow.streams.runtime import Publisher, TopicReader
from speakerflow.streams.settings import Settings
from speakerflow.streams.stages.diarize import DiarizerStateStore
from speakerflow.streams.topology import AUDIO, STREAMS, create_topics, stage

pytestmark = pytest.mark.integration

SAMPLE_RATE = 16000
CHUNK_S = 0.5
STATE_EVERY_S = 4.0
# 47 s / 3 speakers, 51 s / 3 speakers, 37 s / 2 speakers, and the young call: 28 s / 2 speakers.
SEEDS = (12, 17, 36, 23)
YOUNG_CHUNKS = 4  # the young call has only begun (2 s, less than STATE_EVERY_S) when worker 1 dies
ORIGIN_MS = 1_800_000_000_000  # capture time of every call's first sample: identical records in both runs
TIME_TOLERANCE_S = 0.001  # seconds; see the module docstring


@dataclass
class Call:
    stream_id: str
    chunks: list[dict]  # AudioChunk records, seq 0..n-1, the last one with end_of_stream
    speakers: list[str]


def _calls(shared_data: Path) -> tuple[list[Call], dict[str, list]]:
    """The four calls, and the utterances each speaker spoke in them (for enrollment)."""
    manifest = load_manifest(shared_data)
    calls, sources = [], {}
    for index, seed in enumerate(SEEDS):
        config = SimulationConfig(speakers=(2, 3), minutes=0.8, file_minutes=0.8, split="tune", seed=seed)
        conversation = next(simulate(manifest, config))
        stream_id = f"call-{index}"
        size = int(CHUNK_S * SAMPLE_RATE)
        audio = conversation.audio
        chunks = [
            pcm_chunk(
                stream_id,
                seq,
                ORIGIN_MS + seq * int(CHUNK_S * 1000),
                audio[start : start + size],
                start + size >= len(audio),
            )
            for seq, start in enumerate(range(0, len(audio), size))
        ]
        calls.append(Call(stream_id, chunks, list(conversation.speakers)))
        for utterance in conversation.sources:
            sources.setdefault(utterance.speaker, []).append(utterance)
    return calls, sources


def _voiceprints(ge2e, calls: list[Call], sources: dict[str, list]) -> list[Voiceprint]:
    """Every speaker but the last of each call is enrolled (the last stays a stranger, unless enrolled
    for another call), so the comparison covers names as well as UNKNOWN."""
    enrolled = {s for call in calls for s in call.speakers[:-1]}
    out = []
    for speaker in sorted(enrolled):
        audio = np.concatenate([load_audio(u) for u in sources[speaker]])
        embedding = ge2e.embed([audio])[0].astype(np.float32)
        out.append(
            Voiceprint(speaker, f"name-{speaker}", ge2e.model_id, embedding, 1, len(audio) / SAMPLE_RATE, 1)
        )
    return out


def _publish(settings: Settings, calls: list[Call], start: dict[str, int], stop: dict[str, int]) -> None:
    """Chunks [start, stop) of every call, interleaved as concurrent calls arrive."""
    publisher = Publisher(settings)
    topic = settings.topic(AUDIO)
    parts = [call.chunks[start[call.stream_id] : stop[call.stream_id]] for call in calls]
    for i in range(max(len(p) for p in parts)):
        for call, chunks in zip(calls, parts, strict=True):
            if i < len(chunks):
                publisher.publish(topic, call.stream_id, "AudioChunk", chunks[i])
        publisher.poll()
    publisher.flush()


class Workers:
    """Worker processes this test started; each is stopped (or killed) in `close`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, settings: Settings, database_url: str, name: str) -> tuple[subprocess.Popen, Path]:
        log_path = self.tmp_path / f"{name}.log"
        proc = start_worker(
            settings,
            "diarize,match,sink",
            log_path,
            DATABASE_URL=database_url,
            SPEAKERFLOW_STATE_EVERY_S=str(STATE_EVERY_S),
            # Idle ending is wall-clock driven: under CPU contention it could end a call early in one
            # run and not the other. Every call here ends with its end-of-stream chunk.
            SPEAKERFLOW_IDLE_TIMEOUT_S="600",
        )
        self.procs.append((proc, log_path))
        return proc, log_path

    def close(self) -> None:
        for proc, _ in self.procs:
            stop_process(proc)


def _ended(settings: Settings, stream_ids: list[str], timeout_s: float) -> dict[str, dict]:
    """The ENDED event of every call (it says which revision is final and how many segments it has)."""
    ended: dict[str, dict] = {}
    for event in follow(
        settings,
        settings.topic(STREAMS),
        "StreamEvent",
        timeout_s=timeout_s,
        stop=lambda: len(ended) == len(stream_ids),
    ):
        if event["event"] == "ENDED":
            ended[event["stream_id"]] = event
        if len(ended) == len(stream_ids):
            break
    return ended


def _drained(settings: Settings, roles: tuple[str, ...] = ("diarize", "match", "sink")) -> bool:
    """Every stage has committed all of its input: nothing is in flight any more. Checked in pipeline
    order, and a stage flushes its outputs before committing, so a later stage's end offsets already
    include everything the earlier one will ever send."""
    for role in roles:
        topics = stage(role).consumes
        with TopicReader(settings, settings.group(role)) as reader:  # reads offsets, never joins
            partitions = [(settings.topic(t), p) for t in topics for p in range(settings.partitions)]
            for tp in reader.committed(partitions):
                _, high = reader.watermarks(tp.topic, tp.partition)
                if high > 0 and tp.offset < high:
                    return False
    return True


def _query(database_url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


def _rows_per_stream(database_url: str) -> dict[str, int]:
    return dict(_query(database_url, "SELECT stream_id, count(*) FROM segments GROUP BY stream_id"))


def _snapshot(settings: Settings, stream_id: str) -> dict | None:
    """The stream's latest diarizer snapshot (core record) on the state topic, or None."""
    store = DiarizerStateStore(settings)  # a fresh store reads the state topic again
    for partition in range(settings.partitions):
        saved = store.load(stream_id, partition)
        if saved is not None:
            return saved[0]
    return None


FINAL = "final"  # a row of the labelling in force (the final revision), as opposed to "live"


def _labelling(database_url: str, ended: dict[str, dict]) -> dict[tuple[str, int], tuple]:
    """Every segment row, (segment id, revision) -> ("final" or "live", is_final, label, start, end,
    speaker id, name), after checking that each call is complete: DONE, its final revision in force,
    exactly the segments its ENDED event announced, and no provisional row left behind."""
    for stream_id, event in ended.items():
        status, final_revision = _query(
            database_url, "SELECT status, final_revision FROM streams WHERE stream_id = %s", (stream_id,)
        )[0]
        assert (status, final_revision) == ("DONE", event["revision"]), stream_id
        current = _query(
            database_url,
            "SELECT segment_id, revision, is_final FROM current_segments WHERE stream_id = %s",
            (stream_id,),
        )
        assert all(revision == event["revision"] and final for _, revision, final in current), stream_id
        # No duplicate and no gap: the final revision's turns are numbered 0..count-1, each once.
        expected_ids = [f"{stream_id}:r{event['revision']}:{n:05d}" for n in range(event["segments"])]
        assert sorted(r[0] for r in current) == expected_ids, (stream_id, current, event["segments"])
    rows = _query(
        database_url,
        "SELECT s.segment_id, s.revision, s.revision = st.final_revision, s.is_final, s.label, s.start_s, "
        "s.end_s, s.speaker_id, s.name FROM segments s JOIN streams st USING (stream_id)",
    )
    assert all(r[3] for r in rows), [r for r in rows if not r[3]]  # every live turn was finalised
    return {(r[0], r[1]): (FINAL if r[2] else "live", *r[3:]) for r in rows}


def _finish(settings: Settings, calls: list[Call], timeout_s: float) -> dict[str, dict]:
    ended = _ended(settings, [c.stream_id for c in calls], timeout_s)
    assert sorted(ended) == sorted(c.stream_id for c in calls), ended
    assert all(e["revision"] == 1 and e["segments"] > 0 for e in ended.values()), ended
    assert wait_until(lambda: _drained(settings), 60, poll_s=0.5), "stages did not catch up"
    return ended


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


@pytest.mark.timeout(300)
def test_kill_9_mid_streams_then_takeover_matches_undisturbed_run(
    settings, pg_server, ge2e, shared_data, tmp_path
) -> None:
    # Recovery, not accuracy, is under test: the worker processes run the light model, like the voiceprints.
    settings = replace(settings, embedder=ge2e.name)
    calls, sources = _calls(shared_data)
    voiceprints = _voiceprints(ge2e, calls, sources)
    undisturbed = replace(
        settings, topic_prefix=f"{settings.topic_prefix}a", group_prefix=f"{settings.group_prefix}a"
    )
    crashed = replace(
        settings, topic_prefix=f"{settings.topic_prefix}b", group_prefix=f"{settings.group_prefix}b"
    )
    for run in (undisturbed, crashed):
        create_topics(run)
        publish_voiceprints(Publisher(run), voiceprints)  # before the workers start: a fixed gallery
    ids = [c.stream_id for c in calls]
    workers = Workers(tmp_path)
    with (
        scratch_database(pg_server, "speakerflow_crash") as db_a,
        scratch_database(pg_server, "speakerflow_crash") as db_b,
    ):
        try:
            # -- undisturbed run ------------------------------------------------------------------
            worker, log_a = workers.start(undisturbed, db_a, "undisturbed")
            _publish(undisturbed, calls, {s: 0 for s in ids}, {c.stream_id: len(c.chunks) for c in calls})
            ended_a = _finish(undisturbed, calls, 120)
            stop_process(worker)
            assert not any(_snapshot(undisturbed, s) for s in ids)  # an ended stream leaves no state

            # -- crash run: worker 1 gets the first half of every call but the young one --------
            worker_1, log_1 = workers.start(crashed, db_b, "worker-1")
            old, young = ids[:-1], ids[-1]
            sent = {c.stream_id: len(c.chunks) // 2 for c in calls} | {young: 0}
            _publish(crashed, calls, {s: 0 for s in ids}, sent)
            progressed = wait_until(
                lambda: (
                    _drained(crashed, ("diarize",))
                    and all(_rows_per_stream(db_b).get(s, 0) > 0 for s in old)
                    and all(_snapshot(crashed, s) for s in old)
                ),
                120,
                poll_s=0.5,
            )
            assert progressed, _log_tail(log_1)
            # ...then a little more of every call: worker 1 processes and commits it but takes no
            # snapshot of it (it snapshots every STATE_EVERY_S of audio), so the takeover must replay
            # it. The young call begins now: it is 2 s old when worker 1 dies.
            more = {young: YOUNG_CHUNKS}
            for s in old:
                lag = sent[s] - _snapshot(crashed, s)["next_seq"]  # chunks applied since the snapshot
                more[s] = sent[s] + max(int(STATE_EVERY_S / CHUNK_S) - 2 - lag, 0)
            _publish(crashed, calls, sent, more)
            sent = more
            assert wait_until(lambda: _drained(crashed, ("diarize",)), 60, poll_s=0.5), _log_tail(log_1)
            for s in old:
                assert _snapshot(crashed, s)["next_seq"] < sent[s], s
            worker_1.send_signal(signal.SIGKILL)  # no rebalance, no hand-over snapshot
            worker_1.wait(timeout=10)
            before = _query(db_b, "SELECT stream_id, status FROM streams")
            assert {s for s, _ in before} >= set(old), before
            assert all(status == "RUNNING" for _, status in before), before  # mid-stream: none ended

            # -- worker 2 takes over the same consumer groups --------------------------------------
            _publish(crashed, calls, sent, {c.stream_id: len(c.chunks) for c in calls})
            worker_2, log_2 = workers.start(crashed, db_b, "worker-2")
            ended_b = _finish(crashed, calls, 120)
            stop_process(worker_2)
        finally:
            workers.close()

        taken_over = log_2.read_text(errors="replace")
        for s in ids:  # every call was restored from its snapshot, none started over mid-way
            assert f"stream {s} restored at" in taken_over, _log_tail(log_2)
        assert "earlier chunks missing" not in taken_over, _log_tail(log_2)
        assert "gap before seq" not in taken_over, _log_tail(log_2)
        assert "Traceback" not in taken_over + log_a.read_text(errors="replace")

        expected, got = _labelling(db_a, ended_a), _labelling(db_b, ended_b)

    identified = [row for row in expected.values() if row[0] == FINAL and row[5] is not None]
    assert identified, "no segment was identified: the comparison would not cover names"
    # The same segments, live and final: nothing lost, nothing the crashed worker emitted left over.
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
    for key, (kind, is_final, label, start, end, speaker_id, name) in expected.items():
        got_kind, got_final, got_label, got_start, got_end, got_speaker, got_name = got[key]
        assert (got_kind, got_final, got_label) == (kind, is_final, label), key
        assert got_start == pytest.approx(start, abs=TIME_TOLERANCE_S), key
        assert got_end == pytest.approx(end, abs=TIME_TOLERANCE_S), key
        if kind == FINAL:  # identities of the labelling in force (see the module docstring)
            assert (got_speaker, got_name) == (speaker_id, name), key
