"""Temporal workflows: deterministic orchestration only, no I/O."""

from workflows.campaign import CampaignWorkflow

__all__ = ["CampaignWorkflow"]
