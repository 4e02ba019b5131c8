"""The simulator's webhook events over real HTTP: a receiver of the test's own records
what arrives and verifies every request with Svix's library, as our service will."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from svix.webhooks import Webhook, WebhookVerificationError

from simulator import SimulatorConfig, start_simulator
from simulator.webhooks import (
    AddressLists,
    MessageRecord,
    WebhookSender,
    WebhookSettings,
    plan_message,
)
from tests.helpers import eventually

API_KEY = "re_hooks_" + uuid.uuid4().hex
ADMIN_TOKEN = "simadm_hooks_" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SEND = {"Authorization": f"Bearer {API_KEY}"}
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclass
class Received:
    """One request the receiver got, and what it answered."""

    headers: dict[str, str]
    body: bytes
    status: int
    arrived: float

    @property
    def event(self) -> dict[str, Any]:
        return orjson.loads(self.body)

    @property
    def svix_id(self) -> str:
        return self.headers["svix-id"]


@dataclass
class Receiver:
    """A webhook endpoint: records requests, answers 500 to the first ``fail_first``
    (or all, with ``always_fail``), and holds requests while ``release`` is clear."""

    fail_first: int = 0
    always_fail: bool = False
    requests: list[Received] = field(default_factory=list)
    holding: int = 0
    most_held: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def __post_init__(self) -> None:
        self.release.set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.monotonic()
        self.holding += 1
        self.most_held = max(self.most_held, self.holding)
        try:
            await self.release.wait()
        finally:
            self.holding -= 1
        failing = self.always_fail or len(self.requests) < self.fail_first
        status = 500 if failing else 200
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Received(headers, body, status, arrived))
        return web.json_response({"ok": not failing}, status=status)

    def accepted(self) -> list[Received]:
        """Requests answered 2xx, in arrival order."""
        return [r for r in self.requests if r.status == 200]

    def events_of(self, email_id: str) -> list[Received]:
        return [r for r in self.accepted() if r.event["data"]["email_id"] == email_id]


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/webhooks/resend", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/webhooks/resend"
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()


@dataclass
class Stack:
    receiver: Receiver
    http: httpx.AsyncClient
    secret: str

    async def send(self, *emails: dict[str, Any]) -> list[str]:
        answer = await self.http.post("/emails/batch", json=list(emails), headers=SEND)
        assert answer.status_code == 200, answer.text
        return [item["id"] for item in answer.json()["data"]]

    async def counts(self) -> dict[str, Any]:
        answer = await self.http.get("/_sim/webhooks", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def configure(self, **fields: Any) -> httpx.Response:
        return await self.http.put("/_sim/config", json=fields, headers=ADMIN)

    def verify(self, received: Received) -> None:
        Webhook(self.secret).verify(received.body, received.headers)


@asynccontextmanager
async def stack(receiver: Receiver | None = None, **config: Any) -> AsyncIterator[Stack]:
    """A receiver, and a simulator posting its events there."""
    secret = new_secret()
    async with receiving(receiver or Receiver()) as rec:
        _, runner, url = await start_simulator(
            SimulatorConfig.model_validate(
                {
                    "api_keys": [API_KEY],
                    "webhook_url": rec.url,
                    "webhook_secret": secret,
                    "webhook_retry_seconds": [0.05, 0.05, 0.05],
                    **config,
                }
            ),
            admin_token=ADMIN_TOKEN,
        )
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                yield Stack(rec, http, secret)
        finally:
            await runner.cleanup()


def email(to: str, **fields: Any) -> dict[str, Any]:
    return {
        "from": "News <news@example.com>",
        "to": [to],
        "subject": "Hello",
        "html": '<p>Hi <a href="https://shop.example.com/sale?x=1">sale</a></p>',
        "tags": [{"name": "campaign", "value": "camp-1"}, {"name": "source", "value": "demo"}],
        **fields,
    }


def types_of(received: list[Received]) -> list[str]:
    return [r.event["type"] for r in received]


async def settled(stack: Stack, posted: int) -> dict[str, Any]:
    """Wait until ``posted`` events were answered 2xx and nothing is pending."""
    return await eventually(
        stack.counts,
        lambda c: c["posted"] >= posted and c["pending"] == 0,
        within=15,
        what=f"{posted} webhook events posted",
    )


async def test_each_accepted_message_posts_sent_then_delivered_signed_as_svix() -> None:
    async with stack() as s:
        ids = await s.send(*(email(f"reader{n}@example.com") for n in range(3)))
        counts = await settled(s, 6)
        assert counts["by_type"] == {"email.delivered": 3, "email.sent": 3}
        assert len(s.receiver.requests) == 6
        assert {r.event["data"]["email_id"] for r in s.receiver.requests} == set(ids)
        for n, email_id in enumerate(ids):
            events = s.receiver.events_of(email_id)
            assert types_of(events) == ["email.sent", "email.delivered"]
            for received in events:
                s.verify(received)
                assert received.headers["content-type"].startswith("application/json")
                assert received.svix_id.startswith("msg_")
                assert (
                    abs(int(received.headers["svix-timestamp"]) - datetime.now(UTC).timestamp())
                    < 60
                )
                event = received.event
                assert ISO_MS_Z.match(event["created_at"]), event["created_at"]
                data = event["data"]
                assert data["to"] == [f"reader{n}@example.com"]
                assert data["from"] == "News <news@example.com>" and data["subject"] == "Hello"
                assert data["tags"] == {"campaign": "camp-1", "source": "demo"}
                assert datetime.fromisoformat(data["created_at"]).tzinfo is not None
                assert "bounce" not in data and "click" not in data
        assert len({r.svix_id for r in s.receiver.requests}) == 6
        # The signature is the secret's: another secret does not verify it.
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(
                s.receiver.requests[0].body, s.receiver.requests[0].headers
            )
        tampered = s.receiver.requests[0].body.replace(b"email.", b"email_")
        with pytest.raises(WebhookVerificationError):
            Webhook(s.secret).verify(tampered, s.receiver.requests[0].headers)


async def test_address_lists_choose_bounces_complaints_opens_and_clicks() -> None:
    async with stack(
        hard_bounce_addresses=["Hard@Example.com"],
        soft_bounce_addresses=["soft@example.com"],
        complaint_addresses=["complain@example.com"],
        open_addresses=["open@example.com"],
        click_addresses=["click@example.com"],
    ) as s:
        names = ["hard", "soft", "complain", "open", "click", "plain"]
        ids = dict(
            zip(names, await s.send(*(email(f"{n}@example.com") for n in names)), strict=True)
        )
        await settled(s, 13)
        expected = {
            "hard": ["email.sent", "email.bounced"],
            "soft": ["email.sent", "email.bounced"],
            "complain": ["email.sent", "email.delivered", "email.complained"],
            "open": ["email.sent", "email.delivered", "email.opened"],
            "click": ["email.sent", "email.delivered", "email.clicked"],
            "plain": ["email.sent", "email.delivered"],
        }
        for name, types in expected.items():
            assert types_of(s.receiver.events_of(ids[name])) == types, name
        for received in s.receiver.requests:
            s.verify(received)

        def data(name: str, event_type: str) -> dict[str, Any]:
            (found,) = [
                r.event["data"]
                for r in s.receiver.events_of(ids[name])
                if r.event["type"] == event_type
            ]
            return found

        hard = data("hard", "email.bounced")["bounce"]
        assert hard["type"] == "Permanent" and hard["subType"] and hard["message"]
        assert data("soft", "email.bounced")["bounce"]["type"] == "Transient"
        click = data("click", "email.clicked")["click"]
        assert click["link"] == "https://shop.example.com/sale?x=1"
        assert click["ipAddress"] and click["userAgent"] and ISO_MS_Z.match(click["timestamp"])


async def test_a_failing_receiver_gets_retries_under_the_same_id_with_fresh_signatures() -> None:
    # One failure, then a retry over a second later: its timestamp and signature differ.
    async with stack(Receiver(fail_first=1), webhook_retry_seconds=[1.1]) as s:
        (email_id,) = await s.send(email("reader@example.com"))
        counts = await settled(s, 2)
        assert counts["failed_attempts"] == 1 and counts["retried"] == 1
        assert counts["gave_up"] == 0
        first, retry, delivered = s.receiver.requests
        assert (first.status, retry.status, delivered.status) == (500, 200, 200)
        assert first.svix_id == retry.svix_id != delivered.svix_id
        assert first.body == retry.body and retry.event["type"] == "email.sent"
        assert int(retry.headers["svix-timestamp"]) > int(first.headers["svix-timestamp"])
        assert retry.headers["svix-signature"] != first.headers["svix-signature"]
        for received in s.receiver.requests:
            s.verify(received)
        assert types_of(s.receiver.events_of(email_id)) == ["email.sent", "email.delivered"]


async def test_an_event_is_given_up_after_the_last_retry_and_the_next_one_still_goes() -> None:
    async with stack(Receiver(always_fail=True), webhook_retry_seconds=[0.01, 0.01]) as s:
        await s.send(email("reader@example.com"))
        counts = await eventually(
            s.counts, lambda c: c["gave_up"] == 2 and c["pending"] == 0, what="both given up"
        )
        assert counts["failed_attempts"] == 6 and counts["retried"] == 4
        assert counts["posted"] == 0
        sent_id, delivered_id = s.receiver.requests[0].svix_id, s.receiver.requests[3].svix_id
        assert [r.svix_id for r in s.receiver.requests] == [sent_id] * 3 + [delivered_id] * 3


async def test_duplicate_rate_delivers_every_event_twice_under_the_same_id() -> None:
    async with stack(duplicate_rate=1.0) as s:
        (email_id,) = await s.send(email("reader@example.com"))
        counts = await settled(s, 4)
        assert counts["duplicates_sent"] == 2
        events = s.receiver.events_of(email_id)
        assert types_of(events) == ["email.sent", "email.delivered"] * 2
        assert [r.svix_id for r in events[:2]] == [r.svix_id for r in events[2:]]
        assert [r.body for r in events[:2]] == [r.body for r in events[2:]]
        for received in events:
            s.verify(received)


async def test_out_of_order_posts_opened_before_delivered_with_logical_timestamps() -> None:
    async with stack(out_of_order_rate=1.0, open_addresses=["reader@example.com"]) as s:
        (email_id,) = await s.send(email("reader@example.com"))
        await settled(s, 3)
        events = s.receiver.events_of(email_id)
        assert types_of(events) == ["email.opened", "email.delivered", "email.sent"]
        # Each event's created_at is when it happened, so a receiver can order them.
        moments = [datetime.fromisoformat(r.event["created_at"]) for r in events]
        assert moments[0] > moments[1] > moments[2]


async def test_the_webhook_secret_is_never_shown_nor_echoed() -> None:
    async with stack() as s:
        shown = (await s.http.get("/_sim/config", headers=ADMIN)).json()
        assert "webhook_secret" not in shown and shown["webhook_secret_set"] is True
        assert shown["webhook_url"] == s.receiver.url
        put = await s.configure(open_rate=0.5)
        assert put.status_code == 200 and s.secret not in put.text
        assert s.secret[6:] not in (await s.http.get("/_sim/config", headers=ADMIN)).text
        # A refused secret is not repeated in the error either.
        bad = "whsec_not*base64*" + uuid.uuid4().hex
        refused = await s.configure(webhook_secret=bad)
        assert refused.status_code == 422 and "webhook_secret" in refused.text
        assert bad not in refused.text
        # The old secret still signs.
        await s.send(email("reader@example.com"))
        await settled(s, 2)
        s.verify(s.receiver.requests[-1])


@pytest.mark.parametrize(
    ("update", "named"),
    [
        ({"open_rate": 1.5}, "open_rate"),
        ({"duplicate_rate": -0.1}, "duplicate_rate"),
        ({"webhook_concurrency": 0}, "webhook_concurrency"),
        ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"webhook_retry_seconds": [1, -2]}, "webhook_retry_seconds"),
        ({"webhook_timeout_seconds": 0}, "webhook_timeout_seconds"),
        ({"webhook_secret": None}, "webhook_secret"),
    ],
)
async def test_config_updates_out_of_range_are_refused_naming_the_field(
    update: dict[str, Any], named: str
) -> None:
    async with stack() as s:
        refused = await s.configure(**update)
        assert refused.status_code == 422, refused.text
        assert named in refused.json()["message"]
        shown = (await s.http.get("/_sim/config", headers=ADMIN)).json()
        assert shown["webhook_secret_set"] and shown["open_rate"] == 0


async def test_the_batch_answers_while_the_receiver_holds_every_request() -> None:
    receiver = Receiver()
    receiver.release.clear()
    async with stack(receiver, webhook_concurrency=2) as s:
        await s.send(email("first@example.com"))
        await eventually(lambda: _value(receiver.holding), lambda n: n >= 1, what="a held post")
        # The receiver answers nothing; more batches are still answered at once.
        ids = await s.send(*(email(f"reader{n}@example.com") for n in range(50)))
        assert len(ids) == 50 and receiver.holding >= 1 and receiver.requests == []
        counts = await eventually(s.counts, lambda c: c["pending"] == 102, what="all planned")
        assert counts["posted"] == 0 and counts["in_flight"] >= 1 and receiver.requests == []
        assert receiver.most_held == 2  # webhook_concurrency
        receiver.release.set()
        await settled(s, 102)
        assert len(receiver.accepted()) == 102


async def test_events_wait_the_configured_delay_after_acceptance() -> None:
    async with stack(webhook_delay_ms=300) as s:
        await s.send(email("reader@example.com"))
        accepted = time.monotonic()
        await settled(s, 2)
        assert min(r.arrived for r in s.receiver.requests) - accepted >= 0.25


async def _value(value: int) -> int:
    return value


async def test_events_on_demand_for_accepted_messages_only() -> None:
    async with stack() as s:
        (email_id,) = await s.send(email("reader@example.com"))
        await settled(s, 2)
        unknown = "00000000-0000-4000-8000-000000000000"
        missing = await s.http.post(
            "/_sim/events", json={"email_id": unknown, "type": "email.opened"}, headers=ADMIN
        )
        assert missing.status_code == 404 and unknown in missing.json()["message"]
        wrong_type = await s.http.post(
            "/_sim/events", json={"email_id": email_id, "type": "email.eaten"}, headers=ADMIN
        )
        assert wrong_type.status_code == 422 and "type" in wrong_type.json()["message"]
        not_json = await s.http.post("/_sim/events", content=b"{", headers=ADMIN)
        assert not_json.status_code == 422
        unauthorized = await s.http.post(
            "/_sim/events", json={"email_id": email_id, "type": "email.opened"}
        )
        assert unauthorized.status_code == 401

        asked = [
            {"email_id": email_id, "type": "email.complained"},
            {"email_id": email_id, "type": "email.bounced", "bounce_type": "Transient"},
            {"email_id": email_id, "type": "email.failed", "reason": "reached_daily_quota"},
        ]
        svix_ids = []
        for body in asked:
            answer = await s.http.post("/_sim/events", json=body, headers=ADMIN)
            assert answer.status_code == 202, answer.text
            svix_ids.append(answer.json()["svix_id"])
        await settled(s, 5)
        by_id = {r.svix_id: r for r in s.receiver.accepted()}
        complained, bounced, failed = (by_id[i] for i in svix_ids)
        for received in (complained, bounced, failed):
            s.verify(received)
            assert received.event["data"]["email_id"] == email_id
        assert complained.event["type"] == "email.complained"
        assert bounced.event["data"]["bounce"]["type"] == "Transient"
        assert failed.event["data"]["failed"] == {"reason": "reached_daily_quota"}

        # Off, the simulator says so instead of queueing what it cannot post.
        await s.configure(webhook_url=None)
        off = await s.http.post(
            "/_sim/events", json={"email_id": email_id, "type": "email.opened"}, headers=ADMIN
        )
        assert off.status_code == 409


async def test_reset_forgets_webhook_counts_and_messages() -> None:
    async with stack() as s:
        (email_id,) = await s.send(email("reader@example.com"))
        await settled(s, 2)
        assert (await s.http.post("/_sim/reset", headers=ADMIN)).status_code == 200
        counts = await s.counts()
        assert counts["posted"] == 0 and counts["queued"] == 0 and counts["by_type"] == {}
        gone = await s.http.post(
            "/_sim/events", json={"email_id": email_id, "type": "email.opened"}, headers=ADMIN
        )
        assert gone.status_code == 404


async def test_without_a_webhook_url_nothing_is_posted() -> None:
    async with stack() as s:
        assert (await s.configure(webhook_url=None)).status_code == 200
        await s.send(email("reader@example.com"))
        counts = await s.counts()
        assert counts["enabled"] is False and counts["queued"] == 0
        assert s.receiver.requests == []


def _record(n: int) -> MessageRecord:
    return MessageRecord.of(
        f"id-{n}", email(f"reader{n}@example.com"), datetime(2024, 1, 1, tzinfo=UTC)
    )


def test_a_seed_reproduces_the_choices() -> None:
    config = WebhookSettings(open_rate=0.5, click_rate=0.3, hard_bounce_rate=0.2)
    lists = AddressLists.of(config)

    def outcomes(seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        return [
            [e.type for e in plan_message(_record(n), None, config, lists, rng)] for n in range(200)
        ]

    assert outcomes(7) == outcomes(7)
    assert outcomes(7) != outcomes(8)
    flat = [t for types in outcomes(7) for t in types]
    # The rates show: some of each, not all.
    assert 0 < flat.count("email.opened") < 200 and 0 < flat.count("email.bounced") < 200


async def test_full_queues_drop_and_count_instead_of_growing() -> None:
    config = WebhookSettings(webhook_url="http://127.0.0.1:9/hook", webhook_secret=new_secret())
    # Never started, so nothing drains: the bounds are all that limit it.
    sender = WebhookSender(lambda: config, max_pending=3, max_unplanned=4)
    for n in range(6):
        sender.accepted(f"id-{n}", email(f"reader{n}@example.com"), datetime.now(UTC))
    counts = sender.snapshot()
    assert counts["unplanned"] == 4 and counts["unplanned_dropped"] == 2
    assert sender.plan_waiting() == 4
    counts = sender.snapshot()
    # Two events each: the first message's fit, the next three's do not.
    assert counts["queued"] == 2 and counts["pending"] == 2 and counts["dropped"] == 6
    assert counts["unplanned"] == 0
    assert sender.message("id-5") is not None  # still remembered for POST /_sim/events


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_python_m_simulator_refuses_a_bad_webhook_secret_without_printing_it() -> None:
    bad = "whsec_" + "!" * 20
    env = {**os.environ, "SIMULATOR_WEBHOOK_URL": "http://127.0.0.1:9/h"}
    env["SIMULATOR_WEBHOOK_SECRET"] = bad
    done = subprocess.run(
        [sys.executable, "-m", "simulator", "--port", str(_free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "SIMULATOR_WEBHOOK_SECRET" in done.stderr and "webhook_secret" in done.stderr
    assert bad not in done.stderr + done.stdout


async def test_python_m_simulator_posts_webhooks_from_its_environment() -> None:
    secret, port = new_secret(), _free_port()
    async with receiving(Receiver()) as receiver:
        env = {
            **os.environ,
            "SIMULATOR_API_KEYS": API_KEY,
            "SIMULATOR_ADMIN_TOKEN": ADMIN_TOKEN,
            "SIMULATOR_WEBHOOK_URL": receiver.url,
            "SIMULATOR_WEBHOOK_SECRET": secret,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulator",
            "--port",
            str(port),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

                async def healthy() -> bool:
                    try:
                        return (await http.get("/health")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(healthy, within=20, what="the simulator answering")
                answer = await http.post(
                    "/emails/batch", json=[email("reader@example.com")], headers=SEND
                )
                assert answer.status_code == 200
                await eventually(
                    lambda: _value(len(receiver.accepted())), lambda n: n == 2, what="2 events"
                )
                for received in receiver.accepted():
                    Webhook(secret).verify(received.body, received.headers)
        finally:
            process.terminate()
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
        assert secret.encode() not in stderr
