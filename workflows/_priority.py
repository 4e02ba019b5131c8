"""The task-queue priority a campaign's activities are scheduled with.

Pure, so replay computes the same value: Temporal's matching service dispatches a
backlogged activity task by ``priority_key`` first (1 before 5), then, within one
priority, in proportion to the ``fairness_weight`` of each ``fairness_key`` that has
tasks waiting. The key is the org id, so orgs share the workers of a priority level
by weight, whatever the number or size of their campaigns. Fairness needs the server's
``matching.enableFairness``; without it the key and weight are ignored and only the
priority applies.
"""

from __future__ import annotations

from temporalio.common import Priority

from campaigns.models import (
    DEFAULT_PRIORITY,
    MAX_FAIRNESS_WEIGHT,
    MIN_FAIRNESS_WEIGHT,
    is_priority,
)


def task_priority(priority: int, org: str, weight: float | None) -> Priority:
    """The ``Priority`` of one activity of an ``org``'s campaign.

    ``weight`` None (not known yet: the campaign is being prepared) leaves Temporal's
    default of 1. Values outside the ranges cannot come from a checked spec or org
    row; they are brought back into range rather than fail a workflow task.
    """
    key = priority if is_priority(priority) else DEFAULT_PRIORITY
    if weight is not None:
        weight = min(MAX_FAIRNESS_WEIGHT, max(MIN_FAIRNESS_WEIGHT, weight))
    return Priority(priority_key=key, fairness_key=org, fairness_weight=weight)
