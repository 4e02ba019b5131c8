"""A provider that answers ``POST /{mode}/emails/batch`` as badly as it can.

Each answer ``mode`` is the first path segment, so one server serves every test and a
client picks its misbehaviour by its base URL (``server.url("missing-id")``). Error
answers echo what a careless provider might: the Authorization header, a recipient's
address, a secret-looking token in the error name, and a message of 200 KB.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

SECRET_TOKEN = "sk_live_" + "5ecret" * 6
"""A secret-looking token the provider puts into its error name."""
LONG_MESSAGE_CHARS = 200_000
TRICKLE_INTERVAL_SECONDS = 0.2
"""One byte this often: far below any per-read timeout, far beyond a total deadline."""
TRICKLE_MAX_SECONDS = 120.0
"""The trickle gives up on its own after this long, whoever is still listening."""

_BOMB = gzip.compress(b"0" * 50_000_000, compresslevel=9)
"""50 MB of zeros in about 50 KB: under the size limit until decompressed."""

_Handler = Callable[[web.Request, list[dict[str, Any]]], Awaitable[web.StreamResponse]]


def _ids(count: int) -> dict[str, Any]:
    return {"data": [{"id": f"msg-{n:04d}"} for n in range(count)]}


def _json(body: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=json.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _echo(request: web.Request, emails: list[dict[str, Any]]) -> dict[str, Any]:
    """An error body that echoes the caller's secret, a recipient and 200 KB of text."""
    address = emails[0]["to"][0] if emails else "nobody@example.com"
    authorization = request.headers.get("Authorization", "")
    echoed = f"{authorization} for {address}: "
    return {
        "statusCode": 0,
        "name": f"Bearer {SECRET_TOKEN} {address}",
        "message": (echoed * (LONG_MESSAGE_CHARS // len(echoed) + 1))[:LONG_MESSAGE_CHARS],
    }


async def _trickle(request: web.Request, emails: list[dict[str, Any]]) -> web.StreamResponse:
    """200 and a body of one byte every TRICKLE_INTERVAL_SECONDS, never complete."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    until = loop.time() + TRICKLE_MAX_SECONDS
    try:
        while loop.time() < until:
            await response.write(b" ")
            await asyncio.sleep(TRICKLE_INTERVAL_SECONDS)
    except (ConnectionError, RuntimeError):
        pass  # the client gave up, as it should
    return response


async def _big(request: web.Request, emails: list[dict[str, Any]]) -> web.StreamResponse:
    """200 and a 2 MB body sent in chunks, with no Content-Length to refuse it by."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        await response.write(b'{"data": [], "padding": "')
        for _ in range(32):
            await response.write(b"x" * 65_536)
        await response.write(b'"}')
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return response


def _simple(make: Callable[[web.Request, list[dict[str, Any]]], web.Response]) -> _Handler:
    async def handler(request: web.Request, emails: list[dict[str, Any]]) -> web.StreamResponse:
        return make(request, emails)

    return handler


def _echo_error(status: int) -> _Handler:
    def make(request: web.Request, emails: list[dict[str, Any]]) -> web.Response:
        return _json({**_echo(request, emails), "statusCode": status}, status=status)

    return _simple(make)


MODES: dict[str, _Handler] = {
    "ok": _simple(lambda r, e: _json(_ids(len(e)))),
    "not-json": _simple(lambda r, e: web.Response(text="<html>gateway</html>", status=200)),
    "no-data": _simple(lambda r, e: _json({"object": "list"})),
    "data-not-list": _simple(lambda r, e: _json({"data": {"id": "msg-1"}})),
    "not-an-object": _simple(lambda r, e: _json([{"id": "msg-1"}])),
    "wrong-length": _simple(lambda r, e: _json(_ids(len(e) + 1))),
    "missing-id": _simple(lambda r, e: _json({"data": [{"object": "email"} for _ in e]})),
    "item-not-object": _simple(lambda r, e: _json({"data": ["msg-1" for _ in e]})),
    "id-not-string": _simple(lambda r, e: _json({"data": [{"id": n} for n in range(len(e))]})),
    "id-huge": _simple(lambda r, e: _json({"data": [{"id": "m" * 10_000} for _ in e]})),
    "id-address": _simple(lambda r, e: _json({"data": [{"id": x["to"][0]} for x in e]})),
    "big-declared": _simple(lambda r, e: web.Response(body=b"x" * 2_000_000, status=200)),
    "big": _big,
    "gzip-bomb": _simple(
        lambda r, e: web.Response(
            body=_BOMB, status=200, headers={"Content-Encoding": "gzip"}, content_type="text/plain"
        )
    ),
    "trickle": _trickle,
    "redirect": _simple(
        lambda r, e: web.Response(
            status=302, headers={"Location": f"http://127.0.0.1:1/{SECRET_TOKEN}/emails/batch"}
        )
    ),
    "echo-401": _echo_error(401),
    "echo-404": _echo_error(404),
    "echo-409": _echo_error(409),
    "echo-422": _echo_error(422),
    "echo-429": _echo_error(429),
    "echo-500": _echo_error(500),
    "html-500": _simple(
        lambda r, e: web.Response(
            text=f"<html>{r.headers.get('Authorization')} {'z' * LONG_MESSAGE_CHARS}</html>",
            status=500,
        )
    ),
    "token-422": _simple(
        lambda r, e: _json(
            {"statusCode": 422, "name": "validation_error", "message": _echo(r, e)["message"]},
            status=422,
        )
    ),
    "retry-after-forever": _simple(
        lambda r, e: _json(
            {"statusCode": 429, "name": "rate_limit_exceeded", "message": "slow down"},
            status=429,
            **{"Retry-After": "1e308"},
        )
    ),
}


class HostileProvider:
    """The server; ``requests`` counts the batch requests each mode answered."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> HostileProvider:
        """Listen on 127.0.0.1, on a port of the system's choosing."""
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/{mode}/emails/batch", self._batch)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, mode: str) -> str:
        """The base URL under which the provider answers in ``mode``."""
        if mode not in MODES:
            raise KeyError(f"unknown mode {mode!r}")
        return f"{self.base}/{mode}"

    async def requested(self, mode: str, at_least: int) -> None:
        """Return once ``mode`` has answered ``at_least`` requests (bound it by a timeout)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.requests[mode] >= at_least)

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        async with self._arrived:
            self.requests[mode] += 1
            self._arrived.notify_all()
        emails = await request.json()
        return await MODES[mode](request, emails)
