"""Operable under faults: a worker killed in a database step, a database that goes away.

Workers here are real processes (``python worker.py``) on a task queue of their own;
they are SIGKILLed while they hold an activity, and the campaign must move again
within seconds on another worker.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHandle

from campaigns.client import CampaignClient
from campaigns.models import CampaignState
from campaigns.settings import Settings
from tests.helpers import SimulatorControl, addresses, make_audience, make_org, make_spec
from tests.test_crash_recovery import WorkerProcess, poll, worker_process  # noqa: F401

MAX_QUIET_SECONDS = 15.0
"""Longest a campaign may stand still after the worker holding its activity died."""


async def started(worker: WorkerProcess) -> WorkerProcess:
    """Start ``worker`` and wait until it polls its task queue."""
    await worker.start()

    async def ready() -> bool:
        return "worker started" in worker.log()

    await poll(ready, within=60)
    return worker


async def waiting_on_lock(conn: asyncpg.Connection) -> bool:
    """Whether a session of this database waits for a lock (the held activity's query)."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def held_by(handle: WorkflowHandle, activity_type: str, worker: WorkerProcess) -> bool:
    """Whether ``worker`` runs ``activity_type`` for the campaign right now."""
    assert worker.process is not None
    description = await handle.describe()
    return any(
        pending.activity_type.name == activity_type
        and pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        and pending.last_worker_identity.startswith(f"{worker.process.pid}@")
        for pending in description.raw_description.pending_activities
    )


async def settled(handle: WorkflowHandle) -> bool:
    """Whether the workflow has no activity and no workflow task pending."""
    raw = (await handle.describe()).raw_description
    return not raw.pending_activities and not raw.HasField("pending_workflow_task")


async def kill_while_holding(
    database_url: str,
    handle: WorkflowHandle,
    activity_type: str,
    holder: WorkerProcess,
    spare: WorkerProcess,
    step: Callable[[], Awaitable[None]],
    moved: Callable[[], Awaitable[bool]],
) -> float:
    """Block ``activity_type`` on a lock, SIGKILL ``holder`` while it runs it, release
    the lock, and return the seconds until ``moved()`` says the campaign moves again.

    ``step`` makes the workflow run the activity (after the lock is taken).
    """
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE recipients IN ACCESS EXCLUSIVE MODE")
        try:
            await step()

            async def blocked() -> bool:
                return await held_by(handle, activity_type, holder) and await waiting_on_lock(conn)

            await poll(blocked, within=60)
            await started(spare)
            assert await holder.signal(signal.SIGKILL) == -signal.SIGKILL
            killed_at = time.monotonic()
        finally:
            await transaction.rollback()
    finally:
        await conn.close()
    await poll(moved, within=60)
    return time.monotonic() - killed_at


async def test_a_worker_killed_in_a_database_step_stalls_the_campaign_for_seconds_only(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
    worker_process: Callable[[], WorkerProcess],  # noqa: F811
) -> None:
    org = await make_org(pool)
    emails = addresses("stall", 200)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    spec = make_spec(org, audience, window=2, recipients_per_activity=100)
    first = await started(worker_process())
    queue = first.env["CAMPAIGNS_TASK_QUEUE"]
    campaigns = CampaignClient(client, settings.model_copy(update={"task_queue": queue}))
    started_handles: list[WorkflowHandle] = []

    async def start_paused() -> None:
        started_handles.append(await campaigns.start(spec))
        await campaigns.pause(spec.campaign_id)

    # prepare_campaign counts the audience: it waits on the lock. Pausing meanwhile
    # keeps plan_batches from running once it is done.
    handle = client.get_workflow_handle(spec.campaign_id)
    second = worker_process()

    async def prepared() -> bool:
        # The workflow itself moved on (no task left for the dead worker), not just a
        # query's replay of it.
        if not await settled(handle):
            return False
        status = await campaigns.status(spec.campaign_id)
        return status.state is CampaignState.PAUSED and status.total == 200

    quiet = await kill_while_holding(
        settings.database_url or "",
        handle,
        "prepare_campaign",
        first,
        second,
        start_paused,
        prepared,
    )
    assert quiet < MAX_QUIET_SECONDS, f"prepare_campaign stood still {quiet:.1f}s"

    # plan_batches pages the audience: resumed, it waits on the lock too.
    third = worker_process()

    async def resume() -> None:
        await campaigns.resume(spec.campaign_id)

    async def sending() -> bool:
        return (await sim.stats())["accepted_emails"] > 0

    quiet = await kill_while_holding(
        settings.database_url or "", handle, "plan_batches", second, third, resume, sending
    )
    assert quiet < MAX_QUIET_SECONDS, f"plan_batches stood still {quiet:.1f}s"

    result = await asyncio.wait_for(started_handles[0].result(), timeout=60)
    assert result.state is CampaignState.COMPLETED
    assert result.counts.sent == 200
    assert set((await sim.deliveries()).values()) == {1}
