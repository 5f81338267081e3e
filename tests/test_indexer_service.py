"""The indexer as a service: consumer groups on real Redis, batches into real PostgreSQL.
Malformed entries are acknowledged and counted, a poison entry ends in ``<stream>_dlq`` without
blocking the group, labels are applied with negation, a database outage loses nothing, the
command drains on SIGTERM and serves its metrics under the TypeScript names."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from psky.atproto.label import Label
from psky.indexer import Indexer, IndexerConfig
from psky.streams import connect, event_fields, label_fields
from psky.streams.wire import StreamEvent
from tests.indexer_helpers import Events, cloned_database, like, post, uri

A, B = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
POST, LIKE = "app.bsky.feed.post", "app.bsky.feed.like"


@pytest.fixture
async def db_url(database_url: str) -> AsyncIterator[str]:
    gen = cloned_database(database_url)
    url = await gen.__anext__()
    yield url
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def _config(redis_url: str, db_url: str, prefix: str, **kw: object) -> IndexerConfig:
    base = IndexerConfig(
        redis_url=redis_url, database_url=db_url, consumer="idx-1",
        streams=(f"{prefix}firehose_live", f"{prefix}firehose_backfill"), group=f"{prefix}firehose_group",
        label_stream=f"{prefix}label_live", label_group=f"{prefix}label_group", concurrency=2, batch_size=50,
        notify_streams=(f"{prefix}firehose_live",), did_resolution=False, claim_idle_ms=200, max_deliveries=2,
        metrics_port=0,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


async def _wait(cond: Callable[[], Awaitable[bool]], limit_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not await cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def _run(config: IndexerConfig, redis: aioredis.Redis, until: Callable[[], Awaitable[bool]]) -> Indexer:
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=4)
    try:
        indexer = Indexer(config, redis, pool)
        stop = asyncio.Event()
        task = asyncio.create_task(indexer.run(stop))
        try:
            await _wait(until)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        return indexer
    finally:
        await pool.close()


async def _add(redis: aioredis.Redis, stream: str, events: list[StreamEvent]) -> None:
    for e in events:
        await redis.xadd(stream, event_fields(e))  # type: ignore[arg-type]


def _metric(indexer: Indexer, name: str, **labels: str) -> float:
    total = 0.0
    for metric in indexer.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_malformed_entries_are_acknowledged_and_valid_ones_indexed(
    redis_url: str, db_url: str, redis_prefix: str, redis: aioredis.Redis
) -> None:
    config = _config(redis_url, db_url, redis_prefix)
    live = config.streams[0]
    ev = Events()
    await _add(redis, live, [ev.create(A, POST, "3kp1", post())])
    await redis.xadd(live, {"event": b"{not json"})
    await redis.xadd(live, {"event": b'{"type":"create","did":"nope"}'})
    await redis.xadd(live, {"other": b"x"})
    await _add(redis, live, [ev.create(B, LIKE, "3kl1", like(uri(A, POST, "3kp1")))])

    async def drained() -> bool:
        return await redis.xlen(live) == 0

    indexer = await _run(config, redis, drained)
    conn = await asyncpg.connect(db_url)
    try:
        assert (
            await conn.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', uri(A, POST, "3kp1")) == 1
        )
        assert await conn.fetchval("SELECT count(*) FROM notification") == 1
    finally:
        await conn.close()
    assert _metric(indexer, "psky_indexer_malformed_messages_total") == 3
    assert _metric(indexer, "stream_indexer_messages_processed_total", stream=live) == 5
    pending = await redis.xpending(live, config.group)
    assert pending["pending"] == 0


async def test_a_poison_event_is_dead_lettered_without_blocking_the_group(
    redis_url: str, db_url: str, redis_prefix: str, redis: aioredis.Redis
) -> None:
    # a database that rejects one particular post, always: a real failure, not a mock
    conn = await asyncpg.connect(db_url)
    await conn.execute(
        "CREATE FUNCTION reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.text = 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF; RETURN NEW; END $$;"
        " CREATE TRIGGER reject_poison BEFORE INSERT ON post FOR EACH ROW EXECUTE FUNCTION reject_poison();"
    )
    await conn.close()
    config = _config(redis_url, db_url, redis_prefix)
    backfill = config.streams[1]
    ev = Events()
    good = [ev.create(A, POST, f"3kp{i}", post(f"ok {i}"), backfill=True) for i in range(5)]
    await _add(
        redis, backfill, [*good[:2], ev.create(B, POST, "3kbad", post("poison"), backfill=True), *good[2:]]
    )

    async def settled() -> bool:
        return await redis.xlen(backfill) == 0 and await redis.xlen(f"{backfill}_dlq") == 1

    indexer = await _run(config, redis, settled)
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM post") == 5
        assert await conn.fetchval("SELECT count(*) FROM record WHERE uri LIKE '%3kbad'") == 0
    finally:
        await conn.close()
    [(_, fields)] = await redis.xrange(f"{backfill}_dlq")
    text = {k.decode(): v.decode() for k, v in fields.items()}
    assert "poisoned row" in " ".join(text.values())
    assert _metric(indexer, "stream_indexer_messages_failed_total") >= 1
    assert (await redis.xpending(backfill, config.group))["pending"] == 0


async def test_labels_with_negation_and_expiry(
    redis_url: str, db_url: str, redis_prefix: str, redis: aioredis.Redis
) -> None:
    config = _config(redis_url, db_url, redis_prefix)
    assert config.label_stream is not None
    src, subject = "did:plc:labelerlabelerlabelerlab", uri(A, POST, "3kp1")
    labels = [
        Label(src=src, uri=subject, val="spam", cts="2026-01-01T00:00:00.000Z"),
        Label(src=src, uri=subject, cid="bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", val="spam",
              cts="2026-01-01T00:00:01.000Z"),
        Label(src=src, uri=subject, val="nsfw", cts="2026-01-01T00:00:00.000Z", exp="2026-02-01T00:00:00.000Z"),
        Label(src=src, uri=subject, val="spam", neg=True, cts="2026-01-01T00:00:05.000Z"),
    ]  # fmt: skip
    for label in labels:
        await redis.xadd(config.label_stream, label_fields(label))  # type: ignore[arg-type]
    await redis.xadd(config.label_stream, {"event": b"[]"})

    async def drained() -> bool:
        return await redis.xlen(config.label_stream or "") == 0  # type: ignore[no-any-return]

    await _run(config, redis, drained)
    conn = await asyncpg.connect(db_url)
    try:
        rows = {(r["val"], r["cid"]): r for r in await conn.fetch("SELECT * FROM label")}
    finally:
        await conn.close()
    assert rows[("spam", "")]["neg"] is True
    assert rows[("spam", "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm")]["neg"] is True
    assert rows[("nsfw", "")]["neg"] is False and rows[("nsfw", "")]["exp"] == "2026-02-01T00:00:00.000Z"


async def test_a_database_outage_is_waited_out(
    redis_url: str, db_url: str, redis_prefix: str, redis: aioredis.Redis
) -> None:
    """Connections refused for a while (the database closed to connections and every
    session killed): nothing is acknowledged meanwhile, everything is indexed after."""
    config = _config(redis_url, db_url, redis_prefix, concurrency=1)
    live = config.streams[0]
    name = db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(db_url.rsplit("/", 1)[0] + "/postgres")
    ev = Events()
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    indexer = Indexer(config, redis, pool)
    stop = asyncio.Event()
    task = asyncio.create_task(indexer.run(stop))
    try:
        await _add(redis, live, [ev.create(A, POST, "3kp0", post())])
        await _wait(lambda: _count(db_url, "post", 1))
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await _add(redis, live, [ev.create(A, POST, f"3kp{i}", post()) for i in range(1, 20)])
        await _wait(lambda: _outage_seen(indexer))
        assert (await redis.xpending(live, config.group))["pending"] >= 1
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await _wait(lambda: _count(db_url, "post", 20))
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        stop.set()
        await asyncio.wait_for(task, 30)
        await pool.close()
        await admin.close()
    assert (await redis.xpending(live, config.group))["pending"] == 0


async def _outage_seen(indexer: Indexer) -> bool:
    return not indexer.db_ok


async def _count(db_url: str, table: str, n: int) -> bool:
    try:
        conn = await asyncpg.connect(db_url)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}")) >= n
    finally:
        await conn.close()


async def test_the_command_serves_metrics_and_drains_on_sigterm(
    redis_url: str, db_url: str, redis_prefix: str, redis: aioredis.Redis
) -> None:
    env = {**os.environ, "LOG_FORMAT": "text", "REDIS_URL": redis_url, "DATABASE_URL": db_url, "INDEXER_CONSUMER": "cli-idx",
           "INDEXER_STREAMS": f"{redis_prefix}firehose_live,{redis_prefix}firehose_backfill",
           "INDEXER_GROUP": f"{redis_prefix}firehose_group", "INDEXER_LABEL_STREAM": f"{redis_prefix}label_live",
           "INDEXER_LABEL_GROUP": f"{redis_prefix}label_group", "INDEXER_METRICS_PORT": "0",
           "INDEXER_METRICS_HOST": "127.0.0.1", "ENABLE_DID_RESOLUTION": "false"}  # fmt: skip
    ev = Events()
    await _add(
        redis, f"{redis_prefix}firehose_live", [ev.create(A, POST, f"3kp{i}", post()) for i in range(30)]
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "psky.cli", "indexer", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "the indexer exited early: " + "".join(seen)
            seen.append(line)
            if "indexer started" in line:
                port = int(line.split("metrics_port=")[1].split()[0])
        await _wait(lambda: _count(db_url, "post", 30))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
        for name in ("stream_indexer_messages_processed_total", "stream_indexer_messages_failed_total",
                     "stream_indexer_messages_waiting_count", "stream_indexer_messages_running_count",
                     "stream_indexer_message_processing_time_bucket", "label_indexer_messages_processed_total",
                     "psky_indexer_records_total"):  # fmt: skip
            assert name in text, name
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert b"indexer stopped" in err


def test_the_command_requires_a_consumer_name(redis_url: str, database_url: str) -> None:
    import subprocess

    env = {**os.environ, "LOG_FORMAT": "text", "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    env.pop("INDEXER_CONSUMER", None)
    res = subprocess.run([sys.executable, "-m", "psky.cli", "indexer"], capture_output=True, text=True, env=env,
                         timeout=60)  # fmt: skip
    assert res.returncode == 2
    assert "INDEXER_CONSUMER" in res.stderr


async def test_a_database_down_at_start_up_is_waited_out(
    redis_url: str, db_url: str, redis_prefix: str, redis: aioredis.Redis
) -> None:
    """``run_indexer`` started while the database closes its connections (migration and pool
    both fail): it waits, starts once the database answers, and indexes what was queued."""
    from psky.devnet.tcp_proxy import LatencyProxy
    from psky.indexer.service import run_indexer

    refusing = LatencyProxy("127.0.0.1", 9)  # discard port: nothing listens, every connection closes
    proxy = LatencyProxy.for_url(db_url)
    real_port = proxy.target_port
    proxy.target_port = refusing.target_port
    async with proxy:
        config = _config(redis_url, proxy.url(db_url), redis_prefix, concurrency=1, migrate=True)
        live = config.streams[0]
        ev = Events()
        await _add(redis, live, [ev.create(A, POST, f"3kp{i}", post()) for i in range(5)])
        stop = asyncio.Event()
        task = asyncio.create_task(run_indexer(config, stop=stop))
        try:
            await _wait(lambda: _attempts(proxy, 3))
            assert not task.done(), "the indexer gave up on a database that was only down"
            proxy.target_port = real_port
            await _wait(lambda: _count(db_url, "post", 5))
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert (await redis.xpending(live, config.group))["pending"] == 0


async def _attempts(proxy: Any, n: int) -> bool:
    return bool(proxy.stats.connections >= n)
