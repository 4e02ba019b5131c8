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

Physical lines are read here and fed to the ``csv`` parser, keeping the lines of the
current record (at most ``MAX_RECORD_CHARS``). On a quote that is never closed the
parser would take the rest of the file as one field; instead, a record that spans
lines and is bad is reported at the line where its quote opened, that line is left
out, and the lines after it are read again as rows.

Recipients already in the audience but not in the file are kept and counted; with
``replace=True`` they are removed in the same transaction, except those whose address
appears on a row left out of the import.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import asyncpg

from campaigns.addresses import is_valid_address, normalize_address
from campaigns.models import MAX_AUDIENCE_NAME, is_valid_org_id
from campaigns.safe_text import control_character_problem
from campaigns.store import audiences, orgs
from campaigns.store.audiences import StagedRow
from campaigns.templates import field_name_for

REQUIRED_COLUMNS = ("email",)
OPTIONAL_COLUMNS = ("name",)
MAX_RECORD_CHARS = 1_048_576
"""Longest CSV record (one line, or the lines of one quoted multi-line record)."""
ORG_ID_RULE = "letters, digits, '.', '_' or '-'; 1 to 64 characters"


def org_id_problem(org: str) -> str | None:
    """Why ``org`` is not an org id (the rule of ``campaigns.models.OrgId``), or None."""
    return None if is_valid_org_id(org) else f"is not a valid org id ({ORG_ID_RULE})"


def audience_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an audience, or None."""
    if not name.strip():
        return "must not be blank"
    if len(name) > MAX_AUDIENCE_NAME:
        return f"is {len(name):,} characters long; at most {MAX_AUDIENCE_NAME} are allowed"
    return control_character_problem(name)


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
    not_in_file: int = 0
    """Recipients the audience had before whose address is nowhere in the file."""
    on_left_out_rows: int = 0
    """Recipients the audience had before whose address is only on rows left out."""
    removed: int = 0
    """Recipients removed because they are not in the file (``replace=True`` only)."""
    replace: bool = False

    @property
    def imported(self) -> int:
        """Rows now in the audience from this file."""
        return self.inserted + self.updated + self.unchanged

    @property
    def left_out(self) -> int:
        """Rows left out: bad rows and duplicates."""
        return self.problem_count


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


class _RecordTooLong(Exception):
    """The current record grew past ``MAX_RECORD_CHARS``."""


class _Lines:
    """Physical lines of a CSV file, fed to ``csv.reader``, remembering the current record's.

    The lines of a record that turns out bad can be pushed back to be read again (all
    but the first), so an unclosed quote costs one row instead of the rest of the file.
    At most ``limit`` characters of a record are held; a longer line is skipped unread.
    """

    def __init__(self, handle: IO[str], limit: int) -> None:
        self._readline = handle.readline
        self._limit = limit
        self._pending: deque[tuple[int, str | None]] = deque()
        self._count = 0
        self._chars = 0
        self.current: list[tuple[int, str | None]] = []
        """(line number, text) of each line of the current record; text None if too long."""
        self.eof_in_record = False
        """The file ended inside the current record: a quote opened there never closed."""

    def start_record(self) -> None:
        self.current = []
        self._chars = 0
        self.eof_in_record = False

    def push_back_after_first(self) -> None:
        """Read the current record's lines after its first one again, as new records."""
        self._pending.extendleft(reversed(self.current[1:]))

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._pending:
            number, text = self._pending.popleft()
        else:
            text = self._readline(self._limit + 1)
            if not text:
                if self.current:
                    self.eof_in_record = True
                raise StopIteration
            self._count += 1
            number = self._count
            if len(text) > self._limit:
                while text and not text.endswith(("\n", "\r")):
                    text = self._readline(self._limit)  # skip the rest of the line unread
                text = None
        self.current.append((number, text))
        if text is None:
            raise _RecordTooLong
        self._chars += len(text)
        if self._chars > self._limit:
            raise _RecordTooLong
        return text


class CsvRecords:
    """The records of a CSV stream, each with the physical lines it came from.

    Iterating yields ``(fields, error)``: the parsed fields, or None and why the record
    cannot be parsed. After each record, ``first_line``, ``last_line``,
    ``eof_in_quotes`` and ``text`` describe it, and ``reread_after_first()`` makes the
    lines after its first one be read again as records.
    """

    def __init__(self, handle: IO[str], limit: int = MAX_RECORD_CHARS) -> None:
        """Read ``handle`` (opened with ``newline=""``), holding at most ``limit`` chars."""
        self.limit = limit
        self._lines = _Lines(handle, limit)
        self._reader = csv.reader(self._lines)

    def __iter__(self) -> CsvRecords:
        return self

    def __next__(self) -> tuple[list[str] | None, str | None]:
        self._lines.start_record()
        try:
            return next(self._reader), None
        except csv.Error as exc:  # e.g. a quoted field past the csv module's field limit
            return None, f"CSV error: {exc}"
        except _RecordTooLong:
            return None, f"longer than {self.limit:,} characters"

    @property
    def first_line(self) -> int:
        """Line number of the record's first line."""
        return self._lines.current[0][0]

    @property
    def last_line(self) -> int:
        """Line number of the record's last line."""
        return self._lines.current[-1][0]

    @property
    def spans_lines(self) -> bool:
        """Whether a quoted field carried the record past its first line."""
        return len(self._lines.current) > 1

    @property
    def eof_in_quotes(self) -> bool:
        """Whether the file ended inside a quoted field of the record."""
        return self._lines.eof_in_record

    def text(self, first_only: bool = False) -> str | None:
        """The record's raw text (or its first line's), None if a line was too long to keep."""
        lines = self._lines.current[:1] if first_only else self._lines.current
        if any(text is None for _, text in lines):
            return None
        return "".join(text for _, text in lines if text is not None)

    def reread_after_first(self) -> None:
        """Read the lines after this record's first one again, as records."""
        self._lines.push_back_after_first()


def unclosed_quote_message(last_line: int, why: str, *, at_eof: bool, reread: bool) -> str:
    """The report of a record whose quoted field, opened on its first line, ran too far."""
    runs_to = f"the end of the file, line {last_line}" if at_eof else f"line {last_line}"
    message = f"unclosed quote (the quoted field opened here runs to {runs_to}"
    message += ")" if at_eof else f": {why})"
    if reread:
        message += "; the lines after it are read as rows"
    return message


def strict_quoting_problem(text: str | None) -> str | None:
    """Why the lines of one multi-line record are not strictly quoted CSV, or None.

    The lenient parser takes a stray quote on a later line (``"D`` in ``a,"D``) as the
    end of a quoted field opened lines before, which would swallow the rows between
    them; strict CSV wants a quote that closes a field to be followed by a delimiter or
    the end of the line, which catches that.
    """
    if text is None:
        return None
    try:
        for _ in csv.reader(io.StringIO(text, newline=""), strict=True):
            pass
    except csv.Error as exc:
        return f"malformed quoting: {exc}"
    return None


# Characters that cannot be inside an address; splitting a left-out row's raw text on
# them finds the addresses on it, whether or not the row parses.
_NOT_IN_ADDRESS = re.compile(r"[\s,;\"<>()\[\]:\\]+")


def addresses_in(text: str) -> set[str]:
    """The valid addresses anywhere in ``text`` (a left-out row), normalized."""
    found = set()
    for token in _NOT_IN_ADDRESS.split(text):
        email = normalize_address(token)
        if "@" in email and is_valid_address(email) and _UNSTORABLE.search(email) is None:
            found.add(email)
    return found


class _RowChecker:
    """Reads the CSV, keeps problems (the first ``keep`` of them), yields rows to stage.

    Valid rows are staged with ``left_out`` False. For each row left out, the addresses
    on it are staged with ``left_out`` True, so that ``replace`` does not remove them.
    """

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.keep = keep
        self.problems: list[RowProblem] = []
        self.problem_count = 0
        self.rows_read = 0
        self.merge_fields: list[str] = []
        self.renamed: list[tuple[str, str]] = []
        self.unreadable_lines: list[int] = []
        """Left-out lines too long to keep, whose addresses are therefore unknown."""

    def problem(self, line: int, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.keep:
            self.problems.append(RowProblem(line, message))

    def _left_out(self, line: int, message: str, text: str | None) -> Iterator[StagedRow]:
        self.problem(line, message)
        if text is None:
            self.unreadable_lines.append(line)
            return
        for email in addresses_in(text):
            yield line, email, "", "{}", True

    def _read_header(self, records: CsvRecords) -> list[str]:
        try:
            fields, error = next(records)
        except StopIteration:
            raise ImportFailed(f"{self.path} is empty") from None
        if fields is None:
            raise ImportFailed(f"{self.path}: cannot read the header line ({error})")
        if records.spans_lines or records.eof_in_quotes:
            raise ImportFailed(
                f"{self.path}: the header line opens a quote that it does not close "
                "(column names must be on the first line)"
            )
        header = [column.strip() for column in fields]
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

    def rows(self) -> Iterator[StagedRow]:
        with self.path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            records = CsvRecords(handle)
            header = self._read_header(records)
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
            for row, error in records:
                # A record that spans lines, or meets the end of the file, has a quoted
                # field that ran past its first line: legitimately, or from a quote
                # that was never closed. If the row it makes is bad, it is the latter.
                suspect = records.spans_lines or records.eof_in_quotes
                if row is not None and not suspect:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue  # blank line
                self.rows_read += 1
                first_line = records.first_line
                shape: str | None
                if row is None:
                    shape, email = error or "cannot be read", ""
                elif records.eof_in_quotes:
                    shape, email = "the file ends inside it", ""
                elif len(row) != width:
                    shape, email = f"expected {width} columns, found {len(row)}", ""
                else:
                    email = normalize_address(row[email_at])
                    shape = None if is_valid_address(email) else "no valid email address"
                    if shape is None and records.spans_lines:
                        shape = strict_quoting_problem(records.text())
                if suspect and shape is not None:
                    reread = records.spans_lines
                    message = unclosed_quote_message(
                        records.last_line, shape, at_eof=records.eof_in_quotes, reread=reread
                    )
                    yield from self._left_out(first_line, message, records.text(first_only=True))
                    if reread:
                        records.reread_after_first()
                    continue
                if row is None:
                    yield from self._left_out(
                        first_line, f"cannot be read as CSV ({error})", records.text()
                    )
                    continue
                # one scan of the whole row; the column is looked up only for a bad one
                if _UNSTORABLE.search("".join(row)):
                    message = self._unstorable_column(header, row)
                    yield from self._left_out(first_line, message, records.text())
                    continue
                if shape is not None:
                    if len(row) != width:
                        message = shape
                    elif not email:
                        message = "missing email"
                    else:
                        message = f"invalid email address '{row[email_at].strip()}'"
                    yield from self._left_out(first_line, message, records.text())
                    continue
                name = row[name_at].strip() if name_at is not None else ""
                fields = {key: row[index] for index, key in extra}
                yield first_line, email, name, json.dumps(fields), False
                if records.spans_lines:
                    # A valid row whose quoted value runs over lines may have swallowed
                    # rows: the addresses in it are spared by --replace, never removed
                    # unseen.
                    text = records.text()
                    if text is None:  # too long to keep: --replace cannot know, so refuses
                        self.unreadable_lines.append(first_line)
                        continue
                    for other in addresses_in(text) - {email}:
                        yield first_line, other, "", "{}", True


async def import_audience(
    conn: asyncpg.Connection,
    org: str,
    name: str,
    path: Path,
    *,
    replace: bool = False,
    keep_problems: int = 1000,
) -> ImportReport:
    """Import ``path`` into audience ``name`` of ``org``, creating the audience if new.

    Recipients of the audience that are not in the file are kept and counted
    (``not_in_file``), or removed with ``replace=True``. Removal spares every address
    that appears on a row left out: such a row (a typo in another column, an unclosed
    quote) was most likely meant to keep its recipient, and removing recipients by
    mistake is worse than keeping one until the row is fixed. A left-out line too long
    to read may hold any address, so with ``replace`` it makes the import refused.
    Everything happens in one transaction.

    Raises:
        ImportFailed: when the inputs, the file or the org make the whole import impossible.
    """
    if (problem := org_id_problem(org)) is not None:
        raise ImportFailed(f"org: {org!r} {problem}")
    if (problem := audience_name_problem(name)) is not None:
        raise ImportFailed(f"audience name: {problem}")
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    if not await orgs.exists(conn, org):
        raise ImportFailed(f"unknown org '{org}' (add it with `campaigns org add {org}`)")
    checker = _RowChecker(path, keep_problems)
    async with audiences.staged_import(conn) as staging:
        await staging.copy(checker.rows())
        if replace and checker.unreadable_lines:
            lines = ", ".join(str(line) for line in checker.unreadable_lines[:10])
            raise ImportFailed(
                f"{path}: replace refused, nothing imported: line(s) {lines} could not be read "
                f"(longer than {MAX_RECORD_CHARS:,} characters), so which recipients they "
                "keep is unknown; fix them or import without --replace"
            )
        await staging.analyze()  # plans for the joins below
        duplicates = await staging.duplicates(keep_problems)
        for duplicate in duplicates:
            checker.problem(
                duplicate.line, f"duplicate of line {duplicate.first_line} ({duplicate.email})"
            )
        if duplicates:
            checker.problem_count += duplicates[0].total - len(duplicates)
            await staging.drop_duplicates()
        audience_id = await staging.upsert_audience(org, name, checker.merge_fields)
        counts = await staging.upsert_recipients(audience_id)
        # Recipients not on a valid row of the file: the audience had them before.
        absent = await staging.absent(audience_id)
        removed = 0
        if replace and absent.not_in_file:
            removed = await staging.remove_absent(audience_id)
        merge_fields = await staging.merge_fields(audience_id)
    checker.problems.sort(key=lambda problem: problem.line)
    return ImportReport(
        audience_id=audience_id,
        rows_read=checker.rows_read,
        inserted=counts.inserted,
        updated=counts.updated,
        unchanged=counts.staged - counts.inserted - counts.updated,
        problems=checker.problems[:keep_problems],
        problem_count=checker.problem_count,
        merge_fields=merge_fields,
        renamed_columns=checker.renamed,
        not_in_file=absent.not_in_file,
        on_left_out_rows=absent.on_left_out_rows,
        removed=removed,
        replace=replace,
    )
