"""Maintenance activities, run on their own task queue, away from the send path."""

from __future__ import annotations

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from campaigns.contract import (
    DATABASE_UNAVAILABLE_ERROR,
    REFRESH_FIRST_PARTY_ORGS,
    REFRESH_REFUSED_ERROR,
)
from campaigns.first_party import RefreshRefused, refresh_first_party_orgs
from campaigns.models import RefreshResult

__all__ = ["DATABASE_UNAVAILABLE_ERROR", "REFRESH_REFUSED_ERROR", "MaintenanceActivities"]

# What a database that is down, restarting or unreachable raises through asyncpg.
_UNAVAILABLE = (
    OSError,  # refused, unreachable, timed out
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,  # the connection was lost mid-statement
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,  # starting up
)


class MaintenanceActivities:
    """Periodic jobs over the shared database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        """Use ``pool`` for every query."""
        self._pool = pool

    @activity.defn(name=REFRESH_FIRST_PARTY_ORGS)
    async def refresh_first_party_orgs(self) -> RefreshResult:
        """Recompute the first-party org set in one statement and publish it atomically.

        Raises:
            ApplicationError: non-retryable ``FirstPartyRefreshRefused`` when the data
                cannot give a trustworthy set; retryable
                ``FirstPartyRefreshDatabaseUnavailable`` when the database cannot be
                reached. Either way the previous snapshot stays in use.
        """
        try:
            return await refresh_first_party_orgs(self._pool)
        except RefreshRefused as exc:
            raise ApplicationError(
                str(exc), type=REFRESH_REFUSED_ERROR, non_retryable=True
            ) from None
        except _UNAVAILABLE as exc:
            raise ApplicationError(
                f"first-party refresh could not reach the database or lost it "
                f"({type(exc).__name__}: {exc}); it will be retried and the previous "
                "snapshot stays in use",
                type=DATABASE_UNAVAILABLE_ERROR,
            ) from None  # the message says it all; a chained trace would only be truncated
