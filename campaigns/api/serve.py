"""Serving the app with uvicorn: settings from the environment, our log format.

One process by default; ``API_PROCESSES`` (or ``--processes``) runs several that share
the port, each with its own pool, ingester and applier (events are claimed with SKIP
LOCKED, so they never apply one event twice).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog
import uvicorn
from pydantic import ValidationError

from campaigns.api.app import create_app
from campaigns.logs import configure_logging
from campaigns.settings import Settings

log = structlog.get_logger("api")

_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "lifespan": "on",
    # Our own log lines only: an access log would print unsubscribe tokens.
    "access_log": False,
    "log_config": None,
    "server_header": False,
    "proxy_headers": False,  # nothing here uses the client's address
    "timeout_keep_alive": 30,
    "timeout_graceful_shutdown": 10,
}


def server(
    settings: Settings, *, host: str | None = None, port: int | None = None
) -> uvicorn.Server:
    """A uvicorn server for the app in this process (not started)."""
    config = uvicorn.Config(
        create_app(settings),
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        **_OPTIONS,
    )
    return uvicorn.Server(config)


def app_from_environment() -> Any:
    """The app factory each process of a multi-process service calls."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def main(host: str | None = None, port: int | None = None, processes: int | None = None) -> None:
    """Entry point of ``campaigns api`` and ``python -m campaigns.api``; exits 2 on bad
    settings."""
    try:
        settings = Settings()
    except ValidationError as exc:
        configure_logging("INFO", "auto")
        log.error("api cannot start: invalid settings", error=str(exc))
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    if not settings.database_url:
        log.error("api cannot start", error="DATABASE_URL is not set and no local stack runs")
        raise SystemExit(2)
    try:
        instance = server(settings, host=host, port=port)
    except ValueError as exc:
        log.error("api cannot start", error=str(exc))
        raise SystemExit(2) from None
    processes = processes or settings.api_processes
    log.info(
        "api listening", host=instance.config.host, port=instance.config.port, processes=processes
    )
    if processes == 1:
        run(instance.serve())
        return
    uvicorn.run(
        "campaigns.api.serve:app_from_environment",
        factory=True,
        host=instance.config.host,
        port=instance.config.port,
        workers=processes,
        **_OPTIONS,
    )


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it exists (several times less CPU per request)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main)
        return
    uvloop.run(main)
