"""A whole devnet with a seeded workload, checked end to end with standard clients.

The workload's manifest is the oracle: replaying the relay's firehose from cursor 0 (every
commit verified with the signing key from the PLC document, every proof checked) and applying
it must reproduce the manifest exactly; so must fetching every repository with ``getRepo``
through the relay's redirect. Blobs, handles and labels are checked the same way.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import websockets

from psky.atproto import cbor
from psky.atproto.cbor import CID
from psky.atproto.did import DidDocument, parse_did_document
from psky.atproto.firehose import (
    AccountEvent,
    CommitEvent,
    IdentityEvent,
    SyncEvent,
    decode_frame,
    process_commit,
    process_sync,
)
from psky.atproto.label import LabelsMessage, decode_labels_frame
from psky.atproto.repo import verify_repo
from psky.devnet.manifest import Manifest
from psky.devnet.network import Devnet
from psky.devnet.workload import WorkloadError, WriteBatch, post_record, record_cid

if TYPE_CHECKING:
    from tests.devnet_fixtures import SeededDevnet

pytest_plugins = ("tests.devnet_fixtures",)

SEED_ACCOUNTS = 40  # tests.devnet_fixtures.SEED_ACCOUNTS (not imported: pytest loads it as a plugin)

_ERROR_FOR_STATUS = {
    "deactivated": "RepoDeactivated",
    "takendown": "RepoTakendown",
    "suspended": "RepoSuspended",
    "deleted": "RepoNotFound",
}


def ws_url(http_url: str, path: str) -> str:
    return http_url.replace("http://", "ws://", 1) + path


async def did_docs(plc_url: str, dids: list[str]) -> dict[str, DidDocument]:
    async with aiohttp.ClientSession() as session:

        async def one(did: str) -> DidDocument:
            async with session.get(f"{plc_url}/{did}") as resp:
                assert resp.status == 200, did
                return parse_did_document(await resp.json(content_type=None), did)

        docs = await asyncio.gather(*(one(d) for d in dids))
    return dict(zip(dids, docs, strict=True))


async def read_frames(url: str, last_seq: int, decode: Any) -> list[Any]:
    """Every message of a subscription from cursor 0 up to ``last_seq``."""
    out = []
    async with websockets.connect(url, max_size=None) as ws:
        while True:
            msg = await asyncio.wait_for(ws.recv(), timeout=15)
            assert isinstance(msg, bytes)
            frame = decode(msg)
            out.append(frame)
            if getattr(frame, "seq", 0) >= last_seq:
                return out


def blob_cids(value: Any) -> list[str]:
    if isinstance(value, dict):
        if value.get("$type") == "blob":
            return [value["ref"]["$link"]]
        return [c for v in value.values() for c in blob_cids(v)]
    if isinstance(value, list):
        return [c for v in value for c in blob_cids(v)]
    return []


# --- the network itself --------------------------------------------------------------------------


async def test_endpoints_and_handle_resolution(seeded_devnet: SeededDevnet) -> None:
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    ep = net.endpoints()
    assert ep["plc"] == net.plc.url and ep["relay"] == net._relay().url
    assert ep["pds"] == [p.url for p in net.pdses] and len(ep["pds"]) == 2
    assert ep["pds_hostnames"] == {"pds1.test": net.pdses[0].url, "pds2.test": net.pdses[1].url}
    assert ep["labeler_did"].startswith("did:plc:") and ep["labeler"].startswith("http://127.0.0.1:")
    assert ep["handle_resolver_map"] == f"*.pds1.test={net.pdses[0].url},*.pds2.test={net.pdses[1].url}"
    assert ep["relay_firehose"].endswith("/xrpc/com.atproto.sync.subscribeRepos")
    routes = dict(entry.split("=", 1) for entry in net.handle_resolver_map().split(","))
    async with aiohttp.ClientSession() as session:
        for did, acct in manifest.accounts.items():
            suffix = "*." + acct.handle.split(".", 1)[1]
            async with session.get(f"{routes[suffix]}/.well-known/atproto-did", headers={"Host": acct.handle}) as r:
                if acct.status == "active":
                    assert r.status == 200 and (await r.text()).strip() == did
                else:  # like the reference PDS: only active accounts' handles resolve
                    assert r.status == 404
            async with session.get(f"{net.plc.url}/{did}") as r:
                doc = parse_did_document(await r.json(content_type=None), did)
            assert doc.handle == acct.handle and doc.pds_endpoint == acct.pds


async def test_seeded_manifest_has_the_expected_shape(seeded_devnet: SeededDevnet) -> None:
    m, wl = seeded_devnet.manifest, seeded_devnet.workload
    assert len(m.accounts) >= SEED_ACCOUNTS
    counts = m.counts()
    assert counts["app.bsky.feed.post"] > 200 and counts["app.bsky.feed.like"] > 300
    assert counts["deleted"] > 0 and counts["labels"] > 0
    assert {a.pds for a in m.accounts.values()} == {p.url for p in seeded_devnet.net.pdses}
    assert wl.stats["blobs"] > 0 and wl.stats["commits"] > 0 and wl.stats["handle_changes"] > 0
    statuses = {a.status for a in m.accounts.values()}
    assert {"active", "deactivated", "takendown", "suspended", "deleted"} <= statuses
    for pds in seeded_devnet.net.pdses:  # the PDS holds exactly the manifest's accounts
        hosted = {a.did for a in pds.accounts()}
        expected = {d for d, a in m.accounts.items() if a.pds == pds.url and a.status != "deleted"}
        assert hosted == expected


# --- (a) the relay firehose reproduces the manifest -----------------------------------------


async def test_firehose_replay_reproduces_the_manifest(seeded_devnet: SeededDevnet) -> None:
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    last = await net.settle()
    relay = net._relay()
    frames = await read_frames(ws_url(relay.url, "/xrpc/com.atproto.sync.subscribeRepos?cursor=0"), last,
                               decode_frame)
    docs = await did_docs(net.plc.url, list(manifest.accounts))
    built = Manifest()
    data: dict[str, CID] = {}
    seqs = []
    kinds: dict[str, int] = {}
    for ev in frames:
        kinds[type(ev).__name__] = kinds.get(type(ev).__name__, 0) + 1
        seqs.append(ev.seq)
        if isinstance(ev, IdentityEvent):
            if ev.did not in built.accounts:
                built.add_account(ev.did, ev.handle or "", docs[ev.did].pds_endpoint or "")
            elif ev.handle is not None:
                built.set_handle(ev.did, ev.handle)
        elif isinstance(ev, AccountEvent):
            built.set_status(ev.did, "active" if ev.active else (ev.status or "deactivated"))
        elif isinstance(ev, SyncEvent):
            sync = process_sync(ev, signing_key=docs[ev.did].signing_key)
            assert sync.ok and sync.signature, (ev.did, sync.reasons)
            assert sync.commit is not None
            data[ev.did] = sync.commit.data
        else:
            assert isinstance(ev, CommitEvent), ev
            res = process_commit(ev, signing_key=docs[ev.repo].signing_key)
            assert res.ok and res.signature is True, (ev.seq, res.errors)
            if ev.prev_data is not None:  # sync 1.1: chained to the previous commit, proof checked
                assert res.proof is True and ev.prev_data == data.get(ev.repo)
            assert res.data is not None
            data[ev.repo] = res.data
            built.apply_ops(ev.repo, [(op.action, op.path, op.cid.encode() if op.cid else None, op.record)
                                      for op in res.ops])
    assert seqs == list(range(1, last + 1))
    assert set(kinds) == {"IdentityEvent", "AccountEvent", "SyncEvent", "CommitEvent"}
    assert manifest.diff(built, fields=("accounts", "handle", "pds", "status", "records", "deleted")) == []
    assert built.records() == manifest.records()


# --- (b) getRepo through the relay reproduces the manifest ------------------------------------


async def test_get_repo_through_the_relay_reproduces_the_manifest(seeded_devnet: SeededDevnet) -> None:
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    relay = net._relay()
    docs = await did_docs(net.plc.url, list(manifest.accounts))
    fetched = Manifest()
    async with aiohttp.ClientSession() as session:
        for did, acct in manifest.accounts.items():
            async with session.get(f"{relay.url}/xrpc/com.atproto.sync.getRepo", params={"did": did}) as resp:
                assert [h.status for h in resp.history] == [302]
                assert str(resp.url).startswith(acct.pds + "/xrpc/com.atproto.sync.getRepo")
                if acct.status != "active":
                    assert resp.status == 400
                    assert (await resp.json())["error"] == _ERROR_FOR_STATUS[acct.status]
                    continue
                assert resp.status == 200 and resp.content_type == "application/vnd.ipld.car"
                car = await resp.read()
            repo = verify_repo(car, did=did, signing_key=docs[did].signing_key)
            assert repo.ok, (did, repo.mst_error, repo.signature_error)
            got = fetched.add_account(did, acct.handle, acct.pds)
            for rec in repo.records():
                assert rec.value is not None
                got.records[f"at://{did}/{rec.path}"] = {"cid": rec.cid.encode(), "value": rec.value}
    active = Manifest()
    for did, acct in manifest.accounts.items():
        if acct.status == "active":
            active.add_account(did, acct.handle, acct.pds).records.update(acct.records)
    assert active.diff(fetched, fields=("accounts", "records")) == []
    assert len(fetched.accounts) >= SEED_ACCOUNTS // 2


async def test_every_referenced_blob_is_served(seeded_devnet: SeededDevnet) -> None:
    manifest = seeded_devnet.manifest
    wanted = {(did, cid) for did, acct in manifest.accounts.items() if acct.status == "active"
              for rec in acct.records.values() for cid in blob_cids(rec["value"])}
    assert len(wanted) > 20
    async with aiohttp.ClientSession() as session:
        for did, cid in sorted(wanted):
            pds = manifest.accounts[did].pds
            async with session.get(f"{pds}/xrpc/com.atproto.sync.getBlob", params={"did": did, "cid": cid}) as r:
                assert r.status == 200, (did, cid)
                assert cbor.cid_for_raw(await r.read()).encode() == cid


async def test_labels_replay_matches_the_manifest(seeded_devnet: SeededDevnet) -> None:
    net, manifest = seeded_devnet.net, seeded_devnet.manifest
    labeler = net.labeler
    assert labeler is not None
    doc = (await did_docs(net.plc.url, [labeler.did]))[labeler.did]
    assert doc.labeler_key is not None
    frames = await read_frames(ws_url(labeler.url, "/xrpc/com.atproto.label.subscribeLabels?cursor=0"),
                               labeler.seq, decode_labels_frame)
    latest: dict[tuple[str, str, str | None, str], tuple[bool, str | None]] = {}
    for msg in frames:
        assert isinstance(msg, LabelsMessage)
        for label in msg.labels:
            assert label.verify(doc.labeler_key) and label.ver == 1
            latest[(label.src, label.uri, label.cid, label.val)] = (label.neg, label.exp)
    expected = {k: (v["neg"], v.get("exp")) for k, v in manifest.latest_labels().items()}
    assert latest == expected
    assert any(neg for neg, _ in latest.values()) and any(exp for _, exp in latest.values())


# --- workload behaviour on a live network -----------------------------------------------------


async def test_workload_is_deterministic_across_networks() -> None:
    manifests = []
    for _ in range(2):
        async with Devnet(n_pds=2, seed=21) as net:
            wl = net.workload()
            await wl.seed(accounts=15, records_per_account=12)
            await wl.live(rate=None, events=150)
            manifests.append(wl.manifest)
    a, b = manifests
    assert a.diff(b) != []  # other ports, hence other DIDs and CIDs ...
    assert a.normalized().diff(b.normalized()) == []  # ... and nothing else


async def test_live_rate_and_event_count(devnet: Devnet) -> None:
    wl = devnet.workload(seed=5)
    await wl.seed(accounts=5, records_per_account=4, labels=0, churn=0)
    t0 = time.monotonic()
    n = await wl.live(rate=100.0, events=30)
    elapsed = time.monotonic() - t0
    assert n == 30 and elapsed >= 0.28
    n = await wl.live(rate=None, duration=0.2)
    assert n > 30
    with pytest.raises(ValueError):
        await wl.live(rate=10.0)
    with pytest.raises(ValueError):
        await wl.live(rate=0, events=1)
    await devnet.settle()


async def test_workload_checks_what_the_pds_acknowledges(devnet: Devnet) -> None:
    wl = devnet.workload(seed=6)
    await wl.seed(accounts=2, records_per_account=2, labels=0, churn=0)
    index = 0
    rec = post_record(random.Random(1), "2024-11-01T00:00:00.000Z")
    good = record_cid(rec)
    wrong = record_cid({**rec, "text": rec["text"] + "!"})
    batch = WriteBatch(index, (("create", "app.bsky.feed.post", "3k2aaaaaaaaaa", rec),), (wrong,))
    with pytest.raises(WorkloadError, match=good):
        await wl.apply(batch)


async def test_seeding_a_larger_network_settles(devnet: Devnet) -> None:
    """200 accounts x 50 records seed and the relay catches up (speed: benchmarks/bench_devnet.py)."""
    wl = devnet.workload(seed=8)
    await wl.seed(accounts=200, records_per_account=50)
    assert wl.stats["writes"] > 9000
    await devnet.settle(timeout_s=120)


async def test_fixtures_and_factory(module_devnet: Devnet, make_devnet: Any) -> None:
    assert len(module_devnet.pdses) == 2 and module_devnet.relay is not None
    async with make_devnet(n_pds=3, labeler=False) as net:
        ep = net.endpoints()
        assert [urlsplit(u).hostname for u in ep["pds"]] == ["127.0.0.1"] * 3
        assert "labeler" not in ep and net.labeler is None
        assert list(ep["pds_hostnames"]) == ["pds1.test", "pds2.test", "pds3.test"]
        wl = net.workload(seed=2)
        await wl.seed(accounts=6, records_per_account=3)  # labels are skipped without a labeler
        assert wl.stats["labels"] == 0 and {a.pds for a in wl.manifest.accounts.values()} == set(ep["pds"])
    with pytest.raises(ValueError):
        Devnet(n_pds=0)
