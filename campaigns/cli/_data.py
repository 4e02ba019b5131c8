"""Data commands: migrations, orgs, audiences and suppressions."""

from __future__ import annotations

from argparse import Namespace

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from campaigns import db
from campaigns.addresses import is_valid_address, normalize_address
from campaigns.audience_import import ImportReport, import_audience
from campaigns.cli._campaign import CommandError
from campaigns.settings import Settings


async def cmd_migrate(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns db migrate``."""
    conn = await db.connect(settings.require_database_url())
    try:
        applied = await db.migrate(conn)
    finally:
        await conn.close()
    console.print(
        f"applied: {', '.join(applied)}" if applied else f"schema is current (v{db.LATEST_VERSION})"
    )
    return 0


async def cmd_org_add(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns org add ID [--name NAME] [--verified-domain DOMAIN]`` (idempotent)."""
    conn = await db.connect(settings.require_database_url())
    try:
        await conn.execute(
            """INSERT INTO orgs (id, name, verified_domain) VALUES ($1, $2, $3)
               ON CONFLICT (id) DO UPDATE SET
                   name = coalesce($4, orgs.name),
                   verified_domain = coalesce(EXCLUDED.verified_domain, orgs.verified_domain)""",
            args.org_id,
            args.name or args.org_id,
            args.verified_domain,
            args.name,
        )
    finally:
        await conn.close()
    console.print(f"org [bold]{args.org_id}[/] ready")
    return 0


async def cmd_org_flag(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns org flag ORG FLAG on|off``; first_party takes effect at the next refresh."""
    conn = await db.connect(settings.require_database_url())
    try:
        if await conn.fetchval("SELECT id FROM orgs WHERE id = $1", args.org_id) is None:
            raise CommandError(f"unknown org '{args.org_id}'", code=2)
        await conn.execute(
            """INSERT INTO org_feature_flags (org_id, flag, state) VALUES ($1, $2, $3)
               ON CONFLICT (org_id, flag)
               DO UPDATE SET state = EXCLUDED.state, updated_at = now()""",
            args.org_id,
            args.flag,
            args.state,
        )
    finally:
        await conn.close()
    console.print(f"org [bold]{args.org_id}[/]: {args.flag} {args.state}")
    return 0


async def cmd_org_list(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns org list``."""
    conn = await db.connect(settings.require_database_url())
    try:
        rows = await conn.fetch(
            """SELECT o.id, o.name, count(a.id) AS audiences FROM orgs o
               LEFT JOIN audiences a ON a.org_id = o.id GROUP BY o.id ORDER BY o.id"""
        )
    finally:
        await conn.close()
    table = Table("org", "name", "audiences")
    for row in rows:
        table.add_row(row["id"], row["name"], str(row["audiences"]))
    console.print(table)
    return 0


def print_import_report(report: ImportReport, console: Console) -> None:
    """Counts, merge fields and renamed columns, then each left-out row by line number."""
    console.print(
        f"read {report.rows_read:,} rows: {report.inserted:,} new, {report.updated:,} updated, "
        f"{report.unchanged:,} unchanged, {report.problem_count:,} left out"
    )
    if report.merge_fields:
        console.print(f"merge fields: {', '.join(report.merge_fields)}")
    if report.renamed_columns:
        renames = ", ".join(f"'{column}' -> {name}" for column, name in report.renamed_columns)
        # escaped: headers and rows are the file's text and may hold rich markup like [b]
        console.print(f"renamed columns to merge-field names: {escape(renames)}")
    for problem in report.problems:
        console.print(f"  [yellow]{escape(str(problem))}[/]")
    hidden = report.problem_count - len(report.problems)
    if hidden > 0:
        console.print(f"  ... and {hidden:,} more")


async def cmd_audience_import(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns audience import --org ORG --name NAME FILE.csv``."""
    conn = await db.connect(settings.require_database_url())
    try:
        report = await import_audience(conn, args.org, args.name, args.file)
    finally:
        await conn.close()
    print_import_report(report, console)
    return 0


async def cmd_audience_list(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns audience list [--org ORG]``."""
    conn = await db.connect(settings.require_database_url())
    try:
        rows = await conn.fetch(
            """SELECT a.org_id, a.name, a.merge_fields,
                      (SELECT count(*) FROM recipients r WHERE r.audience_id = a.id) AS recipients
               FROM audiences a WHERE $1::text IS NULL OR a.org_id = $1
               ORDER BY a.org_id, a.name""",
            args.org,
        )
    finally:
        await conn.close()
    table = Table("org", "audience", "recipients", "merge fields")
    for row in rows:
        table.add_row(
            row["org_id"], row["name"], f"{row['recipients']:,}", ", ".join(row["merge_fields"])
        )
    console.print(table)
    return 0


async def cmd_suppress(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns suppress --org ORG --reason R EMAIL...`` (idempotent)."""
    emails = [normalize_address(email) for email in args.emails]
    bad = [email for email in emails if not is_valid_address(email)]
    if bad:
        raise CommandError(f"invalid email address: {', '.join(bad)}", code=2)
    conn = await db.connect(settings.require_database_url())
    try:
        if await conn.fetchval("SELECT id FROM orgs WHERE id = $1", args.org) is None:
            raise CommandError(f"unknown org '{args.org}'", code=2)
        await conn.executemany(
            """INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, $3)
               ON CONFLICT (org_id, email) DO UPDATE SET reason = EXCLUDED.reason""",
            [(args.org, email, args.reason) for email in emails],
        )
    finally:
        await conn.close()
    console.print(f"suppressed {len(emails)} address(es) for org {args.org} ({args.reason})")
    return 0
