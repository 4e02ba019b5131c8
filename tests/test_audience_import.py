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


async def run_import(pool: asyncpg.Pool, path: Path, org: str, name: str):
    async with pool.acquire() as conn:
        return await import_audience(conn, org, name, path)


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
