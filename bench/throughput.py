"""Campaign throughput: Temporal end to end against a plain asyncio loop, alternated.

Starts a private local stack (own ports and data directory; ``DATABASE_URL`` is used
when set), generates an audience of N recipients, then runs ``--pairs`` pairs, each:

1. a campaign to all of them through the worker (Temporal workflow, batch activities,
   retry policy, heartbeats), on a freshly started worker so its peak RSS is its own;
2. the same recipients as another campaign through a plain asyncio loop in this
   process that calls the very same paging and batch-send code (same simulator, same
   ledger writes) with the same concurrency and no Temporal.

The two paths alternate (A B A B ...) so that whatever else the machine does falls on
both; every run has a fresh campaign id, a reset simulator and, afterwards, its
ledger rows deleted, so each starts from the same state and is checked exactly-once
on its own. For each size it prints the median and range of each path's emails/s and
of the ratio (one per pair), and the CPU seconds per 1,000 emails of each process
involved (median over the runs), which does not depend on the machine's load as
throughput does. It also prints the worker's peak RSS and the largest history of any
run of the workflow.

The simulator's webhooks are off, as in bench/shared_limit.py (bench/webhooks.py
measures that path): each run's ledger rows are deleted after it, so the events still
arriving for its messages would stay unmatched and be tried again for an hour, loading
every later run on the same database.

    python bench/throughput.py --recipients 10000 100000 --pairs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activities import PlanningActivities, SendingActivities  # noqa: E402
from bench._cpu import (  # noqa: E402
    POSTGRES_BACKENDS,
    POSTGRES_BACKGROUND,
    CpuMeter,
    locate_postgres,
)
from bench._harness import (  # noqa: E402
    BENCH_ORG,
    BenchStack,
    bench_stack,
    disable_simulator_webhooks,
    ensure_audience,
    format_spread,
    spread_dict,
)
from campaigns.client import CampaignClient  # noqa: E402
from campaigns.logs import configure_logging  # noqa: E402
from campaigns.models import (  # noqa: E402
    BatchOutcome,
    CampaignCounts,
    CampaignSpec,
    PlanBatchesInput,
    SendBatchInput,
)
from campaigns.provider import ProviderClient  # noqa: E402
from campaigns.sender_identity import SendingDomains  # noqa: E402
from campaigns.unsubscribe import UnsubscribeLinks  # noqa: E402

TEMPORAL = "temporal"
PLAIN = "plain asyncio loop"
WORKER = "worker"
TEMPORAL_SERVER = "Temporal dev server"
SIMULATOR = "simulator"
BENCHMARK = "benchmark process"
# Rows of the CPU table; a path's total is the sum of the processes it involves.
CPU_ROWS = [WORKER, TEMPORAL_SERVER, POSTGRES_BACKENDS, SIMULATOR, BENCHMARK]
LABEL, CELL = 52, 24  # column widths of the printed tables


@dataclass
class Measurement:
    """One run's figures."""

    path: str
    pair: int
    recipients: int
    campaign_id: str
    sent: int
    seconds: float
    emails_per_second: float
    duplicates: int
    unique_at_simulator: int
    worker_peak_rss_mib: float | None = None
    history_events: int | None = None  # the largest of any run of the workflow
    runs: int | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def exactly_once(self) -> bool:
        return (
            self.duplicates == 0
            and self.sent == self.recipients
            and self.unique_at_simulator == self.recipients
        )

    def cpu_per_1000(self, name: str) -> float | None:
        seconds = self.cpu_seconds.get(name)
        return None if seconds is None else seconds / self.sent * 1000


@dataclass
class Context:
    """What every run of one benchmark shares."""

    bench: BenchStack
    client: CampaignClient
    meter: CpuMeter
    postgres: dict | None  # the CPU sampler's PostgreSQL config, None if not visible
    warmup_audience: str | None  # two batches sent, unmeasured, before every run
    provider: ProviderClient  # the plain loop's, kept across runs as a worker keeps its own
    args: argparse.Namespace

    def cpu_groups(self, path: str) -> dict[str, list[int]]:
        """The processes a path involves (the idle worker and Temporal are not the plain loop's)."""
        groups = {SIMULATOR: [self.bench.service_pid("simulator")], BENCHMARK: [os.getpid()]}
        if path == TEMPORAL:
            groups[WORKER] = self.bench.worker_pids()
            groups[TEMPORAL_SERVER] = [self.bench.service_pid("temporal")]
        return groups

    async def start_cpu(self, path: str) -> None:
        postgres = None
        if self.postgres is not None:
            clients = [os.getpid(), *self.bench.worker_pids()]
            postgres = {**self.postgres, "clients": clients}
        # This process started the stack's services: its children are not the loop's.
        await self.meter.start(self.cpu_groups(path), postgres, alone=(BENCHMARK,))


def make_spec(campaign_id: str, audience: str, args: argparse.Namespace) -> CampaignSpec:
    return CampaignSpec(
        campaign_id=campaign_id,
        org=BENCH_ORG,
        audience=audience,
        from_address="Bench <bench@example.com>",
        subject="Hello {{ name }}",
        html="<p>Hi {{ name }} from {{ city }}</p>",
        text="Hi {{ name }}",
        window=args.window,
        recipients_per_activity=args.per_activity,
    )


def campaign_id(path: str, label: str) -> str:
    """A fresh id for every run: its ledger rows and the exactly-once check are its own."""
    kind = "temporal" if path == TEMPORAL else "plain"
    return f"bench-{kind}-{label}-{uuid.uuid4().hex[:8]}"


async def send_temporal(ctx: Context, spec: CampaignSpec) -> int:
    """Send a campaign through the worker; the number of emails sent."""
    handle = await ctx.client.start(spec)
    result = await handle.result()
    return result.counts.sent


async def send_plain_loop(ctx: Context, spec: CampaignSpec) -> int:
    """Send a campaign with the workflow's paging and batch code, no Temporal."""
    bench = ctx.bench
    planning = PlanningActivities(bench.pool)
    settings = bench.settings
    domains = SendingDomains(settings.shared_sending_domain, settings.shared_tracking_host)
    # Signed as a worker signs them, so the loop's bodies cost what the worker's do.
    links = UnsubscribeLinks("https://unsubscribe.bench.example", secrets.token_urlsafe(32))
    sending = SendingActivities(bench.pool, ctx.provider, domains, unsubscribe=links)
    counts = CampaignCounts()
    plan = await planning.prepare_campaign(spec)
    limit = asyncio.Semaphore(spec.window)
    tasks: list[asyncio.Task[BatchOutcome]] = []

    async def send(batch: SendBatchInput) -> BatchOutcome:
        async with limit:
            return await sending._send_batch(batch)

    cursor = 0
    while True:
        page = await planning.plan_batches(
            PlanBatchesInput(
                campaign_id=spec.campaign_id,
                audience_id=plan.audience_id,
                source="audience",
                after_id=cursor,
                recipients_per_activity=spec.recipients_per_activity,
                max_batches=max(2 * spec.window, 4),
            )
        )
        if not page:
            break
        cursor = page[-1].last_id
        for batch_range in page:
            batch = SendBatchInput(
                campaign_id=spec.campaign_id,
                execution_id="plain-loop",
                audience_id=plan.audience_id,
                source="audience",
                round=0,
                range=batch_range,
                batch_size=spec.batch_size,
            )
            tasks.append(asyncio.create_task(send(batch)))
        # Keep paging only as far ahead as the window, like the workflow does.
        while sum(not task.done() for task in tasks) > 2 * spec.window:
            await asyncio.wait([t for t in tasks if not t.done()], return_when="FIRST_COMPLETED")
    for outcome in await asyncio.gather(*tasks):
        counts.add(outcome)
    return counts.sent


SENDERS = {TEMPORAL: send_temporal, PLAIN: send_plain_loop}


async def run(ctx: Context, path: str, audience: str, recipients: int, pair: int) -> Measurement:
    """One measured campaign on ``path``, after an unmeasured warm-up one if asked."""
    bench, args, send = ctx.bench, ctx.args, SENDERS[path]
    if path == TEMPORAL:
        bench.restart_workers()  # a fresh process, so the peak RSS is this campaign's own
    if ctx.warmup_audience:
        # The process's first batches pay for connections, prepared statements and
        # compiled templates: on a fresh worker every time, in this process only once.
        warmup = make_spec(campaign_id(path, "warmup"), ctx.warmup_audience, args)
        await bench.reset_simulator(latency_ms=args.latency_ms)
        await send(ctx, warmup)
        await forget_campaign(bench, warmup.campaign_id)
    spec = make_spec(campaign_id(path, f"{recipients}-{pair}"), audience, args)
    await bench.reset_simulator(latency_ms=args.latency_ms)
    await ctx.start_cpu(path)
    started = time.perf_counter()
    sent = await send(ctx, spec)
    seconds = time.perf_counter() - started
    cpu = await ctx.meter.stop()
    stats = await bench.simulator_stats()
    measurement = Measurement(
        path=path,
        pair=pair,
        recipients=recipients,
        campaign_id=spec.campaign_id,
        sent=sent,
        seconds=seconds,
        emails_per_second=sent / seconds,
        duplicates=stats["duplicated_recipients"],
        unique_at_simulator=stats["unique_recipients"],
        cpu_seconds=cpu,
    )
    if path == TEMPORAL:
        query = f"WorkflowId = '{spec.campaign_id}'"
        lengths = [e.history_length async for e in ctx.client.temporal.list_workflows(query)]
        measurement.worker_peak_rss_mib = bench.peak_rss_mib()
        measurement.history_events = max(lengths)
        measurement.runs = len(lengths)
    return measurement


async def forget_campaign(bench: BenchStack, campaign: str) -> None:
    """Delete a run's ledger rows, so every run writes into the same tables."""
    async with bench.pool.acquire() as conn:
        await conn.execute("DELETE FROM deliveries WHERE campaign_id = $1", campaign)
        await conn.execute("DELETE FROM provider_requests WHERE campaign_id = $1", campaign)
        await conn.execute("DELETE FROM campaigns WHERE id = $1", campaign)
        # Now, not by autovacuum during the next run.
        await conn.execute("VACUUM (ANALYZE) deliveries, provider_requests, campaigns")


def _stack_api_key(bench: BenchStack) -> str:
    env_file = bench.stack.config.env_file
    for line in env_file.read_text().splitlines():
        if line.startswith("PROVIDER_API_KEY="):
            return line.split("=", 1)[1]
    raise RuntimeError(f"no PROVIDER_API_KEY in {env_file}")


def _cpu_cell(runs: list[Measurement], name: str) -> str:
    values = [m.cpu_per_1000(name) for m in runs]
    if any(v is None for v in values):
        return "n/a" if name in (POSTGRES_BACKENDS, POSTGRES_BACKGROUND) else "-"
    return f"{statistics.median(values):.3f}"


def _total_per_1000(m: Measurement) -> float:
    return sum(m.cpu_seconds[name] for name in CPU_ROWS if name in m.cpu_seconds) / m.sent * 1000


def summarize(runs: list[Measurement]) -> dict:
    """One size's figures: median and range of each path, of the ratio, CPU medians."""
    by_path = {path: [m for m in runs if m.path == path] for path in (TEMPORAL, PLAIN)}
    summary: dict = {"recipients": runs[0].recipients}
    for path, measured in by_path.items():
        if not measured:
            continue
        rates = [m.emails_per_second for m in measured]
        summary[path] = {
            "emails_per_second": spread_dict(rates),
            "cpu_seconds_per_1000_emails": {
                name: statistics.median(v)
                for name in [*CPU_ROWS, POSTGRES_BACKGROUND]
                if None not in (v := [m.cpu_per_1000(name) for m in measured])
            }
            | {"total": statistics.median(_total_per_1000(m) for m in measured)},
        }
    pairs = {(m.pair, m.path): m for m in runs}
    ratios = [
        pairs[(n, TEMPORAL)].emails_per_second / pairs[(n, PLAIN)].emails_per_second
        for n in sorted({m.pair for m in runs})
        if (n, TEMPORAL) in pairs and (n, PLAIN) in pairs
    ]
    if ratios:
        summary["ratio_per_pair"] = ratios
        summary["ratio"] = spread_dict(ratios)
    return summary


def report_size(runs: list[Measurement], postgres_note: str) -> None:
    """One table for one audience size."""
    recipients = runs[0].recipients
    temporal = [m for m in runs if m.path == TEMPORAL]
    plain = [m for m in runs if m.path == PLAIN]
    paths = [(label, ms) for label, ms in (("Temporal", temporal), ("plain loop", plain)) if ms]
    pairs = len({m.pair for m in runs})
    print(
        f"\n{recipients:,} recipients, {pairs} pair{'s' if pairs != 1 else ''} "
        "(median (lowest–highest) of the runs)"
    )
    head = f"  {'':<{LABEL}}" + "".join(f"{label:>{CELL}}" for label, _ in paths)
    print(head)
    print(
        f"  {'emails/s':<{LABEL}}"
        + "".join(f"{format_spread([m.emails_per_second for m in ms]):>{CELL}}" for _, ms in paths)
    )
    print(
        f"  {'seconds':<{LABEL}}"
        + "".join(f"{format_spread([m.seconds for m in ms], '.2f'):>{CELL}}" for _, ms in paths)
    )
    print("  CPU s per 1,000 emails (median)")
    for name in CPU_ROWS:
        print(
            f"    {name:<{LABEL - 2}}"
            + "".join(f"{_cpu_cell(ms, name):>{CELL}}" for _, ms in paths)
        )
    total = (
        "total"
        if all(POSTGRES_BACKENDS in m.cpu_seconds for m in runs)
        else "total (without PostgreSQL)"
    )
    print(
        f"    {total:<{LABEL - 2}}"
        + "".join(
            f"{statistics.median(_total_per_1000(m) for m in ms):>{CELL}.3f}" for _, ms in paths
        )
    )
    background = "PostgreSQL background (server-wide, not in total)"
    print(
        f"    {background:<{LABEL - 2}}"
        + "".join(f"{_cpu_cell(ms, POSTGRES_BACKGROUND):>{CELL}}" for _, ms in paths)
    )
    print(f"    (PostgreSQL: {postgres_note})")
    if temporal and plain:
        summary = summarize(runs)
        ratios = ", ".join(f"{r:.2f}" for r in summary["ratio_per_pair"])
        print(
            f"  ratio Temporal / plain loop: {format_spread(summary['ratio_per_pair'], '.2f')}"
            f"; per pair {ratios}"
        )
    if temporal:
        rss = format_spread([m.worker_peak_rss_mib or 0.0 for m in temporal], ".0f", " MiB")
        history = max(temporal, key=lambda m: m.history_events or 0)
        print(
            f"  worker peak RSS {rss}; largest history of any run {history.history_events:,} "
            f"events ({history.runs} run{'s' if history.runs != 1 else ''} of that campaign)"
        )
    failed = [m for m in runs if not m.exactly_once]
    print(
        f"  exactly-once at the simulator: {len(runs) - len(failed)} of {len(runs)} campaigns "
        f"sent {recipients:,} emails to {recipients:,} recipients, none twice"
    )
    for m in failed:
        print(
            f"    FAILED {m.path} pair {m.pair}: sent {m.sent:,}, {m.unique_at_simulator:,} "
            f"recipients at the simulator, {m.duplicates:,} of them twice"
        )


def report(measurements: list[Measurement], postgres_note: str) -> None:
    sizes = sorted({m.recipients for m in measurements})
    for size in sizes:
        report_size([m for m in measurements if m.recipients == size], postgres_note)
    temporal = {
        size: statistics.median(
            m.worker_peak_rss_mib or 0.0
            for m in measurements
            if m.path == TEMPORAL and m.recipients == size
        )
        for size in sizes
        if any(m.path == TEMPORAL and m.recipients == size for m in measurements)
    }
    if len(temporal) > 1:
        low, high = min(temporal), max(temporal)
        print(
            f"\nworker peak RSS (median), {high:,} / {low:,} recipients: "
            f"{temporal[high] / temporal[low]:.2f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--recipients", type=int, nargs="+", default=[100_000])
    parser.add_argument("--pairs", type=int, default=3, help="Temporal/plain pairs per size")
    parser.add_argument("--window", type=int, default=16, help="batch activities in flight")
    parser.add_argument("--per-activity", type=int, default=2000, help="recipients per batch")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulator latency")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain asyncio loop")
    parser.add_argument(
        "--no-warmup", action="store_true", help="no unmeasured campaign before each run"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack's data here")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    configure_logging("WARNING", "console")

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="campaigns-bench-"))
    print(
        f"benchmark: {', '.join(f'{n:,}' for n in args.recipients)} recipients, {args.pairs} "
        f"pairs, window {args.window}, {args.per_activity} per activity, simulator latency "
        f"{args.latency_ms} ms"
    )
    measurements: list[Measurement] = []
    async with bench_stack(data_dir) as bench, CpuMeter() as meter:
        postgres, postgres_note = await locate_postgres(bench.pool, private=bench.private_postgres)
        if postgres is None:
            postgres_note = f"n/a: {postgres_note}"
        await disable_simulator_webhooks(bench)
        client = await CampaignClient.connect(bench.settings)
        warmup = None
        if not args.no_warmup:
            warmup = await ensure_audience(bench.pool, 2 * args.per_activity)
        provider = ProviderClient(
            bench.state["provider_base_url"], SecretStr(_stack_api_key(bench))
        )
        ctx = Context(bench, client, meter, postgres, warmup, provider, args)
        for recipients in args.recipients:
            audience = await ensure_audience(bench.pool, recipients)
            await warm_audience(bench, audience)
            for pair in range(1, args.pairs + 1):
                for path in [TEMPORAL] if args.no_plain else [TEMPORAL, PLAIN]:
                    m = await run(ctx, path, audience, recipients, pair)
                    await forget_campaign(bench, m.campaign_id)
                    measurements.append(m)
                    print(
                        f"  {recipients:>10,} pair {pair} {m.path:<18} {m.seconds:>7.2f} s "
                        f"{m.emails_per_second:>9,.0f} emails/s"
                        + ("" if m.exactly_once else "  EXACTLY-ONCE FAILED"),
                        flush=True,
                    )
        await provider.aclose()
    report(measurements, postgres_note)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    out = results / f"throughput-{'-'.join(map(str, args.recipients))}.json"
    sizes = sorted({m.recipients for m in measurements})
    out.write_text(
        json.dumps(
            {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "postgres": postgres_note,
                "summary": [
                    summarize([m for m in measurements if m.recipients == n]) for n in sizes
                ],
                "runs": [asdict(m) for m in measurements],
            },
            indent=2,
        )
    )
    print(f"saved {out}")
    if not all(m.exactly_once for m in measurements):
        raise SystemExit("exactly-once check failed")


async def warm_audience(bench: BenchStack, audience: str) -> None:
    """Read the audience once, so the first run of a size does not pay for a cold cache."""
    await bench.pool.fetchval(
        """SELECT count(*) FROM recipients r JOIN audiences a ON a.id = r.audience_id
           WHERE a.org_id = $1 AND a.name = $2""",
        BENCH_ORG,
        audience,
    )


if __name__ == "__main__":
    asyncio.run(main())
