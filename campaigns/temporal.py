"""Connecting to Temporal with the project's data converter."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime

from campaigns.settings import Settings

WORKFLOW_TYPE = "CampaignWorkflow"


async def connect(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """A client for ``settings``' server and namespace, speaking pydantic JSON.

    ``runtime``: the Temporal runtime to use (a worker passes the one that exports its
    metrics); the SDK's default one when None.
    """
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            data_converter=pydantic_data_converter,
            runtime=runtime,
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot reach Temporal at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace}): {exc}. Start the local stack with "
            "`campaigns stack up` or set TEMPORAL_ADDRESS."
        ) from exc
