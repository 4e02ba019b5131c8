"""The batch's pure decision, recipient by recipient: what exactly-once rests on."""

from __future__ import annotations

from activities._batch_triage import triage
from campaigns.models import DeliveryStatus
from campaigns.store.ledger import RecipientRow


def row(recipient_id: int, **fields: object) -> RecipientRow:
    values: dict = {
        "id": recipient_id,
        "email": f"r{recipient_id}@example.com",
        "name": "",
        "merge_fields": {},
        "status": None,
        "execution_id": None,
        "round": None,
        "request_key": None,
        "suppressed": False,
    }
    values.update(fields)
    return RecipientRow(**values)


def test_each_recipient_goes_where_exactly_once_needs_it() -> None:
    rows = [
        row(1),  # new
        row(2, status="sent", execution_id="exec", round=0),  # this attempt's own, earlier
        row(3, status="sent", execution_id="older", round=0),  # an earlier execution's
        row(4, status="failed", execution_id="older", round=0, request_key="k-old"),
        row(5, suppressed=True),
        row(6, email="not an address"),
        row(7, suppressed=True),  # planned before it was suppressed: resent under its key
        row(8, status="failed", execution_id="exec", round=0, request_key="k8"),  # decided
    ]

    result = triage(rows, {7: "k-planned", 1: "k-planned"}, execution_id="exec", round=0)

    assert result.decided[DeliveryStatus.SENT] == 1
    assert result.decided[DeliveryStatus.FAILED] == 1
    assert result.skipped == 1
    assert {key: [r.id for r in members] for key, members in result.resend.items()} == {
        "k-planned": [1, 7],
        "k-old": [4],
    }
    assert result.suppressed == [5]
    assert result.invalid == [6]
    assert result.fresh == []


def test_a_new_round_sends_the_previous_rounds_failures_again() -> None:
    rows = [row(1, status="failed", execution_id="exec", round=0, request_key="k1"), row(2)]
    result = triage(rows, {}, execution_id="exec", round=1)
    assert [r.id for r in result.resend["k1"]] == [1]
    assert [r.id for r in result.fresh] == [2]
    assert sum(result.decided.values()) == 0
