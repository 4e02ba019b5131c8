"""Live controls on a running campaign: pause, resume, cancel, window, rate, reschedule,
send_at lateness, and refusals; continue-as-new with a small batch budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import CancelledError

from campaigns.client import CampaignClient, ControlRefused
from campaigns.models import CampaignState, CampaignStatus
from campaigns.settings import Settings
from campaigns.spec_check import InvalidSpec
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
)
from workflows import CampaignWorkflow

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def campaigns(client: Client, settings: Settings) -> CampaignClient:
    return CampaignClient(client, settings)


async def until(handle: WorkflowHandle, check, within: float = 60) -> CampaignStatus:
    """Poll the status query until ``check(status)`` holds."""
    from workflows import CampaignWorkflow

    return await eventually(
        lambda: handle.query(CampaignWorkflow.status), check, within=within, what="status"
    )


async def scheduled_batches(handle: WorkflowHandle) -> list[tuple[int, datetime]]:
    """(event id, time) of every send_batch scheduled, in order."""
    found = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == "send_batch":
                found.append((event.event_id, event.event_time.ToDatetime(UTC)))
    return found


async def update_events(handle: WorkflowHandle) -> list[tuple[int, str]]:
    found = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            name = event.workflow_execution_update_accepted_event_attributes.accepted_request
            found.append((event.event_id, name.input.name))
    return found


async def slow_campaign(pool, tmp_path, sim, campaigns, count=600, **overrides):
    org = await make_org(pool)
    emails = addresses("ctl", count)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.configure(latency_ms=60)
    fields = {"window": 1, "recipients_per_activity": 50, **overrides}
    spec = make_spec(org, audience, **fields)
    handle = await campaigns.start(spec)
    return spec, handle, emails


async def test_pause_stops_new_batches_and_resume_finishes_exactly_once(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    spec, handle, emails = await slow_campaign(pool, tmp_path, sim, campaigns)
    await until(handle, lambda s: s.counts.sent >= 50)

    paused = await campaigns.pause(handle.id)
    assert paused.controls.paused
    drained = await until(handle, lambda s: s.in_flight_batches == 0)
    assert drained.state is CampaignState.PAUSED
    assert drained.counts.sent < 600
    sent_while_paused = (await sim.stats())["accepted_emails"]
    assert sent_while_paused == drained.counts.sent

    resumed = await campaigns.resume(handle.id)
    assert not resumed.controls.paused
    result = await handle.result()

    assert result.state is CampaignState.COMPLETED and result.counts.sent == 600
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails) and set(delivered.values()) == {1}
    (pause_id, _), (resume_id, _) = await update_events(handle)
    batches = [event_id for event_id, _ in await scheduled_batches(handle)]
    assert not [e for e in batches if pause_id < e < resume_id]  # none started while paused
    assert [e for e in batches if e > resume_id]


async def test_cancel_is_graceful_and_the_summary_says_what_was_not_sent(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    spec, handle, _ = await slow_campaign(pool, tmp_path, sim, campaigns)
    await until(handle, lambda s: s.counts.sent >= 100)

    await campaigns.cancel(handle.id)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()  # Temporal's own cancellation, as `temporal workflow cancel`
    assert isinstance(failure.value.cause, CancelledError)
    result = await campaigns.status(handle.id)  # the summary, kept in the memo

    assert result.state is CampaignState.CANCELLED
    assert 100 <= result.counts.sent < 600
    assert result.not_attempted == 600 - result.counts.sent
    assert (await sim.stats())["accepted_emails"] == result.counts.sent
    recorded = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE campaign_id = $1 AND status = 'sent'",
        spec.campaign_id,
    )
    assert recorded == result.counts.sent  # in-flight batches finished and were recorded
    with pytest.raises(ControlRefused, match="finished|cancelled"):
        await campaigns.resume(handle.id)
    execution = await handle.describe()
    assert execution.status is WorkflowExecutionStatus.CANCELED


async def test_temporal_cancel_also_drains_in_flight_batches(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    from workflows import CampaignWorkflow

    spec, handle, _ = await slow_campaign(pool, tmp_path, sim, campaigns, window=3)
    await until(handle, lambda s: s.counts.sent >= 50 and s.in_flight_batches > 0)

    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    assert isinstance(failure.value.cause, CancelledError)
    status = await handle.query(CampaignWorkflow.status)
    assert status.state is CampaignState.CANCELLED
    assert await campaigns.status(handle.id) == status  # kept in the memo, no replay
    assert (await sim.stats())["accepted_emails"] == status.counts.sent
    assert status.counts.sent == await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE campaign_id = $1 AND status = 'sent'",
        spec.campaign_id,
    )


async def test_temporal_cancel_while_preparing_ends_cancelled_not_failed(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("cprep", 30))
    spec = make_spec(org, audience)
    # Hold prepare_campaign at its INSERT, so the cancel lands while it runs.
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("LOCK TABLE campaigns IN EXCLUSIVE MODE")
        handle = await campaigns.start(spec)
        await eventually(  # until prepare_campaign waits for the lock
            lambda: blocker.fetchval(
                """SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                   WHERE c.relname = 'campaigns' AND NOT l.granted"""
            ),
            within=30,
            what="prepare_campaign waiting on the campaigns table",
        )
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()

    assert isinstance(failure.value.cause, CancelledError)
    final = await campaigns.status(handle.id)
    assert final.state is CampaignState.CANCELLED and final.finished_at is not None
    assert final.not_attempted == final.total
    assert (await sim.stats())["accepted_emails"] == 0


async def test_window_and_rate_change_live(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    spec, handle, emails = await slow_campaign(pool, tmp_path, sim, campaigns, count=1200)
    await until(handle, lambda s: s.counts.sent >= 50)

    widened = await campaigns.set_window(handle.id, 4)
    assert widened.controls.window == 4
    await until(handle, lambda s: s.in_flight_batches >= 3)
    limited = await campaigns.set_rate(handle.id, 400.0)
    assert limited.controls.rate_per_second == 400.0
    result = await handle.result()

    assert result.counts.sent == 1200
    assert set((await sim.deliveries()).values()) == {1}
    (_, _), (rate_event, _) = await update_events(handle)
    after_limit = [t for event_id, t in await scheduled_batches(handle) if event_id > rate_event]
    # 50 recipients a batch at 400 emails/s, with at most 1 s of burst credit.
    span = (after_limit[-1] - after_limit[0]).total_seconds()
    assert len(after_limit) >= 4
    assert (len(after_limit) - 1) * 50 <= 400 * (span + 1.0)


async def test_scheduled_campaign_waits_and_can_be_rescheduled(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("sched", 40))
    send_at = datetime.now(UTC) + timedelta(days=1)
    spec = make_spec(org, audience, send_at=send_at.isoformat())
    handle = await campaigns.start(spec)

    waiting = await until(handle, lambda s: s.state is CampaignState.SCHEDULED)
    assert waiting.controls.send_at == send_at
    assert (await sim.stats())["accepted_emails"] == 0
    with pytest.raises(ControlRefused, match="would expire at once"):
        await campaigns.reschedule(handle.id, datetime.now(UTC) - timedelta(hours=2))
    await campaigns.reschedule(handle.id, datetime.now(UTC) + timedelta(seconds=1))
    result = await handle.result()

    assert result.state is CampaignState.COMPLETED and result.counts.sent == 40
    with pytest.raises(ControlRefused, match="finished"):
        await campaigns.reschedule(handle.id, send_at)


async def test_send_at_missed_by_more_than_max_lateness_does_not_send(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("late", 10))
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    spec = make_spec(org, audience, send_at=two_hours_ago.isoformat(), max_lateness_seconds=600)
    with pytest.raises(InvalidSpec, match="would expire without sending"):
        await campaigns.start(spec)  # refused up front by our client

    # Started by other means, the workflow expires it without sending.
    handle = await campaigns.temporal.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=campaigns.settings.task_queue
    )
    result = await handle.result()

    assert result.state is CampaignState.EXPIRED
    assert "max_lateness_seconds" in result.last_error
    assert (await sim.stats())["accepted_emails"] == 0


async def test_controls_that_make_no_sense_are_refused_with_a_reason(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    spec, handle, _ = await slow_campaign(pool, tmp_path, sim, campaigns)
    await until(handle, lambda s: s.state is CampaignState.RUNNING)

    with pytest.raises(ControlRefused, match="cannot resume: the campaign is not paused"):
        await campaigns.resume(handle.id)
    with pytest.raises(ControlRefused, match="window must be between 1 and 500"):
        await campaigns.set_window(handle.id, 0)
    with pytest.raises(ControlRefused, match="rate must be more than 0"):
        await campaigns.set_rate(handle.id, -5)
    with pytest.raises(ControlRefused, match="no longer waiting for its start time"):
        await campaigns.reschedule(handle.id, datetime.now(UTC) + timedelta(hours=1))
    assert not await update_events(handle)  # refusals leave no trace in history

    await campaigns.pause(handle.id)
    with pytest.raises(ControlRefused, match="already paused"):
        await campaigns.pause(handle.id)
    await campaigns.cancel(handle.id)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    with pytest.raises(ControlRefused, match="has finished"):
        await campaigns.pause(handle.id)
    with pytest.raises(ControlRefused, match="nothing to cancel"):
        await campaigns.cancel(handle.id)


async def test_continue_as_new_carries_cursor_counts_and_controls(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("can", 1000)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    spec = make_spec(org, audience, window=2, recipients_per_activity=50, batches_per_run=3)
    handle = await campaigns.start(spec)
    await campaigns.set_window(handle.id, 3)

    result = await handle.result()

    assert result.state is CampaignState.COMPLETED
    assert result.counts.sent == 1000 and result.total == 1000
    assert result.runs >= 1000 // 50 // 3
    assert result.controls.window == 3  # the live change survived continue-as-new
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails) and set(delivered.values()) == {1}
    runs = [
        execution
        async for execution in campaigns.temporal.list_workflows(f"WorkflowId = '{handle.id}'")
    ]
    assert len(runs) == result.runs
    for run in runs:
        history = await campaigns.temporal.get_workflow_handle(
            handle.id, run_id=run.run_id
        ).fetch_history()
        assert len(history.events) < 120  # bounded per run, whatever the audience size


async def test_retry_failed_sends_only_to_failed_and_abandoned_recipients_as_a_new_run(
    campaigns: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:

    org = await make_org(pool)
    emails = addresses("retry", 200)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    # Two of the eight requests fail (one after the provider accepted it), and with
    # no retry rounds their recipients are abandoned at once.
    await sim.script({"status": 500, "phase": "after"}, {"status": 502})
    spec = make_spec(org, audience, window=1, retry_delays_seconds=[])
    first = await (await campaigns.start(spec)).result()
    assert first.counts.abandoned == 50 and first.counts.sent == 150
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    waiting = await campaigns.start(make_spec(org, audience, send_at=later))
    with pytest.raises(ControlRefused, match="is still"):
        await campaigns.retry_failed(waiting.id, pool)
    await campaigns.cancel(waiting.id)

    handle, retry_spec = await campaigns.retry_failed(spec.campaign_id, pool)
    second = await handle.result()

    assert retry_spec.send_to == "failed" and handle.id == spec.campaign_id
    assert second.state is CampaignState.COMPLETED
    assert second.total == 50 and second.counts.sent == 50 and second.counts.skipped == 0
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails)
    assert set(delivered.values()) == {1}  # the accepted-then-500 requests were replayed
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE campaign_id = $1 AND status = 'sent'",
            spec.campaign_id,
        )
        == 200
    )
    with pytest.raises(ControlRefused, match="nothing to retry"):
        await campaigns.retry_failed(spec.campaign_id, pool)
