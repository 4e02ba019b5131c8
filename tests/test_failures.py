"""Activity failures reach workflow history short and quoting nothing of the data."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities import BoundedFailures
from activities._failures import MAX_FAILURE_MESSAGE, bounded_failure


def test_our_errors_keep_type_and_retry_behaviour_but_are_cut_to_the_limit() -> None:
    long = ApplicationError("x" * 50_000, type="ProviderAuthError", non_retryable=True)
    bounded = bounded_failure(long)
    assert isinstance(bounded, ApplicationError)
    assert len(bounded.message) <= MAX_FAILURE_MESSAGE
    assert bounded.type == "ProviderAuthError" and bounded.non_retryable
    short = ApplicationError("fine", type="Throttled", next_retry_delay=timedelta(seconds=3))
    assert bounded_failure(short) is short


def test_other_errors_are_named_by_class_only() -> None:
    bounded = bounded_failure(KeyError("ada@example.com"))
    assert isinstance(bounded, ApplicationError)
    assert "ada@example.com" not in bounded.message
    assert bounded.type == "KeyError" and not bounded.non_retryable


_POOL: dict[str, asyncpg.Pool] = {}


@activity.defn
async def insert_twice(table: str) -> None:
    """Trip a unique violation whose message quotes an address."""
    pool = _POOL["pool"]
    for _ in range(2):
        await pool.execute(f"INSERT INTO {table} (email) VALUES ('ada.secret@example.com')")


@workflow.defn(sandboxed=False)  # a test workflow beside test-only imports
class InsertTwice:
    @workflow.run
    async def run(self, table: str) -> None:
        await workflow.execute_activity(
            insert_twice,
            table,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )


async def test_a_database_error_reaches_history_without_the_row_it_quotes(
    client: Client, pool: asyncpg.Pool
) -> None:
    table = f"failures_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE TABLE {table} (email text PRIMARY KEY)")
    _POOL["pool"] = pool
    queue = f"failures-{uuid.uuid4().hex[:8]}"
    try:
        async with Worker(
            client,
            task_queue=queue,
            workflows=[InsertTwice],
            activities=[insert_twice],
            interceptors=[BoundedFailures()],
        ):
            handle = await client.start_workflow(InsertTwice.run, table, id=queue, task_queue=queue)
            with pytest.raises(WorkflowFailureError):
                await handle.result()
            history = (await handle.fetch_history()).to_json()
    finally:
        await pool.execute(f"DROP TABLE {table}")
    assert "ada.secret@example.com" not in history
    assert "UniqueViolationError (SQLSTATE 23505)" in history
