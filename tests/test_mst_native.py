"""The C inverter (psky.atproto._native) against the Python one.

Wherever the C inverter returns a root it must be the root the Python inverter returns
(with the C one switched off); where it returns None the Python code decides. It must never
crash on hostile block maps, ops or arguments. On valid covering proofs it must vouch (not
defer), or it would not speed anything up.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto import cbor, mst
from psky.atproto.cbor import CID
from psky.atproto.mst import MST, MstError, Op, invert_ops, key_height
from tests.paths import INTEROP

native = mst._native

needs_native = pytest.mark.skipif(native is None, reason="the C extension is not built")

KEY_HEIGHTS = json.loads((INTEROP / "mst" / "key_heights.json").read_text())
EXAMPLE_KEYS = [
    line.strip() for line in (INTEROP / "mst" / "example_keys.txt").read_text().splitlines() if line.strip()
]
PROOF_FIXTURES = json.loads((INTEROP / "firehose" / "commit-proof-fixtures.json").read_text())
LEAF = cbor.parse_cid("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454")


def val(i: int) -> CID:
    return cbor.cid_for_cbor(cbor.encode({"i": i}))


@contextmanager
def python_only() -> Iterator[None]:
    saved = mst.NATIVE_INVERSION
    mst.NATIVE_INVERSION = False
    try:
        yield
    finally:
        mst.NATIVE_INVERSION = saved


def python_outcome(blocks: Mapping[CID, bytes], root: Any, ops: Any, verify: bool) -> Any:
    """The Python inverter's root, or the type of the error it raises."""
    with python_only():
        try:
            return invert_ops(blocks, root, ops, verify=verify)
        except (MstError, ValueError, TypeError, AttributeError) as e:
            return type(e)


def check(blocks: Mapping[CID, bytes], root: Any, ops: Any, verify: bool) -> CID | None:
    """The C inverter defers or agrees with Python; the public API is unchanged by it."""
    assert native is not None
    raw = native.invert(blocks, root, ops, verify)
    expected = python_outcome(blocks, root, ops, verify)
    if raw is not None:
        assert type(raw) is bytes
        assert CID(raw) == expected
    saved = mst.NATIVE_INVERSION
    mst.NATIVE_INVERSION = True  # (whatever PSKY_NATIVE says)
    try:
        public: Any = invert_ops(blocks, root, ops, verify=verify)
    except (MstError, ValueError, TypeError, AttributeError) as e:
        public = type(e)
    finally:
        mst.NATIVE_INVERSION = saved
    assert public == expected
    return None if raw is None else CID(raw)


def commit(before: Sequence[tuple[str, CID]], ops: Sequence[Op]) -> tuple[CID, MST, dict[CID, bytes]]:
    """Apply ops to a tree; return (root before, tree after, covering proof)."""
    t = MST.from_entries(before)
    root_before = t.root_cid()
    for op in ops:
        if op.action == "create":
            assert op.cid is not None
            t.add(op.path, op.cid)
        elif op.action == "update":
            assert op.cid is not None
            t.update(op.path, op.cid)
        else:
            t.delete(op.path)
    return root_before, t, t.covering_proof([op.path for op in ops])


# --- the build ------------------------------------------------------------------------------


def test_built_where_a_compiler_exists() -> None:
    """CI has a compiler: a missing extension there means the build silently failed."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert native is not None, "psky.atproto._native is not built: run ./dev setup"


@needs_native
def test_psky_native_0_disables_it() -> None:
    code = "from psky.atproto import mst; print(mst.NATIVE_INVERSION)"
    env = {**os.environ, "PSKY_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    env["PSKY_NATIVE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# --- SHA-256 and key heights ----------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("portable", [False, True])
def test_sha256_matches_hashlib(portable: bool) -> None:
    import hashlib

    assert native is not None
    rnd = random.Random(7)
    for n in [*range(0, 200), 447, 448, 511, 512, 1000, 4096, 65_537]:
        data = rnd.randbytes(n)
        assert native.sha256(data, portable) == hashlib.sha256(data).digest(), n


@needs_native
def test_key_heights_match() -> None:
    assert native is not None
    for vec in KEY_HEIGHTS:
        assert native.key_height(vec["key"].encode()) == vec["height"]
    keys = [k.encode() for k in EXAMPLE_KEYS] + [random.Random(i).randbytes(i % 90) for i in range(3000)]
    for a, b in itertools.pairwise(keys):
        assert native.key_height(a) == key_height(a)
        assert native.key_heights(a, b) == (key_height(a), key_height(b))


# --- interop vectors ------------------------------------------------------------------------


def _fixture_ops(f: dict[str, Any], leaf: CID) -> list[Op]:
    return [Op("create", k, leaf) for k in f["adds"]] + [Op("delete", k, None, leaf) for k in f["dels"]]


@needs_native
@pytest.mark.parametrize("f", PROOF_FIXTURES, ids=lambda f: f["comment"])
@pytest.mark.parametrize("verify", [False, True])
def test_commit_proof_fixtures(f: dict[str, Any], verify: bool) -> None:
    leaf = cbor.parse_cid(f["leafValue"])
    tree = MST.from_entries([(k, leaf) for k in f["keys"] + f["adds"] if k not in f["dels"]])
    after = tree.root_cid()
    assert after.encode() == f["rootAfterCommit"]
    proof = tree.covering_proof(f["adds"] + f["dels"])
    ops = _fixture_ops(f, leaf)
    for order in (ops, ops[::-1], sorted(ops, key=lambda o: o.path)):
        got = check(proof, after, order, verify)
        assert got is None or got.encode() == f["rootBeforeCommit"]
    assert check(proof, after, ops, verify) is not None  # a complete proof: vouched for
    assert check(tree.blocks(), after, ops, verify) is not None
    # with any one proof node left out: defer, or the right root
    for drop in proof:
        partial = {c: b for c, b in proof.items() if c != drop}
        got = check(partial, after, ops, verify)
        assert got is None or got.encode() == f["rootBeforeCommit"]


# --- random trees and commits ---------------------------------------------------------------

_rkeys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=13)
_colls = st.sampled_from(
    ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow", "com.example.x"]
)
_keys = st.one_of(st.builds(lambda c, r: f"{c}/{r}", _colls, _rkeys), st.sampled_from(EXAMPLE_KEYS))
_key_sets = st.lists(_keys, unique=True, max_size=120)


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_key_sets, st.data(), st.booleans())
def test_prop_random_commits(keys: list[str], data: st.DataObject, verify: bool) -> None:
    """Trees of several layers, commits mixing creates, updates and deletes in any order:
    the C inverter gives the root before the commit, from the covering proof alone."""
    base = [(k, val(i)) for i, k in enumerate(keys)]
    present = [k for k, _ in base]
    dels = data.draw(st.lists(st.sampled_from(present), unique=True, max_size=5)) if present else []
    rest = [k for k in present if k not in dels]
    ups = data.draw(st.lists(st.sampled_from(rest), unique=True, max_size=3)) if rest else []
    creates = data.draw(st.lists(_keys.filter(lambda k: k not in keys), unique=True, max_size=5))
    ops = (
        [Op("create", k, val(10_000 + i)) for i, k in enumerate(creates)]
        + [Op("update", k, val(20_000 + i), dict(base)[k]) for i, k in enumerate(ups)]
        + [Op("delete", k, None, dict(base)[k]) for k in dels]
    )
    ops = data.draw(st.permutations(ops))
    before, after, proof = commit(base, ops)
    got = check(proof, after.root_cid(), ops, verify)
    assert got == before
    # ops that do not match the tree: Python decides (and raises)
    if ops:
        op = ops[0]
        wrong = op._replace(cid=val(99_999)) if op.action != "delete" else op._replace(prev=None)
        check(proof, after.root_cid(), [wrong, *ops[1:]], verify)
        check(proof, after.root_cid(), ops[1:], verify)
        check(proof, after.root_cid(), [*ops, ops[0]], verify)


@needs_native
def test_portable_sha256_path() -> None:
    """Machines without SHA-NI: the same roots and key heights."""
    assert native is not None
    with_ni = bool(native.SHA_NI)
    try:
        assert native.use_sha_ni(False) is False
        rnd = random.Random(11)
        keys = [f"app.bsky.feed.post/3k{i:05d}" for i in range(300)] + EXAMPLE_KEYS
        for _ in range(40):
            base = [(k, val(i)) for i, k in enumerate(rnd.sample(keys, 120))]
            present = dict(base)
            gone = rnd.sample(sorted(present), 2)
            new = [k for k in rnd.sample(keys, 4) if k not in present][:2]
            ops = [Op("delete", k, None, present[k]) for k in gone] + [Op("create", k, val(-1)) for k in new]
            before, after, proof = commit(base, ops)
            assert check(proof, after.root_cid(), ops, True) == before
        for vec in KEY_HEIGHTS:
            assert native.key_height(vec["key"].encode()) == vec["height"]
    finally:
        assert native.use_sha_ni(True) is with_ni


@needs_native
def test_big_block_map_is_read_lazily() -> None:
    """Maps beyond the indexed size are read through CID lookups; same answer."""
    rnd = random.Random(3)
    keys = [f"app.bsky.feed.post/3k{i:06d}" for i in rnd.sample(range(100_000), 4000)]
    base = [(k, val(i)) for i, k in enumerate(keys)]
    ops = [Op("create", "app.bsky.feed.post/3kzzz", val(1)), Op("delete", keys[5], None, val(5))]
    before, after, proof = commit(base, ops)
    blocks = after.blocks()
    assert len(blocks) > 600
    assert check(blocks, after.root_cid(), ops, False) == before
    assert check(blocks, after.root_cid(), ops, True) == before
    assert check(proof, after.root_cid(), ops, True) == before


@needs_native
def test_empty_tree_and_no_ops() -> None:
    ops = [Op("create", k, val(i)) for i, k in enumerate(EXAMPLE_KEYS[:5])]
    before, after, proof = commit([], ops)
    assert check(proof, after.root_cid(), ops, True) == before == mst.EMPTY_ROOT_CID
    t = MST.from_entries([(k, val(i)) for i, k in enumerate(EXAMPLE_KEYS)])
    assert check({}, t.root_cid(), [], True) == t.root_cid()
    # undoing a delete on the empty tree
    empty = MST.empty()
    blocks = empty.blocks()
    got = check(blocks, empty.root_cid(), [Op("delete", EXAMPLE_KEYS[3], None, val(3))], True)
    assert got == MST.from_entries([(EXAMPLE_KEYS[3], val(3))]).root_cid()


# --- hostile input --------------------------------------------------------------------------

_TREE = MST.from_entries([(k, val(i)) for i, k in enumerate(EXAMPLE_KEYS[:60])])
_BLOCKS = _TREE.blocks()
_CIDS = sorted(_BLOCKS, key=lambda c: c.cid_bytes)
_OPS = [
    [Op("create", EXAMPLE_KEYS[0], val(0))],
    [Op("delete", "zz.example/new", None, val(1))],
    [Op("update", EXAMPLE_KEYS[7], val(7), val(70)), Op("create", EXAMPLE_KEYS[30], val(30))],
]


@needs_native
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_CIDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, 2),
    st.booleans(),
)
def test_fuzz_flipped_bytes(target: CID, flips: list[tuple[int, int]], which: int, verify: bool) -> None:
    data = bytearray(_BLOCKS[target])
    for pos, x in flips:
        data[pos % len(data)] ^= x
    blocks = {**_BLOCKS, target: bytes(data)}
    check(blocks, _TREE.root_cid(), _OPS[which], verify)


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_CIDS), st.binary(max_size=300), st.integers(0, 400), st.integers(0, 2))
def test_fuzz_spliced_garbage(target: CID, junk: bytes, at: int, which: int) -> None:
    """Truncated blocks, inserted garbage, garbage in place of a block."""
    data = _BLOCKS[target]
    at %= len(data) + 1
    for mutated in (data[:at], data[:at] + junk + data[at:], junk, data[:at] + junk):
        blocks = {**_BLOCKS, target: mutated}
        check(blocks, _TREE.root_cid(), _OPS[which], False)


def _node(entries: list[tuple[int, bytes, CID | None, CID]], left: CID | None) -> bytes:
    return cbor.encode({"e": [{"p": p, "k": k, "t": t, "v": v} for p, k, t, v in entries], "l": left})


@needs_native
def test_hostile_structures() -> None:
    root = _TREE.root_cid()
    some = _CIDS[0]
    k = EXAMPLE_KEYS[0].encode()
    cases: list[bytes] = [
        # a root whose left link is itself (a cycle, possible when blocks are not re-hashed)
        _node([(0, k, None, val(0))], root),
        # huge declared lengths and counts
        b"\xa2\x61\x65\x9b\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\xa2\x61\x65\x9a\xff\xff\xff\xff" + b"\xa4\x61\x6b\x5a\xff\xff\xff\xff",
        b"\xa2\x61\x65\x81\xa4\x61\x6b\x5a\x7f\xff\xff\xff" + k,
        # non-minimal heads, wrong types, extra fields
        b"\xa2\x61\x65\x98\x00\x61\x6c\xf6",
        cbor.encode({"e": [], "l": None, "x": 1}),
        cbor.encode({"e": [{"p": 0, "k": k, "t": None, "v": val(0), "z": 0}], "l": None}),
        cbor.encode({"e": [{"p": 0, "k": "str", "t": None, "v": val(0)}], "l": None}),
        cbor.encode({"e": [{"p": -1, "k": k, "t": None, "v": val(0)}], "l": None}),
        cbor.encode({"e": [{"p": 5, "k": k, "t": None, "v": val(0)}], "l": None}),
        cbor.encode({"e": {"p": 0}, "l": None}),
        cbor.encode([1, 2, 3]),
        # odd CIDs: other lengths, codecs, a raw value link as a subtree
        _node([(0, k, None, CID(b"\x01\x71\x12\x10" + bytes(16)))], None),
        _node([(0, k, CID(b"\x01\x55\x12\x20" + bytes(32)), val(0))], None),
        _node([(0, k, None, val(0))], CID(b"\x01\x71\x12\x20" + bytes(32))),
        # keys: invalid syntax, unsorted, not maximally compressed, at the wrong layer
        _node([(0, b"no-slash", None, val(0))], None),
        _node([(0, b"a/b", None, val(0)), (0, b"a/a", None, val(1))], None),
        _node([(0, b"a/b", None, val(0)), (0, b"a/c", None, val(1))], None),
        _node([(0, k, None, val(0)), (0, k, None, val(0))], None),
        _node([(0, k, some, val(0))], some),
        b"",
        b"\xa2",
    ]
    ops_sets: list[Any] = [*_OPS, [Op("create", k.decode(), val(0))]]
    for data in cases:
        for verify in (False, True):
            for ops in ops_sets:
                check({**_BLOCKS, root: data}, root, ops, verify)
                check({root: data}, root, ops, verify)
                check({**_BLOCKS, some: data}, root, ops, verify)


@needs_native
def test_deep_chain_of_empty_nodes() -> None:
    """Empty intermediate nodes down to the deepest layers: bounded, and the right answer."""
    deep = max(EXAMPLE_KEYS, key=key_height)
    low = [k for k in EXAMPLE_KEYS if key_height(k) == 0][:3]
    ops = [Op("create", deep, val(1))]
    before, after, proof = commit([(k, val(10 + i)) for i, k in enumerate(low)], ops)
    assert check(proof, after.root_cid(), ops, True) == before
    # a node pointing to itself at every layer (blocks not re-hashed)
    fake = CID(b"\x01\x71\x12\x20" + bytes(range(32)))
    loop = {fake: cbor.encode({"e": [], "l": fake})}
    for ops2 in (ops, [Op("delete", low[0], None, val(0))]):
        check(loop, fake, ops2, False)


@needs_native
def test_hostile_arguments() -> None:
    """Odd ops and argument types: None (Python decides) or an exception, never a crash."""
    assert native is not None
    root = _TREE.root_cid()
    good = _OPS[0][0]

    class Sub(CID):
        pass

    bad_ops: list[Any] = [
        [("create", EXAMPLE_KEYS[0], val(0))],  # a 3-tuple
        [["create", EXAMPLE_KEYS[0], val(0), None]],  # a list
        [Op("create", EXAMPLE_KEYS[0].encode(), val(0))],  # type: ignore[arg-type]
        [Op("create", "app.bsky.feed.post/é", val(0))],
        [Op("create", "app.bsky.feed.post/" + "a" * 2000, val(0))],
        [Op("create", EXAMPLE_KEYS[0], Sub(val(0).cid_bytes))],
        [Op("create", EXAMPLE_KEYS[0], CID(b"\x01\x71"))],
        [Op("create", EXAMPLE_KEYS[0], CID("not bytes"))],  # type: ignore[arg-type]
        [Op("create", EXAMPLE_KEYS[0], "cid")],  # type: ignore[arg-type]
        [Op("move", EXAMPLE_KEYS[0], val(0))],
        [Op(1, EXAMPLE_KEYS[0], val(0))],  # type: ignore[arg-type]
        [good] * 300,
        "not ops",
        [None],
    ]
    for ops in bad_ops:
        for verify in (False, True):
            assert native.invert(_BLOCKS, root, ops, verify) is None

    class DictSub(dict[CID, bytes]):
        pass

    odd_maps: list[Any] = [
        list(_BLOCKS.items()),
        {c.cid_bytes: d for c, d in _BLOCKS.items()},
        {root: "text"},
        DictSub(_BLOCKS),
    ]
    for blocks in odd_maps:
        assert native.invert(blocks, root, _OPS[0], True) is None
    for r in (None, root.cid_bytes, CID(b"\x01\x55\x12\x20" + bytes(32)), Sub(root.cid_bytes)):
        assert native.invert(_BLOCKS, r, _OPS[0], True) is None
    with pytest.raises(TypeError):
        native.invert(_BLOCKS, root)  # type: ignore[call-arg]


def _put(blocks: dict[CID, bytes], data: bytes) -> CID:
    cid = cbor.cid_for_cbor(data)
    blocks[cid] = data
    return cid


@needs_native
def test_keys_at_the_wrong_layer_are_left_to_python() -> None:
    """Correctly hashed trees that break the layer rule on the edited path: the reference
    algorithm rejects them, so the C inverter must not vouch for a root."""
    by_h: dict[int, list[bytes]] = {}
    for k in sorted(EXAMPLE_KEYS):
        by_h.setdefault(key_height(k), []).append(k.encode())
    h0, h1 = by_h[0], by_h[1]
    # a root at layer 0 (its first key's) holding a layer-1 key after it: undoing the
    # create of the first key leaves the layer-1 key first, in a node at layer 0
    blocks: dict[CID, bytes] = {}
    a = h0[0]
    b = next(k for k in h1 if k > a)
    p = mst._prefix_len(a, b)
    root = _put(blocks, _node([(0, a, None, val(1)), (p, b[p:], None, val(2))], None))
    ops = [Op("create", a.decode(), val(1))]
    for verify in (False, True):
        assert python_outcome(blocks, root, ops, verify) is MstError
        assert check(blocks, root, ops, verify) is None
    # a leaf under a layer-1 root holding a key of layer 1, next to the edited key
    blocks = {}
    top = h1[len(h1) // 2]
    lows = sorted(k for k in h0 if k < top)[:2]
    bad = sorted(k for k in h1 if k < top)[:1]
    leaf_keys = sorted([*lows, *bad])
    ents: list[tuple[int, bytes, CID | None, CID]] = []
    prev = b""
    for i, k in enumerate(leaf_keys):
        p = mst._prefix_len(prev, k)
        ents.append((p, k[p:], None, val(10 + i)))
        prev = k
    leaf = _put(blocks, _node(ents, None))
    root = _put(blocks, _node([(0, top, None, val(0))], leaf))
    ops = [Op("create", lows[0].decode(), val(10 + leaf_keys.index(lows[0])))]
    for verify in (False, True):
        check(blocks, root, ops, verify)  # (the lean Python inverter carries the defect along)
