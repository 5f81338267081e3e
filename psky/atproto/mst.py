"""Merkle Search Tree: the key → record-CID map inside every atproto repository.

Each key's layer is the number of leading zero bits of ``sha256(key)`` counted in 2-bit
chunks (fanout 4). A node at layer L holds the keys of layer L within its key range, in
order, with links to layer L-1 subtrees before, between and after them. Node encoding
(DAG-CBOR)::

    {"l": CID | null, "e": [{"p": prefix_len, "k": key_suffix, "v": record CID, "t": CID | null}]}

Keys are prefix-compressed against the previous key of the same node. The shape depends
only on the key set, so root CIDs are reproducible across implementations. Empty nodes
exist only as the root of an empty repo, or as intermediate nodes that keep subtree links
from skipping a layer.

Three ways in:

* :func:`walk` — fast, iterative, validating in-order scan of a complete tree (backfill).
* :class:`MST` — an immutable-node tree with copy-on-write mutation, lazily loaded from a
  block map so partial trees (firehose CAR slices) work until a missing node is needed.
* :func:`covering_proof` / :func:`invert_ops` — the sync 1.1 inductive proof: the nodes a
  commit must carry, and the inversion of its operations back to ``prevData`` (a lean
  byte-splicing inverter for the firehose hot path, backed by the thorough one on MST).
"""

from __future__ import annotations

import hashlib
import os
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, AnyStr, Final, NamedTuple, TypeAlias

import cbrrr

from psky.atproto import cbor
from psky.atproto.cbor import CID

__all__ = [
    "EMPTY_ROOT_CID",
    "MAX_KEY_LEN",
    "MST",
    "MissingBlock",
    "MstError",
    "Op",
    "common_prefix_len",
    "covering_proof",
    "invert_ops",
    "is_valid_key",
    "key_height",
    "list_entries",
    "split_key",
    "walk",
]

#: longest repo path (MST key) accepted, in bytes
MAX_KEY_LEN: Final = 1024

_sha256 = hashlib.sha256
# collection "/" record key; neither segment may be "." or ".."
_KEY_RE: Final = re.compile(rb"(?!\.\.?/)[A-Za-z0-9._:~-]+/(?!\.\.?\Z)[A-Za-z0-9._:~-]+\Z")

try:  # the C inverter, built by ``pip install`` where a compiler exists (setup.py)
    from psky.atproto import _native
except ImportError:  # pragma: no cover - a machine without a compiler
    _native = None  # type: ignore[assignment]

#: whether :func:`invert_ops` tries the C inverter first (built, and not disabled with
#: ``PSKY_NATIVE=0``); benchmarks and tests may flip it at run time
NATIVE_INVERSION: bool = _native is not None and os.environ.get("PSKY_NATIVE", "1") != "0"

_EMPTY_BYTES: Final = cbor.encode({"l": None, "e": []})
#: root CID of a repository with no records
EMPTY_ROOT_CID: Final = cbor.cid_for_cbor(_EMPTY_BYTES)


class MstError(ValueError):
    """An invalid MST (structure, encoding, keys) or an invalid MST operation."""


class MissingBlock(MstError):
    """A node needed for the requested operation is not in the block map."""

    def __init__(self, cid: CID, what: str = "MST node") -> None:
        self.cid = cid
        super().__init__(f"{what} {cid.encode()} is missing from the blocks")


# --- keys -------------------------------------------------------------------------------


def key_height(key: str | bytes) -> int:
    """Layer of a key: leading zero bits of its SHA-256, halved (rounded down)."""
    if isinstance(key, str):
        key = key.encode()
    digest = _sha256(key).digest()
    first = digest[0]
    # nearly every key is decided by the first byte
    if first >= 64:
        return 0
    if first >= 16:
        return 1
    if first >= 4:
        return 2
    if first:
        return 3
    return (256 - int.from_bytes(digest, "big").bit_length()) >> 1


def _prefix_len(a: bytes, b: bytes) -> int:
    """Shared prefix of two byte strings: the highest differing bit of their XOR."""
    n = min(len(a), len(b))
    if not n:
        return 0
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - ((x.bit_length() + 7) >> 3)


def common_prefix_len(a: AnyStr, b: AnyStr) -> int:
    """Length of the shared prefix of two keys (bytes: in bytes; str: in characters)."""
    if isinstance(a, bytes) and isinstance(b, bytes):
        return _prefix_len(a, b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: binary search on slice equality
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def is_valid_key(key: str | bytes) -> bool:
    """Repo path syntax: ``collection/rkey`` from the allowed ASCII set, ≤ 1024 bytes."""
    if isinstance(key, str):
        if not key.isascii():
            return False
        key = key.encode()
    return len(key) <= MAX_KEY_LEN and _KEY_RE.match(key) is not None


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, str):
        raw = key.encode("utf-8", "surrogateescape")
    elif isinstance(key, bytes):
        raw = key
    else:
        raise MstError(f"MST key must be str or bytes, not {type(key).__name__}")
    if len(raw) > MAX_KEY_LEN or _KEY_RE.match(raw) is None:
        raise MstError(f"invalid MST key (repo path): {key!r:.200}")
    return raw


def split_key(key: str) -> tuple[str, str]:
    """``"collection/rkey"`` → ``("collection", "rkey")``; MstError if not a valid repo path."""
    if not isinstance(key, str) or not is_valid_key(key):
        raise MstError(f"invalid repo path: {key!r:.200}")
    collection, _, rkey = key.partition("/")
    return collection, rkey


# --- node decoding ----------------------------------------------------------------------


def _parse_node(
    data: bytes, cid: CID, strict: bool
) -> tuple[CID | None, list[bytes], list[CID], list[CID | None]]:
    """Decode one node block → (left link, full keys, values, right links).

    Strict: ``l``/``t`` present and blessed dag-cbor links, keys valid, sorted within the
    node, canonically prefix-compressed. Always: the shape needed to decode at all.
    """
    try:
        obj = cbor.decode(data)
    except cbor.DecodeError as e:
        raise MstError(f"MST node {cid.encode()}: {e}") from None
    if type(obj) is not dict:
        raise MstError(f"MST node {cid.encode()} is not a map")
    ents = obj.get("e")
    if type(ents) is not list:
        raise MstError(f"MST node {cid.encode()}: 'e' missing or not a list")
    if strict and "l" not in obj:
        raise MstError(f"MST node {cid.encode()}: 'l' missing")
    left = obj.get("l")
    if left is not None:
        if not isinstance(left, CID):
            raise MstError(f"MST node {cid.encode()}: 'l' is not a link")
        if strict and not left.is_cidv1_dag_cbor_sha256_32():
            raise MstError(f"MST node {cid.encode()}: 'l' is not a dag-cbor sha-256 CID")
    keys: list[bytes] = []
    vals: list[CID] = []
    rights: list[CID | None] = []
    prev = b""
    fields = _ENTRY_FIELDS
    for ent in ents:
        try:
            p, k, v, t = fields(ent)
        except (KeyError, TypeError):
            p, k, v, t = _entry_fallback(ent, cid, strict)
        if type(p) is not int or type(k) is not bytes or type(v) is not CID:
            raise MstError(f"MST node {cid.encode()}: entry needs integer p, bytes k and link v")
        if t is not None:
            if type(t) is not CID:
                raise MstError(f"MST node {cid.encode()}: 't' is not a link")
            if strict and not t.is_cidv1_dag_cbor_sha256_32():
                raise MstError(f"MST node {cid.encode()}: 't' is not a dag-cbor sha-256 CID")
        if p < 0 or p > len(prev):
            raise MstError(
                f"MST node {cid.encode()}: prefix length {p} exceeds the previous key ({len(prev)} bytes)"
            )
        key = prev[:p] + k if p else k
        if strict:
            if p < len(prev) and k and k[0] == prev[p]:
                raise MstError(f"MST node {cid.encode()}: key {key!r:.80} is not maximally prefix-compressed")
            if key <= prev and keys:
                raise MstError(f"MST node {cid.encode()}: keys out of order at {key!r:.80}")
            if len(key) > MAX_KEY_LEN or _KEY_RE.match(key) is None:
                raise MstError(f"MST node {cid.encode()}: invalid key {key!r:.200}")
        keys.append(key)
        vals.append(v)
        rights.append(t)
        prev = key
    return left, keys, vals, rights


_ENTRY_FIELDS: Final = itemgetter("p", "k", "v", "t")
_NODE_PFX: Final = CID.CIDV1_DAG_CBOR_SHA256_32_PFX
#: the plain C decoder, for node blocks already checked against their CID
_c_decode: Final = cbor._c_decode
_DECODE_ERRORS: Final = (
    ValueError,
    TypeError,
    EOFError,
    OverflowError,
    RecursionError,
    cbrrr.CbrrrDecodeError,
)


def _entry_fallback(ent: object, cid: CID, strict: bool) -> tuple[object, object, object, object]:
    """Slow path of entry decoding: explain what is wrong (non-strict: ``t`` may be absent)."""
    if type(ent) is not dict:
        raise MstError(f"MST node {cid.encode()}: entry is not a map")
    if strict and "t" not in ent:
        raise MstError(f"MST node {cid.encode()}: entry without 't'")
    return ent.get("p"), ent.get("k"), ent.get("v"), ent.get("t")


# --- walking a complete tree ------------------------------------------------------------


def walk(blocks: Mapping[CID, bytes], root: CID, *, strict: bool = True) -> Iterator[tuple[str, CID]]:
    """Yield ``(key, record CID)`` in key order, iteratively.

    Every node is visited once (a repeated node — a cycle or shared subtree — is an error).
    ``strict`` checks the whole structure: keys strictly increasing across the tree and
    valid, each key at its node's layer, subtrees exactly one layer lower, no empty
    non-root node without a subtree link, no empty root pointing to a subtree, canonical
    node encoding. Missing nodes raise :class:`MissingBlock`.
    """
    seen: set[CID] = set()
    # stack items: (CID, layer) for nodes, (key bytes, value CID) for leaves
    stack: list[tuple[CID, int] | tuple[bytes, CID]] = [(root, -1)]
    pop = stack.pop
    push = stack.append
    last = b""
    first = True
    while stack:
        a, b = pop()
        if type(a) is bytes:
            if strict:
                if a <= last and not first:
                    raise MstError(f"MST keys out of order: {a!r:.80} after {last!r:.80}")
                last = a
                first = False
                yield a.decode("ascii"), b  # type: ignore[misc]
            else:
                yield a.decode("utf-8", "surrogateescape"), b  # type: ignore[misc]
            continue
        cid: CID = a  # type: ignore[assignment]
        layer: int = b  # type: ignore[assignment]
        if cid in seen:
            raise MstError(f"MST node {cid.encode()} is reached twice (cycle or shared subtree)")
        seen.add(cid)
        data = blocks.get(cid)
        if data is None:
            raise MissingBlock(cid)
        left, keys, vals, rights = _parse_node(data, cid, strict)
        if strict:
            if keys:
                if layer < 0:
                    layer = key_height(keys[0])
                for k in keys:
                    if key_height(k) != layer:
                        raise MstError(
                            f"MST node {cid.encode()}: key {k!r:.80} has layer {key_height(k)}, node is at {layer}"
                        )
            elif layer < 0:
                if left is not None:
                    raise MstError(f"MST root {cid.encode()} is an empty node pointing to a subtree")
            elif left is None:
                raise MstError(f"MST node {cid.encode()} is empty")
            if layer <= 0 and (left is not None or any(rights)):
                raise MstError(f"MST node {cid.encode()} at layer 0 links to a subtree")
        if left is None and not any(rights):
            # a node without subtrees (most of them): its entries come next, emit them now
            if strict:
                if keys and keys[0] <= last and not first:
                    raise MstError(f"MST keys out of order: {keys[0]!r:.80} after {last!r:.80}")
                if keys:
                    last = keys[-1]
                    first = False
                for i, k in enumerate(keys):
                    yield k.decode("ascii"), vals[i]
            else:
                for i, k in enumerate(keys):
                    yield k.decode("utf-8", "surrogateescape"), vals[i]
            continue
        child = layer - 1
        for i in range(len(keys) - 1, -1, -1):
            t = rights[i]
            if t is not None:
                push((t, child))
            push((keys[i], vals[i]))
        if left is not None:
            push((left, child))


def list_entries(blocks: Mapping[CID, bytes], root: CID, *, strict: bool = True) -> list[tuple[str, CID]]:
    """All ``(key, record CID)`` pairs of a complete tree, in key order."""
    return list(walk(blocks, root, strict=strict))


# --- in-memory tree ---------------------------------------------------------------------


class _Node:
    """One node; never mutated after construction except that a subtree given as a CID may
    be replaced by the equivalent loaded node (memoized lazy loading)."""

    __slots__ = ("cid", "data", "keys", "loaded", "subs", "vals")

    def __init__(
        self,
        keys: list[bytes],
        vals: list[CID],
        subs: list[_Ref],
        cid: CID | None = None,
        data: bytes | None = None,
        loaded: bool = False,
    ) -> None:
        self.keys = keys
        self.vals = vals
        self.subs = subs  # len(keys) + 1: subs[0] = "l", subs[i + 1] = entry i's "t"
        self.cid = cid
        self.data = data
        self.loaded = loaded


_Ref: TypeAlias = "_Node | CID | None"


def _mk(keys: list[bytes], vals: list[CID], subs: list[_Ref]) -> _Node | None:
    """A node, or None when it would be empty with no subtree."""
    if not keys and subs[0] is None:
        return None
    return _Node(keys, vals, subs)


def _ref_cid(ref: _Ref) -> CID | None:
    if ref is None:
        return None
    if type(ref) is _Node:
        return _node_cid(ref)
    return ref  # type: ignore[return-value]


def _node_cid(n: _Node) -> CID:
    """CID of a node, encoding it (and new children) on first use."""
    c = n.cid
    if c is None:
        subs = n.subs
        vals = n.vals
        ents = []
        prev = b""
        for i, k in enumerate(n.keys):
            p = _prefix_len(prev, k)
            ents.append({"p": p, "k": k[p:], "v": vals[i], "t": _ref_cid(subs[i + 1])})
            prev = k
        data = cbor.encode({"e": ents, "l": _ref_cid(subs[0])})
        c = cbor.cid_for_cbor(data)
        n.data = data
        n.cid = c
    return c


def _node_block(n: _Node) -> tuple[CID, bytes]:
    c = _node_cid(n)
    assert n.data is not None
    return c, n.data


def _bounds(n: _Node, i: int, lo: bytes | None, hi: bytes | None) -> tuple[bytes | None, bytes | None]:
    """Exclusive key bounds of subtree slot ``i`` of a node whose own bounds are (lo, hi)."""
    keys = n.keys
    return (keys[i - 1] if i else lo), (keys[i] if i < len(keys) else hi)


def _build(
    keys: list[bytes], vals: list[CID], heights: list[int], lo: int, hi: int, layer: int
) -> _Node | None:
    """Bulk construction of the subtree for sorted ``keys[lo:hi]`` at ``layer``."""
    if lo >= hi:
        return None
    if layer == 0:
        return _Node(keys[lo:hi], vals[lo:hi], [None] * (hi - lo + 1))
    here = [i for i in range(lo, hi) if heights[i] == layer]
    below = layer - 1
    if not here:
        return _Node([], [], [_build(keys, vals, heights, lo, hi, below)])
    subs: list[_Ref] = []
    start = lo
    for i in here:
        subs.append(_build(keys, vals, heights, start, i, below))
        start = i + 1
    subs.append(_build(keys, vals, heights, start, hi, below))
    return _Node([keys[i] for i in here], [vals[i] for i in here], subs)


class MST:
    """A Merkle Search Tree with copy-on-write mutation and lazy loading.

    Nodes are immutable and shared between copies (:meth:`copy` is O(1)). A tree made with
    :meth:`load` decodes and validates nodes only when an operation reaches them, so a
    partial block map (a commit's CAR slice) supports every operation whose path it covers;
    otherwise :class:`MissingBlock` names the node that was needed.
    """

    __slots__ = ("_base", "_base_cid", "_layer", "_loaded", "_root", "_source", "_verify")

    def __init__(
        self,
        root: _Node | CID | None,
        layer: int,
        source: Mapping[CID, bytes] | None = None,
        verify: bool = False,
    ) -> None:
        self._root: _Node | CID | None = root
        self._layer = layer  # layer of the root node (-1 while the root is not loaded)
        self._source = source
        self._verify = verify
        self._base: _Node | None = None  # the loaded original root, for diffs
        self._base_cid: CID | None = root if isinstance(root, CID) else None
        self._loaded: dict[CID, _Node] = {}  # every node decoded from the source, for diffs

    # construction -----------------------------------------------------------------------

    @classmethod
    def empty(cls) -> MST:
        return cls(None, 0)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str | bytes, CID]]) -> MST:
        """Build from (key, CID) pairs in any order, in one bottom-up pass (no per-key inserts)."""
        items: list[tuple[bytes, CID]] = []
        for key, val in entries:
            if not isinstance(val, CID):
                raise MstError(f"value for {key!r:.80} is not a CID")
            items.append((_key_bytes(key), val))
        items.sort(key=lambda kv: kv[0])
        keys = [k for k, _ in items]
        for i in range(1, len(keys)):
            if keys[i] == keys[i - 1]:
                raise MstError(f"duplicate MST key {keys[i]!r:.80}")
        if not keys:
            return cls.empty()
        heights = [key_height(k) for k in keys]
        top = max(heights)
        return cls(_build(keys, [v for _, v in items], heights, 0, len(keys), top), top)

    @classmethod
    def load(cls, blocks: Mapping[CID, bytes], root: CID, *, verify: bool = False) -> MST:
        """A lazily loaded tree over ``blocks``; ``verify`` re-hashes every node it loads."""
        if not isinstance(root, CID):
            raise MstError("MST root must be a CID")
        if not root.is_cidv1_dag_cbor_sha256_32():
            raise MstError(f"MST root {root.encode()} is not a dag-cbor sha-256 CID")
        return cls(root, -1, blocks, verify)

    def copy(self) -> MST:
        """An independent tree sharing all nodes (mutations of either do not affect the other)."""
        other = MST(self._root, self._layer, self._source, self._verify)
        other._base = self._base
        other._base_cid = self._base_cid
        other._loaded = self._loaded
        return other

    # loading ----------------------------------------------------------------------------

    def _block(self, cid: CID) -> bytes:
        src = self._source
        data = src.get(cid) if src is not None else None
        if data is None:
            raise MissingBlock(cid)
        if self._verify and (
            not cid.is_cidv1_dag_cbor_sha256_32() or _sha256(data).digest() != cid.cid_bytes[4:]
        ):
            raise MstError(f"MST node {cid.encode()} does not match its CID")
        return data

    def _load(self, cid: CID, layer: int, lo: bytes | None, hi: bytes | None) -> _Node:
        """Load and validate a non-root node expected at ``layer`` with keys in (lo, hi)."""
        data = self._block(cid)
        left, keys, vals, rights = _parse_node(data, cid, True)
        if keys:
            for k in keys:
                if key_height(k) != layer:
                    raise MstError(
                        f"MST node {cid.encode()}: key {k!r:.80} has layer {key_height(k)}, expected {layer}"
                    )
            if (lo is not None and keys[0] <= lo) or (hi is not None and keys[-1] >= hi):
                raise MstError(f"MST node {cid.encode()}: keys outside the range of its parent slot")
        elif left is None:
            raise MstError(f"MST node {cid.encode()} is empty")
        if layer == 0 and (left is not None or any(rights)):
            raise MstError(f"MST node {cid.encode()} at layer 0 links to a subtree")
        node = _Node(keys, vals, [left, *rights], cid, data, True)
        self._loaded[cid] = node
        return node

    def _root_node(self) -> _Node | None:
        r = self._root
        if r is None or type(r) is _Node:
            return r
        assert isinstance(r, CID)
        data = self._block(r)
        left, keys, vals, rights = _parse_node(data, r, True)
        if not keys:
            if left is not None:
                raise MstError(f"MST root {r.encode()} is an empty node pointing to a subtree")
            self._root = None
            self._layer = 0
            return None
        layer = key_height(keys[0])
        for k in keys:
            if key_height(k) != layer:
                raise MstError(f"MST root {r.encode()}: key {k!r:.80} is not at layer {layer}")
        if layer == 0 and (left is not None or any(rights)):
            raise MstError(f"MST node {r.encode()} at layer 0 links to a subtree")
        node = _Node(keys, vals, [left, *rights], r, data, True)
        self._root = node
        self._layer = layer
        if self._base_cid == r:
            self._base = node
        return node

    def _child(self, n: _Node, i: int, layer: int, lo: bytes | None, hi: bytes | None) -> _Node | None:
        """Subtree slot ``i`` of ``n`` (at ``layer``), loading and memoizing it if needed."""
        s = n.subs[i]
        if s is None or type(s) is _Node:
            return s
        assert isinstance(s, CID)
        c = self._load(s, layer, *_bounds(n, i, lo, hi))
        n.subs[i] = c
        return c

    def _slot(self, n: _Node, i: int, layer: int, lo: bytes | None, hi: bytes | None) -> _Node | None:
        """Like :meth:`_child`, given the slot's own bounds (lo, hi)."""
        s = n.subs[i]
        if s is None or type(s) is _Node:
            return s
        assert isinstance(s, CID)
        c = self._load(s, layer, lo, hi)
        n.subs[i] = c
        return c

    # reading ----------------------------------------------------------------------------

    @property
    def height(self) -> int:
        """Layer of the root node (0 for an empty tree)."""
        self._root_node()
        return self._layer

    def get(self, key: str | bytes) -> CID | None:
        """Record CID at ``key``, or None. Only nodes on the key's path are loaded."""
        kb = _key_bytes(key)
        node = self._root_node()
        h = key_height(kb)
        layer = self._layer
        if node is None or h > layer:
            return None
        lo: bytes | None = None
        hi: bytes | None = None
        while True:
            keys = node.keys
            i = bisect_left(keys, kb)
            if layer == h:
                return node.vals[i] if i < len(keys) and keys[i] == kb else None
            nlo, nhi = _bounds(node, i, lo, hi)
            child = self._child(node, i, layer - 1, lo, hi)
            if child is None:
                return None
            node, layer, lo, hi = child, layer - 1, nlo, nhi

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, bytes)) and self.get(key) is not None

    def items(self) -> Iterator[tuple[str, CID]]:
        """In-order ``(key, CID)`` pairs (loads the whole tree)."""
        root = self._root_node()
        if root is None:
            return
        stack: list[tuple[_Node, int, bytes | None, bytes | None] | tuple[bytes, CID]] = [
            (root, self._layer, None, None)
        ]
        while stack:
            item = stack.pop()
            if len(item) == 2:
                yield item[0].decode("ascii"), item[1]
                continue
            n, layer, lo, hi = item
            for i in range(len(n.keys), -1, -1):
                c = self._child(n, i, layer - 1, lo, hi) if n.subs[i] is not None else None
                if c is not None:
                    stack.append((c, layer - 1, *_bounds(n, i, lo, hi)))
                if i:
                    stack.append((n.keys[i - 1], n.vals[i - 1]))

    def entries(self) -> list[tuple[str, CID]]:
        """All ``(key, CID)`` pairs in key order."""
        return list(self.items())

    def root_cid(self) -> CID:
        """CID of the root node (computes CIDs of changed nodes only)."""
        r = self._root
        if r is None:
            return EMPTY_ROOT_CID
        if type(r) is _Node:
            return _node_cid(r)
        assert isinstance(r, CID)
        return r

    def _nodes(self) -> Iterator[_Node]:
        root = self._root_node()
        if root is None:
            return
        stack: list[tuple[_Node, int, bytes | None, bytes | None]] = [(root, self._layer, None, None)]
        while stack:
            n, layer, lo, hi = stack.pop()
            yield n
            for i, s in enumerate(n.subs):
                if s is not None:
                    c = self._child(n, i, layer - 1, lo, hi)
                    assert c is not None
                    stack.append((c, layer - 1, *_bounds(n, i, lo, hi)))

    def blocks(self) -> dict[CID, bytes]:
        """Every node block of the tree (loads the whole tree)."""
        if self._root_node() is None:
            return {EMPTY_ROOT_CID: _EMPTY_BYTES}
        return dict(_node_block(n) for n in self._nodes())

    def new_blocks(self) -> dict[CID, bytes]:
        """Node blocks of the current tree that were not in the loaded block map.

        For a tree built in memory (``empty``/``from_entries``) that is every node.
        """
        src = self._source
        root = self._root
        if root is None:
            return {} if src is not None and EMPTY_ROOT_CID in src else {EMPTY_ROOT_CID: _EMPTY_BYTES}
        if type(root) is not _Node:
            return {}
        out: dict[CID, bytes] = {}
        stack = [root]
        while stack:
            n = stack.pop()
            if n.loaded:
                continue
            c, data = _node_block(n)
            if src is None or c not in src:
                out[c] = data
            stack.extend(s for s in n.subs if type(s) is _Node and not s.loaded)
        return out

    def removed_cids(self) -> set[CID]:
        """CIDs of nodes of the loaded tree that the current tree no longer contains."""
        base_cid = self._base_cid
        if base_cid is None:
            return set()
        kept: set[CID] = set()
        root = self._root
        if root is None:
            kept.add(EMPTY_ROOT_CID)
        elif type(root) is not _Node:
            kept.add(root)  # type: ignore[arg-type]
        else:
            stack = [root]
            while stack:
                n = stack.pop()
                kept.add(_node_cid(n))
                if n.loaded:
                    continue
                for s in n.subs:
                    if type(s) is _Node:
                        stack.append(s)
                    elif s is not None:
                        kept.add(s)  # type: ignore[arg-type]
        if base_cid in kept:
            return set()
        removed = {base_cid}
        if self._base is not None:
            # replaced nodes were all loaded on the way to a change; unloaded ones were kept
            loaded = self._loaded
            todo: list[_Node] = [self._base]
            while todo:
                n = todo.pop()
                for s in n.subs:
                    if s is None:
                        continue
                    c = s.cid if type(s) is _Node else s
                    if c in kept:
                        continue
                    child = s if type(s) is _Node else loaded.get(c)  # type: ignore[arg-type]
                    if child is not None:
                        removed.add(c)  # type: ignore[arg-type]
                        todo.append(child)
        return removed

    # mutation ---------------------------------------------------------------------------

    def add(self, key: str | bytes, cid: CID) -> None:
        """Insert a new key; MstError if it is already present."""
        kb = _key_bytes(key)
        if self.get(kb) is not None:
            raise MstError(f"MST key {key!r:.200} already exists")
        self._put(kb, cid)

    def update(self, key: str | bytes, cid: CID) -> None:
        """Change the value of an existing key; MstError if it is absent."""
        kb = _key_bytes(key)
        if self.get(kb) is None:
            raise MstError(f"MST key {key!r:.200} does not exist")
        self._put(kb, cid)

    def set(self, key: str | bytes, cid: CID) -> CID | None:
        """Insert or update; returns the previous value."""
        kb = _key_bytes(key)
        prev = self.get(kb)
        if prev != cid:
            self._put(kb, cid)
        return prev

    def delete(self, key: str | bytes) -> CID:
        """Remove a key and return its value; MstError if it is absent."""
        kb = _key_bytes(key)
        prev = self.get(kb)
        if prev is None:
            raise MstError(f"MST key {key!r:.200} does not exist")
        self._remove(kb)
        return prev

    def discard(self, key: str | bytes) -> CID | None:
        """Remove a key if present; returns its previous value."""
        kb = _key_bytes(key)
        prev = self.get(kb)
        if prev is not None:
            self._remove(kb)
        return prev

    def _put(self, kb: bytes, val: CID) -> None:
        if not isinstance(val, CID):
            raise MstError("MST values must be CIDs")
        h = key_height(kb)
        root = self._root_node()
        layer = self._layer
        if root is None:
            self._root = _Node([kb], [val], [None, None])
            self._layer = h
        elif h > layer:
            # the new key becomes the (new) root's only key: split the whole tree around it
            left, right = self._split(root, layer, kb, None, None)
            for _ in range(layer + 1, h):
                left = _Node([], [], [left]) if left is not None else None
                right = _Node([], [], [right]) if right is not None else None
            self._root = _Node([kb], [val], [left, right])
            self._layer = h
        else:
            self._root = self._insert(root, layer, kb, val, h, None, None)

    def _insert(
        self, n: _Node | None, layer: int, kb: bytes, val: CID, h: int, lo: bytes | None, hi: bytes | None
    ) -> _Node:
        if n is None:
            if h == layer:
                return _Node([kb], [val], [None, None])
            return _Node([], [], [self._insert(None, layer - 1, kb, val, h, lo, hi)])
        keys = n.keys
        i = bisect_left(keys, kb)
        if h == layer:
            if i < len(keys) and keys[i] == kb:
                vals = n.vals.copy()
                vals[i] = val
                return _Node(keys, vals, n.subs)
            sub = self._child(n, i, layer - 1, lo, hi)
            left, right = self._split(sub, layer - 1, kb, *_bounds(n, i, lo, hi))
            return _Node(
                [*keys[:i], kb, *keys[i:]],
                [*n.vals[:i], val, *n.vals[i:]],
                [*n.subs[:i], left, right, *n.subs[i + 1 :]],
            )
        clo, chi = _bounds(n, i, lo, hi)
        sub = self._child(n, i, layer - 1, lo, hi)
        subs = n.subs.copy()
        subs[i] = self._insert(sub, layer - 1, kb, val, h, clo, chi)
        return _Node(keys, n.vals, subs)

    def _split(
        self, n: _Node | None, layer: int, kb: bytes, lo: bytes | None, hi: bytes | None
    ) -> tuple[_Node | None, _Node | None]:
        """Split a subtree around a key that is not in it (the key lives higher up)."""
        if n is None:
            return None, None
        keys = n.keys
        i = bisect_left(keys, kb)
        if n.subs[i] is None:
            if i == len(keys):
                return n, None
            if i == 0:
                return None, n
            sl: _Node | None = None
            sr: _Node | None = None
        else:
            sub = self._child(n, i, layer - 1, lo, hi)
            sl, sr = self._split(sub, layer - 1, kb, *_bounds(n, i, lo, hi))
        return (
            _mk(keys[:i], n.vals[:i], [*n.subs[:i], sl]),
            _mk(keys[i:], n.vals[i:], [sr, *n.subs[i + 1 :]]),
        )

    def _remove(self, kb: bytes) -> None:
        root = self._root_node()
        assert root is not None
        layer = self._layer
        new = self._delete(root, layer, kb, key_height(kb), None, None)
        # an emptied root gives way to its only subtree, repeatedly
        while new is not None and not new.keys:
            layer -= 1
            new = self._slot(new, 0, layer, None, None)
        self._root = new
        self._layer = layer if new is not None else 0

    def _delete(
        self, n: _Node, layer: int, kb: bytes, h: int, lo: bytes | None, hi: bytes | None
    ) -> _Node | None:
        keys = n.keys
        i = bisect_left(keys, kb)
        if layer == h:
            # keys[i] == kb (checked by the caller); join the subtrees on either side of it
            lo_i = keys[i - 1] if i else lo
            hi_i = keys[i + 1] if i + 1 < len(keys) else hi
            merged = self._merge(n, i, n, i + 1, layer - 1, lo_i, kb, hi_i)
            return _mk(
                [*keys[:i], *keys[i + 1 :]],
                [*n.vals[:i], *n.vals[i + 1 :]],
                [*n.subs[:i], merged, *n.subs[i + 2 :]],
            )
        clo, chi = _bounds(n, i, lo, hi)
        sub = self._child(n, i, layer - 1, lo, hi)
        assert sub is not None
        subs = n.subs.copy()
        subs[i] = self._delete(sub, layer - 1, kb, h, clo, chi)
        return _mk(keys, n.vals, subs)

    def _merge(
        self,
        pa: _Node,
        ia: int,
        pb: _Node,
        ib: int,
        layer: int,
        lo: bytes | None,
        mid: bytes,
        hi: bytes | None,
    ) -> _Ref:
        """Join the adjacent subtrees in slot ``ia`` of ``pa`` and slot ``ib`` of ``pb`` (both at
        ``layer``; all keys of the first < mid < all keys of the second)."""
        a_ref = pa.subs[ia]
        b_ref = pb.subs[ib]
        if a_ref is None:
            return b_ref
        if b_ref is None:
            return a_ref
        a = self._slot(pa, ia, layer, lo, mid)
        b = self._slot(pb, ib, layer, mid, hi)
        assert a is not None and b is not None
        a_hi = a.keys[-1] if a.keys else lo
        b_lo = b.keys[0] if b.keys else hi
        inner = self._merge(a, len(a.keys), b, 0, layer - 1, a_hi, mid, b_lo)
        return _Node([*a.keys, *b.keys], [*a.vals, *b.vals], [*a.subs[:-1], inner, *b.subs[1:]])

    # proofs -----------------------------------------------------------------------------

    def covering_proof(self, keys: Iterable[str | bytes]) -> dict[CID, bytes]:
        """Node blocks proving the presence or absence of each key, with enough context to
        undo an insert or delete of it (sync 1.1 operation inversion).

        Per key: the path from the root towards the key; where the key is present, also the
        rightmost spine of the subtree just before it and the leftmost spine of the subtree
        just after it (the nodes a deletion would merge). Matches the reference
        implementation's ``getCoveringProof``.
        """
        out: dict[CID, bytes] = {}
        wanted = [_key_bytes(k) for k in keys]
        if not wanted:
            return out
        root = self._root_node()
        if root is None:
            out[EMPTY_ROOT_CID] = _EMPTY_BYTES
            return out
        for kb in wanted:
            self._proof_for(root, kb, out)
        return out

    def _spine(
        self,
        n: _Node | None,
        layer: int,
        lo: bytes | None,
        hi: bytes | None,
        rightmost: bool,
        out: dict[CID, bytes],
    ) -> None:
        while n is not None:
            c, data = _node_block(n)
            out[c] = data
            i = len(n.keys) if rightmost else 0
            if n.subs[i] is None:
                return
            nlo, nhi = _bounds(n, i, lo, hi)
            n = self._child(n, i, layer - 1, lo, hi)
            layer, lo, hi = layer - 1, nlo, nhi

    def _proof_for(self, root: _Node, kb: bytes, out: dict[CID, bytes]) -> None:
        n: _Node | None = root
        layer = self._layer
        lo: bytes | None = None
        hi: bytes | None = None
        while n is not None:
            c, data = _node_block(n)
            out[c] = data
            keys = n.keys
            i = bisect_left(keys, kb)
            if i < len(keys) and keys[i] == kb:
                lo_i = keys[i - 1] if i else lo
                hi_i = keys[i + 1] if i + 1 < len(keys) else hi
                if n.subs[i] is not None:
                    self._spine(self._child(n, i, layer - 1, lo, hi), layer - 1, lo_i, kb, True, out)
                if n.subs[i + 1] is not None:
                    self._spine(self._child(n, i + 1, layer - 1, lo, hi), layer - 1, kb, hi_i, False, out)
                return
            if n.subs[i] is None:
                return
            nlo, nhi = _bounds(n, i, lo, hi)
            n = self._child(n, i, layer - 1, lo, hi)
            layer, lo, hi = layer - 1, nlo, nhi


def covering_proof(
    tree_or_blocks: MST | Mapping[CID, bytes], root: CID | None, keys: Iterable[str | bytes]
) -> dict[CID, bytes]:
    """Node blocks proving each key's presence/absence in the tree at ``root`` (see
    :meth:`MST.covering_proof`). With an MST, ``root`` may be None (its current root)."""
    if isinstance(tree_or_blocks, MST):
        tree = tree_or_blocks
        if root is not None and root != tree.root_cid():
            raise MstError("root does not match the given tree")
    else:
        if root is None:
            raise MstError("a root CID is needed to prove against a block map")
        tree = MST.load(tree_or_blocks, root)
    return tree.covering_proof(keys)


# --- operation inversion ----------------------------------------------------------------


class Op(NamedTuple):
    """One record operation of a commit, as in a firehose ``#commit`` event."""

    action: str  # "create" | "update" | "delete"
    path: str
    cid: CID | None
    prev: CID | None = None


def _check_op(op: Op) -> None:
    if op.action == "create":
        ok = isinstance(op.cid, CID) and op.prev is None
    elif op.action == "update":
        ok = isinstance(op.cid, CID) and isinstance(op.prev, CID)
    elif op.action == "delete":
        ok = op.cid is None and isinstance(op.prev, CID)
    else:
        raise MstError(f"unknown op action {op.action!r:.40}")
    if not ok:
        raise MstError(
            f"{op.action} {op.path!r:.200}: needs "
            + {"create": "cid and no prev", "update": "cid and prev", "delete": "prev and no cid"}[op.action]
        )


def _invert_order(ops: Sequence[Op]) -> list[list[Op]]:
    """Orders in which inversion is attempted: as given, then deletes first by path, then
    reverse path order. A spec-compliant proof works in any order; some producers include
    only what one order needs, and any order that succeeds yields the same (canonical) tree."""
    given = list(ops)
    orders = [given]
    for cand in (
        sorted(given, key=lambda o: (o.action != "delete", o.path)),
        sorted(given, key=lambda o: o.path, reverse=True),
    ):
        if cand not in orders:
            orders.append(cand)
    return orders


def invert_ops(
    blocks: Mapping[CID, bytes], root_after: CID, ops: Sequence[Op], *, verify: bool = True
) -> CID:
    """Undo a commit's operations on its (partial) tree; return the MST root before it.

    Uses only ``blocks``. ``verify`` re-hashes each node as it is loaded; pass False only
    when every block was already checked against its CID (``read_car(..., verify=True)``).
    Each op must agree with the tree after the commit: created/updated keys map to
    ``op.cid``, deleted keys are absent. Raises MissingBlock when the proof lacks a needed
    node and MstError for invalid ops or trees. The caller compares the result with the
    event's ``prevData``.

    The C inverter (:data:`NATIVE_INVERSION`) makes the reference algorithm's edits with its
    checks on every node it loads, and returns None for anything it does not vouch for;
    then the Python inverters below run as if it did not exist.

    A lean inverter handles the usual case; anything it does not vouch for (a missing node,
    an irregular node on the edited path, an op that does not match the tree) is decided
    again by the thorough algorithm (:func:`_invert_thorough`), which also produces every
    error. For a tree the thorough algorithm accepts the result is the same. The lean one
    skips checks away from the edits (the layer and syntax of keys the ops do not touch,
    entries of nodes it only passes through): a tree that fails only those yields a root,
    not an error, but that root carries the same defect and so cannot equal a valid
    ``prevData`` (see the notes on the fast inverter below).
    """
    if NATIVE_INVERSION:
        raw = _native.invert(blocks, root_after, ops, verify)
        if raw is not None:
            return CID(raw)
    root = _invert_fast(blocks, root_after, ops, verify)
    if root is not None:
        return root
    return _invert_thorough(blocks, root_after, ops, verify)


def _invert_thorough(blocks: Mapping[CID, bytes], root_after: CID, ops: Sequence[Op], verify: bool) -> CID:
    """The reference inversion on :class:`MST`: checks every op against the tree first, then
    undoes them, retrying other orders when a node is missing (see :func:`_invert_order`)."""
    seen: set[str] = set()
    keyed: list[tuple[Op, bytes]] = []
    for op in ops:
        _check_op(op)
        if op.path in seen:
            raise MstError(f"path {op.path!r:.200} appears in more than one op")
        seen.add(op.path)
        keyed.append((op, _key_bytes(op.path)))
    tree = MST.load(blocks, root_after, verify=verify)
    for op, kb in keyed:
        current = tree.get(kb)
        if op.action == "delete":
            if current is not None:
                raise MstError(f"delete {op.path}: key is still in the tree")
        elif current != op.cid:
            found = current.encode() if current is not None else "nothing"
            raise MstError(f"{op.action} {op.path}: tree holds {found}, op says {op.cid}")
    first_missing: MissingBlock | None = None
    for order in _invert_order(ops):
        t = tree.copy()
        try:
            for op in order:
                kb = _key_bytes(op.path)
                if op.action == "create":
                    t._remove(kb)
                else:
                    assert op.prev is not None
                    t._put(kb, op.prev)
            return t.root_cid()
        except MissingBlock as e:
            if first_missing is None:
                first_missing = e
    assert first_missing is not None
    raise first_missing


# --- fast operation inversion -----------------------------------------------------------
#
# The lean inverter below makes the same tree edits as the thorough one with far less work
# per node, trusting only what it checks. It relies on the block map being content-
# addressed (each block is what its CID says: re-hashed here, or by the caller's CAR reader).
#
# * Every node is decoded with the strict C decoder, so its bytes are canonical DAG-CBOR:
#   each item has exactly one encoding, and a link occurs in the bytes exactly where the
#   decoded node has it. Nodes and entries must have exactly their fields (the thorough
#   path would drop others when re-encoding, so they would not survive a splice).
# * Nodes the edits merely pass through on the way down ("light" nodes) are read only up
#   to the key's slot. Their new bytes are their old bytes with the one changed child link
#   spliced in (where that link occurs exactly once), so everything else they hold is
#   carried into the computed tree unchanged.
# * In the key's own node, the common edits (removing or adding a key that has no subtree
#   beside it, changing a value) are splices of the entries involved, after checking those
#   entries' order and prefix compression. Other edits (merges, splits, new subtrees) run
#   on fully decoded nodes checked like the thorough path does (node shape, links, key
#   order and prefix compression, parent-slot bounds, no empty nodes, no subtrees at layer
#   0) and re-encode them.
# * Key heights (a SHA-256 each) are computed for the ops' keys and the roots only.
#
# Why the checks it skips cannot let an invalid tree pass: inversion keeps every other key,
# entry and node byte-for-byte (or by CID) except the spliced parts, and splits and merges
# keep keys within their layer. The inverter checks that the computed root sits at its
# first key's layer, which pins the layer of every node. So a defect in the unchecked parts
# of the tree after the commit (a key at the wrong layer, a malformed key or CID, unsorted
# keys away from the edits) is still present in the computed tree before it, whose root
# then cannot be a valid ``prevData``: at most an equally broken previous tree could match.
# A key an op removes does not stay, so it is checked against its in-order neighbours in
# the nodes at hand (its node, the merged spines, the slot bounds met on the way down), as
# the thorough path does. Anything unexpected ends the fast attempt, and the thorough
# algorithm decides (and produces the error).


class _Bail(Exception):
    """Raised inside the fast inverter for anything it leaves to the thorough one."""


class _Other(Exception):
    """The key's own node needs a general edit rather than a splice."""


#: how a 36-byte CID link is encoded in DAG-CBOR: tag 42, bytes(37), identity multibase 0x00
_LINK: Final = b"\xd8\x2a\x58\x25\x00"
#: every canonical MST node starts with map(2), "e" (keys sort by length, then bytes)
_NODE_START: Final = b"\xa2\x61\x65"
#: unexpected shapes met while reading light nodes (wrong types, missing fields)
_SHAPE_ERRORS: Final = (KeyError, TypeError, IndexError, AttributeError)

#: a subtree in the fast inverter: a node, or the CID bytes of a link not yet followed
_FRef: TypeAlias = "_FNode | _LNode | bytes | None"
_Path: TypeAlias = "list[tuple[_LNode, int, int, bytes | None, bytes | None]]"


def _head(major: int, n: int) -> bytes:
    """Canonical CBOR head of a major type with argument ``n`` (< 2**16 here)."""
    if n < 24:
        return bytes((major | n,))
    if n < 256:
        return bytes((major | 24, n))
    if n < 65536:
        return bytes((major | 25, n >> 8, n & 0xFF))
    raise _Bail


_UINT: Final = [_head(0x00, n) for n in range(256)]
_BYTES: Final = [_head(0x40, n) for n in range(256)]


def _entry_bytes(p: int, suffix: bytes, t: bytes | bytearray | None, v: bytes | bytearray) -> bytes:
    """Canonical encoding of one node entry {"k", "p", "t", "v"} (36-byte links)."""
    if len(v) != 36 or (t is not None and len(t) != 36):
        raise _Other
    n = len(suffix)
    return b"".join(
        (
            b"\xa4\x61k",
            _BYTES[n] if n < 256 else _head(0x40, n),
            suffix,
            b"\x61p",
            _UINT[p] if p < 256 else _head(0x00, p),
            b"\x61t\xf6" if t is None else b"\x61t" + _LINK + t,
            b"\x61v" + _LINK,
            v,
        )
    )


class _FNode:
    """A fully decoded node of the fast inverter.

    Loaded nodes know their CID bytes ``cb`` and canonical ``data`` and are never changed;
    ``src`` is the node itself. A node derived from one by replacing values or subtrees
    (and nothing else: ``keys`` is the very same list) keeps that loaded node as ``src``, so
    its bytes are the source bytes with the changed links spliced in. Other new nodes have
    no ``src``.
    """

    __slots__ = ("cb", "data", "keys", "src", "subs", "vals")

    def __init__(
        self, keys: list[bytes], vals: list[CID], subs: list[_FRef], src: _FNode | None = None
    ) -> None:
        self.keys = keys
        self.vals = vals
        self.subs = subs  # len(keys) + 1: subs[0] = "l", subs[i + 1] = entry i's "t"
        self.src = src
        self.cb: bytes | None = None
        self.data: bytes | None = None


class _LNode:
    """A light node: bytes and their decoded entries (links as bytearray), not unpacked.

    A loaded one has its CID bytes ``cb``; a fresh one (made by a splice in the key's node)
    has only ``data`` until its CID is needed, and ``ents`` only once something reads them.
    A node that edits passed through is derived from one of those (``src``) with ``over``:
    the new subtrees by slot; its bytes are the source bytes with those links spliced in.
    """

    __slots__ = ("cb", "data", "ents", "left", "over", "src")

    def __init__(
        self,
        src: _LNode | None,
        ents: Any,
        left: Any,
        over: dict[int, _FRef] | None,
        cb: bytes | None = None,
        data: bytes | None = None,
    ) -> None:
        self.src: _LNode = src if src is not None else self
        self.ents = ents
        self.left = left
        self.over = over
        self.cb = cb
        self.data = data


def _light_decode(data: bytes) -> tuple[Any, Any]:
    """(entries, left link) of a node, strictly decoded; links come out as bytearray."""
    if not data.startswith(_NODE_START):
        raise _Bail
    try:
        obj, used = _c_decode(data, bytearray, False)
    except _DECODE_ERRORS:
        raise _Bail from None
    if used != len(data):
        raise _Bail
    return obj["e"], obj["l"]


def _ents(src: _LNode) -> Any:
    """Entries of a loaded or fresh light node (decoding a fresh one on first use)."""
    ents = src.ents
    if ents is None:
        assert src.data is not None
        ents, _ = _light_decode(src.data)
        src.ents = ents
    return ents


def _link_bytes(raw: object) -> bytes | None:
    """A decoded light-node link as CID bytes, if it is a dag-cbor SHA-256 CID."""
    if raw is None:
        return None
    if type(raw) is not bytearray or len(raw) != 36 or raw[:4] != _NODE_PFX:
        raise _Bail
    return bytes(raw)


def _fparse(data: bytes, layer: int) -> _FNode:
    """Decode a node block with the strict C decoder and check it fully (but for key layers
    and key syntax); ``layer`` 0 forbids subtree links, -1 does not know the layer."""
    if not data.startswith(_NODE_START):
        raise _Bail
    try:
        obj, used = _c_decode(data, CID, False)
    except _DECODE_ERRORS:
        raise _Bail from None
    if used != len(data) or type(obj) is not dict or len(obj) != 2:
        raise _Bail
    try:
        ents = obj["e"]
        left = obj["l"]
    except KeyError:
        raise _Bail from None
    if type(ents) is not list:
        raise _Bail
    if left is not None:
        if layer == 0 or type(left) is not CID:
            raise _Bail
        left = left.cid_bytes
        if len(left) != 36 or left[:4] != _NODE_PFX:
            raise _Bail
    keys: list[bytes] = []
    vals: list[CID] = []
    subs: list[_FRef] = [left]
    prev = b""
    fields = _ENTRY_FIELDS
    for ent in ents:
        if type(ent) is not dict or len(ent) != 4:
            raise _Bail
        try:
            p, k, v, t = fields(ent)
        except KeyError:
            raise _Bail from None
        if type(p) is not int or type(k) is not bytes or type(v) is not CID:
            raise _Bail
        if p == 0:
            key = k
            if prev and k[:1] == prev[:1]:
                raise _Bail  # not maximally prefix-compressed
        elif 0 < p <= len(prev):
            key = prev[:p] + k
            if p < len(prev) and k[:1] == prev[p : p + 1]:
                raise _Bail
        else:
            raise _Bail
        if key <= prev:
            raise _Bail  # out of order, repeated, or empty
        if t is not None:
            if layer == 0 or type(t) is not CID:
                raise _Bail
            t = t.cid_bytes
            if len(t) != 36 or t[:4] != _NODE_PFX:
                raise _Bail
        keys.append(key)
        vals.append(v)
        subs.append(t)
        prev = key
    node = _FNode(keys, vals, subs)
    node.src = node
    node.data = data
    return node


def _lscan(ents: Any, kb: bytes) -> tuple[int, bytes | None, bytes]:
    """Slot of ``kb`` among a light node's entries: (i, keys[i] or None past the end,
    keys[i - 1] or b"" at the start). Reads entries only up to the slot."""
    prev = b""
    i = 0
    for e in ents:
        p = e["p"]
        key = prev[:p] + e["k"] if p else e["k"]
        if key >= kb:
            return i, key, prev
        prev = key
        i += 1
    return i, None, prev


def _first_key(ents: Any) -> bytes:
    """The first key of a node's decoded entries (the node must have one)."""
    e = ents[0]
    k = e["k"]
    if e["p"] != 0 or type(k) is not bytes:
        raise _Bail
    return k


def _spliced(data: bytes, count: int, new_count: int, old: bytes, new: bytes) -> bytes:
    """Node bytes with the entries ``old`` (found exactly once) replaced by ``new`` and the
    entry count changed (``_Other`` when ``old`` is not found exactly once)."""
    j = data.find(old)
    if j < 0 or data.find(old, j + 1) >= 0:
        raise _Other
    head = _head(0x80, count)
    if data[3 : 3 + len(head)] != head:
        raise _Bail
    return b"".join((data[:3], _head(0x80, new_count), data[3 + len(head) : j], new, data[j + len(old) :]))


def _fmk(keys: list[bytes], vals: list[CID], subs: list[_FRef]) -> _FNode | None:
    """A new node, or None when it would be empty with no subtree."""
    if not keys and subs[0] is None:
        return None
    return _FNode(keys, vals, subs)


def _fderive(n: _FNode, vals: list[CID], subs: list[_FRef]) -> _FNode | None:
    """``n`` with other values/subtrees and the same keys (bytes patchable from its source)."""
    if not n.keys and subs[0] is None:
        return None
    return _FNode(n.keys, vals, subs, n.src)


def _link(ref: _FRef) -> CID | None:
    """A subtree reference as the CID to encode."""
    if ref is None:
        return None
    return CID(ref if type(ref) is bytes else _fcid(ref))  # type: ignore[arg-type]


def _fencode(n: _FNode) -> bytes:
    """Canonical node bytes, built from scratch."""
    subs = n.subs
    vals = n.vals
    ents = []
    prev = b""
    for i, k in enumerate(n.keys):
        p = _prefix_len(prev, k)
        ents.append({"p": p, "k": k[p:], "v": vals[i], "t": _link(subs[i + 1])})
        prev = k
    return cbor.encode({"e": ents, "l": _link(subs[0])})


def _splice(data: bytes, old: bytes | bytearray, new: bytes) -> bytes:
    """Replace the one link to ``old`` in node bytes by a link to ``new`` (both 36 bytes)."""
    pat = _LINK + old
    j = data.find(pat)
    if j < 0 or len(old) != 36 or len(new) != 36 or data.find(pat, j + 1) >= 0:
        raise _Bail
    return data[: j + 5] + new + data[j + 41 :]


def _fbytes(n: _FNode) -> bytes:
    """Bytes of a full node: its source's bytes with changed values and links spliced in,
    or a fresh encoding when there is no source or a change is not a link swap."""
    src = n.src
    if src is None:
        return _fencode(n)
    data = src.data
    assert data is not None
    try:
        for i, v in enumerate(n.vals):
            o = src.vals[i]
            if v is not o and v != o:
                data = _splice(data, o.cid_bytes, v.cid_bytes)
        for i, x in enumerate(n.subs):
            ob = src.subs[i]
            if x is ob:
                continue
            if x is None or ob is None:
                return _fencode(n)
            nb = x if type(x) is bytes else _fcid(x)  # type: ignore[arg-type]
            if nb != ob:
                data = _splice(data, ob, nb)  # type: ignore[arg-type]
    except _Bail:
        return _fencode(n)
    return data


def _fcid(n: _FNode | _LNode) -> bytes:
    """CID bytes of a node, encoding it (and new children) on first use."""
    cb = n.cb
    if cb is not None:
        return cb
    data: bytes | None
    if isinstance(n, _FNode):
        data = _fbytes(n)
    elif n.over is None:
        data = n.data  # a fresh light node
    else:
        src = n.src
        data = src.data
        ents = src.ents
        for i, ref in n.over.items():
            old = ents[i - 1]["t"] if i else src.left
            new = ref if type(ref) is bytes else _fcid(ref)  # type: ignore[arg-type]
            if new != old:
                assert data is not None
                data = _splice(data, old, new)
    assert data is not None
    cb = _NODE_PFX + _sha256(data).digest()
    n.cb = cb
    n.data = data
    return cb


class _FastInverter:
    """One inversion over one block map.

    A single op on a layer-0 key (most commits) first tries the straight path
    (:meth:`splice_op`): down through nodes with a link in the key's slot, a splice in the
    key's node, and new CIDs back up. Other commits, and ops needing merges, splits or new
    subtrees, take the general path (:meth:`cow_ops`): copy-on-write edits of light and full
    nodes, as the thorough algorithm does, hashing the changed nodes once at the end.
    """

    __slots__ = ("decoded", "get", "verify")

    def __init__(self, blocks: Mapping[CID, bytes], verify: bool) -> None:
        self.verify = verify
        # CIDs hash and compare in Python: a small map (a commit's blocks) is re-keyed by
        # their bytes once; a big one is read through CID objects
        if len(blocks) <= 64:
            self.get: Callable[[bytes], bytes | None] = {c.cid_bytes: d for c, d in blocks.items()}.get
        else:
            self.get = lambda cb: blocks.get(CID(cb))
        #: nodes decoded once to be read again (handed from one path to the other)
        self.decoded: dict[bytes, tuple[bytes, Any, Any]] = {}

    # loading ----------------------------------------------------------------------------

    def block(self, cb: bytes) -> bytes:
        data = self.get(cb)
        if data is None or (self.verify and _sha256(data).digest() != cb[4:]):
            raise _Bail
        return data

    def fetch(self, cb: bytes) -> tuple[bytes, Any, Any]:
        """(bytes, entries, left link) of a node, decoded (links as bytearray) and checked
        for exactly the node's fields."""
        done = self.decoded.pop(cb, None)
        if done is not None:
            return done
        data = self.block(cb)
        if data[:3] != _NODE_START:
            raise _Bail
        try:
            obj, used = _c_decode(data, bytearray, False)
        except _DECODE_ERRORS:
            raise _Bail from None
        ents = obj["e"]
        # exactly the four entry fields: the reference drops others when it re-encodes a
        # node, so a node carrying them cannot be spliced. (Four on average is enough: an
        # entry lacking one is an error for the reference too, and then the node is carried
        # unchanged into a tree that is just as invalid.) The map itself has exactly two.
        if used != len(data) or sum(map(len, ents)) != 4 * len(ents):
            raise _Bail
        return data, ents, obj["l"]

    def light(self, cb: bytes) -> _LNode:
        data, ents, left = self.fetch(cb)
        return _LNode(None, ents, left, None, cb, data)

    def checked(
        self, data: bytes, cb: bytes | None, layer: int, lo: bytes | None, hi: bytes | None
    ) -> _FNode:
        """A strictly parsed node expected at ``layer`` with keys strictly inside (lo, hi)."""
        if layer < 0:
            raise _Bail
        n = _fparse(data, layer)
        keys = n.keys
        if keys:
            if (lo is not None and keys[0] <= lo) or (hi is not None and keys[-1] >= hi):
                raise _Bail
        elif n.subs[0] is None:
            raise _Bail  # an empty node
        n.cb = cb
        return n

    def materialize(self, n: _LNode, layer: int, lo: bytes | None, hi: bytes | None) -> _FNode:
        """The full, checked form of a light node (with its replaced subtrees)."""
        src = n.src
        assert src.data is not None
        full = self.checked(src.data, src.cb, layer, lo, hi)
        if src.cb is None:
            full.src = None  # a fresh node: nothing to splice from
        if not n.over:
            return full
        subs = full.subs.copy()
        for i, ref in n.over.items():
            subs[i] = ref
        return _FNode(full.keys, full.vals, subs, full.src)

    def node(
        self, ref: _FRef, layer: int, lo: bytes | None, hi: bytes | None, full: bool
    ) -> _FNode | _LNode | None:
        """Resolve a subtree reference; ``full`` when its keys are about to change."""
        if ref is None or type(ref) is _FNode:
            return ref
        if layer < 0:
            raise _Bail
        if type(ref) is _LNode:
            return self.materialize(ref, layer, lo, hi) if full else ref
        if full:
            return self.checked(self.block(ref), ref, layer, lo, hi)  # type: ignore[arg-type]
        return self.light(ref)  # type: ignore[arg-type]

    def full(self, ref: _FRef, layer: int, lo: bytes | None, hi: bytes | None) -> _FNode | None:
        n = self.node(ref, layer, lo, hi, True)
        assert n is None or type(n) is _FNode
        return n

    # copy-on-write descent through light nodes --------------------------------------------

    def descend(
        self,
        n: _FNode | _LNode,
        layer: int,
        kb: bytes,
        h: int,
        lo: bytes | None = None,
        hi: bytes | None = None,
    ) -> tuple[_Path, _FNode | _LNode | None, int, bytes | None, bytes | None]:
        """Follow ``kb`` from ``n`` (keys within (lo, hi)) through light nodes down to layer
        ``h``, a full node, or a missing subtree; returns the path (node, slot, layer,
        bounds) and where it stopped, with its bounds."""
        path: _Path = []
        cur: _FNode | _LNode | None = n
        while layer > h and type(cur) is _LNode:
            src = cur.src
            ents = src.ents
            if ents is None:
                ents = _ents(src)
            # the slot: entries up to the first key >= kb (keys rebuilt from their prefixes)
            prev = b""
            i = 0
            ki = None
            for e in ents:
                p = e["p"]
                key = prev[:p] + e["k"] if p else e["k"]
                if key >= kb:
                    if key == kb:
                        raise _Bail  # the key sits above its layer
                    ki = key
                    break
                prev = key
                i += 1
            over = cur.over
            if over is not None and i in over:
                ref = over[i]
            else:
                raw = ents[i - 1]["t"] if i else src.left
                if raw is None:
                    ref = None
                elif type(raw) is not bytearray or len(raw) != 36 or raw[:4] != _NODE_PFX:
                    raise _Bail
                else:
                    ref = bytes(raw)
            path.append((cur, i, layer, lo, hi))
            if i:
                lo = prev
            if ki is not None:
                hi = ki
            layer -= 1
            if type(ref) is bytes:
                cur = self.light(ref)
            else:
                cur = ref  # type: ignore[assignment]
                if cur is None:
                    break
        return path, cur, layer, lo, hi

    def rebuild(self, path: _Path, new: _FNode | _LNode | None) -> _FNode | _LNode | None:
        """Replace the changed subtree along the path, bottom up."""
        for n, i, layer, lo, hi in reversed(path):
            if new is None:
                full = self.materialize(n, layer, lo, hi)
                subs = full.subs.copy()
                subs[i] = None
                new = _fderive(full, full.vals, subs)
            else:
                over = n.over
                over = {i: new} if over is None else {**over, i: new}
                new = _LNode(n.src, n.ents, n.left, over)
        return new

    # splices in the key's node -------------------------------------------------------------

    def cut(self, data: bytes, ents: Any, left: Any, kb: bytes, val: CID) -> bytes:
        """Node bytes without key ``kb`` (at its layer), when no subtree is beside it and the
        node keeps an entry (``_Other`` otherwise: a general edit)."""
        count = len(ents)
        i, ki, prev = _lscan(ents, kb)
        if ki != kb:
            raise _Bail  # not in the tree
        e = ents[i]
        if e["v"] != val.cid_bytes:
            raise _Bail
        if e["t"] is not None or (ents[i - 1]["t"] if i else left) is not None or count == 1:
            raise _Other  # subtrees to merge, or the node goes away
        pk = e["p"]
        if pk != (_prefix_len(prev, kb) if i else 0):
            raise _Bail  # not canonically compressed
        old = _entry_bytes(pk, e["k"], None, e["v"])
        mid = b""
        if i + 1 < count:
            en = ents[i + 1]
            pn = en["p"]
            if pn > len(kb):
                raise _Bail
            nxt = kb[:pn] + en["k"]
            if nxt <= kb or pn != _prefix_len(kb, nxt):
                raise _Bail
            old += _entry_bytes(pn, en["k"], en["t"], en["v"])
            np = min(pk, pn) if i else 0
            mid = _entry_bytes(np, nxt[np:], en["t"], en["v"])
        return _spliced(data, count, count - 1, old, mid)

    def paste(self, data: bytes, ents: Any, left: Any, kb: bytes, val: CID, expect: CID | None) -> bytes:
        """Node bytes with key ``kb`` added (at its layer) or its value changed, when the slot
        it goes into has no subtree (``_Other`` otherwise)."""
        count = len(ents)
        i, ki, prev = _lscan(ents, kb)
        if ki == kb:
            e = ents[i]
            if expect is None or e["v"] != expect.cid_bytes:
                raise _Bail  # present / another value
            old = _entry_bytes(e["p"], e["k"], e["t"], e["v"])
            return _spliced(data, count, count, old, _entry_bytes(e["p"], e["k"], e["t"], val.cid_bytes))
        if expect is not None:
            raise _Bail  # not in the tree
        if (ents[i - 1]["t"] if i else left) is not None:
            raise _Other  # a subtree to split
        pk = _prefix_len(prev, kb) if i else 0
        new = _entry_bytes(pk, kb[pk:], None, val.cid_bytes)
        if ki is None:
            if left is not None:
                raise _Other
            return _spliced(data, count, count + 1, b"\x61l\xf6", new + b"\x61l\xf6")
        en = ents[i]
        pn = en["p"]
        if pn != (_prefix_len(prev, ki) if i else 0):
            raise _Bail
        old = _entry_bytes(pn, en["k"], en["t"], en["v"])
        np = _prefix_len(kb, ki)
        return _spliced(data, count, count + 1, old, new + _entry_bytes(np, ki[np:], en["t"], en["v"]))

    def splice_op(
        self, cb: bytes, layer: int, kb: bytes, h: int, action: str, cid: CID | None, prev: CID | None
    ) -> tuple[bytes, bytes | None]:
        """One op along a straight path: CID bytes of the new root, and its first key when
        that may have changed (``_Other`` when the op needs the general path)."""
        path: list[tuple[bytes, bytearray]] = []  # (node bytes, link followed)
        data, ents, left = self.fetch(cb)
        seen = [(cb, data, ents, left)]  # handed to the general path if it takes over
        while layer > h:
            # the slot: entries up to the first key >= kb (keys rebuilt from their prefixes)
            prev_key = b""
            i = 0
            for e in ents:
                p = e["p"]
                key = prev_key[:p] + e["k"] if p else e["k"]
                if key >= kb:
                    if key == kb:
                        raise _Bail  # the key sits above its layer
                    break
                prev_key = key
                i += 1
            raw = ents[i - 1]["t"] if i else left
            if raw is None:
                if action != "delete":
                    raise _Bail  # the key is not in the tree
                for cb, data, ents, left in seen:
                    self.decoded[cb] = (data, ents, left)
                raise _Other  # a new subtree for the key
            if type(raw) is not bytearray or len(raw) != 36 or raw[:4] != _NODE_PFX:
                raise _Bail
            path.append((data, raw))
            cb = bytes(raw)
            data, ents, left = self.fetch(cb)
            seen.append((cb, data, ents, left))
            layer -= 1
        try:
            if action == "create":
                assert cid is not None
                data = self.cut(data, ents, left, kb, cid)
            else:
                assert prev is not None
                data = self.paste(data, ents, left, kb, prev, cid if action == "update" else None)
        except _Other:
            for cb, data, ents, left in seen:
                self.decoded[cb] = (data, ents, left)
            raise
        new = _NODE_PFX + _sha256(data).digest()
        if not path:  # the root was the key's node: its first key may have changed
            return new, _first_key(_light_decode(data)[0])
        for data, raw in reversed(path):
            new = _NODE_PFX + _sha256(_splice(data, raw, new)).digest()
        return new, None

    def op_remove(
        self, root: _FNode | _LNode, layer: int, kb: bytes, h: int, val: CID
    ) -> _FNode | _LNode | None:
        path, n, layer_n, lo, hi = self.descend(root, layer, kb, h)
        if n is None:
            raise _Bail  # not in the tree
        new: _FNode | _LNode | None
        if layer_n == h and type(n) is _LNode and n.over is None:
            try:
                assert n.data is not None
                out = self.cut(n.data, _ents(n), n.left, kb, val)
                new = _LNode(None, None, n.left, None, None, out)
            except _Other:
                new = self.remove(n, layer_n, kb, h, val, lo, hi)
        else:
            new = self.remove(n, layer_n, kb, h, val, lo, hi)
        return self.rebuild(path, new)

    def op_put(
        self, root: _FNode | _LNode, layer: int, kb: bytes, h: int, val: CID, expect: CID | None
    ) -> _FNode | _LNode | None:
        path, n, layer_n, lo, hi = self.descend(root, layer, kb, h)
        new: _FNode | _LNode
        if n is None:
            # a slot without a subtree above the key's layer: a new chain of nodes, so the
            # node above changes shape (re-encoded in full)
            if expect is not None:
                raise _Bail
            last, _, layer_p, lo_p, hi_p = path.pop()
            full = self.materialize(last, layer_p, lo_p, hi_p)
            new = self.put(full, layer_p, kb, h, val, None, lo_p, hi_p)
        elif layer_n == h and type(n) is _LNode and n.over is None:
            try:
                assert n.data is not None
                out = self.paste(n.data, _ents(n), n.left, kb, val, expect)
                new = _LNode(None, None, n.left, None, None, out)
            except _Other:
                new = self.put(n, layer_n, kb, h, val, expect, lo, hi)
        else:
            new = self.put(n, layer_n, kb, h, val, expect, lo, hi)
        return self.rebuild(path, new)

    # general edits (the thorough algorithm's, on light and full nodes) ----------------------

    def remove(
        self, n: _FNode | _LNode, layer: int, kb: bytes, h: int, val: CID, lo: bytes | None, hi: bytes | None
    ) -> _FNode | _LNode | None:
        """``n`` without key ``kb`` (height ``h``), which must be present with value ``val``."""
        if type(n) is _LNode:
            if layer != h:
                path, sub, layer_s, slo, shi = self.descend(n, layer, kb, h, lo, hi)
                if sub is None:
                    raise _Bail
                return self.rebuild(path, self.remove(sub, layer_s, kb, h, val, slo, shi))
            n = self.materialize(n, layer, lo, hi)
        assert type(n) is _FNode
        keys = n.keys
        i = bisect_left(keys, kb)
        found = i < len(keys) and keys[i] == kb
        if layer == h:
            if not found or n.vals[i] != val:
                raise _Bail
            lo_i = keys[i - 1] if i else lo
            hi_i = keys[i + 1] if i + 1 < len(keys) else hi
            merged = self.merge(n.subs[i], n.subs[i + 1], layer - 1, lo_i, kb, hi_i)
            return _fmk(
                [*keys[:i], *keys[i + 1 :]],
                [*n.vals[:i], *n.vals[i + 1 :]],
                [*n.subs[:i], merged, *n.subs[i + 2 :]],
            )
        if found:
            raise _Bail
        clo = keys[i - 1] if i else lo
        chi = keys[i] if i < len(keys) else hi
        sub = self.node(n.subs[i], layer - 1, clo, chi, layer - 1 == h)
        if sub is None:
            raise _Bail
        subs = n.subs.copy()
        subs[i] = self.remove(sub, layer - 1, kb, h, val, clo, chi)
        return _fderive(n, n.vals, subs)

    def merge(
        self, a_ref: _FRef, b_ref: _FRef, layer: int, lo: bytes | None, mid: bytes, hi: bytes | None
    ) -> _FRef:
        """Join adjacent subtrees at ``layer`` (keys of a < mid < keys of b)."""
        if a_ref is None:
            return b_ref
        if b_ref is None:
            return a_ref
        a = self.full(a_ref, layer, lo, mid)
        b = self.full(b_ref, layer, mid, hi)
        assert a is not None and b is not None
        a_hi = a.keys[-1] if a.keys else lo
        b_lo = b.keys[0] if b.keys else hi
        inner = self.merge(a.subs[-1], b.subs[0], layer - 1, a_hi, mid, b_lo)
        return _FNode([*a.keys, *b.keys], [*a.vals, *b.vals], [*a.subs[:-1], inner, *b.subs[1:]])

    def split(
        self, ref: _FRef, layer: int, kb: bytes, lo: bytes | None, hi: bytes | None
    ) -> tuple[_FRef, _FRef]:
        """Split a subtree at ``layer`` around a key that belongs higher up."""
        n = self.full(ref, layer, lo, hi)
        if n is None:
            return None, None
        keys = n.keys
        i = bisect_left(keys, kb)
        if i < len(keys) and keys[i] == kb:
            raise _Bail  # the key is below its layer
        if n.subs[i] is None:
            if i == len(keys):
                return ref, None
            if i == 0:
                return None, ref
            sl: _FRef = None
            sr: _FRef = None
        else:
            sl, sr = self.split(
                n.subs[i], layer - 1, kb, keys[i - 1] if i else lo, keys[i] if i < len(keys) else hi
            )
        return (
            _fmk(keys[:i], n.vals[:i], [*n.subs[:i], sl]),
            _fmk(keys[i:], n.vals[i:], [sr, *n.subs[i + 1 :]]),
        )

    def put(
        self,
        n: _FNode | _LNode | None,
        layer: int,
        kb: bytes,
        h: int,
        val: CID,
        expect: CID | None,
        lo: bytes | None,
        hi: bytes | None,
    ) -> _FNode | _LNode:
        """``n`` with ``kb`` set to ``val``; the key must hold ``expect`` (None: be absent)."""
        if n is None:
            if expect is not None:
                raise _Bail
            if h == layer:
                return _FNode([kb], [val], [None, None])
            return _FNode([], [], [self.put(None, layer - 1, kb, h, val, None, lo, hi)])
        if type(n) is _LNode:
            if layer != h:
                path, sub, layer_s, slo, shi = self.descend(n, layer, kb, h, lo, hi)
                if sub is None:
                    if expect is not None:
                        raise _Bail
                    last, _, layer_s, slo, shi = path.pop()
                    sub = self.materialize(last, layer_s, slo, shi)
                new = self.rebuild(path, self.put(sub, layer_s, kb, h, val, expect, slo, shi))
                assert new is not None
                return new
            n = self.materialize(n, layer, lo, hi)
        assert type(n) is _FNode
        keys = n.keys
        i = bisect_left(keys, kb)
        found = i < len(keys) and keys[i] == kb
        clo = keys[i - 1] if i else lo
        if layer == h:
            if found:
                if expect is None or n.vals[i] != expect:
                    raise _Bail
                vals = n.vals.copy()
                vals[i] = val
                return _FNode(keys, vals, n.subs, n.src)
            if expect is not None:
                raise _Bail
            left, right = self.split(n.subs[i], layer - 1, kb, clo, keys[i] if i < len(keys) else hi)
            return _FNode(
                [*keys[:i], kb, *keys[i:]],
                [*n.vals[:i], val, *n.vals[i:]],
                [*n.subs[:i], left, right, *n.subs[i + 1 :]],
            )
        if found:
            raise _Bail
        chi = keys[i] if i < len(keys) else hi
        sub = self.node(n.subs[i], layer - 1, clo, chi, layer - 1 == h)
        if sub is None and expect is not None:
            raise _Bail
        subs = n.subs.copy()
        subs[i] = self.put(sub, layer - 1, kb, h, val, expect, clo, chi)
        return _FNode(keys, n.vals, subs, n.src)

    # driver -----------------------------------------------------------------------------

    def cow_ops(
        self, root_cb: bytes | None, layer: int, keyed: list[tuple[bytes, int, str, CID | None, CID | None]]
    ) -> tuple[bytes | None, int, bytes | None]:
        """Ops the thorough algorithm's way, on light and full nodes, hashing the changed
        nodes once at the end: the new root's CID bytes (None: the empty tree), its layer
        and its first key."""
        root: _FNode | _LNode | None = None if root_cb is None else self.light(root_cb)
        for kb, h, action, cid, prev in keyed:
            if action == "create":
                if root is None or h > layer:
                    raise _Bail  # not in the tree
                assert cid is not None
                root = self.op_remove(root, layer, kb, h, cid)
                # an emptied root gives way to its only subtree, repeatedly
                while root is not None:
                    if isinstance(root, _FNode):
                        if root.keys:
                            break
                        sub = root.subs[0]
                    else:
                        if _ents(root.src):
                            break
                        over = root.over
                        sub = over[0] if over is not None and 0 in over else _link_bytes(root.src.left)
                    layer -= 1
                    root = self.node(sub, layer, None, None, False)
                if root is None:
                    layer = 0
                continue
            assert prev is not None
            expect = cid if action == "update" else None
            if root is None:
                if expect is not None:
                    raise _Bail
                root = _FNode([kb], [prev], [None, None])
                layer = h
            elif h > layer:
                if expect is not None:
                    raise _Bail  # not in the tree
                left, right = self.split(root, layer, kb, None, None)
                for _ in range(layer + 1, h):
                    left = _FNode([], [], [left]) if left is not None else None
                    right = _FNode([], [], [right]) if right is not None else None
                root = _FNode([kb], [prev], [left, right])
                layer = h
            else:
                root = self.op_put(root, layer, kb, h, prev, expect)
        if root is None:
            return None, 0, None
        if isinstance(root, _FNode):
            if not root.keys:
                raise _Bail
            first = root.keys[0]
        else:
            first = _first_key(_ents(root.src))
        return _fcid(root), layer, first

    def run(self, root_cid: CID, ops: Sequence[Op]) -> CID:
        keyed: list[tuple[bytes, int, str, CID | None, CID | None]] = []
        seen: set[str] = set()
        key_re = _KEY_RE
        for op in ops:
            action, path, cid, prev = op
            if type(path) is not str or path in seen or not path.isascii():
                raise _Bail
            seen.add(path)
            kb = path.encode()
            if len(kb) > MAX_KEY_LEN or key_re.match(kb) is None:
                raise _Bail
            if action == "create":
                ok = type(cid) is CID and prev is None
            elif action == "update":
                ok = type(cid) is CID and type(prev) is CID
            elif action == "delete":
                ok = cid is None and type(prev) is CID
            else:
                ok = False
            if not ok:
                raise _Bail
            keyed.append((kb, key_height(kb), action, cid, prev))
        if not keyed:
            return root_cid
        if type(root_cid) is not CID or not root_cid.is_cidv1_dag_cbor_sha256_32():
            raise _Bail
        root: bytes | None = root_cid.cid_bytes
        node = self.fetch(root_cid.cid_bytes)
        self.decoded[root_cid.cid_bytes] = node  # the first op reads it again
        _, ents, left = node
        anchor: bytes | None = None
        if ents:
            anchor = _first_key(ents)
            layer = anchor_layer = key_height(anchor)
        elif left is not None:
            raise _Bail  # an empty root pointing to a subtree
        else:
            root = None
            layer = anchor_layer = 0
        # one op on a layer-0 key (most commits): the straight path, where it goes; several
        # ops share the nodes near the root, so they are edited first and hashed once
        first = anchor
        if len(keyed) == 1 and keyed[0][1] == 0 and root is not None:
            kb, h, action, cid, prev = keyed[0]
            try:
                root, changed = self.splice_op(root, layer, kb, h, action, cid, prev)
                if changed is not None:
                    first = changed
            except _Other:
                root, layer, first = self.cow_ops(root, layer, keyed)
        else:
            root, layer, first = self.cow_ops(root, layer, keyed)
        if root is None:
            return EMPTY_ROOT_CID
        # the computed root must sit at its first key's layer (see above)
        assert first is not None
        if (first != anchor or layer != anchor_layer) and key_height(first) != layer:
            raise _Bail
        return CID(root)


def _invert_fast(blocks: Mapping[CID, bytes], root_after: CID, ops: Sequence[Op], verify: bool) -> CID | None:
    """The lean inversion; None when the thorough path must decide."""
    try:
        return _FastInverter(blocks, verify).run(root_after, ops)
    except (_Bail, _Other, ValueError, *_SHAPE_ERRORS):
        return None
