"""Typed inputs and outputs shared by the CLI, the workflow and the activities.

Everything that crosses a Temporal boundary is one of these pydantic models, so the
same JSON is accepted from our CLI, from ``temporal workflow start --input`` and from
the Python client. Recipients never appear here: activities read them from
PostgreSQL by keyset range.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

from campaigns.addresses import parse_sender
from campaigns.safe_text import control_character_problem, refuse_control_characters
from campaigns.templates import fields_used

MAX_PROVIDER_BATCH = 100
"""The provider accepts at most this many emails in one batch request."""
MAX_WINDOW = 500
"""Hard cap on batch activities in flight, well under Temporal's 2,000 pending activities."""
DEFAULT_RETRY_DELAYS = (300, 900, 2700, 8100)
"""Seconds to wait before each retry round of soft-failed recipients (5, 15, 45, 135 min)."""

CAMPAIGN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
CampaignId = Annotated[
    str,
    Field(
        pattern=CAMPAIGN_ID_PATTERN,
        description="Letters, digits, '.', '_' or '-'; at most 64 characters.",
    ),
]

ORG_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
OrgId = Annotated[
    str,
    Field(
        pattern=ORG_ID_PATTERN,
        description="Letters, digits, '.', '_' or '-'; 1 to 64 characters.",
    ),
]
"""An org id: the same rule wherever one is given (spec, CLI, import)."""
MAX_AUDIENCE_NAME = 200
"""Longest audience name, in characters."""


def is_valid_org_id(value: str) -> bool:
    """Whether ``value`` obeys the org id rule (see ``OrgId``)."""
    return re.fullmatch(ORG_ID_PATTERN, value) is not None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_TEMPLATE_BYTES = 512 * 1024
"""Largest subject or body template, in UTF-8 bytes."""
MAX_TEMPLATES_BYTES = 1024 * 1024
"""Largest subject and bodies together, in UTF-8 bytes."""
MAX_SUBJECT_CHARS = 998
"""RFC 5322's line limit: a subject template longer than this cannot be a header."""
MAX_TAG_CHARS = 256
"""The provider's limit on a tag's name and value."""
MAX_RATE_PER_SECOND = 1_000_000.0
"""Highest send rate a campaign may ask for, in emails per second."""
MAX_LATENESS_SECONDS = 7 * 86_400
"""Longest a campaign may still start after its ``send_at``."""
MAX_SCHEDULE_AHEAD_DAYS = 366
"""Furthest ahead a ``send_at`` may be."""
TEMPLATE_FIELDS = ("subject", "html", "text")

TemplateDigest = Annotated[
    str,
    Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="Digest of templates stored in the database (campaigns.store.templates).",
    ),
]
SendRate = Annotated[float, Field(gt=0, le=MAX_RATE_PER_SECOND, allow_inf_nan=False)]
"""An emails-per-second limit: finite, positive, at most ``MAX_RATE_PER_SECOND``."""

HIGHEST_PRIORITY = 1
LOWEST_PRIORITY = 5
"""Temporal's default range of ``Priority.priority_key``: 1 runs first, 5 last."""
DEFAULT_PRIORITY = 3
"""Temporal's own default, the middle of the range: what a spec without one gets."""
MIN_FAIRNESS_WEIGHT = 0.001
MAX_FAIRNESS_WEIGHT = 1000.0
"""Temporal's range of ``Priority.fairness_weight``; the server clamps anything outside."""
DEFAULT_FAIRNESS_WEIGHT = 1.0
"""An org's share of task dispatch unless given another (Temporal's default too)."""


PRIORITY_RANGE = (
    f"a whole number between {HIGHEST_PRIORITY} (highest) and {LOWEST_PRIORITY} (lowest)"
)
FAIRNESS_WEIGHT_RANGE = (
    f"a finite number between {MIN_FAIRNESS_WEIGHT:g} and {MAX_FAIRNESS_WEIGHT:g} "
    "(Temporal's range)"
)


def is_priority(value: object) -> bool:
    """Whether ``value`` is a campaign priority: an int (not a bool) from 1 to 5."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and HIGHEST_PRIORITY <= value <= LOWEST_PRIORITY
    )


def priority_problem(priority: object) -> str | None:
    """Why ``priority`` is not a campaign priority, naming the range; None if it is one."""
    if is_priority(priority):
        return None
    return f"priority must be {PRIORITY_RANGE} (got {str(priority)[:40]!r})"


def fairness_weight_problem(weight: object) -> str | None:
    """Why ``weight`` is not an org's fairness weight, naming the range; None if it is one."""
    if (
        isinstance(weight, int | float)
        and not isinstance(weight, bool)
        and math.isfinite(weight)
        and MIN_FAIRNESS_WEIGHT <= weight <= MAX_FAIRNESS_WEIGHT
    ):
        return None
    return f"fairness weight must be {FAIRNESS_WEIGHT_RANGE} (got {str(weight)[:40]!r})"


def rate_problem(rate: float | None) -> str | None:
    """Why ``rate`` is not a valid send rate limit (None lifts the limit), or None."""
    if rate is None:
        return None
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not math.isfinite(rate):
        return f"rate must be a finite number of emails per second (got {rate!r})"
    if not 0 < rate <= MAX_RATE_PER_SECOND:
        return (
            f"rate must be more than 0 and at most {MAX_RATE_PER_SECOND:,.0f} emails per "
            f"second, or null for no limit (got {rate:g})"
        )
    return None


def send_at_ahead_problem(send_at: datetime, now: datetime) -> str | None:
    """Why ``send_at`` is too far ahead of ``now`` to be a campaign's start, or None."""
    if send_at - now > timedelta(days=MAX_SCHEDULE_AHEAD_DAYS):
        return f"must be at most {MAX_SCHEDULE_AHEAD_DAYS} days ahead (got {send_at.isoformat()})"
    return None


def send_at_problem(send_at: datetime, now: datetime, max_lateness_seconds: int) -> str | None:
    """Why ``send_at`` cannot be a campaign's start at ``now``, or None.

    Too far ahead is refused, and so is a time already past by more than
    ``max_lateness_seconds``: such a campaign would end expired at once.
    """
    if send_at.tzinfo is None:
        return "needs a timezone, e.g. 2026-12-01T09:00:00+00:00"
    ahead = send_at_ahead_problem(send_at, now)
    if ahead:
        return ahead
    late = (now - send_at).total_seconds()
    if late > max_lateness_seconds:
        return (
            f"{send_at.isoformat()} is {late:,.0f}s ago, more than max_lateness_seconds "
            f"({max_lateness_seconds:,}): the campaign would expire without sending"
        )
    return None


def _utf8_size(value: str) -> int:
    # A cheap upper bound first: most templates are far below the limit.
    return len(value) if len(value) * 4 <= MAX_TEMPLATE_BYTES else len(value.encode())


class CampaignTemplates(_Model):
    """A campaign's subject and bodies: stored once in PostgreSQL, named by digest."""

    subject: str
    html: str | None = None
    text: str | None = None

    def digest(self) -> str:
        """``sha256:`` of the templates, the reference a workflow input carries."""
        canonical = json.dumps(
            {"subject": self.subject, "html": self.html, "text": self.text},
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _tag_part(value: str, what: str) -> None:
    if not value:
        raise ValueError(f"tag {what}s must not be empty")
    if len(value) > MAX_TAG_CHARS:
        raise ValueError(f"tag {what}s are at most {MAX_TAG_CHARS} characters (got {len(value)})")
    problem = control_character_problem(value)
    if problem:
        raise ValueError(f"tag {what} {problem}")


MAX_MIN_DELIVERED = 10_000_000
"""Highest ``reputation.min_delivered`` a spec may ask for."""
MAX_CHECK_INTERVAL_SECONDS = 3600
"""Longest ``reputation.check_interval_seconds``: a watch that looks less often is none."""


class ReputationLimits(_Model):
    """When a sending campaign pauses itself to protect the sender's reputation.

    Rates are fractions of the emails the provider reported delivered (0.003 is 0.3%);
    no verdict is given before ``min_delivered`` of them, so a few early complaints
    cannot stop a large campaign.
    """

    # Strict: a true, "0.3" or 1.0 where a number or a flag belongs is a mistake to name.
    enabled: bool = Field(default=True, strict=True, description="Watch while it sends.")
    max_complaint_rate: float = Field(
        default=0.003,
        strict=True,
        description="Pause at this share of delivered emails marked as spam.",
    )
    max_hard_bounce_rate: float = Field(
        default=0.05,
        strict=True,
        description="Pause at this share of delivered emails bounced for good.",
    )
    min_delivered: int = Field(
        default=1000,
        strict=True,
        ge=1,
        le=MAX_MIN_DELIVERED,
        description="Delivered emails needed before any verdict.",
    )
    check_interval_seconds: int = Field(
        default=15,
        strict=True,
        ge=1,
        le=MAX_CHECK_INTERVAL_SECONDS,
        description="Seconds between two reads of the campaign's engagement counters.",
    )

    @field_validator("max_complaint_rate", "max_hard_bounce_rate")
    @classmethod
    def _rate_is_a_fraction(cls, value: float) -> float:
        if not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(
                "must be a fraction of delivered emails, more than 0 and at most 1 (0.003 is 0.3%)"
            )
        return value


class CampaignSpec(_Model):
    """What to send, to whom, and how fast. The input of ``CampaignWorkflow``.

    The templates come inline (``subject``, ``html``, ``text``), as users write them,
    or by reference (``template_digest``) once stored in the database: our CLI and
    Python client store them first, so workflow history carries only the digest.
    """

    campaign_id: CampaignId
    org: OrgId
    audience: str = Field(
        min_length=1, max_length=MAX_AUDIENCE_NAME, description="Audience name in the org."
    )
    from_address: str = Field(
        max_length=320, description="'Name <user@example.com>' or 'user@example.com'."
    )
    reply_to: str | None = Field(default=None, max_length=320)
    subject: str | None = Field(
        default=None, description="Subject template, e.g. 'Hello {{ name }}'."
    )
    html: str | None = Field(default=None, description="HTML body template.")
    text: str | None = Field(default=None, description="Plain-text body template.")
    template_digest: TemplateDigest | None = Field(
        default=None, description="Stored templates, instead of subject, html and text."
    )
    tags: dict[str, str] = Field(default_factory=dict, max_length=10)
    batch_size: int = Field(
        default=MAX_PROVIDER_BATCH,
        ge=1,
        le=MAX_PROVIDER_BATCH,
        description="Emails per provider request (the provider takes at most 100).",
    )
    recipients_per_activity: int = Field(
        default=2000,
        ge=1,
        le=10_000,
        description="Recipients handled by one batch activity; it sends several provider "
        "requests concurrently.",
    )
    window: int = Field(default=16, ge=1, le=MAX_WINDOW, description="Batch activities in flight.")
    retry_delays_seconds: list[Annotated[int, Field(ge=1, le=86_400)]] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_DELAYS),
        max_length=10,
        description="Wait before each retry round of soft-failed recipients.",
    )
    rate_per_second: SendRate | None = Field(
        default=None, description="Emails per second at most; unlimited when absent."
    )
    send_at: AwareDatetime | None = Field(
        default=None, description="Scheduled start (ISO 8601 with a timezone)."
    )
    max_lateness_seconds: int = Field(
        default=3600,
        ge=0,
        le=MAX_LATENESS_SECONDS,
        description="If sending cannot start within this long after send_at, do not send.",
    )
    send_to: Literal["audience", "failed"] = Field(
        default="audience",
        description="'failed' re-sends only the failed and abandoned recipients of an earlier "
        "run of this campaign_id.",
    )
    batches_per_run: int = Field(
        default=1000,
        ge=1,
        le=5000,
        description="Continue-as-new after this many batches, keeping every run's history small.",
    )
    reputation: ReputationLimits = Field(
        default_factory=ReputationLimits,
        description="Complaint and hard-bounce rates past which the campaign pauses itself.",
    )
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        description=f"{HIGHEST_PRIORITY} (highest) to {LOWEST_PRIORITY} (lowest): the order in "
        "which the task queue dispatches this campaign's activities against other campaigns'.",
    )

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_in_range(cls, value: object) -> object:
        # Before pydantic's own check, so that "2", 2.0 or true (mistakes to name, not
        # priorities to guess) are refused with the range rather than coerced.
        if not is_priority(value):
            raise ValueError(f"must be {PRIORITY_RANGE}")
        return value

    @field_validator("audience")
    @classmethod
    def _audience_is_printable(cls, value: str) -> str:
        return refuse_control_characters(value)

    @field_validator("from_address", "reply_to")
    @classmethod
    def _sender_is_valid(cls, value: str | None) -> str | None:
        if value is not None:
            # A line break in a sender would start a new header (``Bcc: ...``).
            refuse_control_characters(value)
            parse_sender(value)
        return value

    @field_validator("subject", "html", "text")
    @classmethod
    def _template_is_valid(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.strip():
                raise ValueError("must not be empty")
            size = _utf8_size(value)
            if size > MAX_TEMPLATE_BYTES:
                raise ValueError(
                    f"is {size:,} bytes; a template is at most {MAX_TEMPLATE_BYTES:,} bytes"
                )
            # Lenient here, so stored specs and recorded workflow inputs decode as they
            # always did; spec_check refuses non-field placeholders when a spec starts.
            fields_used(value, strict=False)
        return value

    @field_validator("subject")
    @classmethod
    def _subject_is_a_header(cls, value: str | None) -> str | None:
        if value is not None:
            if len(value) > MAX_SUBJECT_CHARS:
                raise ValueError(
                    f"is {len(value):,} characters; a subject is at most {MAX_SUBJECT_CHARS}"
                )
            refuse_control_characters(value)
        return value

    @field_validator("tags")
    @classmethod
    def _tags_are_bounded(cls, value: dict[str, str]) -> dict[str, str]:
        for name, tag_value in value.items():
            _tag_part(name, "name")
            _tag_part(tag_value, "value")
        return value

    @model_validator(mode="after")
    def _has_templates(self) -> CampaignSpec:
        inline = [name for name in TEMPLATE_FIELDS if getattr(self, name) is not None]
        if self.template_digest is not None:
            if inline:
                raise ValueError(
                    "give either template_digest or inline templates, not both "
                    f"(found {', '.join(inline)})"
                )
            return self
        if self.subject is None:
            raise ValueError("a campaign needs a 'subject' template (or a template_digest)")
        if self.html is None and self.text is None:
            raise ValueError("a campaign needs an 'html' or a 'text' body template")
        total = sum(_utf8_size(getattr(self, name) or "") for name in TEMPLATE_FIELDS)
        if total > MAX_TEMPLATES_BYTES:
            raise ValueError(
                f"subject, html and text are {total:,} bytes together; "
                f"at most {MAX_TEMPLATES_BYTES:,}"
            )
        return self

    def templates(self) -> CampaignTemplates | None:
        """The inline templates, or None when the spec refers to stored ones."""
        if self.subject is None:
            return None
        return CampaignTemplates(subject=self.subject, html=self.html, text=self.text)

    def by_reference(self, digest: str) -> CampaignSpec:
        """This spec with its templates replaced by the digest of their stored copy."""
        data = self.model_dump(exclude=set(TEMPLATE_FIELDS))
        return type(self).model_validate({**data, "template_digest": digest})

    def with_templates(self, templates: CampaignTemplates) -> CampaignSpec:
        """This spec with inline templates (what the batch activities render)."""
        data = self.model_dump(exclude={"template_digest"})
        return type(self).model_validate({**data, **templates.model_dump()})


class DeliveryStatus(StrEnum):
    """A recipient's outcome in the delivery ledger."""

    SENT = "sent"
    FAILED = "failed"  # soft failure, waiting for a retry round
    REJECTED = "rejected"  # permanent: bad address or refused by the provider
    SUPPRESSED = "suppressed"
    ABANDONED = "abandoned"  # still failing after the last retry round


class CampaignPlan(_Model):
    """What ``prepare_campaign`` learned from the database before sending starts."""

    audience_id: int
    total_recipients: int
    template_digest: TemplateDigest | None = Field(
        default=None, description="The stored templates; later runs carry only this."
    )
    fairness_weight: float = Field(
        default=DEFAULT_FAIRNESS_WEIGHT,
        description="The org's fairness weight when the campaign was prepared (older runs: 1).",
    )
    send_task_queue: str | None = Field(
        default=None,
        description="The provider account's task queue the batches run on, whose rate "
        "limit is the account's shared rate (older runs: None, the campaign's own queue).",
    )


class SpecInWorkflowInput(_Model):
    """``prepare_campaign``'s input when the templates came inline in the workflow's input.

    The activity reads the spec from the workflow's start event instead of taking it
    as its own input, so the templates are in history once, not twice.
    """

    source: Literal["workflow_input"] = "workflow_input"


class AbandonFailedInput(_Model):
    """Mark a campaign's remaining soft failures abandoned."""

    campaign_id: str
    org: OrgId


class BatchRange(_Model):
    """A keyset range of recipients: ids in ``(after_id, last_id]``."""

    after_id: int
    last_id: int
    size: int


class PlanBatchesInput(_Model):
    """Ask for the next keyset ranges after ``after_id``."""

    campaign_id: str
    org: OrgId | None = Field(
        default=None, description="Checked in SQL against the campaign's org (None: older runs)."
    )
    audience_id: int
    source: Literal["audience", "ledger"] = Field(
        description="'audience' pages recipients; 'ledger' pages soft-failed deliveries."
    )
    after_id: int
    recipients_per_activity: int = Field(
        # Runs of older versions named it batch_size, which means emails per request
        # everywhere else.
        validation_alias=AliasChoices("recipients_per_activity", "batch_size"),
        description="Recipients per range: what one batch activity handles.",
    )
    max_batches: int


class PlanSendsInput(PlanBatchesInput):
    """``PlanBatchesInput`` with what sizing for the provider account needs."""

    emails_per_request: int = Field(
        description="The spec's batch_size: under an account limit one range is one request."
    )
    rate_per_second: float | None = Field(
        default=None, description="The campaign's own rate, to tell how long a page lasts."
    )


class SendPlan(_Model):
    """The next ranges of a campaign and the limits that apply to it now."""

    ranges: list[BatchRange]
    org_rate_cap: float | None = Field(
        default=None,
        description="This campaign's share of its org's cap, emails/s (None: no cap).",
    )
    account_rate: float | None = Field(
        default=None,
        description="The provider account's shared rate now, requests/s (None: no limit).",
    )


class SendBatchInput(_Model):
    """One durable batch: render, filter, send and record a keyset range of recipients."""

    campaign_id: str
    org: OrgId | None = Field(
        default=None, description="Checked in SQL against the campaign's org (None: older runs)."
    )
    execution_id: str = Field(description="Stable id of this campaign execution (all its runs).")
    audience_id: int
    source: Literal["audience", "ledger"]
    round: int = Field(ge=0, description="0 for the first pass, n for the n-th retry round.")
    range: BatchRange
    batch_size: int = Field(description="Emails per provider request, as in the spec.")


class BatchOutcome(_Model):
    """Counts of what one batch did, computed from the ledger so a retry reports the same."""

    sent: int = 0
    failed: int = 0
    rejected: int = 0
    suppressed: int = 0
    skipped: int = 0
    last_error: str | None = None


class ReadEngagementInput(_Model):
    """Read a campaign's engagement counters, for its org only."""

    campaign_id: str
    org: OrgId


class ReputationCounts(_Model):
    """What the reputation watch judges: counts only, never an address."""

    delivered: int = 0
    hard_bounced: int = 0
    complained: int = 0

    def since(self, baseline: ReputationCounts | None) -> ReputationCounts:
        """The counts that arrived after ``baseline`` (never below zero)."""
        if baseline is None:
            return self
        return ReputationCounts(
            delivered=max(0, self.delivered - baseline.delivered),
            hard_bounced=max(0, self.hard_bounced - baseline.hard_bounced),
            complained=max(0, self.complained - baseline.complained),
        )


class ReputationWatch(BaseModel):
    """What the reputation watch keeps across checks and runs: counts only."""

    last: ReputationCounts | None = Field(
        default=None, description="The counts read at the last check."
    )
    baseline: ReputationCounts | None = Field(
        default=None,
        description="Subtracted before judging: the counts of the last check before an "
        "operator resumed a reputation pause (None: judge every count).",
    )


class EngagementCounts(_Model):
    """A campaign's counters of what the provider reported (``campaign_engagement``)."""

    delivered: int = 0
    delayed: int = 0
    hard_bounced: int = 0
    soft_bounced: int = 0
    complained: int = 0
    opened: int = 0
    clicked: int = 0
    provider_failed: int = 0
    unsubscribed: int = 0

    def for_reputation(self) -> ReputationCounts:
        """The counts the reputation watch judges."""
        return ReputationCounts(
            delivered=self.delivered, hard_bounced=self.hard_bounced, complained=self.complained
        )


class LedgerCounts(_Model):
    """A campaign's recipients by outcome in the delivery ledger."""

    sent: int = 0
    failed: int = 0
    rejected: int = 0
    suppressed: int = 0
    abandoned: int = 0


class ReportRates(_Model):
    """Engagement as fractions (0.0123 is 1.23%); 0 when the denominator is 0.

    Delivery and bounces are shares of the emails sent; complaints, opens, clicks and
    unsubscribes are shares of the emails delivered.
    """

    delivered: float = 0.0
    hard_bounced: float = 0.0
    soft_bounced: float = 0.0
    complained: float = 0.0
    opened: float = 0.0
    clicked: float = 0.0
    unsubscribed: float = 0.0


def _share(part: int, whole: int) -> float:
    return part / whole if whole > 0 else 0.0


def report_rates(ledger: LedgerCounts, engagement: EngagementCounts) -> ReportRates:
    """The report's rates: of sent for delivery and bounces, of delivered for the rest."""
    sent, delivered = ledger.sent, engagement.delivered
    return ReportRates(
        delivered=_share(delivered, sent),
        hard_bounced=_share(engagement.hard_bounced, sent),
        soft_bounced=_share(engagement.soft_bounced, sent),
        complained=_share(engagement.complained, delivered),
        opened=_share(engagement.opened, delivered),
        clicked=_share(engagement.clicked, delivered),
        unsubscribed=_share(engagement.unsubscribed, delivered),
    )


class CampaignReport(_Model):
    """What a campaign did, from PostgreSQL: the ledger, the engagement counters, rates."""

    campaign_id: str
    org: str
    ledger: LedgerCounts
    engagement: EngagementCounts
    rates: ReportRates

    @classmethod
    def of(
        cls, campaign_id: str, org: str, ledger: LedgerCounts, engagement: EngagementCounts
    ) -> CampaignReport:
        """The report of these counts, its rates computed by ``report_rates``."""
        return cls(
            campaign_id=campaign_id,
            org=org,
            ledger=ledger,
            engagement=engagement,
            rates=report_rates(ledger, engagement),
        )


class RefreshResult(BaseModel):
    """What a first-party refresh published and what changed since the previous snapshot.

    ``published`` is false when a concurrent refresh swapped the pointer first: this
    one's snapshot (``version``) was written but is not in use.
    """

    version: int
    previous_version: int | None
    published: bool = True
    size: int
    duration_ms: float
    added_count: int
    added: list[str]
    removed_count: int
    removed: list[str]


class CampaignCounts(BaseModel):
    """Running totals; the workflow mutates these as batches finish."""

    sent: int = 0
    failed: int = 0
    rejected: int = 0
    suppressed: int = 0
    skipped: int = 0
    abandoned: int = 0

    def add(self, outcome: BatchOutcome) -> None:
        """Fold a finished batch into the totals."""
        self.sent += outcome.sent
        self.failed += outcome.failed
        self.rejected += outcome.rejected
        self.suppressed += outcome.suppressed
        self.skipped += outcome.skipped

    @property
    def processed(self) -> int:
        """Recipients with a final outcome so far."""
        return self.sent + self.rejected + self.suppressed + self.skipped + self.abandoned


class CampaignState(StrEnum):
    """Lifecycle of a campaign, also published as the ``CampaignState`` search attribute."""

    SCHEDULED = "Scheduled"  # waiting for send_at
    PREPARING = "Preparing"
    RUNNING = "Running"
    PAUSED = "Paused"
    WAITING_RETRY = "WaitingRetry"  # a retry round's timer is running
    COMPLETED = "Completed"
    CANCELLED = "Cancelled"
    EXPIRED = "Expired"  # could not start within max_lateness_seconds of send_at
    FAILED = "Failed"


FINAL_STATES = frozenset(
    {CampaignState.COMPLETED, CampaignState.CANCELLED, CampaignState.EXPIRED, CampaignState.FAILED}
)


class CampaignControls(BaseModel):
    """What operators can change while a campaign runs."""

    paused: bool = False
    cancel_requested: bool = False
    window: int
    rate_per_second: float | None = None
    send_at: datetime | None = None
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        description="The priority the campaign's next activities are scheduled with.",
    )
    pause_reason: str | None = Field(
        default=None,
        description="Why the campaign paused itself (a reputation threshold, in counts and "
        "rates); None while running or when an operator paused it.",
    )


class CampaignStatus(BaseModel):
    """Answer of the ``status`` query and the workflow's result."""

    campaign_id: str
    org: str
    state: CampaignState
    total: int = 0
    counts: CampaignCounts = Field(default_factory=CampaignCounts)
    in_flight_batches: int = 0
    round: int = 0
    rate_per_second: float = 0.0
    eta_seconds: float | None = None
    controls: CampaignControls | None = None
    runs: int = Field(default=1, description="Workflow runs so far (continue-as-new).")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_error: str | None = None
    org_rate_cap: float | None = Field(
        default=None,
        description="This campaign's share of its org's cap (emails/s) at its last plan; "
        "None: the org has no cap.",
    )
    account_rate: float | None = Field(
        default=None,
        description="The provider account's shared rate (requests/s) at the campaign's "
        "last plan; None: the account has no limit.",
    )

    @property
    def done(self) -> bool:
        """True once the campaign can change no more."""
        return self.state in FINAL_STATES

    @computed_field  # type: ignore[prop-decorator]  # in the result the Web UI shows
    @property
    def not_attempted(self) -> int:
        """Recipients no batch has reached yet (after a cancel: never sent)."""
        return max(0, self.total - self.counts.processed - self.counts.failed)

    @property
    def progress(self) -> float:
        """Fraction of recipients with a final outcome, 0..1."""
        return min(1.0, self.counts.processed / self.total) if self.total else 1.0


class CarriedState(BaseModel):
    """Everything a campaign run hands to the next one when it continues as new."""

    execution_id: str
    plan: CampaignPlan
    round: int
    cursor: int = Field(description="Last recipient id of the last batch started in this pass.")
    status: CampaignStatus
    reputation: ReputationWatch = Field(default_factory=ReputationWatch)


class CampaignInput(CampaignSpec):
    """The workflow's one input: a campaign spec, as users write it.

    ``carried`` is set only by the workflow itself when it continues as new; the
    workflow refuses it in a run that Temporal did not continue (see
    ``CampaignWorkflow``), so a client cannot hand it a cursor, plan or audience.
    """

    carried: CarriedState | None = None

    def spec(self) -> CampaignSpec:
        """The spec without the carried state."""
        return CampaignSpec.model_validate(self.model_dump(exclude={"carried"}))

    @classmethod
    def continuing(cls, spec: CampaignSpec, carried: CarriedState) -> CampaignInput:
        """The input of the next run of a campaign."""
        return cls.model_validate({**spec.model_dump(), "carried": carried})
