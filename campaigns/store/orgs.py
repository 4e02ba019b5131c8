"""Orgs, their feature flags, fairness weights, send caps and suppression lists."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from campaigns.store._pool import Conn

_EXISTS = "SELECT id FROM orgs WHERE id = $1"
_UPSERT = """INSERT INTO orgs (id, name, verified_domain, fairness_weight)
                   VALUES ($1, $2, $3, coalesce($5, 1))
               ON CONFLICT (id) DO UPDATE SET
                   name = coalesce($4, orgs.name),
                   verified_domain = coalesce(EXCLUDED.verified_domain, orgs.verified_domain),
                   fairness_weight = coalesce($5, orgs.fairness_weight)"""
_FAIRNESS_WEIGHT = "SELECT fairness_weight FROM orgs WHERE id = $1"
_SET_FAIRNESS_WEIGHT = "UPDATE orgs SET fairness_weight = $2 WHERE id = $1 RETURNING id"
_SET_EMAILS_PER_SECOND = "UPDATE orgs SET emails_per_second = $2 WHERE id = $1 RETURNING id"
_EMAILS_PER_SECOND = "SELECT emails_per_second FROM orgs WHERE id = $1"
_ADD_IF_MISSING = "INSERT INTO orgs (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING"
_SET_FLAG = """INSERT INTO org_feature_flags (org_id, flag, state) VALUES ($1, $2, $3)
               ON CONFLICT (org_id, flag)
               DO UPDATE SET state = EXCLUDED.state, updated_at = now()"""
_LIST = """SELECT o.id, o.name, o.fairness_weight, o.emails_per_second, count(a.id) AS audiences
               FROM orgs o LEFT JOIN audiences a ON a.org_id = o.id GROUP BY o.id ORDER BY o.id"""
_SUPPRESS = """INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, $3)
               ON CONFLICT (org_id, email) DO UPDATE SET reason = EXCLUDED.reason"""
_SUPPRESSED_BY = """SELECT reason, count(*) FROM suppressions
               WHERE org_id = $1 AND campaign_id = $2 GROUP BY reason"""
_SUPPRESS_NEW = """INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING"""


@dataclass(frozen=True, slots=True)
class OrgSummary:
    """An org as ``campaigns org list`` shows it."""

    id: str
    name: str
    audiences: int
    fairness_weight: float = 1.0
    emails_per_second: float | None = None
    """The org's cap over all its campaigns; None: none."""


async def exists(conn: Conn, org: str) -> bool:
    """Whether the org exists."""
    return await conn.fetchval(_EXISTS, org) is not None


async def upsert(
    conn: Conn,
    org: str,
    *,
    name: str | None,
    verified_domain: str | None,
    fairness_weight: float | None = None,
) -> None:
    """Create the org, or update it; a None name, domain or weight keeps what it had.

    A new org without a name is named after its id, without a weight weighs 1.
    The weight's range (``campaigns.models.fairness_weight_problem``) is also a CHECK.
    """
    await conn.execute(_UPSERT, org, name or org, verified_domain, name, fairness_weight)


async def fairness_weight(conn: Conn, org: str) -> float | None:
    """The org's fairness weight, or None if there is no such org."""
    value: float | None = await conn.fetchval(_FAIRNESS_WEIGHT, org)
    return value


async def set_fairness_weight(conn: Conn, org: str, weight: float) -> bool:
    """Set the org's fairness weight; False, writing nothing, if there is no such org."""
    return await conn.fetchval(_SET_FAIRNESS_WEIGHT, org, weight) is not None


async def set_emails_per_second(conn: Conn, org: str, cap: float | None) -> bool:
    """Set the org's cap in emails/s over all its campaigns (None: none); False,
    writing nothing, if there is no such org."""
    return await conn.fetchval(_SET_EMAILS_PER_SECOND, org, cap) is not None


async def emails_per_second(conn: Conn, org: str) -> float | None:
    """The org's cap in emails/s; None when it has none (or there is no such org)."""
    value: float | None = await conn.fetchval(_EMAILS_PER_SECOND, org)
    return value


async def add_if_missing(conn: Conn, org: str, name: str) -> None:
    """Create the org unless it exists (an existing one is left as it is)."""
    await conn.execute(_ADD_IF_MISSING, org, name)


async def set_flag(conn: Conn, org: str, flag: str, state: str) -> None:
    """Set one of the org's feature flags."""
    await conn.execute(_SET_FLAG, org, flag, state)


async def list_all(conn: Conn) -> list[OrgSummary]:
    """Every org, by id, with its number of audiences."""
    return [
        OrgSummary(
            row["id"],
            row["name"],
            row["audiences"],
            row["fairness_weight"],
            row["emails_per_second"],
        )
        for row in await conn.fetch(_LIST)
    ]


async def suppress(
    conn: Conn, org: str, emails: Iterable[str], reason: str, *, keep_reason: bool = False
) -> None:
    """Suppress ``emails`` for the org; a suppressed address takes the new ``reason``,
    unless ``keep_reason``."""
    await conn.executemany(
        _SUPPRESS_NEW if keep_reason else _SUPPRESS, [(org, email, reason) for email in emails]
    )


async def suppressed_by(conn: Conn, org: str, campaign_id: str) -> dict[str, int]:
    """How many of the org's addresses a campaign's messages got suppressed, by reason
    (bounced, complained, unsubscribed)."""
    rows = await conn.fetch(_SUPPRESSED_BY, org, campaign_id)
    return {row["reason"]: row["count"] for row in rows}
