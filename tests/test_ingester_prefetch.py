"""The verified firehose reads ahead: DID documents and repo states are fetched in the
background while earlier frames are processed, and the output must not change for it.

Real devnet (relay, PDS, PLC) and real Redis. The devnet PLC's ``document_delay_ms`` knob
plays a distant directory; its request counters show how far fetches overlapped. Nothing here
measures time: overlap is asserted on counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import redis.asyncio as aioredis

from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import InfoEvent
from psky.devnet.network import Devnet
from psky.devnet.pds import Pds
from psky.devnet.plc import PlcClient, PlcDirectory
from psky.identity import IdentityResolver
from psky.ingester import IngesterConfig
from psky.ingester.firehose import _ReadAheadQueue
from psky.streams import cursor_key
from tests.test_ingester import make_config, running, wait_cursor, wait_for

if TYPE_CHECKING:
    from tests.devnet_fixtures import SeededDevnet

pytest_plugins = ("tests.devnet_fixtures",)

MakeDevnet = Callable[..., AbstractAsyncContextManager[Devnet]]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def stream_entries(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    """Entries of *stream* in order, decoded (their Redis ids differ from run to run)."""
    out: list[dict[str, Any]] = []
    for _, fields in await redis.xrange(stream):
        out.append({k.decode(): orjson.loads(v) if k == b"event" else v.decode() for k, v in fields.items()})
    return out


async def ingest_all(redis: aioredis.Redis, config: IngesterConfig, net: Devnet) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Run the ingester from cursor 0 to the relay's head; its firehose and repo stream entries
    and a few metric totals."""
    assert net.relay is not None
    async with running(config) as metrics:
        await wait_cursor(redis, cursor_key(config.firehose_stream, net.relay.url), net.relay.seq, 120)
        totals = {name: metrics.total(name) for name in (
            "ingester_verification_failures_total", "ingester_dropped_commits_total",
            "ingester_firehose_key_prefetches_total", "ingester_reconnects_total")}
    return (await stream_entries(redis, config.firehose_stream),
            await stream_entries(redis, config.repo_stream), totals)


def fetch_bound(events: list[dict[str, Any]]) -> int:
    """Most DID document fetches a verified run needs: one per repo, plus one per ``#identity``
    after a repo's first (an account's first comes before its first commit; a later one may
    announce a changed document)."""
    identities: dict[str, int] = {}
    for ev in events:
        identities.setdefault(ev["did"], 0)
        if ev["type"] == "identity":
            identities[ev["did"]] += 1
    return sum(1 + max(n - 1, 0) for n in identities.values())


# --- the resolver's checkpoints -------------------------------------------------------------


@pytest.fixture
async def plc_and_pds() -> AsyncIterator[tuple[PlcDirectory, Pds]]:
    plc = PlcDirectory()
    await plc.start()
    pds = Pds(plc.url, hostname="pds1.test")
    await pds.start()
    try:
        yield plc, pds
    finally:
        await pds.stop()
        await plc.stop()


async def test_invalidate_drops_only_documents_fetched_before_the_checkpoint(
        plc_and_pds: tuple[PlcDirectory, Pds]) -> None:
    plc, pds = plc_and_pds
    acct = await pds.create_account("carol")
    async with IdentityResolver(plc.url) as res:
        await res.resolve(acct.did)
        mark = res.checkpoint()  # an #identity read now
        assert res.cached(acct.did) is not None
        res.invalidate(acct.did, fetched_before=mark)
        assert res.cached(acct.did) is None  # fetched before the event: dropped
        await pds.update_handle(acct.did, "caroline")
        doc = await res.resolve(acct.did)  # fetched after the event was read
        res.invalidate(acct.did, fetched_before=mark)
        assert res.cached(acct.did) is doc  # kept: it already reflects the change
        assert doc.handle == "caroline.pds1.test"
        assert plc.document_requests == 2
        res.invalidate(acct.did)  # no checkpoint: everything fetched so far
        assert res.cached(acct.did) is None


async def test_a_fetch_invalidated_in_flight_answers_but_is_not_cached(
        plc_and_pds: tuple[PlcDirectory, Pds]) -> None:
    plc, pds = plc_and_pds
    acct = await pds.create_account("dave")
    plc.document_delay_ms = 300
    async with IdentityResolver(plc.url) as res:
        fetch = asyncio.create_task(res.resolve(acct.did))

        async def reached() -> bool:
            return plc.document_requests > 0

        await wait_for(reached, 10, "the request to reach the directory")
        res.invalidate(acct.did)
        assert (await fetch).id == acct.did
        assert res.cached(acct.did) is None
        plc.document_delay_ms = 0
        await res.resolve(acct.did)
        assert res.cached(acct.did) is not None
        assert plc.document_requests == 2


# --- the firehose with a slow directory -----------------------------------------------------


async def test_slow_directory_same_stream_with_overlapping_fetches(
        seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str, redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    plc = net.plc

    def config(name: str, **env: str) -> IngesterConfig:
        return make_config(redis_url, f"{redis_prefix}{name}:", net, **env)

    off_events, off_repos, _ = await ingest_all(redis, config("off", INGESTER_VERIFY="off"), net)
    assert len(off_events) > 1000

    plc.reset_document_counters()
    fast_events, fast_repos, fast = await ingest_all(redis, config("fast", INGESTER_VERIFY="strict"), net)
    fast_requests = plc.document_requests

    plc.document_delay_ms = 40
    try:
        plc.reset_document_counters()
        slow_events, slow_repos, slow = await ingest_all(redis, config("slow", INGESTER_VERIFY="lenient"), net)
        slow_requests, overlap = plc.document_requests, plc.max_documents_in_flight
        # the smallest read-ahead: one frame queued, one fetch at a time
        plc.reset_document_counters()
        tiny_events, tiny_repos, tiny = await ingest_all(redis, config(
            "tiny", INGESTER_VERIFY="strict", INGESTER_READ_AHEAD_FRAMES="1", INGESTER_READ_AHEAD_BYTES="1",
            INGESTER_RESOLVE_CONCURRENCY="1"), net)
        tiny_overlap = plc.max_documents_in_flight
    finally:
        plc.document_delay_ms = 0

    assert fast_events == off_events and slow_events == off_events and tiny_events == off_events
    assert fast_repos == off_repos and slow_repos == off_repos and tiny_repos == off_repos
    for totals in (fast, slow, tiny):
        assert totals["ingester_verification_failures_total"] == 0
        assert totals["ingester_dropped_commits_total"] == 0
        assert totals["ingester_reconnects_total"] == 0
    # fetched in the background, overlapping; no DID fetched twice without an #identity between
    assert slow["ingester_firehose_key_prefetches_total"] > 0
    assert overlap > 1
    assert tiny_overlap == 1
    events = [entry["event"] for entry in off_events]
    dids = {ev["did"] for ev in events if ev["type"] in ("create", "update", "delete")}
    assert len(dids) <= fast_requests <= fetch_bound(events)
    assert len(dids) <= slow_requests <= fetch_bound(events)


async def test_unreachable_directory_never_ends_the_task(
        seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str, redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    off_events, _, _ = await ingest_all(redis, make_config(redis_url, f"{redis_prefix}off:", net,
                                                           INGESTER_VERIFY="off"), net)
    dead = {"PLC_URL": "http://127.0.0.1:9", "INGESTER_VERIFY": "lenient"}  # discard port: refused
    events, _, totals = await ingest_all(redis, make_config(redis_url, f"{redis_prefix}dead:", net, **dead), net)
    assert events == off_events  # lenient: passed on, flagged
    assert totals["ingester_verification_failures_total"] > 0
    assert totals["ingester_firehose_key_prefetches_total"] > 0
    assert totals["ingester_reconnects_total"] == 0


# --- a key rotation while reading ahead -----------------------------------------------------


def post(text: str) -> dict[str, Any]:
    return {"$type": "app.bsky.feed.post", "text": text,
            "createdAt": datetime.now(UTC).isoformat().replace("+00:00", "Z")}


async def test_key_rotation_is_seen_by_the_commits_after_it(
        make_devnet: MakeDevnet, redis_url: str, redis_prefix: str, redis: aioredis.Redis) -> None:
    async with make_devnet(n_pds=1, seed=5) as net:
        assert net.relay is not None
        pds = net.pdses[0]
        accounts = [await pds.create_account(f"rot{i}") for i in range(3)]
        for i, acct in enumerate(accounts):
            await pds.apply_writes(acct.did, [("create", "app.bsky.feed.post", f"a{i}", post("before"))])
        await net.settle()
        net.plc.document_delay_ms = 30
        config = make_config(redis_url, redis_prefix, net, INGESTER_VERIFY="strict")
        key = cursor_key(config.firehose_stream, net.relay.url)
        async with running(config) as metrics, PlcClient(net.plc.url) as plc:
            await wait_cursor(redis, key, net.relay.seq)
            for round_ in range(3):  # rotate, announce, write with the new key; stream read live
                for i, acct in enumerate(accounts):
                    new_key = PrivateKey.generate("k256")
                    await plc.update(acct.did, acct.rotation_key, signing_key=new_key)
                    acct.signing_key = new_key
                    assert acct.repo is not None
                    acct.repo.key = new_key
                    pds.emit_identity(acct.did)
                    await pds.apply_writes(acct.did, [("create", "app.bsky.feed.post", f"r{round_}x{i}",
                                                       post(f"round {round_}"))])
                # the next rotation waits for the ingester: a commit checked after its key was
                # rotated again fails whatever the ingester does (the old key is gone)
                await net.settle()
                await wait_cursor(redis, key, net.relay.seq)
            assert metrics.total("ingester_verification_failures_total") == 0
            assert metrics.total("ingester_dropped_commits_total") == 0
        events = await stream_entries(redis, config.firehose_stream)
        rkeys = {e["event"]["rkey"] for e in events if e["event"]["type"] == "create"}
        assert {f"r{r}x{i}" for r in range(3) for i in range(3)} <= rkeys


# --- the read-ahead queue's bounds ----------------------------------------------------------


async def test_read_ahead_queue_is_bounded_by_count_and_bytes() -> None:
    frames = [InfoEvent(name="n", message=str(i)) for i in range(4)]
    never = asyncio.create_task(asyncio.Event().wait())  # a processor that keeps running
    try:
        by_count = _ReadAheadQueue(max_frames=2, max_bytes=10**9)
        by_count.put(frames[0], 10, None)
        await asyncio.wait_for(by_count.wait_for_room(never), 5)  # room for one more
        by_count.put(frames[1], 10, None)
        waiting = asyncio.create_task(by_count.wait_for_room(never))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # full: the reader does not read
        assert await by_count.get() == (frames[0], None)
        await asyncio.wait_for(waiting, 5)  # room again after one was taken

        by_bytes = _ReadAheadQueue(max_frames=100, max_bytes=1000)
        by_bytes.put(frames[2], 999, None)
        await asyncio.wait_for(by_bytes.wait_for_room(never), 5)
        by_bytes.put(frames[3], 5000, None)  # one frame larger than the bound still fits alone
        waiting = asyncio.create_task(by_bytes.wait_for_room(never))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await by_bytes.get()
        await asyncio.sleep(0.05)
        assert not waiting.done()  # 5000 bytes still queued
        await by_bytes.get()
        await asyncio.wait_for(waiting, 5)
        by_bytes.close()
        assert await by_bytes.get() is None
    finally:
        never.cancel()

    ended = asyncio.create_task(asyncio.sleep(0))
    await ended
    full = _ReadAheadQueue(max_frames=1, max_bytes=10**9)
    full.put(frames[0], 1, None)
    await asyncio.wait_for(full.wait_for_room(ended), 5)  # a finished processor releases the reader


# --- signatures checked back to back -------------------------------------------------------


async def test_a_signature_run_rechecks_after_a_key_is_dropped(
        make_devnet: MakeDevnet, redis_url: str, redis_prefix: str, redis: aioredis.Redis) -> None:
    """The processor checks the signatures of queued commits back to back, before processing
    them. The signing key rotates without an #identity: commit 1 (new key) fails against the
    cached key, so the Python path drops and re-fetches the key; commit 2 is signed with the
    rotated-out key and was checked with it in the same run. Its early verdict must not stand:
    it is checked again with the fresh key and fails."""
    import aiohttp
    from prometheus_client import CollectorRegistry

    from psky.atproto.firehose import check_commit_frame
    from psky.ingester.firehose import FirehoseIngester, _Native
    from psky.ingester.metrics import IngesterMetrics
    from psky.ingester.verify import KeyCache

    async with make_devnet(n_pds=1, seed=7) as net:
        assert net.relay is not None
        pds = net.pdses[0]
        acct = await pds.create_account("runner")
        await pds.apply_writes(acct.did, [("create", "app.bsky.feed.post", "a0", post("before"))])
        head = await net.settle()
        old_key = acct.signing_key
        new_key = PrivateKey.generate("k256")
        async with PlcClient(net.plc.url) as plc:
            await plc.update(acct.did, acct.rotation_key, signing_key=new_key)
        assert acct.repo is not None
        acct.repo.key = new_key
        await pds.apply_writes(acct.did, [("create", "app.bsky.feed.post", "a1", post("new key"))])
        acct.repo.key = old_key  # a commit signed with the key the PLC no longer lists
        await pds.apply_writes(acct.did, [("create", "app.bsky.feed.post", "a2", post("old key"))])
        await net.settle()
        url = net.relay.url.replace("http", "ws", 1) + f"/xrpc/com.atproto.sync.subscribeRepos?cursor={head}"
        frames: list[bytes] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, compress=0) as ws:
                while len(frames) < net.relay.seq - head:
                    frames.append((await ws.receive()).data)
            config = make_config(redis_url, redis_prefix, net, INGESTER_VERIFY="lenient")
            resolver = IdentityResolver(net.plc.url, session=session)
            keys = KeyCache(resolver)
            registry = CollectorRegistry()
            ingester = FirehoseIngester(config, net.relay.url, redis, session, keys, IngesterMetrics(registry))
            ingester.writer.start()
            stale = await resolver.resolve(acct.did)  # fetched now: already the new key...
            assert stale.signing_key == new_key.public_key().did_key()
            # ...so plant the old document, as a cache filled before the rotation would hold it
            resolver._cache[acct.did] = (resolver._cache[acct.did][0],
                                         dataclasses.replace(stale, signing_key=old_key.public_key().did_key()),
                                         resolver._cache[acct.did][2])
            queue = _ReadAheadQueue(100, 10**9)
            for data in frames:
                checked = check_commit_frame(data, verify=True)
                assert checked is not None
                queue.put(_Native(checked, data), len(data), None)
            queue.close()
            await ingester._process_queue(queue)
            await ingester.close()
            failures = {s.labels["reason"]: s.value for m in registry.collect() for s in m.samples
                        if s.name == "ingester_verification_failures_total"}
        assert failures == {"bad-signature": 1}  # commit 2 only; commit 1 passed after the re-fetch
        rkeys = [e["event"]["rkey"] for e in await stream_entries(redis, config.firehose_stream)]
        assert rkeys == ["a1", "a2"]  # lenient: both passed on, the failure counted


# --- the repo chain on the native fast path --------------------------------------------------


async def test_native_fast_path_chain_checks_agree_with_chain_reasons(
        make_devnet: MakeDevnet, redis_url: str, redis_prefix: str, redis: aioredis.Redis) -> None:
    """The fast path inlines the chain checks (rev newer than the last seen one, ``prevData``
    equal to the last seen MST root, the very same commit again allowed). For planted repo
    states it takes a commit exactly when :func:`_chain_reasons` finds nothing, and through
    the processor each failure is counted under its reason (lenient: still passed on)."""
    import aiohttp
    from prometheus_client import CollectorRegistry

    from psky.atproto.firehose import check_commit_frame
    from psky.ingester.firehose import FirehoseIngester, _chain_reasons, _Native
    from psky.ingester.metrics import IngesterMetrics
    from psky.ingester.verify import KeyCache, RepoState

    async with make_devnet(n_pds=1, seed=11) as net:
        assert net.relay is not None
        pds = net.pdses[0]
        acct = await pds.create_account("chain")
        head = await net.settle()
        for i in range(3):
            await pds.apply_writes(acct.did, [("create", "app.bsky.feed.post", f"c{i}", post(f"chain {i}"))])
        await net.settle()
        url = net.relay.url.replace("http", "ws", 1) + f"/xrpc/com.atproto.sync.subscribeRepos?cursor={head}"
        frames: list[bytes] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, compress=0) as ws:
                while len(frames) < net.relay.seq - head:
                    frames.append((await ws.receive()).data)
            checked = [check_commit_frame(data, verify=True) for data in frames]
            commits = [c for c in checked if c is not None]
            assert len(commits) == 3 and all(c.prev_data is not None for c in commits)
            from libipld import encode_cid
            roots = [encode_cid(c.data) for c in commits if c.data is not None]
            first, second, third = commits
            other_root = roots[0]  # a root the chain has moved past
            plants: dict[str, RepoState | None] = {
                "none": None,
                "previous": RepoState(first.rev, roots[0]),  # the usual case: passes
                "same-again": RepoState(second.rev, roots[1]),  # the very same commit: passes
                "same-rev-other-root": RepoState(second.rev, other_root),
                "newer": RepoState(third.rev, roots[2]),  # rev not newer
                "forked": RepoState(first.rev, "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5o4ktcn3rmgdrqu"),
                "unknown-root": RepoState(first.rev, ""),  # rev known, root not: passes
            }
            config = make_config(redis_url, redis_prefix, net, INGESTER_VERIFY="lenient")
            resolver = IdentityResolver(net.plc.url, session=session)
            keys = KeyCache(resolver)
            for name, state in plants.items():
                ingester = FirehoseIngester(config, net.relay.url, redis, session, keys,
                                            IngesterMetrics(CollectorRegistry()))
                ingester.states._remember(acct.did, state)
                want = _chain_reasons(state, second.rev, roots[1], encode_cid(second.prev_data or b""))
                got = ingester._good_native_commit(second)
                assert (got is not None) == (not want), name
                if got is not None:
                    assert [e["event"] for e in got] == [ev for _, _, ev in second.events]
                    assert ingester._events["create"].value == len(second.events) == 1  # counted
                    assert ingester.states._cache[acct.did] == RepoState(second.rev, roots[1])
                else:  # declined before any effect
                    assert ingester.states._cache[acct.did] == state, name

            # through the processor: the failures counted by reason, lenient passes them on
            for name, reason in (("newer", "rev-not-newer"), ("forked", "prev-data-mismatch")):
                registry = CollectorRegistry()
                ingester = FirehoseIngester(config, net.relay.url, redis, session, keys, IngesterMetrics(registry))
                ingester.writer.start()
                ingester.states._remember(acct.did, plants[name])
                queue = _ReadAheadQueue(100, 10**9)
                index = checked.index(second)
                queue.put(_Native(second, frames[index]), len(frames[index]), None)
                queue.close()
                await ingester._process_queue(queue)
                await ingester.close()
                failures = {s.labels["reason"]: s.value for m in registry.collect() for s in m.samples
                            if s.name == "ingester_verification_failures_total"}
                assert failures == {reason: 1}, name
            rkeys = [e["event"]["rkey"] for e in await stream_entries(redis, config.firehose_stream)]
            assert rkeys == ["c1", "c1"]

            # the collection filter on the fast path: everything, or the post filtered out (counted)
            for collections, kept in (("*", 1), ("app.bsky.graph.*", 0)):
                registry = CollectorRegistry()
                filtered = make_config(redis_url, redis_prefix, net, INGESTER_VERIFY="lenient",
                                       INGESTER_COLLECTIONS=collections)
                ingester = FirehoseIngester(filtered, net.relay.url, redis, session, keys, IngesterMetrics(registry))
                ingester.states._remember(acct.did, plants["previous"])
                got = ingester._good_native_commit(second)
                assert got is not None and len(got) == kept, collections
                totals = {s.name: s.value for m in registry.collect() for s in m.samples}
                assert totals.get("ingester_firehose_filtered_operations_total", 0) == 1 - kept
                assert ingester._events["create"].value == kept
