"""This worker process's part in its provider account's shared rate.

The batches of an account run on a task queue whose Temporal rate limit is the
account's rate (over the requests a batch carries), so every worker and campaign
shares it and a worker that dies holds none of it. This object counts the provider's
answers the process sees and, every ``TICK_SECONDS`` while it sends (at once after a
429), adds them to the account's row, where the first process to find the window old
enough decides the next rate (``campaigns.rate_control.decide``). When the rate the
row holds is not the one set on the task queue, the process that sees it sets it; it
sets it again every ``REAPPLY_SECONDS`` while sending, so a Temporal server that lost
it gets it back. It also tells the batches how many requests one attempt may send now
and how far apart.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.service import RPCError

from campaigns import metrics
from campaigns.provider import ProviderReply, ReplyKind
from campaigns.rate_control import TICK_SECONDS, decide, request_spacing
from campaigns.store import accounts
from campaigns.temporal import set_queue_rate_limit

log = structlog.get_logger(__name__)

REAPPLY_SECONDS = 30.0
PACE_FRESH_SECONDS = 0.5
"""A batch's pace is the account's as the process read it at most this long ago (each
report reads it too): a changed limit or rate reaches the batches within a second."""
MIN_REPORT_SPACING_SECONDS = 0.1
"""A 429 reports at once, but never more often than this."""
_QUIET_SECONDS = 30.0
"""A failing report or update is logged at most this often."""


@dataclass(frozen=True, slots=True)
class BatchPace:
    """How one batch sends under the account's limit."""

    requests: int
    """The most requests one attempt sends (the rest wait for its next attempt)."""
    spacing: float
    """Seconds between the starts of its requests."""


class AccountRate:
    """Counts one process's answers and keeps the account's task-queue rate current."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: Client,
        send_task_queue: str,
        account: str = accounts.DEFAULT_ACCOUNT,
    ) -> None:
        """Report to ``account``'s row through ``pool``; set ``send_task_queue``'s rate
        limit through ``client``."""
        self._pool = pool
        self._client = client
        self._queue = send_task_queue
        self._account = account
        self._answered = 0
        self._throttled = 0
        self._advertised: float | None = None
        self._reported_at = 0.0
        self._report: asyncio.Task[None] | None = None
        self._complained_at = -_QUIET_SECONDS
        self._pace: BatchPace | None = None
        self._pace_read_at = -PACE_FRESH_SECONDS

    def observe(self, reply: ProviderReply) -> None:
        """Count one answer; start a report when one is due."""
        if reply.kind is ReplyKind.THROTTLED:
            self._throttled += 1
        else:
            self._answered += 1
        if reply.advertised_rps is not None:
            self._advertised = reply.advertised_rps
        since = time.monotonic() - self._reported_at
        due = since >= TICK_SECONDS or (
            reply.kind is ReplyKind.THROTTLED and since >= MIN_REPORT_SPACING_SECONDS
        )
        if due and (self._report is None or self._report.done()):
            self._reported_at = time.monotonic()
            self._report = asyncio.create_task(self.report())

    async def report(self) -> None:
        """Add the counts so far to the account's row and set the queue's rate if the
        row's rate is not the one set. Failures are logged, and the counts kept for
        the next report: sending never waits for this."""
        answered, throttled, advertised = self._answered, self._throttled, self._advertised
        self._answered = self._throttled = 0
        self._advertised = None
        try:
            account = await accounts.report(
                self._pool,
                self._account,
                answered=answered,
                throttled=throttled,
                advertised=advertised,
                decide=decide,
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._answered += answered
            self._throttled += throttled
            self._advertised = self._advertised or advertised
            self._complain("account rate not reported", exc)
            return
        if account is None:
            return
        self._remember(account)
        target, queue = account.target_rps, account.queue_rate
        stale = account.since_applied is None or account.since_applied > REAPPLY_SECONDS
        if queue != account.applied_rps or (queue is not None and stale):
            await self._apply(queue, account.requests_per_dispatch)
        ceiling = account.ceiling_rps
        if target is not None and ceiling is not None:
            metrics.worker().account_rate(self._account, target, ceiling)

    async def batch_pace(self) -> BatchPace | None:
        """How a batch sends now: the account's requests per dispatch and the spacing
        of its requests at the account's rate, as read at most ``PACE_FRESH_SECONDS`` ago;
        None when the account has no limit (or was never read: the queue's rate limit
        still holds, and the next batch asks again)."""
        if time.monotonic() - self._pace_read_at > PACE_FRESH_SECONDS:
            try:
                account = await accounts.get(self._pool, self._account)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                self._complain("account limits not read", exc)
                return self._pace
            if account is not None:
                self._remember(account)
        return self._pace

    def _remember(self, account: accounts.Account) -> None:
        self._pace = (
            BatchPace(account.requests_per_dispatch, request_spacing(account.target_rps))
            if account.limits.limited
            else None
        )
        self._pace_read_at = time.monotonic()

    async def _apply(self, dispatches_per_second: float | None, requests_per_dispatch: int) -> None:
        """Set the task queue's rate limit, then record that it is set."""
        try:
            await set_queue_rate_limit(
                self._client,
                self._queue,
                dispatches_per_second,
                f"shared rate of provider account {self._account}",
            )
            async with self._pool.acquire() as conn:
                await accounts.mark_applied(conn, self._account, dispatches_per_second)
        except (RPCError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._complain("account rate not set on the task queue", exc)
            return
        log.info(
            "account rate set",
            account=self._account,
            task_queue=self._queue,
            dispatches_per_second=dispatches_per_second,
            requests_per_dispatch=requests_per_dispatch,
        )

    async def close(self) -> None:
        """Wait for a report under way (at worker shutdown)."""
        if self._report is not None:
            await asyncio.gather(self._report, return_exceptions=True)

    def _complain(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._complained_at >= _QUIET_SECONDS:
            self._complained_at = now
            log.warning(what, account=self._account, error=f"{type(exc).__name__}: {exc}"[:300])
