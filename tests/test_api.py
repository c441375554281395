"""The HTTP and WebSocket gateway over real HTTP, the embedded broker, a worker and PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets
from processes import serving_gateway

from speakerflow.evaluation.corpus import by_speaker, load_manifest
from speakerflow.evaluation.scenario import librispeech_scenario
from speakerflow.processors.audio import encode_pcm
from speakerflow.streams.database import scratch_database
from speakerflow.streams.worker import Worker

pytestmark = pytest.mark.integration


def flac_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(broker, pg_server, ge2e, shared_data, tmp_path_factory) -> Iterator[dict]:
    """A worker (all stages) + the gateway on a free loopback port, with one API key."""
    settings = broker.run_settings(
        tmp_path_factory.mktemp("api"),
        admin_keys="secret-key",
        api_keys="alice:client-key",
        api_max_upload_mb=2.0,
        idle_timeout_s=5.0,
    )
    with scratch_database(pg_server, "speakerflow_api", migrated=False) as url:
        worker = Worker(settings, database_url=url, embedder=ge2e)
        worker.start()
        with serving_gateway(settings, url) as port:
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": "secret-key"}, timeout=120
            )
            yield {
                "client": client,
                "port": port,
                "settings": settings,
                "url": url,
                "worker": worker,
                "scenario": librispeech_scenario(shared_data, turns=5),
            }
            client.close()
        worker.stop()


def enroll(client: httpx.Client, speaker_id: str, files) -> httpx.Response:
    uploads = [("files", (p.name, p.read_bytes(), "audio/flac")) for p in files]
    return client.post(
        "/speakers/enroll", data={"name": f"Name {speaker_id}", "speaker_id": speaker_id}, files=uploads
    )


def test_auth_envelope_and_docs(stack):
    client = stack["client"]
    anonymous = httpx.get(f"{client.base_url}/speakers")
    assert anonymous.status_code == 401
    assert anonymous.json() == {
        "success": False,
        "data": None,
        "error": {"code": "unauthorized", "message": "missing or wrong X-API-Key header"},
    }
    assert httpx.get(f"{client.base_url}/openapi.json").status_code == 200
    assert client.get("/health").json()["success"] is True


def test_docs_and_console_are_served_offline_without_a_key(stack):
    """/docs and the console's pages hold no data, need no key and point at nothing outside the gateway."""
    base = stack["client"].base_url
    for page in ("/docs", "/"):
        html = httpx.get(f"{base}{page}")
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert not re.search(r"https?://", html.text), html.text
        for asset in re.findall(r'(?:src|href)="(/[^"]+)"', html.text):
            assert httpx.get(f"{base}{asset}").status_code == 200, asset
    assert "SwaggerUIBundle" in httpx.get(f"{base}/docs").text
    assert httpx.get(f"{base}/streams").status_code == 401  # the data the console reads does want it


def test_enroll_list_get_verify_and_delete(stack):
    client = stack["client"]
    scenario = stack["scenario"]
    ids = list(scenario.enrollments)
    for speaker_id in ids:
        response = enroll(client, speaker_id, scenario.enrollments[speaker_id])
        assert response.status_code == 201, response.text
        assert response.json()["data"]["accepted"] is True
    deadline = time.monotonic() + 30
    while client.get("/speakers").json()["data"]["total"] < len(ids) and time.monotonic() < deadline:
        time.sleep(0.3)
    listing = client.get("/speakers", params={"limit": 2}).json()["data"]
    assert listing["total"] == len(ids) and len(listing["items"]) == 2
    assert client.get(f"/speakers/{ids[0]}").json()["data"]["name"] == f"Name {ids[0]}"
    assert client.get("/speakers/nobody").status_code == 404

    held_out = scenario.enrollments[ids[0]][0].parent  # same speaker, a file not used for enrollment
    test_file = sorted(held_out.glob("*.flac"))[-1]
    same = client.post(
        "/verify",
        data={"speaker_id": ids[0]},
        files={"file": (test_file.name, test_file.read_bytes(), "audio/flac")},
    ).json()["data"]
    other = client.post(
        "/verify",
        data={"speaker_id": ids[1]},
        files={"file": (test_file.name, test_file.read_bytes(), "audio/flac")},
    ).json()["data"]
    assert same["accepted"] is True and other["accepted"] is False
    assert same["score"] > other["score"]

    assert client.delete(f"/speakers/{ids[2]}").json()["data"]["deleted"] is True
    deadline = time.monotonic() + 30
    while client.get(f"/speakers/{ids[2]}").status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.get(f"/speakers/{ids[2]}").status_code == 404
    assert client.delete(f"/speakers/{ids[2]}").status_code == 404
    assert (
        client.post(
            "/verify",
            data={"speaker_id": ids[2]},
            files={"file": (test_file.name, test_file.read_bytes(), "audio/flac")},
        ).status_code
        == 404
    )


def test_bad_uploads_get_clear_4xx(stack, shared_data):
    client = stack["client"]
    not_audio = client.post("/identify", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert not_audio.status_code == 415 and not_audio.json()["error"]["code"] == "unsupported_media_type"
    garbage = client.post("/identify", files={"file": ("x.wav", b"RIFF....garbage", "audio/wav")})
    assert garbage.status_code == 422 and garbage.json()["error"]["code"] == "undecodable_audio"
    too_large = client.post("/identify", files={"file": ("big.wav", b"\0" * (3 * 1024 * 1024), "audio/wav")})
    assert too_large.status_code == 413
    short = sorted(
        by_speaker(load_manifest(shared_data), "librispeech/test-other")["ls-2609"],
        key=lambda u: u.duration_s,
    )[0]
    too_short = enroll(client, "short-sample", [short.path])
    assert too_short.status_code == 422
    assert "speech" in too_short.json()["error"]["message"]
    missing = client.post("/identify", data={"sync": "true"})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "invalid_request"


def test_identify_sync_and_async_jobs_with_exported_clips(stack):
    client = stack["client"]
    scenario = stack["scenario"]
    audio = flac_bytes(scenario.audio)
    response = client.post(
        "/identify",
        data={"sync": "true", "export_segments": "true"},
        files={"file": ("call.flac", audio, "audio/flac")},
    )
    assert response.status_code == 200, response.text
    job = response.json()["data"]
    assert job["status"] == "DONE" and job["segments"]
    named = [s for s in job["segments"] if s["speaker_id"]]
    assert named, job["segments"]
    clip = client.get(named[0]["audio_url"])
    assert clip.status_code == 200 and clip.headers["content-type"] == "audio/wav"
    wav, rate = sf.read(io.BytesIO(clip.content))
    assert rate == 16000 and abs(len(wav) / rate - (named[0]["end_s"] - named[0]["start_s"])) < 0.05

    accepted = client.post(
        "/diarize", data={"sync": "false"}, files={"file": ("call.flac", audio, "audio/flac")}
    )
    assert accepted.status_code == 202
    job_id = accepted.json()["data"]["job_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}").json()["data"]
        if status["status"] == "DONE" and status["segments"]:
            break
        time.sleep(0.5)
    assert status["status"] == "DONE" and status["kind"] == "diarize"
    assert any(j["job_id"] == job_id for j in client.get("/jobs").json()["data"]["items"])
    assert client.get("/jobs/does-not-exist").status_code == 404


def test_websocket_pcm_and_twilio_streams_get_segments_back(stack):
    scenario = stack["scenario"]
    port = stack["port"]
    audio = scenario.audio[: 16000 * 30]

    async def pcm_call() -> list[dict]:
        uri = f"ws://127.0.0.1:{port}/streams/ws-pcm?sample_rate=16000&api_key=secret-key&linger_s=8"
        got = []
        async with websockets.connect(uri) as ws:
            pcm = encode_pcm(audio, "PCM_S16LE")
            for i in range(0, len(pcm), 6400):  # 0.2-s frames
                await ws.send(pcm[i : i + 6400])
            await ws.send(json.dumps({"event": "stop"}))
            async for message in ws:
                got.append(json.loads(message))
        return got

    async def twilio_call() -> list[dict]:
        import base64

        from speakerflow.processors.audio import resample

        mulaw = encode_pcm(resample(audio, 16000, 8000), "MULAW")
        uri = f"ws://127.0.0.1:{port}/streams/ws-twilio?api_key=secret-key&linger_s=8"
        got = []
        async with websockets.connect(uri) as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(
                json.dumps(
                    {
                        "event": "start",
                        "start": {
                            "streamSid": "MZ1",
                            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                        },
                    }
                )
            )
            for i in range(0, len(mulaw), 160):  # 20-ms frames, as Twilio sends them
                payload = base64.b64encode(mulaw[i : i + 160]).decode()
                await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
            await ws.send(json.dumps({"event": "stop"}))
            async for message in ws:
                got.append(json.loads(message))
        return got

    for received in (asyncio.run(pcm_call()), asyncio.run(twilio_call())):
        assert received and all(m["type"] == "segment" for m in received)
        assert any(m["is_final"] for m in received)


def test_console_routes_watch_history_and_gate_check(stack, shared_data):
    """The routes the web console reads, over a stream the WebSocket test above left behind."""
    client, port = stack["client"], stack["port"]
    streams = {s["stream_id"]: s for s in client.get("/streams").json()["data"]["items"]}
    assert streams["ws-pcm"]["audio_seconds"] > 0

    async def watch(key: str) -> tuple[dict | None, int | None]:
        uri = f"ws://127.0.0.1:{port}/streams/ws-pcm/watch?api_key={key}"
        try:
            async with websockets.connect(uri) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 30)), None
        except websockets.ConnectionClosed as closed:
            return None, closed.rcvd.code if closed.rcvd else None

    snapshot, _ = asyncio.run(watch("secret-key"))
    assert snapshot["type"] == "snapshot" and snapshot["segments"]
    assert all(s["stream_id"] == "ws-pcm" for s in snapshot["segments"])
    assert asyncio.run(watch("wrong-key")) == (None, 4401)

    deadline = time.monotonic() + 30  # the sink writes the stream's end shortly after it ends
    while time.monotonic() < deadline:
        history = client.get("/history/ws-pcm").json()["data"]
        if history["status"] == "DONE" and history["talk"]:
            break
        time.sleep(0.5)
    assert history["status"] == "DONE" and history["segments"]
    stored = sum(s["end_s"] - s["start_s"] for s in history["segments"])
    assert sum(t["talk_seconds"] for t in history["talk"]) == pytest.approx(stored)
    assert any(h["stream_id"] == "ws-pcm" for h in client.get("/history").json()["data"]["items"])
    assert client.get("/history/nothing-here").status_code == 404

    short = sorted(
        by_speaker(load_manifest(shared_data), "librispeech/test-other")["ls-2609"],
        key=lambda u: u.duration_s,
    )[0]
    check = client.post(
        "/speakers/check", files={"files": (short.path.name, short.path.read_bytes(), "audio/flac")}
    )
    assert check.status_code == 200
    verdict = check.json()["data"]
    assert verdict["passes"] is False and "s of speech found" in verdict["reason"]
    total = client.get("/speakers").json()["data"]["total"]
    enough = stack["scenario"].enrollments[next(iter(stack["scenario"].enrollments))]
    uploads = [("files", (f.name, f.read_bytes(), "audio/flac")) for f in enough]
    verdict = client.post("/speakers/check", files=uploads).json()["data"]
    assert verdict["passes"] is True and verdict["speech_seconds"] >= 10
    time.sleep(1)  # nothing is stored: the gallery has as many speakers as before
    assert client.get("/speakers").json()["data"]["total"] == total


def test_exported_clips_expire_after_the_retention(tmp_path):
    import os

    from speakerflow.streams.api import remove_expired_exports

    old, fresh = tmp_path / "identify-old", tmp_path / "identify-new"
    for job in (old, fresh):
        job.mkdir()
        (job / "seg.wav").write_bytes(b"RIFF")
    two_days_ago = time.time() - 48 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    assert remove_expired_exports(tmp_path, retention_h=24) == 1
    assert not old.exists() and fresh.exists()
