"""The whole pipeline against the devnet manifest: devnet → ingester (relay firehose, labeler)
and backfiller (getRepo of every account) → Redis → :class:`~psky.indexer.service.Indexer` →
PostgreSQL, then every table checked against the ground truth, and a replay of the same
events shown to change nothing.

The indexer runs three concurrent workers over both streams at once, so batches of the live
and the backfill stream race each other as in production (this run found the duplicate that
pointed at a record holding nothing, and the older reactivation that cleared a deletion
marker). Regressions found by this run are at the end."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from psky.atproto.lexicon import Lexicons
from psky.backfiller import Backfiller, BackfillerConfig
from psky.devnet.manifest import Manifest
from psky.devnet.network import Devnet
from psky.devnet.workload import Workload, _Batch, labeler_service_record
from psky.identity import IdentityResolver
from psky.indexer.actors import Actors
from psky.indexer.batch import apply_batch, prepare_items
from psky.indexer.config import IndexerConfig
from psky.indexer.plugins import PLUGINS
from psky.indexer.plugins.post import embedded_record
from psky.indexer.service import Indexer
from psky.ingester import IngesterConfig, run_ingester
from psky.streams import AccountEvent, BackfillRequest, StreamEvent, backfill_fields, cursor_key
from tests.indexer_helpers import Events, cloned_database, like, post
from tests.indexer_helpers import uri as at_uri

pytest_plugins = ("tests.devnet_fixtures",)

SEED = 23
ACCOUNTS = 40
RECORDS = 20
LIVE_EVENTS = 300
LABELS = 12

Entries = list[tuple[bytes, dict[bytes, bytes]]]

#: collection → its table (the workload must have written each at least once)
TABLES = {
    "app.bsky.feed.post": "post",
    "app.bsky.feed.like": "like",
    "app.bsky.feed.repost": "repost",
    "app.bsky.graph.follow": "follow",
    "app.bsky.graph.block": "actor_block",
    "app.bsky.graph.list": "list",
    "app.bsky.graph.listitem": "list_item",
    "app.bsky.graph.listblock": "list_block",
    "app.bsky.feed.generator": "feed_generator",
    "app.bsky.graph.starterpack": "starter_pack",
    "app.bsky.feed.threadgate": "thread_gate",
    "app.bsky.feed.postgate": "post_gate",
    "app.bsky.actor.profile": "profile",
    "app.bsky.labeler.service": "labeler",
    "app.bsky.graph.verification": "verification",
}
#: record-only collections the workload writes too
RECORD_ONLY = ("app.bsky.actor.status", "chat.bsky.actor.declaration", "app.bsky.notification.declaration")

#: write kinds that produce a collection the seeded history may lack at this size
TOP_UP = {
    "app.bsky.graph.listblock": "listblock",
    "app.bsky.graph.starterpack": "starterpack",
    "app.bsky.graph.verification": "verification",
    "app.bsky.feed.postgate": "postgate",
    "app.bsky.feed.threadgate": "threadgate",
    "app.bsky.feed.generator": "feedgen",
    "app.bsky.graph.block": "block",
    "app.bsky.graph.listitem": "listitem",
    "app.bsky.actor.status": "status",
    "app.bsky.labeler.service": "labeler",
}


def _collection(uri: str) -> str:
    return uri.split("/")[3]


async def _top_up(workload: Workload) -> None:
    """Write one record of each collection the seeded history lacks (planner internals: the
    workload only draws these rare kinds by chance)."""
    planner = workload.planner
    for collection, kind in TOP_UP.items():
        for _ in range(60):
            if any(True for _ in workload.manifest.iter_records(collection)):
                break
            actor = planner._active_writer()
            assert actor is not None
            if kind == "verification":
                actor.verifier = True
            b = _Batch(actor)
            planner._tick()
            if kind == "labeler":
                planner._singleton(b, collection, labeler_service_record(planner.rng, planner._now()))
            elif not planner._write(b, kind) and kind == "listblock":
                planner._write(b, "list")  # someone needs a moderation list to block
            if b.writes:
                await workload.apply(planner._finish(b))
        assert any(True for _ in workload.manifest.iter_records(collection)), f"no {collection} written"


@dataclass
class Pipeline:
    net: Devnet
    workload: Workload
    prefix: str
    live: str
    backfill: str
    labels: str
    #: every stream entry the indexer will read, captured before it runs (for the replay)
    captured: dict[str, Entries] = field(default_factory=dict)

    @property
    def manifest(self) -> Manifest:
        return self.workload.manifest


async def _wait_for(check: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def pipeline(redis_url: str) -> AsyncIterator[Pipeline]:
    """A seeded devnet whose whole history sits in Redis: the relay firehose and the labeler
    through the ingester, every live repository through the backfiller."""
    import secrets

    prefix = f"psky-test:{secrets.token_hex(6)}:"
    redis = aioredis.from_url(redis_url)
    started = time.perf_counter()
    async with Devnet(n_pds=2, seed=SEED) as net:
        workload = net.workload()
        await workload.seed(accounts=ACCOUNTS, records_per_account=RECORDS, labels=LABELS)
        await _top_up(workload)
        for status in ("deactivated", "takendown", "suspended", "deleted", "deleted"):
            await workload.set_status(status)
        await workload.change_handle()
        await workload.change_handle()
        await workload.live(rate=None, events=LIVE_EVENTS)
        await net.settle()
        seeded_at = time.perf_counter()
        assert net.relay is not None and net.labeler is not None
        p = Pipeline(net, workload, prefix, prefix + "firehose_live", prefix + "firehose_backfill",
                     prefix + "label_live")  # fmt: skip
        try:
            # 1. the relay firehose from seq 0, then the labeler, through the ingester
            for mode, host, stream, target in (
                ("firehose", net.relay.url, p.live, net.relay.seq),
                ("labeler", net.labeler.url, p.labels, net.labeler.seq),
            ):
                config = IngesterConfig.from_env({
                    "REDIS_URL": redis_url, "INGESTER_MODE": mode, "INGESTER_RELAY_HOSTS": net.relay.url,
                    "INGESTER_LABELER_HOSTS": net.labeler.url, "INGESTER_FIREHOSE_STREAM": p.live,
                    "INGESTER_REPO_STREAM": prefix + "repo_backfill", "INGESTER_LABEL_STREAM": p.labels,
                    "PLC_URL": net.plc.url, "INGESTER_METRICS_PORT": "-1", "INGESTER_FIREHOSE_START_CURSOR": "0",
                    "INGESTER_BATCH_TIMEOUT_MS": "20", "INGESTER_VERIFY": "strict",
                })  # fmt: skip
                await _ingest(redis, config, cursor_key(stream, host), target)
            # 2. every account that still exists, through the backfiller
            bf = BackfillerConfig(
                redis_url=redis_url, consumer="backfiller-1", group=prefix + "repo_backfill_group",
                backfill_stream=prefix + "repo_backfill", firehose_stream=p.backfill,
                dlq_stream=prefix + "repo_backfill_dlq", concurrency=8, batch_size=50, http_timeout_s=5.0,
                max_retries=3, retry_initial_backoff_ms=20, retry_max_backoff_ms=200, plc_url=net.plc.url,
                allow_hosts=("127.0.0.1",), claim_idle_ms=1000, claim_interval_ms=50, max_host_wait_s=0.5,
            )  # fmt: skip
            for did, acct in p.manifest.accounts.items():
                if acct.status != "deleted":
                    request = BackfillRequest(did=did, host=acct.pds, rev="")
                    await redis.xadd(bf.backfill_stream, backfill_fields(request))  # type: ignore[arg-type]
            backfiller = Backfiller(bf, redis)
            bstop = asyncio.Event()
            btask = asyncio.create_task(backfiller.run(bstop))
            try:

                async def backfill_done() -> bool:
                    return bool(
                        await redis.xlen(bf.backfill_stream) == 0 and backfiller.consumer.in_flight == 0
                    )

                await _wait_for(backfill_done, 60, "the backfiller")
            finally:
                bstop.set()
                await asyncio.wait_for(btask, 10)
                await backfiller.close()
            assert await redis.xlen(bf.dlq_stream) == 0
            for stream in (p.live, p.backfill, p.labels):
                p.captured[stream] = cast(Entries, await redis.xrange(stream))
            print(f"\nseeded in {seeded_at - started:.1f}s, streams filled in {time.perf_counter() - seeded_at:.1f}s: "
                  + ", ".join(f"{s.rsplit(':', 1)[1]}={len(e)}" for s, e in p.captured.items())
                  + f"; manifest {p.manifest.counts()}")  # fmt: skip
            yield p
        finally:
            keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
            keys += [f"did_doc:{did}" for did in p.manifest.accounts]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()


async def _ingest(redis: aioredis.Redis, config: IngesterConfig, key: str, target: int) -> None:
    """Run the ingester until its cursor *key* reaches *target*."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingester(config, stop=stop, registry=CollectorRegistry()))

    async def done() -> bool:
        value = await redis.get(key)
        return value is not None and int(value) >= target

    try:
        await _wait_for(done, 60, f"{key} to reach {target}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _indexer_config(redis_url: str, database_url: str, p: Pipeline) -> IndexerConfig:
    return IndexerConfig(
        redis_url=redis_url, database_url=database_url, consumer="indexer-1", streams=(p.live, p.backfill),
        group=p.prefix + "firehose_group", label_stream=p.labels, label_group=p.prefix + "label_group",
        concurrency=3, batch_size=100, notify_streams=(p.live,), plc_url=p.net.plc.url,
        handle_map=p.net.handle_resolver_map(), claim_idle_ms=5_000, metrics_port=0,
    )  # fmt: skip


async def _index_until_drained(config: IndexerConfig, redis: aioredis.Redis, pool: asyncpg.Pool) -> Indexer:
    """Run an Indexer (DID resolution on) until every stream is acknowledged and deleted."""
    resolver = IdentityResolver(config.plc_url, handle_map=config.handle_map)
    indexer = Indexer(config, redis, pool, resolver=resolver)
    stop = asyncio.Event()
    task = asyncio.create_task(indexer.run(stop))
    streams = [*config.streams, config.label_stream]

    async def drained() -> bool:
        if task.done():
            return True
        for stream in streams:
            assert stream is not None
            if await redis.xlen(stream):
                return False
        return indexer.consumer.in_flight == 0

    try:
        await _wait_for(drained, 120, "the indexer to drain its streams")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await resolver.close()
    for stream in config.streams:
        assert await redis.xlen(f"{stream}_dlq") == 0
    return indexer


def _metric(indexer: Indexer, name: str) -> float:
    total = 0.0
    for metric in indexer.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total


async def _snapshot(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every table, as sorted JSON (serial ids left out)."""
    tables = [r["tablename"] for r in await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")]  # fmt: skip
    out: dict[str, list[str]] = {}
    for table in tables:
        if table.startswith("psky_") or table == "schema_migrations":
            continue
        rows = await conn.fetch(f"SELECT (to_jsonb(t) - 'id')::text AS j FROM \"{table}\" t")
        out[table] = sorted(r["j"] for r in rows)
    return out


def _expected_aggregates(
    m: Manifest, violating: set[str]
) -> tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]]:
    """post_agg (likes, replies, reposts) and profile_agg (followers, follows, posts) from the
    manifest; duplicates (same creator and subject) count once, gated replies not at all.
    A deleted account's counters are dropped with it, whoever liked or followed it."""
    likes: dict[str, set[str]] = defaultdict(set)
    reposts: dict[str, set[str]] = defaultdict(set)
    replies: Counter[str] = Counter()
    followers: dict[str, set[str]] = defaultdict(set)
    follows: dict[str, set[str]] = defaultdict(set)
    posts: Counter[str] = Counter()
    for uri, rec in m.iter_records():
        creator, value = uri.split("/")[2], rec["value"]
        kind = _collection(uri)
        if kind == "app.bsky.feed.like":
            likes[value["subject"]["uri"]].add(creator)
        elif kind == "app.bsky.feed.repost":
            reposts[value["subject"]["uri"]].add(creator)
        elif kind == "app.bsky.graph.follow":
            followers[value["subject"]].add(creator)
            follows[creator].add(value["subject"])
        elif kind == "app.bsky.feed.post":
            posts[creator] += 1
            reply = value.get("reply")
            if reply and uri not in violating:
                replies[reply["parent"]["uri"]] += 1
    gone = {did for did, a in m.accounts.items() if a.status == "deleted"}
    for subject in [u for u in {*likes, *replies, *reposts} if u.split("/")[2] in gone]:
        likes.pop(subject, None)
        replies.pop(subject, None)
        reposts.pop(subject, None)
    for did in gone:
        followers.pop(did, None)
    post_agg = {
        u: (len(likes.get(u, ())), replies[u], len(reposts.get(u, ()))) for u in {*likes, *replies, *reposts}
    }
    dids = {*followers, *follows, *posts}
    profile_agg = {d: (len(followers.get(d, ())), len(follows.get(d, ())), posts[d]) for d in dids}
    return post_agg, profile_agg


@dataclass
class Indexed:
    """The pipeline's events indexed into a fresh database: live stream, then backfill."""

    p: Pipeline
    pool: asyncpg.Pool
    redis: aioredis.Redis
    config: IndexerConfig
    events: int
    seconds: float
    split_batches: float

    @property
    def m(self) -> Manifest:
        return self.p.manifest

    def live_records(self) -> dict[str, dict[str, Any]]:
        return {u: r for u, r in self.m.records().items() if _collection(u) in PLUGINS}

    def deleted_accounts(self) -> set[str]:
        return {did for did, a in self.m.accounts.items() if a.status == "deleted"}


@pytest.fixture(scope="module")
async def indexed(pipeline: Pipeline, redis_url: str, database_url: str) -> AsyncIterator[Indexed]:
    """One indexer run (three workers) over the whole history: the firehose
    first, then the backfilled repositories, as a catching-up deployment sees them."""
    p = pipeline
    redis = aioredis.from_url(redis_url)
    async for url in cloned_database(database_url):
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        assert pool is not None
        try:
            config = _indexer_config(redis_url, url, p)
            await redis.delete(p.backfill)  # phase 1: the firehose and the labels only
            started = time.perf_counter()
            first = await _index_until_drained(config, redis, pool)
            await _restore(redis, p, [p.backfill])  # phase 2: the backfill
            second = await _index_until_drained(replace(config, consumer="indexer-1b"), redis, pool)
            seconds = time.perf_counter() - started
            events = sum(len(p.captured[s]) for s in config.streams)
            assert first.indexed + second.indexed == events
            for ix in (first, second):
                assert _metric(ix, "stream_indexer_messages_failed_total") == 0
            splits = sum(_retries(ix, "split") for ix in (first, second))
            print(
                f"\nindexed {events} events + {len(p.captured[p.labels])} label entries in {seconds:.1f}s"
                f" ({splits:.0f} batches split)"
            )
            yield Indexed(p, pool, redis, config, events, seconds, splits)
        finally:
            await pool.close()
            await redis.aclose()


async def _restore(redis: aioredis.Redis, p: Pipeline, streams: list[str]) -> None:
    """Add the captured entries of *streams* again (new ids, same fields, same order)."""
    for stream in streams:
        for _, fields in p.captured[stream]:
            await redis.xadd(stream, fields)  # type: ignore[arg-type]


def _retries(indexer: Indexer, reason: str) -> float:
    value = indexer.metrics.registry.get_sample_value("psky_indexer_batch_retries_total", {"reason": reason})
    return value or 0.0


async def test_record_table_holds_every_live_record_and_tombstones(indexed: Indexed) -> None:
    live = indexed.live_records()
    deleted_accounts = indexed.deleted_accounts()
    rows = {r["uri"]: r for r in await indexed.pool.fetch("SELECT uri, cid, did, json FROM record")}
    got_live = {u: r for u, r in rows.items() if r["json"] != ""}
    assert sorted(set(got_live) - set(live)) == []
    assert sorted(set(live) - set(got_live)) == []
    for uri, rec in live.items():
        assert got_live[uri]["cid"] == rec["cid"], uri
        assert orjson.loads(got_live[uri]["json"]) == rec["value"], uri
    tombstones = {u for u, r in rows.items() if r["json"] == ""}
    expected = {
        u
        for u in indexed.m.deleted()
        if _collection(u) in PLUGINS and u.split("/")[2] not in deleted_accounts
    }
    assert tombstones == expected
    assert all(rows[u]["cid"] == "" for u in tombstones)
    assert not {r["did"] for r in rows.values()} & deleted_accounts
    # record-only collections are there too
    for collection in RECORD_ONLY:
        assert any(_collection(u) == collection for u in got_live), collection


async def test_each_collection_table_holds_exactly_its_live_records(indexed: Indexed) -> None:
    live = indexed.live_records()
    dups = {
        r["uri"]: r["duplicateOf"]
        for r in await indexed.pool.fetch('SELECT uri, "duplicateOf" FROM duplicate_record')
    }
    for collection, table in TABLES.items():
        plugin = PLUGINS[collection]
        want = {u: r["cid"] for u, r in live.items() if _collection(u) == collection}
        if plugin.self_only:
            want = {u: c for u, c in want.items() if u.endswith("/self")}
        assert want, f"the workload wrote no {collection}"
        table_rows = await indexed.pool.fetch(f'SELECT * FROM "{table}"')
        got = {r["uri"]: r["cid"] for r in table_rows}
        assert len(got) == len(table_rows), f"{table}: duplicate rows"
        assert sorted(set(got) - set(want)) == [], table
        assert {u: want[u] for u in got} == got, table
        assert all(r["creator"] == r["uri"].split("/")[2] for r in table_rows), table
        # a live record missing from its table is a duplicate (same unique key as a row)
        missing = set(want) - set(got)
        if plugin.unique:
            keys = {r["uri"]: tuple(str(r[c]) for c in plugin.unique) for r in table_rows}
            assert len(set(keys.values())) == len(keys), f"{table}: two rows with one {plugin.unique}"
            held = set(keys.values())
            for uri in missing:
                assert uri in dups, (table, uri)
                assert plugin.dup_key(uri.split("/")[2], live[uri]["value"]) in held, (table, uri)
        else:
            assert missing == set(), table


async def test_duplicates_point_at_live_holders(indexed: Indexed) -> None:
    live = indexed.live_records()
    dups = {
        r["uri"]: r["duplicateOf"]
        for r in await indexed.pool.fetch('SELECT uri, "duplicateOf" FROM duplicate_record')
    }
    assert dups, "the workload made no duplicates"
    assert sorted(set(dups) - set(live)) == []
    for collection, table in TABLES.items():
        got = {r["uri"] for r in await indexed.pool.fetch(f'SELECT uri FROM "{table}"')}
        mine = {u: h for u, h in dups.items() if _collection(u) == collection}
        assert sorted(set(got) & set(mine)) == [], table
        assert sorted(h for h in mine.values() if h not in got) == [], table


async def test_aggregates_match_the_manifest(indexed: Indexed) -> None:
    m = indexed.m
    pool = indexed.pool
    live = indexed.live_records()
    violating = {r["uri"] for r in await pool.fetch('SELECT uri FROM post WHERE "violatesThreadGate"')}
    assert all(live[u]["value"].get("reply") for u in violating)
    exp_posts, exp_profiles = _expected_aggregates(m, violating)
    got_posts = {r["uri"]: (r["likeCount"], r["replyCount"], r["repostCount"])
                 for r in await pool.fetch("SELECT * FROM post_agg")}  # fmt: skip
    got_profiles = {r["did"]: (r["followersCount"], r["followsCount"], r["postsCount"])
                    for r in await pool.fetch("SELECT * FROM profile_agg")}  # fmt: skip
    zero = (0, 0, 0)
    post_diff = {u: (exp_posts.get(u, zero), got_posts.get(u, zero)) for u in {*exp_posts, *got_posts}
                 if exp_posts.get(u, zero) != got_posts.get(u, zero)}  # fmt: skip
    assert post_diff == {}
    profile_diff = {d: (exp_profiles.get(d, zero), got_profiles.get(d, zero)) for d in {*exp_profiles, *got_profiles}
                    if exp_profiles.get(d, zero) != got_profiles.get(d, zero)}  # fmt: skip
    assert profile_diff == {}
    # quote counts: live posts embedding (subject, cid) of a live post
    quotes: Counter[str] = Counter()
    for uri, rec in live.items():
        if _collection(uri) == "app.bsky.feed.post":
            emb = embedded_record(rec["value"])
            if (
                emb
                and _collection(emb[0]) == "app.bsky.feed.post"
                and live.get(emb[0], {}).get("cid") == emb[1]
            ):
                quotes[emb[0]] += 1
    got_quotes = {
        r["uri"]: r["quoteCount"] for r in await pool.fetch('SELECT * FROM post_agg WHERE "quoteCount" > 0')
    }
    assert {u: n for u, n in got_quotes.items() if u in live} == dict(quotes)


async def test_actors_statuses_and_verified_handles(indexed: Indexed) -> None:
    actors = {
        r["did"]: r for r in await indexed.pool.fetch('SELECT did, handle, "upstreamStatus" FROM actor')
    }
    for did in indexed.deleted_accounts():  # a marker row stays, without a handle
        assert did not in actors or (
            actors[did]["upstreamStatus"] == "deleted" and actors[did]["handle"] is None
        )
    inactive = 0
    for did, acct in indexed.m.accounts.items():
        if acct.status == "deleted":
            continue
        assert did in actors, did
        row = actors[did]
        assert row["upstreamStatus"] == (None if acct.status == "active" else acct.status), did
        if acct.status == "active":
            assert row["handle"] == acct.handle, did
        else:  # the PDS stops vouching for inactive accounts: the handle stays or goes
            inactive += 1
            assert row["handle"] in (acct.handle, None), did
    assert inactive >= 3
    # the DID documents were cached in Redis for the other indexers
    cached = await indexed.redis.exists(*[f"did_doc:{did}" for did in actors])
    assert cached >= len(actors) - inactive


async def test_labels_match_the_labeler(indexed: Indexed) -> None:
    expected: dict[tuple[str, str, str, str], bool] = {}
    for label in indexed.m.labels:
        key = (label["src"], label["uri"], label.get("cid") or "", label["val"])
        expected[key] = label["neg"]
        if label["neg"]:  # a negation negates the value under every CID
            for other in expected:
                if other[:2] == key[:2] and other[3] == key[3]:
                    expected[other] = True
    got = {
        (r["src"], r["uri"], r["cid"], r["val"]): r["neg"]
        for r in await indexed.pool.fetch("SELECT * FROM label")
    }
    assert len(expected) >= 5
    assert got == expected


async def test_no_duplicate_notifications(indexed: Indexed) -> None:
    assert await indexed.pool.fetchval("SELECT count(*) FROM notification") > 0
    dup = await indexed.pool.fetchval(
        'SELECT count(*) FROM (SELECT did, "recordUri", reason, "reasonSubject" FROM notification'
        " GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d"
    )
    assert dup == 0


async def test_replaying_every_event_changes_nothing(indexed: Indexed) -> None:
    """The same entries again (a consumer group reset, a re-run backfill): no row changes."""
    async with indexed.pool.acquire() as conn:
        before = await _snapshot(conn)
        orphans = {
            r["j"]
            for r in await conn.fetch(
                "SELECT (to_jsonb(f) - 'id')::text AS j FROM feed_item f WHERE f.type = 'repost'"
                ' AND NOT EXISTS (SELECT 1 FROM post p WHERE p.uri = f."postUri")'
            )
        }
    p = indexed.p
    started = time.perf_counter()
    replayed = 0
    for phase, streams in enumerate(([p.live, p.labels], [p.backfill])):  # in the first run's order
        await _restore(indexed.redis, p, streams)
        config = replace(indexed.config, consumer=f"indexer-replay-{phase}")
        replayed += (await _index_until_drained(config, indexed.redis, indexed.pool)).indexed
    print(
        f"\nreplayed {replayed} events in {time.perf_counter() - started:.1f}s (first run {indexed.seconds:.1f}s)"
    )
    assert replayed == indexed.events
    async with indexed.pool.acquire() as conn:
        after = await _snapshot(conn)
    # known order effect, TypeScript-compatible: a repost's feed item is written again whenever
    # the repost is (re)indexed, also after its subject's author was deleted (which removed it)
    for snap in (before, after):
        snap["feed_item"] = [r for r in snap["feed_item"] if r not in orphans]
    changed = {
        t: (
            sorted(set(before[t]) - set(after.get(t, [])))[:3],
            sorted(set(after.get(t, [])) - set(before[t]))[:3],
        )
        for t in before
        if before[t] != after.get(t)
    }
    assert changed == {}
    assert sum(len(v) for v in before.values()) > 1000


# --- regressions found by the end-to-end run ---------------------------------------------------


_A, _B = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
_POST, _LIKE = "app.bsky.feed.post", "app.bsky.feed.like"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    async for url in cloned_database(database_url):
        conn = await asyncpg.connect(url)
        try:
            yield conn
        finally:
            await conn.close()


async def _apply(conn: asyncpg.Connection, events: list[StreamEvent], notify: bool = True) -> None:
    lexicons = Lexicons.load()
    items = prepare_items([(e, notify) for e in events], lexicons)
    await apply_batch(conn, items, lexicons=lexicons, actors=Actors(None))


async def test_promoted_duplicate_chain(db: asyncpg.Connection) -> None:
    ev = Events()
    p = at_uri(_A, _POST, "3kpost1")
    await _apply(db, [ev.create(_A, _POST, "3kpost1", post())])
    l1, l2, l3 = (ev.create(_B, _LIKE, f"3klike{i}", like(p)) for i in (1, 2, 3))
    await _apply(db, [l1, l2, l3])
    await _apply(db, [ev.delete(_B, _LIKE, "3klike1")])
    assert await db.fetchval('SELECT uri FROM "like"') == l2.uri
    assert await db.fetchval("SELECT count(*) FROM duplicate_record WHERE uri = $1", l2.uri) == 0
    await _apply(db, [ev.delete(_B, _LIKE, "3klike2")])
    assert await db.fetchval('SELECT uri FROM "like"') == l3.uri
    assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', p) == 1


async def test_backfill_create_over_an_older_version_replaces_the_row(db: asyncpg.Connection) -> None:
    """The backfill batch commits before the live batch holding the newer update (concurrent
    workers, two streams): the row must follow the record, not the first version."""
    ev = Events()
    await _apply(db, [ev.create(_A, _POST, "3kpost1", post("v1"))])
    update = ev.create(_A, _POST, "3kpost1", post("v2"), update=True)
    backfilled = ev.create(_A, _POST, "3kpost1", post("v2"), backfill=True)
    await _apply(db, [backfilled], notify=False)
    await _apply(db, [update])
    assert await db.fetchval("SELECT cid FROM record WHERE uri = $1", update.uri) == update.cid
    assert await db.fetchval("SELECT text FROM post WHERE uri = $1", update.uri) == "v2"


async def test_deleted_account_is_not_resurrected_by_an_older_batch(db: asyncpg.Connection) -> None:
    """A batch of the account's older commits committing after its deletion (concurrent workers)."""
    ev = Events()
    create = ev.create(_B, _POST, "3kpost1", post())
    deleted = AccountEvent(
        seq=ev.seq + 1, time="2026-01-02T00:00:00.000Z", did=_B, active=False, status="deleted"
    )
    await _apply(db, [deleted])
    await _apply(db, [create])
    assert await db.fetchval("SELECT count(*) FROM post WHERE creator = $1", _B) == 0
    assert await db.fetchval("SELECT count(*) FROM record WHERE did = $1 AND json <> ''", _B) == 0
