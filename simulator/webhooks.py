"""Webhook events from the simulator, shaped as Resend's and signed as Svix signs them.

After ``POST /emails/batch`` accepts a message, the simulator plans what the provider
would later report about it (``email.sent``, then ``email.delivered`` or
``email.bounced``, then perhaps ``email.opened``, ``email.clicked``,
``email.complained``) and posts those events to ``webhook_url``. Each event carries a
``svix-id`` (the same on every retry and on a deliberate duplicate), ``svix-timestamp``
(the attempt's unix seconds) and ``svix-signature`` (``v1,`` + base64 HMAC-SHA256 of
``"{id}.{timestamp}.{body}"`` under the ``whsec_`` secret).

The plan is a pure function of the message, the configuration and a random generator
(``plan_message``); the bodies are pure too (``event_body``). ``WebhookSender`` holds
the I/O. The send path only appends accepted messages to a bounded list; background
tasks plan their events onto a bounded queue and post at most
``webhook_concurrency`` messages' events at a time over one shared HTTP session, so
``/emails/batch`` never waits for planning or for a receiver.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import heapq
import itertools
import os
import random
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from svix.webhooks import Webhook

EventType = Literal[
    "email.sent",
    "email.delivered",
    "email.delivery_delayed",
    "email.bounced",
    "email.complained",
    "email.opened",
    "email.clicked",
    "email.failed",
    "email.suppressed",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
BounceType = Literal["Permanent", "Transient", "Undetermined"]

MAX_PENDING_EVENTS = 1_000_000
"""Events waiting to be posted; beyond this, new events are dropped (and counted)."""
MAX_UNPLANNED = 200_000
"""Accepted messages whose events are not planned yet; beyond this, they get none."""
_PLAN_CHUNK = 500
MAX_ADDRESS_LIST = 100_000
MAX_URL_LENGTH = 2048
MAX_SECRET_LENGTH = 256
MAX_ANSWER_BYTES = 64 * 1024
"""What is read of a receiver's answer: only its status matters."""
_TAGS_LIMIT = 50
_TAG_TEXT_LIMIT = 256
_LINK = re.compile(rb"""href\s*=\s*["'](https?://[^"'\s<>]{1,2000})["']""", re.IGNORECASE)
_DEFAULT_LINK = "https://example.com/"
# Documentation addresses (RFC 5737), never a real reader's.
_CLICK_IPS = ("192.0.2.10", "198.51.100.23", "203.0.113.42")
_USER_AGENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Safari/605.1.15"
)
_BOUNCES: dict[str, tuple[str, str]] = {
    "Permanent": (
        "General",
        "The recipient's email provider sent a hard bounce: the address does not exist. "
        "Stop sending to it.",
    ),
    "Transient": (
        "MailboxFull",
        "The recipient's mailbox is full; the provider may accept mail later.",
    ),
    "Undetermined": ("Undetermined", "The recipient's email provider sent an unclear bounce."),
}


class WebhookSettings(BaseModel):
    """The webhook knobs of the simulator's configuration (``SimulatorConfig`` has them).

    Webhooks are off while ``webhook_url`` is unset. Rates are probabilities per
    message; the address lists force an outcome for the addresses they name (case does
    not matter), so tests can ask for exactly what they check.
    """

    webhook_url: str | None = Field(default=None, max_length=MAX_URL_LENGTH)
    webhook_secret: SecretStr | None = Field(
        default=None, description="The whsec_ signing secret; never shown by GET /_sim/config."
    )
    hard_bounce_rate: float = Field(default=0.0, ge=0, le=1)
    soft_bounce_rate: float = Field(default=0.0, ge=0, le=1)
    complaint_rate: float = Field(default=0.0, ge=0, le=1)
    open_rate: float = Field(default=0.0, ge=0, le=1)
    click_rate: float = Field(default=0.0, ge=0, le=1)
    duplicate_rate: float = Field(
        default=0.0, ge=0, le=1, description="Events delivered a second time, same svix-id."
    )
    out_of_order_rate: float = Field(
        default=0.0, ge=0, le=1, description="Messages whose events are posted in reverse order."
    )
    hard_bounce_addresses: list[str] = Field(default_factory=list, max_length=MAX_ADDRESS_LIST)
    soft_bounce_addresses: list[str] = Field(default_factory=list, max_length=MAX_ADDRESS_LIST)
    complaint_addresses: list[str] = Field(default_factory=list, max_length=MAX_ADDRESS_LIST)
    open_addresses: list[str] = Field(default_factory=list, max_length=MAX_ADDRESS_LIST)
    click_addresses: list[str] = Field(default_factory=list, max_length=MAX_ADDRESS_LIST)
    webhook_delay_ms: float = Field(default=0.0, ge=0, le=3_600_000)
    # Seconds to wait before each retry of an attempt that failed (no 2xx, or no answer);
    # after the last one the event is given up. Svix's own schedule is 5 s, 5 min,
    # 30 min, 2 h, 5 h, 10 h, 10 h: far too slow for tests, hence this short default.
    webhook_retry_seconds: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 5.0, 10.0, 30.0], max_length=20
    )
    webhook_concurrency: int = Field(default=32, ge=1, le=1024)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    webhook_keep_messages: int = Field(
        default=100_000,
        ge=0,
        le=10_000_000,
        description="Accepted messages remembered for POST /_sim/events.",
    )

    @field_validator("webhook_url")
    @classmethod
    def _is_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook_url must be an http:// or https:// URL with a host")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _is_whsec(cls, value: SecretStr | None) -> SecretStr | None:
        # The messages never repeat the value: it is a secret.
        if value is None:
            return None
        secret = value.get_secret_value()
        if len(secret) > MAX_SECRET_LENGTH:
            raise ValueError(f"webhook_secret is longer than {MAX_SECRET_LENGTH} characters")
        if not secret.startswith("whsec_"):
            raise ValueError("webhook_secret must start with 'whsec_'")
        try:
            key = base64.b64decode(secret[6:], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("webhook_secret must be 'whsec_' + base64") from None
        if len(key) < 16:
            raise ValueError("webhook_secret must hold at least 16 bytes of key")
        return value

    @field_validator("webhook_retry_seconds")
    @classmethod
    def _delays_are_bounded(cls, value: list[float]) -> list[float]:
        if any(not 0 <= delay <= 86_400 for delay in value):
            raise ValueError("webhook_retry_seconds must each be between 0 and 86400")
        return value

    @field_validator(
        "hard_bounce_addresses",
        "soft_bounce_addresses",
        "complaint_addresses",
        "open_addresses",
        "click_addresses",
    )
    @classmethod
    def _addresses_are_bounded(cls, value: list[str]) -> list[str]:
        if any(len(address) > 320 for address in value):
            raise ValueError("addresses are at most 320 characters")
        return value

    @model_validator(mode="after")
    def _url_needs_secret(self) -> WebhookSettings:
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError("webhook_url needs webhook_secret (a whsec_ secret) to sign with")
        return self


@dataclass(frozen=True, slots=True)
class AddressLists:
    """The forced outcomes of a configuration, lower-cased for lookups."""

    hard_bounce: frozenset[str]
    soft_bounce: frozenset[str]
    complaint: frozenset[str]
    open: frozenset[str]
    click: frozenset[str]

    @classmethod
    def of(cls, config: WebhookSettings) -> AddressLists:
        """The lists of ``config``."""

        def lower(addresses: list[str]) -> frozenset[str]:
            return frozenset(address.lower() for address in addresses)

        return cls(
            lower(config.hard_bounce_addresses),
            lower(config.soft_bounce_addresses),
            lower(config.complaint_addresses),
            lower(config.open_addresses),
            lower(config.click_addresses),
        )


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """What an event says about the message it reports on."""

    email_id: str
    accepted_at: datetime
    sender: Any
    to: tuple[str, ...]
    subject: Any
    tags: dict[str, str]
    """As events carry them, made once: a dict of strings holds nothing the garbage
    collector walks, where the request's list of dicts was kept for 100,000 messages."""

    @classmethod
    def of(cls, email_id: str, email: Mapping[str, Any], accepted_at: datetime) -> MessageRecord:
        """The record of an accepted email (its ``to`` is a string or a list)."""
        to = email["to"]
        return cls(
            email_id,
            accepted_at,
            email.get("from"),
            tuple(to) if isinstance(to, list) else (to,),
            email.get("subject"),
            tags_object(email.get("tags")),
        )


@dataclass(slots=True)
class PlannedEvent:
    """One event to post; a duplicate is a second delivery under the same svix-id."""

    svix_id: str
    type: str
    created_at: datetime
    extra: dict[str, Any] = field(default_factory=dict)
    duplicate: bool = False
    attempts: int = 0
    body: bytes | None = None


@dataclass(slots=True)
class _Chain:
    """A message's events, posted one after another in this order."""

    message: MessageRecord
    events: deque[PlannedEvent]


def svix_message_id() -> str:
    """``msg_`` + 27 random letters and digits, like Svix's ids.

    Never drawn from the seeded generator: a simulator restarted with the same seed
    must not repeat ids a receiver already stored. (Base64 with letters for its two
    symbols: cheap on the send path, and still over 150 random bits.)
    """
    return "msg_" + base64.b64encode(os.urandom(21), altchars=b"xZ")[:27].decode()


def iso_ms(moment: datetime) -> str:
    """``2024-02-22T23:41:12.126Z``: the event's own timestamp format."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def iso_us(moment: datetime) -> str:
    """``2024-02-22T23:41:11.894719+00:00``: the format of the message's ``created_at``."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def tags_object(tags: Any) -> dict[str, str]:
    """The send request's ``[{"name", "value"}]`` list as the ``{name: value}`` events carry.

    Malformed items are skipped and the result is bounded: the list came from a client.
    """
    found: dict[str, str] = {}
    if not isinstance(tags, list):
        return found
    for tag in tags[:_TAGS_LIMIT]:
        if isinstance(tag, dict):
            name, value = tag.get("name"), tag.get("value")
            if isinstance(name, str) and isinstance(value, str):
                found[name[:_TAG_TEXT_LIMIT]] = value[:_TAG_TEXT_LIMIT]
    return found


def first_link(html: Any) -> str:
    """The first http(s) link of a message's HTML, or a stand-in when it has none."""
    if not isinstance(html, str):
        return _DEFAULT_LINK
    match = _LINK.search(html[:200_000].encode(errors="replace"))
    return match.group(1).decode() if match else _DEFAULT_LINK


def event_extra(
    event_type: str,
    at: datetime,
    *,
    bounce_type: str | None = None,
    link: str | None = None,
    reason: str | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """The per-type section of an event's ``data`` (``bounce``, ``click``, ``failed`` ...)."""
    if event_type == "email.bounced":
        kind = bounce_type or "Permanent"
        sub_type, message = _BOUNCES[kind]
        return {"bounce": {"type": kind, "subType": sub_type, "message": message}}
    if event_type == "email.clicked":
        ip = (rng or random).choice(_CLICK_IPS)
        return {
            "click": {
                "link": link or _DEFAULT_LINK,
                "timestamp": iso_ms(at),
                "ipAddress": ip,
                "userAgent": _USER_AGENT,
            }
        }
    if event_type == "email.failed":
        return {"failed": {"reason": reason or "reached_daily_quota"}}
    if event_type == "email.suppressed":
        return {
            "suppressed": {
                "type": "OnAccountSuppressionList",
                "message": "The recipient is on the account's suppression list.",
            }
        }
    return {}


def event_body(message: MessageRecord, event: PlannedEvent) -> bytes:
    """The JSON body posted for ``event``: Resend's envelope around the message's data."""
    data: dict[str, Any] = {
        "created_at": iso_us(message.accepted_at),
        "email_id": message.email_id,
        "from": message.sender,
        "to": list(message.to),
        "subject": message.subject,
        "tags": message.tags,
        **event.extra,
    }
    return orjson.dumps({"type": event.type, "created_at": iso_ms(event.created_at), "data": data})


def plan_message(
    message: MessageRecord,
    html: Any,
    config: WebhookSettings,
    lists: AddressLists,
    rng: random.Random,
) -> list[PlannedEvent]:
    """The events the provider would report for an accepted message, in posting order.

    ``email.sent``, then ``email.bounced`` (hard: Permanent, soft: Transient) or
    ``email.delivered``; a delivered message may then be opened, clicked and complained
    about. The events' ``created_at`` follow that logical order a millisecond apart
    even when ``out_of_order_rate`` reverses the posting order. Duplicates go last.
    Every message draws the same number of random values, so a seed reproduces them.
    """
    to = [address.lower() for address in message.to]

    def chosen(listed: frozenset[str], rate: float) -> bool:
        draw = rng.random()  # drawn even when listed, to keep the sequence aligned
        return draw < rate or bool(listed and not listed.isdisjoint(to))

    hard = chosen(lists.hard_bounce, config.hard_bounce_rate)
    soft = chosen(lists.soft_bounce, config.soft_bounce_rate) and not hard
    opened = chosen(lists.open, config.open_rate)
    clicked = chosen(lists.click, config.click_rate)
    complained = chosen(lists.complaint, config.complaint_rate)
    reverse = rng.random() < config.out_of_order_rate

    types = ["email.sent"]
    if hard or soft:
        types.append("email.bounced")
    else:
        types.append("email.delivered")
        types += ["email.opened"] if opened else []
        types += ["email.clicked"] if clicked else []
        types += ["email.complained"] if complained else []
    events = []
    for index, event_type in enumerate(types):
        at = message.accepted_at + timedelta(milliseconds=index)
        extra = event_extra(
            event_type,
            at,
            bounce_type="Permanent" if hard else "Transient",
            link=first_link(html) if event_type == "email.clicked" else None,
            rng=rng,
        )
        events.append(PlannedEvent(svix_message_id(), event_type, at, extra))
    if reverse:
        events.reverse()
    duplicates = [
        PlannedEvent(event.svix_id, event.type, event.created_at, event.extra, duplicate=True)
        for event in events
        if rng.random() < config.duplicate_rate
    ]
    return events + duplicates


@functools.lru_cache(maxsize=8)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)


def sign(secret: str, svix_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Svix headers of one attempt at posting ``body``."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return {
        "svix-id": svix_id,
        "svix-timestamp": str(timestamp),
        "svix-signature": _signer(secret).sign(svix_id, moment, body.decode()),
        "Content-Type": "application/json",
        "User-Agent": "Svix-Webhooks/1.0 (provider simulator)",
    }


@dataclass
class WebhookCounts:
    """What the sender did since it started or was last reset."""

    queued: int = 0
    unplanned_dropped: int = 0
    posted: int = 0
    retried: int = 0
    failed_attempts: int = 0
    gave_up: int = 0
    dropped: int = 0
    duplicates_sent: int = 0
    by_type: Counter[str] = field(default_factory=Counter)


class WebhookSender:
    """Plans events for accepted messages and posts them in the background.

    ``config`` is read at every step, so ``PUT /_sim/config`` applies to events
    already queued (a cleared ``webhook_url`` drops them). ``start`` and ``stop`` run
    with the app.
    """

    def __init__(
        self,
        config: Callable[[], WebhookSettings],
        *,
        seed: int | None = None,
        max_pending: int = MAX_PENDING_EVENTS,
        max_unplanned: int = MAX_UNPLANNED,
    ) -> None:
        """Build an idle sender; ``seed`` makes its choices reproducible."""
        self._config = config
        self._max_pending = max_pending
        self._max_unplanned = max_unplanned
        # Accepted messages waiting to be planned: (message, its HTML, when accepted).
        self._unplanned: deque[tuple[MessageRecord, Any, float]] = deque()
        self._unplanned_wake = asyncio.Event()
        self.rng = random.Random()
        self.reseed(seed)
        self.counts = WebhookCounts()
        self._pending = 0
        self._messages: OrderedDict[str, MessageRecord] = OrderedDict()
        self._lists: tuple[WebhookSettings, AddressLists] | None = None
        self._ready: asyncio.Queue[_Chain] = asyncio.Queue()
        self._later: list[tuple[float, int, _Chain]] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._slot = asyncio.Event()
        self._active: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def reseed(self, seed: int | None) -> None:
        """Restart the choices from ``seed`` (a stream of their own, not the faults')."""
        if seed is not None:
            self.rng.seed(f"webhooks-{seed}")

    # -- what the send path and the admin API call ---------------------------------------

    def accepted(self, email_id: str, email: Mapping[str, Any], accepted_at: datetime) -> None:
        """Remember an accepted message and, when webhooks are on, hand it to the planner.

        This runs on the send path, so it only appends: the background tasks plan the
        events, build the bodies and post them.
        """
        config = self._config()
        if config.webhook_url is None and config.webhook_keep_messages <= 0:
            return  # nothing will ask for this message's events
        message = MessageRecord.of(email_id, email, accepted_at)
        self._remember(message, config.webhook_keep_messages)
        if config.webhook_url is None:
            return
        if len(self._unplanned) >= self._max_unplanned:
            self.counts.unplanned_dropped += 1
            return
        self._unplanned.append((message, email.get("html"), time.monotonic()))
        self._unplanned_wake.set()

    def plan_waiting(self, limit: int = _PLAN_CHUNK) -> int:
        """Plan and queue the events of up to ``limit`` accepted messages; how many."""
        config = self._config()
        lists = self._lists_of(config)
        delay = config.webhook_delay_ms / 1000
        count = min(limit, len(self._unplanned))
        now = time.monotonic()
        for _ in range(count):
            message, html, accepted = self._unplanned.popleft()
            if config.webhook_url is None:
                continue
            events = plan_message(message, html, config, lists, self.rng)
            # The delay counts from acceptance, not from planning.
            self._enqueue(message, events, accepted + delay - now)
        return count

    def message(self, email_id: str) -> MessageRecord | None:
        """An accepted message still remembered, by the id ``/emails/batch`` returned."""
        return self._messages.get(email_id)

    def post_one(
        self,
        message: MessageRecord,
        event_type: str,
        *,
        bounce_type: str | None = None,
        link: str | None = None,
        reason: str | None = None,
    ) -> PlannedEvent | None:
        """Queue one event for ``message`` now, as asked; ``None`` when it was dropped."""
        at = datetime.now(UTC)
        extra = event_extra(
            event_type, at, bounce_type=bounce_type, link=link, reason=reason, rng=self.rng
        )
        event = PlannedEvent(svix_message_id(), event_type, at, extra)
        return event if self._enqueue(message, [event], 0.0) else None

    def snapshot(self) -> dict[str, Any]:
        """The counts, for ``GET /_sim/webhooks``."""
        counts = self.counts
        return {
            "enabled": self._config().webhook_url is not None,
            "unplanned": len(self._unplanned),
            "unplanned_dropped": counts.unplanned_dropped,
            "queued": counts.queued,
            "pending": self._pending,
            "in_flight": len(self._active),
            "posted": counts.posted,
            "retried": counts.retried,
            "failed_attempts": counts.failed_attempts,
            "gave_up": counts.gave_up,
            "dropped": counts.dropped,
            "duplicates_sent": counts.duplicates_sent,
            "by_type": dict(sorted(counts.by_type.items())),
        }

    def reset(self) -> None:
        """Forget queued events, posts in flight, remembered messages and counts."""
        for task in self._active:
            task.cancel()
        self._active.clear()
        self._slot.set()
        while not self._ready.empty():
            self._ready.get_nowait()
        self._unplanned.clear()
        self._later.clear()
        self._messages.clear()
        self._pending = 0
        self.counts = WebhookCounts()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the shared HTTP session and start draining the queue."""
        # No connection limit of the session's own: webhook_concurrency is the limit.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._tasks = [
            asyncio.create_task(self._plan(), name="webhook-plan"),
            asyncio.create_task(self._dispatch(), name="webhook-dispatch"),
            asyncio.create_task(self._release_later(), name="webhook-timers"),
        ]

    async def stop(self) -> None:
        """Cancel the background tasks and posts in flight; close the session."""
        tasks = [*self._tasks, *self._active]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._active = [], set()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- internals ---------------------------------------------------------------------

    def _lists_of(self, config: WebhookSettings) -> AddressLists:
        # A configuration is replaced whole on every update, so its identity keys the cache.
        if self._lists is None or self._lists[0] is not config:
            self._lists = (config, AddressLists.of(config))
        return self._lists[1]

    def _remember(self, message: MessageRecord, keep: int) -> None:
        if keep <= 0:
            return
        self._messages[message.email_id] = message
        while len(self._messages) > keep:
            self._messages.popitem(last=False)

    def _enqueue(self, message: MessageRecord, events: list[PlannedEvent], delay: float) -> bool:
        if self._pending + len(events) > self._max_pending:
            self.counts.dropped += len(events)
            return False
        self._pending += len(events)
        self.counts.queued += len(events)
        self._schedule(_Chain(message, deque(events)), delay)
        return True

    def _schedule(self, chain: _Chain, delay: float) -> None:
        if delay <= 0:
            self._ready.put_nowait(chain)
            return
        heapq.heappush(self._later, (time.monotonic() + delay, next(self._order), chain))
        self._wake.set()

    async def _plan(self) -> None:
        """Plan accepted messages in chunks, letting other work run between them."""
        while True:
            self._unplanned_wake.clear()
            if not self._unplanned:
                await self._unplanned_wake.wait()
                continue
            self.plan_waiting()
            await asyncio.sleep(0)

    async def _release_later(self) -> None:
        """Move delayed chains (the configured delay, retry backoff) to the ready queue."""
        while True:
            self._wake.clear()
            if not self._later:
                await self._wake.wait()
                continue
            wait = self._later[0][0] - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            self._ready.put_nowait(heapq.heappop(self._later)[2])

    async def _dispatch(self) -> None:
        """Start a post for each ready chain, at most ``webhook_concurrency`` at once."""
        while True:
            chain = await self._ready.get()
            while len(self._active) >= self._config().webhook_concurrency:
                self._slot.clear()
                await self._slot.wait()
            task = asyncio.create_task(self._run(chain))
            self._active.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._slot.set()

    async def _run(self, chain: _Chain) -> None:
        """Post a chain's events in order; a failed one waits its backoff, then resumes."""
        while chain.events:
            event = chain.events[0]
            config = self._config()
            if config.webhook_url is None or config.webhook_secret is None:
                self._settle(len(chain.events))
                self.counts.dropped += len(chain.events)
                return
            if await self._post(config, config.webhook_url, chain.message, event):
                chain.events.popleft()
                self._settle(1)
                self.counts.posted += 1
                self.counts.by_type[event.type] += 1
                self.counts.duplicates_sent += event.duplicate
                continue
            self.counts.failed_attempts += 1
            event.attempts += 1
            backoff = config.webhook_retry_seconds
            if event.attempts > len(backoff):
                chain.events.popleft()
                self._settle(1)
                self.counts.gave_up += 1
                continue
            self.counts.retried += 1
            self._schedule(chain, backoff[event.attempts - 1])
            return

    def _settle(self, count: int) -> None:
        self._pending = max(0, self._pending - count)

    async def _post(
        self, config: WebhookSettings, url: str, message: MessageRecord, event: PlannedEvent
    ) -> bool:
        """One attempt: a fresh timestamp and signature over the event's fixed body."""
        if self._session is None:
            return False
        if event.body is None:  # built once, so every retry and duplicate is byte-identical
            event.body = event_body(message, event)
        assert config.webhook_secret is not None
        headers = sign(
            config.webhook_secret.get_secret_value(), event.svix_id, int(time.time()), event.body
        )
        timeout = aiohttp.ClientTimeout(total=config.webhook_timeout_seconds)
        try:
            async with self._session.post(
                url, data=event.body, headers=headers, timeout=timeout, allow_redirects=False
            ) as answer:
                await answer.content.read(MAX_ANSWER_BYTES)
                return 200 <= answer.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return False
