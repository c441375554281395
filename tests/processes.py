"""Child `speakerflow worker` processes for the fault tests, the gateway served in a thread, and waiting
on conditions."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from speakerflow.streams.api import create_app
from speakerflow.streams.broker import free_port
from speakerflow.streams.settings import REPO_ROOT, Settings


@contextlib.contextmanager
def serving_gateway(settings: Settings, database_url: str) -> Iterator[int]:
    """The HTTP gateway on a free loopback port (yielded) in a thread, stopped on exit."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, database_url), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the gateway did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def start_worker(settings: Settings, roles: str, log_path: Path, **env: str) -> subprocess.Popen:
    """`speakerflow worker --roles ROLES` in a child process sharing `settings`, plus `env`; its
    output is appended to `log_path`."""
    command = [sys.executable, "-m", "speakerflow.streams.cli", "worker", "--roles", roles]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command, env=settings.child_env(**env), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
        )


def stop_process(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL if it has not exited within 30 s; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def wait_until(predicate, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False
