"""End-to-end ingester tests: the real devnet (relay, PDSes, labeler, PLC) into real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from psky.config import ConfigError
from psky.devnet.network import Devnet
from psky.ingester import IngesterConfig, run_ingester
from psky.ingester.config import CollectionFilter, normalize_host
from psky.ingester.metrics import IngesterMetrics
from psky.ingester.repos import enqueue_repos
from psky.streams import CURSOR_DONE, cursor_key, parse_backfill_request, parse_label_entry

if TYPE_CHECKING:
    from tests.devnet_fixtures import SeededDevnet

pytest_plugins = ("tests.devnet_fixtures",)

WANTED = CollectionFilter(("app.bsky.*", "chat.bsky.*"))


def make_config(redis_url: str, prefix: str, net: Devnet, **env: str) -> IngesterConfig:
    assert net.relay is not None and net.labeler is not None
    base = {
        "REDIS_URL": redis_url,
        "INGESTER_MODE": "firehose",
        "INGESTER_RELAY_HOSTS": net.relay.url,
        "INGESTER_LABELER_HOSTS": net.labeler.url,
        "INGESTER_FIREHOSE_STREAM": prefix + "firehose_live",
        "INGESTER_REPO_STREAM": prefix + "repo_backfill",
        "INGESTER_LABEL_STREAM": prefix + "label_live",
        "PLC_URL": net.plc.url,
        "INGESTER_METRICS_PORT": "-1",
        "INGESTER_FIREHOSE_START_CURSOR": "0",
        "INGESTER_BATCH_TIMEOUT_MS": "20",
        "INGESTER_RECONNECT_MIN_MS": "20",
        "INGESTER_RECONNECT_MAX_MS": "200",
        "INGESTER_REPOS_RECHECK_S": "0.1",
    }
    base.update(env)
    return IngesterConfig.from_env(base)


@asynccontextmanager
async def running(config: IngesterConfig) -> AsyncIterator[IngesterMetrics]:
    registry = CollectorRegistry()
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingester(config, stop=stop, registry=registry))
    metrics = IngesterMetrics.__new__(IngesterMetrics)
    metrics.registry = registry
    try:
        yield metrics
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def wait_for(check: Callable[[], Any], limit_s: float = 60.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_cursor(redis: aioredis.Redis, key: str, target: int, limit_s: float = 60.0) -> None:
    async def check() -> bool:
        value = await redis.get(key)
        return value is not None and int(value) >= target

    await wait_for(check, limit_s, f"{key} to reach {target}")


async def xrange_all(redis: aioredis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(stream))


async def read_events(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"event"]) for _, fields in await xrange_all(redis, stream)]


def apply_events(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {}
    for ev in events:
        if ev["type"] == "account" and ev.get("status") == "deleted":  # as an indexer does
            state = {u: r for u, r in state.items() if not u.startswith(f"at://{ev['did']}/")}
        if ev["type"] not in ("create", "update", "delete"):
            continue
        uri = f"at://{ev['did']}/{ev['collection']}/{ev['rkey']}"
        if ev["type"] == "delete":
            state.pop(uri, None)
        else:
            state[uri] = {"cid": ev["cid"], "value": ev["record"]}
    return state


def expected_records(seeded: SeededDevnet) -> dict[str, dict[str, Any]]:
    return {uri: rec for uri, rec in seeded.manifest.records().items() if WANTED(uri.split("/")[3])}


# --- configuration ------------------------------------------------------------------------


def test_config_defaults_and_aliases() -> None:
    c = IngesterConfig.from_env({"INGESTER_HOSTS": "relay.example, http://127.0.0.1:2470/"})
    assert c.relay_hosts == ["https://relay.example", "http://127.0.0.1:2470"]
    assert c.mode == "all" and c.verify == "lenient" and c.collections == ("app.bsky.*", "chat.bsky.*")
    assert c.firehose_stream == "firehose_live" and c.start_cursor is None
    c = IngesterConfig.from_env({"INGESTER_HIGH_WATER_MARK": "7", "INGESTER_LABEL_HIGH_WATER_MARK": "3",
                                 "REDIS_HOST": "redis:6379", "RUST_LOG": "debug"})
    assert (c.firehose_high_water_mark, c.repo_high_water_mark, c.label_high_water_mark) == (7, 7, 3)
    assert c.redis_url == "redis://redis:6379" and c.log_level == "debug"


@pytest.mark.parametrize(
    ("name", "value"),
    [("INGESTER_MODE", "sometimes"), ("INGESTER_VERIFY", "maybe"), ("INGESTER_BATCH_SIZE", "0"),
     ("INGESTER_HIGH_WATER_MARK", "lots"), ("INGESTER_COLLECTIONS", "app.*bsky"),
     ("INGESTER_RELAY_HOSTS", "ftp://relay")],
)
def test_config_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        IngesterConfig.from_env({name: value})


def test_collection_filter_and_hosts() -> None:
    f = CollectionFilter(("app.bsky.*", "chat.bsky.convo"))
    assert f("app.bsky.feed.post") and f("chat.bsky.convo") and not f("chat.bsky.other")
    assert not f("com.example.thing") and not f("app.bskyx.thing")
    assert CollectionFilter(("*",))("anything.at.all")
    assert normalize_host("wss://r.example/") == "wss://r.example"


async def test_cancel_and_wait_outlasts_a_swallowed_cancellation() -> None:
    """A task that loses one cancellation (as CPython 3.11's wait_for can make it) is still
    stopped, and a cancellation of the caller is never absorbed."""
    from psky._aio import cancel_and_wait, wait_bounded

    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # lost, as inside redis-py's send path; the task goes on
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await cancel_and_wait(task, recancel_s=0.05)
    assert swallowed.is_set() and task.cancelled()

    async def failing() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(failing())
    await asyncio.sleep(0)  # it ran and failed before the cancel
    with pytest.raises(ValueError, match="boom"):
        await cancel_and_wait(failed)

    # the caller's own cancellation propagates while it waits for a task that ignores its own
    ignored = asyncio.Event()
    deaf_until = asyncio.Event()

    async def deaf() -> None:
        while not deaf_until.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                ignored.set()

    inner = asyncio.create_task(deaf())
    outer = asyncio.create_task(cancel_and_wait(inner, recancel_s=0.05))
    await ignored.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert not inner.done()
    deaf_until.set()
    await cancel_and_wait(inner)  # listens now
    assert inner.done()

    with pytest.raises(TimeoutError):
        await wait_bounded(asyncio.sleep(3600), 0.05)
    assert await wait_bounded(asyncio.sleep(0, result=7), 30) == 7


# --- firehose -----------------------------------------------------------------------------


async def test_firehose_reproduces_manifest(seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str,
                                            redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    assert net.relay is not None
    config = make_config(redis_url, redis_prefix, net, INGESTER_VERIFY="strict")
    key = cursor_key(config.firehose_stream, net.relay.url)
    async with running(config) as metrics:
        await wait_cursor(redis, key, net.relay.seq)
    events = await read_events(redis, config.firehose_stream)
    assert apply_events(events) == expected_records(seeded_devnet)
    seqs = [ev["seq"] for ev in events]
    assert seqs == sorted(seqs)
    kinds = {ev["type"] for ev in events}
    assert {"create", "delete", "account", "identity"} <= kinds
    for ev in events:
        if ev["type"] == "account":
            assert isinstance(ev["active"], bool)
    assert metrics.total("ingester_verification_failures_total") == 0
    assert metrics.total("ingester_dropped_commits_total") == 0
    assert metrics.total("firehose_ingester_incoming_events_total") >= net.relay.seq
    # every account status change reached the stream
    statuses = {ev["did"]: ev.get("status") for ev in events if ev["type"] == "account"}
    for did, acct in seeded_devnet.manifest.accounts.items():
        if acct.status != "active":
            assert statuses.get(did) == acct.status


async def test_restart_resumes_without_loss(seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str,
                                            redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    assert net.relay is not None
    config = make_config(redis_url, redis_prefix, net, INGESTER_BATCH_SIZE="7", INGESTER_HIGH_WATER_MARK="0")
    key = cursor_key(config.firehose_stream, net.relay.url)
    target = net.relay.seq
    stops: list[int] = []
    for _ in range(3):  # stop part-way, several times (a fast run may already be done)
        async with running(config):  # stop right after the first batch it writes
            await wait_cursor(redis, key, min((stops[-1] if stops else 0) + 1, target))
        stops.append(int(await redis.get(key) or 0))
    # (on a fast machine the first run may finish before it is stopped; the checks below
    # hold either way, and the stops list shows where each run ended)
    async with running(config):
        await wait_cursor(redis, key, target)
    events = await read_events(redis, config.firehose_stream)
    assert apply_events(events) == expected_records(seeded_devnet)
    # duplicates only from at-least-once replays of the frame being handled at a stop: with
    # them removed, the stream is in relay order
    unique: dict[tuple[Any, ...], int] = {}
    for ev in events:
        unique.setdefault((ev["seq"], ev["type"], ev.get("collection"), ev.get("rkey")), ev["seq"])
    seqs = list(unique.values())
    assert seqs == sorted(seqs)
    assert len(events) - len(unique) <= 3 * 200  # at most one commit per restart


async def test_collection_filter_counts(seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str,
                                        redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    assert net.relay is not None
    config = make_config(redis_url, redis_prefix, net, INGESTER_COLLECTIONS="app.bsky.feed.like",
                         INGESTER_VERIFY="off")
    key = cursor_key(config.firehose_stream, net.relay.url)
    async with running(config) as metrics:
        await wait_cursor(redis, key, net.relay.seq)
    events = await read_events(redis, config.firehose_stream)
    ops = [ev for ev in events if ev["type"] in ("create", "update", "delete")]
    assert ops and all(ev["collection"] == "app.bsky.feed.like" for ev in ops)
    assert metrics.total("ingester_firehose_filtered_operations_total") > 0
    likes = {u: r for u, r in seeded_devnet.manifest.records().items() if "/app.bsky.feed.like/" in u}
    assert apply_events(events) == likes


async def test_unverified_path_equals_process_commit(seeded_devnet: SeededDevnet) -> None:
    """The verify=off fast path gives the events and reasons ``process_commit`` gives (with
    the checks "off" skips), on every commit of the relay, and on damaged copies."""
    import dataclasses

    import aiohttp

    from psky.atproto.firehose import CommitEvent, decode_frame, process_commit, to_stream_events
    from psky.ingester._unverified import process_commit_unverified

    net = seeded_devnet.net
    assert net.relay is not None
    url = net.relay.url.replace("http://", "ws://") + "/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
    commits: list[CommitEvent] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        seen = 0
        while seen < net.relay.seq:
            frame = decode_frame((await ws.receive()).data)
            seen = max(seen, getattr(frame, "seq", 0) or 0)
            if isinstance(frame, CommitEvent):
                commits.append(frame)
    assert len(commits) > 100
    damaged = []
    for i, ev in enumerate(commits[:60]):
        blocks = bytearray(ev.blocks)
        if i % 3 == 0:
            blocks = blocks[: len(blocks) - 5]  # truncated: a record block goes missing
        elif i % 3 == 1:
            blocks[-3] ^= 0xFF  # a record's bytes changed
        else:
            blocks = blocks[:1]  # header cut
        damaged.append(dataclasses.replace(ev, blocks=bytes(blocks)))
    for ev in commits + damaged:
        want = process_commit(ev, signing_key=None, check_proof=False, verify_blocks=False)
        got = process_commit_unverified(ev)
        assert to_stream_events(got, ev) == to_stream_events(want, ev)
        assert set(got.reasons) <= set(want.reasons)
        assert _DATA_LOSS_OR_OP_REASONS.isdisjoint(want.reasons) or got.reasons == want.reasons


_DATA_LOSS_OR_OP_REASONS = frozenset({"bad-car", "missing-block", "bad-record", "invalid-op", "invalid-path"})


async def test_listrepos_enumeration(seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str,
                                     redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    assert net.relay is not None
    config = make_config(redis_url, redis_prefix, net, INGESTER_MODE="backfill", INGESTER_REPOS_PAGE_SIZE="7")
    key = cursor_key(config.repo_stream, net.relay.url)

    async def done() -> bool:
        return await redis.get(key) == CURSOR_DONE.encode()

    async with running(config) as metrics:
        await wait_for(done, 30, "listRepos done marker")
    entries = [parse_backfill_request(fields) for _, fields in await xrange_all(redis, config.repo_stream)]
    dids = [e.did for e in entries]
    assert len(dids) == len(set(dids))
    assert set(dids) == set(seeded_devnet.manifest.accounts)
    by_did = {e.did: e for e in entries}
    for did, acct in seeded_devnet.manifest.accounts.items():
        e = by_did[did]
        assert e.host == net.relay.url and e.rev
        if acct.status == "active":
            assert e.active is not False
        else:
            assert e.active is False
    assert metrics.total("ingester_repos_enumerated_total") == len(entries)


async def test_labels_reach_label_live(seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str,
                                       redis: aioredis.Redis) -> None:
    net = seeded_devnet.net
    assert net.labeler is not None
    config = make_config(redis_url, redis_prefix, net, INGESTER_MODE="labeler", INGESTER_VERIFY="strict")
    key = cursor_key(config.label_stream, net.labeler.url)
    async with running(config) as metrics:
        await wait_cursor(redis, key, net.labeler.seq)
    labels = [lab for _, fields in await xrange_all(redis, config.label_stream) for lab in parse_label_entry(fields)]
    issued = [lab for _, lab in sorted(net.labeler.labels(), key=lambda item: item[0])]
    assert len(issued) >= 30
    assert labels == issued  # the labeler compacts superseded labels; the current ones all arrive
    assert metrics.total("labeler_ingester_verification_failures_total") == 0
    assert metrics.total("labeler_ingester_stream_events_total") == len(issued)


async def test_health_and_metrics_over_http(seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str,
                                           redis: aioredis.Redis) -> None:
    """The TypeScript and rsky metric names, scraped from the running service's own server."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    net = seeded_devnet.net
    assert net.relay is not None and net.labeler is not None
    config = make_config(redis_url, redis_prefix, net, INGESTER_MODE="all", INGESTER_METRICS_PORT="0",
                         INGESTER_METRICS_HOST="127.0.0.1", INGESTER_COLLECTIONS="app.bsky.feed.like")
    ports: list[int] = []
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingester(config, stop=stop, registry=CollectorRegistry(),
                                            on_listening=ports.append))
    try:
        async def listening() -> bool:
            return bool(ports)

        await wait_for(listening, 30, "the metrics server")
        base = f"http://127.0.0.1:{ports[0]}"
        await wait_cursor(redis, cursor_key(config.firehose_stream, net.relay.url), net.relay.seq)
        await wait_cursor(redis, cursor_key(config.label_stream, net.labeler.url), net.labeler.seq)
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/health") as resp:
                assert resp.status == 200
                health = await resp.json()
            assert health["status"] == "ok" and health["tasks"] == 3 and health["dead"] == []
            samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

            async def scraped() -> bool:
                async with http.get(base + "/metrics") as resp:
                    assert resp.status == 200
                    body = await resp.text()
                samples.clear()
                for family in text_string_to_metric_families(body):
                    for sample in family.samples:
                        samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
                return (total("labeler_ingester_stream_events_total") > 0
                        and total("ingester_repos_enumerated_total") > 0
                        and total("firehose_ingester_incoming_events_total") >= net.relay.seq)

            def total(name: str, **labels: str) -> float:
                return sum(v for (n, ls), v in samples.items()
                           if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))

            await wait_for(scraped, 30, "every source's metrics")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    relay, labeler = net.relay.url, net.labeler.url
    assert total("firehose_ingester_incoming_events_total", host=relay) >= net.relay.seq
    assert total("firehose_ingester_stream_events_total", host=relay, type="create") > 0
    assert total("firehose_ingester_stream_events_total", host=relay, type="account") > 0
    assert total("ingester_firehose_filtered_operations_total", host=relay) > 0
    assert total("labeler_ingester_incoming_events_total", host=labeler) > 0
    assert total("labeler_ingester_stream_events_total", host=labeler) > 0
    assert total("labeler_ingester_verification_failures_total") == 0
    assert total("ingester_repos_enumerated_total", host=relay) > 0


async def test_listrepos_failing_cursor_is_skipped_and_rechecked(make_devnet: MakeDevnet, redis_url: str,
                                                                 redis_prefix: str, redis: aioredis.Redis) -> None:
    """A relay answering 500 for every page holding one account: smaller pages get the repos
    before it, the cursor in front of it is given up (counted, kept in a set), enumeration
    skips that one account and finishes; once the relay is healed, the re-check queues it."""
    async with make_devnet(n_pds=1, seed=17) as net:
        workload = net.workload()
        await workload.seed(accounts=9, records_per_account=1, labels=0)
        await net.settle()
        assert net.relay is not None
        order = [acc.did for acc in net.relay.accounts()]
        bad = order[4]
        net.faults.list_repos_500_dids = frozenset({bad})
        config = make_config(redis_url, redis_prefix, net, INGESTER_MODE="backfill", INGESTER_REPOS_PAGE_SIZE="4",
                             INGESTER_REPOS_PAGE_ATTEMPTS="2", INGESTER_REPOS_RECHECK_S="0.2")
        key = cursor_key(config.repo_stream, net.relay.url)
        given_up = key + ":given-up"

        async def dids() -> list[str]:
            return [parse_backfill_request(f).did for _, f in await xrange_all(redis, config.repo_stream)]

        async def done() -> bool:
            return await redis.get(key) == CURSOR_DONE.encode()

        async with running(config) as metrics:
            await wait_for(done, 60, "listRepos done marker")
            assert set(await dids()) == set(order) - {bad}
            assert metrics.total("ingester_repos_cursor_given_up_total") == 1
            assert await redis.smembers(given_up) == {b"4"}  # the cursor in front of the bad account
            assert metrics.total("ingester_repos_enumeration_errors_total") > 0

            net.faults.list_repos_500_dids = frozenset()

            async def recovered() -> bool:
                return not await redis.exists(given_up)

            await wait_for(recovered, 30, "the given-up cursor to be re-checked")
        got = await dids()
        assert sorted(got) == sorted(order)  # every account exactly once


# --- faults ------------------------------------------------------------------------------

MakeDevnet = Callable[..., AbstractAsyncContextManager[Devnet]]


@pytest.mark.parametrize(
    "faults",
    [{"drop_after_frames": 25}, {"stall_seconds": 1.5, "stall_after_frames": 10}, {"malformed_every": 9}],
    ids=["drop", "stall", "malformed"],
)
async def test_stream_faults_survived(make_devnet: MakeDevnet, faults: dict[str, Any], redis_url: str,
                                      redis_prefix: str, redis: aioredis.Redis) -> None:
    async with make_devnet(n_pds=1, seed=3) as net:
        workload = net.workload()
        await workload.seed(accounts=6, records_per_account=8, labels=0)
        await net.settle()
        config = make_config(redis_url, redis_prefix, net, INGESTER_IDLE_TIMEOUT_S="0.5")
        key = cursor_key(config.firehose_stream, net.relay.url)  # type: ignore[union-attr]
        for name, value in faults.items():
            setattr(net.faults, name, value)
        async with running(config) as metrics:
            await workload.live(rate=None, events=60)
            seq = await net.settle()
            await wait_cursor(redis, key, seq)
        events = await read_events(redis, config.firehose_stream)
        expected = {u: r for u, r in workload.manifest.records().items() if WANTED(u.split("/")[3])}
        if "malformed_every" in faults:
            # the relay replaced some frames by garbage: those are counted, the rest arrive
            # (the cursor reaching the last seq above shows the task survived them)
            bad = metrics.total("ingester_bad_frames_total")
            assert bad > 0
            assert metrics.total("ingester_firehose_frames_total") + bad == metrics.total(
                "firehose_ingester_incoming_events_total")
            got = apply_events(events)
            assert sum(1 for u, r in expected.items() if got.get(u) == r) > len(expected) // 2
        else:
            assert apply_events(events) == expected
            reason = "idle" if "stall_seconds" in faults else "closed"
            assert metrics.total("ingester_reconnects_total", reason=reason) > 0


async def test_bad_signature_strict_drops_and_resyncs(make_devnet: MakeDevnet, redis_url: str,
                                                      redis_prefix: str, redis: aioredis.Redis) -> None:
    async with make_devnet(n_pds=1, seed=5) as net:
        workload = net.workload()
        await workload.seed(accounts=4, records_per_account=3, labels=0)
        seq = await net.settle()
        config = make_config(redis_url, redis_prefix, net, INGESTER_VERIFY="strict")
        key = cursor_key(config.firehose_stream, net.relay.url)  # type: ignore[union-attr]
        async with running(config):
            await wait_cursor(redis, key, seq)
        before = len(await read_events(redis, config.firehose_stream))
        net.faults.bad_signature = True
        await workload.live(rate=None, events=20)
        seq = await net.settle()
        async with running(config) as metrics:
            await wait_cursor(redis, key, seq)
        assert metrics.total("ingester_verification_failures_total", reason="bad-signature") > 0
        dropped = metrics.total("ingester_dropped_commits_total")
        assert dropped > 0
        resyncs = [parse_backfill_request(f) for _, f in await xrange_all(redis, config.repo_stream)]
        assert len(resyncs) >= dropped
        assert {r.did for r in resyncs} <= set(workload.manifest.accounts)
        after = await read_events(redis, config.firehose_stream)
        assert all(ev["type"] not in ("create", "update", "delete") for ev in after[before:])

        # lenient passes the same commits on, counted
        lenient = make_config(redis_url, redis_prefix + "lenient:", net, INGESTER_VERIFY="lenient")
        lkey = cursor_key(lenient.firehose_stream, net.relay.url)  # type: ignore[union-attr]
        async with running(lenient) as metrics:
            await wait_cursor(redis, lkey, seq)
        assert metrics.total("ingester_verification_failures_total", reason="bad-signature") > 0
        assert metrics.total("ingester_dropped_commits_total") == 0
        got = apply_events(await read_events(redis, lenient.firehose_stream))
        assert got == {u: r for u, r in workload.manifest.records().items() if WANTED(u.split("/")[3])}


async def test_backpressure_stops_reading_at_high_water_mark(make_devnet: MakeDevnet, redis_url: str,
                                                            redis_prefix: str, redis: aioredis.Redis) -> None:
    async with make_devnet(n_pds=1, seed=9) as net:
        workload = net.workload()
        await workload.seed(accounts=5, records_per_account=20, labels=0)
        seq = await net.settle()
        config = make_config(redis_url, redis_prefix, net, INGESTER_HIGH_WATER_MARK="40", INGESTER_BATCH_SIZE="10",
                             INGESTER_IDLE_TIMEOUT_S="30")
        key = cursor_key(config.firehose_stream, net.relay.url)  # type: ignore[union-attr]
        async with running(config) as metrics:
            async def full() -> bool:
                return int(await redis.xlen(config.firehose_stream)) >= 40

            await wait_for(full, 30, "the stream to reach the high-water mark")
            await asyncio.sleep(0.5)
            length = int(await redis.xlen(config.firehose_stream))
            assert length < 40 + 10  # at most one batch past the mark
            assert int(await redis.get(key) or 0) < seq  # reading stopped
            assert metrics.total("ingester_reconnects_total") == 0

            async def flagged() -> bool:
                return metrics.total("ingester_backpressure", stream=config.firehose_stream) == 1

            await wait_for(flagged, 5, "the backpressure gauge")
            # a consumer drains the stream: ingestion resumes and completes
            drained: list[dict[str, Any]] = []

            async def drain() -> bool:
                found = await xrange_all(redis, config.firehose_stream)
                if found:
                    drained.extend(orjson.loads(f[b"event"]) for _, f in found)
                    await redis.xdel(config.firehose_stream, *[i for i, _ in found])
                value = await redis.get(key)
                return value is not None and int(value) >= seq and not await redis.xlen(config.firehose_stream)

            await wait_for(drain, 60, "ingestion to finish while draining")
        drained += await read_events(redis, config.firehose_stream)
        expected = {u: r for u, r in workload.manifest.records().items() if WANTED(u.split("/")[3])}
        assert apply_events(drained) == expected


async def _start_redis(port: int, data_dir: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir, "--appendonly", "yes",
        "--appendfsync", "always", "--save", "", stdout=asyncio.subprocess.DEVNULL,
    )
    client = aioredis.from_url(f"redis://127.0.0.1:{port}")
    try:
        for _ in range(200):
            try:
                if await client.ping():
                    return proc
            except Exception:
                await asyncio.sleep(0.05)
        raise AssertionError("redis-server did not start")
    finally:
        await client.aclose()


async def test_redis_outage_loses_nothing(make_devnet: MakeDevnet, tmp_path: Any) -> None:
    import shutil
    import socket

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}"
    proc = await _start_redis(port, str(tmp_path))
    redis = aioredis.from_url(url)
    try:
        async with make_devnet(n_pds=1, seed=11) as net:
            workload = net.workload()
            await workload.seed(accounts=4, records_per_account=5, labels=0)
            seq = await net.settle()
            config = make_config(url, "", net, INGESTER_BATCH_SIZE="5")
            key = cursor_key(config.firehose_stream, net.relay.url)  # type: ignore[union-attr]
            async with running(config) as metrics:
                await wait_cursor(redis, key, seq)
                proc.terminate()  # the server we started, by its process
                await proc.wait()
                await workload.live(rate=None, events=80)
                seq = await net.settle()
                await asyncio.sleep(1.0)  # the ingester meets the outage
                proc = await _start_redis(port, str(tmp_path))
                await redis.aclose()
                redis = aioredis.from_url(url)  # our own pooled connection died with the server
                await wait_cursor(redis, key, seq)
            events = await read_events(redis, config.firehose_stream)
            expected = {u: r for u, r in workload.manifest.records().items() if WANTED(u.split("/")[3])}
            assert apply_events(events) == expected
            assert metrics.total("ingester_bad_frames_total") == 0
            assert metrics.total("ingester_stream_write_retries_total") > 0  # the outage was met
    finally:
        await redis.aclose()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def test_enqueue_repos_by_hand(redis: aioredis.Redis, redis_prefix: str) -> None:
    stream = redis_prefix + "repo_backfill"
    with pytest.raises(ValueError, match="not a valid DID"):
        await enqueue_repos(redis, ["did:plc:abc", "nope"], stream=stream)
    assert await redis.exists(stream) == 0
    assert await enqueue_repos(redis, ["did:plc:abc", "did:web:example.com"], stream=stream) == 2
    got = [parse_backfill_request(f) for _, f in await xrange_all(redis, stream)]
    assert [(r.did, r.rev, r.host) for r in got] == [("did:plc:abc", "", ""), ("did:web:example.com", "", "")]
