"""Service URL resolution, and that configured servers are used as they are (nothing started)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from psky.services import (
    ConfigError,
    resolve_database_url,
    resolve_redis_url,
    service_urls,
    service_urls_sync,
)

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


needs_local_servers = pytest.mark.skipif(
    not (_listening(6379) and _listening(5432)), reason="no Redis on :6379 or PostgreSQL on :5432 here"
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"REDIS_URL": "  ", "REDIS_HOST": ""}, None),
        ({"REDIS_URL": "redis://cache:6380/2"}, "redis://cache:6380/2"),
        ({"REDIS_URL": " rediss://user:pw@cache.example/0 "}, "rediss://user:pw@cache.example/0"),
        ({"REDIS_URL": "unix:///run/redis.sock?db=1"}, "unix:///run/redis.sock?db=1"),
        ({"REDIS_URL": "redis://a:1", "REDIS_HOST": "b:2"}, "redis://a:1"),
        ({"REDIS_URL": "redis://a:1", "REDIS_HOST": "not valid::"}, "redis://a:1"),
        ({"REDIS_HOST": "localhost:6380"}, "redis://localhost:6380"),
        ({"REDIS_HOST": "redis-cache"}, "redis://redis-cache:6379"),
        ({"REDIS_HOST": "10.0.0.7:7000"}, "redis://10.0.0.7:7000"),
        ({"REDIS_HOST": "[::1]:7000"}, "redis://[::1]:7000"),
        ({"REDIS_HOST": "redis://cache:6379/1"}, "redis://cache:6379/1"),
    ],
)
def test_resolve_redis_url(env: dict[str, str], expected: str | None) -> None:
    assert resolve_redis_url(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL: expected redis://, rediss:// or unix:// URL, got 'localhost:6379'"),
        ({"REDIS_URL": "http://cache"}, "REDIS_URL: expected redis://, rediss:// or unix:// URL, got 'http://cache'"),
        ({"REDIS_URL": "redis://cache:abc"}, "REDIS_URL: invalid port in 'redis://cache:abc'"),
        ({"REDIS_URL": "redis://cache:70000"}, "REDIS_URL: invalid port in 'redis://cache:70000'"),
        ({"REDIS_URL": "redis://cache:0"}, "REDIS_URL: invalid port in 'redis://cache:0'"),
        ({"REDIS_URL": "redis://:6379/0"}, "REDIS_URL: URL without a host: 'redis://:6379/0'"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL: unix:// URL without a socket path: 'unix://'"),
        ({"REDIS_URL": "redis://[::1"}, "REDIS_URL: malformed URL 'redis://[::1'"),
        ({"REDIS_HOST": "a:b:c"}, "REDIS_HOST: expected host:port or redis:// URL, got 'a:b:c'"),
        ({"REDIS_HOST": "cache:0"}, "REDIS_HOST: expected host:port or redis:// URL, got 'cache:0'"),
        ({"REDIS_HOST": "cache:65536"}, "REDIS_HOST: expected host:port or redis:// URL, got 'cache:65536'"),
        ({"REDIS_HOST": "cache:"}, "REDIS_HOST: expected host:port or redis:// URL, got 'cache:'"),
        ({"REDIS_HOST": "http://cache"}, "REDIS_HOST: expected host:port or redis:// URL, got 'http://cache'"),
        ({"REDIS_HOST": "redis://cache:x"}, "REDIS_HOST: invalid port in 'redis://cache:x'"),
    ],
)
def test_resolve_redis_url_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_redis_url(env)
    assert str(error.value) == message
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"DATABASE_URL": ""}, None),
        ({"DATABASE_URL": "postgresql://u:p@db:5433/bsky"}, "postgresql://u:p@db:5433/bsky"),
        ({"DATABASE_URL": "postgres://db/bsky?sslmode=require"}, "postgres://db/bsky?sslmode=require"),
        ({"DATABASE_URL": "postgresql:///bsky"}, "postgresql:///bsky"),  # local socket
        ({"DATABASE_URL": "postgresql://h1:5432,h2:5433/bsky"}, "postgresql://h1:5432,h2:5433/bsky"),
        ({"DB_POSTGRES_URL": "postgres://db/bsky"}, "postgres://db/bsky"),
        ({"DATABASE_URL": "postgres://a/x", "DB_POSTGRES_URL": "postgres://b/y"}, "postgres://a/x"),
        ({"DATABASE_URL": " ", "DB_POSTGRES_URL": "postgres://b/y"}, "postgres://b/y"),
    ],
)
def test_resolve_database_url(env: dict[str, str], expected: str | None) -> None:
    assert resolve_database_url(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "foo"}, "DATABASE_URL: expected postgres:// or postgresql:// URL, got 'foo'"),
        ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL: expected postgres:// or postgresql:// URL, got 'mysql://db/x'"),
        ({"DATABASE_URL": "postgres://db:port/x"}, "DATABASE_URL: invalid port in 'postgres://db:port/x'"),
        ({"DB_POSTGRES_URL": "db:5432"}, "DB_POSTGRES_URL: expected postgres:// or postgresql:// URL, got 'db:5432'"),
    ],
)
def test_resolve_database_url_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_database_url(env)
    assert str(error.value) == message


def test_invalid_variable_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"), service_urls_sync({"DATABASE_URL": "foo"}, data_dir=tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


@needs_local_servers
async def test_configured_servers_are_used_and_nothing_is_started(tmp_path: Path) -> None:
    unused = tmp_path / "psky-data"
    env = {"REDIS_HOST": "127.0.0.1:6379", "DB_POSTGRES_URL": LOCAL_POSTGRES}
    async with service_urls(env, data_dir=unused) as (redis_url, database_url):
        assert (redis_url, database_url) == ("redis://127.0.0.1:6379", LOCAL_POSTGRES)
        client = aioredis.from_url(redis_url)
        assert await client.ping()
        await client.aclose()
        conn = await asyncpg.connect(database_url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    with service_urls_sync({"REDIS_URL": LOCAL_REDIS, "DATABASE_URL": LOCAL_POSTGRES}, data_dir=unused) as urls:
        assert urls == (LOCAL_REDIS, LOCAL_POSTGRES)
    assert not unused.exists()


@needs_local_servers
@pytest.mark.skipif(
    any(os.environ.get(name, "").strip() for name in ("DATABASE_URL", "DB_POSTGRES_URL")),
    reason="the session uses a configured PostgreSQL, not an embedded one",
)
async def test_only_the_unconfigured_service_is_embedded(embedded_data_dir: Path, database_url: str) -> None:
    """Redis configured, PostgreSQL not: the session's embedded PostgreSQL is reused, left running."""
    async with service_urls({"REDIS_URL": LOCAL_REDIS}, data_dir=embedded_data_dir) as urls:
        assert urls == (LOCAL_REDIS, database_url)
    conn = await asyncpg.connect(database_url)  # still up: this call did not own it
    assert await conn.fetchval("SELECT current_database()") == "psky"
    await conn.close()


async def test_pg_database_fixture_gives_an_empty_private_database(pg_database: str, database_url: str) -> None:
    assert pg_database.rsplit("/", 1)[1].startswith("psky_test_")
    assert pg_database.rsplit("/", 1)[0] == database_url.rsplit("/", 1)[0]
    conn = await asyncpg.connect(pg_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        await conn.execute("CREATE TABLE t (n int)")
    finally:
        await conn.close()


async def test_redis_prefix_fixture_is_unique_per_test(redis_prefix: str, redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        assert await client.set(f"{redis_prefix}k", "v", nx=True)  # nobody else used this prefix
    finally:
        await client.aclose()
