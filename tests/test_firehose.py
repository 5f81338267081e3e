"""Event-stream frames, commit verification (sync 1.1 proofs) and the Redis StreamEvent format."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto import cbor
from psky.atproto.car import read_car, write_car
from psky.atproto.cbor import CID
from psky.atproto.commit import sign_commit
from psky.atproto.crypto import K256_N, P256_N, PrivateKey
from psky.atproto.firehose import (
    AccountEvent,
    CommitEvent,
    CommitResult,
    ErrorFrame,
    FrameError,
    IdentityEvent,
    InfoEvent,
    RepoOp,
    SyncEvent,
    UnknownEvent,
    account_body,
    commit_body,
    commit_event,
    decode_frame,
    encode_error_frame,
    encode_event,
    encode_frame,
    identity_body,
    info_body,
    process_commit,
    process_sync,
    sync_body,
    to_stream_events,
)
from psky.atproto.mst import MST
from psky.atproto.repo import RepoWriter
from tests.paths import INTEROP

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
OTHER_DID = "did:web:example.com"
TIME = "2024-05-01T12:00:00.123Z"
REV = "3kzzzzzzzzzz2"
SINCE = "3kzzzzzzzzzy2"

PROOF_VECTORS: list[dict[str, Any]] = json.loads(
    (INTEROP / "firehose" / "commit-proof-fixtures.json").read_text()
)


@pytest.fixture(scope="module", params=["k256", "p256"])
def key(request: pytest.FixtureRequest) -> PrivateKey:
    return PrivateKey.generate(request.param)


# --- building signed commits from the interop proof vectors ------------------------------


@dataclasses.dataclass
class Built:
    """A signed commit for one vector: its frame parts, ready to tamper with."""

    commit_cid: CID
    commit_block: bytes
    mst_blocks: dict[CID, bytes]
    ops: list[RepoOp]
    root_before: CID
    root_after: CID

    def car(self, drop: CID | None = None, extra: dict[CID, bytes] | None = None) -> bytes:
        blocks = {self.commit_cid: self.commit_block, **self.mst_blocks, **(extra or {})}
        return write_car([self.commit_cid], [(c, b) for c, b in blocks.items() if c != drop])

    def event(self, **over: Any) -> CommitEvent:
        fields: dict[str, Any] = {
            "seq": 42,
            "repo": DID,
            "rev": REV,
            "since": SINCE,
            "commit": self.commit_cid,
            "blocks": self.car(),
            "ops": tuple(self.ops),
            "time": TIME,
            "prev_data": self.root_before,
        }
        fields.update(over)
        return CommitEvent(**fields)


def _build_vector(vec: dict[str, Any], key: PrivateKey, did: str = DID) -> Built:
    leaf = cbor.parse_cid(vec["leafValue"])
    before = MST.from_entries([(k, leaf) for k in vec["keys"]])
    assert before.root_cid().encode() == vec["rootBeforeCommit"]
    store = before.blocks()
    tree = MST.load(store, before.root_cid())
    ops: list[RepoOp] = []
    for k in vec["adds"]:
        tree.add(k, leaf)
        ops.append(RepoOp("create", k, leaf, None))
    for k in vec["dels"]:
        tree.delete(k)
        ops.append(RepoOp("delete", k, None, leaf))
    after = tree.root_cid()
    assert after.encode() == vec["rootAfterCommit"]
    mst_blocks = tree.new_blocks()
    mst_blocks.update(tree.covering_proof(vec["adds"] + vec["dels"]))
    commit_cid, commit_block = sign_commit(did, after, REV, key)
    return Built(commit_cid, commit_block, mst_blocks, ops, before.root_cid(), after)


def _frame_round_trip(ev: CommitEvent) -> CommitEvent:
    body = commit_body(
        seq=ev.seq,
        repo=ev.repo,
        commit=ev.commit,
        rev=ev.rev,
        since=ev.since,
        blocks=ev.blocks,
        ops=ev.ops,
        time=ev.time,
        prev_data=ev.prev_data,
    )
    decoded = decode_frame(encode_frame("#commit", body))
    assert isinstance(decoded, CommitEvent)
    assert decoded == ev
    return decoded


def _record_only(res: CommitResult) -> bool:
    """The vector keys are not <nsid>/<rkey> and their leaf block is not known: those two
    record-level findings are expected; nothing about commit or proof may fail."""
    return set(res.reasons) <= {"invalid-path", "missing-block"} and all(
        e.startswith("record") for e in res.errors
    )


@pytest.mark.parametrize("vec", PROOF_VECTORS, ids=[v["comment"] for v in PROOF_VECTORS])
def test_proof_vector_end_to_end(vec: dict[str, Any], key: PrivateKey) -> None:
    built = _build_vector(vec, key)
    have = set(built.mst_blocks)
    for cid in vec["blocksInProof"]:
        assert cbor.parse_cid(cid) in have
    ev = _frame_round_trip(built.event())
    res = process_commit(ev, signing_key=key.did_key())
    assert res.signature is True
    assert res.proof is True
    assert _record_only(res), res.errors
    assert res.data == built.root_after
    assert res.commit is not None and res.commit.did == DID


@pytest.mark.parametrize("vec", PROOF_VECTORS, ids=[v["comment"] for v in PROOF_VECTORS])
def test_proof_vector_dropped_proof_block(vec: dict[str, Any]) -> None:
    key = PrivateKey.generate("k256")
    built = _build_vector(vec, key)
    failed = set()
    for cid in map(cbor.parse_cid, vec["blocksInProof"]):
        res = process_commit(built.event(blocks=built.car(drop=cid)), signing_key=key.did_key())
        assert res.signature is True
        if res.proof is True:
            # the reference's covering proof is generous: some of its nodes are context an
            # inversion of these particular ops never has to open
            assert _record_only(res)
            continue
        assert res.proof is False and "missing-block" in res.reasons
        assert any(cid.encode() in e for e in res.errors)
        failed.add(cid)
    assert built.root_after in failed


@pytest.mark.parametrize("vec", PROOF_VECTORS, ids=[v["comment"] for v in PROOF_VECTORS])
def test_proof_vector_tampering(vec: dict[str, Any]) -> None:
    key = PrivateKey.generate("k256")
    built = _build_vector(vec, key)
    dk = key.did_key()

    res = process_commit(built.event(prev_data=built.root_after), signing_key=dk)
    assert res.proof is False and "proof-mismatch" in res.reasons

    res = process_commit(built.event(), signing_key=PrivateKey.generate("k256").did_key())
    assert res.signature is False and "bad-signature" in res.reasons and res.proof is True

    res = process_commit(built.event(repo=OTHER_DID), signing_key=dk)
    assert "did-mismatch" in res.reasons

    res = process_commit(built.event(rev="3kzzzzzzzzzz3"), signing_key=dk)
    assert "rev-mismatch" in res.reasons

    # an op left out: the inverted tree cannot be the previous one
    if len(built.ops) > 1:
        res = process_commit(built.event(ops=tuple(built.ops[1:])), signing_key=dk)
        assert res.proof is False and not res.ok
    # an op claiming another CID than the tree holds
    op0 = built.ops[0]
    other = cbor.cid_for_cbor(b"\xa0")
    bad = op0._replace(cid=other) if op0.action == "create" else op0._replace(prev=other)
    res = process_commit(built.event(ops=(bad, *built.ops[1:])), signing_key=dk)
    assert res.proof is False and not res.ok


def test_high_s_commit_signature_rejected(key: PrivateKey) -> None:
    built = _build_vector(PROOF_VECTORS[0], key)
    obj = cbor.decode(built.commit_block)
    n = K256_N if key.curve == "k256" else P256_N
    obj["sig"] = obj["sig"][:32] + (n - int.from_bytes(obj["sig"][32:], "big")).to_bytes(32, "big")
    block = cbor.encode(obj)
    cid = cbor.cid_for_cbor(block)
    high = dataclasses.replace(built, commit_cid=cid, commit_block=block)
    assert process_commit(built.event(), signing_key=key.did_key()).signature is True
    res = process_commit(high.event(), signing_key=key.did_key())
    assert res.signature is False and "bad-signature" in res.reasons


def test_commit_signed_for_another_did(key: PrivateKey) -> None:
    built = _build_vector(PROOF_VECTORS[0], key, did=OTHER_DID)
    res = process_commit(built.event(), signing_key=key.did_key())
    assert "did-mismatch" in res.reasons and res.signature is True


def test_commit_block_problems() -> None:
    key = PrivateKey.generate("k256")
    built = _build_vector(PROOF_VECTORS[2], key)
    res = process_commit(built.event(blocks=built.car(drop=built.commit_cid)))
    assert res.reasons == ["missing-block"] and res.commit is None

    res = process_commit(built.event(blocks=b"\x00garbage"))
    assert res.reasons == ["bad-car"]

    car = built.car()
    idx = car.index(built.commit_block) + 10
    corrupted = car[:idx] + bytes([car[idx] ^ 1]) + car[idx + 1 :]
    res = process_commit(built.event(blocks=corrupted))
    assert res.reasons == ["bad-car"] and "sha-256" in res.errors[0]

    # CAR root is not the event's commit
    wrong_root = write_car([built.root_after], read_car(car).blocks.items())
    res = process_commit(built.event(blocks=wrong_root))
    assert "root-mismatch" in res.reasons

    # the "commit" is not a commit
    node = built.mst_blocks[built.root_after]
    res = process_commit(
        built.event(commit=built.root_after, blocks=write_car([built.root_after], [(built.root_after, node)]))
    )
    assert res.reasons == ["bad-commit"]

    res = process_commit(built.event(), signing_key="did:key:znope")
    assert res.signature is False and "bad-key" in res.reasons


def test_checks_that_do_not_run() -> None:
    key = PrivateKey.generate("k256")
    built = _build_vector(PROOF_VECTORS[0], key)
    res = process_commit(built.event(prev_data=None))
    assert res.proof is None and res.signature is None and _record_only(res)
    res = process_commit(built.event(prev_data=built.root_after), check_proof=False)
    assert res.proof is None and _record_only(res)
    # legacy ops (delete without prev) cannot be inverted, but still must match the tree
    vec = PROOF_VECTORS[3]  # has deletes
    built = _build_vector(vec, key)
    legacy = tuple(o._replace(prev=None) if o.action == "delete" else o for o in built.ops)
    res = process_commit(built.event(ops=legacy))
    assert res.proof is None and _record_only(res)


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (RepoOp("create", "app.bsky.feed.post/abc", None, None), "invalid-op"),
        (
            RepoOp(
                "create", "app.bsky.feed.post/abc", cbor.cid_for_cbor(b"\xa0"), cbor.cid_for_cbor(b"\xa0")
            ),
            "invalid-op",
        ),
        (RepoOp("update", "app.bsky.feed.post/abc", None, None), "invalid-op"),
        (RepoOp("delete", "app.bsky.feed.post/abc", cbor.cid_for_cbor(b"\xa0"), None), "invalid-op"),
        (RepoOp("frobnicate", "app.bsky.feed.post/abc", None, None), "invalid-op"),
        (RepoOp("delete", "../../etc/passwd", None, cbor.cid_for_cbor(b"\xa0")), "invalid-op"),
        (RepoOp("delete", "", None, cbor.cid_for_cbor(b"\xa0")), "invalid-op"),
    ],
)
def test_malformed_ops_are_reported(op: RepoOp, reason: str) -> None:
    key = PrivateKey.generate("k256")
    built = _build_vector(PROOF_VECTORS[0], key)
    res = process_commit(built.event(ops=(*built.ops, op)))
    assert reason in res.reasons
    assert res.proof is not True


def test_duplicate_op_paths_are_reported() -> None:
    key = PrivateKey.generate("k256")
    built = _build_vector(PROOF_VECTORS[0], key)
    res = process_commit(built.event(ops=(*built.ops, built.ops[0])))
    assert "invalid-op" in res.reasons and any("duplicate" in e for e in res.errors)


# --- realistic commits from RepoWriter ------------------------------------------------------


def _post(text: str) -> dict[str, Any]:
    return {
        "$type": "app.bsky.feed.post",
        "text": text,
        "createdAt": "2024-05-01T12:00:00.000Z",
        "embed": {
            "$type": "app.bsky.embed.images",
            "images": [
                {
                    "alt": "",
                    "image": {
                        "$type": "blob",
                        "ref": {"$link": "bafkreibwhdjd2rq4wfmeh4ycg2om46c7ver4f22gh7xzxnh4ovo2swanlq"},
                        "mimeType": "image/jpeg",
                        "size": 1234,
                    },
                }
            ],
        },
    }


def _writer_frame(w: RepoWriter, writes: list[Any], seq: int) -> tuple[bytes, Any]:
    res = w.apply_writes(writes)
    frame = encode_event(commit_event(res, seq=seq, time=TIME))
    # the same bytes as the body constructor gives
    body = commit_body(
        seq=seq,
        repo=w.did,
        commit=res.commit_cid,
        rev=res.rev,
        since=res.since,
        blocks=res.blocks,
        ops=res.ops,
        time=TIME,
        prev_data=res.prev_data,
    )
    assert frame == encode_frame("#commit", body)
    return frame, res


def test_writer_commits_verify_through_frames(key: PrivateKey) -> None:
    w = RepoWriter(
        DID,
        key,
        {
            f"app.bsky.feed.like/3kaaaaaaaa{i:03d}".replace("0", "a"): {"$type": "app.bsky.feed.like"}
            for i in range(1)
        },
    )
    prev_data = w.data
    for i in range(30):
        seq = i + 1
        writes: list[Any] = [
            ("create", "app.bsky.feed.post", f"3kpost{i:07d}".replace("0", "a")[:13], _post(f"post {i}"))
        ]
        if i % 3 == 2:
            writes.append(
                ("update", "app.bsky.feed.post", f"3kpost{i - 1:07d}".replace("0", "a")[:13], _post("edited"))
            )
        if i % 5 == 4:
            writes.append(("delete", "app.bsky.feed.post", f"3kpost{i - 4:07d}".replace("0", "a")[:13], None))
        frame, wres = _writer_frame(w, writes, seq)
        ev = decode_frame(frame)
        assert isinstance(ev, CommitEvent)
        assert ev.prev_data == prev_data  # the chain: each prevData is the previous data
        res = process_commit(ev, signing_key=key.did_key())
        assert res.ok and res.signature is True and res.proof is True, res.errors
        prev_data = res.data
        assert [(o.action, o.path, o.cid, o.prev) for o in res.ops] == list(wres.ops)
        for op, (_, coll, rkey, record) in zip(res.ops, writes, strict=True):
            assert (op.collection, op.rkey, op.record) == (coll, rkey, record)
        events = to_stream_events(res, ev)
        assert [e["type"] for e in events] == [a for a, *_ in writes]


def test_missing_record_block_is_an_error() -> None:
    key = PrivateKey.generate("p256")
    w = RepoWriter(DID, key)
    frame, wres = _writer_frame(w, [("create", "app.bsky.feed.post", "3kaaaaaaaaaaa", _post("x"))], 1)
    ev = decode_frame(frame)
    assert isinstance(ev, CommitEvent)
    record_cid = wres.ops[0].cid
    blocks = {c: b for c, b in read_car(ev.blocks).blocks.items() if c != record_cid}
    ev.blocks = write_car([ev.commit], blocks.items())
    res = process_commit(ev, signing_key=key.did_key())
    assert res.reasons == ["missing-block"] and res.proof is True and res.ops == []
    assert to_stream_events(res, ev) == []


def test_undecodable_record_is_an_error() -> None:
    key = PrivateKey.generate("k256")
    bad_record = cbor.encode([1, 2, 3])
    bad_cid = cbor.cid_for_cbor(bad_record)
    tree = MST.empty()
    store = tree.blocks()
    before = tree.root_cid()
    tree = MST.load(store, before)
    tree.add("app.bsky.feed.post/abc", bad_cid)
    commit_cid, commit_block = sign_commit(DID, tree.root_cid(), REV, key)
    blocks = {commit_cid: commit_block, **tree.new_blocks(), bad_cid: bad_record}
    ev = CommitEvent(
        1,
        DID,
        REV,
        None,
        commit_cid,
        write_car([commit_cid], blocks.items()),
        (RepoOp("create", "app.bsky.feed.post/abc", bad_cid, None),),
        TIME,
        before,
    )
    res = process_commit(ev, signing_key=key.did_key())
    assert res.reasons == ["bad-record"] and res.proof is True and res.ops == []


# --- stream events (the TypeScript ingester's StreamEvent JSON) ------------------------------


def test_stream_events_match_the_typescript_shape() -> None:
    key = PrivateKey.generate("k256")
    w = RepoWriter(DID, key, {"app.bsky.feed.post/3kaaaaaaaaaab": _post("old")})
    frame, wres = _writer_frame(
        w,
        [
            (
                "create",
                "app.bsky.feed.like",
                "3kaaaaaaaaaac",
                {"$type": "app.bsky.feed.like", "n": {"$bytes": "AQI"}},
            ),
            ("update", "app.bsky.feed.post", "3kaaaaaaaaaab", _post("new")),
            ("delete", "app.bsky.feed.post", "3kaaaaaaaaaab", None),
        ][:2],
        7,
    )
    ev = decode_frame(frame)
    assert isinstance(ev, CommitEvent)
    res = process_commit(ev, signing_key=key.did_key())
    events = to_stream_events(res, ev)
    commit = wres.commit_cid.encode()
    assert events[0] == {
        "type": "create",
        "record": {"$type": "app.bsky.feed.like", "n": {"$bytes": "AQI"}},
        "cid": wres.ops[0].cid.encode(),
        "seq": 7,
        "time": TIME,
        "did": DID,
        "commit": commit,
        "rev": wres.rev,
        "collection": "app.bsky.feed.like",
        "rkey": "3kaaaaaaaaaac",
    }
    # key order as JSON.stringify writes it in the TypeScript ingester
    assert list(events[0]) == [
        "type",
        "record",
        "cid",
        "seq",
        "time",
        "did",
        "commit",
        "rev",
        "collection",
        "rkey",
    ]
    assert events[1]["type"] == "update" and events[1]["record"] == _post("new")
    frame, wres = _writer_frame(w, [("delete", "app.bsky.feed.post", "3kaaaaaaaaaab", None)], 8)
    ev = decode_frame(frame)
    assert isinstance(ev, CommitEvent)
    (delete,) = to_stream_events(process_commit(ev), ev)
    assert delete == {
        "type": "delete",
        "seq": 8,
        "time": TIME,
        "did": DID,
        "commit": wres.commit_cid.encode(),
        "rev": wres.rev,
        "collection": "app.bsky.feed.post",
        "rkey": "3kaaaaaaaaaab",
    }
    assert list(delete) == ["type", "seq", "time", "did", "commit", "rev", "collection", "rkey"]


def test_account_and_identity_stream_events() -> None:
    acc = AccountEvent(5, DID, TIME, False, "takendown")
    assert to_stream_events(None, acc) == [
        {"type": "account", "seq": 5, "time": TIME, "did": DID, "active": False, "status": "takendown"}
    ]
    assert to_stream_events(None, AccountEvent(6, DID, TIME, True)) == [
        {"type": "account", "seq": 6, "time": TIME, "did": DID, "active": True}
    ]
    assert to_stream_events(None, IdentityEvent(7, DID, TIME, "alice.test")) == [
        {"type": "identity", "seq": 7, "time": TIME, "did": DID, "handle": "alice.test"}
    ]
    assert to_stream_events(None, IdentityEvent(8, DID, TIME)) == [
        {"type": "identity", "seq": 8, "time": TIME, "did": DID}
    ]
    assert to_stream_events(None, SyncEvent(9, DID, b"", REV, TIME)) == []
    assert to_stream_events(None, InfoEvent("OutdatedCursor")) == []
    assert to_stream_events(None, UnknownEvent("#handle", {"seq": 1})) == []
    with pytest.raises(ValueError):
        to_stream_events(None, CommitEvent(1, DID, REV, None, cbor.cid_for_cbor(b"\xa0"), b"", (), TIME))


# --- frame decoding ------------------------------------------------------------------------


def _frame(header: Any, body: Any) -> bytes:
    return cbor.encode(header) + cbor.encode(body)


def test_every_event_type_round_trips() -> None:
    key = PrivateKey.generate("k256")
    w = RepoWriter(DID, key)
    sync_car = w.commit_car()
    cid = cbor.cid_for_cbor(b"\xa0")
    events = [
        CommitEvent(
            2**53, DID, REV, SINCE, w.commit_cid, sync_car, (RepoOp("create", "a.b.c/d", cid),), TIME, cid
        ),
        CommitEvent(1, DID, REV, None, w.commit_cid, sync_car, (), TIME, None, True, (cid,), True),
        SyncEvent(3, DID, sync_car, REV, TIME),
        IdentityEvent(4, DID, TIME, "alice.test"),
        IdentityEvent(5, DID, TIME),
        AccountEvent(6, DID, TIME, True),
        AccountEvent(7, DID, TIME, False, "deactivated"),
        InfoEvent("OutdatedCursor", "too old"),
        InfoEvent("OutdatedCursor"),
        ErrorFrame("FutureCursor", "cursor in the future"),
        ErrorFrame("ConsumerTooSlow"),
        UnknownEvent("#labels", {"seq": 9, "labels": []}, 1, 9),
    ]
    for ev in events:
        assert decode_frame(encode_event(ev)) == ev


def test_constructors_produce_what_a_pds_emits() -> None:
    cid = cbor.cid_for_cbor(b"\xa0")
    body = commit_body(seq=1, repo=DID, commit=cid, rev=REV, since=None, blocks=b"x", ops=[], time=TIME)
    assert (
        body["rebase"] is False and body["tooBig"] is False and body["blobs"] == [] and body["since"] is None
    )
    assert "prevData" not in body
    op_bodies = commit_body(
        seq=1,
        repo=DID,
        commit=cid,
        rev=REV,
        since=None,
        blocks=b"x",
        time=TIME,
        ops=[RepoOp("create", "a.b.c/d", cid), RepoOp("delete", "a.b.c/e", None, cid)],
    )["ops"]
    assert op_bodies == [
        {"action": "create", "path": "a.b.c/d", "cid": cid},
        {"action": "delete", "path": "a.b.c/e", "cid": None, "prev": cid},
    ]
    frame = encode_frame("#identity", identity_body(seq=3, did=DID, time=TIME))
    header, used = cbor.decode_prefix(frame)
    assert header == {"op": 1, "t": "#identity"}
    assert cbor.decode(frame[used:]) == {"seq": 3, "did": DID, "time": TIME}
    assert cbor.decode_multi(encode_error_frame("FutureCursor")) == [{"op": -1}, {"error": "FutureCursor"}]
    assert account_body(seq=1, did=DID, time=TIME, active=True) == {
        "seq": 1,
        "did": DID,
        "time": TIME,
        "active": True,
    }
    assert info_body("OutdatedCursor") == {"name": "OutdatedCursor"}
    assert sync_body(seq=1, did=DID, blocks=b"", rev=REV, time=TIME)["rev"] == REV


@pytest.mark.parametrize("t", ["#handle", "#migrate", "#tombstone", "#somethingNew"])
def test_legacy_and_unknown_types_are_surfaced(t: str) -> None:
    ev = decode_frame(_frame({"op": 1, "t": t}, {"seq": 77, "did": DID, "time": TIME}))
    assert isinstance(ev, UnknownEvent) and ev.t == t and ev.seq == 77 and ev.body["did"] == DID


def test_unknown_op_is_surfaced() -> None:
    ev = decode_frame(_frame({"op": 2, "t": "#commit"}, {"x": 1}))
    assert isinstance(ev, UnknownEvent) and ev.op == 2 and ev.seq is None
    assert decode_frame(encode_event(ev)) == ev
    ev = decode_frame(_frame({"op": 7}, {"seq": "nope"}))
    assert isinstance(ev, UnknownEvent) and ev.t is None and ev.seq is None
    assert decode_frame(encode_event(ev)) == ev


def _valid_commit_body() -> dict[str, Any]:
    cid = cbor.cid_for_cbor(b"\xa0")
    return commit_body(
        seq=1,
        repo=DID,
        commit=cid,
        rev=REV,
        since=SINCE,
        blocks=b"\x00",
        time=TIME,
        ops=[RepoOp("create", "a.b.c/d", cid)],
        prev_data=cid,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", None),
        ("seq", "1"),
        ("seq", True),
        ("seq", 2**63),
        ("seq", -(2**63) - 1),
        ("repo", None),
        ("repo", "not-a-did"),
        ("repo", 5),
        ("rev", None),
        ("rev", "not-a-tid"),
        ("since", "nope"),
        ("since", 1),
        ("commit", None),
        ("commit", "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"),
        ("blocks", None),
        ("blocks", "base64?"),
        ("ops", None),
        ("ops", {"action": "create"}),
        ("ops", ["op"]),
        ("ops", [{"action": "create", "path": "a.b.c/d"}]),
        ("ops", [{"action": 1, "path": "a.b.c/d", "cid": None}]),
        ("ops", [{"action": "create", "path": b"a.b.c/d", "cid": None}]),
        ("ops", [{"action": "create", "path": "a.b.c/d", "cid": "x"}]),
        ("ops", [{"action": "update", "path": "a.b.c/d", "cid": None, "prev": "x"}]),
        ("time", None),
        ("time", 1714564800),
        ("prevData", "bafy"),
        ("tooBig", 0),
        ("rebase", "false"),
        ("blobs", {}),
        ("blobs", ["bafy"]),
    ],
)
def test_malformed_commit_bodies(field: str, value: Any) -> None:
    body = _valid_commit_body()
    if value is None:
        body.pop(field, None)
        if field in ("since", "prevData"):
            return
    else:
        body[field] = value
    with pytest.raises(FrameError):
        decode_frame(encode_frame("#commit", body))


def test_optional_and_deprecated_commit_fields() -> None:
    body = _valid_commit_body()
    for f in ("since", "prevData", "tooBig", "rebase", "blobs"):
        body.pop(f)
    ev = decode_frame(encode_frame("#commit", body))
    assert isinstance(ev, CommitEvent) and ev.since is None and ev.prev_data is None and ev.blobs == ()
    body["blobs"] = None  # Go producers have written a null for an empty list
    body["extra"] = {"future": True}  # unknown fields are ignored
    assert isinstance(decode_frame(encode_frame("#commit", body)), CommitEvent)


@pytest.mark.parametrize(
    ("t", "body"),
    [
        ("#identity", {"seq": 1, "time": TIME}),
        ("#identity", {"seq": 1, "did": "nope", "time": TIME}),
        ("#identity", {"seq": 1, "did": DID, "time": TIME, "handle": 5}),
        ("#account", {"seq": 1, "did": DID, "time": TIME}),
        ("#account", {"seq": 1, "did": DID, "time": TIME, "active": "yes"}),
        ("#account", {"seq": 1, "did": DID, "time": TIME, "active": True, "status": 3}),
        ("#account", {"seq": 1.5, "did": DID, "time": TIME, "active": True}),
        ("#sync", {"seq": 1, "did": DID, "time": TIME, "rev": REV}),
        ("#sync", {"seq": 1, "did": DID, "time": TIME, "blocks": b"", "rev": "x"}),
        ("#info", {"message": "no name"}),
        ("#info", {"name": None}),
    ],
)
def test_malformed_other_bodies(t: str, body: dict[str, Any]) -> None:
    with pytest.raises(FrameError):
        decode_frame(encode_frame(t, body))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xa2",
        cbor.encode({"op": 1, "t": "#info"}),  # header only
        _frame({"op": 1, "t": "#info"}, {"name": "x"}) + b"\x00",  # trailing bytes
        _frame({"op": 1, "t": "#info"}, {"name": "x"}) + cbor.encode({}),  # three objects
        _frame([1, "#info"], {"name": "x"}),
        _frame({"op": 1, "t": "#info"}, ["name"]),
        _frame({"op": "1", "t": "#info"}, {"name": "x"}),
        _frame({"op": True, "t": "#info"}, {"name": "x"}),
        _frame({"op": 1}, {"name": "x"}),
        _frame({"op": 1, "t": 5}, {"name": "x"}),
        _frame({"op": -1}, {"message": "no error name"}),
        _frame({"op": -1}, {"error": "X", "message": 5}),
        bytes.fromhex("a2617401626f7001") + cbor.encode({}),  # non-canonical key order
        bytes.fromhex("a1626f70fb3ff0000000000000") + cbor.encode({}),  # float op
    ],
)
def test_malformed_frames(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(data)


def test_frame_must_be_bytes_like() -> None:
    with pytest.raises(FrameError):
        decode_frame("text")  # type: ignore[arg-type]
    frame = encode_frame("#info", info_body("x"))
    assert decode_frame(bytearray(frame)) == decode_frame(memoryview(frame)) == InfoEvent("x")


def test_truncations_of_a_real_frame_raise_frame_error() -> None:
    key = PrivateKey.generate("k256")
    frame = encode_event(_build_vector(PROOF_VECTORS[0], key).event())
    for cut in range(len(frame)):
        with pytest.raises(FrameError):
            decode_frame(frame[:cut])


# --- hostile input: only FrameError (decoding) and never an exception (processing) -----------


_SAMPLE_FRAME = encode_event(
    _build_vector(PROOF_VECTORS[4], PrivateKey.from_bytes(b"\x01" * 32, "k256")).event()
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        decode_frame(data)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, len(_SAMPLE_FRAME) - 1), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_fuzz_mutated_commit_frames(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_SAMPLE_FRAME)
    for pos, val in edits:
        data[pos] = val
    try:
        ev = decode_frame(bytes(data))
    except FrameError:
        return
    if isinstance(ev, CommitEvent):
        res = process_commit(ev, signing_key="did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme")
        assert isinstance(res, CommitResult)
        to_stream_events(res, ev)


_json_leaf = (
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=20) | st.binary(max_size=20)
)
_values = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["#commit", "#sync", "#identity", "#account", "#info", "#x"]),
    st.dictionaries(
        st.sampled_from(
            [
                "seq",
                "repo",
                "did",
                "rev",
                "since",
                "commit",
                "blocks",
                "ops",
                "time",
                "active",
                "status",
                "handle",
                "name",
                "message",
                "prevData",
                "tooBig",
                "blobs",
                "error",
            ]
        ),
        _values,
        max_size=12,
    ),
    st.sampled_from([1, -1, 0, 2]),
)
def test_fuzz_structured_bodies(t: str, body: dict[str, Any], op: int) -> None:
    try:
        data = _frame({"op": op, "t": t}, body)
    except ValueError:
        return  # not encodable (e.g. integer out of CBOR range)
    try:
        ev = decode_frame(data)
    except FrameError:
        return
    if isinstance(ev, CommitEvent):
        process_commit(ev)


def test_deeply_nested_frame_body_is_rejected_cleanly() -> None:
    deep = b"\x81" * 100_000 + b"\x00"
    data = cbor.encode({"op": 1, "t": "#info"}) + b"\xa1\x64name" + deep
    with pytest.raises(FrameError):
        decode_frame(data)


# --- #sync --------------------------------------------------------------------------------


def test_process_sync(key: PrivateKey) -> None:
    w = RepoWriter(DID, key)
    ev = SyncEvent(1, DID, w.commit_car(), w.rev, TIME)
    res = process_sync(ev, signing_key=key.did_key())
    assert res.ok and res.signature is True and res.commit_cid == w.commit_cid
    assert res.commit is not None and res.commit.data == w.data
    assert process_sync(dataclasses.replace(ev, did=OTHER_DID)).reasons == ("did-mismatch",)
    assert process_sync(dataclasses.replace(ev, rev="3kzzzzzzzzzz2")).reasons == ("rev-mismatch",)
    assert process_sync(ev, signing_key=PrivateKey.generate("k256").did_key()).reasons == ("bad-signature",)
    assert process_sync(ev, signing_key="did:key:zzz").reasons == ("bad-key",)
    assert process_sync(dataclasses.replace(ev, blocks=b"junk")).reasons == ("bad-car",)
    assert process_sync(dataclasses.replace(ev, blocks=write_car([], []))).reasons == ("bad-car",)
    assert process_sync(dataclasses.replace(ev, blocks=write_car([w.commit_cid], []))).reasons == (
        "missing-block",
    )
    node_cid, node = next(iter(MST.empty().blocks().items()))
    assert process_sync(
        dataclasses.replace(ev, blocks=write_car([node_cid], [(node_cid, node)]))
    ).reasons == ("bad-commit",)
