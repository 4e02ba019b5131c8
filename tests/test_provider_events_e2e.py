"""The whole loop on the real stack: a campaign sent through Temporal to the simulator,
which posts signed webhooks (duplicates, out of order) to the real HTTP service, which
stores and applies them; bounces and complaints are suppressed for the next campaign."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from temporalio.client import Client

from campaigns.models import CampaignState
from campaigns.settings import Settings
from tests.api_support import WEBHOOK_SECRET, serve_api
from tests.conftest import TASK_QUEUE
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
    unique,
)
from workflows import CampaignWorkflow

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
async def webhooks(settings: Settings, sim: SimulatorControl) -> AsyncIterator[str]:
    """The HTTP service, and the simulator posting its signed webhooks to it."""
    async with serve_api(settings) as url:
        await sim.configure(
            webhook_url=f"{url}/webhooks/resend",
            webhook_secret=WEBHOOK_SECRET,
            webhook_retry_seconds=[0.2, 0.5, 1],
        )
        try:
            yield url
        finally:
            await sim.configure(
                webhook_url=None,
                webhook_secret=None,
                duplicate_rate=0,
                out_of_order_rate=0,
                hard_bounce_addresses=[],
                soft_bounce_addresses=[],
                complaint_addresses=[],
                open_addresses=[],
                click_addresses=[],
            )


async def counters(pool: asyncpg.Pool, campaign_id: str) -> dict[str, int]:
    row = await pool.fetchrow(
        "SELECT * FROM campaign_engagement WHERE campaign_id = $1", campaign_id
    )
    return {k: v for k, v in dict(row or {}).items() if isinstance(v, int)}


async def run(client: Client, spec) -> None:  # noqa: ANN001
    handle = await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=TASK_QUEUE
    )
    assert (await handle.result()).state is CampaignState.COMPLETED


async def test_the_simulators_webhooks_suppress_and_the_next_campaign_skips_them(
    webhooks: str, client: Client, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses(unique("loop"), 200)
    hard, complaint, soft, opener = emails[:2], emails[2:3], emails[3:4], emails[4:10]
    await sim.configure(
        hard_bounce_addresses=hard,
        complaint_addresses=complaint,
        soft_bounce_addresses=soft,
        open_addresses=opener,
        click_addresses=opener[:2],
        duplicate_rate=0.2,
        out_of_order_rate=0.3,
        seed=7,
    )
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    first = make_spec(org, audience)
    await run(client, first)

    expected = {
        "delivered": 197,
        "hard_bounced": 2,
        "soft_bounced": 1,
        "complained": 1,
        "opened": 6,
        "clicked": 2,
    }
    found = await eventually(
        lambda: counters(pool, first.campaign_id),
        lambda c: all(c.get(k) == v for k, v in expected.items()),
        what="every event applied",
    )
    # Duplicates were posted and stored once: nothing was counted twice.
    stats = (await sim._call("GET", "/_sim/webhooks")).json()
    assert stats["duplicates_sent"] > 0
    assert {k: found[k] for k in expected} == expected
    rows = await pool.fetch(
        "SELECT email, reason, campaign_id FROM suppressions WHERE org_id = $1", org
    )
    assert {(r["email"], r["reason"], r["campaign_id"]) for r in rows} == {
        *((email, "bounced", first.campaign_id) for email in hard),
        (complaint[0], "complained", first.campaign_id),
    }
    opened = await pool.fetchval(
        """SELECT count(*) FROM deliveries WHERE campaign_id = $1
           AND opened_at IS NOT NULL AND delivered_at IS NOT NULL""",
        first.campaign_id,
    )
    assert opened == 6  # opened-before-delivered arrivals ended with both set

    await sim.reset()
    second = make_spec(org, audience)
    await run(client, second)
    delivered = await sim.deliveries()
    assert not {*hard, *complaint} & set(delivered)
    assert soft[0] in delivered
    suppressed = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE campaign_id = $1 AND status = 'suppressed'",
        second.campaign_id,
    )
    assert suppressed == 3


async def test_the_service_answers_the_simulators_retries_after_a_restart(
    settings: Settings,
    client: Client,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    """Events posted while the service is down are retried by the simulator (as Svix
    does) and stored once it is back: none is lost."""
    from tests.api_support import free_port

    port = free_port()
    await sim.configure(
        webhook_url=f"http://127.0.0.1:{port}/webhooks/resend",
        webhook_secret=WEBHOOK_SECRET,
        webhook_retry_seconds=[0.3, 0.5, 1, 1, 2, 2, 5, 5, 5],
    )
    try:
        org = await make_org(pool)
        audience, _ = await make_audience(pool, tmp_path, org, addresses(unique("down"), 30))
        spec = make_spec(org, audience)
        await run(client, spec)
        await eventually(
            lambda: sim._call("GET", "/_sim/webhooks"),
            lambda r: r.json()["failed_attempts"] > 0,
            what="refused attempts",
        )
        async with serve_api(settings, api_port=port) as url:
            assert url.endswith(str(port))
            await eventually(
                lambda: counters(pool, spec.campaign_id),
                lambda c: c.get("delivered") == 30,
                what="all deliveries applied",
                within=40,
            )
    finally:
        await sim.configure(webhook_url=None, webhook_secret=None)
    async with httpx.AsyncClient() as http:  # the service is gone again: nothing listens
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/healthz")


async def test_complaints_past_the_limit_pause_the_campaign_and_the_report_tells_it_all(
    webhooks: str,
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    """Complaints posted by the simulator reach the workflow through the service and the
    ledger: the campaign pauses itself with the reason, an operator resumes it, a
    recipient unsubscribes with the message's own one-click link, and the report counts
    every outcome."""
    from campaigns.client import CampaignClient
    from campaigns.unsubscribe import ONE_CLICK

    org = await make_org(pool)
    emails = addresses(unique("spam"), 600)
    complainers = emails[:30:3]  # 10 complaints among the first recipients
    await sim.configure(complaint_addresses=complainers, hard_bounce_addresses=emails[1:2])
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    spec = make_spec(
        org,
        audience,
        window=1,
        rate_per_second=60,
        reputation={"min_delivered": 50, "max_complaint_rate": 0.05, "check_interval_seconds": 1},
    )
    campaigns = CampaignClient(client, settings)
    handle = await campaigns.start(spec)
    paused = await eventually(
        lambda: campaigns.status(handle.id),
        lambda s: s.state is CampaignState.PAUSED,
        what="the campaign paused by the watch",
        within=60,
    )
    assert paused.controls is not None and paused.controls.pause_reason
    assert "complaint rate" in paused.controls.pause_reason
    assert paused.counts.sent < 600  # stopped while sending

    resumed = await campaigns.resume(handle.id)
    assert resumed.state is CampaignState.RUNNING and resumed.controls.pause_reason is None
    final = await handle.result()
    assert final.state is CampaignState.COMPLETED and final.counts.sent == 600

    # A recipient unsubscribes with the link their message carries.
    leaver = emails[-1]
    [message] = await sim.messages(leaver)
    link = message["headers"]["List-Unsubscribe"].split(",")[0].strip("<> ")
    assert link.startswith(settings.unsubscribe_base_url.rstrip("/") + "/u/")
    # The workers' base URL is the public one; this service listens elsewhere.
    link = webhooks + "/u/" + link.rsplit("/", 1)[1]
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            link,
            content=ONE_CLICK,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 200

    report = await eventually(
        lambda: campaigns.report(spec.campaign_id),
        lambda r: r.engagement.delivered == 599,
        what="every delivery counted",
    )
    assert report.ledger.sent == 600
    assert report.engagement.complained == 10
    assert report.engagement.hard_bounced == 1
    assert report.engagement.unsubscribed == 1
    assert report.rates.complained == pytest.approx(10 / 599)
