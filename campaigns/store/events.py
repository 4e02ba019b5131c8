"""Provider webhook events: stored durably on arrival, applied to the ledger in batches.

``insert`` is the HTTP service's only write on the request path: one statement for
many events, duplicates (the same ``svix-id``) dropped by the unique index. ``apply``
claims pending events with ``SKIP LOCKED`` (several service processes may run it at
once), reads the ledger rows and soft-bounce streaks they name, lets a pure function
decide, and writes the decisions, all in one transaction. The org an event affects is
always the org of the ledger row its message id names, never anything in the payload.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from campaigns.store._pool import Conn, Connection

_INSERT = """
INSERT INTO webhook_events (svix_id, type, email_id, bounce_type, occurred_at, payload,
                            applied_at, outcome)
SELECT e.svix_id, e.type, e.email_id, e.bounce_type, e.occurred_at, e.payload::jsonb,
       CASE WHEN e.outcome IS NOT NULL THEN now() END, e.outcome
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
            $7::text[])
     AS e(svix_id, type, email_id, bounce_type, occurred_at, payload, outcome)
ON CONFLICT (svix_id) DO NOTHING
RETURNING svix_id
"""
_CLAIM = """
SELECT seq, type, email_id, bounce_type, occurred_at, received_at, attempts
FROM webhook_events
WHERE applied_at IS NULL AND next_try_at <= now()
ORDER BY next_try_at, seq
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
# Locked in one order (campaign, recipient), so two appliers never deadlock each other.
_MESSAGES = """
SELECT d.provider_message_id, d.campaign_id, d.recipient_id, c.org_id, r.email,
       d.delivered_at, d.delayed_at, d.bounced_at, d.bounce_type, d.soft_bounces,
       d.complained_at, d.opened_at, d.opens, d.clicked_at, d.clicks, d.provider_failed_at
FROM deliveries d
JOIN campaigns c ON c.id = d.campaign_id
JOIN recipients r ON r.id = d.recipient_id AND r.audience_id = c.audience_id
WHERE d.provider_message_id = ANY($1::text[]) AND d.status = 'sent'
ORDER BY d.campaign_id, d.recipient_id
FOR UPDATE OF d
"""
_STREAKS = """
SELECT b.org_id, b.email, b.soft_in_a_row, b.last_bounce_at
FROM bounce_streaks b
JOIN unnest($1::text[], $2::text[]) AS k(org_id, email)
  ON b.org_id = k.org_id AND b.email = k.email
ORDER BY b.org_id, b.email
FOR UPDATE OF b
"""
_UPDATE_MESSAGES = """
UPDATE deliveries d SET
    delivered_at = u.delivered_at, delayed_at = u.delayed_at, bounced_at = u.bounced_at,
    bounce_type = u.bounce_type, soft_bounces = u.soft_bounces,
    complained_at = u.complained_at, opened_at = u.opened_at, opens = u.opens,
    clicked_at = u.clicked_at, clicks = u.clicks, provider_failed_at = u.provider_failed_at
FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::timestamptz[],
            $5::timestamptz[], $6::text[], $7::int[], $8::timestamptz[], $9::timestamptz[],
            $10::int[], $11::timestamptz[], $12::int[], $13::timestamptz[])
     AS u(campaign_id, recipient_id, delivered_at, delayed_at, bounced_at, bounce_type,
          soft_bounces, complained_at, opened_at, opens, clicked_at, clicks,
          provider_failed_at)
WHERE d.campaign_id = u.campaign_id AND d.recipient_id = u.recipient_id
"""
_SUPPRESS = """
INSERT INTO suppressions (org_id, email, reason, campaign_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (org_id, email) DO NOTHING
"""
_SAVE_STREAKS = """
INSERT INTO bounce_streaks (org_id, email, soft_in_a_row, last_bounce_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::timestamptz[])
ON CONFLICT (org_id, email) DO UPDATE SET
    soft_in_a_row = EXCLUDED.soft_in_a_row, last_bounce_at = EXCLUDED.last_bounce_at
"""
_COUNT = """
INSERT INTO campaign_engagement AS e (campaign_id, org_id, delivered, delayed, hard_bounced,
                                      soft_bounced, complained, opened, clicked,
                                      provider_failed)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
ON CONFLICT (campaign_id) DO UPDATE SET
    delivered = e.delivered + EXCLUDED.delivered,
    delayed = e.delayed + EXCLUDED.delayed,
    hard_bounced = e.hard_bounced + EXCLUDED.hard_bounced,
    soft_bounced = e.soft_bounced + EXCLUDED.soft_bounced,
    complained = e.complained + EXCLUDED.complained,
    opened = e.opened + EXCLUDED.opened,
    clicked = e.clicked + EXCLUDED.clicked,
    provider_failed = e.provider_failed + EXCLUDED.provider_failed,
    updated_at = now()
"""
_SETTLE = """
UPDATE webhook_events w SET
    applied_at = CASE WHEN u.outcome IS NOT NULL THEN now() END,
    outcome = u.outcome,
    attempts = w.attempts + 1,
    next_try_at = now() + make_interval(secs => u.retry_in)
FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS u(seq, outcome, retry_in)
WHERE w.seq = u.seq
"""
# The event ``apply`` would claim first, put off: what the rules could not take.
_DEFER_FIRST_DUE = """
UPDATE webhook_events SET next_try_at = now() + make_interval(secs => $1),
                          attempts = attempts + 1
WHERE seq = (SELECT seq FROM webhook_events
             WHERE applied_at IS NULL AND next_try_at <= now()
             ORDER BY next_try_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING seq
"""
_BACKLOG = """SELECT count(*) FILTER (WHERE next_try_at <= now()) AS due,
                     count(*) AS waiting
              FROM webhook_events WHERE applied_at IS NULL"""
_PURGE = """DELETE FROM webhook_events
            WHERE seq IN (SELECT seq FROM webhook_events
                          WHERE applied_at < now() - make_interval(days => $1)
                          LIMIT $2)"""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as received, checked and ready to store.

    ``outcome`` is set only for events stored as already settled ("ignored": a type
    that names no message, or one we do not act on).
    """

    svix_id: str
    type: str
    email_id: str | None
    bounce_type: str | None
    occurred_at: datetime
    payload: str
    outcome: str | None = None


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A stored event waiting to be applied."""

    seq: int
    type: str
    email_id: str | None
    bounce_type: str | None
    occurred_at: datetime
    received_at: datetime
    attempts: int


@dataclass(slots=True)
class MessageState:
    """What the ledger knows of one sent message: its row's engagement columns."""

    message_id: str
    campaign_id: str
    recipient_id: int
    org_id: str
    email: str
    delivered_at: datetime | None = None
    delayed_at: datetime | None = None
    bounced_at: datetime | None = None
    bounce_type: str | None = None
    soft_bounces: int = 0
    complained_at: datetime | None = None
    opened_at: datetime | None = None
    opens: int = 0
    clicked_at: datetime | None = None
    clicks: int = 0
    provider_failed_at: datetime | None = None


@dataclass(slots=True)
class Streak:
    """Soft bounces in a row for one address of an org."""

    org_id: str
    email: str
    soft_in_a_row: int
    last_bounce_at: datetime


@dataclass
class Counts:
    """Increments of one campaign's engagement counters."""

    org_id: str
    delivered: int = 0
    delayed: int = 0
    hard_bounced: int = 0
    soft_bounced: int = 0
    complained: int = 0
    opened: int = 0
    clicked: int = 0
    provider_failed: int = 0


@dataclass(frozen=True, slots=True)
class Suppression:
    """An address to suppress for an org, and why."""

    org_id: str
    email: str
    reason: str
    campaign_id: str


@dataclass
class Decisions:
    """What applying a batch of events changes."""

    messages: list[MessageState] = field(default_factory=list)
    """Ledger rows with their new engagement columns (only rows that changed)."""
    counts: dict[str, Counts] = field(default_factory=dict)
    """Counter increments by campaign id."""
    suppressions: list[Suppression] = field(default_factory=list)
    streaks: list[Streak] = field(default_factory=list)
    settled: dict[int, str] = field(default_factory=dict)
    """Event seq -> outcome ("applied", "unmatched", "ignored")."""
    retry_in: dict[int, float] = field(default_factory=dict)
    """Event seq -> seconds until it is tried again (its message is not known yet)."""


Decide = Callable[
    [list[PendingEvent], dict[str, MessageState], dict[tuple[str, str], Streak]], Decisions
]
"""The pure step of ``apply``: pending events, their messages and streaks -> decisions."""


def _columns(rows: Sequence[object], *names: str) -> list[list[Any]]:
    """One list per named attribute of ``rows``: the arrays an ``unnest`` takes."""
    return [[getattr(row, name) for row in rows] for name in names]


async def insert(conn: Conn, events: Sequence[NewEvent]) -> set[str]:
    """Store ``events`` in one statement; return the svix ids that were new."""
    if not events:
        return set()
    rows = await conn.fetch(
        _INSERT,
        *_columns(
            events,
            "svix_id",
            "type",
            "email_id",
            "bounce_type",
            "occurred_at",
            "payload",
            "outcome",
        ),
    )
    return {row["svix_id"] for row in rows}


async def apply(
    conn: Connection,
    decide: Decide,
    *,
    limit: int,
    streak_keys: Callable[[list[PendingEvent], dict[str, MessageState]], list[tuple[str, str]]],
) -> Decisions | None:
    """Apply up to ``limit`` due events in one transaction; return what was decided.

    ``streak_keys`` names the (org, address) pairs whose soft-bounce streaks the
    events touch; ``decide`` turns events, messages and streaks into decisions.
    """
    async with conn.transaction():
        pending = [PendingEvent(*row) for row in await conn.fetch(_CLAIM, limit)]
        if not pending:
            return None
        ids = sorted({e.email_id for e in pending if e.email_id})
        messages = (
            {row[0]: MessageState(*row) for row in await conn.fetch(_MESSAGES, ids)} if ids else {}
        )
        keys = sorted(set(streak_keys(pending, messages)))
        streaks: dict[tuple[str, str], Streak] = {}
        if keys:
            rows = await conn.fetch(_STREAKS, [k[0] for k in keys], [k[1] for k in keys])
            streaks = {(row[0], row[1]): Streak(*row) for row in rows}
        decisions = decide(pending, messages, streaks)
        await _write(conn, decisions)
        return decisions


_MESSAGE_COLUMNS = (
    "campaign_id", "recipient_id", "delivered_at", "delayed_at", "bounced_at", "bounce_type",
    "soft_bounces", "complained_at", "opened_at", "opens", "clicked_at", "clicks",
    "provider_failed_at",
)  # fmt: skip
_COUNT_COLUMNS = (
    "org_id", "delivered", "delayed", "hard_bounced", "soft_bounced", "complained", "opened",
    "clicked", "provider_failed",
)  # fmt: skip


async def _write(conn: Connection, d: Decisions) -> None:
    if d.messages:
        await conn.execute(_UPDATE_MESSAGES, *_columns(d.messages, *_MESSAGE_COLUMNS))
    if d.suppressions:
        await conn.execute(
            _SUPPRESS, *_columns(d.suppressions, "org_id", "email", "reason", "campaign_id")
        )
    if d.streaks:
        streaks = sorted(d.streaks, key=lambda x: (x.org_id, x.email))
        await conn.execute(
            _SAVE_STREAKS,
            *_columns(streaks, "org_id", "email", "soft_in_a_row", "last_bounce_at"),
        )
    if d.counts:
        ids = sorted(d.counts)
        await conn.execute(_COUNT, ids, *_columns([d.counts[i] for i in ids], *_COUNT_COLUMNS))
    seqs = sorted(set(d.settled) | set(d.retry_in))
    if seqs:
        await conn.execute(
            _SETTLE,
            seqs,
            [d.settled.get(seq) for seq in seqs],
            [d.retry_in.get(seq, 0.0) for seq in seqs],
        )


async def defer_first_due(conn: Conn, *, seconds: float) -> int | None:
    """Put off the event ``apply`` would claim first by ``seconds``; return its seq."""
    seq = await conn.fetchval(_DEFER_FIRST_DUE, seconds)
    return int(seq) if seq is not None else None


@dataclass(frozen=True, slots=True)
class Backlog:
    """Events stored but not applied: due now, and all waiting (due later included)."""

    due: int
    waiting: int


async def backlog(conn: Conn) -> Backlog:
    """How many stored events wait to be applied."""
    row = await conn.fetchrow(_BACKLOG)
    assert row is not None
    return Backlog(row["due"], row["waiting"])


async def purge(conn: Conn, *, older_than_days: int, limit: int = 10_000) -> int:
    """Delete up to ``limit`` settled events older than ``older_than_days``."""
    result = await conn.execute(_PURGE, older_than_days, limit)
    return int(result.split()[-1])
