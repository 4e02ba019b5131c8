"""Provider accounts: configured limits and the adaptive state of the shared rate.

Every worker process adds what it saw (answers, 429s, advertised limits) to its
account's row every half second; the first to find the window old enough decides the
next rate with ``campaigns.rate_control.decide`` under the row's lock. The
database's clock is the only clock, so processes on different hosts agree on ages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from campaigns.rate_control import (
    RECENT_SECONDS,
    TICK_SECONDS,
    Adaptive,
    Decision,
    Limits,
    Window,
    ceiling_with,
    queue_rate,
    requests_per_batch,
    requests_per_dispatch,
)
from campaigns.store._pool import Conn

DEFAULT_ACCOUNT = "default"
ADVERTISED_FOR_SECONDS = 10.0
"""An advertised limit counts this long after the last answer that said it: a provider
that stops sending the headers (or a stale answer) does not hold the ceiling."""

_COLUMNS = """id, requests_per_second, emails_per_second, current_rps, throttled_at_rps,
       CASE WHEN advertised_at > now() - make_interval(secs => $3) THEN advertised_rps
       END AS advertised_rps,
       applied_rps,
       extract(epoch FROM now() - last_decrease_at)::float8 AS since_decrease,
       extract(epoch FROM now() - applied_at)::float8 AS since_applied,
       extract(epoch FROM now() - window_started_at)::float8 AS window_seconds,
       window_answered, window_throttled,
       -- decayed to now, so readers need not know when the row was written
       recent_answered * exp(-extract(epoch FROM now() - updated_at) / $2) AS recent_answered,
       recent_throttled * exp(-extract(epoch FROM now() - updated_at) / $2) AS recent_throttled"""
_GET = f"SELECT {_COLUMNS} FROM provider_accounts WHERE id = $1"
_LOCK = f"SELECT {_COLUMNS} FROM provider_accounts WHERE id = $1 FOR UPDATE"
_ADD = """UPDATE provider_accounts SET
              window_answered = window_answered + $2,
              window_throttled = window_throttled + $3,
              advertised_rps = coalesce($4, advertised_rps),
              advertised_at = CASE WHEN $4::float8 IS NULL THEN advertised_at ELSE now() END
          WHERE id = $1"""
_DECIDED = """UPDATE provider_accounts SET
                  current_rps = $2, throttled_at_rps = $3,
                  last_decrease_at = CASE WHEN $4 THEN now() ELSE last_decrease_at END,
                  window_started_at = now(), window_answered = 0, window_throttled = 0,
                  recent_answered = recent_answered
                      * exp(-extract(epoch FROM now() - updated_at) / $7) + $5,
                  recent_throttled = recent_throttled
                      * exp(-extract(epoch FROM now() - updated_at) / $7) + $6,
                  updated_at = now()
              WHERE id = $1"""
_SET_LIMITS = """UPDATE provider_accounts SET
                     requests_per_second = $2, emails_per_second = $3,
                     current_rps = NULL, throttled_at_rps = NULL, last_decrease_at = NULL,
                     advertised_rps = NULL, advertised_at = NULL,
                     updated_at = now()
                 WHERE id = $1 RETURNING id"""
_APPLIED = """UPDATE provider_accounts SET applied_rps = $2, applied_at = now()
              WHERE id = $1"""


@dataclass(frozen=True, slots=True)
class Account:
    """A provider account's limits and the state of its shared rate."""

    id: str
    limits: Limits
    adaptive: Adaptive
    applied_rps: float | None
    """The rate limit last set on the account's task queue, dispatches/s (Temporal's
    "requests" are our batch activities); None: none set."""
    since_applied: float | None
    """Seconds since the rate was last set on the task queue; None: never."""
    window: Window
    recent_answered: float
    """Answers that were not 429 in about the last ``RECENT_SECONDS`` (decayed)."""
    recent_throttled: float

    @property
    def target_rps(self) -> float | None:
        """The rate the task queue should have: the current rate, or its ceiling before
        the first decision; None when the account has no limit."""
        ceiling = self.limits.ceiling()
        if ceiling is None:
            return None
        current = self.adaptive.current
        return min(current, ceiling) if current is not None else ceiling

    @property
    def requests_per_batch(self) -> int:
        """The provider requests a batch is planned with under the configured limits."""
        return requests_per_batch(self.limits.ceiling())

    @property
    def requests_per_dispatch(self) -> int:
        """The most requests one attempt of a batch sends at the current rate."""
        return requests_per_dispatch(self.target_rps, self.requests_per_batch)

    @property
    def queue_rate(self) -> float | None:
        """The task queue's rate limit, dispatches/s, that sends at ``target_rps``."""
        return queue_rate(self.target_rps, self.requests_per_dispatch)

    @property
    def ceiling_rps(self) -> float | None:
        """The most the rate may reach now: configured, or lower when advertised."""
        return ceiling_with(self.limits, self.adaptive.advertised)

    @property
    def recent_throttle_ratio(self) -> float:
        """Share of recent requests the provider answered with 429."""
        total = self.recent_answered + self.recent_throttled
        return self.recent_throttled / total if total > 0 else 0.0


def _account(row: asyncpg.Record) -> Account:
    return Account(
        id=row["id"],
        limits=Limits(row["requests_per_second"], row["emails_per_second"]),
        adaptive=Adaptive(
            current=row["current_rps"],
            throttled_at=row["throttled_at_rps"],
            advertised=row["advertised_rps"],
            since_decrease=row["since_decrease"],
        ),
        applied_rps=row["applied_rps"],
        since_applied=row["since_applied"],
        window=Window(row["window_seconds"], row["window_answered"], row["window_throttled"]),
        recent_answered=row["recent_answered"],
        recent_throttled=row["recent_throttled"],
    )


async def get(conn: Conn, account_id: str = DEFAULT_ACCOUNT) -> Account | None:
    """The account, or None if there is none by that id."""
    row = await conn.fetchrow(_GET, account_id, RECENT_SECONDS, ADVERTISED_FOR_SECONDS)
    return _account(row) if row else None


async def set_limits(
    conn: Conn,
    account_id: str,
    *,
    requests_per_second: float | None,
    emails_per_second: float | None,
) -> bool:
    """Set both configured limits (None: no limit); False if there is no such account.

    The adaptive rate starts again from the new ceiling, forgetting what the provider
    advertised (its next answer tells again). Ranges are checked by the
    callers (``campaigns.rate_control.limit_problem``) and by the table's CHECKs.
    """
    row = await conn.fetchval(_SET_LIMITS, account_id, requests_per_second, emails_per_second)
    return row is not None


async def report(
    pool: asyncpg.Pool,
    account_id: str,
    *,
    answered: int,
    throttled: int,
    advertised: float | None,
    decide: Callable[[Limits, Adaptive, Window], Decision],
) -> Account | None:
    """Add one process's counts; decide the next rate when the window is old enough.

    Returns the account as it is after the report; None if there is no such account.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_ADD, account_id, answered, throttled, advertised)
        row = await conn.fetchrow(_LOCK, account_id, RECENT_SECONDS, ADVERTISED_FOR_SECONDS)
        if row is None:
            return None
        account = _account(row)
        if account.window.seconds < TICK_SECONDS:
            return account
        decision = decide(account.limits, account.adaptive, account.window)
        await conn.execute(
            _DECIDED,
            account_id,
            decision.current,
            decision.throttled_at,
            decision.decreased,
            float(account.window.answered),
            float(account.window.throttled),
            RECENT_SECONDS,
        )
        row = await conn.fetchrow(_GET, account_id, RECENT_SECONDS, ADVERTISED_FOR_SECONDS)
        assert row is not None  # locked by this transaction
        return _account(row)


async def mark_applied(conn: Conn, account_id: str, dispatches_per_second: float | None) -> None:
    """Record the rate limit now set on the account's task queue (None: none)."""
    await conn.execute(_APPLIED, account_id, dispatches_per_second)
