"""The hourly Temporal Schedule that refreshes the first-party org snapshot.

``apply`` creates the schedule or brings an existing one to the desired spec (keeping
whether it is paused), so running it any number of times leaves exactly one schedule.
The schedule is visible and operable with ``temporal schedule ...`` and in the Web UI.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.common import WorkflowIDConflictPolicy

from campaigns.first_party import RefreshResult
from workflows import RefreshFirstPartyOrgsWorkflow

MAINTENANCE_TASK_QUEUE = "maintenance"
REFRESH_SCHEDULE_ID = "first-party-orgs-refresh"
REFRESH_EVERY = timedelta(hours=1)
REFRESH_JITTER = timedelta(minutes=2)
CATCHUP_WINDOW = timedelta(minutes=30)
BOOTSTRAP_WORKFLOW_ID = "first-party-orgs-refresh-bootstrap"
# Bounds a bootstrap run nobody picks up (no maintenance worker) or that keeps retrying
# an outage; the hourly schedule takes over from there.
BOOTSTRAP_TIMEOUT = timedelta(minutes=10)


def refresh_schedule() -> Schedule:
    """The desired schedule: hourly, skip if the last one still runs, limited catch-up."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            RefreshFirstPartyOrgsWorkflow.run,
            id=REFRESH_SCHEDULE_ID,
            task_queue=MAINTENANCE_TASK_QUEUE,
            execution_timeout=timedelta(minutes=30),
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=REFRESH_EVERY)], jitter=REFRESH_JITTER
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=CATCHUP_WINDOW),
    )


async def apply_refresh_schedule(client: Client) -> str:
    """Create the schedule, or update it to the desired spec; return what was done."""
    desired = refresh_schedule()
    try:
        await client.create_schedule(REFRESH_SCHEDULE_ID, desired)
        return "created"
    except ScheduleAlreadyRunningError:
        pass

    def keep_state(current: ScheduleUpdateInput) -> ScheduleUpdate:
        desired.state = current.description.schedule.state  # paused stays paused
        return ScheduleUpdate(schedule=desired)

    await client.get_schedule_handle(REFRESH_SCHEDULE_ID).update(keep_state)
    return "updated"


def refresh_schedule_handle(client: Client) -> ScheduleHandle:
    """Handle on the refresh schedule (trigger, pause, unpause, describe, backfill)."""
    return client.get_schedule_handle(REFRESH_SCHEDULE_ID)


async def describe_refresh_schedule(client: Client) -> ScheduleDescription:
    """The schedule's spec, state, and recent and upcoming actions."""
    return await refresh_schedule_handle(client).describe()


async def refresh_once(client: Client) -> RefreshResult:
    """Run one refresh now and wait for it; concurrent callers share the same run.

    The send path uses this only when no snapshot was ever published, and bounds how
    long it waits (see ``FirstPartySnapshotCache.for_batch``).
    """
    handle = await client.start_workflow(
        RefreshFirstPartyOrgsWorkflow.run,
        id=BOOTSTRAP_WORKFLOW_ID,
        task_queue=MAINTENANCE_TASK_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        execution_timeout=BOOTSTRAP_TIMEOUT,
    )
    return await handle.result()
