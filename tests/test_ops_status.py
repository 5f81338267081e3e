"""``psky status`` against real Redis and PostgreSQL holding streams, groups and rows made here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from psky.db.migrations import migrate
from psky.ops.status import StatusOptions, collect, format_text, redis_warnings, with_rates
from psky.streams import (
    CURSOR_DONE,
    FIREHOSE_GROUP,
    DeadLetter,
    connect,
    cursor_key,
    dead_letter_fields,
)

UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:9/nothing"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_url)
    yield c
    await c.aclose()


def _stream(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in snapshot["redis"]["streams"] if s["stream"] == name)


async def _pipeline_state(client: aioredis.Redis, prefix: str) -> None:
    """firehose_live: 5 entries, 3 delivered to indexer-1 (pending); repo_backfill with a group
    and nothing read; cursors of two relays; one indexer dead letter."""
    live = f"{prefix}firehose_live"
    for n in range(5):
        await client.xadd(live, {"event": f'{{"n":{n}}}'})
    await client.xgroup_create(live, FIREHOSE_GROUP, "0")
    await client.xreadgroup(FIREHOSE_GROUP, "indexer-1", {live: ">"}, count=3)
    await client.xgroup_createconsumer(live, FIREHOSE_GROUP, "indexer-2")
    await client.xadd(f"{prefix}repo_backfill", {"repo": '{"did":"did:plc:a"}'})
    await client.xgroup_create(f"{prefix}repo_backfill", "repo_backfill_group", "0")
    await client.set(prefix + cursor_key("firehose_live", "https://relay1.example"), "4242")
    await client.set(prefix + cursor_key("repo_backfill", "https://relay1.example"), CURSOR_DONE)
    await client.set(prefix + cursor_key("repo_backfill", "relay2.example:2470"), "did:plc:page")
    letter = DeadLetter(source_stream=live, source_id="1-0", group=FIREHOSE_GROUP, consumer="indexer-1",
                        reason="boom", attempts=6, fields={"event": b"{}"})
    await client.xadd(f"{live}_dlq", dead_letter_fields(letter))  # type: ignore[arg-type]


async def test_redis_part(client: aioredis.Redis, redis_url: str, redis_prefix: str) -> None:
    await _pipeline_state(client, redis_prefix)
    snap = await collect(redis_url, None, StatusOptions(prefix=redis_prefix))
    assert snap["postgres"] is None
    redis = snap["redis"]
    assert redis["server"]["version"] and redis["server"]["maxmemory_policy"]

    live = _stream(snap, "firehose_live")
    assert live["exists"] and live["length"] == 5 and live["key"] == f"{redis_prefix}firehose_live"
    [group] = live["groups"]
    assert group["name"] == FIREHOSE_GROUP and group["pending"] == 3 and group["lag"] == 2
    assert group["max_deliveries"] == 1 and group["stuck"] == 0 and group["redelivered"] == 0
    consumers = {c["name"]: c["pending"] for c in group["consumers"]}
    assert consumers == {"indexer-1": 3, "indexer-2": 0}
    assert _stream(snap, "repo_backfill")["groups"][0]["lag"] == 1
    assert not _stream(snap, "label_live")["exists"]
    assert _stream(snap, "firehose_live_dlq")["length"] == 1
    assert _stream(snap, "repo_backfill_dlq")["exists"] is False

    cursors = {(c["stream"], c["host"]): c for c in redis["cursors"]}
    assert cursors[("firehose_live", "relay1.example")]["seq"] == 4242
    assert cursors[("repo_backfill", "relay1.example")]["state"] == "done"
    assert cursors[("repo_backfill", "relay2.example:2470")]["state"] == "enumerating"
    assert not any(w.startswith("group ") for w in snap["warnings"])

    text = format_text(snap)
    for needle in ("firehose_live", "group firehose_group: pending 3 · lag 2", "indexer-1", "listRepos done",
                   "relay1.example", "firehose_live_dlq 1"):
        assert needle in text, needle
    assert orjson.loads(orjson.dumps({k: v for k, v in snap.items() if k != "monotonic"}))


async def test_configured_hosts_without_scanning(client: aioredis.Redis, redis_url: str, redis_prefix: str) -> None:
    """A Redis with millions of keys (one per repo) is not SCANned: the configured hosts' cursors are read."""
    await _pipeline_state(client, redis_prefix)
    hosts = StatusOptions.hosts_from_env({"INGESTER_RELAY_HOSTS": "relay1.example/, https://relay9.example",
                                          "INGESTER_LABELER_HOSTS": "labeler.example"})
    assert ("label_live", "https://labeler.example") in hosts and ("repo_backfill", "https://relay1.example") in hosts
    snap = await collect(redis_url, None, StatusOptions(prefix=redis_prefix, hosts=hosts, scan_max_keys=0))
    redis = snap["redis"]
    assert redis["discovery"].startswith("skipped")
    cursors = {(c["stream"], c["host"]): c["state"] for c in redis["cursors"]}
    assert cursors == {("firehose_live", "relay1.example"): "seq", ("repo_backfill", "relay1.example"): "done",
                       ("firehose_live", "relay9.example"): "none", ("repo_backfill", "relay9.example"): "none",
                       ("label_live", "labeler.example"): "none"}
    assert _stream(snap, "firehose_live_dlq")["length"] == 1  # the known dead-letter streams are always read
    assert "(no cursor yet)" in format_text(snap) and "discovery skipped" in format_text(snap)


async def test_stuck_and_abandoned_groups_are_warned_about(client: aioredis.Redis, redis_url: str,
                                                          redis_prefix: str) -> None:
    await _pipeline_state(client, redis_prefix)
    live = f"{redis_prefix}firehose_live"
    pending = await client.xpending_range(live, FIREHOSE_GROUP, "-", "+", 10)
    first = pending[0]["message_id"]
    # the consumer keeps failing the first entry (9 deliveries), nobody touched it for 10 minutes
    await client.execute_command("XCLAIM", live, FIREHOSE_GROUP, "indexer-1", 0, first,
                                 "RETRYCOUNT", 9, "IDLE", 600_000)
    snap = await collect(redis_url, None, StatusOptions(prefix=redis_prefix))
    group = _stream(snap, "firehose_live")["groups"][0]
    assert group["max_deliveries"] == 9 and group["stuck"] == 1
    warnings = [w for w in snap["warnings"] if "firehose_group" in w]
    assert any("delivered ≥ 5 times" in w for w in warnings)
    assert any("untouched for 10.0m" in w and "indexer-1" in w for w in warnings)


async def test_watch_rates_and_no_progress(client: aioredis.Redis, redis_url: str, redis_prefix: str) -> None:
    await _pipeline_state(client, redis_prefix)
    options = StatusOptions(prefix=redis_prefix)
    first = await collect(redis_url, None, options)
    for n in range(4):
        await client.xadd(f"{redis_prefix}firehose_live", {"event": f'{{"m":{n}}}'})
    await client.set(f"{redis_prefix}firehose_live:cursor:relay1.example", "5242")
    second = with_rates(await collect(redis_url, None, options), first)
    assert second["interval_s"] > 0
    live = _stream(second, "firehose_live")
    assert live["rate_net"] > 0
    if live["entries_added"] is not None:  # Redis ≥ 7
        assert live["rate_in"] > 0
    cursor = next(c for c in second["redis"]["cursors"] if c["stream"] == "firehose_live")
    assert cursor["rate"] > 0
    # nothing was read in between, so the group made no progress while entries wait
    third = with_rates(await collect(redis_url, None, options), second, stall_s=3600)
    assert not any("no progress" in w for w in third["warnings"])  # not for long enough
    fourth = with_rates(await collect(redis_url, None, options), third, stall_s=0)
    group = _stream(fourth, "firehose_live")["groups"][0]
    assert group["stalled_s"] >= third["interval_s"] + fourth["interval_s"] - 0.001
    assert any("no progress" in w and "firehose_group" in w for w in fourth["warnings"])
    await client.xreadgroup(FIREHOSE_GROUP, "indexer-2", {f"{redis_prefix}firehose_live": ">"}, count=1)
    fifth = with_rates(await collect(redis_url, None, options), fourth, stall_s=0)
    assert _stream(fifth, "firehose_live")["groups"][0]["stalled_s"] == 0.0
    assert not any("no progress" in w for w in fifth["warnings"])
    assert "/s" in format_text(fifth)


def test_redis_warnings() -> None:
    safe = {"maxmemory_policy": "noeviction", "appendonly": True, "save": "", "used_memory": 10, "maxmemory": 0,
            "rdb_last_bgsave_status": "ok", "aof_last_write_status": "ok"}
    assert redis_warnings(safe) == []
    assert redis_warnings({**safe, "appendonly": False, "save": "3600 1"}) == []
    [evict] = redis_warnings({**safe, "maxmemory_policy": "allkeys-lru"})
    assert "allkeys-lru" in evict and "noeviction" in evict
    [lost] = redis_warnings({**safe, "appendonly": False})
    assert "persistence is off" in lost
    [unknown] = redis_warnings({**safe, "appendonly": False, "save": None})
    assert "unreadable" in unknown
    [full] = redis_warnings({**safe, "used_memory": 95, "maxmemory": 100})
    assert "95%" in full
    [failing] = redis_warnings({**safe, "aof_last_write_status": "err"})
    assert "failing" in failing


async def test_postgres_part(redis_url: str, pg_database: str, redis_prefix: str) -> None:
    snap = await collect(redis_url, pg_database, StatusOptions(prefix=redis_prefix))
    assert any("psky migrate" in w for w in snap["warnings"])
    await migrate(pg_database)
    conn = await asyncpg.connect(pg_database)
    try:
        for n, when in enumerate(("2026-01-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z")):
            uri = f"at://did:plc:a/app.bsky.feed.post/{n}"
            await conn.execute(
                'INSERT INTO record (uri, cid, did, json, "indexedAt", rev) VALUES ($1, $2, $3, $4, $5, $6)',
                uri, "bafy", "did:plc:a", "{}", when, "3l2")
            await conn.execute(
                'INSERT INTO post (uri, cid, creator, text, "createdAt", "indexedAt") VALUES ($1, $2, $3, $4, $5, $6)',
                uri, "bafy", "did:plc:a", "hi", when, when)
    finally:
        await conn.close()
    snap = await collect(redis_url, pg_database, StatusOptions(prefix=redis_prefix))
    pg = snap["postgres"]
    assert "error" not in pg and not any("psky migrate" in w for w in snap["warnings"])
    rows = {t["table"]: t for t in pg["tables"]}
    assert rows["record"]["rows"] == 2 and rows["record"]["exact"]
    assert rows["post"]["rows"] == 2 and rows["like"]["rows"] == 0
    assert pg["latest"]["record"] == {"value": "2026-03-01T00:00:00.000Z", "exact": True}
    # the big-table path: planner estimate and the last heap pages only
    big = await collect(redis_url, pg_database, StatusOptions(prefix=redis_prefix, exact_bytes=0, tail_pages=4))
    assert big["postgres"]["latest"]["post"] == {"value": "2026-03-01T00:00:00.000Z", "exact": False}
    assert "latest indexedAt: record 2026-03-01T00:00:00.000Z" in format_text(snap)


async def test_unreachable_database_still_shows_redis(client: aioredis.Redis, redis_url: str,
                                                     redis_prefix: str) -> None:
    await _pipeline_state(client, redis_prefix)
    snap = await collect(redis_url, UNREACHABLE_PG, StatusOptions(prefix=redis_prefix, timeout_s=2))
    assert "error" in snap["postgres"] and "error" not in snap["redis"]
    assert _stream(snap, "firehose_live")["length"] == 5
    text = format_text(snap)
    assert "PostgreSQL postgresql://postgres@127.0.0.1:9/nothing: UNAVAILABLE" in text


def _psky(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "psky.cli", *args], capture_output=True, text=True, env=env,
                          timeout=180)


async def test_cli_json_watch(client: aioredis.Redis, redis_url: str, database_url: str,
                              redis_prefix: str) -> None:
    await _pipeline_state(client, redis_prefix)
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    res = _psky("status", "--prefix", redis_prefix, "--json", "--watch", "0.05", "--iterations", "2", env=env)
    assert res.returncode == 0, res.stderr
    first, second = (orjson.loads(line) for line in res.stdout.splitlines())
    assert "interval_s" not in first and second["interval_s"] > 0
    assert next(s for s in second["redis"]["streams"] if s["stream"] == "firehose_live")["length"] == 5
    assert "error" not in second["postgres"]


def test_cli_embedded_redis_and_unreachable_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_HOST", "DB_POSTGRES_URL")}
    env.update(PSKY_DATA_DIR=str(tmp_path), DATABASE_URL=UNREACHABLE_PG)
    res = _psky("status", env=env)
    assert res.returncode == 1, res.stderr  # a part is unavailable
    assert "Redis 6.2" in res.stdout or "Redis 7" in res.stdout
    assert "firehose_live" in res.stdout
    assert "PostgreSQL postgresql://postgres@127.0.0.1:9/nothing: UNAVAILABLE" in res.stdout
    assert "Traceback" not in res.stderr
