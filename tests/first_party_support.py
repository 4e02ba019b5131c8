"""What the first-party tests share: their own database, orgs, and polls."""

from __future__ import annotations

import asyncpg
from temporalio.client import Client

from tests.helpers import eventually, unique


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
