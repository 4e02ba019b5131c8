"""Operable under faults: a worker killed in a database step, a database that goes away.

Workers here are real processes (``python worker.py``) on a task queue of their own;
they are SIGKILLed while they hold an activity, and the campaign must move again
within seconds on another worker.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHandle

from campaigns.client import CampaignClient
from campaigns.models import CampaignState
from campaigns.settings import Settings
from tests.helpers import SimulatorControl, addresses, make_audience, make_org, make_spec
from tests.test_crash_recovery import poll, worker_process  # noqa: F401
from tests.worker_support import WorkerProcess

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
    # keeps the plan of its first page from running once it is done.
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

    # plan_sends pages the audience: resumed, it waits on the lock too.
    third = worker_process()

    async def resume() -> None:
        await campaigns.resume(spec.campaign_id)

    async def sending() -> bool:
        return (await sim.stats())["accepted_emails"] > 0

    quiet = await kill_while_holding(
        settings.database_url or "", handle, "plan_sends", second, third, resume, sending
    )
    assert quiet < MAX_QUIET_SECONDS, f"plan_sends stood still {quiet:.1f}s"

    result = await asyncio.wait_for(started_handles[0].result(), timeout=60)
    assert result.state is CampaignState.COMPLETED
    assert result.counts.sent == 200
    assert set((await sim.deliveries()).values()) == {1}


class Forwarder:
    """A TCP forwarder on a fixed local port to ``target``; ``cut()`` drops every
    connection and stops listening, as a network fault or a server going away would."""

    def __init__(self, port: int, target: str) -> None:
        # ``host:port``, or ``unix:PATH`` for a server that listens on a socket file only
        # (the embedded PostgreSQL).
        self.port, self.target = port, target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Forwarder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.target.startswith("unix:"):
                opened = await asyncio.open_unix_connection(self.target.removeprefix("unix:"))
            else:
                host, _, target_port = self.target.rpartition(":")
                opened = await asyncio.open_connection(host.strip("[]"), int(target_port))
            upstream_reader, upstream_writer = opened
        except OSError:
            writer.close()
            return
        self.writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_port(database_url: str, port: int) -> str:
    """``database_url`` pointed at 127.0.0.1:``port``."""
    parts = urlsplit(database_url)
    user = f"{parts.username}@" if parts.username else ""
    if parts.password:
        user = f"{parts.username}:{parts.password}@"
    # A socket directory in the query (the embedded server) would win over the netloc.
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}", query=query))


def upstream_of(database_url: str) -> str:
    """Where ``database_url``'s server listens: ``host:port`` or ``unix:PATH``."""
    parts = urlsplit(database_url)
    socket_dir = dict(parse_qsl(parts.query)).get("host", "")
    if socket_dir.startswith("/"):
        return f"unix:{socket_dir}/.s.PGSQL.{parts.port or 5432}"
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"


async def test_worker_waits_for_postgresql_and_temporal_then_starts(
    settings: Settings,
    worker_process: Callable[[], WorkerProcess],  # noqa: F811
) -> None:
    database_url = settings.database_url or ""
    pg_port, temporal_port = free_port(), free_port()
    worker = worker_process()
    worker.env["DATABASE_URL"] = with_port(database_url, pg_port)
    worker.env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{temporal_port}"
    await worker.start()
    assert worker.process is not None

    def logged(text: str, times: int = 1) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            assert worker.process is not None and worker.process.returncode is None, worker.log()
            return worker.log().count(text) >= times

        return check

    # Nothing listens yet: it says what it waits for, backs off, and stays up.
    await poll(logged("waiting for PostgreSQL", times=2), within=60)
    forwarders = [await Forwarder(pg_port, upstream_of(database_url)).start()]
    try:
        await poll(logged(f"waiting for Temporal at 127.0.0.1:{temporal_port}", 2), within=60)
        forwarders.append(await Forwarder(temporal_port, settings.temporal_address).start())
        await poll(logged("worker started"), within=60)
        assert await worker.signal(signal.SIGTERM) == 0
        assert "worker stopped" in worker.log()
    finally:
        for forwarder in forwarders:
            await forwarder.cut()


async def test_a_configuration_error_stops_the_worker_at_once_with_the_reason(
    settings: Settings,
    worker_process: Callable[[], WorkerProcess],  # noqa: F811
) -> None:
    worker = worker_process()
    worker.env["WORKER_QUEUES"] = "campaigns,bogus"
    await worker.start()
    assert worker.process is not None
    assert await asyncio.wait_for(worker.process.wait(), timeout=60) == 2
    assert "unknown worker queue(s) bogus" in worker.log()
    assert "waiting for" not in worker.log()


async def test_a_database_outage_mid_campaign_fails_short_and_clear_then_resumes(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
    worker_process: Callable[[], WorkerProcess],  # noqa: F811
) -> None:
    org = await make_org(pool)
    emails = addresses("outage", 400)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await sim.configure(latency_ms=20)
    spec = make_spec(org, audience, window=2, recipients_per_activity=50, batch_size=25)
    database_url = settings.database_url or ""
    port = free_port()
    database = await Forwarder(port, upstream_of(database_url)).start()
    worker = worker_process()
    worker.env["DATABASE_URL"] = with_port(database_url, port)
    await worker.start()
    queue = worker.env["CAMPAIGNS_TASK_QUEUE"]
    campaigns = CampaignClient(client, settings.model_copy(update={"task_queue": queue}))
    handle = await campaigns.start(spec)
    await poll(lambda: _accepted_some(sim), within=60)

    await database.cut()  # the database goes away mid-campaign
    try:

        async def a_batch_failed() -> bool:
            pending = (await handle.describe()).raw_description.pending_activities
            return any(activity.attempt >= 2 for activity in pending)

        await poll(a_batch_failed, within=60)
        pending = (await handle.describe()).raw_description.pending_activities
        failure = next(a.last_failure for a in pending if a.attempt >= 2)
    finally:
        database = await Forwarder(port, upstream_of(database_url)).start()  # and comes back
    try:
        result = await asyncio.wait_for(handle.result(), timeout=120)
    finally:
        await database.cut()

    assert len(failure.message) <= 1000, failure.message
    assert "@" not in failure.message
    assert result.state is CampaignState.COMPLETED and result.counts.sent == 400
    assert set((await sim.deliveries()).values()) == {1}
    history = (await handle.fetch_history()).to_json()
    assert "Failure exceeds size limit" not in history
    assert "outage.000001@example.com" not in history


async def _accepted_some(sim: SimulatorControl) -> bool:
    return (await sim.stats())["accepted_emails"] > 0
