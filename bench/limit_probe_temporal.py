"""Probe: Temporal's task-queue rate limit as an account-wide send limit.

Against a dev server started with fairness on (``temporal server start-dev --port P
--dynamic-config-value matching.enableFairness=true``), it measures, with trivial
50 ms activities on a queue limited to 50 activities/s (``UpdateTaskQueueConfig``):
the dispatch rate and how two fairness keys share it; a priority-1 workflow started
into the backlog (time to its first activity, its share until done); and how fast a
change of the limit to 20, then 80, shows in the per-second dispatch rate.

    python bench/limit_probe_temporal.py PORT

The companion ``bench/limit_probe_pg_bucket.py`` measures a token bucket in
PostgreSQL; ARCHITECTURE.md ("The shared send limit") compares the two.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.workflowservice.v1 import UpdateTaskQueueConfigRequest
from temporalio.client import Client
from temporalio.common import Priority
from temporalio.worker import Worker

starts: list[tuple[float, str]] = []


@activity.defn
async def work(tag: str) -> str:
    """A trivial activity: note when it started."""
    starts.append((time.monotonic(), tag))
    await asyncio.sleep(0.05)
    return tag


@workflow.defn
class Fan:
    """Schedule ``n`` activities at once with one priority and fairness key."""

    @workflow.run
    async def run(self, key: str, n: int, priority: int, queue: str) -> int:
        tasks = [
            workflow.execute_activity(
                work,
                key,
                start_to_close_timeout=timedelta(seconds=600),
                task_queue=queue,
                priority=Priority(priority_key=priority, fairness_key=key),
            )
            for _ in range(n)
        ]
        await asyncio.gather(*tasks)
        return n


async def set_rate(client: Client, queue: str, rps: float) -> None:
    """Set the activity task queue's rate limit."""
    request = UpdateTaskQueueConfigRequest(
        namespace="default",
        identity="probe",
        task_queue=queue,
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    )
    request.update_queue_rate_limit.rate_limit.requests_per_second = rps
    request.update_queue_rate_limit.reason = "probe"
    await client.workflow_service.update_task_queue_config(request)


def rate_in(since: float, until: float, tag: str | None = None) -> float:
    """Activities (of ``tag``) started per second between two instants."""
    count = sum(1 for t, g in starts if since <= t < until and (tag is None or g == tag))
    return count / (until - since)


async def main(port: int) -> None:
    client = await Client.connect(f"127.0.0.1:{port}")
    workflows_queue, queue = "wf-" + uuid.uuid4().hex[:6], "sends-" + uuid.uuid4().hex[:6]
    await set_rate(client, queue, 50)
    async with (
        Worker(client, task_queue=workflows_queue, workflows=[Fan]),
        Worker(client, task_queue=queue, activities=[work], max_concurrent_activities=200),
    ):
        t0 = time.monotonic()
        a = await client.start_workflow(
            Fan.run, args=["A", 1500, 3, queue], id="a-" + queue, task_queue=workflows_queue
        )
        b = await client.start_workflow(
            Fan.run, args=["B", 1500, 3, queue], id="b-" + queue, task_queue=workflows_queue
        )
        await asyncio.sleep(8)
        urgent_at = time.monotonic()
        urgent = await client.start_workflow(
            Fan.run, args=["P", 100, 1, queue], id="p-" + queue, task_queue=workflows_queue
        )
        await urgent.result()
        urgent_done = time.monotonic()
        await asyncio.sleep(2)
        at_20 = time.monotonic()
        await set_rate(client, queue, 20)
        await asyncio.sleep(8)
        at_80 = time.monotonic()
        await set_rate(client, queue, 80)
        await asyncio.sleep(8)
        end = time.monotonic()
        await a.cancel()
        await b.cancel()
    first = min(t for t, g in starts if g == "P")
    steady = (t0 + 2, t0 + 8)
    print(
        f"rate at 50/s (2..8 s): {rate_in(*steady):.1f}/s;"
        f" A {rate_in(*steady, 'A'):.1f}, B {rate_in(*steady, 'B'):.1f}"
    )
    share = rate_in(first, urgent_done, "P") / max(rate_in(first, urgent_done), 1e-9)
    print(
        f"priority 1: first activity after {first - urgent_at:.2f} s,"
        f" done in {urgent_done - urgent_at:.2f} s, share until done {share:.2f}"
    )
    for name, since, until in (("20", at_20, at_80), ("80", at_80, end)):
        per_second = [round(rate_in(since + i, since + i + 1)) for i in range(int(until - since))]
        print(f"after setting {name}/s, activities per second: {per_second}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
