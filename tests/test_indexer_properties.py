"""Property: however a stream is cut into batches, replayed or redelivered, the database
equals one-by-one in-order application; split across concurrent consumers, every
order-independent part of it (records, rows, counts) is equal too."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto.lexicon import Lexicons
from psky.indexer.actors import Actors
from psky.indexer.batch import apply_batch, prepare_items
from psky.streams.wire import StreamEvent
from tests.indexer_helpers import Events, cloned_database, follow, like, post, strong_ref, uri

LEXICONS = Lexicons.load()
DIDS = [f"did:plc:{c * 24}" for c in "abcd"]
POST = "app.bsky.feed.post"
TIME = "2026-01-01T00:00:00.000Z"

TABLES = [
    "record", "post", "like", "repost", "follow", "actor_block", "list", "list_item", "thread_gate", "post_gate",
    "profile", "quote", "post_embed_record", "post_embed_image", "feed_item", "duplicate_record",
    "post_agg", "profile_agg", "actor_sync",
]  # fmt: skip


def generate(rng: random.Random, n: int) -> list[StreamEvent]:
    """A plausible stream: creates, updates and deletes of every kind over a small universe,
    so that replies, duplicates, gates, quotes and re-creations collide often."""
    ev = Events()
    live: dict[str, dict[str, Any]] = {}  # uri -> record
    posts: list[str] = []
    out: list[StreamEvent] = []

    def roots(target: str) -> str:
        rec = live.get(target, {})
        reply = rec.get("reply")
        return reply["root"]["uri"] if reply else target

    while len(out) < n:
        did = rng.choice(DIDS)
        kind = rng.random()
        if kind < 0.30:
            rkey = f"3kp{rng.randrange(6)}"
            u = uri(did, POST, rkey)
            if u in live and rng.random() < 0.4:
                out.append(ev.delete(did, POST, rkey))
                live.pop(u)
                continue
            extra: dict[str, Any] = {}
            existing = [p for p in posts if p in live and p != u]
            if existing and rng.random() < 0.5:
                parent = rng.choice(existing)
                extra["reply"] = {"root": strong_ref(roots(parent)), "parent": strong_ref(parent)}
            if existing and rng.random() < 0.25:
                extra["embed"] = {"$type": "app.bsky.embed.record", "record": strong_ref(rng.choice(existing))}
            if rng.random() < 0.2:
                target = rng.choice(DIDS)
                extra["facets"] = [{"index": {"byteStart": 0, "byteEnd": 1},
                                    "features": [{"$type": "app.bsky.richtext.facet#mention", "did": target}]}]
            record = post(f"text {len(out)}", **extra)
            out.append(ev.create(did, POST, rkey, record, update=u in live))
            live[u] = record
            posts.append(u)
        elif kind < 0.55:
            coll = rng.choice(["app.bsky.feed.like", "app.bsky.feed.repost"])
            rkey = f"3kl{rng.randrange(4)}"
            u = uri(did, coll, rkey)
            if u in live and rng.random() < 0.5:
                out.append(ev.delete(did, coll, rkey))
                live.pop(u)
                continue
            subject = rng.choice(posts) if posts else uri(rng.choice(DIDS), POST, "3kp0")
            record = like(subject) if coll.endswith("like") else {"subject": strong_ref(subject), "createdAt": TIME}
            out.append(ev.create(did, coll, rkey, record, update=u in live))
            live[u] = record
        elif kind < 0.75:
            coll = rng.choice(["app.bsky.graph.follow", "app.bsky.graph.block"])
            rkey = f"3kf{rng.randrange(3)}"
            u = uri(did, coll, rkey)
            if u in live and rng.random() < 0.5:
                out.append(ev.delete(did, coll, rkey))
                live.pop(u)
                continue
            record = follow(rng.choice(DIDS))
            out.append(ev.create(did, coll, rkey, record, update=u in live))
            live[u] = record
        elif kind < 0.85:
            own = [p for p in posts if p in live and p.startswith(f"at://{did}/")]
            if not own:
                continue
            target = rng.choice(own)
            rkey = target.rsplit("/", 1)[1]
            coll = rng.choice(["app.bsky.feed.threadgate", "app.bsky.feed.postgate"])
            u = uri(did, coll, rkey)
            if u in live and rng.random() < 0.4:
                out.append(ev.delete(did, coll, rkey))
                live.pop(u)
                continue
            if coll.endswith("threadgate"):
                allow = rng.choice([[], [{"$type": "app.bsky.feed.threadgate#followerRule"}],
                                    [{"$type": "app.bsky.feed.threadgate#mentionRule"}], None])
                record = {"post": target, "createdAt": TIME}
                if allow is not None:
                    record["allow"] = allow
            else:
                record = {"post": target, "createdAt": TIME,
                          "embeddingRules": [{"$type": "app.bsky.feed.postgate#disableRule"}]}
            out.append(ev.create(did, coll, rkey, record, update=u in live))
            live[u] = record
        elif kind < 0.93:
            u = uri(did, "app.bsky.actor.profile", "self")
            record = {"displayName": f"name {len(out)}"}
            out.append(ev.create(did, "app.bsky.actor.profile", "self", record, update=u in live))
            live[u] = record
        else:
            rkey = "3klist"
            list_uri = uri(did, "app.bsky.graph.list", rkey)
            if list_uri not in live:
                record = {"name": "l", "purpose": "app.bsky.graph.defs#curatelist", "createdAt": TIME}
                out.append(ev.create(did, "app.bsky.graph.list", rkey, record))
                live[list_uri] = record
            else:
                ik = f"3ki{rng.randrange(3)}"
                record = {"subject": rng.choice(DIDS), "list": list_uri, "createdAt": TIME}
                u = uri(did, "app.bsky.graph.listitem", ik)
                out.append(ev.create(did, "app.bsky.graph.listitem", ik, record, update=u in live))
                live[u] = record
    return out


async def _apply(conn: asyncpg.Connection, events: Sequence[StreamEvent]) -> None:
    for attempt in range(20):
        try:
            items = prepare_items([(e, True) for e in events], LEXICONS)
            await apply_batch(conn, items, lexicons=LEXICONS, actors=Actors(None))
            return
        except (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError):
            await asyncio.sleep(0.005 * attempt)
    raise AssertionError("batch kept deadlocking")


async def _reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in [*TABLES, "notification", "actor"]))


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in TABLES:
        rows = [tuple(r.values()) for r in await conn.fetch(f'SELECT * FROM "{table}"')]
        if table in ("post_agg", "profile_agg"):
            rows = [r for r in rows if any(v for v in r[1:])]
        out[table] = sorted(rows, key=repr)
    out["notification"] = sorted(
        (tuple(r.values()) for r in await conn.fetch(
            'SELECT did, "recordUri", "recordCid", author, reason, "reasonSubject", "sortAt" FROM notification')),
        key=repr,
    )
    return out


def order_free(snap: dict[str, list[tuple[Any, ...]]], conn_rows: dict[str, Any]) -> dict[str, Any]:
    """What concurrent consumers must agree on whatever the interleaving."""
    return conn_rows


async def projection(conn: asyncpg.Connection) -> dict[str, Any]:
    q = {
        "record": "SELECT uri, cid, json, rev FROM record",
        "posts": "SELECT uri, cid, text, \"replyParent\" FROM post",
        "like": 'SELECT creator, subject FROM "like"',
        "repost": "SELECT creator, subject FROM repost",
        "follow": 'SELECT creator, "subjectDid" FROM follow',
        "block": 'SELECT creator, "subjectDid" FROM actor_block',
        "list_item": 'SELECT "listUri", "subjectDid" FROM list_item',
        "profile": 'SELECT uri, "displayName" FROM profile',
        "thread_gate": 'SELECT "postUri" FROM thread_gate',
        "post_gate": 'SELECT "postUri" FROM post_gate',
        "likes": 'SELECT uri, "likeCount", "repostCount" FROM post_agg WHERE "likeCount" > 0 OR "repostCount" > 0',
        "profiles": 'SELECT did, "followersCount", "followsCount", "postsCount" FROM profile_agg'
                    ' WHERE "followersCount" + "followsCount" + "postsCount" > 0',
    }
    return {k: sorted((tuple(r.values()) for r in await conn.fetch(sql)), key=repr) for k, sql in q.items()}


@pytest.fixture
async def dbs(database_url: str) -> AsyncIterator[list[asyncpg.Connection]]:
    gen = cloned_database(database_url)
    url = await gen.__anext__()
    conns = [await asyncpg.connect(url) for _ in range(3)]
    try:
        yield conns
    finally:
        for c in conns:
            await c.close()
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()


def _cuts(rng: random.Random, n: int) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < n:
        size = rng.choice([1, 2, 3, 5, 8, 13, 40, 200])
        out.append((i, min(n, i + size)))
        i += size
    return out


_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_SETTINGS
@given(seed=st.integers(0, 2**31), length=st.integers(20, 160))
async def test_any_batching_and_replay_equals_one_by_one(dbs: list[asyncpg.Connection], seed: int, length: int) -> None:
    conn = dbs[0]
    rng = random.Random(seed)
    events = generate(rng, length)
    await _reset(conn)
    for e in events:
        await _apply(conn, [e])
    expected = await snapshot(conn)

    await _reset(conn)
    cuts = _cuts(rng, len(events))
    for lo, hi in cuts:
        await _apply(conn, events[lo:hi])
    assert await snapshot(conn) == expected, f"batches {cuts}"

    # redeliveries: batches handled again later (after newer ones), whole or in part
    await _reset(conn)
    done: list[tuple[int, int]] = []
    for lo, hi in cuts:
        await _apply(conn, events[lo:hi])
        done.append((lo, hi))
        if rng.random() < 0.4:
            a, b = rng.choice(done)
            start = rng.randrange(a, b)
            await _apply(conn, events[start:b])
    await _apply(conn, events)  # a full replay at the end changes nothing either
    assert await snapshot(conn) == expected


@_SETTINGS
@given(seed=st.integers(0, 2**31), length=st.integers(40, 200))
async def test_concurrent_consumers_agree_on_order_free_state(dbs: list[asyncpg.Connection], seed: int,
                                                              length: int) -> None:
    rng = random.Random(seed)
    events = generate(rng, length)
    await _reset(dbs[0])
    for e in events:
        await _apply(dbs[0], [e])
    expected = await projection(dbs[0])

    await _reset(dbs[0])
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    cuts = _cuts(rng, len(events))
    for cut in cuts:
        queue.put_nowait(cut)
    redeliver = {c for c in cuts if rng.random() < 0.2}

    async def consumer(conn: asyncpg.Connection) -> None:
        while not queue.empty():
            lo, hi = queue.get_nowait()
            await _apply(conn, events[lo:hi])
            if (lo, hi) in redeliver:  # "crashed before the ack": delivered once more, later
                redeliver.discard((lo, hi))
                queue.put_nowait((lo, hi))
            await asyncio.sleep(0)

    await asyncio.gather(*(consumer(c) for c in dbs))
    assert await projection(dbs[0]) == expected
