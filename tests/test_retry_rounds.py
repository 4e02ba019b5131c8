"""Retry rounds of soft-failed recipients on durable timers: 5, 15, 45 and 135 minutes,
then abandoned. Runs on the time-skipping test server, so hours pass in seconds."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.api.enums.v1 import EventType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from campaigns import search_attributes as sa
from campaigns.binaries import temporal_test_server
from campaigns.client import CampaignClient
from campaigns.models import DEFAULT_RETRY_DELAYS, CampaignState
from campaigns.provider import ProviderClient
from campaigns.settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers import SimulatorControl, addresses, make_audience, make_org, make_spec


@pytest.fixture(scope="module")
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=temporal_test_server(),
        data_converter=pydantic_data_converter,
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace="default",
            search_attributes={key.name: key.indexed_value_type for key in sa.ALL},
        )
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="module")
async def skipping_client(
    skipping_env: WorkflowEnvironment, settings: Settings, pool: asyncpg.Pool
) -> AsyncIterator[CampaignClient]:
    from worker import build_workers, running

    queue_settings = settings.model_copy(update={"task_queue": "campaigns-time-skipping"})
    provider = ProviderClient(settings.provider_base_url or "", SecretStr(TEST_API_KEY))
    async with running(build_workers(skipping_env.client, queue_settings, pool, provider)):
        yield CampaignClient(skipping_env.client, queue_settings)
    await provider.aclose()


async def timer_delays(client: Client, workflow_id: str) -> list[float]:
    delays = []
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if (
            event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
            # The reputation watch's timers are not retry rounds.
            and event.user_metadata.summary.data != b'"reputation check"'
        ):
            delays.append(event.timer_started_event_attributes.start_to_fire_timeout.seconds)
    return delays


async def test_default_rounds_wait_5_15_45_135_minutes_then_succeed(
    skipping_client: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    emails = addresses("rounds", 40)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    # The one request fails in the first pass and the first three retry rounds.
    await sim.script(*[{"status": 503}] * 4)
    spec = make_spec(org, audience, batch_size=100, retry_delays_seconds=list(DEFAULT_RETRY_DELAYS))

    started = time.monotonic()
    result = await (await skipping_client.start(spec)).result()

    assert time.monotonic() - started < 60  # 200 minutes of timers, skipped
    assert result.state is CampaignState.COMPLETED
    assert result.round == 4
    assert result.counts.sent == 40 and result.counts.abandoned == 0
    assert await timer_delays(skipping_client.temporal, spec.campaign_id) == [
        300,
        900,
        2700,
        8100,
    ]
    delivered = await sim.deliveries()
    assert sorted(delivered) == sorted(emails) and set(delivered.values()) == {1}
    assert (
        await pool.fetchval(
            "SELECT max(attempts) FROM deliveries WHERE campaign_id = $1", spec.campaign_id
        )
        == 5
    )


async def test_still_failing_after_the_last_round_is_abandoned(
    skipping_client: CampaignClient, pool: asyncpg.Pool, sim: SimulatorControl, tmp_path: Path
) -> None:
    org = await make_org(pool)
    audience, _ = await make_audience(pool, tmp_path, org, addresses("gone", 30))
    await sim.configure(error_rate_before=1.0)
    spec = make_spec(org, audience, batch_size=100, retry_delays_seconds=list(DEFAULT_RETRY_DELAYS))

    result = await (await skipping_client.start(spec)).result()

    assert result.state is CampaignState.COMPLETED
    assert result.counts.abandoned == 30 and result.counts.sent == 0
    assert result.round == 4
    rows = await pool.fetch(
        "SELECT status::text, attempts FROM deliveries WHERE campaign_id = $1", spec.campaign_id
    )
    assert {(row["status"], row["attempts"]) for row in rows} == {("abandoned", 5)}
    assert (await sim.stats())["responses"] == {"500": 5}
