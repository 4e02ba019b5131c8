"""The shared rate's decisions (pure): ceiling, decrease on 429s, increase, headers."""

from __future__ import annotations

import math

import pytest

from campaigns.provider import advertised_rate
from campaigns.rate_control import (
    MAX_REQUESTS_PER_SECOND,
    Adaptive,
    Limits,
    Window,
    decide,
    limit_problem,
    queue_rate,
    request_spacing,
    requests_per_batch,
    requests_per_dispatch,
)


def busy(rate: float, seconds: float = 0.5, throttled: int = 0) -> Window:
    """A window in which the account answered ``rate`` requests/s."""
    return Window(seconds=seconds, answered=round(rate * seconds), throttled=throttled)


def test_the_ceiling_is_the_tightest_of_requests_and_emails() -> None:
    assert Limits().ceiling() is None and not Limits().limited
    assert Limits(requests_per_second=50).ceiling() == 50
    assert Limits(emails_per_second=2_000).ceiling() == 20  # full requests of 100
    assert Limits(requests_per_second=50, emails_per_second=2_000).ceiling() == 20


@pytest.mark.parametrize(
    ("ceiling", "per_batch"),
    [
        (None, 1),
        (0.5, 1),
        (9.9, 1),
        (10, 2),
        (19, 2),
        (20, 4),
        (30, 6),
        (39, 6),
        (40, 8),
        (60, 12),
        (79, 12),
        (80, 16),
        (5_000, 16),
    ],
)
def test_a_batch_carries_about_a_fifth_of_a_seconds_requests_from_1_to_16(
    ceiling: float | None, per_batch: int
) -> None:
    assert requests_per_batch(ceiling) == per_batch


@pytest.mark.parametrize(
    ("rate", "per_batch", "per_dispatch"),
    [
        (50, 5, 5),
        (20, 10, 2),
        (30, 10, 5),
        (80, 10, 10),
        (100, 10, 10),
        (8, 10, 1),
        (50, 16, 8),
        (20, 16, 4),
        (80, 16, 16),
        (30, 4, 4),
        (15, 4, 2),
        (None, 6, 6),
        (45, 5, 5),
        (45, 7, 7),
        (30, 7, 1),
    ],
)
def test_a_dispatch_sends_a_divisor_of_the_batch_near_a_fifth_of_a_second(
    rate: float | None, per_batch: int, per_dispatch: int
) -> None:
    """Every attempt of a batch sends as many requests, and never more than a fifth of
    a second's worth (rounded down to a divisor of the batch)."""
    assert requests_per_dispatch(rate, per_batch) == per_dispatch


def test_a_batch_spaces_its_requests_at_the_rate() -> None:
    assert request_spacing(50) == 0.02 and request_spacing(4) == 0.25
    assert request_spacing(None) == 0.0


def test_the_queue_dispatches_the_rate_in_batches() -> None:
    assert queue_rate(50, requests_per_dispatch(50, 4)) == 12.5
    assert queue_rate(8, requests_per_dispatch(8, 10)) == 8
    assert queue_rate(None, 1) is None


def test_an_unlimited_account_has_no_rate() -> None:
    decision = decide(Limits(), Adaptive(current=10), busy(10, throttled=5))
    assert decision.current is None and not decision.decreased


def test_the_first_decision_starts_at_the_ceiling() -> None:
    assert decide(Limits(50), Adaptive(), busy(0)).current == 50


def test_429s_bring_the_rate_just_under_what_the_provider_accepted() -> None:
    # 80 requests/s asked, the provider took 50 of them a second.
    decision = decide(Limits(100), Adaptive(current=80), Window(1.0, 50, 30))
    assert decision.decreased
    assert decision.throttled_at == 50
    assert decision.current == pytest.approx(47.5)


def test_answers_bunched_in_a_short_window_never_raise_the_429_rate_above_the_rate() -> None:
    # 29 answers in a 0.2 s report read as 145/s, while the queue sent 40/s: the
    # provider allowed at most 40, and the climb back must aim there, not at 145.
    decision = decide(Limits(100), Adaptive(current=40), Window(0.2, 29, 3))
    assert decision.throttled_at == 40
    assert decision.current == pytest.approx(36)
    after = decide(
        Limits(100),
        Adaptive(decision.current, decision.throttled_at, None, 2.0),
        busy(decision.current),
    )
    assert after.current < 40  # back to just under it, not up to 1.25 x


def test_a_decrease_is_at_least_a_tenth_and_at_most_a_half() -> None:
    small = decide(Limits(100), Adaptive(current=50), Window(1.0, 49, 1))
    assert small.current == pytest.approx(45)  # 0.9 x 50, though 0.95 x 49 is higher
    collapse = decide(Limits(100), Adaptive(current=80), Window(1.0, 2, 40))
    assert collapse.current == pytest.approx(40)  # half, though it accepted 2/s


def test_decreases_are_spaced_a_second_apart() -> None:
    state = Adaptive(current=40, since_decrease=0.5)
    decision = decide(Limits(100), state, Window(0.5, 10, 5))
    assert not decision.decreased and decision.current == 40
    assert decision.throttled_at == 20  # still learnt


def test_an_idle_account_does_not_probe() -> None:
    decision = decide(Limits(100), Adaptive(current=30), busy(5))
    assert decision.current == 30


def test_probing_is_fast_far_below_the_last_429_and_slow_near_it() -> None:
    back = decide(Limits(100), Adaptive(current=20, throttled_at=50), busy(20))
    assert back.current == pytest.approx(25)  # x1.25 towards 47.5
    near = decide(Limits(100), Adaptive(current=48, throttled_at=50), busy(48))
    assert near.current == pytest.approx(48.5)  # 1% of the ceiling a second, for 0.5 s


def test_far_past_the_last_429_the_provider_is_taken_to_allow_more() -> None:
    decision = decide(Limits(100), Adaptive(current=64.9, throttled_at=50), busy(64.9))
    assert decision.throttled_at is None
    fast = decide(Limits(100), Adaptive(current=40), busy(40))
    assert fast.current == pytest.approx(40 * 1.25 + 0.5)


def test_the_rate_stays_between_its_floor_and_ceiling() -> None:
    assert decide(Limits(100), Adaptive(current=99), busy(99)).current == 100
    floor = decide(Limits(100), Adaptive(current=2.1, since_decrease=5), Window(1.0, 0, 9))
    assert floor.current == 2  # 2% of the ceiling


def test_an_advertised_limit_is_the_ceiling_and_trusted_when_calm() -> None:
    calm = decide(Limits(100), Adaptive(current=20, advertised=80), busy(20))
    assert calm.current == 80
    lower = decide(Limits(100), Adaptive(current=50, advertised=20), busy(50))
    assert lower.current == 20
    recent_429 = Adaptive(current=20, advertised=80, throttled_at=20, since_decrease=2)
    assert decide(Limits(100), recent_429, busy(20)).current == pytest.approx(20.4)  # 1% of 80
    above_config = decide(Limits(30), Adaptive(current=20, advertised=80), busy(20))
    assert above_config.current == 30


@pytest.mark.parametrize(
    ("limit", "lag_ticks", "most_429s"),
    [(50, 0, 0.02), (50, 2, 0.02), (20, 2, 0.05), (80, 2, 0.02)],
)
def test_converges_on_a_provider_limit_with_few_429s(
    limit: float, lag_ticks: int, most_429s: float
) -> None:
    """A little provider model: ``limit`` requests/s with a bucket of one second's,
    ticks of 0.5 s, a ceiling of 100, and a rate that takes ``lag_ticks`` to show in
    the answers (the requests already dispatched, the next report)."""
    state, tokens, throttled, answered = Adaptive(current=100), float(limit), 0, 0
    rates = [100.0] * (lag_ticks + 1)
    for tick in range(600):
        asked = rates[-1 - lag_ticks] * 0.5
        tokens = min(float(limit), tokens + limit * 0.5)
        ok = min(asked, tokens)
        tokens -= ok
        window = Window(0.5, round(ok), round(asked - ok))
        if tick >= 100:
            answered += window.answered
            throttled += window.throttled
        # 0.0 is a decrease just now, not none: spacing must hold in the model too
        since = (99 if state.since_decrease is None else state.since_decrease) + 0.5
        decision = decide(
            Limits(100), Adaptive(state.current, state.throttled_at, None, since), window
        )
        state = Adaptive(
            decision.current, decision.throttled_at, None, 0.0 if decision.decreased else since
        )
        rates.append(state.current or 100)
    assert answered / 250 >= 0.95 * limit  # 250 s measured
    assert throttled / (answered + throttled) < most_429s


@pytest.mark.parametrize(
    ("limit", "policy", "expected"),
    [
        ("50", None, 50.0),
        ("2", None, 2.0),
        ("100", "100;w=60", 100 / 60),
        (None, "10;w=1", 10.0),
        (None, '"default";q=30;w=2', 15.0),
        ("2.5", None, 2.5),
        ("0", None, None),
        ("lots", None, None),
        ("1e9", None, None),
        ("5", "5;w=0", None),
        (None, None, None),
        ("9" * 500, None, None),
    ],
)
def test_advertised_rate_reads_ratelimit_headers(
    limit: str | None, policy: str | None, expected: float | None
) -> None:
    rate = advertised_rate(limit, policy)
    assert rate == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, 1e12, "50", True, None])
def test_a_limit_must_be_finite_and_positive(value: object) -> None:
    problem = limit_problem("requests_per_second", value, MAX_REQUESTS_PER_SECOND)
    assert problem is not None and problem.startswith("requests_per_second must be")


def test_a_good_limit_has_no_problem() -> None:
    assert limit_problem("requests_per_second", 2, MAX_REQUESTS_PER_SECOND) is None
    assert limit_problem("requests_per_second", 0.5, MAX_REQUESTS_PER_SECOND) is None
