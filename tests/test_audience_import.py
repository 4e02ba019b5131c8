"""CSV import: bad rows reported by line, good rows kept, re-import idempotent."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from campaigns.audience_import import ImportFailed, import_audience
from campaigns.spec_check import check_against_database, parse_spec
from campaigns.templates import compile_template
from tests.helpers import make_org, make_spec, unique

CSV = """email,name,city,plan
ada@example.com,Ada,Lisbon,team
bad-address,Bob,Oslo,free
grace@example.com,Grace,Lima
ADA@example.com,Ada again,Quito,free
,Nobody,Lima,free
"multi, line"@example.com,Quoted,Osaka,free
alan@example.com,"Alan
Turing",Tartu,business

edsger@example.com,Edsger,Dakar,team
"""


async def run_import(pool: asyncpg.Pool, path: Path, org: str, name: str, **options: bool):
    async with pool.acquire() as conn:
        return await import_audience(conn, org, name, path, **options)


async def test_bad_rows_are_reported_by_line_and_good_rows_kept(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "people.csv"
    path.write_text(CSV)

    report = await run_import(pool, path, org, "people")

    problems = {problem.line: problem.message for problem in report.problems}
    assert problems == {
        3: "invalid email address 'bad-address'",
        4: "expected 4 columns, found 3",
        5: "duplicate of line 2 (ada@example.com)",
        6: "missing email",
        7: "invalid email address 'multi, line@example.com'",
    }
    assert report.problem_count == 5
    assert report.inserted == 3 and report.rows_read == 8
    rows = await pool.fetch(
        "SELECT email, name, merge_fields FROM recipients WHERE audience_id = $1 ORDER BY id",
        report.audience_id,
    )
    assert [row["email"] for row in rows] == [
        "ada@example.com",
        "alan@example.com",
        "edsger@example.com",
    ]
    assert rows[1]["name"] == "Alan\nTuring"  # a quoted field may span lines
    assert rows[0]["merge_fields"] == {"city": "Lisbon", "plan": "team"}
    assert report.merge_fields == ["city", "plan"]


async def test_reimport_is_idempotent_and_updates_changed_rows(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "people.csv"
    path.write_text(CSV)
    first = await run_import(pool, path, org, "people")
    ids = await pool.fetch(
        "SELECT id, email FROM recipients WHERE audience_id = $1 ORDER BY id", first.audience_id
    )

    again = await run_import(pool, path, org, "people")

    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 3)
    assert again.audience_id == first.audience_id
    assert ids == await pool.fetch(
        "SELECT id, email FROM recipients WHERE audience_id = $1 ORDER BY id", first.audience_id
    )

    path.write_text(
        "email,name,city,plan\nada@example.com,Ada L.,Lisbon,team\nnew@example.com,New,Lima,free\n"
    )
    changed = await run_import(pool, path, org, "people")
    assert (changed.inserted, changed.updated, changed.unchanged) == (1, 1, 0)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM recipients WHERE audience_id = $1", first.audience_id
        )
        == 4
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,city\nAda,Lisbon\n", "missing column email"),
        ("", "is empty"),
        ("email,name,Email\n", "column email appears twice"),
        (
            "email,first name,first-name\n",
            "columns 'first name' and 'first-name' would both be merge field first_name",
        ),
        ("email,Zip Code,zip_code\n", "which differ only in case"),
        ("e\x00m\x00a\x00i\x00l\x00\n", "the header line contains a NUL character"),
    ],
)
async def test_unusable_files_are_refused_with_the_reason(
    pool: asyncpg.Pool, tmp_path: Path, content: str, message: str
) -> None:
    org = await make_org(pool)
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ImportFailed, match=message):
        await run_import(pool, path, org, unique("aud"))
    assert await pool.fetchval("SELECT count(*) FROM audiences WHERE org_id = $1", org) == 0


async def test_unknown_org_is_refused(pool: asyncpg.Pool, tmp_path: Path) -> None:
    path = tmp_path / "ok.csv"
    path.write_text("email\nada@example.com\n")
    with pytest.raises(ImportFailed, match="unknown org 'ghost'"):
        await run_import(pool, path, "ghost", "people")


async def test_headers_become_field_names_that_templates_can_use(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "people.csv"
    path.write_text(
        "email,Name,first name,zip-code,1st visit,plan\n"
        "ada@example.com,Ada L,Ada,1100-001,2024,team\n"
    )

    report = await run_import(pool, path, org, "people")

    assert set(report.merge_fields) == {"first_name", "zip_code", "_1st_visit", "plan"}
    assert report.renamed_columns == [
        ("first name", "first_name"),
        ("zip-code", "zip_code"),
        ("1st visit", "_1st_visit"),
    ]
    row = await pool.fetchrow(
        "SELECT email, name, merge_fields FROM recipients WHERE audience_id = $1",
        report.audience_id,
    )
    assert row["merge_fields"] == {
        "first_name": "Ada",
        "zip_code": "1100-001",
        "_1st_visit": "2024",
        "plan": "team",
    }
    # the values a send renders with: merge fields plus the built-in email and name
    values = {**row["merge_fields"], "email": row["email"], "name": row["name"]}
    template = compile_template("<p>{{ first_name }} ({{name}}), {{zip_code}}</p>", html_body=True)
    assert template.render(values) == "<p>Ada (Ada L), 1100-001</p>"

    spec = parse_spec(
        make_spec(
            org, "people", html="{{ first_name }} {{zip_code}}", text="{{ _1st_visit }}"
        ).model_dump_json()
    )
    plan = await check_against_database(pool, spec)
    assert plan.total_recipients == 1


async def test_undecodable_and_nul_rows_are_reported_and_the_rest_kept(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "mixed.csv"
    path.write_bytes(
        b"email,name,city\n"
        b"ada@example.com,Ada,Lisbon\n"
        b"jose@example.com,Jos\xe9,Porto\n"  # Latin-1, not UTF-8
        b"nul@example.com,N\x00ul,Oslo\n"
        b'grace@example.com,"Grace\nHopper",Lima\n'
        b"bad\xff@example.com,Bad,Quito\n"
        b"alan@example.com,Alan,Tartu\n"
    )

    report = await run_import(pool, path, org, "mixed")

    problems = {problem.line: problem.message for problem in report.problems}
    assert problems == {
        3: "column 'name' is not valid UTF-8 (byte 0xE9); save the file as UTF-8",
        4: "column 'name' contains a NUL character",
        7: "column 'email' is not valid UTF-8 (byte 0xFF); save the file as UTF-8",
    }
    assert (report.rows_read, report.inserted, report.problem_count) == (6, 3, 3)
    emails = await pool.fetch(
        "SELECT email FROM recipients WHERE audience_id = $1 ORDER BY id", report.audience_id
    )
    assert [row["email"] for row in emails] == [
        "ada@example.com",
        "grace@example.com",
        "alan@example.com",
    ]


def assert_counts_add_up(report) -> None:  # noqa: ANN001
    """Every row read is new, updated, unchanged or left out (duplicates included)."""
    assert report.rows_read == (
        report.inserted + report.updated + report.unchanged + report.problem_count
    ), report


async def emails_of(pool: asyncpg.Pool, audience_id: int) -> list[str]:
    rows = await pool.fetch(
        "SELECT email FROM recipients WHERE audience_id = $1 ORDER BY email", audience_id
    )
    return [row["email"] for row in rows]


UNCLOSED = (
    "email,name\n"
    "ok1@example.com,One\n"
    'bob@example.com,"Bob\n'  # opens a quote that never closes
    "ok2@example.com,Two\n"
    "ok3@example.com,Three\n"
    "ok4@example.com,Four\n"
)


async def test_an_unclosed_quote_is_reported_where_it_opens_and_the_rows_after_it_kept(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "unclosed.csv"
    path.write_text(UNCLOSED)

    report = await run_import(pool, path, org, "people")

    assert [str(problem) for problem in report.problems] == [
        "line 3: unclosed quote (the quoted field opened here runs to the end of the file, "
        "line 6); the lines after it are read as rows"
    ]
    assert (report.rows_read, report.inserted, report.problem_count) == (5, 4, 1)
    assert_counts_add_up(report)
    assert await emails_of(pool, report.audience_id) == [
        "ok1@example.com",
        "ok2@example.com",
        "ok3@example.com",
        "ok4@example.com",
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (  # a stray quote lines later "closes" it: strict quoting catches it
            'email,name\nok1@example.com,A\nbob@example.com,"Bob\nok2@example.com,B\n'
            'ok3@example.com,"C\nok4@example.com,D\n',
            "line 3: unclosed quote (the quoted field opened here runs to line 5: malformed "
            "quoting: ',' expected after '\"'); the lines after it are read as rows",
        ),
        (  # a quote lines later closes it, but the row it makes has too many columns
            'email,name\nok1@example.com,A\nbob@example.com,"Bob\nok2@example.com,B\n'
            'ok3@example.com,"C",x\nok4@example.com,D\n',
            "line 3: unclosed quote (the quoted field opened here runs to line 5: expected 2 "
            "columns, found 3); the lines after it are read as rows",
        ),
    ],
)
async def test_a_quote_closed_by_a_stray_quote_lines_later_swallows_nothing(
    pool: asyncpg.Pool, tmp_path: Path, content: str, problem: str
) -> None:
    org = await make_org(pool)
    path = tmp_path / "stray.csv"
    path.write_text(content)

    report = await run_import(pool, path, org, unique("aud"))

    messages = [str(p) for p in report.problems]
    assert messages[0] == problem
    assert "ok2@example.com" in await emails_of(pool, report.audience_id)
    assert "ok4@example.com" in await emails_of(pool, report.audience_id)
    assert_counts_add_up(report)


async def test_an_unclosed_quote_in_a_large_file_costs_one_row(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Past the csv module's 128 KiB field limit the rows after the quote are still read."""
    org = await make_org(pool)
    path = tmp_path / "large.csv"
    rows = [f"reader{n:05d}@example.com,Reader {n}" for n in range(1, 5001)]
    rows[9] = 'bob@example.com,"Bob'
    path.write_text("email,name\n" + "\n".join(rows) + "\n")

    report = await run_import(pool, path, org, "large")

    assert len(report.problems) == 1 and report.problems[0].line == 11
    assert report.problems[0].message.startswith("unclosed quote (the quoted field opened here")
    assert "field larger than field limit" in report.problems[0].message
    assert (report.rows_read, report.inserted, report.problem_count) == (5000, 4999, 1)
    assert_counts_add_up(report)


async def test_a_valid_multi_line_quoted_value_is_kept(pool: asyncpg.Pool, tmp_path: Path) -> None:
    org = await make_org(pool)
    path = tmp_path / "multi.csv"
    path.write_text(
        'email,name,note\nada@example.com,"Ada\nLovelace","line one\r\nline ""two"""\n'
        "alan@example.com,Alan,plain\n"
    )

    report = await run_import(pool, path, org, "multi")

    assert report.problems == [] and report.inserted == 2
    row = await pool.fetchrow(
        "SELECT name, merge_fields FROM recipients WHERE audience_id = $1 AND email = $2",
        report.audience_id,
        "ada@example.com",
    )
    assert row["name"] == "Ada\nLovelace"
    assert row["merge_fields"] == {"note": 'line one\r\nline "two"'}


@pytest.mark.parametrize(
    "content",
    [
        CSV,
        UNCLOSED,
        UNCLOSED + "ok1@example.com,Dup\nnope,Bad\n\nok5@example.com,Five,extra\n",
        'email\n"a@example.com\n',
    ],
)
async def test_counts_add_up_with_duplicates_bad_rows_and_unclosed_quotes(
    pool: asyncpg.Pool, tmp_path: Path, content: str
) -> None:
    org = await make_org(pool)
    path = tmp_path / "counts.csv"
    path.write_text(content)
    name = unique("aud")

    first = await run_import(pool, path, org, name)
    again = await run_import(pool, path, org, name)

    assert_counts_add_up(first)
    assert_counts_add_up(again)
    assert again.inserted == again.updated == 0 and again.unchanged == first.inserted


async def test_reimport_keeps_recipients_no_longer_in_the_file_and_says_so(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "people.csv"
    path.write_text("email,name\na@example.com,A\nb@example.com,B\nc@example.com,C\n")
    first = await run_import(pool, path, org, "people")
    path.write_text("email,name\na@example.com,A\n")

    again = await run_import(pool, path, org, "people")

    assert (again.not_in_file, again.removed, again.replace) == (2, 0, False)
    assert_counts_add_up(again)
    assert await emails_of(pool, first.audience_id) == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
    ]


async def test_replace_removes_recipients_no_longer_in_the_file_but_not_left_out_ones(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "people.csv"
    path.write_text(
        "email,name,city\na@example.com,A,x\nb@example.com,B,x\nc@example.com,C,x\n"
        "d@example.com,D,x\ne@example.com,E,x\n"
    )
    first = await run_import(pool, path, org, "people")
    path.write_text(
        "email,name,city\n"
        "a@example.com,A,x\n"
        "c@example.com,C\n"  # left out (a column short): c is kept
        'd@example.com,"D,x\n'  # an unclosed quote, left out: d is kept
        "f@example.com,F,x\n"
    )

    report = await run_import(pool, path, org, "people", replace=True)

    assert (report.not_in_file, report.on_left_out_rows, report.removed) == (2, 2, 2)
    assert (report.rows_read, report.inserted, report.unchanged, report.problem_count) == (
        4,
        1,
        1,
        2,
    )
    assert_counts_add_up(report)
    assert await emails_of(pool, first.audience_id) == [
        "a@example.com",
        "c@example.com",
        "d@example.com",
        "f@example.com",
    ]


async def test_replace_is_refused_when_a_left_out_line_cannot_be_read(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "people.csv"
    path.write_text("email,name\na@example.com,A\nb@example.com,B\n")
    first = await run_import(pool, path, org, "people")
    path.write_text("email,name\nnew@example.com,N\nb@example.com," + "x" * 1_100_000 + "\n")

    with pytest.raises(ImportFailed, match="replace refused, nothing imported: line.s. 3"):
        await run_import(pool, path, org, "people", replace=True)

    assert await emails_of(pool, first.audience_id) == ["a@example.com", "b@example.com"]
    kept = await run_import(pool, path, org, "people")  # without replace it imports
    assert kept.inserted == 1 and kept.problems[0].line == 3
    assert "longer than 1,048,576 characters" in kept.problems[0].message


@pytest.mark.parametrize(
    ("org", "name", "message"),
    [
        ("[/]", "people", r"org: '\[/\]' is not a valid org id \(letters, digits"),
        ("a" * 65, "people", "is not a valid org id"),
        (None, "x" * 201, "audience name: is 201 characters long; at most 200"),
        (None, "two\nlines", "audience name: must not contain control characters"),
        (None, "esc\x1b[31m", "audience name: must not contain control characters"),
        (None, "  ", "audience name: must not be blank"),
    ],
)
async def test_import_refuses_bad_org_ids_and_audience_names(
    pool: asyncpg.Pool, tmp_path: Path, org: str | None, name: str, message: str
) -> None:
    real_org = await make_org(pool)
    path = tmp_path / "ok.csv"
    path.write_text("email\nada@example.com\n")
    with pytest.raises(ImportFailed, match=message):
        await run_import(pool, path, org or real_org, name)
    assert await pool.fetchval("SELECT count(*) FROM audiences WHERE org_id = $1", real_org) == 0


async def test_replace_spares_addresses_inside_a_multi_line_value(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    path = tmp_path / "people.csv"
    path.write_text("email,name\na@example.com,A\nb@example.com,B\nc@example.com,C\n")
    first = await run_import(pool, path, org, "people")
    # A quote that closes lines later makes one valid row that holds b and c.
    path.write_text('email,name\na@example.com,"Ada\nb@example.com,Bob\nc@example.com,Cy"\n')

    report = await run_import(pool, path, org, "people", replace=True)

    assert report.removed == 0
    assert await emails_of(pool, first.audience_id) == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
    ]
