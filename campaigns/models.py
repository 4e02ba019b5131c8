"""Typed inputs and outputs shared by the CLI, the workflow and the activities.

Everything that crosses a Temporal boundary is one of these pydantic models, so the
same JSON is accepted from our CLI, from ``temporal workflow start --input`` and from
the Python client. Recipients never appear here: activities read them from
PostgreSQL by keyset range.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from campaigns.addresses import parse_sender
from campaigns.templates import fields_used

MAX_PROVIDER_BATCH = 100
"""The provider accepts at most this many emails in one batch request."""
MAX_WINDOW = 500
"""Hard cap on batch activities in flight, well under Temporal's 2,000 pending activities."""
DEFAULT_RETRY_DELAYS = (300, 900, 2700, 8100)
"""Seconds to wait before each retry round of soft-failed recipients (5, 15, 45, 135 min)."""

CampaignId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
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


class CampaignSpec(_Model):
    """What to send, to whom, and how fast. The input of ``CampaignWorkflow``."""

    campaign_id: CampaignId
    org: OrgId
    audience: str = Field(
        min_length=1, max_length=MAX_AUDIENCE_NAME, description="Audience name in the org."
    )
    from_address: str = Field(description="'Name <user@example.com>' or 'user@example.com'.")
    reply_to: str | None = None
    subject: str = Field(description="Subject template, e.g. 'Hello {{ name }}'.")
    html: str | None = Field(default=None, description="HTML body template.")
    text: str | None = Field(default=None, description="Plain-text body template.")
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
    rate_per_second: float | None = Field(
        default=None, gt=0, description="Emails per second at most; unlimited when absent."
    )
    send_at: AwareDatetime | None = Field(
        default=None, description="Scheduled start (ISO 8601 with a timezone)."
    )
    max_lateness_seconds: int = Field(
        default=3600,
        ge=0,
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

    @field_validator("from_address", "reply_to")
    @classmethod
    def _sender_is_valid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_sender(value)
        return value

    @field_validator("subject", "html", "text")
    @classmethod
    def _template_is_valid(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.strip():
                raise ValueError("must not be empty")
            # Lenient here, so stored specs and recorded workflow inputs decode as they
            # always did; spec_check refuses non-field placeholders when a spec starts.
            fields_used(value, strict=False)
        return value

    @model_validator(mode="after")
    def _has_a_body(self) -> CampaignSpec:
        if self.html is None and self.text is None:
            raise ValueError("a campaign needs an 'html' or a 'text' body template")
        return self

    def merge_fields(self) -> set[str]:
        """All merge-field names used by the subject and body templates."""
        used: set[str] = set()
        for template in (self.subject, self.html, self.text):
            if template:
                used |= fields_used(template)
        return used


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


class BatchRange(_Model):
    """A keyset range of recipients: ids in ``(after_id, last_id]``."""

    after_id: int
    last_id: int
    size: int


class PlanBatchesInput(_Model):
    """Ask for the next keyset ranges after ``after_id``."""

    campaign_id: str
    audience_id: int
    source: Literal["audience", "ledger"] = Field(
        description="'audience' pages recipients; 'ledger' pages soft-failed deliveries."
    )
    after_id: int
    batch_size: int
    max_batches: int


class SendBatchInput(_Model):
    """One durable batch: render, filter, send and record a keyset range of recipients."""

    campaign_id: str
    execution_id: str = Field(description="Stable id of this campaign execution (all its runs).")
    audience_id: int
    source: Literal["audience", "ledger"]
    round: int = Field(ge=0, description="0 for the first pass, n for the n-th retry round.")
    range: BatchRange
    batch_size: int


class BatchOutcome(_Model):
    """Counts of what one batch did, computed from the ledger so a retry reports the same."""

    sent: int = 0
    failed: int = 0
    rejected: int = 0
    suppressed: int = 0
    skipped: int = 0
    last_error: str | None = None


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


class CampaignInput(CampaignSpec):
    """The workflow's one input: a campaign spec, as users write it.

    ``carried`` is set only by the workflow itself when it continues as new; a spec
    from our CLI, ``temporal workflow start`` or the Python client leaves it out.
    """

    carried: CarriedState | None = None

    def spec(self) -> CampaignSpec:
        """The spec without the carried state."""
        return CampaignSpec.model_validate(self.model_dump(exclude={"carried"}))

    @classmethod
    def continuing(cls, spec: CampaignSpec, carried: CarriedState) -> CampaignInput:
        """The input of the next run of a campaign."""
        return cls.model_validate({**spec.model_dump(), "carried": carried})


CampaignRequest = TypeAliasType(
    "CampaignRequest",
    Annotated[CampaignInput | dict[str, Any], Field(union_mode="left_to_right")],
)
"""The workflow's input as decoded: a ``CampaignInput``, or the raw JSON object when it
is not a valid spec (a start that skipped our validation, e.g. ``temporal workflow
start``), so the workflow can fail at once naming the fields instead of failing every
workflow task on decoding."""
