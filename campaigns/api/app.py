"""The HTTP service: provider webhooks, one-click unsubscribe, health.

Routes:

* ``POST /webhooks/resend``: the provider's signed events (``webhooks.py``, plain
  ASGI in front of the Starlette app: it takes the bursts);
* ``GET|POST /u/{token}``: one-click unsubscribe (``unsubscribe.py``);
* ``GET /healthz``: the process is up; ``GET /readyz``: PostgreSQL answers and the
  schema is current, with the event backlog;
* ``GET /metrics``: Prometheus metrics (``campaigns.metrics``; ``API_METRICS=false``
  removes it). Keep it off the public side of the TLS proxy: only the webhook and
  unsubscribe paths need to be reachable from the internet.

Every request body is bounded (``BodyLimit``: 413 past the limit, whatever
Content-Length says) and so are the headers (431). Errors are JSON ``{"error": code,
"message": text}``, but for the unsubscribe pages (HTML for people, see
``unsubscribe.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from campaigns import store
from campaigns.api._applier import Applier
from campaigns.api._ingest import Ingester
from campaigns.api._resend_events import MAX_WEBHOOK_BYTES, SignatureCheck
from campaigns.api.unsubscribe import ROUTES as unsubscribe_routes
from campaigns.api.webhooks import WebhookFrontDoor
from campaigns.metrics import ServiceMetrics
from campaigns.settings import Settings
from campaigns.store import events as event_rows
from campaigns.unsubscribe import UnsubscribeLinks

log = structlog.get_logger("api")


def error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    """The service's one error shape."""
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when a body passes the limit."""


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413.

    Content-Length is checked first; a chunked or lying body is counted as it is read.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        """Wrap ``app``."""
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await self._too_large(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        log.info("request refused", path=scope.get("path"), status=413, reason="body_too_large")
        response = error(
            413, "body_too_large", f"the request body is over the limit of {self.limit} bytes"
        )
        await response(scope, receive, send)


async def healthz(request: Request) -> Response:
    """The process answers."""
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    """PostgreSQL answers with the current schema; the webhook backlog."""
    pool = request.app.state.pool
    try:
        await store.require_current_schema(pool)
        backlog = await event_rows.backlog(pool)
    except Exception as exc:
        return error(503, "database_unavailable", f"PostgreSQL is not ready: {type(exc).__name__}")
    ingester: Ingester = request.app.state.ingester
    return JSONResponse(
        {
            "ok": True,
            "database": "ok",
            "events_waiting_to_store": ingester.pending,
            "events_waiting_to_apply": asdict(backlog),
            # This process's counts since it started.
            "stored": asdict(ingester.stats),
            "applied": asdict(request.app.state.applier.stats),
            "webhooks": request.app.state.signature is not None,
        }
    )


BACKLOG_READ_SECONDS = 2.0
"""The longest a scrape waits for the backlog count before answering without it."""


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics: this process's webhook counters and the stored backlog."""
    service: ServiceMetrics = request.app.state.metrics
    try:
        async with asyncio.timeout(BACKLOG_READ_SECONDS):
            backlog = await event_rows.backlog(request.app.state.pool)
        service.set_backlog(backlog.due, backlog.waiting)
    except Exception:  # the database is down: the counters are still worth serving
        service.set_backlog(None, None)
    service.pending_store.set(request.app.state.ingester.pending)
    return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)


async def _not_found(request: Request, exc: Exception) -> Response:
    path = request.url.path
    if path.startswith("/u/"):
        path = "/u/…"  # the rest is a token: never echoed
    return error(404, "not_found", f"no such endpoint: {request.method} {path[:200]}")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error(exc.status_code, code, str(exc.detail))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("request failed", path=request.url.path, error=type(exc).__name__)
    return error(500, "internal_error", "the service failed to handle the request")


def create_app(settings: Settings, *, pool_size: int = 10) -> ASGIApp:
    """The ASGI app; its lifespan opens the pool and runs the ingester and applier.

    Raises:
        ValueError: a webhook or unsubscribe setting is wrong (the message names it).
    """
    signature = (
        SignatureCheck(settings.webhook_secret.get_secret_value())
        if settings.webhook_secret is not None
        else None
    )
    # Raises UnsubscribeConfigError (a ValueError) naming the variable: every message
    # links here, so the service does not start without it.
    unsubscribe = UnsubscribeLinks.from_settings(settings)
    service_metrics = ServiceMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        database_url = settings.require_database_url()
        # min_size 0: the service starts (healthz answers) before PostgreSQL does.
        pool = await store.create_pool(database_url, min_size=0, max_size=pool_size)
        applier = Applier(
            pool, soft_bounce_limit=settings.soft_bounce_limit, metrics=service_metrics
        )
        ingester = Ingester(pool, on_stored=applier.poke, metrics=service_metrics)
        app.state.pool, app.state.ingester, app.state.applier = pool, ingester, applier
        app.state.metrics = service_metrics
        app.state.signature, app.state.unsubscribe = signature, unsubscribe
        ingester.start()
        applier.start()
        log.info(
            "api started",
            webhooks="on" if signature else "off: WEBHOOK_SECRET is not set",
        )
        try:
            yield
        finally:
            await ingester.stop()
            await applier.stop()
            await pool.close()

    routes: list[Any] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *unsubscribe_routes,
    ]
    if settings.api_metrics:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, HTTPException: _http_error, 500: _server_error},
    )
    app.router.redirect_slashes = False  # a redirect would repeat a token in Location
    app.add_middleware(BodyLimit, limit=MAX_WEBHOOK_BYTES)
    return WebhookFrontDoor(app, service_metrics)
