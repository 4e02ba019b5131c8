"""Webhook benchmark: how fast the HTTP service takes signed events, and whether a storm
of them slows sending.

Starts a private local stack (``DATABASE_URL`` is used when set), turns the
simulator's own webhooks off (the benchmark's events are the only ones), sends one
campaign to ``--recipients`` recipients and reads its provider message ids, so that the
events name real ledger rows and the applier really updates them. Then:

1. **Ingest.** For each pair, for each of ``--api-processes`` (alternated: 1 2 1 2 ...),
   the service is restarted with that many processes and ``--events`` signed events
   (mostly delivered and opened, some clicked, delayed and bounced; ``--duplicates`` of
   them posted again with the same svix-id) are posted by wrk over ``--connections``
   connections, each request once. It reports the events answered 200 per second (200
   means committed), the p99 answer time, how long the applier took to drain the
   backlog after the burst (``GET /readyz`` until nothing waits), that every unique
   event is stored and applied, and CPU seconds per 1,000 events of the service, its
   PostgreSQL backends and wrk. Between runs the campaign's ledger rows are reset, so
   every run applies the same kind of work.
2. **Isolation.** A ``--recipients`` campaign through the worker, alternately alone
   and under a storm of ``--storm-rate`` events/s (wrk paced in its script; without
   bounces, which would suppress the campaign's own recipients). It reports both
   campaigns' emails/s, their ratio per pair, and the storm rate actually achieved
   while the campaign ran.

wrk (``apt-get install wrk``) is the load generator: a Python client costs as much CPU
per request as the server does. Without wrk the Python client is used and the
figures are then bound by the client.

    python bench/webhooks.py --recipients 100000 --pairs 2 --json bench/results/webhooks.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cpu import (  # noqa: E402
    POSTGRES_BACKENDS,
    POSTGRES_BACKGROUND,
    CpuMeter,
    locate_postgres,
)
from bench._harness import (  # noqa: E402
    BENCH_ORG,
    BenchStack,
    _log_count,
    bench_stack,
    ensure_audience,
    format_spread,
    spread_dict,
)
from bench._webhook_load import (  # noqa: E402
    WRK_INSTALL,
    LoadResult,
    make_load,
    plan_events,
    write_requests,
    wrk_binary,
)
from bench.throughput import forget_campaign, make_spec  # noqa: E402
from campaigns.client import CampaignClient  # noqa: E402
from campaigns.logs import configure_logging  # noqa: E402

INGEST_TARGET = 5_000.0  # events/s accepted durably
ISOLATION_TARGET = 0.8  # sending rate under the storm / alone
API = "HTTP service"
CLIENT = "load client (wrk)"
DRAIN_TIMEOUT_SECONDS = 600.0
LABEL, CELL = 44, 24

_RESET_LEDGER = """
UPDATE deliveries SET delivered_at = NULL, delayed_at = NULL, bounced_at = NULL,
    bounce_type = NULL, soft_bounces = 0, complained_at = NULL, opened_at = NULL,
    opens = 0, clicked_at = NULL, clicks = 0, provider_failed_at = NULL
WHERE campaign_id = $1"""


@dataclass
class IngestRun:
    """One burst of events against the service with ``processes`` processes."""

    processes: int
    pair: int
    events: int
    unique: int
    client: str
    statuses: dict[str, int]
    seconds: float
    accepted_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int
    drain_seconds: float | None
    stored: int
    outcomes: dict[str, int]
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def durable(self) -> bool:
        """Every request answered 200, and every unique event is stored and applied."""
        return (
            self.accepted == self.events
            and self.stored == self.unique
            and self.outcomes.get("applied", 0) == self.unique
        )

    def cpu_per_1000(self, name: str) -> float | None:
        seconds = self.cpu_seconds.get(name)
        return None if seconds is None or not self.accepted else seconds / self.accepted * 1000


@dataclass
class IsolationRun:
    """One campaign, alone or under the storm."""

    storm: bool
    pair: int
    campaign_id: str
    sent: int
    seconds: float
    emails_per_second: float
    storm_requested_per_second: float | None = None
    storm_stored_per_second: float | None = None  # new events committed during the campaign
    storm_answered_per_second: float | None = None  # the client's 200s over its whole run
    storm_p99_ms: float | None = None
    storm_statuses: dict[str, int] | None = None
    storm_drain_seconds: float | None = None


@dataclass
class Context:
    """What every run shares."""

    bench: BenchStack
    client: CampaignClient
    meter: CpuMeter
    postgres: dict | None
    audience: str
    target_campaign: str
    message_ids: list[str]
    workdir: Path
    args: argparse.Namespace
    http: httpx.AsyncClient
    api_processes: int = 0

    @property
    def webhook_url(self) -> str:
        return f"{self.bench.state['api_url']}/webhooks/resend"

    @property
    def secret(self) -> str:
        return _api_child(self.bench).env["WEBHOOK_SECRET"]


def _api_child(bench: BenchStack):  # noqa: ANN202 - the stack's private child type
    return next(c for c in bench.stack.children if c.name == "api")


async def restart_api(ctx: Context, processes: int) -> None:
    """The stack's HTTP service again, with ``processes`` processes; returns when all
    of them have started and it answers ready."""
    if ctx.api_processes == processes:
        return
    child = _api_child(ctx.bench)
    child.stop(timeout=20)
    # The stack's command line, with our process count at its end.
    base = (
        child.args[: child.args.index("--processes")] if "--processes" in child.args else child.args
    )
    child.args = [*base, "--processes", str(processes)]
    started_before = _log_count(child.log_path, "api started")
    child.start()
    ctx.bench.state["services"]["api"] = child.process.pid
    deadline = time.monotonic() + 120
    while _log_count(child.log_path, "api started") - started_before < processes:
        if time.monotonic() > deadline or child.process.poll() is not None:
            raise RuntimeError(f"the HTTP service did not start: {child.tail()}")
        await asyncio.sleep(0.1)
    while True:
        try:
            if (await ctx.http.get("/readyz")).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP service is not ready: {child.tail()}")
        await asyncio.sleep(0.1)
    ctx.api_processes = processes


def api_pids(ctx: Context) -> list[int]:
    """The service's processes (the supervisor and its worker processes)."""
    root = psutil.Process(ctx.bench.service_pid("api"))
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


async def drain(ctx: Context, within: float = DRAIN_TIMEOUT_SECONDS) -> float | None:
    """Seconds until no stored event waits to be applied (``/readyz``); None on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        answer = await ctx.http.get("/readyz")
        if answer.status_code == 200:
            body = answer.json()
            waiting = body["events_waiting_to_apply"]
            if body["events_waiting_to_store"] == 0 and waiting["waiting"] == 0:
                return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def reset_ledger(ctx: Context) -> None:
    """The target campaign's ledger as sent, and no suppression the events caused."""
    async with ctx.bench.pool.acquire() as conn:
        await conn.execute(_RESET_LEDGER, ctx.target_campaign)
        await conn.execute(
            "DELETE FROM campaign_engagement WHERE campaign_id = $1", ctx.target_campaign
        )
        await conn.execute("DELETE FROM suppressions WHERE org_id = $1", BENCH_ORG)
        await conn.execute("DELETE FROM bounce_streaks WHERE org_id = $1", BENCH_ORG)
        await conn.execute("DELETE FROM webhook_events")
        await conn.execute(
            "VACUUM (ANALYZE) deliveries, webhook_events, suppressions, bounce_streaks"
        )


async def stored_outcomes(ctx: Context, tag: str) -> dict[str, int]:
    rows = await ctx.bench.pool.fetch(
        "SELECT coalesce(outcome, 'pending') AS outcome, count(*) AS n FROM webhook_events"
        " WHERE svix_id LIKE $1 || '\\_%' GROUP BY 1",
        tag,
    )
    return {row["outcome"]: row["n"] for row in rows}


async def ingest_run(ctx: Context, processes: int, pair: int) -> IngestRun:
    """One burst of ``--events`` events, each request once, then the drain."""
    args = ctx.args
    await restart_api(ctx, processes)
    await reset_ledger(ctx)
    tag = f"msg_hb{uuid.uuid4().hex[:10]}"
    planned = plan_events(
        ctx.message_ids, args.events, tag, duplicates=args.duplicates, seed=pair * 10 + processes
    )
    unique = len({svix_id for svix_id, _ in planned})
    requests_file = ctx.workdir / f"ingest-{processes}-{pair}.tsv"
    write_requests(requests_file, planned, ctx.secret)
    load = make_load(
        ctx.webhook_url, requests_file, connections=args.connections, threads=args.wrk_threads
    )
    await load.start()
    pids = api_pids(ctx)
    groups = {API: pids}
    if load.pid is not None:
        groups[CLIENT] = [load.pid]
    postgres = {**ctx.postgres, "clients": pids} if ctx.postgres else None
    await ctx.meter.start(groups, postgres)
    result = await load.wait(within=DRAIN_TIMEOUT_SECONDS)
    drained = await drain(ctx)
    cpu = await ctx.meter.stop()
    outcomes = await stored_outcomes(ctx, tag)
    requests_file.unlink()
    return IngestRun(
        processes=processes,
        pair=pair,
        events=len(planned),
        unique=unique,
        client=result.client,
        statuses=result.statuses,
        seconds=result.seconds,
        accepted_per_second=result.ok_per_second,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
        socket_errors=result.socket_errors,
        drain_seconds=drained,
        stored=sum(outcomes.values()),
        outcomes=outcomes,
        cpu_seconds=cpu,
    )


async def send_campaign(ctx: Context, label: str) -> tuple[str, int, float]:
    """A campaign to the audience through the worker: (id, sent, seconds)."""
    spec = make_spec(f"bench-hooks-{label}-{uuid.uuid4().hex[:8]}", ctx.audience, ctx.args)
    await ctx.bench.reset_simulator()
    started = time.perf_counter()
    handle = await ctx.client.start(spec)
    result = await handle.result()
    return spec.campaign_id, result.counts.sent, time.perf_counter() - started


async def isolation_run(
    ctx: Context, storm: bool, pair: int, expect_seconds: float
) -> IsolationRun:
    """One campaign; with ``storm``, under paced events for as long as it runs."""
    args = ctx.args
    await reset_ledger(ctx)
    if not storm:
        campaign, sent, seconds = await send_campaign(ctx, f"alone-{pair}")
        await forget_campaign(ctx.bench, campaign)
        return IsolationRun(False, pair, campaign, sent, seconds, sent / seconds)
    tag = f"msg_hs{uuid.uuid4().hex[:10]}"
    # Enough distinct events for the campaign's expected time and then some; past the
    # end the client starts the file again (those are duplicates: cheaper to answer).
    count = int(args.storm_rate * (expect_seconds * 1.5 + 10))
    planned = plan_events(
        ctx.message_ids, count, tag, duplicates=args.duplicates, seed=pair, bounces=False
    )
    requests_file = ctx.workdir / f"storm-{pair}.tsv"
    write_requests(requests_file, planned, ctx.secret)
    load = make_load(
        ctx.webhook_url,
        requests_file,
        connections=args.storm_connections,
        threads=args.wrk_threads,
        rate=args.storm_rate,
        once=False,
    )
    await load.start()
    await asyncio.sleep(2.0)  # the storm at its rate before the campaign starts
    clock = "SELECT clock_timestamp()"
    began = await ctx.bench.pool.fetchval(clock)
    campaign, sent, seconds = await send_campaign(ctx, f"storm-{pair}")
    ended = await ctx.bench.pool.fetchval(clock)
    result: LoadResult = await load.stop()
    stored = await ctx.bench.pool.fetchval(
        "SELECT count(*) FROM webhook_events WHERE svix_id LIKE $1 || '\\_%'"
        " AND received_at BETWEEN $2 AND $3",
        tag,
        began,
        ended,
    )
    drained = await drain(ctx)
    await forget_campaign(ctx.bench, campaign)
    requests_file.unlink()
    return IsolationRun(
        True,
        pair,
        campaign,
        sent,
        seconds,
        sent / seconds,
        storm_requested_per_second=args.storm_rate,
        storm_stored_per_second=stored / (ended - began).total_seconds(),
        storm_answered_per_second=result.ok_per_second,
        storm_p99_ms=result.p99_ms,
        storm_statuses=result.statuses,
        storm_drain_seconds=drained,
    )


# -- report ---------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize_ingest(runs: list[IngestRun]) -> dict:
    by_processes: dict = {}
    for processes in sorted({r.processes for r in runs}):
        these = [r for r in runs if r.processes == processes]
        names = [API, POSTGRES_BACKENDS, CLIENT, POSTGRES_BACKGROUND]
        by_processes[str(processes)] = {
            "accepted_per_second": spread_dict([r.accepted_per_second for r in these]),
            "p99_ms": spread_dict([r.p99_ms for r in these]),
            "drain_seconds": [r.drain_seconds for r in these],
            "cpu_seconds_per_1000_events": {
                name: _median([r.cpu_per_1000(name) for r in these]) for name in names
            },
            "durable": all(r.durable for r in these),
        }
    return by_processes


def report_ingest(runs: list[IngestRun], postgres_note: str) -> None:
    columns = sorted({r.processes for r in runs})
    by = {n: [r for r in runs if r.processes == n] for n in columns}
    pairs = len({r.pair for r in runs})
    print(
        f"\nIngest: {runs[0].events:,} events a run ({runs[0].unique:,} unique), "
        f"{pairs} run{'s' if pairs != 1 else ''} each, client {runs[0].client} "
        "(median (lowest–highest))"
    )
    print(f"  {'':<{LABEL}}" + "".join(f"{f'{n} API process(es)':>{CELL}}" for n in columns))

    def row(label: str, cell) -> None:  # noqa: ANN001
        print(f"  {label:<{LABEL}}" + "".join(f"{cell(by[n]):>{CELL}}" for n in columns))

    row(
        "events/s answered 200 (committed)",
        lambda rs: format_spread([r.accepted_per_second for r in rs]),
    )
    row("p99 answer ms", lambda rs: format_spread([r.p99_ms for r in rs], ".1f"))
    row("p50 answer ms", lambda rs: format_spread([r.p50_ms for r in rs], ".1f"))
    row(
        "backlog drained after the burst, s",
        lambda rs: ", ".join(
            "never" if r.drain_seconds is None else f"{r.drain_seconds:.1f}" for r in rs
        ),
    )
    row(
        "stored / unique, applied",
        lambda rs: ", ".join(f"{'ok' if r.durable else 'NO'}" for r in rs),
    )
    print("  CPU s per 1,000 events accepted (median; burst and drain)")
    for name in (API, POSTGRES_BACKENDS, CLIENT):
        row(f"  {name}", lambda rs, name=name: _fmt(_median([r.cpu_per_1000(name) for r in rs])))
    row(
        "  PostgreSQL background (server-wide)",
        lambda rs: _fmt(_median([r.cpu_per_1000(POSTGRES_BACKGROUND) for r in rs])),
    )
    print(f"    (PostgreSQL: {postgres_note})")
    for r in runs:
        if not r.durable:
            print(
                f"    run {r.processes}p pair {r.pair}: answers {r.statuses}, stored "
                f"{r.stored:,} of {r.unique:,} unique, outcomes {r.outcomes}"
            )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summarize_isolation(runs: list[IsolationRun]) -> dict:
    alone = [r for r in runs if not r.storm]
    storm = [r for r in runs if r.storm]
    pairs = {(r.pair, r.storm): r for r in runs}
    ratios = [
        pairs[(n, True)].emails_per_second / pairs[(n, False)].emails_per_second
        for n in sorted({r.pair for r in runs})
        if (n, True) in pairs and (n, False) in pairs
    ]
    return {
        "alone_emails_per_second": spread_dict([r.emails_per_second for r in alone]),
        "storm_emails_per_second": spread_dict([r.emails_per_second for r in storm]),
        "ratio_per_pair": ratios,
        "ratio": spread_dict(ratios),
        "storm_stored_per_second": spread_dict([r.storm_stored_per_second or 0 for r in storm]),
        "storm_answered_per_second": spread_dict([r.storm_answered_per_second or 0 for r in storm]),
    }


def report_isolation(runs: list[IsolationRun], processes: int, rate: float) -> dict:
    summary = summarize_isolation(runs)
    storm = [r for r in runs if r.storm]
    alone = [r for r in runs if not r.storm]
    print(
        f"\nIsolation: {runs[0].sent:,}-recipient campaign alone and under {rate:,.0f} "
        f"events/s asked ({processes} API process(es))"
    )
    print(f"  {'':<{LABEL}}{'alone':>{CELL}}{'under the storm':>{CELL}}")
    print(
        f"  {'emails/s':<{LABEL}}"
        f"{format_spread([r.emails_per_second for r in alone]):>{CELL}}"
        f"{format_spread([r.emails_per_second for r in storm]):>{CELL}}"
    )
    print(
        f"  {'seconds':<{LABEL}}"
        f"{format_spread([r.seconds for r in alone], '.1f'):>{CELL}}"
        f"{format_spread([r.seconds for r in storm], '.1f'):>{CELL}}"
    )
    stored = format_spread([r.storm_stored_per_second or 0 for r in storm])
    answered = format_spread([r.storm_answered_per_second or 0 for r in storm])
    print(f"  {'storm: new events stored/s during campaign':<{LABEL}}{'':>{CELL}}{stored:>{CELL}}")
    print(f"  {'storm: answered 200/s (whole storm)':<{LABEL}}{'':>{CELL}}{answered:>{CELL}}")
    p99 = format_spread([r.storm_p99_ms or 0 for r in storm], ".1f")
    print(f"  {'storm: p99 answer ms':<{LABEL}}{'':>{CELL}}{p99:>{CELL}}")
    for r in storm:
        other = {k: v for k, v in (r.storm_statuses or {}).items() if k != "200"}
        if other:
            print(f"    pair {r.pair}: storm answers other than 200: {other}")
    ratios = ", ".join(f"{v:.2f}" for v in summary["ratio_per_pair"])
    print(
        f"  ratio under storm / alone: {format_spread(summary['ratio_per_pair'], '.2f')}"
        f"; per pair {ratios}"
    )
    return summary


def checks(ingest: list[IngestRun], isolation: list[IsolationRun]) -> list[tuple[str, bool]]:
    """(description with figure and target, passed) for the final list."""
    results: list[tuple[str, bool]] = []
    if ingest:
        medians = {
            n: statistics.median(r.accepted_per_second for r in ingest if r.processes == n)
            for n in sorted({r.processes for r in ingest})
        }
        best = max(medians, key=medians.__getitem__)
        p99 = statistics.median(r.p99_ms for r in ingest if r.processes == best)
        results.append(
            (
                f"ingest {medians[best]:,.0f} events/s committed with {best} API process(es), "
                f"p99 {p99:.1f} ms (target >= {INGEST_TARGET:,.0f}/s)",
                medians[best] >= INGEST_TARGET,
            )
        )
        drains = [r.drain_seconds for r in ingest]
        longest = max((d for d in drains if d is not None), default=0.0)
        results.append(
            (
                f"backlog none after every burst (longest drain {longest:.1f} s)",
                None not in drains,
            )
        )
        results.append(
            (
                "every request answered 200 and every unique event stored and applied",
                all(r.durable for r in ingest),
            )
        )
    if isolation:
        summary = summarize_isolation(isolation)
        if summary["ratio_per_pair"]:
            ratio = summary["ratio"]["median"]
            rate = summary["storm_stored_per_second"]["median"]
            results.append(
                (
                    f"sending under a storm of {rate:,.0f} events/s keeps {ratio:.2f} of its "
                    f"rate (target >= {ISOLATION_TARGET})",
                    ratio >= ISOLATION_TARGET,
                )
            )
    return results


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


# -- main -----------------------------------------------------------------------------


async def prepare(bench: BenchStack, client: CampaignClient, args: argparse.Namespace):  # noqa: ANN201
    """The audience and a sent campaign whose message ids the events name."""
    audience = await ensure_audience(bench.pool, args.recipients)
    # An earlier run's bounces may have suppressed some of the audience.
    await bench.pool.execute("DELETE FROM suppressions WHERE org_id = $1", BENCH_ORG)
    spec = make_spec(f"bench-hooks-target-{uuid.uuid4().hex[:8]}", audience, args)
    started = time.perf_counter()
    handle = await client.start(spec)
    result = await handle.result()
    seconds = time.perf_counter() - started
    rows = await bench.pool.fetch(
        "SELECT provider_message_id FROM deliveries WHERE campaign_id = $1"
        " AND provider_message_id IS NOT NULL",
        spec.campaign_id,
    )
    print(
        f"  sent the campaign the events name: {result.counts.sent:,} emails in "
        f"{seconds:.1f} s, {len(rows):,} provider message ids",
        flush=True,
    )
    return audience, spec.campaign_id, [row[0] for row in rows], seconds


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=2, help="runs of each path")
    parser.add_argument("--events", type=int, default=50_000, help="events per ingest run")
    parser.add_argument("--api-processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--duplicates", type=float, default=0.05, help="share posted twice")
    parser.add_argument("--connections", type=int, default=64, help="ingest connections")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--storm-rate", type=float, default=5_000.0, help="events/s asked")
    parser.add_argument("--storm-connections", type=int, default=256)
    parser.add_argument("--window", type=int, default=16, help="batch activities in flight")
    parser.add_argument("--per-activity", type=int, default=2000, help="recipients per batch")
    parser.add_argument("--no-ingest", action="store_true")
    parser.add_argument("--no-isolation", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack's data here")
    args = parser.parse_args()
    if args.pairs < 1 or args.events < 1 or args.recipients < 1:
        parser.error("--pairs, --events and --recipients must be at least 1")
    if not 0 <= args.duplicates < 1:
        parser.error("--duplicates must be in [0, 1)")
    if any(n < 1 or n > 16 for n in args.api_processes):
        parser.error("--api-processes must each be 1-16")
    configure_logging("WARNING", "console")

    if wrk_binary() is None:
        print(
            f"wrk is not installed ({WRK_INSTALL}): using the Python client, so the "
            "ingest figures are bound by the client, not the service"
        )
    started_load = load_average()
    print(
        f"webhook benchmark: {args.recipients:,} recipients, {args.pairs} pairs, "
        f"{args.events:,} events per ingest run ({args.duplicates:.0%} duplicates), API "
        f"processes {' / '.join(map(str, args.api_processes))}, storm "
        f"{args.storm_rate:,.0f}/s; load average {started_load}",
        flush=True,
    )
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="campaigns-bench-"))
    workdir = Path(tempfile.mkdtemp(prefix="campaigns-bench-hooks-"))
    ingest: list[IngestRun] = []
    isolation: list[IsolationRun] = []
    isolation_summary: dict = {}
    async with bench_stack(data_dir) as bench, CpuMeter() as meter:
        # The benchmark's events are the only ones the service receives.
        (await bench.simulator.put("/_sim/config", json={"webhook_url": None})).raise_for_status()
        postgres, postgres_note = await locate_postgres(bench.pool, private=bench.private_postgres)
        if postgres is None:
            postgres_note = f"n/a: {postgres_note}"
        client = await CampaignClient.connect(bench.settings)
        async with httpx.AsyncClient(base_url=bench.state["api_url"], timeout=30) as http:
            audience, target, message_ids, first_seconds = await prepare(bench, client, args)
            ctx = Context(
                bench, client, meter, postgres, audience, target, message_ids, workdir, args, http
            )
            if not args.no_ingest:
                for pair in range(1, args.pairs + 1):
                    for processes in args.api_processes:
                        run = await ingest_run(ctx, processes, pair)
                        ingest.append(run)
                        drained = (
                            "never" if run.drain_seconds is None else f"{run.drain_seconds:.1f} s"
                        )
                        print(
                            f"  ingest {processes} process(es) pair {pair}: "
                            f"{run.accepted_per_second:>7,.0f} events/s, p99 {run.p99_ms:.1f} ms,"
                            f" drained in {drained}"
                            + ("" if run.durable else f"  NOT ALL STORED {run.statuses}"),
                            flush=True,
                        )
            if not args.no_isolation:
                processes = args.api_processes[-1]
                await restart_api(ctx, processes)
                expect = first_seconds
                for pair in range(1, args.pairs + 1):
                    for storm in (False, True):
                        run2 = await isolation_run(ctx, storm, pair, expect)
                        if not storm:
                            expect = run2.seconds
                        isolation.append(run2)
                        extra = (
                            f", storm {run2.storm_stored_per_second:,.0f} events/s stored"
                            if storm
                            else ""
                        )
                        print(
                            f"  campaign {'under storm' if storm else 'alone':<12} pair {pair}: "
                            f"{run2.emails_per_second:>7,.0f} emails/s ({run2.sent:,} in "
                            f"{run2.seconds:.1f} s){extra}",
                            flush=True,
                        )
    ended_load = load_average()
    if ingest:
        report_ingest(ingest, postgres_note)
    if isolation:
        isolation_summary = report_isolation(isolation, args.api_processes[-1], args.storm_rate)
    results = checks(ingest, isolation)
    print(f"\nload average at the start {started_load}, at the end {ended_load}")
    for text, passed in results:
        print(f"  {'PASS' if passed else 'FAIL'}  {text}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "config": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    },
                    "client": ingest[0].client if ingest else None,
                    "load_average": {"start": started_load, "end": ended_load},
                    "postgres": postgres_note,
                    "ingest": {
                        "summary": summarize_ingest(ingest) if ingest else {},
                        "runs": [asdict(r) | {"durable": r.durable} for r in ingest],
                    },
                    "isolation": {
                        "summary": isolation_summary,
                        "runs": [asdict(r) for r in isolation],
                    },
                    "checks": [{"check": text, "pass": passed} for text, passed in results],
                },
                indent=2,
                default=str,
            )
        )
        print(f"saved {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
