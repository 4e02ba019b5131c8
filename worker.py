"""The worker process: runs campaign workflows and their activities.

Settings come from the environment (see ``campaigns.settings``): ``TEMPORAL_ADDRESS``,
``TEMPORAL_NAMESPACE``, ``CAMPAIGNS_TASK_QUEUE``, ``DATABASE_URL``,
``PROVIDER_BASE_URL``, ``PROVIDER_API_KEY`` and ``WORKER_QUEUES`` (``campaigns``,
``maintenance`` or both, the default); a ``campaigns`` worker also needs
``UNSUBSCRIBE_BASE_URL`` and ``UNSUBSCRIBE_SECRET``. ``WORKER_METRICS_ADDRESS`` (default
``127.0.0.1:9464``, ``off`` to turn it off) is where it serves Prometheus metrics, the
Temporal SDK's and the product's (``campaigns.metrics``). SIGTERM or SIGINT stops polling, lets
in-flight activities finish for ``WORKER_GRACEFUL_SHUTDOWN_SECONDS``, then hands the
rest back to Temporal, which retries them on another worker.

Run it with ``python worker.py`` (or ``python -m worker``); start as many as you like.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import TypeVar

import asyncpg
import structlog
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.worker import Worker

from activities import (
    AutomaticHeartbeats,
    BoundedFailures,
    MaintenanceActivities,
    PlanningActivities,
    ReputationActivities,
    SendingActivities,
)
from activities._account_rate import AccountRate
from campaigns import metrics, store
from campaigns.contract import send_task_queue
from campaigns.logs import configure_logging
from campaigns.provider import ProviderClient
from campaigns.schedules import MAINTENANCE_TASK_QUEUE, refresh_once
from campaigns.sender_identity import SendingDomains
from campaigns.settings import METRICS_OFF, Settings
from campaigns.temporal import connect
from campaigns.unsubscribe import UnsubscribeConfigError, UnsubscribeLinks
from workflows import CampaignWorkflow, RefreshFirstPartyOrgsWorkflow

log = structlog.get_logger("worker")
T = TypeVar("T")
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
    ``settings.task_queue``, and the batches on the provider account's task queue
    (``send_task_queue``), whose rate limit is the account's shared rate;
    ``maintenance`` runs the scheduled refresh of first-party orgs on its own task
    queue, so the send path never runs it.
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
        sends_queue = send_task_queue(settings.task_queue)
        sending = SendingActivities(
            pool,
            provider,
            SendingDomains(settings.shared_sending_domain, settings.shared_tracking_host),
            refresh_first_party=lambda: refresh_once(client),
            unsubscribe=unsubscribe_links_from(settings),
            account_rate=AccountRate(pool, client, sends_queue),
        )
        workers.append(
            Worker(
                client,
                task_queue=sends_queue,
                activities=[sending.send_batch],
                max_concurrent_activities=settings.worker_max_concurrent_activities,
                graceful_shutdown_timeout=timedelta(
                    seconds=settings.worker_graceful_shutdown_seconds
                ),
                interceptors=[BoundedFailures(), AutomaticHeartbeats()],
            )
        )
        workers.append(
            Worker(
                client,
                task_queue=settings.task_queue,
                workflows=[CampaignWorkflow],
                activities=[
                    planning.prepare_campaign,
                    planning.plan_batches,
                    planning.plan_sends,
                    planning.abandon_failed,
                    # Runs prepared before the account's queue existed send here.
                    sending.send_batch,
                    ReputationActivities(pool).read_engagement,
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
        # Looked up per answer: the metrics are installed after the client is made.
        on_answer=lambda status, seconds: metrics.worker().provider_answer(status, seconds),
    )


class ConfigurationError(Exception):
    """A setting that waiting cannot fix: the worker exits at once, saying which."""


def unsubscribe_links_from(settings: Settings) -> UnsubscribeLinks:
    """The signer of every message's unsubscribe link (``UNSUBSCRIBE_BASE_URL``,
    ``UNSUBSCRIBE_SECRET``, ``UNSUBSCRIBE_PREVIOUS_SECRETS``, ``UNSUBSCRIBE_MAILTO``).

    Raises:
        ConfigurationError: naming the variable that is missing or wrong.
    """
    try:
        return UnsubscribeLinks.from_settings(settings)
    except UnsubscribeConfigError as exc:
        raise ConfigurationError(
            f"{exc}; the worker signs every message's unsubscribe link"
        ) from None


RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
SCHEMA_WAIT_SECONDS = 600.0
"""How long a schema behind the code is waited for (migrations may be running)."""
_ROLES = ("campaigns", "maintenance")
# SQLSTATEs of a server that is starting, recovering, shutting down or full: wait.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57", "53")


def queues_from(settings: Settings) -> list[str]:
    """The roles ``WORKER_QUEUES`` asks for, or a ``ConfigurationError``."""
    queues = [q.strip() for q in settings.worker_queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(_ROLES))
    if unknown or not queues:
        raise ConfigurationError(
            f"unknown worker queue(s) {', '.join(unknown) or '(none given)'} in WORKER_QUEUES; "
            "use campaigns, maintenance or both"
        )
    return queues


def metrics_runtime(settings: Settings) -> Runtime | None:
    """The Temporal runtime serving this worker's metrics at ``WORKER_METRICS_ADDRESS``,
    with the product's instruments installed on it; None when metrics are off.

    An address already in use is logged as an error and the worker runs without its
    endpoint: sending mail matters more than being scraped, and Prometheus shows the
    target as down. (A malformed address never gets here: ``Settings`` refuses it.)
    """
    address = settings.worker_metrics_address
    if address == METRICS_OFF:
        log.info("metrics endpoint off", setting="WORKER_METRICS_ADDRESS")
        return None
    try:
        runtime = metrics.worker_runtime(address)
    except ValueError as exc:
        log.error(
            "metrics endpoint not started: set WORKER_METRICS_ADDRESS to a free ip:port or 'off'",
            address=address,
            error=str(exc),
        )
        return None
    metrics.install(runtime.metric_meter)
    log.info("metrics endpoint listening", url=f"http://{address}/metrics")
    return runtime


def _transient(error: BaseException) -> bool:
    """Whether waiting may cure ``error`` (a server not up yet, a network fault)."""
    if isinstance(error, asyncpg.PostgresError):
        return str(error.sqlstate or "").startswith(_TRANSIENT_SQLSTATE_CLASSES)
    return isinstance(
        error, OSError | asyncpg.InterfaceError | store.SchemaOutOfDate | RuntimeError
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncpg.PostgresError):
        return f"SQLSTATE {error.sqlstate}: {error}"
    return str(error) or type(error).__name__


async def _ready(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    *,
    give_up_after: float | None = None,
    note: str = "",
) -> T | None:
    """``attempt()``'s result, retried with backoff (1 s doubling to 30 s) while it fails
    in a way that waiting may cure; None if the worker is told to stop meanwhile.

    Raises:
        ConfigurationError: the failure is one waiting cannot cure, or it lasted longer
            than ``give_up_after`` seconds.
    """
    delay, since = RETRY_FIRST_SECONDS, time.monotonic()
    while True:
        try:
            return await attempt()
        except Exception as error:
            waited = time.monotonic() - since
            if not _transient(error) or (give_up_after is not None and waited > give_up_after):
                raise ConfigurationError(f"{what}: {_reason(error)}") from None
            log.warning(
                f"waiting for {what}",
                reason=_reason(error),
                retry_in_seconds=delay,
                waited_seconds=round(waited, 1),
                **({"note": note} if note else {}),
            )
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
            return None
        except TimeoutError:
            delay = min(delay * 2, RETRY_MAX_SECONDS)


async def run(settings: Settings) -> None:
    """Wait for PostgreSQL, its schema and Temporal, then run until SIGTERM/SIGINT and
    shut down gracefully.

    Raises:
        ConfigurationError: a setting is missing or wrong (nothing to wait for).
    """
    queues = queues_from(settings)
    try:
        database_url = settings.require_database_url()
    except RuntimeError as exc:
        raise ConfigurationError(str(exc)) from None
    if "campaigns" in queues:
        unsubscribe_links_from(settings)  # refused now, before waiting for any server
    try:
        provider = provider_from(settings)
    except RuntimeError as exc:
        raise ConfigurationError(str(exc)) from None
    # Up before the waits, so a worker waiting for its servers is seen (and scraped).
    runtime = metrics_runtime(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    pool: asyncpg.Pool | None = None
    try:
        pool = await _ready(
            "PostgreSQL",
            lambda: store.create_pool(
                database_url, max_size=min(settings.worker_max_concurrent_activities, 32)
            ),
            stop,
        )
        if pool is None:
            return
        ready_pool = pool

        async def schema_is_current() -> bool:
            await store.require_current_schema(ready_pool)
            return True

        schema = await _ready(
            "the database schema",
            schema_is_current,
            stop,
            give_up_after=SCHEMA_WAIT_SECONDS,
            note="the schema is not the one this code needs; migrations may be running "
            f"(`campaigns db migrate`); waiting up to {SCHEMA_WAIT_SECONDS:.0f}s",
        )
        if schema is None:  # told to stop while waiting
            return
        client = await _ready(
            f"Temporal at {settings.temporal_address}",
            lambda: connect(settings, runtime=runtime),
            stop,
        )
        if client is None:
            return
        workers = build_workers(client, settings, pool, provider, queues)
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
        if pool is not None:
            await pool.close()


def main() -> None:
    """Entry point: ``python worker.py``.

    Exits 2 at once on a configuration error (a missing setting, an unknown queue, a
    schema still behind after ``SCHEMA_WAIT_SECONDS``); waits for servers that are not
    reachable yet.
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        configure_logging("INFO", "auto")
        log.error("worker cannot start: invalid settings", error=str(exc))
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except ConfigurationError as exc:
        log.error("worker cannot start", error=str(exc))
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
