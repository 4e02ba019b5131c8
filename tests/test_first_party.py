"""First-party orgs: the set-based refresh, its hourly schedule, and the send path."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import (
    Client,
    ScheduleBackfill,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    WorkflowFailureError,
)
from temporalio.common import SearchAttributeKey

from campaigns.client import CampaignClient
from campaigns.first_party import RefreshRefused, read_current, refresh_first_party_orgs
from campaigns.schedules import (
    BOOTSTRAP_WORKFLOW_ID,
    MAINTENANCE_TASK_QUEUE,
    REFRESH_SCHEDULE_ID,
    apply_refresh_schedule,
    refresh_schedule_handle,
)
from campaigns.settings import Settings
from tests.conftest import migrated_database
from tests.helpers import SimulatorControl, addresses, make_audience, make_spec, unique
from workflows import RefreshFirstPartyOrgsWorkflow

pytestmark = pytest.mark.usefixtures("worker")


async def add_org(
    pool: asyncpg.Pool,
    *,
    token: bool = True,
    flag: str | None = "on",
    verified_domain: str | None = None,
) -> str:
    org = unique("fp")
    await pool.execute(
        "INSERT INTO orgs (id, name, verified_domain) VALUES ($1, $1, $2)", org, verified_domain
    )
    if token:
        await pool.execute(
            "INSERT INTO org_tokens (token, org_id, user_id) VALUES ($1, $2, 'user-1')",
            unique("tok"),
            org,
        )
    if flag is not None:
        await pool.execute(
            "INSERT INTO org_feature_flags (org_id, flag, state) VALUES ($1, 'first_party', $2)",
            org,
            flag,
        )
    return org


async def test_refresh_is_one_statement_and_reports_what_changed(pool: asyncpg.Pool) -> None:
    member = await add_org(pool)
    no_token = await add_org(pool, token=False)
    flag_off = await add_org(pool, flag="off")
    no_flag = await add_org(pool, flag=None)

    async with pool.acquire() as conn:
        statements: list[str] = []

        def log_query(record: object) -> None:
            statements.append(record.query)  # type: ignore[attr-defined]

        conn.add_query_logger(log_query)
        first = await refresh_first_party_orgs(conn)
        conn.remove_query_logger(log_query)
    assert len(statements) == 1  # the whole set, published, in one round trip

    snapshot = await read_current(pool)
    assert snapshot is not None and snapshot.version == first.version
    assert member in snapshot.org_ids
    assert not {no_token, flag_off, no_flag} & snapshot.org_ids
    assert first.size == len(snapshot.org_ids)

    await pool.execute("UPDATE org_feature_flags SET state = 'on' WHERE org_id = $1", flag_off)
    await pool.execute("DELETE FROM orgs WHERE id = $1", member)
    second = await refresh_first_party_orgs(pool)

    assert second.previous_version == first.version and second.version > first.version
    assert (second.added, second.added_count) == ([flag_off], 1)
    assert (second.removed, second.removed_count) == ([member], 1)
    current = await read_current(pool)
    assert current is not None and flag_off in current.org_ids and member not in current.org_ids


async def test_unknown_flag_state_is_refused_and_the_previous_snapshot_stays(
    client: Client, pool: asyncpg.Pool
) -> None:
    await add_org(pool)
    before = await refresh_first_party_orgs(pool)
    odd = await add_org(pool, flag="maybe")
    try:
        with pytest.raises(RefreshRefused, match=f"{odd}=maybe"):
            await refresh_first_party_orgs(pool)
        handle = await client.start_workflow(
            RefreshFirstPartyOrgsWorkflow.run,
            id=unique("refresh"),
            task_queue=MAINTENANCE_TASK_QUEUE,
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        assert "unknown states" in str(failure.value.cause.cause)
        attempts = [
            event.activity_task_started_event_attributes.attempt
            async for event in handle.fetch_history_events()
            if event.HasField("activity_task_started_event_attributes")
        ]
        assert attempts == [1]  # a data problem is not retried
        current = await read_current(pool)
        assert current is not None and current.version == before.version
    finally:
        await pool.execute("DELETE FROM orgs WHERE id = $1", odd)


async def test_an_empty_org_table_is_refused(pg_admin_url: str) -> None:
    async with migrated_database(pg_admin_url) as url:
        conn = await asyncpg.connect(url)
        try:
            with pytest.raises(RefreshRefused, match="orgs table is empty"):
                await refresh_first_party_orgs(conn)
            assert await read_current(conn) is None
        finally:
            await conn.close()


async def test_readers_during_a_refresh_see_the_old_set_or_the_new_one(
    pool: asyncpg.Pool,
) -> None:
    prefix = unique("bulk")
    await pool.execute(
        """WITH new AS (
               INSERT INTO orgs (id, name)
               SELECT $1 || '-' || g, 'Bulk' FROM generate_series(1, 20000) g
               RETURNING id)
           , tokens AS (INSERT INTO org_tokens (token, org_id, user_id)
               SELECT 'tok-' || id, id, 'u' FROM new)
           INSERT INTO org_feature_flags (org_id, flag, state)
           SELECT id, 'first_party', 'on' FROM new""",
        prefix,
    )
    try:
        old = await refresh_first_party_orgs(pool)
        await pool.execute(
            """UPDATE org_feature_flags SET state = 'off'
               WHERE org_id LIKE $1 || '-%' AND right(org_id, 1) IN ('1', '3', '5', '7', '9')""",
            prefix,
        )
        seen: list[tuple[int, int]] = []
        refreshing = asyncio.Event()

        async def read_until_done() -> None:
            while not refreshing.is_set() or len(seen) < 3:
                snapshot = await read_current(pool)
                assert snapshot is not None
                seen.append((snapshot.version, len(snapshot.org_ids)))

        reader = asyncio.create_task(read_until_done())
        new = await refresh_first_party_orgs(pool)
        refreshing.set()
        await reader

        assert new.removed_count == 10000
        assert set(seen) <= {(old.version, old.size), (new.version, new.size)}
        assert len(seen) >= 3
    finally:
        await pool.execute("DELETE FROM orgs WHERE id LIKE $1 || '-%'", prefix)


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
    async with asyncio.timeout(60):
        while True:
            runs = [run async for run in client.list_workflows(query)]
            if len(runs) >= 3 and all(run.close_time for run in runs):
                break
            await asyncio.sleep(0.1)
    assert len(runs) == 3  # one per hour of schedule time
    scheduled_start = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")
    scheduled = sorted(run.typed_search_attributes.get(scheduled_start) for run in runs)
    gaps = [(b - a).total_seconds() for a, b in zip(scheduled, scheduled[1:], strict=False)]
    assert all(3600 - 240 <= gap <= 3600 + 240 for gap in gaps)  # hourly, give or take jitter
    current = await read_current(pool)
    assert current is not None and current.version >= before + 3


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
