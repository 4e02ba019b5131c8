"""Replay of recorded histories: a workflow change that breaks determinism fails here.

The histories under ``tests/histories`` were recorded from the test suite's own
campaigns (``RECORD_HISTORIES=1 make test``): completed, retried, paused and resumed,
rate-limited, cancelled both ways, scheduled and rescheduled, expired, failed, and
runs of a campaign that continued as new. Once a version has run somewhere, change
the workflow behind ``workflow.patched`` and record new histories beside the old ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from campaigns.models import CampaignStatus
from workflows import CampaignWorkflow, RefreshFirstPartyOrgsWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


def test_there_are_histories_of_every_kind() -> None:
    names = " ".join(path.stem for path in HISTORIES)
    for scenario in (
        "exactly_once",
        "500",
        "pause",
        "cancel",
        "rescheduled",
        "continue_as_new",
        "refresh",
        "cancel_while_preparing",
        "invalid_spec",
        "throttling",
    ):
        assert scenario in names, scenario


@pytest.mark.parametrize("path", HISTORIES, ids=lambda path: path.stem)
async def test_recorded_history_replays_with_the_current_workflow(path: Path) -> None:
    replayer = Replayer(
        workflows=[CampaignWorkflow, RefreshFirstPartyOrgsWorkflow],
        data_converter=pydantic_data_converter,
    )
    result = await replayer.replay_workflow(load(path), raise_on_replay_failure=True)
    assert result.replay_failure is None


@workflow.defn(name="CampaignWorkflow")
class ReorderedCampaignWorkflow(CampaignWorkflow):
    """The kind of change that must not ship unpatched: a new step before the others."""

    @workflow.run
    async def run(self, *inputs: Any) -> CampaignStatus:
        await workflow.sleep(1)
        return await super().run(*inputs)


async def test_an_unpatched_change_is_caught() -> None:
    replayer = Replayer(
        workflows=[ReorderedCampaignWorkflow], data_converter=pydantic_data_converter
    )
    completed = next(path for path in HISTORIES if "exactly_once" in path.stem)
    with pytest.raises(NondeterminismError):
        await replayer.replay_workflow(load(completed))
