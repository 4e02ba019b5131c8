"""Group commit: many webhook requests, one INSERT, and each answered after its commit.

A request puts its event on ``pending`` and waits for the commit that holds it. Up to
``writers`` flush loops each take what has gathered (at most ``max_batch`` events) and
store it in one statement; while one commits, the next batch gathers, so the database
sees a few large statements instead of thousands of small transactions, and no
request waits for a timer. The queue is bounded: past ``max_pending`` a request is
refused at once (503) and the provider retries it later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import structlog

from campaigns.metrics import ServiceMetrics
from campaigns.store import events as store
from campaigns.store.events import NewEvent

log = structlog.get_logger(__name__)


class Overloaded(Exception):
    """Too many events wait to be stored: answer 503 and let the provider retry."""


class Unstorable(Exception):
    """The database refuses this event's values (SQLSTATE class 22): answer 400, since a
    retry cannot succeed. The other events of its batch are stored without it."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"the event holds a value the database cannot store ({sqlstate})")
        self.sqlstate = sqlstate


def _is_data_error(error: BaseException) -> bool:
    return str(getattr(error, "sqlstate", "") or "").startswith("22")


@dataclass
class IngestStats:
    """Counters since the process started."""

    stored: int = 0
    duplicates: int = 0
    failed_commits: int = 0
    statements: int = 0


@dataclass
class _Waiting:
    event: NewEvent
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Ingester:
    """Stores events in batches; ``submit`` returns once the event is durable."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 500,
        max_pending: int = 20_000,
        writers: int = 3,
        on_stored: Callable[[], None] | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        """``on_stored`` is called after each commit that stored new events; ``metrics``
        counts what each commit stored (a registry of its own when None)."""
        self._pool = pool
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._writers = writers
        self._on_stored = on_stored
        self._pending: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = IngestStats()
        self._metrics = metrics or ServiceMetrics()

    def start(self) -> None:
        """Start the flush loops."""
        self._tasks = [asyncio.create_task(self._flush_loop()) for _ in range(self._writers)]

    async def stop(self) -> None:
        """Stop the flush loops; requests still waiting are failed (not answered 2xx)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiting in self._pending:
            if not waiting.done.done():
                waiting.done.set_exception(Overloaded("the service is stopping"))
        self._pending.clear()

    @property
    def pending(self) -> int:
        """Events received but not yet committed."""
        return len(self._pending)

    def submit(self, event: NewEvent) -> asyncio.Future[bool]:
        """A future that resolves once ``event`` is committed: True if it was new,
        False if a duplicate; it fails if the commit failed (the database is down).

        Raises:
            Overloaded: the queue is full.
        """
        if len(self._pending) >= self._max_pending:
            raise Overloaded(f"more than {self._max_pending} events wait to be stored")
        waiting = _Waiting(event)
        self._pending.append(waiting)
        self._wake.set()
        return waiting.done

    async def _flush_loop(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            await self._flush(batch)

    async def _flush(self, batch: list[_Waiting]) -> None:
        try:
            new = await store.insert(self._pool, [w.event for w in batch])
        except Exception as error:
            if _is_data_error(error):
                await self._store_one_by_one(batch)
                return
            # The database is unreachable: 503, the provider retries.
            self.stats.failed_commits += 1
            self._metrics.commit_failures.inc()
            log.warning(
                "webhook events not stored",
                events=len(batch),
                error=type(error).__name__,
                sqlstate=getattr(error, "sqlstate", None),
            )
            for waiting in batch:
                if not waiting.done.done():
                    waiting.done.set_exception(error)
            return
        self._settle(batch, new)

    async def _store_one_by_one(self, batch: list[_Waiting]) -> None:
        """One event of ``batch`` broke the statement: store each alone, and refuse the
        ones the database refuses."""
        for waiting in batch:
            try:
                new = await store.insert(self._pool, [waiting.event])
            except Exception as error:
                self.stats.failed_commits += 1
                if not waiting.done.done():
                    waiting.done.set_exception(
                        Unstorable(getattr(error, "sqlstate", None))
                        if _is_data_error(error)
                        else error
                    )
                continue
            self._settle([waiting], new)

    def _settle(self, batch: list[_Waiting], new: set[str]) -> None:
        self.stats.statements += 1
        seen: set[str] = set()
        stored_before = self.stats.stored
        for waiting in batch:
            svix_id = waiting.event.svix_id
            is_new = svix_id in new and svix_id not in seen
            seen.add(svix_id)
            self.stats.stored += is_new
            self.stats.duplicates += not is_new
            if not waiting.done.done():
                waiting.done.set_result(is_new)
        stored = self.stats.stored - stored_before
        self._metrics.stored(stored, len(batch) - stored)
        if new and self._on_stored is not None:
            self._on_stored()
