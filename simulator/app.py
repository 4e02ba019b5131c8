"""A Resend-compatible email provider simulator.

It serves ``POST /emails/batch`` as the real API does (bearer auth, idempotency keys,
422 validation errors, 429 with ``retry-after``) and adds what tests and benchmarks
need: injected latency and faults, a request rate limit, and a count of deliveries
per recipient so that exactly-once can be asserted from outside.

Like the provider, it reports on accepted messages with webhook events
(``email.sent``, ``email.delivered``, ``email.bounced``, ``email.opened`` ...) posted
to ``webhook_url`` in the background, signed and retried as Svix does. Rates and
address lists choose bounces, complaints, opens, clicks, duplicate deliveries and
out-of-order posting (``simulator.webhooks``). Answers to ``/emails/batch`` never
wait for them.

Admin endpoints live under ``/_sim/``: ``stats``, ``deliveries``, ``messages``,
``config`` (GET/PUT), ``faults`` (POST a script of upcoming answers), ``webhooks``
(GET the webhook counts), ``events`` (POST one event for an accepted message) and
``reset`` (webhook state included). They serve whole rendered messages, so they
require the simulator's admin token, sent as ``Authorization: Bearer <token>`` (the
token is ``SIMULATOR_ADMIN_TOKEN`` for ``python -m simulator``, or the ``admin_token``
argument). Without a configured token they are refused. The admin token is never one
of the API keys and is never shown by ``GET /_sim/config``, nor is the webhook
secret. ``/health`` is open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simulator.webhooks import BounceType, EventType, WebhookSender, WebhookSettings

MAX_BATCH = 100
MAX_TO = 50
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
ADMIN_PREFIX = "/_sim/"
ADMIN_TOKEN_ENV = "SIMULATOR_ADMIN_TOKEN"
ADMIN_DISABLED_MESSAGE = (
    "The simulator's admin endpoints are disabled: no admin token is configured. "
    f"Start it with {ADMIN_TOKEN_ENV}=<token> (or pass admin_token=...) and send "
    "'Authorization: Bearer <token>'."
)


class ScriptedFault(BaseModel):
    """One upcoming answer forced on the next batch request."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(ge=400, le=599)
    phase: Literal["before", "after"] = Field(
        default="before",
        description="'before': refuse without accepting; 'after': accept and deliver, "
        "then answer with the error (the client never learns it was accepted).",
    )
    retry_after: float | None = None


class SimulatorConfig(WebhookSettings):
    """Behaviour knobs; all can be changed at run time with ``PUT /_sim/config``.

    The webhook fields (``webhook_url``, ``webhook_secret``, the rates and address
    lists ...) come from ``WebhookSettings``.
    """

    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(default_factory=list)
    latency_ms: float = Field(default=0.0, ge=0)
    latency_jitter_ms: float = Field(default=0.0, ge=0)
    error_rate_before: float = Field(default=0.0, ge=0, le=1)
    error_rate_after: float = Field(default=0.0, ge=0, le=1)
    rate_limit_per_second: float | None = Field(default=None, gt=0, le=100_000)
    rate_limit_headers: bool = Field(
        default=True,
        description="With a rate limit, answer with ratelimit-limit, -remaining, -reset "
        "and -policy headers, as Resend does; off, only a 429's retry-after tells.",
    )
    reject_addresses: list[str] = Field(
        default_factory=list, description="A batch containing any of these gets a 422."
    )
    keep_messages: int = Field(default=10_000, ge=0, description="Last N messages kept.")
    seed: int | None = None


# Never shown by GET /_sim/config: credentials.
_HIDDEN_CONFIG = {"api_keys", "webhook_secret"}


class EventRequest(BaseModel):
    """``POST /_sim/events``: one event to post now for a message the simulator accepted."""

    model_config = ConfigDict(extra="forbid")

    email_id: str = Field(min_length=1, max_length=100)
    type: EventType
    bounce_type: BounceType | None = Field(
        default=None, description="For email.bounced: Permanent (hard, the default) or Transient."
    )
    link: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")
    reason: str | None = Field(default=None, max_length=200, description="For email.failed.")


def validation_message(exc: ValidationError) -> str:
    """The errors by field, without the rejected values (one may be a secret)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )


def _message_id() -> str:
    """A random UUID-shaped id, cheaper than uuid.uuid4() at thousands a second."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def _error(status: int, name: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"statusCode": status, "name": name, "message": message}, status=status, headers=headers
    )


@dataclass(slots=True)
class _Stored:
    body_hash: str
    status: int
    body: bytes
    """The answer as sent, serialized once: bytes hold no objects for the garbage
    collector to walk, where a dict of 100 ids a request was kept for a day."""
    expires_at: float


@dataclass
class SimulatorState:
    """Everything the simulator remembers."""

    config: SimulatorConfig
    faults: deque[ScriptedFault] = field(default_factory=deque)
    idempotency: dict[str, _Stored] = field(default_factory=dict)
    in_progress: set[str] = field(default_factory=set)
    deliveries: Counter[str] = field(default_factory=Counter)
    messages: deque[dict[str, Any]] = field(default_factory=deque)
    responses: Counter[int] = field(default_factory=Counter)
    replays: int = 0
    accepted_emails: int = 0
    duplicated_recipients: int = 0
    """Recipients delivered to more than once, kept as they happen: ``stats`` is polled
    often, and a scan of millions of deliveries each time cost the send path."""
    max_deliveries_per_recipient: int = 0
    tokens: float = 0.0
    tokens_at: float = field(default_factory=time.monotonic)
    rng: random.Random = field(default_factory=random.Random)

    def reset(self) -> None:
        """Forget deliveries, keys, faults and counters (config stays)."""
        self.faults.clear()
        self.idempotency.clear()
        self.in_progress.clear()
        self.deliveries.clear()
        self.messages.clear()
        self.responses.clear()
        self.replays = 0
        self.accepted_emails = 0
        self.duplicated_recipients = 0
        self.max_deliveries_per_recipient = 0

    def take_token(self) -> float | None:
        """Token bucket; returns seconds to wait when the rate limit is exceeded."""
        rate = self.config.rate_limit_per_second
        if rate is None:
            return None
        now = time.monotonic()
        self.tokens = min(rate, self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / rate


def _validate(emails: Any, rejected: set[str]) -> str | None:
    if not isinstance(emails, list) or not emails:
        return "The request body must be a non-empty array of emails."
    if len(emails) > MAX_BATCH:
        return f"Too many emails in one batch: {len(emails)} (the limit is {MAX_BATCH})."
    for index, email in enumerate(emails):
        if not isinstance(email, dict):
            return f"emails[{index}] must be an object."
        for required in ("from", "to", "subject"):
            if not email.get(required):
                return f"emails[{index}]: missing `{required}` field."
        if not (email.get("html") or email.get("text")):
            return f"emails[{index}]: one of `html` or `text` is required."
        to = email["to"] if isinstance(email["to"], list) else [email["to"]]
        if len(to) > MAX_TO:
            return f"emails[{index}]: at most {MAX_TO} recipients in `to`."
        for address in to:
            if not isinstance(address, str) or not _ADDRESS.match(address):
                return f"emails[{index}]: invalid `to` address: {address!r}."
            if address.lower() in rejected:
                return f"emails[{index}]: the recipient {address} is not allowed."
    return None


class Simulator:
    """The aiohttp application and its state."""

    def __init__(
        self, config: SimulatorConfig | None = None, *, admin_token: str | None = None
    ) -> None:
        """Build the app; ``config`` defaults to accepting any bearer key.

        ``admin_token`` guards the ``/_sim/`` endpoints; without one they are refused.
        """
        config = config or SimulatorConfig()
        self._admin_token = (admin_token or "").strip().encode() or None
        if self._is_admin_token_among(config.api_keys):
            raise ValueError("the admin token must not be one of the API keys")
        self.state = SimulatorState(config=config)
        if self.state.config.seed is not None:
            self.state.rng.seed(self.state.config.seed)
        self.webhooks = WebhookSender(lambda: self.state.config, seed=config.seed)
        self.app = web.Application(
            client_max_size=16 * 1024 * 1024, middlewares=[self._guard_admin]
        )
        self.app.cleanup_ctx.append(self._run_webhooks)
        self.app.add_routes(
            [
                web.post("/emails/batch", self.send_batch),
                web.get("/_sim/stats", self.stats),
                web.get("/_sim/deliveries", self.deliveries),
                web.get("/_sim/messages", self.messages),
                web.get("/_sim/config", self.get_config),
                web.put("/_sim/config", self.put_config),
                web.post("/_sim/faults", self.add_faults),
                web.get("/_sim/webhooks", self.webhook_counts),
                web.post("/_sim/events", self.post_event),
                web.post("/_sim/reset", self.reset),
                web.get("/health", self.health),
            ]
        )

    async def _run_webhooks(self, app: web.Application) -> AsyncIterator[None]:
        """The webhook sender lives as long as the app (``start_simulator``, ``run_app``)."""
        await self.webhooks.start()
        yield
        await self.webhooks.stop()

    @property
    def admin_enabled(self) -> bool:
        """Whether an admin token is configured (the admin endpoints answer)."""
        return self._admin_token is not None

    def _is_admin_token(self, presented: str) -> bool:
        # Constant time, so response timing does not reveal how much of a guess matched.
        return self._admin_token is not None and hmac.compare_digest(
            presented.encode(), self._admin_token
        )

    def _is_admin_token_among(self, keys: list[str]) -> bool:
        found = False
        for key in keys:  # no early exit: every key is compared
            found |= self._is_admin_token(key.strip())
        return found

    @web.middleware
    async def _guard_admin(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Refuse ``/_sim/`` requests that do not carry the admin token."""
        if not request.path.startswith(ADMIN_PREFIX):
            return await handler(request)
        if self._admin_token is None:
            return _error(403, "admin_disabled", ADMIN_DISABLED_MESSAGE)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return _error(
                401,
                "missing_admin_token",
                "Missing admin token: send 'Authorization: Bearer <SIMULATOR_ADMIN_TOKEN>'.",
                **{"WWW-Authenticate": 'Bearer realm="simulator-admin"'},
            )
        if not self._is_admin_token(auth[7:].strip()):
            return _error(403, "invalid_admin_token", "The admin token is invalid.")
        return await handler(request)

    # -- the provider API -------------------------------------------------------------

    async def send_batch(self, request: web.Request) -> web.Response:
        """``POST /emails/batch``."""
        state, config = self.state, self.state.config
        response = await self._send_batch(request, state, config)
        state.responses[response.status] += 1
        rate = config.rate_limit_per_second
        if rate is not None and config.rate_limit_headers:
            remaining = max(0, int(state.tokens))
            response.headers["ratelimit-limit"] = f"{rate:g}"
            response.headers["ratelimit-remaining"] = str(remaining)
            response.headers["ratelimit-reset"] = "1"
            response.headers["ratelimit-policy"] = f"{rate:g};w=1"
        return response

    async def _send_batch(
        self, request: web.Request, state: SimulatorState, config: SimulatorConfig
    ) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return _error(401, "missing_api_key", "Missing API key in the authorization header.")
        api_key = auth[7:].strip()
        if (config.api_keys and api_key not in config.api_keys) or self._is_admin_token(api_key):
            return _error(403, "invalid_api_key", "API key is invalid.")

        wait = state.take_token()
        if wait is not None:
            seconds = max(1, int(wait + 0.999))
            return _error(
                429,
                "rate_limit_exceeded",
                "Too many requests. Please limit the number of requests per second.",
                **{"retry-after": str(seconds), "ratelimit-reset": str(seconds)},
            )

        if config.latency_ms or config.latency_jitter_ms:
            jitter = state.rng.uniform(0, config.latency_jitter_ms)
            await asyncio.sleep((config.latency_ms + jitter) / 1000)

        raw = await request.read()
        key = request.headers.get("Idempotency-Key")
        body_hash = hashlib.sha256(raw).hexdigest()
        if key:
            if len(key) > 256:
                return _error(400, "invalid_idempotency_key", "Idempotency-Key is too long.")
            stored = state.idempotency.get(key)
            if stored and stored.expires_at < time.monotonic():
                del state.idempotency[key]
                stored = None
            if stored:
                if stored.body_hash != body_hash:
                    return _error(
                        409,
                        "invalid_idempotent_request",
                        "Same idempotency key used with a different request payload.",
                    )
                state.replays += 1
                return web.Response(
                    body=stored.body,
                    status=stored.status,
                    content_type="application/json",
                )
            if key in state.in_progress:
                return _error(
                    409,
                    "concurrent_idempotent_requests",
                    "Same idempotency key used while the original request is in progress.",
                )

        fault = state.faults.popleft() if state.faults else None
        if fault is None and state.rng.random() < config.error_rate_before:
            fault = ScriptedFault(status=500, phase="before")
        if fault is None and state.rng.random() < config.error_rate_after:
            fault = ScriptedFault(status=500, phase="after")
        if fault and fault.phase == "before":
            headers = {"retry-after": str(fault.retry_after)} if fault.retry_after else {}
            return _error(fault.status, "application_error", "Injected fault.", **headers)

        try:
            emails = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(422, "validation_error", "The request body is not valid JSON.")
        problem = _validate(emails, {a.lower() for a in config.reject_addresses})
        if problem:
            return _error(422, "validation_error", problem)

        if key:
            state.in_progress.add(key)
        try:
            answer = orjson.dumps(self._accept(emails, state, config))
            if key:
                state.idempotency[key] = _Stored(
                    body_hash, 200, answer, time.monotonic() + IDEMPOTENCY_TTL_SECONDS
                )
        finally:
            if key:
                state.in_progress.discard(key)

        if fault:  # phase "after": accepted and delivered, but the client hears an error
            return _error(fault.status, "application_error", "Injected fault after accepting.")
        return web.Response(body=answer, content_type="application/json")

    def _accept(
        self, emails: list[dict[str, Any]], state: SimulatorState, config: SimulatorConfig
    ) -> dict[str, Any]:
        data = []
        accepted_at = datetime.now(UTC)
        for email in emails:
            message_id = _message_id()
            self.webhooks.accepted(message_id, email, accepted_at)
            to = email["to"] if isinstance(email["to"], list) else [email["to"]]
            for address in to:
                recipient = address.lower()
                count = state.deliveries[recipient] + 1
                state.deliveries[recipient] = count
                if count == 2:
                    state.duplicated_recipients += 1
                if count > state.max_deliveries_per_recipient:
                    state.max_deliveries_per_recipient = count
            state.accepted_emails += 1
            if config.keep_messages:
                state.messages.append({"id": message_id, **email})
                while len(state.messages) > config.keep_messages:
                    state.messages.popleft()
            data.append({"id": message_id})
        return {"data": data}

    # -- admin ------------------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        """Totals: accepted emails, unique and duplicated recipients, answers by status."""
        state = self.state
        return web.json_response(
            {
                "accepted_emails": state.accepted_emails,
                "unique_recipients": len(state.deliveries),
                "duplicated_recipients": state.duplicated_recipients,
                "max_deliveries_per_recipient": state.max_deliveries_per_recipient,
                "replays": state.replays,
                "responses": {str(k): v for k, v in sorted(state.responses.items())},
                "pending_faults": len(state.faults),
            }
        )

    async def deliveries(self, request: web.Request) -> web.Response:
        """Deliveries per recipient; ``?email=`` for one, ``?duplicates=1`` for counts > 1."""
        email = request.query.get("email")
        if email:
            return web.json_response({email: self.state.deliveries.get(email.lower(), 0)})
        only_duplicates = request.query.get("duplicates") in ("1", "true")
        return web.json_response(
            {
                address: count
                for address, count in self.state.deliveries.items()
                if count > 1 or not only_duplicates
            }
        )

    async def messages(self, request: web.Request) -> web.Response:
        """The last kept messages, optionally only those to ``?to=``."""
        to = request.query.get("to", "").lower()
        found = [
            message
            for message in self.state.messages
            if not to
            or to
            in [
                a.lower()
                for a in (message["to"] if isinstance(message["to"], list) else [message["to"]])
            ]
        ]
        return web.json_response(found)

    def _shown_config(self) -> dict[str, Any]:
        config = self.state.config
        shown = config.model_dump(exclude=_HIDDEN_CONFIG)
        shown["webhook_secret_set"] = config.webhook_secret is not None
        return shown

    async def get_config(self, request: web.Request) -> web.Response:
        """Current configuration (keys and the webhook secret are not shown)."""
        return web.json_response(self._shown_config())

    async def put_config(self, request: web.Request) -> web.Response:
        """Merge the posted fields into the configuration."""
        try:
            update = await request.json()
            if not isinstance(update, dict):
                return _error(422, "validation_error", "The body must be a JSON object.")
            merged = {**self.state.config.model_dump(), **update}
            config = SimulatorConfig.model_validate(merged)
        except ValidationError as exc:
            return _error(422, "validation_error", validation_message(exc))
        except ValueError as exc:
            return _error(422, "validation_error", str(exc))
        if self._is_admin_token_among(config.api_keys):
            return _error(422, "validation_error", "The admin token cannot be an API key.")
        self.state.config = config
        if "seed" in update and self.state.config.seed is not None:
            self.state.rng.seed(self.state.config.seed)
            self.webhooks.reseed(self.state.config.seed)
        return web.json_response(self._shown_config())

    async def add_faults(self, request: web.Request) -> web.Response:
        """Queue scripted answers for the next batch requests."""
        try:
            faults = [ScriptedFault.model_validate(item) for item in await request.json()]
        except (ValueError, TypeError) as exc:
            return _error(422, "validation_error", str(exc))
        self.state.faults.extend(faults)
        return web.json_response({"pending_faults": len(self.state.faults)})

    async def webhook_counts(self, request: web.Request) -> web.Response:
        """Webhook events queued, pending, posted (2xx), retried, given up, by type."""
        return web.json_response(self.webhooks.snapshot())

    async def post_event(self, request: web.Request) -> web.Response:
        """Queue one event for an accepted message (a complaint, a late delivery ...)."""
        try:
            body = orjson.loads(await request.read())
            asked = EventRequest.model_validate(body)
        except orjson.JSONDecodeError:
            return _error(422, "validation_error", "The request body is not valid JSON.")
        except ValidationError as exc:
            return _error(422, "validation_error", validation_message(exc))
        if self.state.config.webhook_url is None:
            return _error(
                409,
                "webhooks_disabled",
                "No webhook_url is configured: set it with PUT /_sim/config.",
            )
        message = self.webhooks.message(asked.email_id)
        if message is None:
            return _error(
                404,
                "not_found",
                f"No accepted message has the id {asked.email_id!r} "
                "(or it is older than the last webhook_keep_messages messages).",
            )
        event = self.webhooks.post_one(
            message, asked.type, bounce_type=asked.bounce_type, link=asked.link, reason=asked.reason
        )
        if event is None:
            return _error(503, "queue_full", "The webhook queue is full; the event was dropped.")
        return web.json_response(
            {"svix_id": event.svix_id, "type": event.type, "email_id": message.email_id},
            status=202,
        )

    async def reset(self, request: web.Request) -> web.Response:
        """Forget everything but the configuration, webhook events and counts included."""
        self.state.reset()
        self.webhooks.reset()
        return web.json_response({"reset": True})

    async def health(self, request: web.Request) -> web.Response:
        """Liveness probe."""
        return web.json_response({"ok": True})


async def start_simulator(
    config: SimulatorConfig | None = None,
    *,
    admin_token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> tuple[Simulator, web.AppRunner, str]:
    """Serve a simulator on ``host:port`` (0 = any free port); return it and its URL.

    ``admin_token`` enables the ``/_sim/`` admin endpoints (see ``Simulator``).
    """
    simulator = Simulator(config, admin_token=admin_token)
    runner = web.AppRunner(simulator.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return simulator, runner, f"http://{host}:{bound_port}"
