"""Maintenance activities, run on their own task queue, away from the send path."""

from __future__ import annotations

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from campaigns.first_party import RefreshRefused, RefreshResult, refresh_first_party_orgs

REFRESH_REFUSED_ERROR = "FirstPartyRefreshRefused"


class MaintenanceActivities:
    """Periodic jobs over the shared database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        """Use ``pool`` for every query."""
        self._pool = pool

    @activity.defn
    async def refresh_first_party_orgs(self) -> RefreshResult:
        """Recompute the first-party org set in one statement and publish it atomically.

        Raises:
            ApplicationError: non-retryable ``FirstPartyRefreshRefused`` when the data
                cannot give a trustworthy set; the previous snapshot stays in use.
        """
        try:
            return await refresh_first_party_orgs(self._pool)
        except RefreshRefused as exc:
            raise ApplicationError(
                str(exc), type=REFRESH_REFUSED_ERROR, non_retryable=True
            ) from None
