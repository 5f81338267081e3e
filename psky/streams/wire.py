"""The Redis wire format shared with the TypeScript services (DESIGN.md, "Wire contract").

Every entry is ``XADD <stream> * <field> <json>``:

- ``firehose_live`` / ``firehose_backfill``: field ``event``, a StreamEvent
  (``create``/``update``/``delete``/``repo``/``account``/``identity``);
- ``repo_backfill``: field ``repo``, ``{"did","host","rev","status"?,"active"?}``;
- ``label_live``: field ``event``, ``{"type":"label","label":{…}}`` (lex JSON label).

Encoders write exactly what the TypeScript services write (optional members omitted when
absent, records and labels in lex JSON). Parsers validate what downstream code relies on
(DIDs, NSIDs, record keys, CID strings, types) and raise :class:`MalformedMessage` with a
short ``code`` for metrics and a message naming the field, so a consumer can acknowledge
and count a bad entry instead of retrying it. Two foreign shapes are read for takeover:
labels whose ``sig`` is the numbered-keys object ``JSON.stringify`` makes of a Uint8Array
(the TypeScript ingester) and rsky's ``labels`` field (``{"seq", "labels": [...]}``).

Leniency, where real producers differ: an operation without ``seq`` reads as backfill
(rsky's indexer does the same), any negative ``seq`` is backfill (rsky writes -1, psky
:data:`SEQ_BACKFILL` = -2 as the design specifies), ``time`` may carry the legacy datetime
slips old relays emit, and an identity ``handle`` is any string (the indexer verifies it).

Cursors: string keys :func:`cursor_key` ``<stream>:cursor:<host without scheme>``; a listRepos
cursor reads :data:`CURSOR_DONE` once the host is fully enumerated.

Dead letters: stream ``<stream>_dlq`` (:func:`dlq_stream_for`), so ``repo_backfill_dlq`` for
the backfiller (rsky's name) and ``firehose_live_dlq``, ``firehose_backfill_dlq``,
``label_live_dlq`` for the indexer. An entry (:class:`DeadLetter`) keeps the original fields
verbatim, so it can be replayed into its source stream unchanged, followed by the metadata
fields of :data:`DEAD_LETTER_META`: ``reason``, ``attempts`` (deliveries; both named as
rsky's backfiller names them), ``source_stream``, ``source_id``, ``group``, ``consumer``,
``time`` (ISO 8601, when dead-lettered). An original field named like a metadata field is
kept as ``orig:<name>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast

import orjson

from psky.atproto import cbor
from psky.atproto.label import InvalidLabel, Label
from psky.atproto.syntax import (
    is_valid_cid,
    is_valid_datetime,
    is_valid_datetime_lenient,
    is_valid_did,
    is_valid_nsid,
    is_valid_record_key,
)

__all__ = [
    "BACKFILL_FIELD",
    "CURSOR_DONE",
    "DEAD_LETTER_META",
    "EVENT_FIELD",
    "FIREHOSE_BACKFILL",
    "FIREHOSE_GROUP",
    "FIREHOSE_LIVE",
    "LABEL_GROUP",
    "LABEL_LIVE",
    "REPO_BACKFILL",
    "REPO_BACKFILL_DLQ",
    "REPO_BACKFILL_GROUP",
    "RSKY_LABELS_FIELD",
    "SEQ_BACKFILL",
    "AccountEvent",
    "BackfillRequest",
    "DeadLetter",
    "DeleteEvent",
    "EntryFields",
    "IdentityEvent",
    "MalformedMessage",
    "RecordEvent",
    "RepoEvent",
    "StreamEvent",
    "backfill_fields",
    "cursor_key",
    "dead_letter_fields",
    "dlq_stream_for",
    "encode_backfill_request",
    "encode_event",
    "encode_label",
    "event_fields",
    "event_from_json",
    "label_fields",
    "now_iso",
    "parse_backfill_request",
    "parse_dead_letter",
    "parse_event",
    "parse_label_entry",
    "parse_stream_event",
]

# --- names ------------------------------------------------------------------------------

FIREHOSE_LIVE: Final = "firehose_live"
FIREHOSE_BACKFILL: Final = "firehose_backfill"
LABEL_LIVE: Final = "label_live"
REPO_BACKFILL: Final = "repo_backfill"
#: the backfiller's dead-letter stream (rsky's name)
REPO_BACKFILL_DLQ: Final = "repo_backfill_dlq"

FIREHOSE_GROUP: Final = "firehose_group"
LABEL_GROUP: Final = "label_group"
REPO_BACKFILL_GROUP: Final = "repo_backfill_group"

#: ``seq`` of operations emitted by a backfiller (rsky and early TypeScript used -1; both read as backfill)
SEQ_BACKFILL: Final = -2
#: value of a listRepos cursor key once enumeration of that host finished
CURSOR_DONE: Final = "!ingester-done"

EVENT_FIELD: Final = "event"
BACKFILL_FIELD: Final = "repo"
#: rsky's label entries: field ``labels`` holding ``{"seq", "labels": [...]}``
RSKY_LABELS_FIELD: Final = "labels"

#: an entry's fields as parsers accept them: str or bytes names (psky's consumer gives str
#: names and bytes values; plain redis-py gives bytes or, decoding, str for both)
EntryFields = Mapping[str, bytes] | Mapping[str, str] | Mapping[bytes, bytes]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def cursor_key(stream: str, host: str) -> str:
    """``<stream>:cursor:<host without scheme>``, the key the TypeScript ingester uses.

    Only the scheme is removed (as ``host.replace(/^https?:\\/\\//, '')`` does for http(s)),
    so the same configured host string maps to the same key in both implementations.
    """
    return f"{stream}:cursor:{_SCHEME.sub('', host, count=1)}"


def dlq_stream_for(stream: str) -> str:
    """Dead-letter stream of *stream*: ``<stream>_dlq`` (``repo_backfill`` → ``repo_backfill_dlq``,
    ``firehose_live`` → ``firehose_live_dlq``)."""
    return f"{stream}_dlq"


def now_iso() -> str:
    """Current UTC time as JavaScript's ``toISOString()`` prints it (millisecond precision)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MalformedMessage(ValueError):
    """A stream entry that cannot be used. ``code`` is short and stable (a metrics label)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[MalformedMessage], tuple[str, str]]:
        return (type(self), (self.code, str(self)))  # picklable despite the two-argument __init__


# --- events -----------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class RecordEvent:
    """``create`` or ``update`` of one record; ``record`` is in lex JSON form."""

    type: Literal["create", "update"]
    seq: int
    time: str
    did: str
    commit: str
    rev: str
    collection: str
    rkey: str
    cid: str
    record: dict[str, Any]

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"

    @property
    def is_backfill(self) -> bool:
        return self.seq < 0


@dataclass(slots=True, kw_only=True)
class DeleteEvent:
    type: Literal["delete"] = "delete"
    seq: int
    time: str
    did: str
    commit: str
    rev: str
    collection: str
    rkey: str

    @property
    def uri(self) -> str:
        return f"at://{self.did}/{self.collection}/{self.rkey}"

    @property
    def is_backfill(self) -> bool:
        return self.seq < 0


@dataclass(slots=True, kw_only=True)
class RepoEvent:
    """End of one backfilled repository (written after all its ``create`` events)."""

    type: Literal["repo"] = "repo"
    time: str
    did: str
    commit: str
    rev: str


@dataclass(slots=True, kw_only=True)
class AccountEvent:
    type: Literal["account"] = "account"
    seq: int
    time: str
    did: str
    active: bool
    status: str | None = None


@dataclass(slots=True, kw_only=True)
class IdentityEvent:
    type: Literal["identity"] = "identity"
    seq: int
    time: str
    did: str
    handle: str | None = None


StreamEvent = RecordEvent | DeleteEvent | RepoEvent | AccountEvent | IdentityEvent


@dataclass(slots=True, kw_only=True)
class BackfillRequest:
    """A ``repo_backfill`` entry. ``host`` is a hint (the account's PDS is resolved anyway);
    ``rev`` is ``""`` when unknown (hand-queued repos)."""

    did: str
    host: str
    rev: str = ""
    status: str | None = None
    active: bool | None = None


# --- encoding ---------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Let encoders take IPLD-form records too: CIDs and bytes become lex JSON on the fly."""
    if isinstance(value, cbor.CID):
        return {"$link": value.encode()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": cbor.b64encode_unpadded(bytes(value))}
    raise TypeError(f"cannot encode {type(value).__name__} in a stream event")


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj, default=_json_default)
    except TypeError as e:  # orjson.JSONEncodeError is a TypeError
        raise ValueError(f"cannot encode stream entry: {e}") from None


def encode_event(event: StreamEvent) -> bytes:
    """JSON of a StreamEvent, members in the order the design lists them, optional ones omitted."""
    obj: dict[str, Any]
    if isinstance(event, RecordEvent):
        obj = {
            "type": event.type, "seq": event.seq, "time": event.time, "did": event.did,
            "commit": event.commit, "rev": event.rev, "collection": event.collection,
            "rkey": event.rkey, "cid": event.cid, "record": event.record,
        }  # fmt: skip
    elif isinstance(event, DeleteEvent):
        obj = {
            "type": "delete", "seq": event.seq, "time": event.time, "did": event.did,
            "commit": event.commit, "rev": event.rev, "collection": event.collection, "rkey": event.rkey,
        }  # fmt: skip
    elif isinstance(event, RepoEvent):
        obj = {"type": "repo", "time": event.time, "did": event.did, "commit": event.commit, "rev": event.rev}
    elif isinstance(event, AccountEvent):
        obj = {
            "type": "account",
            "seq": event.seq,
            "time": event.time,
            "did": event.did,
            "active": event.active,
        }
        if event.status is not None:
            obj["status"] = event.status
    elif isinstance(event, IdentityEvent):
        obj = {"type": "identity", "seq": event.seq, "time": event.time, "did": event.did}
        if event.handle is not None:
            obj["handle"] = event.handle
    else:
        raise TypeError(f"not a StreamEvent: {type(event).__name__}")
    return _dumps(obj)


def event_fields(event: StreamEvent) -> dict[str, bytes]:
    """Fields of the ``firehose_*`` entry for *event*."""
    return {EVENT_FIELD: encode_event(event)}


def encode_backfill_request(request: BackfillRequest) -> bytes:
    obj: dict[str, Any] = {"did": request.did, "host": request.host, "rev": request.rev}
    if request.status is not None:
        obj["status"] = request.status
    if request.active is not None:
        obj["active"] = request.active
    return _dumps(obj)


def backfill_fields(request: BackfillRequest) -> dict[str, bytes]:
    """Fields of the ``repo_backfill`` entry for *request*."""
    return {BACKFILL_FIELD: encode_backfill_request(request)}


def encode_label(label: Label) -> bytes:
    return _dumps({"type": "label", "label": label.to_lex()})


def label_fields(label: Label) -> dict[str, bytes]:
    """Fields of the ``label_live`` entry for *label* (one entry per label)."""
    return {EVENT_FIELD: encode_label(label)}


# --- parsing ----------------------------------------------------------------------------

_MAX_TEXT = 2048  # longest free-form string member accepted (rev, status, host, time …)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def _loads(data: object, what: str) -> Any:
    if not isinstance(data, (bytes, str, bytearray, memoryview)):
        raise MalformedMessage("bad_json", f"{what} is a {type(data).__name__}, not JSON text")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise MalformedMessage("bad_json", f"{what} is not valid JSON: {e}") from None


def _get(fields: EntryFields, name: str) -> object:
    """A field by name, whether the mapping's keys are str (psky) or bytes (raw redis-py)."""
    any_fields = cast(Mapping[Any, Any], fields)
    value = any_fields.get(name)
    return any_fields.get(name.encode()) if value is None else value


def _field(fields: EntryFields, name: str) -> object:
    value = _get(fields, name)
    if value is None:
        names = ", ".join(
            sorted(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in fields)[:5]
        )
        raise MalformedMessage(
            f"missing_{name}_field", f"entry has no {name!r} field (fields: {names or 'none'})"
        )
    return value


def _req(obj: dict[str, Any], key: str) -> Any:
    value = obj.get(key)
    if value is None:
        raise MalformedMessage(f"missing_{key}", f"{obj.get('type', 'entry')}: missing {key!r}")
    return value


def _checked(obj: dict[str, Any], key: str, check: Callable[[object], bool], what: str) -> str:
    value = _req(obj, key)
    if not check(value):
        raise MalformedMessage(
            f"bad_{key}", f"{obj.get('type', 'entry')}: {key} is not {what}: {value!r:.100}"
        )
    return value  # type: ignore[no-any-return]  # check() accepted only str


def _text(value: object) -> bool:
    # no NUL: PostgreSQL text cannot store it, so such an entry could never be indexed
    return type(value) is str and 0 < len(value) <= _MAX_TEXT and "\x00" not in value


def _opt_text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str or len(value) > _MAX_TEXT or "\x00" in value:
        raise MalformedMessage(f"bad_{key}", f"{obj.get('type', 'entry')}: {key} must be a string without NUL")
    return value


def _seq(obj: dict[str, Any], *, default: int | None = None) -> int:
    value = obj.get("seq")
    if value is None and default is not None:
        return default
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise MalformedMessage("bad_seq", f"{obj.get('type')}: seq must be a 64-bit integer: {value!r:.40}")
    return value


def _is_time(value: object) -> bool:
    return is_valid_datetime(value) or is_valid_datetime_lenient(value)


def _time(obj: dict[str, Any]) -> str:
    return _checked(obj, "time", _is_time, "a datetime")


class _SeenValid:
    """A validity check remembering recent valid strings. Events of one commit (and every
    event of a backfilled repo) repeat the same DID, commit, rev and time, and collections
    are few, so most checks become one set lookup."""

    __slots__ = ("check", "seen")

    def __init__(self, check: Callable[[object], bool]) -> None:
        self.check = check
        self.seen: set[str] = set()

    def __call__(self, value: object) -> bool:
        if type(value) is not str:
            return False
        if value in self.seen:
            return True
        if not self.check(value):
            return False
        if len(self.seen) >= 4096:
            self.seen.clear()
        self.seen.add(value)
        return True


_valid_time = _SeenValid(_is_time)
_valid_did = _SeenValid(is_valid_did)
_valid_commit = _SeenValid(is_valid_cid)
_valid_rev = _SeenValid(_text)
_valid_collection = _SeenValid(is_valid_nsid)


def _op_common(obj: dict[str, Any]) -> tuple[int, str, str, str, str, str, str]:
    """The members every operation has, validated; the precise error when one is wrong."""
    get = obj.get
    seq, time, did, commit, rev, collection, rkey = (
        get("seq"), get("time"), get("did"), get("commit"), get("rev"), get("collection"), get("rkey"),
    )  # fmt: skip
    if type(seq) is not int or not _INT64_MIN <= seq <= _INT64_MAX:
        # a missing seq on an operation is read as backfill, as rsky's indexer does
        seq = _seq(obj, default=SEQ_BACKFILL)
    if not (
        _valid_time(time)
        and _valid_did(did)
        and _valid_commit(commit)
        and _valid_rev(rev)
        and _valid_collection(collection)
        and is_valid_record_key(rkey)
    ):
        _time(obj)
        _checked(obj, "did", is_valid_did, "a DID")
        _checked(obj, "commit", is_valid_cid, "a CID")
        _checked(obj, "rev", _text, "a revision string")
        _checked(obj, "collection", is_valid_nsid, "an NSID")
        _checked(obj, "rkey", is_valid_record_key, "a record key")
    return seq, time, did, commit, rev, collection, rkey  # type: ignore[return-value]  # validated


def _record_event(obj: dict[str, Any]) -> RecordEvent:
    seq, time, did, commit, rev, collection, rkey = _op_common(obj)
    cid = obj.get("cid")
    if not is_valid_cid(cid):
        _checked(obj, "cid", is_valid_cid, "a CID")
    record = obj.get("record")
    if type(record) is not dict:
        _req(obj, "record")
        raise MalformedMessage("bad_record", f"{obj['type']}: record must be a JSON object")
    return RecordEvent(
        type=obj["type"], seq=seq, time=time, did=did, commit=commit, rev=rev,
        collection=collection, rkey=rkey, cid=cid, record=record,  # type: ignore[arg-type]  # checked
    )  # fmt: skip


def _delete_event(obj: dict[str, Any]) -> DeleteEvent:
    seq, time, did, commit, rev, collection, rkey = _op_common(obj)
    return DeleteEvent(seq=seq, time=time, did=did, commit=commit, rev=rev, collection=collection, rkey=rkey)


def _repo_event(obj: dict[str, Any]) -> RepoEvent:
    return RepoEvent(
        time=_time(obj),
        did=_checked(obj, "did", is_valid_did, "a DID"),
        commit=_checked(obj, "commit", is_valid_cid, "a CID"),
        rev=_checked(obj, "rev", _text, "a revision string"),
    )


def _account_event(obj: dict[str, Any]) -> AccountEvent:
    active = obj.get("active")
    if type(active) is not bool:
        raise MalformedMessage("bad_active", f"account: active must be a boolean: {active!r:.40}")
    return AccountEvent(
        seq=_seq(obj),
        time=_time(obj),
        did=_checked(obj, "did", is_valid_did, "a DID"),
        active=active,
        status=_opt_text(obj, "status"),
    )


def _identity_event(obj: dict[str, Any]) -> IdentityEvent:
    # The handle is only a hint (the indexer verifies it against the DID document), so any
    # string is carried through rather than rejecting the identity update; one that could
    # not be stored (too long, NUL) reads as absent.
    handle = obj.get("handle")
    if type(handle) is str and (len(handle) > _MAX_TEXT or "\x00" in handle):
        handle = None
    return IdentityEvent(
        seq=_seq(obj),
        time=_time(obj),
        did=_checked(obj, "did", is_valid_did, "a DID"),
        handle=None if handle is None else _opt_text(obj, "handle"),
    )


_EVENT_PARSERS: dict[str, Callable[[dict[str, Any]], StreamEvent]] = {
    "create": _record_event,
    "update": _record_event,
    "delete": _delete_event,
    "repo": _repo_event,
    "account": _account_event,
    "identity": _identity_event,
}


def event_from_json(obj: Any) -> StreamEvent:
    """Validate an already decoded StreamEvent object."""
    if type(obj) is not dict:
        raise MalformedMessage("not_object", f"event must be a JSON object, not {type(obj).__name__}")
    kind = obj.get("type")
    parser = _EVENT_PARSERS.get(kind) if type(kind) is str else None
    if parser is None:
        raise MalformedMessage("unknown_type", f"unknown event type {kind!r:.40}")
    return parser(obj)


def parse_event(data: bytes | str) -> StreamEvent:
    """Parse the JSON text of a StreamEvent."""
    return event_from_json(_loads(data, "event"))


def parse_stream_event(fields: EntryFields) -> StreamEvent:
    """Parse a ``firehose_*`` entry (its ``event`` field)."""
    return event_from_json(_loads(_field(fields, EVENT_FIELD), "event"))


def parse_backfill_request(fields: EntryFields) -> BackfillRequest:
    """Parse a ``repo_backfill`` entry (its ``repo`` field)."""
    obj = _loads(_field(fields, BACKFILL_FIELD), "repo")
    if type(obj) is not dict:
        raise MalformedMessage("not_object", "repo must be a JSON object")
    did = _checked(obj, "did", is_valid_did, "a DID")
    host = obj.get("host", "")
    if type(host) is not str or len(host) > _MAX_TEXT or _CONTROL.search(host):
        raise MalformedMessage("bad_host", f"repo: host must be a URL or hostname: {host!r:.100}")
    rev = obj.get("rev")
    if rev is None:
        rev = ""
    elif type(rev) is not str or len(rev) > _MAX_TEXT or "\x00" in rev:
        raise MalformedMessage("bad_rev", "repo: rev must be a string without NUL")
    active = obj.get("active")
    if active is not None and type(active) is not bool:
        raise MalformedMessage("bad_active", f"repo: active must be a boolean: {active!r:.40}")
    return BackfillRequest(did=did, host=host, rev=rev, status=_opt_text(obj, "status"), active=active)


def _sig_to_lex(sig: Any) -> Any:
    """``JSON.stringify(Uint8Array)`` gives ``{"0":…,"1":…}``; turn that into ``{"$bytes"}``."""
    if type(sig) is not dict or "$bytes" in sig or not sig or len(sig) > 1024:
        return sig
    try:
        raw = bytes(sig[str(i)] for i in range(len(sig)))
    except (KeyError, TypeError, ValueError):
        return sig  # not the numbered form: let Label.from_lex reject it
    return {"$bytes": cbor.b64encode_unpadded(raw)}


def _label(obj: Any) -> Label:
    if type(obj) is not dict:
        raise MalformedMessage("bad_label", "label must be a JSON object")
    if "sig" in obj:
        obj = {**obj, "sig": _sig_to_lex(obj["sig"])}
    try:
        return Label.from_lex(obj)
    except InvalidLabel as e:
        raise MalformedMessage("bad_label", f"label: {e}") from None


def parse_label_entry(fields: EntryFields) -> list[Label]:
    """Labels of a ``label_live`` entry: ``event`` = ``{"type":"label","label"}`` (one label), or
    rsky's ``labels`` = ``{"seq","labels":[…]}`` (several)."""
    rsky = _get(fields, RSKY_LABELS_FIELD)
    if rsky is not None and _get(fields, EVENT_FIELD) is None:
        obj = _loads(rsky, "labels")
        labels = obj.get("labels") if type(obj) is dict else None
        if type(labels) is not list:
            raise MalformedMessage("bad_labels", "labels entry must be an object with a labels array")
        return [_label(item) for item in labels]
    obj = _loads(_field(fields, EVENT_FIELD), "event")
    if type(obj) is not dict or obj.get("type") != "label":
        kind = obj.get("type") if type(obj) is dict else type(obj).__name__
        raise MalformedMessage("unknown_type", f"label stream event of type {kind!r:.40}")
    return [_label(obj.get("label"))]


# --- dead letters -----------------------------------------------------------------------

#: metadata fields of a dead-letter entry, written after the original fields
DEAD_LETTER_META: Final = ("reason", "attempts", "source_stream", "source_id", "group", "consumer", "time")
_ORIG = "orig:"


@dataclass(slots=True, kw_only=True)
class DeadLetter:
    """One dead-letter entry.

    On the wire (``XADD <dlq> * <original fields…> reason … attempts … source_stream …
    source_id … group … consumer … time …``): the original fields verbatim, except that one
    whose name is a metadata name (or starts with ``orig:``) is written as ``orig:<name>``;
    ``attempts`` is the number of deliveries, ``time`` when it was dead-lettered (ISO 8601).
    """

    source_stream: str
    source_id: str
    group: str
    consumer: str
    reason: str
    attempts: int
    time: str = field(default_factory=now_iso)
    fields: dict[str, bytes] = field(default_factory=dict)


def dead_letter_fields(letter: DeadLetter) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for name, value in letter.fields.items():
        out[_ORIG + name if name in DEAD_LETTER_META or name.startswith(_ORIG) else name] = value
    out["reason"] = letter.reason
    out["attempts"] = str(letter.attempts)
    out["source_stream"] = letter.source_stream
    out["source_id"] = letter.source_id
    out["group"] = letter.group
    out["consumer"] = letter.consumer
    out["time"] = letter.time
    return out


def parse_dead_letter(fields: EntryFields) -> DeadLetter:
    """Read a dead-letter entry; rsky's (only ``repo``, ``reason``, ``attempts``) reads too."""

    def text(name: str) -> str:
        value = _get(fields, name) or b""
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    try:
        attempts = int(text("attempts") or 0)
    except ValueError:
        raise MalformedMessage(
            "bad_attempts", f"dead letter: attempts is not a number: {text('attempts')!r:.40}"
        ) from None
    original: dict[str, bytes] = {}
    for raw_name, value in fields.items():
        name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else raw_name
        if name not in DEAD_LETTER_META:
            original[name[len(_ORIG) :] if name.startswith(_ORIG) else name] = (
                value.encode() if isinstance(value, str) else value
            )
    return DeadLetter(
        source_stream=text("source_stream"),
        source_id=text("source_id"),
        group=text("group"),
        consumer=text("consumer"),
        reason=text("reason"),
        attempts=attempts,
        time=text("time"),
        fields=original,
    )
