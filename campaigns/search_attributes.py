"""Search attributes the campaign workflow publishes, so Temporal's list filters and the
Web UI can find campaigns by state, org and progress; and the dynamic config a
development server needs for the campaigns' task-queue priority and fairness."""

from temporalio.common import SearchAttributeKey

CAMPAIGN_STATE = SearchAttributeKey.for_keyword("CampaignState")
CAMPAIGN_ORG = SearchAttributeKey.for_keyword("CampaignOrg")
CAMPAIGN_PROGRESS = SearchAttributeKey.for_float("CampaignProgress")

ALL = (CAMPAIGN_STATE, CAMPAIGN_ORG, CAMPAIGN_PROGRESS)
"""Every key, for registering them with a server."""


def cli_flags() -> list[str]:
    """``--search-attribute Name=Type`` flags for ``temporal server start-dev``."""
    flags = []
    for key in ALL:
        kind = key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_").title()
        flags.append(f"--search-attribute={key.name}={kind}")
    return flags


DYNAMIC_CONFIG = {
    "matching.enableFairness": "true",
    "matching.numTaskqueueReadPartitions": "1",
    "matching.numTaskqueueWritePartitions": "1",
}
"""Server settings (values in JSON) the product relies on.

* Fairness among orgs' activity tasks is off in a default server, which then applies
  priorities only.
* One partition for the send queues: Temporal divides a queue's rate limit among its
  partitions and orders priority and fairness within each one alone, so with the
  default four a partition whose backlog is empty wastes its share (10 dispatches/s
  sent about 9), and a priority-1 batch waits behind priority-3 ones queued in other
  partitions. A send queue dispatches tens a second, far below what one partition
  serves. A development server cannot scope a value to one queue, so there every
  queue has one partition; docker-compose's dynamic config file sets the same keys,
  the partitions for the send queue only.
"""


def dynamic_config_flags() -> list[str]:
    """``--dynamic-config-value KEY=VALUE`` flags for ``temporal server start-dev``."""
    return [f"--dynamic-config-value={key}={value}" for key, value in DYNAMIC_CONFIG.items()]
