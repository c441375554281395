"""HTTP and WebSocket gateway (FastAPI) over the streaming engine and PostgreSQL.

Every response uses the envelope `{success, data, error}`. The gateway does no speech processing of its
own: uploads become records on the request topics (enrollment, verification, audio) and the answers come
back from the result topics through the `ResultHub`; history is read from PostgreSQL. The routes live by
resource: speakers.py (speakers and verification), jobs.py (files as streams), live.py (WebSocket calls),
console.py (the web console at `/` and what it reads). /docs is Swagger UI from a wheel, not a CDN.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
from confluent_kafka import KafkaError, KafkaException
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

import speakerflow.streams.api.console as console
import speakerflow.streams.api.jobs as jobs
import speakerflow.streams.api.live as live
import speakerflow.streams.api.speakers as speakers
from speakerflow.streams.api.gateway import COMMON_ERRORS, Gateway, fail, ok
from speakerflow.streams.database import is_outage
from speakerflow.streams.runtime import RecordTooLarge
from speakerflow.streams.settings import Settings

log = logging.getLogger(__name__)

OPEN_PATHS = {"/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
# Static files: the console's pages and Swagger UI's assets hold no data; the data routes want the key.
OPEN_PREFIXES = ("/console/", "/docs-assets/")


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
        docs_url=None,  # served below from the wheel's assets: no CDN, works offline
        redoc_url=None,
    )
    app.state.gateway = gw
    _add_offline_docs(app)
    app.mount("/console", StaticFiles(directory=console.CONSOLE_DIR), name="console")

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        path = request.url.path
        if path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
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

    for module in (speakers, jobs, live, console):
        app.include_router(module.router)
    return app


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI 5 (it reads the OpenAPI 3.1 that FastAPI writes) from the swagger-ui-py wheel's
    assets instead of a CDN, so /docs works offline."""
    spec = importlib.util.find_spec("swagger_ui")
    assets = Path(spec.submodule_search_locations[0]) / "static" if spec else None
    if assets is not None and not (assets / "swagger-ui-bundle.js").is_file():
        assets = None
    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return HTMLResponse(
                "<p>Swagger UI's files are not installed (pip install swagger-ui-py); the API description "
                'is at <a href="/openapi.json">/openapi.json</a>.</p>'
            )
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="speakerflow API",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # the default validator badge calls out
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
