"""First-party orgs: the set-based refresh and the send path's view of its snapshot.

An org is first-party when it has at least one API token and its ``first_party``
feature flag is ``on``. The refresh computes the whole set in one SQL statement and,
in that same statement, publishes it as a new snapshot and moves the pointer to it.
Readers resolve the pointer and the snapshot in one statement too, so they see the
previous set or the new one, never part of either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter

import asyncpg
import structlog
from pydantic import BaseModel

log = structlog.get_logger(__name__)

FIRST_PARTY_FLAG = "first_party"
KNOWN_STATES = ("on", "off")
SLOW_REFRESH_MS = 500.0
VERY_SLOW_REFRESH_MS = 1000.0
SAMPLE = 50  # how many added/removed org ids a result lists
BOOTSTRAP_WAIT_SECONDS = 5.0  # the longest a batch waits for the first snapshot
BOOTSTRAP_BACKOFF_SECONDS = 60.0  # after a failed bootstrap, batches use the shared domain

# One statement: validate, compute, publish, swap, diff, clean up. Nothing is written
# when a flag has an unknown state or there are no orgs at all.
#
# * ``states`` is a loose index scan: one probe of org_feature_flags_by_flag per
#   distinct state, so validation does not read every org's flag.
# * ``computed`` is an index-only scan of the 'on' range of org_feature_flags_by_flag
#   merged with an index-only scan of org_tokens_by_org, already in org_id order.
# * The pointer moves only from the snapshot this statement read as ``previous``
#   (compare-and-swap). A concurrent refresh that swapped first wins and this one
#   reports ``published = false``, so the pointer never moves back to a lower version
#   and added/removed are always against the snapshot actually replaced.
# * The diff is one hash full join, and is skipped when the set did not change.
_REFRESH = """
WITH RECURSIVE states AS (
    SELECT min(state) AS state FROM org_feature_flags WHERE flag = $1
    UNION ALL
    SELECT (SELECT min(f.state) FROM org_feature_flags f WHERE f.flag = $1 AND f.state > s.state)
    FROM states s WHERE s.state IS NOT NULL
), unknown AS (
    SELECT u.org_id, s.state
    FROM states s CROSS JOIN LATERAL (
        SELECT f.org_id FROM org_feature_flags f
        WHERE f.flag = $1 AND f.state = s.state ORDER BY f.org_id LIMIT 20
    ) u
    WHERE s.state <> ALL($2::text[])
    ORDER BY u.org_id LIMIT 20
), any_org AS (
    SELECT EXISTS (SELECT 1 FROM orgs) AS present
), publish AS (
    SELECT NOT EXISTS (SELECT 1 FROM unknown) AND (SELECT present FROM any_org) AS ok
), computed AS MATERIALIZED (  -- once, though both org_ids and size read it
    SELECT ARRAY(
        SELECT f.org_id FROM org_feature_flags f
        WHERE f.flag = $1 AND f.state = 'on'
          AND EXISTS (SELECT 1 FROM org_tokens t WHERE t.org_id = f.org_id)
        ORDER BY f.org_id
    ) AS org_ids
), previous AS (
    SELECT s.version, s.org_ids FROM first_party_current c
    JOIN first_party_snapshots s ON s.version = c.version
), snapshot AS (
    INSERT INTO first_party_snapshots (version, org_ids, size)
    SELECT nextval('first_party_snapshot_version'), c.org_ids, cardinality(c.org_ids)
    FROM computed c
    WHERE (SELECT ok FROM publish)
    RETURNING version, org_ids, size, refreshed_at
), pointer AS (
    INSERT INTO first_party_current (singleton, version, refreshed_at)
    SELECT true, version, refreshed_at FROM snapshot
    ON CONFLICT (singleton) DO UPDATE
    SET version = EXCLUDED.version, refreshed_at = EXCLUDED.refreshed_at
    WHERE first_party_current.version = (SELECT version FROM previous)
    RETURNING version
), cleanup AS (
    DELETE FROM first_party_snapshots
    WHERE version < (SELECT version FROM previous) AND EXISTS (SELECT 1 FROM pointer)
), diff AS (
    SELECT n.org_id AS added, o.org_id AS removed
    FROM unnest((SELECT org_ids FROM snapshot)) AS n (org_id)
    FULL JOIN unnest((SELECT org_ids FROM previous)) AS o (org_id) ON o.org_id = n.org_id
    WHERE (n.org_id IS NULL OR o.org_id IS NULL)
      AND (SELECT org_ids FROM snapshot) <> coalesce((SELECT org_ids FROM previous), '{}')
)
SELECT
    (SELECT version FROM snapshot) AS version,
    (SELECT size FROM snapshot) AS size,
    (SELECT version FROM previous) AS previous_version,
    EXISTS (SELECT 1 FROM pointer) AS published,
    (SELECT count(added) FROM diff) AS added_count,
    ARRAY(SELECT added FROM diff WHERE added IS NOT NULL ORDER BY 1 LIMIT $3) AS added,
    (SELECT count(removed) FROM diff) AS removed_count,
    ARRAY(SELECT removed FROM diff WHERE removed IS NOT NULL ORDER BY 1 LIMIT $3) AS removed,
    ARRAY(SELECT org_id || '=' || state FROM unknown) AS unknown,
    (SELECT present FROM any_org) AS any_org
"""

_CURRENT = """
SELECT s.version, s.org_ids, s.refreshed_at
FROM first_party_current c JOIN first_party_snapshots s ON s.version = c.version
"""


class RefreshRefused(ValueError):
    """The data cannot make a trustworthy set; the previous snapshot stays in use."""


class RefreshResult(BaseModel):
    """What a refresh published and what changed since the previous snapshot.

    ``published`` is false when a concurrent refresh swapped the pointer first: this
    one's snapshot (``version``) was written but is not in use.
    """

    version: int
    previous_version: int | None
    published: bool = True
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
    started = perf_counter()
    row = await conn.fetchrow(_REFRESH, FIRST_PARTY_FLAG, list(KNOWN_STATES), SAMPLE)
    duration_ms = (perf_counter() - started) * 1000
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
        published=row["published"],
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
    elif not result.published:
        log.info("first-party refresh superseded by a concurrent one", **fields)
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

    ``bootstrap`` runs one refresh; :meth:`for_batch` calls it only when no snapshot
    was ever published, and never lets it hold up or fail a batch.
    """

    pool: asyncpg.Pool
    bootstrap: Callable[[], Awaitable[object]] | None = None
    bootstrap_wait: float = BOOTSTRAP_WAIT_SECONDS
    bootstrap_backoff: float = BOOTSTRAP_BACKOFF_SECONDS
    clock: Callable[[], float] = time.monotonic
    _snapshot: Snapshot | None = field(default=None)
    _bootstrapping: asyncio.Lock = field(default_factory=asyncio.Lock)
    _no_bootstrap_until: float = field(default=float("-inf"))

    async def current(self) -> Snapshot | None:
        """The current snapshot, or None when none was ever published."""
        version = await self.pool.fetchval("SELECT version FROM first_party_current")
        if version is None:
            return None
        if self._snapshot is None or self._snapshot.version != version:
            self._snapshot = await read_current(self.pool) or self._snapshot
        return self._snapshot

    async def for_batch(self) -> Snapshot | None:
        """The snapshot a batch decides its sender from; None means the shared domain.

        With no snapshot yet, one bootstrap refresh runs for the whole process
        (concurrent batches wait on the same one) and is waited on for at most
        ``bootstrap_wait`` seconds. If it fails, is refused or takes longer, the batch
        goes on without a snapshot, a warning is logged, and no other bootstrap starts
        for ``bootstrap_backoff`` seconds: batches in that time do not wait at all.
        """
        snapshot = await self.current()
        if snapshot is not None or self.bootstrap is None or self._backing_off():
            return snapshot
        async with self._bootstrapping:
            snapshot = await self.current()  # another batch may have just bootstrapped
            if snapshot is not None or self._backing_off():
                return snapshot
            log.info("no first-party snapshot yet: running one refresh")
            error: Exception | None = None
            try:
                await asyncio.wait_for(self.bootstrap(), self.bootstrap_wait)
            except Exception as exc:  # any failure means the shared domain, never a failed batch
                error = exc
            snapshot = await self.current()
            if snapshot is None:
                self._no_bootstrap_until = self.clock() + self.bootstrap_backoff
                log.warning(
                    "no first-party snapshot: sending from the shared domain",
                    error=_describe(error) if error else "the refresh published nothing",
                    waited_at_most_s=self.bootstrap_wait,
                    next_bootstrap_in_s=self.bootstrap_backoff,
                )
            return snapshot

    def _backing_off(self) -> bool:
        return self.clock() < self._no_bootstrap_until


def _describe(error: BaseException) -> str:
    """A one-line reason, including the cause Temporal wraps a workflow failure around."""
    if isinstance(error, TimeoutError):
        return "the refresh did not finish in time"
    cause = getattr(error, "cause", None)
    if cause is not None and str(cause):
        return f"{error}: {_describe(cause)}"
    return str(error) or type(error).__name__


async def read_current(conn: asyncpg.Connection | asyncpg.Pool) -> Snapshot | None:
    """The current snapshot, read in one statement."""
    row = await conn.fetchrow(_CURRENT)
    return Snapshot(row["version"], frozenset(row["org_ids"])) if row else None
