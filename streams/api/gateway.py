"""What every route of the gateway shares: the envelope, errors, settings, producer, result hub, database."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from fastapi import Request, UploadFile, WebSocket
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from speakerflow.processors.audio import AudioDecodeError, AudioTooLong, decode_file
from speakerflow.streams.hub import ResultHub
from speakerflow.streams.limits import InvalidField, check_id
from speakerflow.streams.runtime import Publisher
from speakerflow.streams.settings import Settings

SAMPLE_RATE = 16000
AUDIO_TYPES = ("audio/", "application/octet-stream", "video/")  # video/* covers .mp4/.webm containers


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse({"success": True, "data": data, "error": None}, status_code=status)


def fail(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "data": None, "error": {"code": code, "message": message}}, status)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorEnvelope(BaseModel):
    """Every error: `{"success": false, "data": null, "error": {"code", "message"}}`."""

    success: bool
    data: None
    error: ErrorDetail


def _errors(*described: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorEnvelope, "description": text} for status, text in described}


# The errors any route can give (OpenAPI `responses`); routes that take uploads or talk to the workers add
# UPLOAD_ERRORS. No route answers 500: an unexpected error is a bug and still comes in the envelope.
COMMON_ERRORS = _errors(
    (400, "A malformed request body (e.g. invalid multipart data)."),
    (401, "Missing or wrong X-API-Key header."),
    (403, "The key may not do this (gallery management and foreign stream ids need an admin key)."),
    (404, "No such speaker, job or clip."),
    (422, "A value outside its limits (ids, names, offsets) or a malformed request."),
    (503, "The database or the broker is unavailable; retry later."),
)
UPLOAD_ERRORS = _errors(
    (409, "The speaker id is already enrolled (use mode ADD or REPLACE with an admin key)."),
    (413, "The upload, its decoded audio or the record made from it is too large."),
    (415, "The upload is not audio."),
    (504, "The workers did not answer in time."),
)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the owner name of its key (stream-id prefix) and whether it is an admin."""

    owner: str
    admin: bool

    def owns(self, stream_id: str) -> bool:
        """A client key may open, watch and list only the stream ids that start with `owner.`."""
        return self.admin or stream_id.startswith(self.prefix)

    @property
    def prefix(self) -> str:
        """The stream-id prefix of this caller's streams and jobs."""
        return f"{self.owner}."

    def scope(self) -> tuple[bool, str]:
        """Parameters of a listing query's `(%s OR starts_with(stream_id, %s))`: all rows for an admin."""
        return self.admin, self.prefix

    def owned(self, kind: str, stream_id: str) -> str:
        """`stream_id` when this caller owns it; else a 404, as if it did not exist (ids of other owners'
        streams and jobs are not revealed)."""
        if not self.owns(stream_id):
            raise ApiError(404, "not_found", f"{kind} {stream_id!r} does not exist")
        return stream_id


OPEN_CALLER = Caller("", True)  # no keys configured: development, everything allowed


def parse_keys(client_keys: str, admin_keys: str) -> dict[str, Caller]:
    """key -> Caller from SPEAKERFLOW_API_KEYS (`key` or `owner:key`) and SPEAKERFLOW_ADMIN_KEYS."""
    keys: dict[str, Caller] = {}
    for entry in (e.strip() for e in client_keys.split(",")):
        if entry:
            owner, _, key = entry.rpartition(":")
            keys[key] = Caller(owner or "k" + hashlib.sha256(key.encode()).hexdigest()[:10], False)
    for key in (k.strip() for k in admin_keys.split(",")):
        if key:
            keys[key] = Caller("admin", True)
    return keys


class Gateway:
    """What the endpoints share: settings, producer, result hub, database."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self.publisher = Publisher(settings)
        self.hub = ResultHub(settings)
        self.export_dir = Path(settings.export_segments_dir or Path(settings.data_dir) / "exports")
        self.api_keys = parse_keys(settings.api_keys, settings.admin_keys)

    def caller(self, given: str) -> Caller | None:
        """The caller a key belongs to (OPEN_CALLER when no keys are configured), None for a wrong key."""
        if not self.api_keys:
            return OPEN_CALLER
        found = None
        for key, caller in self.api_keys.items():  # compare with every key: no timing hint
            if secrets.compare_digest(given.encode(), key.encode()):
                found = caller
        return found

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    async def websocket_caller(self, ws: WebSocket) -> Caller | None:
        """Accept the socket and say who is calling; for a wrong key close it with code 4401 and a
        reason (after the handshake, so that clients, browsers too, can read them) and return None.
        Browsers cannot set headers on a WebSocket, so `?api_key=` stands in for X-API-Key."""
        who = self.caller(ws.headers.get("x-api-key", ws.query_params.get("api_key", "")))
        await ws.accept()
        if who is None:
            await ws.close(code=4401, reason="missing or wrong API key")
        return who

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
                413,
                "too_large",
                f"{upload.filename}: larger than the {self.settings.api_max_upload_mb:g} MB upload limit "
                "(SPEAKERFLOW_API_MAX_UPLOAD_MB)",
            )
        try:
            return await asyncio.to_thread(decode_file, data, max_seconds=self.settings.api_max_audio_s)
        except AudioTooLong as exc:
            raise ApiError(413, "too_long", f"{upload.filename}: {exc}") from exc
        except AudioDecodeError as exc:
            raise ApiError(422, "undecodable_audio", f"{upload.filename}: {exc}") from exc

    async def request_reply(
        self, request_topic: str, reply_topic: str, key: str, record_name: str, record: dict
    ) -> dict:
        """Publish `record` and wait for the record answering its request id on `reply_topic`."""
        with self.hub.subscribe(reply_topic, record["request_id"]) as replies:
            self.publisher.publish(self.topic(request_topic), key, record_name, record)
            await asyncio.to_thread(self.publisher.flush)
            try:
                return await asyncio.wait_for(replies.get(), self.settings.api_timeout_s)
            except TimeoutError as exc:
                raise ApiError(504, "timeout", f"no result within {self.settings.api_timeout_s} s") from exc


def gateway(request: Request) -> Gateway:
    """The app's Gateway, for routes (`gw: Gateway = Depends(gateway)`)."""
    return request.app.state.gateway


def caller(request: Request) -> Caller:
    """Who is calling (set by the key check), for routes (`who: Caller = Depends(caller)`)."""
    return getattr(request.state, "caller", OPEN_CALLER)


def require_admin(who: Caller, what: str) -> None:
    if not who.admin:
        raise ApiError(403, "forbidden", f"{what} needs an admin key (SPEAKERFLOW_ADMIN_KEYS)")


def valid_id(field: str, value: str) -> str:
    """`value` if it is a safe id, else a 422 ApiError naming the field and the rule."""
    try:
        return check_id(field, value)
    except InvalidField as exc:
        raise ApiError(422, "invalid_value", str(exc)) from exc


def jsonable(row: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def safe_name(name: str) -> str:
    """A file name that cannot climb out of its folder."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")


SEGMENT_FIELDS = (
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


def segment_json(s: dict) -> dict:
    return {k: s[k] for k in SEGMENT_FIELDS}
