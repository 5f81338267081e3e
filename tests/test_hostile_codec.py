"""Hostile input to the protocol decoders: DAG-CBOR, CAR, firehose frames, MST walks, repos.

Each property says: for any input the function returns a value or raises its module's
documented error, nothing else; declared sizes never allocate before the bytes exist; and a
mutated input never verifies as different content. Inputs come from hypothesis (derandomized,
so every run tries the same cases) and from mutating valid samples built with psky's own
writers. Hangs are caught by the suite's faulthandler timeout (pyproject); nothing here
measures wall-clock time.
"""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto import cbor
from psky.atproto.car import (
    AsyncCarReader,
    CarError,
    CarFile,
    encode_varint,
    iter_car,
    read_car,
    write_car,
)
from psky.atproto.cbor import CID
from psky.atproto.commit import sign_commit
from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import (
    CommitEvent,
    CommitResult,
    Frame,
    FrameError,
    SyncEvent,
    commit_body,
    decode_frame,
    encode_frame,
    process_commit,
    process_sync,
    sync_body,
    to_stream_events,
)
from psky.atproto.mst import MST, MstError, Op, invert_ops, walk
from psky.atproto.repo import RepoError, RepoWriter, verify_repo, verify_repo_stream
from psky.streams.wire import MalformedMessage, parse_event

#: every property here: same cases on every run, no wall-clock deadline (a shared 2-core machine)
HOSTILE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def hostile(max_examples: int) -> settings:
    """CI size by default; ``PSKY_HOSTILE_SCALE=N`` multiplies every budget for long runs."""
    return settings(HOSTILE, max_examples=max_examples * int(os.environ.get("PSKY_HOSTILE_SCALE", "1")))

DID = "did:plc:hostilehostilehostilehos"
TIME = "2024-05-01T12:00:00.123Z"
KEY = PrivateKey.from_bytes(b"\x07" * 32, "k256")  # RFC 6979: the same signatures every run
DID_KEY = KEY.did_key()
#: extra allocation allowed while rejecting a hostile header (the input itself is not counted)
SMALL_ALLOC = 1 << 20


def _rev(n: int) -> str:
    from psky.atproto.syntax import make_tid

    return make_tid(1_700_000_000_000_000 + n, 7)


def _records(n: int, prefix: str = "") -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i in range(n):
        out[f"app.bsky.feed.post/{prefix}{i:04d}"] = {
            "$type": "app.bsky.feed.post",
            "text": f"post {i} \u00e9\u2603",
            "createdAt": TIME,
            "langs": ["en"],
        }
        out[f"app.bsky.feed.like/{prefix}{i:04d}"] = {
            "$type": "app.bsky.feed.like",
            "subject": {"uri": f"at://{DID}/app.bsky.feed.post/{i:04d}", "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
            "createdAt": TIME,
        }
    return out


def _build_samples() -> tuple[bytes, list[bytes], list[CommitResult | Any]]:
    """A repo export and #commit frames (creates, updates, deletes) with sync 1.1 proofs."""
    w = RepoWriter(DID, KEY, _records(40), rev=_rev(0))
    results = [
        w.apply_writes(
            [
                ("create", "app.bsky.feed.post", "new1", {"$type": "app.bsky.feed.post", "text": "n", "createdAt": TIME}),
                ("update", "app.bsky.feed.post", "0003", {"$type": "app.bsky.feed.post", "text": "u", "createdAt": TIME}),
                ("delete", "app.bsky.feed.like", "0005", None),
            ],
            rev=_rev(1),
        ),
        w.apply_writes(
            [("create", "app.bsky.graph.follow", "f1", {"$type": "app.bsky.graph.follow", "subject": DID, "createdAt": TIME})],
            rev=_rev(2),
        ),
        w.apply_writes([("delete", "app.bsky.feed.post", "0010", None)], rev=_rev(3)),
    ]
    frames = [r.to_frame(seq=100 + i, time=TIME) for i, r in enumerate(results)]
    return w.export_car(), frames, results


REPO_CAR, FRAMES, RESULTS = _build_samples()
REPO = verify_repo(REPO_CAR, signing_key=DID_KEY)
assert REPO.ok and REPO.signature_valid
REPO_ENTRIES = list(REPO.entries)
SYNC_FRAME = encode_frame(
    "#sync", sync_body(seq=7, did=DID, blocks=write_car([RESULTS[-1].commit_cid], [(RESULTS[-1].commit_cid, RESULTS[-1].commit_block)]), rev=_rev(3), time=TIME)
)


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """Apply flips, overwrites, deletions, insertions, truncation and extension."""
    buf = bytearray(data)
    for kind, pos, val in edits:
        if not buf:
            buf.append(val)
            continue
        i = pos % len(buf)
        if kind == "set":
            buf[i] = val
        elif kind == "flip":
            buf[i] ^= 1 << (val % 8)
        elif kind == "del":
            del buf[i : i + 1 + val % 8]
        elif kind == "ins":
            buf[i:i] = bytes([val]) * (1 + val % 4)
        elif kind == "cut":
            del buf[i:]
        elif kind == "ext":
            buf += bytes([val]) * (1 + val % 64)
        elif kind == "big":  # a huge varint / CBOR length where a length was
            buf[i : i + 1] = b"\xff\xff\xff\xff\xff\xff\xff\x7f" if val % 2 else b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff"
    return bytes(buf)


_edits = st.lists(
    st.tuples(st.sampled_from(["set", "flip", "del", "ins", "cut", "ext", "big"]), st.integers(0, 1 << 20), st.integers(0, 255)),
    min_size=1,
    max_size=6,
)


def _peak_alloc(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by Python while ``fn`` runs (its own exceptions included)."""
    tracemalloc.start()
    try:
        try:
            fn()
        except Exception:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- DAG-CBOR ------------------------------------------------------------------------------


def _decode_all_ways(data: bytes) -> None:
    for fn in (cbor.decode, cbor.decode_lex, cbor.decode_multi, cbor.decode_prefix):
        try:
            fn(data)
        except cbor.DecodeError:
            pass


@hostile(1500)
@given(st.binary(max_size=400))
def test_cbor_random_bytes_only_decode_error(data: bytes) -> None:
    _decode_all_ways(data)


_RECORD_BLOCK = cbor.encode_lex(_records(1)["app.bsky.feed.post/0000"] | {"embed": {"$type": "x", "b": {"$bytes": "AAEC"}, "l": {"$link": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}})


@hostile(1500)
@given(_edits)
def test_cbor_mutated_record_only_decode_error(edits: list[tuple[str, int, int]]) -> None:
    data = _mutate(_RECORD_BLOCK, edits)
    _decode_all_ways(data)
    try:
        value = cbor.decode_lex(data)
    except cbor.DecodeError:
        return
    orjson.dumps({"event": {"record": value}})  # what decode_lex returns always travels as JSON


@pytest.mark.parametrize(
    "head",
    [
        b"\x9b" + (2**63).to_bytes(8, "big"),  # array of 2^63 items
        b"\xbb" + (2**40).to_bytes(8, "big"),  # map of 2^40 pairs
        b"\x5b" + (2**62).to_bytes(8, "big"),  # byte string of 2^62 bytes
        b"\x7b" + (2**62).to_bytes(8, "big"),  # text string of 2^62 bytes
        b"\x9a\xff\xff\xff\xff" + b"\x00" * 1000,
    ],
)
def test_cbor_huge_declared_lengths_allocate_nothing(head: bytes) -> None:
    with pytest.raises(cbor.DecodeError):
        cbor.decode(head)
    assert _peak_alloc(lambda: cbor.decode(head)) < SMALL_ALLOC
    assert _peak_alloc(lambda: cbor.decode_lex(head)) < SMALL_ALLOC


@pytest.mark.parametrize("depth", [129, 254, 1000, 200_000])
def test_deep_nesting_decodes_without_recursion_and_never_reaches_json(depth: int) -> None:
    data = b"\xa1\x61a" + b"\x81" * depth + b"\x00"
    cbor.decode(data)  # valid DAG-CBOR: the C decoder is iterative
    with pytest.raises(cbor.DecodeError, match="nested deeper"):
        cbor.decode_lex(data)


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, -(2**63) - 1, -(2**64)])
def test_integers_beyond_64_bits_never_reach_json(value: int) -> None:
    with pytest.raises(cbor.DecodeError, match="64-bit"):
        cbor.decode_lex(cbor.encode({"$type": "app.bsky.feed.post", "n": [value]}))


@hostile(400)
@given(st.binary(min_size=1, max_size=80))
def test_invalid_utf8_in_text_strings_is_refused(raw: bytes) -> None:
    data = b"\xa1\x61t" + (b"\x78" + bytes([len(raw)]) if len(raw) >= 24 else bytes([0x60 + len(raw)])) + raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(cbor.DecodeError):
            cbor.decode(data)
        with pytest.raises(cbor.DecodeError):
            cbor.decode_lex(data)
        return
    assert cbor.decode(data) == {"t": text}


# --- CAR -----------------------------------------------------------------------------------


def _car_outcome(fn: Callable[[], CarFile]) -> tuple[list[CID], dict[CID, bytes]] | None:
    try:
        car = fn()
    except CarError:
        return None
    return car.roots, car.blocks


def _chunks(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        yield data[pos : pos + n]
        pos += n
        i += 1


async def _achunks(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    for chunk in _chunks(data, sizes):
        yield chunk


def _async_read(data: bytes, sizes: list[int]) -> CarFile:
    return asyncio.run(AsyncCarReader(_achunks(data, sizes)).read_all())


@hostile(1500)
@given(st.binary(max_size=400), st.lists(st.integers(1, 64), max_size=4))
def test_car_random_bytes_only_car_error(data: bytes, sizes: list[int]) -> None:
    whole = _car_outcome(lambda: read_car(data))
    streamed = _car_outcome(lambda: iter_car(_chunks(data, sizes)).read_all())
    assert whole == streamed


@hostile(600)
@given(_edits, st.lists(st.integers(1, 4096), max_size=3), st.booleans())
def test_car_mutated_repo_whole_and_streamed_agree(
    edits: list[tuple[str, int, int]], sizes: list[int], run_async: bool
) -> None:
    data = _mutate(REPO_CAR, edits)
    whole = _car_outcome(lambda: read_car(data))
    streamed = _car_outcome(lambda: iter_car(_chunks(data, sizes)).read_all())
    assert whole == streamed
    if run_async:
        assert _car_outcome(lambda: _async_read(data, sizes)) == whole
    if whole is not None:
        # every block that survived a mutation still hashes to its CID
        for cid, block in whole[1].items():
            assert cid.cid_bytes[4:] == cbor.cid_for_cbor(block).cid_bytes[4:] or cid.cid_bytes[1] == 0x55


def _block_spans(car: bytes) -> list[tuple[int, int]]:
    """(start, end) of every block's payload inside a CAR (after its CID)."""
    spans = []
    hlen = car[0]
    pos = 1 + hlen
    while pos < len(car):
        length, p = 0, pos
        shift = 0
        while True:
            b = car[p]
            length |= (b & 0x7F) << shift
            p += 1
            shift += 7
            if b < 0x80:
                break
        spans.append((p + 36, p + length))
        pos = p + length
    return spans


_SPANS = [s for s in _block_spans(REPO_CAR) if s[1] > s[0]]


@hostile(500)
@given(st.integers(0, len(_SPANS) - 1), st.integers(0, 1 << 20), st.integers(1, 255))
def test_car_wrong_block_hash_is_always_refused(span: int, offset: int, xor: int) -> None:
    start, end = _SPANS[span]
    buf = bytearray(REPO_CAR)
    buf[start + offset % (end - start)] ^= xor
    with pytest.raises(CarError, match="does not match its CID"):
        read_car(bytes(buf))
    with pytest.raises(CarError, match="does not match its CID"):
        iter_car(_chunks(bytes(buf), [1000])).read_all()
    with pytest.raises(RepoError):
        verify_repo(bytes(buf))


_HEADER = REPO_CAR[: 1 + REPO_CAR[0]]


@pytest.mark.parametrize(
    "data",
    [
        encode_varint(2**63 - 1) + b"\xa0",  # header declaring 2^63 bytes
        b"\xff" * 9 + b"\x01",  # varint longer than 63 bits
        b"\x80\x00",  # not minimally encoded
        _HEADER + encode_varint(2**62) + b"\x01\x71\x12\x20",  # section declaring 2^62 bytes
        _HEADER + encode_varint(3 * 1024 * 1024) + b"\x00" * 100,  # section above the block limit
        _HEADER + b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
        _HEADER + b"\x24" + b"\x01\x71\x12\x20" + b"\x00" * 10,  # truncated section
        _HEADER + b"\x00",  # zero-length section
    ],
)
def test_car_huge_or_broken_lengths_allocate_nothing(data: bytes) -> None:
    with pytest.raises(CarError):
        read_car(data)
    with pytest.raises(CarError):
        iter_car(_chunks(data, [3])).read_all()
    with pytest.raises(CarError):
        _async_read(data, [5])
    assert _peak_alloc(lambda: read_car(data)) < SMALL_ALLOC
    assert _peak_alloc(lambda: iter_car(_chunks(data, [3])).read_all()) < SMALL_ALLOC


def test_car_stream_total_limit_holds_for_an_endless_source() -> None:
    def endless() -> Iterator[bytes]:
        yield _HEADER
        section = REPO_CAR[len(_HEADER) :]
        while True:
            yield section

    with pytest.raises(CarError, match="maximum total size"):
        for _ in iter_car(endless(), max_total_size=1 << 20):
            pass


# --- firehose frames -----------------------------------------------------------------------


def _check_frame(data: bytes) -> Frame | None:
    """decode_frame → Frame or FrameError; processing never raises; every event it makes
    travels as JSON and reads back through the wire parser (or is refused as malformed)."""
    try:
        ev = decode_frame(data)
    except FrameError:
        return None
    if isinstance(ev, CommitEvent):
        res = process_commit(ev, signing_key=DID_KEY)
        assert isinstance(res, CommitResult)
        if res.ok and res.signature and res.proof:
            # a verified commit can only be one of the commits signed here, with their ops
            original = next(r for r in RESULTS if r.commit_cid == ev.commit)
            assert [(o.action, o.path, o.cid) for o in original.ops] == [
                (o.action, o.path, o.cid) for o in res.ops
            ]
        for event in to_stream_events(res, ev):
            raw = orjson.dumps(event)
            try:
                parse_event(raw)
            except MalformedMessage:
                pass
    elif isinstance(ev, SyncEvent):
        process_sync(ev, signing_key=DID_KEY)
    else:
        for event in to_stream_events(None, ev):
            orjson.dumps(event)
    return ev


@hostile(1500)
@given(st.binary(max_size=300))
def test_frames_random_bytes(data: bytes) -> None:
    _check_frame(data)


@hostile(1200)
@given(st.sampled_from(range(len(FRAMES) + 1)), _edits)
def test_frames_mutated_commits_and_syncs(which: int, edits: list[tuple[str, int, int]]) -> None:
    sample = FRAMES[which] if which < len(FRAMES) else SYNC_FRAME
    _check_frame(_mutate(sample, edits))


def test_unmutated_samples_verify() -> None:
    for data in FRAMES:
        ev = decode_frame(data)
        assert isinstance(ev, CommitEvent)
        res = process_commit(ev, signing_key=DID_KEY)
        assert res.ok and res.signature and res.proof


_TEXT_FIELDS = ["repo", "rev", "since", "time", "did", "handle", "status", "name", "message", "error"]
_nasty_text = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "'; DROP TABLE post; --",
        "\" OR 1=1 --",
        "$1",
        "%s%s%n",
        "\\",
        "\u202e\ufeff",
        "did:plc:" + "a" * 10_000,
        "x" * 1_000_000,
    ]
) | st.text(max_size=40)


@hostile(500)
@given(st.integers(0, len(FRAMES) - 1), st.sampled_from(_TEXT_FIELDS), _nasty_text, st.integers(0, 3))
def test_frames_with_hostile_text_fields(which: int, field: str, text: str, op_field: int) -> None:
    """Every text member of a #commit body (and of its ops) replaced by hostile text."""
    header, body = cbor.decode_multi(FRAMES[which])
    body = dict(body)
    if op_field == 3:
        body[field] = text
    else:
        ops = [dict(o) for o in body["ops"]]
        ops[0][["action", "path", "cid"][op_field]] = text
        body["ops"] = ops
    _check_frame(cbor.encode(header) + cbor.encode(body))


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "poison",
    [
        {"$type": "app.bsky.feed.post", "text": "deep", "createdAt": TIME, "x": _deep(300)},
        {"$type": "app.bsky.feed.post", "text": "big", "createdAt": TIME, "n": -(2**64)},
        {"$type": "app.bsky.feed.post", "text": "big", "createdAt": TIME, "n": 2**64 - 1},
    ],
)
def test_signed_commit_with_unjsonable_record_is_refused_not_crashing(poison: dict[str, Any]) -> None:
    """A correctly signed, proven commit whose record JSON cannot carry: reported as bad-record,
    no event for it, the commit's other records still come out (found by this suite: the record
    used to reach orjson in the ingester and raise there, on every replay of the frame)."""
    good = {"$type": "app.bsky.feed.post", "text": "fine", "createdAt": TIME}
    blocks = {path: cbor.encode(rec) for path, rec in (("app.bsky.feed.post/bad", poison), ("app.bsky.feed.post/good", good))}
    cids = {path: cbor.cid_for_cbor(b) for path, b in blocks.items()}
    tree = MST.from_entries(list(cids.items()))
    commit_cid, commit_block = sign_commit(DID, tree.root_cid(), _rev(9), KEY)
    car = write_car([commit_cid], [(commit_cid, commit_block), *tree.blocks().items(), *((cids[p], b) for p, b in blocks.items())])
    ops = [Op("create", p, c, None) for p, c in cids.items()]
    frame = encode_frame(
        "#commit",
        commit_body(seq=1, repo=DID, commit=commit_cid, rev=_rev(9), since=None, blocks=car, ops=ops, time=TIME,
                    prev_data=MST.empty().root_cid()),
    )
    ev = decode_frame(frame)
    assert isinstance(ev, CommitEvent)
    res = process_commit(ev, signing_key=DID_KEY)
    assert res.signature is True and res.proof is True
    assert res.reasons == ["bad-record"]
    events = to_stream_events(res, ev)
    assert [e["rkey"] for e in events] == ["good"]
    for e in events:
        parse_event(orjson.dumps(e))
    # the backfiller's path: the record is reported undecodable, the others are yielded
    repo = verify_repo(car, signing_key=DID_KEY)
    assert repo.ok
    by_key = {r.rkey: r for r in repo.records()}
    assert by_key["good"].value == good and by_key["bad"].value is None and by_key["bad"].error


# --- MST walking and repo verification ------------------------------------------------------


@hostile(600)
@given(_edits)
def test_repo_mutated_car_only_repo_error(edits: list[tuple[str, int, int]]) -> None:
    data = _mutate(REPO_CAR, edits)
    try:
        repo = verify_repo(data, signing_key=DID_KEY)
    except RepoError:
        streamed = None
    else:
        streamed = verify_repo_stream(_chunks(data, [777]), signing_key=DID_KEY)
        records = list(repo.records())
        for rec in records:
            if rec.value is not None:
                orjson.dumps(rec.value)
        if repo.ok and repo.signature_valid:
            assert repo.entries == REPO_ENTRIES  # nothing forged verifies
        assert streamed.ok == repo.ok and streamed.entries == repo.entries
        return
    with pytest.raises(RepoError):
        verify_repo_stream(_chunks(data, [777]), signing_key=DID_KEY)


# Structured fuzzing of the tree itself: node blocks stored under CIDs that need not be their
# hash (a forged block map, as a buggy store or a caller skipping verification could give), so
# cycles, shared subtrees, unsorted or invalid keys, wrong layers and dangling links all occur.

_POOL = 6
_POOL_CIDS = [cbor.cid_for_cbor(bytes([i])) for i in range(_POOL)]
_VALUE = cbor.cid_for_cbor(b"record")
_keys = st.sampled_from(
    [b"app.bsky.feed.post/a", b"app.bsky.feed.post/b", b"app.bsky.feed.post/c", b"zz/zz", b"a/b", b"", b"bad key", b"\xff\xfe", b"a/../b"]
)
_link = st.none() | st.sampled_from(_POOL_CIDS) | st.just(cbor.cid_for_raw(b"r"))
_entry = st.fixed_dictionaries(
    {"p": st.integers(0, 30), "k": _keys, "v": st.sampled_from([_VALUE, *_POOL_CIDS]), "t": _link},
)
_node = st.fixed_dictionaries({"l": _link, "e": st.lists(_entry, max_size=4)}) | st.one_of(
    st.just({"e": []}), st.just({"l": None}), st.just([]), st.just({"l": None, "e": [1]})
)


@hostile(1000)
@given(st.lists(_node, min_size=1, max_size=_POOL), st.integers(0, _POOL - 1), st.booleans())
def test_mst_forged_block_maps_only_mst_error(nodes: list[Any], root: int, strict: bool) -> None:
    blocks = {_POOL_CIDS[i]: cbor.encode(n) for i, n in enumerate(nodes)}
    root_cid = _POOL_CIDS[root]
    try:
        entries = list(walk(blocks, root_cid, strict=strict))
    except MstError:
        pass
    else:
        assert len(entries) <= 4 * _POOL  # each node is visited once: no cycle is followed
    try:
        tree = MST.load(blocks, root_cid)
        list(tree.items())
        tree.get("app.bsky.feed.post/b")
        tree.root_cid()
    except MstError:
        pass
    try:
        invert_ops(blocks, root_cid, [Op("create", "app.bsky.feed.post/b", _VALUE, None)], verify=False)
    except MstError:
        pass
    try:
        invert_ops(blocks, root_cid, [Op("delete", "app.bsky.feed.post/a", None, _VALUE)], verify=True)
    except MstError:
        pass


def test_mst_self_cycle_and_long_chain_terminate() -> None:
    a, b = _POOL_CIDS[0], _POOL_CIDS[1]
    cyclic = {a: cbor.encode({"l": b, "e": []}), b: cbor.encode({"l": a, "e": []})}
    for strict in (True, False):
        with pytest.raises(MstError):
            list(walk(cyclic, a, strict=strict))
    with pytest.raises(MstError):
        list(MST.load(cyclic, a).items())
    # a chain of 50,000 forged nodes (no keys) is walked iteratively, without recursion
    chain = [cbor.cid_for_cbor(i.to_bytes(4, "big")) for i in range(50_001)]
    long = {chain[i]: cbor.encode({"l": chain[i + 1], "e": []}) for i in range(50_000)}
    long[chain[-1]] = cbor.encode({"l": None, "e": [{"p": 0, "k": b"a/b", "v": _VALUE, "t": None}]})
    assert list(walk(long, chain[0], strict=False)) == [("a/b", _VALUE)]
    with pytest.raises(MstError):
        list(walk(long, chain[0], strict=True))
    with pytest.raises(MstError):
        list(MST.load(long, chain[0]).items())


def test_oversized_commit_frame_is_flagged_with_bounded_memory() -> None:
    """A 3 MB ``blocks`` field and 1,000 ops (limits: 2 MB, 200): decoded, flagged ``too-big``,
    and processed within a small multiple of the frame's own size."""
    header, body = cbor.decode_multi(FRAMES[0])
    body = dict(body)
    body["blocks"] = body["blocks"] + b"\x00" * 3_000_000
    body["ops"] = body["ops"] * 1000
    frame = cbor.encode(header) + cbor.encode(body)
    ev = decode_frame(frame)
    assert isinstance(ev, CommitEvent)
    res = process_commit(ev, signing_key=DID_KEY)
    assert "too-big" in res.reasons
    assert _peak_alloc(lambda: process_commit(decode_frame(frame), signing_key=DID_KEY)) < 4 * len(frame)
