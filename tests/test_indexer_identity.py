"""Handles and account status through ``psky indexer`` (``run_indexer``, ``ENABLE_DID_RESOLUTION``)
against the devnet PLC directory and PDS ``/.well-known/atproto-did`` (routed with
``PSKY_HANDLE_RESOLVER_MAP``): a handle is stored only when the DID document and the handle
agree, contention moves it, account events set ``upstreamStatus``, DID documents are shared
through Redis, and without resolution the relay's handle is taken as is."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from psky.devnet.network import Devnet
from psky.devnet.pds import Pds
from psky.indexer.config import IndexerConfig
from psky.indexer.service import run_indexer
from psky.streams import AccountEvent, IdentityEvent, StreamEvent, event_fields, now_iso
from tests.indexer_helpers import cloned_database

pytest_plugins = ("tests.devnet_fixtures",)

_seq = itertools.count(1)
_names = itertools.count(1)


@dataclass
class Env:
    net: Devnet
    redis: aioredis.Redis
    redis_url: str
    db_url: str
    conn: asyncpg.Connection
    stream: str
    prefix: str
    dids: list[str]

    def config(self, *, resolution: bool = True) -> IndexerConfig:
        return IndexerConfig.from_env({
            "REDIS_URL": self.redis_url, "DATABASE_URL": self.db_url, "INDEXER_CONSUMER": "identity-test",
            "INDEXER_STREAMS": self.stream, "INDEXER_GROUP": self.prefix + "group", "INDEXER_LABELS": "false",
            "INDEXER_CONCURRENCY": "1", "INDEXER_MIGRATE": "false", "INDEXER_METRICS_HOST": "127.0.0.1",
            "INDEXER_METRICS_PORT": "0", "ENABLE_DID_RESOLUTION": "true" if resolution else "false",
            "PLC_URL": self.net.plc.url, "PSKY_HANDLE_RESOLVER_MAP": self.net.handle_resolver_map(),
        })  # fmt: skip

    async def index(self, *events: StreamEvent, resolution: bool = True) -> None:
        """Write *events* to the stream and run the indexer until it has acknowledged them."""
        for ev in events:
            await self.redis.xadd(self.stream, event_fields(ev))  # type: ignore[arg-type]
        stop = asyncio.Event()
        task = asyncio.create_task(run_indexer(self.config(resolution=resolution), stop=stop))
        deadline = time.monotonic() + 30
        try:
            while await self.redis.xlen(self.stream):
                assert not task.done(), task.exception()
                assert time.monotonic() < deadline, "the indexer did not drain its stream"
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    async def account(self, pds: int = 0) -> tuple[str, str]:
        """A new account on PDS *pds*: (did, handle)."""
        host = self.net.pdses[pds]
        acct = await host.create_account(f"user{next(_names)}x{int(time.time() * 1000) % 100000}")
        self.dids.append(acct.did)
        return acct.did, acct.handle

    async def actor(self, did: str) -> asyncpg.Record | None:
        return await self.conn.fetchrow('SELECT handle, "upstreamStatus" FROM actor WHERE did = $1', did)


def identity(did: str, handle: str | None) -> IdentityEvent:
    return IdentityEvent(seq=next(_seq), time=now_iso(), did=did, handle=handle)


def account_event(did: str, active: bool, status: str | None = None) -> AccountEvent:
    return AccountEvent(seq=next(_seq), time=now_iso(), did=did, active=active, status=status)


@pytest.fixture
async def env(
    module_devnet: Devnet, redis_url: str, redis_prefix: str, database_url: str
) -> AsyncIterator[Env]:
    redis = aioredis.from_url(redis_url)
    async for url in cloned_database(database_url):
        conn = await asyncpg.connect(url)
        e = Env(module_devnet, redis, redis_url, url, conn, redis_prefix + "firehose_live", redis_prefix, [])
        try:
            yield e
        finally:
            await conn.close()
            if e.dids:
                await redis.delete(*[f"did_doc:{did}" for did in e.dids])
            await redis.aclose()


def _pds(env: Env, index: int = 0) -> Pds:
    return env.net.pdses[index]


async def test_identity_event_stores_the_verified_handle_and_caches_the_document(env: Env) -> None:
    did, handle = await env.account()
    other_did, other_handle = await env.account(pds=1)
    # the stream's handle is not trusted: the indexer resolves the DID itself
    await env.index(identity(did, "spoofed.example.com"), identity(other_did, None))
    assert (await env.actor(did))["handle"] == handle  # type: ignore[index]
    assert (await env.actor(other_did))["handle"] == other_handle  # type: ignore[index]
    cached = await env.redis.get(f"did_doc:{did}")
    assert cached is not None
    doc = orjson.loads(cached)
    assert doc["id"] == did and f"at://{handle}" in doc["alsoKnownAs"]
    assert 0 < await env.redis.ttl(f"did_doc:{did}") <= 3600


async def test_a_handle_claimed_by_the_document_but_resolving_elsewhere_is_null(env: Env) -> None:
    honest, honest_handle = await env.account()
    liar, _ = await env.account()
    await env.index(identity(honest, honest_handle), identity(liar, None))
    # the liar's DID document now claims the honest account's handle (a PLC update the PDS
    # never agreed to): the handle's well-known answer names the honest DID, not the liar
    pds = _pds(env)
    await pds._plc_client().update(liar, pds.account(liar).rotation_key, handle=honest_handle)
    await env.index(identity(liar, honest_handle))
    assert (await env.actor(liar))["handle"] is None  # type: ignore[index]
    assert (await env.actor(honest))["handle"] == honest_handle  # type: ignore[index]
    # a handle nobody answers for is not verified either
    ghost, _ = await env.account()
    await pds._plc_client().update(ghost, pds.account(ghost).rotation_key, handle="nobody-here.pds1.test")
    await env.index(identity(ghost, "nobody-here.pds1.test"))
    assert (await env.actor(ghost))["handle"] is None  # type: ignore[index]


async def test_a_handle_moving_to_another_did_is_taken_from_the_old_actor(env: Env) -> None:
    first, handle = await env.account()
    second, second_handle = await env.account()
    await env.index(identity(first, None), identity(second, None))
    assert (await env.actor(first))["handle"] == handle  # type: ignore[index]
    pds = _pds(env)
    await pds.update_handle(first, f"moved{next(_names)}.{pds.hostname}")
    await pds.update_handle(second, handle)
    # only the new owner's event arrives first: the old actor loses the handle at once
    await env.index(identity(second, handle))
    assert (await env.actor(second))["handle"] == handle  # type: ignore[index]
    assert (await env.actor(first))["handle"] is None  # type: ignore[index]
    await env.index(identity(first, None))
    assert (await env.actor(first))["handle"] == pds.account(first).handle  # type: ignore[index]
    assert await env.conn.fetchval("SELECT count(*) FROM actor WHERE handle = $1", second_handle) == 0


async def test_account_events_set_and_clear_upstream_status(env: Env) -> None:
    did, handle = await env.account()
    pds = _pds(env)
    await env.index(identity(did, handle))
    for status in ("deactivated", "suspended", "takendown"):
        await pds.set_status(did, False, status)
        await env.index(account_event(did, False, status))
        assert (await env.actor(did))["upstreamStatus"] == status  # type: ignore[index]
        await pds.set_status(did, True)
        await env.index(account_event(did, True))
        row = await env.actor(did)
        assert row is not None and row["upstreamStatus"] is None and row["handle"] == handle
    # an account first seen through an inactive account event: status set, and no handle
    # (its PDS no longer vouches for it)
    quiet, _ = await env.account()
    await pds.set_status(quiet, False, "deactivated")
    await env.index(account_event(quiet, False, "deactivated"))
    row = await env.actor(quiet)
    assert row is not None and row["upstreamStatus"] == "deactivated" and row["handle"] is None
    # a deleted account leaves only a marker: no handle, status "deleted"
    await env.index(account_event(did, False, "deleted"))
    row = await env.actor(did)
    assert row is not None and row["upstreamStatus"] == "deleted" and row["handle"] is None


async def test_without_resolution_the_stream_handle_is_used(env: Env) -> None:
    did, _ = await env.account()
    await env.index(identity(did, "Some-Handle.Example.COM"), resolution=False)
    assert (await env.actor(did))["handle"] == "some-handle.example.com"  # type: ignore[index]
    assert await env.redis.exists(f"did_doc:{did}") == 0
    # an invalid handle is dropped; a handle taken by another DID moves to the new claimant
    await env.index(identity(did, "not a handle"), resolution=False)
    assert (await env.actor(did))["handle"] is None  # type: ignore[index]
    other, _ = await env.account()
    await env.index(identity(did, "shared.example.com"), resolution=False)
    await env.index(identity(other, "shared.example.com"), resolution=False)
    assert (await env.actor(other))["handle"] == "shared.example.com"  # type: ignore[index]
    assert (await env.actor(did))["handle"] is None  # type: ignore[index]
