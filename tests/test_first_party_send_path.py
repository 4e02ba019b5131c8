"""First-party orgs on the send path: sender identity per batch and the bootstrap refresh."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter

import asyncpg
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs
from temporalio.client import (
    Client,
)

from campaigns.client import CampaignClient
from campaigns.first_party import (
    FirstPartySnapshotCache,
    read_current,
    refresh_first_party_orgs,
)
from campaigns.provider import ProviderClient
from campaigns.schedules import (
    BOOTSTRAP_WORKFLOW_ID,
)
from campaigns.settings import Settings
from tests.conftest import TEST_API_KEY
from tests.first_party_support import (
    add_org,
    workflows_matching,
)
from tests.helpers import SimulatorControl, addresses, eventually, make_audience, make_spec, unique
from worker import build_workers, running

pytestmark = pytest.mark.usefixtures("worker")


async def test_send_path_uses_the_org_domain_for_first_party_and_the_shared_one_otherwise(
    client: Client, settings: Settings, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    first_party = await add_org(pool, verified_domain="brand.example")
    other = await add_org(pool, flag="off", verified_domain="other.example")
    await refresh_first_party_orgs(pool)
    campaigns = CampaignClient(client, settings)
    html = '<p>Hi {{ name }}, <a href="https://shop.example/sale?x=1&amp;y=2">shop</a></p>'

    sent = {}
    for org in (first_party, other):
        emails = addresses(org, 120)
        audience, _ = await make_audience(pool, tmp_path, org, emails)
        spec = make_spec(org, audience, html=html)
        await (await campaigns.start(spec)).result()
        recipient_id = await pool.fetchval("SELECT id FROM recipients WHERE email = $1", emails[0])
        sent[org] = (spec.campaign_id, recipient_id, (await sim.messages(emails[0]))[0])

    campaign_id, recipient_id, message = sent[first_party]
    assert message["from"] == "News <news@brand.example>"
    assert (
        f'href="https://click.brand.example/c/{campaign_id}/{recipient_id}'
        '?u=https%3A%2F%2Fshop.example%2Fsale%3Fx%3D1%26y%3D2"'
    ) in message["html"]
    campaign_id, recipient_id, message = sent[other]
    assert message["from"] == f"News <news@{settings.shared_sending_domain}>"
    assert (
        f'href="https://{settings.shared_tracking_host}/c/{campaign_id}/{recipient_id}?u='
        in (message["html"])
    )


async def test_a_refresh_in_progress_never_blocks_the_send_path(
    client: Client, settings: Settings, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await add_org(pool, verified_domain="steady.example")
    await refresh_first_party_orgs(pool)
    await pool.execute("UPDATE org_feature_flags SET state = 'off' WHERE org_id = $1", org)
    emails = addresses(org, 150)
    audience, _ = await make_audience(pool, tmp_path, org, emails)

    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        pending = await refresh_first_party_orgs(conn)  # written, not yet committed
        assert org in pending.removed
        spec = make_spec(org, audience)
        result = await (await CampaignClient(client, settings).start(spec)).result()
        await transaction.commit()

    assert result.counts.sent == 150
    message = (await sim.messages(emails[0]))[0]
    assert message["from"] == "News <news@steady.example>"  # the snapshot in use at the time


async def test_a_missing_snapshot_causes_one_refresh_not_one_per_batch(
    client: Client, settings: Settings, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await add_org(pool, verified_domain="boot.example")
    emails = addresses(org, 400)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await pool.execute("DELETE FROM first_party_current")
    since = datetime.now(UTC)
    spec = make_spec(org, audience, window=4, recipients_per_activity=50)

    result = await (await CampaignClient(client, settings).start(spec)).result()

    assert result.counts.sent == 400
    query = f"WorkflowId = '{BOOTSTRAP_WORKFLOW_ID}' AND StartTime >= '{since.isoformat()}'"
    assert len([run async for run in client.list_workflows(query)]) == 1
    current = await read_current(pool)
    assert current is not None and org in current.org_ids
    froms = {message["from"] for message in await sim.messages("")}
    assert froms == {"News <news@boot.example>"}


async def test_a_refused_bootstrap_sends_from_the_shared_domain_and_starts_one_refresh(
    client: Client, settings: Settings, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await add_org(pool, verified_domain="refused.example")
    odd = await add_org(pool, flag="maybe")  # every refresh is refused while it exists
    emails = addresses(org, 400)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await pool.execute("DELETE FROM first_party_current")
    since = datetime.now(UTC)
    spec = make_spec(org, audience, window=4, recipients_per_activity=50)
    # A campaign worker of its own, so its bootstrap back-off is not shared with
    # the session's worker.
    own = settings.model_copy(update={"task_queue": unique("campaigns")})
    provider = ProviderClient(settings.provider_base_url or "", SecretStr(TEST_API_KEY))
    try:
        with capture_logs() as logs:
            async with running(build_workers(client, own, pool, provider, queues=["campaigns"])):
                result = await (await CampaignClient(client, own).start(spec)).result()

        assert result.counts.sent == 400
        froms = {message["from"] for message in await sim.messages("")}
        assert froms == {f"News <news@{settings.shared_sending_domain}>"}
        query = f"WorkflowId = '{BOOTSTRAP_WORKFLOW_ID}' AND StartTime >= '{since.isoformat()}'"
        runs = await eventually(
            lambda: workflows_matching(client, query), within=10, every=0.1, what="a bootstrap"
        )
        assert len(runs) == 1  # not one per batch attempt
        warnings = [e for e in logs if e["event"].startswith("no first-party snapshot:")]
        assert len(warnings) == 1 and "unknown states" in warnings[0]["error"]
        assert await read_current(pool) is None
    finally:
        await provider.aclose()
        await pool.execute("DELETE FROM orgs WHERE id = $1", odd)
        await refresh_first_party_orgs(pool)


async def test_a_bootstrap_that_does_not_finish_is_waited_on_briefly_then_backed_off(
    own_db: asyncpg.Pool,
) -> None:
    calls = 0

    async def never_finishes() -> None:  # e.g. no worker on the maintenance queue
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    now = 0.0
    cache = FirstPartySnapshotCache(
        own_db, bootstrap=never_finishes, bootstrap_wait=0.2, clock=lambda: now
    )
    with capture_logs() as logs:
        started = perf_counter()
        batches = await asyncio.gather(*(cache.for_batch() for _ in range(8)))
        waited = perf_counter() - started
        assert batches == [None] * 8 and calls == 1 and waited < 2
        assert await cache.for_batch() is None and calls == 1  # backing off: no wait
        now += 61
        assert await cache.for_batch() is None and calls == 2  # back-off over: one more try
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2 and warnings[0]["error"] == "the refresh did not finish in time"

    org = await add_org(own_db)
    await refresh_first_party_orgs(own_db)
    snapshot = await cache.for_batch()  # a published snapshot is used at once
    assert snapshot is not None and org in snapshot.org_ids and calls == 2
