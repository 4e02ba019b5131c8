"""``campaigns report ID``: what a campaign did, from the ledger and the provider's events."""

from __future__ import annotations

import argparse
import re
from argparse import Namespace

from rich.console import Console
from rich.table import Table

from campaigns.cli._progress import literal
from campaigns.client import read_report
from campaigns.models import CAMPAIGN_ID_PATTERN, CampaignReport
from campaigns.settings import Settings


def campaign_id_arg(value: str) -> str:
    """A campaign id (``report ID``): the rule of ``campaigns.models.CampaignId``."""
    if re.fullmatch(CAMPAIGN_ID_PATTERN, value) is None:
        shown = repr(value) if len(value) <= 80 else f"{value[:80]!r}..."
        raise argparse.ArgumentTypeError(
            f"{shown} is not a campaign id: letters, digits, '.', '_' or '-', starting with "
            "a letter or digit, at most 64 characters"
        )
    return value


def _percent(fraction: float) -> str:
    return f"{fraction:.2%}"


def report_table(report: CampaignReport) -> Table:
    """Counts and rates: the ledger's outcomes, then what the provider reported."""
    ledger, engagement, rates = report.ledger, report.engagement, report.rates
    table = Table(title=literal(f"campaign {report.campaign_id} · org {report.org}"))
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("of", style="dim")
    for label, count in (
        ("sent", ledger.sent),
        ("failed (waiting for a retry round)", ledger.failed),
        ("rejected", ledger.rejected),
        ("suppressed", ledger.suppressed),
        ("abandoned", ledger.abandoned),
    ):
        table.add_row(label, f"{count:,}", "", "")
    table.add_section()
    for label, count, rate, of in (
        ("delivered", engagement.delivered, rates.delivered, "sent"),
        ("delayed", engagement.delayed, None, ""),
        ("hard bounced", engagement.hard_bounced, rates.hard_bounced, "sent"),
        ("soft bounced", engagement.soft_bounced, rates.soft_bounced, "sent"),
        ("failed at the provider", engagement.provider_failed, None, ""),
        ("complained", engagement.complained, rates.complained, "delivered"),
        ("opened", engagement.opened, rates.opened, "delivered"),
        ("clicked", engagement.clicked, rates.clicked, "delivered"),
        ("unsubscribed", engagement.unsubscribed, rates.unsubscribed, "delivered"),
    ):
        table.add_row(label, f"{count:,}", _percent(rate) if rate is not None else "", of)
    return table


async def cmd_report(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns report ID``: a table of counts and rates, or ``--json`` for the model."""
    report = await read_report(settings, args.campaign_id)  # PostgreSQL only
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    console.print(report_table(report))
    return 0
