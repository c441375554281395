"""The web console: its static pages at `/` and what they read that the other routes do not give:
running streams, watching a stream's segments without sending audio, past streams with talk times, and
the enrollment gate's verdict without storing anything.

The pages are plain files in `streams/console/` (no build step, nothing fetched from outside).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse

from speakerflow.streams import queries
from speakerflow.streams.api.gateway import (
    COMMON_ERRORS,
    UPLOAD_ERRORS,
    ApiError,
    Caller,
    Gateway,
    caller,
    gateway,
    jsonable,
    ok,
    segment_json,
)
from speakerflow.streams.records import enrollment_request, pcm_sample
from speakerflow.streams.stages.requests import CHECK_ONLY
from speakerflow.streams.topology import ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, SEGMENTS_IDENTIFIED, STREAMS

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

router = APIRouter(responses=COMMON_ERRORS)


@router.get("/", include_in_schema=False)
async def console_page() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html")


@router.get("/whoami")
async def whoami(who: Caller = Depends(caller)) -> JSONResponse:
    """The caller's key: its owner (a client key opens and watches only stream ids `owner.*`) and whether
    it is an admin key."""
    return ok({"owner": who.owner, "admin": who.admin})


@router.get("/streams")
async def running_streams(gw: Gateway = Depends(gateway), who: Caller = Depends(caller)) -> JSONResponse:
    """Streams heard of lately on the `streams` and segment topics, newest first, with their state
    (RUNNING, ENDED, FAILED) and audio seconds; a client key sees only the streams it owns."""
    return ok({"items": [s for s in gw.hub.live.streams() if who.owns(s["stream_id"])]})


@router.websocket("/streams/{stream_id}/watch")
async def watch_stream(ws: WebSocket, stream_id: str) -> None:
    """Watch a stream without sending audio: first `{"type": "snapshot", "stream": {...} | null,
    "segments": [...]}` (its state, and the latest record of each segment id and revision seen so far),
    then `{"type": "segment", ...}` and `{"type": "stream", ...}` (STARTED/ENDED/FAILED) as they arrive."""
    gw: Gateway = ws.app.state.gateway
    who = await gw.websocket_caller(ws)
    if who is None:
        return
    if not who.owns(stream_id):
        await ws.close(code=4403, reason=f"this key may watch only stream ids starting with {who.owner}.")
        return
    with (
        gw.hub.subscribe(SEGMENTS_IDENTIFIED, stream_id) as updates,
        gw.hub.subscribe(STREAMS, stream_id, updates),
    ):
        snapshot = [segment_json(s) for s in gw.hub.live.segments(stream_id)]
        state = next((s for s in gw.hub.live.streams() if s["stream_id"] == stream_id), None)
        try:
            await ws.send_json(
                {"type": "snapshot", "stream_id": stream_id, "stream": state, "segments": snapshot}
            )
            await _forward(ws, updates)
        except (RuntimeError, WebSocketDisconnect):
            return


async def _forward(ws: WebSocket, updates: asyncio.Queue) -> None:
    """Segments and stream events to the watcher until it goes away (any message from it ends too)."""
    leaving = asyncio.create_task(ws.receive())
    try:
        while True:
            getter = asyncio.create_task(updates.get())
            done, _ = await asyncio.wait({getter, leaving}, return_when=asyncio.FIRST_COMPLETED)
            if leaving in done:
                getter.cancel()
                return
            record = getter.result()
            if "event" in record:
                await ws.send_json({"type": "stream", **_stream_json(record)})
            else:
                await ws.send_json({"type": "segment", **segment_json(record)})
    finally:
        leaving.cancel()


@router.get("/history")
async def history(
    offset: int = 0, limit: int = 50, gw: Gateway = Depends(gateway), who: Caller = Depends(caller)
) -> JSONResponse:
    """Past and running streams from PostgreSQL, newest first, each with its talk time per speaker; a
    client key sees only its own streams and jobs."""
    rows = await gw.db(queries.HISTORY_STREAMS, (*who.scope(), max(offset, 0), max(1, min(limit, 500))))
    talk = await _talk_times(gw, [r["stream_id"] for r in rows])
    items = [jsonable(r) | {"talk": talk.get(r["stream_id"], [])} for r in rows]
    return ok({"items": items, "offset": offset, "limit": limit})


@router.get("/history/{stream_id}")
async def history_stream(
    stream_id: str, gw: Gateway = Depends(gateway), who: Caller = Depends(caller)
) -> JSONResponse:
    """One stream from PostgreSQL: its row, talk time per speaker and its current final segments."""
    rows = await gw.db(queries.HISTORY_STREAM, (who.owned("stream", stream_id),))
    if not rows:
        raise ApiError(404, "not_found", f"stream {stream_id!r} is not in the database")
    segments = await gw.db(queries.HISTORY_SEGMENTS, (stream_id,))
    talk = (await _talk_times(gw, [stream_id])).get(stream_id, [])
    return ok(jsonable(rows[0]) | {"talk": talk, "segments": [jsonable(s) for s in segments]})


@router.post("/speakers/check", responses=UPLOAD_ERRORS)
async def check_enrollment(
    name: str = Form(""), files: list[UploadFile] = File(...), gw: Gateway = Depends(gateway)
) -> JSONResponse:
    """Run the enrollment quality gate on samples and say whether they would be accepted; nothing is
    stored. `data.passes` is the verdict, `data.reason` says why in words."""
    audios = [await gw.read_audio(f) for f in files]
    record = enrollment_request(
        "", name, "ADD", [pcm_sample(a) for a in audios], metadata={CHECK_ONLY: "true"}
    )
    record["speaker_id"] = f"check-{record['request_id'][:12]}"
    record["name"] = name or record["speaker_id"]
    result = await gw.request_reply(
        ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, record["speaker_id"], "EnrollmentRequest", record
    )
    return ok(
        {
            "passes": result["accepted"],
            "reason": result["reason"],
            "speech_seconds": result["speech_seconds"],
            "quality": result["quality"],
            "model_id": result["model_id"],
        }
    )


async def _talk_times(gw: Gateway, stream_ids: list[str]) -> dict[str, list[dict]]:
    if not stream_ids:
        return {}
    talk: dict[str, list[dict]] = {}
    for r in await gw.db(queries.TALK_TIMES, (stream_ids,)):
        talk.setdefault(r.pop("stream_id"), []).append(r)
    return talk


def _stream_json(event: dict) -> dict:
    keys = ("stream_id", "event", "at_ms", "audio_seconds", "speakers", "revision", "segments", "reason")
    return {k: event[k] for k in keys}
