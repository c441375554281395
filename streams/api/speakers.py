"""Speakers (enroll, list, show, delete) and 1:1 verification: requests on the request topics, answers
from the result topics, the list from PostgreSQL.

Enrollment modes: CREATE (the default) makes a new speaker and answers 409 if the id exists; ADD and
REPLACE change an existing speaker the caller names by id, and like DELETE they need an admin key when
keys are configured, so a client cannot merge its audio into someone else's voiceprint.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse

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
    require_admin,
    valid_id,
)
from speakerflow.streams.limits import SAMPLES_MAX, InvalidField, check_name, slug
from speakerflow.streams.records import (
    ALREADY_ENROLLED,
    CREATE_ONLY,
    enrollment_request,
    pcm_sample,
    verification_request,
)
from speakerflow.streams.topology import (
    ENROLLMENT_REQUESTS,
    ENROLLMENT_RESULTS,
    VERIFICATION_REQUESTS,
    VERIFICATION_RESULTS,
)

router = APIRouter(responses=COMMON_ERRORS)
OFFSET_MAX = 2**31 - 1


@router.post("/speakers/enroll", status_code=201, responses=UPLOAD_ERRORS)
async def enroll(
    name: str = Form(...),
    files: list[UploadFile] = File(...),
    speaker_id: str = Form(""),
    mode: str = Form("CREATE", description="CREATE (new speaker), ADD or REPLACE (admin key)"),
    gw: Gateway = Depends(gateway),
    who: Caller = Depends(caller),
) -> JSONResponse:
    mode = mode.upper()
    if mode not in ("CREATE", "ADD", "REPLACE"):
        raise ApiError(422, "invalid_request", "mode must be CREATE, ADD or REPLACE")
    try:
        name = check_name(name).strip()
    except InvalidField as exc:
        raise ApiError(422, "invalid_value", str(exc)) from exc
    if mode != "CREATE":
        require_admin(who, f"mode {mode} (changing an existing speaker)")
        if not speaker_id:
            raise ApiError(422, "invalid_request", f"mode {mode} needs the speaker_id to change")
    speaker_id = valid_id("speaker_id", speaker_id or slug(name))
    if len(files) > SAMPLES_MAX:
        raise ApiError(422, "invalid_request", f"at most {SAMPLES_MAX} files per enrollment")
    if mode == "CREATE" and await gw.db(queries.SPEAKER_EXISTS, (speaker_id,)):
        raise _exists(speaker_id)
    audios = [await gw.read_audio(f) for f in files]
    record = enrollment_request(
        speaker_id, name, "ADD" if mode == "CREATE" else mode, [pcm_sample(a) for a in audios]
    )
    if mode == "CREATE":
        record["metadata"][CREATE_ONLY] = "true"  # the enroll stage checks again against the gallery
    result = await gw.request_reply(
        ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, speaker_id, "EnrollmentRequest", record
    )
    if not result["accepted"] and ALREADY_ENROLLED in (result["reason"] or ""):
        raise _exists(speaker_id)
    if not result["accepted"]:
        raise ApiError(422, "enrollment_rejected", result["reason"] or "rejected")
    return ok(result, 201)


def _exists(speaker_id: str) -> ApiError:
    return ApiError(
        409, "already_enrolled", f"speaker {speaker_id!r} {ALREADY_ENROLLED}; ADD or REPLACE changes it"
    )


@router.get("/speakers")
async def list_speakers(
    offset: int = Query(0, ge=0, le=OFFSET_MAX),
    limit: int = Query(50, ge=1, le=500),
    gw: Gateway = Depends(gateway),
) -> JSONResponse:
    rows = await gw.db(queries.LIST_SPEAKERS, (offset, limit))
    total = (await gw.db(queries.COUNT_SPEAKERS))[0]["n"]
    return ok({"items": [jsonable(r) for r in rows], "offset": offset, "limit": limit, "total": total})


@router.get("/speakers/{speaker_id}")
async def get_speaker(speaker_id: str, gw: Gateway = Depends(gateway)) -> JSONResponse:
    rows = await gw.db(queries.GET_SPEAKER, (valid_id("speaker_id", speaker_id),))
    if not rows:
        raise ApiError(404, "not_found", f"speaker {speaker_id!r} is not enrolled")
    return ok(jsonable(rows[0]))


@router.delete("/speakers/{speaker_id}", responses=UPLOAD_ERRORS)
async def delete_speaker(
    speaker_id: str, gw: Gateway = Depends(gateway), who: Caller = Depends(caller)
) -> JSONResponse:
    require_admin(who, "deleting a speaker")
    if not await gw.db(queries.SPEAKER_EXISTS, (valid_id("speaker_id", speaker_id),)):
        raise ApiError(404, "not_found", f"speaker {speaker_id!r} is not enrolled")
    record = enrollment_request(speaker_id, "", "DELETE", [])
    await gw.request_reply(ENROLLMENT_REQUESTS, ENROLLMENT_RESULTS, speaker_id, "EnrollmentRequest", record)
    return ok({"speaker_id": speaker_id, "deleted": True})


@router.post("/verify", responses=UPLOAD_ERRORS)
async def verify(
    speaker_id: str = Form(...), file: UploadFile = File(...), gw: Gateway = Depends(gateway)
) -> JSONResponse:
    valid_id("speaker_id", speaker_id)
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
