"""Campaign commands: validate, start, status, list, cancel."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

from rich.console import Console
from rich.table import Table
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from campaigns import db
from campaigns import search_attributes as sa
from campaigns.cli._progress import summary_table, watch
from campaigns.models import CampaignSpec, CampaignState, CampaignStatus
from campaigns.settings import Settings
from campaigns.spec_check import InvalidSpec, SpecProblem, check_against_database, parse_spec
from campaigns.temporal import WORKFLOW_TYPE, connect
from workflows import CampaignWorkflow


class CommandError(RuntimeError):
    """An error to show the user as it is, with exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        """Keep the message and the exit code."""
        super().__init__(message)
        self.code = code


def _read_spec(path: Path) -> CampaignSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidSpec([SpecProblem("spec", f"cannot read {path}: {exc.strerror}")]) from None
    return parse_spec(text)


async def validated_spec(settings: Settings, path: Path) -> CampaignSpec:
    """Parse the spec file and check it against the database."""
    spec = _read_spec(path)
    conn = await db.connect(settings.require_database_url())
    try:
        await check_against_database(conn, spec)
    finally:
        await conn.close()
    return spec


async def cmd_validate(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns validate SPEC.json``."""
    spec = await validated_spec(settings, args.spec)
    console.print(f"[green]ok[/]: campaign '{spec.campaign_id}' is valid")
    return 0


async def start_campaign(
    client: Client, settings: Settings, spec: CampaignSpec, workflow_id: str | None = None
) -> WorkflowHandle:
    """Start the workflow for an already validated spec."""
    try:
        return await client.start_workflow(
            CampaignWorkflow.run,
            spec,
            id=workflow_id or spec.campaign_id,
            task_queue=settings.task_queue,
            static_summary=f"Campaign {spec.campaign_id} · org {spec.org} · "
            f"audience {spec.audience}",
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(sa.CAMPAIGN_STATE, CampaignState.PREPARING.value),
                    SearchAttributePair(sa.CAMPAIGN_ORG, spec.org),
                ]
            ),
        )
    except WorkflowAlreadyStartedError:
        raise CommandError(
            f"campaign '{workflow_id or spec.campaign_id}' is already running; "
            f"watch it with `campaigns status {workflow_id or spec.campaign_id}`"
        ) from None


async def cmd_start(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns start SPEC.json``: validate, start, print the id and the Web UI link."""
    spec = await validated_spec(settings, args.spec)
    client = await connect(settings)
    handle = await start_campaign(client, settings, spec, args.workflow_id)
    console.print(f"started campaign [bold]{spec.campaign_id}[/]")
    console.print(f"  workflow id  {handle.id}")
    console.print(f"  Web UI       {settings.workflow_url(handle.id)}")
    if args.watch:
        final = await watch(lambda: fetch_status(client, handle.id), console)
        console.print(summary_table(final))
        return 0 if final.state is CampaignState.COMPLETED else 1
    console.print(f"  progress     campaigns status {handle.id}")
    return 0


async def fetch_status(client: Client, workflow_id: str) -> CampaignStatus:
    """The campaign's status: its result once completed, else its ``status`` query."""
    handle = client.get_workflow_handle(workflow_id, result_type=CampaignStatus)
    try:
        description = await handle.describe()
    except RPCError as exc:
        if "not found" in str(exc).lower():
            raise CommandError(f"no campaign workflow with id '{workflow_id}'") from None
        raise
    if description.status == WorkflowExecutionStatus.COMPLETED:
        return await handle.result()
    try:
        return await handle.query(CampaignWorkflow.status)
    except RPCError as exc:
        raise CommandError(
            f"cannot read the status of '{workflow_id}' ({exc}); is a worker running?"
        ) from None


async def cmd_status(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns status ID``: a live progress bar until done, or ``--json`` once."""
    client = await connect(settings)
    if args.json:
        status = await fetch_status(client, args.workflow_id)
        print(status.model_dump_json(indent=2))
        return 0
    final = await watch(lambda: fetch_status(client, args.workflow_id), console)
    console.print(summary_table(final))
    console.print(f"Web UI: {settings.workflow_url(args.workflow_id)}")
    return 0 if final.state is CampaignState.COMPLETED else 1


async def cmd_list(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns list``: campaigns known to Temporal, newest first."""
    client = await connect(settings)
    query = f"WorkflowType = '{WORKFLOW_TYPE}'"
    if args.state:
        query += f" AND CampaignState = '{args.state}'"
    if args.org:
        query += f" AND CampaignOrg = '{args.org}'"
    rows = []
    async for execution in client.list_workflows(query, limit=args.limit):
        attrs = execution.typed_search_attributes
        rows.append(
            {
                "workflow_id": execution.id,
                "state": attrs.get(sa.CAMPAIGN_STATE),
                "org": attrs.get(sa.CAMPAIGN_ORG),
                "progress": attrs.get(sa.CAMPAIGN_PROGRESS),
                "status": execution.status.name if execution.status else None,
                "started": execution.start_time.isoformat(timespec="seconds"),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table("workflow id", "state", "org", "progress", "execution", "started")
    for row in rows:
        progress = f"{row['progress']:.0f}%" if row["progress"] is not None else ""
        table.add_row(
            row["workflow_id"],
            row["state"] or "",
            row["org"] or "",
            progress,
            row["status"] or "",
            row["started"],
        )
    console.print(table)
    return 0


async def cmd_cancel(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns cancel ID``: in-flight batches finish and are recorded, none start."""
    client = await connect(settings)
    handle = client.get_workflow_handle(args.workflow_id)
    try:
        description = await handle.describe()
    except RPCError:
        raise CommandError(f"no campaign workflow with id '{args.workflow_id}'") from None
    if description.status != WorkflowExecutionStatus.RUNNING:
        raise CommandError(
            f"campaign '{args.workflow_id}' is not running "
            f"({description.status.name.lower() if description.status else 'unknown'})"
        )
    await handle.cancel()
    console.print(f"cancellation requested for [bold]{args.workflow_id}[/]")
    return 0
