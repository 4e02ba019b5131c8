"""CampaignWorkflow: one campaign, from spec to summary.

The workflow holds only cursors and counters. It pages the audience by keyset
(``plan_batches``), keeps at most ``window`` batch activities in flight, and folds
their outcomes into the status that the ``status`` query, the search attributes and
the Web UI show. Recipients that fail softly are retried in rounds after durable
timers; what still fails after the last round is abandoned.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.planning import INVALID_SPEC_ERROR, PlanningActivities
    from activities.sending import (
        PROVIDER_AUTH_ERROR,
        PROVIDER_CONFIG_ERROR,
        SendingActivities,
    )
    from campaigns import search_attributes as sa
    from campaigns.models import (
        BatchOutcome,
        BatchRange,
        CampaignPlan,
        CampaignSpec,
        CampaignState,
        CampaignStatus,
        PlanBatchesInput,
        SendBatchInput,
    )

# Permanent problems: retrying cannot help, so they stop the campaign at once.
NON_RETRYABLE = [INVALID_SPEC_ERROR, PROVIDER_AUTH_ERROR, PROVIDER_CONFIG_ERROR]
DATABASE_STEP = dict(
    start_to_close_timeout=timedelta(minutes=1),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=NON_RETRYABLE,
    ),
)
# Infrastructure faults (database, worker crash, network) retry until they clear.
BATCH_STEP = dict(
    start_to_close_timeout=timedelta(minutes=10),
    heartbeat_timeout=timedelta(seconds=10),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=NON_RETRYABLE,
    ),
)
RATE_WINDOW_SECONDS = 30.0


class CampaignFailed(Exception):
    """Raised inside the workflow to stop sending; becomes the workflow's failure."""


@workflow.defn
class CampaignWorkflow:
    """Sends one campaign; input ``CampaignSpec``, result the final ``CampaignStatus``."""

    def __init__(self) -> None:
        """Start with an empty status; ``run`` fills it in."""
        self._status: CampaignStatus | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._published_progress = -1
        self._in_flight: set[asyncio.Task[BatchOutcome]] = set()

    @workflow.run
    async def run(self, spec: CampaignSpec) -> CampaignStatus:
        """Prepare, send in passes (first pass, then retry rounds), and summarize."""
        status = self._status = CampaignStatus(
            campaign_id=spec.campaign_id,
            org=spec.org,
            state=CampaignState.PREPARING,
            started_at=workflow.now(),
        )
        workflow.upsert_search_attributes(
            [sa.CAMPAIGN_ORG.value_set(spec.org), sa.CAMPAIGN_PROGRESS.value_set(0.0)]
        )
        self._set_state(CampaignState.PREPARING)
        try:
            plan: CampaignPlan = await workflow.execute_activity_method(
                PlanningActivities.prepare_campaign, spec, **DATABASE_STEP
            )
            status.total = plan.total_recipients
            execution_id = workflow.info().run_id
            for round_ in range(len(spec.retry_delays_seconds) + 1):
                if round_ > 0:
                    if status.counts.failed == 0:
                        break
                    self._set_state(CampaignState.WAITING_RETRY)
                    await workflow.sleep(spec.retry_delays_seconds[round_ - 1])
                    status.counts.failed = 0  # this round decides them again
                status.round = round_
                self._set_state(CampaignState.RUNNING)
                await self._send_pass(spec, plan, execution_id, round_)
            if status.counts.failed:
                status.counts.abandoned += await workflow.execute_activity_method(
                    PlanningActivities.abandon_failed, spec.campaign_id, **DATABASE_STEP
                )
                status.counts.failed = 0
        except asyncio.CancelledError:
            # Cancelled from Temporal (CLI, Web UI): let in-flight batches record what
            # they sent, then end as cancelled.
            await self._drain()
            self._finish(CampaignState.CANCELLED)
            raise
        except CampaignFailed as failure:
            return self._finish(CampaignState.FAILED, str(failure))
        except ActivityError as error:
            return self._finish(CampaignState.FAILED, _describe(error))
        return self._finish(CampaignState.COMPLETED)

    @workflow.query
    def status(self) -> CampaignStatus:
        """Progress, rate, ETA and errors, as of the workflow's last step."""
        assert self._status is not None
        return self._status

    async def _send_pass(
        self, spec: CampaignSpec, plan: CampaignPlan, execution_id: str, round_: int
    ) -> None:
        """Send every batch of one pass with at most ``spec.window`` in flight."""
        source = "audience" if round_ == 0 else "ledger"
        ranges: deque[BatchRange] = deque()
        cursor, exhausted = 0, False
        failure: str | None = None
        while True:
            while failure is None and len(self._in_flight) < spec.window:
                if not ranges and not exhausted:
                    page: list[BatchRange] = await workflow.execute_activity_method(
                        PlanningActivities.plan_batches,
                        PlanBatchesInput(
                            campaign_id=spec.campaign_id,
                            audience_id=plan.audience_id,
                            source=source,
                            after_id=cursor,
                            batch_size=spec.recipients_per_activity,
                            max_batches=max(2 * spec.window, 4),
                        ),
                        **DATABASE_STEP,
                    )
                    ranges.extend(page)
                    exhausted = not page
                    cursor = page[-1].last_id if page else cursor
                if not ranges:
                    break
                batch = SendBatchInput(
                    campaign_id=spec.campaign_id,
                    execution_id=execution_id,
                    audience_id=plan.audience_id,
                    source=source,
                    round=round_,
                    range=ranges.popleft(),
                    batch_size=spec.batch_size,
                )
                self._in_flight.add(
                    asyncio.ensure_future(
                        workflow.execute_activity_method(
                            SendingActivities.send_batch, batch, **BATCH_STEP
                        )
                    )
                )
                self._status_in_flight()
            if not self._in_flight:
                break
            done, pending = await workflow.wait(
                self._in_flight, return_when=asyncio.FIRST_COMPLETED
            )
            self._in_flight = set(pending)
            failure = self._collect(done) or failure
        if failure is not None:
            raise CampaignFailed(failure)

    def _collect(self, done: list[asyncio.Task[BatchOutcome]]) -> str | None:
        """Fold finished batches into the status; return the first failure, if any."""
        failure = None
        for task in done:
            try:
                self._record(task.result())
            except ActivityError as error:
                failure = failure or _describe(error)
                self._status_error(failure)
        self._status_in_flight()
        return failure

    async def _drain(self) -> None:
        """Wait for every in-flight batch and fold in what it did."""
        if self._in_flight:
            done, _ = await workflow.wait(self._in_flight)
            self._in_flight = set()
            self._collect(done)

    def _record(self, outcome: BatchOutcome) -> None:
        status = self._status
        assert status is not None
        status.counts.add(outcome)
        if outcome.last_error:
            status.last_error = outcome.last_error
        now = workflow.time()
        self._samples.append((now, status.counts.processed))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_SECONDS:
            self._samples.popleft()
        first_time, first_count = self._samples[0]
        elapsed = now - first_time
        status.rate_per_second = (status.counts.processed - first_count) / elapsed if elapsed else 0
        remaining = max(0, status.total - status.counts.processed - status.counts.failed)
        status.eta_seconds = remaining / status.rate_per_second if status.rate_per_second else None
        self._publish_progress()

    def _status_in_flight(self) -> None:
        assert self._status is not None
        self._status.in_flight_batches = len(self._in_flight)

    def _status_error(self, message: str) -> None:
        assert self._status is not None
        self._status.last_error = message

    def _set_state(self, state: CampaignState) -> None:
        assert self._status is not None
        self._status.state = state
        workflow.upsert_search_attributes([sa.CAMPAIGN_STATE.value_set(state.value)])
        self._publish_progress(force=True)

    def _publish_progress(self, force: bool = False) -> None:
        """Search attribute at each whole percent; Web UI details on every change."""
        status = self._status
        assert status is not None
        percent = int(status.progress * 100)
        if force or percent != self._published_progress:
            self._published_progress = percent
            workflow.upsert_search_attributes([sa.CAMPAIGN_PROGRESS.value_set(float(percent))])
        counts = status.counts
        workflow.set_current_details(
            f"**{status.state.value}** · {percent}% of {status.total:,} · round {status.round}\n\n"
            f"sent {counts.sent:,} · failed {counts.failed:,} · rejected {counts.rejected:,} · "
            f"suppressed {counts.suppressed:,} · skipped {counts.skipped:,} · "
            f"abandoned {counts.abandoned:,}\n\n"
            f"{status.rate_per_second:,.0f} emails/s"
            + (f" · ETA {status.eta_seconds:,.0f}s" if status.eta_seconds else "")
            + (f"\n\nlast error: {status.last_error}" if status.last_error else "")
        )

    def _finish(self, state: CampaignState, error: str | None = None) -> CampaignStatus:
        status = self._status
        assert status is not None
        status.in_flight_batches = 0
        status.eta_seconds = None
        status.finished_at = workflow.now()
        if error:
            status.last_error = error
        self._set_state(state)
        if state is CampaignState.FAILED:
            raise ApplicationError(
                f"campaign {status.campaign_id} failed: {error}", non_retryable=True
            )
        return status


def _describe(error: ActivityError) -> str:
    """The root cause's message: what the user needs, not the activity wrapper."""
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(cause)
