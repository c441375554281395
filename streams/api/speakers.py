"""Speakers (enroll, list, show, delete) and 1:1 verification: requests on the request topics, answers
from the result topics, the list from PostgreSQL."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse

from speakerflow.streams import queries
from speakerflow.streams.api.gateway import ApiError, Gateway, gateway, jsonable, ok
from speakerflow.streams.records import enrollment_request, pcm_sample, verification_request
from speakerflow.streams.topology import (
    ENROLLMENT_REQUESTS,
    ENROLLMENT_RESULTS,
    VERIFICATION_REQUESTS,
    VERIFICATION_RESULTS,
)

router = APIRouter()


@router.post("/speakers/enroll", status_code=201)
async def enroll(
    name: str = Form(...),
    files: list[UploadFile] = File(...),
    speaker_id: str = Form(""),
    mode: str = Form("ADD"),
    gw: Gateway = Depends(gateway),
) -> JSONResponse:
    if mode.upper() not in ("ADD", "REPLACE"):
        raise ApiError(422, "invalid_request", "mode must be ADD or REPLACE")
    audios = [await gw.read_audio(f) for f in files]
    speaker_id = speaker_id or name.strip().lower().replace(" ", "-")
    record = enrollment_request(speaker_id, name, mode.upper(), [pcm_sample(a) for a in audios])
    result = await gw.request_reply(
        ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, speaker_id, "EnrollmentRequest", record
    )
    if not result["accepted"]:
        raise ApiError(422, "enrollment_rejected", result["reason"] or "rejected")
    return ok(result, 201)


@router.get("/speakers")
async def list_speakers(offset: int = 0, limit: int = 50, gw: Gateway = Depends(gateway)) -> JSONResponse:
    limit = max(1, min(limit, 500))
    rows = await gw.db(queries.LIST_SPEAKERS, (max(offset, 0), limit))
    total = (await gw.db(queries.COUNT_SPEAKERS))[0]["n"]
    return ok({"items": [jsonable(r) for r in rows], "offset": offset, "limit": limit, "total": total})


@router.get("/speakers/{speaker_id}")
async def get_speaker(speaker_id: str, gw: Gateway = Depends(gateway)) -> JSONResponse:
    rows = await gw.db(queries.GET_SPEAKER, (speaker_id,))
    if not rows:
        raise ApiError(404, "not_found", f"speaker {speaker_id!r} is not enrolled")
    return ok(jsonable(rows[0]))


@router.delete("/speakers/{speaker_id}")
async def delete_speaker(speaker_id: str, gw: Gateway = Depends(gateway)) -> JSONResponse:
    if not await gw.db(queries.SPEAKER_EXISTS, (speaker_id,)):
        raise ApiError(404, "not_found", f"speaker {speaker_id!r} is not enrolled")
    record = enrollment_request(speaker_id, "", "DELETE", [])
    await gw.request_reply(ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, speaker_id, "EnrollmentRequest", record)
    return ok({"speaker_id": speaker_id, "deleted": True})


@router.post("/verify")
async def verify(
    speaker_id: str = Form(...), file: UploadFile = File(...), gw: Gateway = Depends(gateway)
) -> JSONResponse:
    audio = await gw.read_audio(file)
    record = verification_request(speaker_id, pcm_sample(audio))
    result = await gw.request_reply(
        VERIFICATION_REQUESTS, VERIFICATION_RESULTS, record["request_id"], "VerificationRequest", record
    )
    if result["error"] and "not enrolled" in result["error"]:
        raise ApiError(404, "not_found", result["error"])
    if result["error"]:
        raise ApiError(422, "verification_failed", result["error"])
    return ok(result)
