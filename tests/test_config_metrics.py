"""Typed environment configuration and the metrics/health server."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from psky.config import ConfigError, env_bool, env_float, env_int, env_list, env_str
from psky.metrics import MetricsServer


def test_aliases_and_defaults() -> None:
    env = {"INGESTER_HOSTS": "a, b,,c", "EMPTY": ""}
    assert env_list(["INGESTER_RELAY_HOSTS", "INGESTER_HOSTS"], env=env) == ["a", "b", "c"]
    assert env_str("EMPTY", "dflt", env) == "dflt"
    assert env_int("N", 7, {}) == 7
    assert env_int("N", 7, {"N": "1_000"}) == 1000
    assert env_bool("B", False, {"B": "Yes"}) is True
    assert env_float("F", 1.5, {"F": "0.25"}) == 0.25
    assert env_str("MODE", None, {"MODE": "ALL"}, choices=["all", "firehose"]) == "all"


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: env_int("BACKFILLER_MAX_RETRIES", 3, {"BACKFILLER_MAX_RETRIES": "three"}), "BACKFILLER_MAX_RETRIES: expected an integer"),
        (lambda: env_int("INDEXER_CONCURRENCY", 1, {"INDEXER_CONCURRENCY": "0"}, minimum=1), "INDEXER_CONCURRENCY: must be at least 1"),
        (lambda: env_bool("ENABLE_DID_RESOLUTION", True, {"ENABLE_DID_RESOLUTION": "maybe"}), "ENABLE_DID_RESOLUTION: expected true or false"),
        (lambda: env_float("X", 1.0, {"X": "nan"}, minimum=0), "X: must be"),
        (lambda: env_str("INDEXER_CONSUMER", None, {}, required=True), "INDEXER_CONSUMER: required"),
        (lambda: env_str("INGESTER_MODE", None, {"INGESTER_MODE": "x"}, choices=["all"]), "INGESTER_MODE: expected one of all"),
    ],
)
def test_errors_name_the_variable(call: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()  # type: ignore[operator]


async def test_metrics_and_health_server() -> None:
    registry = CollectorRegistry()
    c = Counter("backfiller_repos_processed_total", "repos processed", registry=registry)
    c.inc(3)
    healthy = {"status": "ok"}

    async def check() -> dict[str, str]:
        return healthy

    server = MetricsServer(registry, health=check)
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
                assert resp.status == 200
                assert "backfiller_repos_processed_total 3.0" in await resp.text()
            async with http.get(f"http://127.0.0.1:{server.port}/health") as resp:
                assert resp.status == 200
            healthy["status"] = "redis unreachable"
            async with http.get(f"http://127.0.0.1:{server.port}/health") as resp:
                assert resp.status == 503
    finally:
        await server.stop()


def test_hot_metrics_read_like_prometheus_client_ones() -> None:
    """HotCounter/HotGauge (per-frame metrics) expose what prometheus_client's would."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    from psky.metrics import HotCounter, HotGauge

    hot, ref = CollectorRegistry(), CollectorRegistry()
    counter = HotCounter("psky_test_frames", "Frames", ["host", "type"], hot)
    gauge = HotGauge("psky_test_cursor", "Cursor", ["host"], hot)
    ref_counter = Counter("psky_test_frames", "Frames", ["host", "type"], registry=ref)
    ref_gauge = Gauge("psky_test_cursor", "Cursor", ["host"], registry=ref)
    for c in (counter, ref_counter):
        c.labels(host="a", type="commit").inc()
        c.labels("a", "commit").inc(2)
        c.labels(host="b", type="sync").inc(0.5)
    gauge.labels(host="a").set(7)
    ref_gauge.labels(host="a").set(7)

    def samples(text: bytes) -> list[str]:
        return sorted(line for line in text.decode().splitlines() if not line.startswith("#") and "_created" not in line)

    assert samples(generate_latest(hot)) == samples(generate_latest(ref))
    assert hot.get_sample_value("psky_test_frames_total", {"host": "a", "type": "commit"}) == 3
    with pytest.raises(ValueError):
        counter.labels(host="a")
    with pytest.raises(ValueError):
        counter.labels("a")
    with pytest.raises(ValueError):  # the registry still refuses a second metric of that name
        HotCounter("psky_test_frames", "again", ["host"], hot)
