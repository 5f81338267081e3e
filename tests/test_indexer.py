"""The indexer's semantics, through real PostgreSQL: each record type's rows, updates,
deletes, duplicates, aggregates and notifications, the rev guard, accounts and labels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from psky.atproto.lexicon import Lexicons
from psky.indexer.actors import Actors
from psky.indexer.batch import BatchResult, apply_batch, prepare_items
from psky.streams.wire import AccountEvent, StreamEvent
from tests.indexer_helpers import Events, cloned_database, follow, like, post, strong_ref, uri

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
REPOST = "app.bsky.feed.repost"
FOLLOW = "app.bsky.graph.follow"
A, B, C = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", "did:plc:cccccccccccccccccccccccc"

LEXICONS = Lexicons.load()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    gen = cloned_database(database_url)
    url = await gen.__anext__()
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()


async def index(conn: asyncpg.Connection, events: Sequence[StreamEvent], *, notify: bool = True,
                batch: int | None = None) -> BatchResult:
    result = BatchResult()
    size = batch or len(events) or 1
    for i in range(0, len(events), size):
        chunk = events[i : i + size]
        items = prepare_items([(e, notify) for e in chunk], LEXICONS)
        r = await apply_batch(conn, items, lexicons=LEXICONS, actors=Actors(None))
        for k, v in r.indexed.items():
            result.indexed[k] += v
        for k2, v2 in r.skipped.items():
            result.skipped[k2] += v2
        result.stale += r.stale
    return result


async def agg(conn: asyncpg.Connection, subject: str) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM post_agg WHERE uri = $1", subject)
    return dict(row) if row else {}


async def profile_agg(conn: asyncpg.Connection, did: str) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM profile_agg WHERE did = $1", did)
    return dict(row) if row else {}


async def test_posts_likes_reposts_follows_rows_and_counts(db: asyncpg.Connection) -> None:
    ev = Events()
    p = uri(A, POST, "3kpost1")
    events = [
        ev.create(A, POST, "3kpost1", post("first", langs=["en"], tags=["t1"])),
        ev.create(B, LIKE, "3klike1", like(p)),
        ev.create(C, LIKE, "3klike2", like(p)),
        ev.create(B, REPOST, "3krep1", {"subject": strong_ref(p), "createdAt": "2026-01-01T00:00:00.000Z"}),
        ev.create(B, FOLLOW, "3kfol1", follow(A)),
        ev.create(C, FOLLOW, "3kfol2", follow(A)),
    ]
    await index(db, events)
    row = await db.fetchrow("SELECT * FROM post WHERE uri = $1", p)
    assert row["text"] == "first" and row["creator"] == A
    assert await agg(db, p) == {"uri": p, "likeCount": 2, "replyCount": 0, "repostCount": 1, "quoteCount": 0,
                                "bookmarkCount": 0}
    assert (await profile_agg(db, A))["followersCount"] == 2
    assert (await profile_agg(db, A))["postsCount"] == 1
    assert (await profile_agg(db, B))["followsCount"] == 1
    items = await db.fetch("SELECT type, uri, \"postUri\" FROM feed_item ORDER BY type")
    assert [(r["type"], r["postUri"]) for r in items] == [("post", p), ("repost", p)]
    notifs = await db.fetch("SELECT did, reason, author FROM notification ORDER BY id")
    assert [(n["did"], n["reason"], n["author"]) for n in notifs] == [
        (A, "like", B), (A, "like", C), (A, "repost", B), (A, "follow", B), (A, "follow", C)
    ]
    assert await db.fetchval("SELECT count(*) FROM record") == 6


async def test_delete_update_and_rev_guard(db: asyncpg.Connection) -> None:
    ev = Events()
    p = uri(A, POST, "3kpost1")
    create = ev.create(A, POST, "3kpost1", post("v1"))
    await index(db, [create, ev.create(B, LIKE, "3klike1", like(p))])
    await index(db, [ev.create(A, POST, "3kpost1", post("v2"), update=True)])
    assert await db.fetchval("SELECT text FROM post WHERE uri = $1", p) == "v2"
    delete = ev.delete(B, LIKE, "3klike1")
    await index(db, [delete])
    assert (await agg(db, p))["likeCount"] == 0
    assert await db.fetchval("SELECT count(*) FROM notification WHERE reason = 'like'") == 0
    rec = await db.fetchrow("SELECT json, cid, rev FROM record WHERE uri = $1", uri(B, LIKE, "3klike1"))
    assert rec["json"] == "" and rec["cid"] == "" and rec["rev"] == delete.rev
    # a replayed (older) create after the delete is refused by the tombstone
    stale = ev.create(B, LIKE, "3klike1", like(p))
    stale.rev = "3l00000000000"
    result = await index(db, [stale])
    assert result.stale == 1
    assert await db.fetchval('SELECT count(*) FROM "like"') == 0
    # a delete before the create (out of order across consumers) also wins
    late_create = ev.create(C, LIKE, "3klike9", like(p))
    early_delete = ev.delete(C, LIKE, "3klike9")
    await index(db, [early_delete])
    await index(db, [late_create])
    assert await db.fetchval('SELECT count(*) FROM "like"') == 0


async def test_duplicates_and_promotion(db: asyncpg.Connection) -> None:
    ev = Events()
    p = uri(A, POST, "3kpost1")
    await index(db, [ev.create(A, POST, "3kpost1", post())])
    first = ev.create(B, LIKE, "3klike1", like(p))
    second = ev.create(B, LIKE, "3klike2", like(p))
    await index(db, [first, second])
    assert await db.fetchval('SELECT uri FROM "like"') == first.uri
    dup = await db.fetchrow("SELECT * FROM duplicate_record")
    assert dup["uri"] == second.uri and dup["duplicateOf"] == first.uri
    assert (await agg(db, p))["likeCount"] == 1
    await index(db, [ev.delete(B, LIKE, "3klike1")])
    assert await db.fetchval('SELECT uri FROM "like"') == second.uri
    assert (await agg(db, p))["likeCount"] == 1


async def test_a_holder_that_becomes_a_duplicate_hands_on_its_duplicates(db: asyncpg.Connection) -> None:
    """B likes the post three times. H1 (live) holds the key and D2 is filed under it; then
    the backfilled repo brings the older H0 and H1 again at the repo's newer rev: H1 is
    re-indexed after H0 took the key, so H1 becomes H0's duplicate — and D2 must follow it
    to H0 (it pointed at a record holding nothing; found by the devnet run)."""
    ev = Events()
    p = uri(A, POST, "3kpost1")
    await index(db, [ev.create(A, POST, "3kpost1", post())])
    h1 = ev.create(B, LIKE, "3klike1", like(p))
    await index(db, [h1])
    d2 = ev.create(B, LIKE, "3klike2", like(p))
    await index(db, [d2])
    h0 = ev.create(B, LIKE, "3klike0", like(p))
    h1_again = ev.create(B, LIKE, "3klike1", like(p))  # same CID, newer rev
    await index(db, [h0, h1_again])
    holder = await db.fetchval('SELECT uri FROM "like"')
    dups = {r["uri"]: r["duplicateOf"] for r in await db.fetch("SELECT * FROM duplicate_record")}
    assert set(dups) | {holder} == {h0.uri, h1.uri, d2.uri}
    assert set(dups.values()) == {holder}
    assert (await agg(db, p))["likeCount"] == 1
    # and the chain still promotes: delete the holder, then the next holder
    await index(db, [ev.delete(B, LIKE, holder.rsplit("/", 1)[1])])
    second = await db.fetchval('SELECT uri FROM "like"')
    assert second is not None and second != holder
    assert {r["duplicateOf"] for r in await db.fetch("SELECT * FROM duplicate_record")} <= {second}
    assert (await agg(db, p))["likeCount"] == 1


async def test_invalid_and_unknown_records_are_skipped(db: asyncpg.Connection) -> None:
    ev = Events()
    bad = ev.create(A, POST, "3kpost1", {"text": 5, "createdAt": "x"})
    unknown = ev.create(A, "com.example.thing", "3kx", {"a": 1})
    result = await index(db, [bad, unknown, ev.create(A, POST, "3kpost2", post())])
    assert dict(result.skipped) == {"invalid_record": 1, "unknown_collection": 1}
    assert await db.fetchval("SELECT count(*) FROM post") == 1


async def test_replies_threadgates_and_counts(db: asyncpg.Connection) -> None:
    ev = Events()
    root = uri(A, POST, "3kroot")
    reply = {"root": strong_ref(root), "parent": strong_ref(root)}
    events = [
        ev.create(A, POST, "3kroot", post("root")),
        ev.create(B, POST, "3kr1", post("reply", reply=reply)),
        ev.create(A, "app.bsky.feed.threadgate", "3kroot",
                  {"post": root, "allow": [], "createdAt": "2026-01-01T00:00:00.000Z"}),
        ev.create(C, POST, "3kr2", post("gated", reply=reply)),
        ev.create(A, POST, "3kr3", post("own reply", reply=reply)),
        ev.create(B, POST, "3kbad", post("bad root", reply={"root": strong_ref(uri(A, POST, "3knope")),
                                                           "parent": strong_ref(root)})),
    ]
    await index(db, events)
    rows = {r["uri"]: r for r in await db.fetch("SELECT * FROM post")}
    assert rows[uri(B, POST, "3kr1")]["violatesThreadGate"] is None
    assert rows[uri(C, POST, "3kr2")]["violatesThreadGate"] is True
    assert rows[uri(A, POST, "3kr3")]["violatesThreadGate"] is None
    assert rows[uri(B, POST, "3kbad")]["invalidReplyRoot"] is True
    assert rows[root]["hasThreadGate"] is True
    assert (await agg(db, root))["replyCount"] == 3  # the gated reply is not counted
    reasons = {(n["did"], n["author"], n["reason"]) for n in await db.fetch("SELECT * FROM notification")}
    assert (A, B, "reply") in reasons and (A, C, "reply") not in reasons


async def test_quotes_embeds_and_postgates(db: asyncpg.Connection) -> None:
    ev = Events()
    target = uri(A, POST, "3ktarget")
    closed = uri(A, POST, "3kclosed")
    embed = {"$type": "app.bsky.embed.record", "record": strong_ref(target)}
    images = {"$type": "app.bsky.embed.images", "images": [
        {"alt": "a", "image": {"$type": "blob", "ref": {"$link": "bafkreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
                               "mimeType": "image/png", "size": 10}}]}
    await index(db, [
        ev.create(A, POST, "3ktarget", post()),
        ev.create(A, POST, "3kclosed", post()),
        ev.create(A, "app.bsky.feed.postgate", "3kclosed", {
            "post": closed, "createdAt": "2026-01-01T00:00:00.000Z",
            "embeddingRules": [{"$type": "app.bsky.feed.postgate#disableRule"}]}),
    ])
    await index(db, [
        ev.create(B, POST, "3kq1", post("quote", embed=embed)),
        ev.create(C, POST, "3kq2", post("quote", embed={"$type": "app.bsky.embed.recordWithMedia",
                                                         "record": {"record": strong_ref(target)}, "media": images})),
        ev.create(B, POST, "3kq3", post("quote closed", embed={"$type": "app.bsky.embed.record",
                                                               "record": strong_ref(closed)})),
    ])
    assert (await agg(db, target))["quoteCount"] == 2
    assert await db.fetchval('SELECT count(*) FROM post_embed_image') == 1
    assert await db.fetchval('SELECT count(*) FROM post_embed_record') == 3
    assert await db.fetchval('SELECT "violatesEmbeddingRules" FROM post WHERE uri = $1', uri(B, POST, "3kq3")) is True
    quotes = {(n["did"], n["author"]) for n in await db.fetch("SELECT * FROM notification WHERE reason = 'quote'")}
    assert quotes == {(A, B), (A, C)}
    await index(db, [ev.delete(B, POST, "3kq1")])
    assert (await agg(db, target))["quoteCount"] == 1
    assert await db.fetchval('SELECT count(*) FROM post_embed_record') == 2


async def test_backfill_events_make_no_notifications(db: asyncpg.Connection) -> None:
    ev = Events()
    p = uri(A, POST, "3kpost1")
    await index(db, [ev.create(A, POST, "3kpost1", post(), backfill=True),
                     ev.create(B, LIKE, "3kl", like(p), backfill=True)], notify=False)
    assert await db.fetchval("SELECT count(*) FROM notification") == 0
    assert (await agg(db, p))["likeCount"] == 1


async def test_account_deleted_unindexes_everything(db: asyncpg.Connection) -> None:
    ev = Events()
    p = uri(A, POST, "3kpost1")
    await index(db, [
        ev.create(A, POST, "3kpost1", post()),
        ev.create(B, POST, "3kpost2", post()),
        ev.create(B, LIKE, "3kl1", like(p)),
        ev.create(C, LIKE, "3kl2", like(uri(B, POST, "3kpost2"))),
        ev.create(B, FOLLOW, "3kf", follow(A)),
    ])
    deleted = AccountEvent(seq=99, time="2026-01-02T00:00:00.000Z", did=B, active=False, status="deleted")
    await index(db, [deleted])
    assert await db.fetchval("SELECT count(*) FROM record WHERE did = $1", B) == 0
    assert await db.fetchval('SELECT count(*) FROM "like" WHERE creator = $1', B) == 0
    assert (await agg(db, p))["likeCount"] == 0
    assert (await profile_agg(db, A))["followersCount"] == 0
    assert await db.fetchval("SELECT count(*) FROM post WHERE creator = $1", B) == 0
    assert await db.fetchval('SELECT count(*) FROM "like" WHERE creator = $1', C) == 1


async def test_account_status_sets_upstream_status(db: asyncpg.Connection) -> None:
    await index(db, [AccountEvent(seq=1, time="2026-01-02T00:00:00.000Z", did=A, active=False, status="takendown")])
    assert await db.fetchval('SELECT "upstreamStatus" FROM actor WHERE did = $1', A) == "takendown"
    await index(db, [AccountEvent(seq=2, time="2026-01-02T00:00:01.000Z", did=A, active=True)])
    assert await db.fetchval('SELECT "upstreamStatus" FROM actor WHERE did = $1', A) is None


BLOB = {"$type": "blob", "ref": {"$link": "bafkreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
        "mimeType": "image/png", "size": 10}  # fmt: skip
LIST = uri(A, "app.bsky.graph.list", "3klist")
T = "2026-01-01T00:00:00.000Z"

# collection, rkey, record, updated record, table, (column, value after create), (column, value after update)
TYPES: list[tuple[str, str, dict[str, Any], dict[str, Any], str | None, tuple[str, Any], tuple[str, Any]]] = [
    ("app.bsky.graph.block", "3kb", {"subject": B, "createdAt": T}, {"subject": C, "createdAt": T},
     "actor_block", ("subjectDid", B), ("subjectDid", C)),
    ("app.bsky.graph.list", "3klist", {"name": "friends", "purpose": "app.bsky.graph.defs#curatelist", "createdAt": T,
     "avatar": BLOB}, {"name": "pals", "purpose": "app.bsky.graph.defs#modlist", "createdAt": T},
     "list", ("name", "friends"), ("purpose", "app.bsky.graph.defs#modlist")),
    ("app.bsky.graph.listitem", "3kli", {"subject": B, "list": LIST, "createdAt": T},
     {"subject": C, "list": LIST, "createdAt": T}, "list_item", ("subjectDid", B), ("subjectDid", C)),
    ("app.bsky.graph.listblock", "3klb", {"subject": uri(B, "app.bsky.graph.list", "3kx"), "createdAt": T},
     {"subject": uri(C, "app.bsky.graph.list", "3kx"), "createdAt": T}, "list_block",
     ("subjectUri", uri(B, "app.bsky.graph.list", "3kx")), ("subjectUri", uri(C, "app.bsky.graph.list", "3kx"))),
    ("app.bsky.feed.generator", "3kfeed", {"did": "did:web:feed.example.com", "displayName": "Feed", "createdAt": T},
     {"did": "did:web:feed.example.com", "displayName": "Feed 2", "createdAt": T}, "feed_generator",
     ("displayName", "Feed"), ("displayName", "Feed 2")),
    ("app.bsky.graph.starterpack", "3ksp", {"name": "pack", "list": LIST, "createdAt": T},
     {"name": "pack 2", "list": LIST, "createdAt": T}, "starter_pack", ("name", "pack"), ("name", "pack 2")),
    ("app.bsky.labeler.service", "self", {"policies": {"labelValues": ["spam"]}, "createdAt": T},
     {"policies": {"labelValues": ["spam", "rude"]}, "createdAt": "2026-01-02T00:00:00.000Z"}, "labeler",
     ("createdAt", T), ("createdAt", "2026-01-02T00:00:00.000Z")),
    ("app.bsky.actor.profile", "self", {"displayName": "Alice", "avatar": BLOB}, {"displayName": "Alice B"},
     "profile", ("displayName", "Alice"), ("displayName", "Alice B")),
    ("app.bsky.graph.verification", "3kver", {"subject": B, "handle": "b.test", "displayName": "B", "createdAt": T},
     {"subject": B, "handle": "b2.test", "displayName": "B", "createdAt": T}, "verification",
     ("handle", "b.test"), ("handle", "b2.test")),
    ("chat.bsky.actor.declaration", "self", {"allowIncoming": "all"}, {"allowIncoming": "none"}, None,
     ("", None), ("", None)),
    ("app.bsky.notification.declaration", "self", {"allowSubscriptions": "followers"},
     {"allowSubscriptions": "none"}, None, ("", None), ("", None)),
    ("app.bsky.actor.status", "self", {"status": "app.bsky.actor.status#live", "createdAt": T,
     "embed": {"$type": "app.bsky.embed.external", "external": {"uri": "https://x.example", "title": "t",
                                                                 "description": "d"}}},
     {"status": "app.bsky.actor.status#live", "createdAt": "2026-01-02T00:00:00.000Z"}, None, ("", None), ("", None)),
]  # fmt: skip


@pytest.mark.parametrize("collection,rkey,record,updated,table,after_create,after_update", TYPES,
                         ids=[t[0] for t in TYPES])  # fmt: skip
async def test_every_record_type_create_update_delete(
    db: asyncpg.Connection, collection: str, rkey: str, record: dict[str, Any], updated: dict[str, Any],
    table: str | None, after_create: tuple[str, Any], after_update: tuple[str, Any],
) -> None:  # fmt: skip
    ev = Events()
    u = uri(A, collection, rkey)
    result = await index(db, [ev.create(A, collection, rkey, record)])
    assert dict(result.skipped) == {}, result.skipped
    assert await db.fetchval("SELECT cid <> '' FROM record WHERE uri = $1", u)
    if table is not None:
        row = await db.fetchrow(f'SELECT * FROM "{table}" WHERE uri = $1', u)
        assert row is not None and row[after_create[0]] == after_create[1]
        assert row["creator"] == A
    await index(db, [ev.create(A, collection, rkey, updated, update=True)])
    rec = await db.fetchrow("SELECT json FROM record WHERE uri = $1", u)
    assert rec is not None and all(str(v) in rec["json"] or not isinstance(v, str) for v in updated.values())
    if table is not None:
        row = await db.fetchrow(f'SELECT * FROM "{table}" WHERE uri = $1', u)
        assert row is not None and row[after_update[0]] == after_update[1]
    await index(db, [ev.delete(A, collection, rkey)])
    assert await db.fetchval("SELECT json FROM record WHERE uri = $1", u) == ""
    if table is not None:
        assert await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE uri = $1', u) == 0


async def test_records_each_collection_refuses(db: asyncpg.Connection) -> None:
    ev = Events()
    result = await index(db, [
        # a list item in someone else's list, a gate for another author's post
        ev.create(B, "app.bsky.graph.listitem", "3kli", {"subject": C, "list": LIST, "createdAt": T}),
        ev.create(B, "app.bsky.feed.threadgate", "3kp", {"post": uri(A, POST, "3kp"), "createdAt": T}),
        # a profile or labeler outside rkey "self": record kept, no row (as the TypeScript indexer)
        ev.create(A, "app.bsky.actor.profile", "other", {"displayName": "x"}),
    ])  # fmt: skip
    assert dict(result.skipped) == {"listitem_foreign_list": 1, "gate_mismatch": 1}
    assert await db.fetchval("SELECT count(*) FROM list_item") == 0
    assert await db.fetchval("SELECT count(*) FROM thread_gate") == 0
    assert await db.fetchval("SELECT count(*) FROM profile") == 0
    assert await db.fetchval("SELECT count(*) FROM record") == 1


async def test_verification_and_starter_pack_notifications(db: asyncpg.Connection) -> None:
    ev = Events()
    pack = uri(C, "app.bsky.graph.starterpack", "3ksp")
    await index(db, [
        ev.create(A, "app.bsky.graph.verification", "3kv", {"subject": B, "handle": "b.test", "displayName": "B",
                                                            "createdAt": T}),
        ev.create(B, "app.bsky.actor.profile", "self", {"displayName": "B",
                                                        "joinedViaStarterPack": {"uri": pack, "cid": strong_ref(pack)["cid"]}}),
    ])  # fmt: skip
    await index(db, [ev.delete(A, "app.bsky.graph.verification", "3kv")])
    notifs = [(n["did"], n["author"], n["reason"]) for n in await db.fetch("SELECT * FROM notification ORDER BY id")]
    assert notifs == [(B, A, "verified"), (C, B, "starterpack-joined"), (B, A, "unverified")]


async def test_mentions_replies_and_thread_mutes(db: asyncpg.Connection) -> None:
    ev = Events()
    root = uri(A, POST, "3kroot")
    mention = [{"index": {"byteStart": 0, "byteEnd": 2}, "features": [{"$type": "app.bsky.richtext.facet#mention",
                                                                          "did": C}]}]  # fmt: skip
    await index(db, [ev.create(A, POST, "3kroot", post("root"))])
    await db.execute('INSERT INTO thread_mute ("rootUri", "mutedByDid", "createdAt") VALUES ($1, $2, $3)', root, A, T)
    reply = {"root": strong_ref(root), "parent": strong_ref(root)}
    await index(db, [ev.create(B, POST, "3kr", post("hi", reply=reply, facets=mention))])
    notifs = {(n["did"], n["reason"]) for n in await db.fetch("SELECT * FROM notification")}
    assert notifs == {(C, "mention")}  # A muted the thread: no reply notification


async def test_hostile_text_is_stored_not_executed(db: asyncpg.Connection) -> None:
    """SQL metacharacters, NUL (which PostgreSQL text and jsonb cannot hold) and odd Unicode in
    every text field: indexed, nothing executed, the record's JSON kept whole."""
    ev = Events()
    nasty = "x'); DROP TABLE post; -- \\\\ \" $1 %s \u0000 \U0001f600 \u202e"
    events = [
        ev.create(A, POST, "3kp1", post(nasty, tags=[nasty[:60]], langs=["en"])),
        ev.create(A, "app.bsky.actor.profile", "self", {"displayName": nasty[:60], "description": nasty}),
        ev.create(A, "app.bsky.graph.list", "3kl", {"name": nasty[:60], "purpose": "app.bsky.graph.defs#curatelist",
                                                    "description": nasty, "createdAt": T}),
    ]  # fmt: skip
    result = await index(db, events)
    assert dict(result.skipped) == {}
    text = await db.fetchval("SELECT text FROM post WHERE uri = $1", uri(A, POST, "3kp1"))
    assert text == nasty.replace("\u0000", "")
    assert await db.fetchval("SELECT count(*) FROM post") == 1
    stored = await db.fetchval("SELECT json FROM record WHERE uri = $1", uri(A, POST, "3kp1"))
    assert "\\u0000" in stored  # escaped in the JSON text, so the record itself is intact


async def test_reply_notifications_walk_the_thread_in_any_order(database_url: str) -> None:
    """A thread of six posts by six accounts: each reply notifies the authors above it (up to
    five levels). Bottom-up (replies indexed before their parents) the TypeScript rules give
    none: the replies found below a new post notify its ancestors, but one recipient gets one
    notification per inserted post and the new post's own author none, and a post arriving
    before everything above it has no ancestors yet."""
    authors = [f"did:plc:{c * 24}" for c in "defghi"]
    ev = Events()
    events = []
    parent: str | None = None
    for i, did in enumerate(authors):
        extra: dict[str, Any] = {}
        if parent is not None:
            root = uri(authors[0], POST, "3kt0")
            extra["reply"] = {"root": strong_ref(root), "parent": strong_ref(parent)}
        events.append(ev.create(did, POST, f"3kt{i}", post(f"level {i}", **extra)))
        parent = uri(did, POST, f"3kt{i}")

    async def notifications(order: list[StreamEvent]) -> set[tuple[str, str, str, str]]:
        gen = cloned_database(database_url)
        url = await gen.__anext__()
        conn = await asyncpg.connect(url)
        try:
            for e in order:
                await index(conn, [e])
            return {(r["did"], r["author"], r["reason"], r["recordUri"])
                    for r in await conn.fetch("SELECT * FROM notification")}  # fmt: skip
        finally:
            await conn.close()
            with pytest.raises(StopAsyncIteration):
                await gen.__anext__()

    top_down = await notifications(events)
    assert await notifications(events[::-1]) == set()
    # the parent of the last reply arrives last: its own reply notifies the authors above it;
    # the reply below it (already indexed) would notify the same authors and so adds nothing
    late = await notifications([*events[:4], events[5], events[4]])
    assert late == {n for n in top_down if n[3] != uri(authors[5], POST, "3kt5")}
    last = uri(authors[5], POST, "3kt5")
    # heights 1-4 above it (REPLY_NOTIF_DEPTH 5: the root, five levels up, is not notified)
    assert {n[0] for n in top_down if n[3] == last and n[2] == "reply"} == set(authors[1:5])
    assert len([n for n in top_down if n[2] == "reply"]) == 1 + 2 + 3 + 4 + 4
