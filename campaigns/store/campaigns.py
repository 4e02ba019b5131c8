"""The ``campaigns`` row: the stored spec, its org and audience, and its workflow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from campaigns.store._pool import Conn

_SCOPE = "SELECT org_id, audience_id FROM campaigns WHERE id = $1"
_BINDING = "SELECT org_id, audience_id, workflow_id FROM campaigns WHERE id = $1"
_OWNER = "SELECT workflow_id FROM campaigns WHERE id = $1"
_SPEC = "SELECT spec FROM campaigns WHERE id = $1"
_FOR_BATCH = """SELECT c.spec, c.org_id, c.audience_id, o.verified_domain FROM campaigns c
                   JOIN orgs o ON o.id = c.org_id WHERE c.id = $1"""
# The workflow id is bound once: a row owned by another workflow is left as it is
# and nothing is returned.
_SAVE = """INSERT INTO campaigns (id, org_id, audience_id, spec, workflow_id)
                       VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (id) DO UPDATE
                       SET spec = EXCLUDED.spec, updated_at = now(),
                           workflow_id = coalesce(EXCLUDED.workflow_id, campaigns.workflow_id)
                       WHERE campaigns.workflow_id IS NULL OR EXCLUDED.workflow_id IS NULL
                          OR campaigns.workflow_id = EXCLUDED.workflow_id
                       RETURNING id"""


@dataclass(frozen=True, slots=True)
class CampaignScope:
    """The org and audience a campaign was prepared for."""

    org_id: str
    audience_id: int


@dataclass(frozen=True, slots=True)
class CampaignBinding:
    """A campaign's org, audience and the workflow that owns its id (None: no owner)."""

    org_id: str
    audience_id: int
    workflow_id: str | None


@dataclass(frozen=True, slots=True)
class CampaignForBatch:
    """What a batch needs of its campaign: the stored spec (JSON), scope and domain."""

    spec: dict[str, Any]
    org_id: str
    audience_id: int
    verified_domain: str | None


async def scope(conn: Conn, campaign_id: str) -> CampaignScope | None:
    """The campaign's stored org and audience, or None if it was never prepared."""
    row = await conn.fetchrow(_SCOPE, campaign_id)
    return CampaignScope(row["org_id"], row["audience_id"]) if row else None


async def binding(conn: Conn, campaign_id: str) -> CampaignBinding | None:
    """The campaign's org, audience and owning workflow, or None if there is no row."""
    row = await conn.fetchrow(_BINDING, campaign_id)
    return CampaignBinding(row["org_id"], row["audience_id"], row["workflow_id"]) if row else None


async def owner(conn: Conn, campaign_id: str) -> str | None:
    """The workflow id the campaign id is bound to, if any."""
    value: str | None = await conn.fetchval(_OWNER, campaign_id)
    return value


async def stored_spec(conn: Conn, campaign_id: str) -> dict[str, Any] | None:
    """The spec ``prepare_campaign`` stored (JSON), or None."""
    value: dict[str, Any] | None = await conn.fetchval(_SPEC, campaign_id)
    return value


async def for_batch(conn: Conn, campaign_id: str) -> CampaignForBatch | None:
    """The stored spec, org, audience and the org's verified domain, or None."""
    row = await conn.fetchrow(_FOR_BATCH, campaign_id)
    if row is None:
        return None
    return CampaignForBatch(row["spec"], row["org_id"], row["audience_id"], row["verified_domain"])


async def save(
    conn: Conn,
    *,
    campaign_id: str,
    org: str,
    audience_id: int,
    spec: dict[str, Any],
    workflow_id: str | None,
) -> bool:
    """Store the spec and bind the campaign id to ``workflow_id`` (None binds nothing).

    Returns False, writing nothing, when another workflow owns the campaign id.
    """
    saved = await conn.fetchval(_SAVE, campaign_id, org, audience_id, spec, workflow_id)
    return saved is not None


_MARK_SENDING = """UPDATE campaigns SET sending_until = now() + make_interval(secs => $3)
                       WHERE id = $1 AND org_id = $2 RETURNING id"""
_SENDING_IN_ORG = """SELECT count(*) FROM campaigns
                        WHERE org_id = $1 AND sending_until > now()"""
_MARK_IDLE = "UPDATE campaigns SET sending_until = NULL WHERE id = $1 AND org_id = $2"


async def mark_sending(conn: Conn, campaign_id: str, org: str, for_seconds: float) -> int:
    """Mark the campaign as sending for the next ``for_seconds``; return how many of
    the org's campaigns are sending now, this one included (0: not the org's)."""
    marked = await conn.fetchval(_MARK_SENDING, campaign_id, org, for_seconds)
    if marked is None:
        return 0
    count: int = await conn.fetchval(_SENDING_IN_ORG, org)
    return count


async def mark_idle(conn: Conn, campaign_id: str, org: str) -> None:
    """The campaign's pass has nothing left to plan: it no longer shares its org's cap."""
    await conn.execute(_MARK_IDLE, campaign_id, org)
