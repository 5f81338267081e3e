"""``psky replay labels|firehose`` against the seeded devnet's labeler and relay, real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import redis.asyncio as aioredis

from psky.ingester.config import CollectionFilter, IngesterConfig
from psky.ops.replay import replay_firehose, replay_labels
from psky.streams import connect, cursor_key
from psky.streams.wire import DeleteEvent, RecordEvent, parse_label_entry, parse_stream_event

if TYPE_CHECKING:
    from psky.devnet.network import Devnet
    from tests.devnet_fixtures import SeededDevnet

pytest_plugins = ("tests.devnet_fixtures",)

IDLE_S = 1.0


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def _config(redis_url: str, prefix: str, seeded: SeededDevnet) -> IngesterConfig:
    net = seeded.net
    return IngesterConfig(redis_url=redis_url, plc_url=net.plc.url, handle_resolver_map=net.handle_resolver_map(),
                          verify="strict", batch_size=50, repo_stream=f"{prefix}repo_backfill")


async def _keys(redis: aioredis.Redis, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        kind = await redis.type(name)
        out[name] = await redis.get(name) if kind in (b"string", "string") else await redis.xlen(name)
    return out


async def _entries(redis: aioredis.Redis, stream: str) -> list[dict[Any, Any]]:
    return [fields for _, fields in await redis.xrange(stream)]


async def test_replay_labels_from_zero(seeded_devnet: SeededDevnet, redis: aioredis.Redis, redis_url: str,
                                       redis_prefix: str) -> None:
    labeler = seeded_devnet.net.labeler
    assert labeler is not None
    stream = f"{redis_prefix}label_live"
    saved = redis_prefix + cursor_key("label_live", labeler.url)
    await redis.set(saved, "7")
    expected = [(lab.src, lab.uri, lab.val, lab.neg) for _, lab in sorted(labeler.labels(), key=lambda x: x[0])]
    assert any(neg for *_, neg in expected), "the seeded labeler should hold negations"

    result = await replay_labels(redis, _config(redis_url, redis_prefix, seeded_devnet), labeler.url, stream=stream,
                                 from_cursor=0, idle_s=IDLE_S)
    assert result.ok and result.stopped == "caught-up", result
    assert result.queued == {stream: len(expected)} and result.last_seq == labeler.seq
    entries = await _entries(redis, stream)
    assert set(entries[0]) == {b"event"} and orjson.loads(entries[0][b"event"])["type"] == "label"
    got = [(lab.src, lab.uri, lab.val, lab.neg) for f in entries for lab in parse_label_entry(f)]
    assert got == expected
    assert await _keys(redis, redis_prefix) == {saved: b"7", stream: len(expected)}

    # again: the same labels once more (the indexer applies them idempotently), cursor untouched
    again = await replay_labels(redis, _config(redis_url, redis_prefix, seeded_devnet), labeler.url, stream=stream,
                                from_cursor=0, idle_s=IDLE_S)
    assert again.queued == result.queued
    got = [(lab.src, lab.uri, lab.val, lab.neg) for f in await _entries(redis, stream) for lab in parse_label_entry(f)]
    assert got == expected + expected
    assert await redis.get(saved) == b"7"

    # a window: after the third label's seq up to the fifth's
    seqs = sorted(seq for seq, _ in labeler.labels())
    window = f"{redis_prefix}label_window"
    part = await replay_labels(redis, _config(redis_url, redis_prefix, seeded_devnet), labeler.url, stream=window,
                               from_cursor=seqs[2], until=seqs[4], idle_s=IDLE_S)
    assert part.stopped == "until" and part.last_seq == seqs[4] and part.queued == {window: 2}
    got = [(lab.src, lab.uri, lab.val, lab.neg) for f in await _entries(redis, window) for lab in parse_label_entry(f)]
    assert got == expected[3:5]


async def test_replay_labels_verifies_signatures(devnet: Devnet, redis: aioredis.Redis, redis_url: str,
                                                 redis_prefix: str) -> None:
    labeler = devnet.labeler
    assert labeler is not None
    await labeler.label("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "spam")
    await labeler.label("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", "nudity")
    await labeler.negate("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", "nudity")
    devnet.faults.bad_signature = True
    await labeler.label("did:plc:cccccccccccccccccccccccc", "forged")
    devnet.faults.bad_signature = False
    config = IngesterConfig(redis_url=redis_url, plc_url=devnet.plc.url, verify="strict")
    results = {}
    for verify in ("strict", "lenient"):
        stream = f"{redis_prefix}{verify}"
        config = dataclasses.replace(config, verify=verify)
        result = await replay_labels(redis, config, labeler.url, stream=stream, idle_s=IDLE_S)
        assert result.ok and result.last_seq == labeler.seq
        results[verify] = [(lab.uri, lab.val, lab.neg) for f in await _entries(redis, stream)
                           for lab in parse_label_entry(f)]
    # the negation replaces its label in the labeler's log: replaying from 0 applies it
    assert results["strict"] == [("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "spam", False),
                                 ("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", "nudity", True)]
    assert results["lenient"] == [*results["strict"], ("did:plc:cccccccccccccccccccccccc", "forged", False)]


async def test_replay_firehose_window(seeded_devnet: SeededDevnet, redis: aioredis.Redis, redis_url: str,
                                      redis_prefix: str) -> None:
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    relay = net.relay
    assert relay is not None
    stream = f"{redis_prefix}firehose_live"
    saved = redis_prefix + cursor_key("firehose_live", relay.url)
    await redis.set(saved, "123")
    config = _config(redis_url, redis_prefix, seeded_devnet)

    # the whole history: replaying it rebuilds every live account's records
    result = await replay_firehose(redis, config, relay.url, stream=stream, cursor=0, idle_s=IDLE_S)
    assert result.ok and result.stopped == "caught-up", result
    assert result.last_seq == relay.seq and result.frames >= relay.seq
    entries = await _entries(redis, stream)
    assert result.queued.get(stream) == len(entries) > 0
    state: dict[str, str] = {}
    seqs = []
    for fields in entries:
        assert set(fields) == {b"event"}
        event = parse_stream_event(fields)
        if isinstance(event, RecordEvent):
            state[event.uri] = event.cid
        elif isinstance(event, DeleteEvent):
            state.pop(event.uri, None)
        seqs.append(getattr(event, "seq", 0))
    assert seqs == sorted(seqs) and seqs[0] >= 1
    keep = CollectionFilter(config.collections)
    expected = {uri: r["cid"] for did, a in manifest.accounts.items() if a.status != "deleted"
                for uri, r in a.records.items() if keep(uri.split("/")[3])}
    assert {u: c for u, c in state.items() if manifest.accounts[u.split("/")[2]].status != "deleted"} == expected
    # only the stream (and any resync requests) was written: no cursor, no per-repo state
    keys = await _keys(redis, redis_prefix)
    assert keys[saved] == b"123"
    assert not [k for k in keys if ":repo:" in k or (":cursor:" in k and k != saved)]

    # a window (cursor, until]: only its events, and the same ones on a second run
    lo, hi = relay.seq // 3, relay.seq // 2
    window = f"{redis_prefix}firehose_window"
    first = await replay_firehose(redis, config, relay.url, stream=window, cursor=lo, until=hi, idle_s=IDLE_S)
    assert first.ok and first.stopped == "until" and first.last_seq == hi, first
    one = await _entries(redis, window)
    in_window = [f for f in entries if lo < orjson.loads(f[b"event"]).get("seq", 0) <= hi]
    assert one == in_window and one
    second = await replay_firehose(redis, config, relay.url, stream=window, cursor=lo, until=hi, idle_s=IDLE_S)
    assert second.queued == first.queued
    assert await _entries(redis, window) == one + one
    assert await redis.get(saved) == b"123"


async def test_cli(seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str, redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    assert net.labeler is not None and net.relay is not None
    env = {**os.environ, "REDIS_URL": redis_url, "PLC_URL": net.plc.url,
           "PSKY_HANDLE_RESOLVER_MAP": net.handle_resolver_map(), "INGESTER_REPO_STREAM": f"{redis_prefix}repo_backfill"}

    async def psky(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "psky.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await psky("replay", "labels", "--host", net.labeler.url, "--stream",
                                f"{redis_prefix}label_live", "--idle", str(IDLE_S))
    assert code == 0, err
    assert f"{len(net.labeler.labels())} labels queued on {redis_prefix}label_live" in out

    code, out, err = await psky("replay", "firehose", "--host", net.relay.url, "--cursor", "0", "--until", "5",
                                "--stream", f"{redis_prefix}firehose_live", "--idle", str(IDLE_S), "--json")
    assert code == 0, err
    summary = orjson.loads(out)
    assert summary["stopped"] == "until" and summary["last_seq"] == 5 and summary["ok"]
    assert await redis.xlen(f"{redis_prefix}firehose_live") == summary["queued"][f"{redis_prefix}firehose_live"]

    # a cursor past the relay's head: the error frame ends the replay with exit status 1
    code, out, _ = await psky("replay", "firehose", "--host", net.relay.url, "--cursor", str(net.relay.seq + 1000),
                              "--stream", f"{redis_prefix}firehose_live", "--idle", str(IDLE_S))
    assert code == 1 and "FutureCursor" in out
