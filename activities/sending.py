"""The batch-send activity: one keyset range of recipients, sent exactly once.

A batch reads its recipients with their ledger rows and suppression status in one
query, decides each recipient's fate, sends the rest in provider requests of at most
``batch_size`` (several at once), and writes every outcome to the ledger in one
statement. Retrying a batch is always safe:

* recipients the ledger records as sent are never sent again;
* a provider request is identified by an idempotency key derived from its
  recipients, and is recorded (planned) before it is sent; a retry re-sends planned
  and soft-failed requests whole under the same keys, so a request the provider
  accepted before a crash or a lost answer is replayed by the provider rather than
  delivered twice, even if a recipient was suppressed or the body changed meanwhile
  (the provider then answers 409 for a key it accepted, which counts as sent);
* counts are derived from the ledger, so a retried batch reports what the first
  attempt did instead of counting it twice.
"""

from __future__ import annotations

import asyncio
import html
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import structlog
from pydantic import ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities._account_rate import AccountRate, BatchPace
from activities._batch_triage import triage
from activities.planning import scope_problem
from campaigns import metrics
from campaigns.contract import (
    BATCH_CONTINUES,
    INVALID_SPEC_ERROR,
    PROVIDER_AUTH_ERROR,
    PROVIDER_CONFIG_ERROR,
    PROVIDER_THROTTLED,
    SEND_BATCH,
)
from campaigns.first_party import FirstPartySnapshotCache
from campaigns.models import BatchOutcome, CampaignSpec, DeliveryStatus, SendBatchInput
from campaigns.provider import (
    ProviderAuthError,
    ProviderClient,
    ProviderConfigError,
    ProviderReply,
    ReplyKind,
    request_key,
)
from campaigns.sender_identity import SenderIdentity, SendingDomains, sender_identity, track_links
from campaigns.store import campaigns as campaign_rows
from campaigns.store import ledger
from campaigns.store.ledger import PlanScope, RecipientRow
from campaigns.templates import UNSUBSCRIBE_URL_FIELD, CompiledTemplate, compile_template
from campaigns.unsubscribe import UnsubscribeLinks

log = structlog.get_logger(__name__)

REQUESTS_IN_FLIGHT_PER_BATCH = 10
CONTINUE_AFTER_SECONDS = 0.1
"""How soon a batch that sent one dispatch's worth goes back into its queue for the
rest (the queue's rate limit spaces it from there)."""
# Stands in for the unsubscribe link while an html body's links are pointed at the
# tracking host: the link goes straight to the unsubscribe page, never through a
# click redirect. Letters and digits only, so escaping and quoting leave it as it is.
_UNSUBSCRIBE_MARK = "unsubscribeurl" + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class _Campaign:
    """A campaign's templates, compiled once per worker process."""

    campaign_id: str
    org: str
    audience_id: int
    sender: str
    verified_domain: str | None
    reply_to: str | None
    subject: CompiledTemplate
    html: CompiledTemplate | None
    html_has_links: bool
    text: CompiledTemplate | None
    tags: list[dict[str, str]]

    @classmethod
    def from_spec(
        cls, spec: CampaignSpec, audience_id: int, verified_domain: str | None
    ) -> _Campaign:
        tags = [{"name": "campaign", "value": _tag_value(spec.campaign_id)}]
        tags += [{"name": _tag_value(k), "value": _tag_value(v)} for k, v in spec.tags.items()]
        return cls(
            campaign_id=spec.campaign_id,
            org=spec.org,
            audience_id=audience_id,
            sender=spec.from_address,
            verified_domain=verified_domain,
            reply_to=spec.reply_to,
            # Merge values in a subject lose their line breaks: it becomes a header.
            subject=compile_template(spec.subject or "", header_value=True),
            html=compile_template(spec.html, html_body=True) if spec.html else None,
            html_has_links="href=" in (spec.html or ""),
            text=compile_template(spec.text) if spec.text else None,
            tags=tags,
        )

    def render(
        self, row: RecipientRow, identity: SenderIdentity, unsubscribe: UnsubscribeLinks
    ) -> dict[str, object]:
        """One email of the provider's batch body, with its unsubscribe headers.

        Deterministic: the same recipient renders the same email, so a retried request
        carries the same body under its idempotency key.
        """
        url = unsubscribe.url(self.org, self.campaign_id, row.id)
        values = {
            **row.merge_fields,
            "email": row.email,
            "name": row.name,
            UNSUBSCRIBE_URL_FIELD: url,
        }
        email: dict[str, object] = {
            "from": identity.from_address,
            "to": [row.email],
            "subject": self.subject.render(values),
            "tags": self.tags,
            "headers": unsubscribe.headers(url),
        }
        if self.html:
            if self.html_has_links:
                body = self.html.render({**values, UNSUBSCRIBE_URL_FIELD: _UNSUBSCRIBE_MARK})
                body = track_links(body, identity, self.campaign_id, row.id)
                body = body.replace(_UNSUBSCRIBE_MARK, html.escape(url))
            else:
                body = self.html.render(values)
            email["html"] = body
        if self.text:
            email["text"] = self.text.render(values)
        if self.reply_to:
            email["reply_to"] = self.reply_to
        return email


def _tag_value(value: str) -> str:
    # Provider tags allow ASCII letters, digits, '_' and '-' only.
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in value)[:256]


_Accepted = dict[str, list[tuple[int, str]]]
"""Request key -> (recipient id, message id) of each email the provider accepted."""


def _plan_scope(batch: SendBatchInput) -> PlanScope:
    return PlanScope(batch.campaign_id, batch.execution_id, batch.round, batch.range.last_id)


@dataclass(frozen=True, slots=True)
class _Request:
    """One provider request: its idempotency key and the recipients it carries."""

    key: str
    members: list[RecipientRow]

    @classmethod
    def new(cls, campaign_id: str, members: list[RecipientRow]) -> _Request:
        """A request not sent before, keyed by its recipients."""
        return cls(request_key(campaign_id, [row.id for row in members]), members)


@dataclass
class _Outcomes(ledger.Outcomes):
    """Outcomes decided by this attempt, in the ledger's column layout."""

    last_code: str | None = None
    """The last error in a form that names no recipient: it goes to workflow history."""

    def add(
        self,
        recipient_id: int,
        status: DeliveryStatus,
        *,
        message_id: str | None = None,
        key: str | None = None,
        error: str | None = None,
        code: str | None = None,
        request_last_id: int | None = None,
    ) -> None:
        self.ids.append(recipient_id)
        self.statuses.append(status.value)
        self.message_ids.append(message_id)
        self.keys.append(key)
        self.errors.append(error)
        self.request_last_ids.append(request_last_id)
        if error:
            # The ledger's text never stands in for the short form: it may quote the
            # provider's answer.
            self.last_code = code or "error"


class SendingActivities:
    """The batch-send activity; holds the worker's pool and shared provider client."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: ProviderClient,
        domains: SendingDomains,
        refresh_first_party: Callable[[], Awaitable[object]] | None = None,
        *,
        unsubscribe: UnsubscribeLinks,
        account_rate: AccountRate | None = None,
    ) -> None:
        """Share ``pool`` and ``provider`` across all batches of this process.

        ``unsubscribe`` signs the link of each message (its ``List-Unsubscribe``
        headers and ``{{ unsubscribe_url }}``). ``account_rate`` is told of every
        answer, for the provider account's shared rate (None: nothing is told).

        ``refresh_first_party`` runs one first-party refresh (on the maintenance task
        queue); it is called only when no snapshot was ever published, and a batch
        waits for it a few seconds at most (see ``FirstPartySnapshotCache``).
        """
        self._pool = pool
        self._provider = provider
        self._domains = domains
        self._unsubscribe = unsubscribe
        self._account_rate = account_rate
        self._first_party = FirstPartySnapshotCache(pool, bootstrap=refresh_first_party)
        self._campaigns: OrderedDict[tuple[str, str], _Campaign] = OrderedDict()

    async def _campaign(self, batch: SendBatchInput) -> _Campaign:
        """The batch's campaign, as ``prepare_campaign`` stored it, checked against the
        org and audience the batch names."""
        key = (batch.campaign_id, batch.execution_id)
        cached = self._campaigns.get(key)
        if cached is None:
            row = await campaign_rows.for_batch(self._pool, batch.campaign_id)
            stored = (row.org_id, row.audience_id) if row else None
            _refuse_out_of_scope(batch, stored)
            assert row is not None
            try:
                spec = CampaignSpec.model_validate(row.spec)
            except ValidationError as error:
                fields = ", ".join(sorted({str(item["loc"][0]) for item in error.errors()}))
                raise ApplicationError(
                    f"the stored spec of campaign '{batch.campaign_id}' is no longer valid "
                    f"({fields}); start the campaign again with a corrected spec",
                    type=INVALID_SPEC_ERROR,
                    non_retryable=True,
                ) from None
            cached = _Campaign.from_spec(spec, row.audience_id, row.verified_domain)
            self._campaigns[key] = cached
            while len(self._campaigns) > 64:
                self._campaigns.popitem(last=False)
        else:
            _refuse_out_of_scope(batch, (cached.org, cached.audience_id))
        return cached

    async def _identity(self, campaign: _Campaign) -> SenderIdentity:
        """Decide the batch's sender from the current first-party snapshot."""
        snapshot = await self._first_party.for_batch()
        return sender_identity(
            campaign.sender,
            first_party=snapshot is not None and campaign.org in snapshot.org_ids,
            verified_domain=campaign.verified_domain,
            domains=self._domains,
        )

    @activity.defn(name=SEND_BATCH)
    async def send_batch(self, batch: SendBatchInput) -> BatchOutcome:
        """Send one keyset range; see the module docstring for the guarantees.

        Raises:
            ApplicationError: ``ProviderAuthError``/``ProviderConfigError`` (non-retryable)
                when no request can succeed; ``ProviderThrottled`` with
                ``next_retry_delay`` from ``retry-after`` when the provider asks us to
                slow down (what was sent is recorded first).
        """
        label = f"r{batch.round}:{batch.range.after_id + 1}-{batch.range.last_id}"
        with structlog.contextvars.bound_contextvars(campaign_id=batch.campaign_id, batch=label):
            # Requests an earlier attempt saw accepted (from its heartbeats) are not
            # sent again: a batch cut short by a dead worker resumes where it was.
            details = activity.info().heartbeat_details
            accepted: _Accepted = dict(details[0]) if details else {}
            if accepted:
                log.info("resuming batch", accepted_requests=len(accepted))
            heartbeat = asyncio.create_task(_heartbeat_until_done(accepted))
            try:
                return await self._send_batch(batch, accepted)
            finally:
                heartbeat.cancel()

    async def _send_batch(
        self, batch: SendBatchInput, accepted: _Accepted | None = None
    ) -> BatchOutcome:
        """Send one batch.

        ``accepted`` maps the keys of requests already accepted to (recipient id,
        message id) pairs. Requests that an earlier attempt planned but did not record
        are read back and sent again as they were.
        """
        accepted = {} if accepted is None else accepted
        started = time.perf_counter()
        campaign = await self._campaign(batch)
        identity = await self._identity(campaign)
        rows = await ledger.read_range(
            self._pool,
            source=batch.source,
            campaign_id=batch.campaign_id,
            org=batch.org or campaign.org,  # None only in runs of older versions
            audience_id=batch.audience_id,
            after_id=batch.range.after_id,
            last_id=batch.range.last_id,
            execution_id=batch.execution_id,
            round=batch.round,
        )
        # The last request planned for a recipient wins (a 422 split plans smaller ones).
        planned: dict[int, str] = {}
        for plan in await ledger.read_plan(self._pool, _plan_scope(batch)):
            planned.update(dict.fromkeys(plan.recipient_ids, plan.request_key))

        sorted_rows = triage(rows, planned, execution_id=batch.execution_id, round=batch.round)
        counts, skipped = sorted_rows.decided, sorted_rows.skipped
        outcomes = _Outcomes()
        for recipient_id in sorted_rows.suppressed:
            outcomes.add(recipient_id, DeliveryStatus.SUPPRESSED)
        for recipient_id in sorted_rows.invalid:
            outcomes.add(
                recipient_id,
                DeliveryStatus.REJECTED,
                error="invalid email address",
                code="invalid email address",
            )
        fresh, groups = sorted_rows.fresh, sorted_rows.resend
        resend = [_Request(key, members) for key, members in groups.items()]
        new = [
            _Request.new(campaign.campaign_id, fresh[i : i + batch.batch_size])
            for i in range(0, len(fresh), batch.batch_size)
        ]
        # One attempt sends what one dispatch of the account's queue stands for at the
        # current rate; the rest go on the next attempt, which the queue dispatches at
        # its rate like any other (the ledger and the plan tell it what is left).
        pace = await self._pace()
        allowed = pace.requests if pace is not None else None
        deferred = 0
        if allowed is not None and len(resend) + len(new) > allowed:
            deferred = len(resend) + len(new) - allowed
            resend, new = resend[:allowed], new[: max(0, allowed - len(resend))]
        await self._plan(batch, new)
        requests = resend + new
        spacing = pace.spacing if pace is not None else 0.0

        throttled_for: float | None = None
        fatal: ApplicationError | None = None
        limit = asyncio.Semaphore(REQUESTS_IN_FLIGHT_PER_BATCH)

        async def send(position: int, request: _Request) -> None:
            nonlocal throttled_for, fatal
            if position and spacing:  # at the account's rate, not in one burst
                await asyncio.sleep(position * spacing)
            async with limit:
                if fatal is not None or throttled_for is not None:
                    return  # leave unrecorded: the retry of this batch sends them
                try:
                    await self._send_request(batch, campaign, identity, request, outcomes, accepted)
                except _Throttled as exc:
                    throttled_for = max(throttled_for or 0.0, exc.retry_after)
                except ProviderAuthError as exc:
                    fatal = ApplicationError(str(exc), type=PROVIDER_AUTH_ERROR, non_retryable=True)
                except ProviderConfigError as exc:
                    fatal = ApplicationError(
                        str(exc), type=PROVIDER_CONFIG_ERROR, non_retryable=True
                    )

        await asyncio.gather(*(send(i, request) for i, request in enumerate(requests)))

        # A batch stopped short (throttled, refused) keeps its plan: requests an
        # earlier attempt planned may have reached the provider and must go out again
        # as they were.
        await ledger.record(
            self._pool,
            _plan_scope(batch),
            outcomes,
            clear_plan=fatal is None and throttled_for is None,
        )
        metrics.worker().emails(campaign.org, campaign.campaign_id, outcomes.statuses)
        if fatal is not None:
            log.error("batch stopped", error=fatal.message)
            raise fatal
        if throttled_for is not None:
            log.info("provider throttled", retry_after=throttled_for, recorded=len(outcomes.ids))
            raise ApplicationError(
                f"provider rate limit: retry after {throttled_for:.1f}s",
                type=PROVIDER_THROTTLED,
                next_retry_delay=timedelta(seconds=max(throttled_for, 0.1)),
            )
        if deferred:
            log.info("batch continues", sent_requests=len(requests), left_requests=deferred)
            raise ApplicationError(
                f"{deferred} requests left for the next attempt ({allowed} a dispatch "
                "at the account's rate now)",
                type=BATCH_CONTINUES,
                next_retry_delay=timedelta(seconds=CONTINUE_AFTER_SECONDS),
                # the normal path of a batch larger than a dispatch: no warning, no
                # failure metric
                category=ApplicationErrorCategory.BENIGN,
            )

        for status in outcomes.statuses:
            counts[DeliveryStatus(status)] += 1
        outcome = BatchOutcome(
            sent=counts[DeliveryStatus.SENT],
            failed=counts[DeliveryStatus.FAILED],
            rejected=counts[DeliveryStatus.REJECTED],
            suppressed=counts[DeliveryStatus.SUPPRESSED],
            skipped=skipped,
            last_error=outcomes.last_code,
        )
        log.info(
            "batch done",
            **outcome.model_dump(exclude_none=True),
            requests=len(requests),
            first_party=identity.first_party,
            seconds=round(time.perf_counter() - started, 3),
        )
        return outcome

    async def _pace(self) -> BatchPace | None:
        """How many requests this batch may send and how far apart; None: no limit
        (or no account rate in this process)."""
        if self._account_rate is None:
            return None
        return await self._account_rate.batch_pace()

    async def _plan(self, batch: SendBatchInput, requests: list[_Request]) -> None:
        """Record requests before they are sent (see migration 0003)."""
        await ledger.write_plan(
            self._pool,
            _plan_scope(batch),
            [(request.key, [row.id for row in request.members]) for request in requests],
        )

    async def _send_request(
        self,
        batch: SendBatchInput,
        campaign: _Campaign,
        identity: SenderIdentity,
        request: _Request,
        outcomes: _Outcomes,
        accepted: _Accepted,
    ) -> None:
        """Send one provider request and record its members' outcomes.

        Members suppressed since the request was first planned are left out of its
        body but keep its key. On a 422 the request is split in halves, planned and
        sent, until the refused recipients are isolated.
        """
        members, key = request.members, request.key
        # (recipient, message id) of each email accepted, by this attempt or before it
        pairs = accepted.get(key)
        if pairs is None:
            body = [row for row in members if not row.suppressed]
            if body:
                emails = [campaign.render(row, identity, self._unsubscribe) for row in body]
                reply = await self._provider.send_batch(emails, key)
                if self._account_rate is not None:
                    self._account_rate.observe(reply)
                if reply.kind is ReplyKind.ACCEPTED:
                    pairs = accepted[key] = [
                        (row.id, message_id)
                        for row, message_id in zip(body, reply.message_ids, strict=True)
                    ]
                elif reply.kind is ReplyKind.ACCEPTED_EARLIER:
                    # The provider holds an accepted request under this key: everyone
                    # it carried was sent, whatever the body looks like now.
                    for row in members:
                        outcomes.add(row.id, DeliveryStatus.SENT, key=key)
                    return
                elif reply.kind is ReplyKind.THROTTLED:
                    raise _Throttled(reply.retry_after or 1.0)
                elif reply.kind is ReplyKind.REJECTED and len(members) > 1:
                    middle = len(members) // 2
                    halves = [
                        _Request.new(campaign.campaign_id, half)
                        for half in (members[:middle], members[middle:])
                    ]
                    await self._plan(batch, halves)
                    for half in halves:
                        await self._send_request(
                            batch, campaign, identity, half, outcomes, accepted
                        )
                    return
                else:
                    self._unsent(request, reply, outcomes)
                    return
        elif pairs and isinstance(pairs[0], str):
            # Heartbeat of an earlier release: message ids in member order.
            pairs = list(zip((row.id for row in members), pairs, strict=False))
        message_ids = dict(pairs or ())
        for row in members:
            message_id = message_ids.get(row.id)
            if message_id is None:  # left out of the body: suppressed
                outcomes.add(row.id, DeliveryStatus.SUPPRESSED)
            else:
                outcomes.add(row.id, DeliveryStatus.SENT, message_id=message_id, key=key)

    @staticmethod
    def _unsent(request: _Request, reply: ProviderReply, outcomes: _Outcomes) -> None:
        """Record a request refused (422 for one recipient) or failed softly (5xx)."""
        rejected = reply.kind is ReplyKind.REJECTED
        status = DeliveryStatus.REJECTED if rejected else DeliveryStatus.FAILED
        # The request's span keeps later keyset ranges from cutting through it.
        last_id = request.members[-1].id
        for row in request.members:
            outcomes.add(
                row.id,
                status,
                key=request.key,
                error=reply.error,
                code=reply.code,
                request_last_id=last_id,
            )


def _refuse_out_of_scope(batch: SendBatchInput, stored: tuple[str, int] | None) -> None:
    problem = scope_problem(batch.campaign_id, stored, batch.org, batch.audience_id)
    if problem:
        raise ApplicationError(problem, type=INVALID_SPEC_ERROR, non_retryable=True)


class _Throttled(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after


async def _heartbeat_until_done(accepted: _Accepted) -> None:
    """Heartbeat often enough that a dead worker's batch is retried within seconds.

    The details are the requests accepted so far, for a retry to resume from.
    """
    timeout = activity.info().heartbeat_timeout
    interval = timeout.total_seconds() / 3 if timeout else 5.0
    while True:
        # Not at once: most batches end before the first beat, and each beat is a
        # write to the workflow's state on the server (details of an earlier attempt
        # are already there).
        await asyncio.sleep(interval)
        activity.heartbeat(dict(accepted))
