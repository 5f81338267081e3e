"""Shared fixtures: real Redis and PostgreSQL for the service tests.

REDIS_URL / DATABASE_URL (or REDIS_HOST / DB_POSTGRES_URL) select existing servers;
whatever is not set is started embedded, once per session, in a temporary data dir.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from psky.services import service_urls_sync


@pytest.fixture(scope="session")
def embedded_data_dir() -> Iterator[Path]:
    """Data dir of the session's embedded servers (reachable by the PostgreSQL user under root)."""
    path = Path(tempfile.mkdtemp(prefix="psky-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def _service_urls(embedded_data_dir: Path) -> Iterator[tuple[str, str]]:
    with service_urls_sync(data_dir=embedded_data_dir) as urls:
        yield urls


@pytest.fixture(scope="session")
def redis_url(_service_urls: tuple[str, str]) -> str:
    return _service_urls[0]


@pytest.fixture(scope="session")
def database_url(_service_urls: tuple[str, str]) -> str:
    return _service_urls[1]


@pytest.fixture
async def pg_database(database_url: str) -> AsyncIterator[str]:
    """URL of a fresh, empty database on the session's server, dropped after the test."""
    name = f"psky_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to the test; keys under it are deleted afterwards."""
    prefix = f"psky-test:{secrets.token_hex(6)}:"
    yield prefix
    client = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
