"""Connecting to Temporal with the project's data converter."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from campaigns.settings import Settings

WORKFLOW_TYPE = "CampaignWorkflow"


async def connect(settings: Settings) -> Client:
    """A client for ``settings``' server and namespace, speaking pydantic JSON."""
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot reach Temporal at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace}): {exc}. Start the local stack with "
            "`campaigns stack up` or set TEMPORAL_ADDRESS."
        ) from exc
