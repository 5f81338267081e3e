"""``psky reconcile DID…``: make the database hold exactly what an account's repo holds.

The TypeScript ``indexRepo``: resolve the DID's PDS, fetch ``getRepo`` (through the
backfiller's address guard), verify it fully, diff its records against the ``record`` rows
of the DID (``uri → cid``) and apply the creates, updates and deletes through the indexer's
set-wise path (:func:`psky.indexer.batch.apply_batch`) with the repo's rev and commit, so
the rev guard still refuses anything older than what the database already holds. Then
``actor_sync`` is advanced, and the aggregates the changed records feed are recounted: a
damaged database may hold counts that no longer match its rows, and deltas cannot fix that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import asyncpg
import orjson

from psky.atproto.lexicon import Lexicons
from psky.atproto.repo import VerifiedRepo
from psky.backfiller.fetch import Fatal, Permanent, Transient, fetch_repo
from psky.backfiller.hosts import AddressGuard, GuardedResolver
from psky.config import env_bool, env_float, env_int, env_list, env_str
from psky.identity import DEFAULT_PLC_URL, IdentityResolver, ResolutionError
from psky.indexer.actors import Actors
from psky.indexer.batch import BatchResult, apply_batch, prepare_items
from psky.streams.wire import SEQ_BACKFILL, DeleteEvent, RecordEvent, RepoEvent, StreamEvent, now_iso

__all__ = ["ReconcileOptions", "ReconcileResult", "Reconciler", "format_result", "recount_aggregates"]

log = logging.getLogger("psky.reconcile")
T = TypeVar("T")

#: events per indexer transaction (the backfiller's chunk size)
CHUNK = 500
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_POST, _LIKE, _REPOST, _FOLLOW = (
    "app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.feed.repost", "app.bsky.graph.follow",
)


@dataclass(slots=True)
class ReconcileOptions:
    plc_url: str = DEFAULT_PLC_URL
    handle_map: str = ""
    #: IPs, CIDRs or host names that may be private (the backfiller's BACKFILLER_ALLOW_HOSTS)
    allow_hosts: tuple[str, ...] = ()
    max_car_bytes: int = 256 * 1024 * 1024
    http_timeout_s: float = 60.0
    validate: bool = True
    pgbouncer: bool = False
    chunk: int = CHUNK

    @classmethod
    def from_env(cls, env: Mapping[str, str], allow: Sequence[str] = ()) -> ReconcileOptions:
        """The backfiller's and indexer's variables, plus ``allow`` from the command line."""
        return cls(
            plc_url=env_str("PLC_URL", DEFAULT_PLC_URL, env) or DEFAULT_PLC_URL,
            handle_map=env_str("PSKY_HANDLE_RESOLVER_MAP", "", env) or "",
            allow_hosts=(*env_list("BACKFILLER_ALLOW_HOSTS", (), env), *allow),
            max_car_bytes=env_int("BACKFILLER_MAX_CAR_BYTES", 256 * 1024 * 1024, env, minimum=1024),
            http_timeout_s=env_float("BACKFILLER_HTTP_TIMEOUT_SECS", 60.0, env, minimum=0.001),
            validate=env_bool("INDEXER_VALIDATE_RECORDS", True, env),
            pgbouncer=env_bool(("DB_PGBOUNCER", "PGBOUNCER"), False, env),
        )


@dataclass(slots=True)
class ReconcileResult:
    did: str
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    #: changes the rev guard refused (the database holds a newer version)
    stale: int = 0
    #: events the indexer did not index, by reason (invalid records, unknown collections, ...)
    skipped: dict[str, int] = field(default_factory=dict)
    rev: str = ""
    pds: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_obj(self) -> dict[str, Any]:
        return {
            "did": self.did, "ok": self.ok, "pds": self.pds, "rev": self.rev, "created": self.created,
            "updated": self.updated, "deleted": self.deleted, "unchanged": self.unchanged, "stale": self.stale,
            "skipped": dict(self.skipped), "error": self.error,
        }  # fmt: skip


def format_result(r: ReconcileResult) -> str:
    if r.error is not None:
        return f"{r.did}: FAILED: {r.error}"
    extra = ""
    if r.stale:
        extra += f", {r.stale} stale"
    if r.skipped:
        extra += ", skipped " + ", ".join(f"{k}={v}" for k, v in sorted(r.skipped.items()))
    return (f"{r.did}: {r.created} created, {r.updated} updated, {r.deleted} deleted, "
            f"{r.unchanged} unchanged (rev {r.rev}){extra}")


class Reconciler:
    """Reconciles DIDs one after another against one database (``async with`` it)."""

    def __init__(self, pool: asyncpg.Pool, options: ReconcileOptions, *, lexicons: Lexicons | None = None) -> None:
        self.pool = pool
        self.options = options
        self.guard = AddressGuard(options.allow_hosts)
        self.resolver = IdentityResolver(options.plc_url, timeout_s=min(options.http_timeout_s, 30.0),
                                         handle_map=options.handle_map)
        self.actors = Actors(self.resolver)
        self.lexicons = lexicons if lexicons is not None else (Lexicons.load() if options.validate else None)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Reconciler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.resolver.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.guard)),
                timeout=aiohttp.ClientTimeout(total=self.options.http_timeout_s),
                headers={"accept": "application/vnd.ipld.car", "user-agent": "psky-reconcile"},
            )
        return self._session

    async def reconcile(self, did: str) -> ReconcileResult:
        """One DID; failures are reported in the result, never raised (but database errors)."""
        result = ReconcileResult(did)
        repo = await self._fetch(did, result)
        if repo is None:
            return result
        await self._apply(did, repo, result)
        return result

    async def _fetch(self, did: str, result: ReconcileResult) -> VerifiedRepo | None:
        try:
            doc = await self.resolver.resolve(did)
        except ResolutionError as e:
            result.error = f"cannot resolve the DID: {e}"
            return None
        if not doc.pds_endpoint:
            result.error = "the DID document names no PDS (#atproto_pds service)"
            return None
        if not doc.signing_key:
            result.error = "the DID document has no #atproto signing key"
            return None
        result.pds = doc.pds_endpoint
        try:
            repo, _size = await fetch_repo(self._http(), self.guard, doc.pds_endpoint, did, doc.signing_key,
                                           max_car_bytes=self.options.max_car_bytes)
        except Permanent as e:
            result.error = f"repo not available at {doc.pds_endpoint}: {e.reason} (account {e.status})"
            return None
        except Fatal as e:
            hint = " (allow it with --allow-host or BACKFILLER_ALLOW_HOSTS)" if e.kind == "refused" else ""
            result.error = f"{e.kind}: {e.reason}{hint}"
            return None
        except Transient as e:
            result.error = f"temporary failure, try again: {e.reason}"
            return None
        if not repo.rev:
            result.error = "the repo's commit has no rev (not a v3 repo)"
            return None
        return repo

    async def _apply(self, did: str, repo: VerifiedRepo, result: ReconcileResult) -> None:
        commit, rev, now = repo.commit_cid.encode(), repo.rev or "", now_iso()  # rev checked in _fetch
        result.rev = rev
        wanted: dict[str, tuple[str, str, str, dict[str, Any]]] = {}
        for rec in repo.records():
            if rec.value is None:
                result.skipped["undecodable"] = result.skipped.get("undecodable", 0) + 1
                continue
            uri = f"at://{did}/{rec.collection}/{rec.rkey}"
            wanted[uri] = (rec.collection, rec.rkey, rec.cid.encode(), rec.value)
        rows = await self.pool.fetch("SELECT uri, cid FROM record WHERE did = $1 AND json <> ''", did)
        held: dict[str, str] = {r["uri"]: r["cid"] for r in rows}
        common: dict[str, Any] = {"seq": SEQ_BACKFILL, "time": now, "did": did, "commit": commit, "rev": rev}
        deletes: list[StreamEvent] = []
        updates: list[StreamEvent] = []
        creates: list[StreamEvent] = []
        for uri in sorted(held.keys() - wanted.keys()):
            collection, _, rkey = uri[len("at://") + len(did) + 1:].partition("/")
            deletes.append(DeleteEvent(collection=collection, rkey=rkey, **common))
        for uri, (collection, rkey, cid, value) in sorted(wanted.items()):
            old = held.get(uri)
            if old == cid:
                result.unchanged += 1
            elif old is None:
                creates.append(RecordEvent(type="create", collection=collection, rkey=rkey, cid=cid,
                                           record=value, **common))
            else:
                updates.append(RecordEvent(type="update", collection=collection, rkey=rkey, cid=cid,
                                           record=value, **common))
        changes = deletes + updates + creates
        profiles, posts = await _touched(self.pool, did, changes)
        # deletes first: a bogus row holding a duplicate key is gone before the real record comes
        events: list[StreamEvent] = [*changes, RepoEvent(time=now, did=did, commit=commit, rev=rev)]
        for start in range(0, len(events), self.options.chunk):
            batch = await self._batch(events[start:start + self.options.chunk])
            for (_collection, kind), n in batch.indexed.items():
                if kind == "create":
                    result.created += n
                elif kind == "update":
                    result.updated += n
                elif kind == "delete":
                    result.deleted += n
            result.stale += batch.stale
            for reason, n in batch.skipped.items():
                result.skipped[reason] = result.skipped.get(reason, 0) + n
        async with self.pool.acquire() as conn:
            await _retrying(lambda: recount_aggregates(conn, profiles, posts))

    async def _batch(self, events: list[StreamEvent]) -> BatchResult:
        items = prepare_items(((e, False) for e in events), self.lexicons)
        try:
            await self.actors.resolve(self.pool, items)
        except Exception as e:  # handles are re-checked later; records must not wait on them
            log.warning("handle resolution step failed", extra={"error": str(e)})
        async with self.pool.acquire() as conn:
            return await _retrying(lambda: apply_batch(conn, items, lexicons=self.lexicons, actors=self.actors))


async def _retrying(step: Callable[[], Awaitable[T]], attempts: int = 8) -> T:
    """*step* again on deadlock or serialization failure (the indexer's own retry)."""
    for attempt in range(attempts):
        try:
            return await step()
        except asyncpg.PostgresError as e:
            if getattr(e, "sqlstate", None) not in _RETRY_SQLSTATES or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def _subject_uri(record: Mapping[str, Any] | None) -> str | None:
    subject = (record or {}).get("subject")
    uri = subject.get("uri") if isinstance(subject, dict) else None
    return uri if isinstance(uri, str) else None


async def _touched(pool: asyncpg.Pool, did: str, changes: Iterable[StreamEvent]) -> tuple[set[str], set[str]]:
    """Profiles and posts whose aggregates the changes (old and new versions) feed."""
    profiles, posts = {did}, set()
    replaced: dict[str, list[str]] = {}
    for e in changes:
        if not isinstance(e, (RecordEvent, DeleteEvent)):
            continue
        if e.type != "create":
            replaced.setdefault(e.collection, []).append(e.uri)
        if not isinstance(e, RecordEvent):
            continue
        if e.collection == _FOLLOW and isinstance(e.record.get("subject"), str):
            profiles.add(e.record["subject"])
        elif e.collection in (_LIKE, _REPOST):
            subject = _subject_uri(e.record)
            if subject:
                posts.add(subject)
        elif e.collection == _POST:
            posts.add(e.uri)
            reply = e.record.get("reply")
            parent = _subject_uri({"subject": reply.get("parent")}) if isinstance(reply, dict) else None
            if parent:
                posts.add(parent)
    queries = {
        _FOLLOW: ('SELECT "subjectDid" AS k FROM follow WHERE uri = ANY($1::text[])', profiles),
        _LIKE: ('SELECT subject AS k FROM "like" WHERE uri = ANY($1::text[])', posts),
        _REPOST: ("SELECT subject AS k FROM repost WHERE uri = ANY($1::text[])", posts),
        _POST: ('SELECT "replyParent" AS k FROM post WHERE uri = ANY($1::text[])', posts),
    }
    for collection, uris in replaced.items():
        if collection == _POST:
            posts.update(uris)
        query = queries.get(collection)
        if query is not None:
            query[1].update(r["k"] for r in await pool.fetch(query[0], uris) if r["k"])
    return profiles, posts


async def recount_aggregates(conn: asyncpg.Connection, profiles: Iterable[str], posts: Iterable[str]) -> None:
    """Set the counters of *profiles* and *posts* to what the tables hold (as the indexer's
    deltas define them). The counter rows are locked first, so that the recount, a later
    statement, sees every row committed by a transaction that changed them before."""
    dids, uris = sorted(set(profiles)), sorted(set(posts))
    async with conn.transaction():
        if dids:
            await conn.execute(
                "INSERT INTO profile_agg (did) SELECT unnest($1::text[]) ORDER BY 1"
                " ON CONFLICT (did) DO UPDATE SET did = excluded.did", dids,
            )
            await conn.execute(
                'UPDATE profile_agg a SET "followersCount" = (SELECT count(*) FROM follow f WHERE f."subjectDid" = a.did),'
                ' "followsCount" = (SELECT count(*) FROM follow f WHERE f.creator = a.did),'
                ' "postsCount" = (SELECT count(*) FROM post p WHERE p.creator = a.did)'
                " WHERE a.did = ANY($1::text[])", dids,
            )  # fmt: skip
        if uris:
            await conn.execute(
                "INSERT INTO post_agg (uri) SELECT unnest($1::text[]) ORDER BY 1"
                " ON CONFLICT (uri) DO UPDATE SET uri = excluded.uri", uris,
            )
            await conn.execute(
                'UPDATE post_agg a SET "likeCount" = (SELECT count(*) FROM "like" l WHERE l.subject = a.uri),'
                ' "repostCount" = (SELECT count(*) FROM repost r WHERE r.subject = a.uri),'
                ' "replyCount" = (SELECT count(*) FROM post p WHERE p."replyParent" = a.uri'
                ' AND NOT COALESCE(p."violatesThreadGate", false))'
                " WHERE a.uri = ANY($1::text[])", uris,
            )  # fmt: skip


async def run_reconcile(dids: Sequence[str], database_url: str, options: ReconcileOptions, *,
                        as_json: bool = False, out: Any = None) -> int:
    """Reconcile *dids* in order, printing one line (or JSON object) each; 1 if any failed."""
    import sys

    from psky.db.pool import create_pool

    stream = out if out is not None else sys.stdout
    failed = 0
    pool = await create_pool(database_url, min_size=1, max_size=2, pgbouncer=options.pgbouncer,
                             application_name="psky-reconcile")
    try:
        async with Reconciler(pool, options) as reconciler:
            for did in dids:
                result = await reconciler.reconcile(did)
                failed += not result.ok
                line = orjson.dumps(result.to_obj()).decode() if as_json else format_result(result)
                print(line, file=stream, flush=True)
    finally:
        await pool.close()
    return 1 if failed else 0
