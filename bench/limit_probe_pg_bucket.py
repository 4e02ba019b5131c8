"""Probe: one provider-account-wide send limit as a token bucket in one PostgreSQL row.

The alternative to Temporal's task-queue rate limit for the design note. The bucket is
one row (rate, burst, tokens, refilled_at) in a schema of the probe's own, created at
the start and dropped at the end. A take is a single ``UPDATE ... RETURNING`` that
refills the row from the database clock (``clock_timestamp()``, read once per
statement) and takes one token if one is there, else answers how long until the next.

Every run starts P separate OS processes (multiprocessing, spawn), each with an
asyncpg pool and C asyncio senders standing for in-flight send activities. A sender
loops: take a token (if refused, sleep the returned wait, capped, plus a small
jitter, and try again), then "send" (sleep 50 ms). Grant times are taken on
``time.monotonic()``, which on Linux is one clock for every process of the machine.
The runs:

* main (twice): 3 processes x 30 senders, R = 50 tokens/s, burst R, 20 s. Reports the
  grant rate over 1-second windows after a 2 s warm-up (median, range) against R, the
  UPDATE attempts and refusals per grant, the CPU seconds per 1,000 grants of the
  PostgreSQL backends serving the probe (``/proc/<pid>/stat`` of each connection's
  ``pg_backend_pid()``) and of the probe processes (``getrusage``), and the p50/p99
  wait from a sender's first attempt to its grant;
* priority: two processes of "priority 3" senders from t = 0, one of "priority 1"
  senders from t = 8 s; the bucket knows no priority, so this reports the share of
  grants the priority-1 senders get in their first 5 s (against their share of the
  contending senders) and the delay to their first grant;
* rate change: the main setting, with the row's rate set from 50 to 20 (burst with
  it) at t = 10 s; reports how long until the trailing 1-second grant rate is within
  10% of 20.

It prints a short table and one JSON line. It needs a PostgreSQL it may create a
schema in (``DATABASE_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``)
and takes about 90 s:

    python bench/limit_probe_pg_bucket.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import secrets
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import asyncpg

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
PROCESSES = 3
SENDERS = 30
RATE = 50.0
CHANGED_RATE = 20.0
SEND_SECONDS = 0.050
DURATION = 20.0
WARMUP = 2.0
WAIT_CAP = 0.5  # longest sleep after a refusal, before the jitter
JITTER = 0.005  # uniform 0..5 ms added to every sleep after a refusal
PRIORITY_START = 8.0
PRIORITY_WINDOW = 5.0
PRIORITY_DURATION = 15.0
CHANGE_AT = 10.0
BUCKET_ID = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The refill, from the row's old values and the statement's one clock reading c.now;
# greatest(0, ...) because a statement that waited on the row lock may read a time
# older than the refilled_at its predecessor wrote.
_AVAILABLE = (
    "least(b.burst, b.tokens + b.rate"
    " * greatest(0.0, extract(epoch FROM c.now - b.refilled_at)::float8))"
)
# One statement: refill, take a token if one is there, say whether, and how long until
# the next one if not. RETURNING sees only the new row, hence the granted column.
# OFFSET 0 keeps the clock subquery from being pulled up (one reading per statement).
TAKE_SQL = f"""
UPDATE {{table}} AS b
   SET granted = {_AVAILABLE} >= 1.0,
       tokens = {_AVAILABLE} - CASE WHEN {_AVAILABLE} >= 1.0 THEN 1.0 ELSE 0.0 END,
       refilled_at = greatest(b.refilled_at, c.now)
  FROM (SELECT clock_timestamp() AS now OFFSET 0) AS c
 WHERE b.id = $1
RETURNING b.granted,
          CASE WHEN b.granted THEN 0.0 ELSE (1.0 - b.tokens) / b.rate END AS wait
"""
# A rate change refills at the old rate up to now first, so no token is lost or made.
SET_RATE_SQL = f"""
UPDATE {{table}} AS b
   SET tokens = least($2::float8, {_AVAILABLE}),
       refilled_at = greatest(b.refilled_at, c.now),
       rate = $2::float8,
       burst = $2::float8
  FROM (SELECT clock_timestamp() AS now OFFSET 0) AS c
 WHERE b.id = $1
"""


@dataclass
class Spec:
    """One probe process's part of a run."""

    index: int
    database_url: str
    table: str
    senders: int
    pool_size: int
    priority: int
    start_offset: float
    duration: float


@dataclass
class ProcessResult:
    """What one probe process measured; times in seconds from the run's t0."""

    index: int
    priority: int
    grants: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    attempts: int = 0
    refusals: int = 0
    self_cpu: float = 0.0
    backend_cpu: float | None = None
    backend_pids: list[int] = field(default_factory=list)
    backend_note: str = ""


def read_proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the command may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def backends_cpu(pids: list[int]) -> tuple[float | None, str]:
    try:
        return sum(read_proc_cpu(pid) for pid in pids), ""
    except OSError as error:
        return None, f"/proc not readable for the backends ({type(error).__name__})"


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sender(
    pool: asyncpg.Pool, sql: str, result: ProcessResult, t0: float, end: float
) -> None:
    rng = random.Random()
    while True:
        first = time.monotonic()
        if first >= end:
            return
        while True:
            row = await pool.fetchrow(sql, BUCKET_ID)
            now = time.monotonic()
            if now >= end:
                return  # an answer after the end is not counted
            result.attempts += 1
            if row["granted"]:
                break
            result.refusals += 1
            await asyncio.sleep(min(row["wait"], WAIT_CAP) + rng.uniform(0.0, JITTER))
        result.grants.append(now - t0)
        result.waits.append(now - first)
        await asyncio.sleep(SEND_SECONDS)


async def _process(spec: Spec, ready: Any, go: Event, start: Any) -> ProcessResult:
    pids: list[int] = []

    async def remember_pid(connection: asyncpg.Connection) -> None:
        pids.append(await connection.fetchval("SELECT pg_backend_pid()"))

    result = ProcessResult(spec.index, spec.priority)
    sql = TAKE_SQL.format(table=spec.table)
    pool = await asyncpg.create_pool(
        spec.database_url, min_size=spec.pool_size, max_size=spec.pool_size, init=remember_pid
    )
    try:
        ready.put(spec.index)
        await asyncio.to_thread(go.wait)
        t0 = start.value
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        backend_before, note = backends_cpu(pids)
        cpu_before = self_cpu()
        await asyncio.sleep(max(0.0, t0 + spec.start_offset - time.monotonic()))
        end = t0 + spec.duration
        await asyncio.gather(*(_sender(pool, sql, result, t0, end) for _ in range(spec.senders)))
        result.self_cpu = self_cpu() - cpu_before
        backend_after, note_after = backends_cpu(pids)
        if backend_before is not None and backend_after is not None:
            result.backend_cpu = backend_after - backend_before
        result.backend_pids = sorted(pids)
        result.backend_note = note or note_after
    finally:
        await pool.close()
    return result


def process_main(spec: Spec, ready: Any, go: Event, start: Any, results: Any) -> None:
    """A probe process: connect, say ready, wait for t0, run the senders, report."""
    results.put(asyncio.run(_process(spec, ready, go, start)))


@dataclass
class RunSpec:
    name: str
    offsets: list[float]
    priorities: list[int]
    duration: float
    change_at: float | None = None


def _run(
    run: RunSpec, database_url: str, table: str, pool_size: int, change: Any
) -> tuple[list[ProcessResult], float | None]:
    """Start the processes, release them together, apply the rate change if any."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    go = context.Event()
    start = context.Value("d", 0.0)
    processes = []
    for index, (offset, priority) in enumerate(zip(run.offsets, run.priorities, strict=True)):
        spec = Spec(index, database_url, table, SENDERS, pool_size, priority, offset, run.duration)
        process = context.Process(
            target=process_main, args=(spec, ready, go, start, results), daemon=True
        )
        process.start()
        processes.append(process)
    changed_at: float | None = None
    try:
        for _ in processes:
            ready.get(timeout=60)
        t0 = time.monotonic() + 0.3
        start.value = t0
        go.set()
        if run.change_at is not None:
            time.sleep(max(0.0, t0 + run.change_at - time.monotonic()))
            change(CHANGED_RATE)
            changed_at = time.monotonic() - t0
        collected = [results.get(timeout=run.duration + 60) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    return sorted(collected, key=lambda r: r.index), changed_at


def _count(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize_main(name: str, results: list[ProcessResult], duration: float) -> dict:
    grants = sorted(t for r in results for t in r.grants)
    windows = [_count(grants, s, s + 1.0) for s in range(int(WARMUP), int(duration))]
    total = len(grants)
    attempts = sum(r.attempts for r in results)
    refusals = sum(r.refusals for r in results)
    backend = [r.backend_cpu for r in results]
    backend_total = None if None in backend else sum(b for b in backend if b is not None)
    waits = [w for r in results for w in r.waits]
    return {
        "run": name,
        "grants": total,
        "rate_target": RATE,
        "rate_median": statistics.median(windows),
        "rate_min": min(windows),
        "rate_max": max(windows),
        "rate_mean_after_warmup": _count(grants, WARMUP, duration) / (duration - WARMUP),
        "attempts": attempts,
        "attempts_per_grant": attempts / total,
        "refusals_per_grant": refusals / total,
        "attempts_per_second": attempts / duration,
        "backend_cpu_s_per_1000_grants": (
            None if backend_total is None else 1000 * backend_total / total
        ),
        "backend_cpu_s_total": backend_total,
        "backend_cpu_note": next((r.backend_note for r in results if r.backend_note), ""),
        "backends": sum(len(r.backend_pids) for r in results),
        "probe_cpu_s_per_1000_grants": 1000 * sum(r.self_cpu for r in results) / total,
        "probe_cpu_s_total": sum(r.self_cpu for r in results),
        "wait_p50_ms": 1000 * _percentile(waits, 0.50),
        "wait_p99_ms": 1000 * _percentile(waits, 0.99),
        "wait_max_ms": 1000 * max(waits),
        "per_process_grants": [len(r.grants) for r in results],
    }


def summarize_priority(results: list[ProcessResult]) -> dict:
    start, end = PRIORITY_START, PRIORITY_START + PRIORITY_WINDOW
    mine = [t for r in results if r.priority == 1 for t in r.grants]
    everyone = [t for r in results for t in r.grants]
    in_window = _count(everyone, start, end)
    contending = sum(SENDERS for _ in results)
    first = min((t for t in mine if t >= start), default=None)
    return {
        "run": "priority",
        "window_s": [start, end],
        "grants_in_window": in_window,
        "priority1_grants_in_window": _count(mine, start, end),
        "priority1_share": _count(mine, start, end) / in_window if in_window else None,
        "priority1_sender_share": SENDERS / contending,
        "priority1_first_grant_after_s": None if first is None else first - start,
        "rate_in_window": in_window / PRIORITY_WINDOW,
    }


def summarize_change(results: list[ProcessResult], changed_at: float, duration: float) -> dict:
    grants = sorted(t for r in results for t in r.grants)
    low, high = 0.9 * CHANGED_RATE, 1.1 * CHANGED_RATE
    settled: float | None = None
    end = changed_at
    while end <= duration:
        if low <= _count(grants, end - 1.0, end) <= high:
            settled = end - changed_at
            break
        end += 0.01
    after = [_count(grants, s, s + 1.0) for s in range(int(changed_at) + 1, int(duration))]
    before = [_count(grants, s, s + 1.0) for s in range(int(WARMUP), int(changed_at))]
    gaps_after = [b - a for a, b in zip(grants, grants[1:], strict=False) if a >= changed_at]
    return {
        "run": "rate_change",
        "changed_at_s": changed_at,
        "rate_from": RATE,
        "rate_to": CHANGED_RATE,
        "trailing_1s_within_10pct_after_s": settled,
        "rate_before_median": statistics.median(before),
        "first_full_window_after": _count(grants, changed_at, changed_at + 1.0),
        "rate_after_median": statistics.median(after),
        "rate_after_min": min(after),
        "rate_after_max": max(after),
        "first_grant_after_change_s": next(
            (t - changed_at for t in grants if t >= changed_at), None
        ),
        "median_gap_after_ms": 1000 * statistics.median(gaps_after) if gaps_after else None,
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(mains: list[dict], priority: dict, change: dict, context: dict) -> None:
    print(
        f"PostgreSQL token bucket: P={PROCESSES} processes x C={SENDERS} senders,"
        f" pool {context['pool_size']}/process, R={RATE:g}/s, burst R, send"
        f" {SEND_SECONDS * 1000:g} ms, refusal sleep min(wait, {WAIT_CAP:g} s)"
        f" + U(0, {JITTER * 1000:g} ms)"
    )
    print(
        f"server {context['server']}, synchronous_commit={context['synchronous_commit']},"
        f" fsync={context['fsync']}; loadavg before {context['loadavg_before']},"
        f" after {context['loadavg_after']}"
    )
    rows = [
        ("grants", "grants", 0),
        ("rate/s, 1-s windows, median", "rate_median", 0),
        ("rate/s, 1-s windows, min", "rate_min", 0),
        ("rate/s, 1-s windows, max", "rate_max", 0),
        ("rate/s, mean after warm-up", "rate_mean_after_warmup", 2),
        ("UPDATE attempts per grant", "attempts_per_grant", 1),
        ("refusals per grant", "refusals_per_grant", 1),
        ("UPDATE attempts per second", "attempts_per_second", 0),
        ("PG backend CPU s / 1,000 grants", "backend_cpu_s_per_1000_grants", 2),
        ("probe CPU s / 1,000 grants", "probe_cpu_s_per_1000_grants", 2),
        ("wait first attempt->grant p50 ms", "wait_p50_ms", 1),
        ("wait first attempt->grant p99 ms", "wait_p99_ms", 1),
    ]
    print()
    print(f"{'main':34}" + "".join(f"{m['run']:>12}" for m in mains))
    for label, key, digits in rows:
        print(f"{label:34}" + "".join(f"{_fmt(m[key], digits):>12}" for m in mains))
    note = mains[0]["backend_cpu_note"]
    if note:
        print(f"  ({note})")
    print()
    print(
        f"priority: 2 processes of priority 3 from 0 s, 1 of priority 1 from {PRIORITY_START:g} s"
    )
    print(
        f"  grants {PRIORITY_START:g}-{PRIORITY_START + PRIORITY_WINDOW:g} s:"
        f" {priority['grants_in_window']}, of which priority 1:"
        f" {priority['priority1_grants_in_window']}"
        f" (share {_fmt(priority['priority1_share'], 3)},"
        f" their sender share {_fmt(priority['priority1_sender_share'], 3)})"
    )
    print(
        f"  priority 1 first grant {_fmt(priority['priority1_first_grant_after_s'], 3)} s"
        " after they start"
    )
    print()
    print(
        f"rate change {RATE:g} -> {CHANGED_RATE:g} at {_fmt(change['changed_at_s'], 3)} s:"
        f" trailing 1-s rate within 10% after"
        f" {_fmt(change['trailing_1s_within_10pct_after_s'], 2)} s;"
        f" first 1 s after the change {change['first_full_window_after']} grants;"
        f" whole-second windows after: median {_fmt(change['rate_after_median'], 0)},"
        f" range {change['rate_after_min']}-{change['rate_after_max']}"
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def _setup(database_url: str, schema: str, table: str) -> dict:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f"CREATE SCHEMA {schema}")
        await connection.execute(
            f"""CREATE TABLE {table} (
                    id int PRIMARY KEY,
                    rate float8 NOT NULL,
                    burst float8 NOT NULL,
                    tokens float8 NOT NULL,
                    refilled_at timestamptz NOT NULL,
                    granted boolean NOT NULL DEFAULT false
                )"""
        )
        settings = {
            name: await connection.fetchval(f"SHOW {name}")
            for name in ("server_version", "synchronous_commit", "fsync")
        }
    finally:
        await connection.close()
    return settings


async def _execute(database_url: str, sql: str, *args: Any) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(sql, *args)
    finally:
        await connection.close()


def reset_bucket(database_url: str, table: str) -> None:
    asyncio.run(
        _execute(
            database_url,
            f"""INSERT INTO {table} (id, rate, burst, tokens, refilled_at)
                VALUES ($1, $2, $2, $2, clock_timestamp())
                ON CONFLICT (id) DO UPDATE
                SET rate = $2, burst = $2, tokens = $2, refilled_at = clock_timestamp()""",
            BUCKET_ID,
            RATE,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pool-size", type=int, default=10, help="asyncpg connections per probe process"
    )
    args = parser.parse_args()
    database_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    suffix = secrets.token_hex(4)
    schema = f"limit_probe_{suffix}"
    table = f"{schema}.token_bucket_{suffix}"
    loadavg_before = loadavg()
    settings = asyncio.run(_setup(database_url, schema, table))

    def change(rate: float) -> None:
        asyncio.run(_execute(database_url, SET_RATE_SQL.format(table=table), BUCKET_ID, rate))

    try:
        mains = []
        for name in ("main 1", "main 2"):
            reset_bucket(database_url, table)
            run = RunSpec(name, [0.0] * PROCESSES, [3] * PROCESSES, DURATION)
            results, _ = _run(run, database_url, table, args.pool_size, change)
            mains.append(summarize_main(name, results, DURATION))
            print(f"{name} done", file=sys.stderr)
        reset_bucket(database_url, table)
        run = RunSpec("priority", [0.0, 0.0, PRIORITY_START], [3, 3, 1], PRIORITY_DURATION)
        results, _ = _run(run, database_url, table, args.pool_size, change)
        priority = summarize_priority(results)
        print("priority done", file=sys.stderr)
        reset_bucket(database_url, table)
        run = RunSpec("rate change", [0.0] * PROCESSES, [3] * PROCESSES, DURATION, CHANGE_AT)
        results, changed_at = _run(run, database_url, table, args.pool_size, change)
        assert changed_at is not None
        rate_change = summarize_change(results, changed_at, DURATION)
        print("rate change done", file=sys.stderr)
    finally:
        asyncio.run(_execute(database_url, f"DROP SCHEMA {schema} CASCADE"))
    context = {
        "pool_size": args.pool_size,
        "server": settings["server_version"],
        "synchronous_commit": settings["synchronous_commit"],
        "fsync": settings["fsync"],
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
        "cpus": os.cpu_count(),
    }
    print_table(mains, priority, rate_change, context)
    print(
        json.dumps(
            {"context": context, "main": mains, "priority": priority, "rate_change": rate_change}
        )
    )


if __name__ == "__main__":
    main()
