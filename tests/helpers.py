"""Helpers for tests: simulator control over HTTP, audiences, specs."""

from __future__ import annotations

import asyncio
import csv
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx

from campaigns.audience_import import ImportReport, import_audience
from campaigns.models import CampaignSpec


class SimulatorControl:
    """The simulator's admin API, authenticated with its admin token."""

    def __init__(self, http: httpx.AsyncClient, admin_token: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {admin_token}"}

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, path, headers=self.headers, **kwargs)
        response.raise_for_status()
        return response

    async def reset(self) -> None:
        await self._call("POST", "/_sim/reset")

    async def configure(self, **fields: Any) -> None:
        await self._call("PUT", "/_sim/config", json=fields)

    async def script(self, *faults: dict[str, Any]) -> None:
        await self._call("POST", "/_sim/faults", json=list(faults))

    async def stats(self) -> dict[str, Any]:
        return (await self._call("GET", "/_sim/stats")).json()

    async def deliveries(self) -> dict[str, int]:
        return (await self._call("GET", "/_sim/deliveries")).json()

    async def messages(self, to: str) -> list[dict[str, Any]]:
        return (await self._call("GET", "/_sim/messages", params={"to": to})).json()


T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], object] = bool,
    *,
    within: float = 30.0,
    every: float = 0.05,
    what: str = "the condition",
) -> T:
    """Poll ``probe`` until ``until(value)`` holds; return that value.

    The one way tests wait for state that lives in other processes (Temporal, the
    database, the simulator): bounded by ``within`` seconds, failing with the last
    value seen rather than hanging.
    """
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {within:g}s (last: {value!r})")
        await asyncio.sleep(every)


def unique(prefix: str) -> str:
    """A short unique name, so tests never share orgs, audiences or campaigns."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def addresses(tag: str, count: int) -> list[str]:
    return [f"{tag}.{n:06d}@example.com" for n in range(1, count + 1)]


async def make_org(pool: asyncpg.Pool, org: str | None = None) -> str:
    org = org or unique("org")
    await pool.execute("INSERT INTO orgs (id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING", org)
    return org


async def make_audience(
    pool: asyncpg.Pool, tmp_path: Path, org: str, emails: list[str], name: str | None = None
) -> tuple[str, ImportReport]:
    """Import ``emails`` (with name and city columns) through the real CSV importer."""
    name = name or unique("aud")
    path = write_csv(
        tmp_path / f"{name}.csv",
        ["email", "name", "city"],
        [[email, f"Reader {n}", "Lisbon"] for n, email in enumerate(emails, 1)],
    )
    async with pool.acquire() as conn:
        report = await import_audience(conn, org, name, path)
    return name, report


def make_spec(org: str, audience: str, **overrides: Any) -> CampaignSpec:
    fields: dict[str, Any] = {
        "campaign_id": unique("camp"),
        "org": org,
        "audience": audience,
        "from_address": "News <news@example.com>",
        "subject": "Hello {{ name }}",
        "html": "<p>Hi {{ name }} from {{ city }}</p>",
        "text": "Hi {{ name }}",
        "window": 4,
        "recipients_per_activity": 100,
        "batch_size": 25,
        "retry_delays_seconds": [1, 1],
    }
    fields.update(overrides)
    return CampaignSpec.model_validate(fields)
