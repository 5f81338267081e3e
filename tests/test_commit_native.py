"""The native ``#commit`` fast path (``check_commit_frame``) against the Python path.

``check_commit_frame(frame, verify=...)`` may decline any frame (None: the Python path then
decides and reports), but whatever it returns must be exactly what the Python path gives
for that frame: ``decode_frame`` + ``process_commit_unverified`` (verify off) or
``process_commit(..., check_proof=True)`` with a good proof (verify on), with no failed
check, and the StreamEvent JSON byte-equal to ``orjson.dumps`` of ``to_stream_events``.
The reference runs with the C inverter switched off, so the two sides share no C code.

It must take the usual valid commits (realistic RepoWriter commits, the interop proof
vectors with their keys mapped onto record paths of the same layers, random records), and
never crash on mutated frames.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto import cbor, firehose, mst
from psky.atproto.car import car_header, encode_varint, write_car
from psky.atproto.cbor import CID
from psky.atproto.commit import sign_commit
from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import (
    CommitEvent,
    CommitResult,
    FrameError,
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
    sync_body,
    to_stream_events,
)
from psky.atproto.mst import MST, Op, key_height
from psky.atproto.repo import RepoWriter
from psky.atproto.syntax import make_tid
from psky.ingester._unverified import process_commit_unverified
from tests.paths import INTEROP


def _import_native() -> ModuleType | None:
    try:
        return importlib.import_module("psky.atproto._native")
    except ImportError:
        return None


_native = _import_native()
_check: Callable[..., Any] | None = getattr(firehose, "check_commit_frame", None)
_DISABLED_BY_ENV = os.environ.get("PSKY_NATIVE", "1") == "0"

pytestmark = [
    pytest.mark.skipif(
        _native is None or _check is None,
        reason="psky.atproto._native / firehose.check_commit_frame not built",
    ),
    pytest.mark.skipif(_DISABLED_BY_ENV, reason="PSKY_NATIVE=0 switches the fast path off"),
]

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
OTHER_DID = "did:web:example.com"
TIME = "2024-05-01T12:00:00.123Z"
REV = "3kzzzzzzzzzz2"
SINCE = "3kzzzzzzzzzy2"
KEY = PrivateKey.from_bytes(bytes(range(1, 33)), "k256")
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_DAG_PFX = CID.CIDV1_DAG_CBOR_SHA256_32_PFX
_RAW_PFX = CID.CIDV1_RAW_SHA256_32_PFX

PROOF_VECTORS: list[dict[str, Any]] = orjson.loads(
    (INTEROP / "firehose" / "commit-proof-fixtures.json").read_bytes()
)


def fast(frame: bytes, verify: bool) -> Any:
    assert _check is not None
    return _check(frame, verify=verify)


@contextmanager
def _python_inversion() -> Iterator[None]:
    """The reference inverts in Python only (the C inverter off), as if no C existed."""
    saved = mst.NATIVE_INVERSION
    mst.NATIVE_INVERSION = False
    try:
        yield
    finally:
        mst.NATIVE_INVERSION = saved


def python_verdict(frame: bytes, verify: bool) -> tuple[CommitEvent | None, CommitResult | None, str]:
    """(event, result, verdict) of the Python path; verdict "ok" when it fully accepts."""
    try:
        ev = decode_frame(frame)
    except FrameError as e:
        return None, None, f"FrameError: {e}"
    if not isinstance(ev, CommitEvent):
        return None, None, f"not a commit: {type(ev).__name__}"
    with _python_inversion():
        if verify:
            res = process_commit(ev, signing_key=None, check_proof=True)
        else:
            res = process_commit_unverified(ev)
    if ev.too_big:
        return ev, res, "tooBig"
    if res.reasons:
        return ev, res, f"reasons {res.reasons}: {res.errors}"
    # without prevData there is nothing to invert: the ops are checked against the signed tree
    if verify and res.proof is not True and not (res.proof is None and ev.prev_data is None):
        return ev, res, f"proof {res.proof}"
    return ev, res, "ok"


def assert_agrees(frame: bytes, verify: bool) -> bool:
    """The fast path's result (if any) equals the Python path's; True when it took the frame."""
    got = fast(frame, verify)
    if got is None:
        return False
    ev, res, verdict = python_verdict(frame, verify)
    assert verdict == "ok", f"fast path took a frame the Python path does not accept ({verdict})"
    assert ev is not None and res is not None
    assert ev.blobs == (), "fast path took a commit with blobs"
    assert type(got.seq) is int and got.seq == ev.seq
    assert type(got.repo) is str and got.repo == ev.repo
    assert type(got.rev) is str and got.rev == ev.rev
    assert type(got.time) is str and got.time == ev.time
    assert got.commit == ev.commit.cid_bytes
    assert got.prev_data == (ev.prev_data.cid_bytes if ev.prev_data is not None else None)
    if verify:
        assert res.commit is not None
        assert got.data == res.commit.data.cid_bytes
        assert got.unsigned == res.commit.unsigned_bytes()
        assert got.sig == res.commit.sig
    else:
        assert got.data is None and got.unsigned is None and got.sig is None
    expected = [orjson.dumps(e) for e in to_stream_events(res, ev)]
    events = list(got.events)
    assert [(c, a) for c, a, _ in events] == [(op.collection, op.action) for op in res.ops]
    assert [j for _, _, j in events] == expected
    for c, a, j in events:
        assert type(c) is str and type(a) is str and type(j) is bytes
    return True


def assert_takes(frame: bytes, *, modes: Sequence[bool] = (False, True)) -> None:
    for verify in modes:
        verdict = python_verdict(frame, verify)[2]
        assert verdict == "ok", f"test frame is not valid for the Python path (verify={verify}): {verdict}"
        assert assert_agrees(frame, verify), f"fast path declined a valid commit (verify={verify})"
        if verify:  # what the caller then checks: the signature over the returned bytes
            got = fast(frame, True)
            assert KEY.public_key().verify(got.unsigned, got.sig)


# --- building commits with arbitrary record bytes -------------------------------------------


def _cid(block: bytes) -> CID:
    return cbor.cid_for_cbor(block)


def _filler_cid(i: int) -> CID:
    return _cid(cbor.encode({"filler": i}))


@dataclass
class Parts:
    """A signed commit built from writes on a base tree; ``frame()`` encodes it, with edits."""

    commit_cid: CID
    commit_block: bytes
    mst_blocks: dict[CID, bytes]
    records: dict[CID, bytes]
    ops: list[Op]
    before: CID
    after: CID
    extra: dict[str, Any] = field(default_factory=dict)

    def blocks(self) -> list[tuple[CID, bytes]]:
        return [(self.commit_cid, self.commit_block), *self.mst_blocks.items(), *self.records.items()]

    def car(
        self,
        *,
        drop: CID | None = None,
        replace: Mapping[CID, bytes] | None = None,
        roots: Sequence[CID] | None = None,
    ) -> bytes:
        blocks = [(c, (replace or {}).get(c, b)) for c, b in self.blocks() if c != drop]
        return write_car(list(roots) if roots is not None else [self.commit_cid], blocks)

    def body(self, **over: Any) -> dict[str, Any]:
        body = commit_body(
            seq=7,
            repo=DID,
            commit=self.commit_cid,
            rev=REV,
            since=SINCE,
            blocks=self.car(),
            ops=self.ops,
            time=TIME,
            prev_data=self.before,
        )
        for k, v in over.items():
            if v is _DELETE:
                body.pop(k, None)
            else:
                body[k] = v
        return body

    def frame(self, **over: Any) -> bytes:
        return encode_frame("#commit", self.body(**over))


_DELETE = object()

#: PSKY_HOSTILE_SCALE multiplies the seeded fuzz loops and hypothesis examples (deeper runs)
SCALE = int(os.environ.get("PSKY_HOSTILE_SCALE", "1"))

COLLECTIONS = ["app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.graph.follow", "a.b.c", "com.example.x.y.z"]


BASE_ENTRIES: dict[str, CID] = {
    **{"app.bsky.feed.post/3kbase" + "abcdefghijklmnop"[i] * 7: _filler_cid(i) for i in range(12)},
    **{"app.bsky.feed.like/3klike" + "abcdefghijklmnop"[i] * 7: _filler_cid(100 + i) for i in range(8)},
}


def build(
    writes: Sequence[tuple[str, str, bytes | None]],
    *,
    base: Mapping[str, CID] = BASE_ENTRIES,
    did: str = DID,
    rev: str = REV,
    cids: Mapping[str, CID] | None = None,
) -> Parts:
    """Apply ``(action, path, record block)`` writes to a tree of *base* entries and sign.

    ``cids`` may give a path's record CID instead of the block's hash (odd CIDs)."""
    tree0 = MST.from_entries(base.items())
    tree = MST.load(tree0.blocks(), tree0.root_cid())
    ops: list[Op] = []
    records: dict[CID, bytes] = {}
    for action, path, block in writes:
        prev = tree.get(path)
        if action == "delete":
            assert prev is not None
            tree.delete(path)
            ops.append(Op("delete", path, None, prev))
            continue
        assert block is not None
        cid = (cids or {}).get(path) or _cid(block)
        records[cid] = block
        if action == "create":
            tree.add(path, cid)
            ops.append(Op("create", path, cid, None))
        else:
            tree.update(path, cid)
            ops.append(Op("update", path, cid, prev))
    after = tree.root_cid()
    mst_blocks = tree.new_blocks()
    mst_blocks.update(tree.covering_proof([p for _, p, _ in writes]))
    commit_cid, commit_block = sign_commit(did, after, rev, KEY)
    return Parts(commit_cid, commit_block, mst_blocks, records, ops, tree0.root_cid(), after)


def create_one(block: bytes, path: str = "app.bsky.feed.post/3knewnewnewaa") -> Parts:
    return build([("create", path, block)])


def raw_map(pairs: Sequence[tuple[Any, Any]]) -> bytes:
    """A CBOR map of the pairs in the given order (each key and value canonically encoded)."""
    n = len(pairs)
    head = bytes([0xA0 + n]) if n < 24 else bytes([0xB8, n])
    return head + b"".join(cbor.encode(k) + cbor.encode(v) for k, v in pairs)


def commit_frame_raw(body_pairs: Sequence[tuple[Any, Any]]) -> bytes:
    return cbor.encode({"op": 1, "t": "#commit"}) + raw_map(body_pairs)


# --- 1. realistic commits -------------------------------------------------------------------

BLOB_CID = "bafkreibwhdjd2rq4wfmeh4ycg2om46c7ver4f22gh7xzxnh4ovo2swanlq"
NASTY_TEXT = [
    "plain ascii",
    "emoji 🦋🏳️‍🌈👩🏽‍💻 and skin tones",
    "RTL: مرحبا بالعالم שלום עולם \u202eevil\u202c",
    "control chars: " + "".join(chr(c) for c in range(0x20)) + "\x7f",
    "line/para separators \u2028 \u2029 and NEL \x85",
    'quotes " \' ` and backslashes \\ \\\\ \\u0000 \\"',
    "</script><!-- & < > -->",
    "\ufeffBOM, \ufffd replacement, \U0010ffff max code point, \u0301combining",
    "",
    "x" * 3000,
]


def _tid(i: int) -> str:
    return make_tid(1_700_000_000_000_000 + i * 1000, 7)


def _blob(mime: str = "image/jpeg", size: int = 1234) -> dict[str, Any]:
    return {"$type": "blob", "ref": {"$link": BLOB_CID}, "mimeType": mime, "size": size}


def _post(text: str, i: int) -> dict[str, Any]:
    record: dict[str, Any] = {
        "$type": "app.bsky.feed.post",
        "text": text,
        "createdAt": "2024-05-01T12:00:00.000Z",
        "langs": ["en", "ar", "he"],
    }
    kind = i % 4
    if kind == 0:
        record["embed"] = {
            "$type": "app.bsky.embed.images",
            "images": [
                {"alt": text[:50], "image": _blob(), "aspectRatio": {"width": 1200, "height": 800}},
                {"alt": "", "image": _blob("image/png", 0)},
            ],
        }
    elif kind == 1:
        record["facets"] = [
            {
                "index": {"byteStart": 0, "byteEnd": 5},
                "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.com/"}],
            },
            {
                "index": {"byteStart": 6, "byteEnd": 12},
                "features": [{"$type": "app.bsky.richtext.facet#mention", "did": OTHER_DID}],
            },
        ]
        record["reply"] = {
            "root": {"uri": f"at://{DID}/app.bsky.feed.post/3kaaaaaaaaaaa", "cid": _filler_cid(1).encode()},
            "parent": {"uri": f"at://{DID}/app.bsky.feed.post/3kaaaaaaaaaab", "cid": _filler_cid(2).encode()},
        }
    elif kind == 2:
        record["embed"] = {
            "$type": "app.bsky.embed.external",
            "external": {"uri": "https://example.com", "title": text[:20], "description": "", "thumb": _blob()},
        }
    else:
        record["embed"] = {
            "$type": "app.bsky.embed.record",
            "record": {"uri": f"at://{OTHER_DID}/app.bsky.feed.post/3kbbbbbbbbbbb", "cid": _filler_cid(3).encode()},
        }
        record["labels"] = {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "nudity"}]}
        record["tags"] = ["a", "b"]
    return record


def _like(i: int) -> dict[str, Any]:
    return {
        "$type": "app.bsky.feed.like",
        "subject": {"uri": f"at://{OTHER_DID}/app.bsky.feed.post/{_tid(i)}", "cid": _filler_cid(i).encode()},
        "createdAt": "2024-05-01T12:00:00.000Z",
    }


def _follow(i: int) -> dict[str, Any]:
    return {"$type": "app.bsky.graph.follow", "subject": f"did:plc:{'a' * 23}{i % 10}", "createdAt": TIME}


def _profile(name: str) -> dict[str, Any]:
    return {
        "$type": "app.bsky.actor.profile",
        "displayName": name,
        "description": "about me \n\t" + name,
        "avatar": _blob("image/png", 99),
        "banner": _blob(),
        "pinnedPost": {"uri": f"at://{DID}/app.bsky.feed.post/3kaaaaaaaaaaa", "cid": _filler_cid(4).encode()},
    }


def _odd_values() -> dict[str, Any]:
    return {
        "$type": "com.example.odd",
        "bytes": {"$bytes": "AAECAwQF/w"},
        "empty_bytes": {"$bytes": ""},
        "link": {"$link": _filler_cid(5).encode()},
        "raw_link": {"$link": BLOB_CID},
        "ints": [0, 1, -1, 23, 24, -24, -25, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -(2**32), -(2**32) - 1,
                 2**53 - 1, 2**53 + 1, -(2**53) - 1, INT64_MAX, INT64_MIN],
        "bools": [True, False, None],
        "empty": {"list": [], "map": {}, "str": ""},
        "nested": {"a": {"b": {"c": {"d": [[[{"e": "deep"}]]]}}}},
        "keys": {"": 1, "a": 2, "aa": 3, "b": 4, "é": 5, "🦋": 6, "$odd": 7, "\x00": 8},
    }


def _realistic_frames() -> list[tuple[str, bytes]]:
    w = RepoWriter(DID, KEY, {"app.bsky.actor.profile/self": _profile("start")}, rev=_tid(0))
    out: list[tuple[str, bytes]] = []
    n = 0

    def commit(name: str, writes: list[Any]) -> None:
        nonlocal n
        n += 1
        res = w.apply_writes(writes, rev=_tid(n))
        out.append((name, encode_event(commit_event(res, seq=1000 + n, time=TIME))))

    post_keys: list[str] = []
    for i, text in enumerate(NASTY_TEXT):
        rkey = _tid(100 + i)
        post_keys.append(rkey)
        commit(f"create-post-{i}", [("create", "app.bsky.feed.post", rkey, _post(text, i))])
    commit("create-like", [("create", "app.bsky.feed.like", _tid(200), _like(1))])
    commit("create-follow", [("create", "app.bsky.graph.follow", _tid(201), _follow(1))])
    commit("update-profile", [("update", "app.bsky.actor.profile", "self", _profile("נתן 🦋 \x00 \u2028"))])
    commit("create-odd-values", [("create", "com.example.odd", "some:key~with_odd.chars-1", _odd_values())])
    commit("delete-post", [("delete", "app.bsky.feed.post", post_keys[0], None)])
    commit(
        "multi-op-mixed",
        [
            ("create", "app.bsky.feed.like", _tid(300), _like(2)),
            ("update", "app.bsky.feed.post", post_keys[1], _post("edited " + NASTY_TEXT[3], 1)),
            ("delete", "app.bsky.feed.post", post_keys[2], None),
            ("create", "app.bsky.graph.follow", _tid(301), _follow(2)),
            ("create", "app.bsky.feed.post", _tid(302), _post(NASTY_TEXT[5], 2)),
            ("delete", "app.bsky.feed.like", _tid(200), None),
        ],
    )
    commit(
        "many-creates",
        [("create", "app.bsky.feed.like", _tid(1000 + i), _like(i)) for i in range(60)],
    )
    commit(
        "many-deletes",
        [("delete", "app.bsky.feed.like", _tid(1000 + i), None) for i in range(0, 60, 2)],
    )
    commit(
        "max-ops",
        [("create", "app.bsky.graph.follow", _tid(5000 + i), _follow(i)) for i in range(firehose.MAX_OPS)],
    )
    commit("big-record", [("create", "app.bsky.feed.post", _tid(400), _post("🦋" * 40_000, 0))])
    commit(
        "same-record-twice",
        [
            ("create", "app.bsky.feed.like", _tid(500), _like(9)),
            ("create", "app.bsky.feed.like", _tid(501), _like(9)),
        ],
    )
    commit("update-to-same-content", [("update", "app.bsky.feed.like", _tid(500), _like(9))])
    return out


_REALISTIC: list[tuple[str, bytes]] | None = None


def realistic() -> list[tuple[str, bytes]]:
    global _REALISTIC
    if _REALISTIC is None:
        _REALISTIC = _realistic_frames()
    return _REALISTIC


REALISTIC_NAMES = [
    *(f"create-post-{i}" for i in range(len(NASTY_TEXT))),
    "create-like",
    "create-follow",
    "update-profile",
    "create-odd-values",
    "delete-post",
    "multi-op-mixed",
    "many-creates",
    "many-deletes",
    "max-ops",
    "big-record",
    "same-record-twice",
    "update-to-same-content",
]


@pytest.mark.parametrize("name", REALISTIC_NAMES)
def test_realistic_commits_are_taken(name: str) -> None:
    frames = dict(realistic())
    assert list(frames) == REALISTIC_NAMES
    assert_takes(frames[name])


def test_initial_commit_without_prev_data() -> None:
    """A repo's first commit has no prevData: nothing to invert, each op is checked against
    the signed tree instead (as the Python path does); both paths take it."""
    w = RepoWriter(DID, KEY, {"app.bsky.actor.profile/self": _profile("x")}, rev=_tid(0))
    frame = encode_event(commit_event(w.initial, seq=1, time=TIME))
    assert_takes(frame)


def test_commits_without_prev_data_are_checked_against_the_tree() -> None:
    """prevData left out (an older relay): the ops must match the signed tree; an op the tree
    contradicts is declined in verify mode (the Python path reports op-mismatch)."""
    w = RepoWriter(DID, KEY, {"app.bsky.actor.profile/self": _profile("x")}, rev=_tid(0))
    res = w.apply_writes([("create", "app.bsky.feed.like", _tid(5), _like(1)),
                          ("delete", "app.bsky.actor.profile", "self", None)])
    ev = dataclasses.replace(commit_event(res, seq=2, time=TIME), prev_data=None)
    assert_takes(encode_event(ev))
    wrong = dataclasses.replace(ev, ops=(ev.ops[0], ev.ops[1]._replace(action="update", cid=ev.ops[0].cid)))
    frame = encode_event(wrong)
    assert python_verdict(frame, True)[2] != "ok"
    assert fast(frame, True) is None
    assert_agrees(frame, False)


def test_empty_commit_agrees() -> None:
    """A commit with no ops (re-signed tree): prevData == data. The fast path may take it."""
    w = RepoWriter(DID, KEY, {"app.bsky.actor.profile/self": _profile("x")}, rev=_tid(0))
    frame = encode_event(commit_event(w.resign(rev=_tid(1)), seq=2, time=TIME))
    for verify in (False, True):
        assert python_verdict(frame, verify)[2] == "ok"
        assert_agrees(frame, verify)


def test_frame_field_variants_are_taken() -> None:
    """Ordinary variations of the body: seq edges, since null, other DIDs, odd times."""
    parts = create_one(cbor.encode_lex(_like(1)))
    for over in (
        {"seq": 0},
        {"seq": INT64_MAX},
        {"seq": 2**32},
        {"since": None},
        {"time": ""},
        {"time": "not a date at all, ünïcödé \u2028 \"q\" \\"},
        {"repo": "did:web:example.com"},
        {"repo": "did:plc:" + "a" * 24},
    ):
        frame = parts.frame(**over)
        for verify in (False, True):
            if verify and over.get("repo", DID) != DID:
                # the commit block names DID: did-mismatch
                assert fast(frame, True) is None
                continue
            assert python_verdict(frame, verify)[2] == "ok", over
            assert assert_agrees(frame, verify), f"declined {over} (verify={verify})"


# --- 2. interop proof vectors ------------------------------------------------------------------


def _mapped_key(orig: str, collection: str = "app.bsky.feed.like") -> str:
    """A record path sorting like *orig* among the vector's keys, at the same MST layer."""
    stem = orig.replace("/", "-")
    height = key_height(orig)
    for i in range(100_000):
        path = f"{collection}/{stem}-{i}"
        if key_height(path) == height:
            return path
    raise AssertionError(f"no record path at layer {height}")


LEAF_BLOCK = cbor.encode_lex(_like(0))


def _vector_parts(vec: dict[str, Any], mapped: bool) -> Parts:
    if mapped:
        names = {k: _mapped_key(k) for k in vec["keys"] + vec["adds"] + vec["dels"]}
        leaf = _cid(LEAF_BLOCK)
    else:
        names = {k: k for k in vec["keys"] + vec["adds"] + vec["dels"]}
        leaf = cbor.parse_cid(vec["leafValue"])
    ordered = sorted(names)
    assert [names[k] for k in ordered] == sorted(names.values()), "mapping must keep the key order"
    before = MST.from_entries([(names[k], leaf) for k in vec["keys"]])
    tree = MST.load(before.blocks(), before.root_cid())
    ops: list[Op] = []
    for k in vec["adds"]:
        tree.add(names[k], leaf)
        ops.append(Op("create", names[k], leaf, None))
    for k in vec["dels"]:
        tree.delete(names[k])
        ops.append(Op("delete", names[k], None, leaf))
    mst_blocks = tree.new_blocks()
    mst_blocks.update(tree.covering_proof([names[k] for k in vec["adds"] + vec["dels"]]))
    if not mapped:
        assert before.root_cid().encode() == vec["rootBeforeCommit"]
        assert tree.root_cid().encode() == vec["rootAfterCommit"]
    else:
        # same shape: as many proof blocks as the vector lists
        assert len(mst_blocks) == len(vec["blocksInProof"])
    commit_cid, commit_block = sign_commit(DID, tree.root_cid(), REV, KEY)
    records = {leaf: LEAF_BLOCK} if mapped and vec["adds"] else {}
    return Parts(commit_cid, commit_block, mst_blocks, records, ops, before.root_cid(), tree.root_cid())


@pytest.mark.parametrize("vec", PROOF_VECTORS, ids=[v["comment"] for v in PROOF_VECTORS])
def test_proof_vectors_mapped_to_record_paths_are_taken(vec: dict[str, Any]) -> None:
    frame = _vector_parts(vec, mapped=True).frame()
    assert_takes(frame)


@pytest.mark.parametrize("vec", PROOF_VECTORS, ids=[v["comment"] for v in PROOF_VECTORS])
def test_proof_vectors_as_given_are_declined(vec: dict[str, Any]) -> None:
    """The vectors' keys are not <nsid>/<rkey> and their leaf block is absent: Python reports
    invalid-path/missing-block, so the fast path must leave them to it."""
    frame = _vector_parts(vec, mapped=False).frame()
    for verify in (False, True):
        assert python_verdict(frame, verify)[2] != "ok"
        assert fast(frame, verify) is None


@pytest.mark.parametrize("vec", PROOF_VECTORS, ids=[v["comment"] for v in PROOF_VECTORS])
def test_proof_vectors_with_a_dropped_proof_block(vec: dict[str, Any]) -> None:
    parts = _vector_parts(vec, mapped=True)
    for cid in parts.mst_blocks:
        frame = parts.frame(blocks=parts.car(drop=cid))
        for verify in (False, True):
            assert_agrees(frame, verify)
        if python_verdict(frame, True)[2] != "ok":
            assert fast(frame, True) is None
    # prevData of the tree after: the proof fails
    frame = parts.frame(prevData=parts.after)
    assert fast(frame, True) is None
    assert_agrees(frame, False)


# --- 3. random records ---------------------------------------------------------------------------

_INT_EDGES = [
    0, 1, -1, 23, 24, -24, -25, 255, 256, -256, -257, 65535, 65536, -65536, -65537,
    2**32 - 1, 2**32, -(2**32), -(2**32) - 1, 2**53 - 1, 2**53, 2**53 + 1, -(2**53) - 1,
    INT64_MAX - 1, INT64_MAX, INT64_MIN, INT64_MIN + 1,
]
_OUT_OF_INT64 = [INT64_MAX + 1, 2**64 - 1, INT64_MIN - 1, -(2**64)]

_UNICODE = st.characters(exclude_categories=["Cs"])  # every code point but the surrogates
_keys = st.text(_UNICODE, max_size=10).filter(
    lambda k: k not in ("$link", "$bytes", "$type")
)
_ints = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from(_INT_EDGES))
_cids = st.builds(lambda pfx, d: CID(pfx + d), st.sampled_from([_DAG_PFX, _RAW_PFX]), st.binary(min_size=32, max_size=32))
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _ints,
    st.text(_UNICODE, max_size=40),
    st.text(st.characters(max_codepoint=0x7F), max_size=10),
    st.binary(max_size=40),
    _cids,
)
_values = st.recursive(
    _scalars,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(_keys, ch, max_size=4),
    max_leaves=24,
)
_records = st.dictionaries(_keys, _values, max_size=6)


def _depth(value: Any) -> int:
    """Containers on the deepest path (iteratively: the deep-record test goes past 400)."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d + 1)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _has_big_int(v: Any) -> bool:
    if isinstance(v, dict):
        return any(_has_big_int(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_big_int(x) for x in v)
    return type(v) is int and not INT64_MIN <= v <= INT64_MAX


_RANDOM = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def random_settings(max_examples: int) -> settings:
    """Derandomized (the same cases every run), PSKY_HOSTILE_SCALE times as many when set."""
    return settings(_RANDOM, max_examples=max_examples * SCALE)


@random_settings(150)
@given(record=_records, action=st.sampled_from(["create", "update"]))
def test_random_records_agree(record: dict[str, Any], action: str) -> None:
    block = cbor.encode(record)
    path = "app.bsky.feed.post/3kbaseaaaaaaa" if action == "update" else "com.example.rand/rand"
    assert action == "create" or path in BASE_ENTRIES
    frame = build([(action, path, block)]).frame()
    for verify in (False, True):
        assert python_verdict(frame, verify)[2] == "ok"
        assert assert_agrees(frame, verify), f"declined a valid record (depth {_depth(record)}, verify={verify})"


@random_settings(40)
@given(
    record=_records,
    big=st.sampled_from(_OUT_OF_INT64),
    where=st.sampled_from(["top", "list", "map"]),
)
def test_records_with_ints_outside_int64_are_declined(record: dict[str, Any], big: int, where: str) -> None:
    record = dict(record)
    record["zz_big"] = big if where == "top" else [1, big] if where == "list" else {"x": {"y": big}}
    assert _has_big_int(record)
    frame = create_one(cbor.encode(record)).frame()
    for verify in (False, True):
        assert python_verdict(frame, verify)[2] != "ok"
        assert fast(frame, verify) is None


#: record nesting depths the fast path took, for the report (it may decline deep ones)
DEPTHS_TAKEN: dict[int, bool] = {}


@pytest.mark.parametrize("depth", [8, 16, 32, 33, 63, 64, 65, 100, 126, 127, 128, 129, 130, 200, 400])
@pytest.mark.parametrize("kind", ["map", "list"])
def test_deep_records_agree(depth: int, kind: str) -> None:
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = {"k": value} if kind == "map" else [value]
    record = {"v": value}  # *depth* containers including the record map
    assert _depth(record) == depth
    frame = create_one(cbor.encode(record)).frame()
    for verify in (False, True):
        verdict = python_verdict(frame, verify)[2]
        took = assert_agrees(frame, verify)
        DEPTHS_TAKEN[depth] = took
        if verdict == "ok" and depth <= 32:
            assert took, f"declined a record {depth} deep"


ACTIONS = st.lists(
    st.tuples(st.sampled_from(["create", "update", "delete"]), st.integers(0, 40)), min_size=1, max_size=12
)


@random_settings(60)
@given(writes=ACTIONS, base_size=st.integers(0, 60))
def test_random_multi_op_commits_are_taken(writes: list[tuple[str, int]], base_size: int) -> None:
    """Random batches of creates/updates/deletes on a random tree: exercises the proof."""
    base = {f"{COLLECTIONS[i % 5]}/{_tid(i)}": _filler_cid(i) for i in range(0, 2 * base_size, 2)}
    batch: list[tuple[str, str, bytes | None]] = []
    seen: set[str] = set()
    for action, i in writes:
        path = f"{COLLECTIONS[i % 5]}/{_tid(i)}"
        if path in seen:
            continue
        exists = path in base
        if action == "create" and exists:
            action = "update"
        elif action in ("update", "delete") and not exists:
            action = "create"
        seen.add(path)
        block = None if action == "delete" else cbor.encode_lex(_like(i + 7 * len(batch)))
        batch.append((action, path, block))
    frame = build(batch, base=base).frame()
    assert_takes(frame)


@random_settings(150)
@given(text=st.text(_UNICODE, max_size=60), key=_keys, seq=st.integers(0, INT64_MAX),
       time=st.text(_UNICODE, max_size=30), since=st.sampled_from([None, SINCE]))
def test_random_strings_and_fields_are_taken(text: str, key: str, seq: int, time: str, since: str | None) -> None:
    """JSON escaping of record strings and keys, and of the frame's own fields."""
    record = {"$type": "app.bsky.feed.post", "text": text, key or "k": [text, {text[:5]: key}]}
    frame = create_one(cbor.encode(record)).frame(seq=seq, time=time, since=since)
    assert_takes(frame)


@random_settings(150)
@given(raw=st.binary(min_size=0, max_size=72), codec=st.sampled_from([0x71, 0x55, 0x70, 0x01]),
       shape=st.sampled_from(["any", "cidv1", "cidv0"]))
def test_record_links_of_any_shape_agree(raw: bytes, codec: int, shape: str) -> None:
    """Tag 42 in a record: Python writes the base32 of whatever follows the 0x00 (it does not
    check the CID's structure). The fast path may decline odd links; what it takes must match."""
    if shape == "cidv1":
        raw = bytes([1, codec, 0x12, 0x20]) + (raw + bytes(32))[:32]
    elif shape == "cidv0":
        raw = b"\x12\x20" + (raw + bytes(32))[:32]
    block = b"\xa1\x61l\xd8\x2a" + cbor.encode(b"\x00" + raw)
    frame = create_one(block).frame()
    for verify in (False, True):
        assert_agrees(frame, verify)
    if shape == "cidv1" and codec in (0x71, 0x55):
        assert_takes(frame)


def _record_mutants(n: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    bases = [cbor.encode_lex(_odd_values()), cbor.encode_lex(_post(NASTY_TEXT[2], 1)),
             cbor.encode_lex(_profile("p 🦋")), cbor.encode_lex(_like(3))]
    for i in range(n):
        base = bases[i % len(bases)]
        yield _mutate(rng, base, (0, 0))


def test_record_mutation_fuzz() -> None:
    """Mutated record bytes under a consistent CID, tree and commit: the fast path's record
    decoder against the Python one, in both modes (the verified mode reaches it too)."""
    taken = 0
    for i, block in enumerate(_record_mutants(300 * SCALE, 0xBEEF)):
        frame = create_one(block).frame()
        for verify in (False, True):
            try:
                taken += assert_agrees(frame, verify)
            except AssertionError as e:
                raise AssertionError(f"record case {i} (verify={verify}) block={block.hex()}: {e}") from None
    FUZZ_STATS["records"] = taken


def test_large_tree_batches() -> None:
    """Seeded batches on a 1500-record tree with several collections (taller tree, more prefixes)."""
    rng = random.Random(77)
    paths = [f"{COLLECTIONS[i % len(COLLECTIONS)]}/{_tid(i * 3)}" for i in range(1500)]
    base = {p: _filler_cid(i) for i, p in enumerate(paths)}
    for round_ in range(8):
        batch: list[tuple[str, str, bytes | None]] = []
        chosen = rng.sample(range(1600), rng.randint(1, 30))
        for j in chosen:
            path = paths[j] if j < len(paths) else f"{COLLECTIONS[j % 5]}/{_tid(j * 3 + 1)}"
            if path not in base:
                batch.append(("create", path, cbor.encode_lex(_like(j + round_))))
            elif rng.random() < 0.5:
                batch.append(("delete", path, None))
            else:
                batch.append(("update", path, cbor.encode_lex(_like(j + round_))))
        assert_takes(build(batch, base=base).frame())


# --- 4. mutation fuzz ------------------------------------------------------------------------------


def _fuzz_bases() -> list[bytes]:
    return [
        create_one(cbor.encode_lex(_like(1))).frame(),
        build(
            [
                ("update", "app.bsky.feed.post/3kbasebbbbbbb", cbor.encode_lex(_post("edited", 1))),
                ("delete", "app.bsky.feed.like/3klikebbbbbbb", None),
                ("create", "app.bsky.feed.post/3knewnewnewab", cbor.encode_lex(_post(NASTY_TEXT[1], 0))),
            ]
        ).frame(),
        _vector_parts(PROOF_VECTORS[3], mapped=True).frame(),
        create_one(cbor.encode_lex(_odd_values())).frame(),
    ]


def _mutate(rng: random.Random, frame: bytes, hot: tuple[int, int]) -> bytes:
    """One to three random edits; half of the positions outside the CAR bytes (*hot* = its span)."""
    data = bytearray(frame)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        if rng.random() < 0.5:
            pos = rng.randrange(len(data))
        else:
            lo, hi = hot
            outside = [*range(0, min(lo, len(data))), *range(min(hi, len(data)), len(data))]
            pos = rng.choice(outside) if outside else rng.randrange(len(data))
        kind = rng.randrange(7)
        if kind == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[pos] = rng.randrange(256)
        elif kind == 2:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif kind == 3:
            del data[pos : pos + rng.randint(1, 8)]
        elif kind == 4:
            del data[pos:]
        elif kind == 5:
            data[pos] = rng.choice((0x00, 0x17, 0x18, 0x1B, 0x3B, 0x40, 0x5F, 0x60, 0x7F, 0x80, 0x9F, 0xA0,
                                    0xBF, 0xD8, 0xF4, 0xF5, 0xF6, 0xF7, 0xFB, 0xFF))
        else:
            n = rng.randint(1, 16)
            data[pos:pos] = data[pos : pos + n]
    return bytes(data)


def _car_span(frame: bytes) -> tuple[int, int]:
    ev = decode_frame(frame)
    assert isinstance(ev, CommitEvent)
    start = frame.find(ev.blocks)
    assert start > 0
    return start, start + len(ev.blocks)


FUZZ_STATS: dict[str, int] = {}


@pytest.mark.parametrize("base_index", range(4))
def test_mutation_fuzz(base_index: int) -> None:
    """~250 mutated frames per base frame, each checked in both modes (2000 checks in all)."""
    base = _fuzz_bases()[base_index]
    hot = _car_span(base)
    rng = random.Random(0xC0FFEE + base_index)
    taken = 0
    for i in range(250 * SCALE):
        frame = _mutate(rng, base, hot)
        for verify in (False, True):
            try:
                took = assert_agrees(frame, verify)
            except AssertionError as e:
                raise AssertionError(f"case {i} (verify={verify}) frame={frame.hex()}: {e}") from None
            taken += took
    FUZZ_STATS[f"base{base_index}"] = taken


_BODY_POOL: list[Any] = [
    None, True, False, 0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, -(2**64), "", "x",
    "3kzzzzzzzzzz3", DID, b"", b"\x00", [], [None], {}, {"a": 1}, _filler_cid(1), CID(_RAW_PFX + bytes(32)),
]


@random_settings(250)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(
                ["seq", "repo", "rev", "since", "commit", "blocks", "ops", "time", "prevData", "tooBig",
                 "rebase", "blobs", "extra", "$type"]
            ),
            st.one_of(st.just(_DELETE), st.sampled_from(_BODY_POOL)),
        ),
        min_size=1,
        max_size=3,
    ),
    op_edits=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from(["action", "path", "cid", "prev", "extra"]),
            st.one_of(st.just(_DELETE), st.sampled_from(_BODY_POOL),
                      st.sampled_from(["create", "update", "delete", "app.bsky.feed.post/x"])),
        ),
        max_size=2,
    ),
)
def test_structured_body_mutations(edits: list[tuple[str, Any]], op_edits: list[tuple[int, str, Any]]) -> None:
    parts = _structured_base()
    body = parts.body()
    for k, v in edits:
        if v is _DELETE:
            body.pop(k, None)
        else:
            body[k] = v
    if type(body.get("ops")) is list:
        ops = [dict(o) if type(o) is dict else o for o in body["ops"]]
        for i, k, v in op_edits:
            if i < len(ops) and type(ops[i]) is dict:
                if v is _DELETE:
                    ops[i].pop(k, None)
                else:
                    ops[i][k] = v
        body["ops"] = ops
    try:
        frame = encode_frame("#commit", body)
    except ValueError:
        return
    for verify in (False, True):
        assert_agrees(frame, verify)


_STRUCTURED: Parts | None = None


def _structured_base() -> Parts:
    global _STRUCTURED
    if _STRUCTURED is None:
        _STRUCTURED = build(
            [
                ("create", "app.bsky.feed.post/3knewnewnewaa", cbor.encode_lex(_post("a", 1))),
                ("update", "app.bsky.feed.post/3kbasebbbbbbb", cbor.encode_lex(_post("b", 2))),
                ("delete", "app.bsky.feed.like/3klikebbbbbbb", None),
            ]
        )
    return _STRUCTURED


# --- 5. specific frames the fast path must leave to Python ------------------------------------------


def _like_parts() -> Parts:
    return create_one(cbor.encode_lex(_like(1)))


def _record_case(block: bytes) -> bytes:
    return create_one(block).frame()


def _non_canonical_body() -> bytes:
    body = _like_parts().body()
    return commit_frame_raw(list(reversed(list(body.items()))))


def _body_with(key: str, raw_value: bytes) -> bytes:
    """The valid frame with one body value replaced by raw CBOR bytes (canonical key order kept)."""
    body = _like_parts().body()
    keys = sorted(body, key=lambda k: (len(k.encode()), k.encode()))
    out = bytes([0xA0 + len(keys)])
    for k in keys:
        out += cbor.encode(k) + (raw_value if k == key else cbor.encode(body[k]))
    return cbor.encode({"op": 1, "t": "#commit"}) + out


def _tampered_record() -> bytes:
    parts = _like_parts()
    (cid,) = parts.records
    return parts.frame(blocks=parts.car(replace={cid: cbor.encode_lex(_like(2))}))


def _missing_record() -> bytes:
    parts = _like_parts()
    (cid,) = parts.records
    return parts.frame(blocks=parts.car(drop=cid))


def _missing_commit_block() -> bytes:
    parts = _like_parts()
    return parts.frame(blocks=parts.car(drop=parts.commit_cid))


def _ops_edit(parts: Parts, i: int, **fields: Any) -> bytes:
    body = parts.body()
    ops = [dict(o) for o in body["ops"]]
    for k, v in fields.items():
        if v is _DELETE:
            ops[i].pop(k, None)
        else:
            ops[i][k] = v
    body["ops"] = ops
    return encode_frame("#commit", body)


def _update_parts() -> Parts:
    return build([("update", "app.bsky.feed.post/3kbasebbbbbbb", cbor.encode_lex(_post("x", 1)))])


def _delete_parts() -> Parts:
    return build([("delete", "app.bsky.feed.post/3kbasebbbbbbb", None)])


def _duplicate_op() -> bytes:
    parts = _like_parts()
    body = parts.body()
    body["ops"] = body["ops"] * 2
    return encode_frame("#commit", body)


def _path_case(path: str) -> bytes:
    return build([("create", path, cbor.encode_lex(_like(1)))]).frame()


def _too_many_ops() -> bytes:
    n = firehose.MAX_OPS + 1
    return build([("create", f"app.bsky.graph.follow/{_tid(i)}", cbor.encode_lex(_follow(i))) for i in range(n)]).frame()


def _big_blocks() -> bytes:
    text = "y" * 700_000
    return build([("create", f"app.bsky.feed.post/{_tid(i)}", cbor.encode_lex(_post(text + str(i), 2)))
                  for i in range(3)]).frame()


def _big_record() -> bytes:
    return _record_case(cbor.encode({"text": "z" * (firehose.MAX_RECORD_BYTES + 1)}))


def _did_mismatch() -> bytes:
    return build([("create", "app.bsky.feed.like/3knewnewnewaa", cbor.encode_lex(_like(1)))], did=OTHER_DID).frame()


def _rev_mismatch() -> bytes:
    return build([("create", "app.bsky.feed.like/3knewnewnewaa", cbor.encode_lex(_like(1)))], rev=SINCE).frame()


def _wrong_op_cid() -> bytes:
    """The op names a present, valid record the tree does not hold at that path."""
    parts = _like_parts()
    other = cbor.encode_lex(_like(2))
    parts.records[_cid(other)] = other
    return _ops_edit(parts, 0, cid=_cid(other))


def _car_root_not_commit() -> bytes:
    parts = _like_parts()
    (cid,) = parts.records
    return parts.frame(blocks=parts.car(roots=[cid]))


def _car_two_roots() -> bytes:
    parts = _like_parts()
    (cid,) = parts.records
    return parts.frame(blocks=parts.car(roots=[parts.commit_cid, cid]))


def _car_duplicate_block() -> bytes:
    parts = _like_parts()
    car = parts.car()
    (cid,) = parts.records
    block = parts.records[cid]
    section = cid.cid_bytes + block
    return parts.frame(blocks=car + encode_varint(len(section)) + section)


def _car_trailing_garbage() -> bytes:
    parts = _like_parts()
    return parts.frame(blocks=parts.car() + b"\x05")


def _car_bad_header() -> bytes:
    parts = _like_parts()
    car = parts.car()
    header = car_header([parts.commit_cid])
    bad = cbor.encode({"roots": [parts.commit_cid], "version": 2})
    return parts.frame(blocks=encode_varint(len(bad)) + bad + car[len(header):])


def _raw_codec_record() -> bytes:
    block = cbor.encode_lex(_like(1))
    path = "app.bsky.feed.like/3knewnewnewaa"
    return build([("create", path, block)], cids={path: cbor.cid_for_raw(block)}).frame()


def _sha512_record_cid() -> bytes:
    import hashlib

    block = cbor.encode_lex(_like(1))
    cid = CID(b"\x01\x71\x13\x40" + hashlib.sha512(block).digest())
    path = "app.bsky.feed.like/3knewnewnewaa"
    return build([("create", path, block)], cids={path: cid}).frame()


def _sync_frame() -> bytes:
    parts = _like_parts()
    return encode_frame("#sync", sync_body(seq=1, did=DID, blocks=write_car([parts.commit_cid], [(parts.commit_cid, parts.commit_block)]), rev=REV, time=TIME))


def _header_variant(header: dict[str, Any]) -> bytes:
    return cbor.encode(header) + cbor.encode(_like_parts().body())


def _zero_op_time(raw_time: bytes) -> bytes:
    """A commit with no ops whose time is the given raw CBOR (no event ever writes it)."""
    body = build([]).body()
    keys = sorted(body, key=lambda k: (len(k.encode()), k.encode()))
    out = bytes([0xA0 + len(keys)])
    for k in keys:
        out += cbor.encode(k) + (raw_time if k == "time" else cbor.encode(body[k]))
    return cbor.encode({"op": 1, "t": "#commit"}) + out


def _car_same_cid_two_contents() -> bytes:
    parts = _like_parts()
    (cid,) = parts.records
    section = cid.cid_bytes + cbor.encode_lex(_like(2))
    return parts.frame(blocks=parts.car() + encode_varint(len(section)) + section)


def _commit_block_variant(unsigned: dict[str, Any]) -> bytes:
    """The like commit with a hand-made commit block (signed by KEY)."""
    parts = _like_parts()
    unsigned = {"did": DID, "version": 3, "data": parts.after, "rev": REV, "prev": None, **unsigned}
    unsigned = {k: v for k, v in unsigned.items() if v is not _DELETE}
    block = cbor.encode({**unsigned, "sig": KEY.sign(cbor.encode(unsigned))})
    parts.commit_cid, parts.commit_block = _cid(block), block
    return parts.frame()


#: NONE: both modes must decline; MAY_OFF: verify=True must decline, verify=False may take it
#: (the off mode does not hash, prove or check the commit block); MAY: either mode may take it
#: (the Python path accepts; the fast path need not)
NONE, MAY_OFF, MAY = "none", "may-off", "may"

NONE_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    # not a #commit
    ("identity", lambda: encode_frame("#identity", identity_body(seq=1, did=DID, time=TIME, handle="a.test")), NONE),
    ("account", lambda: encode_frame("#account", account_body(seq=1, did=DID, time=TIME, active=False, status="takendown")), NONE),
    ("sync", _sync_frame, NONE),
    ("info", lambda: encode_frame("#info", info_body("OutdatedCursor", "x")), NONE),
    ("error-frame", lambda: encode_error_frame("FutureCursor", "too far"), NONE),
    ("legacy-handle", lambda: encode_frame("#handle", {"seq": 1, "did": DID, "handle": "a.test", "time": TIME}), NONE),
    ("commit-body-under-#sync", lambda: encode_frame("#sync", _like_parts().body()), NONE),
    ("header-op-2", lambda: _header_variant({"op": 2, "t": "#commit"}), NONE),
    ("header-op-minus-1", lambda: _header_variant({"op": -1, "t": "#commit"}), NONE),
    ("header-no-t", lambda: _header_variant({"op": 1}), NONE),
    ("header-extra-key", lambda: _header_variant({"op": 1, "t": "#commit", "x": 1}), MAY),
    ("header-t-commit-typo", lambda: _header_variant({"op": 1, "t": "#Commit"}), NONE),
    ("empty-frame", lambda: b"", NONE),
    ("header-only", lambda: cbor.encode({"op": 1, "t": "#commit"}), NONE),
    ("body-not-a-map", lambda: cbor.encode({"op": 1, "t": "#commit"}) + cbor.encode([1]), NONE),
    # deprecated / unusual commit fields
    ("tooBig", lambda: _like_parts().frame(tooBig=True), NONE),
    ("blobs", lambda: _like_parts().frame(blobs=[CID(_RAW_PFX + bytes(32))]), NONE),
    ("blobs-not-a-list", lambda: _like_parts().frame(blobs={}), NONE),
    ("rebase", lambda: _like_parts().frame(rebase=True), MAY),
    ("extra-body-field", lambda: _like_parts().frame(zzz="?"), MAY),
    ("tooBig-absent", lambda: _like_parts().frame(tooBig=_DELETE, rebase=_DELETE, blobs=_DELETE), MAY),
    ("since-absent", lambda: _like_parts().frame(since=_DELETE), MAY),
    ("negative-seq", lambda: _like_parts().frame(seq=-5), MAY),
    # encoding of the frame
    ("trailing-bytes", lambda: _like_parts().frame() + b"\x00", NONE),
    ("two-bodies", lambda: _like_parts().frame() + cbor.encode({}), NONE),
    ("body-keys-out-of-order", _non_canonical_body, NONE),
    ("seq-non-minimal-head", lambda: _body_with("seq", b"\x1b" + (7).to_bytes(8, "big")), NONE),
    ("seq-non-minimal-1byte", lambda: _body_with("seq", b"\x18\x07"), NONE),
    ("seq-above-int64", lambda: _body_with("seq", b"\x1b" + (2**63).to_bytes(8, "big")), NONE),
    ("seq-2**64-1", lambda: _body_with("seq", b"\x1b" + (2**64 - 1).to_bytes(8, "big")), NONE),
    ("seq-float", lambda: _body_with("seq", b"\xfb" + bytes(8)), NONE),
    ("seq-half-float", lambda: _body_with("seq", b"\xf9\x3c\x00"), NONE),
    ("seq-string", lambda: _body_with("seq", cbor.encode("7")), NONE),
    ("repo-invalid-utf8", lambda: _body_with("repo", b"\x78\x20did:plc:z72i7hdynmk6r22z27h6tvu\xff"), NONE),
    ("repo-invalid-did", lambda: _like_parts().frame(repo="did:plc:"), NONE),
    ("rev-invalid", lambda: _like_parts().frame(rev="3kzzzzzzzzzz"), NONE),
    ("time-invalid-utf8", lambda: _body_with("time", b"\x62\xc3\x28"), NONE),
    ("time-invalid-utf8-no-ops", lambda: _zero_op_time(b"\x62\xc3\x28"), NONE),
    ("time-surrogate-no-ops", lambda: _zero_op_time(b"\x63\xed\xa0\x80"), NONE),
    ("time-indefinite", lambda: _body_with("time", b"\x7f\x61a\xff"), NONE),
    ("commit-tag-43", lambda: _body_with("commit", b"\xd8\x2b" + cbor.encode(b"\x00" + _like_parts().commit_cid.cid_bytes)), NONE),
    ("commit-tag-42-no-prefix", lambda: _body_with("commit", b"\xd8\x2a" + cbor.encode(_like_parts().commit_cid.cid_bytes)), NONE),
    ("commit-tag-42-on-string", lambda: _body_with("commit", b"\xd8\x2a" + cbor.encode("bafy")), NONE),
    ("commit-not-a-cid", lambda: _like_parts().frame(commit=_like_parts().commit_cid.cid_bytes), NONE),
    ("blocks-not-bytes", lambda: _like_parts().frame(blocks="x"), NONE),
    ("ops-not-a-list", lambda: _like_parts().frame(ops={}), NONE),
    ("prevData-not-a-cid", lambda: _like_parts().frame(prevData="x"), NONE),
    ("body-undefined", lambda: _body_with("time", b"\xf7"), NONE),
    # records
    ("record-float", lambda: _record_case(cbor.encode({"f": 1.5})), NONE),
    ("record-nan", lambda: _record_case(bytes.fromhex("a16166fb7ff8000000000000")), NONE),
    ("record-keys-out-of-order", lambda: _record_case(bytes.fromhex("a2616201616101")), NONE),
    ("record-duplicate-key", lambda: _record_case(bytes.fromhex("a2616101616102")), NONE),
    ("record-non-minimal-int", lambda: _record_case(bytes.fromhex("a16161180a")), NONE),
    ("record-non-minimal-length", lambda: _record_case(bytes.fromhex("a1617878016161")), NONE),
    ("record-invalid-utf8", lambda: _record_case(bytes.fromhex("a1616162ff00")), NONE),
    ("record-invalid-utf8-key", lambda: _record_case(bytes.fromhex("a161ff01")), NONE),
    ("record-tag-1", lambda: _record_case(bytes.fromhex("a16161c11a00000001")), NONE),
    ("record-tag-42-bad-cid", lambda: _record_case(bytes.fromhex("a16161d82a4400017112")), MAY),
    ("record-int-key", lambda: _record_case(bytes.fromhex("a10101")), NONE),
    ("record-undefined", lambda: _record_case(bytes.fromhex("a16161f7")), NONE),
    ("record-indefinite-map", lambda: _record_case(bytes.fromhex("bf616101ff")), NONE),
    ("record-uint64", lambda: _record_case(cbor.encode({"a": 2**64 - 1})), NONE),
    ("record-int64-min-minus-1", lambda: _record_case(cbor.encode({"a": INT64_MIN - 1})), NONE),
    ("record-array", lambda: _record_case(cbor.encode([1, 2])), NONE),
    ("record-string", lambda: _record_case(cbor.encode("a record")), NONE),
    ("record-null", lambda: _record_case(cbor.encode(None)), NONE),
    ("record-empty-block", lambda: _record_case(b""), NONE),
    ("record-trailing-bytes", lambda: _record_case(cbor.encode({"a": 1}) + b"\x00"), NONE),
    ("record-too-large", _big_record, NONE),
    ("record-raw-codec-cid", _raw_codec_record, MAY),
    ("record-sha512-cid", _sha512_record_cid, MAY_OFF),
    ("record-missing", _missing_record, NONE),
    ("record-hash-mismatch", _tampered_record, MAY_OFF),
    # commit / CAR
    ("commit-block-missing", _missing_commit_block, NONE),
    ("commit-did-mismatch", _did_mismatch, MAY_OFF),
    ("commit-rev-mismatch", _rev_mismatch, MAY_OFF),
    ("car-root-not-commit", _car_root_not_commit, MAY_OFF),
    ("car-two-roots", _car_two_roots, MAY),
    ("car-duplicate-block", _car_duplicate_block, MAY),
    ("car-trailing-garbage", _car_trailing_garbage, NONE),
    ("car-same-cid-two-contents", _car_same_cid_two_contents, MAY_OFF),
    ("commit-prev-not-null", lambda: _commit_block_variant({"prev": _filler_cid(9)}), MAY),
    ("commit-prev-absent", lambda: _commit_block_variant({"prev": _DELETE}), MAY),
    ("commit-version-2", lambda: _commit_block_variant({"version": 2}), MAY),
    ("commit-extra-field", lambda: _commit_block_variant({"zz": 1}), MAY),
    ("commit-data-not-a-link", lambda: _commit_block_variant({"data": "x"}), MAY_OFF),
    ("empty-ops-prevData-differs", lambda: build([]).frame(prevData=_filler_cid(3)), MAY_OFF),
    ("car-version-2", _car_bad_header, MAY_OFF),
    ("car-empty", lambda: _like_parts().frame(blocks=b""), NONE),
    ("too-many-ops", _too_many_ops, NONE),
    ("blocks-over-2MB", _big_blocks, NONE),
    # proof and ops
    ("prevData-mismatch", lambda: _like_parts().frame(prevData=_filler_cid(1)), MAY_OFF),
    # no prevData: ops checked against the signed tree, as in the Python path
    ("prevData-absent", lambda: _like_parts().frame(prevData=_DELETE), MAY),
    ("prevData-null", lambda: _like_parts().frame(prevData=None), MAY),
    ("update-without-prev", lambda: _ops_edit(_update_parts(), 0, prev=_DELETE), MAY_OFF),
    ("delete-without-prev", lambda: _ops_edit(_delete_parts(), 0, prev=_DELETE), MAY_OFF),
    ("update-wrong-prev", lambda: _ops_edit(_update_parts(), 0, prev=_filler_cid(999)), MAY_OFF),
    ("op-cid-not-in-tree", _wrong_op_cid, MAY_OFF),
    ("duplicate-op-path", _duplicate_op, NONE),
    ("op-unknown-action", lambda: _ops_edit(_like_parts(), 0, action="upsert"), NONE),
    ("op-create-with-prev", lambda: _ops_edit(_like_parts(), 0, prev=_filler_cid(1)), NONE),
    ("op-delete-with-cid", lambda: _ops_edit(_delete_parts(), 0, cid=_filler_cid(1)), NONE),
    ("op-update-null-cid", lambda: _ops_edit(_update_parts(), 0, cid=None), NONE),
    ("op-cid-absent", lambda: _ops_edit(_delete_parts(), 0, cid=_DELETE), NONE),
    ("op-extra-field", lambda: _ops_edit(_like_parts(), 0, zzz=1), MAY),
    ("op-not-a-map", lambda: _like_parts().frame(ops=["create"]), NONE),
    ("op-action-not-str", lambda: _ops_edit(_like_parts(), 0, action=1), NONE),
    ("collection-not-nsid", lambda: _path_case("notnsid/3knewnewnewaa"), NONE),
    ("collection-two-segments", lambda: _path_case("app.bsky/3knewnewnewaa"), NONE),
    ("rkey-too-long", lambda: _path_case("app.bsky.feed.like/" + "a" * 600), NONE),
    ("rkey-dot", lambda: _ops_edit(_like_parts(), 0, path="app.bsky.feed.like/."), NONE),
    ("rkey-space", lambda: _ops_edit(_like_parts(), 0, path="app.bsky.feed.like/a b"), NONE),
    ("path-no-slash", lambda: _ops_edit(_like_parts(), 0, path="app.bsky.feed.like"), NONE),
    ("path-two-slashes", lambda: _ops_edit(_like_parts(), 0, path="app.bsky.feed.like/a/b"), NONE),
    ("path-non-ascii", lambda: _ops_edit(_like_parts(), 0, path="app.bsky.feed.like/é"), NONE),
]


@pytest.mark.parametrize(("build_frame", "mode"), [(b, m) for _, b, m in NONE_CASES],
                         ids=[i for i, _, _ in NONE_CASES])
def test_fast_path_declines(build_frame: Callable[[], bytes], mode: str) -> None:
    frame = build_frame()
    for verify in (False, True):
        verdict = python_verdict(frame, verify)[2]  # the Python path itself must not raise
        may = mode == MAY or (mode == MAY_OFF and not verify)
        if may:
            assert_agrees(frame, verify)
        else:
            assert fast(frame, verify) is None, f"took it (verify={verify}); Python: {verdict}"


def test_none_cases_table() -> None:
    """Sanity of the table: where a case must be declined in a mode, either Python does not
    fully accept it there or the brief names it as the fast path's to decline (blobs)."""
    declined_by_contract = {"blobs"}
    wrong = []
    for name, build_frame, mode in NONE_CASES:
        frame = build_frame()
        for verify in (False, True):
            may = mode == MAY or (mode == MAY_OFF and not verify)
            if not may and name not in declined_by_contract and python_verdict(frame, verify)[2] == "ok":
                wrong.append((name, verify))
    assert wrong == []


# --- 6. PSKY_NATIVE=0 ---------------------------------------------------------------------------------


def test_module_flag_disables_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = _like_parts().frame()
    assert fast(frame, False) is not None and fast(frame, True) is not None
    monkeypatch.setattr(firehose, "NATIVE_COMMITS", False)
    assert fast(frame, False) is None and fast(frame, True) is None


def test_env_switch_disables_the_fast_path(tmp_path: Any) -> None:
    frame = _like_parts().frame()
    assert fast(frame, False) is not None
    path = tmp_path / "frame.bin"
    path.write_bytes(frame)
    code = (
        "import sys; from psky.atproto.firehose import check_commit_frame as c; "
        f"d = open({str(path)!r}, 'rb').read(); "
        "print(c(d, verify=False) is None and c(d, verify=True) is None)"
    )
    env = {**os.environ, "PSKY_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


# --- the C function itself: arguments, threads, leaks ----------------------------------------------------


def test_buffer_arguments() -> None:
    """Any contiguous buffer reads like bytes; anything else is a TypeError/BufferError, not a crash."""
    assert _native is not None
    frame = _like_parts().frame()
    want = _native.commit_fast(frame, True)
    assert want is not None
    assert _native.commit_fast(bytearray(frame), True) == want
    assert _native.commit_fast(memoryview(frame), True) == want
    for bad in (None, 1, frame.decode("latin-1"), [frame]):
        with pytest.raises(TypeError):
            _native.commit_fast(bad, True)
    try:
        got = _native.commit_fast(memoryview(frame)[::2], True)
    except (TypeError, BufferError, ValueError):
        pass
    else:
        assert got is None
    assert _native.commit_fast(b"", False) is None
    assert _native.commit_fast(frame[:1], False) is None


def test_threads_agree_with_sequential_results() -> None:
    from concurrent.futures import ThreadPoolExecutor

    frames = [f for _, f in realistic()] + _fuzz_bases()
    jobs = [(f, v) for f in frames for v in (False, True)] * 8
    want = {(f, v): fast(f, v) for f, v in jobs}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: fast(*job), jobs))
    assert got == [want[job] for job in jobs]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_leak_on_taken_or_declined_frames() -> None:
    import gc

    rng = random.Random(5)
    taken = [f for _, f in realistic()]
    declined = [_mutate(rng, b, _car_span(b)) for b in _fuzz_bases() for _ in range(100)]
    for frames, rounds in ((taken, 40), (declined, 10)):
        for verify in (False, True):
            for f in frames:
                fast(f, verify)
            gc.collect()
            before = _rss()
            for _ in range(rounds):
                for f in frames:
                    fast(f, verify)
            gc.collect()
            grown = _rss() - before
            assert grown < 4 << 20, f"RSS grew {grown >> 10} KiB over {rounds * len(frames)} calls"
