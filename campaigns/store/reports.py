"""What a campaign did, read from PostgreSQL: its ledger by status and its engagement.

The engagement counters (``campaign_engagement``) are kept by the provider-event
service in the same transaction as the ledger rows they count, so a read of one row
answers what a scan of the campaign's ledger would. Both reads work long after the
campaign's workflow closed, with no worker running.
"""

from __future__ import annotations

from typing import Any

from campaigns.models import CampaignReport, EngagementCounts, LedgerCounts
from campaigns.store._pool import Conn

_ENGAGEMENT_FIELDS = tuple(EngagementCounts.model_fields)
_LEDGER_FIELDS = tuple(LedgerCounts.model_fields)
_ENGAGEMENT_COLUMNS = ", ".join(f"coalesce(e.{name}, 0) AS {name}" for name in _ENGAGEMENT_FIELDS)

# Only the row of the org that asks ($2): another org's counters read as none.
_ENGAGEMENT = f"""
SELECT {_ENGAGEMENT_COLUMNS}
FROM campaign_engagement e WHERE e.campaign_id = $1 AND e.org_id = $2
"""
# One statement, one snapshot: the campaign's org, its counters (those the campaign's
# own org wrote) and one GROUP BY of its ledger, which deliveries_by_status serves.
_REPORT = f"""
SELECT c.org_id, {_ENGAGEMENT_COLUMNS}, l.statuses, l.counts
FROM campaigns c
LEFT JOIN campaign_engagement e ON e.campaign_id = c.id AND e.org_id = c.org_id
CROSS JOIN LATERAL (
    SELECT array_agg(s.status) AS statuses, array_agg(s.n) AS counts
    FROM (SELECT d.status::text AS status, count(*) AS n FROM deliveries d
          WHERE d.campaign_id = c.id GROUP BY d.status) s
) l
WHERE c.id = $1
"""


def _engagement_of(row: Any) -> EngagementCounts:
    return EngagementCounts(**{name: int(row[name]) for name in _ENGAGEMENT_FIELDS})


async def engagement(conn: Conn, campaign_id: str, org: str) -> EngagementCounts:
    """The campaign's engagement counters for ``org``; zeros when it has none yet."""
    row = await conn.fetchrow(_ENGAGEMENT, campaign_id, org)
    return _engagement_of(row) if row is not None else EngagementCounts()


async def campaign_report(conn: Conn, campaign_id: str) -> CampaignReport | None:
    """The campaign's ledger counts, engagement counters and rates; None if there is no
    such campaign (it was never prepared)."""
    row = await conn.fetchrow(_REPORT, campaign_id)
    if row is None:
        return None
    by_status = dict(zip(row["statuses"] or [], row["counts"] or [], strict=True))
    ledger = LedgerCounts(**{name: int(by_status.get(name, 0)) for name in _LEDGER_FIELDS})
    return CampaignReport.of(campaign_id, row["org_id"], ledger, _engagement_of(row))
