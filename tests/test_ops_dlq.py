"""``psky dlq``: dead letters written by the real consumer, then listed, shown, replayed, purged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from psky.backfiller import Backfiller, BackfillerConfig
from psky.devnet.network import Devnet
from psky.ops.dlq import dlq_names, entries, purge, reason_class, replay, summarize
from psky.ops.status import StatusOptions, collect
from psky.streams import (
    FIREHOSE_GROUP,
    BackfillRequest,
    RecordEvent,
    StreamConsumer,
    backfill_fields,
    connect,
    parse_stream_event,
)

pytest_plugins = ("tests.devnet_fixtures",)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_url)
    yield c
    await c.aclose()


async def _dead_letters(client: aioredis.Redis, stream: str, events: list[bytes], reasons: list[str]) -> list[str]:
    """Write *events* to *stream*, read them as the indexer's group, dead-letter event i with
    reasons[i] (the real consumer path); returns the original entry ids."""
    ids = [(await client.xadd(stream, {"event": e})).decode() for e in events]
    consumer = StreamConsumer(client, [stream], FIREHOSE_GROUP, "idx-1", block_ms=10)
    await consumer.ensure_groups()
    messages = await consumer.read()
    assert [m.id for m in messages] == ids
    for message, reason in zip(messages, reasons, strict=True):
        await consumer.dead_letter([message], reason)
    assert await client.xlen(stream) == 0  # acknowledged and deleted from the source
    return ids


def _event(n: int) -> bytes:
    return orjson.dumps({"type": "delete", "seq": n, "time": "2026-01-01T00:00:00.000Z", "did": "did:plc:abc",
                         "commit": "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5gmkqw2cbdy2nie", "rev": "3l2",
                         "collection": "app.bsky.feed.like", "rkey": f"3k{n}"})


async def test_list_show_replay_purge(client: aioredis.Redis, redis_prefix: str) -> None:
    live = f"{redis_prefix}firehose_live"
    dlq = f"{live}_dlq"
    events = [_event(n) for n in range(5)]
    reasons = ["db: deadlock detected on 12", "db: deadlock detected on 97", "bad record at did:plc:xyz",
               "db: deadlock detected on 5", "bad record at did:plc:qrs"]
    original_ids = await _dead_letters(client, live, events, reasons)

    assert dlq in await dlq_names(client, redis_prefix)
    assert f"{redis_prefix}repo_backfill_dlq" in await dlq_names(client, redis_prefix)
    summary = await summarize(client, dlq)
    assert summary.length == 5 and summary.scanned == 5
    assert summary.reasons == {"db: deadlock detected on N": 3, "bad record at <did>": 2}
    assert summary.origins == {live: 5}

    shown = [e async for e in entries(client, dlq, reason="bad record")]
    assert len(shown) == 2
    letter = shown[0].letter
    assert letter is not None
    assert letter.source_stream == live and letter.source_id == original_ids[2]
    assert letter.group == FIREHOSE_GROUP and letter.consumer == "idx-1" and letter.attempts == 1
    assert letter.fields == {"event": events[2]}
    assert shown[0].to_json()["fields"]["event"]["rkey"] == "3k2"

    # replay one, then the rest of the deadlocks: each lands in its origin with only its original fields
    first = await replay(client, dlq, reason="deadlock", limit=1)
    assert (first.replayed, dict(first.targets)) == (1, {live: 1})
    rest = await replay(client, dlq, reason="deadlock")
    assert rest.replayed == 2
    again = await replay(client, dlq, reason="deadlock")
    assert again.replayed == 0  # repeating is a no-op once done
    back = await client.xrange(live)
    assert [fields for _id, fields in back] == [{b"event": events[i]} for i in (0, 1, 3)]
    assert await client.xlen(dlq) == 2

    # purge by reason, then everything
    assert await purge(client, dlq, reason="nothing matches") == 0
    assert await purge(client, dlq, limit=1) == 1
    assert await purge(client, dlq) == 1
    assert await client.xlen(dlq) == 0


async def test_replay_of_rsky_backfiller_entries_goes_to_repo_backfill(client: aioredis.Redis,
                                                                      redis_prefix: str) -> None:
    dlq = f"{redis_prefix}repo_backfill_dlq"
    repo = b'{"did":"did:plc:abc","host":"https://pds.example","rev":"3l2"}'
    await client.xadd(dlq, {"repo": repo, "reason": "max_retries_exceeded", "attempts": "3"})
    await client.xadd(dlq, {"junk": "x", "attempts": "many"})  # unreadable: left in place
    result = await replay(client, dlq)
    assert (result.replayed, result.skipped) == (1, 1)
    assert [f for _i, f in await client.xrange(f"{redis_prefix}repo_backfill")] == [{b"repo": repo}]
    assert await client.xlen(dlq) == 1


def test_reason_class_masks_particulars() -> None:
    assert reason_class("gave up after 3 retries (max 3): HTTP 500 from https://pds.example/xrpc") == (
        "gave up after N retries (max N): HTTP N from <url>")
    assert reason_class("") == "(no reason)"


def _psky(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "psky.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


async def test_cli_end_to_end(client: aioredis.Redis, redis_url: str, redis_prefix: str) -> None:
    live = f"{redis_prefix}label_live"
    await _dead_letters(client, live, [b'{"type":"label"}', b'{"type":"label","x":1}'], ["bad label", "bad sig"])
    env = {**os.environ, "REDIS_URL": redis_url}
    p = ["--prefix", redis_prefix]

    res = _psky("dlq", "list", "label_live_dlq", *p, env=env)
    assert res.returncode == 0, res.stderr
    assert "label_live_dlq: 2 entries" in res.stdout and "bad label" in res.stdout

    res = _psky("dlq", "list", *p, "--json", env=env)
    listed = {s["stream"]: s for s in orjson.loads(res.stdout)}
    assert listed[f"{live}_dlq"]["reasons"] == {"bad label": 1, "bad sig": 1}
    assert listed[f"{redis_prefix}repo_backfill_dlq"]["length"] == 0

    res = _psky("dlq", "show", "label_live_dlq", *p, "-n", "1", "--json", env=env)
    shown = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert len(shown) == 1 and shown[0]["reason"] == "bad label" and shown[0]["fields"]["event"] == {"type": "label"}

    res = _psky("dlq", "purge", "label_live_dlq", *p, "--reason", "bad sig", env=env)
    assert res.returncode == 2 and "--yes" in res.stderr
    res = _psky("dlq", "purge", "label_live_dlq", *p, "--reason", "bad sig", "--yes", env=env)
    assert res.returncode == 0 and "deleted 1 entries" in res.stdout

    res = _psky("dlq", "replay", "label_live_dlq", *p, env=env)
    assert res.returncode == 0, res.stderr
    assert f"replayed 1 to {live}" in res.stdout
    assert [f for _i, f in await client.xrange(live)] == [{b"event": b'{"type":"label"}'}]
    assert await client.xlen(f"{live}_dlq") == 0

    res = _psky("dlq", "show", *p, env=env)
    assert res.returncode == 2  # a usage error, not a traceback
    assert "Traceback" not in res.stderr


def test_cli_uses_embedded_redis_when_unconfigured(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_HOST")}
    env["PSKY_DATA_DIR"] = str(tmp_path)
    res = _psky("dlq", "list", env=env)
    assert res.returncode == 0, res.stderr
    assert "repo_backfill_dlq: 0 entries" in res.stdout
    assert (tmp_path / "redis").is_dir()


async def _drain(client: aioredis.Redis, backfiller: Backfiller, stream: str) -> None:
    """Run the backfiller until its input is empty and nothing is in flight."""
    stop = asyncio.Event()
    task = asyncio.create_task(backfiller.run(stop))
    deadline = time.monotonic() + 90
    try:
        while not task.done() and (await client.xlen(stream) or backfiller.consumer.in_flight):
            assert time.monotonic() < deadline, "the backfiller did not drain its input"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await backfiller.close()


async def test_backfiller_dead_letters_replayed_into_the_running_service(
    make_devnet: Callable[..., AbstractAsyncContextManager[Devnet]], client: aioredis.Redis, redis_url: str,
    redis_prefix: str,
) -> None:
    """A PDS fails every request: the real backfiller dead-letters its repos; once the PDS
    is back, `replay` sends them to repo_backfill and the backfiller indexes them."""
    async with make_devnet(n_pds=1, labeler=False, seed=5) as net:
        manifest = await net.workload().seed(accounts=2, records_per_account=4, churn=0.0, labels=0)
        config = BackfillerConfig(
            redis_url=redis_url, consumer="bf-1", backfill_stream=f"{redis_prefix}repo_backfill",
            firehose_stream=f"{redis_prefix}firehose_backfill", dlq_stream=f"{redis_prefix}repo_backfill_dlq",
            max_retries=1, retry_initial_backoff_ms=10, retry_max_backoff_ms=50, plc_url=net.plc.url,
            allow_hosts=("127.0.0.1",), claim_idle_ms=1000, claim_interval_ms=50, max_host_wait_s=0.5,
            http_timeout_s=5.0,
        )  # fmt: skip
        for did in manifest.accounts:
            request = BackfillRequest(did=did, host=net.pdses[0].url, rev="")
            await client.xadd(config.backfill_stream, backfill_fields(request))  # type: ignore[arg-type]
        net.faults.http_500_every = 1
        await _drain(client, Backfiller(config, client), config.backfill_stream)

        summary = await summarize(client, config.dlq_stream)
        assert summary.length == 2
        [(reason, count)] = summary.reasons.items()
        assert count == 2 and reason.startswith("gave up after N retries (max N)"), reason
        assert summary.origins == {config.backfill_stream: 2}
        snap = await collect(redis_url, None, StatusOptions(prefix=redis_prefix))
        dlq = next(s for s in snap["redis"]["streams"] if s["stream"] == "repo_backfill_dlq")
        assert dlq["length"] == 2
        [group] = next(s for s in snap["redis"]["streams"] if s["stream"] == "repo_backfill")["groups"]
        assert group["name"] == "repo_backfill_group" and group["pending"] == 0
        assert [c["name"] for c in group["consumers"]] == ["bf-1"]

        net.faults.http_500_every = 0
        result = await replay(client, config.dlq_stream)
        assert result.replayed == 2 and await client.xlen(config.dlq_stream) == 0
        await _drain(client, Backfiller(config, client), config.backfill_stream)
        events = [parse_stream_event(f) for _i, f in await client.xrange(config.firehose_stream)]
        records = sum(isinstance(e, RecordEvent) for e in events)
        assert records == sum(len(a.records) for a in manifest.accounts.values())
        assert await client.xlen(config.dlq_stream) == 0
