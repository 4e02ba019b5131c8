"""The shared send limit's decisions: pure functions, no I/O.

One provider account is shared by every campaign and worker. Its batch activities run
on a task queue of their own, each attempt of an activity at most
``requests_per_dispatch`` provider requests, and Temporal's task-queue rate limit
dispatches them at the account's *current rate* in requests/s divided by that number
(see ARCHITECTURE.md, "The shared send limit"). This module decides that rate and the
sizes.

Every half second one worker process folds what all processes saw since the last
decision (answers, 429s) into the account's row and calls ``decide``:

* **Ceiling**: the configured requests/s, the configured emails/s over full requests
  (``MAX_PROVIDER_BATCH`` emails each), and what the provider's ``ratelimit-*`` headers
  advertise, whichever is lowest. The rate never goes above it.
* **Multiplicative decrease** on 429s: to just under the rate the provider accepted
  in that window (what it really allows; never more than the rate it was sent), by
  at least 10% and at most half, and at most once a second, since a change shows in
  the answers only after the requests already dispatched have come back.
* **Additive increase** while the account is busy (its answers use most of the
  rate) and not throttled: back to just under the rate of the last 429 quickly, then
  1% of the ceiling a second past it; far past it (the provider allows more now)
  multiplicatively again. An advertised limit is trusted at once, unless it was
  throttled in the last few seconds.

Rates here are requests per second throughout; emails/s is requests/s times the
emails a request carries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from campaigns.models import MAX_PROVIDER_BATCH

TICK_SECONDS = 0.5
"""How often a worker process reports its answers and the rate is decided again."""
DECREASE_SPACING_SECONDS = 1.0
"""At most one decrease in this long: the effect of one shows only after it."""
TRUST_ADVERTISED_AFTER_SECONDS = 5.0
"""An advertised limit is taken as the rate only this long after the last 429."""
RECENT_SECONDS = 30.0
"""The time constant of the recent answer and 429 counts that ``capacity`` shows."""
MAX_REQUESTS_PER_SECOND = 100_000.0
MAX_EMAILS_PER_SECOND = 10_000_000.0
MIN_RATE = 0.1
"""The rate never falls below this (requests/s), nor below ``FLOOR_SHARE`` of the ceiling."""
FLOOR_SHARE = 0.02
BUSY_SHARE = 0.5
"""Answers at this share of the rate or more mean the account uses its rate: probing
up tells something. Below it the campaigns ask for less, and the rate stays. Half, not
more: just after a rise, batches with fewer requests left than a dispatch now sends
keep the account under its rate for a few seconds, and the climb must not stop there."""
DECREASE_TO_ACCEPTED = 0.95
MIN_DECREASE = 0.9
MAX_DECREASE = 0.5
FAST_INCREASE = 1.25
SLOW_STEP_SHARE = 0.01
"""Additive step per second past the last 429's rate, as a share of the ceiling."""
FORGET_THROTTLED_AT = 1.3
"""Past this multiple of the last 429's rate without a 429, the provider allows more."""
BATCHES_PER_SECOND = 5.0
"""Under a limit, batches carry as many requests as keep the account's dispatches near
this many a second at its ceiling, and send them in dispatches of about as many a
second at its current rate: each dispatch costs Temporal and the workers a fixed
amount (at 80 requests/s, dispatches of 16 cost 12% less CPU an email than of 8), and
five a second still let priority and fairness switch within a fifth of a second."""
BATCH_SIZES = (1, 2, 4, 6, 8, 12, 16)
"""The requests a batch may be planned with: at most 16 (priority and fairness order
batches, and smaller ones let them switch sooner), and sizes with many divisors, so
that at a lower rate a batch still sends in a few even dispatches."""


@dataclass(frozen=True, slots=True)
class Limits:
    """An account's configured limits; None: no limit of that kind."""

    requests_per_second: float | None = None
    emails_per_second: float | None = None

    @property
    def limited(self) -> bool:
        """Whether the account has any limit (else its queue has none either)."""
        return self.requests_per_second is not None or self.emails_per_second is not None

    def ceiling(self) -> float | None:
        """The highest rate in requests/s the configuration allows; None: unlimited."""
        rates = [r for r in (self.requests_per_second,) if r is not None]
        if self.emails_per_second is not None:
            rates.append(self.emails_per_second / MAX_PROVIDER_BATCH)
        return min(rates) if rates else None


@dataclass(frozen=True, slots=True)
class Adaptive:
    """The adaptive state of an account, as its row keeps it."""

    current: float | None = None
    """The rate now, requests/s; None before the first decision (start at the ceiling)."""
    throttled_at: float | None = None
    """The rate the provider accepted when it last throttled; None: not known."""
    advertised: float | None = None
    """What the provider's ``ratelimit-*`` headers last said, requests/s."""
    since_decrease: float | None = None
    """Seconds since the last decrease; None: never."""


@dataclass(frozen=True, slots=True)
class Window:
    """What every process saw since the last decision."""

    seconds: float
    answered: int
    """Answers that were not 429 (accepted, refused or failed: each used a request)."""
    throttled: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The rate from now on, and what to remember."""

    current: float | None
    throttled_at: float | None
    decreased: bool = False


def limit_problem(name: str, value: object, maximum: float) -> str | None:
    """Why ``value`` is not a usable limit, naming ``name`` and the range; None if it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be a number (got {str(value)[:40]!r})"
    if not math.isfinite(value) or not 0 < value <= maximum:
        return f"{name} must be finite, above 0 and at most {maximum:,.0f} (got {value!r})"
    return None


def ceiling_with(limits: Limits, advertised: float | None) -> float | None:
    """The most the rate may reach: the configured ceiling, lowered to what the provider
    advertises; None when the account has no limit (an advertised one alone is none)."""
    ceiling = limits.ceiling()
    if ceiling is None or advertised is None:
        return ceiling
    return min(ceiling, advertised)


def decide(limits: Limits, state: Adaptive, window: Window) -> Decision:
    """The account's rate after ``window``; see the module docstring for the rules."""
    ceiling = ceiling_with(limits, state.advertised)
    if ceiling is None:
        return Decision(current=None, throttled_at=None)
    floor = min(ceiling, max(MIN_RATE, ceiling * FLOOR_SHARE))
    current = min(state.current if state.current is not None else ceiling, ceiling)
    throttled_at = state.throttled_at
    seconds = max(window.seconds, 1e-3)
    decreased = False
    if window.throttled:
        # What it accepted, but never more than the rate sent: answers bunched in a
        # short window (a report comes at once on a 429) read as a burst far above it.
        accepted = min(window.answered / seconds, current)
        throttled_at = accepted if window.answered else current * MAX_DECREASE
        spaced = state.since_decrease is None or state.since_decrease >= DECREASE_SPACING_SECONDS
        if spaced:
            target = min(current * MIN_DECREASE, throttled_at * DECREASE_TO_ACCEPTED)
            current = max(current * MAX_DECREASE, target)
            decreased = True
    elif (window.answered / seconds) >= current * BUSY_SHARE:
        trusted = state.since_decrease is None or (
            state.since_decrease >= TRUST_ADVERTISED_AFTER_SECONDS
        )
        if state.advertised is not None and trusted:
            current = ceiling
        elif throttled_at is None:
            current = current * FAST_INCREASE + ceiling * SLOW_STEP_SHARE * seconds
        elif current < throttled_at * DECREASE_TO_ACCEPTED:
            current = min(throttled_at * DECREASE_TO_ACCEPTED, current * FAST_INCREASE)
        else:
            current += ceiling * SLOW_STEP_SHARE * seconds
            if current > throttled_at * FORGET_THROTTLED_AT:
                throttled_at = None
    return Decision(
        current=min(max(current, floor), ceiling), throttled_at=throttled_at, decreased=decreased
    )


def requests_per_batch(ceiling: float | None) -> int:
    """How many provider requests one batch activity is planned with under this
    ceiling (requests/s): about ``BATCHES_PER_SECOND`` dispatches a second at the
    ceiling, the largest of ``BATCH_SIZES`` that is not more; 1 with no limit."""
    if ceiling is None:
        return 1
    wanted = math.floor(ceiling / BATCHES_PER_SECOND)
    return max((size for size in BATCH_SIZES if size <= wanted), default=1)


def requests_per_dispatch(requests_per_second: float | None, per_batch: int) -> int:
    """How many requests one dispatch of the account's queue (one attempt of a batch)
    sends at this rate: about a fifth of a second's worth, and a divisor of the
    batch's ``per_batch`` so that every attempt of a batch sends as many.

    A batch carries ``per_batch`` requests whatever the rate; at a lower rate it sends
    them over several attempts, each dispatched by the queue at the rate over this
    number, so the queue's count of dispatches is a count of requests at any rate and
    a rise of the rate reaches the batches already queued at once.
    """
    if requests_per_second is None:
        return per_batch
    wanted = max(1, math.floor(requests_per_second / BATCHES_PER_SECOND))
    return max(d for d in range(1, per_batch + 1) if per_batch % d == 0 and d <= wanted)


def request_spacing(requests_per_second: float | None) -> float:
    """Seconds between the starts of one batch's requests at this rate (0: no limit),
    so a batch sends at the account's rate rather than in one burst."""
    if not requests_per_second:
        return 0.0
    return 1.0 / requests_per_second


def queue_rate(requests_per_second: float | None, per_dispatch: int) -> float | None:
    """The task queue's rate limit (dispatches/s) that sends ``requests_per_second`` in
    dispatches of ``per_dispatch`` requests; None: no limit."""
    if requests_per_second is None:
        return None
    return requests_per_second / max(1, per_dispatch)


def decayed(previous: float, added: float, seconds: float) -> float:
    """A count decayed over ``RECENT_SECONDS`` after ``seconds``, plus ``added``."""
    return previous * math.exp(-max(seconds, 0.0) / RECENT_SECONDS) + added
