"""RefreshFirstPartyOrgsWorkflow: the hourly refresh of the first-party org snapshot.

Started by the ``first-party-orgs-refresh`` Temporal Schedule (see
``campaigns.schedules``) on the ``maintenance`` task queue, so the send path never
runs or waits for it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from campaigns.contract import REFRESH_FIRST_PARTY_ORGS, REFRESH_REFUSED_ERROR
    from campaigns.models import RefreshResult


@workflow.defn
class RefreshFirstPartyOrgsWorkflow:
    """Runs one refresh; its result lists the counts and the orgs added and removed."""

    @workflow.run
    async def run(self) -> RefreshResult:
        """Refresh, retrying a database outage for a few minutes before giving up."""
        return await workflow.execute_activity(
            REFRESH_FIRST_PARTY_ORGS,
            result_type=RefreshResult,
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=2),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(minutes=1),
                maximum_attempts=6,
                non_retryable_error_types=[REFRESH_REFUSED_ERROR],
            ),
        )
