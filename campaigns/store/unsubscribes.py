"""Unsubscribes: a recipient's address suppressed for its org, its delivery marked, the
campaign's counter bumped, all in one transaction.

The address is found only through the org's own rows (the recipient must be in one of
the org's audiences), so a token can never reach another org's recipients. An
unsubscribe is idempotent: the first one wins, and a second one changes and counts
nothing.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from campaigns.store._pool import Conn

_ORG = "SELECT name FROM orgs WHERE id = $1"
_RECIPIENT = """SELECT r.email FROM recipients r JOIN audiences a ON a.id = r.audience_id
                WHERE r.id = $1 AND a.org_id = $2"""
_CAMPAIGN_ORG = "SELECT org_id FROM campaigns WHERE id = $1"
_SUPPRESSED = "SELECT reason FROM suppressions WHERE org_id = $1 AND email = $2"
# An address already suppressed (a bounce, a complaint) keeps its reason.
_SUPPRESS = """INSERT INTO suppressions (org_id, email, reason, campaign_id)
               VALUES ($1, $2, 'unsubscribed', $3)
               ON CONFLICT (org_id, email) DO NOTHING
               RETURNING email"""
# The first unsubscribe of a delivery wins; a later one updates no row.
_MARK_DELIVERY = """UPDATE deliveries SET unsubscribed_at = now()
                    WHERE campaign_id = $1 AND recipient_id = $2 AND unsubscribed_at IS NULL
                    RETURNING recipient_id"""
_COUNT = """INSERT INTO campaign_engagement (campaign_id, org_id, unsubscribed)
            VALUES ($1, $2, 1)
            ON CONFLICT (campaign_id) DO UPDATE
            SET unsubscribed = campaign_engagement.unsubscribed + 1, updated_at = now()"""


class UnsubscribeResult(enum.Enum):
    """What an unsubscribe did."""

    UNSUBSCRIBED = "unsubscribed"
    """Newly suppressed, or this campaign's delivery newly marked."""
    ALREADY = "already"
    """Nothing changed: an earlier unsubscribe (or a bounce) did it."""
    UNKNOWN_ORG = "unknown_org"
    """The org no longer exists."""
    UNKNOWN_RECIPIENT = "unknown_recipient"
    """No audience of the org holds the recipient (or the campaign is another org's)."""


class UnsubscribeTarget(Protocol):
    """Who to unsubscribe, as a verified token names them (``campaigns.unsubscribe``)."""

    @property
    def org(self) -> str: ...
    @property
    def campaign_id(self) -> str: ...
    @property
    def recipient_id(self) -> int: ...


@dataclass(frozen=True, slots=True)
class UnsubscribeView:
    """What the confirmation page may show: never the full address."""

    org_name: str
    masked_email: str
    unsubscribed: bool
    """Whether the address is already suppressed for the org (for any reason)."""


async def _address(
    conn: Conn, target: UnsubscribeTarget
) -> tuple[str, str, bool] | UnsubscribeResult:
    """(org name, address, whether the campaign is the org's), or why there is none."""
    org_name = await conn.fetchval(_ORG, target.org)
    if org_name is None:
        return UnsubscribeResult.UNKNOWN_ORG
    campaign_org = await conn.fetchval(_CAMPAIGN_ORG, target.campaign_id)
    if campaign_org is not None and campaign_org != target.org:
        return UnsubscribeResult.UNKNOWN_RECIPIENT
    email = await conn.fetchval(_RECIPIENT, target.recipient_id, target.org)
    if email is None:
        return UnsubscribeResult.UNKNOWN_RECIPIENT
    return org_name, email, campaign_org is not None


async def unsubscribe(conn: Conn, target: UnsubscribeTarget) -> UnsubscribeResult:
    """Suppress the target's address for its org, in one transaction.

    The suppression names the campaign when its row still exists (a campaign whose row
    is gone still unsubscribes the address from the org). The delivery's
    ``unsubscribed_at`` is set if it was not, and only then is the campaign's
    ``unsubscribed`` counter incremented.
    """
    try:
        async with _transaction(conn) as tx:
            found = await _address(tx, target)
            if isinstance(found, UnsubscribeResult):
                return found
            _, email, campaign_is_ours = found
            campaign_id = target.campaign_id if campaign_is_ours else None
            suppressed = await tx.fetchval(_SUPPRESS, target.org, email, campaign_id)
            marked = None
            if campaign_is_ours:
                marked = await tx.fetchval(_MARK_DELIVERY, target.campaign_id, target.recipient_id)
                if marked is not None:
                    await tx.execute(_COUNT, target.campaign_id, target.org)
    except asyncpg.ForeignKeyViolationError:
        return UnsubscribeResult.UNKNOWN_ORG  # deleted between the read and the insert
    changed = suppressed is not None or marked is not None
    return UnsubscribeResult.UNSUBSCRIBED if changed else UnsubscribeResult.ALREADY


async def describe(conn: Conn, target: UnsubscribeTarget) -> UnsubscribeView | UnsubscribeResult:
    """What the page shows for ``target``, or ``UNKNOWN_ORG``/``UNKNOWN_RECIPIENT``."""
    found = await _address(conn, target)
    if isinstance(found, UnsubscribeResult):
        return found
    org_name, email, _ = found
    suppressed = await conn.fetchval(_SUPPRESSED, target.org, email) is not None
    return UnsubscribeView(org_name, mask_address(email), suppressed)


def mask_address(address: str) -> str:
    """Whose address it is, without giving it away: ``j***@example.com``."""
    local, at, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}" if at else "***"


@asynccontextmanager
async def _transaction(conn: Conn) -> AsyncIterator[Conn]:
    """One transaction on ``conn``, or on a connection taken from it when it is a pool."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as acquired, acquired.transaction():
            yield acquired
    else:
        async with conn.transaction():
            yield conn
