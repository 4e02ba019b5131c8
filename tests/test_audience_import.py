"""CSV import: bad rows reported by line, good rows kept, re-import idempotent."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from campaigns.audience_import import ImportFailed, import_audience
from tests.helpers import make_org, unique

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
