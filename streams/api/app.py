"""HTTP and WebSocket gateway (FastAPI) over the streaming engine and PostgreSQL.

Every response uses the envelope `{success, data, error}`. The gateway does no speech processing of its
own: uploads become records on the request topics (enrollment, verification, audio) and the answers come
back from the result topics through the `ResultHub`; history is read from PostgreSQL. The routes live by
resource: speakers.py (speakers and verification), jobs.py (files as streams), live.py (WebSocket calls).
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

import speakerflow.streams.api.jobs as jobs
import speakerflow.streams.api.live as live
import speakerflow.streams.api.speakers as speakers
from speakerflow.streams.api.gateway import Gateway, fail, ok
from speakerflow.streams.settings import Settings

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

    for module in (speakers, jobs, live):
        app.include_router(module.router)
    return app
