"""What the benchmarks share: a local stack of their own, audiences, simulator control."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from temporalio.client import Client

from campaigns import store
from campaigns.contract import send_task_queue
from campaigns.settings import Settings
from campaigns.stack import LocalStack, StackConfig
from campaigns.store import accounts
from campaigns.temporal import set_queue_rate_limit

BENCH_ORG = "bench"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class BenchStack:
    """A running stack started for one benchmark run."""

    stack: LocalStack
    state: dict
    pool: asyncpg.Pool
    simulator: httpx.AsyncClient

    @property
    def settings(self) -> Settings:
        return Settings(
            temporal_address=self.state["temporal_address"],
            database_url=self.stack.database_url,
            provider_base_url=self.state["provider_base_url"],
        )

    def worker_pids(self) -> list[int]:
        return [pid for name, pid in self.state["services"].items() if name.startswith("worker")]

    def restart_workers(self) -> None:
        """Fresh worker processes, so each measurement's peak RSS is its own."""
        for child in self.stack.children:
            if child.name.startswith("worker"):
                child.stop(timeout=40)
                started_before = _log_count(child.log_path, "worker started")
                child.start()
                assert child.process is not None
                self.state["services"][child.name] = child.process.pid
                deadline = time.monotonic() + 30
                while _log_count(child.log_path, "worker started") == started_before:
                    if time.monotonic() > deadline or child.process.poll() is not None:
                        raise RuntimeError(f"{child.name} did not start: {child.tail()}")
                    time.sleep(0.05)

    def service_pid(self, name: str) -> int:
        """The pid of one of the stack's services (as ``stack.json`` lists them)."""
        return self.state["services"][name]

    @property
    def private_postgres(self) -> bool:
        """Whether the stack runs its own embedded PostgreSQL (no ``DATABASE_URL``)."""
        return self.stack.config.database_url is None

    def peak_rss_mib(self) -> float:
        """Largest peak resident set (VmHWM) among the workers, in MiB."""
        return max(_vm_hwm(pid) for pid in self.worker_pids()) / 1024

    async def reset_simulator(self, **config: object) -> None:
        (await self.simulator.post("/_sim/reset")).raise_for_status()
        if config:
            (await self.simulator.put("/_sim/config", json=config)).raise_for_status()

    async def simulator_stats(self) -> dict:
        return (await self.simulator.get("/_sim/stats")).json()


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of a process in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


@asynccontextmanager
async def bench_stack(data_dir: Path, workers: int = 1) -> AsyncIterator[BenchStack]:
    """Start a private stack (own ports and data dir) and stop it afterwards."""
    config = StackConfig(
        data_dir=data_dir,
        temporal_port=_free_port(),
        ui_port=_free_port(),
        simulator_port=_free_port(),
        api_port=_free_port(),
        metrics_port=_free_port(),
        workers=workers,
        database_url=os.environ.get("DATABASE_URL") or None,
    )
    stack = LocalStack(config)
    try:
        state = await stack.start()
        assert stack.database_url and stack.simulator_admin_token
        pool = await store.create_pool(stack.database_url, max_size=16)
        # The simulator's admin API (reset, config, stats) needs the stack's admin token.
        admin = {"Authorization": f"Bearer {stack.simulator_admin_token}"}
        async with httpx.AsyncClient(
            base_url=state["provider_base_url"], headers=admin, timeout=60
        ) as sim:
            try:
                yield BenchStack(stack, state, pool, sim)
            finally:
                await pool.close()
    finally:
        stack.stop()


async def ensure_audience(pool: asyncpg.Pool, recipients: int) -> str:
    """A generated audience of ``recipients`` rows (created once, reused after)."""
    name = f"bench-{recipients}"
    await pool.execute(
        "INSERT INTO orgs (id, name) VALUES ($1, 'Bench') ON CONFLICT DO NOTHING", BENCH_ORG
    )
    audience_id = await pool.fetchval(
        """INSERT INTO audiences (org_id, name, merge_fields) VALUES ($1, $2, '{city}')
           ON CONFLICT (org_id, name) DO UPDATE SET updated_at = now() RETURNING id""",
        BENCH_ORG,
        name,
    )
    have = await pool.fetchval(
        "SELECT count(*) FROM recipients WHERE audience_id = $1", audience_id
    )
    if have < recipients:
        started = time.perf_counter()
        await pool.execute(
            """INSERT INTO recipients (audience_id, email, name, merge_fields)
               SELECT $1, 'reader' || g || '@bench.example.com', 'Reader ' || g,
                      jsonb_build_object('city', 'Lisbon')
               FROM generate_series(1, $2) AS g
               ON CONFLICT DO NOTHING""",
            audience_id,
            recipients,
        )
        await pool.execute("ANALYZE recipients")
        print(f"  generated audience of {recipients:,} in {time.perf_counter() - started:.1f}s")
    return name


def _log_count(path: Path, text: str) -> int:
    try:
        return path.read_text(errors="replace").count(text)
    except FileNotFoundError:
        return 0


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of repeated measurements."""
    return statistics.median(values), min(values), max(values)


def spread_dict(values: list[float]) -> dict[str, float]:
    """``spread`` for a JSON result."""
    middle, low, high = spread(values)
    return {"median": middle, "min": low, "max": high}


def format_spread(values: list[float], fmt: str = ",.0f", unit: str = "") -> str:
    """``median (low–high)`` of repeated measurements, e.g. ``21,562 (19,001–23,470)``."""
    middle, low, high = spread(values)
    return f"{middle:{fmt}}{unit} ({low:{fmt}}–{high:{fmt}}{unit})"


# -- shared send limit benchmark helpers ------------------------------------------------

_COPY_CHUNK = 50_000  # rows per COPY data chunk


async def ensure_org_audience(
    pool: asyncpg.Pool, org: str, name: str, recipients: int, *, org_name: str | None = None
) -> str:
    """An audience ``name`` of ``org`` with ``recipients`` generated rows, by COPY.

    The org is created if it is missing (fairness weight 1). Recipient ``g`` is
    ``<org>-<g>@bench.example.com`` with merge field ``city``, so audiences of
    different orgs never share an address. Created once and reused after: when the
    audience holds fewer rows (a smaller earlier run), only the missing ones are added.
    """
    await pool.execute(
        "INSERT INTO orgs (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING", org, org_name or org
    )
    audience_id = await pool.fetchval(
        """INSERT INTO audiences (org_id, name, merge_fields) VALUES ($1, $2, '{city}')
           ON CONFLICT (org_id, name) DO UPDATE SET updated_at = now() RETURNING id""",
        org,
        name,
    )
    have = await pool.fetchval(
        "SELECT count(*) FROM recipients WHERE audience_id = $1", audience_id
    )
    if have >= recipients:
        return name
    started = time.perf_counter()

    async def rows() -> AsyncIterator[bytes]:
        for first in range(have + 1, recipients + 1, _COPY_CHUNK):
            last = min(first + _COPY_CHUNK, recipients + 1)
            yield "".join(
                f'{audience_id}\t{org}-{g}@bench.example.com\tReader {g}\t{{"city": "Lisbon"}}\n'
                for g in range(first, last)
            ).encode()

    async with pool.acquire() as conn, conn.transaction():
        await conn.copy_to_table(
            "recipients",
            source=rows(),
            columns=["audience_id", "email", "name", "merge_fields"],
            format="text",
        )
    await pool.execute("ANALYZE recipients")
    print(
        f"  generated {recipients - have:,} recipients of {org}/{name} by COPY in "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )
    return name


async def forget_campaigns(pool: asyncpg.Pool, campaign_ids: list[str]) -> None:
    """Delete the ledger rows of finished campaigns, so the next phase starts clean."""
    if not campaign_ids:
        return
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM deliveries WHERE campaign_id = any($1)", campaign_ids)
        await conn.execute(
            "DELETE FROM provider_requests WHERE campaign_id = any($1)", campaign_ids
        )
        await conn.execute("DELETE FROM campaigns WHERE id = any($1)", campaign_ids)
        await conn.execute("VACUUM (ANALYZE) deliveries, provider_requests, campaigns")


@dataclass
class SimulatorSample:
    """One reading of the simulator's counters (and the account's rate), wall-clock time."""

    at: float
    accepted_requests: int
    throttled: int
    other: int
    accepted_emails: int
    account_rps: float | None = None
    account_throttled_at: float | None = None


@dataclass
class WindowRates:
    """What the simulator answered between two samples."""

    seconds: float
    requests_per_second: float
    throttled_per_second: float
    emails_per_second: float
    throttled_share: float
    requests: int
    throttled: int


class SimulatorSampler:
    """Polls ``GET /_sim/stats`` (and optionally the account row) in the background.

    Counters are cumulative since the simulator's last reset; rates over a time window
    come from the first sample at or after its start and the last at or before its end.
    ``async with SimulatorSampler(bench) as sampler: ...``
    """

    def __init__(self, bench: BenchStack, every: float = 0.5, account: str | None = None) -> None:
        self._bench = bench
        self._every = every
        self._account = account
        self.samples: list[SimulatorSample] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SimulatorSampler:
        await self.sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sample()

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self._every
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                await self.sample()
            except (httpx.HTTPError, asyncpg.PostgresError, OSError):
                continue  # a missed sample only widens a window

    async def sample(self) -> SimulatorSample:
        stats = await self._bench.simulator_stats()
        at = time.time()
        responses = {int(k): v for k, v in stats["responses"].items()}
        account_rps = throttled_at = None
        if self._account is not None:
            row = await self._bench.pool.fetchrow(
                "SELECT current_rps, throttled_at_rps FROM provider_accounts WHERE id = $1",
                self._account,
            )
            if row is not None:
                account_rps, throttled_at = row["current_rps"], row["throttled_at_rps"]
        sample = SimulatorSample(
            at=at,
            accepted_requests=sum(v for k, v in responses.items() if 200 <= k < 300),
            throttled=responses.get(429, 0),
            other=sum(v for k, v in responses.items() if k != 429 and not 200 <= k < 300),
            accepted_emails=stats["accepted_emails"],
            account_rps=account_rps,
            account_throttled_at=throttled_at,
        )
        self.samples.append(sample)
        return sample

    def window(self, start: float, end: float) -> WindowRates | None:
        """Rates between the samples that bound ``[start, end]`` from inside; None if
        fewer than two samples fall in it."""
        inside = [s for s in self.samples if start - 1e-6 <= s.at <= end + 1e-6]
        if len(inside) < 2:
            return None
        first, last = inside[0], inside[-1]
        seconds = last.at - first.at
        if seconds <= 0:
            return None
        requests = last.accepted_requests - first.accepted_requests
        throttled = last.throttled - first.throttled
        answered = requests + throttled + (last.other - first.other)
        return WindowRates(
            seconds=seconds,
            requests_per_second=requests / seconds,
            throttled_per_second=throttled / seconds,
            emails_per_second=(last.accepted_emails - first.accepted_emails) / seconds,
            throttled_share=throttled / answered if answered else 0.0,
            requests=requests,
            throttled=throttled,
        )

    def emails_between(self, start: float, end: float) -> int:
        """Accepted emails between the samples bounding ``[start, end]`` from inside."""
        inside = [s for s in self.samples if start - 1e-6 <= s.at <= end + 1e-6]
        if len(inside) < 2:
            return 0
        return inside[-1].accepted_emails - inside[0].accepted_emails


async def set_account_limit(
    bench: BenchStack,
    client: Client,
    requests_per_second: float | None,
    emails_per_second: float | None = None,
) -> None:
    """Configure the default provider account's limits and apply them to its task queue
    at once (the workers would within a report or two).

    ``set_limits`` forgets the limit a provider advertised earlier, so a phase starts
    from the configured ceiling rather than from the last phase's provider.
    """
    async with bench.pool.acquire() as conn:
        await accounts.set_limits(
            conn,
            accounts.DEFAULT_ACCOUNT,
            requests_per_second=requests_per_second,
            emails_per_second=emails_per_second,
        )
        account = await accounts.get(conn, accounts.DEFAULT_ACCOUNT)
    assert account is not None
    queue = send_task_queue(bench.settings.task_queue)
    await set_queue_rate_limit(client, queue, account.queue_rate, "bench")


async def disable_simulator_webhooks(bench: BenchStack) -> None:
    """Stop the simulator posting webhook events (two HTTP posts per accepted email)
    and remembering messages for them: the simulator shares the benchmark's cores, and
    a real provider's work is not the product's."""
    (
        await bench.simulator.put(
            "/_sim/config", json={"webhook_url": None, "webhook_keep_messages": 0}
        )
    ).raise_for_status()


def cpu_groups(bench: BenchStack, benchmark_pid: int) -> dict[str, list[int]]:
    """The processes of a run against the stack, by CPU-table row (see ``bench._cpu``)."""
    return {
        "workers": bench.worker_pids(),
        "simulator": [bench.service_pid("simulator")],
        "Temporal dev server": [bench.service_pid("temporal")],
        "HTTP service": [bench.service_pid("api")],
        "benchmark process": [benchmark_pid],
    }
