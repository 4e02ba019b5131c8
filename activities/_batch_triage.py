"""The send path's pure decision: what happens to each recipient of a batch range.

Kept apart from the I/O so that the rules that make a batch exactly-once can be
tested without a database or a provider.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from campaigns.addresses import is_valid_address
from campaigns.models import DeliveryStatus
from campaigns.store.ledger import RecipientRow

_RETRIED = (DeliveryStatus.FAILED, DeliveryStatus.ABANDONED)


@dataclass
class Triage:
    """Each recipient of a range, sorted by what the batch does with it."""

    decided: dict[DeliveryStatus, int] = field(
        default_factory=lambda: dict.fromkeys(DeliveryStatus, 0)
    )
    """Outcomes an earlier attempt of this batch recorded: counted, not redone."""
    skipped: int = 0
    """Sent by an earlier execution of the campaign."""
    resend: dict[str, list[RecipientRow]] = field(default_factory=dict)
    """Recipients an earlier request may have reached, by that request's key: they go
    out again in it, under its key, so the provider can replay it."""
    suppressed: list[int] = field(default_factory=list)
    invalid: list[int] = field(default_factory=list)
    """Recipient ids whose address cannot be sent to."""
    fresh: list[RecipientRow] = field(default_factory=list)
    """Recipients to send in new requests."""


def triage(
    rows: Iterable[RecipientRow],
    planned: Mapping[int, str],
    *,
    execution_id: str,
    round: int,
) -> Triage:
    """Sort ``rows`` (in id order) for one attempt of a batch.

    ``planned`` maps recipient ids to the key of the request an earlier attempt wrote
    ahead for them (the last one planned wins: a 422 split plans smaller ones).
    """
    result = Triage()
    for row in rows:
        status = row.status
        if status is not None and (row.execution_id, row.round) == (execution_id, round):
            result.decided[DeliveryStatus(status)] += 1
            continue
        if status == DeliveryStatus.SENT:
            result.skipped += 1
            continue
        key = planned.get(row.id) or (row.request_key if status in _RETRIED else None)
        if key:
            result.resend.setdefault(key, []).append(row)
        elif row.suppressed:
            result.suppressed.append(row.id)
        elif not is_valid_address(row.email):
            result.invalid.append(row.id)
        else:
            result.fresh.append(row)
    return result
