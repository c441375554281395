"""The HTTP + WebSocket gateway (FastAPI): `create_app` builds it over the same topics as the CLI."""

from speakerflow.streams.api.app import create_app
from speakerflow.streams.api.jobs import remove_expired_exports

__all__ = ["create_app", "remove_expired_exports"]
