"""Where psky finds Redis and PostgreSQL: configured servers, or embedded ones.

Redis: ``REDIS_URL`` (redis://, rediss:// or unix:// URL), else ``REDIS_HOST`` — the
variable the TypeScript services read, either a URL or ``host[:port]`` (port 6379 by
default). PostgreSQL: ``DATABASE_URL``, else ``DB_POSTGRES_URL`` (postgres:// or
postgresql://). Empty values count as unset. Whatever is not configured is started
embedded (see :mod:`psky.ops.embedded`) in the data directory and stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from psky.ops.embedded import EmbeddedServices
from psky.ops.embedded import data_dir as default_data_dir

REDIS_SCHEMES = ("redis", "rediss", "unix")
POSTGRES_SCHEMES = ("postgres", "postgresql")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?")


class ConfigError(ValueError):
    """A service variable is set to something unusable; the message names the variable."""


def _value(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _check_url(name: str, value: str, schemes: tuple[str, ...], expected: str) -> str:
    """Validate scheme, host and port of a service URL; return it unchanged."""
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ConfigError(f"{name}: malformed URL {value!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    if "," not in parts.netloc:  # libpq's multi-host form has no single port to check
        try:
            port = parts.port  # raises ValueError when not a number in 0..65535
        except ValueError:
            port = 0
        if port == 0:
            raise ConfigError(f"{name}: invalid port in {value!r}")
    if scheme == "unix" and not parts.path:
        raise ConfigError(f"{name}: unix:// URL without a socket path: {value!r}")
    if scheme in ("redis", "rediss") and not parts.hostname:
        raise ConfigError(f"{name}: URL without a host: {value!r}")
    return value


def resolve_redis_url(env: Mapping[str, str] = os.environ) -> str | None:
    """Redis URL from ``REDIS_URL`` or ``REDIS_HOST``; None when neither is set."""
    if (url := _value(env, "REDIS_URL")) is not None:
        return _check_url("REDIS_URL", url, REDIS_SCHEMES, "redis://, rediss:// or unix:// URL")
    if (host := _value(env, "REDIS_HOST")) is None:
        return None
    if "://" in host:
        return _check_url("REDIS_HOST", host, REDIS_SCHEMES, "host:port or redis:// URL")
    match = _HOST_PORT.fullmatch(host)
    port = int(match["port"] or 6379) if match else 0
    if match is None or not 0 < port < 65536:
        raise ConfigError(f"REDIS_HOST: expected host:port or redis:// URL, got {host!r}")
    return f"redis://{match['host']}:{port}"


def resolve_database_url(env: Mapping[str, str] = os.environ) -> str | None:
    """PostgreSQL URL from ``DATABASE_URL`` or ``DB_POSTGRES_URL``; None when neither is set."""
    for name in ("DATABASE_URL", "DB_POSTGRES_URL"):
        if (url := _value(env, name)) is not None:
            return _check_url(name, url, POSTGRES_SCHEMES, "postgres:// or postgresql:// URL")
    return None


def _embedded_for(
    env: Mapping[str, str], data_dir: Path | str | None
) -> tuple[str | None, str | None, EmbeddedServices]:
    """Configured URLs plus a manager for the services that are not configured."""
    redis_url, database_url = resolve_redis_url(env), resolve_database_url(env)
    services = EmbeddedServices(
        data_dir if data_dir is not None else default_data_dir(env),
        redis=redis_url is None,
        postgres=database_url is None,
    )
    return redis_url, database_url, services


@contextlib.asynccontextmanager
async def service_urls(
    env: Mapping[str, str] | None = None, *, data_dir: Path | str | None = None
) -> AsyncIterator[tuple[str, str]]:
    """``(redis_url, database_url)``, starting embedded servers for what is not configured.

    Embedded servers this call launched are stopped on exit; ones already running for the
    same data directory (started by another psky process) are reused and left running.
    """
    redis_url, database_url, services = _embedded_for(os.environ if env is None else env, data_dir)
    async with services:
        yield redis_url or services.redis_url(), database_url or services.database_url()


@contextlib.contextmanager
def service_urls_sync(
    env: Mapping[str, str] | None = None, *, data_dir: Path | str | None = None
) -> Iterator[tuple[str, str]]:
    """Blocking twin of :func:`service_urls`, for scripts and test fixtures."""
    redis_url, database_url, services = _embedded_for(os.environ if env is None else env, data_dir)
    with services:
        yield redis_url or services.redis_url(), database_url or services.database_url()
