"""``psky reconcile`` end to end: a seeded devnet's repos against a real, damaged database."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest

from psky.atproto.cbor import cid_for_cbor, encode_lex
from psky.db.pool import create_pool
from psky.indexer.batch import apply_batch, prepare_items
from psky.indexer.plugins import PLUGINS
from psky.ops.reconcile import ReconcileOptions, Reconciler, run_reconcile
from psky.streams.wire import RecordEvent
from tests.indexer_helpers import cloned_database

if TYPE_CHECKING:
    from tests.devnet_fixtures import SeededDevnet

pytest_plugins = ("tests.devnet_fixtures",)

POST, LIKE, FOLLOW = "app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[str]:
    gen = cloned_database(database_url)
    url = await gen.__anext__()
    yield url
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()


@pytest.fixture
async def pool(db: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db, min_size=1, max_size=3, pgbouncer=False)
    yield p
    await p.close()


def _options(seeded: SeededDevnet, *, allow: bool = True) -> ReconcileOptions:
    net = seeded.net
    return ReconcileOptions(plc_url=net.plc.url, handle_map=net.handle_resolver_map(),
                            allow_hosts=("127.0.0.1",) if allow else ())


def _active(seeded: SeededDevnet, n: int) -> list[str]:
    accounts = [a for a in seeded.manifest.accounts.values() if a.status == "active"]
    accounts.sort(key=lambda a: -len(a.records))
    return [a.did for a in accounts[:n]]


def _expected(seeded: SeededDevnet, did: str) -> dict[str, str]:
    """uri → cid of the account's records the indexer keeps a ``record`` row for."""
    records = seeded.manifest.accounts[did].records
    return {uri: r["cid"] for uri, r in records.items() if uri.split("/")[3] in PLUGINS}


async def _records(conn: asyncpg.Pool | asyncpg.Connection, did: str) -> dict[str, str]:
    rows = await conn.fetch("SELECT uri, cid FROM record WHERE did = $1 AND json <> ''", did)
    return {r["uri"]: r["cid"] for r in rows}


async def _tables(conn: asyncpg.Pool | asyncpg.Connection, did: str) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in sorted({p.table for p in PLUGINS.values() if p.table}):
        rows = await conn.fetch(f'SELECT uri, cid FROM "{table}" WHERE uri LIKE $1 ORDER BY uri', f"at://{did}/%")
        out[table] = [tuple(r.values()) for r in rows]
    rows = await conn.fetch('SELECT uri, cid FROM feed_item WHERE "originatorDid" = $1 ORDER BY uri', did)
    out["feed_item"] = [tuple(r.values()) for r in rows]
    return out


async def _aggregates_match_rows(conn: asyncpg.Pool | asyncpg.Connection) -> None:
    """Every counter equals a recount of the rows (as the indexer's deltas define them)."""
    profiles = await conn.fetch(
        'SELECT did, "followersCount" AS a, "followsCount" AS b, "postsCount" AS c FROM profile_agg'
        ' WHERE "followersCount" + "followsCount" + "postsCount" > 0'
    )
    expected_profiles = await conn.fetch(
        "SELECT did, sum(a) AS a, sum(b) AS b, sum(c) AS c FROM ("
        ' SELECT "subjectDid" AS did, 1 AS a, 0 AS b, 0 AS c FROM follow'
        " UNION ALL SELECT creator, 0, 1, 0 FROM follow UNION ALL SELECT creator, 0, 0, 1 FROM post) t GROUP BY did"
    )
    as_set = lambda rows: {(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows}  # noqa: E731
    assert as_set(profiles) == as_set(expected_profiles)
    posts = await conn.fetch(
        'SELECT uri, "likeCount", "repostCount", "replyCount" FROM post_agg'
        ' WHERE "likeCount" + "repostCount" + "replyCount" > 0'
    )
    expected_posts = await conn.fetch(
        "SELECT uri, sum(a), sum(b), sum(c) FROM ("
        ' SELECT subject AS uri, 1 AS a, 0 AS b, 0 AS c FROM "like" UNION ALL SELECT subject, 0, 1, 0 FROM repost'
        ' UNION ALL SELECT "replyParent", 0, 0, 1 FROM post WHERE "replyParent" IS NOT NULL'
        ' AND NOT COALESCE("violatesThreadGate", false)) t GROUP BY uri'
    )
    assert as_set(posts) == as_set(expected_posts)


async def test_reconcile_fills_an_empty_database_and_repairs_damage(
    seeded_devnet: SeededDevnet, pool: asyncpg.Pool
) -> None:
    dids = _active(seeded_devnet, 3)
    target = dids[0]
    async with Reconciler(pool, _options(seeded_devnet)) as rec:
        # 1. an empty database: every record is created
        revs = {}
        for did in dids:
            result = await rec.reconcile(did)
            revs[did] = result.rev
            assert result.ok, result.error
            assert result.created == len(_expected(seeded_devnet, did)) > 0
            assert (result.updated, result.deleted, result.unchanged, result.stale) == (0, 0, 0, 0)
            assert await _records(pool, did) == _expected(seeded_devnet, did)
        sync = await pool.fetchrow('SELECT "commitCid", "repoRev" FROM actor_sync WHERE did = $1', target)
        assert sync is not None and sync["repoRev"] == revs[target] and sync["commitCid"].startswith("bafy")
        await _aggregates_match_rows(pool)
        before = await _tables(pool, target)
        assert before["post"] and before["like"] and before["follow"]

        # 2. damage: rows lost, a bogus record indexed, a record's CID changed
        lost = [before["post"][0][0], before["like"][0][0], before["follow"][0][0]]
        async with pool.acquire() as conn:
            for uri in lost:
                table = {POST: "post", LIKE: "like", FOLLOW: "follow"}[uri.split("/")[3]]
                await conn.execute(f'DELETE FROM "{table}" WHERE uri = $1', uri)
                await conn.execute("DELETE FROM record WHERE uri = $1", uri)
                await conn.execute("DELETE FROM feed_item WHERE uri = $1", uri)
            bogus = [_event(target, POST, "3kbogus00000a", {"text": "not in the repo", "createdAt": _T}),
                     _event(target, LIKE, "3kbogus00000b", {"subject": {"uri": before["post"][1][0],
                                                                         "cid": before["post"][1][1]},
                                                             "createdAt": _T})]
            await apply_batch(conn, prepare_items(((e, False) for e in bogus), rec.lexicons), lexicons=rec.lexicons)
            changed = before["post"][2][0]
            await conn.execute("UPDATE record SET cid = $2 WHERE uri = $1", changed, bogus[0].cid)
            assert await _records(conn, target) != _expected(seeded_devnet, target)
            # the counters drift: what the deleted rows counted is still counted
            with pytest.raises(AssertionError):
                await _aggregates_match_rows(conn)

        # 3. reconcile repairs it: records, rows and counters as the repo says
        result = await rec.reconcile(target)
        assert result.ok, result.error
        assert (result.created, result.updated, result.deleted, result.stale) == (3, 1, 2, 0)
        assert result.unchanged == len(_expected(seeded_devnet, target)) - 4
        assert await _records(pool, target) == _expected(seeded_devnet, target)
        assert await _tables(pool, target) == before
        await _aggregates_match_rows(pool)

        # 4. again: nothing to do
        again = await rec.reconcile(target)
        assert (again.created, again.updated, again.deleted) == (0, 0, 0)
        assert again.unchanged == len(_expected(seeded_devnet, target))


_T = "2026-01-01T00:00:00.000Z"


def _event(did: str, collection: str, rkey: str, record: dict[str, Any]) -> RecordEvent:
    record = {"$type": collection, **record}
    cid = cid_for_cbor(encode_lex(record)).encode()
    # an old rev: the repo's own commits are all newer, as a stale or forged write would be
    return RecordEvent(type="create", seq=1, time=_T, did=did, commit=cid, rev="2222222222222",
                       collection=collection, rkey=rkey, cid=cid, record=record)


async def test_failures_are_reported_per_did(seeded_devnet: SeededDevnet, db: str) -> None:
    manifest = seeded_devnet.manifest
    deleted = next(a.did for a in manifest.accounts.values() if a.status == "deleted")
    good = _active(seeded_devnet, 1)[0]
    unknown = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
    out = io.StringIO()
    code = await run_reconcile([unknown, deleted, good], db, _options(seeded_devnet), out=out)
    lines = out.getvalue().splitlines()
    assert code == 1 and len(lines) == 3
    assert lines[0].startswith(f"{unknown}: FAILED: cannot resolve the DID") and "not found" in lines[0]
    assert lines[1].startswith(f"{deleted}: FAILED: repo not available") and "RepoNotFound" in lines[1]
    assert lines[2].startswith(f"{good}: ") and " created, 0 updated, 0 deleted, 0 unchanged" in lines[2]

    # the address guard: a PDS on a private address is refused unless allowed
    out = io.StringIO()
    assert await run_reconcile([good], db, _options(seeded_devnet, allow=False), out=out) == 1
    assert "refused" in out.getvalue() and "--allow-host" in out.getvalue()


async def test_cli(seeded_devnet: SeededDevnet, db: str, tmp_path: Any) -> None:
    net = seeded_devnet.net
    dids = _active(seeded_devnet, 2)
    listing = tmp_path / "dids.txt"
    listing.write_text(f"# accounts to repair\n{dids[1]}\n\n")
    env = {**os.environ, "DATABASE_URL": db, "PLC_URL": net.plc.url,
           "PSKY_HANDLE_RESOLVER_MAP": net.handle_resolver_map(), "BACKFILLER_ALLOW_HOSTS": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "psky.cli", "reconcile", dids[0], "--file", str(listing), "--allow-host", "127.0.0.1",
        "--json", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    results = [orjson.loads(line) for line in stdout.splitlines()]
    assert [r["did"] for r in results] == dids and all(r["ok"] for r in results)
    assert [r["created"] for r in results] == [len(_expected(seeded_devnet, d)) for d in dids]

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "psky.cli", "reconcile", "not-a-did", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == 2 and b"not a DID" in stderr
