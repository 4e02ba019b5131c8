"""PostgreSQL access: connection pools and schema migrations.

They live in ``campaigns.store`` with the rest of the product's SQL; this module
keeps the older import path working.
"""

from campaigns.store import (
    LATEST_VERSION,
    SchemaOutOfDate,
    connect,
    create_pool,
    migrate,
    require_current_schema,
)

__all__ = [
    "LATEST_VERSION",
    "SchemaOutOfDate",
    "connect",
    "create_pool",
    "migrate",
    "require_current_schema",
]
