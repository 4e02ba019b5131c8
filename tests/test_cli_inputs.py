"""Our CLI refuses hostile input at the edge and prints stored values literally.

Each test runs the real `campaigns` command against the real PostgreSQL (and, where
a campaign is involved, the test Temporal server and worker).
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from campaigns.settings import Settings
from tests.helpers import SimulatorControl, addresses, make_audience, make_org, make_spec, unique
from tests.test_cli import campaigns, cli_env


def one_line(text: str) -> str:
    return " ".join(text.split())


async def test_org_add_refuses_an_id_with_markup_and_commits_nothing(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    env = cli_env(settings, tmp_path)
    for org_id in ("[/]", "a b", "a" * 65, ""):
        result = await campaigns(env, "org", "add", org_id)
        assert result.returncode == 2, result
        assert "argument ORG:" in result.stderr and "is not a valid org id" in result.stderr
        assert "letters, digits, '.', '_' or '-'; 1 to 64 characters" in one_line(result.stderr)
        assert await pool.fetchval("SELECT count(*) FROM orgs WHERE id = $1", org_id) == 0


async def test_orgs_with_markup_in_their_id_or_name_list_literally(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    env = cli_env(settings, tmp_path)
    org = unique("markup")
    old_id = f"[/]{org}"  # as an older version or plain SQL could have stored it
    await pool.execute("INSERT INTO orgs (id, name) VALUES ($1, $2)", old_id, "[link=x]old[/]")
    try:
        added = await campaigns(env, "org", "add", org, "--name", "[bold]x[/]")
        assert added.returncode == 0, added.stderr
        assert f"org {org} ready" in added.stdout

        listed = await campaigns(env, "org", "list")

        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"│ {re.escape(org)}\s+│ \[bold\]x\[/\]\s+│", listed.stdout)
        assert re.search(rf"│ {re.escape(old_id)}\s+│ \[link=x\]old\[/\]\s+│", listed.stdout)
        audiences = await campaigns(env, "audience", "list")
        assert audiences.returncode == 0, audiences.stderr
        flagged = await campaigns(env, "org", "flag", org, "first_party", "off")
        assert flagged.returncode == 0 and f"org {org}: first_party off" in flagged.stdout
    finally:
        await pool.execute("DELETE FROM orgs WHERE id = $1", old_id)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--verified-domain", "not a domain"], "argument --verified-domain: 'not a domain' is "),
        (["--verified-domain", "localhost"], "is not a domain name"),
        (["--name", "x" * 201], "argument --name: is 201 characters long; at most 200"),
        (["--name", "Acme\nBcc: x"], "argument --name: must not contain control characters"),
        (["--name", "Acme\x1b[31m"], "(found U+001B at position 4)"),
        (["--name", " "], "argument --name: must not be blank"),
    ],
)
async def test_org_add_refuses_bad_domains_and_names(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path, args: list[str], expected: str
) -> None:
    org = unique("badin")
    result = await campaigns(cli_env(settings, tmp_path), "org", "add", org, *args)
    assert result.returncode == 2, result
    assert expected in one_line(result.stderr), result.stderr
    assert await pool.fetchval("SELECT count(*) FROM orgs WHERE id = $1", org) == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--name", "a" * 201], "argument --name: is 201 characters long; at most 200"),
        (["--name", "two\nlines"], "argument --name: must not contain control characters"),
        (["--name", "tab\there"], "(found TAB at position 3)"),
        (["--org", "[bold]"], "argument --org: '[bold]' is not a valid org id"),
    ],
)
async def test_audience_import_refuses_bad_names_and_orgs(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path, args: list[str], expected: str
) -> None:
    org = await make_org(pool)
    path = tmp_path / "list.csv"
    path.write_text("email\nada@example.com\n")
    options = {"--org": org, "--name": "people", **dict(zip(args[::2], args[1::2], strict=True))}
    argv = [item for pair in options.items() for item in pair]

    result = await campaigns(cli_env(settings, tmp_path), "audience", "import", *argv, str(path))

    assert result.returncode == 2, result
    assert expected in one_line(result.stderr), result.stderr
    assert await pool.fetchval("SELECT count(*) FROM audiences WHERE org_id = $1", org) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["org", "flag", "[/]", "first_party", "on"],
        ["org", "flag", "acme", "First-Party", "on"],
        ["audience", "list", "--org", "a/b"],
        ["suppress", "--org", "a'b", "x@example.com"],
        ["list", "--org", "x' OR 'a'='a"],
    ],
)
async def test_every_org_argument_and_flag_name_is_checked(
    settings: Settings, tmp_path: Path, argv: list[str]
) -> None:
    result = await campaigns(cli_env(settings, tmp_path), *argv)
    assert result.returncode == 2, result
    assert re.search(
        r"argument (ORG|FLAG|--org): .* is not a (valid org id|flag name)", result.stderr
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rate", "nan"], "argument --rate: 'nan' is not a rate"),
        (["--rate", "inf"], "argument --rate: 'inf' is not a rate"),
        (["--rate", "-1"], "argument --rate: '-1' is not a rate"),
        (["--rate", "0"], "argument --rate: '0' is not a rate"),
        (["--window", "0"], "argument --window: '0' is not a whole number between 1 and 500"),
        (["--window", "501"], "argument --window: '501' is not a whole number between 1 and 500"),
    ],
)
async def test_throttle_refuses_rates_and_windows_out_of_range_before_sending(
    settings: Settings, tmp_path: Path, args: list[str], expected: str
) -> None:
    result = await campaigns(cli_env(settings, tmp_path), "throttle", "no-such-campaign", *args)
    assert result.returncode == 2, result
    assert expected in one_line(result.stderr), result.stderr
    if "--rate" in args:
        assert "a finite number greater than 0" in one_line(result.stderr)
    assert "no campaign workflow" not in result.stderr  # refused before asking Temporal


async def test_error_messages_quoting_user_values_print_literally(
    settings: Settings, tmp_path: Path, pool: asyncpg.Pool
) -> None:
    env = cli_env(settings, tmp_path)
    missing = await campaigns(env, "resume", "[/]x[bold]")
    assert missing.returncode == 2, missing
    assert "no campaign workflow with id '[/]x[bold]'" in missing.stderr
    assert "Traceback" not in missing.stderr

    bad_time = await campaigns(env, "reschedule", "x", "--at", "[/]")
    assert bad_time.returncode == 2 and "--at: '[/]' is not an ISO 8601" in bad_time.stderr

    org = await make_org(pool)
    suppress = await campaigns(env, "suppress", "--org", org, "[/]@x")
    assert suppress.returncode == 2 and "invalid email address: '[/]@x'" in suppress.stderr

    path = tmp_path / "[red]list[b].csv"
    path.write_text("email,[b]city[/b]\n[/]bad,x\n")
    imported = await campaigns(env, "audience", "import", "--org", org, "--name", "l", str(path))
    assert imported.returncode == 0, imported
    out = one_line(imported.stdout)
    assert "line 2: invalid email address '[/]bad'" in out
    assert "'[b]city[/b]' -> _b_city__b_" in out


async def test_cli_import_reports_an_unclosed_quote_and_recipients_not_in_the_file(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    org = await make_org(pool)
    env = cli_env(settings, tmp_path)
    path = tmp_path / "list.csv"
    path.write_text("email\na@example.com\nb@example.com\nc@example.com\n")
    argv = ["audience", "import", "--org", org, "--name", "list", str(path)]
    assert (await campaigns(env, *argv)).returncode == 0
    path.write_text('email,name\na@example.com,A\nd@example.com,"D\ne@example.com,E\n')

    kept = await campaigns(env, *argv)

    assert kept.returncode == 0, kept
    out = one_line(kept.stdout)
    assert "read 3 rows: 1 new, 1 updated, 0 unchanged, 1 left out" in out
    assert "line 3: unclosed quote (the quoted field opened here runs to the end of the file" in out
    assert (
        "2 recipients of the audience are no longer in the file: kept "
        "(import again with --replace to remove them)" in out
    )

    replaced = await campaigns(env, *argv[:-1], "--replace", str(path))

    assert replaced.returncode == 0, replaced
    out = one_line(replaced.stdout)
    assert "2 recipients of the audience are no longer in the file: removed (2, --replace)" in out
    emails = await pool.fetch(
        """SELECT r.email FROM recipients r JOIN audiences a ON a.id = r.audience_id
           WHERE a.org_id = $1 ORDER BY r.email""",
        org,
    )
    assert [row["email"] for row in emails] == ["a@example.com", "e@example.com"]
    helped = await campaigns(env, "audience", "import", "--help")
    assert "--replace" in helped.stdout and "are kept" in one_line(helped.stdout)


@pytest.mark.usefixtures("worker")
async def test_list_prints_long_ids_whole_on_a_narrow_pipe(
    settings: Settings, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("clilong", 3))
    spec = make_spec(org, audience, campaign_id=unique("a-rather-long-campaign-identifier"))
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    env = {**cli_env(settings, tmp_path), "COLUMNS": "60"}
    assert (await campaigns(env, "start", str(path))).returncode == 0
    await client.get_workflow_handle(spec.campaign_id).result()

    listed = await campaigns(env, "list", "--org", org)

    assert listed.returncode == 0, listed
    assert "…" not in listed.stdout
    first_column = "".join(
        line.split("│")[1].strip() for line in listed.stdout.splitlines() if line.startswith("│")
    )
    assert spec.campaign_id in first_column
    assert "--json" in (await campaigns(env, "list", "--help")).stdout


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["stack", "up", "--workers", "0"], "between 1 and 32"),
        (["stack", "up", "--ui-port", "70000"], "between 1 and 65,535"),
        (["demo", "--recipients", "-5"], "between 1 and"),
        (["list", "--state", "running"], "invalid choice"),
        (["throttle", "x", "--rate", "1e7"], "at most 1,000,000"),
    ],
)
def test_stack_demo_list_and_rate_arguments_are_bounded(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from campaigns.cli import _parser

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err
