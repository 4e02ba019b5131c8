"""Heartbeats for activities that do not send their own.

An activity with a heartbeat timeout whose worker dies is retried elsewhere as soon
as the timeout passes, instead of when its start-to-close timeout runs out. A short
database step (``prepare_campaign``, ``plan_batches``, ``abandon_failed``) has no
progress to report, so this interceptor heartbeats for it, every third of the
timeout, while it runs. An activity that heartbeats itself (``send_batch``, with
details to resume from) is left alone from its first heartbeat on, and the first
automatic heartbeat waits a third of the timeout, so its details are never replaced
by empty ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)


class _Outbound(ActivityOutboundInterceptor):
    """Notices when the activity heartbeats on its own."""

    def __init__(self, next: ActivityOutboundInterceptor) -> None:
        super().__init__(next)
        self.own_heartbeat = False

    def heartbeat(self, *details: Any) -> None:
        self.own_heartbeat = True
        super().heartbeat(*details)

    def automatic_heartbeat(self) -> None:
        """A heartbeat with no details, not counted as the activity's own."""
        self.next.heartbeat()


class _Inbound(ActivityInboundInterceptor):
    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        self._outbound = _Outbound(outbound)
        super().init(self._outbound)

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        timeout = activity.info().heartbeat_timeout
        if not timeout:
            return await super().execute_activity(input)
        beats = asyncio.create_task(self._beat(timeout.total_seconds() / 3))
        try:
            return await super().execute_activity(input)
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._outbound.own_heartbeat:
                return
            self._outbound.automatic_heartbeat()


class AutomaticHeartbeats(Interceptor):
    """Worker interceptor: heartbeat for activities that have a heartbeat timeout but
    do not heartbeat themselves."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap every activity of the worker."""
        return _Inbound(next)
