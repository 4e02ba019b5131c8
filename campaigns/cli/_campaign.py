"""Campaign commands: validate, start, status, list and the live controls."""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from campaigns import store
from campaigns.cli._progress import literal, status_line, summary_table, watch
from campaigns.client import CampaignClient
from campaigns.models import CampaignSpec, CampaignState, CampaignStatus
from campaigns.settings import Settings
from campaigns.spec_check import (
    InvalidSpec,
    SpecProblem,
    check_against_database,
    check_timing,
    parse_spec,
)


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
    check_timing(spec, datetime.now(UTC))
    conn = await store.connect(settings.require_database_url())
    try:
        await check_against_database(conn, spec)
    finally:
        await conn.close()
    return spec


async def cmd_validate(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns validate SPEC.json``."""
    spec = await validated_spec(settings, args.spec)
    console.print(
        Text.assemble(("ok", "green"), ": campaign '", literal(spec.campaign_id), "' is valid")
    )
    return 0


async def _watch_to_end(client: CampaignClient, workflow_id: str, console: Console) -> int:
    final = await watch(lambda: client.status(workflow_id), console)
    console.print(summary_table(final))
    console.print(literal(f"Web UI: {client.settings.workflow_url(workflow_id)}"))
    return 0 if final.state is CampaignState.COMPLETED else 1


async def cmd_start(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns start SPEC.json``: validate, start, print the id and the Web UI link."""
    spec = await validated_spec(settings, args.spec)
    client = await CampaignClient.connect(settings)
    handle = await client.start(spec, args.workflow_id)
    console.print(Text.assemble("started campaign ", literal(spec.campaign_id, "bold")))
    console.print(literal(f"  workflow id  {handle.id}"))
    console.print(literal(f"  Web UI       {settings.workflow_url(handle.id)}"))
    if spec.send_at:
        console.print(f"  sends at     {spec.send_at.isoformat()}")
    if args.watch:
        return await _watch_to_end(client, handle.id, console)
    console.print(literal(f"  progress     campaigns status {handle.id}"))
    return 0


async def cmd_status(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns status ID``: a live progress bar until done, or ``--json`` once."""
    client = await CampaignClient.connect(settings)
    if args.json:
        print((await client.status(args.workflow_id)).model_dump_json(indent=2))
        return 0
    return await _watch_to_end(client, args.workflow_id, console)


async def cmd_list(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns list``: campaigns known to Temporal, newest first."""
    client = await CampaignClient.connect(settings)
    rows = await client.list(state=args.state, org=args.org, limit=args.limit)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2, default=str))
        return 0
    table = Table()
    # Values are printed whole, folded onto the next line if they must be, never cut with
    # an ellipsis: a pipe or a narrow terminal would otherwise show ids that match nothing.
    for header in ("workflow id", "state", "org", "progress", "execution", "started"):
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(
            literal(row.workflow_id),
            literal(row.state or ""),
            literal(row.org or ""),
            f"{row.progress:.0f}%" if row.progress is not None else "",
            literal(row.execution_status or ""),
            row.started_at.isoformat(timespec="seconds"),
        )
    console.print(table)
    return 0


def _print_after(action: str, status: CampaignStatus, console: Console) -> None:
    console.print(Text.assemble(f"{action} ", literal(status.campaign_id, "bold")))
    console.print(status_line(status))


async def cmd_pause(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns pause ID``."""
    client = await CampaignClient.connect(settings)
    _print_after("paused", await client.pause(args.workflow_id), console)
    return 0


async def cmd_resume(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns resume ID``."""
    client = await CampaignClient.connect(settings)
    _print_after("resumed", await client.resume(args.workflow_id), console)
    return 0


async def cmd_cancel(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns cancel ID``: in-flight batches finish and are recorded, none start."""
    client = await CampaignClient.connect(settings)
    _print_after("cancelling", await client.cancel(args.workflow_id), console)
    console.print(
        literal(f"the summary will show what was not sent: campaigns status {args.workflow_id}")
    )
    return 0


async def cmd_throttle(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns throttle ID [--window N] [--rate R | --no-rate]``."""
    if args.window is None and args.rate is None and not args.no_rate:
        raise CommandError("give --window, --rate or --no-rate", code=2)
    client = await CampaignClient.connect(settings)
    status = None
    if args.window is not None:
        status = await client.set_window(args.workflow_id, args.window)
    if args.rate is not None or args.no_rate:
        status = await client.set_rate(args.workflow_id, None if args.no_rate else args.rate)
    assert status is not None and status.controls is not None
    rate = status.controls.rate_per_second
    console.print(
        Text.assemble(
            "campaign ",
            literal(status.campaign_id, "bold"),
            f": window {status.controls.window}, ",
            f"rate limit {f'{rate:,.0f} emails/s' if rate else 'none'}",
        )
    )
    return 0


async def cmd_priority(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns priority ID N``: 1 (highest) to 5 (lowest), for batches scheduled next."""
    client = await CampaignClient.connect(settings)
    status = await client.set_priority(args.workflow_id, args.priority)
    assert status.controls is not None
    console.print(
        Text.assemble(
            "campaign ",
            literal(status.campaign_id, "bold"),
            f": priority {status.controls.priority} (batches scheduled from now on)",
        )
    )
    return 0


async def cmd_reschedule(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns reschedule ID --at 2026-12-01T09:00:00+00:00``."""
    try:
        send_at = datetime.fromisoformat(args.at)
    except ValueError:
        raise CommandError(f"--at: {args.at!r} is not an ISO 8601 date and time", 2) from None
    if send_at.tzinfo is None:
        raise CommandError("--at needs a timezone, e.g. 2026-12-01T09:00:00+00:00", 2)
    client = await CampaignClient.connect(settings)
    status = await client.reschedule(args.workflow_id, send_at)
    console.print(
        Text.assemble(
            "campaign ", literal(status.campaign_id, "bold"), f" now sends at {send_at.isoformat()}"
        )
    )
    return 0


async def cmd_retry_failed(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns retry-failed ID``: a new run to the failed and abandoned recipients."""
    client = await CampaignClient.connect(settings)
    conn = await store.connect(settings.require_database_url())
    try:
        handle, spec = await client.retry_failed(args.workflow_id, conn)
    finally:
        await conn.close()
    console.print(
        Text.assemble(
            "retrying failed recipients of ", literal(spec.campaign_id, "bold"), " (new run)"
        )
    )
    console.print(literal(f"  Web UI  {settings.workflow_url(handle.id)}"))
    if args.watch:
        return await _watch_to_end(client, handle.id, console)
    return 0
