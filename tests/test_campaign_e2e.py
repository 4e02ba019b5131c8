"""A campaign end to end: Temporal dev server, PostgreSQL, the simulator over HTTP."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError

from campaigns.models import CampaignState
from tests.conftest import TASK_QUEUE
from tests.helpers import SimulatorControl, addresses, make_audience, make_org, make_spec
from workflows import CampaignWorkflow

pytestmark = pytest.mark.usefixtures("worker")


async def run_campaign(client: Client, spec):
    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    return handle, await handle.result()


async def ledger(pool: asyncpg.Pool, campaign_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT status::text, count(*) FROM deliveries WHERE campaign_id = $1 GROUP BY 1",
        campaign_id,
    )
    return {row["status"]: row["count"] for row in rows}


async def test_campaign_delivers_each_recipient_exactly_once(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("once", 1234)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    spec = make_spec(org, audience)

    _, result = await run_campaign(client, spec)

    assert result.state is CampaignState.COMPLETED
    assert result.total == 1234
    assert result.counts.sent == 1234
    assert result.counts.failed == result.counts.rejected == result.counts.skipped == 0
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails)
    assert set(delivered.values()) == {1}
    assert await ledger(pool, spec.campaign_id) == {"sent": 1234}
    message = (await sim.messages(emails[0]))[0]
    assert message["subject"] == "Hello Reader 1"
    assert message["html"] == "<p>Hi Reader 1 from Lisbon</p>"


async def test_suppressed_recipients_are_skipped_and_recorded(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("supp", 300)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    suppressed = emails[::7]
    await pool.executemany(
        "INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, 'unsubscribed')",
        [(org, email) for email in suppressed],
    )
    spec = make_spec(org, audience)

    _, result = await run_campaign(client, spec)

    assert result.counts.suppressed == len(suppressed)
    assert result.counts.sent == 300 - len(suppressed)
    delivered = await sim.deliveries()
    assert not set(suppressed) & set(delivered)
    assert set(delivered.values()) == {1}
    assert await ledger(pool, spec.campaign_id) == {
        "sent": 300 - len(suppressed),
        "suppressed": len(suppressed),
    }


async def test_invalid_addresses_are_rejected_and_never_retried(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("inval", 120)
    audience, report = await make_audience(pool, tmp_path, org, emails)
    # Rows that predate address checks can still hold garbage.
    bad = ["not-an-address", "two@@example.com", "trailing.dot@example."]
    await pool.executemany(
        "INSERT INTO recipients (audience_id, email, name) VALUES ($1, $2, 'Legacy')",
        [(report.audience_id, email) for email in bad],
    )
    spec = make_spec(org, audience)

    _, result = await run_campaign(client, spec)

    assert result.counts.rejected == 3
    assert result.counts.sent == 120
    assert result.state is CampaignState.COMPLETED and result.round == 0  # no retry round
    rows = await pool.fetch(
        """SELECT r.email, d.status::text, d.attempts, d.last_error FROM deliveries d
           JOIN recipients r ON r.id = d.recipient_id
           WHERE d.campaign_id = $1 AND d.status = 'rejected'""",
        spec.campaign_id,
    )
    assert sorted(row["email"] for row in rows) == sorted(bad)
    assert all(row["attempts"] == 1 and "invalid" in row["last_error"] for row in rows)
    assert (await sim.stats())["responses"] == {"200": 120 // 25 + 1}


async def test_provider_500_is_retried_to_success(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("five", 200)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    # One request refused before accepting, one accepted but answered with a 500.
    await sim.script({"status": 500, "phase": "before"}, {"status": 503, "phase": "after"})
    spec = make_spec(org, audience, window=1, recipients_per_activity=200, batch_size=100)

    _, result = await run_campaign(client, spec)

    assert result.state is CampaignState.COMPLETED
    assert result.counts.sent == 200
    assert result.counts.failed == result.counts.abandoned == 0
    assert result.round == 1  # the failed requests went out again after the retry timer
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails)
    assert set(delivered.values()) == {1}
    stats = await sim.stats()
    assert stats["replays"] == 1  # the accepted-then-500 request was replayed, not resent
    attempts = await pool.fetchval(
        "SELECT max(attempts) FROM deliveries WHERE campaign_id = $1", spec.campaign_id
    )
    assert attempts == 2


async def test_provider_throttling_is_waited_out_and_never_counted_as_a_failure(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("throttled", 200)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.script(*[{"status": 429, "retry_after": 1}] * 3)
    spec = make_spec(org, audience)

    handle, result = await run_campaign(client, spec)

    assert result.state is CampaignState.COMPLETED
    assert (result.counts.sent, result.counts.failed, result.round) == (200, 0, 0)
    assert await ledger(pool, spec.campaign_id) == {"sent": 200}
    assert set((await sim.deliveries()).values()) == {1}
    assert (await sim.stats())["responses"].get("429") == 3
    timers = [
        event
        async for event in handle.fetch_history_events()
        if event.HasField("timer_started_event_attributes")
        and event.user_metadata.summary.data != b'"reputation check"'
    ]
    assert not timers  # no retry round was needed


async def test_soft_failures_are_abandoned_after_the_last_round(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("aband", 50)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.configure(error_rate_before=1.0)
    spec = make_spec(org, audience, retry_delays_seconds=[1])

    _, result = await run_campaign(client, spec)

    assert result.state is CampaignState.COMPLETED
    assert result.counts.sent == 0
    assert result.counts.abandoned == 50
    assert result.round == 1
    assert await ledger(pool, spec.campaign_id) == {"abandoned": 50}
    assert (await sim.stats())["responses"] == {"500": 4}  # 2 requests x 2 rounds


async def test_provider_auth_error_stops_the_campaign_without_a_retry_storm(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("auth", 400))
    await sim.configure(api_keys=["re_some_other_key"])
    spec = make_spec(org, audience, window=2)

    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    assert "refused the API key" in str(failure.value.cause)
    assert "PROVIDER_API_KEY" in str(failure.value.cause)
    stats = await sim.stats()
    assert stats["accepted_emails"] == 0
    assert stats["responses"]["403"] <= 2 * 4  # the batches in flight, each tried once
    status = await handle.query(CampaignWorkflow.status)
    assert status.state is CampaignState.FAILED


async def test_a_422_for_one_request_does_not_lose_the_others(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("u422", 200)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    refused = emails[42]
    await sim.configure(reject_addresses=[refused])
    spec = make_spec(org, audience)

    _, result = await run_campaign(client, spec)

    assert result.state is CampaignState.COMPLETED
    assert result.counts.rejected == 1
    assert result.counts.sent == 199
    delivered = await sim.deliveries()
    assert refused not in delivered
    assert len(delivered) == 199 and set(delivered.values()) == {1}
    error = await pool.fetchval(
        """SELECT d.last_error FROM deliveries d JOIN recipients r ON r.id = d.recipient_id
           WHERE d.campaign_id = $1 AND r.email = $2""",
        spec.campaign_id,
        refused,
    )
    assert error.startswith("HTTP 422")


async def test_unknown_audience_fails_the_workflow_at_once(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl
) -> None:
    org = await make_org(pool)
    spec = make_spec(org, "no-such-audience")

    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()

    assert "has no audience named 'no-such-audience'" in str(failure.value.cause)
    attempts = [
        event.activity_task_started_event_attributes.attempt
        async for event in handle.fetch_history_events()
        if event.HasField("activity_task_started_event_attributes")
    ]
    assert attempts == [1]  # non-retryable: no second attempt


async def test_api_key_never_reaches_workflow_history(
    client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    from tests.conftest import TEST_API_KEY

    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("secret", 30))
    await sim.configure(api_keys=["re_other"])  # make the key appear in an error if it leaks
    spec = make_spec(org, audience)
    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    with pytest.raises(WorkflowFailureError):
        await handle.result()

    history = (await handle.fetch_history()).to_json()
    assert TEST_API_KEY not in history
    assert "refused the API key" in history  # the failure is there, the key is not
    assert "secret.000001@example.com" not in history  # nor any recipient
