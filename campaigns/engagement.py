"""What the provider's events change: the pure rules, and the batch that applies them.

Each event names a message by the provider's id. Its effects on the ledger row are
order-free: every timestamp keeps the earliest event's time, so an open that arrives
before its delivery, or a delivery that arrives after a bounce, ends in the same row
as events in order would. A message's bounce is hard once any of its bounces is hard.
Counters count first transitions only (a message delivered, opened, complained ...).

Suppression follows the rules bulk senders must keep: a hard bounce, a complaint or
the provider's own suppression adds the address to the org's list at once; soft
bounces add up per address, a delivery later than the last one resets the streak, and
``soft_bounce_limit`` in a row suppress.

An event whose message the ledger does not know is tried again with backoff (the
batch that sent it may not have recorded yet) and, after ``UNMATCHED_AFTER``, kept
as "unmatched": stored and counted, never lost.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial

from campaigns.store import events as store
from campaigns.store._pool import Connection
from campaigns.store.events import (
    Counts,
    Decisions,
    MessageState,
    PendingEvent,
    Streak,
    Suppression,
)

UNMATCHED_AFTER = timedelta(hours=1)
"""How long an event naming an unknown message keeps being tried."""
MAX_RETRY_SECONDS = 60.0

DELIVERED = "email.delivered"
DELAYED = "email.delivery_delayed"
BOUNCED = "email.bounced"
COMPLAINED = "email.complained"
OPENED = "email.opened"
CLICKED = "email.clicked"
FAILED = "email.failed"
SUPPRESSED = "email.suppressed"
SENT = "email.sent"
MESSAGE_EVENTS = frozenset(
    {SENT, DELIVERED, DELAYED, BOUNCED, COMPLAINED, OPENED, CLICKED, FAILED, SUPPRESSED}
)
"""The event types that name a message and are applied to the ledger."""


def bounce_type(provider_type: object) -> str:
    """Resend's ``bounce.type``: "Permanent" is hard; "Transient", "Undetermined" soft."""
    return "hard" if provider_type == "Permanent" else "soft"


def retry_delay(attempts: int) -> float:
    """Seconds before an unmatched event is tried again: 1, 2, 4 ... up to a minute."""
    return min(MAX_RETRY_SECONDS, 2.0 ** min(attempts, 10))


def _earliest(current: datetime | None, new: datetime) -> datetime:
    return new if current is None or new < current else current


def streak_keys(
    pending: list[PendingEvent], messages: dict[str, MessageState]
) -> list[tuple[str, str]]:
    """The (org, address) pairs whose soft-bounce streaks ``pending`` may change."""
    keys = []
    for event in pending:
        message = messages.get(event.email_id or "")
        if message and event.type in (DELIVERED, BOUNCED):
            keys.append((message.org_id, message.email))
    return keys


def decide(
    pending: list[PendingEvent],
    messages: dict[str, MessageState],
    streaks: dict[tuple[str, str], Streak],
    *,
    soft_bounce_limit: int,
    now: datetime,
) -> Decisions:
    """Fold ``pending`` into the ledger rows, counters, suppressions and streaks."""
    decisions = Decisions()
    changed: dict[str, MessageState] = {}
    streaks = {key: replace(streak) for key, streak in streaks.items()}
    touched: set[tuple[str, str]] = set()
    suppress: dict[tuple[str, str], Suppression] = {}

    def add_suppression(message: MessageState, reason: str) -> None:
        suppress.setdefault(
            (message.org_id, message.email),
            Suppression(message.org_id, message.email, reason, message.campaign_id),
        )

    for event in sorted(pending, key=lambda e: (e.occurred_at, e.seq)):
        original = messages.get(event.email_id or "")
        if original is None:
            if now - event.received_at >= UNMATCHED_AFTER:
                decisions.settled[event.seq] = "unmatched"
            else:
                decisions.retry_in[event.seq] = retry_delay(event.attempts)
            continue
        decisions.settled[event.seq] = "applied"
        message = changed.get(original.message_id)
        if message is None:
            message = changed[original.message_id] = replace(original)
        counts = decisions.counts.setdefault(message.campaign_id, Counts(message.org_id))
        at, key = event.occurred_at, (message.org_id, message.email)
        if event.type == DELIVERED:
            counts.delivered += message.delivered_at is None
            message.delivered_at = _earliest(message.delivered_at, at)
            streak = streaks.get(key)
            if streak is not None and at > streak.last_bounce_at and streak.soft_in_a_row:
                streak.soft_in_a_row = 0
                touched.add(key)
        elif event.type == DELAYED:
            counts.delayed += message.delayed_at is None
            message.delayed_at = _earliest(message.delayed_at, at)
        elif event.type == BOUNCED:
            kind = event.bounce_type or "soft"
            message.bounced_at = _earliest(message.bounced_at, at)
            if kind == "hard":
                if message.bounce_type != "hard":
                    counts.hard_bounced += 1
                    counts.soft_bounced -= message.bounce_type == "soft"
                    message.bounce_type = "hard"
                add_suppression(message, "bounced")
            else:
                message.soft_bounces += 1
                if message.bounce_type is None:
                    counts.soft_bounced += 1
                    message.bounce_type = "soft"
                streak = streaks.get(key)
                if streak is None:
                    streak = streaks[key] = Streak(key[0], key[1], 0, at)
                streak.soft_in_a_row += 1
                streak.last_bounce_at = max(streak.last_bounce_at, at)
                touched.add(key)
                if streak.soft_in_a_row >= soft_bounce_limit:
                    add_suppression(message, "bounced")
        elif event.type == COMPLAINED:
            counts.complained += message.complained_at is None
            message.complained_at = _earliest(message.complained_at, at)
            add_suppression(message, "complained")
        elif event.type == OPENED:
            counts.opened += message.opened_at is None
            message.opened_at = _earliest(message.opened_at, at)
            message.opens += 1
        elif event.type == CLICKED:
            counts.clicked += message.clicked_at is None
            message.clicked_at = _earliest(message.clicked_at, at)
            message.clicks += 1
        elif event.type in (FAILED, SUPPRESSED):
            counts.provider_failed += message.provider_failed_at is None
            message.provider_failed_at = _earliest(message.provider_failed_at, at)
            if event.type == SUPPRESSED:  # the provider's own list: bounces, complaints
                add_suppression(message, "bounced")
        # email.sent: the ledger knows it was sent; nothing changes.

    decisions.messages = [m for m in changed.values() if m != messages[m.message_id]]
    decisions.counts = {
        campaign: counts
        for campaign, counts in decisions.counts.items()
        if counts != Counts(counts.org_id)
    }
    decisions.suppressions = list(suppress.values())
    decisions.streaks = [streaks[key] for key in sorted(touched)]
    return decisions


async def apply_pending(
    conn: Connection, *, soft_bounce_limit: int, limit: int = 1000, now: datetime
) -> Decisions | None:
    """Apply up to ``limit`` due events in one transaction; what was decided (None:
    nothing was due)."""
    return await store.apply(
        conn,
        partial(decide, soft_bounce_limit=soft_bounce_limit, now=now),
        limit=limit,
        streak_keys=streak_keys,
    )
