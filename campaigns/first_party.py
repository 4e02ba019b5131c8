"""First-party orgs: the set-based refresh and the send path's view of its snapshot.

An org is first-party when it has at least one API token and its ``first_party``
feature flag is ``on``. The refresh computes the whole set in one SQL statement and,
in that same statement, publishes it as a new snapshot and moves the pointer to it.
Readers resolve the pointer and the snapshot in one statement too, so they see the
previous set or the new one, never part of either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import asyncpg
import structlog
from pydantic import BaseModel

log = structlog.get_logger(__name__)

FIRST_PARTY_FLAG = "first_party"
KNOWN_STATES = ("on", "off")
SLOW_REFRESH_MS = 500.0
VERY_SLOW_REFRESH_MS = 1000.0
SAMPLE = 50  # how many added/removed org ids a result lists

# One statement: validate, compute, publish, swap, diff, clean up. Nothing is written
# when a flag has an unknown state or there are no orgs at all.
_REFRESH = """
WITH unknown AS (
    SELECT org_id, state FROM org_feature_flags
    WHERE flag = $1 AND state <> ALL($2::text[])
    ORDER BY org_id LIMIT 20
), any_org AS (
    SELECT EXISTS (SELECT 1 FROM orgs) AS present
), publish AS (
    SELECT NOT EXISTS (SELECT 1 FROM unknown) AND (SELECT present FROM any_org) AS ok
), computed AS (
    SELECT array_agg(f.org_id ORDER BY f.org_id) AS org_ids
    FROM org_feature_flags f
    WHERE f.flag = $1 AND f.state = 'on'
      AND EXISTS (SELECT 1 FROM org_tokens t WHERE t.org_id = f.org_id)
), previous AS (
    SELECT s.version, s.org_ids FROM first_party_current c
    JOIN first_party_snapshots s ON s.version = c.version
), snapshot AS (
    INSERT INTO first_party_snapshots (version, org_ids, size)
    SELECT nextval('first_party_snapshot_version'),
           coalesce(c.org_ids, '{}'), coalesce(cardinality(c.org_ids), 0)
    FROM computed c
    WHERE (SELECT ok FROM publish)
    RETURNING version, org_ids, size, refreshed_at
), pointer AS (
    INSERT INTO first_party_current (singleton, version, refreshed_at)
    SELECT true, version, refreshed_at FROM snapshot
    ON CONFLICT (singleton) DO UPDATE
    SET version = EXCLUDED.version, refreshed_at = EXCLUDED.refreshed_at
), cleanup AS (
    DELETE FROM first_party_snapshots
    WHERE version < (SELECT version FROM previous) AND EXISTS (SELECT 1 FROM snapshot)
), added AS (
    SELECT unnest(org_ids) AS org_id FROM snapshot
    EXCEPT SELECT unnest(org_ids) FROM previous
), removed AS (
    SELECT unnest(org_ids) AS org_id FROM previous
    EXCEPT SELECT unnest(org_ids) FROM snapshot
)
SELECT
    (SELECT version FROM snapshot) AS version,
    (SELECT size FROM snapshot) AS size,
    (SELECT version FROM previous) AS previous_version,
    (SELECT count(*) FROM added) AS added_count,
    (SELECT array_agg(org_id) FROM (SELECT org_id FROM added ORDER BY 1 LIMIT $3) a) AS added,
    (SELECT count(*) FROM removed) AS removed_count,
    (SELECT array_agg(org_id) FROM (SELECT org_id FROM removed ORDER BY 1 LIMIT $3) r) AS removed,
    (SELECT array_agg(org_id || '=' || state) FROM unknown) AS unknown,
    (SELECT present FROM any_org) AS any_org
"""

_CURRENT = """
SELECT s.version, s.org_ids, s.refreshed_at
FROM first_party_current c JOIN first_party_snapshots s ON s.version = c.version
"""


class RefreshRefused(ValueError):
    """The data cannot make a trustworthy set; the previous snapshot stays in use."""


class RefreshResult(BaseModel):
    """What a refresh published and what changed since the previous snapshot."""

    version: int
    previous_version: int | None
    size: int
    duration_ms: float
    added_count: int
    added: list[str]
    removed_count: int
    removed: list[str]


async def refresh_first_party_orgs(conn: asyncpg.Connection | asyncpg.Pool) -> RefreshResult:
    """Compute and publish the first-party set in one statement.

    Logs a warning past 500 ms and an error past 1 s, with the counts.

    Raises:
        RefreshRefused: a flag has an unknown state, or there are no orgs at all.
    """
    started = time.perf_counter()
    row = await conn.fetchrow(_REFRESH, FIRST_PARTY_FLAG, list(KNOWN_STATES), SAMPLE)
    duration_ms = (time.perf_counter() - started) * 1000
    if row["unknown"]:
        raise RefreshRefused(
            f"flag '{FIRST_PARTY_FLAG}' has unknown states ({', '.join(row['unknown'])}); "
            f"expected one of {', '.join(KNOWN_STATES)}. The previous snapshot stays in use."
        )
    if not row["any_org"]:
        raise RefreshRefused(
            "the orgs table is empty; refusing to publish an empty first-party set. "
            "The previous snapshot stays in use."
        )
    result = RefreshResult(
        version=row["version"],
        previous_version=row["previous_version"],
        size=row["size"],
        duration_ms=round(duration_ms, 1),
        added_count=row["added_count"],
        added=row["added"] or [],
        removed_count=row["removed_count"],
        removed=row["removed"] or [],
    )
    fields = result.model_dump(exclude={"added", "removed"})
    if duration_ms > VERY_SLOW_REFRESH_MS:
        log.error("first-party refresh very slow", **fields)
    elif duration_ms > SLOW_REFRESH_MS:
        log.warning("first-party refresh slow", **fields)
    else:
        log.info("first-party orgs refreshed", **fields, added=result.added, removed=result.removed)
    return result


@dataclass
class Snapshot:
    """One published first-party set."""

    version: int
    org_ids: frozenset[str]


@dataclass
class FirstPartySnapshotCache:
    """The send path's copy of the current snapshot, one per worker process.

    A batch asks which snapshot is current (one primary-key read) and loads the set
    only when the version changed. A refresh never blocks it: until the new pointer
    commits, the previous snapshot is current.
    """

    pool: asyncpg.Pool
    _snapshot: Snapshot | None = field(default=None)

    async def current(self) -> Snapshot | None:
        """The current snapshot, or None when none was ever published."""
        version = await self.pool.fetchval("SELECT version FROM first_party_current")
        if version is None:
            return None
        if self._snapshot is None or self._snapshot.version != version:
            row = await self.pool.fetchrow(_CURRENT)
            if row is None:  # pragma: no cover - pointer moved away between the reads
                return self._snapshot
            self._snapshot = Snapshot(row["version"], frozenset(row["org_ids"]))
        return self._snapshot


async def read_current(conn: asyncpg.Connection | asyncpg.Pool) -> Snapshot | None:
    """The current snapshot, read in one statement."""
    row = await conn.fetchrow(_CURRENT)
    return Snapshot(row["version"], frozenset(row["org_ids"])) if row else None
