"""HTTP adapter for a Resend-compatible ``POST /emails/batch``.

One ``ProviderClient`` (one ``httpx.AsyncClient``, keep-alive pool) is shared by every
activity of a worker process. A request's fate is returned as a ``ProviderReply``
rather than raised, because a batch activity sends many requests at once and must
record every outcome; only credential and configuration errors, which make every
other request pointless too, are raised.

The provider's answer is hostile input. Every request has a total deadline (connect,
send and answer together) and its answer is read up to ``MAX_ANSWER_BYTES``; a 200
that does not carry one well-formed id per email is a soft failure, never an
exception. What may reach workflow history (``ProviderReply.code`` and the messages
of the raised errors) is written in our words: the HTTP status and the provider's
error name only when it is a short known-shape token. The provider's own text goes
only to ``ProviderReply.error``, for the ledger, cut to ``MAX_ERROR_CHARS``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import httpx
import orjson
from pydantic import SecretStr

from campaigns.provider._transport import asyncio_transport
from campaigns.safe_text import bounded as bounded_text

MAX_ANSWER_BYTES = 1024 * 1024
"""Largest answer body read (1 MiB); the real API answers 100 ids in a few KB."""
MAX_ERROR_CHARS = 2_000
"""Longest ``ProviderReply.error`` (the ledger's ``last_error``), marker included."""
MAX_RETRY_AFTER_SECONDS = 600.0
"""Longest wait a 429's ``retry-after`` can ask for; asked again after that."""
MAX_MESSAGE_ID_CHARS = 128
_ERROR_NAME = re.compile(r"[a-z_]{1,64}")
"""Shape of an error name we repeat in history (``validation_error``)."""
_ID = rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_MESSAGE_ID_CHARS - 1}}}"
"""Shape of a message id we record (UUIDs and prefixed ids such as ``msg_01H...``):
it goes to the ledger and into heartbeat details, so an address or a blob is refused."""
_MESSAGE_ID = re.compile(_ID)
_MESSAGE_IDS = re.compile(rf"(?:{_ID}\n)*{_ID}")
_LIMIT = f"{MAX_ANSWER_BYTES // 1024 // 1024} MiB"


class _ProviderRefusal(Exception):
    """A refusal that makes every request pointless.

    The message is ours (status and filtered error name) and may reach workflow
    history; ``code`` is its short form; ``detail`` is the provider's answer, bounded,
    for logs and the ledger only.
    """

    def __init__(self, message: str, code: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.code = code
        self.detail = detail


class ProviderAuthError(_ProviderRefusal):
    """The provider refused our credentials (401/403): no request can succeed."""


class ProviderConfigError(_ProviderRefusal):
    """The provider endpoint is wrong (404, 405, a redirect): no request can succeed."""


class ReplyKind(StrEnum):
    """How the provider answered one batch request."""

    ACCEPTED = "accepted"
    # 409 invalid_idempotent_request: the provider already accepted a request under this
    # key (it keeps only accepted ones), with a body that has changed since.
    ACCEPTED_EARLIER = "accepted_earlier"
    REJECTED = "rejected"  # permanent for this content (400/422)
    # 5xx, 409 in-progress, timeouts, connection errors, a 2xx we cannot read
    SOFT_FAILURE = "soft_failure"
    THROTTLED = "throttled"  # 429: not a failure, come back after retry_after


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """The outcome of one batch request."""

    kind: ReplyKind
    message_ids: list[str] = field(default_factory=list)
    error: str | None = None
    """The provider's answer, for the ledger only (may quote recipient addresses or
    whatever the provider echoes); at most ``MAX_ERROR_CHARS``. None when accepted."""
    code: str | None = None
    """A short form in our words (``HTTP 422 validation_error``), for the workflow's
    status and history; set on every reply ``ProviderClient`` returns."""
    retry_after: float | None = None
    advertised_rps: float | None = None
    """Requests/s the provider's ``ratelimit-*`` headers advertise, if they did."""


def request_key(campaign_id: str, recipient_ids: Sequence[int]) -> str:
    """Idempotency key of the provider request that carries these recipients.

    Derived from what the request contains, so a retry of the same request (after a
    crash, a timeout or a 5xx) reuses the key and the provider answers with the
    first reply instead of sending twice.
    """
    digest = hashlib.sha256(",".join(map(str, recipient_ids)).encode()).hexdigest()[:32]
    return f"{campaign_id}/{digest}"


# -- pure decisions: what an answer means ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What the provider sent back, as read: the input of ``classify_answer``."""

    status: int
    body: bytes | None
    """The body, or None when it could not be read whole (see ``unreadable``)."""
    unreadable: str | None = None
    """Why the body was not read, in our words (``larger than 1 MiB``)."""
    retry_after: str | None = None
    rate_limit: str | None = None
    """``ratelimit-limit``, as sent."""
    rate_policy: str | None = None
    """``ratelimit-policy``, as sent."""


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` as the ledger keeps a provider's answer: one line, at most ``limit``."""
    return bounded_text(text, limit)


def error_name(value: object) -> str | None:
    """The provider's error name if it is a short known-shape token, else None."""
    if isinstance(value, str) and _ERROR_NAME.fullmatch(value):
        return value
    return None


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """A ``retry-after`` (seconds or HTTP date) as seconds, within 0..600."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
            seconds = (when - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError, OverflowError):
            return default
    if math.isnan(seconds):
        return default
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and _MESSAGE_ID.fullmatch(value) is not None


def _text(body: bytes | None) -> str:
    if body is None:
        return ""
    # Decoding more than the ledger keeps is wasted work (4 bytes per character at most).
    return body[: 4 * MAX_ERROR_CHARS].decode("utf-8", errors="replace")


def _json(body: bytes | None) -> Any:
    if body is None:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _soft(code: str, error: str) -> ProviderReply:
    return ProviderReply(ReplyKind.SOFT_FAILURE, error=bounded(error), code=code)


def classify_accepted(answer: Answer, expected: int) -> ProviderReply:
    """A 2xx: accepted with one valid id per email, or a soft failure saying why not.

    A 2xx we cannot read may still mean the provider accepted the request; the
    recipients fail softly and their retry goes out under the same idempotency key, so
    the provider replays its answer instead of sending twice.
    """
    status = answer.status
    if answer.body is None:
        code = f"HTTP {status} answer {answer.unreadable or 'unreadable'}"
        return _soft(code, code)
    parsed = _json(answer.body)
    problem: str | None = None
    ids: list[Any] = []
    if not isinstance(parsed, dict):
        problem = "answer is not a JSON object"
    elif not isinstance(data := parsed.get("data"), list):
        problem = "answer has no 'data' list"
    elif len(data) != expected:
        problem = f"answer has {len(data)} ids for {expected} emails"
    else:
        ids = [item.get("id") if type(item) is dict else None for item in data]
        # One match over all ids joined by newlines (cheaper than one per id); an id
        # holding a newline itself would pass as two, so that is refused first.
        valid = all(type(i) is str and "\n" not in i for i in ids) and _MESSAGE_IDS.fullmatch(
            "\n".join(ids)
        )
        if ids and not valid:
            position = next(n for n, i in enumerate(ids) if not _valid_id(i))
            problem = f"answer item {position} has no valid id"
    if problem is not None:
        code = f"HTTP {status} {problem}"
        # An id is at most MAX_MESSAGE_ID_CHARS of letters, digits and '._:-'.
        return _soft(code, f"{code}: {_text(answer.body)}")
    return ProviderReply(ReplyKind.ACCEPTED, message_ids=ids, code=f"HTTP {status}")


def _ledger_error(answer: Answer, parsed: Any) -> str:
    """The whole error answer for the ledger: ``HTTP 422 name: message`` or its text."""
    head = f"HTTP {answer.status}"
    if answer.body is None:
        return f"{head} (answer {answer.unreadable or 'unreadable'})"
    if isinstance(parsed, dict) and ("name" in parsed or "message" in parsed):
        name, message = parsed.get("name", "error"), parsed.get("message", "")
        return bounded(f"{head} {str(name)[:MAX_ERROR_CHARS]}: {str(message)[:MAX_ERROR_CHARS]}")
    return bounded(f"{head} {_text(answer.body)}")


def classify_answer(answer: Answer, expected: int) -> ProviderReply:
    """Decide what an answer to a batch of ``expected`` emails means.

    Raises:
        ProviderAuthError: on 401/403.
        ProviderConfigError: on 404/405 and on any redirect.
    """
    status = answer.status
    if 200 <= status < 300:
        return classify_accepted(answer, expected)
    parsed = _json(answer.body)
    raw_name = parsed.get("name") if isinstance(parsed, dict) else None
    name = error_name(raw_name)
    code = f"HTTP {status}" + (f" {name}" if name else "")
    error = _ledger_error(answer, parsed)
    if 300 <= status < 400:
        # The batch endpoint never redirects, so a redirect means PROVIDER_BASE_URL is
        # wrong (http:// for an https:// API, a moved host): every request would get
        # it, so the campaign stops at once rather than failing softly for hours. It is
        # not followed, which could carry the API key and recipients elsewhere, and
        # its Location is the provider's text, so no message repeats it.
        raise ProviderConfigError(
            f"email provider answered the batch request with a redirect ({code}), "
            "which is not followed; check PROVIDER_BASE_URL",
            code,
            error,
        )
    if status in (401, 403):
        raise ProviderAuthError(
            f"email provider refused the API key ({code}); check PROVIDER_API_KEY", code, error
        )
    if status in (404, 405):
        raise ProviderConfigError(
            f"email provider has no batch endpoint at the configured URL ({code}); "
            "check PROVIDER_BASE_URL",
            code,
            error,
        )
    if status == 429:
        return ProviderReply(
            ReplyKind.THROTTLED,
            error=error,
            code=code,
            retry_after=retry_after_seconds(answer.retry_after),
        )
    if status == 409 and raw_name == "invalid_idempotent_request":
        return ProviderReply(ReplyKind.ACCEPTED_EARLIER, error=error, code=code)
    if status in (400, 422):
        return ProviderReply(ReplyKind.REJECTED, error=error, code=code)
    # 5xx, 409 concurrent_idempotent_requests (the first is still in progress), and
    # anything else we do not know.
    return ProviderReply(ReplyKind.SOFT_FAILURE, error=error, code=code)


_NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?)")
_POLICY_WINDOW = re.compile(r"(?:^|;)\s*w\s*=\s*(\d+(?:\.\d+)?)")
_POLICY_QUOTA = re.compile(r"(?:^|;)\s*q\s*=\s*(\d+(?:\.\d+)?)")


MAX_ADVERTISED_RATE = 100_000.0
"""Above this many requests/s an advertised limit is taken as nonsense."""


def advertised_rate(limit: str | None, policy: str | None = None) -> float | None:
    """Requests/s a provider advertises in ``ratelimit-limit`` / ``ratelimit-policy``.

    ``ratelimit-policy: 50;w=1`` (or ``"name";q=50;w=1``) gives the window; without
    one the window is a second, as Resend's limit is. Anything unreadable, zero or
    absurd is None: the headers are the provider's text.
    """
    quota: float | None = None
    window = 1.0
    if policy:
        first = policy.split(",")[0][:200]
        window_match = _POLICY_WINDOW.search(first)
        if window_match:
            window = float(window_match.group(1))
        quota_match = _POLICY_QUOTA.search(first) or _NUMBER.match(first)
        if quota_match:
            quota = float(quota_match.group(1))
    if limit:
        limit_match = _NUMBER.fullmatch(limit[:40].strip())
        if limit_match:
            quota = float(limit_match.group(1))
    if quota is None or window <= 0:
        return None
    rate = quota / window
    if not math.isfinite(rate) or not 0 < rate <= MAX_ADVERTISED_RATE:
        return None
    return rate


# -- I/O ---------------------------------------------------------------------------------


class _Unreadable(Exception):
    """The body cannot be read whole; the message says why, in our words."""


def _decoded(raw: bytes, encoding: str, limit: int) -> bytes:
    """``raw`` undone of its content encoding, never more than ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise _Unreadable("in a content encoding we cannot decode")
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
    try:
        decoded = decompressor.decompress(raw, limit + 1)
    except zlib.error:
        raise _Unreadable(f"not valid {encoding}") from None
    if len(decoded) > limit or decompressor.unconsumed_tail:
        raise _Unreadable(f"larger than {_LIMIT} once decompressed")
    return decoded


async def _read_body(response: httpx.Response, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The body of a streamed response, refused as soon as it passes ``limit`` bytes.

    Raw bytes are counted (we ask for no compression); a compressed body is then
    decoded with the same bound, so a small bomb cannot expand in memory.
    """
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Unreadable(f"larger than {_LIMIT} (Content-Length)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise _Unreadable(f"larger than {_LIMIT}")
        chunks.append(chunk)
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return _decoded(raw, response.headers.get("content-encoding", ""), limit)


def _unobserved(status: int | str, seconds: float) -> None:
    return None


class ProviderClient:
    """Sends batch requests; one instance per process."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout_seconds: float = 30.0,
        max_connections: int = 32,
        on_answer: Callable[[int | str, float], None] | None = None,
    ) -> None:
        """Create the shared HTTP client; the key is only unwrapped into the header.

        ``on_answer(status, seconds)`` is told of every request (for metrics): the HTTP
        status, or ``"timeout"`` / ``"connection"`` when none came, and its duration.

        ``timeout_seconds`` is the total deadline of one request, from connecting to
        the last byte of the answer (a body trickled slowly cannot stretch it); the
        wait for a free connection is not part of it.
        """
        self._deadline = timeout_seconds
        self._observe = on_answer or _unobserved
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Content-Type": "application/json",
                "User-Agent": "campaign-delivery/0.1",
                # Raw bytes are what the size limit counts (see _read_body).
                "Accept-Encoding": "identity",
            },
            timeout=httpx.Timeout(timeout_seconds, connect=min(5.0, timeout_seconds), pool=None),
            follow_redirects=False,  # see classify_answer
            transport=asyncio_transport(
                httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                )
            ),
        )
        # Queue here rather than in httpcore's pool, whose bookkeeping grows with
        # (waiting requests x connections) and dominates CPU under load.
        self._slots = asyncio.Semaphore(max_connections)

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._http.aclose()

    async def send_batch(self, emails: list[dict], idempotency_key: str) -> ProviderReply:
        """POST one batch of at most 100 emails and classify the answer.

        Raises:
            ProviderAuthError: on 401/403.
            ProviderConfigError: on 404/405 or a redirect (wrong base URL).
        """
        body = orjson.dumps(emails)
        started = time.perf_counter()
        try:
            async with self._slots, asyncio.timeout(self._deadline):
                started = time.perf_counter()  # the provider's time, not the queue's
                answer = await self._exchange(body, idempotency_key)
        except TimeoutError:
            self._observe("timeout", time.perf_counter() - started)
            code = f"timeout: no whole answer within {self._deadline:g}s"
            return _soft(code, code)
        except httpx.TimeoutException as exc:
            self._observe("timeout", time.perf_counter() - started)
            code = f"timeout: {type(exc).__name__}"
            return _soft(code, code)
        except httpx.TransportError as exc:
            self._observe("connection", time.perf_counter() - started)
            # The exception's text may quote what the server sent: ledger only.
            return _soft(f"connection error: {type(exc).__name__}", f"connection error: {exc!r}")
        self._observe(answer.status, time.perf_counter() - started)
        reply = classify_answer(answer, len(emails))
        if answer.rate_limit is not None or answer.rate_policy is not None:
            advertised = advertised_rate(answer.rate_limit, answer.rate_policy)
            reply = dataclasses.replace(reply, advertised_rps=advertised)
        return reply

    async def _exchange(self, body: bytes, idempotency_key: str) -> Answer:
        """Send one request and read its answer within the size limit."""
        async with self._http.stream(
            "POST", "/emails/batch", content=body, headers={"Idempotency-Key": idempotency_key}
        ) as response:
            try:
                content: bytes | None = await _read_body(response, MAX_ANSWER_BYTES)
                unreadable = None
            except _Unreadable as exc:
                # Leaving the block unread closes the connection rather than reusing it.
                content, unreadable = None, str(exc)
            headers = response.headers
            return Answer(
                response.status_code,
                content,
                unreadable,
                headers.get("retry-after"),
                headers.get("ratelimit-limit"),
                headers.get("ratelimit-policy"),
            )
