"""Whole repositories: verifying ``getRepo`` exports and producing them (and commits).

A repo export is a CARv1 whose first root is the signed commit; it holds the commit, every
MST node and every record block. Verification hashes every block (in the CAR reader),
decodes the commit, optionally checks DID and signature, walks the MST strictly and checks
that each record block is present. Records are decoded lazily by :meth:`VerifiedRepo.records`
so a large repo is never held raw and decoded at once.

Writing follows the reference PDS: record blocks are the canonical DAG-CBOR of the lex-JSON
record, the MST is built from (path, record CID) pairs, the v3 commit carries ``prev: null``.
Exports use the spec's streamable block order: commit first, then MST nodes in pre-order with
each node's record blocks interleaved in key order. :class:`RepoWriter` applies batches of
writes and returns exactly what a PDS sequences on its firehose: the new commit, the ops with
their previous CIDs, ``since``/``prevData`` and a CAR slice that includes the sync 1.1 proof.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from psky.atproto import cbor
from psky.atproto.car import AsyncCarReader, CarError, iter_car, read_car, write_car
from psky.atproto.cbor import CID
from psky.atproto.commit import Commit, CommitError, sign_commit
from psky.atproto.crypto import PrivateKey, PublicKey
from psky.atproto.firehose import commit_event, encode_event
from psky.atproto.mst import MST, MstError, Op, walk
from psky.atproto.syntax import (
    is_valid_nsid,
    is_valid_record_key,
    is_valid_tid,
    make_tid,
    next_tid,
    tid_clock_id,
    tid_to_timestamp_us,
)

__all__ = [
    "CommitResult",
    "RepoError",
    "RepoRecord",
    "RepoWriter",
    "VerifiedRepo",
    "averify_repo_stream",
    "build_repo",
    "export_blocks",
    "verify_repo",
    "verify_repo_stream",
]


class RepoError(ValueError):
    """Input that is not a usable repository (not a CAR, no root, root not a commit, ...)."""


# --- verification -------------------------------------------------------------------------


class RepoRecord(NamedTuple):
    """One record of a verified repo; ``value`` is lex JSON, or None with ``error`` set when
    the block is not a DAG-CBOR map."""

    collection: str
    rkey: str
    cid: CID
    value: dict[str, Any] | None
    error: str | None = None

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.rkey}"


def _rkey_len_ok(rkey: str) -> bool:
    return 0 < len(rkey) <= 512


def _split_path(path: str) -> tuple[str, str] | None:
    collection, sep, rkey = path.partition("/")
    if not sep or not is_valid_nsid(collection) or not is_valid_record_key(rkey):
        return None
    return collection, rkey


@dataclass(slots=True)
class VerifiedRepo:
    """Result of :func:`verify_repo`.

    ``signature_valid`` is None when no key was given. ``mst_ok`` is False (with
    ``mst_error``) when the tree is malformed or a node is missing; ``entries`` then holds
    the records reached before the problem. ``missing_records`` lists (path, CID) of records
    whose block is not in the CAR and ``missing_blocks`` those CIDs (each once);
    ``invalid_paths`` keys that are not ``collection/rkey``. ``block_count`` is the number
    of distinct blocks the CAR held.
    """

    did: str
    rev: str | None
    commit_cid: CID
    commit: Commit
    signature_valid: bool | None
    mst_ok: bool
    mst_error: str | None
    entries: list[tuple[str, CID]]
    counts: dict[str, int]
    missing_records: list[tuple[str, CID]]
    invalid_paths: list[str]
    block_count: int
    signature_error: str | None = None
    _blocks: dict[CID, bytes] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """Every check that ran passed (verifying without a signing key does not fail it)."""
        return (
            self.signature_valid is not False
            and self.mst_ok
            and not self.missing_records
            and not self.invalid_paths
        )

    @property
    def missing_blocks(self) -> list[CID]:
        return list(dict.fromkeys(cid for _, cid in self.missing_records))

    @property
    def record_count(self) -> int:
        return len(self.entries)

    def records(self, *, release: bool = False) -> Iterator[RepoRecord]:
        """Decode records one at a time, in key order (records with missing blocks or
        invalid paths are skipped; they are listed in the report).

        ``release`` drops each raw block once its last reference has been yielded (and the
        commit and MST node blocks up front), so memory shrinks as a backfill streams the
        repo out; the VerifiedRepo can then be iterated only once.
        """
        blocks = self._blocks
        refs: Counter[CID] | None = None
        if release:
            refs = Counter(cid for _, cid in self.entries)
            for c in [c for c in blocks if c not in refs]:
                del blocks[c]
        decode_lex = cbor.decode_lex
        DecodeError = cbor.DecodeError
        skip = set(self.invalid_paths)
        for path, cid in self.entries:
            block = blocks.get(cid)
            if refs is not None:
                left = refs[cid] - 1
                if left:
                    refs[cid] = left
                else:
                    blocks.pop(cid, None)
            if block is None or (skip and path in skip):
                continue
            collection, _, rkey = path.partition("/")
            try:
                value = decode_lex(block)
            except DecodeError as e:
                yield RepoRecord(collection, rkey, cid, None, str(e))
                continue
            if type(value) is not dict:
                yield RepoRecord(collection, rkey, cid, None, "record is not a map")
                continue
            yield RepoRecord(collection, rkey, cid, value)

    def get_block(self, cid: CID) -> bytes | None:
        return self._blocks.get(cid)


def _verify_blocks(
    roots: Sequence[CID],
    blocks: dict[CID, bytes],
    did: str | None,
    signing_key: str | PublicKey | None,
    strict_mst: bool,
) -> VerifiedRepo:
    if not roots:
        raise RepoError("repo CAR has no root")
    commit_cid = roots[0]
    block = blocks.get(commit_cid)
    if block is None:
        raise RepoError(f"repo CAR root {commit_cid.encode()} is not among its blocks")
    try:
        commit = Commit.decode(block)
    except CommitError as e:
        raise RepoError(f"repo CAR root is not a commit: {e}") from None
    if did is not None and commit.did != did:
        raise RepoError(f"repo belongs to {commit.did}, expected {did}")

    signature_valid: bool | None = None
    signature_error: str | None = None
    if signing_key is not None:
        try:
            signature_valid = commit.verify(signing_key)
        except ValueError as e:
            signature_valid = False
            signature_error = f"unusable signing key: {e}"
        else:
            if not signature_valid:
                signature_error = "commit signature does not verify"

    entries: list[tuple[str, CID]] = []
    mst_error: str | None = None
    try:
        entries.extend(walk(blocks, commit.data, strict=strict_mst))
    except MstError as e:
        mst_error = str(e)

    counts: dict[str, int] = {}
    invalid: list[str] = []
    nsid_ok: dict[str, bool] = {}  # few collections, many records: validate each name once
    # a strict walk has already checked every key against the repo-path syntax (character
    # set, no "."/".." segments), which leaves only the record-key length limit
    rkey_ok = _rkey_len_ok if strict_mst and mst_error is None else is_valid_record_key
    for path, _ in entries:
        collection, sep, rkey = path.partition("/")
        ok = nsid_ok.get(collection)
        if ok is None:
            ok = nsid_ok[collection] = is_valid_nsid(collection)
        if sep and ok and rkey_ok(rkey):
            counts[collection] = counts.get(collection, 0) + 1
        else:
            invalid.append(path)
    # membership by raw CID bytes: CID objects hash and compare in Python, bytes in C
    present = {c.cid_bytes for c in blocks}
    missing = [(path, cid) for path, cid in entries if cid.cid_bytes not in present]

    return VerifiedRepo(
        did=commit.did,
        rev=commit.rev,
        commit_cid=commit_cid,
        commit=commit,
        signature_valid=signature_valid,
        mst_ok=mst_error is None,
        mst_error=mst_error,
        entries=entries,
        counts=counts,
        missing_records=missing,
        invalid_paths=invalid,
        block_count=len(blocks),
        signature_error=signature_error,
        _blocks=blocks,
    )


def verify_repo(
    car_bytes: bytes,
    *,
    did: str | None = None,
    signing_key: str | PublicKey | None = None,
    strict_mst: bool = True,
) -> VerifiedRepo:
    """Verify a complete repo export held in memory (see :class:`VerifiedRepo`).

    Raises :class:`RepoError` for input that cannot be a repo: not a CAR (or a block whose
    hash does not match its CID), no root, root block absent or not a commit, or a commit
    for another DID than *did*.
    """
    try:
        car = read_car(car_bytes, verify=True)
    except CarError as e:
        raise RepoError(f"not a valid CAR: {e}") from None
    return _verify_blocks(car.roots, car.blocks, did, signing_key, strict_mst)


def verify_repo_stream(
    source: BinaryIO | Iterable[bytes],
    *,
    did: str | None = None,
    signing_key: str | PublicKey | None = None,
    strict_mst: bool = True,
    max_total_size: int | None = None,
) -> VerifiedRepo:
    """Like :func:`verify_repo` for a file object or chunk iterable: the CAR is never held
    whole; only the block map is kept (one copy of the data), and ``records(release=True)``
    frees it as records are consumed."""
    try:
        reader = iter_car(source, verify=True, max_total_size=max_total_size)
        roots = reader.roots
        blocks: dict[CID, bytes] = {}
        setdefault = blocks.setdefault
        for cid, block in reader:
            setdefault(cid, block)  # hash-verified, so a duplicate has the same bytes
    except CarError as e:
        raise RepoError(f"not a valid CAR: {e}") from None
    return _verify_blocks(roots, blocks, did, signing_key, strict_mst)


async def averify_repo_stream(
    chunks: AsyncIterable[bytes],
    *,
    did: str | None = None,
    signing_key: str | PublicKey | None = None,
    strict_mst: bool = True,
    max_total_size: int | None = None,
) -> VerifiedRepo:
    """:func:`verify_repo_stream` for an async chunk source (an HTTP response body)."""
    try:
        reader = AsyncCarReader(chunks, verify=True, max_total_size=max_total_size)
        roots = await reader.read_header()
        blocks: dict[CID, bytes] = {}
        setdefault = blocks.setdefault
        async for cid, block in reader:
            setdefault(cid, block)
    except CarError as e:
        raise RepoError(f"not a valid CAR: {e}") from None
    return _verify_blocks(roots, blocks, did, signing_key, strict_mst)


# --- building -----------------------------------------------------------------------------


def export_blocks(
    commit_cid: CID, commit_block: bytes, nodes: Mapping[CID, bytes], records: Mapping[CID, bytes]
) -> Iterator[tuple[CID, bytes]]:
    """Blocks of a full export in the spec's streamable order: the commit, then a pre-order
    walk of the MST with each node's record blocks (and subtrees) in entry order.

    Each block appears once; record CIDs absent from *records* are skipped.
    """
    yield commit_cid, commit_block
    commit = cbor.decode(commit_block)
    root = commit["data"]
    seen: set[CID] = set()
    # stack items: (is_node, cid)
    stack: list[tuple[bool, CID]] = [(True, root)]
    while stack:
        is_node, cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        if not is_node:
            rec = records.get(cid)
            if rec is not None:
                yield cid, rec
            continue
        block = nodes.get(cid)
        if block is None:
            raise RepoError(f"MST node {cid.encode()} missing while exporting")
        yield cid, block
        node = cbor.decode(block)
        children: list[tuple[bool, CID]] = []
        left = node.get("l")
        if left is not None:
            children.append((True, left))
        for entry in node["e"]:
            children.append((False, entry["v"]))
            sub = entry.get("t")
            if sub is not None:
                children.append((True, sub))
        stack.extend(reversed(children))


def _record_block(path: str, record: Any) -> tuple[CID, bytes]:
    if not isinstance(record, Mapping):
        raise RepoError(f"record at {path} must be an object")
    try:
        block = cbor.encode_lex(dict(record))
    except ValueError as e:
        raise RepoError(f"record at {path} is not valid atproto data: {e}") from None
    return cbor.cid_for_cbor(block), block


def _check_path(path: str) -> tuple[str, str]:
    split = _split_path(path) if isinstance(path, str) else None
    if split is None:
        raise RepoError(f"invalid record path {path!r:.200} (need <nsid>/<record-key>)")
    return split


def build_repo(
    did: str, key: PrivateKey, records: Mapping[str, Mapping[str, Any]], rev: str | None = None
) -> tuple[CID, bytes]:
    """A complete signed repo export, as a conforming PDS's ``getRepo`` would return it."""
    leaves: dict[CID, bytes] = {}
    entries: list[tuple[str, CID]] = []
    for path, record in records.items():
        _check_path(path)
        cid, block = _record_block(path, record)
        leaves[cid] = block
        entries.append((path, cid))
    try:
        tree = MST.from_entries(entries)
    except MstError as e:
        raise RepoError(str(e)) from None
    try:
        commit_cid, commit_block = sign_commit(did, tree.root_cid(), rev or next_tid(), key)
    except CommitError as e:
        raise RepoError(str(e)) from None
    car = write_car([commit_cid], export_blocks(commit_cid, commit_block, tree.blocks(), leaves))
    return commit_cid, car


# --- a writable repo (for psky's local test PDS) ------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitResult:
    """One applied commit, with everything a PDS puts in its ``#commit`` event.

    ``blocks`` is the CAR slice (root = commit): the commit, new MST nodes, the written
    records and the covering-proof nodes needed to invert ``ops`` back to ``prev_data``.
    """

    did: str
    commit_cid: CID
    commit_block: bytes
    rev: str
    since: str | None
    prev_data: CID | None
    data: CID
    ops: tuple[Op, ...]
    blocks: bytes

    def to_frame(self, *, seq: int, time: str) -> bytes:
        """The ``#commit`` frame a PDS would send for this commit at ``seq``."""
        return encode_event(commit_event(self, seq=seq, time=time))


def _rev_after(prev: str | None) -> str:
    rev = next_tid()
    if prev and rev <= prev:
        rev = make_tid(tid_to_timestamp_us(prev) + 1, tid_clock_id(prev))
    return rev


class RepoWriter:
    """A repository held in memory that applies write batches and signs commits.

    The constructor creates the repo with an initial commit (``initial`` holds its result:
    creates for the initial records, ``since``/``prev_data`` None). Methods that raise
    leave the repo unchanged. MST nodes live in a block store keyed by CID; each commit
    loads the tree lazily from it, so a write touches only the nodes on its paths.
    """

    def __init__(
        self,
        did: str,
        key: PrivateKey,
        records: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        rev: str | None = None,
    ) -> None:
        self.did = did
        self.key = key
        self._leaves: dict[CID, bytes] = {}
        self._refs: Counter[CID] = Counter()
        entries: list[tuple[str, CID]] = []
        for path, record in (records or {}).items():
            _check_path(path)
            cid, block = _record_block(path, record)
            self._leaves[cid] = block
            self._refs[cid] += 1
            entries.append((path, cid))
        try:
            tree = MST.from_entries(entries)
        except MstError as e:
            raise RepoError(str(e)) from None
        self._nodes: dict[CID, bytes] = tree.blocks()
        self._data = tree.root_cid()
        if rev is not None and not is_valid_tid(rev):
            raise RepoError(f"rev {rev!r:.40} is not a TID")
        self.rev = rev or _rev_after(None)
        self.commit_cid, self.commit_block = self._sign(self._data, self.rev)
        blocks = {self.commit_cid: self.commit_block, **self._nodes, **self._leaves}
        self.initial = CommitResult(
            did,
            self.commit_cid,
            self.commit_block,
            self.rev,
            None,
            None,
            self._data,
            tuple(Op("create", path, cid, None) for path, cid in entries),
            write_car([self.commit_cid], blocks.items()),
        )

    def _sign(self, data: CID, rev: str) -> tuple[CID, bytes]:
        try:
            return sign_commit(self.did, data, rev, self.key)
        except CommitError as e:
            raise RepoError(str(e)) from None

    @property
    def data(self) -> CID:
        """Current MST root (the commit's ``data``)."""
        return self._data

    def _tree(self) -> MST:
        return MST.load(self._nodes, self._data)

    def get_record(self, collection: str, rkey: str) -> tuple[CID, dict[str, Any]] | None:
        """(CID, lex-JSON value) of a record, or None."""
        try:
            cid = self._tree().get(f"{collection}/{rkey}")
        except MstError:
            return None
        if cid is None:
            return None
        value: dict[str, Any] = cbor.decode_lex(self._leaves[cid])
        return cid, value

    def entries(self) -> list[tuple[str, CID]]:
        """Every (path, record CID) in key order."""
        return self._tree().entries()

    def apply_writes(
        self, writes: Iterable[tuple[str, str, str, Mapping[str, Any] | None]], *, rev: str | None = None
    ) -> CommitResult:
        """Apply ``(action, collection, rkey, record | None)`` writes atomically and sign a commit.

        ``create`` fails if the record exists, ``update``/``delete`` if it does not; a path
        may appear once per batch. ``rev`` (optional) must sort after the current rev.
        """
        tree = self._tree()
        prev_data = self._data
        new_leaves: dict[CID, bytes] = {}
        ops: list[Op] = []
        seen: set[str] = set()
        for action, collection, rkey, record in writes:
            path = f"{collection}/{rkey}"
            _check_path(path)
            if path in seen:
                raise RepoError(f"{path} is written twice in one batch")
            seen.add(path)
            current = tree.get(path)
            if action == "delete":
                if record is not None:
                    raise RepoError(f"delete {path} takes no record")
                if current is None:
                    raise RepoError(f"cannot delete {path}: no such record")
                tree.delete(path)
                ops.append(Op("delete", path, None, current))
                continue
            if action not in ("create", "update"):
                raise RepoError(f"unknown write action {action!r:.40}")
            if record is None:
                raise RepoError(f"{action} {path} needs a record")
            if action == "create" and current is not None:
                raise RepoError(f"cannot create {path}: record exists")
            if action == "update" and current is None:
                raise RepoError(f"cannot update {path}: no such record")
            cid, block = _record_block(path, record)
            new_leaves[cid] = block
            if current is None:
                tree.add(path, cid)
            else:
                tree.update(path, cid)
            ops.append(Op(action, path, cid, current))
        if rev is None:
            rev = _rev_after(self.rev)
        elif not is_valid_tid(rev) or rev <= self.rev:
            raise RepoError(f"rev {rev!r:.40} is not a TID sorting after the current rev {self.rev}")
        data = tree.root_cid()
        commit_cid, commit_block = self._sign(data, rev)

        # CAR slice: commit, nodes new to the store, written records, inversion proof
        new_nodes = tree.new_blocks()
        slice_blocks: dict[CID, bytes] = {commit_cid: commit_block}
        slice_blocks.update(new_nodes)
        slice_blocks.update(tree.covering_proof([op.path for op in ops]))
        slice_blocks.update(new_leaves)
        car = write_car([commit_cid], slice_blocks.items())

        # from here on nothing can fail: switch to the new state
        removed = tree.removed_cids()
        self._nodes.update(new_nodes)
        for c in removed:
            self._nodes.pop(c, None)
        for op in ops:
            if op.prev is not None:
                self._unref(op.prev)
            if op.cid is not None:
                self._refs[op.cid] += 1
        for c, b in new_leaves.items():
            if c in self._refs:
                self._leaves[c] = b
        since = self.rev
        self._data, self.rev = data, rev
        self.commit_cid, self.commit_block = commit_cid, commit_block
        return CommitResult(self.did, commit_cid, commit_block, rev, since, prev_data, data, tuple(ops), car)

    def _unref(self, cid: CID) -> None:
        self._refs[cid] -= 1
        if self._refs[cid] <= 0:
            del self._refs[cid]
            self._leaves.pop(cid, None)

    def resign(self, *, rev: str | None = None) -> CommitResult:
        """A new commit over the same tree (e.g. after a signing-key rotation)."""
        return self.apply_writes((), rev=rev)

    def export_car(self) -> bytes:
        """The full repo as ``com.atproto.sync.getRepo`` returns it."""
        return write_car(
            [self.commit_cid], export_blocks(self.commit_cid, self.commit_block, self._nodes, self._leaves)
        )

    def commit_car(self) -> bytes:
        """A CAR holding only the current commit (the ``blocks`` of a ``#sync`` event)."""
        return write_car([self.commit_cid], [(self.commit_cid, self.commit_block)])

    @classmethod
    def from_car(cls, car_bytes: bytes, key: PrivateKey) -> RepoWriter:
        """Resume a repo from its export (verified; the key must match its signature)."""
        repo = verify_repo(car_bytes, signing_key=key.public_key())
        if not repo.ok:
            raise RepoError(
                "cannot resume from an invalid repo: "
                + (repo.mst_error or repo.signature_error or "missing blocks or invalid paths")
            )
        self = cls.__new__(cls)
        self.did = repo.did
        self.key = key
        blocks = repo._blocks
        tree = MST.from_entries(repo.entries)
        self._nodes = tree.blocks()
        self._data = tree.root_cid()
        self._refs = Counter(cid for _, cid in repo.entries)
        self._leaves = {cid: blocks[cid] for cid in self._refs}
        self.rev = repo.rev or ""
        self.commit_cid, self.commit_block = repo.commit_cid, blocks[repo.commit_cid]
        self.initial = CommitResult(
            self.did, self.commit_cid, self.commit_block, self.rev, None, None, self._data, (), car_bytes
        )
        return self
