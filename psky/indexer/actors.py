"""Actors: handles (DID document + bidirectional verification, contention, re-verification
intervals, a DID-document cache shared through Redis), account status, account deletion.

Network I/O happens before the batch's transaction (:meth:`Actors.resolve`); the
transaction only writes what was resolved (:meth:`Actors.apply`, :meth:`Actors.apply_handles`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from psky.atproto.did import DidDocument, InvalidDidDocument, parse_did_document
from psky.atproto.syntax import is_valid_handle
from psky.identity import IdentityResolver, ResolutionError
from psky.indexer.batch import ACCOUNT_LOCK_CLASS, NEVER_INDEXED, Item, Totals, account_lock_key
from psky.indexer.plugins import PLUGINS
from psky.streams.wire import AccountEvent, IdentityEvent, RecordEvent

__all__ = ["Actors", "RedisDidCache", "unindex_actor"]

log = logging.getLogger("psky.indexer")

PROFILE = "app.bsky.actor.profile"
REINDEX_AFTER = timedelta(days=1)
REINDEX_INVALID_AFTER = timedelta(hours=1)
DID_CACHE_TTL_S = 3600


def _parse_time(value: str) -> datetime | None:
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def needs_reindex(indexed_at: str | None, handle: str | None, now: str) -> bool:
    """The TypeScript rule: daily, hourly while the handle is invalid."""
    if indexed_at is None:
        return True
    then, at = _parse_time(indexed_at), _parse_time(now)
    if then is None or at is None:
        return True
    age = at - then
    return age > REINDEX_AFTER or (handle is None and age > REINDEX_INVALID_AFTER)


class RedisDidCache:
    """DID documents shared by every indexer through Redis (``did_doc:<did>``, with expiry)."""

    def __init__(self, redis: Any, ttl_s: int = DID_CACHE_TTL_S, prefix: str = "did_doc:") -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.prefix = prefix

    async def get(self, did: str) -> DidDocument | None:
        try:
            raw = await self.redis.get(self.prefix + did)
        except Exception:  # the cache is an optimisation: Redis trouble must not stop indexing
            return None
        if raw is None:
            return None
        try:
            return parse_did_document(orjson.loads(raw), expected_did=did)
        except (orjson.JSONDecodeError, InvalidDidDocument):
            return None

    async def put(self, did: str, raw: Mapping[str, Any]) -> None:
        try:
            await self.redis.set(self.prefix + did, orjson.dumps(raw), ex=self.ttl_s)
        except Exception:
            return

    async def drop(self, did: str) -> None:
        try:
            await self.redis.delete(self.prefix + did)
        except Exception:
            return


class Actors:
    """Handle indexing and account state for the indexer."""

    def __init__(
        self,
        resolver: IdentityResolver | None,
        *,
        cache: RedisDidCache | None = None,
        concurrency: int = 20,
    ) -> None:
        self.resolver = resolver
        self.cache = cache
        self._limit = asyncio.Semaphore(concurrency)
        self.resolved = 0
        self.failures = 0

    # -- before the transaction

    async def resolve(self, pool: asyncpg.Pool | asyncpg.Connection, items: Sequence[Item]) -> None:
        """Decide which DIDs need their handle (re)indexed and resolve them concurrently."""
        wanted: dict[str, tuple[Item, bool]] = {}
        for item in items:
            e = item.event
            if isinstance(e, IdentityEvent):
                wanted[e.did] = (item, True)
            elif (isinstance(e, AccountEvent) and e.status != "deleted") or (
                isinstance(e, RecordEvent) and e.collection == PROFILE and item.skipped is None
            ):
                wanted.setdefault(e.did, (item, False))
        if not wanted:
            return
        rows = await pool.fetch(
            'SELECT did, handle, "indexedAt" FROM actor WHERE did = ANY($1::text[])', sorted(wanted)
        )
        known = {r["did"]: (r["handle"], r["indexedAt"]) for r in rows}
        todo = []
        for did, (item, force) in wanted.items():
            handle, indexed_at = known.get(did, (None, None))
            if force or did not in known or needs_reindex(indexed_at, handle, item.event.time):
                todo.append((did, item))
        if todo:
            await asyncio.gather(*(self._resolve_one(did, item) for did, item in todo))

    async def _resolve_one(self, did: str, item: Item) -> None:
        event = item.event
        if self.resolver is None:
            # resolution disabled: take the relay's word for identity events' handles
            if isinstance(event, IdentityEvent):
                handle = event.handle
                item.handle = (
                    handle.lower() if isinstance(handle, str) and is_valid_handle(handle) else None,
                    True,
                )
            return
        async with self._limit:
            try:
                if isinstance(event, IdentityEvent):
                    self.resolver.invalidate(did)
                    if self.cache is not None:
                        await self.cache.drop(did)
                doc = await self._document(did)
                handle = doc.handle
                verified: str | None = None
                if handle and is_valid_handle(handle):
                    claimed = await self.resolver.resolve_handle(handle)
                    if claimed == did:
                        verified = handle.lower()
                item.handle = (verified, True)
                self.resolved += 1
            except ResolutionError as e:
                self.failures += 1
                log.info("handle resolution failed", extra={"did": did, "error": str(e)})
                item.handle = (None, True)

    async def _document(self, did: str) -> DidDocument:
        assert self.resolver is not None
        if self.cache is not None:
            cached = await self.cache.get(did)
            if cached is not None:
                return cached
        doc = await self.resolver.resolve(did)
        if self.cache is not None and doc.raw is not None:
            await self.cache.put(did, doc.raw)
        return doc

    # -- inside the transaction

    async def apply(self, conn: asyncpg.Connection, item: Item, totals: Totals) -> None:
        """An account event, in stream order: a deletion unindexes the account there and then
        (statuses and handles are written at the end of the batch, see :meth:`finish`)."""
        e = item.event
        if isinstance(e, AccountEvent) and not e.active and e.status == "deleted":
            await unindex_actor(conn, e.did, e.time, totals)

    async def finish(self, conn: asyncpg.Connection, items: Sequence[Item]) -> None:
        """Account statuses and handles of the batch, on ``actor`` rows locked in DID order
        first (one order for every batch: concurrent batches never deadlock on them)."""
        statuses: dict[str, tuple[str | None, str]] = {}
        for item in items:
            e = item.event
            if isinstance(e, AccountEvent):
                if e.active:
                    statuses[e.did] = (None, e.time)
                elif e.status == "deleted":
                    statuses.pop(e.did, None)
                else:
                    statuses[e.did] = (e.status or "deactivated", e.time)
        handle_dids = {item.event.did for item in items if item.handle is not None and item.handle[1]}
        dids = sorted(set(statuses) | handle_dids)
        if not dids:
            return
        await conn.execute(
            'INSERT INTO actor (did, "indexedAt") SELECT d, $2 FROM unnest($1::text[]) AS d ORDER BY d'
            " ON CONFLICT (did) DO UPDATE SET did = excluded.did WHERE false",
            dids,
            NEVER_INDEXED,  # no handle indexed yet: any resolution is newer, and one is due
        )
        if statuses:
            keys = sorted(statuses)
            # a deleted account's marker only goes with a reactivation newer than the deletion
            # (its time is the marker's "indexedAt"): an older one indexed late, by a batch
            # that waited out the database or another consumer, must not bring it back
            await conn.execute(
                'UPDATE actor a SET "upstreamStatus" = t.s'
                " FROM unnest($1::text[], $2::text[], $3::text[]) AS t(d, s, at)"
                " WHERE a.did = t.d AND (a.\"upstreamStatus\" IS DISTINCT FROM 'deleted'"
                ' OR (t.s IS NULL AND t.at > a."indexedAt"))',
                keys,
                [statuses[k][0] for k in keys],
                [statuses[k][1] for k in keys],
            )
        await self.apply_handles(conn, items)

    async def apply_handles(self, conn: asyncpg.Connection, items: Sequence[Item]) -> None:
        latest: dict[str, tuple[str | None, str]] = {}
        deleted: set[str] = set()
        for item in items:
            e = item.event
            if isinstance(e, AccountEvent) and e.status == "deleted" and not e.active:
                deleted.add(e.did)
                latest.pop(e.did, None)
            elif item.handle is not None and item.handle[1]:
                latest[e.did] = (item.handle[0], e.time)
        for did in deleted:
            latest.pop(did, None)
        if not latest:
            return
        # an older resolution (a batch handled late by another consumer) never overwrites a
        # newer one, and a deleted account's marker keeps no handle
        rows = await conn.fetch(
            'SELECT did, "indexedAt", "upstreamStatus" FROM actor WHERE did = ANY($1::text[]) FOR UPDATE',
            sorted(latest),
        )
        for row in rows:
            if row["upstreamStatus"] == "deleted" or row["indexedAt"] > latest[row["did"]][1]:
                latest.pop(row["did"], None)
        if not latest:
            return
        dids = sorted(latest)
        # one handle per actor: the last claimant in this batch wins
        by_handle: dict[str, str] = {}
        for did in dids:
            handle = latest[did][0]
            if handle is not None:
                prev = by_handle.get(handle)
                if prev is not None:
                    latest[prev] = (None, latest[prev][1])
                by_handle[handle] = did
        handles = [latest[d][0] for d in dids]
        # handle contention: whoever held a handle claimed here loses it (also actors of this
        # batch swapping handles, so that the upsert below never meets the unique constraint)
        await conn.execute(
            "UPDATE actor SET handle = NULL WHERE handle = ANY($1::text[])",
            [h for h in handles if h is not None],
        )
        await conn.execute(
            'INSERT INTO actor (did, handle, "indexedAt") SELECT * FROM unnest($1::text[], $2::text[], $3::text[])'
            ' ON CONFLICT (did) DO UPDATE SET handle = excluded.handle, "indexedAt" = excluded."indexedAt"',
            dids,
            handles,
            [latest[d][1] for d in dids],
        )


async def unindex_actor(conn: asyncpg.Connection, did: str, at: str, totals: Totals) -> dict[str, int]:
    """Remove everything a deleted account wrote (its rows, records, notifications, actor),
    keeping the aggregates of other actors' subjects exact: the counters its rows fed go into
    the batch's totals like any other removal (applied here, a decrement would miss the
    increment of a row this same batch inserted, which is only written at the batch's end)."""
    counts: dict[str, int] = {}
    # ordered with every batch writing this account (see _skip_deleted_accounts): this waits
    # for those holding it, and those starting now wait for this transaction
    await conn.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1::int4, $2::int4)", ACCOUNT_LOCK_CLASS, account_lock_key(did)
    )
    # the actor stays as a marker (the TypeScript indexer deletes it): records of this
    # account arriving later from an older batch must not bring it back
    await conn.execute(
        'INSERT INTO actor (did, handle, "indexedAt", "upstreamStatus") VALUES ($1, NULL, $2, \'deleted\')'
        " ON CONFLICT (did) DO UPDATE SET handle = NULL, \"upstreamStatus\" = 'deleted',"
        ' "indexedAt" = greatest(actor."indexedAt", excluded."indexedAt")',
        did,
        at,
    )

    own = f"at://{did}/"
    for plugin in PLUGINS.values():
        if plugin.table is None:
            continue
        rows = await conn.fetch(f'DELETE FROM "{plugin.table}" WHERE creator = $1 RETURNING *', did)
        counts[plugin.table] = len(rows)
        for row in rows:
            for key in plugin.agg_keys(row):
                if key.key and key.key != did and not key.key.startswith(own):
                    totals.agg[(key.table, key.key, key.column)] -= 1
        if rows and plugin.table == "post":
            uris = [r["uri"] for r in rows]
            for table in ("post_embed_image", "post_embed_external", "post_embed_record", "post_embed_video"):
                await conn.execute(f'DELETE FROM {table} WHERE "postUri" = ANY($1::text[])', uris)
            await conn.execute('DELETE FROM feed_item WHERE "postUri" = ANY($1::text[])', uris)
            # quote counts are counts (the TypeScript definition), not deltas: what it
            # quoted is recounted at the end of the batch
            for r in await conn.fetch(
                'DELETE FROM quote WHERE uri = ANY($1::text[]) RETURNING subject, "subjectCid"', uris
            ):
                if not r["subject"].startswith(own):
                    totals.quotes[r["subject"]] = (r["subjectCid"], 0)
                    totals.frozen_quotes.discard(r["subject"])
        if rows and plugin.table == "repost":
            await conn.execute("DELETE FROM feed_item WHERE uri = ANY($1::text[])", [r["uri"] for r in rows])
    await conn.execute('DELETE FROM feed_item WHERE "originatorDid" = $1', did)
    await conn.execute("DELETE FROM notification WHERE author = $1 OR did = $1", did)
    await conn.execute(
        'DELETE FROM duplicate_record WHERE uri LIKE $1 OR "duplicateOf" LIKE $1', f"at://{did}/%"
    )
    await conn.execute("DELETE FROM record WHERE did = $1", did)
    await conn.execute("DELETE FROM actor_sync WHERE did = $1", did)
    await conn.execute("DELETE FROM profile_agg WHERE did = $1", did)
    await conn.execute("DELETE FROM post_agg WHERE uri LIKE $1", f"at://{did}/%")
    return counts
