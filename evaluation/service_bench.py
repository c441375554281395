"""`speakerflow bench sink` and `speakerflow bench identify`: figures for the database and the gateway.

- sink: a backlog of identified-segment updates (provisional then final, as the matcher emits them) is
  put on the segments topic, then the PostgreSQL sink drains it; segments/s is measured between the
  first and the last row landing (the consumer group join is reported apart, it is a one-off).
- identify: a worker process (all stages, sink included) and the REST gateway process run as in
  production; speakers are enrolled over HTTP, then `POST /identify` with `sync=true` uploads a
  conversation of the requested length and waits for its final labelling; the latency per request is
  the client's wall clock from the first byte sent to the answer.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import psycopg

from speakerflow.streams import database
from speakerflow.streams.broker import broker_for_run, free_port
from speakerflow.streams.database import resolve_database_url
from speakerflow.streams.metrics import Metrics
from speakerflow.streams.runtime import ProcessorThread, Publisher, now_ms
from speakerflow.streams.settings import REPO_ROOT, Settings
from speakerflow.streams.topology import SEGMENTS_IDENTIFIED, create_topics


@contextmanager
def scratch_database(settings: Settings) -> Iterator[str]:
    """A migrated database of its own on the configured (or embedded) server, dropped afterwards."""
    server_url, embedded = resolve_database_url(settings.database_url, settings.data_dir)
    try:
        with database.scratch_database(server_url, "speakerflow_bench") as url:
            yield url
    finally:
        if embedded:
            embedded.stop()


# --- sink ------------------------------------------------------------------------------------------
@dataclass
class SinkResult:
    batch_size: int
    segments: int
    records: int
    join_s: float  # sink start -> first row in the table (group join, first fetch)
    drain_s: float  # first row -> last row
    segments_per_s: float
    records_per_s: float


def segment_updates(streams: int, per_stream: int) -> Iterator[dict]:
    """A provisional and a final update of every segment, interleaved across streams like live traffic."""
    base = now_ms()
    for index in range(per_stream):
        for stream in range(streams):
            for final in (False, True):
                yield {
                    "segment_id": f"bench-{stream:04d}:{index:06d}",
                    "stream_id": f"bench-{stream:04d}",
                    "label": f"SPEAKER_0{index % 4}",
                    "start_s": 2.0 * index,
                    "end_s": 2.0 * index + (1.9 if final else 1.2),
                    "speaker_id": None if index % 3 else f"spk-{index % 40}",
                    "name": "UNKNOWN" if index % 3 else f"Speaker {index % 40}",
                    "confidence": 0.91,
                    "score": 0.82,
                    "candidates": [
                        {"speaker_id": f"spk-{(index + k) % 40}", "name": "x", "score": 0.8 - k / 10}
                        for k in range(3)
                    ],
                    "model_id": "bench",
                    "is_final": final,
                    "revision": 0,
                    "source_capture_ts_ms": base + index * 2000,
                    "emitted_at_ms": base + index * 2000 + 500,
                }


def run_sink_bench(
    settings: Settings, segments: int, batch_sizes: list[int], log_dir: Path
) -> list[SinkResult]:
    from tqdm import tqdm

    streams = 50
    per_stream = max(segments // streams, 1)
    results = []
    with broker_for_run(settings, log_dir) as settings:
        create_topics(settings)
        publisher = Publisher(settings)
        topic = settings.topic(SEGMENTS_IDENTIFIED)
        records = 0
        for record in tqdm(
            segment_updates(streams, per_stream), total=2 * streams * per_stream, desc="backlog", unit="rec"
        ):
            publisher.publish(topic, record["stream_id"], "IdentifiedSegment", record)
            records += 1
            if records % 1000 == 0:
                publisher.poll()
        publisher.flush()
        expected = streams * per_stream
        for batch in batch_sizes:
            with scratch_database(settings) as url:
                run = replace(
                    settings, group_prefix=f"{settings.group_prefix}-b{batch}", sink_batch_size=batch
                )
                results.append(_drain(run, url, publisher, expected, records))
                r = results[-1]
                print(
                    f"sink batch {batch}: {r.segments_per_s:,.0f} segments/s "
                    f"({r.records_per_s:,.0f} updates/s), group join {r.join_s:.1f} s",
                    flush=True,
                )
    return results


def _drain(settings: Settings, url: str, publisher: Publisher, expected: int, records: int) -> SinkResult:
    from speakerflow.streams.stages.sink import PostgresSink

    metrics = Metrics()
    sink = ProcessorThread(PostgresSink(settings, url, metrics), settings, publisher, metrics)
    started = time.monotonic()
    sink.start()
    first_at = done_at = None
    first_count = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while done_at is None:
            if not sink.is_alive():
                raise RuntimeError(f"the sink stopped: {sink.failure!r}")
            count = conn.execute("SELECT count(*) FROM segments WHERE is_final").fetchone()[0]
            now = time.monotonic()
            if count and first_at is None:
                first_at, first_count = now, count
            if count >= expected:
                done_at = now
            elif now - started > 600:
                raise TimeoutError(f"the sink wrote {count} of {expected} segments in 600 s")
            time.sleep(0.05)
    sink.stopping.set()
    sink.join(timeout=30)
    drain = max(done_at - first_at, 1e-6)
    # Rows counted at the first poll were written before the clock started: leave them out.
    per_s = (expected - first_count) / drain if expected > first_count else float("nan")
    return SinkResult(
        settings.sink_batch_size,
        expected,
        records,
        round(first_at - started, 2),
        round(drain, 2),
        round(per_s, 1),
        round(per_s * records / expected, 1),
    )


# --- POST /identify ----------------------------------------------------------------------------------
@dataclass
class IdentifyResult:
    audio_s: float
    runs: int
    latency_p50_s: float
    latency_p95_s: float
    latency_max_s: float
    x_real_time: float  # audio seconds per second of latency, at the median
    segments: int
    named_share: float  # share of final-segment time given a name (the conversation has one stranger)


def conversation(data_dir: Path, seconds: float, seed: int) -> tuple[np.ndarray, dict[str, list[Path]]]:
    """A conversation of `seconds` (three enrolled speakers and a stranger) and the enrollment files."""
    from speakerflow.evaluation.scenario import librispeech_scenario

    scenario = librispeech_scenario(data_dir, turns=max(4, int(seconds / 6)), seed=seed)
    repeats = int(np.ceil(seconds * 16000 / len(scenario.audio)))
    return np.tile(scenario.audio, repeats)[: int(seconds * 16000)], scenario.enrollments


def run_identify_bench(settings: Settings, seconds: float, runs: int, log_dir: Path) -> IdentifyResult:
    import httpx
    import soundfile as sf
    from tqdm import tqdm

    data_dir = Path(settings.shared_data_dir)
    with broker_for_run(settings, log_dir) as settings, scratch_database(settings) as url:
        create_topics(settings)
        port = free_port()
        env = settings.child_env(DATABASE_URL=url, SPEAKERFLOW_API_MAX_UPLOAD_MB="64")
        processes = [
            _spawn(["worker"], env, log_dir / "worker.log", "worker ready"),
            _spawn(["api", "--port", str(port)], env, log_dir / "api.log", "speakerflow API on"),
        ]
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
            _wait_healthy(client)
            audio, enrollments = conversation(data_dir, seconds, seed=7)
            for speaker_id, files in enrollments.items():
                uploads = [("files", (p.name, p.read_bytes(), "audio/flac")) for p in files]
                reply = client.post(
                    "/speakers/enroll", data={"name": speaker_id, "speaker_id": speaker_id}, files=uploads
                )
                if not reply.json()["success"]:
                    raise RuntimeError(f"enrollment of {speaker_id} failed: {reply.text}")
            buf = io.BytesIO()
            sf.write(buf, audio, 16000, format="FLAC")
            upload = buf.getvalue()
            client.post(
                "/identify", data={"sync": "true"}, files={"file": ("warm.flac", upload, "audio/flac")}
            )
            latencies, segments, named = [], 0, 0.0
            for _ in tqdm(range(runs), desc=f"POST /identify ({seconds:g} s)", unit="req"):
                started = time.perf_counter()
                reply = client.post(
                    "/identify", data={"sync": "true"}, files={"file": ("call.flac", upload, "audio/flac")}
                )
                latencies.append(time.perf_counter() - started)
                body = reply.json()
                if not body["success"]:
                    raise RuntimeError(f"identify failed: {reply.text}")
                segs = body["data"]["segments"]
                segments = len(segs)
                total = sum(s["end_s"] - s["start_s"] for s in segs) or 1.0
                named = sum(s["end_s"] - s["start_s"] for s in segs if s["name"] != "UNKNOWN") / total
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)
    lat = np.array(latencies)
    return IdentifyResult(
        seconds,
        runs,
        round(float(np.percentile(lat, 50)), 3),
        round(float(np.percentile(lat, 95)), 3),
        round(float(lat.max()), 3),
        round(seconds / float(np.percentile(lat, 50)), 1),
        segments,
        round(named, 3),
    )


def _spawn(args: list[str], env: dict[str, str], log_path: Path, ready_line: str) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [sys.executable, "-m", "speakerflow.streams.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while ready_line not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"`speakerflow {' '.join(args)}` did not start; see {log_path}")
        time.sleep(0.2)
    return process


def _wait_healthy(client, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.2)
    raise TimeoutError("the gateway did not answer /health")


def write_json(path: Path, results: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in results], indent=2))
