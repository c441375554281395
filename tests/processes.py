"""Child `speakerflow worker` processes for the fault tests, and waiting on conditions."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from speakerflow.streams.settings import REPO_ROOT, Settings


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
