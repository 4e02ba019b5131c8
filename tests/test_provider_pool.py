"""The provider transport's connection pool, against a real HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpcore
import httpx
import pytest
from aiohttp import web

from campaigns.provider._transport import _Pool, asyncio_transport
from tests.helpers import eventually


class _Server:
    """Answers after ``delay`` seconds; counts requests in flight and client ports."""

    def __init__(self) -> None:
        self.delay = 0.05
        self.in_flight = 0
        self.most_in_flight = 0
        self.ports: set[int] = set()

    async def answer(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.ports.add(peer[1] if peer else -1)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return web.json_response({"ok": True})


Serve = Callable[[float], Awaitable[tuple[_Server, str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(keepalive_seconds: float) -> tuple[_Server, str]:
        state = _Server()
        app = web.Application()
        app.router.add_post("/emails/batch", state.answer)
        runner = web.AppRunner(app, keepalive_timeout=keepalive_seconds)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return state, f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def test_the_pool_overrides_a_method_httpcore_has() -> None:
    """An httpcore release that renames the bookkeeping must fail here rather than
    quietly bring its own back."""
    assert "_assign_requests_to_connections" in vars(httpcore.AsyncConnectionPool)
    assert "_assign_requests_to_connections" in vars(_Pool)


async def test_many_requests_share_max_connections_and_reuse_them(serve: Serve) -> None:
    state, url = await serve(60)
    transport = asyncio_transport(httpx.Limits(max_connections=4, max_keepalive_connections=4))
    assert isinstance(transport._pool, _Pool)  # noqa: SLF001
    async with httpx.AsyncClient(base_url=url, transport=transport) as http:
        answers = await asyncio.gather(*(http.post("/emails/batch") for _ in range(40)))
        assert [a.status_code for a in answers] == [200] * 40
        assert state.most_in_flight == 4, "queued requests waited for the 4 connections"
        assert len(state.ports) == 4, "each of the 4 connections served ten requests"
        for _ in range(5):
            assert (await http.post("/emails/batch")).status_code == 200
        assert len(state.ports) == 4, "later requests reused a kept connection"


async def test_idle_connections_past_the_keepalive_count_are_closed(serve: Serve) -> None:
    _, url = await serve(60)
    transport = asyncio_transport(httpx.Limits(max_connections=4, max_keepalive_connections=1))
    pool = transport._pool  # noqa: SLF001
    async with httpx.AsyncClient(base_url=url, transport=transport) as http:
        await asyncio.gather(*(http.post("/emails/batch") for _ in range(8)))
        assert (await http.post("/emails/batch")).status_code == 200
        assert len(pool.connections) == 1


async def test_a_connection_the_server_closed_is_dropped_and_a_new_one_serves(
    serve: Serve,
) -> None:
    state, url = await serve(0.2)  # the server closes a keep-alive connection idle 0.2 s
    state.delay = 0.0
    transport = asyncio_transport(httpx.Limits(max_connections=4, max_keepalive_connections=4))
    pool = transport._pool  # noqa: SLF001
    async with httpx.AsyncClient(base_url=url, transport=transport) as http:
        assert (await http.post("/emails/batch")).status_code == 200
        [connection] = pool.connections
        await eventually(
            lambda: asyncio.sleep(0, connection.has_expired()),
            bool,
            within=5,
            every=0.05,
            what="the server closing the idle connection",
        )
        assert (await http.post("/emails/batch")).status_code == 200
        assert len(state.ports) == 2, "the second request went on a new connection"
        assert connection not in pool.connections
