"""PostgreSQL: the AppView schema (versioned migrations) and connection pools."""

from psky.db.migrations import MigrationError, migrate, run_migrations
from psky.db.pool import PoolConfigError, create_pool, pool_sizes

__all__ = ["MigrationError", "PoolConfigError", "create_pool", "migrate", "pool_sizes", "run_migrations"]
