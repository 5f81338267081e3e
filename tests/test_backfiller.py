"""psky backfiller against real Redis and the real devnet (PLC + PDSes), no mocks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis.asyncio as aioredis

from psky.atproto import plc
from psky.atproto.crypto import PrivateKey
from psky.atproto.syntax import is_valid_tid
from psky.backfiller import Backfiller, BackfillerConfig, BackfillerMetrics, run_backfiller
from psky.backfiller.hosts import (
    AddressGuard,
    AddressRefused,
    HostBlocked,
    HostLimiter,
    HostLimits,
    parse_retry_after,
)
from psky.config import ConfigError
from psky.devnet.faults import Faults
from psky.devnet.network import Devnet
from psky.devnet.workload import derived_key
from psky.streams import (
    AccountEvent,
    BackfillRequest,
    RecordEvent,
    RepoEvent,
    StreamConsumer,
    StreamEvent,
    backfill_fields,
    connect,
    parse_dead_letter,
    parse_stream_event,
)

if TYPE_CHECKING:
    from tests.devnet_fixtures import SeededDevnet

pytest_plugins = ("tests.devnet_fixtures",)

MakeDevnet = Callable[..., AbstractAsyncContextManager[Devnet]]


# --- configuration ------------------------------------------------------------------------


def test_config_defaults_and_seed_variables() -> None:
    env = {"REDIS_URL": "redis://r:6379", "BACKFILLER_CONSUMER": "rust-backfiller1"}
    c = BackfillerConfig.from_env(env)
    assert (c.consumer, c.group, c.backfill_stream, c.firehose_stream, c.dlq_stream) == (
        "rust-backfiller1", "repo_backfill_group", "repo_backfill", "firehose_backfill", "repo_backfill_dlq",
    )  # fmt: skip
    assert (c.concurrency, c.batch_size, c.http_timeout_s, c.max_retries) == (20, 500, 60.0, 3)
    assert (c.retry_initial_backoff_ms, c.retry_max_backoff_ms, c.metrics_port) == (1000, 30_000, 9090)
    assert c.plc_url == "https://plc.directory" and c.allow_hosts == ()
    assert c.claim_idle_ms > c.retry_max_backoff_ms
    assert (c.progress_interval_s, c.host_backlog) == (10.0, 0)
    c = BackfillerConfig.from_env(
        {
            "REDIS_HOST": "redis:6380", "BACKFILLER_CONSUMER": "b2", "BACKFILLER_CONCURRENCY": "5",
            "BACKFILLER_BATCH_SIZE": "50", "BACKFILLER_HTTP_TIMEOUT_SECS": "7", "BACKFILLER_MAX_RETRIES": "9",
            "BACKFILLER_RETRY_INITIAL_BACKOFF_MS": "10", "BACKFILLER_RETRY_MAX_BACKOFF_MS": "20",
            "BACKFILLER_METRICS_PORT": "9191", "BACKFILLER_GROUP": "g", "BACKFILLER_BACKFILL_STREAM": "in",
            "BACKFILLER_FIREHOSE_STREAM": "out", "PLC_URL": "http://plc:2582",
            "BACKFILLER_HIGH_WATER_MARK": "1000", "BACKFILLER_ALLOW_HOSTS": "127.0.0.1, 10.0.0.0/8",
        }
    )  # fmt: skip
    assert c.redis_url == "redis://redis:6380" and c.concurrency == 5 and c.batch_size == 50
    assert (c.http_timeout_s, c.max_retries, c.retry_initial_backoff_ms, c.retry_max_backoff_ms) == (
        7,
        9,
        10,
        20,
    )
    assert (c.metrics_port, c.group, c.backfill_stream, c.firehose_stream) == (9191, "g", "in", "out")
    assert c.plc_url == "http://plc:2582" and c.high_water_mark == 1000
    assert c.allow_hosts == ("127.0.0.1", "10.0.0.0/8")
    c = BackfillerConfig.from_env(
        {**env, "BACKFILLER_PROGRESS_INTERVAL_SECS": "2.5", "BACKFILLER_HOST_BACKLOG": "40"}
    )
    assert (c.progress_interval_s, c.host_backlog) == (2.5, 40)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REDIS_URL": "redis://r"}, "BACKFILLER_CONSUMER"),
        ({"BACKFILLER_CONSUMER": "c"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://r", "BACKFILLER_CONSUMER": "c", "BACKFILLER_CONCURRENCY": "x"}, "BACKFILLER_CONCURRENCY"),
        ({"REDIS_URL": "redis://r", "BACKFILLER_CONSUMER": "c", "BACKFILLER_CONCURRENCY": "0"}, "BACKFILLER_CONCURRENCY"),
        ({"REDIS_URL": "redis://r", "BACKFILLER_CONSUMER": "c", "BACKFILLER_MAX_RETRIES": "-1"}, "BACKFILLER_MAX_RETRIES"),
        ({"REDIS_URL": "redis://r", "BACKFILLER_CONSUMER": "c", "BACKFILLER_HTTP_TIMEOUT_SECS": "soon"},
         "BACKFILLER_HTTP_TIMEOUT_SECS"),
        ({"REDIS_URL": "redis://r", "BACKFILLER_CONSUMER": "c", "BACKFILLER_RETRY_MAX_BACKOFF_MS": "10"},
         "BACKFILLER_RETRY_MAX_BACKOFF_MS"),
        ({"REDIS_URL": "redis://r", "BACKFILLER_CONSUMER": "c", "BACKFILLER_METRICS_PORT": "70000"},
         "BACKFILLER_METRICS_PORT"),
        ({"REDIS_URL": "http://r", "BACKFILLER_CONSUMER": "c"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://r", "BACKFILLER_CONSUMER": "c", "BACKFILLER_PROGRESS_INTERVAL_SECS": "0"},
         "BACKFILLER_PROGRESS_INTERVAL_SECS"),
    ],
)  # fmt: skip
def test_config_errors_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        BackfillerConfig.from_env(env)


# --- hosts: address guard, Retry-After, limiter -------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:2583", "http://10.1.2.3", "http://192.168.0.1", "http://172.16.5.5",
        "http://169.254.169.254", "http://[::1]:80", "http://[fe80::1]", "http://224.0.0.1",
        "http://0.0.0.0", "http://[::ffff:127.0.0.1]", "http://localhost:80", "http://a.localhost",
        "ftp://example.com", "http:///nohost",
    ],
)  # fmt: skip
def test_guard_refuses_non_public_targets(url: str) -> None:
    with pytest.raises(AddressRefused):
        AddressGuard().check_url(url)


def test_guard_allow_list() -> None:
    guard = AddressGuard(["127.0.0.1", "10.0.0.0/8", "pds.internal", "*.lan"])
    assert guard.check_url("http://127.0.0.1:1234/x") == "127.0.0.1"
    assert guard.check_url("http://10.9.9.9") == "10.9.9.9"
    assert guard.check_url("https://pds.internal") == "pds.internal"
    assert guard.check_url("https://a.b.lan") == "a.b.lan"
    assert guard.check_url("https://8.8.8.8") == "8.8.8.8"
    assert guard.check_url("https://pds.example.com") == "pds.example.com"
    for refused in ("http://127.0.0.2", "http://192.168.1.1", "http://169.254.169.254"):
        with pytest.raises(AddressRefused):
            guard.check_url(refused)
    assert guard.address_allowed("10.0.0.1") and not guard.address_allowed("192.168.1.1")
    assert not guard.address_allowed("not-an-ip")


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"Retry-After": "3"}, now) == 3.0
    assert parse_retry_after({"Retry-After": "Tue, 14 Nov 2023 22:13:30 GMT"}, now) == pytest.approx(10.0)
    assert parse_retry_after({"RateLimit-Remaining": "0", "RateLimit-Reset": str(int(now) + 7)}, now) == 7.0
    assert parse_retry_after({"RateLimit-Remaining": "0", "RateLimit-Reset": "5"}, now) == 5.0
    assert parse_retry_after({"RateLimit-Remaining": "4", "RateLimit-Reset": "5"}, now) is None
    assert parse_retry_after({"Retry-After": "garbage"}, now) is None
    assert parse_retry_after({}, now) is None


async def test_host_limiter_rate_and_back_off() -> None:
    limiter = HostLimiter("h", HostLimits(concurrency=2, rate=50.0, burst=1))
    started = time.monotonic()
    for _ in range(6):
        async with limiter.slot(max_wait=1.0):
            pass
    assert time.monotonic() - started >= 5 / 50 * 0.9  # the rate holds after the burst
    limiter.block_for(0.1)
    started = time.monotonic()
    async with limiter.slot(max_wait=1.0):  # short back-off: waited out
        pass
    assert time.monotonic() - started >= 0.09
    limiter.block_for(30)
    with pytest.raises(HostBlocked) as info:
        async with limiter.slot(max_wait=1.0):
            pass
    assert info.value.seconds > 29 and limiter.rate_limited == 2


async def test_host_limiter_concurrency_cap() -> None:
    limiter = HostLimiter("h", HostLimits(concurrency=2, rate=0))
    peak = 0

    async def one() -> None:
        nonlocal peak
        async with limiter.slot(max_wait=1.0):
            peak = max(peak, limiter.active)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(one() for _ in range(8)))
    assert peak == 2 and limiter.requests == 8
    assert limiter.latency_s >= 0.009 and limiter.waiting == 0 and limiter.drain_estimate_s() == 0
    limiter.waiting = 6  # six queued behind two slots: about three request times
    assert limiter.drain_estimate_s() == pytest.approx(3 * limiter.latency_s)


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def _config(redis_url: str, prefix: str, net: Devnet, **overrides: Any) -> BackfillerConfig:
    base = BackfillerConfig(
        redis_url=redis_url,
        consumer="backfiller-1",
        group=f"{prefix}repo_backfill_group",
        backfill_stream=f"{prefix}repo_backfill",
        firehose_stream=f"{prefix}firehose_backfill",
        dlq_stream=f"{prefix}repo_backfill_dlq",
        concurrency=8,
        batch_size=50,
        http_timeout_s=5.0,
        max_retries=6,
        retry_initial_backoff_ms=20,
        retry_max_backoff_ms=200,
        plc_url=net.plc.url,
        allow_hosts=("127.0.0.1",),
        claim_idle_ms=1000,
        claim_interval_ms=50,
        max_host_wait_s=0.5,
        chunk_size=7,  # several chunks per repo
    )
    return replace(base, **overrides)


async def _enqueue(redis: aioredis.Redis, cfg: BackfillerConfig, net: Devnet, dids: list[str]) -> None:
    for did in dids:
        request = BackfillRequest(did=did, host=net.pdses[0].url, rev="")
        await redis.xadd(cfg.backfill_stream, backfill_fields(request))  # type: ignore[arg-type]


async def _run_until_drained(
    redis: aioredis.Redis, backfiller: Backfiller, cfg: BackfillerConfig, timeout_s: float = 60.0
) -> None:
    """Run until the input stream is empty and nothing is pending, then stop."""
    stop = asyncio.Event()
    task = asyncio.create_task(backfiller.run(stop))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if task.done():
                break
            if await redis.xlen(cfg.backfill_stream) == 0 and backfiller.consumer.in_flight == 0:
                break
        else:
            raise AssertionError("backfiller did not drain its input in time")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await backfiller.close()


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast(list[tuple[bytes, dict[bytes, bytes]]], reply)


async def _events(redis: aioredis.Redis, stream: str) -> list[StreamEvent]:
    return [parse_stream_event(fields) for _, fields in _entries(await redis.xrange(stream))]


async def _dead_letters(redis: aioredis.Redis, stream: str) -> list[Any]:
    return [parse_dead_letter(fields) for _, fields in _entries(await redis.xrange(stream))]


def _value(backfiller: Backfiller, name: str) -> float:
    value = backfiller.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_backfill_reproduces_the_seeded_devnet(
    seeded_devnet: SeededDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    cfg = _config(redis_url, redis_prefix, net)
    await _enqueue(redis, cfg, net, list(manifest.accounts))
    backfiller = Backfiller(cfg, redis)
    await _run_until_drained(redis, backfiller, cfg)

    events = await _events(redis, cfg.firehose_stream)
    records: dict[str, dict[str, Any]] = {}
    repos: dict[str, RepoEvent] = {}
    accounts: dict[str, AccountEvent] = {}
    last_repo_event: dict[str, int] = {}
    for i, ev in enumerate(events):
        if isinstance(ev, RecordEvent):
            assert ev.type == "create" and ev.seq == -2
            assert ev.did not in repos, "a create event after its repo's repo event"
            records[ev.uri] = {"cid": ev.cid, "value": ev.record}
            last_repo_event.setdefault(ev.did, -1)
        elif isinstance(ev, RepoEvent):
            assert ev.did not in repos, "one repo event per repo"
            repos[ev.did] = ev
            last_repo_event[ev.did] = i
        elif isinstance(ev, AccountEvent):
            accounts[ev.did] = ev
        else:
            raise AssertionError(f"unexpected event {ev}")

    active = {did: a for did, a in manifest.accounts.items() if a.status == "active"}
    inactive = {did: a for did, a in manifest.accounts.items() if a.status != "active"}
    assert inactive and active
    expected = {uri: rec for a in active.values() for uri, rec in a.records.items()}
    assert records == expected
    assert set(repos) == set(active)
    for ev in repos.values():
        assert is_valid_tid(ev.rev) and ev.commit.startswith("bafy")
    assert {did: (ev.active, ev.status) for did, ev in accounts.items()} == {
        did: (False, a.status) for did, a in inactive.items()
    }
    assert await _dead_letters(redis, cfg.dlq_stream) == []
    assert _value(backfiller, "backfiller_repos_processed_total") == len(active)
    assert _value(backfiller, "backfiller_records_extracted_total") == len(expected)
    assert _value(backfiller, "backfiller_bytes_fetched_total") > 0
    assert _value(backfiller, "backfiller_repos_dead_lettered_total") == 0
    # everything acknowledged and deleted
    assert await redis.xlen(cfg.backfill_stream) == 0
    pending = await redis.xpending(cfg.backfill_stream, cfg.group)
    assert pending["pending"] == 0


async def test_no_account_event_when_the_status_is_known(
    seeded_devnet: SeededDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    cfg = _config(redis_url, redis_prefix, net)
    inactive = [a for a in manifest.accounts.values() if a.status not in ("active", "deleted")]
    for a in inactive:
        request = BackfillRequest(did=a.did, host=a.pds, rev="", status=a.status, active=False)
        await redis.xadd(cfg.backfill_stream, backfill_fields(request))  # type: ignore[arg-type]
    backfiller = Backfiller(cfg, redis)
    await _run_until_drained(redis, backfiller, cfg)
    assert await _events(redis, cfg.firehose_stream) == []
    assert await redis.xlen(cfg.backfill_stream) == 0


async def _small_devnet_run(
    make_devnet: MakeDevnet,
    redis: aioredis.Redis,
    redis_url: str,
    redis_prefix: str,
    *,
    faults: dict[str, Any],
    accounts: int = 4,
    timeout_s: float = 60.0,
    **overrides: Any,
) -> tuple[Devnet, Backfiller, BackfillerConfig, dict[str, int]]:
    """Seed a one-PDS devnet, switch *faults* on, backfill every account; returns the
    per-account record counts of the manifest too."""
    async with make_devnet(n_pds=1, labeler=False, seed=3) as net:
        workload = net.workload()
        manifest = await workload.seed(accounts=accounts, records_per_account=6, churn=0.0, labels=0)
        for name, value in faults.items():
            setattr(net.faults, name, value)
        net.faults.reset_counters()
        cfg = _config(redis_url, redis_prefix, net, **overrides)
        await _enqueue(redis, cfg, net, list(manifest.accounts))
        backfiller = Backfiller(cfg, redis)
        await _run_until_drained(redis, backfiller, cfg, timeout_s)
        counts = {did: len(a.records) for did, a in manifest.accounts.items()}
    return net, backfiller, cfg, counts


async def test_429_and_500_are_retried_and_succeed(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    _, backfiller, cfg, counts = await _small_devnet_run(
        make_devnet, redis, redis_url, redis_prefix,
        faults={"http_429_every": 2, "http_500_every": 3, "retry_after_seconds": 0},
        max_retries=20,
    )  # fmt: skip
    events = await _events(redis, cfg.firehose_stream)
    assert sum(isinstance(e, RecordEvent) for e in events) == sum(counts.values())
    assert {e.did for e in events if isinstance(e, RepoEvent)} == set(counts)
    assert await _dead_letters(redis, cfg.dlq_stream) == []
    assert _value(backfiller, "backfiller_retries_attempted_total") > 0
    assert _value(backfiller, "backfiller_car_fetch_errors_total") > 0
    assert _value(backfiller, "backfiller_repos_processed_total") == len(counts)


async def test_persistent_5xx_ends_in_the_dlq_after_max_retries(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    _, backfiller, cfg, counts = await _small_devnet_run(
        make_devnet, redis, redis_url, redis_prefix, faults={"http_500_every": 1}, accounts=2, max_retries=2
    )
    letters = await _dead_letters(redis, cfg.dlq_stream)
    assert len(letters) == len(counts)
    assert all("gave up after 2 retries" in d.reason and "500" in d.reason for d in letters)
    assert all(d.fields.get("repo") for d in letters)  # replayable: the original entry is kept
    assert await _events(redis, cfg.firehose_stream) == []
    assert _value(backfiller, "backfiller_retries_attempted_total") == 2 * len(counts)
    assert _value(backfiller, "backfiller_repos_dead_lettered_total") == len(counts)
    assert await redis.xlen(cfg.backfill_stream) == 0


def _rotate_signing_key(net: Devnet, did: str, *, seed: int) -> None:
    """Point *did*'s document at a fresh signing key through a signed PLC update."""
    last = net.plc.last_op(did)
    rotation = next(
        key
        for index in range(64)
        for curve in ("k256", "p256")
        if (key := derived_key(seed, index, "rotation", curve)).did_key() in last["rotationKeys"]
    )
    new_key = PrivateKey.generate(rotation.curve)
    net.plc.submit(did, plc.sign_op(plc.update_op(last, signing_key=new_key.did_key()), rotation))


@pytest.mark.parametrize(
    ("faults", "metric", "reason"),
    [
        ({"car_corrupt": True}, "backfiller_car_parse_errors_total", "parse: not a valid CAR"),
        ({"car_truncate": True}, "backfiller_car_parse_errors_total", "parse: not a valid CAR"),
        ({"car_oversized_bytes": 300_000}, "backfiller_car_parse_errors_total", "too_large"),
        ({"bad_signature": True}, "backfiller_verification_errors_total", "verify: repo verification failed"),
        ({"private_address_dids": True}, "backfiller_car_fetch_errors_total", "refused"),
    ],
)
async def test_bad_repos_are_dead_lettered_never_emitted(
    make_devnet: MakeDevnet,
    redis: aioredis.Redis,
    redis_url: str,
    redis_prefix: str,
    faults: dict[str, Any],
    metric: str,
    reason: str,
) -> None:
    if "bad_signature" in faults:
        # the repos are signed with the key their PDS holds; the DID documents are moved to
        # another key (a real PLC update signed with the account's rotation key)
        async with make_devnet(n_pds=1, labeler=False, seed=3) as net:
            manifest = await net.workload().seed(accounts=2, records_per_account=6, churn=0.0, labels=0)
            for did in manifest.accounts:
                _rotate_signing_key(net, did, seed=3)
            cfg = _config(redis_url, redis_prefix, net)
            await _enqueue(redis, cfg, net, list(manifest.accounts))
            backfiller = Backfiller(cfg, redis)
            await _run_until_drained(redis, backfiller, cfg)
            counts = {did: 0 for did in manifest.accounts}
    else:
        _, backfiller, cfg, counts = await _small_devnet_run(
            make_devnet, redis, redis_url, redis_prefix, faults=faults, accounts=2, max_car_bytes=200_000
        )
    letters = await _dead_letters(redis, cfg.dlq_stream)
    assert len(letters) == len(counts)
    assert all(reason in d.reason for d in letters), [d.reason for d in letters]
    assert await _events(redis, cfg.firehose_stream) == []
    assert _value(backfiller, metric) == len(counts)
    assert _value(backfiller, "backfiller_repos_dead_lettered_total") == len(counts)
    assert _value(backfiller, "backfiller_repos_processed_total") == 0


async def test_private_address_allowed_when_listed(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """Allow-listing the private endpoint lets the request go out (it then fails to connect,
    a transient error, instead of being refused)."""
    _, backfiller, cfg, _ = await _small_devnet_run(
        make_devnet, redis, redis_url, redis_prefix,
        faults={"private_address_dids": True, "private_address_endpoint": "http://127.0.0.9:9"},
        accounts=1, max_retries=1, allow_hosts=("127.0.0.0/8",), http_timeout_s=1.0,
    )  # fmt: skip
    letters = await _dead_letters(redis, cfg.dlq_stream)
    assert len(letters) == 1 and "gave up after 1 retries" in letters[0].reason
    assert "refused" not in letters[0].reason.split(":")[0]
    assert _value(backfiller, "backfiller_address_refused_total") == 0


async def test_killed_consumers_pending_repo_is_claimed(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    async with make_devnet(n_pds=1, labeler=False, seed=5) as net:
        manifest = await net.workload().seed(accounts=3, records_per_account=4, churn=0.0, labels=0)
        cfg = _config(redis_url, redis_prefix, net)
        await _enqueue(redis, cfg, net, list(manifest.accounts))
        # a backfiller that read every entry and died before acknowledging any
        dead = StreamConsumer(redis, [cfg.backfill_stream], cfg.group, "dead-one", batch_size=10)
        taken = await dead.read()
        assert len(taken) == 3
        pending = await redis.xpending(cfg.backfill_stream, cfg.group)
        assert pending["pending"] == 3
        backfiller = Backfiller(cfg, redis)  # claim_idle_ms=1000
        await _run_until_drained(redis, backfiller, cfg)
        events = await _events(redis, cfg.firehose_stream)
        assert {e.did for e in events if isinstance(e, RepoEvent)} == set(manifest.accounts)
        assert sum(isinstance(e, RecordEvent) for e in events) == sum(
            len(a.records) for a in manifest.accounts.values()
        )
        assert backfiller.consumer.stats.claimed == 3
        assert (await redis.xpending(cfg.backfill_stream, cfg.group))["pending"] == 0


async def test_malformed_entries_are_acknowledged(
    module_devnet: Devnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    cfg = _config(redis_url, redis_prefix, module_devnet)
    await redis.xadd(cfg.backfill_stream, {"repo": b"not json"})
    await redis.xadd(cfg.backfill_stream, {"repo": b'{"did":"nope","host":"x"}'})
    await redis.xadd(cfg.backfill_stream, {"other": b"1"})
    # a well-formed DID the PLC does not know: acknowledged as an invalid DID
    await _enqueue(redis, cfg, module_devnet, ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"])
    backfiller = Backfiller(cfg, redis)
    await _run_until_drained(redis, backfiller, cfg)
    assert await redis.xlen(cfg.backfill_stream) == 0
    assert await _events(redis, cfg.firehose_stream) == []
    assert await _dead_letters(redis, cfg.dlq_stream) == []
    total = sum(
        backfiller.metrics.registry.get_sample_value("backfiller_malformed_messages_total", {"code": code})
        or 0
        for code in ("bad_json", "bad_did", "missing_repo_field")
    )
    assert total == 3


async def test_run_backfiller_serves_and_stops(
    module_devnet: Devnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """The service entry point: metrics server up, consumer group created, clean stop."""
    cfg = _config(redis_url, redis_prefix, module_devnet, metrics_port=0, metrics_host="127.0.0.1")
    stop = asyncio.Event()
    task = asyncio.create_task(run_backfiller(cfg, stop=stop))
    for _ in range(200):
        if await redis.exists(cfg.backfill_stream):
            break
        await asyncio.sleep(0.05)
    groups = await redis.xinfo_groups(cfg.backfill_stream)
    assert [g["name"] for g in groups] == [cfg.group.encode()]
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_thousands_of_parked_repos_fit_a_small_redis_pool(
    seeded_devnet: SeededDevnet, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 9: 2,000 repos parked at once (their hosts back off longer than a worker waits)
    used to issue one XCLAIM each, all at once, and exhausted the client's connection pool
    (redis-py ``Too many connections``), which cost each repo an attempt. On a pool of 8
    connections every repo is parked, then each is emitted exactly once, none fails or is
    dead-lettered, and nothing is left pending."""
    caplog.set_level(logging.WARNING, logger="psky.backfiller")
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    active = sorted(
        (did for did, a in manifest.accounts.items() if a.status == "active"),
        key=lambda did: len(manifest.accounts[did].records),
    )[:8]  # the smallest repos: the test is about parking, not fetching
    entries = [active[i % len(active)] for i in range(2000)]
    cfg = _config(
        redis_url, redis_prefix, net,
        concurrency=8, batch_size=1000, host_backlog=2000, host_rate=0.0, http_timeout_s=30.0,
    )  # fmt: skip
    small_pool = connect(redis_url, max_connections=8)
    try:
        pipe = small_pool.pipeline(transaction=False)
        for did in entries:
            pipe.xadd(cfg.backfill_stream, backfill_fields(BackfillRequest(did=did, host="", rev="")))  # type: ignore[arg-type]
        await pipe.execute()
        backfiller = Backfiller(cfg, small_pool)
        limiters = [backfiller.hosts.get(pds.url.removeprefix("http://")) for pds in net.pdses]
        for limiter in limiters:  # every host backs off far longer than a worker waits
            limiter.block_for(3600)
        stop, task = await _start(backfiller)

        async def drained() -> bool:
            return await small_pool.xlen(cfg.backfill_stream) == 0 and backfiller.consumer.in_flight == 0

        try:
            await _until(
                lambda: _value(backfiller, "backfiller_repos_deferred_total") >= len(entries),
                "every repo parked", 120,
            )  # fmt: skip
            for limiter in limiters:  # the hosts relent
                limiter.blocked_until = 0.0
            await _until(drained, "every parked repo emitted", 240)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await backfiller.close()

        events = await _events(small_pool, cfg.firehose_stream)
        emitted = Counter(e.did for e in events if isinstance(e, RepoEvent))
        assert emitted == Counter(entries), "a repo lost or emitted twice"
        assert _value(backfiller, "backfiller_repos_deferred_total") >= len(entries)
        assert _value(backfiller, "backfiller_repos_failed_total") == 0
        assert _value(backfiller, "backfiller_retries_attempted_total") == 0
        assert await _dead_letters(small_pool, cfg.dlq_stream) == []
        assert (await small_pool.xpending(cfg.backfill_stream, cfg.group))["pending"] == 0
        problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [m for m in problems if "error" in m], problems[:5]
    finally:
        await small_pool.aclose()


def test_metric_names_are_the_seeds() -> None:
    names = {m.name for m in BackfillerMetrics().registry.collect()}
    for seed_name in (
        "backfiller_repos_processed", "backfiller_repos_failed", "backfiller_repos_dead_lettered",
        "backfiller_records_extracted", "backfiller_retries_attempted", "backfiller_repos_waiting",
        "backfiller_repos_running", "backfiller_output_stream_length", "backfiller_car_fetch_errors",
        "backfiller_car_parse_errors", "backfiller_verification_errors",
    ):  # fmt: skip
        assert seed_name in names  # counters are exposed with the _total suffix


# --- slow, rate-limiting and oversized hosts --------------------------------------------------


async def _start(backfiller: Backfiller) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(backfiller.run(stop))


async def _until(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> None:
    """Poll *check* (sync or async) until it is true."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _repo_dids(redis: aioredis.Redis, stream: str) -> set[str]:
    return {e.did for e in await _events(redis, stream) if isinstance(e, RepoEvent)}


async def test_get_repo_timeouts_are_retried_then_dead_lettered(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """A PDS slower than BACKFILLER_HTTP_TIMEOUT_SECS: every attempt times out, the retries
    run out, the repos land in the DLQ with the reason; the PLC (not slowed) is unaffected."""
    _, backfiller, cfg, counts = await _small_devnet_run(
        make_devnet, redis, redis_url, redis_prefix,
        faults={"slow_response_ms": 1000, "only_hosts": frozenset({"pds1.test"})},
        accounts=2, max_retries=2, http_timeout_s=0.25,
    )  # fmt: skip
    letters = await _dead_letters(redis, cfg.dlq_stream)
    assert len(letters) == len(counts)
    assert all("gave up after 2 retries" in d.reason and "Timeout" in d.reason for d in letters), [
        d.reason for d in letters
    ]
    assert await _events(redis, cfg.firehose_stream) == []
    assert _value(backfiller, "backfiller_retries_attempted_total") == 2 * len(counts)
    assert _value(backfiller, "backfiller_car_fetch_errors_total") == 3 * len(counts)
    assert _value(backfiller, "backfiller_repos_failed_total") == 3 * len(counts)
    assert _value(backfiller, "backfiller_repos_dead_lettered_total") == len(counts)
    assert (await redis.xpending(cfg.backfill_stream, cfg.group))["pending"] == 0


@asynccontextmanager
async def _two_host_devnet(
    make_devnet: MakeDevnet, accounts: int = 10
) -> AsyncIterator[tuple[Devnet, dict[str, list[str]], dict[str, int]]]:
    """A two-PDS devnet: (net, DIDs by PDS hostname, record count by DID)."""
    async with make_devnet(n_pds=2, labeler=False, seed=3) as net:
        manifest = await net.workload().seed(accounts=accounts, records_per_account=4, churn=0.0, labels=0)
        host_of = {p.url: p.hostname for p in net.pdses}
        by_host: dict[str, list[str]] = {p.hostname: [] for p in net.pdses}
        for did, a in manifest.accounts.items():
            by_host[host_of[a.pds]].append(did)
        assert all(by_host.values())
        yield net, by_host, {did: len(a.records) for did, a in manifest.accounts.items()}


async def test_a_slow_host_does_not_starve_the_others(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """pds1 answers slowly and its repos are queued first; pds2's repos still all complete
    while pds1's are waiting (they are queued per host or deferred, not holding workers)."""
    async with _two_host_devnet(make_devnet) as (net, by_host, counts):
        net.faults.only_hosts = frozenset({"pds1.test"})
        net.faults.slow_response_ms = 800
        cfg = _config(
            redis_url, redis_prefix, net,
            concurrency=2, host_concurrency=1, batch_size=2, host_backlog=1, http_timeout_s=30.0,
        )  # fmt: skip
        slow, fast = by_host["pds1.test"], by_host["pds2.test"]
        await _enqueue(redis, cfg, net, slow + fast)
        backfiller = Backfiller(cfg, redis)
        stop, task = await _start(backfiller)
        try:
            await _until(lambda: _repo_dids(redis, cfg.firehose_stream), "a first repo")
            await _until(lambda: _has(redis, cfg.firehose_stream, fast), "every repo of the healthy host", 60)
            done = await _repo_dids(redis, cfg.firehose_stream)
            assert len(done & set(slow)) < len(slow), "the slow host finished first"
            await _until(lambda: _has(redis, cfg.firehose_stream, slow), "the slow host's repos", 120)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await backfiller.close()
        events = await _events(redis, cfg.firehose_stream)
        assert sum(isinstance(e, RecordEvent) for e in events) == sum(counts.values())
        assert await _dead_letters(redis, cfg.dlq_stream) == []
        assert _value(backfiller, "backfiller_retries_attempted_total") == 0
        assert _value(backfiller, "backfiller_repos_deferred_total") > 0


async def _has(redis: aioredis.Redis, stream: str, dids: list[str]) -> bool:
    return set(dids) <= await _repo_dids(redis, stream)


async def test_a_rate_limiting_host_does_not_starve_the_others(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """pds1 answers every request with 429 (Retry-After, RateLimit-*): its repos wait out
    the host's back-off (deferred without spending retries) while pds2's all complete; once
    pds1 relents, its repos complete too and nothing is dead-lettered."""
    async with _two_host_devnet(make_devnet) as (net, by_host, counts):
        net.faults.only_hosts = frozenset({"pds1.test"})
        net.faults.http_429_every = 1
        net.faults.retry_after_seconds = 1
        cfg = _config(
            redis_url, redis_prefix, net,
            concurrency=2, host_concurrency=1, batch_size=2, host_backlog=1, max_host_wait_s=0.2,
        )  # fmt: skip
        slow, fast = by_host["pds1.test"], by_host["pds2.test"]
        await _enqueue(redis, cfg, net, slow + fast)
        backfiller = Backfiller(cfg, redis)
        stop, task = await _start(backfiller)
        try:
            await _until(lambda: _has(redis, cfg.firehose_stream, fast), "every repo of the healthy host", 60)
            pds1 = net.pdses[0].url.removeprefix("http://")
            await _until(lambda: backfiller.hosts.get(pds1).rate_limited > 0, "a 429 from pds1")
            assert not await _repo_dids(redis, cfg.firehose_stream) & set(slow)
            net.faults.http_429_every = 0  # pds1 relents
            await _until(lambda: _has(redis, cfg.firehose_stream, slow), "the rate-limited host's repos", 120)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await backfiller.close()
        events = await _events(redis, cfg.firehose_stream)
        assert sum(isinstance(e, RecordEvent) for e in events) == sum(counts.values())
        assert await _dead_letters(redis, cfg.dlq_stream) == []
        assert _value(backfiller, "backfiller_car_fetch_errors_total") >= 1  # the 429s
        assert _value(backfiller, "backfiller_retries_attempted_total") >= 1
        assert _value(backfiller, "backfiller_repos_processed_total") == len(counts)


async def test_a_car_growing_past_the_limit_mid_stream_is_refused_with_bounded_memory(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """A chunked getRepo answer (no Content-Length) that keeps going: the read stops at the
    limit, the repo is dead-lettered as too large, and neither side held the 64 MB."""
    async with make_devnet(n_pds=1, labeler=False, seed=3) as net:
        manifest = await net.workload().seed(accounts=2, records_per_account=6, churn=0.0, labels=0)
        net.faults.car_stream_pad_bytes = 64 * 1024 * 1024
        cfg = _config(redis_url, redis_prefix, net, max_car_bytes=1_000_000)
        await _enqueue(redis, cfg, net, list(manifest.accounts))
        backfiller = Backfiller(cfg, redis)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            await _run_until_drained(redis, backfiller, cfg)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    letters = await _dead_letters(redis, cfg.dlq_stream)
    assert len(letters) == len(manifest.accounts)
    assert all(d.reason.startswith("too_large") for d in letters), [d.reason for d in letters]
    assert await _events(redis, cfg.firehose_stream) == []
    assert _value(backfiller, "backfiller_car_parse_errors_total") == len(manifest.accounts)
    assert _value(backfiller, "backfiller_repos_dead_lettered_total") == len(manifest.accounts)
    assert peak < 24 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"


# --- progress -----------------------------------------------------------------------------


async def test_progress_is_logged(
    make_devnet: MakeDevnet,
    redis: aioredis.Redis,
    redis_url: str,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="psky.backfiller")
    async with make_devnet(n_pds=1, labeler=False, seed=3) as net:
        manifest = await net.workload().seed(accounts=3, records_per_account=4, churn=0.0, labels=0)
        cfg = _config(redis_url, redis_prefix, net, progress_interval_s=0.05)
        await _enqueue(redis, cfg, net, list(manifest.accounts))
        backfiller = Backfiller(cfg, redis)
        stop, task = await _start(backfiller)

        def final() -> Any:
            for rec in caplog.records:
                if rec.getMessage() == "backfill progress" and getattr(rec, "repos_done", 0) == 3:
                    return rec
            return None

        try:
            await _until(final, "a progress line after the last repo")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await backfiller.close()
    rec = final()
    n_records = sum(len(a.records) for a in manifest.accounts.values())
    assert rec.records_done == n_records
    for name in ("repos_per_s", "records_per_s", "queue_left", "queue_pending", "running", "failed",
                 "dead_lettered", "dlq_size"):  # fmt: skip
        assert isinstance(getattr(rec, name), int | float), name
    lines = [r for r in caplog.records if r.getMessage() == "backfill progress"]
    assert sum(r.repos_per_s for r in lines) > 0
    assert rec.queue_left == 0 and rec.dlq_size == 0 and rec.failed == 0


# --- crash: kill -9 of the real service, restart, another member takes over -----------------


async def _spawn_backfiller(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "psky.cli", "backfiller", env=env, stdout=log_file, stderr=log_file
        )


async def _kill_when(
    proc: asyncio.subprocess.Process, done: Callable[[], Any], log_path: Path, what: str
) -> None:
    """SIGKILL *proc* as soon as *done()* holds (it must still be running then)."""

    async def check() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"backfiller exited early:\n{_tail(log_path)}")
        return bool(await done())

    await _until(check, what, 120)
    proc.kill()
    await proc.wait()


async def test_kill_9_mid_run_loses_no_repo(
    make_devnet: MakeDevnet, redis: aioredis.Redis, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """``psky backfiller`` as a process, 200 repos queued: killed with SIGKILL mid-run,
    restarted under the same name (its own pending first), killed again, then a member with
    another name claims the dead one's idle entries and finishes. Every record of every repo
    is in firehose_backfill (duplicates allowed) and nothing is left pending."""
    async with make_devnet(n_pds=2, labeler=False, seed=9) as net:
        manifest = await net.workload().seed(accounts=200, records_per_account=3, churn=0.0, labels=0)
        # slow the PDSes a little so a kill lands mid-run
        net.faults.only_hosts = frozenset(p.hostname for p in net.pdses)
        net.faults.slow_response_ms = 30
        cfg = _config(redis_url, redis_prefix, net)
        await _enqueue(redis, cfg, net, list(manifest.accounts))
        total = len(manifest.accounts)
        env = {
            **os.environ, "REDIS_URL": redis_url, "PLC_URL": net.plc.url,
            "BACKFILLER_GROUP": cfg.group, "BACKFILLER_BACKFILL_STREAM": cfg.backfill_stream,
            "BACKFILLER_FIREHOSE_STREAM": cfg.firehose_stream, "BACKFILLER_DLQ_STREAM": cfg.dlq_stream,
            "BACKFILLER_ALLOW_HOSTS": "127.0.0.1", "BACKFILLER_CONCURRENCY": "4",
            "BACKFILLER_BATCH_SIZE": "500", "BACKFILLER_HTTP_TIMEOUT_SECS": "20",
            "BACKFILLER_RETRY_INITIAL_BACKOFF_MS": "20", "BACKFILLER_RETRY_MAX_BACKOFF_MS": "200",
            "BACKFILLER_CLAIM_IDLE_MS": "1500", "BACKFILLER_CLAIM_INTERVAL_MS": "100",
            "BACKFILLER_METRICS_PORT": "0", "BACKFILLER_METRICS_HOST": "127.0.0.1",
            "BACKFILLER_PROGRESS_INTERVAL_SECS": "0.2", "LOG_FORMAT": "text",
        }  # fmt: skip

        async def left() -> int:
            return int(await redis.xlen(cfg.backfill_stream))

        # run 1: killed once some (not all) repos are acknowledged
        log_a = tmp_path / "a.log"
        proc = await _spawn_backfiller({**env, "BACKFILLER_CONSUMER": "crash-a"}, log_a)
        await _kill_when(proc, lambda: _lt(left(), total - 30), log_a, "30 repos done by run 1")
        after_1 = await left()
        assert 0 < after_1 < total
        # run 2: same name, reads its own pending entries, killed again
        proc = await _spawn_backfiller({**env, "BACKFILLER_CONSUMER": "crash-a"}, log_a)
        await _kill_when(proc, lambda: _lt(left(), after_1 - 30), log_a, "30 more repos done by run 2")
        after_2 = await left()
        assert 0 < after_2 < after_1
        pending = await redis.xpending(cfg.backfill_stream, cfg.group)
        assert pending["consumers"] == [{"name": b"crash-a", "pending": after_2}] or pending["consumers"] == [
            {"name": "crash-a", "pending": after_2}
        ], pending  # every entry left was handed to the dead member
        # run 3: another member claims the dead one's entries once idle, and finishes
        log_b = tmp_path / "b.log"
        proc = await _spawn_backfiller({**env, "BACKFILLER_CONSUMER": "crash-b"}, log_b)
        try:
            await _until(lambda: _drained(redis, cfg), "the queue drained by run 3", 120)
            await _until(lambda: "backfill progress" in _tail(log_b, 10**7), "a progress line")
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
        text_b = _tail(log_b, 10**7)
        assert proc.returncode == 0, text_b[-3000:]
        assert "claimed idle pending entries" in text_b and "Traceback" not in text_b

        events = await _events(redis, cfg.firehose_stream)
        records: dict[str, dict[str, Any]] = {}
        for ev in events:
            if isinstance(ev, RecordEvent):
                assert records.setdefault(ev.uri, {"cid": ev.cid, "value": ev.record}) == {
                    "cid": ev.cid, "value": ev.record,
                }  # fmt: skip
        expected = {uri: rec for a in manifest.accounts.values() for uri, rec in a.records.items()}
        assert records == expected  # every record, none invented
        assert {e.did for e in events if isinstance(e, RepoEvent)} == set(manifest.accounts)
        assert await _dead_letters(redis, cfg.dlq_stream) == []
        assert await redis.xlen(cfg.backfill_stream) == 0
        assert (await redis.xpending(cfg.backfill_stream, cfg.group))["pending"] == 0
        progress = [line for line in text_b.splitlines() if "backfill progress" in line]
        assert all("queue_left=" in line and "records_per_s=" in line for line in progress), progress[:2]


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text()[-size:]


async def _lt(value: Any, bound: int) -> bool:
    return bool(await value < bound)


async def _drained(redis: aioredis.Redis, cfg: BackfillerConfig) -> bool:
    pending = await redis.xpending(cfg.backfill_stream, cfg.group)
    return bool(await redis.xlen(cfg.backfill_stream) == 0 and pending["pending"] == 0)


def test_fault_knobs_for_backfiller_tests_parse() -> None:
    """The devnet knobs these tests add: per-PDS scope and a streamed, padded CAR."""
    faults = Faults.parse("only_hosts=PDS1.test|pds2.test,car_stream_pad_bytes=4096,slow_ms=5")
    assert faults.only_hosts == frozenset({"pds1.test", "pds2.test"})
    assert faults.applies_to("pds2.test") and not faults.applies_to("pds3.test")
    assert not faults.applies_to(None)  # the PLC, relay and labeler are spared
    assert Faults.parse(str(faults)) == faults
    assert Faults().applies_to(None) and Faults().applies_to("pds9.test")
