"""PostgreSQL access: connection pools and schema migrations."""

from campaigns.db._pool import connect, create_pool
from campaigns.db.migrate import LATEST_VERSION, SchemaOutOfDate, migrate, require_current_schema

__all__ = [
    "LATEST_VERSION",
    "SchemaOutOfDate",
    "connect",
    "create_pool",
    "migrate",
    "require_current_schema",
]
