"""The Python client: start, watch, steer and list campaigns.

    client = await CampaignClient.connect(Settings())
    handle = await client.start(spec)
    status = await client.status(handle.id)
    await client.pause(handle.id)
    capacity = await client.capacity()  # the account's rate and who uses it

Controls are Temporal updates with validators: a refused action raises
``ControlRefused`` at once with the workflow's reason, and nothing is written to the
campaign's history.
"""

from __future__ import annotations

import asyncio
import builtins
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, Field, ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from campaigns import search_attributes as sa
from campaigns import store
from campaigns.contract import send_task_queue
from campaigns.models import (
    CAMPAIGN_ID_PATTERN,
    CampaignReport,
    CampaignSpec,
    CampaignState,
    CampaignStatus,
    priority_problem,
    rate_problem,
)
from campaigns.settings import Settings
from campaigns.spec_check import (
    InvalidSpec,
    SpecProblem,
    check_against_database,
    check_timing,
    owned_by_another_workflow,
    problems_from_validation_error,
)
from campaigns.store import accounts, ledger, orgs, reports
from campaigns.store import campaigns as campaign_rows
from campaigns.store._pool import Conn
from campaigns.store.templates import store_templates
from campaigns.temporal import WORKFLOW_TYPE, connect, describe_queue
from workflows import CampaignWorkflow
from workflows.campaign import FINAL_STATUS_MEMO

ANSWER_TIMEOUT_SECONDS = 30.0
"""Longest a status read or a control waits for Temporal and a worker to answer."""
CAPACITY_CAMPAIGNS = 100
"""Most running campaigns ``capacity`` reads the status of."""
CAPACITY_QUERY_SECONDS = 5.0
"""Longest ``capacity`` waits for one campaign's status."""
_CAPACITY_CONCURRENCY = 16
NEAR_LIMIT = 0.9
"""A campaign measured at this share of a rate or more is held by that rate."""


class CampaignClientError(RuntimeError):
    """A campaign operation that cannot be done; the message says why."""


class CampaignNotFound(CampaignClientError):
    """No campaign workflow has this id."""


class CampaignAlreadyRunning(CampaignClientError):
    """A campaign with this workflow id is running already."""


class ControlRefused(CampaignClientError):
    """The campaign refused the action in its current state."""


@dataclass(frozen=True)
class CampaignListing:
    """One row of ``list``: what the search attributes say."""

    workflow_id: str
    state: str | None
    org: str | None
    progress: float | None
    execution_status: str | None
    started_at: datetime


LimitedBy = Literal["window", "its rate", "org cap", "account", "nothing", "paused"]
"""What holds a campaign's send rate back (``limited_by``)."""


def limited_by(status: CampaignStatus) -> LimitedBy:
    """What holds the campaign's send rate back now, judged from its status alone.

    In this order: ``paused``; ``its rate`` when it sends at 90% or more of its own
    rate limit; ``org cap`` when it sends at 90% or more of its share of its org's cap
    (both are paced by the workflow); ``account`` when the provider account has a
    shared rate (its batches wait in the account's task queue, which dispatches them
    at that rate, and waiting batches count as in flight, so the window is full too);
    ``window`` when the window is full without an account limit; else ``nothing``
    (also for a campaign that is not sending: scheduled, preparing, waiting or
    finished).
    """
    controls = status.controls
    if status.state is CampaignState.PAUSED or (controls is not None and controls.paused):
        return "paused"
    if status.state is not CampaignState.RUNNING:
        return "nothing"
    measured = status.rate_per_second
    own = controls.rate_per_second if controls is not None else None
    if own and measured >= NEAR_LIMIT * own:
        return "its rate"
    if status.org_rate_cap and measured >= NEAR_LIMIT * status.org_rate_cap:
        return "org cap"
    if status.account_rate is not None:
        return "account"
    if controls is not None and status.in_flight_batches >= controls.window:
        return "window"
    return "nothing"


class AccountCapacity(BaseModel):
    """A provider account's configured limits and its shared rate now."""

    id: str
    requests_per_second: float | None = Field(description="Configured; None: no limit.")
    emails_per_second: float | None = Field(description="Configured; None: no limit.")
    current_rps: float | None = Field(
        description="The adaptive rate the account's task queue should dispatch at now "
        "(requests/s); None: the account has no limit."
    )
    ceiling_rps: float | None = Field(
        description="The most the rate may reach: the configured limits' and the "
        "provider's advertised limit, whichever is lowest (requests/s)."
    )
    ceiling_source: Literal["configured", "advertised"] | None = None
    advertised_rps: float | None = Field(
        default=None, description="What the provider's ratelimit-* headers last said."
    )
    throttled_at_rps: float | None = Field(
        default=None, description="The rate the provider accepted when it last answered 429."
    )
    requests_per_batch: int = Field(
        default=1,
        description="The provider requests a batch activity is planned with (by the "
        "configured ceiling: 1, 2, 4, 6, 8, 12 or 16).",
    )
    requests_per_dispatch: int = Field(
        default=1,
        description="The most requests one attempt of a batch sends at the current rate "
        "(a divisor of requests_per_batch).",
    )
    queue_rate_limit: float | None = Field(
        default=None,
        description="The rate limit last recorded as set on the task queue: dispatches/s, "
        "each at most requests_per_dispatch requests.",
    )
    recent_answered: float = Field(
        description="Answers other than 429 in about the last 30 s (decayed)."
    )
    recent_throttled: float = Field(description="429 answers in about the last 30 s (decayed).")
    recent_throttle_ratio: float = Field(description="Share of recent answers that were 429.")


class QueueCapacity(BaseModel):
    """What Temporal reports of the account's task queue."""

    task_queue: str
    rate_limit: float | None = Field(
        description="Dispatches (attempts of batch activities)/s; None: none set."
    )
    backlog: int
    backlog_age_seconds: float
    dispatch_rate: float = Field(description="Attempts started per second lately.")


class CampaignCapacity(BaseModel):
    """One running campaign's use of the account."""

    workflow_id: str
    campaign_id: str
    org: str
    state: CampaignState
    priority: int | None
    emails_per_second: float = Field(description="Measured over its last 30 s of batches.")
    share: float = Field(description="Its part of all listed campaigns' emails/s, 0..1.")
    window: int | None
    in_flight_batches: int
    rate_limit: float | None = Field(description="Its own rate limit, emails/s.")
    org_rate_cap: float | None = Field(description="Its share of its org's cap, emails/s.")
    account_rate: float | None = Field(description="The account's rate at its last plan.")
    limited_by: LimitedBy


class OrgCapacity(BaseModel):
    """One org's use of the account, over its running campaigns."""

    org: str
    campaigns: int
    emails_per_second: float
    share: float = Field(description="Its part of all listed campaigns' emails/s, 0..1.")
    cap: float | None = Field(description="Its cap over all its campaigns, emails/s.")
    fairness_weight: float | None


class Capacity(BaseModel):
    """The provider account's capacity and how the running campaigns share it."""

    at: datetime
    account: AccountCapacity | None = Field(description="None: no such account row.")
    queue: QueueCapacity | None = Field(description="None: Temporal did not describe it.")
    queue_error: str | None = None
    campaigns: list[CampaignCapacity]
    orgs: list[OrgCapacity]
    emails_per_second: float = Field(description="All listed campaigns together.")
    unreadable: list[str] = Field(
        default_factory=list, description="Running campaigns whose status did not come back."
    )
    truncated: bool = Field(
        default=False, description=f"More than {CAPACITY_CAMPAIGNS} campaigns are running."
    )


def account_capacity(account: accounts.Account) -> AccountCapacity:
    """What ``capacity`` shows of an account row."""
    configured, ceiling = account.limits.ceiling(), account.ceiling_rps
    advertised = account.adaptive.advertised
    source: Literal["configured", "advertised"] | None = None
    if ceiling is not None:
        source = "advertised" if configured is not None and ceiling < configured else "configured"
    return AccountCapacity(
        id=account.id,
        requests_per_second=account.limits.requests_per_second,
        emails_per_second=account.limits.emails_per_second,
        current_rps=account.target_rps,
        ceiling_rps=ceiling,
        ceiling_source=source,
        advertised_rps=advertised,
        throttled_at_rps=account.adaptive.throttled_at,
        requests_per_batch=account.requests_per_batch,
        requests_per_dispatch=account.requests_per_dispatch,
        queue_rate_limit=account.applied_rps,
        recent_answered=account.recent_answered,
        recent_throttled=account.recent_throttled,
        recent_throttle_ratio=account.recent_throttle_ratio,
    )


class CampaignClient:
    """Campaign operations over one Temporal client."""

    def __init__(self, client: Client, settings: Settings) -> None:
        """Use ``client`` (with the pydantic data converter) and ``settings``' task queue."""
        self.temporal = client
        self.settings = settings

    @classmethod
    async def connect(cls, settings: Settings) -> CampaignClient:
        """Connect to the Temporal server ``settings`` names."""
        return cls(await connect(settings), settings)

    async def start(self, spec: CampaignSpec, workflow_id: str | None = None) -> WorkflowHandle:
        """Start a campaign whose spec was already validated.

        Inline templates are stored in the database first (``settings.database_url``),
        so the workflow input carries only their digest and history stays small
        whatever their size.

        Raises:
            CampaignAlreadyRunning: a workflow with this id is running.
            InvalidSpec: the org is unknown, another workflow owns the campaign id, or
                ``send_at`` is too far ahead or already too long past.
        """
        workflow_id = workflow_id or spec.campaign_id
        check_timing(spec, datetime.now(UTC))
        spec = await self._stored_by_reference(spec, workflow_id)
        try:
            return await self.temporal.start_workflow(
                CampaignWorkflow.run,
                spec,  # a CampaignInput without carried state
                id=workflow_id,
                task_queue=self.settings.task_queue,
                static_summary=f"Campaign {spec.campaign_id} · org {spec.org} · "
                f"audience {spec.audience}"
                + (" · failed recipients only" if spec.send_to == "failed" else ""),
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(sa.CAMPAIGN_STATE, CampaignState.PREPARING.value),
                        SearchAttributePair(sa.CAMPAIGN_ORG, spec.org),
                    ]
                ),
            )
        except WorkflowAlreadyStartedError:
            raise CampaignAlreadyRunning(
                f"campaign '{workflow_id}' is already running; "
                f"watch it with `campaigns status {workflow_id}`"
            ) from None

    async def _stored_by_reference(self, spec: CampaignSpec, workflow_id: str) -> CampaignSpec:
        """Store inline templates and return the spec by reference; check the id's owner."""
        templates = spec.templates()
        conn = await store.connect(self.settings.require_database_url())
        try:
            other = await campaign_rows.binding(conn, spec.campaign_id)
            if other is not None and other.org_id != spec.org:  # name nothing of theirs
                raise InvalidSpec(
                    [SpecProblem("campaign_id", "is already used by another campaign")]
                )
            if other is not None and other.workflow_id not in (None, workflow_id):
                raise InvalidSpec([owned_by_another_workflow(spec.campaign_id, other.workflow_id)])
            if templates is None:
                return spec
            try:
                digest = await store_templates(conn, spec.org, templates)
            except asyncpg.ForeignKeyViolationError:
                raise InvalidSpec([SpecProblem("org", f"unknown org '{spec.org}'")]) from None
        finally:
            await conn.close()
        return spec.by_reference(digest)

    async def _describe(self, workflow_id: str) -> WorkflowExecutionDescription:
        """The workflow's description, refusing a workflow that is not a campaign."""
        handle = self.temporal.get_workflow_handle(workflow_id)
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_SECONDS):
                description = await handle.describe()
        except TimeoutError:
            raise CampaignClientError(
                f"Temporal did not answer within {ANSWER_TIMEOUT_SECONDS:.0f}s"
            ) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise CampaignNotFound(f"no campaign workflow with id '{workflow_id}'") from None
            raise CampaignClientError(f"cannot describe '{workflow_id}': {exc.message}") from None
        if description.workflow_type != WORKFLOW_TYPE:
            raise CampaignNotFound(
                f"workflow '{workflow_id}' is a {description.workflow_type}, not a campaign"
            )
        return description

    async def status(self, workflow_id: str) -> CampaignStatus:
        """The campaign's status: once closed, the summary it ended with (no worker
        needed); while it runs, its ``status`` query."""
        handle = self.temporal.get_workflow_handle(workflow_id, result_type=CampaignStatus)
        description = await self._describe(workflow_id)
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_SECONDS):
                if description.status != WorkflowExecutionStatus.RUNNING:
                    final = await description.memo_value(
                        FINAL_STATUS_MEMO, None, type_hint=CampaignStatus
                    )
                    if final is not None:
                        return final
                if description.status == WorkflowExecutionStatus.COMPLETED:
                    return await handle.result()
                if description.status != WorkflowExecutionStatus.RUNNING:
                    state = description.status.name.lower() if description.status else "closed"
                    raise CampaignClientError(
                        f"campaign '{workflow_id}' is {state} and left no summary"
                    )
                return await handle.query(CampaignWorkflow.status)
        except TimeoutError:
            raise CampaignClientError(
                f"no worker answered for '{workflow_id}' within {ANSWER_TIMEOUT_SECONDS:.0f}s; "
                "is a worker running?"
            ) from None
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as exc:
            raise CampaignClientError(
                f"cannot read the status of '{workflow_id}' ({_message(exc)}); is a worker running?"
            ) from None
        except (ValueError, TypeError):  # a result or memo that is not a status
            raise CampaignClientError(
                f"'{workflow_id}' has no readable campaign status (its result and memo are "
                "not a campaign status: is it a campaign workflow?)"
            ) from None

    async def list(
        self, *, state: str | None = None, org: str | None = None, limit: int = 50
    ) -> list[CampaignListing]:
        """Campaigns known to Temporal, newest first, filtered by search attributes."""
        query = f"WorkflowType = '{WORKFLOW_TYPE}'"
        if state:
            query += f" AND CampaignState = '{_quoted(state)}'"
        if org:
            query += f" AND CampaignOrg = '{_quoted(org)}'"
        found = []
        async for execution in self.temporal.list_workflows(query, limit=limit):
            attrs = execution.typed_search_attributes
            found.append(
                CampaignListing(
                    workflow_id=execution.id,
                    state=attrs.get(sa.CAMPAIGN_STATE),
                    org=attrs.get(sa.CAMPAIGN_ORG),
                    progress=attrs.get(sa.CAMPAIGN_PROGRESS),
                    execution_status=execution.status.name if execution.status else None,
                    started_at=execution.start_time,
                )
            )
        return found

    async def capacity(
        self, conn: Conn | None = None, *, account: str = accounts.DEFAULT_ACCOUNT
    ) -> Capacity:
        """The provider account's limits and rate, its task queue as Temporal sees it,
        and how the running campaigns and their orgs share it.

        Reads the account's row and the orgs' caps and weights from PostgreSQL
        (``conn``, or a connection to ``settings.database_url`` for the call), the
        queue from Temporal, and the status of at most ``CAPACITY_CAMPAIGNS`` running
        campaigns (visibility: ``CampaignState = 'Running'``), each within
        ``CAPACITY_QUERY_SECONDS``; those that do not answer are listed in
        ``unreadable``.
        """
        if conn is None:
            own = await store.connect(self.settings.require_database_url())
            try:
                return await self.capacity(own, account=account)
            finally:
                await own.close()
        row = await accounts.get(conn, account)
        queue_name = send_task_queue(self.settings.task_queue, account)
        queue: QueueCapacity | None = None
        queue_error = None
        try:
            view = await describe_queue(self.temporal, queue_name)
            queue = QueueCapacity(
                task_queue=queue_name,
                rate_limit=view.rate_limit,
                backlog=view.backlog,
                backlog_age_seconds=view.backlog_age_seconds,
                dispatch_rate=view.dispatch_rate,
            )
        except RPCError as exc:
            queue_error = f"Temporal did not describe task queue {queue_name}: {exc.message}"
        workflow_ids = await self._running_campaigns(CAPACITY_CAMPAIGNS + 1)
        truncated = len(workflow_ids) > CAPACITY_CAMPAIGNS
        workflow_ids = workflow_ids[:CAPACITY_CAMPAIGNS]
        statuses = await self._statuses(workflow_ids)
        read = [(wid, status) for wid, status in zip(workflow_ids, statuses, strict=True) if status]
        total = sum(status.rate_per_second for _, status in read)

        def share(rate: float) -> float:
            return rate / total if total > 0 else 0.0

        campaigns = [
            CampaignCapacity(
                workflow_id=wid,
                campaign_id=status.campaign_id,
                org=status.org,
                state=status.state,
                priority=status.controls.priority if status.controls else None,
                emails_per_second=status.rate_per_second,
                share=share(status.rate_per_second),
                window=status.controls.window if status.controls else None,
                in_flight_batches=status.in_flight_batches,
                rate_limit=status.controls.rate_per_second if status.controls else None,
                org_rate_cap=status.org_rate_cap,
                account_rate=status.account_rate,
                limited_by=limited_by(status),
            )
            for wid, status in read
        ]
        campaigns.sort(key=lambda c: (-c.emails_per_second, c.workflow_id))
        by_org: dict[str, list[CampaignCapacity]] = {}
        for campaign in campaigns:
            by_org.setdefault(campaign.org, []).append(campaign)
        org_rows = []
        for org, members in by_org.items():
            rate = sum(member.emails_per_second for member in members)
            org_rows.append(
                OrgCapacity(
                    org=org,
                    campaigns=len(members),
                    emails_per_second=rate,
                    share=share(rate),
                    cap=await orgs.emails_per_second(conn, org),
                    fairness_weight=await orgs.fairness_weight(conn, org),
                )
            )
        org_rows.sort(key=lambda o: (-o.emails_per_second, o.org))
        return Capacity(
            at=datetime.now(UTC),
            account=account_capacity(row) if row is not None else None,
            queue=queue,
            queue_error=queue_error,
            campaigns=campaigns,
            orgs=org_rows,
            emails_per_second=total,
            unreadable=[
                wid for wid, status in zip(workflow_ids, statuses, strict=True) if not status
            ],
            truncated=truncated,
        )

    async def _running_campaigns(self, limit: int) -> builtins.list[str]:
        """Workflow ids of running campaigns that send (``CampaignState = 'Running'``)."""
        query = (
            f"WorkflowType = '{WORKFLOW_TYPE}' AND ExecutionStatus = 'Running' "
            f"AND CampaignState = '{CampaignState.RUNNING.value}'"
        )
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_SECONDS):
                return [
                    execution.id
                    async for execution in self.temporal.list_workflows(query, limit=limit)
                ]
        except TimeoutError:
            raise CampaignClientError(
                f"Temporal did not list the running campaigns within {ANSWER_TIMEOUT_SECONDS:.0f}s"
            ) from None

    async def _statuses(
        self, workflow_ids: builtins.list[str]
    ) -> builtins.list[CampaignStatus | None]:
        """Each campaign's ``status`` query, at most ``_CAPACITY_CONCURRENCY`` at once;
        None for one that did not answer in time (or closed meanwhile)."""
        gate = asyncio.Semaphore(_CAPACITY_CONCURRENCY)

        async def one(workflow_id: str) -> CampaignStatus | None:
            async with gate:
                handle = self.temporal.get_workflow_handle(workflow_id)
                try:
                    async with asyncio.timeout(CAPACITY_QUERY_SECONDS):
                        return await handle.query(CampaignWorkflow.status)
                except (
                    TimeoutError,
                    RPCError,
                    WorkflowQueryFailedError,
                    WorkflowQueryRejectedError,
                    ValueError,
                    TypeError,
                ):
                    return None

        return builtins.list(await asyncio.gather(*(one(wid) for wid in workflow_ids)))

    async def _control(
        self, workflow_id: str, update: Callable[..., Any], *args: Any
    ) -> CampaignStatus:
        await self._describe(workflow_id)
        handle = self.temporal.get_workflow_handle(workflow_id)
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_SECONDS):
                return await handle.execute_update(
                    update.__name__, args=args, result_type=CampaignStatus
                )
        except TimeoutError:
            raise CampaignClientError(
                f"no worker answered for '{workflow_id}' within {ANSWER_TIMEOUT_SECONDS:.0f}s; "
                "is a worker running?"
            ) from None
        except WorkflowUpdateFailedError as exc:
            raise ControlRefused(_message(exc.cause)) from None
        except (ValueError, TypeError):
            raise CampaignClientError(
                f"'{workflow_id}' answered with something that is not a campaign status"
            ) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                if "completed" in exc.message.lower():
                    raise ControlRefused(
                        f"campaign '{workflow_id}' has finished; there is nothing to change"
                    ) from None
                raise CampaignNotFound(f"no campaign workflow with id '{workflow_id}'") from None
            raise CampaignClientError(
                f"'{workflow_id}' refused the control: {exc.message}"
            ) from None

    async def pause(self, workflow_id: str) -> CampaignStatus:
        """Stop starting batches; those in flight finish and are recorded."""
        return await self._control(workflow_id, CampaignWorkflow.pause)

    async def resume(self, workflow_id: str) -> CampaignStatus:
        """Start batches again after a pause."""
        return await self._control(workflow_id, CampaignWorkflow.resume)

    async def cancel(self, workflow_id: str) -> CampaignStatus:
        """Cancel gracefully: in-flight batches finish and are recorded, none start.

        This is Temporal's own cancellation, the same as ``temporal workflow cancel``
        and the Web UI's Cancel, so a cancelled campaign has one Temporal status,
        Canceled, however it was cancelled; its summary stays in the memo. Returns the
        status as the request is made.

        Raises:
            ControlRefused: the campaign has finished.
        """
        status = await self.status(workflow_id)  # refuses unknown ids and non-campaigns
        if status.done:
            raise ControlRefused(
                f"campaign '{workflow_id}' has finished ({status.state.value.lower()}); "
                "there is nothing to cancel"
            )
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_SECONDS):
                await self.temporal.get_workflow_handle(workflow_id).cancel()
        except TimeoutError:
            raise CampaignClientError(
                f"Temporal did not answer within {ANSWER_TIMEOUT_SECONDS:.0f}s"
            ) from None
        except RPCError as exc:
            raise CampaignClientError(f"cannot cancel '{workflow_id}': {exc.message}") from None
        return status

    async def set_window(self, workflow_id: str, window: int) -> CampaignStatus:
        """Change the number of batches in flight."""
        return await self._control(workflow_id, CampaignWorkflow.set_window, window)

    async def set_rate(self, workflow_id: str, rate_per_second: float | None) -> CampaignStatus:
        """Change the send rate limit in emails/s (None: no limit).

        Raises:
            ControlRefused: the rate is not finite, positive and within the maximum
                (checked here too: JSON has no NaN, and it would arrive as null, "no limit").
        """
        problem = rate_problem(rate_per_second)
        if problem:
            raise ControlRefused(problem)
        return await self._control(workflow_id, CampaignWorkflow.set_rate, rate_per_second)

    async def set_priority(self, workflow_id: str, priority: int) -> CampaignStatus:
        """Change the campaign's priority, 1 (highest) to 5 (lowest).

        Batches scheduled from now on carry the new priority; those already queued
        keep theirs.

        Raises:
            ControlRefused: the priority is out of range (checked here too, before any
                call), or the campaign has finished.
        """
        problem = priority_problem(priority)
        if problem:
            raise ControlRefused(problem)
        return await self._control(workflow_id, CampaignWorkflow.set_priority, priority)

    async def reschedule(self, workflow_id: str, send_at: datetime) -> CampaignStatus:
        """Move the start of a campaign that is still waiting for its send time."""
        return await self._control(workflow_id, CampaignWorkflow.reschedule, send_at)

    async def report(self, campaign_id: str) -> CampaignReport:
        """What the campaign did: its ledger by status, the provider's engagement counts
        and their rates; see ``read_report``.

        Raises:
            CampaignNotFound: no campaign with this id was ever prepared.
        """
        return await read_report(self.settings, campaign_id)

    async def retry_failed(
        self, workflow_id: str, conn: asyncpg.Connection | asyncpg.Pool
    ) -> tuple[WorkflowHandle, CampaignSpec]:
        """Start a new run of a finished campaign that sends only to its failed recipients.

        Raises:
            ControlRefused: the campaign is still running or never sent anything.
            InvalidSpec: there is no failed or abandoned recipient to retry.
        """
        status = await self.status(workflow_id)
        if not status.done:
            raise ControlRefused(
                f"campaign '{workflow_id}' is still {status.state.value.lower()}; "
                "retry-failed is for a finished campaign"
            )
        stored = await campaign_rows.stored_spec(conn, status.campaign_id)
        if stored is None:
            raise ControlRefused(f"campaign '{status.campaign_id}' never started sending")
        try:
            spec = CampaignSpec.model_validate({**stored, "send_to": "failed", "send_at": None})
        except ValidationError as error:  # stored by a version with looser rules
            raise InvalidSpec(problems_from_validation_error(error)) from None
        failed = await ledger.count_to_retry(conn, spec.campaign_id)
        if not failed:
            hint = (
                f"; to send to the recipients it never reached, start its spec again "
                f"(`campaigns start SPEC.json --workflow-id {workflow_id}`): recipients "
                "already sent are skipped"
                if status.state is CampaignState.CANCELLED
                else ""
            )
            raise ControlRefused(
                f"campaign '{status.campaign_id}' has no failed or abandoned recipients: "
                f"nothing to retry{hint}"
            )
        await check_against_database(conn, spec, workflow_id=workflow_id)
        return await self.start(spec, workflow_id), spec


async def read_report(settings: Settings, campaign_id: str) -> CampaignReport:
    """What the campaign did: its ledger by status, the provider's engagement counts
    and their rates (``campaigns.models.report_rates``).

    Read from PostgreSQL through the store (``settings.database_url``), not from the
    workflow: it works while the campaign sends and long after it closed, with no
    worker, and no Temporal server, running.

    Raises:
        CampaignNotFound: no campaign with this id was ever prepared.
    """
    if re.fullmatch(CAMPAIGN_ID_PATTERN, campaign_id) is None:
        raise CampaignNotFound(
            f"{campaign_id[:80]!r} is not a campaign id: letters, digits, '.', '_' or "
            "'-', at most 64 characters"
        )
    conn = await store.connect(settings.require_database_url())
    try:
        report = await reports.campaign_report(conn, campaign_id)
    finally:
        await conn.close()
    if report is None:
        raise CampaignNotFound(
            f"no campaign '{campaign_id}' in the database: it was never prepared "
            "(a report takes the campaign's id, as in its spec)"
        )
    return report


def _message(error: BaseException | None) -> str:
    """A failure's own words, never an exception class name.

    The first non-empty message along the failure's causes, without a leading
    ``ControlRefused: `` (an error type some failure texts repeat).
    """
    seen: BaseException | None = error
    while seen is not None:
        message = getattr(seen, "message", None)
        text = message if isinstance(message, str) else str(seen)
        kind = getattr(seen, "type", None) or type(seen).__name__
        text = text.removeprefix(f"{kind}: ").strip()
        if text:
            return text
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return "no reason given"


def _quoted(value: str) -> str:
    """Escape a value for a visibility query string literal."""
    return value.replace("\\", "\\\\").replace("'", "\\'")
