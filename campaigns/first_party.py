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

from campaigns.models import RefreshResult
from campaigns.store import first_party as store
from campaigns.store._pool import Conn
from campaigns.store.first_party import Snapshot

log = structlog.get_logger(__name__)

FIRST_PARTY_FLAG = "first_party"
KNOWN_STATES = ("on", "off")
SLOW_REFRESH_MS = 500.0
VERY_SLOW_REFRESH_MS = 1000.0
SAMPLE = 50  # how many added/removed org ids a result lists
BOOTSTRAP_WAIT_SECONDS = 5.0  # the longest a batch waits for the first snapshot
BOOTSTRAP_BACKOFF_SECONDS = 60.0  # after a failed bootstrap, batches use the shared domain


class RefreshRefused(ValueError):
    """The data cannot make a trustworthy set; the previous snapshot stays in use."""


async def refresh_first_party_orgs(conn: Conn) -> RefreshResult:
    """Compute and publish the first-party set in one statement.

    Logs a warning past 500 ms and an error past 1 s, with the counts.

    Raises:
        RefreshRefused: a flag has an unknown state, or there are no orgs at all.
    """
    started = perf_counter()
    row = await store.refresh(conn, FIRST_PARTY_FLAG, list(KNOWN_STATES), SAMPLE)
    duration_ms = (perf_counter() - started) * 1000
    if row.unknown:
        raise RefreshRefused(
            f"flag '{FIRST_PARTY_FLAG}' has unknown states ({', '.join(row.unknown)}); "
            f"expected one of {', '.join(KNOWN_STATES)}. The previous snapshot stays in use."
        )
    if not row.any_org:
        raise RefreshRefused(
            "the orgs table is empty; refusing to publish an empty first-party set. "
            "The previous snapshot stays in use."
        )
    assert row.version is not None and row.size is not None  # published when valid
    result = RefreshResult(
        version=row.version,
        previous_version=row.previous_version,
        published=row.published,
        size=row.size,
        duration_ms=round(duration_ms, 1),
        added_count=row.added_count,
        added=row.added,
        removed_count=row.removed_count,
        removed=row.removed,
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
        version = await store.current_version(self.pool)
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


async def read_current(conn: Conn) -> Snapshot | None:
    """The current snapshot, read in one statement."""
    return await store.read_current(conn)
