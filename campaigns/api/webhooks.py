"""``POST /webhooks/resend``: the provider's signed events, durable before 2xx.

Answers: 200 once the event is committed (``{"stored": true, "duplicate": false}``;
``"duplicate": true`` for an svix-id already stored); 401 for a missing, wrong or
stale signature; 400 for a body that is not an event (naming the field); 413 over the
size limit; 405 for another method; 503 when webhooks are not configured, the
database cannot commit, or too many events wait (the provider retries). Refusals are
logged with their reason, never the body.

This endpoint takes the bursts (thousands of events a second after a big campaign),
so it is plain ASGI in front of the Starlette app: no middleware stack or router on
its path, the body read with its own limit, the answer written directly.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from campaigns.api._ingest import Ingester, Overloaded, Unstorable
from campaigns.api._resend_events import MAX_WEBHOOK_BYTES, Refused, SignatureCheck, parse
from campaigns.metrics import ServiceMetrics

log = structlog.get_logger("api.webhooks")

PATH = "/webhooks/resend"
COMMIT_WAIT_SECONDS = 10.0
"""The longest a request waits for its commit before answering 503."""
_SIGNATURE_HEADERS = {b"svix-id", b"svix-timestamp", b"svix-signature"}
_STORED = orjson.dumps({"stored": True, "duplicate": False})
_DUPLICATE = orjson.dumps({"stored": True, "duplicate": True})


async def _answer(send: Send, status: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _RefusalLog:
    """One line per refusal, but at most ``per_window`` per reason each ``window``
    seconds: a flood of bad requests must not become a flood of log lines. The lines
    left out are counted in the next one."""

    def __init__(self, per_window: int = 20, window: float = 10.0) -> None:
        self._per_window, self._window = per_window, window
        self._seen: dict[str, tuple[float, int, int]] = {}  # reason -> start, logged, left out

    def __call__(self, status: int, code: str) -> None:
        now = time.monotonic()
        start, logged, left_out = self._seen.get(code, (now, 0, 0))
        if now - start >= self._window:
            start, logged = now, 0
        if logged < self._per_window:
            log.info("webhook refused", status=status, reason=code, not_logged_before=left_out)
            self._seen[code] = (start, logged + 1, 0)
        else:
            self._seen[code] = (start, logged, left_out + 1)


_log_refusal = _RefusalLog()


MAX_HEADER_BYTES = 16 * 1024
"""All request headers together, on every endpoint of the service."""


def _header_bytes(scope: Scope) -> int:
    return sum(len(name) + len(value) for name, value in scope["headers"])


class _TooLarge(Exception):
    pass


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_WEBHOOK_BYTES):
            raise _TooLarge
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_WEBHOOK_BYTES:
            raise _TooLarge
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


class WebhookFrontDoor:
    """ASGI app: ``POST /webhooks/resend`` here, everything else to ``app``.

    The signature check and the ingester are looked up on ``app.state`` (set by the
    app's lifespan) when a request arrives.
    """

    def __init__(self, app: Any, metrics: ServiceMetrics | None = None) -> None:
        """Wrap the Starlette ``app``; ``metrics`` counts this endpoint's refusals."""
        self.app: ASGIApp = app
        self._state = app.state
        self._metrics = metrics

    async def _refuse(
        self, scope: Scope, send: Send, status: int, code: str, message: str, **headers: str
    ) -> None:
        """Answer a refusal: logged (bounded), counted when it is this endpoint's."""
        _log_refusal(status, code)
        if self._metrics is not None and scope["path"] == PATH:
            self._metrics.refusal(status, code)
        body = orjson.dumps({"error": code, "message": message})
        await _answer(send, status, body, *((k.encode(), v.encode()) for k, v in headers.items()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request or lifespan event."""
        if scope["type"] == "http" and _header_bytes(scope) > MAX_HEADER_BYTES:
            # uvicorn's httptools parser sets no limit of its own; run the service
            # behind a proxy that refuses such requests before they are read whole.
            await self._refuse(
                scope,
                send,
                431,
                "headers_too_large",
                f"the request headers are over the limit of {MAX_HEADER_BYTES} bytes",
            )
            return
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self._refuse(scope, send, 405, "method_not_allowed", "use POST", allow="POST")
            return
        await self._resend(scope, receive, send)

    async def _resend(self, scope: Scope, receive: Receive, send: Send) -> None:
        signature: SignatureCheck | None = self._state.signature
        if signature is None:
            await self._refuse(
                scope,
                send,
                503,
                "webhooks_disabled",
                "webhooks are not configured (WEBHOOK_SECRET)",
            )
            return
        try:
            body = await _read_body(scope, receive)
        except _TooLarge:
            await self._refuse(
                scope,
                send,
                413,
                "body_too_large",
                f"the request body is over the limit of {MAX_WEBHOOK_BYTES} bytes",
            )
            return
        except ConnectionResetError:
            return
        headers = {
            name.decode(): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _SIGNATURE_HEADERS
        }
        now = datetime.now(UTC)
        try:
            event = parse(signature.verify(body, headers, now=now), body, now=now)
        except Refused as refused:
            await self._refuse(scope, send, refused.status, refused.code, refused.message)
            return
        ingester: Ingester = self._state.ingester
        try:
            # A future, not a coroutine: waiting on it costs no task per request.
            is_new = await asyncio.wait_for(ingester.submit(event), timeout=COMMIT_WAIT_SECONDS)
        except Overloaded as exc:
            await self._refuse(scope, send, 503, "overloaded", str(exc), **{"retry-after": "5"})
            return
        except TimeoutError:
            await self._refuse(
                scope, send, 503, "not_stored", "the event could not be stored in time; retry"
            )
            return
        except Unstorable as exc:
            await self._refuse(scope, send, 400, "unstorable_value", str(exc))
            return
        except Exception as exc:
            await self._refuse(
                scope,
                send,
                503,
                "not_stored",
                f"the event could not be stored ({type(exc).__name__})",
            )
            return
        if event.outcome == "ignored":
            payload = {"stored": True, "duplicate": not is_new, "ignored": True}
            await _answer(send, 200, orjson.dumps(payload))
        else:
            await _answer(send, 200, _STORED if is_new else _DUPLICATE)
