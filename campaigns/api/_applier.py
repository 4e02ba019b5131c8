"""Applies stored webhook events to the ledger, in batches, as soon as they are stored.

The loop is woken by each commit of new events (and every second, for events waiting
to be tried again) and applies until nothing is due. It runs in the HTTP service's
process but never on a request's path: answering a webhook waits only for its commit.
Several service processes may run it together (events are claimed with SKIP LOCKED).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from campaigns.engagement import apply_pending
from campaigns.metrics import ServiceMetrics
from campaigns.store import events as store

log = structlog.get_logger(__name__)

IDLE_SECONDS = 1.0
RETENTION_DAYS = 30
"""Settled events are kept this long (the provider retries for about 3 days)."""
PURGE_EVERY_SECONDS = 3600.0
SET_ASIDE_SECONDS = 3600.0
"""How long an event that fails to apply on its own waits before it is tried again."""
# Failures that waiting cures: the database is down, restarting or full.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)


@dataclass
class ApplyStats:
    """Counters since the process started."""

    applied: int = 0
    unmatched: int = 0
    """Events kept as unmatched: their message never appeared in the ledger."""
    waiting_for_their_message: int = 0
    """Tries of events whose message the ledger did not know yet (tried again later)."""
    suppressed: int = 0
    set_aside: int = 0
    """Events that failed to apply on their own, put off by ``SET_ASIDE_SECONDS``."""
    batches: int = 0
    errors: int = 0


class Applier:
    """The background loop; ``poke`` after storing events."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        soft_bounce_limit: int,
        batch: int = 1000,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        """``soft_bounce_limit``: soft bounces in a row that suppress an address;
        ``metrics`` counts what each batch settles (a registry of its own when None)."""
        self._pool = pool
        self._soft_bounce_limit = soft_bounce_limit
        self._batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = ApplyStats()
        self._metrics = metrics or ServiceMetrics()

    def start(self) -> None:
        """Start the loop."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop (a batch in progress rolls back and is applied later)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """New events were stored: apply them now."""
        self._wake.set()

    async def _run(self) -> None:
        delay = IDLE_SECONDS
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            try:
                while await self._apply_once() >= self._batch:
                    pass
                if loop.time() - last_purge > PURGE_EVERY_SECONDS:
                    await store.purge(self._pool, older_than_days=RETENTION_DAYS)
                    last_purge = loop.time()
                delay = IDLE_SECONDS
            except asyncpg.DeadlockDetectedError:
                delay = 0.05  # lost a race with the send path: try again at once
            except _TRANSIENT as error:  # the database is down: try again later
                self.stats.errors += 1
                delay = min(max(delay * 2, IDLE_SECONDS), 30.0)
                log.warning(
                    "webhook events not applied",
                    error=type(error).__name__,
                    sqlstate=getattr(error, "sqlstate", None),
                    retry_in_seconds=delay,
                )
            except Exception as error:
                # Something in the batch the rules cannot take: apply one event at a
                # time and set aside the one that fails, so the rest is not held up.
                self.stats.errors += 1
                log.warning("webhook batch failed; applying one by one", error=type(error).__name__)
                try:
                    await self._isolate()
                except Exception as again:
                    log.warning("webhook events not applied", error=type(again).__name__)
                delay = 0.05

    async def _isolate(self) -> None:
        """Apply due events one by one until one fails alone; set that one aside."""
        for _ in range(self._batch):
            try:
                if await self._apply_once(limit=1) == 0:
                    return
            except _TRANSIENT:
                raise
            except Exception as error:
                async with self._pool.acquire() as conn:
                    seq = await store.defer_first_due(conn, seconds=SET_ASIDE_SECONDS)
                self.stats.set_aside += seq is not None
                log.error(
                    "webhook event set aside: it cannot be applied",
                    seq=seq,
                    error=type(error).__name__,
                    retry_in_seconds=SET_ASIDE_SECONDS,
                )
                return

    async def _apply_once(self, limit: int | None = None) -> int:
        async with self._pool.acquire() as conn:
            decided = await apply_pending(
                conn,
                soft_bounce_limit=self._soft_bounce_limit,
                limit=limit or self._batch,
                now=datetime.now(UTC),
            )
        if decided is None:
            return 0
        outcomes = list(decided.settled.values())
        unmatched = outcomes.count("unmatched")
        self.stats.applied += outcomes.count("applied")
        self.stats.unmatched += unmatched
        self.stats.waiting_for_their_message += len(decided.retry_in)
        self.stats.suppressed += len(decided.suppressions)
        self.stats.batches += 1
        self._metrics.applied(
            applied=outcomes.count("applied"),
            unmatched=unmatched,
            retries=len(decided.retry_in),
            suppressions=len(decided.suppressions),
        )
        if unmatched:
            # Kept in webhook_events (outcome 'unmatched'), never lost.
            log.warning("webhook events name no message we sent", events=unmatched)
        return len(decided.settled) + len(decided.retry_in)
