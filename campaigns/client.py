"""The Python client: start, watch, steer and list campaigns.

    client = await CampaignClient.connect(Settings())
    handle = await client.start(spec)
    status = await client.status(handle.id)
    await client.pause(handle.id)

Controls are Temporal updates with validators: a refused action raises
``ControlRefused`` at once with the workflow's reason, and nothing is written to the
campaign's history.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import ValidationError
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
from campaigns.store import campaigns as campaign_rows
from campaigns.store import ledger, reports
from campaigns.store.templates import store_templates
from campaigns.temporal import WORKFLOW_TYPE, connect
from workflows import CampaignWorkflow
from workflows.campaign import FINAL_STATUS_MEMO

ANSWER_TIMEOUT_SECONDS = 30.0
"""Longest a status read or a control waits for Temporal and a worker to answer."""


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
