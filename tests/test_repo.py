"""Whole repositories: build → verify round trips, tampering, streaming, RepoWriter commits."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from psky.atproto import cbor
from psky.atproto.car import iter_car, read_car, write_car
from psky.atproto.cbor import CID
from psky.atproto.commit import Commit, sign_commit
from psky.atproto.crypto import PrivateKey
from psky.atproto.mst import MST, invert_ops, walk
from psky.atproto.repo import (
    RepoError,
    RepoWriter,
    averify_repo_stream,
    build_repo,
    export_blocks,
    verify_repo,
    verify_repo_stream,
)

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
OTHER_DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
BLOB = {
    "$type": "blob",
    "ref": {"$link": "bafkreibwhdjd2rq4wfmeh4ycg2om46c7ver4f22gh7xzxnh4ovo2swanlq"},
    "mimeType": "image/jpeg",
    "size": 15444,
}


def _tid(i: int) -> str:
    """Deterministic, valid, increasing TIDs."""
    alphabet = "234567abcdefghijklmnopqrstuvwxyz"
    n = 1_700_000_000_000_000 * 1024 + i * 7919
    out = ""
    for _ in range(13):
        out = alphabet[n & 31] + out
        n >>= 5
    return out


def _records(n: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    rnd = random.Random(seed)
    out: dict[str, dict[str, Any]] = {
        "app.bsky.actor.profile/self": {
            "$type": "app.bsky.actor.profile",
            "displayName": "Alice",
            "avatar": BLOB,
        }
    }
    for i in range(n):
        coll = rnd.choice(["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow"])
        rec: dict[str, Any] = {"$type": coll, "createdAt": "2024-05-01T12:00:00.000Z", "n": i}
        if coll == "app.bsky.feed.post":
            rec["text"] = f"post number {i} " + "x" * rnd.randrange(60)
            rec["facets"] = [{"index": {"byteStart": 0, "byteEnd": 4}, "raw": {"$bytes": "AAEC"}}]
        else:
            rec["subject"] = {"uri": f"at://{OTHER_DID}/app.bsky.feed.post/{_tid(i)}", "cid": "bafyreia"}
        out[f"{coll}/{_tid(i)}"] = rec
    return out


@pytest.fixture(scope="module", params=["k256", "p256"])
def key(request: pytest.FixtureRequest) -> PrivateKey:
    return PrivateKey.generate(request.param)


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return _records(300)


# --- build → verify -----------------------------------------------------------------------


def test_build_verify_round_trip(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    commit_cid, car = build_repo(DID, key, records, rev=_tid(10_000))
    repo = verify_repo(car, did=DID, signing_key=key.did_key())
    assert repo.ok and repo.mst_ok and repo.mst_error is None
    assert repo.signature_valid is True
    assert repo.commit_cid == commit_cid
    assert repo.did == DID and repo.rev == _tid(10_000)
    assert repo.commit.version == 3 and repo.commit.prev is None
    assert repo.missing_blocks == [] and repo.missing_records == [] and repo.invalid_paths == []
    assert repo.block_count == len(read_car(car).blocks)
    assert repo.record_count == len(records)
    expected_counts: dict[str, int] = {}
    for path in records:
        c = path.split("/")[0]
        expected_counts[c] = expected_counts.get(c, 0) + 1
    assert repo.counts == expected_counts
    got = {r.path: r.value for r in repo.records()}
    assert got == records  # lex JSON survives ($link, $bytes, blobs)
    assert [r.path for r in repo.records()] == sorted(records)
    # every record CID is the CID of the canonical encoding of the record
    for r in repo.records():
        assert r.cid == cbor.cid_for_cbor(cbor.encode_lex(records[r.path]))


def test_no_key_means_signature_not_checked(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    _, car = build_repo(DID, key, records)
    repo = verify_repo(car)
    assert repo.signature_valid is None and repo.ok


def test_wrong_key_reports_bad_signature(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    _, car = build_repo(DID, key, records)
    repo = verify_repo(car, signing_key=PrivateKey.generate(key.curve).did_key())
    assert repo.signature_valid is False and not repo.ok
    assert repo.signature_error is not None
    # an unusable key string is reported the same way, not raised
    repo = verify_repo(car, signing_key="did:key:zBAD")
    assert repo.signature_valid is False and "key" in (repo.signature_error or "")


def test_wrong_did_is_rejected(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    _, car = build_repo(DID, key, records)
    with pytest.raises(RepoError, match="expected"):
        verify_repo(car, did=OTHER_DID)


def test_block_order_is_commit_then_preorder(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    commit_cid, car = build_repo(DID, key, records)
    order = [cid for cid, _ in iter_car(car)]
    assert order[0] == commit_cid
    blocks = read_car(car).blocks
    commit = Commit.decode(blocks[commit_cid])
    assert order[1] == commit.data
    # pre-order: every MST node comes before its children and before its records,
    # and records appear in key order
    pos = {cid: i for i, cid in enumerate(order)}
    entries = list(walk(blocks, commit.data))
    record_positions = [pos[cid] for _, cid in entries]
    assert record_positions == sorted(record_positions)
    for cid, data in blocks.items():
        if cid == commit_cid or (cid != commit.data and not _is_node(data)):
            continue
        node = cbor.decode(data)
        children = [node["l"]] + [e["t"] for e in node["e"]] + [e["v"] for e in node["e"]]
        for child in children:
            if child is not None:
                assert pos[child] > pos[cid]
    assert len(order) == len(blocks)  # no duplicates


def _is_node(data: bytes) -> bool:
    obj = cbor.decode(data)
    return isinstance(obj, dict) and set(obj) == {"e", "l"}


def test_export_blocks_of_empty_repo(key: PrivateKey) -> None:
    commit_cid, car = build_repo(DID, key, {})
    repo = verify_repo(car, signing_key=key.did_key())
    assert repo.ok and repo.record_count == 0 and repo.counts == {}
    assert [cid for cid, _ in iter_car(car)] == [commit_cid, repo.commit.data]


def test_duplicate_record_values_are_exported_once(key: PrivateKey) -> None:
    rec = {"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00.000Z"}
    paths = [f"app.bsky.feed.like/{_tid(i)}" for i in range(5)]
    _, car = build_repo(DID, key, dict.fromkeys(paths, rec))
    cids = [cid for cid, _ in iter_car(car)]
    assert len(cids) == len(set(cids))
    repo = verify_repo(car)
    assert repo.ok and [r.path for r in repo.records()] == paths


def test_build_rejects_bad_input(key: PrivateKey) -> None:
    with pytest.raises(RepoError, match="path"):
        build_repo(DID, key, {"not a path": {"a": 1}})
    with pytest.raises(RepoError, match="path"):
        build_repo(DID, key, {"app.bsky.feed.post/..": {"a": 1}})
    with pytest.raises(RepoError, match="object"):
        build_repo(DID, key, {"app.bsky.feed.post/abc": ["list"]})  # type: ignore[dict-item]
    with pytest.raises(RepoError, match="valid atproto data"):
        build_repo(DID, key, {"app.bsky.feed.post/abc": {"f": 1.5}})
    with pytest.raises(RepoError):
        build_repo("not-a-did", key, {})
    with pytest.raises(RepoError):
        build_repo(DID, key, {}, rev="nope")


# --- tampering ----------------------------------------------------------------------------


def _rebuild(roots: list[CID], blocks: list[tuple[CID, bytes]]) -> bytes:
    return write_car(roots, blocks)


def test_changed_record_bytes_fail_hash_check(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    commit_cid, car = build_repo(DID, key, records)
    items = list(iter_car(car))
    repo = verify_repo(car)
    target = next(cid for path, cid in repo.entries if path.startswith("app.bsky.feed.post/"))
    tampered = [(c, b.replace(b"post number", b"POST NUMBER") if c == target else b) for c, b in items]
    assert tampered != items
    with pytest.raises(RepoError, match="sha-256"):
        verify_repo(_rebuild([commit_cid], tampered))


def test_removed_mst_node_reports_mst_error(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    commit_cid, car = build_repo(DID, key, records)
    blocks = read_car(car).blocks
    commit = Commit.decode(blocks[commit_cid])
    root = cbor.decode(blocks[commit.data])
    child = root["l"] or next(e["t"] for e in root["e"] if e["t"] is not None)
    items = [(c, b) for c, b in iter_car(car) if c != child]
    repo = verify_repo(_rebuild([commit_cid], items), signing_key=key.did_key())
    assert not repo.mst_ok and not repo.ok
    assert repo.mst_error is not None and child.encode() in repo.mst_error
    assert repo.signature_valid is True
    assert repo.record_count < len(records)


def test_removed_record_block_is_reported(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    commit_cid, car = build_repo(DID, key, records)
    repo = verify_repo(car)
    path, gone = repo.entries[7]
    items = [(c, b) for c, b in iter_car(car) if c != gone]
    repo = verify_repo(_rebuild([commit_cid], items))
    assert repo.mst_ok and not repo.ok
    assert repo.missing_records == [(path, gone)] and repo.missing_blocks == [gone]
    assert path not in {r.path for r in repo.records()}
    assert sum(1 for _ in repo.records()) == len(records) - 1


def test_malformed_record_blocks_are_reported_per_record(key: PrivateKey) -> None:
    good = cbor.encode_lex({"$type": "app.bsky.feed.post", "text": "ok"})
    not_map = cbor.encode("just a string")
    entries = {
        f"app.bsky.feed.post/{_tid(1)}": good,
        f"app.bsky.feed.post/{_tid(2)}": not_map,
    }
    leaves = {cbor.cid_for_cbor(b): b for b in entries.values()}
    tree = MST.from_entries([(p, cbor.cid_for_cbor(b)) for p, b in entries.items()])
    commit_cid, commit_block = sign_commit(DID, tree.root_cid(), _tid(3), key)
    car = write_car([commit_cid], export_blocks(commit_cid, commit_block, tree.blocks(), leaves))
    repo = verify_repo(car)
    recs = list(repo.records())
    assert [r.error is None for r in recs] == [True, False]
    assert recs[1].value is None and "map" in (recs[1].error or "")


def test_invalid_paths_are_reported(key: PrivateKey) -> None:
    rec = cbor.encode_lex({"a": 1})
    cid = cbor.cid_for_cbor(rec)
    tree = MST.from_entries([("app.bsky.feed.post/abc", cid), ("notannsid/abc", cid)])
    commit_cid, commit_block = sign_commit(DID, tree.root_cid(), _tid(3), key)
    car = write_car([commit_cid], export_blocks(commit_cid, commit_block, tree.blocks(), {cid: rec}))
    repo = verify_repo(car)
    assert repo.invalid_paths == ["notannsid/abc"] and not repo.ok
    assert repo.counts == {"app.bsky.feed.post": 1}
    assert [r.path for r in repo.records()] == ["app.bsky.feed.post/abc"]


@pytest.mark.parametrize(
    ("car", "message"),
    [
        (b"", "CAR"),
        (b"not a car at all", "CAR"),
        (write_car([], []), "no root"),
    ],
)
def test_unusable_input_raises(car: bytes, message: str) -> None:
    with pytest.raises(RepoError, match=message):
        verify_repo(car)


def test_root_must_be_present_and_a_commit(key: PrivateKey) -> None:
    rec = cbor.encode_lex({"a": 1})
    cid = cbor.cid_for_cbor(rec)
    with pytest.raises(RepoError, match="not among its blocks"):
        verify_repo(write_car([cid], []))
    with pytest.raises(RepoError, match="not a commit"):
        verify_repo(write_car([cid], [(cid, rec)]))


def test_commit_for_unsigned_or_v2_shapes(key: PrivateKey) -> None:
    # a v2 commit (no rev) over an empty tree still verifies
    tree = MST.empty()
    unsigned = {"did": DID, "version": 2, "data": tree.root_cid(), "prev": None}
    block = cbor.encode({**unsigned, "sig": key.sign(cbor.encode(unsigned))})
    cid = cbor.cid_for_cbor(block)
    repo = verify_repo(write_car([cid], [(cid, block), *tree.blocks().items()]), signing_key=key.did_key())
    assert repo.ok and repo.rev is None and repo.signature_valid


# --- streaming ----------------------------------------------------------------------------


def _chunks(data: bytes, seed: int) -> Iterator[bytes]:
    rnd = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rnd.randrange(1, 5000)
        yield data[pos : pos + n]
        pos += n


def test_stream_variants_match_in_memory(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    _, car = build_repo(DID, key, records)
    a = verify_repo(car, signing_key=key.did_key())
    b = verify_repo_stream(_chunks(car, 1), signing_key=key.did_key())

    async def agen() -> AsyncIterator[bytes]:
        for chunk in _chunks(car, 2):
            yield chunk

    c = asyncio.run(averify_repo_stream(agen(), signing_key=key.did_key()))
    for other in (b, c):
        assert other.ok and other.signature_valid
        assert other.entries == a.entries and other.counts == a.counts
        assert [r.value for r in other.records()] == [r.value for r in a.records()]


def test_stream_errors_become_repo_errors(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    _, car = build_repo(DID, key, records)
    with pytest.raises(RepoError, match="CAR"):
        verify_repo_stream(iter([car[: len(car) // 2]]))
    with pytest.raises(RepoError, match="maximum total size"):
        verify_repo_stream(iter([car]), max_total_size=1000)


def test_records_release_frees_blocks(key: PrivateKey, records: dict[str, dict[str, Any]]) -> None:
    _, car = build_repo(DID, key, records)
    repo = verify_repo_stream(iter([car]))
    it = repo.records(release=True)
    first = next(it)
    assert repo.get_block(first.cid) is None or first.cid in {c for _, c in repo.entries[1:]}
    rest = list(it)
    assert 1 + len(rest) == len(records)
    assert repo._blocks == {}


# --- RepoWriter -----------------------------------------------------------------------------


def _post(text: str) -> dict[str, Any]:
    return {"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-05-01T12:00:00.000Z"}


def _check_commit(w: RepoWriter, res: Any, key: PrivateKey) -> None:
    """The CAR slice verifies, holds the commit and records, and inverts to prev_data."""
    car = read_car(res.blocks)
    assert car.roots == [res.commit_cid]
    assert next(iter(iter_car(res.blocks)))[0] == res.commit_cid  # commit first
    commit = Commit.decode(car.blocks[res.commit_cid])
    assert commit.verify(key.did_key()) and commit.did == w.did and commit.rev == res.rev
    assert commit.data == res.data == w.data
    for op in res.ops:
        if op.cid is not None:
            assert op.cid in car.blocks
    if res.prev_data is not None:
        assert invert_ops(car.blocks, res.data, res.ops) == res.prev_data


def test_writer_commits_invert_and_export(key: PrivateKey) -> None:
    w = RepoWriter(DID, key)
    assert w.initial.ops == () and w.initial.since is None and w.initial.prev_data is None
    assert verify_repo(w.initial.blocks, signing_key=key.did_key()).ok
    expected: dict[str, dict[str, Any]] = {}
    rnd = random.Random(5)
    i = 0
    for _ in range(40):
        writes: list[tuple[str, str, str, dict[str, Any] | None]] = []
        touched: set[str] = set()
        for _ in range(rnd.randrange(1, 6)):
            roll = rnd.random()
            existing = [p for p in expected if p not in touched]
            if roll < 0.6 or not existing:
                i += 1
                path = f"app.bsky.feed.post/{_tid(i)}"
                writes.append(("create", "app.bsky.feed.post", _tid(i), _post(f"p{i}")))
                expected[path] = _post(f"p{i}")
            elif roll < 0.8:
                path = rnd.choice(existing)
                writes.append(("update", *path.split("/"), _post(f"u{i}")))  # type: ignore[arg-type]
                expected[path] = _post(f"u{i}")
            else:
                path = rnd.choice(existing)
                writes.append(("delete", *path.split("/"), None))  # type: ignore[arg-type]
                del expected[path]
            touched.add(path)
        before_rev, before_data = w.rev, w.data
        res = w.apply_writes(writes)
        assert res.since == before_rev and res.prev_data == before_data and res.rev > before_rev
        assert [(o.action, o.path) for o in res.ops] == [(a, f"{c}/{r}") for a, c, r, _ in writes]
        _check_commit(w, res, key)
    exported = verify_repo(w.export_car(), did=DID, signing_key=key.did_key())
    assert exported.ok
    assert {r.path: r.value for r in exported.records()} == expected
    # same contents built from scratch → same tree
    _, rebuilt = build_repo(DID, key, expected, rev=w.rev)
    assert verify_repo(rebuilt).commit.data == w.data


def test_writer_update_and_delete_carry_prev(key: PrivateKey) -> None:
    w = RepoWriter(DID, key, {"app.bsky.feed.post/aaa": _post("one")})
    assert [o.action for o in w.initial.ops] == ["create"]
    old = w.get_record("app.bsky.feed.post", "aaa")
    assert old is not None and old[1] == _post("one")
    res = w.apply_writes([("update", "app.bsky.feed.post", "aaa", _post("two"))])
    (op,) = res.ops
    assert op.prev == old[0] and op.cid != old[0]
    res = w.apply_writes([("delete", "app.bsky.feed.post", "aaa", None)])
    (op,) = res.ops
    assert op.cid is None and op.prev is not None
    assert w.get_record("app.bsky.feed.post", "aaa") is None
    _check_commit(w, res, key)
    assert w.entries() == []


@pytest.mark.parametrize(
    ("writes", "message"),
    [
        ([("create", "app.bsky.feed.post", "aaa", {"$type": "x"})], "exists"),
        ([("update", "app.bsky.feed.post", "zzz", {"$type": "x"})], "no such record"),
        ([("delete", "app.bsky.feed.post", "zzz", None)], "no such record"),
        ([("delete", "app.bsky.feed.post", "aaa", {"$type": "x"})], "takes no record"),
        ([("create", "app.bsky.feed.post", "new", None)], "needs a record"),
        ([("upsert", "app.bsky.feed.post", "new", {"$type": "x"})], "unknown write action"),
        ([("create", "bad collection", "new", {"$type": "x"})], "invalid record path"),
        ([("create", "app.bsky.feed.post", "..", {"$type": "x"})], "invalid record path"),
        (
            [
                ("create", "app.bsky.feed.post", "new", {"$type": "x"}),
                ("delete", "app.bsky.feed.post", "new", None),
            ],
            "twice",
        ),
        (
            [
                ("create", "app.bsky.feed.post", "ok1", {"$type": "x"}),
                ("create", "app.bsky.feed.post", "bad", {"f": 0.5}),
            ],
            "valid atproto data",
        ),
    ],
)
def test_writer_rejects_bad_batches_atomically(writes: Any, message: str) -> None:
    key = PrivateKey.generate("k256")
    w = RepoWriter(DID, key, {"app.bsky.feed.post/aaa": _post("one")})
    state = (w.rev, w.data, w.commit_cid, w.entries())
    with pytest.raises(RepoError, match=message):
        w.apply_writes(writes)
    assert (w.rev, w.data, w.commit_cid, w.entries()) == state


def test_writer_rev_must_increase() -> None:
    w = RepoWriter(DID, PrivateKey.generate("k256"))
    with pytest.raises(RepoError, match="sorting after"):
        w.apply_writes([], rev="2222222222222")
    with pytest.raises(RepoError, match="sorting after"):
        w.apply_writes([], rev="not-a-tid")
    res = w.resign()
    assert res.ops == () and res.prev_data == res.data


def test_writer_from_car_resumes(key: PrivateKey) -> None:
    w = RepoWriter(DID, key, _records(20))
    w.apply_writes([("create", "app.bsky.feed.post", "resume1", _post("x"))])
    w2 = RepoWriter.from_car(w.export_car(), key)
    assert (w2.did, w2.rev, w2.data, w2.commit_cid) == (w.did, w.rev, w.data, w.commit_cid)
    res = w2.apply_writes([("delete", "app.bsky.feed.post", "resume1", None)])
    _check_commit(w2, res, key)
    with pytest.raises(RepoError, match="invalid repo"):
        RepoWriter.from_car(w.export_car(), PrivateKey.generate(key.curve))


def test_writer_commit_car_holds_only_the_commit(key: PrivateKey) -> None:
    w = RepoWriter(DID, key)
    car = read_car(w.commit_car())
    assert car.roots == [w.commit_cid] and list(car.blocks) == [w.commit_cid]
