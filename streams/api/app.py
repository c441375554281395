"""HTTP and WebSocket gateway (FastAPI) over the streaming engine and PostgreSQL.

Every response uses the envelope `{success, data, error}`. The gateway does no speech processing of its
own: uploads become records on the request topics (enrollment, verification, audio) and the answers come
back from the result topics through the `ResultHub`; history is read from PostgreSQL. The routes live by
resource: speakers.py (speakers and verification), jobs.py (files as streams), live.py (WebSocket calls).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import psycopg
from confluent_kafka import KafkaError, KafkaException
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

import speakerflow.streams.api.jobs as jobs
import speakerflow.streams.api.live as live
import speakerflow.streams.api.speakers as speakers
from speakerflow.streams.api.gateway import COMMON_ERRORS, Gateway, fail, ok
from speakerflow.streams.database import is_outage
from speakerflow.streams.runtime import RecordTooLarge
from speakerflow.streams.settings import Settings

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}


def create_app(settings: Settings, database_url: str) -> FastAPI:
    gw = Gateway(settings, database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw.hub.start()
        await asyncio.to_thread(gw.hub.ready.wait, 30)
        janitor = asyncio.create_task(jobs.expire_exports(gw.export_dir, settings.export_retention_h))
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
        if request.url.path not in OPEN_PATHS:
            request.state.caller = gw.caller(request.headers.get("x-api-key", ""))
            if request.state.caller is None:
                return fail(401, "unauthorized", "missing or wrong X-API-Key header")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return fail(exc.status_code, getattr(exc, "code", "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return fail(422, "invalid_request", problems)

    @app.exception_handler(psycopg.Error)
    async def database_error(request: Request, exc: psycopg.Error) -> JSONResponse:
        if is_outage(exc):
            log.warning("database unavailable: %s", exc)
            return fail(503, "database_unavailable", "the database is unavailable; retry later")
        return fail(422, "invalid_value", f"the database refused a value: {str(exc).splitlines()[0]}")

    @app.exception_handler(RecordTooLarge)
    async def record_too_large(request: Request, exc: RecordTooLarge) -> JSONResponse:
        return fail(413, "too_large", str(exc))

    @app.exception_handler(KafkaException)
    async def broker_error(request: Request, exc: KafkaException) -> JSONResponse:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() in (
            KafkaError.MSG_SIZE_TOO_LARGE,
            KafkaError._MSG_SIZE_TOO_LARGE,
        ):
            return fail(413, "too_large", "the audio is too large for one record; send less audio")
        log.warning("broker error: %s", exc)
        return fail(503, "broker_unavailable", "the message broker is unavailable; retry later")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return fail(500, "internal_error", "unexpected error (logged); please report it")

    @app.get("/health", responses=COMMON_ERRORS)
    async def health() -> JSONResponse:
        return ok({"status": "ok", "hub_ready": gw.hub.ready.is_set()})

    for module in (speakers, jobs, live):
        app.include_router(module.router)
    return app
