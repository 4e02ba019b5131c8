"""The provider account's shared, adaptive send limit on the real stack.

Each test has a database of its own (the account's row is per database) and a task
queue of its own (so the account's send queue, whose Temporal rate limit is the
shared rate, is its own too), a real Temporal dev server, the simulator with a
token-bucket limit, and workers: ``python worker.py`` processes where the number of
processes matters, the same workers in this process elsewhere.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client

from campaigns import store
from campaigns.client import CampaignClient
from campaigns.contract import send_task_queue
from campaigns.first_party import refresh_first_party_orgs
from campaigns.models import CampaignSpec, CampaignState, CampaignStatus
from campaigns.provider import ProviderClient
from campaigns.settings import Settings
from campaigns.store import accounts, orgs
from campaigns.temporal import describe_queue, set_queue_rate_limit
from tests.conftest import TEST_API_KEY, migrated_database
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
    unique,
)
from tests.worker_support import WorkerProcess, worker_processes

pytestmark = pytest.mark.slow


@dataclass
class Setup:
    """One test's database, task queue and settings."""

    url: str
    pool: asyncpg.Pool
    settings: Settings
    client: Client
    tmp_path: Path

    @property
    def sends_queue(self) -> str:
        return send_task_queue(self.settings.task_queue)

    async def limit(self, requests_per_second: float | None) -> None:
        """Configure the account as ``campaigns account set`` does: the row, then the
        queue at once."""
        async with self.pool.acquire() as conn:
            await accounts.set_limits(
                conn,
                accounts.DEFAULT_ACCOUNT,
                requests_per_second=requests_per_second,
                emails_per_second=None,
            )
        account = await self.account()
        await set_queue_rate_limit(self.client, self.sends_queue, account.queue_rate, "test")

    async def account(self) -> accounts.Account:
        async with self.pool.acquire() as conn:
            account = await accounts.get(conn)
        assert account is not None
        return account

    async def audience(self, org: str, count: int) -> str:
        name, report = await make_audience(
            self.pool, self.tmp_path, org, addresses(unique("r"), count)
        )
        assert report.imported == count
        return name

    def spec(self, org: str, audience: str, **overrides: object) -> CampaignSpec:
        fields: dict[str, object] = {
            "batch_size": 100,
            "recipients_per_activity": 2000,
            "window": 16,
            **overrides,
        }
        return make_spec(org, audience, **fields)

    def campaigns(self) -> CampaignClient:
        return CampaignClient(self.client, self.settings)

    async def requests_per_second(
        self, campaign_ids: list[str], since: float, until: float
    ) -> float:
        """Provider requests of these campaigns recorded sent between two database
        clock readings (epoch seconds), per second."""
        count = await self.pool.fetchval(
            """SELECT count(DISTINCT request_key) FROM deliveries
               WHERE campaign_id = ANY($1) AND status = 'sent'
                 AND sent_at >= to_timestamp($2) AND sent_at < to_timestamp($3)""",
            campaign_ids,
            since,
            until,
        )
        return count / (until - since)

    async def now(self) -> float:
        value: float = await self.pool.fetchval("SELECT extract(epoch FROM now())::float8")
        return value

    async def sent(self, campaign_id: str) -> int:
        count: int = await self.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE campaign_id = $1 AND status = 'sent'",
            campaign_id,
        )
        return count


@pytest.fixture
async def setup(
    pg_admin_url: str, settings: Settings, client: Client, tmp_path: Path
) -> AsyncIterator[Setup]:
    async with migrated_database(pg_admin_url) as url:
        pool = await store.create_pool(url, max_size=10)
        # A first-party snapshot from the start: without one the first batches wait
        # seconds for the refresh, and those dispatched meanwhile send together.
        await make_org(pool)
        async with pool.acquire() as conn:
            await refresh_first_party_orgs(conn)
        own = settings.model_copy(update={"database_url": url, "task_queue": unique("limit-q")})
        try:
            yield Setup(url, pool, own, client, tmp_path)
        finally:
            await pool.close()


@pytest.fixture
async def in_process_worker(setup: Setup) -> AsyncIterator[None]:
    from worker import build_workers, running

    provider = ProviderClient(setup.settings.provider_base_url or "", SecretStr(TEST_API_KEY))
    workers = build_workers(setup.client, setup.settings, setup.pool, provider, ("campaigns",))
    async with running(workers):
        yield
    await provider.aclose()


@pytest.fixture
async def processes(setup: Setup) -> AsyncIterator[Callable[..., WorkerProcess]]:
    async with worker_processes(setup.settings, setup.settings.task_queue, setup.tmp_path) as make:
        yield make


async def _finished(campaigns: CampaignClient, campaign_id: str, within: float) -> CampaignStatus:
    status: CampaignStatus = await eventually(
        lambda: campaigns.status(campaign_id), lambda s: s.done, within=within, every=0.2
    )
    return status


async def test_two_worker_processes_and_two_campaigns_share_one_account_limit(
    setup: Setup, sim: SimulatorControl, processes: Callable[..., WorkerProcess]
) -> None:
    """Two campaigns on two worker processes together stay at the account's 15 requests/s
    (the provider would take 1,000), and both processes send."""
    await setup.limit(15)
    org = await make_org(setup.pool)
    first, second = await setup.audience(org, 3_000), await setup.audience(org, 3_000)
    workers = [processes(), processes()]
    for process in workers:
        await process.start()
    campaigns = setup.campaigns()
    specs = [setup.spec(org, first), setup.spec(org, second)]
    for spec in specs:
        await campaigns.start(spec)
    ids = [spec.campaign_id for spec in specs]
    for spec in specs:
        status = await _finished(campaigns, spec.campaign_id, within=60)
        assert status.state is CampaignState.COMPLETED and status.counts.sent == 3_000
    first_sent, last_sent = await setup.pool.fetchrow(
        """SELECT extract(epoch FROM min(sent_at))::float8, extract(epoch FROM max(sent_at))::float8
           FROM deliveries WHERE campaign_id = ANY($1)""",
        ids,
    )
    # 60 requests at 15/s: the first second may hold the queue's full bucket (15) and
    # that second's 15, and the rest go at most 20% over the rate, as checked just
    # below. Measured here: 2.35-2.5 s, 15 requests/s after the first second.
    assert last_sent - first_sent >= (60 - 2 * 15) / (15 * 1.2)
    assert await setup.requests_per_second(ids, first_sent + 1, last_sent) <= 15 * 1.2
    for process in workers:
        assert '"batch done"' in process.log(), "both processes sent batches"
    stats = await sim.stats()
    assert stats["duplicated_recipients"] == 0 and stats["unique_recipients"] == 6_000
    assert (await describe_queue(setup.client, setup.sends_queue)).rate_limit == 7.5  # of 2


async def test_the_rate_backs_off_on_429s_and_climbs_when_the_provider_allows_more(
    setup: Setup, sim: SimulatorControl, in_process_worker: None
) -> None:
    """With 429s only (no ratelimit-* headers), the account's rate falls from its 60
    requests/s ceiling to about the provider's 8, sends everything with no failure,
    then climbs past 20 once the provider allows 30."""
    await sim.configure(rate_limit_per_second=8, rate_limit_headers=False)
    await setup.limit(60)
    org = await make_org(setup.pool)
    # 500 requests: the rate climbs only while the account is busy, and 200 ran out
    # once in CI at 18 of the 20 requests/s waited for.
    audience = await setup.audience(org, 50_000)
    campaigns = setup.campaigns()
    spec = setup.spec(org, audience)
    await campaigns.start(spec)
    backed_off = await eventually(
        setup.account,
        lambda a: a.adaptive.current is not None and a.adaptive.current <= 10,
        within=30,
        every=0.2,
        what="the rate falls to the provider's",
    )
    assert backed_off.adaptive.throttled_at is not None
    await eventually(
        lambda: describe_queue(setup.client, setup.sends_queue),
        # at 10 requests/s or less a batch is one request
        lambda view: view.rate_limit is not None and view.rate_limit <= 10,
        within=10,
        what="the queue's rate limit follows",
    )
    await sim.configure(rate_limit_per_second=30)
    climbed = await eventually(
        setup.account,
        lambda a: (a.adaptive.current or 0) >= 20,
        within=40,
        every=0.2,
        what="the rate climbs when the provider allows more",
    )
    assert climbed.adaptive.current is not None and climbed.adaptive.current <= 60
    status = await _finished(campaigns, spec.campaign_id, within=120)
    assert status.state is CampaignState.COMPLETED
    assert status.counts.sent == 50_000 and status.counts.failed == 0
    assert status.counts.abandoned == 0
    stats = await sim.stats()
    assert stats["responses"].get("429", 0) > 0, "the provider did throttle"
    assert stats["duplicated_recipients"] == 0


async def test_batches_planned_before_a_lower_limit_send_only_what_it_allows(
    setup: Setup, sim: SimulatorControl, processes: Callable[..., WorkerProcess]
) -> None:
    """Under 30 requests/s a batch carries 6 requests; once the limit is 10 (2 a
    dispatch), the batches already planned send two requests an attempt, so the account
    stays at 10 requests/s, and every recipient is sent once."""
    await setup.limit(30)
    assert (await setup.account()).requests_per_batch == 6
    # Slow answers hold the first batches at the provider, so the rest of the first
    # page (planned with 6 requests) starts after the limit drops: at full speed the
    # queue's burst could send the whole page before it.
    await sim.configure(latency_ms=1500)
    org = await make_org(setup.pool)
    audience = await setup.audience(org, 12_000)
    worker = processes()
    await worker.start()
    campaigns = setup.campaigns()
    spec = setup.spec(org, audience)
    await campaigns.start(spec)
    await eventually(
        lambda: setup.pool.fetchval(
            "SELECT count(*) FROM provider_requests WHERE campaign_id = $1", spec.campaign_id
        ),
        lambda planned: planned > 0,
        within=30,
        every=0.05,
        what="the first requests on their way",
    )
    await setup.limit(10)
    changed = await setup.now()
    await sim.configure(latency_ms=0)
    status = await _finished(campaigns, spec.campaign_id, within=120)
    assert status.state is CampaignState.COMPLETED and status.counts.sent == 12_000
    assert status.counts.failed == 0
    last_sent = await setup.pool.fetchval(
        "SELECT extract(epoch FROM max(sent_at))::float8 FROM deliveries WHERE campaign_id = $1",
        spec.campaign_id,
    )
    # The batches held at the provider at the change are recorded up to 1.5 s after it
    # (the ledger's sent_at is when a batch records); from a second later on, 10/s.
    assert last_sent - changed >= 5, "most of the campaign was left for the lower limit"
    rate = await setup.requests_per_second([spec.campaign_id], changed + 2.5, last_sent)
    assert rate <= 10 * 1.2, f"{rate:.1f} requests/s under a limit of 10"
    assert '"batch continues"' in worker.log(), "planned batches went on over several attempts"
    stats = await sim.stats()
    assert stats["duplicated_recipients"] == 0 and stats["unique_recipients"] == 12_000


async def test_advertised_limits_are_taken_at_once(
    setup: Setup, sim: SimulatorControl, in_process_worker: None
) -> None:
    """When the provider advertises its limit (ratelimit-* headers, as Resend does),
    the rate takes it within seconds, up and down, under the configured ceiling."""
    await sim.configure(rate_limit_per_second=12, rate_limit_headers=True)
    await setup.limit(50)
    org = await make_org(setup.pool)
    audience = await setup.audience(org, 20_000)
    campaigns = setup.campaigns()
    spec = setup.spec(org, audience)
    await campaigns.start(spec)
    await eventually(
        setup.account,
        lambda a: a.target_rps == 12,
        within=15,
        every=0.1,
        what="the advertised 12 requests/s is the rate",
    )
    await sim.configure(rate_limit_per_second=25)
    await eventually(
        setup.account,
        lambda a: a.target_rps == 25,
        within=15,
        every=0.1,
        what="the advertised 25 requests/s is the rate",
    )
    await campaigns.cancel(spec.campaign_id)
    await _finished(campaigns, spec.campaign_id, within=30)


async def test_a_429_storm_fails_nothing(
    setup: Setup, sim: SimulatorControl, in_process_worker: None
) -> None:
    """A provider allowing 3 requests/s against a ceiling of 40 and a window of 32
    batches: many 429s, no failed recipient, no retry round, everything sent once."""
    await sim.configure(rate_limit_per_second=3, rate_limit_headers=False)
    await setup.limit(40)
    org = await make_org(setup.pool)
    audience = await setup.audience(org, 3_000)
    campaigns = setup.campaigns()
    spec = setup.spec(org, audience, window=32)
    await campaigns.start(spec)
    status = await _finished(campaigns, spec.campaign_id, within=90)
    assert status.state is CampaignState.COMPLETED
    assert status.counts.sent == 3_000
    assert status.counts.failed == 0 and status.round == 0
    stats = await sim.stats()
    assert stats["responses"].get("429", 0) >= 10
    assert stats["duplicated_recipients"] == 0


async def test_a_priority_raised_live_takes_the_capacity_within_seconds(
    setup: Setup, sim: SimulatorControl, in_process_worker: None
) -> None:
    """Two campaigns at priority 3 share 20 requests/s; one raised to 1 live gets
    nearly all of it within seconds."""
    await setup.limit(20)
    org = await make_org(setup.pool)
    audiences = [await setup.audience(org, 20_000) for _ in range(2)]
    campaigns = setup.campaigns()
    low, high = (setup.spec(org, audience) for audience in audiences)
    for spec in (low, high):
        await campaigns.start(spec)
    await eventually(lambda: setup.sent(high.campaign_id), lambda n: n >= 500, within=30)
    await campaigns.set_priority(high.campaign_id, 1)
    changed = await setup.now()
    await eventually(setup.now, lambda now: now >= changed + 6, within=30, every=0.2)
    high_rate = await setup.requests_per_second([high.campaign_id], changed + 3, changed + 6)
    low_rate = await setup.requests_per_second([low.campaign_id], changed + 3, changed + 6)
    assert high_rate >= 0.8 * (high_rate + low_rate), (high_rate, low_rate)
    assert high_rate + low_rate >= 20 * 0.7
    for spec in (low, high):
        await campaigns.cancel(spec.campaign_id)
    for spec in (low, high):
        await _finished(campaigns, spec.campaign_id, within=30)


async def test_two_orgs_share_the_limit_fairly(
    setup: Setup, sim: SimulatorControl, in_process_worker: None
) -> None:
    """A small org's campaign started with a big org's gets about half of the 20
    requests/s, and finishes long before the big one."""
    await setup.limit(20)
    big_org, small_org = await make_org(setup.pool), await make_org(setup.pool)
    # 60 batches of 2 requests for the small org (20 requests/s: 2 a batch), so the
    # share is measured over many of the queue's turns
    big = setup.spec(big_org, await setup.audience(big_org, 80_000))
    small = setup.spec(small_org, await setup.audience(small_org, 12_000))
    campaigns = setup.campaigns()
    for spec in (big, small):
        await campaigns.start(spec)
    await eventually(lambda: setup.sent(small.campaign_id), lambda n: n >= 300, within=30)
    since = await setup.now()
    status = await _finished(campaigns, small.campaign_id, within=60)
    assert status.counts.sent == 12_000
    until = await setup.now()
    small_rate = await setup.requests_per_second([small.campaign_id], since, until)
    big_rate = await setup.requests_per_second([big.campaign_id], since, until)
    assert small_rate >= 0.35 * (small_rate + big_rate), (small_rate, big_rate)
    assert await setup.sent(big.campaign_id) < 80_000 / 2
    await campaigns.cancel(big.campaign_id)
    await _finished(campaigns, big.campaign_id, within=30)


async def test_a_worker_killed_while_sending_leaves_the_capacity_to_the_others(
    setup: Setup, sim: SimulatorControl, processes: Callable[..., WorkerProcess]
) -> None:
    """SIGKILL one of two worker processes mid-campaign: the account keeps sending at
    its rate on the other (nothing of the limit was held by the dead one), and every
    recipient is sent once."""
    await sim.configure(latency_ms=20)
    await setup.limit(20)
    org = await make_org(setup.pool)
    # 600 requests: 30 s at the rate, so the campaign still sends 16 s after the kill
    audience = await setup.audience(org, 60_000)
    survivor, victim = processes(), processes()
    await survivor.start()
    await victim.start()
    campaigns = setup.campaigns()
    spec = setup.spec(org, audience)
    await campaigns.start(spec)
    await eventually(lambda: setup.sent(spec.campaign_id), lambda n: n >= 3_000, within=60)
    assert await victim.signal(signal.SIGKILL) == -signal.SIGKILL
    killed = await setup.now()
    # The limit itself was never held by the dead worker. What it held: the campaign's
    # workflow task (waiting on its sticky queue: 4 s; started there: the workflow task
    # timeout, 10 s) and the batches it ran, which go back into the queue after their
    # heartbeat timeout (4 s); after that the account is back at its rate.
    await eventually(setup.now, lambda now: now >= killed + 16, within=40, every=0.2)
    rate = await setup.requests_per_second([spec.campaign_id], killed + 12, killed + 16)
    assert rate >= 20 * 0.6, rate
    assert (await setup.account()).target_rps == 20
    status = await _finished(campaigns, spec.campaign_id, within=120)
    assert status.state is CampaignState.COMPLETED and status.counts.sent == 60_000
    stats = await sim.stats()
    assert stats["duplicated_recipients"] == 0


async def test_worker_metrics_show_the_accounts_rate(
    setup: Setup, sim: SimulatorControl, processes: Callable[..., WorkerProcess]
) -> None:
    """A worker's Prometheus endpoint shows the account's current rate and ceiling."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await setup.limit(30)
    org = await make_org(setup.pool)
    audience = await setup.audience(org, 2_000)
    process = processes(metrics_address=f"127.0.0.1:{port}")
    await process.start()
    campaigns = setup.campaigns()
    spec = setup.spec(org, audience)
    await campaigns.start(spec)
    await _finished(campaigns, spec.campaign_id, within=60)

    async def scrape() -> str:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"http://127.0.0.1:{port}/metrics")).text

    text = await eventually(
        scrape, lambda t: "campaigns_account_rate_requests_per_second" in t, within=10
    )
    lines = [line for line in text.splitlines() if line.startswith("campaigns_account_rate")]
    assert any('kind="ceiling"' in line and float(line.split()[-1]) == 30 for line in lines), lines
    assert any('kind="current"' in line for line in lines), lines


async def test_an_orgs_cap_is_shared_by_its_campaigns(
    setup: Setup, sim: SimulatorControl, in_process_worker: None
) -> None:
    """An org capped at 1,500 emails/s runs two campaigns at about 750 each, whatever
    the account (100 requests/s) would allow; the status tells the share."""
    await setup.limit(100)
    org = await make_org(setup.pool)
    async with setup.pool.acquire() as conn:
        assert await orgs.set_emails_per_second(conn, org, 1_500)
    audiences = [await setup.audience(org, 6_000) for _ in range(2)]
    campaigns = setup.campaigns()
    specs = [setup.spec(org, audience) for audience in audiences]
    for spec in specs:
        await campaigns.start(spec)
    shared = await eventually(
        lambda: campaigns.status(specs[0].campaign_id),
        lambda s: s.org_rate_cap == 750,
        within=30,
        what="the first campaign sees half the org's cap",
    )
    assert shared.account_rate == 100
    ids = [spec.campaign_id for spec in specs]
    for spec in specs:
        status = await _finished(campaigns, spec.campaign_id, within=60)
        assert status.counts.sent == 6_000
    first_sent, last_sent = await setup.pool.fetchrow(
        """SELECT extract(epoch FROM min(sent_at))::float8, extract(epoch FROM max(sent_at))::float8
           FROM deliveries WHERE campaign_id = ANY($1)""",
        ids,
    )
    # The account alone would take 1.2 s. A campaign learns of the other's share at its
    # next page (about 2 s at the cap: 3 batches of 800 here), so the first seconds
    # may run above the cap; after that the two together keep to it.
    assert last_sent - first_sent >= 12_000 / 1_500 * 0.6
    steady = await setup.pool.fetchval(
        """SELECT count(*) FROM deliveries WHERE campaign_id = ANY($1) AND status = 'sent'
           AND sent_at >= to_timestamp($2) AND sent_at < to_timestamp($3)""",
        ids,
        first_sent + 3,
        last_sent - 0.5,
    )
    assert steady / (last_sent - 0.5 - first_sent - 3) <= 1_500 * 1.25
