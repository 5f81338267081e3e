"""Issue 8, the database side: the indexer's PostgreSQL refuses connections, answers slowly, or
blocks its writes, mid-run. Same harness and checks as tests/test_reliability_faults.py (real
processes, embedded Redis, a fresh database on the session's server, the database compared
with the devnet manifest afterwards, nothing dead-lettered); only the indexer sees the fault.

1. connections exhausted at the server: the indexer logs in as a role whose CONNECTION LIMIT
   is below its pool size, then for a few seconds as one with no connections at all;
2. a slow database: a loopback proxy (psky/devnet/tcp_proxy.py) adds latency to every chunk;
3. a stalled database: another session holds ``LOCK TABLE record IN EXCLUSIVE MODE``.

Each test prints what the indexer did (events, retries by reason, log lines) for the report."""

from __future__ import annotations

import asyncio
import importlib
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from psky.atproto.lexicon import Lexicons
from psky.devnet.tcp_proxy import LatencyProxy
from psky.indexer.actors import Actors
from psky.indexer.batch import apply_batch, prepare_items
from psky.streams import FIREHOSE_BACKFILL, FIREHOSE_LIVE, AccountEvent, StreamEvent
from tests.indexer_helpers import Events, cloned_database, post

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
fl: Any = importlib.import_module("fault_loop")
faults_tests: Any = importlib.import_module("tests.test_reliability_faults")

pytestmark = pytest.mark.services

SMALL: dict[str, Any] = faults_tests.SMALL
_until = faults_tests._until
_finish = faults_tests._finish
INDEXER = "indexer-1"
INDEXED_STREAMS = (FIREHOSE_LIVE, FIREHOSE_BACKFILL)


@pytest.fixture
async def pipeline(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Any]:
    """A pipeline whose services are defined but not started: each test first puts its fault
    between the indexer and PostgreSQL (the indexer's environment), then starts them."""
    kw: dict[str, Any] = {**SMALL, **getattr(request, "param", {})}
    p = fl.Pipeline(fl.Options(database_url=database_url, **kw))
    try:
        await p.start(services=False)
        yield p
    finally:
        await p.close()


def _start(p: Any) -> None:
    for svc in p.services.values():
        svc.start()


async def _indexer_busy(p: Any) -> bool:
    return bool(await p.pending_of(INDEXER, INDEXED_STREAMS))


async def _retries(p: Any) -> dict[str, float]:
    """``psky_indexer_batch_retries_total`` of the running indexer, by reason."""
    port = p.services[INDEXER].metrics_port
    out: dict[str, float] = {}
    try:
        async with p.http.get(
            f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=2)
        ) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    for line in text.splitlines():
        if line.startswith("psky_indexer_batch_retries_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(value)
    return out


def _log_lines(p: Any, *needles: str) -> dict[str, int]:
    """How many lines of the indexer's log contain each needle (it logs at WARNING)."""
    text = p.services[INDEXER].log_path.read_text(errors="replace")
    return {n: sum(n in line for line in text.splitlines()) for n in needles}


def _report(p: Any, verdict: Any, retries: dict[str, float], **facts: Any) -> None:
    svc = p.services[INDEXER]
    print(f"events processed {p.events_processed()}, records checked {verdict.records}, "
          f"indexer starts {svc.starts}, retries {retries}, " + ", ".join(f"{k} {v}" for k, v in facts.items()))  # fmt: skip


# --- 1. connections exhausted at the server ---------------------------------------------------


@pytest.fixture
async def limited_role(pipeline: Any) -> AsyncIterator[str]:
    """A LOGIN role owning the pipeline's database (so the indexer's migrations run as it),
    allowed 2 connections; its objects handed back and the role dropped afterwards."""
    role = f"psky_limited_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pipeline._admin_url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 2')
        await admin.execute(f'ALTER DATABASE "{pipeline._db_name}" OWNER TO "{role}"')
    finally:
        await admin.close()
    try:
        yield role
    finally:
        for svc in pipeline.services.values():  # nobody logged in as the role any more
            svc.stop()
        async with pipeline.db() as conn:  # the tables, and the database itself
            await conn.execute(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER; DROP OWNED BY "{role}"')
        admin = await asyncpg.connect(pipeline._admin_url)
        try:
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()


def _as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


async def _role_backends(p: Any, role: str) -> int:
    async with p.db() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role))


@pytest.mark.parametrize(
    "pipeline", [{"indexer_concurrency": 4, "live": 1500}], indirect=True, ids=["limit-2-of-8"]
)
async def test_connections_refused_by_the_server(pipeline: Any, limited_role: str) -> None:
    """The indexer (4 workers and the label loop on a pool of up to 8) logs in as a role limited
    to 2 connections: PostgreSQL refuses the rest ("too many connections for role"). Mid-run the
    limit drops to 0 and the role's open connections are terminated, for 4 s, while the devnet
    writes; then 2 again. The indexer waits each refusal out and resumes: nothing lost, nothing
    dead-lettered, never restarted."""
    p, role = pipeline, limited_role
    svc = p.services[INDEXER]
    svc.env.update(DATABASE_URL=_as_role(p.database_url, role), DB_POOL_MAX_SIZE="8", DB_POOL_MIN_IDLE="1")
    _start(p)
    await _until(lambda: _indexer_busy(p), "the indexer to be busy")

    async def refused() -> bool:
        return (await _retries(p)).get("database_unavailable", 0) > 0

    await _until(refused, "PostgreSQL to refuse the indexer a connection over the role's limit", 60)
    async with p.db() as admin:
        await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        cut = await admin.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
                                   role)  # fmt: skip
        await asyncio.sleep(4.0)
        left = await _role_backends(p, role)
        await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 2')
    assert left == 0, f"{left} connections of the role got through a limit of 0"
    assert (await p.status())["live_done"] is False, "the outage came too late to be mid-run"
    retries = await _retries(p)
    try:
        verdict = await _finish(p)
    except AssertionError:
        await _show_leftovers(p)
        raise
    retries = await _retries(p) or retries
    logged = _log_lines(
        p,
        "too many connections for role",
        "database unavailable, waiting",
        "restore the pool connection floor",
    )
    _report(p, verdict, retries, connections_terminated=cut, log_lines=logged)
    assert svc.starts == 1 and svc.alive, "the indexer died of the refusals"
    assert logged["too many connections for role"] > 0, "PostgreSQL never refused the indexer"


# --- 2. a slow database ----------------------------------------------------------------------


async def _processed(p: Any) -> float:
    """Stream messages the indexer processed so far (its Prometheus counter)."""
    return float((await p.scrape())[INDEXER].get("stream_indexer_messages_processed_total", 0.0))


@pytest.mark.parametrize("pipeline", [{"live": 1500}], indirect=True, ids=["20ms-each-way"])
async def test_slow_database(pipeline: Any) -> None:
    """Every chunk between the indexer and PostgreSQL delayed 20 ms each way, from the start
    (migrations included) until the indexer has processed 400 stream messages through it
    (two batches: at 40 ms a round trip that takes a while), then none: the indexer falls
    behind and catches up; the database equals the manifest."""
    p = pipeline
    async with LatencyProxy.for_url(p.database_url, delay_s=0.020) as proxy:
        p.services[INDEXER].env["DATABASE_URL"] = proxy.url(p.database_url)
        _start(p)

        async def indexed_slowly() -> bool:
            return await _processed(p) >= 400

        await _until(indexed_slowly, "the indexer to index 400 messages on the slow database", 120)
        processed_slow = await _processed(p)
        delayed = proxy.stats.delayed_chunks
        proxy.delay_s = 0.0
        mid_run = not (await p.status())["live_done"]
        verdict = await _finish(p)
        retries = await _retries(p)
        _report(p, verdict, retries, processed_while_slow=int(processed_slow), delayed_chunks=delayed,
                proxy_connections=proxy.stats.connections, proxied_mb=round(proxy.stats.bytes / 2**20, 1),
                devnet_still_writing_when_fast_again=mid_run)  # fmt: skip
    assert delayed > 100, "the latency was never in the indexer's path"
    assert p.services[INDEXER].starts == 1


async def test_latency_proxy_delays_while_set_and_forwards_faithfully(database_url: str) -> None:
    """The proxy itself: a PostgreSQL session through it gets the same answers; chunks are held
    back only while a delay is set (a large result proves the byte stream is kept in order)."""
    async with LatencyProxy.for_url(database_url, delay_s=0.01) as proxy:
        conn = await asyncpg.connect(proxy.url(database_url))
        try:
            rows = await conn.fetch("SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) AS g")
            assert [r["g"] for r in rows] == list(range(1, 20001))
            assert rows[-1]["h"] == await conn.fetchval("SELECT md5('20000')")
            slow = proxy.stats.delayed_chunks
            assert slow > 0
            proxy.delay_s = 0.0
            await conn.fetchval("SELECT 1")
            assert proxy.stats.delayed_chunks == slow
        finally:
            await conn.close()
    assert proxy.stats.connections == 1 and proxy.stats.bytes > 20000 * 32


# --- 3. a stalled database ---------------------------------------------------------------------


async def _blocked_indexer_sessions(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'psky-indexer-%' AND wait_event_type = 'Lock'"))  # fmt: skip


@pytest.mark.parametrize("pipeline", [{"live": 3000}], indirect=True, ids=["lock-9s"])
async def test_stalled_database(pipeline: Any) -> None:
    """Another session holds ``LOCK TABLE record IN EXCLUSIVE MODE`` for 9 s mid-run: every
    indexer write waits on it (no lock or statement timeout turns the wait into a failure),
    then goes through; nothing lost, nothing dead-lettered."""
    p = pipeline
    _start(p)

    async def indexed_some() -> bool:
        return await _processed(p) > 0

    await _until(indexed_some, "the indexer to index its first batch")
    before = await _processed(p)
    async with p.db() as lock, p.db() as watch:
        tx = lock.transaction()
        await tx.start()
        await lock.execute("LOCK TABLE record IN EXCLUSIVE MODE")
        await _until(lambda: _blocked(watch), "an indexer write to wait on the lock", 30)
        await asyncio.sleep(9.0)
        blocked = await _blocked_indexer_sessions(watch)
        held = await p.pending_of(INDEXER, INDEXED_STREAMS)
        await tx.rollback()
    assert (await p.status())["live_done"] is False, "the stall came too late to be mid-run"
    verdict = await _finish(p)
    retries = await _retries(p)
    logged = _log_lines(p, "database unavailable, waiting", "batch failed", "Traceback")
    _report(p, verdict, retries, processed_before_lock=int(before), sessions_blocked_at_release=blocked,
            entries_held_at_release=held, log_lines=logged)  # fmt: skip
    assert blocked >= 1 and held > 0, "the lock did not stall the indexer"
    assert p.services[INDEXER].starts == 1


async def _blocked(conn: asyncpg.Connection) -> bool:
    return await _blocked_indexer_sessions(conn) > 0


async def _show_leftovers(p: Any) -> None:
    """On failure: the actor rows behind records that outlived their account's deletion (the
    defect shown by the last test of this file leaves the marker cleared)."""
    m = await p.manifest()
    async with p.db() as conn:
        v = await fl.verify(conn, m)
        for uri in v.deleted_leftovers[:5]:
            did = uri.split("/")[2]
            actor = await conn.fetchrow(
                'SELECT did, "upstreamStatus", "indexedAt" FROM actor WHERE did = $1', did
            )
            print(f"left over after its account's deletion: {uri}; actor {dict(actor) if actor else None}")


# --- a defect these runs point at (psky/indexer/actors.py; the lead fixes psky/) -------------------

_A, _B = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
_POST = "app.bsky.feed.post"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[str]:
    async for url in cloned_database(database_url):
        yield url


async def _apply(conn: asyncpg.Connection, events: list[StreamEvent]) -> None:
    lexicons = Lexicons.load()
    items = prepare_items([(e, True) for e in events], lexicons)
    await apply_batch(conn, items, lexicons=lexicons, actors=Actors(None))


def _account(ev: Events, did: str, *, active: bool, status: str | None = None) -> AccountEvent:
    ev.seq += 1
    return AccountEvent(seq=ev.seq, time=f"2026-01-02T00:00:{ev.seq % 60:02d}.000Z", did=did, active=active,
                        status=status)  # fmt: skip


async def test_an_older_reactivation_indexed_after_the_deletion_keeps_the_account_deleted(db: str) -> None:
    """Batches that waited out refused connections (each with its own backoff, up to 10 s) are
    indexed out of stream order. A's account goes deactivated -> active -> deleted; the batch
    holding the older ``active`` event, and one holding an older post of A, are indexed after the
    deletion: Actors.finish clears the 'deleted' marker for any ``active`` event whatever its
    time, so the late post is indexed again and A's records outlive A's deletion."""
    conn = await asyncpg.connect(db)
    try:
        ev = Events()
        await _apply(conn, [ev.create(_B, _POST, "3kpost0", post())])
        late_post = ev.create(_A, _POST, "3kpost1", post())
        reactivated = _account(ev, _A, active=True)
        deleted = _account(ev, _A, active=False, status="deleted")
        await _apply(conn, [deleted])
        await _apply(conn, [reactivated])  # older than the deletion, indexed after it
        await _apply(conn, [late_post])
        assert await conn.fetchval("SELECT count(*) FROM record WHERE did = $1 AND json <> ''", _A) == 0
        assert await conn.fetchval('SELECT "upstreamStatus" FROM actor WHERE did = $1', _A) == "deleted"
    finally:
        await conn.close()
