"""Local stack and demo commands."""

from __future__ import annotations

import asyncio
import json
import os
import time
from argparse import Namespace

import httpx
from rich.console import Console
from rich.text import Text

from campaigns import store
from campaigns.audience_import import import_audience
from campaigns.cli._campaign import CommandError
from campaigns.cli._data import print_import_report
from campaigns.cli._progress import literal, summary_table, watch
from campaigns.cli._report import report_table
from campaigns.client import CampaignClient, read_report
from campaigns.demo import (
    DEMO_ORG,
    demo_provider_behaviour,
    demo_spec,
    demo_suppressions,
    write_demo_audience,
)
from campaigns.models import CampaignSpec
from campaigns.settings import Settings, data_dir
from campaigns.spec_check import check_against_database
from campaigns.stack import (
    StackConfig,
    private_dir,
    read_stack_file,
    run_foreground,
    start_detached,
    stop_detached,
    write_private,
)
from campaigns.store import orgs


def stack_config(args: Namespace) -> StackConfig:
    """Stack settings from flags, falling back to the environment's."""
    config = StackConfig(data_dir=data_dir())
    for name in (
        "temporal_port",
        "ui_port",
        "simulator_port",
        "api_port",
        "metrics_port",
        "workers",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    return config


async def cmd_stack_up(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns stack up [--detach]``."""
    config = stack_config(args)
    if not args.detach:
        return await run_foreground(config)
    argv = ["stack", "up", "--workers", str(config.workers)]
    argv += ["--temporal-port", str(config.temporal_port), "--ui-port", str(config.ui_port)]
    argv += ["--simulator-port", str(config.simulator_port)]
    argv += ["--api-port", str(config.api_port), "--metrics-port", str(config.metrics_port)]
    state = start_detached(config, argv)
    console.print(
        f"local stack running (pid {state['pid']}): Temporal {state['temporal_address']}, "
        f"Web UI {state['temporal_ui_url']}, simulator {state['provider_base_url']}, "
        f"HTTP service {state['api_url']}\n"
        "stop it with `campaigns stack down`"
    )
    if os.environ.get("PROVIDER_BASE_URL"):
        console.print("PROVIDER_BASE_URL is ignored: the local stack sends to its own simulator")
    return 0


async def cmd_stack_down(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns stack down``."""
    stopped = stop_detached(stack_config(args))
    console.print("local stack stopped" if stopped else "no local stack is running")
    return 0


async def cmd_stack_status(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns stack status``."""
    state = read_stack_file(stack_config(args))
    if not state:
        console.print("no local stack is running")
        return 1
    # stack.json holds no secret; a file from an older version held the database URL.
    shown = {k: v for k, v in state.items() if k != "database_url"}
    print(json.dumps(shown, indent=2))
    return 0


EVENTS_WAIT_SECONDS = 30.0


async def _show_provider_events(
    simulator: httpx.AsyncClient,
    api_url: str,
    spec: CampaignSpec,
    settings: Settings,
    console: Console,
) -> None:
    """Wait (bounded) until the simulator's webhooks are posted and applied, then show
    what they did: the report's engagement and the addresses now suppressed."""
    deadline = time.monotonic() + EVENTS_WAIT_SECONDS
    with console.status("waiting for the provider's webhooks ..."):
        async with httpx.AsyncClient(base_url=api_url) as api:
            while time.monotonic() < deadline:
                hooks = (await simulator.get("/_sim/webhooks")).json()
                ready = (await api.get("/readyz")).json()
                posting = hooks["unplanned"] + hooks["pending"] + hooks["in_flight"]
                if posting == 0 and ready["events_waiting_to_apply"]["due"] == 0:
                    break
                await asyncio.sleep(0.25)
    report = await read_report(settings, spec.campaign_id)
    console.print(report_table(report))
    conn = await store.connect(settings.require_database_url())
    try:
        suppressed = await orgs.suppressed_by(conn, spec.org, spec.campaign_id)
    finally:
        await conn.close()
    console.print(
        f"webhooks: {hooks['posted']:,} signed events posted, {hooks['duplicates_sent']:,} "
        "of them twice (stored once); suppressed for org "
        f"{spec.org}: {suppressed.get('bounced', 0)} bounced, "
        f"{suppressed.get('complained', 0)} complained (the next campaign skips them)"
    )


async def cmd_demo(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns demo``: import a demo audience, send to it live, verify exactly-once."""
    state = read_stack_file(StackConfig(data_dir=data_dir()))
    if not state:
        raise CommandError("no local stack is running; start it with `campaigns stack up --detach`")
    if settings.simulator_admin_token is None:
        raise CommandError(
            "the simulator's admin token is unknown: it comes from the running stack's "
            "stack.env (restart the stack with `campaigns stack down` and `campaigns stack up`) "
            "or from SIMULATOR_ADMIN_TOKEN"
        )
    admin = {"Authorization": f"Bearer {settings.simulator_admin_token.get_secret_value()}"}
    demo_dir = private_dir(data_dir() / "demo")
    csv_path = write_demo_audience(demo_dir, args.recipients)
    spec = demo_spec(args.recipients, campaign_id=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    spec_path = demo_dir / "spec.json"
    write_private(spec_path, spec.model_dump_json(indent=2, exclude_defaults=True))

    conn = await store.connect(settings.require_database_url())
    try:
        await orgs.add_if_missing(conn, DEMO_ORG, "Demo Org")
        console.print(literal(f"importing {csv_path} ..."))
        report = await import_audience(conn, DEMO_ORG, spec.audience, csv_path)
        print_import_report(report, console)
        await orgs.suppress(
            conn, DEMO_ORG, demo_suppressions(args.recipients), "unsubscribed", keep_reason=True
        )
        await check_against_database(conn, spec)
    finally:
        await conn.close()

    async with httpx.AsyncClient(base_url=state["provider_base_url"], headers=admin) as simulator:
        (await simulator.post("/_sim/reset")).raise_for_status()
        behaviour = demo_provider_behaviour(args.recipients)
        (await simulator.put("/_sim/config", json=behaviour)).raise_for_status()
        client = await CampaignClient.connect(settings)
        handle = await client.start(spec)
        console.print(
            Text.assemble(
                "campaign ",
                literal(spec.campaign_id, "bold"),
                literal(f" started (spec: {spec_path})"),
            )
        )
        console.print(literal(f"Web UI: {settings.workflow_url(handle.id)}"))
        final = await watch(lambda: client.status(handle.id), console)
        console.print(summary_table(final))
        answer = await simulator.get("/_sim/stats")
        answer.raise_for_status()
        stats = answer.json()
        if state.get("api_url"):
            await _show_provider_events(simulator, state["api_url"], spec, settings, console)

    exactly_once = (
        stats["duplicated_recipients"] == 0 and stats["unique_recipients"] == final.counts.sent
    )
    console.print(
        f"simulator: {stats['accepted_emails']:,} emails accepted for "
        f"{stats['unique_recipients']:,} recipients, "
        f"{stats['duplicated_recipients']:,} delivered more than once "
        + ("[green](exactly once)[/]" if exactly_once else "[red](NOT exactly once)[/]")
    )
    console.print(literal(f"Web UI: {settings.workflow_url(handle.id)}"))
    console.print("the stack keeps running; stop it with `campaigns stack down` (or `make down`)")
    return 0 if exactly_once and final.counts.sent > 0 else 1
