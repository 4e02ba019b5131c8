"""Temporal activities: everything that touches PostgreSQL or the email provider."""

from activities.planning import PlanningActivities
from activities.sending import SendingActivities

__all__ = ["PlanningActivities", "SendingActivities"]
