"""The ``campaigns`` command line: local stack, data, and campaign control."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich.console import Console

from campaigns.audience_import import ImportFailed
from campaigns.cli import _schedules as schedules
from campaigns.cli._campaign import (
    CommandError,
    cmd_cancel,
    cmd_list,
    cmd_pause,
    cmd_reschedule,
    cmd_resume,
    cmd_retry_failed,
    cmd_start,
    cmd_status,
    cmd_throttle,
    cmd_validate,
)
from campaigns.cli._data import (
    cmd_audience_import,
    cmd_audience_list,
    cmd_migrate,
    cmd_org_add,
    cmd_org_flag,
    cmd_org_list,
    cmd_suppress,
)
from campaigns.cli._stack import cmd_demo, cmd_stack_down, cmd_stack_status, cmd_stack_up
from campaigns.client import CampaignAlreadyRunning, CampaignNotFound, ControlRefused
from campaigns.db import SchemaOutOfDate
from campaigns.settings import Settings
from campaigns.spec_check import InvalidSpec
from campaigns.stack import StackError

Handler = Callable[[argparse.Namespace, Settings, Console], Awaitable[int]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campaigns", description="Email campaigns delivered by Temporal workflows."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str, parent=commands):  # noqa: ANN001, ANN202
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    # campaigns
    sub = add("validate", cmd_validate, "check a campaign spec without starting it")
    sub.add_argument("spec", type=Path, metavar="SPEC.json")
    sub = add("start", cmd_start, "validate a campaign spec and start the campaign")
    sub.add_argument("spec", type=Path, metavar="SPEC.json")
    sub.add_argument("--workflow-id", help="defaults to the spec's campaign_id")
    sub.add_argument("--watch", action="store_true", help="show live progress until done")
    sub = add("status", cmd_status, "live progress of a campaign (or --json for one snapshot)")
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument("--json", action="store_true", help="print one status snapshot as JSON")
    sub = add("list", cmd_list, "list campaigns")
    sub.add_argument("--state", help="e.g. Running, WaitingRetry, Completed, Failed")
    sub.add_argument("--org")
    sub.add_argument("--limit", type=int, default=50)
    sub.add_argument("--json", action="store_true")
    sub = add("pause", cmd_pause, "pause a campaign (in-flight batches finish, none start)")
    sub.add_argument("workflow_id", metavar="ID")
    sub = add("resume", cmd_resume, "resume a paused campaign")
    sub.add_argument("workflow_id", metavar="ID")
    sub = add("cancel", cmd_cancel, "cancel a campaign (in-flight batches finish, none start)")
    sub.add_argument("workflow_id", metavar="ID")
    sub = add("throttle", cmd_throttle, "change a running campaign's window or send rate")
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument("--window", type=int, help="batch activities in flight")
    sub.add_argument("--rate", type=float, help="emails per second at most")
    sub.add_argument("--no-rate", action="store_true", help="remove the rate limit")
    sub = add("reschedule", cmd_reschedule, "move the start of a scheduled campaign")
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument("--at", required=True, help="ISO 8601 with timezone")
    sub = add("retry-failed", cmd_retry_failed, "send to a finished campaign's failed recipients")
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument("--watch", action="store_true", help="show live progress until done")

    # data
    group = add("db", None, "database schema").add_subparsers(dest="db_command", required=True)
    add("migrate", cmd_migrate, "apply pending schema migrations", group)
    group = add("org", None, "orgs").add_subparsers(dest="org_command", required=True)
    sub = add("add", cmd_org_add, "add (or update) an org", group)
    sub.add_argument("org_id", metavar="ORG")
    sub.add_argument("--name")
    sub.add_argument("--verified-domain", help="the org's own verified sending domain")
    sub = add("flag", cmd_org_flag, "set an org's feature flag", group)
    sub.add_argument("org_id", metavar="ORG")
    sub.add_argument("flag", metavar="FLAG", help="e.g. first_party")
    sub.add_argument("state", choices=["on", "off"])
    add("list", cmd_org_list, "list orgs", group)
    group = add("audience", None, "audiences").add_subparsers(dest="aud_command", required=True)
    sub = add("import", cmd_audience_import, "import recipients from a CSV file", group)
    sub.add_argument("--org", required=True)
    sub.add_argument("--name", required=True, help="audience name (created if new)")
    sub.add_argument("file", type=Path, metavar="FILE.csv")
    sub = add("list", cmd_audience_list, "list audiences", group)
    sub.add_argument("--org")
    sub = add("suppress", cmd_suppress, "stop sending to addresses for an org")
    sub.add_argument("--org", required=True)
    sub.add_argument(
        "--reason", default="unsubscribed", choices=["unsubscribed", "bounced", "complained"]
    )
    sub.add_argument("emails", nargs="+", metavar="EMAIL")

    # schedules
    group = add("schedules", None, "the hourly first-party org refresh schedule")
    group = group.add_subparsers(dest="schedules_cmd", required=True)
    add("apply", schedules.cmd_apply, "create or update the schedule (idempotent)", group)
    add("trigger", schedules.cmd_trigger, "run a refresh now", group)
    sub = add("pause", schedules.cmd_pause, "pause the schedule", group)
    sub.add_argument("--note")
    sub = add("unpause", schedules.cmd_unpause, "unpause the schedule", group)
    sub.add_argument("--note")
    add("describe", schedules.cmd_describe, "show the schedule and its runs", group)

    # local stack
    group = add("stack", None, "the local stack").add_subparsers(dest="stack_cmd", required=True)
    sub = add("up", cmd_stack_up, "start Temporal, PostgreSQL, the simulator and workers", group)
    sub.add_argument("--detach", action="store_true", help="run in the background")
    sub.add_argument("--workers", type=int)
    sub.add_argument("--temporal-port", type=int)
    sub.add_argument("--ui-port", type=int)
    sub.add_argument("--simulator-port", type=int)
    add("down", cmd_stack_down, "stop the local stack", group)
    add("status", cmd_stack_status, "show the local stack's addresses", group)
    sub = add("demo", cmd_demo, "import a demo audience and send a campaign to it, live")
    sub.add_argument("--recipients", type=int, default=10_000)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one command and exit with its status."""
    args = _parser().parse_args(argv)
    console = Console(stderr=False)
    errors = Console(stderr=True)
    try:
        code = asyncio.run(args.handler(args, Settings(), console))
    except InvalidSpec as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False)
        code = 2
    except ImportFailed as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False)
        code = 2
    except CommandError as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False)
        code = exc.code
    except (ControlRefused, CampaignAlreadyRunning, CampaignNotFound) as exc:
        errors.print(f"[red]refused:[/] {exc}", highlight=False)
        code = 2
    except (StackError, SchemaOutOfDate, RuntimeError, OSError) as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False)
        code = 1
    except KeyboardInterrupt:
        code = 130
    # Exit without interpreter teardown: the Temporal client's Rust threads can abort a
    # finalizing interpreter (temporalio/sdk-python#300), turning success into SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
