"""The CLI on Kafka: it finds the embedded broker `speakerflow broker` runs, says in one line when none
runs, and `play` / `tail` print for the person watching."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from processes import stop_process, wait_until

from speakerflow.streams.broker import (
    STATE_FILE,
    accepts_connections,
    free_port,
    running_broker,
    write_broker_state,
)
from speakerflow.streams.settings import REPO_ROOT, Settings


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "SPEAKERFLOW_"))}
    return env | {"SPEAKERFLOW_DATA_DIR": str(data_dir)} | extra


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speakerflow.streams.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_broker_fails_fast_with_one_line(tmp_path: Path) -> None:
    # A state file left by a broker that was killed must not be trusted either.
    write_broker_state(tmp_path, f"127.0.0.1:{free_port()}", pid=2**22 + 1)
    envs = [_env(tmp_path, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")]
    if not accepts_connections(Settings().bootstrap_servers):  # nothing on the default address either
        envs.append(_env(tmp_path))
    for env in envs:
        started = time.monotonic()
        result = _cli("speakers", "list", env=env)
        elapsed = time.monotonic() - started
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "speakerflow broker" in lines[0]
        assert elapsed < 5.0  # the contract: fail at once instead of librdkafka's retries


def test_commands_find_the_running_broker(tmp_path: Path) -> None:
    broker = subprocess.Popen(
        [sys.executable, "-m", "speakerflow.streams.cli", "broker"],
        env=_env(tmp_path),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_until(lambda: running_broker(tmp_path) is not None, 60)
        found = Settings.for_cli(_env(tmp_path))
        assert found.bootstrap_servers == running_broker(tmp_path)
        assert found.embedded
        result = _cli("topics", "create", env=_env(tmp_path, SPEAKERFLOW_TOPIC_PREFIX="found"))
        assert result.returncode == 0, result.stderr
        assert "created:" in result.stdout
    finally:
        assert stop_process(broker) == 0
    assert not (tmp_path / STATE_FILE).exists()
    assert running_broker(tmp_path) is None


def test_an_explicit_bootstrap_wins_over_the_state_file(tmp_path: Path) -> None:
    write_broker_state(tmp_path, "127.0.0.1:1", os.getpid())
    settings = Settings.for_cli(_env(tmp_path, KAFKA_BOOTSTRAP_SERVERS="kafka:9092"))
    assert settings.bootstrap_servers == "kafka:9092"
    assert not settings.embedded


def test_play_shows_progress_on_stderr_while_it_plays_in_real_time(
    settings: Settings, tmp_path: Path
) -> None:
    import numpy as np
    import soundfile as sf

    from speakerflow.streams.topology import create_topics

    create_topics(settings)
    audio = tmp_path / "tone.wav"
    sf.write(audio, 0.1 * np.sin(np.arange(24000) * 0.05), 16000)  # 1.5 s
    result = subprocess.run(
        [sys.executable, "-m", "speakerflow.streams.cli", "play", str(audio), "--stream-id", "bar"],
        env=settings.child_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr and "1.5/1.5" in result.stderr
    assert result.stdout.strip() == "sent 3 chunks (1.5 s) as stream bar"


def test_segments_are_coloured_only_when_asked() -> None:
    from speakerflow.streams.demo import format_segment

    seg = {
        "stream_id": "s",
        "label": "S01",
        "name": "Ada",
        "speaker_id": "ada",
        "is_final": True,
        "revision": 0,
        "start_s": 0.0,
        "end_s": 1.0,
        "confidence": 0.9,
        "score": 0.8,
    }
    assert "\033" not in format_segment(seg)  # `tail > file` writes plain text
    assert "\033" in format_segment(seg, colour=True)
