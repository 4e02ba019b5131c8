"""Data access: the product's SQL, behind typed functions.

Every statement the product runs is in this package, one module per room of the
schema: ``ledger`` (deliveries and provider requests), ``audiences``, ``orgs``,
``campaigns``, ``first_party``, ``templates``, ``accounts`` (provider accounts and
their shared rate) and the others; with the pool (``connect``, ``create_pool``) and the
versioned migrations (``migrate``).
"""

from campaigns.store._pool import Conn, connect, create_pool
from campaigns.store.migrate import (
    LATEST_VERSION,
    SchemaOutOfDate,
    migrate,
    require_current_schema,
)

__all__ = [
    "LATEST_VERSION",
    "Conn",
    "SchemaOutOfDate",
    "connect",
    "create_pool",
    "migrate",
    "require_current_schema",
]
