"""The worker process: runs campaign workflows and their activities.

Settings come from the environment (see ``campaigns.settings``): ``TEMPORAL_ADDRESS``,
``TEMPORAL_NAMESPACE``, ``CAMPAIGNS_TASK_QUEUE``, ``DATABASE_URL``,
``PROVIDER_BASE_URL`` and ``PROVIDER_API_KEY``. SIGTERM or SIGINT stops polling, lets
in-flight activities finish for ``WORKER_GRACEFUL_SHUTDOWN_SECONDS``, then hands the
rest back to Temporal, which retries them on another worker.

Run it with ``python worker.py`` (or ``python -m worker``); start as many as you like.
"""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities import PlanningActivities, SendingActivities
from campaigns import db
from campaigns.logs import configure_logging
from campaigns.provider import ProviderClient
from campaigns.settings import Settings
from campaigns.temporal import connect
from workflows import CampaignWorkflow

log = structlog.get_logger("worker")


def build_worker(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    provider: ProviderClient,
) -> Worker:
    """Wire the campaign workflow and activities onto ``settings.task_queue``."""
    planning = PlanningActivities(pool)
    sending = SendingActivities(pool, provider)
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[CampaignWorkflow],
        activities=[
            planning.prepare_campaign,
            planning.plan_batches,
            planning.abandon_failed,
            sending.send_batch,
        ],
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        graceful_shutdown_timeout=timedelta(seconds=settings.worker_graceful_shutdown_seconds),
        workflow_task_executor=ThreadPoolExecutor(max_workers=4),
    )


def provider_from(settings: Settings) -> ProviderClient:
    """The process's one provider client, or a clear error naming what is missing."""
    if not settings.provider_base_url or settings.provider_api_key is None:
        raise RuntimeError("PROVIDER_BASE_URL and PROVIDER_API_KEY must be set for the worker")
    return ProviderClient(
        settings.provider_base_url,
        settings.provider_api_key,
        timeout_seconds=settings.provider_timeout_seconds,
        max_connections=settings.provider_max_connections,
    )


async def run(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    pool = await db.create_pool(
        settings.require_database_url(),
        max_size=min(settings.worker_max_concurrent_activities, 32),
    )
    provider = provider_from(settings)
    try:
        await db.require_current_schema(pool)
        client = await connect(settings)
        worker = build_worker(client, settings, pool, provider)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info(
            "worker started",
            task_queue=settings.task_queue,
            temporal=settings.temporal_address,
            namespace=settings.temporal_namespace,
            provider=settings.provider_base_url,
        )
        async with worker:
            await stop.wait()
            log.info("worker stopping: finishing in-flight activities")
        log.info("worker stopped")
    finally:
        await provider.aclose()
        await pool.close()


def main() -> None:
    """Entry point: ``python worker.py``."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except (RuntimeError, db.SchemaOutOfDate, OSError) as exc:
        log.error("worker cannot start", error=str(exc))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
