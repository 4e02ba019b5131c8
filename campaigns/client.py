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

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from campaigns import search_attributes as sa
from campaigns.models import CampaignSpec, CampaignState, CampaignStatus
from campaigns.settings import Settings
from campaigns.spec_check import check_against_database
from campaigns.temporal import WORKFLOW_TYPE, connect
from workflows import CampaignWorkflow
from workflows.campaign import FINAL_STATUS_MEMO


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

        Raises:
            CampaignAlreadyRunning: a workflow with this id is running.
        """
        workflow_id = workflow_id or spec.campaign_id
        try:
            return await self.temporal.start_workflow(
                CampaignWorkflow.run,
                spec,  # type: ignore[arg-type]  # a CampaignInput without carried state
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

    async def status(self, workflow_id: str) -> CampaignStatus:
        """The campaign's status: once closed, the summary it ended with (no worker
        needed); while it runs, its ``status`` query."""
        handle = self.temporal.get_workflow_handle(workflow_id, result_type=CampaignStatus)
        try:
            description = await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise CampaignNotFound(f"no campaign workflow with id '{workflow_id}'") from None
            raise
        if description.status != WorkflowExecutionStatus.RUNNING:
            final = await description.memo_value(FINAL_STATUS_MEMO, None, type_hint=CampaignStatus)
            if final is not None:
                return final
        if description.status == WorkflowExecutionStatus.COMPLETED:
            return await handle.result()
        try:
            return await handle.query(CampaignWorkflow.status)
        except RPCError as exc:
            raise CampaignClientError(
                f"cannot read the status of '{workflow_id}' ({exc}); is a worker running?"
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
        handle = self.temporal.get_workflow_handle(workflow_id)
        try:
            return await handle.execute_update(update, *args, result_type=CampaignStatus)
        except WorkflowUpdateFailedError as exc:
            raise ControlRefused(str(exc.cause)) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                if "completed" in exc.message.lower():
                    raise ControlRefused(
                        f"campaign '{workflow_id}' has finished; there is nothing to change"
                    ) from None
                raise CampaignNotFound(f"no campaign workflow with id '{workflow_id}'") from None
            raise

    async def pause(self, workflow_id: str) -> CampaignStatus:
        """Stop starting batches; those in flight finish and are recorded."""
        return await self._control(workflow_id, CampaignWorkflow.pause)

    async def resume(self, workflow_id: str) -> CampaignStatus:
        """Start batches again after a pause."""
        return await self._control(workflow_id, CampaignWorkflow.resume)

    async def cancel(self, workflow_id: str) -> CampaignStatus:
        """Cancel gracefully: in-flight batches finish and are recorded, none start."""
        return await self._control(workflow_id, CampaignWorkflow.cancel)

    async def set_window(self, workflow_id: str, window: int) -> CampaignStatus:
        """Change the number of batches in flight."""
        return await self._control(workflow_id, CampaignWorkflow.set_window, window)

    async def set_rate(self, workflow_id: str, rate_per_second: float | None) -> CampaignStatus:
        """Change the send rate limit in emails/s (None: no limit)."""
        return await self._control(workflow_id, CampaignWorkflow.set_rate, rate_per_second)

    async def reschedule(self, workflow_id: str, send_at: datetime) -> CampaignStatus:
        """Move the start of a campaign that is still waiting for its send time."""
        return await self._control(workflow_id, CampaignWorkflow.reschedule, send_at)

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
        stored = await conn.fetchval("SELECT spec FROM campaigns WHERE id = $1", status.campaign_id)
        if stored is None:
            raise ControlRefused(f"campaign '{status.campaign_id}' never started sending")
        spec = CampaignSpec.model_validate({**stored, "send_to": "failed", "send_at": None})
        await check_against_database(conn, spec)
        return await self.start(spec, workflow_id), spec


def _quoted(value: str) -> str:
    """Escape a value for a visibility query string literal."""
    return value.replace("\\", "\\\\").replace("'", "\\'")
