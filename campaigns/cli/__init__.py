"""The ``campaigns`` command line: local stack, data, and campaign control."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.text import Text
from temporalio.service import RPCError

from campaigns.addresses import is_valid_domain
from campaigns.audience_import import ImportFailed, audience_name_problem, org_id_problem
from campaigns.cli import _schedules as schedules
from campaigns.cli._campaign import (
    CommandError,
    cmd_cancel,
    cmd_list,
    cmd_pause,
    cmd_priority,
    cmd_reschedule,
    cmd_resume,
    cmd_retry_failed,
    cmd_start,
    cmd_status,
    cmd_throttle,
    cmd_validate,
)
from campaigns.cli._capacity import cmd_account_set, cmd_account_show, cmd_capacity
from campaigns.cli._data import (
    MAX_ORG_NAME,
    Limit,
    cmd_audience_import,
    cmd_audience_list,
    cmd_migrate,
    cmd_org_add,
    cmd_org_flag,
    cmd_org_list,
    cmd_org_set,
    cmd_suppress,
)
from campaigns.cli._progress import literal
from campaigns.cli._report import campaign_id_arg, cmd_report
from campaigns.cli._stack import cmd_demo, cmd_stack_down, cmd_stack_status, cmd_stack_up
from campaigns.client import CampaignAlreadyRunning, CampaignNotFound, ControlRefused
from campaigns.models import (
    FAIRNESS_WEIGHT_RANGE,
    HIGHEST_PRIORITY,
    LOWEST_PRIORITY,
    MAX_AUDIENCE_NAME,
    MAX_RATE_PER_SECOND,
    MAX_WINDOW,
    PRIORITY_RANGE,
    CampaignState,
    fairness_weight_problem,
    priority_problem,
)
from campaigns.rate_control import MAX_EMAILS_PER_SECOND, MAX_REQUESTS_PER_SECOND, limit_problem
from campaigns.safe_text import control_character_problem
from campaigns.settings import Settings
from campaigns.spec_check import InvalidSpec
from campaigns.stack import StackError
from campaigns.store import SchemaOutOfDate

Handler = Callable[[argparse.Namespace, Settings, Console], Awaitable[int]]

IMPORT_DESCRIPTION = """\
Import recipients from a CSV file into an audience of the org (created if new).

The header names the columns: email (required), name (optional); any other column
becomes a merge field. Bad rows (an invalid address, a wrong number of columns, a
duplicate address, text that is not UTF-8, a quote that is never closed) are reported
by line and left out; the other rows are imported, all in one transaction. A quote
that is never closed is reported at the line where it opens, and the lines after that
one are read as rows.

Recipients of the audience that are not in the file are kept, and the report says how
many. With --replace they are removed, in the same transaction as the import, except
those whose address appears on a row that was left out (that row was meant to keep
them; fix it and import again). --replace is refused, and nothing is imported, when a
left-out line was too long to be read, since its address is unknown.
"""

FLAG_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
"""Feature flag names: a lowercase letter, then lowercase letters, digits or '_'; at most 64."""
MAX_LIMIT = 10_000
FAIRNESS_WEIGHT_HELP = (
    "the org's share of the workers among orgs sending at the same priority "
    "(default 1; 0.001 to 1000): weight 2 gets twice the batches of weight 1; "
    "applies to campaigns started afterwards"
)
ORG_CAP_HELP = (
    "the most emails per second all the org's campaigns send together, shared equally "
    f"by those sending (above 0, at most {MAX_EMAILS_PER_SECOND:,.0f}), or none to remove "
    "the cap; running campaigns take it at their next plan"
)


# Argument checks. Each returns the value or raises ArgumentTypeError; argparse then
# prints "argument --org: <reason>" and exits 2 before the command runs, so a refused
# value never reaches the database or a workflow.


def _shown(value: str) -> str:
    """A typed value quoted for an error message: control characters escaped, length cut."""
    return repr(value) if len(value) <= 80 else f"{value[:80]!r}..."


def org_id_arg(value: str) -> str:
    """An org id (``ORG``, ``--org``): the rule of ``campaigns.models.OrgId``."""
    if (problem := org_id_problem(value)) is not None:
        raise argparse.ArgumentTypeError(f"{_shown(value)} {problem}")
    return value


def domain_arg(value: str) -> str:
    """``--verified-domain``: a DNS name of two or more labels."""
    if not is_valid_domain(value):
        raise argparse.ArgumentTypeError(
            f"{_shown(value)} is not a domain name: two or more labels of letters, digits "
            "and '-' separated by '.', at most 253 characters (e.g. brand.example)"
        )
    return value


def org_name_arg(value: str) -> str:
    """An org display name (``org add --name``): bounded, on one line, no control characters."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be blank")
    if len(value) > MAX_ORG_NAME:
        raise argparse.ArgumentTypeError(
            f"is {len(value):,} characters long; at most {MAX_ORG_NAME} are allowed"
        )
    if (problem := control_character_problem(value)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def audience_name_arg(value: str) -> str:
    """An audience name (``audience import --name``): the rule ``import_audience`` applies."""
    if (problem := audience_name_problem(value)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def flag_arg(value: str) -> str:
    """A feature flag name (``org flag ORG FLAG``)."""
    if re.fullmatch(FLAG_PATTERN, value) is None:
        raise argparse.ArgumentTypeError(
            f"{_shown(value)} is not a flag name: a lowercase letter, then lowercase letters, "
            "digits or '_', at most 64 characters (e.g. first_party)"
        )
    return value


def rate_arg(value: str) -> float:
    """``throttle --rate``: emails per second, finite and greater than 0."""
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not math.isfinite(rate) or rate <= 0 or rate > MAX_RATE_PER_SECOND:
        raise argparse.ArgumentTypeError(
            f"{_shown(value)} is not a rate: give emails per second, a finite number "
            f"greater than 0 and at most {MAX_RATE_PER_SECOND:,.0f} (or --no-rate to lift "
            "the limit)"
        )
    return rate


def priority_arg(value: str) -> int:
    """``priority ID N``: a whole number from 1 (highest) to 5 (lowest)."""
    try:
        priority: object = int(value)
    except ValueError:
        priority = value
    if priority_problem(priority) is not None:
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not {PRIORITY_RANGE}")
    assert isinstance(priority, int)
    return priority


def fairness_weight_arg(value: str) -> float:
    """``--fairness-weight``: the org's share within a priority, in Temporal's range."""
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if fairness_weight_problem(weight) is not None:
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not {FAIRNESS_WEIGHT_RANGE}")
    return weight


def _limit_arg(unit: str, maximum: float) -> Callable[[str], Limit]:
    """A configured limit (``--requests-per-second``, ``--emails-per-second``): a finite
    number above 0 and at most ``maximum`` (``rate_control.limit_problem``), or ``none``
    to remove the limit."""

    def check(value: str) -> Limit:
        if value.strip().lower() == "none":
            return Limit(None)
        try:
            number: object = float(value)
        except ValueError:
            number = value
        problem = limit_problem(unit, number, maximum)
        if problem is None:
            assert isinstance(number, float)
            return Limit(number)
        if isinstance(number, str):  # the problem names no range: say it
            problem += f": give a finite number above 0 and at most {maximum:,.0f}"
        raise argparse.ArgumentTypeError(f"{problem}, or none to remove the limit")

    return check


requests_limit_arg = _limit_arg("requests/s", MAX_REQUESTS_PER_SECOND)
emails_limit_arg = _limit_arg("emails/s", MAX_EMAILS_PER_SECOND)


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(
                f"{_shown(value)} is not a whole number between {low:,} and {high:,}"
            )
        return number

    return check


window_arg = _int_in(1, MAX_WINDOW)
port_arg = _int_in(1, 65_535)
MAX_STACK_WORKERS = 32
"""Most worker processes the local stack starts (this is a laptop, not a fleet)."""
MAX_DEMO_RECIPIENTS = 10_000_000
"""``throttle --window``: batch activities in flight, 1 to ``MAX_WINDOW``."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campaigns", description="Email campaigns delivered by Temporal workflows."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler | None, help_text: str, parent=commands):  # noqa: ANN001, ANN202
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
    sub = add(
        "list",
        cmd_list,
        "list campaigns, newest first (a table; --json for whole records to pipe into tools)",
    )
    sub.add_argument("--state", choices=[state.value for state in CampaignState])
    sub.add_argument("--org", type=org_id_arg)
    sub.add_argument("--limit", type=_int_in(1, MAX_LIMIT), default=50, help="at most this many")
    sub.add_argument("--json", action="store_true", help="print the campaigns as JSON")
    sub = add("pause", cmd_pause, "pause a campaign (in-flight batches finish, none start)")
    sub.add_argument("workflow_id", metavar="ID")
    sub = add("resume", cmd_resume, "resume a paused campaign")
    sub.add_argument("workflow_id", metavar="ID")
    sub = add("cancel", cmd_cancel, "cancel a campaign (in-flight batches finish, none start)")
    sub.add_argument("workflow_id", metavar="ID")
    sub = add("throttle", cmd_throttle, "change a running campaign's window or send rate")
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument(
        "--window", type=window_arg, help=f"batch activities in flight, 1 to {MAX_WINDOW}"
    )
    sub.add_argument("--rate", type=rate_arg, help="emails per second at most (greater than 0)")
    sub.add_argument("--no-rate", action="store_true", help="remove the rate limit")
    sub = add(
        "priority",
        cmd_priority,
        f"change a campaign's priority, {HIGHEST_PRIORITY} (highest) to {LOWEST_PRIORITY} "
        "(lowest), for the batches it schedules next",
    )
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument("priority", metavar="N", type=priority_arg)
    sub = add("reschedule", cmd_reschedule, "move the start of a scheduled campaign")
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument("--at", required=True, help="ISO 8601 with timezone")
    sub = add(
        "report",
        cmd_report,
        "counts and rates of a campaign, from the ledger and the provider's events "
        "(--json for the model)",
    )
    sub.add_argument("campaign_id", metavar="ID", type=campaign_id_arg, help="the campaign id")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub = add("retry-failed", cmd_retry_failed, "send to a finished campaign's failed recipients")
    sub.add_argument("workflow_id", metavar="ID")
    sub.add_argument("--watch", action="store_true", help="show live progress until done")

    # data
    group = add("db", None, "database schema").add_subparsers(dest="db_command", required=True)
    add("migrate", cmd_migrate, "apply pending schema migrations", group)
    group = add("org", None, "orgs").add_subparsers(dest="org_command", required=True)
    sub = add("add", cmd_org_add, "add (or update) an org", group)
    sub.add_argument(
        "org_id", metavar="ORG", type=org_id_arg, help="letters, digits, '.', '_', '-'; 1 to 64"
    )
    sub.add_argument(
        "--name", type=org_name_arg, help=f"display name, at most {MAX_ORG_NAME} characters"
    )
    sub.add_argument(
        "--verified-domain", type=domain_arg, help="the org's own verified sending domain"
    )
    sub.add_argument("--fairness-weight", type=fairness_weight_arg, help=FAIRNESS_WEIGHT_HELP)
    sub.add_argument(
        "--emails-per-second", type=emails_limit_arg, metavar="N|none", help=ORG_CAP_HELP
    )
    sub = add("set", cmd_org_set, "change an existing org's settings (give one or both)", group)
    sub.add_argument("org_id", metavar="ORG", type=org_id_arg)
    sub.add_argument("--fairness-weight", type=fairness_weight_arg, help=FAIRNESS_WEIGHT_HELP)
    sub.add_argument(
        "--emails-per-second", type=emails_limit_arg, metavar="N|none", help=ORG_CAP_HELP
    )
    sub = add("flag", cmd_org_flag, "set an org's feature flag", group)
    sub.add_argument("org_id", metavar="ORG", type=org_id_arg)
    sub.add_argument("flag", metavar="FLAG", type=flag_arg, help="e.g. first_party")
    sub.add_argument("state", choices=["on", "off"])
    add("list", cmd_org_list, "list orgs", group)
    group = add("account", None, "the provider account's send limits, shared by every campaign")
    group = group.add_subparsers(dest="account_command", required=True)
    add("show", cmd_account_show, "the account's configured limits and its rate now", group)
    sub = add(
        "set",
        cmd_account_set,
        "change the account's limits (an option left out keeps its value) and set the "
        "new rate on its task queue at once",
        group,
    )
    sub.add_argument(
        "--requests-per-second",
        type=requests_limit_arg,
        metavar="N|none",
        help=f"provider requests per second at most (above 0, at most "
        f"{MAX_REQUESTS_PER_SECOND:,.0f}), or none to remove the limit",
    )
    sub.add_argument(
        "--emails-per-second",
        type=emails_limit_arg,
        metavar="N|none",
        help=f"emails per second at most over all requests (above 0, at most "
        f"{MAX_EMAILS_PER_SECOND:,.0f}), or none to remove the limit",
    )
    sub = add(
        "capacity",
        cmd_capacity,
        "the account's limits and rate, its task queue, and each running campaign's and "
        "org's share",
    )
    view = sub.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="print one snapshot as JSON")
    view.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    group = add("audience", None, "audiences").add_subparsers(dest="aud_command", required=True)
    sub = add(
        "import",
        cmd_audience_import,
        "import recipients from a CSV file",
        group,
    )
    sub.description = IMPORT_DESCRIPTION
    sub.formatter_class = argparse.RawDescriptionHelpFormatter
    sub.add_argument("--org", required=True, type=org_id_arg)
    sub.add_argument(
        "--name",
        required=True,
        type=audience_name_arg,
        help=f"audience name (created if new), at most {MAX_AUDIENCE_NAME} characters",
    )
    sub.add_argument(
        "--replace",
        action="store_true",
        help="remove the audience's recipients that are not in the file (see above)",
    )
    sub.add_argument("file", type=Path, metavar="FILE.csv")
    sub = add("list", cmd_audience_list, "list audiences", group)
    sub.add_argument("--org", type=org_id_arg)
    sub = add("suppress", cmd_suppress, "stop sending to addresses for an org")
    sub.add_argument("--org", required=True, type=org_id_arg)
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
    sub.add_argument("--workers", type=_int_in(1, MAX_STACK_WORKERS))
    sub.add_argument("--temporal-port", type=port_arg)
    sub.add_argument("--ui-port", type=port_arg)
    sub.add_argument("--simulator-port", type=port_arg)
    sub.add_argument("--api-port", type=port_arg)
    sub.add_argument("--metrics-port", type=port_arg, help="the first worker's metrics port")
    add("down", cmd_stack_down, "stop the local stack", group)
    add("status", cmd_stack_status, "show the local stack's addresses", group)
    sub = add("api", None, "serve the HTTP service: provider webhooks, one-click unsubscribe")
    sub.set_defaults(handler=_serve_api)
    sub.add_argument("--host", help="address to bind (API_HOST; default 127.0.0.1)")
    sub.add_argument("--port", type=port_arg, help="port (API_PORT; default 8090)")
    sub.add_argument(
        "--processes", type=_int_in(1, 64), help="processes sharing the port (API_PROCESSES)"
    )
    sub = add("demo", cmd_demo, "import a demo audience and send a campaign to it, live")
    sub.add_argument("--recipients", type=_int_in(1, MAX_DEMO_RECIPIENTS), default=10_000)
    return parser


def _failure(label: str, exc: BaseException | str) -> Text:
    """``label`` in red, then the message literally: it quotes ids, names and file text."""
    return Text.assemble((label, "red"), " ", literal(exc))


def _unreachable(exc: BaseException) -> str:
    """A connection or file error in our words (OSError's text carries no class name)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {text}"
    if isinstance(exc, ConnectionError | TimeoutError) or "connect" in text.lower():
        return (
            f"cannot reach the database ({text}); start the local stack with "
            "`campaigns stack up` or check DATABASE_URL"
        )
    return text or "the operation failed with no message"


def _serve_api(args: argparse.Namespace) -> None:
    """``campaigns api``: serve the HTTP service until SIGTERM/SIGINT."""
    from campaigns.api.serve import main as serve

    serve(args.host, args.port, args.processes)


def main(argv: list[str] | None = None) -> None:
    """Run one command and exit with its status."""
    args = _parser().parse_args(argv)
    if args.handler is _serve_api:  # uvicorn runs its own event loop (and processes)
        _serve_api(args)
        return
    console = Console(stderr=False)
    errors = Console(stderr=True)
    try:
        code = asyncio.run(args.handler(args, Settings(), console))
    except (InvalidSpec, ImportFailed) as exc:
        errors.print(_failure("error:", exc))
        code = 2
    except CommandError as exc:
        errors.print(_failure("error:", exc))
        code = exc.code
    except (ControlRefused, CampaignAlreadyRunning, CampaignNotFound) as exc:
        errors.print(_failure("refused:", exc))
        code = 2
    except (StackError, SchemaOutOfDate, RuntimeError) as exc:
        errors.print(_failure("error:", exc))
        code = 1
    except RPCError as exc:
        errors.print(_failure("error:", f"Temporal refused the request: {exc.message}"))
        code = 1
    except asyncpg.PostgresError as exc:
        # Its text may quote rows: the SQLSTATE says what happened without them.
        errors.print(_failure("error:", f"the database refused it (SQLSTATE {exc.sqlstate})"))
        code = 1
    except (OSError, asyncpg.InterfaceError) as exc:
        errors.print(_failure("error:", _unreachable(exc)))
        code = 1
    except KeyboardInterrupt:
        code = 130
    # Exit without interpreter teardown: the Temporal client's Rust threads can abort a
    # finalizing interpreter (temporalio/sdk-python#300), turning success into SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
