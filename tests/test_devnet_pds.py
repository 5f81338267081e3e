"""Devnet PDS over real loopback HTTP and websockets, checked with psky's protocol core.

Every frame the PDS sequences is decoded with ``firehose.decode_frame`` and every ``#commit``
goes through ``process_commit`` with the signing key taken from the account's DID document
at the devnet PLC directory; every CAR is verified with ``repo.verify_repo`` / ``read_car``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from psky.atproto import cbor
from psky.atproto.car import read_car, write_car
from psky.atproto.commit import Commit
from psky.atproto.did import parse_did_document
from psky.atproto.firehose import (
    AccountEvent,
    CommitEvent,
    ErrorFrame,
    Frame,
    FrameError,
    IdentityEvent,
    InfoEvent,
    SyncEvent,
    decode_frame,
    encode_frame,
    identity_body,
    process_commit,
    process_sync,
)
from psky.atproto.mst import MST
from psky.atproto.repo import RepoError, RepoWriter, verify_repo, verify_repo_stream
from psky.atproto.syntax import TidClock
from psky.devnet import pds as pds_module
from psky.devnet.faults import Faults
from psky.devnet.pds import MAX_WRITES, Account, Pds, PdsError
from psky.devnet.plc import PlcDirectory
from psky.devnet.sequencer import OVERSIZED_FRAME_BYTES, Sequencer, oversize_frame, replace_seq

POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
CLOCK = TidClock()


def post(text: str) -> dict[str, Any]:
    return {"$type": POST, "text": text, "createdAt": "2024-05-01T12:00:00.000Z", "langs": ["en"]}


def like(i: int) -> dict[str, Any]:
    return {
        "$type": LIKE,
        "subject": {
            "uri": f"at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/{POST}/3k{i:011d}",
            "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
        },
        "createdAt": "2024-05-01T12:00:00.000Z",
    }


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
async def plc() -> AsyncIterator[PlcDirectory]:
    async with PlcDirectory() as directory:
        yield directory


@pytest.fixture
async def pds(plc: PlcDirectory) -> AsyncIterator[Pds]:
    async with Pds(plc.url, hostname="pds1.test") as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ws_url(pds: Pds, cursor: int | None = None) -> str:
    url = pds.url.replace("http://", "ws://") + "/xrpc/com.atproto.sync.subscribeRepos"
    return url if cursor is None else f"{url}?cursor={cursor}"


async def read_raw(pds: Pds, cursor: int | None, n: int) -> list[bytes]:
    async with websockets.connect(ws_url(pds, cursor), max_size=None) as ws:
        out = []
        for _ in range(n):
            msg = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(msg, bytes)
            out.append(msg)
        return out


async def until_subscribed(pds: Pds, n: int) -> None:
    """Wait until the PDS has registered ``n`` subscribers (websockets connect before that)."""
    for _ in range(500):
        if pds.sequencer.subscriber_count >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {pds.sequencer.subscriber_count} subscribers")


async def frames_after(pds: Pds, cursor: int) -> list[Frame]:
    """Every retained frame after ``cursor``, read over a fresh subscription."""
    n = len(pds.sequencer.frames_after(cursor))
    return [decode_frame(f) for f in await read_raw(pds, cursor, n)]


async def plc_signing_key(http: aiohttp.ClientSession, plc: PlcDirectory, did: str) -> str:
    async with http.get(f"{plc.url}/{did}") as resp:
        assert resp.status == 200
        doc = parse_did_document(await resp.json(content_type=None), expected_did=did)
    assert doc.signing_key is not None
    return doc.signing_key


async def xrpc(http: aiohttp.ClientSession, pds: Pds, method: str, **params: Any) -> tuple[int, Any, Any]:
    """(status, JSON body or raw bytes, headers)."""
    async with http.get(f"{pds.url}/xrpc/{method}", params={k: str(v) for k, v in params.items()}) as resp:
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, orjson.loads(body), resp.headers
        return resp.status, body, resp.headers


async def expect_error(
    http: aiohttp.ClientSession, pds: Pds, method: str, error: str, status: int = 400, **params: Any
) -> None:
    got_status, body, _ = await xrpc(http, pds, method, **params)
    assert got_status == status, body
    assert body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"]


async def repo_records(http: aiohttp.ClientSession, pds: Pds, acct: Account, key: str) -> dict[str, Any]:
    """getRepo, verified (signature with the PLC key), as {path: record}."""
    status, car, headers = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did)
    assert status == 200
    assert headers["Content-Type"] == "application/vnd.ipld.car"
    verified = verify_repo(car, did=acct.did, signing_key=key)
    assert verified.ok, (verified.mst_error, verified.signature_error, verified.missing_records)
    assert verified.signature_valid is True
    assert verified.commit_cid == acct.head and verified.rev == acct.rev
    return {r.path: r.value for r in verified.records()}


def apply_ops(state: dict[str, dict[str, Any]], frame: CommitEvent, key: str) -> None:
    """Check a #commit like a consumer does and apply its ops to ``state`` (path -> record)."""
    res = process_commit(frame, signing_key=key)
    assert res.ok, res.errors
    assert res.signature is True
    if frame.prev_data is not None:
        assert res.proof is True
    for op in res.ops:
        if op.action == "delete":
            del state[op.path]
        else:
            assert op.record is not None
            state[op.path] = op.record


# --- accounts, commits and the firehose -----------------------------------------------------


async def test_create_account_sequences_like_the_reference(
    pds: Pds, plc: PlcDirectory, http: aiohttp.ClientSession
) -> None:
    records = {f"{POST}/{CLOCK.next()}": post(f"initial {i}") for i in range(3)}
    acct = await pds.create_account("alice", records=records)
    assert acct.handle == "alice.pds1.test"
    assert acct.did.startswith("did:plc:") and acct.active and acct.status is None
    key = await plc_signing_key(http, plc, acct.did)
    assert key == acct.signing_key.did_key()

    async with http.get(f"{plc.url}/{acct.did}") as resp:
        doc = parse_did_document(await resp.json(content_type=None))
    assert doc.handle == "alice.pds1.test"
    assert doc.pds_endpoint == pds.url

    frames = await frames_after(pds, 0)
    assert [type(f).__name__ for f in frames] == [
        "IdentityEvent",
        "AccountEvent",
        "CommitEvent",
        "SyncEvent",
        "CommitEvent",
    ]
    assert [getattr(f, "seq", None) for f in frames] == [1, 2, 3, 4, 5]
    ident, account, init, sync, first = frames
    assert isinstance(ident, IdentityEvent) and ident.did == acct.did and ident.handle == acct.handle
    assert isinstance(account, AccountEvent) and account.active is True and account.status is None
    assert isinstance(init, CommitEvent) and init.ops == () and init.since is None and init.prev_data is None
    init_res = process_commit(init, signing_key=key)
    assert init_res.ok and init_res.signature is True
    assert isinstance(sync, SyncEvent) and sync.rev == init.rev
    sync_res = process_sync(sync, signing_key=key)
    assert sync_res.ok and sync_res.commit_cid == init.commit
    assert isinstance(first, CommitEvent) and first.since == init.rev
    state: dict[str, dict[str, Any]] = {}
    apply_ops(state, first, key)
    assert state == records
    assert await repo_records(http, pds, acct, key) == records


async def test_writes_replay_and_repo_agree(pds: Pds, plc: PlcDirectory, http: aiohttp.ClientSession) -> None:
    alice = await pds.create_account("alice")
    bob = await pds.create_account("bob.pds1.test", key_curve="p256")
    keys = {a.did: await plc_signing_key(http, plc, a.did) for a in (alice, bob)}
    assert keys[bob.did].startswith("did:key:zDn")  # P-256
    expected: dict[str, dict[str, dict[str, Any]]] = {alice.did: {}, bob.did: {}}
    rkeys = [CLOCK.next() for _ in range(40)]
    for acct in (alice, bob):
        writes = [("create", POST, rk, post(f"{acct.handle} {i}")) for i, rk in enumerate(rkeys)]
        writes += [("create", LIKE, rk, like(i)) for i, rk in enumerate(rkeys[:10])]
        res = await pds.apply_writes(acct.did, writes)
        assert res.rev == acct.rev and res.commit_cid == acct.head
        for _, coll, rk, rec in writes:
            assert rec is not None
            expected[acct.did][f"{coll}/{rk}"] = rec
    # updates and deletes, singly and batched
    for i in range(5):
        rec = post(f"edited {i}")
        await pds.apply_writes(alice.did, [("update", POST, rkeys[i], rec)])
        expected[alice.did][f"{POST}/{rkeys[i]}"] = rec
    await pds.apply_writes(alice.did, [("delete", POST, rk, None) for rk in rkeys[10:20]])
    for rk in rkeys[10:20]:
        del expected[alice.did][f"{POST}/{rk}"]
    await pds.apply_writes(
        bob.did,
        [
            ("delete", LIKE, rkeys[0], None),
            ("update", POST, rkeys[1], post("b")),
            ("create", POST, "self", post("c")),
        ],
    )
    del expected[bob.did][f"{LIKE}/{rkeys[0]}"]
    expected[bob.did][f"{POST}/{rkeys[1]}"] = post("b")
    expected[bob.did][f"{POST}/self"] = post("c")

    raw = await read_raw(pds, 0, pds.seq)
    state: dict[str, dict[str, dict[str, Any]]] = {alice.did: {}, bob.did: {}}
    last_data: dict[str, cbor.CID | None] = {}
    commits = 0
    for i, data in enumerate(raw):
        frame = decode_frame(data)
        assert getattr(frame, "seq", None) == i + 1
        if isinstance(frame, CommitEvent):
            commits += 1
            # sync 1.1: each commit's prevData is the previous commit's data root
            res = process_commit(frame, signing_key=keys[frame.repo])
            if frame.repo in last_data:
                assert frame.prev_data == last_data[frame.repo]
            last_data[frame.repo] = res.data
            apply_ops(state[frame.repo], frame, keys[frame.repo])
        elif isinstance(frame, SyncEvent):
            assert process_sync(frame, signing_key=keys[frame.did]).ok
    assert commits == 2 + 2 + 5 + 1 + 1
    assert state == expected
    for acct in (alice, bob):
        assert await repo_records(http, pds, acct, keys[acct.did]) == expected[acct.did]

    # replaying from 0 again gives byte-identical frames; from a cursor, the tail
    assert await read_raw(pds, 0, pds.seq) == raw
    assert await read_raw(pds, 7, pds.seq - 7) == raw[7:]


async def test_live_subscribers_get_only_new_frames(pds: Pds) -> None:
    acct = await pds.create_account("carol")
    async with (
        websockets.connect(ws_url(pds), max_size=None) as one,
        websockets.connect(ws_url(pds), max_size=None) as two,
    ):
        await until_subscribed(pds, 2)
        before = pds.seq
        await pds.apply_writes(acct.did, [("create", POST, CLOCK.next(), post("live"))])
        await pds.update_handle(acct.did, "carol2")
        got_one = [await asyncio.wait_for(one.recv(), 5) for _ in range(2)]
        got_two = [await asyncio.wait_for(two.recv(), 5) for _ in range(2)]
        assert got_one == got_two
        first, second = (decode_frame(f) for f in got_one)
        assert isinstance(first, CommitEvent) and first.seq == before + 1
        assert isinstance(second, IdentityEvent) and second.handle == "carol2.pds1.test"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(one.recv(), 0.2)


async def test_subscribers_leave_and_server_stop(plc: PlcDirectory) -> None:
    pds = await Pds(plc.url, hostname="pds6.test").start()
    try:
        await pds.create_account("nina")
        async with websockets.connect(ws_url(pds)) as ws:
            await until_subscribed(pds, 1)
        for _ in range(200):  # the server notices the client's close
            if pds.sequencer.subscriber_count == 0:
                break
            await asyncio.sleep(0.01)
        assert pds.sequencer.subscriber_count == 0
        ws = await websockets.connect(ws_url(pds, 0))
        await until_subscribed(pds, 1)
    finally:
        # stopping must not wait for connected subscribers (a hang would end here)
        await asyncio.wait_for(pds.stop(), 30)
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1001


async def test_future_cursor_and_invalid_cursor(pds: Pds) -> None:
    await pds.create_account("dave")
    for query, error in ((str(pds.seq + 1), "FutureCursor"), ("abc", "InvalidRequest")):
        async with websockets.connect(ws_url(pds) + f"?cursor={query}") as ws:
            frame = decode_frame(await asyncio.wait_for(ws.recv(), 5))
            assert isinstance(frame, ErrorFrame) and frame.error == error
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1008
            assert ws.close_reason == error
    # a cursor equal to the head is not in the future: live from there
    async with websockets.connect(ws_url(pds, pds.seq)) as ws:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2)


async def test_outdated_cursor_replays_from_oldest_retained(plc: PlcDirectory) -> None:
    async with Pds(plc.url, hostname="pds2.test", retain=6) as pds:
        acct = await pds.create_account("erin")
        for i in range(6):
            await pds.apply_writes(acct.did, [("create", POST, CLOCK.next(), post(str(i)))])
        assert pds.seq == 10 and pds.sequencer.oldest == 5
        async with websockets.connect(ws_url(pds, 2), max_size=None) as ws:
            info = decode_frame(await asyncio.wait_for(ws.recv(), 5))
            assert isinstance(info, InfoEvent) and info.name == "OutdatedCursor"
            seqs = [
                getattr(decode_frame(await asyncio.wait_for(ws.recv(), 5)), "seq", None) for _ in range(6)
            ]
            assert seqs == [5, 6, 7, 8, 9, 10]
        # a cursor inside the window is not outdated
        async with websockets.connect(ws_url(pds, 6), max_size=None) as ws:
            first = decode_frame(await asyncio.wait_for(ws.recv(), 5))
            assert isinstance(first, CommitEvent) and first.seq == 7


async def test_consumer_too_slow(plc: PlcDirectory) -> None:
    async with Pds(plc.url, hostname="pds3.test", max_buffer=20) as pds:
        acct = await pds.create_account("slow")
        # a client that stops reading: small receive buffer, tiny websockets queue
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = pds.url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        sock.setblocking(False)
        async with websockets.connect(ws_url(pds), sock=sock, max_size=None, max_queue=2) as ws:
            await until_subscribed(pds, 1)
            for i in range(300):
                writes = [("create", POST, CLOCK.next(), post(f"{i}-{j} " + "x" * 2000)) for j in range(20)]
                await pds.apply_writes(acct.did, writes)
                await asyncio.sleep(0)
            frames: list[Frame] = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    frames.append(decode_frame(await asyncio.wait_for(ws.recv(), 10)))
            assert len(frames) < pds.seq - 3
            last = frames[-1]
            assert isinstance(last, ErrorFrame) and last.error == "ConsumerTooSlow"
            assert ws.close_code == 1008
        assert pds.sequencer.subscriber_count == 0


# --- sync XRPC --------------------------------------------------------------------------------


async def test_list_repos_pagination_and_statuses(pds: Pds, http: aiohttp.ClientSession) -> None:
    accts = [await pds.create_account(f"user{i}") for i in range(5)]
    await pds.set_status(accts[1].did, False, "deactivated")
    await pds.set_status(accts[2].did, False, "takendown")
    await pds.set_status(accts[3].did, False, "deleted")
    await pds.set_status(accts[4].did, False, "suspended")

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        status, body, _ = await xrpc(http, pds, "com.atproto.sync.listRepos", **params)
        assert status == 200
        pages += 1
        assert len(body["repos"]) <= 2
        seen.extend(body["repos"])
        if not body["repos"]:
            assert "cursor" not in body
            break
        cursor = body["cursor"]
    assert pages == 3
    by_did = {r["did"]: r for r in seen}
    # listed by (creation time in ms, DID): accounts made within one millisecond by DID
    listed = sorted(accts, key=lambda a: (a.created_ms, a.did))
    assert [r["did"] for r in seen] == [a.did for a in listed if a.did != accts[3].did]
    for acct in (accts[0], accts[1], accts[2], accts[4]):
        item = by_did[acct.did]
        assert item["head"] == acct.head.encode() and item["rev"] == acct.rev
    assert by_did[accts[0].did]["active"] is True and "status" not in by_did[accts[0].did]
    assert by_did[accts[1].did]["active"] is False and by_did[accts[1].did]["status"] == "deactivated"
    assert by_did[accts[2].did]["status"] == "takendown"
    assert by_did[accts[4].did]["status"] == "suspended"

    status, body, _ = await xrpc(http, pds, "com.atproto.sync.listRepos")
    assert [r["did"] for r in body["repos"]] == [r["did"] for r in seen]
    await expect_error(http, pds, "com.atproto.sync.listRepos", "InvalidRequest", cursor="nope")
    await expect_error(http, pds, "com.atproto.sync.listRepos", "InvalidRequest", limit=0)
    await expect_error(http, pds, "com.atproto.sync.listRepos", "InvalidRequest", limit=1001)


async def test_get_repo_since(pds: Pds, plc: PlcDirectory, http: aiohttp.ClientSession) -> None:
    rk = [CLOCK.next() for _ in range(30)]
    acct = await pds.create_account("frank", records={f"{POST}/{k}": post(k) for k in rk})
    key = await plc_signing_key(http, plc, acct.did)
    rev1, data1 = acct.rev, acct._repo().data
    _, full1, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did)
    blocks1 = read_car(full1).blocks

    await pds.apply_writes(acct.did, [("create", POST, "zzz", post("temp"))])
    rev2 = acct.rev
    await pds.apply_writes(acct.did, [("delete", POST, "zzz", None)])
    rev3 = acct.rev
    assert acct._repo().data == data1  # the tree is back to its rev1 state

    status, diff, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did, since=rev1)
    assert status == 200
    car = read_car(diff)
    assert car.roots == [acct.head]
    # nodes dropped at rev2 and written again at rev3 count as new (the reference deletes
    # dropped blocks and stores re-added ones with the new rev), the records do not
    assert data1 in car.blocks
    assert acct.head in car.blocks
    assert all(cid not in car.blocks for _, cid in acct._repo().entries())
    # the diff on top of the old export is the whole current repo
    merged = write_car([acct.head], {**blocks1, **car.blocks}.items())
    verified = verify_repo(merged, did=acct.did, signing_key=key)
    assert verified.ok and verified.rev == rev3
    assert {r.path for r in verified.records()} == {f"{POST}/{k}" for k in rk}

    await pds.apply_writes(acct.did, [("create", POST, "new", post("new"))])
    _, diff3, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did, since=rev3)
    got = read_car(diff3).blocks
    new_cid = acct.get_record(POST, "new")
    assert new_cid is not None and new_cid[0] in got
    assert all(cid not in got for path, cid in acct._repo().entries() if path != f"{POST}/new")

    _, none, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did, since=acct.rev)
    empty = read_car(none)
    assert empty.roots == [acct.head] and empty.blocks == {}
    assert rev1 < rev2 < rev3 < acct.rev
    await expect_error(http, pds, "com.atproto.sync.getRepo", "InvalidRequest", did=acct.did, since="notatid")
    await expect_error(http, pds, "com.atproto.sync.getRepo", "InvalidRequest")


@pytest.mark.parametrize("fallback", [False, True], ids=["tree-diff", "store-scan"])
async def test_block_revs_follow_the_store(pds: Pds, monkeypatch: pytest.MonkeyPatch, fallback: bool) -> None:
    """White box: the per-block revs behind ``since`` track exactly the repo's live blocks
    through random creates, updates, deletes and re-creates of identical records (both with
    the commit's tree diff and with the whole-store comparison it falls back to)."""
    if fallback:
        monkeypatch.setattr(pds_module._Repo, "_tree", RepoWriter._tree)
    rng = random.Random(7)
    acct = await pds.create_account("olga")
    repo = acct._repo()
    live: set[str] = set()
    names = [f"k{i:03d}" for i in range(120)]
    for _ in range(60):
        writes: list[Any] = []
        for name in rng.sample(names, rng.randint(1, 12)):
            if name in live and rng.random() < 0.5:
                writes.append(("delete", POST, name, None))
                live.discard(name)
            elif name in live:
                writes.append(("update", POST, name, post(str(rng.randint(0, 5)))))
            else:
                writes.append(("create", POST, name, post(str(rng.randint(0, 5)))))
                live.add(name)
        before = dict(repo.node_rev)
        res = await pds.apply_writes(acct.did, writes)
        assert set(repo.node_rev) == set(repo._nodes)
        assert set(repo.leaf_rev) == set(repo._leaves)
        assert all(repo.node_rev[c] == before[c] for c in repo.node_rev if c in before)
        assert all(r == res.rev for c, r in repo.node_rev.items() if c not in before)
        exported = read_car(repo.export_car()).blocks
        assert {c for c, _ in repo.blocks_by_rev()} == set(exported)
    assert {p.split("/")[1] for p, _ in repo.entries()} == live


async def test_get_repo_stream_order(plc: PlcDirectory, http: aiohttp.ClientSession) -> None:
    async with Pds(plc.url, hostname="pds4.test", car_order="stream") as pds:
        acct = await pds.create_account(
            "gina", records={f"{POST}/{CLOCK.next()}": post(str(i)) for i in range(20)}
        )
        _, car, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did)
        assert car == acct._repo().export_car()
        blocks = list(read_car(car).blocks)
        assert blocks[0] == acct.head and blocks[1] == acct._repo().data  # commit, then the root node
        assert verify_repo(car, signing_key=acct.signing_key.did_key()).ok


async def test_get_record_proofs(pds: Pds, plc: PlcDirectory, http: aiohttp.ClientSession) -> None:
    rk = [CLOCK.next() for _ in range(50)]
    acct = await pds.create_account("hank", records={f"{POST}/{k}": post(k) for k in rk})
    key = await plc_signing_key(http, plc, acct.did)
    for k in (rk[0], rk[25], rk[-1]):
        status, body, _ = await xrpc(
            http, pds, "com.atproto.sync.getRecord", did=acct.did, collection=POST, rkey=k
        )
        assert status == 200
        car = read_car(body, verify=True)
        assert car.roots == [acct.head]
        commit = Commit.decode(car.blocks[acct.head])
        assert commit.verify(key)
        cid = MST.load(car.blocks, commit.data).get(f"{POST}/{k}")
        found = acct.get_record(POST, k)
        assert found is not None and cid == found[0]
        assert cbor.decode_lex(car.blocks[cid]) == post(k)
        assert len(car.blocks) < 10  # a path, not the repo
    # absent record: the path proves absence
    status, body, _ = await xrpc(
        http, pds, "com.atproto.sync.getRecord", did=acct.did, collection=POST, rkey="nothere"
    )
    assert status == 200
    car = read_car(body)
    commit = Commit.decode(car.blocks[car.roots[0]])
    assert MST.load(car.blocks, commit.data).get(f"{POST}/nothere") is None
    await expect_error(
        http, pds, "com.atproto.sync.getRecord", "InvalidRequest", did=acct.did, collection="x", rkey="y"
    )

    # com.atproto.repo.getRecord / listRecords (JSON)
    status, rec, _ = await xrpc(
        http, pds, "com.atproto.repo.getRecord", repo=acct.handle, collection=POST, rkey=rk[3]
    )
    assert status == 200 and rec["value"] == post(rk[3]) and rec["uri"] == f"at://{acct.did}/{POST}/{rk[3]}"
    await expect_error(
        http, pds, "com.atproto.repo.getRecord", "RecordNotFound", repo=acct.did, collection=POST, rkey="zz"
    )
    listed: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"repo": acct.did, "collection": POST, "limit": 20}
        if cursor:
            params["cursor"] = cursor
        _, page, _ = await xrpc(http, pds, "com.atproto.repo.listRecords", **params)
        listed.extend(r["uri"].rsplit("/", 1)[1] for r in page["records"])
        cursor = page.get("cursor")
        if cursor is None:
            break
    assert listed == sorted(rk, reverse=True)
    _, described, _ = await xrpc(http, pds, "com.atproto.repo.describeRepo", repo=acct.did)
    assert described["collections"] == [POST] and described["handle"] == acct.handle
    assert parse_did_document(described["didDoc"]).signing_key == key


async def test_latest_commit_status_and_blobs(pds: Pds, http: aiohttp.ClientSession) -> None:
    acct = await pds.create_account("ivy")
    status, body, _ = await xrpc(http, pds, "com.atproto.sync.getLatestCommit", did=acct.did)
    assert status == 200 and body == {"cid": acct.head.encode(), "rev": acct.rev}
    status, body, _ = await xrpc(http, pds, "com.atproto.sync.getRepoStatus", did=acct.did)
    assert body == {"did": acct.did, "active": True, "rev": acct.rev}

    data = b"\x89PNG fake image bytes" * 100
    ref = pds.put_blob(acct.did, data, "image/png")
    assert ref["$type"] == "blob" and ref["size"] == len(data) and ref["mimeType"] == "image/png"
    cid = ref["ref"]["$link"]
    assert cbor.cid_for_raw(data).encode() == cid
    await pds.apply_writes(
        acct.did,
        [("create", "app.bsky.actor.profile", "self", {"$type": "app.bsky.actor.profile", "avatar": ref})],
    )
    async with http.get(
        f"{pds.url}/xrpc/com.atproto.sync.getBlob", params={"did": acct.did, "cid": cid}
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert await resp.read() == data
    _, listed, _ = await xrpc(http, pds, "com.atproto.sync.listBlobs", did=acct.did)
    assert listed["cids"] == [cid]
    missing = cbor.cid_for_raw(b"other").encode()
    await expect_error(http, pds, "com.atproto.sync.getBlob", "BlobNotFound", did=acct.did, cid=missing)
    await expect_error(http, pds, "com.atproto.sync.getBlob", "InvalidRequest", did=acct.did, cid="notacid")
    unknown = "did:plc:" + "b" * 24
    for method in ("getLatestCommit", "getRepoStatus", "getRepo"):
        await expect_error(http, pds, f"com.atproto.sync.{method}", "RepoNotFound", did=unknown)
    await expect_error(http, pds, "com.atproto.sync.getRepo", "InvalidRequest", did="not-a-did")
    status, body, _ = await xrpc(http, pds, "com.atproto.sync.noSuchMethod")
    assert status == 501 and body["error"] == "MethodNotImplemented"


async def test_account_status_transitions(pds: Pds, plc: PlcDirectory, http: aiohttp.ClientSession) -> None:
    acct = await pds.create_account("jack", records={f"{POST}/{CLOCK.next()}": post("x")})
    other = await pds.create_account("kate")
    did = acct.did
    gated = ("getRepo", "getLatestCommit", "getBlob", "getRecord")

    async def gated_errors(error: str) -> None:
        for method in gated:
            params: dict[str, Any] = {"did": did}
            if method == "getBlob":
                params["cid"] = cbor.cid_for_raw(b"x").encode()
            if method == "getRecord":
                params.update(collection=POST, rkey="x")
            await expect_error(http, pds, f"com.atproto.sync.{method}", error, **params)

    cursor = pds.seq
    await pds.set_status(did, False, "deactivated")
    (ev,) = await frames_after(pds, cursor)
    assert (
        isinstance(ev, AccountEvent) and ev.did == did and ev.active is False and ev.status == "deactivated"
    )
    await gated_errors("RepoDeactivated")
    _, st, _ = await xrpc(http, pds, "com.atproto.sync.getRepoStatus", did=did)
    assert st == {"did": did, "active": False, "status": "deactivated"}
    with pytest.raises(PdsError):
        await pds.apply_writes(did, [("create", POST, CLOCK.next(), post("no"))])

    # reactivation: #account, #identity, #sync (the reference's activateAccount)
    cursor = pds.seq
    await pds.set_status(did, True)
    account_ev, ident_ev, sync_ev = await frames_after(pds, cursor)
    assert isinstance(account_ev, AccountEvent) and account_ev.active is True and account_ev.status is None
    assert isinstance(ident_ev, IdentityEvent) and ident_ev.handle == acct.handle
    assert isinstance(sync_ev, SyncEvent) and sync_ev.rev == acct.rev
    assert process_sync(sync_ev, signing_key=acct.signing_key.did_key()).ok
    status, _, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=did)
    assert status == 200

    cursor = pds.seq
    await pds.set_status(did, False, "takendown")
    await gated_errors("RepoTakendown")
    await pds.set_status(did, True)  # lifting a takedown: #account only
    taken, lifted = await frames_after(pds, cursor)
    assert isinstance(taken, AccountEvent) and (taken.active, taken.status) == (False, "takendown")
    assert isinstance(lifted, AccountEvent) and (lifted.active, lifted.status) == (True, None)

    cursor = pds.seq
    await pds.set_status(did, False, "takendown")
    await pds.set_status(did, False, "deactivated")  # takedown still wins
    await gated_errors("RepoTakendown")
    await pds.set_status(did, True)  # lifts both: like a reactivation
    evs = await frames_after(pds, cursor)
    assert [type(e).__name__ for e in evs] == ["AccountEvent"] * 3 + ["IdentityEvent", "SyncEvent"]
    assert [(e.active, e.status) for e in evs if isinstance(e, AccountEvent)] == [
        (False, "takendown"),
        (False, "takendown"),
        (True, None),
    ]

    await pds.set_status(did, False, "suspended")
    await gated_errors("RepoSuspended")
    await pds.set_status(did, True)

    # deletion: #account deleted, the DID's earlier events leave the log, the repo is gone
    cursor = pds.seq
    await pds.set_status(did, False, "deleted")
    (ev,) = await frames_after(pds, cursor)
    assert isinstance(ev, AccountEvent) and ev.status == "deleted" and ev.active is False
    everything = await frames_after(pds, 0)
    mine = [f for f in everything if getattr(f, "did", getattr(f, "repo", None)) == did]
    assert mine == [ev]
    assert any(getattr(f, "did", getattr(f, "repo", None)) == other.did for f in everything)
    for method in ("getRepo", "getLatestCommit", "getRepoStatus"):
        await expect_error(http, pds, f"com.atproto.sync.{method}", "RepoNotFound", did=did)
    with pytest.raises(PdsError):
        pds.account(did)
    with pytest.raises(PdsError):
        await pds.set_status(other.did, False, "bogus")
    with pytest.raises(PdsError):
        await pds.set_status(other.did, True, "deactivated")


async def test_handles_and_well_known(pds: Pds, plc: PlcDirectory, http: aiohttp.ClientSession) -> None:
    acct = await pds.create_account("Lena")
    assert acct.handle == "lena.pds1.test"
    assert pds.handle_resolver_entry() == f"*.pds1.test={pds.url}"

    async def well_known(host: str) -> tuple[int, str, str]:
        async with http.get(f"{pds.url}/.well-known/atproto-did", headers={"Host": host}) as resp:
            return resp.status, resp.content_type, await resp.text()

    assert await well_known("lena.pds1.test") == (200, "text/plain", acct.did)
    port = pds.url.rsplit(":", 1)[1]
    assert await well_known(f"LENA.pds1.test:{port}") == (200, "text/plain", acct.did)
    assert (await well_known("nobody.pds1.test"))[0] == 404

    with pytest.raises(PdsError, match="taken"):
        await pds.create_account("lena")
    with pytest.raises(PdsError, match="invalid handle"):
        await pds.create_account("bad_handle!")

    cursor = pds.seq
    await pds.update_handle(acct.did, "lena-new")
    (ev,) = await frames_after(pds, cursor)
    assert isinstance(ev, IdentityEvent) and ev.handle == "lena-new.pds1.test"
    async with http.get(f"{plc.url}/{acct.did}") as resp:
        doc = parse_did_document(await resp.json(content_type=None))
    assert doc.handle == "lena-new.pds1.test"
    async with http.get(f"{plc.url}/{acct.did}/log/audit") as resp:
        assert len(await resp.json(content_type=None)) == 2
    assert (await well_known("lena-new.pds1.test"))[2] == acct.did
    assert (await well_known("lena.pds1.test"))[0] == 404
    other = await pds.create_account("lena")  # the old handle is free again
    assert other.did != acct.did

    await pds.set_status(acct.did, False, "deactivated")
    assert (await well_known("lena-new.pds1.test"))[0] == 404


async def test_apply_writes_validation(pds: Pds) -> None:
    acct = await pds.create_account("mike")
    rk = CLOCK.next()
    await pds.apply_writes(acct.did, [("create", POST, rk, post("a"))])
    seq = pds.seq
    bad_batches: list[list[Any]] = [
        [("create", POST, rk, post("dup"))],
        [("update", POST, "missing", post("x"))],
        [("delete", POST, "missing", None)],
        [("create", "not an nsid", "x", post("x"))],
        [("frobnicate", POST, "x", post("x"))],
        [],
        [("create", POST, CLOCK.next(), post(str(i))) for i in range(MAX_WRITES + 1)],
    ]
    for batch in bad_batches:
        with pytest.raises(PdsError):
            await pds.apply_writes(acct.did, batch)
    assert pds.seq == seq  # nothing sequenced, repo unchanged
    found = acct.get_record(POST, rk)
    assert found is not None and found[1] == post("a")
    await pds.apply_writes(
        acct.did, [("create", POST, CLOCK.next(), post(str(i))) for i in range(MAX_WRITES)]
    )
    with pytest.raises(PdsError):
        await pds.apply_writes("did:plc:" + "c" * 24, [("create", POST, "x", post("x"))])


# --- faults ---------------------------------------------------------------------------------


async def test_fault_drop_after_frames(pds: Pds) -> None:
    await pds.create_account("f1")
    await pds.create_account("f2")
    pds.faults.drop_after_frames = 3
    async with websockets.connect(ws_url(pds, 0)) as ws:
        got = []
        with pytest.raises(websockets.ConnectionClosedError):
            while True:
                got.append(await asyncio.wait_for(ws.recv(), 5))
        assert len(got) == 3
        assert ws.close_code == 1006  # dropped, no close handshake


async def test_fault_stall(pds: Pds) -> None:
    await pds.create_account("f3")
    pds.faults.stall_seconds = 0.5
    pds.faults.stall_after_frames = 2
    async with websockets.connect(ws_url(pds, 0)) as ws:
        times = []
        for _ in range(4):
            await asyncio.wait_for(ws.recv(), 5)
            times.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[1] >= 0.45 and gaps[0] < 0.3 and gaps[2] < 0.3


async def test_fault_malformed_and_oversized_frames(pds: Pds) -> None:
    await pds.create_account("f4")
    await pds.create_account("f5")
    pds.faults.malformed_every = 2
    raw = await read_raw(pds, 0, 6)
    for i, data in enumerate(raw):
        if i % 2 == 1:
            with pytest.raises(FrameError):
                decode_frame(data)
        else:
            assert getattr(decode_frame(data), "seq", None) == i + 1
    pds.faults.malformed_every = 0
    pds.faults.oversized_every = 3
    raw = await read_raw(pds, 0, 3)
    assert len(raw[2]) >= OVERSIZED_FRAME_BYTES and len(raw[0]) < 10_000
    big = decode_frame(raw[2])
    assert getattr(big, "seq", None) == 3  # well-formed, only too big


async def test_fault_seq_out_of_order_and_replayed(pds: Pds) -> None:
    await pds.create_account("f6")
    await pds.create_account("f7")
    pds.faults.seq_out_of_order_every = 3
    seqs = [getattr(decode_frame(f), "seq", None) for f in await read_raw(pds, 0, 6)]
    assert seqs == [1, 2, 1, 4, 5, 4]
    pds.faults.seq_out_of_order_every = 0
    pds.faults.seq_replay_every = 2
    raw = await read_raw(pds, 0, 6)
    seqs = [getattr(decode_frame(f), "seq", None) for f in raw]
    assert seqs == [1, 2, 2, 3, 4, 4]
    assert raw[1] == raw[2]


async def test_fault_bad_signature_and_broken_proof(
    pds: Pds, plc: PlcDirectory, http: aiohttp.ClientSession
) -> None:
    acct = await pds.create_account("f8")
    key = await plc_signing_key(http, plc, acct.did)
    pds.faults.bad_signature = True
    cursor = pds.seq
    await pds.apply_writes(acct.did, [("create", POST, CLOCK.next(), post("forged"))])
    pds.faults.bad_signature = False
    pds.faults.broken_proof = True
    await pds.apply_writes(acct.did, [("create", POST, CLOCK.next(), post("broken"))])
    pds.faults.broken_proof = False
    await pds.apply_writes(acct.did, [("create", POST, CLOCK.next(), post("fine"))])
    forged, broken, fine = await frames_after(pds, cursor)
    assert (
        isinstance(forged, CommitEvent) and isinstance(broken, CommitEvent) and isinstance(fine, CommitEvent)
    )
    res = process_commit(forged, signing_key=key)
    assert res.signature is False and res.reasons == ["bad-signature"] and res.proof is True
    res = process_commit(broken, signing_key=key)
    assert res.signature is True and res.proof is False and "proof-mismatch" in res.reasons
    assert process_commit(fine, signing_key=key).ok
    # the stored repo is intact
    assert len(await repo_records(http, pds, acct, key)) == 3


async def test_fault_http_errors_and_slowness(pds: Pds, http: aiohttp.ClientSession) -> None:
    acct = await pds.create_account("f9")
    pds.faults.http_429_every = 2
    pds.faults.retry_after_seconds = 3
    pds.faults.reset_counters()
    statuses = []
    for _ in range(4):
        async with http.get(
            f"{pds.url}/xrpc/com.atproto.sync.getLatestCommit", params={"did": acct.did}
        ) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                body = await resp.json()
                assert body["error"] == "RateLimitExceeded"
                assert resp.headers["Retry-After"] == "3"
                assert int(resp.headers["RateLimit-Remaining"]) == 0
                assert int(resp.headers["RateLimit-Reset"]) >= int(time.time())
                assert "RateLimit-Limit" in resp.headers
    assert statuses == [200, 429, 200, 429]
    pds.faults.http_429_every = 0
    pds.faults.http_500_every = 1
    status, body, _ = await xrpc(http, pds, "com.atproto.sync.getLatestCommit", did=acct.did)
    assert status == 500 and body["error"] == "InternalServerError"
    pds.faults.http_500_every = 0
    pds.faults.slow_response_ms = 300
    start = time.monotonic()
    status, _, _ = await xrpc(http, pds, "com.atproto.sync.getLatestCommit", did=acct.did)
    assert status == 200 and time.monotonic() - start >= 0.28


async def test_fault_repo_cars(pds: Pds, http: aiohttp.ClientSession) -> None:
    acct = await pds.create_account(
        "f10", records={f"{POST}/{CLOCK.next()}": post(str(i)) for i in range(10)}
    )
    _, good, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did)
    assert verify_repo(good).ok
    pds.faults.car_truncate = True
    _, car, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did)
    assert len(car) < len(good)
    with pytest.raises(RepoError, match="not a valid CAR"):
        verify_repo(car)
    pds.faults.car_truncate = False
    pds.faults.car_corrupt = True
    _, car, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did)
    assert len(car) == len(good)
    with pytest.raises(RepoError, match=r"hash|match"):
        verify_repo(car)
    read_car(car, verify=False)  # framing intact: only a hash is wrong
    pds.faults.car_corrupt = False
    pds.faults.car_oversized_bytes = 1_500_000
    _, car, _ = await xrpc(http, pds, "com.atproto.sync.getRepo", did=acct.did)
    assert len(car) > 1_500_000
    assert verify_repo(car).ok  # valid, just huge: a size cap must catch it
    with pytest.raises(RepoError):
        verify_repo_stream([car], max_total_size=1_000_000)


async def test_shared_faults_object(plc: PlcDirectory, http: aiohttp.ClientSession) -> None:
    faults = Faults.parse("http_500_every=1")
    async with Pds(plc.url, hostname="pds5.test", faults=faults) as pds:
        assert pds.faults is faults
        status, _, _ = await xrpc(http, pds, "com.atproto.sync.listRepos")
        assert status == 500
        faults.http_500_every = 0
        status, _, _ = await xrpc(http, pds, "com.atproto.sync.listRepos")
        assert status == 200


# --- the sequencer on its own ------------------------------------------------------------------


def test_sequencer_log_retain_and_purge() -> None:
    seq = Sequencer(retain=5)

    def ident(did: str) -> Any:
        return lambda s, t: encode_frame("#identity", identity_body(seq=s, did=did, time=t))

    for i in range(8):
        assert (
            seq.append(ident(f"did:plc:{'a' if i % 2 else 'b'}{'x' * 23}"), did="a" if i % 2 else "b")
            == i + 1
        )
    assert seq.seq == 8 and seq.oldest == 4 and len(seq) == 5
    assert [s for s, _ in seq.frames_after(0)] == [4, 5, 6, 7, 8]
    assert [s for s, _ in seq.frames_after(5, limit=2)] == [6, 7]
    assert seq.purge("a", keep=8) == 2  # 4 and 6
    assert [s for s, _ in seq.frames_after(0)] == [5, 7, 8]
    assert [s for s, _ in seq.frames_after(0, limit=2)] == [5, 7]
    assert seq.frame(6) is None and seq.frame(7) is not None
    frame = seq.frame(8)
    assert frame is not None
    decoded = decode_frame(frame)
    assert isinstance(decoded, IdentityEvent) and decoded.seq == 8
    moved = decode_frame(replace_seq(frame, 42))
    assert isinstance(moved, IdentityEvent) and moved.seq == 42 and moved.did == decoded.did
    big = oversize_frame(frame, 100_000)
    assert len(big) >= 100_000 and getattr(decode_frame(big), "seq", None) == 8
    with pytest.raises(ValueError):
        Sequencer(retain=0)
