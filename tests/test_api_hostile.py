"""The gateway under hostile input, over real HTTP on the embedded broker and PostgreSQL (no worker:
every case here is answered by the gateway itself): schemathesis over its OpenAPI document (no 5xx, no
undocumented status), the named regressions of issue 15 (NUL, overflow, 9,000 characters, takeover,
decompression bomb, record too large, database outage, malformed WebSocket frames, stream scoping) and
secrets masked in `speakerflow config` and the logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tracemalloc
from collections.abc import Iterator

import httpx
import numpy as np
import psycopg
import pytest
import soundfile as sf
import websockets
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from processes import serving_gateway

from speakerflow.processors.audio import AudioTooLong, decode_file
from speakerflow.streams import queries
from speakerflow.streams.broker import free_port
from speakerflow.streams.client import follow
from speakerflow.streams.database import scratch_database
from speakerflow.streams.topology import AUDIO, create_topics

pytestmark = pytest.mark.integration

ADMIN, CLIENT = "admin-key-123", "client-key-456"


@pytest.fixture(scope="module")
def gateway(broker, pg_server, tmp_path_factory) -> Iterator[dict]:
    settings = broker.run_settings(
        tmp_path_factory.mktemp("gw"),
        api_keys=f"alice:{CLIENT}",
        admin_keys=ADMIN,
        api_max_audio_s=600.0,
        api_timeout_s=5.0,
    )
    create_topics(settings)
    with scratch_database(pg_server, "speakerflow_gw", migrated=True) as url:
        with psycopg.connect(url) as conn:  # one enrolled speaker, the takeover target
            conn.execute(
                queries.UPSERT_SPEAKER,
                ("victim", "Victim", "m", 2, [1.0, 0.0], 1, 10.0, "{}", "2026-01-01T00:00:00Z"),
            )
        with serving_gateway(settings, url) as port:
            base = f"http://127.0.0.1:{port}"
            admin = httpx.Client(base_url=base, headers={"X-API-Key": ADMIN}, timeout=60)
            client = httpx.Client(base_url=base, headers={"X-API-Key": CLIENT}, timeout=60)
            yield {
                "admin": admin,
                "client": client,
                "port": port,
                "settings": settings,
                "url": url,
                "base": base,
            }
            admin.close()
            client.close()


def wav(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def flac_bomb(seconds: int) -> bytes:
    """`seconds` of silence as FLAC, written one second at a time (a few kB)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 8000, 1, format="FLAC") as f:
        for _ in range(seconds):
            f.write(np.zeros(8000, np.float32))
    return buf.getvalue()


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["data"] is None and body["error"]["message"]
    return body["error"]["code"]


def test_schemathesis_no_server_error_and_no_undocumented_status(gateway):
    import schemathesis
    from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance

    schema = schemathesis.openapi.from_url(f"{gateway['base']}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    statuses: list[int] = []
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for operation, mode in [(op, mode) for op in operations for mode in modes]:

        @hypothesis_settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy(mode))
        def call(case) -> None:
            response = case.call_and_validate(headers={"X-API-Key": ADMIN}, checks=checks, timeout=30)
            statuses.append(response.status_code)

        try:
            call()
        except Unsatisfiable:  # no invalid input exists for an operation without parameters
            assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    assert len(statuses) >= 10 * len(operations) and {404, 422} <= set(statuses), sorted(set(statuses))
    print("schemathesis:", len(statuses), "calls; statuses", sorted(set(statuses)))


def test_nul_overflow_and_bad_ids_are_422_in_the_envelope(gateway):
    admin = gateway["admin"]
    assert error(admin.get("/speakers/call%00evil"), 422) == "invalid_value"
    assert error(admin.get("/jobs/a%00b"), 422) == "invalid_value"
    assert error(admin.get("/speakers", params={"offset": str(10**23)}), 422) == "invalid_request"
    assert error(admin.get("/jobs", params={"offset": "1e23"}), 422) == "invalid_request"
    files = [("files", ("a.wav", wav(1), "audio/wav"))]
    for name, speaker_id in (("x" * 9000, ""), ("   ", ""), ("ok\x00", ""), ("ok", "a/b"), ("ok", "x" * 200)):
        response = admin.post("/speakers/enroll", data={"name": name, "speaker_id": speaker_id}, files=files)
        assert error(response, 422) == "invalid_value", (name[:10], speaker_id[:10])


def test_voiceprint_takeover_is_refused(gateway):
    files = [("files", ("a.wav", wav(1), "audio/wav"))]
    client, admin = gateway["client"], gateway["admin"]
    takeover = {"name": "mallory", "speaker_id": "victim"}
    assert error(client.post("/speakers/enroll", data=takeover, files=files), 409) == "already_enrolled"
    assert error(admin.post("/speakers/enroll", data=takeover, files=files), 409) == "already_enrolled"
    for mode in ("ADD", "REPLACE"):
        response = client.post("/speakers/enroll", data=takeover | {"mode": mode}, files=files)
        assert error(response, 403) == "forbidden"
    assert error(client.delete("/speakers/victim"), 403) == "forbidden"
    assert error(admin.post("/speakers/enroll", data={"name": "x", "mode": "ADD"}, files=files), 422)
    with psycopg.connect(gateway["url"]) as conn:
        assert conn.execute("SELECT name FROM speakers WHERE speaker_id = 'victim'").fetchone()[0] == "Victim"


def test_decompression_bomb_upload_is_413_with_bounded_memory(gateway):
    bomb = flac_bomb(1200)  # twenty minutes of silence, a few kB; the limit here is ten minutes
    assert len(bomb) < 200_000
    response = gateway["admin"].post("/diarize", files={"file": ("bomb.flac", bomb, "audio/flac")})
    assert error(response, 413) == "too_long"
    tracemalloc.start()
    with pytest.raises(AudioTooLong):
        decode_file(bomb, max_seconds=60)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 1024 * 1024  # the header was read; twenty minutes were never decoded


def test_upload_too_large_for_one_record_is_413(gateway):
    big = wav(540)  # 9 minutes: 17 MB of 16-kHz PCM, more than one 16-MB record
    response = gateway["admin"].post(
        "/verify", data={"speaker_id": "victim"}, files={"file": ("big.wav", big, "audio/wav")}
    )
    assert error(response, 413) == "too_large"


def test_database_outage_is_503_in_the_envelope(gateway):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=2"
    with serving_gateway(gateway["settings"], closed) as port:
        response = httpx.get(f"http://127.0.0.1:{port}/speakers", headers={"X-API-Key": ADMIN}, timeout=30)
        assert error(response, 503) == "database_unavailable"


async def _ws_close(uri: str, frames: list[str | bytes] = ()) -> tuple[int, str]:
    async with websockets.connect(uri) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass
    return ws.close_code, ws.close_reason


def test_malformed_websocket_frames_close_with_a_reason(gateway):
    port, settings = gateway["port"], gateway["settings"]
    base = f"ws://127.0.0.1:{port}/streams"
    twilio_start = json.dumps({"event": "start", "start": {"mediaFormat": {"sampleRate": "abc"}}})
    cases = {
        f"{base}/alice.arr?api_key={CLIENT}": ["[1, 2]"],
        f"{base}/alice.twilio?api_key={CLIENT}": [twilio_start],
        f"{base}/alice.rate-abc?api_key={CLIENT}&sample_rate=abc": [],
        f"{base}/alice.rate-zero?api_key={CLIENT}&sample_rate=0": [],
        f"{base}/alice.rate-huge?api_key={CLIENT}&sample_rate={10**30}": [],
    }
    for uri, frames in cases.items():
        code, reason = asyncio.run(_ws_close(uri, frames))
        assert code == 4422 and reason, (uri, code, reason)
    code, _ = asyncio.run(_ws_close(f"{base}/alice.big?api_key={CLIENT}", [b"\0" * (1024 * 1024 + 2)]))
    assert code == 1009
    # A client key may not open (watch or feed) another owner's stream; an admin key may.
    code, reason = asyncio.run(_ws_close(f"{base}/bob.call?api_key={CLIENT}"))
    assert code == 4403 and "alice." in reason
    code, _ = asyncio.run(_ws_close(f"{base}/bob.call?api_key={ADMIN}", [json.dumps({"event": "stop"})]))
    assert code == 1000
    # A refused sample rate sends nothing to the audio topic, not even an end-of-stream chunk.
    streams: set[str] = set()
    for chunk in follow(settings, settings.topic(AUDIO), "AudioChunk", timeout_s=60):
        streams.add(chunk["stream_id"])
        if chunk["stream_id"] == "bob.call":
            break
    assert "bob.call" in streams and not {s for s in streams if s.startswith("alice.rate")}


def test_jobs_and_history_are_scoped_to_the_key_owner(gateway):
    client, admin = gateway["client"], gateway["admin"]
    upload = {"file": ("a.wav", wav(1.0), "audio/wav")}
    mine = client.post("/identify", files=upload, data={"sync": "false"}).json()["data"]["job_id"]
    theirs = admin.post("/identify", files=upload, data={"sync": "false"}).json()["data"]["job_id"]
    assert mine.startswith("alice.identify-") and not theirs.startswith("alice.")
    with psycopg.connect(gateway["url"]) as conn:  # another owner's live stream, as the sink writes it
        conn.execute(
            "INSERT INTO streams (stream_id, kind, status) VALUES ('bob.call', 'live', 'DONE') "
            "ON CONFLICT DO NOTHING"
        )

    def ids(who: httpx.Client, path: str, key: str) -> set[str]:
        response = who.get(path, params={"limit": 500})
        assert response.status_code == 200, response.text
        return {row[key] for row in response.json()["data"]["items"]}

    assert mine in ids(client, "/jobs", "job_id") and theirs not in ids(client, "/jobs", "job_id")
    assert {mine, theirs} <= ids(admin, "/jobs", "job_id")
    assert ids(client, "/history", "stream_id") == {mine}
    assert {mine, theirs, "bob.call"} <= ids(admin, "/history", "stream_id")
    # Another owner's job or stream is a 404, exactly like one that does not exist.
    assert client.get(f"/jobs/{mine}").status_code == 200
    for path in (f"/jobs/{theirs}", "/history/bob.call", f"/segments/{theirs}/audio/x"):
        assert error(client.get(path), 404) == "not_found"
        assert admin.get(path).status_code in (200, 404)
    assert admin.get(f"/jobs/{theirs}").status_code == 200
    assert admin.get("/history/bob.call").status_code == 200


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """`main` and `setup_logging` replace the root handlers (bound to the captured stderr): put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_config_and_logs_mask_secrets(capsys, monkeypatch, _restore_logging):
    from speakerflow.streams.cli.main import main
    from speakerflow.streams.logs import setup_logging

    secrets = {"SPEAKERFLOW_API_KEYS": "alice:k-alice-1", "SPEAKERFLOW_ADMIN_KEYS": "k-admin-2"}
    secrets |= {"KAFKA_SASL_PASSWORD": "sasl-pw-3", "DATABASE_URL": "postgresql://u:db-pw-4@h/d"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    assert main(["config"]) == 0
    printed = capsys.readouterr().out
    assert "postgresql://u:***@h/d" in printed
    for leaked in ("k-alice-1", "k-admin-2", "sasl-pw-3", "db-pw-4"):
        assert leaked not in printed
    setup_logging("INFO", "text", ["k-alice-1", "db-pw-4"])
    logging.getLogger("test").warning("key k-alice-1 url postgresql://u:db-pw-4@h/d")
    logged = capsys.readouterr().err
    assert "k-alice-1" not in logged and "db-pw-4" not in logged and "key *** url" in logged
