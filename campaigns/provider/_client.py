"""HTTP adapter for a Resend-compatible ``POST /emails/batch``.

One ``ProviderClient`` (one ``httpx.AsyncClient``, keep-alive pool) is shared by every
activity of a worker process. A request's fate is returned as a ``ProviderReply``
rather than raised, because a batch activity sends many requests at once and must
record every outcome; only credential and configuration errors, which make every
other request pointless too, are raised.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

import httpx
import orjson
from pydantic import SecretStr

from campaigns.provider._transport import asyncio_transport


class ProviderAuthError(Exception):
    """The provider refused our credentials (401/403): no request can succeed."""


class ProviderConfigError(Exception):
    """The provider endpoint is wrong (404, 405): no request can succeed."""


class ReplyKind(StrEnum):
    """How the provider answered one batch request."""

    ACCEPTED = "accepted"
    # 409 invalid_idempotent_request: the provider already accepted a request under this
    # key (it keeps only accepted ones), with a body that has changed since.
    ACCEPTED_EARLIER = "accepted_earlier"
    REJECTED = "rejected"  # permanent for this content (400/422)
    SOFT_FAILURE = "soft_failure"  # 5xx, 409 in-progress, timeouts, connection errors
    THROTTLED = "throttled"  # 429: not a failure, come back after retry_after


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """The outcome of one batch request."""

    kind: ReplyKind
    message_ids: list[str] = field(default_factory=list)
    error: str | None = None
    """The whole answer, for the ledger (may quote recipient addresses)."""
    code: str | None = None
    """A short form that names no recipient (``HTTP 422 validation_error``), for the
    workflow's status and history."""
    retry_after: float | None = None


def request_key(campaign_id: str, recipient_ids: Sequence[int]) -> str:
    """Idempotency key of the provider request that carries these recipients.

    Derived from what the request contains, so a retry of the same request (after a
    crash, a timeout or a 5xx) reuses the key and the provider answers with the
    first reply instead of sending twice.
    """
    digest = hashlib.sha256(",".join(map(str, recipient_ids)).encode()).hexdigest()[:32]
    return f"{campaign_id}/{digest}"


def _retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True, slots=True)
class _ErrorAnswer:
    """An error answer's body, read once: ``{"statusCode", "name", "message"}``."""

    status: int
    name: str | None
    detail: str

    @classmethod
    def of(cls, response: httpx.Response) -> _ErrorAnswer:
        try:
            body = response.json()
            name = body.get("name")
            detail = f"{body.get('name', 'error')}: {body.get('message', '')}".strip()
        except (ValueError, AttributeError):
            name, detail = None, response.text[:200]
        return cls(response.status_code, name if isinstance(name, str) else None, detail)

    @property
    def code(self) -> str:
        """Status and error name only: it names no recipient."""
        return f"HTTP {self.status}" + (f" {self.name}" if self.name else "")

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.detail}"


class ProviderClient:
    """Sends batch requests; one instance per process."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout_seconds: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        """Create the shared HTTP client; the key is only unwrapped into the header."""
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Content-Type": "application/json",
                "User-Agent": "campaign-delivery/0.1",
            },
            timeout=httpx.Timeout(timeout_seconds, connect=5.0, pool=None),
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
            ProviderConfigError: on 404/405 (wrong base URL).
        """
        body = orjson.dumps(emails)
        try:
            async with self._slots:
                response = await self._http.post(
                    "/emails/batch", content=body, headers={"Idempotency-Key": idempotency_key}
                )
        except httpx.TimeoutException as exc:
            error = f"timeout: {type(exc).__name__}"
            return ProviderReply(ReplyKind.SOFT_FAILURE, error=error, code=error)
        except httpx.TransportError as exc:
            return ProviderReply(
                ReplyKind.SOFT_FAILURE,
                error=f"connection error: {exc!r}",
                code=f"connection error: {type(exc).__name__}",
            )

        status = response.status_code
        if status == 200:
            ids = [item["id"] for item in orjson.loads(response.content)["data"]]
            if len(ids) != len(emails):
                error = f"provider returned {len(ids)} ids for {len(emails)} emails"
                return ProviderReply(ReplyKind.SOFT_FAILURE, error=error, code=error)
            return ProviderReply(ReplyKind.ACCEPTED, message_ids=ids)
        if status in (401, 403):
            raise ProviderAuthError(
                f"email provider refused the API key ({_ErrorAnswer.of(response)}); "
                "check PROVIDER_API_KEY"
            )
        if status in (404, 405):
            raise ProviderConfigError(
                f"email provider has no batch endpoint at {response.request.url} "
                f"({_ErrorAnswer.of(response)}); check PROVIDER_BASE_URL"
            )
        answer = _ErrorAnswer.of(response)
        error, code = str(answer), answer.code
        if status == 429:
            return ProviderReply(
                ReplyKind.THROTTLED,
                error=error,
                code=code,
                retry_after=_retry_after_seconds(response.headers.get("retry-after")),
            )
        if status == 409 and answer.name == "invalid_idempotent_request":
            return ProviderReply(ReplyKind.ACCEPTED_EARLIER, error=error, code=code)
        if status in (400, 422):
            return ProviderReply(ReplyKind.REJECTED, error=error, code=code)
        # 5xx, and 409 concurrent_idempotent_requests (the first is still in progress).
        return ProviderReply(ReplyKind.SOFT_FAILURE, error=error, code=code)
