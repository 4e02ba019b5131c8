"""The product's Prometheus metrics: every name, label and bucket, in one place.

**Workers** serve one endpoint, ``http://WORKER_METRICS_ADDRESS/metrics`` (default
``127.0.0.1:9464``; ``off`` turns it off), with both the Temporal SDK's own metrics
(``temporal_request_total``, ``temporal_activity_execution_latency``,
``temporal_workflow_task_schedule_to_start_latency``, ... in seconds) and the
product's below. The product's go through the SDK runtime's metric meter, so one
scrape gets both; the exporter adds a ``service_name="temporal-core-sdk"`` label to
every series.

=================================================  =========  ===========================
worker metric                                      type       labels
=================================================  =========  ===========================
``campaigns_emails_total``                         counter    ``org``, ``campaign``,
                                                              ``outcome``: sent, failed,
                                                              rejected, suppressed
``campaigns_provider_requests_total``              counter    ``status_class``: 2xx, 3xx,
                                                              4xx, 5xx, timeout,
                                                              connection; ``status``: the
                                                              HTTP code or the class
``campaigns_provider_request_duration_seconds``    histogram  ``status_class``
``campaigns_provider_throttled_total``             counter    (429 answers)
``campaigns_account_rate_requests_per_second``     gauge      ``account``, ``kind``:
                                                              current, ceiling
=================================================  =========  ===========================

``campaigns_emails_total`` counts each outcome a batch attempt writes to the ledger,
once: a retried batch counts only what the retry itself decides. The account's rate
is the same in every worker (each sets it from the account's row after its report,
every half second, while the account has a limit); an org's share of the account is
``sum by (org) (rate(campaigns_emails_total{outcome="sent"}[1m]))`` over the sum of
all orgs, which the dashboard draws.

**The HTTP service** serves ``GET /metrics`` on its own port (prometheus-client):

=============================================  =========  ===============================
service metric                                 type       labels
=============================================  =========  ===============================
``campaigns_webhook_events_total``             counter    ``result``: stored, duplicate
``campaigns_webhook_refused_total``            counter    ``status``, ``reason`` (the
                                                          error code of the answer)
``campaigns_webhook_commit_failures_total``    counter
``campaigns_webhook_settled_total``            counter    ``outcome``: applied, unmatched
``campaigns_webhook_retries_total``            counter    (tries of events whose message
                                                          the ledger did not know yet)
``campaigns_webhook_suppressions_total``       counter    (addresses suppressed by events)
``campaigns_webhook_backlog``                  gauge      ``state``: due, waiting (read
                                                          from PostgreSQL at each scrape)
``campaigns_webhook_pending_store``            gauge      (received, not yet committed)
=============================================  =========  ===============================

Each service process counts its own requests; with ``API_PROCESSES`` above 1 a scrape
reads one of them, so scale the service by processes behind separate ports (or
containers) when its counters matter; the backlog gauge is the same from any process.

**Cardinality.** ``org`` and ``campaign`` are ids validated before a campaign starts
(letters, digits, ``.``, ``_``, ``-``; at most 64 characters), so a label value is
always short and safe; a worker keeps four series per campaign it has sent for until
it restarts. ``status`` keeps the HTTP codes the provider is documented to use and
folds any other into its class; ``reason`` is one of our own error codes, anything
else is ``other``. No label ever carries an address, a message id or provider text.
"""

from __future__ import annotations

import re
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge

if TYPE_CHECKING:  # the HTTP service imports this module and never loads the SDK
    from temporalio.common import MetricMeter
    from temporalio.runtime import Runtime

PROVIDER_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
)
"""Seconds: from a provider on the same network (5 ms) to the 30 s request deadline."""

OUTCOMES = ("sent", "failed", "rejected", "suppressed")
"""The values of ``campaigns_emails_total``'s ``outcome``."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric as Prometheus shows it."""

    name: str
    """The exported name (counters end in ``_total``)."""
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()

    @property
    def base(self) -> str:
        """The name an instrument is created under (the exporter adds ``_total``)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name

    @property
    def series(self) -> tuple[str, ...]:
        """Every name its samples carry (a histogram's ``_bucket``, ``_sum``, ``_count``)."""
        if self.kind == "histogram":
            return tuple(f"{self.name}_{part}" for part in ("bucket", "sum", "count"))
        return (self.name,)


EMAILS = Metric(
    "campaigns_emails_total",
    "counter",
    "Recipients' outcomes written to the delivery ledger by batch attempts.",
    ("org", "campaign", "outcome"),
)
PROVIDER_REQUESTS = Metric(
    "campaigns_provider_requests_total",
    "counter",
    "Batch requests to the email provider, by the answer's status.",
    ("status_class", "status"),
)
PROVIDER_LATENCY = Metric(
    "campaigns_provider_request_duration_seconds",
    "histogram",
    "Time from sending a batch request to the last byte of its answer (or giving up).",
    ("status_class",),
)
PROVIDER_THROTTLED = Metric(
    "campaigns_provider_throttled_total",
    "counter",
    "Provider answers 429 (rate limited): not failures, the batch retries later.",
)
ACCOUNT_RATE = Metric(
    "campaigns_account_rate_requests_per_second",
    "gauge",
    "The provider account's shared rate: 'current' is the rate its task queue dispatches "
    "batches at now (adaptive), 'ceiling' the most it may reach (configured or advertised).",
    ("account", "kind"),
)
WORKER_METRICS = (
    EMAILS,
    PROVIDER_REQUESTS,
    PROVIDER_LATENCY,
    PROVIDER_THROTTLED,
    ACCOUNT_RATE,
)
"""What a worker's endpoint serves besides the SDK's own ``temporal_*`` metrics."""

WEBHOOK_EVENTS = Metric(
    "campaigns_webhook_events_total",
    "counter",
    "Webhook events committed: new ones stored, and duplicates of stored ones (same svix-id).",
    ("result",),
)
WEBHOOK_REFUSED = Metric(
    "campaigns_webhook_refused_total",
    "counter",
    "Webhook requests refused, by status and our error code.",
    ("status", "reason"),
)
WEBHOOK_COMMIT_FAILURES = Metric(
    "campaigns_webhook_commit_failures_total",
    "counter",
    "Group commits of webhook events that failed (the database); their requests got 503.",
)
WEBHOOK_SETTLED = Metric(
    "campaigns_webhook_settled_total",
    "counter",
    "Stored webhook events settled by the applier: applied to the ledger, or kept unmatched.",
    ("outcome",),
)
WEBHOOK_RETRIES = Metric(
    "campaigns_webhook_retries_total",
    "counter",
    "Tries of webhook events whose message the ledger did not know yet (tried again later).",
)
WEBHOOK_SUPPRESSIONS = Metric(
    "campaigns_webhook_suppressions_total",
    "counter",
    "Addresses added to suppression lists by webhook events (bounces, complaints).",
)
WEBHOOK_BACKLOG = Metric(
    "campaigns_webhook_backlog",
    "gauge",
    "Stored webhook events not applied yet: due now, or waiting to be tried again.",
    ("state",),
)
WEBHOOK_PENDING_STORE = Metric(
    "campaigns_webhook_pending_store",
    "gauge",
    "Webhook events received by this process and not yet committed.",
)
SERVICE_METRICS = (
    WEBHOOK_EVENTS,
    WEBHOOK_REFUSED,
    WEBHOOK_COMMIT_FAILURES,
    WEBHOOK_SETTLED,
    WEBHOOK_RETRIES,
    WEBHOOK_SUPPRESSIONS,
    WEBHOOK_BACKLOG,
    WEBHOOK_PENDING_STORE,
)
"""What the HTTP service's ``GET /metrics`` serves."""


SDK_SERIES = frozenset(
    {
        "temporal_activity_execution_latency_bucket",
        "temporal_activity_execution_latency_count",
        "temporal_activity_schedule_to_start_latency_bucket",
        "temporal_worker_task_slots_used",
        "temporal_workflow_task_schedule_to_start_latency_bucket",
        "temporal_request_total",
    }
)
"""The Temporal SDK's series that the provisioned dashboard reads (a worker's endpoint
serves them; ``tests/test_metrics.py`` checks it)."""


def exported_names() -> frozenset[str]:
    """Every sample name the product exports (for checking dashboards and alerts)."""
    return frozenset(name for m in WORKER_METRICS + SERVICE_METRICS for name in m.series)


# -- pure: bounded label values --------------------------------------------------------

_KNOWN_STATUSES = frozenset(
    {200, 201, 202, 400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 502, 503, 504}
)
_REASON = re.compile(r"[a-z][a-z_]{0,39}")


def status_labels(status: int | str) -> tuple[str, str]:
    """``(status_class, status)`` of a provider answer: an HTTP code, or ``timeout`` /
    ``connection`` when there was none. Codes the provider is not documented to use are
    folded into their class, so a hostile provider cannot grow the series."""
    if isinstance(status, str):
        return status, status
    if not 100 <= status <= 599:
        return "other", "other"
    status_class = f"{status // 100}xx"
    return status_class, (str(status) if status in _KNOWN_STATUSES else status_class)


def reason_label(code: object) -> str:
    """A refusal's error code as a label value: our short codes, else ``other``."""
    if isinstance(code, str) and _REASON.fullmatch(code):
        return code
    return "other"


# -- workers: through the Temporal SDK's runtime -----------------------------------------


class WorkerMetrics:
    """The product's instruments on a worker, recorded through a Temporal metric meter.

    With ``MetricMeter.noop`` (the default until ``install`` is called) every call is
    a no-op, so code outside a worker (the CLI, benchmarks, tests) pays nothing.
    """

    def __init__(self, meter: MetricMeter | None = None) -> None:
        """Create the instruments once (on the no-op meter when None); recording only
        adds attributes."""
        if meter is None:
            from temporalio.common import MetricMeter

            meter = MetricMeter.noop
        self._emails = meter.create_counter(EMAILS.base, EMAILS.help)
        self._requests = meter.create_counter(PROVIDER_REQUESTS.base, PROVIDER_REQUESTS.help)
        self._latency = meter.create_histogram_float(
            PROVIDER_LATENCY.base, PROVIDER_LATENCY.help, "s"
        )
        self._throttled = meter.create_counter(PROVIDER_THROTTLED.base, PROVIDER_THROTTLED.help)
        self._account_rate = meter.create_gauge_float(ACCOUNT_RATE.base, ACCOUNT_RATE.help)

    def emails(self, org: str, campaign: str, outcomes: Iterable[str]) -> None:
        """Count the outcomes (``sent``, ``failed`` ...) one batch attempt recorded."""
        for outcome, count in Tally(outcomes).items():
            self._emails.add(count, {"org": org, "campaign": campaign, "outcome": outcome})

    def provider_answer(self, status: int | str, seconds: float) -> None:
        """One provider request: its status (HTTP code, ``timeout`` or ``connection``)
        and how long it took."""
        status_class, code = status_labels(status)
        self._requests.add(1, {"status_class": status_class, "status": code})
        self._latency.record(max(seconds, 0.0), {"status_class": status_class})
        if status == 429:
            self._throttled.add(1)

    def account_rate(self, account: str, current: float, ceiling: float) -> None:
        """The account's shared rate now and its ceiling, requests/s."""
        self._account_rate.set(current, {"account": account, "kind": "current"})
        self._account_rate.set(ceiling, {"account": account, "kind": "ceiling"})


_worker: WorkerMetrics | None = None


def worker() -> WorkerMetrics:
    """This process's worker instruments (no-ops unless ``install`` was called)."""
    global _worker
    if _worker is None:
        _worker = WorkerMetrics()
    return _worker


def install(meter: MetricMeter) -> WorkerMetrics:
    """Record this process's worker metrics through ``meter`` from now on."""
    global _worker
    _worker = WorkerMetrics(meter)
    return _worker


def worker_runtime(bind_address: str) -> Runtime:
    """A Temporal runtime whose Prometheus endpoint at ``bind_address`` (``ip:port``)
    serves the SDK's metrics and, once ``install(runtime.metric_meter)``, the product's.

    Counters end in ``_total`` and durations are seconds, as Prometheus expects; the
    provider latency histogram gets ``PROVIDER_LATENCY_BUCKETS``.

    Raises:
        ValueError: the address is malformed or already in use (the SDK's message).
    """
    from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=bind_address,
                counters_total_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={PROVIDER_LATENCY.base: list(PROVIDER_LATENCY_BUCKETS)},
            )
        )
    )


# -- the HTTP service: prometheus-client -------------------------------------------------


class ServiceMetrics:
    """The HTTP service's instruments, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        """Register every service metric."""
        self.registry = CollectorRegistry(auto_describe=True)

        def counter(metric: Metric) -> PromCounter:
            return PromCounter(metric.base, metric.help, metric.labels, registry=self.registry)

        def gauge(metric: Metric) -> PromGauge:
            return PromGauge(metric.name, metric.help, metric.labels, registry=self.registry)

        self.events = counter(WEBHOOK_EVENTS)
        self.refused = counter(WEBHOOK_REFUSED)
        self.commit_failures = counter(WEBHOOK_COMMIT_FAILURES)
        self.settled = counter(WEBHOOK_SETTLED)
        self.retries = counter(WEBHOOK_RETRIES)
        self.suppressions = counter(WEBHOOK_SUPPRESSIONS)
        self.backlog = gauge(WEBHOOK_BACKLOG)
        self.pending_store = gauge(WEBHOOK_PENDING_STORE)
        # Series that exist from the start, so rate() sees the first increase.
        for result in ("stored", "duplicate"):
            self.events.labels(result=result)
        for outcome in ("applied", "unmatched"):
            self.settled.labels(outcome=outcome)

    def stored(self, new: int, duplicates: int) -> None:
        """One group commit: ``new`` events stored, ``duplicates`` already there."""
        if new:
            self.events.labels(result="stored").inc(new)
        if duplicates:
            self.events.labels(result="duplicate").inc(duplicates)

    def refusal(self, status: int, code: object) -> None:
        """One refused webhook request."""
        self.refused.labels(status=str(status), reason=reason_label(code)).inc()

    def applied(self, applied: int, unmatched: int, retries: int, suppressions: int) -> None:
        """One batch of the applier."""
        for outcome, count in (("applied", applied), ("unmatched", unmatched)):
            if count:
                self.settled.labels(outcome=outcome).inc(count)
        if retries:
            self.retries.inc(retries)
        if suppressions:
            self.suppressions.inc(suppressions)

    def set_backlog(self, due: int | None, waiting: int | None) -> None:
        """The backlog read at scrape time, or None when it could not be read (the
        series are removed rather than left showing a stale figure)."""
        if due is None or waiting is None:
            self.backlog.clear()
            return
        self.backlog.labels(state="due").set(due)
        self.backlog.labels(state="waiting").set(waiting)
