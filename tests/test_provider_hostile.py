"""A hostile provider: malformed, huge, slow, redirecting and echoing answers.

Unit tests send real requests with ``ProviderClient`` to the hostile server over HTTP;
end-to-end tests run campaigns through the Temporal dev server and PostgreSQL with a
worker pointed at it. What must hold: every answer becomes a bounded outcome (never an
endless activity retry), every wait ends, and nothing the provider says, other than
its status and a known-shape error name, reaches workflow history.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from campaigns.models import CampaignSpec, CampaignState, CampaignStatus
from campaigns.provider import (
    MAX_ERROR_CHARS,
    MAX_RETRY_AFTER_SECONDS,
    Answer,
    ProviderAuthError,
    ProviderClient,
    ProviderConfigError,
    ReplyKind,
    classify_answer,
)
from campaigns.provider._client import bounded, error_name
from campaigns.settings import Settings
from tests.helpers import addresses, make_audience, make_org, make_spec, unique
from tests.hostile_provider import LONG_MESSAGE_CHARS, SECRET_TOKEN, HostileProvider
from workflows import CampaignWorkflow

API_KEY = "re_live_" + uuid.uuid4().hex
"""The key our client sends, which the hostile provider echoes back."""
ADDRESS = "victim.000001@example.com"
MAX_CODE_CHARS = 80


@pytest.fixture(scope="module")
async def hostile() -> AsyncIterator[HostileProvider]:
    server = await HostileProvider().start()
    yield server
    await server.stop()


@asynccontextmanager
async def provider_for(
    hostile: HostileProvider, mode: str, timeout_seconds: float = 5.0
) -> AsyncIterator[ProviderClient]:
    provider = ProviderClient(
        hostile.url(mode), SecretStr(API_KEY), timeout_seconds=timeout_seconds
    )
    try:
        yield provider
    finally:
        await provider.aclose()


def emails(count: int = 3) -> list[dict]:
    return [
        {"from": "News <news@example.com>", "to": [address], "subject": "Hi", "text": "Hi"}
        for address in [ADDRESS, *addresses("victim", count)[1:]]
    ]


def leaked(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The provider's words (or our secret) found in ``text``."""
    suspects = (API_KEY, SECRET_TOKEN, "Bearer", "@example.com", "gateway", "zzzz", *extra)
    return [suspect for suspect in suspects if suspect in text]


def assert_ours(code: str | None) -> None:
    assert code is not None
    assert len(code) <= MAX_CODE_CHARS, code
    assert not leaked(code), code


# -- ProviderClient against the hostile server ----------------------------------------------


async def test_a_well_formed_answer_is_accepted(hostile: HostileProvider) -> None:
    async with provider_for(hostile, "ok") as provider:
        reply = await provider.send_batch(emails(3), "key-ok")
    assert reply.kind is ReplyKind.ACCEPTED
    assert reply.message_ids == ["msg-0000", "msg-0001", "msg-0002"]
    assert reply.code == "HTTP 200" and reply.error is None


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        ("not-json", "is not a JSON object"),
        ("not-an-object", "is not a JSON object"),
        ("no-data", "has no 'data' list"),
        ("data-not-list", "has no 'data' list"),
        ("wrong-length", "has 4 ids for 3 emails"),
        ("missing-id", "item 0 has no valid id"),
        ("item-not-object", "item 0 has no valid id"),
        ("id-not-string", "item 0 has no valid id"),
        ("id-huge", "item 0 has no valid id"),
        ("id-address", "item 0 has no valid id"),
    ],
)
async def test_a_200_that_is_not_one_valid_id_per_email_fails_softly(
    hostile: HostileProvider, mode: str, problem: str
) -> None:
    async with provider_for(hostile, mode) as provider:
        reply = await provider.send_batch(emails(3), f"key-{mode}")

    assert reply.kind is ReplyKind.SOFT_FAILURE
    assert reply.message_ids == []
    assert reply.code == f"HTTP 200 answer {problem}"
    assert_ours(reply.code)
    assert reply.error is not None and reply.error.startswith(reply.code)
    assert len(reply.error) <= MAX_ERROR_CHARS


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("big", "larger than 1 MiB"),
        ("big-declared", "larger than 1 MiB (Content-Length)"),
        ("gzip-bomb", "larger than 1 MiB once decompressed"),
    ],
)
async def test_an_answer_over_1_mib_is_not_read_whole(
    hostile: HostileProvider, mode: str, why: str
) -> None:
    async with provider_for(hostile, mode) as provider:
        reply = await provider.send_batch(emails(2), f"key-{mode}")
        # The connection with the unread rest is dropped, not reused for the next one.
        again = await provider.send_batch(emails(2), f"key-{mode}-2")

    assert reply.kind is again.kind is ReplyKind.SOFT_FAILURE
    assert reply.code == again.code == f"HTTP 200 answer {why}"
    assert reply.error == reply.code


async def test_a_trickled_answer_ends_at_the_total_deadline(hostile: HostileProvider) -> None:
    # One byte every 0.2 s never trips a per-read timeout of 1 s; the deadline must.
    async with provider_for(hostile, "trickle", timeout_seconds=1.0) as provider:
        started = time.monotonic()
        async with asyncio.timeout(10):
            reply = await provider.send_batch(emails(2), "key-trickle")
        elapsed = time.monotonic() - started

    assert 0.9 <= elapsed < 2.5
    assert reply.kind is ReplyKind.SOFT_FAILURE
    assert reply.code == "timeout: no whole answer within 1s"


async def test_a_redirect_is_not_followed_and_is_a_configuration_error(
    hostile: HostileProvider,
) -> None:
    async with provider_for(hostile, "redirect") as provider:
        with pytest.raises(ProviderConfigError) as refused:
            await provider.send_batch(emails(2), "key-redirect")

    message = str(refused.value)
    assert "redirect (HTTP 302)" in message and "PROVIDER_BASE_URL" in message
    assert not leaked(message, ("127.0.0.1", "Location", hostile.base))
    assert refused.value.code == "HTTP 302"
    assert hostile.requests["redirect"] == 1  # and nothing was sent to the Location


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("echo-409", ReplyKind.SOFT_FAILURE),
        ("echo-422", ReplyKind.REJECTED),
        ("echo-429", ReplyKind.THROTTLED),
        ("echo-500", ReplyKind.SOFT_FAILURE),
        ("html-500", ReplyKind.SOFT_FAILURE),
    ],
)
async def test_an_echoing_error_answer_keeps_only_its_status_for_history(
    hostile: HostileProvider, mode: str, kind: ReplyKind
) -> None:
    status = int(mode.rsplit("-", 1)[1])
    async with provider_for(hostile, mode) as provider:
        reply = await provider.send_batch(emails(2), f"key-{mode}")

    assert reply.kind is kind
    # The name ("Bearer sk_live_... victim@...") is not a token: only the status is kept.
    assert reply.code == f"HTTP {status}"
    # The ledger keeps the answer, cut to its bound.
    assert reply.error is not None and reply.error.startswith(f"HTTP {status} ")
    assert len(reply.error) <= MAX_ERROR_CHARS
    assert API_KEY in reply.error
    assert "characters]" in reply.error  # says it was cut


async def test_a_token_error_name_is_kept_but_never_the_message(
    hostile: HostileProvider,
) -> None:
    async with provider_for(hostile, "token-422") as provider:
        reply = await provider.send_batch(emails(2), "key-token-422")

    assert reply.kind is ReplyKind.REJECTED
    assert reply.code == "HTTP 422 validation_error"
    assert reply.error is not None and len(reply.error) <= MAX_ERROR_CHARS


@pytest.mark.parametrize(
    ("mode", "error", "code"),
    [("echo-401", ProviderAuthError, "HTTP 401"), ("echo-404", ProviderConfigError, "HTTP 404")],
)
async def test_auth_and_config_errors_speak_only_our_words(
    hostile: HostileProvider, mode: str, error: type[Exception], code: str
) -> None:
    async with provider_for(hostile, mode) as provider:
        with pytest.raises(error) as raised:
            await provider.send_batch(emails(2), f"key-{mode}")

    message = str(raised.value)
    assert f"({code})" in message
    assert len(message) < 200, message
    assert not leaked(message, (hostile.base, "/emails/batch"))
    assert raised.value.code == code  # type: ignore[attr-defined]
    detail = raised.value.detail  # type: ignore[attr-defined]  # for logs, never history
    assert detail.startswith(f"{code} Bearer {SECRET_TOKEN}") and len(detail) <= MAX_ERROR_CHARS


async def test_a_retry_after_of_forever_is_bounded(hostile: HostileProvider) -> None:
    async with provider_for(hostile, "retry-after-forever") as provider:
        reply = await provider.send_batch(emails(1), "key-forever")
    assert reply.kind is ReplyKind.THROTTLED
    assert reply.retry_after == MAX_RETRY_AFTER_SECONDS
    assert reply.code == "HTTP 429 rate_limit_exceeded"


# -- the pure decisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("validation_error", "validation_error"),
        ("a" * 64, "a" * 64),
        ("a" * 65, None),
        ("Bearer sk_live_abc", None),
        ("victim@example.com", None),
        ("validation_error\n", None),
        ("", None),
        (42, None),
        (None, None),
    ],
)
def test_error_names_are_kept_only_as_short_tokens(name: object, kept: str | None) -> None:
    assert error_name(name) == kept


def test_bounded_cuts_long_text_and_says_so() -> None:
    cut = bounded("x" * 200_000 + "\x1b[2J")
    assert len(cut) == MAX_ERROR_CHARS
    assert cut.endswith(f"[cut to {MAX_ERROR_CHARS:,} of 200,004 characters]")
    assert bounded("a\nb\x1b") == "a b "
    assert bounded("short") == "short"


def test_classify_answer_needs_one_token_id_per_email() -> None:
    ok = classify_answer(Answer(200, b'{"data": [{"id": "a-1"}, {"id": "b_2"}]}'), 2)
    assert ok.kind is ReplyKind.ACCEPTED and ok.message_ids == ["a-1", "b_2"]
    for body in (b'{"data": [{"id": "a-1"}, {"id": ""}]}', b'{"data": [{"id": "a b"}]}'):
        reply = classify_answer(Answer(200, body), body.count(b'"id"'))
        assert reply.kind is ReplyKind.SOFT_FAILURE, body
    # An id holding a newline must not pass as two ids, nor a long one as many short.
    joined = "-".join(["x" * 100] * 50)
    for body in (
        b'{"data": [{"id": "a\\nb"}, {"id": "c"}]}',
        json.dumps({"data": [{"id": joined.replace("-", "\n")}]}).encode(),
    ):
        reply = classify_answer(Answer(200, body), body.count(b'"id"'))
        assert reply.kind is ReplyKind.SOFT_FAILURE, body[:60]
    unread = classify_answer(Answer(200, None, "larger than 1 MiB"), 1)
    assert unread.kind is ReplyKind.SOFT_FAILURE
    assert unread.code == "HTTP 200 answer larger than 1 MiB"
    # An error answer too large to read keeps its meaning by status.
    assert classify_answer(Answer(422, None, "larger than 1 MiB"), 1).kind is ReplyKind.REJECTED
    weird = classify_answer(Answer(418, b"\xff\xfe teapot"), 1)
    assert weird.kind is ReplyKind.SOFT_FAILURE and weird.code == "HTTP 418"
    with pytest.raises(ProviderConfigError):
        classify_answer(Answer(307, b""), 1)


# -- end to end: Temporal, PostgreSQL, the hostile server ------------------------------------


@asynccontextmanager
async def worker_for(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    hostile: HostileProvider,
    mode: str,
    timeout_seconds: float = 5.0,
) -> AsyncIterator[str]:
    """A campaign worker on a task queue of its own, sending to ``mode``; yields the queue.

    The session's ``worker`` fixture serves the maintenance queue (first-party
    refresh); a process may run only one worker per queue, so this one runs campaigns.
    """
    from worker import build_workers, running

    queue = unique("hostile")
    queue_settings = settings.model_copy(
        update={
            "task_queue": queue,
            "provider_base_url": hostile.url(mode),
            "provider_api_key": SecretStr(API_KEY),
        }
    )
    async with provider_for(hostile, mode, timeout_seconds) as provider:
        workers = build_workers(client, queue_settings, pool, provider, queues=("campaigns",))
        async with running(workers):
            yield queue


async def hostile_campaign(
    pool: asyncpg.Pool, tmp_path: Path, count: int = 30, **overrides: object
) -> tuple[CampaignSpec, list[str]]:
    org = await make_org(pool)
    recipients = addresses(unique("victim"), count)
    audience, _ = await make_audience(pool, tmp_path, org, recipients)
    fields = {"batch_size": 10, "recipients_per_activity": 30, "retry_delays_seconds": [1]}
    return make_spec(org, audience, **{**fields, **overrides}), recipients


async def start(client: Client, spec: CampaignSpec, queue: str) -> WorkflowHandle:
    return await client.start_workflow(
        CampaignWorkflow.run, spec, id=spec.campaign_id, task_queue=queue
    )


async def ledger_rows(pool: asyncpg.Pool, campaign_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT status::text AS status, last_error FROM deliveries WHERE campaign_id = $1",
        campaign_id,
    )


async def history_json(handle: WorkflowHandle) -> str:
    return (await handle.fetch_history()).to_json()


@pytest.mark.usefixtures("worker")
async def test_a_provider_that_omits_ids_fails_recipients_through_retry_rounds(
    client: Client, settings: Settings, pool: asyncpg.Pool, hostile: HostileProvider, tmp_path
) -> None:
    spec, _ = await hostile_campaign(pool, tmp_path)
    before = hostile.requests["missing-id"]
    async with worker_for(client, settings, pool, hostile, "missing-id") as queue:
        handle = await start(client, spec, queue)
        async with asyncio.timeout(60):  # not stuck retrying an activity
            result = await handle.result()

    assert result.state is CampaignState.COMPLETED
    assert result.counts.abandoned == 30 and result.counts.sent == 0
    assert result.last_error == "HTTP 200 answer item 0 has no valid id"
    rows = await ledger_rows(pool, spec.campaign_id)
    assert len(rows) == 30 and {row["status"] for row in rows} == {"abandoned"}
    assert all(row["last_error"].startswith(result.last_error) for row in rows)
    # Three requests in the first pass, the same three in the one retry round.
    assert hostile.requests["missing-id"] - before == 6


@pytest.mark.usefixtures("worker")
async def test_an_echoing_provider_puts_nothing_of_its_answer_into_history(
    client: Client, settings: Settings, pool: asyncpg.Pool, hostile: HostileProvider, tmp_path
) -> None:
    spec, recipients = await hostile_campaign(pool, tmp_path)
    async with worker_for(client, settings, pool, hostile, "echo-500") as queue:
        handle = await start(client, spec, queue)
        async with asyncio.timeout(60):
            result = await handle.result()

    assert result.state is CampaignState.COMPLETED
    assert result.counts.abandoned == 30
    assert result.last_error == "HTTP 500"
    history = await history_json(handle)
    assert not leaked(history, tuple(recipients))
    assert len(history) < LONG_MESSAGE_CHARS // 2
    # The ledger keeps the answer, cut to its bound.
    for row in await ledger_rows(pool, spec.campaign_id):
        error = row["last_error"]
        assert error.startswith("HTTP 500 Bearer " + SECRET_TOKEN)
        assert len(error) <= MAX_ERROR_CHARS


@pytest.mark.usefixtures("worker")
async def test_an_echoing_401_fails_the_campaign_in_our_words_only(
    client: Client, settings: Settings, pool: asyncpg.Pool, hostile: HostileProvider, tmp_path
) -> None:
    spec, recipients = await hostile_campaign(pool, tmp_path)
    async with worker_for(client, settings, pool, hostile, "echo-401") as queue:
        handle = await start(client, spec, queue)
        with pytest.raises(WorkflowFailureError) as failure:
            async with asyncio.timeout(60):
                await handle.result()

    assert "refused the API key (HTTP 401)" in str(failure.value.cause)
    history = await history_json(handle)
    assert "PROVIDER_API_KEY" in history  # our words are there ...
    assert not leaked(history, tuple(recipients))  # ... and none of theirs
    assert len(history) < LONG_MESSAGE_CHARS // 2


@pytest.mark.usefixtures("worker")
async def test_cancel_ends_a_campaign_whose_provider_trickles(
    client: Client, settings: Settings, pool: asyncpg.Pool, hostile: HostileProvider, tmp_path
) -> None:
    spec, _ = await hostile_campaign(pool, tmp_path, count=60, recipients_per_activity=20, window=1)
    seen = hostile.requests["trickle"]
    async with worker_for(client, settings, pool, hostile, "trickle", timeout_seconds=2) as queue:
        handle = await start(client, spec, queue)
        async with asyncio.timeout(30):  # a batch is stuck in an answer
            await hostile.requested("trickle", seen + 1)
        accepted: CampaignStatus = await handle.execute_update(CampaignWorkflow.cancel)
        assert accepted.controls is not None and accepted.controls.cancel_requested
        async with asyncio.timeout(30):
            result = await handle.result()

    assert result.state is CampaignState.CANCELLED
    assert result.counts.sent == 0
    rows = await ledger_rows(pool, spec.campaign_id)
    assert rows and all(row["status"] == "failed" for row in rows)
    assert {row["last_error"] for row in rows} == {"timeout: no whole answer within 2s"}
