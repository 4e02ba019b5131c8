"""Temporal workflows: deterministic orchestration only, no I/O."""

from workflows.campaign import CampaignWorkflow
from workflows.maintenance import RefreshFirstPartyOrgsWorkflow

__all__ = ["CampaignWorkflow", "RefreshFirstPartyOrgsWorkflow"]
