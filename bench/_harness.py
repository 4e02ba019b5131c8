"""What the benchmarks share: a local stack of their own, audiences, simulator control."""

from __future__ import annotations

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

from campaigns import store
from campaigns.settings import Settings
from campaigns.stack import LocalStack, StackConfig

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
