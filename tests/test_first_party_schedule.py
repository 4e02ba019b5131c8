"""First-party orgs: the hourly Temporal Schedule that runs the refresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from temporalio.client import (
    Client,
    ScheduleBackfill,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
)
from temporalio.common import SearchAttributeKey

from campaigns.first_party import (
    read_current,
    refresh_first_party_orgs,
)
from campaigns.schedules import (
    MAINTENANCE_TASK_QUEUE,
    REFRESH_SCHEDULE_ID,
    apply_refresh_schedule,
    refresh_schedule_handle,
)
from tests.first_party_support import (
    add_org,
    workflows_matching,
)
from tests.helpers import eventually

pytestmark = pytest.mark.usefixtures("worker")


async def test_schedule_apply_is_idempotent_with_the_right_spec(client: Client) -> None:
    assert await apply_refresh_schedule(client) in ("created", "updated")
    handle = refresh_schedule_handle(client)
    await handle.pause(note="kept across apply")
    assert await apply_refresh_schedule(client) == "updated"

    schedules = [s async for s in await client.list_schedules() if s.id == REFRESH_SCHEDULE_ID]
    assert len(schedules) == 1
    description = await handle.describe()
    schedule = description.schedule
    assert [
        spec.every for spec in schedule.spec.intervals if isinstance(spec, ScheduleIntervalSpec)
    ] == [timedelta(hours=1)]
    assert schedule.spec.jitter == timedelta(minutes=2)
    assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    assert schedule.policy.catchup_window == timedelta(minutes=30)
    assert schedule.action.workflow == "RefreshFirstPartyOrgsWorkflow"
    assert schedule.action.task_queue == MAINTENANCE_TASK_QUEUE
    assert schedule.state.paused and schedule.state.note == "kept across apply"
    await handle.unpause()


async def test_schedule_runs_the_refresh_once_per_hour_of_schedule_time(
    client: Client, pool: asyncpg.Pool
) -> None:
    await add_org(pool)
    await apply_refresh_schedule(client)
    handle = refresh_schedule_handle(client)
    before = (await read_current(pool) or await refresh_first_party_orgs(pool)).version
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=3, minutes=30), hour - timedelta(minutes=30)

    await handle.backfill(
        ScheduleBackfill(start_at=start, end_at=end, overlap=ScheduleOverlapPolicy.BUFFER_ALL)
    )

    query = (
        f"TemporalScheduledById = '{REFRESH_SCHEDULE_ID}' "
        f"AND TemporalScheduledStartTime >= '{start.isoformat()}' "
        f"AND TemporalScheduledStartTime < '{end.isoformat()}'"
    )
    runs = await eventually(
        lambda: workflows_matching(client, query),
        lambda runs: len(runs) >= 3 and all(run.close_time for run in runs),
        within=60,
        every=0.1,
        what="three closed runs",
    )
    assert len(runs) == 3  # one per hour of schedule time
    scheduled_start = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")
    scheduled = sorted(run.typed_search_attributes.get(scheduled_start) for run in runs)
    gaps = [(b - a).total_seconds() for a, b in zip(scheduled, scheduled[1:], strict=False)]
    assert all(3600 - 240 <= gap <= 3600 + 240 for gap in gaps)  # hourly, give or take jitter
    current = await read_current(pool)
    assert current is not None and current.version >= before + 3
