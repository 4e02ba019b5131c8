# ruff: noqa: ASYNC109 - the timeout parameters are httpcore's network-stream interface
"""An httpx transport whose connections are plain asyncio streams.

httpx's default transport reaches sockets through anyio, which rebuilds a dict of
socket attributes (with a ``getpeername`` system call) each time the connection pool
asks whether an idle connection is still usable, several times per request. At
hundreds of requests a second that bookkeeping costs more CPU than the requests. The
same httpx client and the same httpcore pool run here on asyncio streams instead.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx


class _AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        sock = writer.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("timed out reading the response") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("timed out sending the request") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # An idle keep-alive connection with something to read was closed by the server.
            if self._fd < 0 or self._writer.is_closing():
                return True
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            return bool(poller.poll(0))
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


class _AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Pool(httpcore.AsyncConnectionPool):
    """httpcore's pool with its bookkeeping linear in the number of connections.

    Each time a request comes or goes, httpcore 1.0 lists all the pool's connections
    once per idle connection (to count the idle ones, which it miscounts as all): n²
    calls at n connections, 8% of a worker's CPU at 80 requests/s with the 29
    connections a worker held. The same decisions, each connection looked at once.
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        kept: list[httpcore.AsyncConnectionInterface] = []
        idle = 0
        for connection in self._connections:
            if connection.is_closed():
                continue
            if connection.has_expired():
                closing.append(connection)
            elif connection.is_idle() and idle >= self._max_keepalive_connections:
                closing.append(connection)  # surplus idle connections
            else:
                idle += connection.is_idle()
                kept.append(connection)
        self._connections[:] = kept
        kept = self._connections

        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            available = next(
                (c for c in kept if c.can_handle_request(origin) and c.is_available()), None
            )
            if available is None and len(kept) >= self._max_connections:
                surplus = next((c for c in kept if c.is_idle()), None)
                if surplus is None:
                    continue  # stays queued until a connection is free
                kept.remove(surplus)
                closing.append(surplus)
            if available is None:
                available = self.create_connection(origin)
                kept.append(available)
            pool_request.assign_to_connection(available)
        return closing


def asyncio_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An ``httpx.AsyncHTTPTransport`` (HTTP/1.1, TLS verified) on asyncio streams."""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    transport._pool = _Pool(  # noqa: SLF001 - swap the network backend
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_AsyncioBackend(),
    )
    return transport
