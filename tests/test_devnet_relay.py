"""The devnet relay over real loopback HTTP and websockets, against real devnet PDSes.

Every frame the relay serves is decoded with ``firehose.decode_frame``; every ``#commit``
goes through ``process_commit`` with the signing key from the account's PLC document; the
CAR behind the ``getRepo`` redirect is checked with ``repo.verify_repo``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed
from yarl import URL

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey
from psky.atproto.did import parse_did_document
from psky.atproto.firehose import (
    CommitEvent,
    ErrorFrame,
    InfoEvent,
    SyncEvent,
    decode_frame,
    encode_frame,
    info_body,
    process_commit,
    process_sync,
)
from psky.atproto.repo import RepoWriter, verify_repo
from psky.atproto.syntax import TidClock
from psky.devnet.faults import Faults
from psky.devnet.pds import Account, Pds
from psky.devnet.plc import PlcDirectory
from psky.devnet.relay import Relay

POST = "app.bsky.feed.post"
CLOCK = TidClock()


def post(text: str) -> dict[str, Any]:
    return {"$type": POST, "text": text, "createdAt": "2024-05-01T12:00:00.000Z"}


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
async def plc() -> AsyncIterator[PlcDirectory]:
    async with PlcDirectory() as directory:
        yield directory


@pytest.fixture
async def pds1(plc: PlcDirectory) -> AsyncIterator[Pds]:
    async with Pds(plc.url, hostname="pds1.test") as server:
        yield server


@pytest.fixture
async def pds2(plc: PlcDirectory) -> AsyncIterator[Pds]:
    async with Pds(plc.url, hostname="pds2.test") as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ws_url(base: str, cursor: int | None = None) -> str:
    url = base.replace("http://", "ws://") + "/xrpc/com.atproto.sync.subscribeRepos"
    return url if cursor is None else f"{url}?cursor={cursor}"


async def recv(ws: websockets.ClientConnection) -> bytes:
    msg = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(msg, bytes)
    return msg


async def read_raw(base: str, cursor: int | None, n: int) -> list[bytes]:
    async with websockets.connect(ws_url(base, cursor), max_size=None) as ws:
        return [await recv(ws) for _ in range(n)]


async def settle(relay: Relay, *pdses: Pds) -> None:
    for pds in pdses:
        await relay.wait_for_host(pds.url, pds.seq)


def body_of(frame: bytes) -> tuple[str, dict[str, Any]]:
    header, used = cbor.decode_prefix(frame)
    body = cbor.decode(memoryview(frame)[used:])
    assert header["op"] == 1
    return header["t"], body


def without_seq(frame: bytes) -> tuple[str, dict[str, Any]]:
    t, body = body_of(frame)
    del body["seq"]
    return t, body


def did_of(t: str, body: dict[str, Any]) -> str:
    did = body["repo"] if t == "#commit" else body["did"]
    assert isinstance(did, str)
    return did


async def signing_key(http: aiohttp.ClientSession, plc: PlcDirectory, did: str) -> str:
    async with http.get(f"{plc.url}/{did}") as resp:
        assert resp.status == 200
        doc = parse_did_document(await resp.json(content_type=None), expected_did=did)
    assert doc.signing_key is not None
    return doc.signing_key


async def xrpc(http: aiohttp.ClientSession, base: str, method: str, **params: Any) -> tuple[int, Any]:
    async with http.get(f"{base}/xrpc/{method}", params={k: str(v) for k, v in params.items()}) as resp:
        body = await resp.read()
        return resp.status, orjson.loads(body) if resp.content_type == "application/json" else body


async def activity(pds: Pds, name: str, posts: int = 3) -> Account:
    """An account with initial records, a write batch, an update, a delete and a #sync."""
    acct = await pds.create_account(name, records={f"{POST}/{CLOCK.next()}": post(f"{name} 0")})
    rkeys = [CLOCK.next() for _ in range(posts)]
    for rkey in rkeys:
        await pds.apply_writes(acct.did, [("create", POST, rkey, post(f"{name} {rkey}"))])
    await pds.apply_writes(acct.did, [("update", POST, rkeys[0], post("edited")), ("delete", POST, rkeys[1], None)])
    pds.emit_sync(acct.did)
    return acct


def pds_frames(pds: Pds) -> list[bytes]:
    return [frame for _, frame in pds.sequencer.frames_after(0)]


# --- re-sequencing ----------------------------------------------------------------------


async def test_resequencing_two_pdses_keeps_per_repo_order_and_commits_verify(
    plc: PlcDirectory, pds1: Pds, pds2: Pds, http: aiohttp.ClientSession
) -> None:
    async with Relay([pds1.url, pds2.url]) as relay:
        accounts = []
        for i in range(3):  # interleave the hosts so the relay really merges two streams
            accounts.append(await activity(pds1, f"a{i}"))
            accounts.append(await activity(pds2, f"b{i}"))
        await settle(relay, pds1, pds2)
        upstream = pds_frames(pds1) + pds_frames(pds2)
        assert relay.seq == len(upstream)
        raw = await read_raw(relay.url, 0, relay.seq)

    # the relay's own seq: 1..n, contiguous
    assert [body_of(f)[1]["seq"] for f in raw] == list(range(1, len(upstream) + 1))
    # per repo, exactly the upstream events in the upstream order, bodies untouched but seq
    by_did: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for frame in raw:
        t, body = without_seq(frame)
        by_did.setdefault(did_of(t, body), []).append((t, body))
    for pds in (pds1, pds2):
        expected: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for frame in pds_frames(pds):
            t, body = without_seq(frame)
            expected.setdefault(did_of(t, body), []).append((t, body))
        for did, events in expected.items():
            assert by_did[did] == events
    assert set(by_did) == {a.did for a in accounts}
    # the frames themselves are canonical and every commit still verifies
    keys = {a.did: await signing_key(http, plc, a.did) for a in accounts}
    commits = proofs = 0
    for frame in raw:
        ev = decode_frame(frame)
        if isinstance(ev, CommitEvent):
            res = process_commit(ev, signing_key=keys[ev.repo])
            assert res.ok, res.errors
            assert res.signature is True
            commits += 1
            if ev.prev_data is not None:
                assert res.proof is True
                proofs += 1
        elif isinstance(ev, SyncEvent):
            assert process_sync(ev, signing_key=keys[ev.did]).ok
        body = body_of(frame)[1]
        assert encode_frame(body_of(frame)[0], body) == frame
    # per account: the empty initial commit (no prevData), the initial records, 3 posts, 1 batch
    assert commits == 6 * 6 and proofs == 6 * 5


async def test_replay_from_zero_equals_live(pds1: Pds, pds2: Pds) -> None:
    async with Relay([pds1.url, pds2.url]) as relay:
        async with websockets.connect(ws_url(relay.url), max_size=None) as live:
            for _ in range(200):
                if relay.sequencer.subscriber_count:
                    break
                await asyncio.sleep(0.01)
            await activity(pds1, "alice")
            await activity(pds2, "bob")
            await activity(pds1, "carol")
            await settle(relay, pds1, pds2)
            live_frames = [await recv(live) for _ in range(relay.seq)]
        replay = await read_raw(relay.url, 0, relay.seq)
        assert live_frames == replay
        # a cursor in the middle replays the tail
        assert await read_raw(relay.url, 7, relay.seq - 7) == replay[7:]


# --- upstream faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [
        {"drop_after_frames": 3},
        {"malformed_every": 4},
        {"seq_replay_every": 2},
        {"stall_seconds": 0.3, "stall_after_frames": 5},
        {"oversized_every": 9},
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
async def test_reconnect_after_upstream_fault_loses_nothing_duplicates_nothing(
    plc: PlcDirectory, knobs: dict[str, Any]
) -> None:
    faults = Faults(**knobs)
    async with Pds(plc.url, hostname="flaky.test", faults=faults) as pds, Relay([pds.url]) as relay:
        for name in ("alice", "bob", "carol"):
            await activity(pds, name)
        await asyncio.wait_for(settle(relay, pds), 30)
        upstream = [without_seq(f) for f in pds_frames(pds)]
        assert relay.seq == len(upstream)
        got = [without_seq(f) for f in await read_raw(relay.url, 0, relay.seq)]
        assert got == upstream
        host = relay.hosts[pds.url]
        if "drop_after_frames" in knobs or "malformed_every" in knobs or "oversized_every" in knobs:
            assert host.connects > 1
        if "malformed_every" in knobs:
            assert host.malformed > 0
        if "seq_replay_every" in knobs:
            assert host.stale > 0
        # and the relay's own stream stays strictly sequential
        assert [body_of(f)[1]["seq"] for f in await read_raw(relay.url, 0, relay.seq)] == list(
            range(1, relay.seq + 1)
        )


async def test_out_of_order_upstream_frames_are_dropped_like_indigo(plc: PlcDirectory) -> None:
    faults = Faults(seq_out_of_order_every=4)
    async with Pds(plc.url, hostname="jumbled.test", faults=faults) as pds, Relay([pds.url]) as relay:
        await activity(pds, "alice")
        await asyncio.wait_for(settle(relay, pds), 10)
        host = relay.hosts[pds.url]
        assert host.stale > 0
        assert relay.seq == pds.seq - host.stale
        seqs = [body_of(f)[1]["seq"] for f in await read_raw(relay.url, 0, relay.seq)]
        assert seqs == list(range(1, relay.seq + 1))


async def test_upstream_future_cursor_parks_host_until_resumed(pds1: Pds) -> None:
    await activity(pds1, "alice")
    async with Relay() as relay:
        host = relay.add_host(pds1.url, cursor=pds1.seq + 100)
        for _ in range(500):
            if host.status == "idle":
                break
            await asyncio.sleep(0.01)
        assert host.status == "idle"
        assert relay.upstream_errors["FutureCursor"] == 1 and host.errors["FutureCursor"] == 1
        assert relay.seq == 0
        relay.add_host(pds1.url, cursor=0)
        await settle(relay, pds1)
        assert relay.seq == pds1.seq and host.status == "active"


async def test_upstream_info_is_not_forwarded(plc: PlcDirectory) -> None:
    async with Pds(plc.url, hostname="small.test", retain=3) as pds:
        await activity(pds, "alice")
        # a relay that starts from cursor 0 is told OutdatedCursor and gets the retained tail
        async with Relay([pds.url]) as relay:
            await settle(relay, pds)
            host = relay.hosts[pds.url]
            assert host.infos["OutdatedCursor"] == 1
            frames = [decode_frame(f) for f in await read_raw(relay.url, 0, relay.seq)]
            assert relay.seq == len(pds.sequencer.frames_after(0))
            assert not any(isinstance(f, InfoEvent) for f in frames)


# --- the relay's own stream ---------------------------------------------------------------


async def test_future_cursor_and_outdated_cursor(pds1: Pds) -> None:
    async with Relay([pds1.url], retain=4) as relay:
        await activity(pds1, "alice")
        await settle(relay, pds1)
        async with websockets.connect(ws_url(relay.url, relay.seq + 1)) as ws:
            ev = decode_frame(await recv(ws))
            assert ev == ErrorFrame("FutureCursor", "Cursor in the future.")
            with pytest.raises(ConnectionClosed):
                await recv(ws)
        assert ws.close_code == 1008
        oldest = relay.sequencer.oldest
        assert oldest is not None and oldest > 1
        async with websockets.connect(ws_url(relay.url, 0)) as ws:
            info = decode_frame(await recv(ws))
            assert isinstance(info, InfoEvent) and info.name == "OutdatedCursor"
            first = decode_frame(await recv(ws))
            assert getattr(first, "seq", None) == oldest


async def test_relay_stream_faults_and_resume(pds1: Pds) -> None:
    faults = Faults()
    async with Relay([pds1.url], faults=faults) as relay:
        await activity(pds1, "alice")
        await settle(relay, pds1)
        faults.drop_after_frames = 5
        got: list[int] = []
        cursor = 0
        for _ in range(10):  # a consumer that resumes from its cursor after every drop
            async with websockets.connect(ws_url(relay.url, cursor), max_size=None) as ws:
                try:
                    while True:
                        seq = body_of(await recv(ws))[1]["seq"]
                        got.append(seq)
                        cursor = seq
                except ConnectionClosed:
                    pass
            if cursor == relay.seq:
                break
        assert got == list(range(1, relay.seq + 1))


async def test_relay_malformed_frame_fault(pds1: Pds) -> None:
    faults = Faults()
    async with Relay([pds1.url], faults=faults) as relay:
        await activity(pds1, "alice")
        await settle(relay, pds1)
        faults.malformed_every = 3
        raw = await read_raw(relay.url, 0, 6)
        bad = [i for i, f in enumerate(raw) if _is_malformed(f)]
        assert bad == [2, 5]


def _is_malformed(frame: bytes) -> bool:
    try:
        decode_frame(frame)
    except ValueError:
        return True
    return False


# --- replay mode ----------------------------------------------------------------------------


def generated_frames(n_repos: int, commits: int) -> list[bytes]:
    frames: list[bytes] = []
    seq = itertools.count(1000)
    for r in range(n_repos):
        key = PrivateKey.generate("k256")
        did = f"did:plc:{'abcdefghijklmnopqrstuvw'[:23]}{'abcdefghijklmnopqrstuvwxyz'[r]}"
        repo = RepoWriter(did, key)
        frames.append(repo.initial.to_frame(seq=next(seq), time="2024-01-01T00:00:00.000Z"))
        for c in range(commits):
            res = repo.apply_writes([("create", POST, CLOCK.next(), post(f"{r}/{c}"))])
            frames.append(res.to_frame(seq=next(seq), time="2024-01-01T00:00:00.000Z"))
    return frames


async def test_preload_replay_mode() -> None:
    frames = generated_frames(3, 5)
    noise = encode_frame("#info", info_body("OutdatedCursor"))
    async with Relay() as relay:
        assert relay.preload([frames[0], noise, *frames[1:]]) == len(frames)
        assert relay.seq == len(frames)
        raw = await read_raw(relay.url, 0, relay.seq)
    assert [body_of(f)[1]["seq"] for f in raw] == list(range(1, len(frames) + 1))
    assert [without_seq(f) for f in raw] == [without_seq(f) for f in frames]
    for frame in raw:
        ev = decode_frame(frame)
        assert isinstance(ev, CommitEvent)
        assert process_commit(ev).ok
    # the account table follows the preloaded commits
    last = decode_frame(frames[-1])
    assert isinstance(last, CommitEvent)
    acc = relay.account(last.repo)
    assert acc is not None and acc.head == last.commit and acc.rev == last.rev


# --- sync endpoints -----------------------------------------------------------------------


async def test_list_repos_merges_hosts_with_pagination(
    pds1: Pds, pds2: Pds, http: aiohttp.ClientSession
) -> None:
    accounts = [await activity(pds1, f"a{i}", posts=2) for i in range(4)]
    accounts += [await activity(pds2, f"b{i}", posts=2) for i in range(3)]
    await pds2.set_status(accounts[-1].did, False, "deactivated")
    async with Relay([pds1.url, pds2.url]) as relay:
        await settle(relay, pds1, pds2)
        listed: list[dict[str, Any]] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            status, body = await xrpc(http, relay.url, "com.atproto.sync.listRepos", **params)
            assert status == 200
            pages += 1
            listed += body["repos"]
            cursor = body.get("cursor")
            if cursor is None:
                break
        assert pages == 4
        # exactly what the PDSes list, merged
        upstream: list[dict[str, Any]] = []
        for pds in (pds1, pds2):
            status, body = await xrpc(http, pds.url, "com.atproto.sync.listRepos")
            upstream += body["repos"]
        key = lambda r: r["did"]  # noqa: E731
        assert sorted(listed, key=key) == sorted(upstream, key=key)
        assert len(listed) == len({r["did"] for r in listed}) == 7
        deactivated = next(r for r in listed if r["did"] == accounts[-1].did)
        assert deactivated["active"] is False and deactivated["status"] == "deactivated"

        status, body = await xrpc(http, relay.url, "com.atproto.sync.listRepos", limit=1001)
        assert status == 400 and body["error"] == "InvalidRequest"
        status, body = await xrpc(http, relay.url, "com.atproto.sync.listRepos", cursor="x")
        assert status == 400 and body["error"] == "InvalidRequest"

        status, body = await xrpc(http, relay.url, "com.atproto.sync.listHosts")
        assert status == 200
        assert {h["hostname"] for h in body["hosts"]} == {pds1.url.split("://")[1], pds2.url.split("://")[1]}
        assert sorted(h["accountCount"] for h in body["hosts"]) == [3, 4]


async def test_list_repos_crawls_accounts_the_stream_did_not_show(pds1: Pds, http: aiohttp.ClientSession) -> None:
    accounts = [await activity(pds1, f"a{i}", posts=2) for i in range(3)]
    # live-only relay: the firehose shows nothing of the past, the crawl fills the table
    async with Relay([pds1.url], start_cursor=None) as relay:
        for _ in range(500):
            if len(relay.accounts()) == 3:
                break
            await asyncio.sleep(0.01)
        status, body = await xrpc(http, relay.url, "com.atproto.sync.listRepos")
        assert status == 200
        assert {(r["did"], r["head"], r["rev"]) for r in body["repos"]} == {
            (a.did, a.head.encode(), a.rev) for a in accounts
        }
        assert "cursor" not in body
        assert relay.seq == 0


async def test_get_repo_redirects_to_the_pds_and_the_car_verifies(
    plc: PlcDirectory, pds1: Pds, pds2: Pds, http: aiohttp.ClientSession
) -> None:
    alice = await activity(pds1, "alice")
    bob = await activity(pds2, "bob")
    for with_plc in (True, False):
        async with Relay([pds1.url, pds2.url], plc_url=plc.url if with_plc else None) as relay:
            await settle(relay, pds1, pds2)
            for acct, pds in ((alice, pds1), (bob, pds2)):
                url = f"{relay.url}/xrpc/com.atproto.sync.getRepo"
                async with http.get(url, params={"did": acct.did}, allow_redirects=False) as resp:
                    assert resp.status == 302
                    location = URL(resp.headers["Location"])
                    assert str(location.with_query(None)) == f"{pds.url}/xrpc/com.atproto.sync.getRepo"
                    assert dict(location.query) == {"did": acct.did}
                async with http.get(url, params={"did": acct.did}) as resp:
                    assert resp.status == 200
                    assert str(resp.url).startswith(pds.url)
                    car = await resp.read()
                verified = verify_repo(car, did=acct.did, signing_key=await signing_key(http, plc, acct.did))
                assert verified.ok and verified.signature_valid is True
                assert verified.commit_cid == acct.head
                assert {r.path for r in verified.records()} == {p for p, _, _ in acct.records()}
            # since is passed through
            async with http.get(
                f"{relay.url}/xrpc/com.atproto.sync.getRepo", params={"did": alice.did, "since": alice.rev}
            ) as resp:
                assert resp.status == 200
            status, body = await xrpc(
                http, relay.url, "com.atproto.sync.getRepo", did="did:plc:zzzzzzzzzzzzzzzzzzzzzzzz"
            )
            assert status == 404 and body["error"] == "RepoNotFound"
            status, body = await xrpc(http, relay.url, "com.atproto.sync.getRepo", did="nope")
            assert status == 400 and body["error"] == "InvalidRequest"


async def test_latest_commit_and_repo_status(pds1: Pds, http: aiohttp.ClientSession) -> None:
    alice = await activity(pds1, "alice")
    bob = await activity(pds1, "bob")
    async with Relay([pds1.url]) as relay:
        await settle(relay, pds1)
        status, body = await xrpc(http, relay.url, "com.atproto.sync.getLatestCommit", did=alice.did)
        assert status == 200
        assert body == {"cid": alice.head.encode(), "rev": alice.rev}
        _, upstream = await xrpc(http, pds1.url, "com.atproto.sync.getLatestCommit", did=alice.did)
        assert body == upstream
        status, body = await xrpc(http, relay.url, "com.atproto.sync.getRepoStatus", did=alice.did)
        assert body == {"did": alice.did, "active": True, "rev": alice.rev}

        for pds_status, error in (("deactivated", "RepoDeactivated"), ("takendown", "RepoTakendown")):
            await pds1.set_status(bob.did, False, pds_status)
            await settle(relay, pds1)
            status, body = await xrpc(http, relay.url, "com.atproto.sync.getLatestCommit", did=bob.did)
            assert status == 403 and body["error"] == error
            status, body = await xrpc(http, relay.url, "com.atproto.sync.getRepoStatus", did=bob.did)
            assert status == 200
            assert body == {"did": bob.did, "active": False, "status": pds_status, "rev": bob.rev}
            await pds1.set_status(bob.did, True)
            await settle(relay, pds1)
        status, body = await xrpc(http, relay.url, "com.atproto.sync.getRepoStatus", did=bob.did)
        assert body == {"did": bob.did, "active": True, "rev": bob.rev}

        # a new commit moves the head; a #sync is followed too
        await pds1.apply_writes(alice.did, [("create", POST, CLOCK.next(), post("later"))])
        await settle(relay, pds1)
        _, body = await xrpc(http, relay.url, "com.atproto.sync.getLatestCommit", did=alice.did)
        assert body == {"cid": alice.head.encode(), "rev": alice.rev}

        await pds1.set_status(bob.did, False, "deleted")
        await settle(relay, pds1)
        status, body = await xrpc(http, relay.url, "com.atproto.sync.getLatestCommit", did=bob.did)
        assert status == 403 and body["error"] == "RepoDeleted"

        for method in ("getLatestCommit", "getRepoStatus"):
            status, body = await xrpc(
                http, relay.url, f"com.atproto.sync.{method}", did="did:plc:zzzzzzzzzzzzzzzzzzzzzzzz"
            )
            assert status == 404 and body["error"] == "RepoNotFound"
            status, body = await xrpc(http, relay.url, f"com.atproto.sync.{method}")
            assert status == 400 and body["error"] == "InvalidRequest"


async def test_http_fault_knobs(pds1: Pds, http: aiohttp.ClientSession) -> None:
    faults = Faults()
    async with Relay([pds1.url], faults=faults) as relay:
        faults.http_429_every = 2
        statuses = [(await xrpc(http, relay.url, "com.atproto.sync.listRepos"))[0] for _ in range(4)]
        assert statuses == [200, 429, 200, 429]


async def test_relay_with_faulty_pds_http_still_follows(plc: PlcDirectory) -> None:
    # the PDS answers every 2nd HTTP request (incl. websocket upgrades and listRepos) with 429
    faults = Faults(http_429_every=2, retry_after_seconds=0)
    async with Pds(plc.url, hostname="limited.test", faults=faults) as pds:
        accounts = [await activity(pds, f"a{i}", posts=2) for i in range(2)]
        async with Relay([pds.url]) as relay:
            await asyncio.wait_for(settle(relay, pds), 20)
            for _ in range(500):
                if relay.hosts[pds.url].crawled and len(relay.accounts()) == 2:
                    break
                await asyncio.sleep(0.01)
            assert {a.did for a in relay.accounts()} == {a.did for a in accounts}


async def test_stop_closes_subscribers(pds1: Pds) -> None:
    relay = await Relay([pds1.url]).start()
    try:
        async with websockets.connect(ws_url(relay.url)) as ws:
            for _ in range(200):
                if relay.sequencer.subscriber_count:
                    break
                await asyncio.sleep(0.01)
            await relay.stop()
            with pytest.raises(ConnectionClosed):
                await recv(ws)
        assert ws.close_code == 1001
    finally:
        await relay.stop()
