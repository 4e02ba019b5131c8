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

# The request key of a recipient an earlier execution left failed or abandoned: a
# range must not split that request (an index-only probe of deliveries_to_retry).
_PAGE_AUDIENCE = """
SELECT r.id, d.request_key FROM recipients r
LEFT JOIN deliveries d ON d.campaign_id = $4 AND d.recipient_id = r.id
                      AND d.status IN ('failed', 'abandoned')
WHERE r.audience_id = $1 AND r.id > $2 ORDER BY r.id LIMIT $3
"""
_PAGE_LEDGER = """
SELECT recipient_id AS id, request_key FROM deliveries
WHERE campaign_id = $1 AND status IN ('failed', 'abandoned') AND recipient_id > $2
ORDER BY recipient_id LIMIT $3
"""


def cut_into_batches(
    rows: list[tuple[int, str | None]], after_id: int, batch_size: int, *, last_page: bool
) -> list[BatchRange]:
    """Cut ``(id, request_key)`` rows, in id order, into ranges of about ``batch_size``.

    A range never splits the recipients of one earlier provider request (same
    ``request_key``), so a retry re-sends that request whole, under the same key. A
    request's recipients are adjacent among the keyed rows (a batch never interleaves
    two requests), though rows without a key may sit between them. On a page that is
    not the last, the last request may go on in the next page, so the rows from the
    last possible cut on are left for it.
    """
    following: list[str | None] = [None] * len(rows)  # key of the next keyed row
    upcoming: str | None = None
    for index in range(len(rows) - 1, -1, -1):
        following[index] = upcoming
        upcoming = rows[index][1] or upcoming
    ranges: list[BatchRange] = []
    start, size, current = after_id, 0, None
    for index, (recipient_id, key) in enumerate(rows):
        size += 1
        current = key or current  # the request of the last keyed row so far
        if current is None:
            can_cut = True
        elif following[index] is not None:
            can_cut = following[index] != current
        else:
            can_cut = last_page  # the current request may go on in the next page
        if size >= batch_size and can_cut:
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
            [(row["id"], row["request_key"]) for row in rows],
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
