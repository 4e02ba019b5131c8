"""The worker process: runs campaign workflows and their activities.

Settings come from the environment (see ``campaigns.settings``): ``TEMPORAL_ADDRESS``,
``TEMPORAL_NAMESPACE``, ``CAMPAIGNS_TASK_QUEUE``, ``DATABASE_URL``,
``PROVIDER_BASE_URL``, ``PROVIDER_API_KEY`` and ``WORKER_QUEUES`` (``campaigns``,
``maintenance`` or both, the default). SIGTERM or SIGINT stops polling, lets
in-flight activities finish for ``WORKER_GRACEFUL_SHUTDOWN_SECONDS``, then hands the
rest back to Temporal, which retries them on another worker.

Run it with ``python worker.py`` (or ``python -m worker``); start as many as you like.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities import (
    AutomaticHeartbeats,
    BoundedFailures,
    MaintenanceActivities,
    PlanningActivities,
    SendingActivities,
)
from campaigns import db
from campaigns.logs import configure_logging
from campaigns.provider import ProviderClient
from campaigns.schedules import MAINTENANCE_TASK_QUEUE, refresh_once
from campaigns.sender_identity import SendingDomains
from campaigns.settings import Settings
from campaigns.temporal import connect
from workflows import CampaignWorkflow, RefreshFirstPartyOrgsWorkflow

log = structlog.get_logger("worker")
STICKY_QUEUE_TIMEOUT = timedelta(seconds=4)


def build_workers(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    provider: ProviderClient,
    queues: Iterable[str] = ("campaigns", "maintenance"),
) -> list[Worker]:
    """Workers for the requested roles.

    ``campaigns`` runs the campaign workflow and its activities on
    ``settings.task_queue``; ``maintenance`` runs the scheduled refresh of first-party
    orgs on its own task queue, so the send path never runs it.
    """
    workers = []
    roles = set(queues)
    unknown = roles - {"campaigns", "maintenance"}
    if unknown:
        raise RuntimeError(
            f"unknown worker queue(s) {', '.join(sorted(unknown))}; use campaigns, maintenance"
        )
    if "campaigns" in roles:
        planning = PlanningActivities(pool, client)
        sending = SendingActivities(
            pool,
            provider,
            SendingDomains(settings.shared_sending_domain, settings.shared_tracking_host),
            refresh_first_party=lambda: refresh_once(client),
        )
        workers.append(
            Worker(
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
                graceful_shutdown_timeout=timedelta(
                    seconds=settings.worker_graceful_shutdown_seconds
                ),
                workflow_task_executor=ThreadPoolExecutor(max_workers=4),
                # A workflow task for a worker that died waits this long on its sticky
                # queue before any worker may take it (default 10 s): part of the
                # pause a crash causes, while a cache miss only costs a replay.
                sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
                interceptors=[BoundedFailures(), AutomaticHeartbeats()],
            )
        )
    if "maintenance" in roles:
        maintenance = MaintenanceActivities(pool)
        workers.append(
            Worker(
                client,
                task_queue=MAINTENANCE_TASK_QUEUE,
                workflows=[RefreshFirstPartyOrgsWorkflow],
                activities=[maintenance.refresh_first_party_orgs],
                max_concurrent_activities=4,
                interceptors=[BoundedFailures()],
                graceful_shutdown_timeout=timedelta(
                    seconds=settings.worker_graceful_shutdown_seconds
                ),
            )
        )
    return workers


@asynccontextmanager
async def running(workers: list[Worker]) -> AsyncIterator[None]:
    """Run ``workers`` for the duration of the block; shut them down gracefully after."""
    async with AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        yield


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
        queues = [q.strip() for q in settings.worker_queues.split(",") if q.strip()]
        workers = build_workers(client, settings, pool, provider, queues)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info(
            "worker started",
            queues=queues,
            task_queue=settings.task_queue,
            temporal=settings.temporal_address,
            namespace=settings.temporal_namespace,
            provider=settings.provider_base_url,
        )
        async with running(workers):
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
