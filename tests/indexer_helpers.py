"""Shared helpers for the indexer tests: a migrated template database cloned per test, and
builders for stream events in the TypeScript wire format."""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from psky.atproto.cbor import cid_for_cbor, encode_lex
from psky.streams.wire import SEQ_BACKFILL, DeleteEvent, RecordEvent, StreamEvent

# per process: two test runs on one server (a developer and CI) must not share them
_TEMPLATE = f"psky_test_indexer_template_{os.getpid()}"
_counter = itertools.count()
_template_ready = False

BASE_TIME = "2026-01-01T00:00:00.000Z"


def admin_url(database_url: str, name: str) -> str:
    base, _, _ = database_url.rpartition("/")
    return f"{base}/{name}"


async def ensure_template(database_url: str) -> None:
    global _template_ready
    if _template_ready:
        return
    from psky.db.migrations import migrate

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {_TEMPLATE}")
    finally:
        await conn.close()
    await migrate(admin_url(database_url, _TEMPLATE))
    _template_ready = True
    atexit.register(_drop_template, database_url)


def _drop_template(database_url: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_TEMPLATE} WITH (FORCE)")
        finally:
            await conn.close()

    try:
        asyncio.run(drop())
    except Exception:  # the server may be gone already (embedded PostgreSQL stopped first)
        pass


async def cloned_database(database_url: str) -> AsyncIterator[str]:
    await ensure_template(database_url)
    name = f"psky_test_idx_{os.getpid()}_{next(_counter)}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE}")
    finally:
        await conn.close()
    try:
        yield admin_url(database_url, name)
    finally:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


class Events:
    """Builds create/update/delete events with increasing revs per DID."""

    def __init__(self) -> None:
        self._rev: dict[str, int] = {}
        self.seq = 0

    def rev(self, did: str) -> str:
        n = self._rev.get(did, 0) + 1
        self._rev[did] = n
        return f"3l{n:011d}"

    def _common(self, did: str, backfill: bool) -> dict[str, Any]:
        self.seq += 1
        return {
            "seq": SEQ_BACKFILL if backfill else self.seq,
            "time": f"2026-01-01T00:{(self.seq // 60) % 60:02d}:{self.seq % 60:02d}.000Z",
            "did": did,
            "commit": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
            "rev": self.rev(did),
        }

    def create(self, did: str, collection: str, rkey: str, record: dict[str, Any], *,
               backfill: bool = False, update: bool = False) -> RecordEvent:
        record = {"$type": collection, **record}
        cid = cid_for_cbor(encode_lex(record)).encode()
        return RecordEvent(type="update" if update else "create", collection=collection, rkey=rkey, cid=cid,
                           record=record, **self._common(did, backfill))

    def delete(self, did: str, collection: str, rkey: str) -> DeleteEvent:
        return DeleteEvent(collection=collection, rkey=rkey, **self._common(did, False))


def uri(did: str, collection: str, rkey: str) -> str:
    return f"at://{did}/{collection}/{rkey}"


def strong_ref(target: str) -> dict[str, str]:
    return {"uri": target, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}


def post(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"text": text, "createdAt": BASE_TIME, **extra}


def like(target: str) -> dict[str, Any]:
    return {"subject": strong_ref(target), "createdAt": BASE_TIME}


def follow(subject: str) -> dict[str, Any]:
    return {"subject": subject, "createdAt": BASE_TIME}


EventList = list[StreamEvent]
