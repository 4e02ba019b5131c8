"""Campaign priorities and per-org fairness on Temporal's task queue, on real dev servers.

The spec's ``priority`` and the ``set_priority`` update refuse values outside 1-5
naming the range; a live change shows in the status and in the ``Priority`` of the
activities scheduled after it. Ordering is measured on a dev server of the module's
own with one partition a queue, as the stack's (fairness is exact only then), and a worker
that runs one activity at a time: a small org's campaign started behind a big org's
backlog is interleaved with it, and a priority-1 campaign goes before a priority-3
backlog.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from campaigns import search_attributes as sa
from campaigns.binaries import temporal_cli
from campaigns.cli import _parser
from campaigns.client import CampaignClient, ControlRefused
from campaigns.models import (
    CampaignSpec,
    CampaignState,
    CampaignStatus,
    fairness_weight_problem,
)
from campaigns.provider import ProviderClient
from campaigns.settings import Settings
from campaigns.spec_check import InvalidSpec, parse_spec
from campaigns.store import orgs
from tests.conftest import TEST_API_KEY
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
)
from tests.test_cli import campaigns as campaigns_cli
from tests.test_cli import cli_env, run
from workflows import CampaignWorkflow
from workflows._priority import task_priority

# -- validation, no server ------------------------------------------------------------


def _spec_json(**fields: object) -> dict[str, object]:
    return {
        "campaign_id": "prio-check",
        "org": "acme",
        "audience": "all",
        "from_address": "news@example.com",
        "subject": "Hi",
        "text": "Hello",
        **fields,
    }


def test_priority_defaults_to_three_and_takes_one_to_five() -> None:
    assert parse_spec(_spec_json()).priority == 3
    assert [parse_spec(_spec_json(priority=n)).priority for n in range(1, 6)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("value", [0, 6, -1, 100, "2", 2.0, True, None, [1]])
def test_a_priority_outside_one_to_five_is_refused_naming_the_range(value: object) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec(_spec_json(priority=value))
    (problem,) = refused.value.problems
    assert problem.field == "priority"
    assert "between 1 (highest) and 5 (lowest)" in problem.message


@pytest.mark.parametrize("value", [0.001, 1, 2.5, 1000])
def test_fairness_weights_in_temporals_range_are_accepted(value: float) -> None:
    assert fairness_weight_problem(value) is None


@pytest.mark.parametrize("value", [0, 0.0009, -1, 1000.5, float("nan"), float("inf"), True, "2"])
def test_fairness_weights_outside_temporals_range_are_refused_naming_it(value: object) -> None:
    problem = fairness_weight_problem(value)
    assert problem is not None and "between 0.001 and 1000" in problem


def test_the_task_priority_carries_the_org_and_its_weight() -> None:
    priority = task_priority(1, "acme", 2.5)
    assert (priority.priority_key, priority.fairness_key, priority.fairness_weight) == (
        1,
        "acme",
        2.5,
    )
    assert task_priority(3, "acme", None).fairness_weight is None  # Temporal's default


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["priority", "camp-1", "0"], "between 1 (highest) and 5 (lowest)"),
        (["priority", "camp-1", "two"], "between 1 (highest) and 5 (lowest)"),
        (["org", "set", "acme", "--fairness-weight", "0"], "between 0.001 and 1000"),
        (["org", "add", "acme", "--fairness-weight", "nan"], "between 0.001 and 1000"),
        (["org", "add", "acme", "--fairness-weight", "5000"], "between 0.001 and 1000"),
    ],
)
def test_the_cli_refuses_out_of_range_values_before_any_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_cli_parses_a_priority_and_a_weight() -> None:
    args: argparse.Namespace = _parser().parse_args(["priority", "camp-1", "2"])
    assert args.priority == 2
    args = _parser().parse_args(["org", "set", "acme", "--fairness-weight", "2.5"])
    assert args.fairness_weight == 2.5


# -- the org's weight in PostgreSQL -----------------------------------------------------


async def test_an_orgs_fairness_weight_is_stored_and_checked_by_the_schema(
    pool: asyncpg.Pool,
) -> None:
    org = await make_org(pool)
    assert await orgs.fairness_weight(pool, org) == 1.0
    assert await orgs.set_fairness_weight(pool, org, 2.5)
    assert await orgs.fairness_weight(pool, org) == 2.5
    await orgs.upsert(pool, org, name=None, verified_domain=None)  # keeps the weight
    assert await orgs.fairness_weight(pool, org) == 2.5
    assert not await orgs.set_fairness_weight(pool, "no-such-org-" + uuid.uuid4().hex[:6], 2)
    with pytest.raises(asyncpg.CheckViolationError):
        await orgs.set_fairness_weight(pool, org, 0.0)
    with pytest.raises(asyncpg.CheckViolationError):
        await orgs.upsert(pool, org, name=None, verified_domain=None, fairness_weight=1001)
    listed = {row.id: row.fairness_weight for row in await orgs.list_all(pool)}
    assert listed[org] == 2.5


# -- a live change, on the session's server and worker ------------------------------------


def _scheduled(event: object) -> bool:
    return getattr(event, "event_type", None) == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED


async def scheduled_priorities(handle: WorkflowHandle) -> list[tuple[str, int, str, float]]:
    """(activity type, priority key, fairness key, weight) of each activity scheduled."""
    found = []
    async for event in handle.fetch_history_events():
        if _scheduled(event):
            attrs = event.activity_task_scheduled_event_attributes
            found.append(
                (
                    attrs.activity_type.name,
                    attrs.priority.priority_key,
                    attrs.priority.fairness_key,
                    round(attrs.priority.fairness_weight, 3),
                )
            )
    return found


@pytest.mark.usefixtures("worker")
async def test_a_priority_change_live_shows_in_status_and_in_the_scheduled_batches(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    await orgs.set_fairness_weight(pool, org, 2.5)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("prio", 240))
    await sim.configure(latency_ms=40)
    spec = make_spec(
        org, audience, window=1, recipients_per_activity=20, batch_size=20, rate_per_second=60
    )
    campaigns = CampaignClient(client, settings)
    handle = await campaigns.start(spec)

    await eventually(
        lambda: handle.query(CampaignWorkflow.status),
        lambda status: status.counts.sent >= 20,
        what="the first batch",
    )
    for refused in (0, 6):
        with pytest.raises(ControlRefused, match=r"between 1 \(highest\) and 5 \(lowest\)"):
            await campaigns.set_priority(handle.id, refused)
    # Past our client, as any other client would send it: the workflow's validator.
    for refused_raw in ("2", 2.5, True, 9):
        with pytest.raises(WorkflowUpdateFailedError) as failed:
            await handle.execute_update("set_priority", refused_raw, result_type=CampaignStatus)
        assert "between 1 (highest) and 5 (lowest)" in str(failed.value.cause)
    changed = await campaigns.set_priority(handle.id, 1)
    assert changed.controls is not None and changed.controls.priority == 1
    assert (await campaigns.status(handle.id)).controls.priority == 1  # type: ignore[union-attr]

    final = await handle.result()
    assert final.state is CampaignState.COMPLETED and final.counts.sent == 240
    assert final.controls is not None and final.controls.priority == 1
    scheduled = await scheduled_priorities(handle)
    batches = [key for kind, key, _, _ in scheduled if kind == "send_batch"]
    assert batches[0] == 3 and batches[-1] == 1, batches
    assert batches == sorted(batches, reverse=True)  # 3s until the change, then 1s
    # Every activity of the campaign, planning included, carries its org and weight;
    # preparing comes before the weight is known (Temporal's default, 1).
    assert {
        (fkey, weight) for kind, _, fkey, weight in scheduled if kind != "prepare_campaign"
    } == {(org, 2.5)}
    with pytest.raises(ControlRefused, match="has finished"):
        await campaigns.set_priority(handle.id, 2)


async def shown_priority(env: dict[str, str], campaign_id: str) -> int:
    """The priority ``campaigns status --json`` shows."""
    shown = await campaigns_cli(env, "status", campaign_id, "--json")
    assert shown.returncode == 0, shown.stderr
    controls = CampaignStatus.model_validate_json(shown.stdout).controls
    assert controls is not None
    return controls.priority


@pytest.mark.usefixtures("worker")
async def test_the_official_cli_changes_the_priority_and_ours_too(
    settings: Settings, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("prio-cli", 5))
    spec = make_spec(org, audience, priority=4, send_at=datetime.now(UTC) + timedelta(days=30))
    env = cli_env(settings, tmp_path)
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json(exclude_none=True))
    started = await campaigns_cli(env, "start", str(path))
    assert started.returncode == 0, started.stderr

    official = await run(
        temporal_cli(), "workflow", "update", "execute", "--name", "set_priority",
        "--input", "2", "--workflow-id", spec.campaign_id,
        "--address", settings.temporal_address,
    )  # fmt: skip
    assert official.returncode == 0, official.stderr
    assert await shown_priority(env, spec.campaign_id) == 2
    refused = await run(
        temporal_cli(), "workflow", "update", "execute", "--name", "set_priority",
        "--input", "7", "--workflow-id", spec.campaign_id,
        "--address", settings.temporal_address,
    )  # fmt: skip
    assert refused.returncode != 0 and "between 1 (highest) and 5 (lowest)" in refused.stderr

    ours = await campaigns_cli(env, "priority", spec.campaign_id, "5")
    assert ours.returncode == 0, ours.stderr
    assert "priority 5" in ours.stdout
    assert await shown_priority(env, spec.campaign_id) == 5
    cancelled = await campaigns_cli(env, "cancel", spec.campaign_id)
    assert cancelled.returncode == 0, cancelled.stderr


# -- ordering, on a single-partition server with a one-slot worker -------------------------


@pytest.fixture(scope="module")
async def exact_env() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of the module's own (its one-slot worker runs a maintenance worker,
    which the session's server has already), whose task queues have one partition as
    the stack's do: fairness and priority exact."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        search_attributes=sa.ALL,
        data_converter=pydantic_data_converter,
        dev_server_extra_args=sa.dynamic_config_flags(),  # one partition a queue
    )
    yield env
    await env.shutdown()


@pytest.fixture
async def one_slot(
    exact_env: WorkflowEnvironment, settings: Settings, pool: asyncpg.Pool
) -> AsyncIterator[CampaignClient]:
    """A campaign worker on a task queue of its own that runs one activity at a time
    (and the maintenance worker, for the first-party refresh a first batch may run)."""
    from worker import build_workers, running

    own = settings.model_copy(
        update={
            "task_queue": f"prio-{uuid.uuid4().hex[:8]}",
            "temporal_address": exact_env.client.service_client.config.target_host,
            "worker_max_concurrent_activities": 1,
        }
    )
    provider = ProviderClient(own.provider_base_url or "", SecretStr(TEST_API_KEY))
    async with running(build_workers(exact_env.client, own, pool, provider)):
        yield CampaignClient(exact_env.client, own)
    await provider.aclose()


async def batch_completions(handle: WorkflowHandle) -> list[datetime]:
    """When each of the campaign's send_batch activities completed."""
    scheduled: dict[int, str] = {}
    done = []
    async for event in handle.fetch_history_events():
        if _scheduled(event):
            scheduled[event.event_id] = (
                event.activity_task_scheduled_event_attributes.activity_type.name
            )
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = event.activity_task_completed_event_attributes
            if scheduled.get(attrs.scheduled_event_id) == "send_batch":
                done.append(event.event_time.ToDatetime(UTC))
    return done


async def backlogged_big_campaign(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> tuple[CampaignSpec, WorkflowHandle]:
    """A 60-batch campaign, all batches scheduled, a few already done: a backlog."""
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("big", 300))
    await sim.configure(latency_ms=40)
    spec = make_spec(org, audience, window=60, recipients_per_activity=5, batch_size=5)
    handle = await campaigns.start(spec)
    # Read from the server and the ledger, not the status query: the workflow waits for
    # its next plan_batches, queued behind its own batches, so its status lags.
    await eventually(
        lambda: backlog(handle, pool, spec.campaign_id),
        lambda found: found[0] >= 40 and found[1] >= 10,
        what="the big campaign's backlog",
    )
    return spec, handle


async def backlog(handle: WorkflowHandle, pool: asyncpg.Pool, campaign_id: str) -> tuple[int, int]:
    """(activities waiting or running, recipients sent) of a campaign."""
    description = await handle.describe()
    sent = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE campaign_id = $1 AND status = 'sent'", campaign_id
    )
    return len(description.raw_description.pending_activities), sent


def big_after(big: list[datetime], moment: datetime) -> int:
    return sum(1 for done in big if done > moment)


def big_between(big: list[datetime], first: datetime, last: datetime) -> int:
    return sum(1 for done in big if first < done < last)


async def test_a_small_orgs_campaign_is_interleaved_with_a_big_orgs_backlog(
    one_slot: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    _, big_handle = await backlogged_big_campaign(one_slot, pool, sim, tmp_path)
    small_org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, small_org, addresses("small", 25))
    small = make_spec(small_org, audience, window=5, recipients_per_activity=5, batch_size=5)
    small_handle = await one_slot.start(small)

    small_final = await small_handle.result()
    big_final = await big_handle.result()
    assert small_final.counts.sent == 25 and big_final.counts.sent == 300
    big, mine = await batch_completions(big_handle), await batch_completions(small_handle)
    assert len(big) == 60 and len(mine) == 5
    # First in, first out would run all of the big backlog first (0 left after the
    # small campaign); round robin between the two orgs alternates them.
    left = big_after(big, max(mine))
    assert left >= 25, f"only {left} of the big org's batches ran after the small org's"
    between = big_between(big, min(mine), max(mine))
    assert between <= 8, f"{between} big batches ran among the small org's 5"


async def test_a_priority_one_campaign_goes_before_a_priority_three_backlog(
    one_slot: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    big_spec, big_handle = await backlogged_big_campaign(one_slot, pool, sim, tmp_path)
    # The same org: what puts it first is its priority, not fairness between orgs.
    audience, _ = await make_audience(pool, tmp_path, big_spec.org, addresses("urgent", 25))
    urgent = make_spec(
        big_spec.org, audience, window=5, recipients_per_activity=5, batch_size=5, priority=1
    )
    urgent_handle = await one_slot.start(urgent)

    assert (await urgent_handle.result()).counts.sent == 25
    await big_handle.result()
    big, mine = await batch_completions(big_handle), await batch_completions(urgent_handle)
    left = big_after(big, max(mine))
    assert left >= 30, f"only {left} of the priority-3 batches ran after the priority-1 ones"
    between = big_between(big, min(mine), max(mine))
    assert between <= 1, f"{between} priority-3 batches ran among the priority-1 ones"


async def test_a_heavier_org_gets_more_of_the_workers_than_its_share(
    one_slot: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    _, big_handle = await backlogged_big_campaign(one_slot, pool, sim, tmp_path)
    heavy_org = await make_org(pool)
    await orgs.set_fairness_weight(pool, heavy_org, 5)
    audience, _ = await make_audience(pool, tmp_path, heavy_org, addresses("heavy", 50))
    heavy = make_spec(heavy_org, audience, window=10, recipients_per_activity=5, batch_size=5)
    heavy_handle = await one_slot.start(heavy)

    assert (await heavy_handle.result()).counts.sent == 50
    await big_handle.result()
    big, mine = await batch_completions(big_handle), await batch_completions(heavy_handle)
    between = big_between(big, min(mine), max(mine))
    # Weight 5 against 1: about one big batch for every five of the heavy org's ten
    # (weight 1 would alternate, nine).
    assert between <= 4, f"{between} big batches ran among the heavy org's 10"
