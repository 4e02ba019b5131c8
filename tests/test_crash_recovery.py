"""Exactly-once under worker crashes and provider faults.

A real worker process (``python worker.py``) is SIGKILLed several times in the middle
of a campaign, at moments when the provider has accepted mail the ledger does not
record yet; a fresh worker then finishes. Every recipient must be delivered exactly
once, counted at the simulator, and the summary must match the ledger.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from campaigns.client import CampaignClient
from campaigns.models import CampaignState
from campaigns.settings import Settings
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


@pytest.fixture
async def worker_process(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[Callable[[], WorkerProcess]]:
    async with worker_processes(settings, unique("crash-queue"), tmp_path) as make:
        yield make


async def ledger_sent(pool: asyncpg.Pool, campaign_id: str) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE campaign_id = $1 AND status = 'sent'", campaign_id
    )


async def poll(condition, within: float = 90) -> None:
    await eventually(condition, within=within, every=0.02)


@pytest.mark.slow
async def test_worker_killed_repeatedly_mid_campaign_delivers_exactly_once(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
    worker_process: Callable[[], WorkerProcess],
) -> None:
    org = await make_org(pool)
    emails = addresses("crash", 3000)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.configure(latency_ms=40, latency_jitter_ms=60)
    spec = make_spec(org, audience, window=4, recipients_per_activity=100, batch_size=25)
    queue_settings = settings.model_copy(
        update={"task_queue": worker_process().env["CAMPAIGNS_TASK_QUEUE"]}
    )
    handle = await CampaignClient(client, queue_settings).start(spec)

    for _ in range(3):
        worker = worker_process()
        await worker.start()
        floor = (await sim.stats())["accepted_emails"] + 200

        async def accepted_but_not_recorded(floor: int = floor) -> bool:
            accepted = (await sim.stats())["accepted_emails"]
            return accepted >= floor and accepted > await ledger_sent(pool, spec.campaign_id)

        await poll(accepted_but_not_recorded)
        assert await worker.signal(signal.SIGKILL) == -signal.SIGKILL

    mid = await sim.stats()
    assert 600 <= mid["accepted_emails"] < 3000
    final_worker = worker_process()
    await final_worker.start()
    result = await handle.result()

    assert result.state is CampaignState.COMPLETED
    assert result.counts.sent == 3000 and result.counts.failed == 0
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails)
    assert set(delivered.values()) == {1}, "a recipient was delivered twice"
    assert await ledger_sent(pool, spec.campaign_id) == 3000
    stats = await sim.stats()
    assert stats["accepted_emails"] == 3000
    # The killed batches were retried: accepted requests were replayed by the provider
    # or skipped thanks to the heartbeat details, never sent again.
    assert stats["replays"] > 0 or "resuming batch" in final_worker.log()


async def test_sigterm_lets_in_flight_batches_finish(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
    worker_process: Callable[[], WorkerProcess],
) -> None:
    org = await make_org(pool)
    emails = addresses("term", 800)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.configure(latency_ms=150)
    spec = make_spec(org, audience, window=2, recipients_per_activity=100, batch_size=25)
    first = worker_process()
    queue_settings = settings.model_copy(update={"task_queue": first.env["CAMPAIGNS_TASK_QUEUE"]})
    handle = await CampaignClient(client, queue_settings).start(spec)
    await first.start()

    async def some_sent() -> bool:
        return (await sim.stats())["accepted_emails"] >= 100

    await poll(some_sent)
    assert await first.signal(signal.SIGTERM) == 0
    assert "worker stopped" in first.log()
    # Whatever was accepted before the worker stopped is in the ledger: nothing dangling.
    assert (await sim.stats())["accepted_emails"] == await ledger_sent(pool, spec.campaign_id)

    await worker_process().start()
    result = await handle.result()
    assert result.counts.sent == 800
    assert set((await sim.deliveries()).values()) == {1}


@pytest.mark.slow
async def test_provider_faults_latency_and_throttling_still_deliver_exactly_once(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
    worker_process: Callable[[], WorkerProcess],
) -> None:
    org = await make_org(pool)
    emails = addresses("fault", 2000)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.configure(
        seed=7,
        latency_ms=5,
        latency_jitter_ms=20,
        error_rate_before=0.15,
        error_rate_after=0.15,
        rate_limit_per_second=20,
    )
    spec = make_spec(
        org, audience, window=6, recipients_per_activity=100, retry_delays_seconds=[1] * 8
    )
    worker = worker_process()
    await worker.start()
    queue_settings = settings.model_copy(update={"task_queue": worker.env["CAMPAIGNS_TASK_QUEUE"]})

    result = await (await CampaignClient(client, queue_settings).start(spec)).result()

    stats = await sim.stats()
    assert stats["responses"].get("429", 0) > 0  # throttling happened ...
    assert stats["responses"].get("500", 0) > 0  # ... and so did both kinds of 500
    assert result.state is CampaignState.COMPLETED
    assert result.counts.sent == 2000
    assert result.counts.abandoned == 0
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails) and set(delivered.values()) == {1}
    # 429s are not failures: only 500s put recipients into retry rounds.
    assert result.round >= 1
