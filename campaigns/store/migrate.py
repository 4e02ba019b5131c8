"""Versioned, idempotent schema migrations.

Migrations are the numbered ``migrations/NNNN_name.sql`` files. Each runs in its own
transaction under an advisory lock, so workers and CLIs starting together apply each
one exactly once; a file edited after it was applied is refused by checksum.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from campaigns.store._pool import Conn

_LOCK_KEY = 0x63616D70  # "camp": serializes concurrent migrators
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _load() -> list[Migration]:
    found = []
    for entry in resources.files("campaigns.store").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


MIGRATIONS = _load()
LATEST_VERSION = MIGRATIONS[-1].version


class SchemaOutOfDate(RuntimeError):
    """The database schema is not the one this code needs."""


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; return the names of those applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version     integer PRIMARY KEY,
                   name        text NOT NULL,
                   checksum    text NOT NULL,
                   applied_at  timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for migration in MIGRATIONS:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise SchemaOutOfDate(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(f"{migration.version:04d}_{migration.name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def require_current_schema(conn: Conn) -> None:
    """Raise ``SchemaOutOfDate`` unless every migration has been applied."""
    try:
        version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        version = None
    if version != LATEST_VERSION:
        raise SchemaOutOfDate(
            f"database schema is at version {version or 0}, this code needs {LATEST_VERSION}: "
            "run `campaigns db migrate`"
        )
