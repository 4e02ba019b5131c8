"""What workflows and activities agree on, with no I/O behind it.

Workflows import this module (and ``campaigns.models``) only: activity names, the
error types that stop a campaign or a refresh, and the problems of a spec that must
not start. Activities register under these names and raise these types, so a
workflow never imports the code that talks to PostgreSQL or the provider. The names
are part of recorded histories: changing one breaks replay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

# Activity type names (as recorded in workflow histories).
PREPARE_CAMPAIGN = "prepare_campaign"
PLAN_BATCHES = "plan_batches"
PLAN_SENDS = "plan_sends"
"""``plan_batches`` sized for the provider account, with the org's cap share."""
SEND_BATCH = "send_batch"
ABANDON_FAILED = "abandon_failed"
REFRESH_FIRST_PARTY_ORGS = "refresh_first_party_orgs"
READ_ENGAGEMENT = "read_engagement"
"""The reputation watch's read of a campaign's engagement counters."""


def send_task_queue(task_queue: str, account: str = "default") -> str:
    """The task queue of a provider account's batch activities.

    Its Temporal rate limit is the account's shared rate (``campaigns.rate_control``);
    workers of ``task_queue`` poll it too.
    """
    return f"{task_queue}-sends-{account}"


# Application error types an activity raises.
INVALID_SPEC_ERROR = "InvalidCampaignSpec"
"""Non-retryable: the spec, or a step's org or audience, is not acceptable."""
PROVIDER_AUTH_ERROR = "ProviderAuthError"
"""Non-retryable: the provider refuses our API key."""
PROVIDER_CONFIG_ERROR = "ProviderConfigError"
"""Non-retryable: the provider's base URL is wrong (404, 405, a redirect)."""
PROVIDER_THROTTLED = "ProviderThrottled"
"""Retryable after the provider's ``retry-after``."""
BATCH_CONTINUES = "BatchContinues"
"""Retryable at once (benign): the batch sent what one dispatch of the account's queue
allows at its current rate and sends the rest on its next attempts."""
REFRESH_REFUSED_ERROR = "FirstPartyRefreshRefused"
"""Non-retryable: the data cannot give a trustworthy first-party set."""
DATABASE_UNAVAILABLE_ERROR = "FirstPartyRefreshDatabaseUnavailable"
"""Retryable: the first-party refresh could not reach the database."""


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a spec, named by its field."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidSpec(ValueError):
    """A spec that must not start; ``problems`` names every bad field."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        """Keep the problems and build a readable message."""
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"campaign spec is invalid:\n{lines}")


def problems_from_validation_error(error: ValidationError) -> list[SpecProblem]:
    """Turn pydantic's errors into one problem per field."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("missing", "extra_forbidden") and "input" in item:
            shown = json.dumps(item["input"], default=str)
            message += f" (got {shown[:80]})"
        if item["type"] == "extra_forbidden":
            message = "is not a known field"
        problems.append(SpecProblem(field, message))
    return problems
