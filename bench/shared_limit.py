"""The shared send limit: saturation, adaptation, priority and fairness under one limit.

Starts a private local stack with three workers (own ports and data directory;
``DATABASE_URL`` is used when set, the Temporal dev server runs with fairness on),
generates the audiences it needs by COPY (kept in the database and reused by later
runs), then runs the phases asked for, each against a reset simulator whose token
bucket allows ``R`` requests/s (``--rate``, default 50, i.e. ``100 R`` emails/s in
requests of 100):

* **saturation**: the provider account configured at ``R`` requests/s; four campaigns
  (two orgs, two each). After a warm-up, over ``--seconds`` (default 60): accepted
  requests/s >= 95% of ``R``, and 429s < 1% of the requests.
* **adaptation**: the account configured at a ceiling of ``2 R``; the simulator's limit
  is ``R``, then ``0.4 R``, then ``1.6 R`` (50, 20, 80 for R = 50), each for
  ``--segment-seconds`` (default 30), the same four campaigns. Within 10 s of each
  change the accepted requests/s reach 90% of the new limit (over a trailing 2 s
  window), stay there until the next change, and 429s are < 5% of the requests from
  10 s after the change to the next. Run twice: the provider advertising its limit in
  ``ratelimit-*`` headers (as Resend does), and with 429s only (pure AIMD).
* **priority**: two priority-3 campaigns of 500,000 sending at the limit; then a
  priority-1 campaign of 10,000 starts. Time from its start to its first email in the
  ledger (<= 2 s) and its share of the emails sent while it sends, from its first
  email to its last (>= 80%; from its start is printed too).
* **fairness**: org A with 1,000,000 recipients, orgs B and C with 20,000 each, same
  priority and weight, started together. B and C each get >= 25% of the capacity
  (``100 R`` emails/s) while they send, each finishes (last email) within 1.5 times
  its fair-share time ``20,000 / (100 R / 3)`` s from the start, and A then uses
  >= 90% of the capacity (measured over 10 s from 3 s after both finished). A is
  cancelled afterwards.

Rates come from polling the simulator's ``GET /_sim/stats`` every 0.5 s; per-campaign
emails from the ledger (``deliveries.sent_at``). Every campaign sends 100 emails per
provider request (under an account limit one batch activity is one request), with
retry rounds after 5 and 15 s and ``--window`` (default 16) batch activities in flight,
except the priority-1 campaign (``--priority-window``, default 64: a campaign of 100
requests at 16 spends most of its life ramping up and down) and the fairness phase's
campaigns (``--fairness-window``, default 32: one campaign alone at 16 stays just
under 50 requests/s on this machine). Big campaigns are cancelled after their phase
(their in-flight batches drain) and their ledger rows deleted.

The simulator's webhooks are off unless ``--webhooks``: they cost two HTTP posts per
email, which this machine would spend instead of sending. It also prints the CPU
seconds per 1,000 emails of each process involved and the load average.

The throughput of campaigns with no limit configured is bench/throughput.py's figure:
this benchmark does not run it.

    python bench/shared_limit.py --phases saturation,adaptation,priority,fairness \\
        --seconds 60 --rate 50 --json bench/results/shared-limit.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cpu import POSTGRES_BACKENDS, POSTGRES_BACKGROUND, CpuMeter, locate_postgres  # noqa: E402
from bench._harness import (  # noqa: E402
    BenchStack,
    SimulatorSampler,
    bench_stack,
    cpu_groups,
    disable_simulator_webhooks,
    ensure_org_audience,
    forget_campaigns,
    set_account_limit,
)
from campaigns.client import CampaignClient  # noqa: E402
from campaigns.contract import SEND_BATCH  # noqa: E402
from campaigns.logs import configure_logging  # noqa: E402
from campaigns.models import MAX_PROVIDER_BATCH, CampaignSpec  # noqa: E402

PHASES = ("saturation", "adaptation", "priority", "fairness")
WORKERS = 3
ORG_A, ORG_B, ORG_C = "bench-a", "bench-b", "bench-c"
# (org, audience name, recipients): generated once, reused by every phase and run.
BIG = (ORG_A, "generated-1000000", 1_000_000)
MID = (ORG_B, "generated-500000", 500_000)
SMALL_B = (ORG_B, "generated-20000", 20_000)
SMALL_C = (ORG_C, "generated-20000", 20_000)
URGENT = (ORG_C, "generated-10000", 10_000)
AUDIENCES = {
    "saturation": [BIG, MID],
    "adaptation": [BIG, MID],
    "priority": [MID, URGENT],
    "fairness": [BIG, SMALL_B, SMALL_C],
}
CPU_ROWS = [
    "workers",
    "simulator",
    "Temporal dev server",
    POSTGRES_BACKENDS,
    "HTTP service",
    "benchmark process",
]
CONVERGE_SECONDS = 10.0
TRAILING_SECONDS = 2.0  # the window over which "reached 90% of the limit" is judged
FAIRNESS_SETTLE_SECONDS = 3.0
FAIRNESS_TAIL_SECONDS = 10.0
LABEL = 62


@dataclass
class Figure:
    """One measured figure against its target."""

    phase: str
    name: str
    value: float | None
    target: str
    passed: bool | None  # None: information, no target
    unit: str = ""
    fmt: str = ",.1f"

    def line(self) -> str:
        value = f"{self.value:{self.fmt}}" if self.value is not None else ""
        if self.value is None and self.unit:
            value = "never" if self.unit == "s" else "n/a"
        verdict = "" if self.passed is None else ("PASS" if self.passed else "FAIL")
        target = f"target {self.target}" if self.target else ""
        return f"  {self.name:<{LABEL}} {value:>10} {self.unit:<9} {target:<22} {verdict}"


@dataclass
class CpuFigures:
    """CPU seconds of each process over one measured interval, and the emails sent in it."""

    label: str
    emails: int
    seconds: float
    cpu: dict[str, float]
    load_average: tuple[float, float, float]

    def per_1000(self, name: str) -> float | None:
        if name not in self.cpu or not self.emails:
            return None
        return self.cpu[name] / self.emails * 1000


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    cpu: list[CpuFigures] = field(default_factory=list)
    timelines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(figure.line(), flush=True)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


@dataclass
class Running:
    """A campaign started by the benchmark."""

    spec: CampaignSpec
    handle: WorkflowHandle[Any, Any]
    started_at: float  # wall clock, just before the start was asked


@dataclass
class Context:
    bench: BenchStack
    client: CampaignClient
    meter: CpuMeter
    postgres: dict | None
    args: argparse.Namespace
    results: Results

    @property
    def rate(self) -> float:
        return float(self.args.rate)

    @property
    def capacity(self) -> float:
        """Emails/s the simulator allows at ``rate`` requests/s of full requests."""
        return self.rate * MAX_PROVIDER_BATCH

    async def start_cpu(self) -> None:
        postgres = None
        if self.postgres is not None:
            clients = [
                os.getpid(),
                *self.bench.worker_pids(),
                self.bench.service_pid("api"),
            ]
            postgres = {**self.postgres, "clients": clients}
        groups = cpu_groups(self.bench, os.getpid())
        await self.meter.start(groups, postgres, alone=("benchmark process",))

    async def stop_cpu(self, label: str, emails: int, seconds: float) -> CpuFigures:
        cpu = await self.meter.stop()
        figures = CpuFigures(label, emails, seconds, cpu, os.getloadavg())
        self.results.cpu.append(figures)
        return figures

    async def set_limit(self, requests_per_second: float) -> None:
        await set_account_limit(self.bench, self.client.temporal, requests_per_second)

    async def reset_simulator(self, limit: float, headers: bool = True) -> None:
        await self.bench.reset_simulator(
            rate_limit_per_second=limit,
            rate_limit_headers=headers,
            latency_ms=self.args.latency_ms,
        )

    async def start(
        self,
        phase: str,
        label: str,
        audience: tuple[str, str, int],
        priority: int = 3,
        window: int | None = None,
    ) -> Running:
        org, name, _ = audience
        spec = CampaignSpec(
            campaign_id=f"sl-{phase}-{label}-{uuid.uuid4().hex[:8]}",
            org=org,
            audience=name,
            from_address="Bench <bench@example.com>",
            subject="Hello {{ name }}",
            html="<p>Hi {{ name }} from {{ city }}</p>",
            text="Hi {{ name }}",
            batch_size=MAX_PROVIDER_BATCH,
            window=window or self.args.window,
            priority=priority,
            retry_delays_seconds=[5, 15],
        )
        started = time.time()
        handle = await self.client.start(spec)
        return Running(spec, handle, started)

    async def stop(self, campaigns: list[Running]) -> None:
        """Cancel the campaigns still running, wait for them to drain, forget their rows."""
        for campaign in campaigns:
            try:
                await campaign.handle.cancel()
            except RPCError:
                pass  # finished already
        for campaign in campaigns:
            try:
                await asyncio.wait_for(campaign.handle.result(), timeout=300)
            except (WorkflowFailureError, TimeoutError, RPCError):
                pass
        await forget_campaigns(self.bench.pool, [c.spec.campaign_id for c in campaigns])


# -- ledger reads ------------------------------------------------------------------------


async def sent_span(ctx: Context, campaign_id: str) -> tuple[float | None, float | None, int]:
    """(first, last) sent_at as epoch seconds, and the number of emails sent."""
    row = await ctx.bench.pool.fetchrow(
        """SELECT extract(epoch FROM min(sent_at))::float8 AS first,
                  extract(epoch FROM max(sent_at))::float8 AS last,
                  count(sent_at) AS sent
           FROM deliveries WHERE campaign_id = $1""",
        campaign_id,
    )
    assert row is not None
    return row["first"], row["last"], row["sent"]


async def sent_between(ctx: Context, campaign_ids: list[str], start: float, end: float) -> int:
    """Emails of these campaigns whose sent_at is in ``[start, end]`` (epoch seconds)."""
    value: int = await ctx.bench.pool.fetchval(
        """SELECT count(*) FROM deliveries
           WHERE campaign_id = any($1)
             AND sent_at >= to_timestamp($2) AND sent_at <= to_timestamp($3)""",
        campaign_ids,
        start,
        end,
    )
    return value


async def campaigns_done(ctx: Context, campaigns: list[Running]) -> list[str]:
    """The ids of the campaigns that have finished (they no longer make demand)."""
    done = []
    for campaign in campaigns:
        description = await campaign.handle.describe()
        if description.status is not None and description.status.name != "RUNNING":
            done.append(campaign.spec.campaign_id)
    return done


async def batch_starts(
    ctx: Context, workflow_id: str, since: float
) -> list[tuple[float, float, float | None]]:
    """(scheduled, started, completed) wall-clock times of the send_batch activities of a
    campaign's runs that started after ``since`` or were still running then, from
    Temporal history (completed None: not completed)."""
    found: list[tuple[float, float, float | None]] = []
    run_id: str | None = None
    while True:
        handle = ctx.client.temporal.get_workflow_handle(workflow_id, run_id=run_id)
        events = (await handle.fetch_history()).events
        scheduled: dict[int, float] = {}
        started_at: dict[int, float] = {}
        completed_at: dict[int, float] = {}
        for event in events:
            at = event.event_time.ToDatetime().timestamp()
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attributes = event.activity_task_scheduled_event_attributes
                if attributes.activity_type.name == SEND_BATCH:
                    scheduled[event.event_id] = at
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started_at[event.activity_task_started_event_attributes.scheduled_event_id] = at
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                completed = event.activity_task_completed_event_attributes
                completed_at[completed.scheduled_event_id] = at
        for event_id, queued in scheduled.items():
            if event_id in started_at:
                found.append((queued, started_at[event_id], completed_at.get(event_id)))
        first = events[0]
        begun = first.event_time.ToDatetime().timestamp()
        previous = first.workflow_execution_started_event_attributes.continued_execution_run_id
        if not previous or begun < since:
            return found
        run_id = previous


# -- phases ------------------------------------------------------------------------------


async def four_campaigns(ctx: Context, phase: str) -> list[Running]:
    """Two orgs, two campaigns each, started together."""
    return list(
        await asyncio.gather(
            ctx.start(phase, "a1", BIG),
            ctx.start(phase, "a2", BIG),
            ctx.start(phase, "b1", MID),
            ctx.start(phase, "b2", MID),
        )
    )


async def saturation(ctx: Context) -> None:
    args, rate, results = ctx.args, ctx.rate, ctx.results
    print(
        f"\nsaturation: {WORKERS} workers, 4 campaigns (2 orgs x 2), simulator limit "
        f"{rate:g} req/s ({ctx.capacity:,.0f} emails/s), account configured at {rate:g} req/s, "
        f"{args.warmup:g} s warm-up then {args.seconds:g} s measured",
        flush=True,
    )
    await ctx.set_limit(rate)
    await ctx.reset_simulator(rate)
    async with SimulatorSampler(ctx.bench, account="default") as sampler:
        campaigns = await four_campaigns(ctx, "saturation")
        await asyncio.sleep(args.warmup)
        await ctx.start_cpu()
        start = time.time()
        await asyncio.sleep(args.seconds)
        end = time.time()
        window = sampler.window(start, end)
        emails = window.emails_per_second * window.seconds if window else 0
        cpu = await ctx.stop_cpu(f"saturation R={rate:g}", int(emails), end - start)
        done = await campaigns_done(ctx, campaigns)
    await ctx.stop(campaigns)
    if done:
        results.note(f"campaigns finished during the measurement: {', '.join(done)}")
    tens = []
    at = start
    while at + 10 <= end + 0.5:
        part = sampler.window(at, at + 10)
        if part:
            tens.append(part.requests_per_second)
        at += 10
    results.timelines[f"saturation R={rate:g}"] = _timeline(sampler, start - args.warmup, rate)
    phase = f"saturation R={rate:g}"
    results.add(
        Figure(
            phase,
            "accepted requests/s",
            window.requests_per_second if window else None,
            f">= {0.95 * rate:g}",
            window is not None and window.requests_per_second >= 0.95 * rate,
            "req/s",
        )
    )
    results.add(
        Figure(
            phase,
            "429 share of requests",
            100 * window.throttled_share if window else None,
            "< 1%",
            window is not None and window.throttled_share < 0.01,
            "%",
            ".2f",
        )
    )
    results.add(
        Figure(
            phase,
            "accepted emails/s",
            window.emails_per_second if window else None,
            "",
            None,
            "emails/s",
            ",.0f",
        )
    )
    if tens:
        spread = f"{min(tens):.1f}-{max(tens):.1f}"
        print(f"  accepted requests/s by 10 s window: {', '.join(f'{r:.1f}' for r in tens)}")
        results.notes.append(f"{phase}: accepted requests/s by 10 s window {spread}")
    print(f"  load average at the end: {_load(cpu.load_average)}")


async def adaptation(ctx: Context) -> None:
    for headers in (True, False):
        await adaptation_run(ctx, headers)


async def adaptation_run(ctx: Context, headers: bool) -> None:
    args, rate, results = ctx.args, ctx.rate, ctx.results
    ceiling = 2 * rate
    limits = [rate, 0.4 * rate, 1.6 * rate]
    segment = args.segment_seconds
    mode = "advertised headers" if headers else "429s only (AIMD)"
    phase = f"adaptation, {mode}"
    print(
        f"\nadaptation, {mode}: account ceiling {ceiling:g} req/s; simulator limit "
        f"{' -> '.join(f'{limit:g}' for limit in limits)} req/s, {segment:g} s each; "
        "4 campaigns (2 orgs x 2)",
        flush=True,
    )
    if not headers and not args.keep_workers:
        # A worker keeps the last advertised limit it saw until its next report, and
        # would bring the last run's provider's limit into the first seconds of this one.
        ctx.bench.restart_workers()
    await ctx.set_limit(ceiling)
    await ctx.reset_simulator(limits[0], headers=headers)
    changes: list[float] = []
    async with SimulatorSampler(ctx.bench, account="default") as sampler:
        await ctx.start_cpu()
        changes.append(time.time())
        campaigns = await four_campaigns(ctx, "adapt")
        for limit in limits[1:]:
            await asyncio.sleep(changes[-1] + segment - time.time())
            await ctx.bench.simulator.put("/_sim/config", json={"rate_limit_per_second": limit})
            changes.append(time.time())
        await asyncio.sleep(changes[-1] + segment - time.time())
        end = time.time()
        whole = sampler.window(changes[0], end)
        emails = whole.emails_per_second * whole.seconds if whole else 0
        cpu = await ctx.stop_cpu(phase, int(emails), end - changes[0])
        done = await campaigns_done(ctx, campaigns)
    await ctx.stop(campaigns)
    if done:
        results.note(f"campaigns finished during the run: {', '.join(done)}")
    results.timelines[phase] = _timeline(sampler, changes[0], None, changes, limits)
    _print_timeline(results.timelines[phase])
    bounds = [*changes[1:], end]
    passed = True
    for number, (changed, limit, until) in enumerate(zip(changes, limits, bounds, strict=True)):
        if number:
            name = f"change {number}: provider {limits[number - 1]:g} -> {limit:g} req/s"
        else:
            name = f"start: account ceiling {ceiling:g}, provider {limit:g} req/s"
        reached = None
        at = changed + TRAILING_SECONDS
        while at <= until + 1e-6:
            trailing = sampler.window(at - TRAILING_SECONDS, at)
            if trailing and trailing.requests_per_second >= 0.9 * limit:
                reached = at - changed
                break
            at += 0.5
        after = sampler.window(changed + CONVERGE_SECONDS, until)
        early = sampler.window(changed, changed + CONVERGE_SECONDS)
        ok_reach = reached is not None and reached <= CONVERGE_SECONDS
        ok_hold = after is not None and after.requests_per_second >= 0.9 * limit
        ok_429 = after is not None and after.throttled_share < 0.05
        passed = passed and ok_reach and ok_hold and ok_429
        print(f"  {name}")
        short = f"{limits[number - 1]:g}->{limit:g}" if number else f"start at {limit:g}"
        results.add(
            Figure(
                phase,
                f"    {short}: seconds to reach 90% of the limit (trailing 2 s)",
                reached,
                f"<= {CONVERGE_SECONDS:g} s",
                ok_reach,
                "s",
            )
        )
        results.add(
            Figure(
                phase,
                f"    {short}: accepted req/s from +{CONVERGE_SECONDS:g} s to the next change",
                after.requests_per_second if after else None,
                f">= {0.9 * limit:g}",
                ok_hold,
                "req/s",
            )
        )
        results.add(
            Figure(
                phase,
                f"    {short}: 429 share from +{CONVERGE_SECONDS:g} s to the next change",
                100 * after.throttled_share if after else None,
                "< 5%",
                ok_429,
                "%",
                ".2f",
            )
        )
        results.add(
            Figure(
                phase,
                f"    {short}: 429 share in the first {CONVERGE_SECONDS:g} s",
                100 * early.throttled_share if early else None,
                "",
                None,
                "%",
                ".2f",
            )
        )
    results.add(Figure(phase, "adaptation overall", None, "all of the above", passed))
    print(f"  load average at the end: {_load(cpu.load_average)}")


async def priority(ctx: Context) -> None:
    args, rate, results = ctx.args, ctx.rate, ctx.results
    phase = "priority"
    print(
        f"\npriority: two priority-3 campaigns of {MID[2]:,} at the limit ({rate:g} req/s), "
        f"(window {args.window}), then a priority-1 campaign of {URGENT[2]:,} (window "
        f"{args.priority_window}) after {args.warmup:g} s",
        flush=True,
    )
    await ctx.set_limit(rate)
    await ctx.reset_simulator(rate)
    async with SimulatorSampler(ctx.bench, account="default") as sampler:
        background = list(
            await asyncio.gather(ctx.start(phase, "p3a", MID), ctx.start(phase, "p3b", MID))
        )
        await asyncio.sleep(args.warmup)
        await ctx.start_cpu()
        urgent = await ctx.start(phase, "p1", URGENT, priority=1, window=args.priority_window)
        try:
            outcome = await asyncio.wait_for(urgent.handle.result(), timeout=600)
            finished = outcome.counts.sent
        except (WorkflowFailureError, TimeoutError) as exc:
            finished = None
            results.note(f"the priority-1 campaign did not complete: {type(exc).__name__}")
        end = time.time()
        await asyncio.sleep(1.0)  # a last sample after it
        window = sampler.window(urgent.started_at, end)
        emails = window.emails_per_second * window.seconds if window else 0
        cpu = await ctx.stop_cpu(phase, int(emails), end - urgent.started_at)
    first, last, sent = await sent_span(ctx, urgent.spec.campaign_id)
    background_ids = [c.spec.campaign_id for c in background]
    share = share_from_start = None
    if first is not None and last is not None:
        others = await sent_between(ctx, background_ids, first, last)
        share = sent / (sent + others) if sent + others else None
        from_start = await sent_between(ctx, background_ids, urgent.started_at, last)
        share_from_start = sent / (sent + from_start) if sent + from_start else None
    results.timelines[phase] = _timeline(sampler, urgent.started_at - args.warmup, rate)
    # What the task queue dispatched while it sent: the order priority controls.
    urgent_starts = await batch_starts(ctx, urgent.spec.campaign_id, urgent.started_at)
    other_starts = [
        start
        for campaign in background
        for start in await batch_starts(ctx, campaign.spec.campaign_id, urgent.started_at)
    ]
    await ctx.stop([*background, urgent])
    dispatch_share = inverted = None
    if urgent_starts:
        low = min(started for _, started, _ in urgent_starts)
        high = max(started for _, started, _ in urgent_starts)
        during = [started for _, started, _ in other_starts if low <= started <= high]
        dispatch_share = len(urgent_starts) / (len(urgent_starts) + len(during))
        # Lower-priority batches started while one of its batches was waiting.
        inverted = sum(
            any(queued <= started < begun for queued, begun, _ in urgent_starts)
            for started in during
        )
        results.add(
            Figure(
                phase,
                "its share of batches started, first to last start (history)",
                100 * dispatch_share,
                "",
                None,
                "%",
            )
        )
        waits = sorted(begun - queued for queued, begun, _ in urgent_starts)
        runs = sorted(done - begun for _, begun, done in urgent_starts if done is not None)
        results.add(
            Figure(
                phase,
                "its batches' wait in the queue, median (history)",
                waits[len(waits) // 2],
                "",
                None,
                "s",
                ".2f",
            )
        )
        other_runs = sorted(
            done - begun
            for _, begun, done in other_starts
            if done is not None and low <= begun <= high
        )
        before = sorted(
            done - begun
            for _, begun, done in other_starts
            if done is not None and low - 5 <= begun < low - 1
        )
        for label, values in (
            ("priority-3 batches' run time meanwhile, median", other_runs),
            ("priority-3 batches' run time in the 5 s before, median", before),
        ):
            if values:
                results.add(Figure(phase, label, values[len(values) // 2], "", None, "s", ".2f"))
        if runs:
            results.add(
                Figure(
                    phase,
                    "its batches' run time (started to completed), median (history)",
                    runs[len(runs) // 2],
                    "",
                    None,
                    "s",
                    ".2f",
                )
            )
        results.add(
            Figure(
                phase,
                "priority-3 batches started while one of its was queued",
                inverted,
                "",
                None,
                f"of {len(during)}",
                ",.0f",
            )
        )
    to_first = first - urgent.started_at if first is not None else None
    results.add(
        Figure(
            phase,
            "time from start to its first email (ledger)",
            to_first,
            "<= 2 s",
            to_first is not None and to_first <= 2.0,
            "s",
            ".2f",
        )
    )
    results.add(
        Figure(
            phase,
            "its share of emails sent, first to last email",
            100 * share if share is not None else None,
            ">= 80%",
            share is not None and share >= 0.8,
            "%",
        )
    )
    results.add(
        Figure(
            phase,
            "its share of emails sent, from its start to its last email",
            100 * share_from_start if share_from_start is not None else None,
            "",
            None,
            "%",
        )
    )
    span = (last - first) if first is not None and last is not None else None
    results.add(Figure(phase, "its sending time, first to last email", span, "", None, "s", ".2f"))
    results.add(
        Figure(
            phase,
            "emails it sent",
            finished if finished is not None else sent,
            "",
            None,
            "",
            ",.0f",
        )
    )
    print(f"  load average at the end: {_load(cpu.load_average)}")


async def fairness(ctx: Context) -> None:
    args, rate, results = ctx.args, ctx.rate, ctx.results
    window = args.fairness_window
    phase = "fairness"
    fair_seconds = SMALL_B[2] / (ctx.capacity / 3)
    print(
        f"\nfairness: org A {BIG[2]:,}, orgs B and C {SMALL_B[2]:,} each, same priority and "
        f"weight, started together, window {window}; limit {rate:g} req/s, fair-share time "
        f"{fair_seconds:.1f} s",
        flush=True,
    )
    await ctx.set_limit(rate)
    await ctx.reset_simulator(rate)
    async with SimulatorSampler(ctx.bench, account="default") as sampler:
        await ctx.start_cpu()
        t0 = time.time()
        big, small_b, small_c = await asyncio.gather(
            ctx.start(phase, "a", BIG, window=window),
            ctx.start(phase, "b", SMALL_B, window=window),
            ctx.start(phase, "c", SMALL_C, window=window),
        )
        try:
            await asyncio.wait_for(
                asyncio.gather(small_b.handle.result(), small_c.handle.result()),
                timeout=max(300.0, 20 * fair_seconds),
            )
        except (WorkflowFailureError, TimeoutError) as exc:
            results.note(f"B or C did not complete: {type(exc).__name__}")
        small_done = time.time()
        await asyncio.sleep(FAIRNESS_SETTLE_SECONDS)
        tail_start = time.time()
        await asyncio.sleep(FAIRNESS_TAIL_SECONDS)
        tail_end = time.time()
        tail = sampler.window(tail_start, tail_end)
        whole = sampler.window(t0, tail_end)
        emails = whole.emails_per_second * whole.seconds if whole else 0
        cpu = await ctx.stop_cpu(phase, int(emails), tail_end - t0)
    ids = [c.spec.campaign_id for c in (big, small_b, small_c)]
    a_tail = await sent_between(ctx, [big.spec.campaign_id], tail_start, tail_end)
    results.timelines[phase] = _timeline(sampler, t0, rate)
    # Each small org's share while it sends, read before the rows are deleted.
    shares: dict[str, tuple[float | None, float | None, float | None]] = {}
    for label, small in (("B", small_b), ("C", small_c)):
        first, last, sent = await sent_span(ctx, small.spec.campaign_id)
        if first is None or last is None or last <= first:
            shares[label] = (None, None, None)
            continue
        everyone = await sent_between(ctx, ids, first, last)
        shares[label] = (
            sent / ((last - first) * ctx.capacity),
            sent / everyone if everyone else None,
            last - t0,
        )
    await ctx.stop([big, small_b, small_c])
    for label, (of_capacity, of_sent, finished) in shares.items():
        results.add(
            Figure(
                phase,
                f"org {label}: share of capacity while it sends",
                100 * of_capacity if of_capacity is not None else None,
                ">= 25%",
                of_capacity is not None and of_capacity >= 0.25,
                "%",
            )
        )
        results.add(
            Figure(
                phase,
                f"org {label}: share of the emails sent meanwhile",
                100 * of_sent if of_sent is not None else None,
                "",
                None,
                "%",
            )
        )
        results.add(
            Figure(
                phase,
                f"org {label}: seconds from the start to its last email",
                finished,
                f"<= {1.5 * fair_seconds:.1f} s",
                finished is not None and finished <= 1.5 * fair_seconds,
                "s",
            )
        )
    a_share = tail.emails_per_second / ctx.capacity if tail else None
    results.add(
        Figure(
            phase,
            f"org A: share of capacity +{FAIRNESS_SETTLE_SECONDS:g} s to "
            f"+{FAIRNESS_SETTLE_SECONDS + FAIRNESS_TAIL_SECONDS:g} s after B and C",
            100 * a_share if a_share is not None else None,
            ">= 90%",
            a_share is not None and a_share >= 0.9,
            "%",
        )
    )
    a_ledger = a_tail / ((tail_end - tail_start) * ctx.capacity)
    results.add(Figure(phase, "org A: the same from the ledger", 100 * a_ledger, "", None, "%"))
    results.add(
        Figure(
            phase,
            "B and C both done, seconds from the start",
            small_done - t0,
            "",
            None,
            "s",
        )
    )
    print(f"  load average at the end: {_load(cpu.load_average)}")


PHASE_RUNNERS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "saturation": saturation,
    "adaptation": adaptation,
    "priority": priority,
    "fairness": fairness,
}


# -- printing ----------------------------------------------------------------------------


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in load)


def _timeline(
    sampler: SimulatorSampler,
    start: float,
    limit: float | None,
    changes: list[float] | None = None,
    limits: list[float] | None = None,
    step: float = 2.0,
) -> list[dict[str, Any]]:
    """Rates by ``step`` seconds from ``start``: accepted req/s, 429/s, the account's rate."""
    rows: list[dict[str, Any]] = []
    if not sampler.samples:
        return rows
    end = sampler.samples[-1].at
    at = start
    while at + step <= end + 1e-6:
        window = sampler.window(at, at + step)
        current = limit
        if changes and limits:
            passed = [i for i, c in enumerate(changes) if c <= at + 1e-6]
            current = limits[passed[-1] if passed else 0]
        inside = [s for s in sampler.samples if at <= s.at <= at + step]
        account = inside[-1].account_rps if inside else None
        throttled_at = inside[-1].account_throttled_at if inside else None
        if window:
            rows.append(
                {
                    "t": round(at - start, 1),
                    "limit": current,
                    "accepted_rps": round(window.requests_per_second, 1),
                    "throttled_rps": round(window.throttled_per_second, 1),
                    "emails_per_second": round(window.emails_per_second),
                    "account_rps": round(account, 1) if account is not None else None,
                    "throttled_at_rps": (
                        round(throttled_at, 1) if throttled_at is not None else None
                    ),
                }
            )
        at += step
    return rows


def _print_timeline(rows: list[dict[str, Any]]) -> None:
    print(
        "  timeline (2 s windows): t, provider limit, accepted req/s, 429/s, account rate"
        " (req/s) / its throttled-at rate at the window's end"
    )
    line = []
    for row in rows:
        account = "-" if row["account_rps"] is None else f"{row['account_rps']:g}"
        throttled = "-" if row["throttled_at_rps"] is None else f"{row['throttled_at_rps']:g}"
        line.append(
            f"{row['t']:>5g}s {row['limit']:>4g} {row['accepted_rps']:>6.1f} "
            f"{row['throttled_rps']:>5.1f} {account:>5}/{throttled:<5}"
        )
    for index in range(0, len(line), 3):
        print("   " + "   |".join(line[index : index + 3]))


def print_cpu(results: Results, postgres_note: str) -> None:
    if not results.cpu:
        return
    width = 26
    print("\nCPU seconds per 1,000 emails accepted (each measured interval)")
    print(f"  {'':<30}" + "".join(f"{c.label[: width - 2]:>{width}}" for c in results.cpu))
    print(
        f"  {'emails / seconds':<30}"
        + "".join(f"{f'{c.emails:,} / {c.seconds:.0f} s':>{width}}" for c in results.cpu)
    )
    for name in [*CPU_ROWS, POSTGRES_BACKGROUND]:
        cells = []
        for c in results.cpu:
            value = c.per_1000(name)
            cells.append(f"{'n/a' if value is None else f'{value:.3f}':>{width}}")
        label = name if name != POSTGRES_BACKGROUND else "PostgreSQL background (server)"
        print(f"  {label:<30}" + "".join(cells))
    totals = []
    for c in results.cpu:
        total = sum(c.cpu.get(name, 0.0) for name in CPU_ROWS)
        totals.append(f"{total / c.emails * 1000 if c.emails else 0:>{width}.3f}")
    print(f"  {'total (without background)':<30}" + "".join(totals))
    busy = []
    for c in results.cpu:
        total = sum(c.cpu.get(name, 0.0) for name in [*CPU_ROWS, POSTGRES_BACKGROUND])
        busy.append(f"{total / c.seconds if c.seconds else 0:>{width}.2f}")
    print(f"  {'cores busy (all rows)':<30}" + "".join(busy))
    print(
        f"  {'load average (1, 5, 15 min)':<30}"
        + "".join(f"{_load(c.load_average):>{width}}" for c in results.cpu)
    )
    print(f"  (PostgreSQL: {postgres_note}; {os.cpu_count()} cores)")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated")
    parser.add_argument("--seconds", type=float, default=60.0, help="saturation measured")
    parser.add_argument("--rate", type=float, default=50.0, help="R: simulator limit, req/s")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--window", type=int, default=16, help="batch activities in flight per campaign"
    )
    parser.add_argument(
        "--priority-window",
        type=int,
        default=64,
        help="the priority-1 campaign's window (a 10,000 campaign at 16 is mostly ramp)",
    )
    parser.add_argument(
        "--fairness-window",
        type=int,
        default=32,
        help="the fairness phase's campaigns' window (one campaign at 16 stays under R)",
    )
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--segment-seconds", type=float, default=30.0, help="adaptation")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulator latency")
    parser.add_argument("--webhooks", action="store_true", help="keep the simulator's webhooks")
    parser.add_argument(
        "--keep-workers",
        action="store_true",
        help="do not restart the workers before the 429-only adaptation run",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack's data here")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phases {unknown}; choose among {', '.join(PHASES)}")
    if args.rate <= 0 or args.rate * 2 > 100_000:
        parser.error("--rate must be above 0 and at most 50,000")
    configure_logging("WARNING", "console")
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="campaigns-bench-limit-"))
    print(
        f"shared send limit benchmark: phases {', '.join(phases)}; R = {args.rate:g} req/s "
        f"({args.rate * MAX_PROVIDER_BATCH:,.0f} emails/s); {WORKERS} workers; window "
        f"{args.window}, {MAX_PROVIDER_BATCH} emails per request; simulator latency "
        f"{args.latency_ms:g} ms; webhooks {'on' if args.webhooks else 'off'}; "
        f"load average {_load(os.getloadavg())}",
        flush=True,
    )
    results = Results()
    postgres_note = ""
    async with bench_stack(data_dir, workers=WORKERS) as bench, CpuMeter() as meter:
        postgres, postgres_note = await locate_postgres(bench.pool, private=bench.private_postgres)
        if postgres is None:
            postgres_note = f"n/a: {postgres_note}"
        print(f"  database: {bench.state['database']}", flush=True)
        client = await CampaignClient.connect(bench.settings)
        if not args.webhooks:
            await disable_simulator_webhooks(bench)
        needed = {a for phase in phases for a in AUDIENCES[phase]}
        for org, name, recipients in sorted(needed):
            await ensure_org_audience(bench.pool, org, name, recipients)
        ctx = Context(bench, client, meter, postgres, args, results)
        try:
            for phase in phases:
                await PHASE_RUNNERS[phase](ctx)
        finally:
            # Leave the shared database's account as a fresh one is: no limit.
            await set_account_limit(bench, client.temporal, None)
    print_cpu(results, postgres_note)
    print("\nsummary")
    for figure in results.figures:
        if figure.passed is not None:
            print(
                f"  {figure.phase + ': ' + figure.name.strip():<88} "
                f"{'PASS' if figure.passed else 'FAIL'}"
            )
    print(
        "\nno regression without a limit: not run here; run "
        "`python bench/throughput.py --recipients 100000 --pairs 3` for that figure "
        "(it runs with no limit configured)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "config": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    }
                    | {"workers": WORKERS, "postgres": postgres_note},
                    "figures": [asdict(f) for f in results.figures],
                    "cpu_seconds": [asdict(c) for c in results.cpu],
                    "timelines": results.timelines,
                    "notes": results.notes,
                },
                indent=2,
            )
        )
        print(f"saved {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
