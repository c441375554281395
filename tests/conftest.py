"""Shared fixtures: real speech data, the embedded broker, a throw-away PostgreSQL database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from speakerflow.streams.broker import EmbeddedBroker, start_embedded_broker
from speakerflow.streams.database import scratch_database
from speakerflow.streams.settings import REPO_ROOT, Settings

SHARED_DATA = Path(os.environ.get("SPEAKERFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# A server to create test databases on; without one, an embedded PostgreSQL is started.
TEST_SERVER_URL = os.environ.get(
    "SPEAKERFLOW_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.fail(f"speech data not found at {SHARED_DATA}; set SPEAKERFLOW_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    b = start_embedded_broker(log_path=tmp_path_factory.mktemp("broker") / "broker.log")
    yield b
    b.stop()


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings on the embedded broker with topics and groups of their own, so tests never interfere."""
    # SPEAKERFLOW_DIARIZER picks the diarize stage's mode for the suite's workers: light unless set, so
    # that the many broker tests stay quick on 2 cores; the segmentation mode (the product default) has
    # its own tests (test_overlap_diarization) and runs in the crash/restore test and `make demo`
    diarizer = os.environ.get("SPEAKERFLOW_DIARIZER", "light")
    return broker.run_settings(tmp_path, shared_data_dir=str(SHARED_DATA), diarizer=diarizer)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server we may create databases on."""
    try:
        with psycopg.connect(TEST_SERVER_URL, connect_timeout=3):
            pass
        yield TEST_SERVER_URL
        return
    except psycopg.OperationalError:
        pass
    from speakerflow.streams.database import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    yield server.url
    server.stop()


@pytest.fixture
def database_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database, dropped after the test."""
    with scratch_database(pg_server, "speakerflow_test", migrated=False) as url:
        yield url


@pytest.fixture(scope="session")
def ge2e():
    from speakerflow.processors.embedding import Ge2eEmbedder

    return Ge2eEmbedder("cpu")


@pytest.fixture(scope="session")
def campplus():
    from speakerflow.processors.embedding.campplus import CampplusEmbedder

    return CampplusEmbedder("cpu")
