"""Data commands: migrations, orgs, audiences and suppressions."""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from campaigns import store
from campaigns.addresses import is_valid_address, normalize_address
from campaigns.audience_import import ImportReport, import_audience
from campaigns.cli._campaign import CommandError
from campaigns.cli._progress import literal, rate_text
from campaigns.settings import Settings
from campaigns.store import audiences, orgs

MAX_ORG_NAME = 200
"""Longest org display name, in characters."""


@dataclass(frozen=True, slots=True)
class Limit:
    """A limit given on the command line: a number, or None for ``none`` (no limit).

    An option left out is None itself, so "keep it" and "remove it" differ.
    """

    value: float | None


def _cap_text(cap: float | None) -> str:
    return rate_text(cap, "emails/s", "none")


async def cmd_migrate(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns db migrate``."""
    conn = await store.connect(settings.require_database_url())
    try:
        applied = await store.migrate(conn)
    finally:
        await conn.close()
    console.print(
        f"applied: {', '.join(applied)}"
        if applied
        else f"schema is current (v{store.LATEST_VERSION})"
    )
    return 0


CAP_APPLIES = "shared by its sending campaigns, from their next plan"


async def cmd_org_add(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns org add ID [--name NAME] [--verified-domain DOMAIN] [--fairness-weight W]
    [--emails-per-second N|none]`` (idempotent)."""
    cap: Limit | None = args.emails_per_second
    conn = await store.connect(settings.require_database_url())
    try:
        async with conn.transaction():
            await orgs.upsert(
                conn,
                args.org_id,
                name=args.name,
                verified_domain=args.verified_domain,
                fairness_weight=args.fairness_weight,
            )
            if cap is not None:
                await orgs.set_emails_per_second(conn, args.org_id, cap.value)
    finally:
        await conn.close()
    console.print(Text.assemble("org ", literal(args.org_id, "bold"), " ready"))
    if cap is not None:
        console.print(f"  emails/s cap {_cap_text(cap.value)} ({CAP_APPLIES})")
    return 0


async def cmd_org_set(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns org set ORG [--fairness-weight W] [--emails-per-second N|none]``: the
    weight applies to campaigns started afterwards, the cap at the next plan."""
    cap: Limit | None = args.emails_per_second
    if args.fairness_weight is None and cap is None:
        raise CommandError("give --fairness-weight or --emails-per-second", code=2)
    conn = await store.connect(settings.require_database_url())
    try:
        async with conn.transaction():
            if not await orgs.exists(conn, args.org_id):
                raise CommandError(
                    f"unknown org '{args.org_id}' (add it with `campaigns org add`)", 2
                )
            if args.fairness_weight is not None:
                await orgs.set_fairness_weight(conn, args.org_id, args.fairness_weight)
            if cap is not None:
                await orgs.set_emails_per_second(conn, args.org_id, cap.value)
    finally:
        await conn.close()
    if args.fairness_weight is not None:
        console.print(
            Text.assemble(
                "org ",
                literal(args.org_id, "bold"),
                f": fairness weight {args.fairness_weight:g} (campaigns started from now on)",
            )
        )
    if cap is not None:
        console.print(
            Text.assemble(
                "org ",
                literal(args.org_id, "bold"),
                f": emails/s cap {_cap_text(cap.value)} ({CAP_APPLIES})",
            )
        )
    return 0


async def cmd_org_flag(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns org flag ORG FLAG on|off``; first_party takes effect at the next refresh."""
    conn = await store.connect(settings.require_database_url())
    try:
        if not await orgs.exists(conn, args.org_id):
            raise CommandError(f"unknown org '{args.org_id}' (add it with `campaigns org add`)", 2)
        await orgs.set_flag(conn, args.org_id, args.flag, args.state)
    finally:
        await conn.close()
    console.print(
        Text.assemble("org ", literal(args.org_id, "bold"), literal(f": {args.flag} {args.state}"))
    )
    return 0


async def cmd_org_list(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns org list``."""
    conn = await store.connect(settings.require_database_url())
    try:
        rows = await orgs.list_all(conn)
    finally:
        await conn.close()
    table = Table("org", "name", "audiences", "fairness weight", "emails/s cap")
    for org in rows:
        # rows written by SQL or older versions may hold anything, markup included
        table.add_row(
            literal(org.id),
            literal(org.name),
            str(org.audiences),
            f"{org.fairness_weight:g}",
            rate_text(org.emails_per_second),
        )
    console.print(table)
    return 0


def import_report_lines(report: ImportReport) -> list[Text]:
    """What an import did, line by line: counts, what happened to recipients not in the
    file, merge fields and renamed columns, then each left-out row by line number.

    Everything from the file (headers, values quoted in problems) is shown literally.
    """
    lines = [
        literal(
            f"read {report.rows_read:,} rows: {report.inserted:,} new, "
            f"{report.updated:,} updated, {report.unchanged:,} unchanged, "
            f"{report.left_out:,} left out"
        )
    ]
    if report.not_in_file:
        if report.replace:
            lines.append(
                literal(
                    f"{report.not_in_file:,} recipients of the audience are no longer in the "
                    f"file: removed ({report.removed:,}, --replace)"
                )
            )
        else:
            lines.append(
                literal(
                    f"{report.not_in_file:,} recipients of the audience are no longer in the "
                    "file: kept (import again with --replace to remove them)"
                )
            )
    if report.on_left_out_rows:
        lines.append(
            literal(
                f"{report.on_left_out_rows:,} recipients of the audience are only on rows left "
                "out: kept (fix those rows and import again)"
            )
        )
    if report.merge_fields:
        lines.append(literal(f"merge fields: {', '.join(report.merge_fields)}"))
    if report.renamed_columns:
        renames = ", ".join(f"'{column}' -> {name}" for column, name in report.renamed_columns)
        lines.append(literal(f"renamed columns to merge-field names: {renames}"))
    for problem in report.problems:
        lines.append(Text.assemble("  ", literal(problem, "yellow")))
    hidden = report.problem_count - len(report.problems)
    if hidden > 0:
        lines.append(literal(f"  ... and {hidden:,} more"))
    return lines


def print_import_report(report: ImportReport, console: Console) -> None:
    """Print ``import_report_lines``."""
    for line in import_report_lines(report):
        console.print(line)


async def cmd_audience_import(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns audience import --org ORG --name NAME [--replace] FILE.csv``."""
    conn = await store.connect(settings.require_database_url())
    try:
        report = await import_audience(conn, args.org, args.name, args.file, replace=args.replace)
    finally:
        await conn.close()
    print_import_report(report, console)
    return 0


async def cmd_audience_list(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns audience list [--org ORG]``."""
    conn = await store.connect(settings.require_database_url())
    try:
        found = await audiences.list_all(conn, args.org)
    finally:
        await conn.close()
    table = Table("org", "audience", "recipients", "merge fields")
    for audience in found:
        table.add_row(
            literal(audience.org_id),
            literal(audience.name),
            f"{audience.recipients:,}",
            literal(", ".join(audience.merge_fields)),
        )
    console.print(table)
    return 0


async def cmd_suppress(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns suppress --org ORG --reason R EMAIL...`` (idempotent)."""
    emails = [normalize_address(email) for email in args.emails]
    bad = [email for email in emails if not is_valid_address(email)]
    if bad:
        shown = ", ".join(repr(email) for email in bad[:10])
        more = f" and {len(bad) - 10:,} more" if len(bad) > 10 else ""
        raise CommandError(f"invalid email address: {shown}{more}", code=2)
    conn = await store.connect(settings.require_database_url())
    try:
        if not await orgs.exists(conn, args.org):
            raise CommandError(f"unknown org '{args.org}'", code=2)
        await orgs.suppress(conn, args.org, emails, args.reason)
    finally:
        await conn.close()
    console.print(
        literal(f"suppressed {len(emails)} address(es) for org {args.org} ({args.reason})")
    )
    return 0
