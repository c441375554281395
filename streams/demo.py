"""`speakerflow demo`: the whole system on one machine, from enrollment to rows in PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import psycopg

from speakerflow.streams import queries
from speakerflow.streams.broker import start_embedded_broker
from speakerflow.streams.client import await_result, follow, play_audio, publish_enrollment
from speakerflow.streams.database import migrate, resolve_database_url
from speakerflow.streams.runtime import Publisher
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import ENROLLMENT_RESULTS, SEGMENTS_IDENTIFIED, create_topics

COLOURS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m"]
RESET = "\033[0m"


def format_segment(seg: dict, colour: bool = False) -> str:
    who = seg["name"] if seg["speaker_id"] else "UNKNOWN"
    tint = COLOURS[int(seg["label"][-2:]) % len(COLOURS)] if colour and seg["label"][-2:].isdigit() else ""
    state = "final" if seg["is_final"] else "live "
    rev = f" rev {seg['revision']}" if seg["revision"] else ""
    return (
        f"{seg['stream_id']} [{seg['start_s']:7.2f} – {seg['end_s']:7.2f} s] {seg['label']} → "
        f"{tint}{who:<12}{RESET if tint else ''} confidence {seg['confidence']:.2f} "
        f"(score {seg['score']:.2f}) {state}{rev}"
    )


class Turn(Protocol):
    speaker: str
    start_s: float
    end_s: float


def true_speaker(reference: list[Turn], start_s: float, end_s: float) -> str | None:
    """Who the reference says speaks most of [start_s, end_s], or None if nobody does."""
    overlap: dict[str, float] = {}
    for turn in reference:
        shared = min(end_s, turn.end_s) - max(start_s, turn.start_s)
        if shared > 0:
            overlap[turn.speaker] = overlap.get(turn.speaker, 0.0) + shared
    return max(overlap, key=overlap.__getitem__) if overlap else None


def check_mark(speaker_id: str | None, truth: str | None, enrolled: Collection[str]) -> str:
    """`✓`/`✗` and the truth: a segment is right when it names the enrolled speaker who really
    speaks there, or says UNKNOWN for a voice that is not enrolled."""
    if truth is None:
        return "? nobody speaks there in the reference"
    expected = truth if truth in enrolled else None
    note = "" if truth in enrolled else " (not enrolled: UNKNOWN is right)"
    return f"{'✓' if speaker_id == expected else '✗'} really {truth}{note}"


LEGEND = """\
  Each line: stream [start – end s] diarizer label → name or UNKNOWN, confidence that this name (or
  UNKNOWN) is right, cosine score of the closest voiceprint, then ✓/✗ against the reference above.
  `final` lines are the live labelling, emitted about SPEAKERFLOW_LATENCY_S behind the audio. When the
  stream ends, the whole call is diarized again (`rev 1`); that revision replaces the live lines, so
  PostgreSQL's current labelling (below, and `speakerflow db segments`) may count other segments.
"""


class Conversation(Protocol):
    """A call to play: who to enroll first, the audio and its reference turns (the CLI builds one from
    the shared corpus with speakerflow.evaluation.scenario)."""

    enrollments: dict[str, list[Path]]
    audio: np.ndarray
    reference: list[Turn]

    @property
    def duration_s(self) -> float: ...


def run_demo(settings: Settings, scenario: Conversation, realtime: bool = True) -> int:
    data = Path(settings.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    broker = start_embedded_broker(log_path=data / "broker.log")
    settings = replace(settings, bootstrap_servers=broker.bootstrap_servers, broker_profile="embedded")
    print(f"• embedded broker (Tansu) on {broker.bootstrap_servers}")
    url, embedded_pg = resolve_database_url(settings.database_url, settings.data_dir)
    print(f"• PostgreSQL: {'embedded, ' + url if embedded_pg else 'DATABASE_URL'}")
    worker = None
    try:
        create_topics(settings)
        migrate(url)
        worker = _start_worker(settings, url, data / "worker.log")
        print(f"• worker started (pid {worker.pid}, log {data / 'worker.log'})")
        _enroll(settings, scenario.enrollments)
        stream_id = f"demo-{int(time.time())}"
        pace = "real time" if realtime else "as fast as possible"
        print(
            f"• playing a {scenario.duration_s:.0f}-s conversation of 4 voices ({pace}) as stream "
            f"{stream_id}; {', '.join(scenario.enrollments)} are enrolled, {len(scenario.reference)} turns"
        )
        _print_reference(scenario)
        _play_and_show(settings, stream_id, scenario, realtime, worker)
        _summarise(url, stream_id, embedded_pg is not None, scenario)
        _print_next_steps()
        return 0
    finally:
        if worker is not None:
            worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(timeout=30)
            if worker.poll() is None:
                worker.kill()
        broker.stop()
        if embedded_pg:
            embedded_pg.stop()
        print("• stopped worker, broker" + (" and embedded PostgreSQL" if embedded_pg else ""))


def _print_next_steps() -> None:
    print(
        "\n• The same engine over HTTP and WebSocket: `speakerflow broker` (the other commands find it by\n"
        "  themselves), then `speakerflow worker` and `speakerflow api` (enroll, identify, diarize, verify,\n"
        "  jobs, live audio on WS /streams/{id}); open the web console at http://127.0.0.1:8000/ and the\n"
        "  OpenAPI docs at http://127.0.0.1:8000/docs.\n"
        "  `speakerflow tail` shows identified segments as they arrive."
    )


def _start_worker(settings: Settings, database_url: str, log_path: Path) -> subprocess.Popen:
    env = os.environ | {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SPEAKERFLOW_BROKER_PROFILE": "embedded",
        "DATABASE_URL": database_url,
    }
    log = open(log_path, "w")  # noqa: SIM115 - owned by the child process
    return subprocess.Popen(
        [sys.executable, "-m", "speakerflow.streams.cli", "worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _enroll(settings: Settings, enrollments: dict[str, list[Path]]) -> None:
    publisher = Publisher(settings)
    for speaker_id, files in enrollments.items():
        request_id = publish_enrollment(publisher, speaker_id, speaker_id, files)
        result = await_result(settings, ENROLLMENT_RESULTS, request_id, 180)
        verdict = "accepted" if result["accepted"] else f"REJECTED: {result['reason']}"
        print(
            f"• enrolled {speaker_id} from {len(files)} files: {verdict} "
            f"({result['speech_seconds']:.1f} s speech, quality {result['quality']:.2f})"
        )


def _print_reference(scenario: Conversation) -> None:
    print("• who really speaks when (the reference the results are checked against):")
    for turn in scenario.reference:
        note = "" if turn.speaker in scenario.enrollments else "  (not enrolled)"
        print(f"    [{turn.start_s:7.2f} – {turn.end_s:7.2f} s] {turn.speaker}{note}")
    print(f"\n{LEGEND}")


def _play_and_show(
    settings: Settings, stream_id: str, scenario: Conversation, realtime: bool, worker: subprocess.Popen
) -> None:
    audio = scenario.audio
    finished_at: list[float] = []

    def play() -> None:
        play_audio(Publisher(settings), stream_id, audio, realtime=realtime)
        finished_at.append(time.monotonic())

    def give_up() -> bool:  # the worker died, or the last segments are long overdue
        return worker.poll() is not None or bool(finished_at and time.monotonic() > finished_at[0] + 30)

    threading.Thread(target=play, daemon=True).start()
    last_end = len(audio) / 16000
    topic = settings.topic(SEGMENTS_IDENTIFIED)
    for seg in follow(settings, topic, "IdentifiedSegment", stop=give_up):
        if seg["stream_id"] != stream_id or not seg["is_final"]:
            continue
        truth = true_speaker(scenario.reference, seg["start_s"], seg["end_s"])
        mark = check_mark(seg["speaker_id"], truth, scenario.enrollments)
        print(f"{format_segment(seg, colour=sys.stdout.isatty())}  {mark}", flush=True)
        if seg["end_s"] >= last_end - 1.5:
            break
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log")


def _wait_for_final_labelling(url: str, stream_id: str, timeout_s: float = 30.0) -> None:
    """Until the sink has marked the stream DONE and its rows stopped changing (the end-of-stream
    revision arrives through the matcher, a moment after the stream's end event)."""
    deadline = time.monotonic() + timeout_s
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        with psycopg.connect(url) as conn:
            status = conn.execute(queries.STREAM_STATUS, (stream_id,)).fetchone()
            rows = conn.execute(queries.STREAM_ROWS_WRITTEN, (stream_id,)).fetchone()
        if rows != last:
            last, stable_since = rows, time.monotonic()
        if status and status[0] == "DONE" and time.monotonic() - stable_since > 1.5:
            return
        time.sleep(0.3)


def _summarise(url: str, stream_id: str, embedded: bool, scenario: Conversation) -> None:
    _wait_for_final_labelling(url, stream_id)
    with psycopg.connect(url) as conn:
        rows = conn.execute(queries.STREAM_SPEAKERS, (stream_id,)).fetchall()
        current = conn.execute(queries.CURRENT_SEGMENTS_OF_STREAM, (stream_id,)).fetchall()
    revision = max((r[4] for r in current), default=0)
    print(f"\n• PostgreSQL now holds the segments of {stream_id}; its current labelling (rev {revision}):")
    right = total = 0.0
    for start, end, label, speaker_id, _revision in current:
        truth = true_speaker(scenario.reference, start, end)
        mark = check_mark(speaker_id, truth, scenario.enrollments)
        right += (end - start) * mark.startswith("✓")
        total += end - start
        print(f"    [{start:7.2f} – {end:7.2f} s] {label} → {speaker_id or 'UNKNOWN':<12} {mark}")
    if total:
        print(f"  right: {right:.1f} of {total:.1f} s of segments ({100 * right / total:.0f} %)")
    print("  per speaker:")
    for name, count, seconds in rows:
        print(f"    {name:<12} {count:3d} segments {seconds:6.1f} s")
    print(f"  List them again: .venv/bin/speakerflow db segments --stream {stream_id}")
    if embedded:
        print("  (the embedded PostgreSQL stopped with the demo; that command starts it again)")
    else:
        print(f'  or: psql "$DATABASE_URL" -c "SELECT * FROM segments WHERE stream_id = \'{stream_id}\'"')
