"""Audiences and their recipients: lookups, counts and the CSV import's staging.

An import stages its rows in a temporary table with COPY, then upserts them in a few
set-based statements, all in one transaction (see ``staged_import``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from campaigns.store._pool import Conn

_BY_NAME = "SELECT id, merge_fields FROM audiences WHERE org_id = $1 AND name = $2"
_COUNT_RECIPIENTS = "SELECT count(*) FROM recipients WHERE audience_id = $1"
_LIST = """SELECT a.org_id, a.name, a.merge_fields,
                      (SELECT count(*) FROM recipients r WHERE r.audience_id = a.id) AS recipients
               FROM audiences a WHERE $1::text IS NULL OR a.org_id = $1
               ORDER BY a.org_id, a.name"""
_MERGE_FIELDS = "SELECT merge_fields FROM audiences WHERE id = $1"

# left_out rows carry only an address seen on a row left out, for ``replace``.
_STAGE = """CREATE TEMP TABLE import_rows (
                   line integer NOT NULL, email text NOT NULL, name text NOT NULL,
                   merge_fields text NOT NULL, left_out boolean NOT NULL) ON COMMIT DROP"""
_STAGED_COLUMNS = ["line", "email", "name", "merge_fields", "left_out"]
_ANALYZE = "ANALYZE import_rows"
_DUPLICATES = """WITH ranked AS (
                   SELECT line, email, min(line) OVER (PARTITION BY email) AS first_line
                   FROM import_rows WHERE NOT left_out)
               SELECT line, email, first_line, count(*) OVER () AS total
               FROM ranked WHERE line <> first_line ORDER BY line LIMIT $1"""
_DROP_DUPLICATES = """DELETE FROM import_rows a USING import_rows b
                   WHERE a.email = b.email AND a.line > b.line
                     AND NOT a.left_out AND NOT b.left_out"""
_UPSERT_AUDIENCE = """INSERT INTO audiences (org_id, name, merge_fields) VALUES ($1, $2, $3)
               ON CONFLICT (org_id, name) DO UPDATE SET
                   merge_fields = ARRAY(SELECT DISTINCT unnest(audiences.merge_fields || $3)
                                        ORDER BY 1),
                   updated_at = now()
               RETURNING id"""
_UPSERT_RECIPIENTS = """WITH upserted AS (
                   INSERT INTO recipients (audience_id, email, name, merge_fields)
                   SELECT $1, email, name, merge_fields::jsonb FROM import_rows
                   WHERE NOT left_out ORDER BY line
                   ON CONFLICT (audience_id, email) DO UPDATE
                   SET name = EXCLUDED.name, merge_fields = EXCLUDED.merge_fields
                   WHERE (recipients.name, recipients.merge_fields)
                         IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.merge_fields)
                   RETURNING (xmax = 0) AS inserted)
               SELECT count(*) FILTER (WHERE inserted) AS inserted,
                      count(*) FILTER (WHERE NOT inserted) AS updated,
                      (SELECT count(*) FROM import_rows WHERE NOT left_out) AS staged
               FROM upserted"""
# Recipients not on a valid row of the file: the audience had them before.
_ABSENT = """WITH absent AS (
                   SELECT r.email FROM recipients r
                   WHERE r.audience_id = $1 AND NOT EXISTS (
                       SELECT 1 FROM import_rows i WHERE i.email = r.email AND NOT i.left_out)),
               spared AS (SELECT DISTINCT email FROM import_rows WHERE left_out)
               SELECT count(*) FILTER (WHERE s.email IS NULL) AS not_in_file,
                      count(s.email) AS on_left_out_rows
               FROM absent a LEFT JOIN spared s USING (email)"""
_REMOVE_ABSENT = """WITH removed AS (
                       DELETE FROM recipients r
                       WHERE r.audience_id = $1 AND NOT EXISTS (
                           SELECT 1 FROM import_rows i WHERE i.email = r.email)
                       RETURNING 1)
                   SELECT count(*) FROM removed"""


@dataclass(frozen=True, slots=True)
class AudienceRef:
    """An audience found by name: its id and the merge fields its recipients carry."""

    id: int
    merge_fields: list[str]


@dataclass(frozen=True, slots=True)
class AudienceSummary:
    """An audience as ``campaigns audience list`` shows it."""

    org_id: str
    name: str
    merge_fields: list[str]
    recipients: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A staged row whose address an earlier line already has; ``total`` counts all."""

    line: int
    email: str
    first_line: int
    total: int


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    """Staged rows (``staged``) and how many became new or changed recipients."""

    inserted: int
    updated: int
    staged: int


@dataclass(frozen=True, slots=True)
class AbsentCounts:
    """Recipients of the audience not on a valid row: on no row, or only on left-out ones."""

    not_in_file: int
    on_left_out_rows: int


StagedRow = tuple[int, str, str, str, bool]
"""(line, email, name, merge fields as JSON text, left out) of one staged row."""


async def by_name(conn: Conn, org: str, name: str) -> AudienceRef | None:
    """The org's audience called ``name``, or None."""
    row = await conn.fetchrow(_BY_NAME, org, name)
    return AudienceRef(row["id"], list(row["merge_fields"])) if row else None


async def count_recipients(conn: Conn, audience_id: int) -> int:
    """How many recipients the audience has."""
    return int(await conn.fetchval(_COUNT_RECIPIENTS, audience_id))


async def list_all(conn: Conn, org: str | None = None) -> list[AudienceSummary]:
    """Every audience (of ``org`` only, if given), with its number of recipients."""
    rows = await conn.fetch(_LIST, org)
    return [
        AudienceSummary(row["org_id"], row["name"], list(row["merge_fields"]), row["recipients"])
        for row in rows
    ]


class ImportStaging:
    """The statements of one import, on its staging table ``import_rows``."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        """Run every statement on ``conn``, inside the import's transaction."""
        self._conn = conn

    async def copy(self, rows: Iterable[StagedRow]) -> None:
        """Stream ``rows`` into the staging table (COPY: memory stays flat)."""
        await self._conn.copy_records_to_table("import_rows", records=rows, columns=_STAGED_COLUMNS)

    async def analyze(self) -> None:
        """Gather statistics, for the plans of the joins that follow."""
        await self._conn.execute(_ANALYZE)

    async def duplicates(self, limit: int) -> list[Duplicate]:
        """Up to ``limit`` valid rows, by line, whose address an earlier row has."""
        rows = await self._conn.fetch(_DUPLICATES, limit)
        return [Duplicate(r["line"], r["email"], r["first_line"], r["total"]) for r in rows]

    async def drop_duplicates(self) -> None:
        """Keep only the first valid row of each address."""
        await self._conn.execute(_DROP_DUPLICATES)

    async def upsert_audience(self, org: str, name: str, merge_fields: list[str]) -> int:
        """Create the audience or add ``merge_fields`` to it; return its id."""
        audience_id: int = await self._conn.fetchval(_UPSERT_AUDIENCE, org, name, merge_fields)
        return audience_id

    async def upsert_recipients(self, audience_id: int) -> UpsertCounts:
        """Insert the valid rows as recipients, updating those that changed."""
        row = await self._conn.fetchrow(_UPSERT_RECIPIENTS, audience_id)
        assert row is not None  # an aggregate: one row, always
        return UpsertCounts(row["inserted"], row["updated"], row["staged"])

    async def absent(self, audience_id: int) -> AbsentCounts:
        """Count the audience's recipients that no valid row of the file carries."""
        row = await self._conn.fetchrow(_ABSENT, audience_id)
        assert row is not None  # an aggregate: one row, always
        return AbsentCounts(row["not_in_file"], row["on_left_out_rows"])

    async def remove_absent(self, audience_id: int) -> int:
        """Remove the recipients on no row of the file (left-out rows spare theirs)."""
        removed: int = await self._conn.fetchval(_REMOVE_ABSENT, audience_id)
        return removed

    async def merge_fields(self, audience_id: int) -> list[str]:
        """The audience's merge fields after the import."""
        return list(await self._conn.fetchval(_MERGE_FIELDS, audience_id))


@asynccontextmanager
async def staged_import(conn: asyncpg.Connection) -> AsyncIterator[ImportStaging]:
    """Open the import's transaction and its staging table (dropped at commit).

    An exception inside the block rolls the whole import back.
    """
    async with conn.transaction():
        await conn.execute(_STAGE)
        yield ImportStaging(conn)
