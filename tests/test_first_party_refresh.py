"""First-party orgs: the one-statement refresh, its refusals, and its snapshot swap."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest
from structlog.testing import capture_logs
from temporalio.client import (
    Client,
    WorkflowFailureError,
)
from temporalio.worker import Worker

from activities.maintenance import DATABASE_UNAVAILABLE_ERROR, MaintenanceActivities
from campaigns import first_party
from campaigns.first_party import (
    RefreshRefused,
    read_current,
    refresh_first_party_orgs,
)
from campaigns.schedules import (
    MAINTENANCE_TASK_QUEUE,
)
from tests.first_party_support import (
    add_org,
    pending_activities,
    wait_until_blocked_on_a_lock,
)
from tests.helpers import eventually, unique
from workflows import RefreshFirstPartyOrgsWorkflow

pytestmark = pytest.mark.usefixtures("worker")


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
