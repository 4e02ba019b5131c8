"""Schedule commands: the hourly first-party org refresh."""

from __future__ import annotations

from argparse import Namespace

from rich.console import Console
from rich.text import Text
from temporalio.client import ScheduleIntervalSpec
from temporalio.service import RPCError, RPCStatusCode

from campaigns.cli._campaign import CommandError
from campaigns.cli._progress import literal
from campaigns.schedules import (
    REFRESH_SCHEDULE_ID,
    apply_refresh_schedule,
    describe_refresh_schedule,
    refresh_schedule_handle,
)
from campaigns.settings import Settings
from campaigns.temporal import connect


async def _existing(settings: Settings):  # noqa: ANN202
    client = await connect(settings)
    handle = refresh_schedule_handle(client)
    try:
        await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise CommandError(
                f"schedule '{REFRESH_SCHEDULE_ID}' does not exist; run `campaigns schedules apply`",
                code=2,
            ) from None
        raise
    return client, handle


async def cmd_apply(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns schedules apply``: create or update, idempotently."""
    done = await apply_refresh_schedule(await connect(settings))
    console.print(
        Text.assemble("schedule ", literal(REFRESH_SCHEDULE_ID, "bold"), " ", literal(done))
    )
    return 0


async def cmd_trigger(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns schedules trigger``: run a refresh now."""
    _, handle = await _existing(settings)
    await handle.trigger()
    console.print(f"schedule [bold]{REFRESH_SCHEDULE_ID}[/] triggered")
    return 0


async def cmd_pause(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns schedules pause``."""
    _, handle = await _existing(settings)
    await handle.pause(note=args.note or "paused with `campaigns schedules pause`")
    console.print(f"schedule [bold]{REFRESH_SCHEDULE_ID}[/] paused")
    return 0


async def cmd_unpause(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns schedules unpause``."""
    _, handle = await _existing(settings)
    await handle.unpause(note=args.note or "unpaused with `campaigns schedules unpause`")
    console.print(f"schedule [bold]{REFRESH_SCHEDULE_ID}[/] unpaused")
    return 0


async def cmd_describe(args: Namespace, settings: Settings, console: Console) -> int:
    """``campaigns schedules describe``: spec, state, recent and next runs."""
    client, _ = await _existing(settings)
    description = await describe_refresh_schedule(client)
    schedule, info = description.schedule, description.info
    every = [
        str(spec.every)
        for spec in schedule.spec.intervals
        if isinstance(spec, ScheduleIntervalSpec)
    ]
    console.print(f"[bold]{REFRESH_SCHEDULE_ID}[/]")
    console.print(f"  every        {', '.join(every)} (jitter {schedule.spec.jitter})")
    console.print(f"  overlap      {schedule.policy.overlap.name}")
    console.print(f"  catch-up     {schedule.policy.catchup_window}")
    # the note is whatever `schedules pause --note` was given, so it is shown literally
    console.print(literal(f"  paused       {schedule.state.paused} {schedule.state.note or ''}"))
    console.print(f"  runs so far  {info.num_actions} (skipped {info.num_actions_skipped_overlap})")
    for action in info.recent_actions[-5:]:
        console.print(f"  ran          {action.scheduled_at.isoformat(timespec='seconds')}")
    for upcoming in info.next_action_times[:3]:
        console.print(f"  next         {upcoming.isoformat(timespec='seconds')}")
    return 0
