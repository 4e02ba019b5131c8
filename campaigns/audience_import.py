"""Audience import from CSV: streamed, COPY-loaded, idempotent.

Rows are checked as they are read and valid ones are streamed into a staging table
with ``COPY``, so memory stays flat whatever the file size. Duplicates are found by
the database (first occurrence wins), and the upsert into ``recipients`` runs in the
same transaction: an import lands whole or not at all, and importing the same file
again changes nothing.

Columns other than ``email`` and ``name`` become merge fields; a header that is not a
field name (``first name``, ``zip-code``) is renamed to one (``first_name``,
``zip_code``) and the report says so. A row that is not UTF-8 or holds a NUL is left
out by line, like any other bad row.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from campaigns.addresses import is_valid_address, normalize_address
from campaigns.templates import field_name_for

REQUIRED_COLUMNS = ("email",)
OPTIONAL_COLUMNS = ("name",)


class ImportFailed(ValueError):
    """The file cannot be imported at all (missing file, no email column, unknown org)."""


@dataclass(frozen=True)
class RowProblem:
    """A row left out of the import, by line number."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ImportReport:
    """What an import did."""

    audience_id: int
    rows_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    problem_count: int = 0
    merge_fields: list[str] = field(default_factory=list)
    renamed_columns: list[tuple[str, str]] = field(default_factory=list)
    """(CSV header, merge-field name) for each column whose header was not a field name."""

    @property
    def imported(self) -> int:
        """Rows now in the audience from this file."""
        return self.inserted + self.updated + self.unchanged


# Undecodable bytes are read as lone surrogates (``errors="surrogateescape"``), so a
# bad byte costs one row, not the file; neither they nor NUL can be stored as text.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _unstorable(value: str) -> str | None:
    """Why ``value`` cannot be stored (a non-UTF-8 byte or a NUL), or None if it can."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return "contains a NUL character"
    return f"is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02X}); save the file as UTF-8"


class _RowChecker:
    """Reads the CSV, keeps problems (the first ``keep`` of them), yields valid rows."""

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.keep = keep
        self.problems: list[RowProblem] = []
        self.problem_count = 0
        self.rows_read = 0
        self.merge_fields: list[str] = []
        self.renamed: list[tuple[str, str]] = []

    def problem(self, line: int, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.keep:
            self.problems.append(RowProblem(line, message))

    def _read_header(self, reader: Iterator[list[str]]) -> list[str]:
        try:
            header = [column.strip() for column in next(reader)]
        except StopIteration:
            raise ImportFailed(f"{self.path} is empty") from None
        except csv.Error as exc:
            raise ImportFailed(f"{self.path}: cannot read the header line ({exc})") from None
        for column in header:
            if (why := _unstorable(column)) is not None:
                raise ImportFailed(f"{self.path}: the header line {why}")
        return header

    def _merge_fields(self, header: list[str], lowered: list[str]) -> list[tuple[int, str]]:
        """(index, field name) of each extra column; records renames, refuses clashes."""
        extra = [
            (index, field_name_for(column) if column else f"column_{index + 1}")
            for index, column in enumerate(header)
            if lowered[index] not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS
        ]
        # Compared ignoring case, like the columns themselves.
        by_name: dict[str, list[tuple[int, str]]] = {}
        for index, name in extra:
            by_name.setdefault(name.lower(), []).append((index, name))
        for clash in by_name.values():
            if len(clash) > 1:
                columns = " and ".join(f"'{header[index]}'" for index, _ in clash)
                names = sorted({name for _, name in clash})
                became = (
                    f"would both be merge field {names[0]}"
                    if len(names) == 1
                    else f"would be merge fields {' and '.join(names)}, which differ only in case"
                )
                raise ImportFailed(f"{self.path}: columns {columns} {became}; rename one of them")
        self.renamed = [(header[index], name) for index, name in extra if header[index] != name]
        self.merge_fields = [name for _, name in extra]
        return extra

    @staticmethod
    def _unstorable_column(header: list[str], row: list[str]) -> str:
        """The first value of ``row`` that cannot be stored, named by its column."""
        for index, value in enumerate(row):
            if (why := _unstorable(value)) is not None:
                return f"column '{header[index]}' {why}" if index < len(header) else why
        raise AssertionError("no unstorable value in the row")

    def rows(self) -> Iterator[tuple[int, str, str, str]]:
        with self.path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            header = self._read_header(reader)
            lowered = [column.lower() for column in header]
            missing = [c for c in REQUIRED_COLUMNS if c not in lowered]
            if missing:
                raise ImportFailed(
                    f"{self.path}: missing column {', '.join(missing)} "
                    f"(the header has: {', '.join(header) or 'nothing'})"
                )
            repeated = sorted({c for c in lowered if lowered.count(c) > 1})
            if repeated:
                raise ImportFailed(f"{self.path}: column {', '.join(repeated)} appears twice")
            email_at = lowered.index("email")
            name_at = lowered.index("name") if "name" in lowered else None
            extra = self._merge_fields(header, lowered)
            width = len(header)
            line = reader.line_num
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:  # e.g. an unclosed quote running past the field limit
                    self.rows_read += 1
                    self.problem(line + 1, f"cannot be read as CSV ({exc})")
                    line = reader.line_num
                    continue
                first_line, line = line + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                self.rows_read += 1
                # one scan of the whole row; the column is looked up only for a bad one
                if _UNSTORABLE.search("".join(row)):
                    self.problem(first_line, self._unstorable_column(header, row))
                    continue
                if len(row) != width:
                    self.problem(first_line, f"expected {width} columns, found {len(row)}")
                    continue
                email = normalize_address(row[email_at])
                if not email:
                    self.problem(first_line, "missing email")
                    continue
                if not is_valid_address(email):
                    self.problem(first_line, f"invalid email address '{row[email_at].strip()}'")
                    continue
                name = row[name_at].strip() if name_at is not None else ""
                fields = {key: row[index] for index, key in extra}
                yield first_line, email, name, json.dumps(fields)


async def import_audience(
    conn: asyncpg.Connection,
    org: str,
    name: str,
    path: Path,
    *,
    keep_problems: int = 1000,
) -> ImportReport:
    """Import ``path`` into audience ``name`` of ``org``, creating the audience if new.

    Raises:
        ImportFailed: when the file or the org makes the whole import impossible.
    """
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    if await conn.fetchval("SELECT id FROM orgs WHERE id = $1", org) is None:
        raise ImportFailed(f"unknown org '{org}' (add it with `campaigns org add {org}`)")
    checker = _RowChecker(path, keep_problems)
    async with conn.transaction():
        await conn.execute(
            """CREATE TEMP TABLE import_rows (
                   line integer NOT NULL, email text NOT NULL, name text NOT NULL,
                   merge_fields text NOT NULL) ON COMMIT DROP"""
        )
        await conn.copy_records_to_table(
            "import_rows",
            records=checker.rows(),
            columns=["line", "email", "name", "merge_fields"],
        )
        duplicates = await conn.fetch(
            """WITH ranked AS (
                   SELECT line, email, min(line) OVER (PARTITION BY email) AS first_line
                   FROM import_rows)
               SELECT line, email, first_line, count(*) OVER () AS total
               FROM ranked WHERE line <> first_line ORDER BY line LIMIT $1""",
            keep_problems,
        )
        for row in duplicates:
            checker.problem(row["line"], f"duplicate of line {row['first_line']} ({row['email']})")
        if duplicates:
            checker.problem_count += duplicates[0]["total"] - len(duplicates)
            await conn.execute(
                """DELETE FROM import_rows a USING import_rows b
                   WHERE a.email = b.email AND a.line > b.line"""
            )
        audience_id = await conn.fetchval(
            """INSERT INTO audiences (org_id, name, merge_fields) VALUES ($1, $2, $3)
               ON CONFLICT (org_id, name) DO UPDATE SET
                   merge_fields = ARRAY(SELECT DISTINCT unnest(audiences.merge_fields || $3)
                                        ORDER BY 1),
                   updated_at = now()
               RETURNING id""",
            org,
            name,
            checker.merge_fields,
        )
        counts = await conn.fetchrow(
            """WITH upserted AS (
                   INSERT INTO recipients (audience_id, email, name, merge_fields)
                   SELECT $1, email, name, merge_fields::jsonb FROM import_rows ORDER BY line
                   ON CONFLICT (audience_id, email) DO UPDATE
                   SET name = EXCLUDED.name, merge_fields = EXCLUDED.merge_fields
                   WHERE (recipients.name, recipients.merge_fields)
                         IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.merge_fields)
                   RETURNING (xmax = 0) AS inserted)
               SELECT count(*) FILTER (WHERE inserted) AS inserted,
                      count(*) FILTER (WHERE NOT inserted) AS updated,
                      (SELECT count(*) FROM import_rows) AS staged
               FROM upserted""",
            audience_id,
        )
        merge_fields = await conn.fetchval(
            "SELECT merge_fields FROM audiences WHERE id = $1", audience_id
        )
    checker.problems.sort(key=lambda problem: problem.line)
    return ImportReport(
        audience_id=audience_id,
        rows_read=checker.rows_read,
        inserted=counts["inserted"],
        updated=counts["updated"],
        unchanged=counts["staged"] - counts["inserted"] - counts["updated"],
        problems=checker.problems[:keep_problems],
        problem_count=checker.problem_count,
        merge_fields=list(merge_fields),
        renamed_columns=checker.renamed,
    )
