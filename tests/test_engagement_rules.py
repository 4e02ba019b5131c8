"""The pure rules of applying provider events (no database): order-free rows, first
transitions counted once, suppression by bounce, complaint and soft-bounce streak."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from campaigns.engagement import UNMATCHED_AFTER, decide, retry_delay
from campaigns.store.events import MessageState, PendingEvent, Streak

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ev(
    seq: int,
    kind: str,
    minute: int,
    email_id: str = "m1",
    bounce: str | None = None,
    received: datetime = NOW,
) -> PendingEvent:
    return PendingEvent(seq, kind, email_id, bounce, NOW + timedelta(minutes=minute), received, 0)


def message(email_id: str = "m1", email: str = "a@example.com") -> MessageState:
    return MessageState(email_id, "camp", 1, "org", email)


def test_order_does_not_change_the_row() -> None:
    events = [
        ev(1, "email.opened", 3),
        ev(2, "email.delivered", 1),
        ev(3, "email.opened", 2),
        ev(4, "email.clicked", 4),
    ]
    forward = decide(events, {"m1": message()}, {}, soft_bounce_limit=3, now=NOW)
    backward = decide(events[::-1], {"m1": message()}, {}, soft_bounce_limit=3, now=NOW)
    assert forward.messages == backward.messages
    [row] = forward.messages
    assert row.opened_at == NOW + timedelta(minutes=2) and row.opens == 2
    counts = forward.counts["camp"]
    assert (counts.delivered, counts.opened, counts.clicked) == (1, 1, 1)


def test_already_known_transitions_are_not_counted_again() -> None:
    known = message()
    known.delivered_at = NOW
    decisions = decide(
        [ev(1, "email.delivered", -5)], {"m1": known}, {}, soft_bounce_limit=3, now=NOW
    )
    assert "camp" not in decisions.counts  # not a first delivery
    assert decisions.messages[0].delivered_at == NOW - timedelta(minutes=5)  # earlier wins


def test_a_hard_bounce_after_a_soft_one_moves_the_count() -> None:
    decisions = decide(
        [ev(1, "email.bounced", 1, bounce="soft"), ev(2, "email.bounced", 2, bounce="hard")],
        {"m1": message()},
        {},
        soft_bounce_limit=3,
        now=NOW,
    )
    counts = decisions.counts["camp"]
    assert (counts.soft_bounced, counts.hard_bounced) == (0, 1)
    assert [s.reason for s in decisions.suppressions] == ["bounced"]


def test_complaints_and_provider_suppressions_suppress() -> None:
    decisions = decide(
        [ev(1, "email.complained", 1), ev(2, "email.suppressed", 1, email_id="m2")],
        {"m1": message(), "m2": message("m2", "b@example.com")},
        {},
        soft_bounce_limit=3,
        now=NOW,
    )
    assert {(s.email, s.reason) for s in decisions.suppressions} == {
        ("a@example.com", "complained"),
        ("b@example.com", "bounced"),
    }


def test_the_soft_bounce_streak_counts_across_batches_and_a_later_delivery_resets_it() -> None:
    key = ("org", "a@example.com")
    two = {key: Streak("org", "a@example.com", 2, NOW)}
    third = decide(
        [ev(1, "email.bounced", 5, bounce="soft")],
        {"m1": message()},
        two,
        soft_bounce_limit=3,
        now=NOW,
    )
    assert [s.reason for s in third.suppressions] == ["bounced"]
    assert third.streaks[0].soft_in_a_row == 3
    older_delivery = decide(
        [ev(1, "email.delivered", -1)], {"m1": message()}, two, soft_bounce_limit=3, now=NOW
    )
    assert older_delivery.streaks == []  # older than the last bounce: no reset
    newer = decide(
        [ev(1, "email.delivered", 1)], {"m1": message()}, two, soft_bounce_limit=3, now=NOW
    )
    assert newer.streaks[0].soft_in_a_row == 0
    assert newer.suppressions == []


def test_unknown_messages_are_retried_with_backoff_then_kept_as_unmatched() -> None:
    fresh = ev(1, "email.delivered", 0, email_id="nope")
    old = ev(2, "email.delivered", 0, email_id="nope", received=NOW - UNMATCHED_AFTER)
    decisions = decide([fresh, old], {}, {}, soft_bounce_limit=3, now=NOW)
    assert decisions.retry_in == {1: 1.0}
    assert decisions.settled == {2: "unmatched"}
    assert [retry_delay(n) for n in (0, 1, 5, 20)] == [1.0, 2.0, 32.0, 60.0]
