"""Temporal activities: everything that touches PostgreSQL or the email provider."""

from activities._failures import BoundedFailures
from activities._heartbeat import AutomaticHeartbeats
from activities.maintenance import MaintenanceActivities
from activities.planning import PlanningActivities
from activities.reputation import ReputationActivities
from activities.sending import SendingActivities

__all__ = [
    "AutomaticHeartbeats",
    "BoundedFailures",
    "MaintenanceActivities",
    "PlanningActivities",
    "ReputationActivities",
    "SendingActivities",
]
