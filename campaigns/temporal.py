"""Connecting to Temporal with the project's data converter; task-queue settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    UpdateTaskQueueConfigRequest,
)
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime

from campaigns.settings import Settings

WORKFLOW_TYPE = "CampaignWorkflow"


async def connect(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """A client for ``settings``' server and namespace, speaking pydantic JSON.

    ``runtime``: the Temporal runtime to use (a worker passes the one that exports its
    metrics); the SDK's default one when None.
    """
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
            runtime=runtime,
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot reach Temporal at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace}): {exc}. Start the local stack with "
            "`campaigns stack up` or set TEMPORAL_ADDRESS."
        ) from exc


@dataclass(frozen=True, slots=True)
class QueueView:
    """What Temporal reports of an activity task queue."""

    rate_limit: float | None
    """The queue's rate limit in activities/s; None: none set."""
    backlog: int
    """Activities scheduled and not yet started (approximate)."""
    backlog_age_seconds: float
    dispatch_rate: float
    """Activities started per second lately (Temporal's estimate)."""


async def set_queue_rate_limit(
    client: Client, task_queue: str, rps: float | None, reason: str
) -> None:
    """Set (None: remove) the rate limit of an activity task queue, for every worker.

    Temporal's matching service dispatches the queue's activities at this rate in
    total, whatever the number of workers polling it (it overrides the workers' own
    ``max_task_queue_activities_per_second``).
    """
    request = UpdateTaskQueueConfigRequest(
        namespace=client.namespace,
        identity=client.identity,
        task_queue=task_queue,
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    )
    update = request.update_queue_rate_limit
    update.reason = reason[:200]
    if rps is not None:
        update.rate_limit.requests_per_second = rps
    await client.workflow_service.update_task_queue_config(request, timeout=timedelta(seconds=10))


async def describe_queue(client: Client, task_queue: str) -> QueueView:
    """The rate limit, backlog and dispatch rate of an activity task queue."""
    answer = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            report_config=True,
            report_stats=True,
        ),
        timeout=timedelta(seconds=10),
    )
    limit = answer.config.queue_rate_limit
    stats = answer.stats
    return QueueView(
        rate_limit=limit.rate_limit.requests_per_second if limit.HasField("rate_limit") else None,
        backlog=stats.approximate_backlog_count,
        backlog_age_seconds=stats.approximate_backlog_age.ToTimedelta().total_seconds(),
        dispatch_rate=stats.tasks_dispatch_rate,
    )
