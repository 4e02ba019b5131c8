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
