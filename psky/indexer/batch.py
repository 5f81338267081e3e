"""Set-wise indexing of a batch of stream events in one transaction.

The batch first locks the ``record`` rows it touches, in URI order (a URI not indexed yet
gets a placeholder with the empty rev), so that concurrent batches sharing records wait for
each other instead of deadlocking; records of accounts deleted earlier are skipped.

Then it is cut into *waves*: consecutive events in stream order such that no event in a wave
reads or writes what another one in the same wave writes (its record URI, its duplicate key,
the posts and gates a reply reads, ...). Two creates with one duplicate key may share a wave
(the first inserted wins, as one at a time), and a reply may read a post created earlier in
its wave (handed over in memory). Inside a wave order does not matter otherwise, so every
step is one statement per table for the whole wave:

1. ``record`` upsert with the rev guard (an older rev never overwrites a newer one, and the
   same rev and CID again is a no-op, so redeliveries change nothing; a delete leaves a
   tombstone, so a stale create arriving later is refused too; a create that finds an older
   version replaces it like an update);
2. rows of deleted and updated records removed (``DELETE … RETURNING``), their side tables,
   the earliest duplicate promoted when the original is deleted or changes subject;
3. new rows inserted (``INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING RETURNING``) in
   stream order; the refused ones are filed in ``duplicate_record`` under their holder,
   whose row is locked so that a concurrent delete of it cannot miss them;
4. notifications deleted and inserted (thread mutes applied), quote counts recounted (the
   TypeScript indexer's definition).

At the end of the batch the aggregates change by the deltas of the rows actually inserted and
deleted (exact without a COUNT per event), in key order, and ``actor_sync`` advances to the
highest rev seen. The result equals applying the events one at a time in order (the property
tests check this). Replies to a thread gated by follower/list rules and account/identity
events run as waves of their own. Deadlocks and serialization failures are left to the
caller, which retries the batch: ``apply_batch`` can run again on the same items.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from psky.atproto.lexicon import Lexicons, ValidationError
from psky.indexer.plugins import PLUGINS, Notif, Plugin, RecordOp, SkipRecord
from psky.indexer.plugins.post import POST, gate_uri, reply_refs
from psky.streams.wire import (
    SEQ_BACKFILL,
    AccountEvent,
    DeleteEvent,
    IdentityEvent,
    RecordEvent,
    RepoEvent,
    StreamEvent,
)

__all__ = ["BatchResult", "Item", "WaveContext", "apply_batch", "prepare_items"]

log = logging.getLogger("psky.indexer")

_PG_ARRAY = {"text": "text[]", "jsonb": "text[]", "bool": "bool[]", "int": "bigint[]"}
_SQL_CACHE: dict[tuple[Any, ...], str] = {}


@dataclass(slots=True)
class Item:
    """One stream event on its way into the database."""

    event: StreamEvent
    notify: bool
    op: RecordOp | None = None
    plugin: Plugin | None = None
    #: why the event is not indexed (counted by reason), None when it is
    skipped: str | None = None
    #: duplicate key of the row the database holds for this URI (deletes and updates)
    prior_key: tuple[str, ...] | None = None
    #: new handle resolved before the transaction, for identity/account/profile events
    handle: tuple[str | None, bool] | None = None


@dataclass(slots=True)
class BatchResult:
    indexed: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stale: int = 0
    waves: int = 0
    notifications: int = 0


def prepare_items(events: Iterable[tuple[StreamEvent, bool]], lexicons: Lexicons | None) -> list[Item]:
    """Validate records and build rows (no I/O): skipped events carry their reason."""
    items: list[Item] = []
    for order, (event, notify) in enumerate(events):
        item = Item(event, notify)
        items.append(item)
        if not isinstance(event, (RecordEvent, DeleteEvent)):
            continue
        plugin = PLUGINS.get(event.collection)
        if plugin is None:
            item.skipped = "unknown_collection"
            continue
        record: dict[str, Any] | None = None
        cid = ""
        if isinstance(event, RecordEvent):
            record, cid = event.record, event.cid
            if lexicons is not None:
                try:
                    lexicons.validate_record(event.collection, record)
                except ValidationError as e:
                    item.skipped = "invalid_record"
                    log.debug("invalid record skipped", extra={"uri": event.uri, "error": str(e)})
                    continue
        op = RecordOp(
            kind=event.type, uri=event.uri, did=event.did, collection=event.collection, rkey=event.rkey,
            cid=cid, record=record, rev=event.rev, indexed_at=event.time, notify=notify, order=order,
        )  # fmt: skip
        if record is not None:
            try:
                op.row = _build_row(plugin, op)
            except SkipRecord as e:
                item.skipped = e.reason
                log.debug("record skipped", extra={"uri": event.uri, "reason": e.reason, "error": str(e)})
                continue
        item.op, item.plugin = op, plugin
    return items


def _build_row(plugin: Plugin, op: RecordOp) -> tuple[Any, ...] | None:
    if plugin.table is None or (plugin.self_only and op.rkey != "self"):
        return None
    return plugin.row(op)


# --- the wave context: what plugins use to talk to the database ---------------------------


class Totals:
    """Aggregate deltas and quote recounts of a whole batch, written at its end in key order
    (they commute, and one sorted pass keeps concurrent batches from deadlocking on them)."""

    def __init__(self, conn: asyncpg.Connection, fresh: set[str] | None = None) -> None:
        self.conn = conn
        self.agg: dict[tuple[str, str, str], int] = defaultdict(int)
        #: quote counts: subject -> (CID counted, count at its last recount in this batch)
        self.quotes: dict[str, tuple[str, int]] = {}
        #: subjects whose quotes were removed after their last recount without a new one
        #: (the TypeScript indexer's post deletion): their count stays as last recounted
        self.frozen_quotes: set[str] = set()
        #: URIs whose ``record`` row is still this batch's placeholder (no version indexed)
        self.fresh: set[str] = fresh if fresh is not None else set()


class WaveContext:
    """One wave's view of the transaction plus what it accumulates for the final steps."""

    def __init__(
        self, conn: asyncpg.Connection, ops: Mapping[str, RecordOp], totals: Totals | None = None
    ) -> None:
        self.conn = conn
        self.ops = ops
        self.scratch: dict[str, Any] = {}
        totals = totals if totals is not None else Totals(conn)
        self.totals = totals
        #: aggregate deltas and quote recounts, applied once per batch (see Totals)
        self.agg = totals.agg
        #: quote counts are recounts (as the TypeScript indexer defines them), so they are
        #: taken where one-by-one application would take them: at the end of the wave
        self.quotes: dict[str, str] = {}
        self.notifs: list[Notif] = []
        self.notif_deletes: list[str] = []

    async def execute(self, sql: str, *args: Any) -> str:
        return str(await self.conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.conn.fetchrow(sql, *args)

    def notify_for(self, uri: str) -> bool:
        op = self.ops.get(uri)
        return op is not None and op.notify

    def record_of(self, uri: str) -> dict[str, Any] | None:
        op = self.ops.get(uri)
        return op.record if op is not None else None

    def recount_quotes(self, subject: str, cid: str) -> None:
        self.quotes[subject] = cid

    def quotes_removed(self, subjects: Sequence[str]) -> None:
        """Quotes of these posts were deleted without a recount (see :class:`Totals`)."""
        self.totals.frozen_quotes.update(s for s in subjects if s in self.totals.quotes)

    async def insert_rows(
        self,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
        suffix: str = "ON CONFLICT DO NOTHING",
    ) -> list[asyncpg.Record]:
        if not rows:
            return []
        key = (table, tuple(columns), suffix)
        sql = _SQL_CACHE.get(key)
        if sql is None:
            sql = _SQL_CACHE[key] = _insert_sql(table, columns, suffix)
        arrays = [list(col) for col in zip(*rows, strict=True)]
        for i, (_, kind) in enumerate(columns):
            if kind in ("text", "jsonb"):
                arrays[i] = _clean_text(arrays[i])
        if "RETURNING" in suffix:
            return list(await self.conn.fetch(sql, *arrays))
        await self.conn.execute(sql, *arrays)
        return []

    async def insert_feed_items(self, rows: Sequence[Sequence[Any]]) -> None:
        await self.insert_rows(
            "feed_item",
            (("uri", "text"), ("cid", "text"), ("type", "text"), ("postUri", "text"),
             ("originatorDid", "text"), ("sortAt", "text")),
            rows,
        )  # fmt: skip


def _insert_sql(table: str, columns: Sequence[tuple[str, str]], suffix: str) -> str:
    names = ", ".join(f'"{c}"' for c, _ in columns)
    params = ", ".join(f"${i + 1}::{_PG_ARRAY[t]}" for i, (_, t) in enumerate(columns))
    alias = ", ".join(f"c{i}" for i in range(len(columns)))
    select = ", ".join(f"t.c{i}::jsonb" if t == "jsonb" else f"t.c{i}" for i, (_, t) in enumerate(columns))
    return f'INSERT INTO "{table}" ({names}) SELECT {select} FROM unnest({params}) AS t({alias}) {suffix}'


def _clean_text(values: list[Any]) -> list[Any]:
    """PostgreSQL text cannot hold NUL: such characters are dropped (records keep them in
    ``record.json``, where they are escaped)."""
    for i, v in enumerate(values):
        if type(v) is str and "\x00" in v:
            values[i] = v.replace("\x00", "")
        elif v is not None and type(v) is not str:
            values[i] = str(v)
    return values


# --- planning --------------------------------------------------------------------------


@dataclass(slots=True)
class _Wave:
    items: list[Item] = field(default_factory=list)
    writes: set[str] = field(default_factory=set)
    shared: set[str] = field(default_factory=set)
    reads: set[str] = field(default_factory=set)
    readable: set[str] = field(default_factory=set)
    actor: bool = False  # account/identity events: applied alone


_POST_TREE = "post-tree"


def _dup_key_name(plugin: Plugin, key: tuple[str, ...] | None) -> str | None:
    return None if key is None else f"dup:{plugin.table}:" + "\x1f".join(key)


@dataclass(slots=True)
class _Keys:
    """What a record event touches, for wave planning. ``shared`` are duplicate keys of
    creates: two creates of one key may share a wave (the first inserted wins, as one at a
    time); ``readable`` is a post a later reply in the same wave may read (its record and
    flags are handed over in memory, see ``Post.prepare``)."""

    writes: set[str]
    shared: set[str]
    reads: set[str]
    readable: str | None
    alone: bool


def _keys(item: Item, gated_roots: set[str]) -> _Keys:
    op, plugin = item.op, item.plugin
    assert op is not None and plugin is not None
    keys = _Keys({op.uri, *plugin.write_keys(op.did, op.rkey, op.record)}, set(), set(), None, False)
    if op.record is not None:
        keys.reads.update(plugin.read_keys(op.did, op.rkey, op.record))
        new_key = _dup_key_name(plugin, plugin.dup_key(op.did, op.record)) if plugin.unique else None
        if new_key:
            (keys.shared if op.kind == "create" else keys.writes).add(new_key)
        if op.collection == POST:
            root = reply_refs(op.record)[0]
            keys.alone = bool(root and gate_uri(root) in gated_roots)
            keys.readable = op.uri
    prior = _dup_key_name(plugin, item.prior_key) if plugin.unique else None
    if prior:
        keys.writes.add(prior)
    if op.collection == POST:
        if op.kind != "create":
            # a removed post changes the reply chains that reply notifications walk
            keys.writes.update((f"quote:{op.uri}", f"feed:{op.uri}", _POST_TREE))
        if op.notify and op.record is not None and "reply" in op.record:
            keys.reads.add(_POST_TREE)
    if op.collection == "app.bsky.feed.repost" and op.record is not None:
        subject = op.record.get("subject")
        if isinstance(subject, dict) and type(subject.get("uri")) is str:
            keys.writes.add(f"feed:{subject['uri']}")
    return keys


def _plan(items: list[Item], gated_roots: set[str]) -> list[_Wave]:
    waves: list[_Wave] = []
    wave = _Wave()
    for item in items:
        if item.skipped is not None or isinstance(item.event, RepoEvent):
            continue
        if isinstance(item.event, (AccountEvent, IdentityEvent)):
            if wave.items:
                waves.append(wave)
                wave = _Wave()
            waves.append(_Wave(items=[item], actor=True))
            continue
        k = _keys(item, gated_roots)
        if wave.items and (
            k.alone
            or not k.writes.isdisjoint(wave.writes)
            or not k.writes.isdisjoint(wave.shared)
            or not k.writes.isdisjoint(wave.reads)
            or not k.shared.isdisjoint(wave.writes)
            or not k.shared.isdisjoint(wave.reads)
            or not (k.reads - wave.readable).isdisjoint(wave.writes)
            or not k.reads.isdisjoint(wave.shared)
        ):
            waves.append(wave)
            wave = _Wave()
        wave.items.append(item)
        wave.writes |= k.writes
        wave.shared |= k.shared
        wave.reads |= k.reads
        if k.readable:
            wave.readable.add(k.readable)
        if k.alone:
            waves.append(wave)
            wave = _Wave()
    if wave.items:
        waves.append(wave)
    return waves


async def _read_prior_keys(conn: asyncpg.Connection, items: list[Item]) -> None:
    """Duplicate key of the version each delete or update replaces (for planning): the
    latest one written earlier in this batch, else the row in the database."""
    by_plugin: dict[str, list[str]] = defaultdict(list)
    for item in items:
        if (
            item.op is not None
            and item.plugin is not None
            and item.plugin.unique
            and item.op.kind != "create"
        ):
            by_plugin[item.op.collection].append(item.op.uri)
    in_db: dict[str, tuple[str, ...]] = {}
    for collection, uris in by_plugin.items():
        plugin = PLUGINS[collection]
        cols = ", ".join(f'"{c}"' for c in plugin.unique)
        rows = await conn.fetch(f'SELECT uri, {cols} FROM "{plugin.table}" WHERE uri = ANY($1::text[])', uris)
        in_db.update((r["uri"], tuple(str(r[c]) for c in plugin.unique)) for r in rows)
    latest: dict[str, tuple[str, ...] | None] = {}
    for item in items:
        op, owner = item.op, item.plugin
        if op is None or owner is None or not owner.unique:
            continue
        item.prior_key = latest[op.uri] if op.uri in latest else in_db.get(op.uri)
        latest[op.uri] = owner.dup_key(op.did, op.record) if op.record is not None else None


async def _gated_roots(conn: asyncpg.Connection, items: list[Item]) -> set[str]:
    """Roots of replies in this batch whose thread gate exists or is written in the batch."""
    gates: set[str] = set()
    written: set[str] = set()
    for item in items:
        op = item.op
        if op is None:
            continue
        if op.collection == "app.bsky.feed.threadgate":
            written.add(op.uri)
        elif op.collection == POST and op.record is not None:
            root = reply_refs(op.record)[0]
            if root:
                gates.add(gate_uri(root))
    if not gates:
        return set()
    found = gates & written
    missing = sorted(gates - found)
    if missing:
        rows = await conn.fetch("SELECT uri FROM record WHERE uri = ANY($1::text[]) AND json <> ''", missing)
        found.update(r["uri"] for r in rows)
    return found


# --- executing -------------------------------------------------------------------------

_UPSERT_RECORDS = (
    'INSERT INTO record (uri, cid, did, json, rev, "indexedAt")'
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])"
    " ON CONFLICT (uri) DO UPDATE SET rev = excluded.rev, cid = excluded.cid, json = excluded.json,"
    ' "indexedAt" = excluded."indexedAt"'
    " WHERE record.rev < excluded.rev OR (record.rev = excluded.rev AND record.cid <> excluded.cid)"
    " RETURNING uri, xmax <> 0 AS existed"
)
_TOMBSTONES = (
    'INSERT INTO record (uri, cid, did, json, rev, "indexedAt")'
    " SELECT t.uri, '', t.did, '', t.rev, t.at FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
    " AS t(uri, did, rev, at)"
    " ON CONFLICT (uri) DO UPDATE SET rev = excluded.rev, cid = '', json = ''"
    " WHERE record.rev < excluded.rev OR (record.rev = excluded.rev AND record.json <> '') RETURNING uri"
)


def _record_json(record: dict[str, Any]) -> str:
    return orjson.dumps(record).decode()


async def _run_wave(
    conn: asyncpg.Connection, wave: _Wave, result: BatchResult, lexicons: Lexicons | None, totals: Totals
) -> None:
    ops = [item.op for item in wave.items if item.op is not None]
    writes = sorted((op for op in ops if op.record is not None), key=lambda o: o.uri)
    deletes = sorted((op for op in ops if op.record is None), key=lambda o: o.uri)
    applied: set[str] = set()
    replacing: set[str] = set()
    if writes:
        rows = await conn.fetch(
            _UPSERT_RECORDS,
            [o.uri for o in writes], [o.cid for o in writes], [o.did for o in writes],
            _clean_text([_record_json(o.record) for o in writes if o.record is not None]),
            [o.rev for o in writes], [o.indexed_at for o in writes],
        )  # fmt: skip
        applied.update(r["uri"] for r in rows)
        # a create over an older version (its delete not indexed yet, e.g. handled by another
        # consumer later) replaces that version like an update does
        replacing = {r["uri"] for r in rows if r["existed"] and r["uri"] not in totals.fresh}
        totals.fresh.difference_update(r["uri"] for r in rows)
    if deletes:
        rows = await conn.fetch(
            _TOMBSTONES,
            [o.uri for o in deletes], [o.did for o in deletes], [o.rev for o in deletes],
            [o.indexed_at for o in deletes],
        )  # fmt: skip
        applied.update(r["uri"] for r in rows)
        totals.fresh.difference_update(r["uri"] for r in rows)
    live = [op for op in ops if op.uri in applied]
    for op in live:
        if op.kind == "create" and op.uri in replacing:
            op.kind = "update"
    result.stale += len(ops) - len(live)
    ctx = WaveContext(conn, {op.uri: op for op in live}, totals)
    deleted_uris = [op.uri for op in live if op.kind == "delete"]
    if deleted_uris:
        await conn.execute("DELETE FROM duplicate_record WHERE uri = ANY($1::text[])", deleted_uris)

    by_plugin: dict[str, list[RecordOp]] = defaultdict(list)
    for op in live:
        by_plugin[op.collection].append(op)
    # 2. removals (deletes and the old version of updates), promotions
    promoted: list[RecordOp] = []
    for collection, group in by_plugin.items():
        plugin = PLUGINS[collection]
        removing = [op for op in group if op.kind != "create"]
        if not removing or plugin.table is None:
            continue
        uris = [op.uri for op in removing]
        rows = await conn.fetch(f'DELETE FROM "{plugin.table}" WHERE uri = ANY($1::text[]) RETURNING *', uris)
        by_uri = {op.uri: op for op in removing}
        gone = {r["uri"]: r for r in rows}
        replacements: set[str] = set()
        if plugin.unique:
            # the key a deleted row held, or an updated row gave up, goes to the earliest
            # duplicate (the TypeScript indexer promotes on delete only, leaving a live
            # record unindexed when the original changes subject)
            freed = [r["uri"] for r in rows if _frees_key(plugin, r, by_uri[r["uri"]])]
            if freed:
                mine = await _promotions(conn, plugin, freed, by_uri, lexicons)
                promoted += mine
                replacements.update(p.replaces for p in mine if p.replaces)
                if mine:
                    # the promoted record is no longer a duplicate; the original's other
                    # duplicates now duplicate it
                    await conn.execute(
                        "DELETE FROM duplicate_record WHERE uri = ANY($1::text[])",
                        sorted(p.uri for p in mine),
                    )
                    await conn.execute(
                        'UPDATE duplicate_record d SET "duplicateOf" = t.holder'
                        " FROM unnest($1::text[], $2::text[]) AS t(original, holder)"
                        ' WHERE d."duplicateOf" = t.original',
                        [p.replaces for p in mine],
                        [p.uri for p in mine],
                    )
        for row in rows:
            _agg(ctx, plugin, row, -1)
            op = by_uri[row["uri"]]
            if op.notify:
                replaced = op.kind == "update" or row["uri"] in replacements
                notifs, delete_own = plugin.notifs_for_delete(row, replaced, op)
                ctx.notifs.extend(notifs)
                if delete_own:
                    ctx.notif_deletes.append(row["uri"])
        await plugin.after_delete(list(rows), uris, ctx)
        for op in removing:
            if op.kind == "delete":
                result.indexed[(collection, "delete")] += 1
            op.had_row = op.uri in gone
    # 3. inserts, in stream order
    for p in promoted:
        by_plugin[p.collection].append(p)
    for collection, group in by_plugin.items():
        plugin = PLUGINS[collection]
        adding = sorted((op for op in group if op.kind != "delete"), key=lambda o: o.order)
        if not adding:
            continue
        for op in adding:
            result.indexed[(collection, op.kind)] += 1
            op.row = _build_row(plugin, op)
        if plugin.table is None:
            continue
        await plugin.prepare(adding, ctx)
        attempts = [op for op in adding if op.row is not None]
        inserted = await ctx.insert_rows(
            plugin.table, plugin.columns, [op.row for op in attempts if op.row is not None],
            "ON CONFLICT DO NOTHING RETURNING *",
        )  # fmt: skip
        new = {r["uri"] for r in inserted}
        for row in inserted:
            _agg(ctx, plugin, row, +1)
        await plugin.after_insert(inserted, attempts, ctx)
        by_uri = {op.uri: op for op in attempts}
        for row in inserted:
            op = by_uri[row["uri"]]
            if not op.notify or op.kind == "promote":
                continue
            if op.kind == "update" and op.had_row:
                notifs = plugin.notifs_for_insert(row, ctx) if plugin.renotify_on_update else []
            else:
                notifs = plugin.notifs_for_insert(row, ctx)
            ctx.notifs.extend(notifs)
        if plugin.unique:
            await _duplicates(
                conn,
                plugin,
                [op for op in attempts if op.uri not in new],
                [op.uri for op in attempts if op.uri in new and op.kind == "update"],
            )
    # 4. notifications, quote counts (other aggregates at the end of the batch)
    result.notifications += await _write_notifications(ctx)
    await _write_quote_counts(ctx)


def _frees_key(plugin: Plugin, row: Mapping[str, Any], op: RecordOp) -> bool:
    if op.kind == "delete" or op.record is None:
        return True
    return plugin.row_key(row) != plugin.dup_key(op.did, op.record)


def _agg(ctx: WaveContext, plugin: Plugin, row: Mapping[str, Any], sign: int) -> None:
    for key in plugin.agg_keys(row):
        if key.key:
            ctx.agg[(key.table, key.key, key.column)] += sign


async def _promotions(
    conn: asyncpg.Connection,
    plugin: Plugin,
    freed: list[str],
    deletes: Mapping[str, RecordOp],
    lexicons: Lexicons | None,
) -> list[RecordOp]:
    """The earliest duplicate of each deleted original takes its place."""
    rows = await conn.fetch(
        'SELECT DISTINCT ON (d."duplicateOf") d."duplicateOf" AS original, d.uri, d.cid, d."indexedAt", r.json, r.rev'
        " FROM duplicate_record d JOIN record r ON r.uri = d.uri"
        " WHERE d.\"duplicateOf\" = ANY($1::text[]) AND r.json <> ''"
        ' ORDER BY d."duplicateOf", d."indexedAt", d.uri',
        freed,
    )
    out: list[RecordOp] = []
    for r in rows:
        try:
            record = orjson.loads(r["json"])
            if not isinstance(record, dict):
                continue
            if lexicons is not None:
                lexicons.validate_record(plugin.collection, record)
        except (orjson.JSONDecodeError, ValidationError):
            continue
        uri: str = r["uri"]
        did, _, rest = uri[5:].partition("/")
        collection, _, rkey = rest.partition("/")
        original = deletes[r["original"]]
        op = RecordOp(
            kind="promote", uri=uri, did=did, collection=collection, rkey=rkey, cid=r["cid"], record=record,
            rev=r["rev"], indexed_at=r["indexedAt"], notify=False, order=original.order, replaces=r["original"],
        )  # fmt: skip
        out.append(op)
    return out


async def _duplicates(
    conn: asyncpg.Connection, plugin: Plugin, refused: list[RecordOp], kept_updates: list[str]
) -> None:
    """Records whose row was refused by the duplicate key are filed under its holder."""
    if kept_updates:
        await conn.execute("DELETE FROM duplicate_record WHERE uri = ANY($1::text[])", kept_updates)
    keyed: list[tuple[RecordOp, tuple[str, ...]]] = []
    for op in refused:
        if op.record is not None and op.kind != "promote":
            k = plugin.dup_key(op.did, op.record)
            if k is not None:
                keyed.append((op, k))
    if not keyed:
        return
    cols = plugin.unique
    arrays = [[k[i] for _, k in keyed] for i in range(len(cols))]
    match = " AND ".join(f't."{c}" = k.c{i}' for i, c in enumerate(cols))
    params = ", ".join(f"${i + 1}::text[]" for i in range(len(cols)))
    alias = ", ".join(f"c{i}" for i in range(len(cols)))
    select = ", ".join(f"k.c{i}" for i in range(len(cols)))
    # the holders are locked: a consumer deleting one concurrently either finished (its row
    # is gone: retry the batch, the key is free now) or waits for this transaction, and then
    # finds the duplicate filed here and promotes it
    rows = await conn.fetch(
        f'SELECT t.uri, {select} FROM "{plugin.table}" t JOIN unnest({params}) AS k({alias}) ON {match}'
        " ORDER BY t.uri FOR UPDATE OF t",
        *arrays,
    )
    holders = {tuple(str(r[f"c{i}"]) for i in range(len(cols))): r["uri"] for r in rows}
    dups = []
    for op, key in keyed:
        holder = holders.get(key)
        if holder is None:
            raise asyncpg.exceptions.SerializationError(
                f"the holder of the duplicate key of {op.uri} was removed concurrently"
            )
        if holder != op.uri:
            dups.append((op.uri, op.cid, holder, op.indexed_at))
    if dups:
        dups.sort()
        await conn.execute(
            'INSERT INTO duplicate_record (uri, cid, "duplicateOf", "indexedAt")'
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
            ' ON CONFLICT (uri) DO UPDATE SET cid = excluded.cid, "duplicateOf" = excluded."duplicateOf",'
            ' "indexedAt" = excluded."indexedAt"',
            *[list(c) for c in zip(*dups, strict=True)],
        )
        # a record filed here may have held the key until now (re-indexed after an older
        # record took it): its duplicates go with it to the new holder
        await conn.execute(
            'UPDATE duplicate_record d SET "duplicateOf" = t.holder'
            " FROM unnest($1::text[], $2::text[]) AS t(dup, holder)"
            ' WHERE d."duplicateOf" = t.dup',
            [d[0] for d in dups],
            [d[2] for d in dups],
        )


async def _write_notifications(ctx: WaveContext) -> int:
    if ctx.notif_deletes:
        await ctx.conn.execute(
            'DELETE FROM notification WHERE "recordUri" = ANY($1::text[])', sorted(ctx.notif_deletes)
        )
    if not ctx.notifs:
        return 0
    cols = [list(c) for c in zip(*ctx.notifs, strict=True)]
    status = await ctx.conn.execute(
        'INSERT INTO notification (did, "recordUri", "recordCid", author, reason, "reasonSubject", "sortAt")'
        " SELECT t.did, t.ru, t.rc, t.au, t.re, t.rs, t.sa"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])"
        " WITH ORDINALITY AS t(did, ru, rc, au, re, rs, sa, n)"
        " WHERE NOT EXISTS (SELECT 1 FROM post p JOIN thread_mute m"
        ' ON m."rootUri" = COALESCE(p."replyRoot", p.uri) AND m."mutedByDid" = t.did WHERE p.uri = t.rs)'
        " ORDER BY t.n",
        *[_clean_text(c) for c in cols],
    )
    return int(str(status).rsplit(" ", 1)[-1])


_AGG_COLUMNS = {
    "post_agg": ("uri", ("likeCount", "replyCount", "repostCount")),
    "profile_agg": ("did", ("followersCount", "followsCount", "postsCount")),
}


async def _write_aggregates(ctx: Totals) -> None:
    """One upsert per counter table, rows in key order (this locks them in one consistent
    order for every batch), then the quote counts on the already locked ``post_agg`` rows: a
    recount now (a new statement sees every quote committed by batches that held these rows
    before), or the frozen value where the TypeScript definition leaves it stale."""
    gone = await _deleted_accounts(ctx)
    for table, (key_col, columns) in _AGG_COLUMNS.items():
        deltas: dict[str, list[int]] = {}
        for (t, key, column), delta in ctx.agg.items():
            if t == table and delta:
                deltas.setdefault(key, [0, 0, 0])[columns.index(column)] += delta
        if table == "post_agg":
            # a counter row for quotes to land on; a recount that found none creates no row
            # (absent is 0, and the result then does not depend on the order of batches)
            for subject, (_, n) in ctx.quotes.items():
                if n > 0:
                    deltas.setdefault(subject, [0, 0, 0])
        # counters of deleted accounts (and their posts) are not brought back by late deltas
        for key in [k for k in deltas if _account_of(k) in gone]:
            del deltas[key]
        if not deltas:
            continue
        keys = sorted(deltas)
        sets = ", ".join(f'"{c}" = GREATEST(0, {table}."{c}" + excluded."{c}")' for c in columns)
        await ctx.conn.execute(
            f'INSERT INTO {table} ("{key_col}", "{columns[0]}", "{columns[1]}", "{columns[2]}")'
            " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(k, a, b, c) ORDER BY k"
            f' ON CONFLICT ("{key_col}") DO UPDATE SET {sets}',
            keys, [deltas[k][0] for k in keys], [deltas[k][1] for k in keys], [deltas[k][2] for k in keys],
        )  # fmt: skip
        # a counter created by a decrement (its subject's increments were never indexed) is 0
        await ctx.conn.execute(
            f'UPDATE {table} SET "{columns[0]}" = GREATEST(0, "{columns[0]}"), "{columns[1]}" = GREATEST(0, "{columns[1]}"),'
            f' "{columns[2]}" = GREATEST(0, "{columns[2]}") WHERE "{key_col}" = ANY($1::text[])'
            f' AND LEAST("{columns[0]}", "{columns[1]}", "{columns[2]}") < 0',
            keys,
        )
    if ctx.quotes:
        subjects = sorted(s for s in ctx.quotes if _account_of(s) not in gone)
        frozen = [s in ctx.frozen_quotes for s in subjects]
        await ctx.conn.execute(
            'UPDATE post_agg a SET "quoteCount" = CASE WHEN t.frozen THEN t.n ELSE (SELECT count(*) FROM quote q'
            ' WHERE q.subject = t.s AND q."subjectCid" = t.c) END'
            " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bool[]) AS t(s, c, n, frozen) WHERE a.uri = t.s",
            subjects,
            [ctx.quotes[s][0] for s in subjects],
            [ctx.quotes[s][1] for s in subjects],
            frozen,
        )


def _account_of(key: str) -> str:
    """The DID a counter belongs to: a profile_agg key is one, a post_agg key an AT-URI."""
    return key[5:].split("/", 1)[0] if key.startswith("at://") else key


async def _deleted_accounts(ctx: Totals) -> set[str]:
    dids = {_account_of(key) for (_, key, _), delta in ctx.agg.items() if delta} | {
        _account_of(s) for s in ctx.quotes
    }
    if not dids:
        return set()
    rows = await ctx.conn.fetch(
        "SELECT did FROM actor WHERE did = ANY($1::text[]) AND \"upstreamStatus\" = 'deleted'", sorted(dids)
    )
    return {r["did"] for r in rows}


async def _write_quote_counts(ctx: WaveContext) -> None:
    """Count the quotes of the subjects this wave recounts (a plain read: the counters are
    written, locked in key order, at the end of the batch)."""
    if not ctx.quotes:
        return
    subjects = sorted(ctx.quotes)
    rows = await ctx.conn.fetch(
        'SELECT t.s, (SELECT count(*) FROM quote q WHERE q.subject = t.s AND q."subjectCid" = t.c) AS n'
        " FROM unnest($1::text[], $2::text[]) AS t(s, c)",
        subjects,
        [ctx.quotes[s] for s in subjects],
    )
    for row in rows:
        ctx.totals.quotes[row["s"]] = (ctx.quotes[row["s"]], int(row["n"]))
        ctx.totals.frozen_quotes.discard(row["s"])


# --- the batch -------------------------------------------------------------------------


async def _actor_sync(conn: asyncpg.Connection, items: list[Item]) -> None:
    """``actor_sync`` per DID: the highest rev of live commits and backfilled repos."""
    best: dict[str, tuple[str, str]] = {}
    for item in items:
        e = item.event
        if item.skipped == "account_deleted":
            continue
        if isinstance(e, RepoEvent) or (isinstance(e, (RecordEvent, DeleteEvent)) and e.seq != SEQ_BACKFILL):
            if not e.commit or not e.rev:
                continue
            prev = best.get(e.did)
            if prev is None or e.rev > prev[1]:
                best[e.did] = (e.commit, e.rev)
    if not best:
        return
    dids = sorted(best)
    await conn.execute(
        'INSERT INTO actor_sync (did, "commitCid", "repoRev")'
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ORDER BY 1"
        ' ON CONFLICT (did) DO UPDATE SET "commitCid" = excluded."commitCid", "repoRev" = excluded."repoRev"'
        ' WHERE actor_sync."repoRev" IS NULL OR actor_sync."repoRev" < excluded."repoRev"',
        dids,
        [best[d][0] for d in dids],
        [best[d][1] for d in dids],
    )


#: ``actor."indexedAt"`` of an account whose handle was never resolved: any resolution is newer.
NEVER_INDEXED = "1970-01-01T00:00:00.000Z"

_LOCK_RECORDS = (
    'INSERT INTO record (uri, cid, did, json, rev, "indexedAt")'
    " SELECT t.uri, '', t.did, '', '', t.at FROM unnest($1::text[], $2::text[], $3::text[]) AS t(uri, did, at)"
    " ORDER BY t.uri ON CONFLICT (uri) DO UPDATE SET rev = record.rev WHERE false RETURNING uri"
)


async def _lock_records(conn: asyncpg.Connection, items: list[Item]) -> set[str]:
    """Lock every record row the batch touches, in URI order, before any wave runs: waves
    write in several passes, and two batches sharing URIs (a live event and the backfill of
    the same record, a redelivery) would otherwise deadlock. A URI not yet indexed gets a
    placeholder (rev ``''``, older than any real rev) that the batch's first write replaces."""
    rows: dict[str, tuple[str, str]] = {}
    for item in items:
        if item.op is not None and item.skipped is None:
            rows.setdefault(item.op.uri, (item.op.did, item.op.indexed_at))
    if not rows:
        return set()
    uris = sorted(rows)
    placed = await conn.fetch(_LOCK_RECORDS, uris, [rows[u][0] for u in uris], [rows[u][1] for u in uris])
    return {r["uri"] for r in placed}  # the placeholders: URIs new to the database


#: first key of the transaction-level advisory locks that order account deletions with batches
ACCOUNT_LOCK_CLASS = 0x70736B79  # "psky"
#: accounts share this many locks (the second key is a bucket of the DID's hash): a batch takes
#: at most this many, which keeps concurrent batches far below PostgreSQL's shared lock table
#: (max_locks_per_transaction × max_connections, 6,400 by default); a shared bucket only makes
#: an account deletion — rare — wait for the batches in flight
ACCOUNT_LOCK_BUCKETS = 64


def account_lock_key(did: str) -> int:
    """The advisory lock bucket of an account."""
    return int.from_bytes(hashlib.blake2b(did.encode(), digest_size=4).digest(), "big") % ACCOUNT_LOCK_BUCKETS


async def _skip_deleted_accounts(
    conn: asyncpg.Connection, items: list[Item], result: BatchResult
) -> set[str]:
    """Records of accounts deleted in an earlier batch are not indexed again (an older batch
    redelivered or handled late by another consumer would bring them back).

    Runs first in the batch. It takes a shared advisory lock for the accounts of the batch (one
    per bucket, in key order; shared locks never wait for each other), and an account deletion
    takes its account's lock exclusively before it removes anything, so the two are always ordered: the deletion
    waits for this batch and then removes what it wrote, or this batch waits for the deletion
    and then reads its marker. (A row lock on ``actor`` would do the same but batches would
    then deadlock upgrading it when they write handles and statuses.)"""
    dids = sorted({item.event.did for item in items if item.skipped is None})
    if not dids:
        return set()
    await conn.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock_shared($1::int4, k)"
        " FROM (SELECT DISTINCT k FROM unnest($2::int4[]) AS k ORDER BY k) AS t",
        ACCOUNT_LOCK_CLASS,
        [account_lock_key(d) for d in dids],
    )
    rows = await conn.fetch(
        "SELECT did FROM actor WHERE did = ANY($1::text[]) AND \"upstreamStatus\" = 'deleted'", dids
    )
    gone = {r["did"] for r in rows}
    for item in items:
        if item.op is not None and item.skipped is None and item.op.did in gone:
            item.skipped = "account_deleted"
            result.skipped["account_deleted"] += 1
    return gone


def _skip_after_deletion(items: list[Item], result: BatchResult) -> set[str]:
    """Records of an account that come after its deletion in the batch are not indexed. The
    deletion runs in stream order and removes what came before it; what follows it (a batch
    mixes the live and the backfill stream, and a repo fetched before the deletion reaches the
    backfill stream after it) would otherwise be indexed after the removal. Returns the
    accounts the batch leaves deleted (a newer reactivation in the batch undoes a deletion)."""
    deleted: dict[str, str] = {}
    for item in items:
        e = item.event
        if item.skipped is not None:
            continue
        if isinstance(e, AccountEvent):
            if not e.active and e.status == "deleted":
                deleted[e.did] = max(deleted.get(e.did, ""), e.time)
            elif e.active and e.did in deleted and e.time > deleted[e.did]:
                del deleted[e.did]
        elif item.op is not None and item.op.did in deleted:
            item.skipped = "account_deleted"
            result.skipped["account_deleted"] += 1
    return set(deleted)


async def apply_batch(
    conn: asyncpg.Connection,
    items: list[Item],
    *,
    lexicons: Lexicons | None,
    actors: Any = None,
) -> BatchResult:
    """Index prepared items in one transaction (the caller retries on deadlock and
    serialization failures: the items can be applied again as they are)."""
    result = BatchResult()
    for item in items:
        if item.skipped == "account_deleted":
            item.skipped = None
        if item.op is not None:  # a retry starts from the events again
            item.op.kind = item.event.type
            item.op.had_row = False
        if item.skipped is not None:
            result.skipped[item.skipped] += 1
    async with conn.transaction():
        # the batch's statements are short and many: JIT compilation (PostgreSQL's default above a
        # cost estimate) would cost more than it saves, and estimates on growing tables are rough
        await conn.execute("SET LOCAL jit = off")
        # accounts first, then records: the same order in every batch and in account deletions
        gone = await _skip_deleted_accounts(conn, items, result)
        gone |= _skip_after_deletion(items, result)
        fresh = await _lock_records(conn, items)
        await _read_prior_keys(conn, items)
        waves = _plan(items, await _gated_roots(conn, items))
        totals = Totals(conn, fresh)
        for wave in waves:
            if wave.actor:
                if actors is not None:
                    await actors.apply(conn, wave.items[0], totals)
            else:
                await _run_wave(conn, wave, result, lexicons, totals)
        result.waves = len(waves)
        await _write_aggregates(totals)
        await _actor_sync(conn, [i for i in items if i.event.did not in gone])
        if actors is not None:
            await actors.finish(conn, items)
    return result
