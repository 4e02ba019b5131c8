"""CampaignWorkflow: one campaign, from spec to summary.

The workflow holds only cursors, counters and controls. It pages its recipients by
keyset (``plan_batches``), keeps at most ``window`` batch activities in flight (at
most ``rate_per_second`` emails a second), and folds their outcomes into the status
that the ``status`` query, the search attributes and the Web UI show. Recipients
that fail softly are retried in rounds after durable timers; what still fails after
the last round is abandoned. A run continues as new after ``batches_per_run``
batches (or when Temporal suggests it), so history stays small at any audience size.

Operators steer a running campaign with updates (pause, resume, cancel, window, rate,
priority, reschedule); each has a validator, so a refused action is refused at once with the
reason, and nothing is written to history.

While a pass sends, a reputation watch reads the campaign's engagement counters every
``reputation.check_interval_seconds`` and pauses the campaign, saying why, when its
complaint or hard-bounce rate reaches the spec's limit (see ``_watch_reputation``).

Every activity of the campaign is scheduled with a task-queue ``Priority``: the
campaign's current priority, its org as the fairness key and the org's fairness weight
(see ``workflows._priority``), so a backlogged queue serves priority 1 first and shares
each priority level among orgs by weight.

Batches run on the provider account's task queue (``CampaignPlan.send_task_queue``),
whose Temporal rate limit is the account's shared rate: the campaign paces only to its
own rate and its share of its org's cap, both from each ``plan_sends``.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

from workflows._priority import task_priority
from workflows._progress import RateWindow, details_text, eta_seconds, paced_start
from workflows._reputation import verdict

with workflow.unsafe.imports_passed_through():
    from campaigns import search_attributes as sa
    from campaigns.contract import (
        ABANDON_FAILED,
        INVALID_SPEC_ERROR,
        PLAN_BATCHES,
        PLAN_SENDS,
        PREPARE_CAMPAIGN,
        PROVIDER_AUTH_ERROR,
        PROVIDER_CONFIG_ERROR,
        READ_ENGAGEMENT,
        SEND_BATCH,
        InvalidSpec,
        SpecProblem,
        problems_from_validation_error,
    )
    from campaigns.models import (
        CAMPAIGN_ID_PATTERN,
        DEFAULT_PRIORITY,
        MAX_WINDOW,
        AbandonFailedInput,
        BatchOutcome,
        BatchRange,
        CampaignControls,
        CampaignInput,
        CampaignPlan,
        CampaignSpec,
        CampaignState,
        CampaignStatus,
        CarriedState,
        PlanBatchesInput,
        PlanSendsInput,
        ReadEngagementInput,
        ReputationCounts,
        ReputationWatch,
        SendBatchInput,
        SendPlan,
        SpecInWorkflowInput,
        is_valid_org_id,
        priority_problem,
        rate_problem,
        send_at_ahead_problem,
    )

# Permanent problems: retrying cannot help, so they stop the campaign at once.
NON_RETRYABLE = [INVALID_SPEC_ERROR, PROVIDER_AUTH_ERROR, PROVIDER_CONFIG_ERROR]
# Short database steps. The worker heartbeats for them (activities/_heartbeat.py), so
# a worker that dies holding one is noticed within one or two heartbeat timeouts (the
# server checks on a timer), not after a minute; they report nothing, so a short
# timeout costs little. Timeouts are not part of what Temporal checks on replay.
DATABASE_STEP = workflow.ActivityConfig(
    start_to_close_timeout=timedelta(minutes=1),
    heartbeat_timeout=timedelta(seconds=4),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=NON_RETRYABLE,
    ),
)
# Infrastructure faults (database, worker crash, network) retry until they clear; a
# dead worker's batch is noticed within the heartbeat timeout and resumed elsewhere.
# The batch heartbeats from a task of its own (a third of the timeout), so a short
# timeout costs little and gives a dead worker's share of the window back in seconds.
BATCH_STEP = workflow.ActivityConfig(
    start_to_close_timeout=timedelta(minutes=10),
    heartbeat_timeout=timedelta(seconds=4),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=NON_RETRYABLE,
    ),
)
HISTORY_EVENTS_PER_RUN = 8_000
"""Continue as new before this many events, whatever ``batches_per_run`` says."""
EVENTS_PER_BATCH = 6
"""Upper bound of the events one batch adds (activity, workflow task, progress): the
run stops starting batches early enough that draining a full window stays in budget."""
FINAL_STATUS_MEMO = "final_status"
"""Memo key of the status a campaign ended with, readable with no worker running."""

# Changes made after versions had run; each is taken only by runs that start with it.
PATCH_CANCEL_DURING_ACTIVITY = "cancel-during-activity-is-a-cancel"
PATCH_HISTORY_BUDGET_BY_WINDOW = "history-budget-by-window"
PATCH_FINAL_STATUS_MEMO = "final-status-memo"
PATCH_TEMPLATES_BY_REFERENCE = "templates-by-reference"
PATCH_REFUSE_CLIENT_CARRIED_STATE = "refuse-client-carried-state"
PATCH_REFUSE_FAR_SEND_AT = "refuse-far-send-at"
PATCH_REPUTATION_WATCH = "reputation-watch"
PATCH_TASK_PRIORITY = "task-priority-and-fairness"
PATCH_ACCOUNT_SEND_QUEUE = "account-send-queue"


class CampaignFailed(Exception):
    """Raised inside the workflow to stop sending; becomes the workflow's failure."""


def _refuse(message: str) -> ApplicationError:
    return ApplicationError(message, type="ControlRefused", non_retryable=True)


@workflow.defn
class CampaignWorkflow:
    """Sends one campaign; input ``CampaignSpec``, result the final ``CampaignStatus``."""

    @workflow.init
    def __init__(self, *inputs: Any) -> None:
        """Set the status up before anything runs, so controls and queries that arrive
        with the first workflow task already see it.

        ``inputs`` are taken untyped: any JSON a client sends (none, several, null, a
        list, a spec of the wrong shape) must fail the run at once, naming what was
        expected, rather than fail every workflow task on decoding.
        """
        self._invalid: InvalidSpec | None = None
        request, self._invalid = _decode(inputs)
        if request is None:
            request = _placeholder(inputs[0] if len(inputs) == 1 else None)
        self._request = request
        self._max_lateness_seconds = request.max_lateness_seconds
        carried = request.carried
        if carried is None:
            status = _new_status(request)
        else:
            status = carried.status
            status.runs += 1
        self._status: CampaignStatus = status
        # A list, not a set: finished batches are folded in start order, the same on
        # every replay (a set of tasks iterates in memory-address order).
        self._in_flight: list[asyncio.Task[BatchOutcome]] = []
        self._rate = RateWindow()
        self._published_progress = -1
        self._wake = 0  # bumped by every control change so that waits look again
        self._reputation = carried.reputation if carried is not None else ReputationWatch()

    # -- the run ------------------------------------------------------------------------

    @workflow.run
    async def run(self, *inputs: Any) -> CampaignStatus:
        """Wait for ``send_at``, prepare, send in passes, summarize.

        The one input is a ``CampaignSpec``; after continue-as-new it also carries the
        previous run's cursor, counters and controls.
        """
        status = self._status
        if self._invalid is not None:
            return self._finish(CampaignState.FAILED, str(self._invalid), INVALID_SPEC_ERROR)
        spec, carried = self._request.spec(), self._request.carried
        refused = self._refusal(spec, carried)
        if refused is not None:
            self._status = status = _new_status(self._request)  # nothing carried is shown
            return self._finish(CampaignState.FAILED, str(refused), INVALID_SPEC_ERROR)
        workflow.upsert_search_attributes([sa.CAMPAIGN_ORG.value_set(spec.org)])
        self._set_state(status.state)
        try:
            if carried is None:
                if not await self._wait_for_send_at(spec):
                    return status
                self._set_state(CampaignState.PREPARING)
                by_reference = workflow.patched(PATCH_TEMPLATES_BY_REFERENCE)
                # Inline templates are in this run's input already: the activity reads
                # them from there rather than from a second copy in its own input.
                prepare_input: CampaignSpec | SpecInWorkflowInput = (
                    SpecInWorkflowInput() if by_reference and spec.templates() else spec
                )
                plan: CampaignPlan = await workflow.execute_activity(
                    PREPARE_CAMPAIGN,
                    prepare_input,
                    result_type=CampaignPlan,
                    **self._step(DATABASE_STEP, spec.org, None),
                )
                if by_reference and plan.template_digest and spec.templates():
                    spec = spec.by_reference(plan.template_digest)  # for later runs' input
                status.total = plan.total_recipients
                carried = CarriedState(
                    # Stable across continue-as-new and resets, checked by later runs.
                    execution_id=workflow.info().first_execution_run_id,
                    plan=plan,
                    round=0,
                    cursor=0,
                    status=status,
                )
            return await self._send_all_rounds(spec, carried)
        except asyncio.CancelledError:
            # Cancelled through Temporal (CLI, Web UI): let in-flight batches record
            # what they sent, then end as cancelled.
            await self._drain()
            self._finish(CampaignState.CANCELLED)
            raise
        except CampaignFailed as failure:
            return self._finish(CampaignState.FAILED, str(failure))
        except ActivityError as error:
            # A Temporal cancel that lands while an activity runs (preparing, planning)
            # reaches us as that activity's cancellation.
            if is_cancelled_exception(error) and workflow.patched(PATCH_CANCEL_DURING_ACTIVITY):
                await self._drain()
                self._finish(CampaignState.CANCELLED)
                raise
            return self._finish(CampaignState.FAILED, _describe(error), _error_type(error))

    def _refusal(self, spec: CampaignSpec, carried: CarriedState | None) -> InvalidSpec | None:
        """Why this run must not start, beyond the spec's shape; None if it may.

        State carried over is accepted only in a run that Temporal continued from this
        campaign's first run: a client that writes ``carried`` by hand (a cursor, a plan
        naming another org's audience) is refused. Each check calls ``workflow.patched``
        only when it refuses, so runs recorded before it replay as they ran.
        """
        info = workflow.info()
        if carried is not None and (
            info.continued_run_id is None or carried.execution_id != info.first_execution_run_id
        ):
            if workflow.patched(PATCH_REFUSE_CLIENT_CARRIED_STATE):
                return InvalidSpec(
                    [
                        SpecProblem(
                            "carried",
                            "is internal state that only the campaign's own continue-as-new "
                            "may pass; start a campaign with a CampaignSpec alone",
                        )
                    ]
                )
        if carried is None and spec.send_at is not None:
            ahead = send_at_ahead_problem(spec.send_at, workflow.now())
            if ahead and workflow.patched(PATCH_REFUSE_FAR_SEND_AT):
                return InvalidSpec([SpecProblem("send_at", ahead)])
        return None

    async def _wait_for_send_at(self, spec: CampaignSpec) -> bool:
        """Sleep until the (reschedulable) send time; False if the campaign must not send."""
        controls = self._controls
        while controls.send_at is not None and not controls.cancel_requested:
            delay = (controls.send_at - workflow.now()).total_seconds()
            if delay <= 0:
                break
            seen = self._wake
            try:
                await workflow.wait_condition(
                    self._woken_since(seen), timeout=delay, timeout_summary="send_at"
                )
            except TimeoutError:
                break
        if controls.cancel_requested:
            self._finish(CampaignState.CANCELLED)
            return False
        if controls.send_at is not None:
            late = (workflow.now() - controls.send_at).total_seconds()
            if late > spec.max_lateness_seconds:
                self._finish(
                    CampaignState.EXPIRED,
                    f"not sent: ready {late:,.0f}s after send_at, more than "
                    f"max_lateness_seconds ({spec.max_lateness_seconds:,})",
                )
                return False
        return True

    async def _send_all_rounds(self, spec: CampaignSpec, carried: CarriedState) -> CampaignStatus:
        status = self._status
        while True:
            status.round = carried.round
            if not await self._send_pass(spec, carried):
                return self._finish(CampaignState.CANCELLED)
            next_round = carried.round + 1
            if status.counts.failed == 0 or next_round > len(spec.retry_delays_seconds):
                break
            self._set_state(CampaignState.WAITING_RETRY)
            delay = spec.retry_delays_seconds[next_round - 1]
            try:
                await workflow.wait_condition(
                    lambda: self._controls.cancel_requested,
                    timeout=delay,
                    timeout_summary=f"retry round {next_round}",
                )
                return self._finish(CampaignState.CANCELLED)
            except TimeoutError:
                pass
            status.counts.failed = 0  # this round decides them again
            carried.round, carried.cursor = next_round, 0
        if status.counts.failed:
            status.counts.abandoned += await workflow.execute_activity(
                ABANDON_FAILED,
                AbandonFailedInput(campaign_id=spec.campaign_id, org=spec.org),
                result_type=int,
                **self._step(DATABASE_STEP, spec.org, carried.plan.fairness_weight),
            )
            status.counts.failed = 0
        return self._finish(CampaignState.COMPLETED)

    async def _send_pass(self, spec: CampaignSpec, carried: CarriedState) -> bool:
        """Send every batch of one pass; False if the campaign was cancelled.

        Continues as new (after draining) when this run's batch or history budget is
        spent.
        """
        controls = self._controls
        self._set_state(CampaignState.PAUSED if controls.paused else CampaignState.RUNNING)
        source: Literal["audience", "ledger"] = (
            "ledger" if carried.round > 0 or spec.send_to == "failed" else "audience"
        )
        ranges: deque[BatchRange] = deque()
        plan_cursor, exhausted = carried.cursor, False
        started_here, next_start = 0, workflow.time()
        failure: str | None = None
        check_due = self._next_reputation_check(spec)
        while True:
            if check_due is not None and check_due.done() and self._may_check(failure):
                await self._watch_reputation(spec, carried)
                check_due = self._next_reputation_check(spec)
            out_of_budget = self._out_of_budget(spec, started_here)
            wake_in: float | None = None
            while (
                failure is None
                and not controls.cancel_requested
                and not controls.paused
                and not out_of_budget
                and len(self._in_flight) < controls.window
            ):
                if not ranges and not exhausted:
                    page = await self._plan(spec, carried, source, plan_cursor)
                    ranges.extend(page)
                    exhausted = not page
                    plan_cursor = page[-1].last_id if page else plan_cursor
                    continue  # controls may have changed while planning
                if not ranges:
                    break
                rate = self._paced_rate()
                if rate:
                    now = workflow.time()
                    if next_start > now:
                        wake_in = next_start - now
                        break
                    next_start = paced_start(next_start, now, ranges[0].size, rate)
                batch_range = ranges.popleft()
                self._start_batch(spec, carried, source, batch_range)
                carried.cursor = batch_range.last_id
                started_here += 1
                out_of_budget = self._out_of_budget(spec, started_here)
            if not self._in_flight:
                if failure is not None or controls.cancel_requested or (exhausted and not ranges):
                    _stop_timer(check_due)
                if failure is not None:
                    raise CampaignFailed(failure)
                if controls.cancel_requested:
                    return False
                if exhausted and not ranges:
                    return True
                if out_of_budget:
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    carried.reputation = self._reputation
                    workflow.continue_as_new(CampaignInput.continuing(spec, carried))
            seen = self._wake
            try:
                await workflow.wait_condition(
                    self._woken_or_batch_done_since(seen, check_due, failure), timeout=wake_in
                )
            except TimeoutError:
                pass  # the rate limit allows the next batch now
            done = [task for task in self._in_flight if task.done()]
            self._in_flight = [task for task in self._in_flight if not task.done()]
            failure = self._collect(done) or failure

    async def _plan(
        self,
        spec: CampaignSpec,
        carried: CarriedState,
        source: Literal["audience", "ledger"],
        after_id: int,
    ) -> list[BatchRange]:
        """The next page of ranges after ``after_id``; empty at the end of the pass.

        Runs that send on the provider account's task queue ask ``plan_sends``, which
        sizes the ranges for the account and tells the org's cap share and the
        account's rate (shown by the status); older runs ask ``plan_batches``.
        """
        controls = self._controls
        request = PlanBatchesInput(
            campaign_id=spec.campaign_id,
            org=spec.org,
            audience_id=carried.plan.audience_id,
            source=source,
            after_id=after_id,
            recipients_per_activity=spec.recipients_per_activity,
            max_batches=max(2 * controls.window, 4),
        )
        # The campaign's priority here too: a priority-1 campaign's planning must not
        # wait behind a priority-3 backlog.
        step = self._step(DATABASE_STEP, spec.org, carried.plan.fairness_weight)
        if not self._sends_on_account_queue(carried):
            page: list[BatchRange] = await workflow.execute_activity(
                PLAN_BATCHES, request, result_type=list[BatchRange], **step
            )
            return page
        plan: SendPlan = await workflow.execute_activity(
            PLAN_SENDS,
            PlanSendsInput(
                **request.model_dump(),
                emails_per_request=spec.batch_size,
                rate_per_second=controls.rate_per_second,
            ),
            result_type=SendPlan,
            **step,
        )
        self._status.org_rate_cap = plan.org_rate_cap
        self._status.account_rate = plan.account_rate
        return plan.ranges

    def _sends_on_account_queue(self, carried: CarriedState) -> bool:
        """Whether batches run on the provider account's task queue (runs prepared
        before accounts existed keep the campaign's own queue)."""
        return carried.plan.send_task_queue is not None and workflow.patched(
            PATCH_ACCOUNT_SEND_QUEUE
        )

    def _paced_rate(self) -> float | None:
        """The emails/s this campaign paces itself to: its own rate and its share of
        its org's cap, whichever is lower (None: neither is set). The account's limit
        is not paced here: its task queue dispatches the batches at that rate."""
        rates = [r for r in (self._controls.rate_per_second, self._status.org_rate_cap) if r]
        return min(rates) if rates else None

    # -- the reputation watch -------------------------------------------------------------

    def _next_reputation_check(self, spec: CampaignSpec) -> asyncio.Task[None] | None:
        """A timer for the next reputation check, or None when the watch is off.

        One durable timer per check interval, which the pass's wait also watches: a
        timeout on every wait would add a timer, started and cancelled, to history for
        each finished batch. Runs that started before the watch existed never check.
        """
        if not spec.reputation.enabled or not workflow.patched(PATCH_REPUTATION_WATCH):
            return None
        return asyncio.ensure_future(
            workflow.sleep(spec.reputation.check_interval_seconds, summary="reputation check")
        )

    def _may_check(self, failure: str | None) -> bool:
        """Whether the watch may read now: only while the pass sends."""
        controls = self._controls
        return (
            failure is None
            and not controls.paused
            and not controls.cancel_requested
            and self._status.state is CampaignState.RUNNING
        )

    async def _watch_reputation(self, spec: CampaignSpec, carried: CarriedState) -> None:
        """Read the campaign's engagement counters and pause it if a rate is too high.

        The verdict (``workflows._reputation.verdict``) judges the counts since the
        watch's baseline. The baseline is empty until an operator resumes a campaign the
        watch paused; then it becomes the counts of the watch's last check, so the
        counts that caused the pause cannot cause another at once: the watch judges
        only what arrived since the resume, and gives no verdict before
        ``min_delivered`` more emails were delivered. The baseline is carried across
        continue-as-new. History holds the counts and the reason, never an address.
        """
        counts: ReputationCounts = await workflow.execute_activity(
            READ_ENGAGEMENT,
            ReadEngagementInput(campaign_id=spec.campaign_id, org=spec.org),
            result_type=ReputationCounts,
            **self._step(self._reputation_step(), spec.org, carried.plan.fairness_weight),
        )
        self._reputation.last = counts
        reason = verdict(spec.reputation, counts, self._reputation.baseline)
        # An operator may have paused or cancelled the campaign while the read ran.
        if reason is not None and self._may_check(None):
            self._pause(reason)

    @staticmethod
    def _reputation_step() -> workflow.ActivityConfig:
        step: workflow.ActivityConfig = {**DATABASE_STEP, "summary": "reputation check"}
        return step

    def _out_of_budget(self, spec: CampaignSpec, started_here: int) -> bool:
        info = workflow.info()
        events_budget = HISTORY_EVENTS_PER_RUN
        if workflow.patched(PATCH_HISTORY_BUDGET_BY_WINDOW):
            events_budget -= EVENTS_PER_BATCH * self._controls.window  # room to drain
        return (
            started_here >= spec.batches_per_run
            or info.get_current_history_length() >= events_budget
            or info.is_continue_as_new_suggested()
        )

    def _start_batch(
        self,
        spec: CampaignSpec,
        carried: CarriedState,
        source: Literal["audience", "ledger"],
        batch_range: BatchRange,
    ) -> None:
        batch = SendBatchInput(
            campaign_id=spec.campaign_id,
            org=spec.org,
            execution_id=carried.execution_id,
            audience_id=carried.plan.audience_id,
            source=source,
            round=carried.round,
            range=batch_range,
            batch_size=spec.batch_size,
        )
        step = self._step(
            self._batch_step(carried, batch_range), spec.org, carried.plan.fairness_weight
        )
        if self._sends_on_account_queue(carried):
            assert carried.plan.send_task_queue is not None
            step = {**step, "task_queue": carried.plan.send_task_queue}
        self._in_flight.append(
            asyncio.ensure_future(
                workflow.execute_activity(SEND_BATCH, batch, result_type=BatchOutcome, **step)
            )
        )
        self._update_in_flight()

    @staticmethod
    def _batch_step(carried: CarriedState, batch_range: BatchRange) -> workflow.ActivityConfig:
        """The batch activity's settings, with a summary the Web UI's timeline shows."""
        step: workflow.ActivityConfig = {
            **BATCH_STEP,
            "summary": f"round {carried.round}: recipients "
            f"{batch_range.after_id + 1}..{batch_range.last_id}",
        }
        return step

    def _step(
        self, step: workflow.ActivityConfig, org: str, weight: float | None
    ) -> workflow.ActivityConfig:
        """``step`` with the campaign's task-queue priority and its org's fairness.

        The priority is read when the activity is scheduled: a change applies to the
        activities scheduled after it, not to those already waiting in the queue. Runs
        that started before priorities existed schedule as they did.
        """
        if not workflow.patched(PATCH_TASK_PRIORITY):
            return step
        prioritized: workflow.ActivityConfig = {
            **step,
            "priority": task_priority(self._controls.priority, org, weight),
        }
        return prioritized

    def _woken_since(self, seen: int) -> Callable[[], bool]:
        """A wait condition: a control changed since wake count ``seen``."""
        return lambda: self._wake != seen

    def _woken_or_batch_done_since(
        self,
        seen: int,
        check_due: asyncio.Task[None] | None = None,
        failure: str | None = None,
    ) -> Callable[[], bool]:
        """A wait condition: a control changed since ``seen``, a batch finished, or a
        reputation check is due while the watch may check."""
        return lambda: (
            self._wake != seen
            or any(task.done() for task in self._in_flight)
            or (check_due is not None and check_due.done() and self._may_check(failure))
        )

    def _collect(self, done: list[asyncio.Task[BatchOutcome]]) -> str | None:
        """Fold finished batches into the status; return the first failure, if any."""
        failure = None
        for task in done:
            try:
                self._record(task.result())
            except ActivityError as error:
                failure = failure or _describe(error)
                self._status.last_error = failure
        self._update_in_flight()
        return failure

    async def _drain(self) -> None:
        """Wait for every in-flight batch and fold in what it did."""
        if self._in_flight:
            await workflow.wait(self._in_flight)
            done, self._in_flight = self._in_flight, []
            self._collect(done)

    # -- status -------------------------------------------------------------------------

    @workflow.query
    def status(self) -> CampaignStatus:
        """Progress, rate, ETA, controls and errors, as of the workflow's last step.

        A paused campaign sends nothing, so it shows no rate and no ETA.
        """
        if self._status.state is CampaignState.PAUSED:
            return self._status.model_copy(update={"rate_per_second": 0.0, "eta_seconds": None})
        return self._status

    @property
    def _controls(self) -> CampaignControls:
        assert self._status.controls is not None
        return self._status.controls

    def _record(self, outcome: BatchOutcome) -> None:
        status = self._status
        status.counts.add(outcome)
        if outcome.last_error:
            status.last_error = outcome.last_error
        status.rate_per_second = self._rate.add(workflow.time(), status.counts.processed)
        status.eta_seconds = eta_seconds(status)
        self._publish_progress()

    def _update_in_flight(self) -> None:
        self._status.in_flight_batches = len(self._in_flight)

    def _set_state(self, state: CampaignState) -> None:
        self._status.state = state
        workflow.upsert_search_attributes([sa.CAMPAIGN_STATE.value_set(state.value)])
        self._publish_progress(force=True)

    def _publish_progress(self, force: bool = False) -> None:
        """Search attribute at each whole percent; Web UI details on every change."""
        status = self._status
        percent = int(status.progress * 100)
        if force or percent != self._published_progress:
            self._published_progress = percent
            workflow.upsert_search_attributes([sa.CAMPAIGN_PROGRESS.value_set(float(percent))])
        workflow.set_current_details(details_text(status, percent))

    def _finish(
        self, state: CampaignState, error: str | None = None, error_type: str | None = None
    ) -> CampaignStatus:
        status = self._status
        status.in_flight_batches = 0
        status.eta_seconds = None
        status.finished_at = workflow.now()
        if error:
            status.last_error = error
        self._set_state(state)
        if workflow.patched(PATCH_FINAL_STATUS_MEMO):
            # Failed and cancelled runs have no result: the memo keeps their summary.
            workflow.upsert_memo({FINAL_STATUS_MEMO: status})
        if state is CampaignState.FAILED:
            raise ApplicationError(
                f"campaign {status.campaign_id} failed: {error}",
                type=error_type,
                non_retryable=True,
            )
        return status

    # -- controls -----------------------------------------------------------------------

    def _refuse_if_finished(self, action: str) -> None:
        status = self._status
        if status.done:
            raise _refuse(
                f"cannot {action}: campaign {status.campaign_id} is {status.state.value.lower()}"
            )
        if self._controls.cancel_requested:
            raise _refuse(f"cannot {action}: campaign {status.campaign_id} is being cancelled")

    def _changed(self) -> CampaignStatus:
        self._wake += 1
        self._publish_progress()
        return self._status

    def _pause(self, reason: str | None) -> CampaignStatus:
        """Stop starting batches; those in flight finish and are recorded.

        The one way a campaign pauses: the ``pause`` update (``reason`` None, an
        operator's pause) and the reputation watch (its verdict, in counts and rates).
        """
        controls = self._controls
        controls.paused = True
        controls.pause_reason = reason
        if self._status.state is CampaignState.RUNNING:
            self._set_state(CampaignState.PAUSED)
        return self._changed()

    @workflow.update
    def pause(self) -> CampaignStatus:
        """Stop starting batches; those in flight finish and are recorded."""
        return self._pause(None)

    @pause.validator
    def _validate_pause(self) -> None:
        self._refuse_if_finished("pause")
        if self._controls.paused:
            reason = self._controls.pause_reason
            why = f" by the reputation watch ({reason})" if reason else ""
            raise _refuse(f"cannot pause: the campaign is already paused{why}")

    @workflow.update
    def resume(self) -> CampaignStatus:
        """Start batches again after a pause.

        After a pause by the reputation watch, the watch judges only what arrives from
        now on (see ``_watch_reputation``).
        """
        controls = self._controls
        if controls.pause_reason is not None:
            self._reputation.baseline = self._reputation.last
        controls.paused = False
        controls.pause_reason = None
        if self._status.state is CampaignState.PAUSED:
            self._set_state(CampaignState.RUNNING)
        return self._changed()

    @resume.validator
    def _validate_resume(self) -> None:
        self._refuse_if_finished("resume")
        if not self._controls.paused:
            raise _refuse("cannot resume: the campaign is not paused")

    @workflow.update
    def cancel(self) -> CampaignStatus:
        """Stop gracefully: in-flight batches finish, none start; the summary shows the rest."""
        self._controls.cancel_requested = True
        return self._changed()

    @cancel.validator
    def _validate_cancel(self) -> None:
        self._refuse_if_finished("cancel")

    @workflow.update
    def set_window(self, window: int) -> CampaignStatus:
        """Change how many batches may be in flight."""
        self._controls.window = window
        return self._changed()

    @set_window.validator
    def _validate_set_window(self, window: int) -> None:
        self._refuse_if_finished("change the window")
        if not 1 <= window <= MAX_WINDOW:
            raise _refuse(f"window must be between 1 and {MAX_WINDOW} (got {window})")

    @workflow.update
    def set_rate(self, rate_per_second: float | None) -> CampaignStatus:
        """Change the send rate limit (emails/s); None removes it."""
        self._controls.rate_per_second = rate_per_second
        return self._changed()

    @set_rate.validator
    def _validate_set_rate(self, rate_per_second: float | None) -> None:
        self._refuse_if_finished("change the rate")
        problem = rate_problem(rate_per_second)
        if problem:
            raise _refuse(problem)

    @workflow.update
    def set_priority(self, priority: object) -> CampaignStatus:
        """Change the campaign's priority: 1 (highest) to 5 (lowest).

        Batches scheduled from now on carry it; those already queued keep theirs, so
        it takes effect within one window of batches.
        """
        assert isinstance(priority, int)  # the validator refused anything else
        self._controls.priority = priority
        return self._changed()

    @set_priority.validator
    def _validate_set_priority(self, priority: object) -> None:
        # Typed ``object``: "2", 2.0 or true must be refused, not coerced to 2 or 1.
        self._refuse_if_finished("change the priority")
        problem = priority_problem(priority)
        if problem:
            raise _refuse(problem)

    @workflow.update
    def reschedule(self, send_at: datetime) -> CampaignStatus:
        """Move the scheduled start of a campaign that is still waiting for it."""
        self._controls.send_at = send_at
        return self._changed()

    @reschedule.validator
    def _validate_reschedule(self, send_at: datetime) -> None:
        self._refuse_if_finished("reschedule")
        if self._status.state is not CampaignState.SCHEDULED:
            raise _refuse(
                "cannot reschedule: the campaign is no longer waiting for its start time "
                f"(it is {self._status.state.value.lower()})"
            )
        if send_at.tzinfo is None:
            raise _refuse("send_at needs a timezone, e.g. 2026-12-01T09:00:00+00:00")
        if (workflow.now() - send_at).total_seconds() > self._max_lateness_seconds:
            raise _refuse(
                f"cannot reschedule to {send_at.isoformat()}: that is more than "
                f"max_lateness_seconds ({self._max_lateness_seconds:,}) ago, so the "
                "campaign would expire at once"
            )
        problem = send_at_ahead_problem(send_at, workflow.now())
        if problem:
            raise _refuse(f"cannot reschedule: send_at {problem}")


def _new_status(request: CampaignInput) -> CampaignStatus:
    """The status of a campaign's first run, before anything happened."""
    return CampaignStatus(
        campaign_id=request.campaign_id,
        org=request.org,
        state=CampaignState.SCHEDULED if request.send_at else CampaignState.PREPARING,
        started_at=workflow.now(),
        controls=CampaignControls(
            window=request.window,
            rate_per_second=request.rate_per_second,
            send_at=request.send_at,
            priority=request.priority,
        ),
    )


def _stop_timer(timer: asyncio.Task[None] | None) -> None:
    """Cancel a timer the pass no longer needs, so it does not fire into the next step."""
    if timer is not None and not timer.done():
        timer.cancel()


def _is_campaign_id(value: str) -> bool:
    return re.fullmatch(CAMPAIGN_ID_PATTERN, value) is not None


def _shape(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean", dict: "an object"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _decode(inputs: tuple[Any, ...]) -> tuple[CampaignInput | None, InvalidSpec | None]:
    """The workflow's input, or why it is not one JSON object that is a campaign spec."""
    expected = "one JSON object, a campaign spec (campaign_id, org, audience, ...)"
    if len(inputs) != 1:
        got = "no input" if not inputs else f"{len(inputs)} inputs"
        return None, InvalidSpec([SpecProblem("input", f"expected {expected}; got {got}")])
    if not isinstance(inputs[0], dict):
        return None, InvalidSpec(
            [SpecProblem("input", f"expected {expected}; got {_shape(inputs[0])}")]
        )
    try:
        return CampaignInput.model_validate(inputs[0]), None
    except ValidationError as error:
        return None, InvalidSpec(problems_from_validation_error(error))


def _placeholder(request: Any) -> CampaignInput:
    """A stand-in input for a spec that failed validation, so the status has names."""
    fields = request if isinstance(request, dict) else {}
    name = fields.get("campaign_id")
    org = fields.get("org")
    # Only names that obey the rules reach the status and memo: a refused input may
    # hold a megabyte of control characters in either.
    return CampaignInput.model_construct(
        campaign_id=name
        if isinstance(name, str) and _is_campaign_id(name)
        else workflow.info().workflow_id,
        org=org if isinstance(org, str) and is_valid_org_id(org) else "?",
        audience="?",
        from_address="?",
        window=1,
        rate_per_second=None,
        send_at=None,
        max_lateness_seconds=0,
        priority=DEFAULT_PRIORITY,
        carried=None,
    )


def _root_cause(error: ActivityError) -> BaseException:
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return cause


def _error_type(error: ActivityError) -> str | None:
    """The root cause's error type (``InvalidCampaignSpec``, ``ProviderAuthError``)."""
    cause = _root_cause(error)
    return cause.type if isinstance(cause, ApplicationError) else None


def _describe(error: ActivityError) -> str:
    """The root cause's message: what the user needs, not the activity wrapper."""
    return str(_root_cause(error))
