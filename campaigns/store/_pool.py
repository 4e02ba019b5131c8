"""asyncpg pools with JSON codecs installed."""

from __future__ import annotations

import json
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy
"""What a store function runs its statements on: one connection, or any of a pool's."""

Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
"""One connection (its own or a pool's): what a function that opens a transaction takes."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool whose connections decode json/jsonb into Python objects."""
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection
    )


async def connect(dsn: str) -> asyncpg.Connection:
    """Open one connection with the same codecs as the pool."""
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    return conn
