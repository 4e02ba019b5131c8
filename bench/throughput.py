"""Campaign throughput: Temporal end to end against a plain asyncio loop, same run.

Starts a private local stack (own ports and data directory; ``DATABASE_URL`` is used
when set), generates an audience of N recipients, then:

1. sends a campaign to all of them through the worker (Temporal workflow, batch
   activities, retry policy, heartbeats);
2. sends the same recipients again, as a second campaign, through a plain asyncio
   loop in this process that calls the very same paging and batch-send code (same
   simulator, same ledger writes) with the same concurrency and no Temporal.

It prints emails/s for both, their ratio, the worker's peak RSS and the workflow's
history length, and checks exactly-once at the simulator for both runs.

    python bench/throughput.py --recipients 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activities import PlanningActivities, SendingActivities  # noqa: E402
from bench._harness import BENCH_ORG, BenchStack, bench_stack, ensure_audience  # noqa: E402
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


@dataclass
class Measurement:
    """One run's figures."""

    path: str
    recipients: int
    sent: int
    seconds: float
    emails_per_second: float
    duplicates: int
    worker_peak_rss_mib: float | None = None
    history_events: int | None = None  # the largest of any run
    runs: int | None = None


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


async def run_temporal(
    bench: BenchStack, audience: str, recipients: int, args: argparse.Namespace
) -> Measurement:
    bench.restart_workers()  # a fresh process, so the peak RSS is this campaign's own
    spec = make_spec(f"bench-temporal-{recipients}-{time.strftime('%H%M%S')}", audience, args)
    await bench.reset_simulator(latency_ms=args.latency_ms)
    client = await CampaignClient.connect(bench.settings)
    started = time.perf_counter()
    handle = await client.start(spec)
    result = await handle.result()
    seconds = time.perf_counter() - started
    stats = await bench.simulator_stats()
    lengths = [
        execution.history_length
        async for execution in client.temporal.list_workflows(f"WorkflowId = '{handle.id}'")
    ]
    return Measurement(
        path="temporal",
        recipients=recipients,
        sent=result.counts.sent,
        seconds=seconds,
        emails_per_second=result.counts.sent / seconds,
        duplicates=stats["duplicated_recipients"],
        worker_peak_rss_mib=bench.peak_rss_mib(),
        history_events=max(lengths),
        runs=len(lengths),
    )


async def run_plain_loop(
    bench: BenchStack, audience: str, recipients: int, args: argparse.Namespace
) -> Measurement:
    spec = make_spec(f"bench-plain-{recipients}-{time.strftime('%H%M%S')}", audience, args)
    await bench.reset_simulator(latency_ms=args.latency_ms)
    api_key = _stack_api_key(bench)
    provider = ProviderClient(bench.state["provider_base_url"], SecretStr(api_key))
    planning = PlanningActivities(bench.pool)
    settings = bench.settings
    domains = SendingDomains(settings.shared_sending_domain, settings.shared_tracking_host)
    sending = SendingActivities(bench.pool, provider, domains)
    counts = CampaignCounts()
    started = time.perf_counter()
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
                batch_size=spec.recipients_per_activity,
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
    seconds = time.perf_counter() - started
    await provider.aclose()
    stats = await bench.simulator_stats()
    return Measurement(
        path="plain asyncio loop",
        recipients=recipients,
        sent=counts.sent,
        seconds=seconds,
        emails_per_second=counts.sent / seconds,
        duplicates=stats["duplicated_recipients"],
    )


def _stack_api_key(bench: BenchStack) -> str:
    env_file = bench.stack.config.env_file
    for line in env_file.read_text().splitlines():
        if line.startswith("PROVIDER_API_KEY="):
            return line.split("=", 1)[1]
    raise RuntimeError(f"no PROVIDER_API_KEY in {env_file}")


def report(measurements: list[Measurement]) -> None:
    print()
    print(
        f"{'path':<20} {'recipients':>10} {'seconds':>8} {'emails/s':>9} {'dups':>5} "
        f"{'peak RSS':>9} {'max history/run':>16} {'runs':>5}"
    )
    for m in measurements:
        rss = f"{m.worker_peak_rss_mib:.0f} MiB" if m.worker_peak_rss_mib else "-"
        print(
            f"{m.path:<20} {m.recipients:>10,} {m.seconds:>8.1f} {m.emails_per_second:>9,.0f} "
            f"{m.duplicates:>5} {rss:>9} {m.history_events or '-':>16} {m.runs or '-':>5}"
        )
    print()
    by_size: dict[int, dict[str, Measurement]] = {}
    for m in measurements:
        by_size.setdefault(m.recipients, {})[m.path] = m
    for size, paths in by_size.items():
        if "temporal" in paths and "plain asyncio loop" in paths:
            ratio = (
                paths["temporal"].emails_per_second / paths["plain asyncio loop"].emails_per_second
            )
            print(f"{size:>10,} recipients: temporal / plain loop = {ratio:.2f}")
    temporal = sorted((m for m in measurements if m.path == "temporal"), key=lambda m: m.recipients)
    if len(temporal) > 1 and temporal[0].worker_peak_rss_mib and temporal[-1].worker_peak_rss_mib:
        ratio = temporal[-1].worker_peak_rss_mib / temporal[0].worker_peak_rss_mib
        print(
            f"worker peak RSS, {temporal[-1].recipients:,} / {temporal[0].recipients:,} "
            f"recipients: {ratio:.2f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--recipients", type=int, nargs="+", default=[100_000])
    parser.add_argument("--window", type=int, default=16, help="batch activities in flight")
    parser.add_argument("--per-activity", type=int, default=2000, help="recipients per batch")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulator latency")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain asyncio loop")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack's data here")
    args = parser.parse_args()
    configure_logging("WARNING", "console")

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="campaigns-bench-"))
    print(
        f"benchmark: {', '.join(f'{n:,}' for n in args.recipients)} recipients, window "
        f"{args.window}, {args.per_activity} per activity, simulator latency {args.latency_ms} ms"
    )
    measurements: list[Measurement] = []
    async with bench_stack(data_dir) as bench:
        for recipients in args.recipients:
            audience = await ensure_audience(bench.pool, recipients)
            measurements.append(await run_temporal(bench, audience, recipients, args))
            if not args.no_plain:
                measurements.append(await run_plain_loop(bench, audience, recipients, args))
    report(measurements)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    out = results / f"throughput-{'-'.join(map(str, args.recipients))}.json"
    out.write_text(json.dumps([asdict(m) for m in measurements], indent=2))
    print(f"saved {out}")
    if any(m.duplicates or m.sent != m.recipients for m in measurements):
        raise SystemExit("exactly-once check failed")


if __name__ == "__main__":
    asyncio.run(main())
