"""First-party orgs: the set-based refresh, its hourly schedule, and the send path."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from time import perf_counter

import asyncpg
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs
from temporalio.client import (
    Client,
    ScheduleBackfill,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    WorkflowFailureError,
)
from temporalio.common import SearchAttributeKey
from temporalio.worker import Worker

from activities.maintenance import DATABASE_UNAVAILABLE_ERROR, MaintenanceActivities
from campaigns import db, first_party
from campaigns.client import CampaignClient
from campaigns.first_party import (
    FirstPartySnapshotCache,
    RefreshRefused,
    read_current,
    refresh_first_party_orgs,
)
from campaigns.provider import ProviderClient
from campaigns.schedules import (
    BOOTSTRAP_WORKFLOW_ID,
    MAINTENANCE_TASK_QUEUE,
    REFRESH_SCHEDULE_ID,
    apply_refresh_schedule,
    refresh_schedule_handle,
)
from campaigns.settings import Settings
from tests.conftest import TEST_API_KEY, migrated_database
from tests.helpers import SimulatorControl, addresses, eventually, make_audience, make_spec, unique
from worker import build_workers, running
from workflows import RefreshFirstPartyOrgsWorkflow

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
async def own_db(pg_admin_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database of the test's own: no other test's orgs or snapshots."""
    async with migrated_database(pg_admin_url) as url:
        pool = await db.create_pool(url, max_size=5)
        try:
            yield pool
        finally:
            await pool.close()


async def workflows_matching(client: Client, query: str) -> list:
    """The executions a visibility query lists now."""
    return [run async for run in client.list_workflows(query)]


async def pending_activities(handle) -> list:
    """The workflow's pending activities, as the server describes them."""
    return list((await handle.describe()).raw_description.pending_activities)


async def wait_until_blocked_on_a_lock(pool: asyncpg.Pool, pid: int) -> None:
    """Poll until backend ``pid`` waits on a lock (its statement is mid-way)."""
    query = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
    await eventually(
        lambda: pool.fetchval(query, pid),
        lambda wait: wait == "Lock",
        within=10,
        every=0.01,
        what=f"backend {pid} waiting on a lock",
    )


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


async def test_an_empty_org_table_is_refused_and_the_previous_snapshot_stays(
    own_db: asyncpg.Pool,
) -> None:
    with pytest.raises(RefreshRefused, match="orgs table is empty"):
        await refresh_first_party_orgs(own_db)
    assert await read_current(own_db) is None

    org = await add_org(own_db)
    before = await refresh_first_party_orgs(own_db)
    await own_db.execute("DELETE FROM orgs")
    with pytest.raises(RefreshRefused, match="orgs table is empty"):
        await refresh_first_party_orgs(own_db)
    current = await read_current(own_db)
    assert current is not None
    assert (current.version, current.org_ids) == (before.version, frozenset({org}))


async def test_a_new_org_shows_up_in_added_and_an_unchanged_set_reports_no_change(
    own_db: asyncpg.Pool,
) -> None:
    await add_org(own_db)
    await add_org(own_db, flag="off")
    first = await refresh_first_party_orgs(own_db)
    assert (first.previous_version, first.added_count, first.size) == (None, 1, 1)

    new = await add_org(own_db)
    second = await refresh_first_party_orgs(own_db)
    assert (second.added, second.added_count, second.removed, second.removed_count) == (
        [new],
        1,
        [],
        0,
    )
    assert second.size == 2 and second.previous_version == first.version

    third = await refresh_first_party_orgs(own_db)  # same set: the diff is skipped
    assert third.published and third.previous_version == second.version
    assert (third.added_count, third.removed_count, third.size) == (0, 0, 2)


@pytest.mark.parametrize(
    ("seconds", "level", "event"),
    [(0.7, "warning", "first-party refresh slow"), (1.2, "error", "first-party refresh very slow")],
)
async def test_a_slow_refresh_logs_a_warning_and_a_very_slow_one_an_error_with_the_counts(
    own_db: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    seconds: float,
    level: str,
    event: str,
) -> None:
    await add_org(own_db)
    await add_org(own_db, flag="off")
    ticks = iter([1000.0, 1000.0 + seconds])
    monkeypatch.setattr(first_party, "perf_counter", lambda: next(ticks))

    with capture_logs() as logs:
        result = await refresh_first_party_orgs(own_db)

    [entry] = [e for e in logs if str(e["event"]).startswith("first-party")]
    assert (entry["log_level"], entry["event"]) == (level, event)
    assert entry["duration_ms"] == pytest.approx(seconds * 1000)
    assert entry["size"] == 1 and entry["version"] == result.version
    assert (entry["added_count"], entry["removed_count"]) == (1, 0)


async def test_a_database_outage_is_retried_with_a_clear_error_and_the_snapshot_stays(
    client: Client, own_db: asyncpg.Pool
) -> None:
    await add_org(own_db)
    before = await refresh_first_party_orgs(own_db)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{port}/test", min_size=0)
    queue = unique("maintenance")
    async with Worker(
        client,
        task_queue=queue,
        workflows=[RefreshFirstPartyOrgsWorkflow],
        activities=[MaintenanceActivities(down).refresh_first_party_orgs],
    ):
        handle = await client.start_workflow(
            RefreshFirstPartyOrgsWorkflow.run, id=unique("refresh-db-down"), task_queue=queue
        )
        try:
            pending = await eventually(
                lambda: pending_activities(handle),
                lambda pending: pending and pending[0].attempt >= 2,
                within=30,
                every=0.1,
                what="a second attempt",
            )
        finally:
            await handle.terminate()
    await down.close()

    failure = pending[0].last_failure
    assert "could not reach the database" in failure.message
    assert "ConnectionRefusedError" in failure.message
    assert failure.application_failure_info.type == DATABASE_UNAVAILABLE_ERROR
    assert not failure.application_failure_info.non_retryable  # retried, not given up
    current = await read_current(own_db)
    assert current is not None and current.version == before.version


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

        async def read_until(done: asyncio.Task[object]) -> None:
            while not done.done():
                snapshot = await read_current(pool)
                assert snapshot is not None
                seen.append((snapshot.version, len(snapshot.org_ids)))

        async with pool.acquire() as holder, pool.acquire() as refresher:
            # Holding the pointer row stops the refresh mid-statement: its set is
            # computed and written, the swap waits. Reads now overlap it for certain.
            hold = holder.transaction()
            await hold.start()
            await holder.execute("SELECT 1 FROM first_party_current FOR UPDATE")
            refresh = asyncio.create_task(refresh_first_party_orgs(refresher))
            await wait_until_blocked_on_a_lock(pool, refresher.get_server_pid())
            during = [await read_current(pool) for _ in range(3)]
            reader = asyncio.create_task(read_until(refresh))
            await hold.rollback()
            new = await refresh
            await reader

        assert new.removed_count == 10000 and new.published
        assert all(
            s is not None and (s.version, len(s.org_ids)) == (old.version, old.size) for s in during
        )
        assert set(seen) <= {(old.version, old.size), (new.version, new.size)}
        after = await read_current(pool)
        assert after is not None and (after.version, len(after.org_ids)) == (new.version, new.size)
    finally:
        await pool.execute("DELETE FROM orgs WHERE id LIKE $1 || '-%'", prefix)


async def test_concurrent_refreshes_never_move_the_pointer_back(own_db: asyncpg.Pool) -> None:
    await add_org(own_db)
    await refresh_first_party_orgs(own_db)

    async def race(later_version: int) -> tuple[object, object]:
        """One refresh swaps (uncommitted); another, drawing ``later_version``, swaps after."""
        async with own_db.acquire() as first, own_db.acquire() as second:
            transaction = first.transaction()
            await transaction.start()
            winner = await refresh_first_party_orgs(first)
            # setval stands in for the timing: the second refresh draws its version
            # as if it had started before (lower) or after (higher) the first.
            await own_db.execute(
                "SELECT setval('first_party_snapshot_version', $1)", later_version - 1
            )
            late = asyncio.create_task(refresh_first_party_orgs(second))
            await wait_until_blocked_on_a_lock(own_db, second.get_server_pid())
            await transaction.commit()
            return winner, await late

    await own_db.execute("SELECT setval('first_party_snapshot_version', 100)")
    winner, lower = await race(later_version=51)
    assert (winner.version, lower.version) == (101, 51)
    assert winner.published and not lower.published
    assert (await read_current(own_db)).version == 101  # not moved back to 51

    await own_db.execute("SELECT setval('first_party_snapshot_version', 200)")
    winner, higher = await race(later_version=202)
    assert (winner.version, higher.version) == (201, 202)
    # The higher one read 101 as its previous: publishing it would report a diff
    # against a snapshot that was no longer current.
    assert winner.published and not higher.published and higher.previous_version == 101
    assert (await read_current(own_db)).version == 201

    new = await add_org(own_db)
    after = await refresh_first_party_orgs(own_db)
    assert after.published and after.previous_version == 201 and after.added == [new]
    assert (await read_current(own_db)).version == after.version


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
