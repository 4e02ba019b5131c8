"""The provider account's limits, the orgs' caps and ``campaigns capacity``.

The pure parts (what limits a campaign, how the CLI words it, its argument checks)
run without a server; the commands run for real against PostgreSQL and the test
Temporal server. A test that sets the account's limits works in a database of its
own (``own_db``) and on a task queue of its own: the ``provider_accounts`` row of the
session database and the session worker's send queue are shared by every test.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import sys
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from campaigns.cli import _parser
from campaigns.cli._progress import limits_line, status_line
from campaigns.client import CampaignClient, Capacity, limited_by
from campaigns.contract import send_task_queue
from campaigns.models import CampaignControls, CampaignState, CampaignStatus
from campaigns.settings import Settings
from campaigns.store import accounts, orgs
from campaigns.temporal import describe_queue
from tests.conftest import _with_database
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
    unique,
)
from tests.test_cli import campaigns, cli_env


def one_line(text: str) -> str:
    return " ".join(text.split())


def status(**fields: object) -> CampaignStatus:
    values: dict = {
        "campaign_id": "c",
        "org": "o",
        "state": CampaignState.RUNNING,
        "controls": CampaignControls(window=4),
    }
    values.update(fields)
    return CampaignStatus(**values)


# -- what limits a campaign (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # under an account limit a full window is batches waiting in the account's queue
        ({"in_flight_batches": 4, "rate_per_second": 100.0, "account_rate": 5.0}, "account"),
        ({"in_flight_batches": 5}, "window"),
        # at 90% of its own rate or more
        (
            {"rate_per_second": 90.0, "controls": CampaignControls(window=4, rate_per_second=100)},
            "its rate",
        ),
        (
            {"rate_per_second": 89.0, "controls": CampaignControls(window=4, rate_per_second=100)},
            "nothing",
        ),
        # its own rate is checked before its org-cap share
        (
            {
                "rate_per_second": 50.0,
                "org_rate_cap": 50.0,
                "controls": CampaignControls(window=4, rate_per_second=50),
            },
            "its rate",
        ),
        # the lower of the two holds it
        (
            {
                "rate_per_second": 29.0,
                "org_rate_cap": 30.0,
                "controls": CampaignControls(window=4, rate_per_second=100),
            },
            "org cap",
        ),
        ({"rate_per_second": 26.0, "org_rate_cap": 30.0}, "nothing"),
        # the account's rate when set and nothing above holds
        ({"rate_per_second": 26.0, "org_rate_cap": 30.0, "account_rate": 10.0}, "account"),
        ({"rate_per_second": 0.0, "account_rate": 10.0}, "account"),
        ({"rate_per_second": 500.0}, "nothing"),
        # not sending
        ({"state": CampaignState.PAUSED, "in_flight_batches": 4}, "paused"),
        ({"controls": CampaignControls(window=4, paused=True)}, "paused"),
        ({"state": CampaignState.WAITING_RETRY, "account_rate": 10.0}, "nothing"),
        ({"state": CampaignState.COMPLETED, "in_flight_batches": 4}, "nothing"),
        ({"state": CampaignState.PREPARING, "controls": None}, "nothing"),
        ({"controls": None, "account_rate": 3.0}, "account"),
    ],
)
def test_what_limits_a_campaign(fields: dict, expected: str) -> None:
    assert limited_by(status(**fields)) == expected


def test_the_status_line_shows_priority_limits_and_the_verdict() -> None:
    running = status(
        in_flight_batches=3,
        rate_per_second=29.5,
        org_rate_cap=30.0,
        account_rate=12.5,
        controls=CampaignControls(window=8, rate_per_second=100, priority=2),
    )
    text = status_line(running).plain
    assert "priority 2  window 8  rate limit 100/s" in text
    assert (
        "org-cap share 30 emails/s  account 12.5 requests/s  "
        "limited by: org cap (its share 30 emails/s)" in text
    )
    full = status(in_flight_batches=8, controls=CampaignControls(window=8))
    assert limits_line(full) == (
        "org-cap share none  account none  limited by: window (8 of 8 batches in flight)"
    )
    own = status(rate_per_second=99.0, controls=CampaignControls(window=8, rate_per_second=100))
    assert limits_line(own).endswith("limited by: its rate (100 emails/s)")
    account = status(account_rate=0.333)
    assert limits_line(account).endswith("limited by: account (0.33 requests/s)")
    # a finished campaign keeps its numbers but has no verdict
    done = status(state=CampaignState.COMPLETED, org_rate_cap=30.0)
    assert limits_line(done) == "org-cap share 30 emails/s  account none"


# -- argument checks (no server) --------------------------------------------------------


@pytest.mark.parametrize("flag", ["--requests-per-second", "--emails-per-second"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc", "1e9"])
def test_account_set_refuses_a_limit_out_of_range_naming_the_flag_and_range(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["account", "set", flag, value])
    assert exited.value.code == 2
    err = one_line(capsys.readouterr().err)
    maximum = "100,000" if flag == "--requests-per-second" else "10,000,000"
    assert f"argument {flag}:" in err, err
    assert f"above 0 and at most {maximum}" in err, err
    assert "or none to remove the limit" in err


def test_limits_parse_as_numbers_or_none() -> None:
    args = _parser().parse_args(["account", "set", "--requests-per-second", "50"])
    assert args.requests_per_second.value == 50.0 and args.emails_per_second is None
    args = _parser().parse_args(["account", "set", "--emails-per-second", "None"])
    assert args.emails_per_second.value is None and args.requests_per_second is None
    args = _parser().parse_args(["org", "set", "acme", "--emails-per-second", "12.5"])
    assert args.emails_per_second.value == 12.5 and args.fairness_weight is None


@pytest.mark.parametrize("command", ["add", "set"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "many", "2e7"])
def test_org_cap_is_refused_out_of_range(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["org", command, "acme", "--emails-per-second", value])
    assert exited.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert "argument --emails-per-second:" in err and "at most 10,000,000" in err, err


# -- the account, in a database of its own ----------------------------------------------


@pytest.fixture
async def own_db_url(own_db: asyncpg.Pool, pg_admin_url: str) -> str:
    """``own_db``'s URL, for the CLI's processes."""
    return _with_database(pg_admin_url, await own_db.fetchval("SELECT current_database()"))


@pytest.fixture
def own_env(settings: Settings, tmp_path: Path, own_db_url: str) -> dict[str, str]:
    """The CLI on the test's own database and its own task queue (so its send queue,
    whose rate limit ``account set`` changes, is no other test's)."""
    return {
        **cli_env(settings, tmp_path),
        "DATABASE_URL": own_db_url,
        "CAMPAIGNS_TASK_QUEUE": unique("capacity-test"),
    }


async def test_account_set_and_show_round_trip_and_apply_the_queue_rate_at_once(
    own_env: dict[str, str], own_db: asyncpg.Pool, client: Client
) -> None:
    queue = send_task_queue(own_env["CAMPAIGNS_TASK_QUEUE"])

    shown = await campaigns(own_env, "account", "show")
    assert shown.returncode == 0, shown.stderr
    out = one_line(shown.stdout)
    assert "provider account default" in out
    assert "requests/s limit none" in out and "emails/s limit none" in out
    assert "ceiling none (no limit configured)" in out

    done = await campaigns(own_env, "account", "set", "--requests-per-second", "40")
    assert done.returncode == 0, done.stderr
    out = one_line(done.stdout)
    assert "requests/s limit 40" in out and "emails/s limit none" in out
    assert "ceiling 40 requests/s (configured)" in out
    assert "current rate 40 requests/s (at most 4,000 emails/s, 100 per request)" in out
    # a fifth of a second's worth a dispatch: 8 requests, 5 dispatches/s on the queue
    assert f"task queue {queue}: 5 dispatches/s of at most 8 requests = 40 requests/s" in out
    assert "batch size 8 requests, 8 a dispatch now" in out
    assert (await describe_queue(client, queue)).rate_limit == 5.0
    account = await accounts.get(own_db)
    assert account is not None and account.limits.requests_per_second == 40.0
    assert account.applied_rps == 5.0

    # the option left out keeps its value; the ceiling is the lower of the two
    done = await campaigns(own_env, "account", "set", "--emails-per-second", "1000")
    assert done.returncode == 0, done.stderr
    out = one_line(done.stdout)
    assert "requests/s limit 40" in out and "emails/s limit 1,000" in out
    assert "ceiling 10 requests/s (configured)" in out
    assert f"task queue {queue}: 5 dispatches/s of at most 2 requests = 10 requests/s" in out
    assert (await describe_queue(client, queue)).rate_limit == 5.0
    shown = await campaigns(own_env, "account", "show")
    assert "requests/s limit 40" in one_line(shown.stdout)
    assert "set on the queue 5 dispatches/s = 10 requests/s" in one_line(shown.stdout)

    # none clears one, then the other: no limit on the queue at all
    done = await campaigns(own_env, "account", "set", "--requests-per-second", "none")
    assert done.returncode == 0, done.stderr
    assert "requests/s limit none" in one_line(done.stdout)
    assert (await describe_queue(client, queue)).rate_limit == 5.0  # emails/s still holds
    done = await campaigns(own_env, "account", "set", "--emails-per-second", "none")
    assert done.returncode == 0, done.stderr
    out = one_line(done.stdout)
    assert "emails/s limit none" in out and f"task queue {queue}: no rate limit, set now" in out
    assert (await describe_queue(client, queue)).rate_limit is None
    account = await accounts.get(own_db)
    assert account is not None and not account.limits.limited


async def test_account_set_refusals_write_nothing(
    own_env: dict[str, str], own_db: asyncpg.Pool
) -> None:
    nothing = await campaigns(own_env, "account", "set")
    assert nothing.returncode == 2
    assert "give --requests-per-second or --emails-per-second" in nothing.stderr
    for value in ("0", "-1", "nan", "inf", "abc"):
        refused = await campaigns(own_env, "account", "set", "--requests-per-second", value)
        assert refused.returncode == 2, refused
        err = one_line(refused.stderr)
        assert "argument --requests-per-second:" in err and "at most 100,000" in err, err
    account = await accounts.get(own_db)
    assert account is not None and not account.limits.limited


async def test_account_set_without_temporal_is_written_and_left_to_the_workers(
    own_env: dict[str, str], own_db: asyncpg.Pool
) -> None:
    env = {**own_env, "TEMPORAL_ADDRESS": "127.0.0.1:1"}  # nothing listens there

    done = await campaigns(env, "account", "set", "--requests-per-second", "25")

    assert done.returncode == 0, done.stderr
    out = one_line(done.stdout)
    assert "requests/s limit 25" in out
    assert (
        "not set now (Temporal cannot be reached at 127.0.0.1:1); the workers set "
        "6.25 dispatches/s of at most 4 requests = 25 requests/s on it at their next report" in out
    )
    account = await accounts.get(own_db)
    assert account is not None and account.limits.requests_per_second == 25.0
    assert account.applied_rps is None  # not recorded as set: the workers will


async def test_capacity_shows_the_account_and_its_queue(
    own_env: dict[str, str], client: Client
) -> None:
    done = await campaigns(own_env, "account", "set", "--requests-per-second", "8")
    assert done.returncode == 0, done.stderr

    shot = await campaigns(own_env, "capacity", "--json")

    assert shot.returncode == 0, shot.stderr
    capacity = Capacity.model_validate_json(shot.stdout)
    assert capacity.account is not None
    assert capacity.account.requests_per_second == 8.0 and capacity.account.current_rps == 8.0
    assert capacity.account.ceiling_rps == 8.0 and capacity.account.ceiling_source == "configured"
    assert capacity.account.recent_throttle_ratio == 0.0
    assert capacity.account.requests_per_batch == 1  # under 10 requests/s
    assert capacity.account.requests_per_dispatch == 1
    assert capacity.queue is not None and capacity.queue.rate_limit == 8.0
    assert capacity.queue.task_queue == send_task_queue(own_env["CAMPAIGNS_TASK_QUEUE"])
    table = await campaigns(own_env, "capacity")
    assert table.returncode == 0, table.stderr
    out = one_line(table.stdout)
    assert "requests/s limit 8" in out and "rate limit 8 dispatches/s (set on Temporal)" in out
    assert "recent 429s 0.0%" in out


# -- org caps ---------------------------------------------------------------------------


async def test_org_cap_set_list_and_clear(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    env = cli_env(settings, tmp_path)
    org = unique("capped")

    added = await campaigns(env, "org", "add", org, "--emails-per-second", "120")
    assert added.returncode == 0, added.stderr
    assert f"org {org} ready" in added.stdout and "emails/s cap 120 emails/s" in added.stdout
    assert await orgs.emails_per_second(pool, org) == 120.0
    listed = await campaigns(env, "org", "list")
    assert re.search(rf"│ {re.escape(org)}\s+│.*│ 1\s+│ 120\s+│", listed.stdout)

    changed = await campaigns(env, "org", "set", org, "--emails-per-second", "7.5")
    assert changed.returncode == 0, changed.stderr
    assert f"org {org}: emails/s cap 7.5 emails/s" in changed.stdout
    assert "fairness weight" not in changed.stdout  # left as it was
    both = await campaigns(
        env, "org", "set", org, "--fairness-weight", "2", "--emails-per-second", "9"
    )
    assert both.returncode == 0, both.stderr
    assert await orgs.emails_per_second(pool, org) == 9.0
    assert await orgs.fairness_weight(pool, org) == 2.0
    listed = await campaigns(env, "org", "list")
    assert re.search(rf"│ {re.escape(org)}\s+│.*│ 2\s+│ 9\s+│", listed.stdout)

    cleared = await campaigns(env, "org", "set", org, "--emails-per-second", "none")
    assert cleared.returncode == 0, cleared.stderr
    assert f"org {org}: emails/s cap none" in cleared.stdout
    assert await orgs.emails_per_second(pool, org) is None
    # org add without the option keeps the cap; with none it removes it
    await orgs.set_emails_per_second(pool, org, 5.0)
    assert (await campaigns(env, "org", "add", org)).returncode == 0
    assert await orgs.emails_per_second(pool, org) == 5.0


async def test_org_cap_refusals_write_nothing(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    env = cli_env(settings, tmp_path)
    org = await make_org(pool)
    for value in ("0", "-1", "nan", "inf", "abc"):
        refused = await campaigns(env, "org", "set", org, "--emails-per-second", value)
        assert refused.returncode == 2, refused
        err = one_line(refused.stderr)
        assert "argument --emails-per-second:" in err and "at most 10,000,000" in err, err
    new = unique("refused")
    refused = await campaigns(env, "org", "add", new, "--emails-per-second", "0")
    assert refused.returncode == 2
    assert await pool.fetchval("SELECT count(*) FROM orgs WHERE id = $1", new) == 0
    nothing = await campaigns(env, "org", "set", org)
    assert nothing.returncode == 2
    assert "give --fairness-weight or --emails-per-second" in nothing.stderr
    missing = await campaigns(env, "org", "set", unique("ghost"), "--emails-per-second", "5")
    assert missing.returncode == 2 and "unknown org" in missing.stderr
    assert await orgs.emails_per_second(pool, org) is None


# -- a running campaign -----------------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_capacity_and_status_show_a_running_campaign_held_by_its_org_cap(
    settings: Settings, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    env = cli_env(settings, tmp_path)
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("capy", 450))
    capped = await campaigns(env, "org", "set", org, "--emails-per-second", "30")
    assert capped.returncode == 0, capped.stderr
    spec = make_spec(org, audience, priority=2, window=4, recipients_per_activity=25, batch_size=25)
    campaign_client = CampaignClient(client, settings)
    await campaign_client.start(spec)
    try:

        async def mine() -> Capacity:
            return await campaign_client.capacity(pool)

        def held_by_cap(capacity: Capacity) -> bool:
            return any(
                c.workflow_id == spec.campaign_id and c.limited_by == "org cap"
                for c in capacity.campaigns
            )

        await eventually(mine, held_by_cap, within=30, every=0.3, what="the org cap to hold")

        shot = await campaigns(env, "capacity", "--json")
        assert shot.returncode == 0, shot.stderr
        capacity = Capacity.model_validate_json(shot.stdout)
        [row] = [c for c in capacity.campaigns if c.workflow_id == spec.campaign_id]
        assert (row.org, row.priority, row.org_rate_cap, row.window) == (org, 2, 30.0, 4)
        assert row.account_rate is None and row.rate_limit is None
        assert row.emails_per_second > 0 and 0 < row.share <= 1
        if capacity.emails_per_second:
            assert math.isclose(sum(c.share for c in capacity.campaigns), 1.0)
        [org_row] = [o for o in capacity.orgs if o.org == org]
        assert (org_row.campaigns, org_row.cap, org_row.fairness_weight) == (1, 30.0, 1.0)
        assert math.isclose(org_row.emails_per_second, row.emails_per_second)
        assert capacity.queue is not None
        assert capacity.queue.task_queue == send_task_queue(settings.task_queue)
        assert json.loads(shot.stdout)["campaigns"]  # plain JSON for other tools

        table = await campaigns(env, "capacity")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        [campaign_line] = [line for line in lines if spec.campaign_id in line]
        assert re.search(rf"│ {re.escape(org)}\s+│ 2\s+│", campaign_line), campaign_line
        [org_line] = [
            line for line in lines if line.startswith(f"│ {org}") and "30 emails/s" in line
        ]
        assert "│ 1 " in org_line
        assert "running campaign" in table.stdout and "task queue" in table.stdout
        # the verdict may have moved on between the two reads; it is one of the known ones
        assert re.search(r"org cap \(its share 30 emails/s\)|window \(|nothing", campaign_line)
    finally:
        await campaign_client.cancel(spec.campaign_id)

    shown = await campaigns(env, "status", spec.campaign_id)
    out = one_line(shown.stdout)
    assert "priority 2 window 4 rate limit none" in out, shown.stdout
    assert "org-cap share 30 emails/s account none" in out, shown.stdout


async def test_capacity_watch_refreshes_until_interrupted(
    settings: Settings, tmp_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaigns.cli", "capacity", "--watch",
        env=cli_env(settings, tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    snapshots = 0
    seen = ""
    async with asyncio.timeout(60):
        while snapshots < 2:  # on a pipe, each refresh is printed after the last
            line = (await process.stdout.readline()).decode()
            assert line, f"the command ended early: {seen}"
            seen += line
            snapshots += "running campaign" in line
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert seen.count("provider account default") == 2
