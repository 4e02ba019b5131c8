"""Search attributes the campaign workflow publishes, so Temporal's list filters and the
Web UI can find campaigns by state, org and progress."""

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
