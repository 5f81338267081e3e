"""Indexer throughput: stream events from Redis into the AppView schema in PostgreSQL.

Two mixes, each written to its own streams first, then drained by one ``psky indexer``
process (a child process, as deployed: its CPU and peak RSS are its own):

- ``backfill``: per DID a profile, ~10 posts (~30% replies), ~20 likes, ~10 follows, ~2
  reposts, then a ``repo`` event, on ``firehose_backfill`` (no notifications); 2,000 DIDs
  make ~90k events. The TypeScript indexer does ~300 events/s with this mix on a 2-core
  machine; the issue's goal is >= 10,000 events/s at <= 150 MB RSS.
- ``live``: single creates in time order on ``firehose_live`` with notifications on: posts
  and replies, likes concentrated on popular posts (Zipf), follows, reposts, and deletes of
  earlier records (~8%).

Printed per mix: events, seconds until every entry is acknowledged, events/s, the indexer's
CPU seconds and peak RSS, rows per table.

Redis and PostgreSQL: ``REDIS_URL`` / ``DATABASE_URL`` if set, else embedded servers. A
database ``psky_bench_indexer`` is (re)created for each mix.

Usage: python benchmarks/bench_indexer.py [--mix backfill|live|both] [--dids 2000]
       [--live-events 30000] [--concurrency 4] [--batch-size 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis

from psky.atproto.cbor import cid_for_cbor, encode_lex
from psky.db.migrations import migrate
from psky.ops.embedded import EmbeddedServices
from psky.streams import connect, event_fields
from psky.streams.wire import SEQ_BACKFILL, DeleteEvent, RecordEvent, RepoEvent, StreamEvent

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
COMMIT = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
TABLES = ["record", "post", "like", "follow", "repost", "profile", "feed_item", "post_agg", "profile_agg",
          "notification", "actor_sync"]  # fmt: skip


def did_for(i: int) -> str:
    digest = hashlib.sha256(str(i).encode()).digest()
    return "did:plc:" + "".join(_B32[b % 32] for b in digest[:24])


def _tid(n: int) -> str:
    out = []
    value = 1_700_000_000_000_000 * 1024 + n
    for _ in range(13):
        out.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(out))


def _time(n: int) -> str:
    return f"2026-01-01T{(n // 3600) % 24:02d}:{(n // 60) % 60:02d}:{n % 60:02d}.000Z"


class Mix:
    """Deterministic events with valid records (so lexicon validation does real work)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    def record(self, did: str, collection: str, record: dict[str, Any], *, backfill: bool, rev: str,
               kind: Literal["create", "update"] = "create") -> RecordEvent:  # fmt: skip
        self.n += 1
        record = {"$type": collection, **record}
        return RecordEvent(
            type=kind, seq=SEQ_BACKFILL if backfill else self.n, time=_time(self.n), did=did, commit=COMMIT,
            rev=rev, collection=collection, rkey=_tid(self.n), cid=cid_for_cbor(encode_lex(record)).encode(),
            record=record,
        )  # fmt: skip

    def ref(self, uri: str) -> dict[str, str]:
        return {"uri": uri, "cid": COMMIT}


def backfill_events(n_dids: int, seed: int = 1) -> Iterator[StreamEvent]:
    mix = Mix(seed)
    rng = mix.rng
    posts: list[str] = []
    dids = [did_for(i) for i in range(n_dids)]
    created = "2025-12-01T00:00:00.000Z"
    for i, did in enumerate(dids):
        rev = _tid(10_000_000 + i)
        profile = mix.record(did, "app.bsky.actor.profile", {"displayName": f"user {i}", "description": "hi"},
                             backfill=True, rev=rev)  # fmt: skip
        yield RecordEvent(**{**_fields(profile), "rkey": "self"})
        for _ in range(rng.randint(7, 13)):
            record: dict[str, Any] = {"text": f"post {mix.n} " + "lorem ipsum " * rng.randint(1, 8), "createdAt": created,
                                      "langs": ["en"]}  # fmt: skip
            if posts and rng.random() < 0.3:
                parent = rng.choice(posts[-500:])
                record["reply"] = {"root": mix.ref(parent), "parent": mix.ref(parent)}
            e = mix.record(did, "app.bsky.feed.post", record, backfill=True, rev=rev)
            posts.append(e.uri)
            yield e
        for _ in range(rng.randint(15, 25)):
            if posts:
                subject = posts[min(len(posts) - 1, int(rng.paretovariate(1.2)) - 1)] if rng.random() < 0.3 \
                    else rng.choice(posts)  # fmt: skip
                yield mix.record(did, "app.bsky.feed.like", {"subject": mix.ref(subject), "createdAt": created},
                                 backfill=True, rev=rev)  # fmt: skip
        for _ in range(rng.randint(7, 13)):
            yield mix.record(did, "app.bsky.graph.follow", {"subject": rng.choice(dids), "createdAt": created},
                             backfill=True, rev=rev)  # fmt: skip
        for _ in range(rng.randint(1, 3)):
            if posts:
                yield mix.record(did, "app.bsky.feed.repost", {"subject": mix.ref(rng.choice(posts)),
                                                               "createdAt": created}, backfill=True, rev=rev)  # fmt: skip
        yield RepoEvent(time=_time(mix.n), did=did, commit=COMMIT, rev=rev)


def _fields(e: RecordEvent) -> dict[str, Any]:
    return {k: getattr(e, k) for k in ("type", "seq", "time", "did", "commit", "rev", "collection", "rkey", "cid",
                                       "record")}  # fmt: skip


def live_events(n_events: int, n_dids: int = 2000, seed: int = 2) -> Iterator[StreamEvent]:
    mix = Mix(seed)
    rng = mix.rng
    dids = [did_for(i) for i in range(n_dids)]
    posts: list[str] = []
    mine: list[RecordEvent] = []
    created = "2026-01-01T00:00:00.000Z"
    revs = 0
    for _ in range(n_events):
        revs += 1
        rev = _tid(20_000_000 + revs)
        did = rng.choice(dids)
        roll = rng.random()
        if roll < 0.08 and mine:
            old = mine.pop(rng.randrange(len(mine)))
            mix.n += 1
            yield DeleteEvent(seq=mix.n, time=_time(mix.n), did=old.did, commit=COMMIT, rev=rev,
                              collection=old.collection, rkey=old.rkey)  # fmt: skip
            continue
        if roll < 0.35 or not posts:
            record: dict[str, Any] = {"text": f"live {mix.n}", "createdAt": created}
            if posts and rng.random() < 0.4:
                parent = posts[-min(len(posts), rng.randint(1, 200))]
                record["reply"] = {"root": mix.ref(parent), "parent": mix.ref(parent)}
            e = mix.record(did, "app.bsky.feed.post", record, backfill=False, rev=rev)
            posts.append(e.uri)
        elif roll < 0.80:
            subject = posts[max(0, len(posts) - int(rng.paretovariate(0.8)))] if rng.random() < 0.6 \
                else rng.choice(posts)  # fmt: skip
            e = mix.record(did, "app.bsky.feed.like", {"subject": mix.ref(subject), "createdAt": created},
                           backfill=False, rev=rev)  # fmt: skip
        elif roll < 0.93:
            e = mix.record(did, "app.bsky.graph.follow", {"subject": rng.choice(dids), "createdAt": created},
                           backfill=False, rev=rev)  # fmt: skip
        else:
            e = mix.record(did, "app.bsky.feed.repost", {"subject": mix.ref(rng.choice(posts)), "createdAt": created},
                           backfill=False, rev=rev)  # fmt: skip
        mine.append(e)
        yield e


@contextlib.asynccontextmanager
async def _services() -> AsyncIterator[tuple[str, str]]:
    redis_url, database_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url
        return
    services = EmbeddedServices()
    await asyncio.get_running_loop().run_in_executor(None, services.start)
    try:
        yield redis_url or services.redis_url(), database_url or services.database_url()
    finally:
        services.stop()


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
        return cpu, hwm
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0, 0


async def _fresh_database(database_url: str) -> str:
    base = database_url.rsplit("/", 1)[0]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP DATABASE IF EXISTS psky_bench_indexer WITH (FORCE)")
        await conn.execute("CREATE DATABASE psky_bench_indexer")
    finally:
        await conn.close()
    url = f"{base}/psky_bench_indexer"
    await migrate(url)
    return url


async def _fill(redis: aioredis.Redis, stream: str, events: Iterator[StreamEvent]) -> int:
    await redis.delete(stream, f"{stream}_dlq")
    n = 0
    pipe = redis.pipeline(transaction=False)
    for e in events:
        pipe.xadd(stream, event_fields(e))  # type: ignore[arg-type]
        n += 1
        if n % 2000 == 0:
            await pipe.execute()
    await pipe.execute()
    return n


async def run_mix(name: str, events: Iterator[StreamEvent], stream: str, args: argparse.Namespace,
                  redis_url: str, database_url: str) -> None:  # fmt: skip
    db_url = await _fresh_database(database_url)
    redis = connect(redis_url)
    prefix = "bench_indexer:"
    full = prefix + stream
    group = prefix + "firehose_group"
    with contextlib.suppress(Exception):
        await redis.xgroup_destroy(full, group)
    n = await _fill(redis, full, events)
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": db_url, "INDEXER_CONSUMER": "bench-1",
           "INDEXER_STREAMS": full, "INDEXER_GROUP": group, "INDEXER_LABELS": "false",
           "INDEXER_NOTIFY_STREAMS": prefix + "firehose_live", "INDEXER_CONCURRENCY": str(args.concurrency),
           "INDEXER_BATCH_SIZE": str(args.batch_size), "ENABLE_DID_RESOLUTION": "false",
           "INDEXER_METRICS_PORT": "0", "INDEXER_MIGRATE": "false", "LOG_LEVEL": "warning"}  # fmt: skip
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "psky.cli", "indexer", env=env)
    peak = 0
    cpu = 0.0
    last_print = started
    try:
        while True:
            await asyncio.sleep(0.25)
            cpu, hwm = _proc(proc.pid)
            peak = max(peak, hwm)
            left = await redis.xlen(full)
            now = time.perf_counter()
            if now - last_print > 5:
                print(f"  {name}: {n - left:,}/{n:,} acknowledged, {(n - left) / (now - started):,.0f} events/s",
                      flush=True)  # fmt: skip
                last_print = now
            if left == 0:
                break
            if proc.returncode is not None:
                raise SystemExit(f"the indexer exited with {proc.returncode}")
        elapsed = time.perf_counter() - started
    finally:
        proc.terminate()
        await proc.wait()
    conn = await asyncpg.connect(db_url)
    try:
        rows = {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in TABLES}
    finally:
        await conn.close()
    dlq = await redis.xlen(full + "_dlq")
    await redis.delete(full, full + "_dlq")
    await redis.aclose()
    print(f"{name}: {n:,} events in {elapsed:.1f} s (incl. start-up) = {n / elapsed:,.0f} events/s; "
          f"indexer CPU {cpu:.1f} s ({cpu / n * 1e6:.0f} µs/event), peak RSS {peak / 2**20:.0f} MB, DLQ {dlq}")  # fmt: skip
    print("  rows: " + ", ".join(f"{t} {c:,}" for t, c in rows.items()))


async def bench(args: argparse.Namespace) -> None:
    async with _services() as (redis_url, database_url):
        print(f"concurrency {args.concurrency}, batch size {args.batch_size}")
        if args.mix in ("backfill", "both"):
            await run_mix(
                "backfill mix", backfill_events(args.dids), "firehose_backfill", args, redis_url, database_url
            )
        if args.mix in ("live", "both"):
            await run_mix(
                "live mix", live_events(args.live_events), "firehose_live", args, redis_url, database_url
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", choices=["backfill", "live", "both"], default="both")
    p.add_argument("--dids", type=int, default=2000)
    p.add_argument("--live-events", type=int, default=30_000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=500)
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
