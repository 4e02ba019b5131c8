"""Live campaign progress in the terminal, and the final summary table."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from campaigns.client import LimitedBy, limited_by
from campaigns.models import CampaignState, CampaignStatus

# Controls other than line break and tab: escape sequences could recolour or rewrite
# the terminal, so they are shown as \x1b-style escapes instead of being sent to it.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _visible_escape(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def literal(value: object, style: str = "") -> Text:
    """``value`` as terminal text shown as it is, never read as markup.

    Ids, names, addresses and error messages come from users, files, the database and
    the workflow: ``[/]`` or ``[link=...]`` in them must print literally rather than
    style the output or crash it (rich reads markup only in ``str``, never in ``Text``).
    """
    return Text(_UNPRINTABLE.sub(_visible_escape, str(value)), style=style)


def rate_text(value: float | None, unit: str = "", none: str = "none") -> str:
    """A rate for people, to about three figures: ``1,250``, ``12.5``, ``0.33``."""
    if value is None:
        return none
    decimals = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    text = f"{value:,.{decimals}f}"
    if decimals:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {unit}".rstrip()


def limit_text(
    verdict: LimitedBy,
    *,
    window: int | None,
    in_flight: int,
    rate_limit: float | None,
    org_rate_cap: float | None,
    account_rate: float | None,
) -> str:
    """``limited_by``'s verdict with the number behind it: ``org cap (30 emails/s)``."""
    if verdict == "window":
        return f"window ({in_flight} of {window} batches in flight)"
    if verdict == "its rate":
        return f"its rate ({rate_text(rate_limit, 'emails/s')})"
    if verdict == "org cap":
        return f"org cap (its share {rate_text(org_rate_cap, 'emails/s')})"
    if verdict == "account":
        return f"account ({rate_text(account_rate, 'requests/s')})"
    return verdict


def limits_line(status: CampaignStatus) -> str:
    """The rates that may hold the campaign back, and which one does: ``org-cap share
    30 emails/s  account 45 requests/s  limited by: org cap (its share 30 emails/s)``."""
    controls = status.controls
    parts = [
        f"org-cap share {rate_text(status.org_rate_cap, 'emails/s')}",
        f"account {rate_text(status.account_rate, 'requests/s')}",
    ]
    if status.state in (CampaignState.RUNNING, CampaignState.PAUSED):
        verdict = limit_text(
            limited_by(status),
            window=controls.window if controls is not None else None,
            in_flight=status.in_flight_batches,
            rate_limit=controls.rate_per_second if controls is not None else None,
            org_rate_cap=status.org_rate_cap,
            account_rate=status.account_rate,
        )
        parts.append(f"limited by: {verdict}")
    return "  ".join(parts)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def bar_rate(status: CampaignStatus) -> str:
    """The bar's rate: the workflow's own, over its last 30 s of batches; none when paused."""
    if status.state is CampaignState.PAUSED:
        return "paused"
    return f"{status.rate_per_second:,.0f} emails/s (last 30 s)"


def pause_reason(status: CampaignStatus) -> str:
    """Why a paused campaign is paused: the reputation watch's reason, or an operator."""
    reason = status.controls.pause_reason if status.controls is not None else None
    return f"by the reputation watch: {reason}" if reason else "by an operator"


def status_line(status: CampaignStatus) -> Text:
    """One line of counts under the bar."""
    counts = status.counts
    line = Text()
    line.append(f"{status.state.value}", style="bold")
    line.append(f"  round {status.round}  in flight {status.in_flight_batches}  ")
    line.append(f"sent {counts.sent:,}", style="green")
    line.append(f"  failed {counts.failed:,}", style="yellow" if counts.failed else "")
    line.append(f"  rejected {counts.rejected:,}  suppressed {counts.suppressed:,}")
    line.append(f"  skipped {counts.skipped:,}  abandoned {counts.abandoned:,}")
    controls = status.controls
    if controls is not None:
        rate = f"{controls.rate_per_second:,.0f}/s" if controls.rate_per_second else "none"
        line.append(f"\npriority {controls.priority}  window {controls.window}  rate limit {rate}")
        if controls.paused:
            line.append("  PAUSED", style="bold yellow")
            line.append_text(literal(f" ({pause_reason(status)})", "yellow"))
        if controls.send_at and status.state is CampaignState.SCHEDULED:
            line.append(f"  sends at {controls.send_at.isoformat()}")
    if status.runs > 1:
        line.append(f"  runs {status.runs}")
    if controls is not None:
        line.append(f"\n{limits_line(status)}")
    if status.last_error:
        line.append("\nlast error: ", style="red")
        line.append_text(literal(status.last_error, "red"))
    return line


async def watch(
    fetch: Callable[[], Awaitable[CampaignStatus]],
    console: Console,
    *,
    interval: float = 0.5,
) -> CampaignStatus:
    """Redraw a progress bar with rate and ETA until the campaign is done."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=None),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TextColumn("[cyan]{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
        expand=True,
    )
    status = await fetch()
    # the description column reads markup, so the id is escaped
    task = progress.add_task(
        escape(status.campaign_id), total=status.total or 1, rate="", eta="--:--"
    )
    with Live(Group(progress, status_line(status)), console=console, refresh_per_second=4) as live:
        while True:
            progress.update(
                task,
                total=status.total or 1,
                completed=status.counts.processed,
                rate=bar_rate(status),
                eta="--:--" if status.state is CampaignState.PAUSED else _eta(status.eta_seconds),
            )
            live.update(Group(progress, status_line(status)))
            if status.done:
                break
            await asyncio.sleep(interval)
            status = await fetch()
    if not console.is_terminal:  # Live ends its last render without a line break there
        console.line()
    return status


def summary_table(status: CampaignStatus) -> Table:
    """The final outcome of a campaign."""
    counts = status.counts
    title = literal(f"campaign {status.campaign_id}: {status.state.value}")
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in (
        ("recipients", status.total),
        ("sent", counts.sent),
        ("failed (waiting for a retry round)", counts.failed),
        ("rejected", counts.rejected),
        ("suppressed", counts.suppressed),
        ("skipped (already sent)", counts.skipped),
        ("abandoned", counts.abandoned),
        ("not attempted", status.not_attempted),
    ):
        table.add_row(label, f"{value:,}")
    if status.started_at and status.finished_at:
        seconds = (status.finished_at - status.started_at).total_seconds()
        # From the workflow's start to its end, preparation and the last batch included:
        # lower than the bar's rate, which counts only the last 30 s of sending.
        table.add_row("duration (start to end)", f"{seconds:,.1f}s")
        if seconds > 0:
            table.add_row(
                "average throughput (sent / duration)", f"{counts.sent / seconds:,.0f} emails/s"
            )
    if status.last_error:
        table.add_row("last error", literal(status.last_error))
    return table
