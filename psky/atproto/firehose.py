"""Repository event-stream frames (``com.atproto.sync.subscribeRepos``) and commit checks.

A frame is two concatenated DAG-CBOR objects: a header ``{op, t?}`` and a body map. ``op``
is 1 for a message (``t`` names the lexicon fragment, e.g. ``#commit``) and -1 for an error
(body ``{error, message?}``). Frames with an unknown ``op`` or ``t`` are surfaced as
:class:`UnknownEvent` so the consumer can skip them (and still advance its cursor) instead of
dropping them silently; anything malformed raises :class:`FrameError`.

:func:`process_commit` checks a ``#commit`` the way the sync spec asks: hash-verified CAR
slice, commit block present and consistent with the message, signature (when a key is
given), record operations authenticated by the signed MST, and the sync 1.1 inductive proof
(inverting the operations must reproduce ``prevData``). It reports every failed check
rather than raising, so one hostile event cannot stop a consumer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from libipld import encode_cid

from psky.atproto import cbor
from psky.atproto.car import CarError, read_car
from psky.atproto.cbor import CID
from psky.atproto.commit import Commit, CommitError
from psky.atproto.crypto import PublicKey, verifier_for
from psky.atproto.mst import MST, MissingBlock, MstError, Op, invert_ops, is_valid_key
from psky.atproto.syntax import is_valid_did, is_valid_nsid, is_valid_record_key, is_valid_tid

if TYPE_CHECKING:
    from psky.atproto import repo

try:  # the C fast path, built by ``pip install`` where a compiler exists (setup.py)
    from psky.atproto import _native
except ImportError:  # pragma: no cover - a machine without a compiler
    _native = None  # type: ignore[assignment]

#: whether :func:`check_commit_frame` uses the C fast path (built, and not disabled with
#: ``PSKY_NATIVE=0``); tests and benchmarks may flip it at run time
NATIVE_COMMITS: bool = _native is not None and os.environ.get("PSKY_NATIVE", "1") != "0"

__all__ = [
    "AccountEvent",
    "CheckedCommit",
    "CommitEvent",
    "CommitResult",
    "ErrorFrame",
    "Frame",
    "FrameError",
    "IdentityEvent",
    "InfoEvent",
    "RecordOp",
    "RepoOp",
    "SyncEvent",
    "SyncResult",
    "UnknownEvent",
    "account_body",
    "check_commit_frame",
    "commit_body",
    "commit_event",
    "decode_frame",
    "encode_error_frame",
    "encode_event",
    "encode_frame",
    "identity_body",
    "info_body",
    "now_iso",
    "process_commit",
    "process_sync",
    "sync_body",
    "to_stream_events",
]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

#: limits from the sync spec / subscribeRepos lexicon
MAX_COMMIT_BLOCKS_BYTES = 2_000_000
MAX_RECORD_BYTES = 1_000_000
MAX_OPS = 200


class FrameError(ValueError):
    """A frame that is not valid event-stream framing or whose body breaks its schema."""


# --- typed frames ------------------------------------------------------------------------


#: One record operation as listed in a ``#commit`` (``prev`` absent for creates): the MST
#: module's operation tuple, so events feed :func:`invert_ops` without conversion.
RepoOp = Op


@dataclass(slots=True)
class CommitEvent:
    seq: int
    repo: str
    rev: str
    since: str | None
    commit: CID
    blocks: bytes
    ops: tuple[RepoOp, ...]
    time: str
    prev_data: CID | None = None
    too_big: bool = False
    blobs: tuple[CID, ...] = ()
    rebase: bool = False


@dataclass(slots=True)
class SyncEvent:
    seq: int
    did: str
    blocks: bytes
    rev: str
    time: str


@dataclass(slots=True)
class IdentityEvent:
    seq: int
    did: str
    time: str
    handle: str | None = None


@dataclass(slots=True)
class AccountEvent:
    seq: int
    did: str
    time: str
    active: bool
    status: str | None = None


@dataclass(slots=True)
class InfoEvent:
    name: str
    message: str | None = None


@dataclass(slots=True)
class ErrorFrame:
    error: str
    message: str | None = None


@dataclass(slots=True)
class UnknownEvent:
    """A frame psky has no type for (legacy ``#handle``/``#migrate``/``#tombstone``, future
    types, unknown ``op``). ``seq`` is extracted when the body has an integer one so that a
    consumer can still advance its cursor past it."""

    t: str | None
    body: dict[str, Any]
    op: int = 1
    seq: int | None = None


Frame: TypeAlias = (
    CommitEvent | SyncEvent | IdentityEvent | AccountEvent | InfoEvent | ErrorFrame | UnknownEvent
)


# --- field checks --------------------------------------------------------------------------


def _need(body: dict[str, Any], key: str, t: str) -> Any:
    try:
        return body[key]
    except KeyError:
        raise FrameError(f"{t} body is missing required field {key!r}") from None


def _seq(body: dict[str, Any], t: str) -> int:
    seq = _need(body, "seq", t)
    if type(seq) is not int:
        raise FrameError(f"{t} seq must be an integer, got {type(seq).__name__}")
    if not _INT64_MIN <= seq <= _INT64_MAX:
        raise FrameError(f"{t} seq out of 64-bit range")
    return seq


def _str(body: dict[str, Any], key: str, t: str) -> str:
    value = _need(body, key, t)
    if type(value) is not str:
        raise FrameError(f"{t} {key} must be a string")
    return value


def _opt_str(body: dict[str, Any], key: str, t: str) -> str | None:
    value = body.get(key)
    if value is not None and type(value) is not str:
        raise FrameError(f"{t} {key} must be a string")
    return value


def _did(body: dict[str, Any], key: str, t: str) -> str:
    value = _str(body, key, t)
    if not is_valid_did(value):
        raise FrameError(f"{t} {key} is not a valid DID: {value!r:.100}")
    return value


def _tid(body: dict[str, Any], key: str, t: str) -> str:
    value = _str(body, key, t)
    if not is_valid_tid(value):
        raise FrameError(f"{t} {key} is not a valid TID: {value!r:.40}")
    return value


def _bytes(body: dict[str, Any], key: str, t: str) -> bytes:
    value = _need(body, key, t)
    if type(value) is not bytes:
        raise FrameError(f"{t} {key} must be bytes")
    return value


def _cid(value: Any, what: str) -> CID:
    if not isinstance(value, CID):
        raise FrameError(f"{what} must be a CID link")
    return value


def _bool(body: dict[str, Any], key: str, t: str, default: bool | None = None) -> bool:
    value = body.get(key, default)
    if type(value) is not bool:
        raise FrameError(f"{t} {key} must be a boolean")
    return value


_new_tuple: Any = tuple.__new__


def _repo_op(raw: Any) -> RepoOp:
    if type(raw) is dict:
        get = raw.get
        action = get("action")
        path = get("path")
        cid = get("cid")
        prev = get("prev")
        if (
            type(action) is str
            and type(path) is str
            and (type(cid) is CID or (cid is None and "cid" in raw))
            and (prev is None or type(prev) is CID)
        ):
            op: Op = _new_tuple(Op, (action, path, cid, prev))  # Op(...) minus its Python __new__
            return op
    if type(raw) is not dict:
        raise FrameError("#commit op must be a map")
    action = raw.get("action")
    path = raw.get("path")
    if type(action) is not str:
        raise FrameError("#commit op action must be a string")
    if type(path) is not str:
        raise FrameError("#commit op path must be a string")
    if "cid" not in raw:
        raise FrameError("#commit op is missing 'cid' (null for deletes)")
    cid = raw["cid"]
    if cid is not None and not isinstance(cid, CID):
        raise FrameError("#commit op cid must be a CID link or null")
    prev = raw.get("prev")
    if prev is not None and not isinstance(prev, CID):
        raise FrameError("#commit op prev must be a CID link")
    return RepoOp(action, path, cid, prev)


def _parse_commit(body: dict[str, Any]) -> CommitEvent:
    """Fast path: one combined check of the usual shape; the slow path names the problem."""
    get = body.get
    seq = get("seq")
    repo = get("repo")
    rev = get("rev")
    since = get("since")
    commit = get("commit")
    blocks = get("blocks")
    raw_ops = get("ops")
    time = get("time")
    prev_data = get("prevData")
    too_big = get("tooBig", False)
    rebase = get("rebase", False)
    raw_blobs = get("blobs")
    if (
        type(seq) is int
        and _INT64_MIN <= seq <= _INT64_MAX
        and type(repo) is str
        and type(rev) is str
        and type(blocks) is bytes
        and type(raw_ops) is list
        and type(time) is str
        and type(too_big) is bool
        and type(rebase) is bool
        and isinstance(commit, CID)
        and (prev_data is None or isinstance(prev_data, CID))
        and (since is None or (type(since) is str and is_valid_tid(since)))
        and (raw_blobs is None or raw_blobs == [])
        and is_valid_did(repo)
        and is_valid_tid(rev)
    ):
        ops = tuple([_repo_op(o) for o in raw_ops])
        return CommitEvent(seq, repo, rev, since, commit, blocks, ops, time, prev_data, too_big, (), rebase)
    return _parse_commit_checked(body)


def _parse_commit_checked(body: dict[str, Any]) -> CommitEvent:
    t = "#commit"
    seq = _seq(body, t)
    repo = _did(body, "repo", t)
    rev = _tid(body, "rev", t)
    since = body.get("since")
    if since is not None and (type(since) is not str or not is_valid_tid(since)):
        raise FrameError("#commit since must be a TID string or null")
    commit = _cid(_need(body, "commit", t), "#commit commit")
    blocks = _bytes(body, "blocks", t)
    raw_ops = _need(body, "ops", t)
    if type(raw_ops) is not list:
        raise FrameError("#commit ops must be an array")
    ops = tuple([_repo_op(o) for o in raw_ops])
    time = _str(body, "time", t)
    prev_data = body.get("prevData")
    if prev_data is not None:
        _cid(prev_data, "#commit prevData")
    # deprecated fields: still typed when present, defaulted when absent
    too_big = _bool(body, "tooBig", t, False)
    rebase = _bool(body, "rebase", t, False)
    raw_blobs = body.get("blobs")
    if raw_blobs is None:
        blobs: tuple[CID, ...] = ()
    elif type(raw_blobs) is list:
        blobs = tuple([_cid(b, "#commit blob") for b in raw_blobs])
    else:
        raise FrameError("#commit blobs must be an array")
    return CommitEvent(seq, repo, rev, since, commit, blocks, ops, time, prev_data, too_big, blobs, rebase)


def _parse_sync(body: dict[str, Any]) -> SyncEvent:
    t = "#sync"
    return SyncEvent(
        _seq(body, t),
        _did(body, "did", t),
        _bytes(body, "blocks", t),
        _tid(body, "rev", t),
        _str(body, "time", t),
    )


def _parse_identity(body: dict[str, Any]) -> IdentityEvent:
    t = "#identity"
    return IdentityEvent(
        _seq(body, t), _did(body, "did", t), _str(body, "time", t), _opt_str(body, "handle", t)
    )


def _parse_account(body: dict[str, Any]) -> AccountEvent:
    t = "#account"
    return AccountEvent(
        _seq(body, t),
        _did(body, "did", t),
        _str(body, "time", t),
        _bool(body, "active", t),
        _opt_str(body, "status", t),
    )


def _parse_info(body: dict[str, Any]) -> InfoEvent:
    return InfoEvent(_str(body, "name", "#info"), _opt_str(body, "message", "#info"))


_PARSERS: dict[str, Callable[[dict[str, Any]], Frame]] = {
    "#commit": _parse_commit,
    "#sync": _parse_sync,
    "#identity": _parse_identity,
    "#account": _parse_account,
    "#info": _parse_info,
}


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Decode one WebSocket binary message into a typed frame; :class:`FrameError` if malformed."""
    if type(data) is not bytes:
        if not isinstance(data, (bytearray, memoryview)):
            raise FrameError(f"frame must be bytes, not {type(data).__name__}")
        data = bytes(data)
    try:
        header, used = cbor.decode_prefix(data)
        body, used2 = cbor.decode_prefix(memoryview(data)[used:])
    except cbor.DecodeError as e:
        if len(data) == 0:
            raise FrameError("empty frame") from None
        raise FrameError(f"frame is not two DAG-CBOR objects: {e}") from None
    if used + used2 != len(data):
        raise FrameError("frame has trailing bytes after header and body")
    if type(header) is not dict:
        raise FrameError("frame header is not a map")
    if type(body) is not dict:
        raise FrameError("frame body is not a map")
    op = header.get("op")
    if type(op) is not int:
        raise FrameError("frame header op must be an integer")
    t = header.get("t")
    if t is not None and type(t) is not str:
        raise FrameError("frame header t must be a string")
    if op == 1:
        if t is None:
            raise FrameError("message frame header has no type 't'")
        parser = _PARSERS.get(t)
        if parser is not None:
            return parser(body)
        return UnknownEvent(t, body, 1, _maybe_seq(body))
    if op == -1:
        error = body.get("error")
        if type(error) is not str:
            raise FrameError("error frame body needs a string 'error'")
        return ErrorFrame(error, _opt_str(body, "message", "error frame"))
    return UnknownEvent(t, body, op, _maybe_seq(body))


def _maybe_seq(body: dict[str, Any]) -> int | None:
    seq = body.get("seq")
    if type(seq) is int and _INT64_MIN <= seq <= _INT64_MAX:
        return seq
    return None


# --- encoding ------------------------------------------------------------------------------

_HEADER_CACHE: dict[str, bytes] = {}
_ERROR_HEADER = cbor.encode({"op": -1})


def encode_frame(t: str, body: dict[str, Any]) -> bytes:
    """A message frame: header ``{op: 1, t}`` + body (IPLD form, CIDs as :class:`CID`)."""
    header = _HEADER_CACHE.get(t)
    if header is None:
        if not isinstance(t, str) or not t:
            raise ValueError("frame type must be a non-empty string")
        header = cbor.encode({"op": 1, "t": t})
        if len(_HEADER_CACHE) < 64:
            _HEADER_CACHE[t] = header
    return header + cbor.encode(body)


def encode_error_frame(error: str, message: str | None = None) -> bytes:
    """An error frame (header ``{op: -1}``, no ``t``); the stream closes after it."""
    body: dict[str, Any] = {"error": error}
    if message is not None:
        body["message"] = message
    return _ERROR_HEADER + cbor.encode(body)


def now_iso() -> str:
    """Current time as the reference services write it (``2024-01-02T03:04:05.678Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _op_body(op: RepoOp) -> dict[str, Any]:
    out: dict[str, Any] = {"action": op.action, "path": op.path, "cid": op.cid}
    if op.prev is not None:
        out["prev"] = op.prev
    return out


def commit_body(
    *,
    seq: int,
    repo: str,
    commit: CID,
    rev: str,
    since: str | None,
    blocks: bytes,
    ops: Iterable[RepoOp],
    time: str,
    prev_data: CID | None = None,
    too_big: bool = False,
    blobs: Iterable[CID] = (),
) -> dict[str, Any]:
    """``#commit`` body as a current PDS emits it (deprecated fields set to their neutral values)."""
    body: dict[str, Any] = {
        "seq": seq,
        "rebase": False,
        "tooBig": too_big,
        "repo": repo,
        "commit": commit,
        "rev": rev,
        "since": since,
        "blocks": blocks,
        "ops": [_op_body(o) for o in ops],
        "blobs": list(blobs),
        "time": time,
    }
    if prev_data is not None:
        body["prevData"] = prev_data
    return body


def sync_body(*, seq: int, did: str, blocks: bytes, rev: str, time: str) -> dict[str, Any]:
    return {"seq": seq, "did": did, "blocks": blocks, "rev": rev, "time": time}


def identity_body(*, seq: int, did: str, time: str, handle: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"seq": seq, "did": did, "time": time}
    if handle is not None:
        body["handle"] = handle
    return body


def account_body(*, seq: int, did: str, time: str, active: bool, status: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"seq": seq, "did": did, "time": time, "active": active}
    if status is not None:
        body["status"] = status
    return body


def info_body(name: str, message: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name}
    if message is not None:
        body["message"] = message
    return body


def commit_event(result: repo.CommitResult, *, seq: int, time: str) -> CommitEvent:
    """The ``#commit`` event a PDS sequences for a :class:`psky.atproto.repo.CommitResult`."""
    return CommitEvent(
        seq,
        result.did,
        result.rev,
        result.since,
        result.commit_cid,
        result.blocks,
        result.ops,
        time,
        result.prev_data,
    )


def encode_event(ev: Frame) -> bytes:
    """Encode a typed frame back to wire bytes (a relay re-sequences with ``dataclasses.replace``)."""
    if isinstance(ev, CommitEvent):
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
            too_big=ev.too_big,
            blobs=ev.blobs,
        )
        body["rebase"] = ev.rebase
        return encode_frame("#commit", body)
    if isinstance(ev, SyncEvent):
        return encode_frame(
            "#sync", sync_body(seq=ev.seq, did=ev.did, blocks=ev.blocks, rev=ev.rev, time=ev.time)
        )
    if isinstance(ev, IdentityEvent):
        return encode_frame(
            "#identity", identity_body(seq=ev.seq, did=ev.did, time=ev.time, handle=ev.handle)
        )
    if isinstance(ev, AccountEvent):
        return encode_frame(
            "#account", account_body(seq=ev.seq, did=ev.did, time=ev.time, active=ev.active, status=ev.status)
        )
    if isinstance(ev, InfoEvent):
        return encode_frame("#info", info_body(ev.name, ev.message))
    if isinstance(ev, ErrorFrame):
        return encode_error_frame(ev.error, ev.message)
    if isinstance(ev, UnknownEvent):
        if ev.op != 1 or ev.t is None:
            header: dict[str, Any] = {"op": ev.op}
            if ev.t is not None:
                header["t"] = ev.t
            return cbor.encode(header) + cbor.encode(ev.body)
        return encode_frame(ev.t, ev.body)
    raise TypeError(f"not a frame: {type(ev).__name__}")


# --- commit processing ---------------------------------------------------------------------


@dataclass(slots=True)
class RecordOp:
    """A checked record operation; ``record`` is the lex-JSON value (None for deletes)."""

    action: str
    collection: str
    rkey: str
    cid: CID | None
    record: dict[str, Any] | None
    prev: CID | None = None

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.rkey}"


@dataclass(slots=True)
class CommitResult:
    """Outcome of :func:`process_commit`.

    ``signature``/``proof`` are True (checked, good), False (checked, bad) or None (not
    checked: no key given, no ``prevData``, legacy ops without ``prev``, or an earlier
    failure). ``reasons`` holds short codes (``bad-car``, ``missing-block``, ``bad-commit``,
    ``did-mismatch``, ``rev-mismatch``, ``root-mismatch``, ``bad-key``, ``bad-signature``,
    ``invalid-op``, ``invalid-path``, ``op-mismatch``, ``proof-mismatch``, ``proof-invalid``,
    ``bad-record``, ``too-big``); ``errors`` the matching human-readable details. ``ops``
    lists the operations with a valid ``<nsid>/<rkey>`` path whose records are present and
    decodable (deletes always), in message order.
    """

    seq: int
    did: str
    rev: str
    commit_cid: CID
    commit: Commit | None = None
    signature: bool | None = None
    proof: bool | None = None
    reasons: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ops: list[RecordOp] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (checks that were not run do not count as failures)."""
        return not self.reasons

    @property
    def data(self) -> CID | None:
        """MST root after this commit: the ``prevData`` the repo's next commit must carry."""
        return self.commit.data if self.commit is not None else None

    def _fail(self, reason: str, detail: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.errors.append(detail)


#: collections already found to be valid NSIDs: a firehose names a few hundred, so most
#: paths skip the NSID regex (bounded, so a stream of made-up names cannot grow it)
_VALID_COLLECTIONS: set[str] = set()
_MAX_VALID_COLLECTIONS = 4096


def _split_path(path: str) -> tuple[str, str] | None:
    """``<nsid>/<record-key>`` → (collection, rkey), or None. A path this accepts is also a
    valid repo path (:func:`is_valid_key`): both parts use a subset of its characters, are
    neither ``.`` nor ``..``, and are together far shorter than its length limit."""
    collection, sep, rkey = path.partition("/")
    if not sep or not is_valid_record_key(rkey):
        return None
    if collection not in _VALID_COLLECTIONS:
        if not is_valid_nsid(collection):
            return None
        if len(_VALID_COLLECTIONS) < _MAX_VALID_COLLECTIONS:
            _VALID_COLLECTIONS.add(collection)
    return collection, rkey


def _check_key(key: str | PublicKey) -> PublicKey:
    return key if isinstance(key, PublicKey) else verifier_for(key)


def process_commit(
    ev: CommitEvent,
    *,
    signing_key: str | PublicKey | None = None,
    check_proof: bool = True,
    verify_blocks: bool = True,
) -> CommitResult:
    """Verify a ``#commit`` and extract its record operations (never raises on bad content).

    ``verify_blocks=False`` skips hashing the blocks against their CIDs (most of the cost
    when neither signature nor proof is checked: a caller trusting the relay)."""
    res = CommitResult(ev.seq, ev.repo, ev.rev, ev.commit)
    if len(ev.blocks) > MAX_COMMIT_BLOCKS_BYTES or len(ev.ops) > MAX_OPS:
        res._fail("too-big", f"commit exceeds limits ({len(ev.blocks)} block bytes, {len(ev.ops)} ops)")
    try:
        car = read_car(ev.blocks, verify=verify_blocks)
    except (CarError, ValueError) as e:
        res._fail("bad-car", f"blocks: {e}")
        return res
    blocks = car.blocks
    if not car.roots or car.roots[0] != ev.commit:
        res._fail("root-mismatch", "CAR root is not the commit CID")
    commit_block = blocks.get(ev.commit)
    if commit_block is None:
        res._fail("missing-block", f"commit block {ev.commit.encode()} not in blocks")
        return res
    try:
        commit = Commit.decode(commit_block)
    except CommitError as e:
        res._fail("bad-commit", str(e))
        return res
    res.commit = commit
    if commit.did != ev.repo:
        res._fail("did-mismatch", f"commit did {commit.did} != repo {ev.repo}")
    if commit.rev != ev.rev:
        res._fail("rev-mismatch", f"commit rev {commit.rev} != event rev {ev.rev}")

    if signing_key is not None:
        try:
            key = _check_key(signing_key)
        except ValueError as e:
            res.signature = False
            res._fail("bad-key", f"signing key unusable: {e}")
        else:
            res.signature = key.verify(commit.unsigned_bytes(), commit.sig)
            if not res.signature:
                res._fail("bad-signature", "commit signature does not verify")

    # --- operations: shape, then authentication by the signed tree -------------------------
    # (op, collection, rkey); collection/rkey are None for a path that is a valid MST key but
    # not <nsid>/<rkey>: it still takes part in the proof, but yields no record
    parsed: list[tuple[RepoOp, str | None, str | None]] = []
    legacy = False
    seen: set[str] = set()
    for op in ev.ops:
        problem = None
        split = _split_path(op.path)  # a path it accepts is a valid key: one check, not two
        if split is None and not is_valid_key(op.path):
            problem = f"invalid repo path {op.path!r:.120}"
        elif op.path in seen:
            problem = f"duplicate op path {op.path}"
        elif op.action == "create":
            if op.cid is None or op.prev is not None:
                problem = f"create {op.path} needs cid and no prev"
        elif op.action == "update":
            if op.cid is None:
                problem = f"update {op.path} needs cid"
            elif op.prev is None:
                legacy = True
        elif op.action == "delete":
            if op.cid is not None:
                problem = f"delete {op.path} must have a null cid"
            elif op.prev is None:
                legacy = True
        else:
            problem = f"unknown op action {op.action!r:.40}"
        if problem is not None:
            res._fail("invalid-op", problem)
            continue
        seen.add(op.path)
        if split is None:
            res._fail("invalid-path", f"record path {op.path!r:.120} is not <nsid>/<record-key>")
            parsed.append((op, None, None))
        else:
            parsed.append((op, split[0], split[1]))

    if check_proof:
        _check_proof(res, ev, blocks, commit, [op for op, _, _ in parsed], legacy)

    # --- records ----------------------------------------------------------------------------
    for op, collection, rkey in parsed:
        if collection is None or rkey is None:
            continue
        if op.action == "delete":
            res.ops.append(RecordOp("delete", collection, rkey, None, None, op.prev))
            continue
        assert op.cid is not None
        block = blocks.get(op.cid)
        if block is None:
            res._fail("missing-block", f"record block {op.cid.encode()} for {op.path} not in blocks")
            continue
        if len(block) > MAX_RECORD_BYTES:
            res._fail("bad-record", f"record {op.path} is larger than {MAX_RECORD_BYTES} bytes")
            continue
        try:
            record = cbor.decode_lex(block)
        except cbor.DecodeError as e:
            res._fail("bad-record", f"record {op.path}: {e}")
            continue
        if type(record) is not dict:
            res._fail("bad-record", f"record {op.path} is not a map")
            continue
        res.ops.append(RecordOp(op.action, collection, rkey, op.cid, record, op.prev))
    return res


def _check_proof(
    res: CommitResult,
    ev: CommitEvent,
    blocks: dict[CID, bytes],
    commit: Commit,
    ops: Sequence[RepoOp],
    legacy: bool,
) -> None:
    """Inductive proof when possible; otherwise at least tie each op to the signed tree."""
    if ev.prev_data is not None and not legacy and len(ops) == len(ev.ops):
        try:
            # read_car(..., verify=True) has hash-checked every block: no need to re-hash
            root_before = invert_ops(blocks, commit.data, ops, verify=False)
        except MissingBlock as e:
            res.proof = False
            res._fail("missing-block", f"proof: {e}")
            return
        except (MstError, ValueError) as e:
            res.proof = False
            res._fail("proof-invalid", f"proof: {e}")
            return
        res.proof = root_before == ev.prev_data
        if not res.proof:
            res._fail("proof-mismatch", "inverted tree root does not match prevData")
        return
    # no inversion possible: authenticate the written records against the signed tree
    try:
        tree = MST.load(blocks, commit.data)
        for op in ops:
            current = tree.get(op.path)
            if current != op.cid:
                res._fail("op-mismatch", f"{op.action} {op.path}: tree value differs from op cid")
    except MissingBlock as e:
        res._fail("missing-block", f"proof: {e}")
    except (MstError, ValueError) as e:
        res._fail("proof-invalid", f"tree: {e}")


@dataclass(frozen=True, slots=True)
class SyncResult:
    """Outcome of :func:`process_sync`: the asserted repo state and the failed checks."""

    seq: int
    did: str
    rev: str
    commit_cid: CID | None
    commit: Commit | None
    signature: bool | None
    reasons: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.reasons


def process_sync(ev: SyncEvent, *, signing_key: str | PublicKey | None = None) -> SyncResult:
    """Check a ``#sync``: its CAR holds the commit as first root, consistent with the event."""
    reasons: list[str] = []
    try:
        car = read_car(ev.blocks, verify=True)
    except (CarError, ValueError):
        return SyncResult(ev.seq, ev.did, ev.rev, None, None, None, ("bad-car",))
    if not car.roots:
        return SyncResult(ev.seq, ev.did, ev.rev, None, None, None, ("bad-car",))
    root = car.roots[0]
    block = car.blocks.get(root)
    if block is None:
        return SyncResult(ev.seq, ev.did, ev.rev, root, None, None, ("missing-block",))
    try:
        commit = Commit.decode(block)
    except CommitError:
        return SyncResult(ev.seq, ev.did, ev.rev, root, None, None, ("bad-commit",))
    if commit.did != ev.did:
        reasons.append("did-mismatch")
    if commit.rev != ev.rev:
        reasons.append("rev-mismatch")
    signature: bool | None = None
    if signing_key is not None:
        try:
            signature = _check_key(signing_key).verify(commit.unsigned_bytes(), commit.sig)
        except ValueError:
            signature = False
            reasons.append("bad-key")
        if not signature and "bad-key" not in reasons:
            reasons.append("bad-signature")
    return SyncResult(ev.seq, ev.did, ev.rev, root, commit, signature, tuple(reasons))


# --- the native fast path --------------------------------------------------------------------


class CheckedCommit(NamedTuple):
    """A ``#commit`` frame decoded and checked in one native pass, with its stream events.

    ``events`` holds ``(collection, action, JSON)`` per op, in op order: the bytes
    ``orjson.dumps`` writes for :func:`to_stream_events` (no collection filter applied).
    ``data``, ``unsigned`` and ``sig`` (the MST root after the commit, the commit block less its
    signature, the signature) are set when verifying: the caller still checks the signature
    and the repo's rev/``prevData`` chain.
    """

    seq: int
    repo: str
    rev: str
    time: str
    commit: bytes
    prev_data: bytes | None
    data: bytes | None
    unsigned: bytes | None
    sig: bytes | None
    events: list[tuple[str, str, bytes]]


_new_checked: Any = tuple.__new__


def check_commit_frame(data: bytes, *, verify: bool) -> CheckedCommit | None:
    """The usual, valid ``#commit`` in one C pass; None for anything else (and when the
    extension is not built or ``PSKY_NATIVE=0``), which the Python path then decides.

    Returned means: :func:`decode_frame` gives a :class:`CommitEvent` (not ``tooBig``) that
    :func:`process_commit` (``verify``: block hashes, commit block, the sync 1.1 proof, or
    without ``prevData`` each op against the signed tree; the signature is left to the
    caller) or the unverified path passes with no failed check, and whose stream events are
    byte for byte ``events``. ``tests/test_commit_native.py`` holds
    the two paths to that."""
    if not NATIVE_COMMITS:
        return None
    raw = _native.commit_fast(data, verify)
    if raw is None:
        return None
    checked: CheckedCommit = _new_checked(CheckedCommit, raw)
    return checked


# --- psky Redis wire format ----------------------------------------------------------------


def to_stream_events(result: CommitResult | None, ev: Frame) -> list[dict[str, Any]]:
    """StreamEvent dicts as the TypeScript ingester writes them (same keys, order, omissions).

    ``#commit`` → one create/update/delete per checked op (needs *result*); ``#account`` and
    ``#identity`` → one event each (optional ``status``/``handle`` omitted when absent); any
    other frame → nothing, as in the reference ingester. ``result.ok`` is not consulted:
    which failed checks drop a commit is the caller's policy.
    """
    if isinstance(ev, CommitEvent):
        if result is None:
            raise ValueError("a #commit needs its process_commit result")
        commit = encode_cid(ev.commit.cid_bytes)  # libipld: ~20x cbrrr's CID.encode, same text
        out: list[dict[str, Any]] = []
        for op in result.ops:
            if op.action == "delete":
                out.append(
                    {
                        "type": "delete",
                        "seq": ev.seq,
                        "time": ev.time,
                        "did": ev.repo,
                        "commit": commit,
                        "rev": ev.rev,
                        "collection": op.collection,
                        "rkey": op.rkey,
                    }
                )
            else:
                assert op.cid is not None
                out.append(
                    {
                        "type": op.action,
                        "record": op.record,
                        "cid": encode_cid(op.cid.cid_bytes),
                        "seq": ev.seq,
                        "time": ev.time,
                        "did": ev.repo,
                        "commit": commit,
                        "rev": ev.rev,
                        "collection": op.collection,
                        "rkey": op.rkey,
                    }
                )
        return out
    if isinstance(ev, AccountEvent):
        acc: dict[str, Any] = {
            "type": "account",
            "seq": ev.seq,
            "time": ev.time,
            "did": ev.did,
            "active": ev.active,
        }
        if ev.status is not None:
            acc["status"] = ev.status
        return [acc]
    if isinstance(ev, IdentityEvent):
        ident: dict[str, Any] = {"type": "identity", "seq": ev.seq, "time": ev.time, "did": ev.did}
        if ev.handle is not None:
            ident["handle"] = ev.handle
        return [ident]
    return []
