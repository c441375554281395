"""Files as streams (jobs): an upload is played into the audio topic as a stream, its identified segments
come back through the result hub, and the job's row and segments are read from PostgreSQL. Exported
clips (`export_segments=true`) are the only raw audio kept, and only for the retention period."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from speakerflow.streams import queries
from speakerflow.streams.api.gateway import (
    COMMON_ERRORS,
    SAMPLE_RATE,
    UPLOAD_ERRORS,
    ApiError,
    Caller,
    Gateway,
    caller,
    gateway,
    jsonable,
    ok,
    safe_name,
    segment_json,
    valid_id,
)
from speakerflow.streams.api.live import cut_recording, recording_of
from speakerflow.streams.topology import SEGMENTS_IDENTIFIED, STREAMS

router = APIRouter(responses=COMMON_ERRORS)
OFFSET_MAX = 2**31 - 1


def _upload_route(kind: str) -> None:
    """POST /identify and POST /diarize: the same job, named after what the caller wants from it."""

    async def endpoint(
        request: Request,
        file: UploadFile = File(...),
        sync: bool = Form(True),
        export_segments: bool = Form(False),
        gw: Gateway = Depends(gateway),
        who: Caller = Depends(caller),
    ) -> JSONResponse:
        return await submit(request, gw, kind, file, sync, export_segments, who)

    router.post(f"/{kind}", name=kind, responses=UPLOAD_ERRORS)(endpoint)


for _kind in ("identify", "diarize"):
    _upload_route(_kind)


@router.get("/jobs")
async def list_jobs(
    offset: int = Query(0, ge=0, le=OFFSET_MAX),
    limit: int = Query(50, ge=1, le=500),
    gw: Gateway = Depends(gateway),
    who: Caller = Depends(caller),
) -> JSONResponse:
    """Jobs newest first; a client key sees only its own (ids `owner.*`)."""
    rows = await gw.db(queries.LIST_JOBS, (*who.scope(), offset, limit))
    return ok({"items": [jsonable(r) for r in rows], "offset": offset, "limit": limit})


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, gw: Gateway = Depends(gateway), who: Caller = Depends(caller)) -> JSONResponse:
    rows = await gw.db(queries.GET_JOB, (who.owned("job", valid_id("job_id", job_id)),))
    if not rows:
        raise ApiError(404, "not_found", f"job {job_id!r} does not exist")
    segments = await gw.db(queries.JOB_SEGMENTS, (job_id,))
    clips = gw.export_dir / job_id
    for seg in segments:
        if (clips / f"{safe_name(seg['segment_id'])}.wav").is_file():
            seg["audio_url"] = f"/segments/{job_id}/audio/{seg['segment_id']}"
    return ok(jsonable(rows[0]) | {"segments": [jsonable(s) for s in segments]})


@router.get(
    "/segments/{job_id}/audio/{segment_id}",
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}}, "description": "The segment's audio (WAV)."}},
)
async def segment_audio(
    job_id: str, segment_id: str, gw: Gateway = Depends(gateway), who: Caller = Depends(caller)
) -> Response:
    """The exported clip of a job's segment, or the segment cut from a live call's kept PCM (WebSocket
    with `?export_segments=true`)."""
    who.owned("job", valid_id("job_id", job_id))
    valid_id("segment_id", segment_id)
    path = gw.export_dir / safe_name(job_id) / f"{safe_name(segment_id)}.wav"
    if path.is_file():
        return FileResponse(path, media_type="audio/wav")
    recording = recording_of(gw.export_dir / safe_name(job_id))
    span = await _segment_span(gw, job_id, segment_id) if recording else None
    if recording is None or span is None:
        raise ApiError(
            404,
            "not_found",
            "no audio kept for this segment (post with export_segments=true, or stream with "
            "?export_segments=true)",
        )
    return Response(await asyncio.to_thread(cut_recording, recording, *span), media_type="audio/wav")


async def _segment_span(gw: Gateway, stream_id: str, segment_id: str) -> tuple[float, float] | None:
    """Start and end of a segment: from the live records the hub holds, else from PostgreSQL."""
    for record in gw.hub.live.segments(stream_id):
        if record["segment_id"] == segment_id:
            return record["start_s"], record["end_s"]
    rows = await gw.db(queries.SEGMENT_SPAN, (stream_id, segment_id))
    return (rows[0]["start_s"], rows[0]["end_s"]) if rows else None


async def submit(
    request: Request,
    gw: Gateway,
    kind: str,
    file: UploadFile,
    sync: bool,
    export_segments: bool,
    who: Caller,
) -> JSONResponse:
    audio = await gw.read_audio(file)
    # A client key's jobs carry its owner prefix, like its live streams, so that only it can read them.
    job_id = f"{'' if who.admin else who.prefix}{kind}-{uuid.uuid4().hex[:12]}"
    await gw.db(
        queries.INSERT_JOB,
        (job_id, kind, len(audio) / SAMPLE_RATE, json.dumps({"filename": file.filename or ""})),
    )
    job = asyncio.create_task(run_job(gw, job_id, audio, export_segments))
    if not sync:
        app = request.app
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


async def run_job(gw: Gateway, job_id: str, audio: np.ndarray, export: bool) -> list[dict]:
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
                await gw.db(queries.FAIL_JOB, (job_id,))
                raise ApiError(504, "timeout", f"job {job_id} did not finish in time") from None
            if "event" in record:
                if record["event"] == "FAILED":
                    raise ApiError(422, "stream_failed", record["reason"] or "the stream failed")
                if record["event"] == "ENDED":
                    ended = record  # identified segments may still be on their way (other topic)
            elif record["is_final"]:
                final[record["segment_id"]] = record
    revision = ended["revision"]
    segments = sorted((s for s in final.values() if s["revision"] == revision), key=lambda s: s["start_s"])
    out = [segment_json(s) for s in segments]
    if export:
        await asyncio.to_thread(_export_clips, gw.export_dir / job_id, audio, out)
    return out


def _publish_audio(gw: Gateway, stream_id: str, audio: np.ndarray, chunk_s: float = 1.0) -> None:
    from speakerflow.streams.client import play_audio

    play_audio(gw.publisher, stream_id, audio, chunk_s=chunk_s, realtime=False)


def _count(segments: dict[str, dict], revision: int) -> int:
    return sum(1 for s in segments.values() if s["revision"] == revision)


def _export_clips(folder: Path, audio: np.ndarray, segments: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seg in segments:
        clip = audio[int(seg["start_s"] * SAMPLE_RATE) : int(seg["end_s"] * SAMPLE_RATE)]
        sf.write(folder / f"{safe_name(seg['segment_id'])}.wav", clip, SAMPLE_RATE, subtype="PCM_16")
        seg["audio_url"] = f"/segments/{seg['stream_id']}/audio/{seg['segment_id']}"


async def expire_exports(folder: Path, retention_h: float, every_s: float = 600.0) -> None:
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
