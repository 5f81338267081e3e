"""The shared fault knobs: parsing, counters, probabilities and the HTTP middleware."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

import psky.devnet.faults as faults_module
from psky.devnet.faults import Faults, http_fault_middleware


def test_all_off_by_default() -> None:
    faults = Faults()
    assert faults.active() == {}
    assert not faults.any_active
    assert str(faults) == ""
    assert Faults.parse("") == faults
    assert not any(faults.tick(name) for name in Faults.knob_names() if name.endswith("_every"))
    assert not faults.chance("bad_signature") and not faults.chance("broken_proof")
    assert not faults.uses_private_address("did:plc:" + "a" * 24)
    assert not faults.should_drop(10**9)
    assert not any(faults.should_stall(n) for n in range(5))
    assert faults.http_status() is None


def test_every_knob_is_documented_and_parseable() -> None:
    names = Faults.knob_names()
    required = {
        "drop_after_frames",
        "stall_seconds",
        "stall_after_frames",
        "malformed_every",
        "oversized_every",
        "bad_signature",
        "broken_proof",
        "seq_out_of_order_every",
        "seq_replay_every",
        "http_429_every",
        "http_500_every",
        "slow_response_ms",
        "car_truncate",
        "car_corrupt",
        "car_oversized_bytes",
        "private_address_dids",
    }
    assert required <= set(names)
    lines = inspect.getsource(faults_module).splitlines()
    for name in names:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"    {name}: "))
        assert lines[index - 1].startswith("    #: "), f"{name} has no one-line doc"


def test_parse_values() -> None:
    faults = Faults.parse(
        "drop_after_frames=100, http_429_every=3,stall_seconds=1.5,stall_after_frames=7,"
        "bad_signature=0.25,broken_proof,car_truncate=yes,car_corrupt=false,"
        "private_address_dids=did:plc:aaa|did:web:b.test,private_address_endpoint=http://10.0.0.1,seed=9"
    )
    assert faults.drop_after_frames == 100
    assert faults.http_429_every == 3
    assert faults.stall_seconds == 1.5 and faults.stall_after_frames == 7
    assert faults.bad_signature == 0.25
    assert faults.broken_proof is True
    assert faults.car_truncate is True and faults.car_corrupt is False
    assert faults.private_address_dids == frozenset({"did:plc:aaa", "did:web:b.test"})
    assert faults.private_address_endpoint == "http://10.0.0.1"
    assert faults.seed == 9


def test_parse_aliases_and_flags() -> None:
    faults = Faults.parse("drop_after=5,stall=2,malformed=3,http_429=4,slow_ms=10,private_address")
    assert faults.drop_after_frames == 5
    assert faults.stall_seconds == 2
    assert faults.malformed_every == 3
    assert faults.http_429_every == 4
    assert faults.slow_response_ms == 10
    assert faults.private_address_dids is True
    assert Faults.parse("private_address_dids=all").private_address_dids is True
    assert Faults.parse("bad_signature=true").bad_signature is True
    assert Faults.parse("bad_signature=0").bad_signature is False


def test_str_round_trips() -> None:
    faults = Faults(
        drop_after_frames=10,
        stall_seconds=0.5,
        bad_signature=0.1,
        car_corrupt=True,
        private_address_dids=frozenset({"did:plc:x", "did:plc:y"}),
        seed=3,
    )
    text = str(faults)
    assert "drop_after_frames=10" in text and "private_address_dids=did:plc:x|did:plc:y" in text
    assert Faults.parse(text) == faults
    assert Faults(private_address_dids={"did:plc:x"}).private_address_dids == frozenset({"did:plc:x"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("nope=1", "unknown fault knob 'nope'"),
        ("http_429_every=x", "wants an integer"),
        ("http_429_every=1.5", "wants an integer"),
        ("http_429_every=-1", ">= 0"),
        ("stall_seconds=nan", ">= 0"),
        ("stall_seconds=inf", ">= 0"),
        ("stall_seconds=soon", "wants a number"),
        ("bad_signature=2", "probability"),
        ("bad_signature=maybe", "wants a number"),
        ("car_truncate=perhaps", "true/false"),
        ("http_429_every", "needs a value"),
        ("http_429_every=1,http_429=2", "given twice"),
        ("private_address_dids=example.com", "DIDs"),
        ("private_address_endpoint=", "non-empty"),
    ],
)
def test_parse_errors(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Faults.parse(text)


def test_tick_counts_every_n_per_key() -> None:
    faults = Faults(http_429_every=3)
    assert [faults.tick("http_429_every") for _ in range(7)] == [False, False, True] * 2 + [False]
    assert [faults.tick("http_429_every", "conn-2") for _ in range(3)] == [False, False, True]
    faults.reset_counters()
    assert [faults.tick("http_429_every") for _ in range(3)] == [False, False, True]
    # the knob is read at every call, so a running server sees changes at once
    faults.http_429_every = 1
    assert faults.tick("http_429_every")
    faults.http_429_every = 0
    assert not faults.tick("http_429_every")
    with pytest.raises(ValueError, match="not an 'every N' counter"):
        faults.tick("car_truncate")
    with pytest.raises(ValueError, match="not an 'every N' counter"):
        faults.tick("private_address_endpoint")
    with pytest.raises(AttributeError):
        faults.tick("no_such_knob")


def test_chance() -> None:
    assert Faults(bad_signature=True).chance("bad_signature")
    assert Faults(broken_proof=1.0).chance("broken_proof")
    one, two = Faults(bad_signature=0.3, seed=1), Faults(bad_signature=0.3, seed=1)
    draws = [one.chance("bad_signature") for _ in range(2000)]
    assert draws == [two.chance("bad_signature") for _ in range(2000)]
    assert 450 < sum(draws) < 750


def test_drop_stall_and_private_address() -> None:
    faults = Faults(drop_after_frames=3, stall_seconds=2.0, stall_after_frames=5)
    assert [faults.should_drop(n) for n in range(5)] == [False, False, False, True, True]
    assert [faults.should_stall(n) for n in range(8)] == [n == 5 for n in range(8)]
    faults = Faults(private_address_dids=frozenset({"did:plc:a"}))
    assert faults.uses_private_address("did:plc:a") and not faults.uses_private_address("did:plc:b")
    faults.private_address_dids = True
    assert faults.uses_private_address("did:plc:b")


def test_http_status() -> None:
    faults = Faults(http_500_every=2, http_429_every=3)
    assert [faults.http_status("x") for _ in range(6)] == [None, 500, 429, 500, None, 500]


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Faults]]:
    faults = Faults()

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[http_fault_middleware(faults, "test")])
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/", faults
    finally:
        await runner.cleanup()


async def test_middleware(server: tuple[str, Faults]) -> None:
    url, faults = server
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200

        faults.http_429_every = 2
        faults.retry_after_seconds = 7
        statuses = []
        for _ in range(4):
            async with http.get(url) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    body = await resp.json()
                    assert body["error"] == "RateLimitExceeded"
                    assert resp.headers["Retry-After"] == "7"
                    assert resp.headers["RateLimit-Remaining"] == "0"
                    reset = int(resp.headers["RateLimit-Reset"])
                    assert 0 <= reset - time.time() <= 8
                    assert int(resp.headers["RateLimit-Limit"]) >= 1
        assert statuses == [200, 429, 200, 429]

        faults.http_429_every = 0
        faults.http_500_every = 1
        async with http.get(url) as resp:
            assert resp.status == 500 and (await resp.json())["error"] == "InternalServerError"

        faults.http_500_every = 0
        faults.slow_response_ms = 200
        start = time.monotonic()
        async with http.get(url) as resp:
            assert resp.status == 200
        assert time.monotonic() - start >= 0.19
