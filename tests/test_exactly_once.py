"""Exactly-once when things change between two tries of the same provider request.

These drive the batch-send activity's code directly (as a retry would run it) against
the real ledger and the simulator over HTTP:

* a batch cut short after the provider accepted its requests but before the ledger
  recorded them, then retried after one of its recipients was suppressed;
* a request the provider accepted although it answered 500, retried in the next
  round after a recipient was suppressed and a merge field changed (the provider
  answers 409 for the key it already accepted: that counts as sent);
* a request the provider never accepted, retried after a recipient was suppressed:
  the suppressed recipient is left out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.planning import PlanningActivities
from activities.sending import SendingActivities
from campaigns.models import BatchOutcome, BatchRange, PlanBatchesInput, SendBatchInput
from campaigns.provider import ProviderClient
from campaigns.sender_identity import SendingDomains
from campaigns.settings import Settings
from campaigns.unsubscribe import UnsubscribeLinks
from tests.conftest import TEST_API_KEY
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
)


@pytest.fixture
async def sending(pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[SendingActivities]:
    provider = ProviderClient(settings.provider_base_url or "", SecretStr(TEST_API_KEY))
    domains = SendingDomains(settings.shared_sending_domain, settings.shared_tracking_host)
    yield SendingActivities(
        pool, provider, domains, unsubscribe=UnsubscribeLinks.from_settings(settings)
    )
    await provider.aclose()


def run_batch(sending: SendingActivities, batch: SendBatchInput) -> Awaitable[BatchOutcome]:
    """One attempt of the batch activity, run as Temporal runs it (in an activity context)."""
    return ActivityEnvironment().run(sending.send_batch, batch)


async def prepare(pool: asyncpg.Pool, tmp_path: Path, tag: str, count: int):
    """A prepared campaign over ``count`` new recipients, and its whole id range."""
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses(tag, count))
    spec = make_spec(org, audience, batch_size=10, recipients_per_activity=count)
    plan = await PlanningActivities(pool).prepare_campaign(spec)
    ids = await pool.fetch(
        "SELECT id FROM recipients WHERE audience_id = $1 ORDER BY id", plan.audience_id
    )
    whole = BatchRange(after_id=ids[0]["id"] - 1, last_id=ids[-1]["id"], size=count)
    return spec, plan, whole


def batch_of(
    spec, plan, batch_range: BatchRange, round: int = 0, execution_id: str = "exec-1"
) -> SendBatchInput:
    return SendBatchInput(
        campaign_id=spec.campaign_id,
        execution_id=execution_id,
        audience_id=plan.audience_id,
        source="ledger" if round else "audience",
        round=round,
        range=batch_range,
        batch_size=spec.batch_size,
    )


async def failed_emails(pool: asyncpg.Pool, campaign_id: str) -> list[str]:
    return [
        email
        for email, status in sorted((await ledger(pool, campaign_id)).items())
        if status == "failed"
    ]


async def plan_ranges(pool: asyncpg.Pool, spec, plan, source: str, size: int) -> list[BatchRange]:
    """Keyset ranges of about ``size``, as the workflow would plan them."""
    return await PlanningActivities(pool).plan_batches(
        PlanBatchesInput(
            campaign_id=spec.campaign_id,
            audience_id=plan.audience_id,
            source=source,
            after_id=0,
            recipients_per_activity=size,
            max_batches=20,
        )
    )


async def retry_round(pool: asyncpg.Pool, spec, plan) -> SendBatchInput:
    """The one batch of retry round 1, as the workflow would plan it."""
    pages = await plan_ranges(pool, spec, plan, "ledger", 100)
    assert [page.size for page in pages] == [10]
    return batch_of(spec, plan, pages[0], round=1)


async def suppress(pool: asyncpg.Pool, org: str, email: str) -> None:
    await pool.execute(
        "INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, 'bounced')", org, email
    )


async def ledger(pool: asyncpg.Pool, campaign_id: str) -> dict[str, str]:
    rows = await pool.fetch(
        """SELECT r.email, d.status::text FROM deliveries d
           JOIN recipients r ON r.id = d.recipient_id WHERE d.campaign_id = $1""",
        campaign_id,
    )
    return {row["email"]: row["status"] for row in rows}


async def accepted_then_killed(
    pool: asyncpg.Pool, sending: SendingActivities, sim: SimulatorControl, batch, count: int
) -> None:
    """An attempt whose requests are all accepted, killed before its ledger write (held
    back by a lock), whose heartbeats never reached the server."""
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("LOCK TABLE deliveries IN EXCLUSIVE MODE")
        attempt = asyncio.create_task(run_batch(sending, batch))
        await eventually(
            sim.stats,
            lambda stats: stats["accepted_emails"] == count,
            within=10,
            every=0.02,
            what="every request accepted",
        )
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
    assert await ledger(pool, batch.campaign_id) == {}


async def killed_batch(
    pool: asyncpg.Pool,
    sending: SendingActivities,
    sim: SimulatorControl,
    tmp_path: Path,
    prefix: str,
    count: int,
):
    """A batch over ``count`` new recipients whose first attempt was accepted, then
    killed before its ledger write; returns the address tag, the spec and the batch."""
    tag = f"{prefix}{uuid.uuid4().hex[:6]}"
    spec, plan, whole = await prepare(pool, tmp_path, tag, count)
    batch = batch_of(spec, plan, whole)
    await accepted_then_killed(pool, sending, sim, batch, count)
    return tag, spec, batch


async def test_a_retry_after_a_crash_resends_the_planned_requests_despite_a_new_suppression(
    pool: asyncpg.Pool, sending: SendingActivities, sim: SimulatorControl, tmp_path: Path
) -> None:
    tag, spec, batch = await killed_batch(pool, sending, sim, tmp_path, "wal", 40)

    # Meanwhile the first recipient of the second request bounces elsewhere.
    bounced = addresses(tag, 40)[10]
    await suppress(pool, spec.org, bounced)

    outcome = await run_batch(sending, batch)

    stats = await sim.stats()
    assert stats["accepted_emails"] == 40, stats
    assert stats["duplicated_recipients"] == 0, stats
    assert stats["replays"] == 3, stats  # the untouched requests, replayed by key
    assert outcome.sent == 40 and outcome.suppressed == 0, outcome
    assert set((await ledger(pool, spec.campaign_id)).values()) == {"sent"}
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM provider_requests WHERE campaign_id = $1", spec.campaign_id
        )
        == 0
    ), "the plan is cleared once the outcomes are recorded"


async def test_a_throttled_retry_keeps_the_plan_of_the_attempt_before_it(
    pool: asyncpg.Pool, sending: SendingActivities, sim: SimulatorControl, tmp_path: Path
) -> None:
    tag, spec, batch = await killed_batch(pool, sending, sim, tmp_path, "thr", 25)

    await sim.configure(rate_limit_per_second=0.001)  # the next attempt hears only 429s
    with pytest.raises(ApplicationError, match="rate limit"):
        await run_batch(sending, batch)
    await sim.configure(rate_limit_per_second=None)
    await suppress(pool, spec.org, addresses(tag, 25)[15])
    outcome = await run_batch(sending, batch)

    stats = await sim.stats()
    assert stats["duplicated_recipients"] == 0, stats
    assert stats["accepted_emails"] == 25, stats
    assert outcome.sent == 25, outcome


async def test_a_request_accepted_behind_a_500_is_not_resent_when_its_body_changed(
    pool: asyncpg.Pool, sending: SendingActivities, sim: SimulatorControl, tmp_path: Path
) -> None:
    tag = f"chg{uuid.uuid4().hex[:6]}"
    spec, plan, whole = await prepare(pool, tmp_path, tag, 20)
    await sim.script({"status": 500, "phase": "after"})  # one request: delivered, 500
    first = await run_batch(sending, batch_of(spec, plan, whole))
    assert (first.sent, first.failed) == (10, 10), first

    # Before the retry round: a member of the failed request is suppressed, another
    # one's name changes, so the request's body is not what the provider holds.
    failed = await failed_emails(pool, spec.campaign_id)
    await suppress(pool, spec.org, failed[3])
    await pool.execute(
        "UPDATE recipients SET name = 'Renamed' WHERE audience_id = $1 AND email = $2",
        plan.audience_id,
        failed[5],
    )
    retry = await run_batch(sending, await retry_round(pool, spec, plan))

    stats = await sim.stats()
    assert stats["duplicated_recipients"] == 0, stats
    assert stats["accepted_emails"] == 20, stats
    assert (retry.sent, retry.failed) == (10, 0), retry
    assert set((await ledger(pool, spec.campaign_id)).values()) == {"sent"}


async def test_a_request_never_accepted_leaves_out_a_recipient_suppressed_since(
    pool: asyncpg.Pool, sending: SendingActivities, sim: SimulatorControl, tmp_path: Path
) -> None:
    tag = f"new{uuid.uuid4().hex[:6]}"
    spec, plan, whole = await prepare(pool, tmp_path, tag, 20)
    await sim.script({"status": 500, "phase": "before"})  # one request refused
    first = await run_batch(sending, batch_of(spec, plan, whole))
    assert (first.sent, first.failed) == (10, 10), first

    bounced = (await failed_emails(pool, spec.campaign_id))[2]
    await suppress(pool, spec.org, bounced)
    retry = await run_batch(sending, await retry_round(pool, spec, plan))

    deliveries = await sim.deliveries()
    assert bounced not in deliveries
    assert all(deliveries.get(email) == 1 for email in addresses(tag, 20) if email != bounced)
    assert (retry.sent, retry.suppressed) == (9, 1), retry
    assert (await ledger(pool, spec.campaign_id))[bounced] == "suppressed"


async def test_running_a_campaign_again_resends_each_earlier_failed_request_whole(
    pool: asyncpg.Pool, sending: SendingActivities, sim: SimulatorControl, tmp_path: Path
) -> None:
    tag = f"again{uuid.uuid4().hex[:6]}"
    spec, plan, whole = await prepare(pool, tmp_path, tag, 30)
    await sim.script({"status": 500, "phase": "before"})  # one request of ten refused
    first = await run_batch(sending, batch_of(spec, plan, whole))
    assert (first.sent, first.failed) == (20, 10), first

    # The campaign runs again (a new execution) in ranges of 4: smaller than the
    # failed request, which must still go out whole, under its key.
    ranges = await plan_ranges(pool, spec, plan, "audience", 4)
    again = [
        await run_batch(sending, batch_of(spec, plan, batch_range, execution_id="exec-2"))
        for batch_range in ranges
    ]

    assert sum(outcome.sent for outcome in again) == 10
    assert sum(outcome.skipped for outcome in again) == 20
    deliveries = await sim.deliveries()
    assert all(deliveries.get(email) == 1 for email in addresses(tag, 30)), deliveries
    assert set((await ledger(pool, spec.campaign_id)).values()) == {"sent"}
