"""What an activity failure may carry into workflow history: our words, bounded.

An activity's exception becomes a failure in workflow history, message and all. A
database error quotes the row it tripped on (``Key (email)=(ada@example.com)``), a
library error can quote whatever it was handed, and any message can be long. Every
failure therefore leaves the activity as an ``ApplicationError`` whose message is
at most ``MAX_FAILURE_MESSAGE`` characters, and whose cause, for errors that are not
ours, is named by its class (and SQLSTATE) only; the full error is logged by the
worker, which keeps it off the history.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from campaigns.safe_text import bounded

log = structlog.get_logger(__name__)

MAX_FAILURE_MESSAGE = 1000
"""Longest activity failure message that reaches workflow history, in characters."""
DATABASE_ERROR = "DatabaseError"


def _bounded(message: str) -> str:
    return bounded(message, MAX_FAILURE_MESSAGE)


def bounded_failure(error: BaseException) -> BaseException:
    """The exception to raise in place of ``error`` (itself when already safe).

    Our own ``ApplicationError`` keeps its type, retry behaviour and message (cut
    to the limit); cancellation passes through; anything else becomes a retryable
    ``ApplicationError`` that names the error's class and never quotes it.
    """
    if isinstance(error, asyncio.CancelledError | CancelledError):
        return error
    if isinstance(error, ApplicationError):
        if len(error.message) <= MAX_FAILURE_MESSAGE and not error.details:
            return error
        return ApplicationError(
            _bounded(error.message),
            type=error.type,
            non_retryable=error.non_retryable,
            next_retry_delay=error.next_retry_delay,
        )
    if isinstance(error, asyncpg.PostgresError):
        # Its message and detail quote values of the row: only the code is ours to show.
        return ApplicationError(
            f"database error {type(error).__name__} (SQLSTATE {error.sqlstate})",
            type=DATABASE_ERROR,
        )
    return ApplicationError(
        f"{type(error).__name__} in the activity (details in the worker's log)",
        type=type(error).__name__,
    )


class _BoundedFailures(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except BaseException as error:
            replacement = bounded_failure(error)
            if replacement is error:
                raise
            if not isinstance(error, ApplicationError):
                log.warning("activity failed", error_type=type(error).__name__, error=str(error))
            raise replacement from None


class BoundedFailures(Interceptor):
    """Worker interceptor: activity failures reach history short and quoting nothing."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap every activity of the worker."""
        return _BoundedFailures(next)
