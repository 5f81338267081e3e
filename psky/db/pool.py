"""asyncpg connection pools sized from the environment, usable behind PgBouncer.

Sizes follow the seed's configuration: ``DB_POOL_MAX_SIZE`` (default concurrency × 2) and
``DB_POOL_MIN_IDLE`` (default concurrency / 2), the connections kept open when idle.

Behind PgBouncer in transaction pooling mode consecutive statements may run on different
server connections, so named prepared statements cannot be relied on: ``pgbouncer=True``
turns asyncpg's statement cache off (it then uses unnamed statements, prepared and run
within one exchange) and skips the session reset asyncpg sends on release, which would
only reach some arbitrary server connection.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import asyncpg

CONNECT_TIMEOUT = 10.0  # seconds to establish a connection (incl. TLS and auth)
COMMAND_TIMEOUT = 120.0  # default per-statement client-side timeout
MAX_INACTIVE_LIFETIME = 300.0  # close connections idle for this long above min_size

_INTEGER = re.compile(r"\s*[0-9]+\s*")


class PoolConfigError(ValueError):
    """A pool size variable is unusable; the message names it."""


def _read(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name, "")
    if not raw.strip():
        return None
    if not _INTEGER.fullmatch(raw):
        raise PoolConfigError(f"{name}: expected a whole number ≥ {minimum}, got {raw!r}")
    value = int(raw)
    if value < minimum:
        raise PoolConfigError(f"{name}: expected a whole number ≥ {minimum}, got {value}")
    return value


def pool_sizes(concurrency: int, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``(min_size, max_size)`` for a service running ``concurrency`` workers.

    An explicit ``DB_POOL_MIN_IDLE`` above ``DB_POOL_MAX_SIZE`` is an error; the derived
    default is only capped at the maximum.
    """
    if concurrency < 1:
        raise PoolConfigError(f"concurrency must be at least 1, got {concurrency}")
    max_size = _read(env, "DB_POOL_MAX_SIZE", 1)
    min_idle = _read(env, "DB_POOL_MIN_IDLE", 0)
    if max_size is None:
        max_size = concurrency * 2
    if min_idle is None:
        min_idle = min(concurrency // 2, max_size)
    elif min_idle > max_size:
        raise PoolConfigError(f"DB_POOL_MIN_IDLE ({min_idle}) exceeds DB_POOL_MAX_SIZE ({max_size})")
    return min_idle, max_size


async def _no_reset(conn: Any) -> None:
    """Release hook for PgBouncer mode: session state does not outlive a transaction there."""


async def create_pool(
    url: str,
    *,
    min_size: int,
    max_size: int,
    pgbouncer: bool,
    command_timeout: float | None = COMMAND_TIMEOUT,
    application_name: str = "psky",
) -> asyncpg.Pool:
    """Open a pool of ``min_size``..``max_size`` connections to ``url``."""
    if not 0 <= min_size <= max_size or max_size < 1:
        raise ValueError(f"invalid pool sizes: min_size={min_size}, max_size={max_size}")
    kwargs: dict[str, Any] = {}
    if pgbouncer:
        kwargs.update(statement_cache_size=0, reset=_no_reset)
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT,
        command_timeout=command_timeout,
        max_inactive_connection_lifetime=MAX_INACTIVE_LIFETIME,
        server_settings={"application_name": application_name},
        **kwargs,
    )
