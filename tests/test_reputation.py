"""The reputation watch: the pure verdict, the spec's limits, and a running campaign that
pauses itself when its complaint rate reaches the limit, then resumes without being
paused again by the counts that paused it.

The provider-event service is not part of these tests: ``apply_events`` writes what it
would (the ledger's event columns and the campaign's counters, in one transaction)
with plain SQL.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHandle

from campaigns.binaries import temporal_cli
from campaigns.cli._progress import status_line
from campaigns.client import CampaignClient, ControlRefused
from campaigns.contract import READ_ENGAGEMENT, InvalidSpec
from campaigns.models import (
    CampaignControls,
    CampaignInput,
    CampaignPlan,
    CampaignSpec,
    CampaignState,
    CampaignStatus,
    CarriedState,
    ReputationCounts,
    ReputationLimits,
    ReputationWatch,
)
from campaigns.settings import Settings
from campaigns.spec_check import parse_spec
from tests.helpers import SimulatorControl, addresses, eventually, make_audience, make_org
from tests.helpers import make_spec as _make_spec
from tests.test_cli import run
from tests.test_controls import until
from workflows import CampaignWorkflow
from workflows._progress import details_text
from workflows._reputation import percent, verdict

# -- what the provider-event service writes -----------------------------------------------

_COUNTERS = (
    "delivered",
    "hard_bounced",
    "soft_bounced",
    "complained",
    "opened",
    "clicked",
    "unsubscribed",
)
# (rows eligible, what an event sets) per counter, in the order they are applied.
_EVENTS = {
    "delivered": (
        "status = 'sent' AND delivered_at IS NULL AND bounced_at IS NULL",
        "delivered_at = now()",
    ),
    "hard_bounced": (
        "status = 'sent' AND delivered_at IS NULL AND bounced_at IS NULL",
        "bounced_at = now(), bounce_type = 'hard'",
    ),
    "soft_bounced": (
        "status = 'sent' AND delivered_at IS NULL AND bounced_at IS NULL",
        "bounced_at = now(), bounce_type = 'soft', soft_bounces = 1",
    ),
    "complained": ("delivered_at IS NOT NULL AND complained_at IS NULL", "complained_at = now()"),
    "opened": ("delivered_at IS NOT NULL AND opened_at IS NULL", "opened_at = now(), opens = 1"),
    "clicked": ("opened_at IS NOT NULL AND clicked_at IS NULL", "clicked_at = now(), clicks = 1"),
    "unsubscribed": (
        "delivered_at IS NOT NULL AND unsubscribed_at IS NULL",
        "unsubscribed_at = now()",
    ),
}


async def apply_events(pool: asyncpg.Pool, campaign_id: str, org: str, **counts: int) -> None:
    """Mark ``counts[name]`` more of the campaign's sent messages delivered, complained ...
    and add them to its ``campaign_engagement`` row, in one transaction."""
    assert set(counts) <= set(_COUNTERS), counts
    async with pool.acquire() as conn, conn.transaction():
        for name, (eligible, change) in _EVENTS.items():
            wanted = counts.get(name, 0)
            if not wanted:
                continue
            marked = await conn.fetch(
                f"""UPDATE deliveries d SET {change}
                    FROM (SELECT recipient_id FROM deliveries
                          WHERE campaign_id = $1 AND {eligible}
                          ORDER BY recipient_id LIMIT $2) p
                    WHERE d.campaign_id = $1 AND d.recipient_id = p.recipient_id
                    RETURNING d.recipient_id""",
                campaign_id,
                wanted,
            )
            assert len(marked) == wanted, f"only {len(marked)} messages could be {name}"
        values = [counts.get(name, 0) for name in _COUNTERS]
        await conn.execute(
            f"""INSERT INTO campaign_engagement (campaign_id, org_id, {", ".join(_COUNTERS)})
                VALUES ($1, $2, {", ".join(f"${n}" for n in range(3, 3 + len(_COUNTERS)))})
                ON CONFLICT (campaign_id) DO UPDATE SET
                {", ".join(f"{c} = campaign_engagement.{c} + EXCLUDED.{c}" for c in _COUNTERS)},
                updated_at = now()""",
            campaign_id,
            org,
            *values,
        )


# -- the verdict --------------------------------------------------------------------------


def counts(delivered: int, complained: int = 0, hard_bounced: int = 0) -> ReputationCounts:
    return ReputationCounts(delivered=delivered, complained=complained, hard_bounced=hard_bounced)


def test_no_verdict_before_min_delivered_however_bad_the_rates() -> None:
    limits = ReputationLimits(min_delivered=1000)
    assert verdict(limits, counts(999, complained=999, hard_bounced=999)) is None
    assert verdict(limits, counts(0)) is None
    assert verdict(limits, counts(1000, complained=999)) is not None


def test_a_rate_at_exactly_the_limit_pauses_and_just_below_does_not() -> None:
    limits = ReputationLimits()  # 0.3% complaints, 5% hard bounces, 1,000 delivered
    assert verdict(limits, counts(1000, complained=2)) is None
    assert verdict(limits, counts(1000, complained=3)) == (
        "complaint rate 0.30% >= 0.30% (3 of 1,000 delivered)"
    )
    assert verdict(limits, counts(1000, hard_bounced=49)) is None
    assert verdict(limits, counts(1000, hard_bounced=50)) == (
        "hard-bounce rate 5.00% >= 5.00% (50 of 1,000 delivered)"
    )
    for delivered in (1000, 1234, 99_999, 1_000_000):  # exact at any size
        exact = ReputationLimits(max_complaint_rate=7 / delivered, min_delivered=1)
        assert verdict(exact, counts(delivered, complained=7)) is not None
        assert verdict(exact, counts(delivered, complained=6)) is None


def test_the_reason_gives_counts_and_rates_of_both_limits() -> None:
    limits = ReputationLimits()
    assert verdict(limits, counts(1190, complained=5)) == (
        "complaint rate 0.42% >= 0.30% (5 of 1,190 delivered)"
    )
    both = verdict(limits, counts(2000, complained=10, hard_bounced=150))
    assert both == (
        "complaint rate 0.50% >= 0.30% (10 of 2,000 delivered); "
        "hard-bounce rate 7.50% >= 5.00% (150 of 2,000 delivered)"
    )
    assert percent(0.00001) == "0.001%"  # a tiny limit does not read as 0.00%


def test_after_a_resume_only_what_arrived_since_is_judged() -> None:
    limits = ReputationLimits()
    paused_at = counts(1190, complained=5)
    assert verdict(limits, paused_at) is not None
    # The same counts, or fewer than min_delivered more delivered, give no verdict.
    assert verdict(limits, paused_at, baseline=paused_at) is None
    assert verdict(limits, counts(1190 + 999, complained=5 + 999), baseline=paused_at) is None
    # 1,000 more delivered with 2 more complaints is 0.2%: it keeps sending ...
    assert verdict(limits, counts(2190, complained=7), baseline=paused_at) is None
    # ... with 3 more it is 0.3% of what arrived since, and it pauses again.
    assert verdict(limits, counts(2190, complained=8), baseline=paused_at) == (
        "complaint rate 0.30% >= 0.30% (3 of 1,000 delivered since the last resume)"
    )
    # Counters that went backwards count as nothing new, never as negative.
    assert verdict(limits, counts(10, complained=0), baseline=paused_at) is None


def test_the_baseline_and_last_counts_are_carried_across_continue_as_new() -> None:
    spec = CampaignSpec.model_validate(_SPEC)
    watch = ReputationWatch(last=counts(1190, complained=5), baseline=counts(200, complained=1))
    carried = CarriedState(
        execution_id="run-1",
        plan=CampaignPlan(audience_id=1, total_recipients=5000),
        round=0,
        cursor=1200,
        status=CampaignStatus(campaign_id="spring", org="acme", state=CampaignState.RUNNING),
        reputation=watch,
    )
    next_input = CampaignInput.continuing(spec, carried)
    decoded = CampaignInput.model_validate(json.loads(next_input.model_dump_json()))
    assert decoded.carried is not None and decoded.carried.reputation == watch
    older = json.loads(next_input.model_dump_json())
    del older["carried"]["reputation"]  # a run continued by an earlier version
    assert CampaignInput.model_validate(older).carried.reputation == ReputationWatch()


# -- the spec -----------------------------------------------------------------------------

_SPEC = {
    "campaign_id": "spring",
    "org": "acme",
    "audience": "customers",
    "from_address": "news@example.com",
    "subject": "Hello",
    "text": "Hi",
}


def problems(reputation: Any) -> str:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec(json.dumps({**_SPEC, "reputation": reputation}))
    return str(refused.value)


def test_the_limits_default_and_old_specs_without_them_still_validate() -> None:
    spec = parse_spec(json.dumps(_SPEC))
    assert spec.reputation == ReputationLimits(
        enabled=True,
        max_complaint_rate=0.003,
        max_hard_bounce_rate=0.05,
        min_delivered=1000,
        check_interval_seconds=15,
    )
    stored = CampaignSpec.model_validate({**_SPEC, "batch_size": 50})  # a stored spec
    assert stored.reputation.enabled
    partial = parse_spec(json.dumps({**_SPEC, "reputation": {"min_delivered": 5}}))
    assert partial.reputation.min_delivered == 5 and partial.reputation.max_complaint_rate == 0.003
    carried = CampaignInput.model_validate(_SPEC)  # a recorded workflow input
    assert carried.spec().reputation == ReputationLimits()


@pytest.mark.parametrize(
    ("reputation", "expected"),
    [
        ({"max_complaint_rate": 5}, "reputation.max_complaint_rate: must be a fraction"),
        ({"max_complaint_rate": 0}, "more than 0 and at most 1"),
        ({"max_hard_bounce_rate": 1.5}, "reputation.max_hard_bounce_rate: must be a fraction"),
        ({"max_hard_bounce_rate": -0.1}, "(got -0.1)"),
        ({"max_complaint_rate": True}, "reputation.max_complaint_rate: Input should be a valid"),
        ({"max_complaint_rate": "0.01"}, "reputation.max_complaint_rate: Input should be a valid"),
        ({"min_delivered": 0}, "reputation.min_delivered: Input should be greater than or equal"),
        ({"min_delivered": 10_000_001}, "less than or equal to 10000000"),
        ({"min_delivered": 2.5}, "reputation.min_delivered: Input should be a valid integer"),
        ({"check_interval_seconds": 0}, "reputation.check_interval_seconds: Input should be"),
        ({"check_interval_seconds": 3601}, "less than or equal to 3600"),
        ({"enabled": "yes"}, "reputation.enabled: Input should be a valid boolean"),
        ({"max_rate": 0.1}, "reputation.max_rate: is not a known field"),
        (None, "reputation: Input should be"),
        ([], "reputation: Input should be"),
    ],
)
def test_limits_out_of_range_are_refused_naming_the_field_and_the_limit(
    reputation: Any, expected: str
) -> None:
    assert expected in problems(reputation)


def test_rates_that_are_not_finite_are_refused() -> None:
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="more than 0 and at most 1"):
            ReputationLimits(max_complaint_rate=value)


def test_the_web_ui_details_and_the_status_line_say_why_a_campaign_is_paused() -> None:
    reason = "complaint rate 0.42% >= 0.30% (5 of 1,190 delivered)"
    status = CampaignStatus(
        campaign_id="spring",
        org="acme",
        state=CampaignState.PAUSED,
        total=10,
        controls=CampaignControls(window=4, paused=True, pause_reason=reason),
    )
    details = details_text(status, 40)
    assert f"paused by the reputation watch: {reason}" in details
    assert "no batch starts until it is resumed" in details
    assert f"by the reputation watch: {reason}" in status_line(status).plain
    by_hand = status.model_copy(
        update={"controls": CampaignControls(window=4, paused=True)}, deep=True
    )
    assert "reputation" not in details_text(by_hand, 40)
    assert "PAUSED (by an operator)" in status_line(by_hand).plain


# -- a running campaign -------------------------------------------------------------------


@pytest.fixture
def campaigns(client: Client, settings: Settings) -> CampaignClient:
    return CampaignClient(client, settings)


async def completed_checks(handle: WorkflowHandle) -> int:
    """How many reputation checks the campaign's current run has completed."""
    scheduled: set[int] = set()
    done = 0
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_type.name == READ_ENGAGEMENT:
                scheduled.add(event.event_id)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            if event.activity_task_completed_event_attributes.scheduled_event_id in scheduled:
                done += 1
    return done


async def checks_after(handle: WorkflowHandle, more: int) -> None:
    """Wait until ``more`` checks completed after now: one, at least, read from now on."""
    seen = await completed_checks(handle)
    await eventually(
        lambda: completed_checks(handle),
        lambda n: n >= seen + more,
        within=30,
        what=f"{more} more reputation checks",
    )


def decoded_history(history_json: str) -> str:
    """A history's JSON with every payload's data decoded (it is base64 in the JSON)."""
    parts = [history_json]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and "metadata" in node:
                parts.append(base64.b64decode(node["data"]).decode("utf-8", "replace"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history_json))
    return "\n".join(parts)


@pytest.mark.usefixtures("worker")
async def test_a_campaign_pauses_itself_past_the_complaint_limit_and_resumes_on_new_counts(
    campaigns: CampaignClient,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    org = await make_org(pool)
    emails = addresses("rep", 2000)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    spec = _make_spec(
        org,
        audience,
        window=2,
        recipients_per_activity=50,
        rate_per_second=100,  # about 20 s of sending: time to steer it
        reputation={"check_interval_seconds": 1, "min_delivered": 100, "max_complaint_rate": 0.01},
    )
    handle = await campaigns.start(spec)
    await until(handle, lambda s: s.counts.sent >= 200)
    assert (await campaigns.status(handle.id)).state is CampaignState.RUNNING

    # 5 complaints in 200 delivered is 2.5%, past the 1% limit.
    await apply_events(pool, spec.campaign_id, org, delivered=200, complained=5)
    reason = "complaint rate 2.50% >= 1.00% (5 of 200 delivered)"
    paused = await until(handle, lambda s: s.state is CampaignState.PAUSED, within=30)
    assert paused.controls.paused and paused.controls.pause_reason == reason
    drained = await until(handle, lambda s: s.in_flight_batches == 0)
    assert drained.counts.sent < 2000
    assert (await sim.stats())["accepted_emails"] == drained.counts.sent  # none started
    assert (await campaigns.status(handle.id)).controls.pause_reason == reason  # our client
    assert reason in status_line(drained).plain  # `campaigns status`
    queried = await run(
        temporal_cli(), "workflow", "query", "--address", settings.temporal_address,
        "--workflow-id", handle.id, "--name", "status", "--output", "json",
    )  # fmt: skip
    assert queried.returncode == 0, queried.stderr
    answer = json.loads(queried.stdout)["queryResult"][0]
    assert answer["state"] == "Paused" and answer["controls"]["pause_reason"] == reason
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert reason in metadata.current_details  # the Web UI's workflow page
    with pytest.raises(ControlRefused, match=r"already paused by the reputation watch \(compl"):
        await campaigns.pause(handle.id)

    resumed = await campaigns.resume(handle.id)
    assert resumed.state is CampaignState.RUNNING and resumed.controls.pause_reason is None
    # The counts that paused it are the baseline now: checks see nothing new.
    await checks_after(handle, 2)
    running = await handle.query(CampaignWorkflow.status)
    assert running.state is CampaignState.RUNNING and not running.controls.paused

    # 200 more delivered with 1 more complaint: 0.5% of what arrived since. Sending on.
    await until(handle, lambda s: s.counts.sent >= 400)
    await apply_events(pool, spec.campaign_id, org, delivered=200, complained=1)
    await checks_after(handle, 2)
    assert (await handle.query(CampaignWorkflow.status)).state is CampaignState.RUNNING

    # 100 more with 2 more complaints: 3 of 300 since the resume is 1%, the limit.
    await until(handle, lambda s: s.counts.sent >= 500)
    await apply_events(pool, spec.campaign_id, org, delivered=100, complained=2)
    again = await until(handle, lambda s: s.state is CampaignState.PAUSED, within=30)
    assert again.controls.pause_reason == (
        "complaint rate 1.00% >= 1.00% (3 of 300 delivered since the last resume)"
    )

    await campaigns.resume(handle.id)
    await campaigns.set_rate(handle.id, None)  # finish quickly
    result = await handle.result()
    assert result.state is CampaignState.COMPLETED and result.counts.sent == 2000
    assert result.controls.pause_reason is None

    history = decoded_history((await handle.fetch_history()).to_json())
    assert '"complained":5' in history  # the payloads were read: the checks' counts
    # The sender's own address is in the spec; no recipient's is anywhere.
    assert "rep.0" not in history and not [email for email in emails if email in history]


@pytest.mark.usefixtures("worker")
async def test_a_campaign_with_the_watch_off_never_checks(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("repoff", 450))
    spec = _make_spec(
        org,
        audience,
        window=1,
        recipients_per_activity=50,
        rate_per_second=150,
        reputation={"enabled": False, "check_interval_seconds": 1, "min_delivered": 1},
    )
    handle = await campaigns.start(spec)
    await until(handle, lambda s: s.counts.sent >= 100)
    await apply_events(pool, spec.campaign_id, org, delivered=100, complained=50)
    result = await handle.result()
    assert result.state is CampaignState.COMPLETED and result.counts.sent == 450
    assert await completed_checks(handle) == 0
