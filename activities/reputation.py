"""The reputation watch's one activity: a campaign's engagement counters, as counts.

It reads one row (``campaign_engagement``), which the provider-event service keeps in
the same transaction as the ledger, so a check costs the same at any audience size.
What it returns (three counts) is all that reaches workflow history.
"""

from __future__ import annotations

import asyncpg
from temporalio import activity

from campaigns.contract import READ_ENGAGEMENT
from campaigns.models import ReadEngagementInput, ReputationCounts
from campaigns.store import reports


class ReputationActivities:
    """Reads for the reputation watch; holds the worker's connection pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        """Use ``pool`` for every query."""
        self._pool = pool

    @activity.defn(name=READ_ENGAGEMENT)
    async def read_engagement(self, request: ReadEngagementInput) -> ReputationCounts:
        """Delivered, hard-bounced and complained counts of the campaign, for its org.

        Counters another org wrote are never read: a campaign of another org, or one
        the provider has said nothing about yet, reads as zeros.
        """
        counts = await reports.engagement(self._pool, request.campaign_id, request.org)
        return counts.for_reputation()
