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
  commit must carry, and the inversion of its operations back to ``prevData``.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import AnyStr, Final, NamedTuple, TypeAlias

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


def invert_ops(blocks: Mapping[CID, bytes], root_after: CID, ops: Sequence[Op]) -> CID:
    """Undo a commit's operations on its (partial) tree; return the MST root before it.

    Uses only ``blocks`` (nodes are re-hashed as they are loaded). Each op is first checked
    against the tree after the commit: created/updated keys must map to ``op.cid``, deleted
    keys must be absent. Raises MissingBlock when the proof lacks a needed node and MstError
    for invalid ops or trees. The caller compares the result with the event's ``prevData``.
    """
    seen: set[str] = set()
    keyed: list[tuple[Op, bytes]] = []
    for op in ops:
        _check_op(op)
        if op.path in seen:
            raise MstError(f"path {op.path!r:.200} appears in more than one op")
        seen.add(op.path)
        keyed.append((op, _key_bytes(op.path)))
    tree = MST.load(blocks, root_after, verify=True)
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
