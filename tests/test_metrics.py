"""Metrics: a real worker's endpoint and the HTTP service's /metrics, scraped over HTTP.

A worker process (``python worker.py``) sends a small campaign through the simulator
(one request answered 429 first); its endpoint must show the emails of that campaign
by outcome, the provider requests and their latency, the 429, and the Temporal SDK's
own metrics. The HTTP service's counters must move with signed webhooks. When
Debian's ``prometheus`` is installed, a real Prometheus scrapes the worker and is
queried for the campaign's figures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from campaigns import metrics
from campaigns.client import CampaignClient
from campaigns.models import CampaignState
from campaigns.settings import Settings
from tests.api_support import event, free_port, post_event, serve_api, signed
from tests.helpers import (
    SimulatorControl,
    addresses,
    eventually,
    make_audience,
    make_org,
    make_spec,
    unique,
)
from tests.test_compose import dashboard_queries
from tests.worker_support import ROOT, WorkerProcess

PROMETHEUS = "/usr/bin/prometheus"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text answer, parsed by prometheus-client's parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(url)
        response.raise_for_status()
        return parse(response.text)


class MetricsWorker(WorkerProcess):
    """A worker process serving its metrics at ``address``."""

    def __init__(self, settings: Settings, log_path: Path, address: str) -> None:
        super().__init__(settings, unique("metrics-queue"), log_path)
        self.env["WORKER_METRICS_ADDRESS"] = address
        self.url = f"http://{address}/metrics"

    @property
    def queue(self) -> str:
        return self.env["CAMPAIGNS_TASK_QUEUE"]


@asynccontextmanager
async def worker_at(
    settings: Settings, tmp_path: Path, address: str
) -> AsyncIterator[MetricsWorker]:
    worker = MetricsWorker(settings, tmp_path / f"worker-{address.replace(':', '-')}.log", address)
    await worker.start()
    try:
        yield worker
    finally:
        if worker.process and worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()


async def serving(worker: MetricsWorker) -> Samples:
    async def attempt() -> Samples | None:
        try:
            return await scrape(worker.url)
        except httpx.TransportError:
            return None

    samples = await eventually(attempt, lambda s: s is not None, within=30, what="the endpoint")
    assert samples is not None
    return samples


async def run_campaign(
    client: Client, settings: Settings, pool: asyncpg.Pool, tmp_path: Path, queue: str, count: int
) -> tuple[str, str]:
    """Send ``count`` emails (one of them suppressed) on ``queue``; (org, campaign id)."""
    org = await make_org(pool)
    emails = addresses(unique("m"), count)
    audience, _ = await make_audience(pool, tmp_path, org, emails)
    await pool.execute(
        "INSERT INTO suppressions (org_id, email, reason) VALUES ($1, $2, 'unsubscribed')",
        org,
        emails[0],
    )
    spec = make_spec(org, audience, batch_size=25, recipients_per_activity=50, window=2)
    queue_settings = settings.model_copy(update={"task_queue": queue})
    result = await (await CampaignClient(client, queue_settings).start(spec)).result()
    assert result.state is CampaignState.COMPLETED
    assert (result.counts.sent, result.counts.suppressed) == (count - 1, 1)
    return org, spec.campaign_id


async def test_a_worker_serves_the_sdk_and_product_metrics_and_they_move(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    sim: SimulatorControl,
    tmp_path: Path,
) -> None:
    async with worker_at(settings, tmp_path, f"127.0.0.1:{free_port()}") as worker:
        before = await serving(worker)
        assert total(before, "campaigns_provider_requests_total") == 0
        await sim.script({"status": 429, "retry_after": 0.2})

        org, campaign = await run_campaign(client, settings, pool, tmp_path, worker.queue, 200)
        after = await scrape(worker.url)

    sent = total(after, "campaigns_emails_total", org=org, campaign=campaign, outcome="sent")
    suppressed = total(
        after, "campaigns_emails_total", org=org, campaign=campaign, outcome="suppressed"
    )
    assert (sent, suppressed) == (199, 1)
    assert total(after, "campaigns_emails_total", campaign=campaign, outcome="failed") == 0
    # 199 emails in requests of at most 25 (8 accepted), plus the one answered 429.
    requests = total(after, "campaigns_provider_requests_total")
    assert total(after, "campaigns_provider_requests_total", status="200") == 8
    assert total(after, "campaigns_provider_requests_total", status="429", status_class="4xx") == 1
    assert requests == 9
    assert total(after, "campaigns_provider_throttled_total") == 1
    # Every request is in the latency histogram, in the buckets the module names.
    assert total(after, "campaigns_provider_request_duration_seconds_count") == requests
    assert 0 < total(after, "campaigns_provider_request_duration_seconds_sum") < 30 * requests
    bounds = {
        float(dict(labels)["le"])
        for name, labels in after
        if name == "campaigns_provider_request_duration_seconds_bucket"
    }
    assert bounds == {*metrics.PROVIDER_LATENCY_BUCKETS, float("inf")}
    # The SDK's own metrics come through the same endpoint, in seconds, with _total.
    assert total(after, "temporal_activity_execution_latency_count", activity_type="send_batch") > 0
    assert total(after, "temporal_request_total") > 0
    assert total(after, "temporal_workflow_completed_total", workflow_type="CampaignWorkflow") >= 1
    assert {"campaigns_emails_total", "campaigns_provider_requests_total"} <= names(after)
    assert metrics.SDK_SERIES <= names(after), sorted(metrics.SDK_SERIES - names(after))


async def test_a_malformed_metrics_address_stops_the_worker_at_once_naming_the_setting(
    settings: Settings, tmp_path: Path
) -> None:
    worker = MetricsWorker(settings, tmp_path / "bad.log", "localhost:9464")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "worker.py",
        cwd=ROOT,
        env=worker.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2
    assert b"WORKER_METRICS_ADDRESS must be ip:port" in output


@contextmanager
def port_in_use() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


async def test_a_metrics_port_in_use_is_logged_and_the_worker_still_sends(
    client: Client, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    with port_in_use() as port:
        async with worker_at(settings, tmp_path, f"127.0.0.1:{port}") as worker:
            await run_campaign(client, settings, pool, tmp_path, worker.queue, 10)
            log = worker.log()
            assert "metrics endpoint not started" in log and "WORKER_METRICS_ADDRESS" in log
            assert await worker.signal(signal.SIGTERM) == 0


async def test_the_http_service_counts_webhooks_stored_duplicate_refused_and_its_backlog(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    async with (
        serve_api(settings) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as http,
    ):
        response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        before = parse(response.text)
        assert names(before) >= {"campaigns_webhook_backlog", "campaigns_webhook_pending_store"}

        # A message the ledger does not know: stored, then tried again later.
        payload = event("email.delivered", "msg_" + unique("unknown").replace("-", "_"))
        svix_id = "msg_" + os.urandom(8).hex()
        assert (await post_event(http, payload, svix_id=svix_id)).json()["duplicate"] is False
        assert (await post_event(http, payload, svix_id=svix_id)).json()["duplicate"] is True
        body = orjson.dumps(payload)
        forged = {**signed(body), "svix-signature": "v1,AAAA"}
        assert (
            await http.post("/webhooks/resend", content=body, headers=forged)
        ).status_code == 401
        assert (
            await http.post("/webhooks/resend", content=b"[]", headers=signed(b"[]"))
        ).status_code == 400

        async def retried() -> Samples:
            return parse((await http.get("/metrics")).text)

        after = await eventually(
            retried, lambda s: total(s, "campaigns_webhook_retries_total") >= 1, what="a retry"
        )

    assert total(after, "campaigns_webhook_events_total", result="stored") == 1
    assert total(after, "campaigns_webhook_events_total", result="duplicate") == 1
    assert (
        total(after, "campaigns_webhook_refused_total", status="401", reason="bad_signature") == 1
    )
    assert total(after, "campaigns_webhook_refused_total", status="400") == 1
    assert total(after, "campaigns_webhook_refused_total") == 2
    backlog = {
        dict(labels)["state"] for name, labels in after if name == "campaigns_webhook_backlog"
    }
    assert backlog == {"due", "waiting"}
    # Our event waits for its message (the applier may be settling other tests' too).
    assert total(after, "campaigns_webhook_backlog") >= 1
    assert names(after) <= metrics.exported_names() | {
        name for name in names(after) if name.endswith("_created")
    }


async def test_the_http_service_serves_no_metrics_when_turned_off(settings: Settings) -> None:
    async with (
        serve_api(settings, api_metrics=False) as base,
        httpx.AsyncClient(base_url=base) as http,
    ):
        assert (await http.get("/metrics")).status_code == 404
        assert (await http.get("/healthz")).status_code == 200


def prometheus_config(target: str) -> str:
    return (
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: worker\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )


@asynccontextmanager
async def real_prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(target))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("ab")
    process = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def query(http: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
    try:
        response = await http.get("/api/v1/query", params={"query": promql})
    except httpx.TransportError:
        return []
    if response.status_code != 200:
        return []
    return response.json()["data"]["result"]


@pytest.mark.skipif(
    not Path(PROMETHEUS).is_file() and shutil.which("prometheus") is None,
    reason="Prometheus is not installed (apt-get install prometheus)",
)
async def test_a_real_prometheus_scrapes_the_worker(
    client: Client, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with (
        worker_at(settings, tmp_path, address) as worker,
        real_prometheus(tmp_path, address) as prometheus,
        httpx.AsyncClient(base_url=prometheus, timeout=5) as http,
    ):
        await serving(worker)
        _, campaign = await run_campaign(client, settings, pool, tmp_path, worker.queue, 60)
        promql = f'sum(campaigns_emails_total{{campaign="{campaign}",outcome="sent"}})'

        def sent(result: list[dict[str, Any]]) -> bool:
            return bool(result) and float(result[0]["value"][1]) == 59

        await eventually(lambda: query(http, promql), sent, within=30, what=promql)
        up = await query(http, 'up{job="worker"}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        # Every query of the provisioned dashboard is one this Prometheus accepts.
        for expr in dashboard_queries():
            grafana_free = expr.replace("$__rate_interval", "1m")
            response = await http.get("/api/v1/query", params={"query": grafana_free})
            assert response.status_code == 200, (expr, response.text)
