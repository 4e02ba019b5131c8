"""The provider account's limits and how the running campaigns share them:
``campaigns account show|set`` and ``campaigns capacity``."""

from __future__ import annotations

import asyncio
from argparse import Namespace
from collections.abc import Iterable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from temporalio.service import RPCError

from campaigns import store
from campaigns.cli._campaign import CommandError
from campaigns.cli._data import Limit
from campaigns.cli._progress import limit_text, literal, rate_text
from campaigns.client import (
    AccountCapacity,
    CampaignCapacity,
    CampaignClient,
    Capacity,
    account_capacity,
)
from campaigns.contract import send_task_queue
from campaigns.models import MAX_PROVIDER_BATCH
from campaigns.rate_control import RECENT_SECONDS
from campaigns.settings import Settings
from campaigns.store import accounts
from campaigns.temporal import connect, set_queue_rate_limit

WATCH_SECONDS = 1.0
"""How often ``capacity --watch`` reads everything again."""
APPLY_TIMEOUT_SECONDS = 15.0
"""Longest ``account set`` waits for Temporal to take the queue's new rate."""
BAR_WIDTH = 24


def _requests(value: float | None) -> str:
    return rate_text(value, "requests/s")


def _count_requests(count: int) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def _queue(dispatches_per_second: float | None, requests_per_dispatch: int) -> str:
    """The task queue's rate limit, and the requests it stands for."""
    if dispatches_per_second is None:
        return "none (last recorded)"
    requests = _requests(dispatches_per_second * requests_per_dispatch)
    return f"{rate_text(dispatches_per_second, 'dispatches/s')} = {requests} (last recorded)"


def account_lines(account: AccountCapacity) -> list[Text]:
    """What is configured on the account and what its shared rate is now."""
    ceiling = (
        f"{_requests(account.ceiling_rps)} ({account.ceiling_source})"
        if account.ceiling_rps is not None
        else "none (no limit configured)"
    )
    current = _requests(account.current_rps)
    if account.current_rps is not None:
        full = account.current_rps * MAX_PROVIDER_BATCH
        current += f" (at most {rate_text(full, 'emails/s')}, {MAX_PROVIDER_BATCH} per request)"
    answered, throttled = account.recent_answered, account.recent_throttled
    rows = [
        ("requests/s limit", rate_text(account.requests_per_second)),
        ("emails/s limit", rate_text(account.emails_per_second)),
        ("ceiling", ceiling),
        ("current rate", current),
        (
            "batch size",
            f"{_count_requests(account.requests_per_batch)}, "
            f"{account.requests_per_dispatch} a dispatch now",
        ),
        ("set on the queue", _queue(account.queue_rate_limit, account.requests_per_dispatch)),
        (
            "recent 429s",
            f"{account.recent_throttle_ratio:.1%} ({throttled:,.0f} of "
            f"{answered + throttled:,.0f} answers, about the last {RECENT_SECONDS:.0f} s)",
        ),
    ]
    lines = [Text.assemble("provider account ", literal(account.id, "bold"))]
    lines += [literal(f"  {label:<17} {value}") for label, value in rows]
    return lines


async def _account(conn: store.Conn, account_id: str) -> accounts.Account:
    account = await accounts.get(conn, account_id)
    if account is None:
        raise CommandError(
            f"no provider account '{account_id}' in the database; run `campaigns db migrate`"
        )
    return account


async def cmd_account_show(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns account show``."""
    conn = await store.connect(settings.require_database_url())
    try:
        account = await _account(conn, accounts.DEFAULT_ACCOUNT)
    finally:
        await conn.close()
    for line in account_lines(account_capacity(account)):
        console.print(line)
    return 0


async def cmd_account_set(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns account set [--requests-per-second N|none] [--emails-per-second N|none]``.

    Writes the limits (an option left out keeps its value), then sets the account's
    task-queue rate limit at once, so the change holds within seconds with or without
    a worker running; if Temporal cannot be reached, the workers set it when they
    next report.
    """
    requests: Limit | None = args.requests_per_second
    emails: Limit | None = args.emails_per_second
    if requests is None and emails is None:
        raise CommandError("give --requests-per-second or --emails-per-second", code=2)
    account_id = accounts.DEFAULT_ACCOUNT
    conn = await store.connect(settings.require_database_url())
    try:
        async with conn.transaction():
            before = await _account(conn, account_id)
            await accounts.set_limits(
                conn,
                account_id,
                requests_per_second=requests.value
                if requests is not None
                else before.limits.requests_per_second,
                emails_per_second=emails.value
                if emails is not None
                else before.limits.emails_per_second,
            )
        after = await _account(conn, account_id)
        queue = send_task_queue(settings.task_queue, account_id)
        target, queue_rate = after.target_rps, after.queue_rate
        problem = await _apply(settings, queue, queue_rate, account_id)
        if problem is None:
            await accounts.mark_applied(conn, account_id, queue_rate)
            after = await _account(conn, account_id)
    finally:
        await conn.close()
    for line in account_lines(account_capacity(after)):
        console.print(line)
    rate = (
        f"{rate_text(queue_rate, 'dispatches/s')} of at most "
        f"{_count_requests(after.requests_per_dispatch)} = {_requests(target)}"
        if queue_rate is not None and target is not None
        else "no rate limit"
    )
    if problem is None:
        console.print(literal(f"task queue {queue}: {rate}, set now"))
    else:
        console.print(
            literal(
                f"task queue {queue}: not set now ({problem}); the workers set {rate} "
                "on it at their next report",
                "yellow",
            )
        )
    return 0


async def _apply(
    settings: Settings, queue: str, dispatches_per_second: float | None, account_id: str
) -> str | None:
    """Set the queue's rate limit; None when done, else why it was not (in our words)."""
    try:
        async with asyncio.timeout(APPLY_TIMEOUT_SECONDS):
            client = await connect(settings)
            await set_queue_rate_limit(
                client,
                queue,
                dispatches_per_second,
                f"limits of provider account {account_id} changed",
            )
    except TimeoutError:
        return f"Temporal did not answer within {APPLY_TIMEOUT_SECONDS:.0f}s"
    except RPCError as exc:
        return f"Temporal refused it: {exc.message}"
    except (RuntimeError, OSError):
        return f"Temporal cannot be reached at {settings.temporal_address}"
    return None


def _bar(share: float) -> ProgressBar:
    return ProgressBar(total=1.0, completed=max(0.0, min(share, 1.0)), width=BAR_WIDTH)


def _share_table(
    title: str, headers: tuple[str, ...], rows: Iterable[tuple[RenderableType, ...]]
) -> Table:
    """One of capacity's tables: a row per campaign or org, with its share as a bar."""
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _campaign_limit(campaign: CampaignCapacity) -> str:
    return limit_text(
        campaign.limited_by,
        window=campaign.window,
        in_flight=campaign.in_flight_batches,
        rate_limit=campaign.rate_limit,
        org_rate_cap=campaign.org_rate_cap,
        account_rate=campaign.account_rate,
    )


def capacity_view(capacity: Capacity) -> RenderableType:
    """The account, its task queue, then the campaigns and orgs with their shares."""
    parts: list[RenderableType] = []
    if capacity.account is None:
        parts.append(literal("no provider account in the database", "yellow"))
    else:
        parts += account_lines(capacity.account)
    queue = capacity.queue
    if queue is not None:
        parts.append(
            literal(
                f"task queue {queue.task_queue}\n"
                f"  {'rate limit':<17} {rate_text(queue.rate_limit, 'dispatches/s')}"
                " (set on Temporal)\n"
                f"  {'backlog':<17} {queue.backlog:,} batches waiting "
                f"(oldest {queue.backlog_age_seconds:,.1f} s)\n"
                f"  {'dispatch rate':<17} {rate_text(queue.dispatch_rate, 'dispatches/s')}"
            )
        )
    elif capacity.queue_error:
        parts.append(literal(capacity.queue_error, "yellow"))
    running = len(capacity.campaigns)
    parts.append(
        Text.assemble(
            (f"{running:,} running campaign{'' if running == 1 else 's'}", "bold"),
            f" · {rate_text(capacity.emails_per_second, 'emails/s')} together",
        )
    )
    if capacity.campaigns:
        parts.append(
            _share_table(
                "campaigns",
                ("campaign", "org", "priority", "emails/s", "share", "", "limited by"),
                (
                    (
                        literal(campaign.workflow_id),
                        literal(campaign.org),
                        str(campaign.priority) if campaign.priority is not None else "",
                        rate_text(campaign.emails_per_second),
                        f"{campaign.share:.0%}",
                        _bar(campaign.share),
                        _campaign_limit(campaign),
                    )
                    for campaign in capacity.campaigns
                ),
            )
        )
    if capacity.orgs:
        parts.append(
            _share_table(
                "orgs",
                ("org", "campaigns", "emails/s", "share", "", "cap", "fairness weight"),
                (
                    (
                        literal(org.org),
                        str(org.campaigns),
                        rate_text(org.emails_per_second),
                        f"{org.share:.0%}",
                        _bar(org.share),
                        rate_text(org.cap, "emails/s"),
                        f"{org.fairness_weight:g}" if org.fairness_weight is not None else "",
                    )
                    for org in capacity.orgs
                ),
            )
        )
    if capacity.unreadable:
        shown = ", ".join(capacity.unreadable[:10])
        more = (
            f" and {len(capacity.unreadable) - 10:,} more" if len(capacity.unreadable) > 10 else ""
        )
        parts.append(literal(f"no status from: {shown}{more}", "yellow"))
    if capacity.truncated:
        parts.append(literal(f"only the first {running:,} running campaigns are shown", "yellow"))
    return Group(*parts)


async def cmd_capacity(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns capacity [--json] [--watch]``."""
    client = await CampaignClient.connect(settings)
    conn = await store.connect(settings.require_database_url())
    try:
        capacity = await client.capacity(conn)
        if args.json:
            print(capacity.model_dump_json(indent=2))
            return 0
        if not args.watch:
            console.print(capacity_view(capacity))
            return 0
        if not console.is_terminal:  # a pipe or a file: one snapshot after another
            while True:  # until Ctrl-C
                console.print(capacity_view(capacity))
                console.print()
                console.file.flush()
                await asyncio.sleep(WATCH_SECONDS)
                capacity = await client.capacity(conn)
        with Live(capacity_view(capacity), console=console, refresh_per_second=4) as live:
            while True:  # until Ctrl-C
                await asyncio.sleep(WATCH_SECONDS)
                live.update(capacity_view(await client.capacity(conn)))
    finally:
        await conn.close()
