"""HTTP and WebSocket gateway (FastAPI) over the streaming engine and PostgreSQL.

Every response uses the envelope `{success, data, error}`. The gateway does no speech processing of its
own: uploads become records on the request topics (enrollment, verification, audio) and the answers come
back from the result topics through the `ResultHub`; history is read from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import soundfile as sf
from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from psycopg.rows import dict_row
from starlette.exceptions import HTTPException

from speakerflow.processors.audio import AudioDecodeError, decode_file
from speakerflow.streams.client import pcm_sample
from speakerflow.streams.hub import ResultHub
from speakerflow.streams.runtime import Publisher, now_ms
from speakerflow.streams.settings import Settings
from speakerflow.streams.topology import (
    AUDIO,
    ENROLLMENT_REQUESTS,
    ENROLLMENT_RESULTS,
    SEGMENTS_IDENTIFIED,
    STREAMS,
    VERIFICATION_REQUESTS,
    VERIFICATION_RESULTS,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
OPEN_PATHS = {"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
AUDIO_TYPES = ("audio/", "application/octet-stream", "video/")  # video/* covers .mp4/.webm containers


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse({"success": True, "data": data, "error": None}, status_code=status)


def fail(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "data": None, "error": {"code": code, "message": message}}, status)


class Gateway:
    """What the endpoints share: settings, producer, result hub, database."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self.publisher = Publisher(settings)
        self.hub = ResultHub(settings)
        self.export_dir = Path(settings.export_segments_dir or Path(settings.data_dir) / "exports")
        self.api_keys = {k.strip() for k in settings.api_keys.split(",") if k.strip()}

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    async def db(self, query: str, params: tuple | list = ()) -> list[dict]:
        def run() -> list[dict]:
            with psycopg.connect(self.database_url, row_factory=dict_row) as conn:
                return conn.execute(query, params).fetchall()

        return await asyncio.to_thread(run)

    async def read_audio(self, upload: UploadFile) -> np.ndarray:
        """Checked upload -> 16 kHz mono float32, or a 4xx ApiError saying what is wrong."""
        content_type = (upload.content_type or "application/octet-stream").lower()
        if not content_type.startswith(AUDIO_TYPES):
            raise ApiError(415, "unsupported_media_type", f"{upload.filename}: {content_type} is not audio")
        limit = int(self.settings.api_max_upload_mb * 1024 * 1024)
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise ApiError(
                413, "too_large", f"{upload.filename}: larger than {self.settings.api_max_upload_mb} MB"
            )
        try:
            return await asyncio.to_thread(decode_file, data)
        except AudioDecodeError as exc:
            raise ApiError(422, "undecodable_audio", f"{upload.filename}: {exc}") from exc

    async def request_reply(
        self, request_topic: str, reply_topic: str, key: str, record_name: str, record: dict, request_id: str
    ) -> dict:
        with self.hub.subscribe(reply_topic, request_id) as replies:
            self.publisher.publish(self.topic(request_topic), key, record_name, record)
            await asyncio.to_thread(self.publisher.flush)
            try:
                return await asyncio.wait_for(replies.get(), self.settings.api_timeout_s)
            except TimeoutError as exc:
                raise ApiError(504, "timeout", f"no result within {self.settings.api_timeout_s} s") from exc


def create_app(settings: Settings, database_url: str) -> FastAPI:
    gw = Gateway(settings, database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw.hub.start()
        await asyncio.to_thread(gw.hub.ready.wait, 30)
        janitor = asyncio.create_task(_expire_exports(gw.export_dir, settings.export_retention_h))
        yield
        janitor.cancel()
        gw.hub.stopping.set()
        await asyncio.to_thread(gw.publisher.close)

    app = FastAPI(
        title="speakerflow",
        version="0.1.0",
        lifespan=lifespan,
        description="Who is speaking: enrollment, identification, diarization, verification.",
    )
    app.state.gateway = gw

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if gw.api_keys and request.url.path not in OPEN_PATHS:
            given = request.headers.get("x-api-key", "")
            if not any(secrets.compare_digest(given, key) for key in gw.api_keys):
                return fail(401, "unauthorized", "missing or wrong X-API-Key header")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return fail(exc.status_code, getattr(exc, "code", "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return fail(422, "invalid_request", problems)

    @app.get("/health")
    async def health() -> JSONResponse:
        return ok({"status": "ok", "hub_ready": gw.hub.ready.is_set()})

    # -- speakers -----------------------------------------------------------------------------------
    @app.post("/speakers/enroll", status_code=201)
    async def enroll(
        name: str = Form(...),
        files: list[UploadFile] = File(...),
        speaker_id: str = Form(""),
        mode: str = Form("ADD"),
    ) -> JSONResponse:
        if mode.upper() not in ("ADD", "REPLACE"):
            raise ApiError(422, "invalid_request", "mode must be ADD or REPLACE")
        audios = [await gw.read_audio(f) for f in files]
        speaker_id = speaker_id or name.strip().lower().replace(" ", "-")
        request_id = uuid.uuid4().hex
        record = {
            "request_id": request_id,
            "speaker_id": speaker_id,
            "name": name,
            "mode": mode.upper(),
            "samples": [pcm_sample(a) for a in audios],
            "metadata": {},
            "requested_at_ms": now_ms(),
        }
        result = await gw.request_reply(
            ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, speaker_id, "EnrollmentRequest", record, request_id
        )
        if not result["accepted"]:
            raise ApiError(422, "enrollment_rejected", result["reason"] or "rejected")
        return ok(result, 201)

    @app.get("/speakers")
    async def list_speakers(offset: int = 0, limit: int = 50) -> JSONResponse:
        limit = max(1, min(limit, 500))
        rows = await gw.db(
            "SELECT speaker_id, name, model_id, sample_count, speech_seconds, updated_at FROM speakers "
            "ORDER BY name, speaker_id OFFSET %s LIMIT %s",
            (max(offset, 0), limit),
        )
        total = (await gw.db("SELECT count(*) AS n FROM speakers"))[0]["n"]
        return ok({"items": [_jsonable(r) for r in rows], "offset": offset, "limit": limit, "total": total})

    @app.get("/speakers/{speaker_id}")
    async def get_speaker(speaker_id: str) -> JSONResponse:
        rows = await gw.db(
            "SELECT speaker_id, name, model_id, dim, sample_count, speech_seconds, metadata, "
            "updated_at FROM speakers WHERE speaker_id = %s",
            (speaker_id,),
        )
        if not rows:
            raise ApiError(404, "not_found", f"speaker {speaker_id!r} is not enrolled")
        return ok(_jsonable(rows[0]))

    @app.delete("/speakers/{speaker_id}")
    async def delete_speaker(speaker_id: str) -> JSONResponse:
        if not await gw.db("SELECT 1 FROM speakers WHERE speaker_id = %s", (speaker_id,)):
            raise ApiError(404, "not_found", f"speaker {speaker_id!r} is not enrolled")
        request_id = uuid.uuid4().hex
        record = {
            "request_id": request_id,
            "speaker_id": speaker_id,
            "name": "",
            "mode": "DELETE",
            "samples": [],
            "metadata": {},
            "requested_at_ms": now_ms(),
        }
        await gw.request_reply(
            ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, speaker_id, "EnrollmentRequest", record, request_id
        )
        return ok({"speaker_id": speaker_id, "deleted": True})

    # -- verification ---------------------------------------------------------------------------------
    @app.post("/verify")
    async def verify(speaker_id: str = Form(...), file: UploadFile = File(...)) -> JSONResponse:
        audio = await gw.read_audio(file)
        request_id = uuid.uuid4().hex
        record = {
            "request_id": request_id,
            "speaker_id": speaker_id,
            "sample": pcm_sample(audio),
            "requested_at_ms": now_ms(),
        }
        result = await gw.request_reply(
            VERIFICATION_REQUESTS,
            VERIFICATION_RESULTS,
            request_id,
            "VerificationRequest",
            record,
            request_id,
        )
        if result["error"] and "not enrolled" in result["error"]:
            raise ApiError(404, "not_found", result["error"])
        if result["error"]:
            raise ApiError(422, "verification_failed", result["error"])
        return ok(result)

    # -- files as streams (jobs) ---------------------------------------------------------------------
    async def submit(kind: str, file: UploadFile, sync: bool, export_segments: bool) -> JSONResponse:
        audio = await gw.read_audio(file)
        job_id = f"{kind}-{uuid.uuid4().hex[:12]}"
        await gw.db(
            "INSERT INTO streams (stream_id, kind, status, audio_seconds, metadata) "
            "VALUES (%s, %s, 'PENDING', %s, %s) RETURNING stream_id",
            (job_id, kind, len(audio) / SAMPLE_RATE, json.dumps({"filename": file.filename or ""})),
        )
        job = asyncio.create_task(run_job(job_id, audio, export_segments))
        if not sync:
            app.state.jobs = getattr(app.state, "jobs", set()) | {job}
            return ok({"job_id": job_id, "status": "PENDING"}, 202)
        segments = await job
        return ok(
            {
                "job_id": job_id,
                "status": "DONE",
                "duration_s": len(audio) / SAMPLE_RATE,
                "speakers": sorted({s["label"] for s in segments}),
                "segments": segments,
            }
        )

    async def run_job(job_id: str, audio: np.ndarray, export: bool) -> list[dict]:
        with (
            gw.hub.subscribe(SEGMENTS_IDENTIFIED, job_id) as updates,
            gw.hub.subscribe(STREAMS, job_id, updates),
        ):
            await asyncio.to_thread(_publish_audio, gw, job_id, audio)
            deadline = time.monotonic() + gw.settings.api_timeout_s + len(audio) / SAMPLE_RATE
            final: dict[str, dict] = {}
            ended: dict | None = None
            while ended is None or _count(final, ended["revision"]) < ended["segments"]:
                try:
                    record = await asyncio.wait_for(updates.get(), max(deadline - time.monotonic(), 0.01))
                except TimeoutError:
                    await gw.db(
                        "UPDATE streams SET status = 'FAILED', error = 'timed out' WHERE stream_id = %s "
                        "RETURNING 1",
                        (job_id,),
                    )
                    raise ApiError(504, "timeout", f"job {job_id} did not finish in time") from None
                if "event" in record:
                    if record["event"] == "FAILED":
                        raise ApiError(422, "stream_failed", record["reason"] or "the stream failed")
                    if record["event"] == "ENDED":
                        ended = record  # identified segments may still be on their way (other topic)
                elif record["is_final"]:
                    final[record["segment_id"]] = record
        revision = ended["revision"]
        segments = sorted(
            (s for s in final.values() if s["revision"] == revision), key=lambda s: s["start_s"]
        )
        out = [_segment_json(s) for s in segments]
        if export:
            await asyncio.to_thread(_export_clips, gw.export_dir / job_id, audio, out)
        return out

    @app.post("/identify")
    async def identify(
        file: UploadFile = File(...), sync: bool = Form(True), export_segments: bool = Form(False)
    ) -> JSONResponse:
        return await submit("identify", file, sync, export_segments)

    @app.post("/diarize")
    async def diarize(
        file: UploadFile = File(...), sync: bool = Form(True), export_segments: bool = Form(False)
    ) -> JSONResponse:
        return await submit("diarize", file, sync, export_segments)

    @app.get("/jobs")
    async def list_jobs(offset: int = 0, limit: int = 50) -> JSONResponse:
        rows = await gw.db(
            "SELECT stream_id AS job_id, kind, status, created_at, started_at, ended_at, "
            "audio_seconds, speakers, error FROM streams ORDER BY created_at DESC "
            "OFFSET %s LIMIT %s",
            (max(offset, 0), max(1, min(limit, 500))),
        )
        return ok({"items": [_jsonable(r) for r in rows], "offset": offset, "limit": limit})

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        rows = await gw.db(
            "SELECT stream_id AS job_id, kind, status, created_at, started_at, ended_at, "
            "audio_seconds, speakers, final_revision, error FROM streams WHERE stream_id = %s",
            (job_id,),
        )
        if not rows:
            raise ApiError(404, "not_found", f"job {job_id!r} does not exist")
        segments = await gw.db(
            "SELECT segment_id, label, speaker_id, name, start_s, end_s, confidence, revision, is_final "
            "FROM current_segments WHERE stream_id = %s AND is_final ORDER BY start_s",
            (job_id,),
        )
        clips = gw.export_dir / job_id
        for seg in segments:
            if (clips / f"{_safe(seg['segment_id'])}.wav").is_file():
                seg["audio_url"] = f"/segments/{job_id}/audio/{seg['segment_id']}"
        return ok(_jsonable(rows[0]) | {"segments": [_jsonable(s) for s in segments]})

    @app.get("/segments/{job_id}/audio/{segment_id}")
    async def segment_audio(job_id: str, segment_id: str) -> FileResponse:
        path = gw.export_dir / _safe(job_id) / f"{_safe(segment_id)}.wav"
        if not path.is_file():
            raise ApiError(
                404, "not_found", "no exported clip for this segment (post with export_segments=true)"
            )
        return FileResponse(path, media_type="audio/wav")

    # -- live streams over WebSocket -----------------------------------------------------------------
    @app.websocket("/streams/{stream_id}")
    async def live_stream(ws: WebSocket, stream_id: str) -> None:
        if gw.api_keys and not any(
            secrets.compare_digest(ws.headers.get("x-api-key", ws.query_params.get("api_key", "")), k)
            for k in gw.api_keys
        ):
            await ws.close(code=4401)
            return
        await ws.accept()
        session = LiveSession(gw, stream_id, int(ws.query_params.get("sample_rate", SAMPLE_RATE)))
        with gw.hub.subscribe(SEGMENTS_IDENTIFIED, stream_id) as segments:
            forward = asyncio.create_task(_forward_segments(ws, segments))
            try:
                await session.receive_all(ws)
            finally:
                await asyncio.to_thread(session.close)
                # Let the end-of-stream revision reach the caller before the socket closes.
                await asyncio.sleep(float(ws.query_params.get("linger_s", 0)))
                forward.cancel()
        if ws.client_state.name == "CONNECTED":
            await ws.close()

    return app


class LiveSession:
    """Audio frames of one WebSocket call -> AudioChunk records (raw PCM, or Twilio Media Streams)."""

    def __init__(self, gw: Gateway, stream_id: str, sample_rate: int) -> None:
        self.gw = gw
        self.stream_id = stream_id
        self.sample_rate = sample_rate
        self.encoding = "PCM_S16LE"
        self.seq = 0
        self.closed = False

    async def receive_all(self, ws: WebSocket) -> None:
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    self.send(message["bytes"])
                elif message.get("text") is not None and self._twilio(message["text"]) == "stop":
                    return
        except WebSocketDisconnect:
            return

    def _twilio(self, text: str) -> str:
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            return ""
        kind = event.get("event", "")
        if kind == "start":
            fmt = event.get("start", {}).get("mediaFormat", {})
            self.encoding = "MULAW" if "mulaw" in fmt.get("encoding", "audio/x-mulaw") else "PCM_S16LE"
            self.sample_rate = int(fmt.get("sampleRate", 8000))
        elif kind == "media":
            try:
                self.send(base64.b64decode(event["media"]["payload"]))
            except (KeyError, binascii.Error):
                log.warning("stream %s: bad Twilio media message", self.stream_id)
        return kind

    def send(self, payload: bytes, end: bool = False) -> None:
        record = {
            "stream_id": self.stream_id,
            "seq": self.seq,
            "capture_ts_ms": now_ms(),
            "sample_rate": self.sample_rate,
            "channels": 1,
            "encoding": self.encoding,
            "payload": payload,
            "end_of_stream": end,
            "metadata": {"source": "websocket"},
        }
        self.gw.publisher.publish(self.gw.topic(AUDIO), self.stream_id, "AudioChunk", record)
        self.gw.publisher.poll()
        self.seq += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.send(b"", end=True)
            self.gw.publisher.flush()


async def _forward_segments(ws: WebSocket, segments: asyncio.Queue) -> None:
    while True:
        record = await segments.get()
        try:
            await ws.send_json({"type": "segment", **_segment_json(record)})
        except (RuntimeError, WebSocketDisconnect):
            return


def _publish_audio(gw: Gateway, stream_id: str, audio: np.ndarray, chunk_s: float = 1.0) -> None:
    from speakerflow.streams.client import play_audio

    play_audio(gw.publisher, stream_id, audio, chunk_s=chunk_s, realtime=False)


def _count(segments: dict[str, dict], revision: int) -> int:
    return sum(1 for s in segments.values() if s["revision"] == revision)


def _segment_json(s: dict) -> dict:
    return {
        k: s[k]
        for k in (
            "segment_id",
            "stream_id",
            "label",
            "speaker_id",
            "name",
            "start_s",
            "end_s",
            "confidence",
            "score",
            "is_final",
            "revision",
            "model_id",
        )
    }


def _export_clips(folder: Path, audio: np.ndarray, segments: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seg in segments:
        clip = audio[int(seg["start_s"] * SAMPLE_RATE) : int(seg["end_s"] * SAMPLE_RATE)]
        sf.write(folder / f"{_safe(seg['segment_id'])}.wav", clip, SAMPLE_RATE, subtype="PCM_16")
        seg["audio_url"] = f"/segments/{seg['stream_id']}/audio/{seg['segment_id']}"


async def _expire_exports(folder: Path, retention_h: float, every_s: float = 600.0) -> None:
    """Raw audio is kept only as exported clips, and only for the retention period."""
    while True:
        await asyncio.to_thread(remove_expired_exports, folder, retention_h)
        await asyncio.sleep(every_s)


def remove_expired_exports(folder: Path, retention_h: float) -> int:
    """Delete job folders of clips older than `retention_h`; returns how many went."""
    if not folder.is_dir():
        return 0
    cutoff = time.time() - retention_h * 3600
    removed = 0
    for job in folder.iterdir():
        if job.is_dir() and job.stat().st_mtime < cutoff:
            for clip in job.iterdir():
                clip.unlink()
            job.rmdir()
            removed += 1
    return removed


def _safe(name: str) -> str:
    """A file name that cannot climb out of its folder."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")


def _jsonable(row: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
