"""Activities that prepare a campaign and page its recipients by keyset.

They return ids and counts only: recipients stay in PostgreSQL and never enter
workflow history.
"""

from __future__ import annotations

import asyncpg
import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from campaigns.models import BatchRange, CampaignPlan, CampaignSpec, PlanBatchesInput
from campaigns.spec_check import InvalidSpec, check_against_database

log = structlog.get_logger(__name__)

INVALID_SPEC_ERROR = "InvalidCampaignSpec"
MAX_PAGE_ROWS = 100_000
"""Most recipient ids one page reads, whatever the window and batch size ask for."""

# The request of a recipient an earlier execution left failed or abandoned, which a
# range must not split (an index-only probe of deliveries_to_retry).
_PAGE_AUDIENCE = """
SELECT r.id, d.request_last_id FROM recipients r
LEFT JOIN deliveries d ON d.campaign_id = $4 AND d.recipient_id = r.id
                      AND d.status IN ('failed', 'abandoned')
WHERE r.audience_id = $1 AND r.id > $2 ORDER BY r.id LIMIT $3
"""
_PAGE_LEDGER = """
SELECT recipient_id AS id, request_last_id FROM deliveries
WHERE campaign_id = $1 AND status IN ('failed', 'abandoned') AND recipient_id > $2
ORDER BY recipient_id LIMIT $3
"""


def cut_into_batches(
    rows: list[tuple[int, int | None]], after_id: int, batch_size: int, *, last_page: bool
) -> list[BatchRange]:
    """Cut ``(id, request_last_id)`` rows, in id order, into ranges of about ``batch_size``.

    ``request_last_id`` is set on a recipient an earlier provider request carried and
    failed: the last recipient id of that request. A range never ends inside such a
    request, so a retry re-sends it whole, under the same key, whatever rows lie
    between its recipients. On a page that is not the last, rows after the last
    possible cut are left for the next page.
    """
    ranges: list[BatchRange] = []
    start, size, open_until = after_id, 0, after_id
    for recipient_id, request_last_id in rows:
        size += 1
        open_until = max(open_until, request_last_id or recipient_id)
        if size >= batch_size and recipient_id >= open_until:
            ranges.append(BatchRange(after_id=start, last_id=recipient_id, size=size))
            start, size = recipient_id, 0
    if size and (last_page or not ranges):
        ranges.append(BatchRange(after_id=start, last_id=rows[-1][0], size=size))
    return ranges


class PlanningActivities:
    """Campaign preparation and keyset paging; holds the worker's connection pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        """Use ``pool`` for every query."""
        self._pool = pool

    @activity.defn
    async def prepare_campaign(self, spec: CampaignSpec) -> CampaignPlan:
        """Check the spec against the database and store it for the batch activities.

        Raises:
            ApplicationError: non-retryable ``InvalidCampaignSpec`` naming the bad fields.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            try:
                plan = await check_against_database(conn, spec)
            except InvalidSpec as exc:
                raise ApplicationError(
                    str(exc), type=INVALID_SPEC_ERROR, non_retryable=True
                ) from None
            await conn.execute(
                """INSERT INTO campaigns (id, org_id, audience_id, spec)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (id) DO UPDATE
                   SET spec = EXCLUDED.spec, updated_at = now()""",
                spec.campaign_id,
                spec.org,
                plan.audience_id,
                spec.model_dump(mode="json"),
            )
            # Plans left by batches that never recorded (a terminated workflow) are
            # of no use once the provider has forgotten their keys.
            await conn.execute(
                "DELETE FROM provider_requests WHERE planned_at < now() - interval '24 hours'"
            )
        log.info("campaign prepared", campaign_id=spec.campaign_id, total=plan.total_recipients)
        return plan

    @activity.defn
    async def plan_batches(self, request: PlanBatchesInput) -> list[BatchRange]:
        """Return up to ``max_batches`` keyset ranges after ``after_id``."""
        batches = max(1, min(request.max_batches, MAX_PAGE_ROWS // request.batch_size))
        limit = request.batch_size * batches
        if request.source == "audience":
            rows = await self._pool.fetch(
                _PAGE_AUDIENCE, request.audience_id, request.after_id, limit, request.campaign_id
            )
        else:
            rows = await self._pool.fetch(
                _PAGE_LEDGER, request.campaign_id, request.after_id, limit
            )
        return cut_into_batches(
            [(row["id"], row["request_last_id"]) for row in rows],
            request.after_id,
            request.batch_size,
            last_page=len(rows) < limit,
        )

    @activity.defn
    async def abandon_failed(self, campaign_id: str) -> int:
        """Mark the recipients still failing after the last retry round as abandoned."""
        result = await self._pool.execute(
            """UPDATE deliveries SET status = 'abandoned', last_attempt_at = now()
               WHERE campaign_id = $1 AND status = 'failed'""",
            campaign_id,
        )
        abandoned = int(result.split()[-1])
        log.info("recipients abandoned", campaign_id=campaign_id, abandoned=abandoned)
        return abandoned
