"""Labels (``com.atproto.label.defs#label``): parsing, signing, verification, stream messages.

A label is signed over the DAG-CBOR encoding of exactly its schema fields minus ``sig``,
with ``ver`` present (version 1) and absent optional fields omitted. ``neg`` is omitted
when false by well-behaved labelers, but some emit ``neg: false``; since the signature
covers whatever the labeler encoded, a parsed label remembers an explicit ``neg: false``
(:attr:`Label.neg_explicit`) so that verification and re-serialisation reproduce it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psky.atproto import cbor
from psky.atproto.crypto import InvalidKey, PrivateKey, PublicKey, verifier_for
from psky.atproto.syntax import is_valid_at_uri, is_valid_cid, is_valid_datetime, is_valid_did

__all__ = [
    "LABEL_VERSION",
    "ErrorMessage",
    "InfoMessage",
    "InvalidLabel",
    "InvalidLabelMessage",
    "Label",
    "LabelsMessage",
    "decode_labels_frame",
    "decode_labels_message",
    "encode_labels_frame",
    "sign_label",
]

#: the label format version this module implements
LABEL_VERSION = 1
MAX_VAL_BYTES = 128
MAX_LABELS_PER_MESSAGE = 10_000


class InvalidLabel(ValueError):
    """A label object that does not follow ``com.atproto.label.defs#label``."""


class InvalidLabelMessage(ValueError):
    """A ``subscribeLabels`` frame or message body that is malformed."""


def _is_subject_uri(s: str) -> bool:
    """Label subjects: an at:// URI for content, a DID for an account."""
    if s.startswith("at://"):
        return is_valid_at_uri(s)
    return is_valid_did(s)


# --- the label ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Label:
    """One label. ``sig`` is the raw 64-byte signature; ``ver`` is None when absent on the wire."""

    src: str
    uri: str
    cid: str | None = None
    val: str
    neg: bool = False
    cts: str
    exp: str | None = None
    sig: bytes | None = None
    ver: int | None = None
    #: the wire form carried ``neg: false`` explicitly (it is then part of the signed bytes)
    neg_explicit: bool = dataclasses.field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    # -- construction from the two data-model forms

    @classmethod
    def from_lex(cls, obj: Any) -> Label:
        """From lex JSON form (``sig`` as ``{"$bytes": …}``), e.g. a Redis message or XRPC body."""
        if not isinstance(obj, dict):
            raise InvalidLabel("label must be an object")
        sig = obj.get("sig")
        if sig is not None:
            if not isinstance(sig, dict) or set(sig) != {"$bytes"}:
                raise InvalidLabel('label sig must be a {"$bytes": …} object')
            try:
                sig = cbor.b64decode_lenient(sig["$bytes"])
            except cbor.DecodeError as e:
                raise InvalidLabel(f"label sig: {e}") from None
        return cls._from_fields(obj, sig)

    @classmethod
    def from_ipld(cls, obj: Any) -> Label:
        """From IPLD form (``sig`` as bytes), e.g. decoded from a ``subscribeLabels`` frame."""
        if not isinstance(obj, dict):
            raise InvalidLabel("label must be an object")
        sig = obj.get("sig")
        if sig is not None and not isinstance(sig, bytes):
            raise InvalidLabel("label sig must be bytes")
        return cls._from_fields(obj, sig)

    @classmethod
    def _from_fields(cls, obj: Mapping[str, Any], sig: bytes | None) -> Label:
        neg = obj.get("neg")
        if neg is not None and not isinstance(neg, bool):
            raise InvalidLabel("label neg must be a boolean")
        try:
            return cls(
                src=obj.get("src"),  # type: ignore[arg-type]  # checked in __post_init__
                uri=obj.get("uri"),  # type: ignore[arg-type]
                cid=obj.get("cid"),
                val=obj.get("val"),  # type: ignore[arg-type]
                neg=bool(neg),
                cts=obj.get("cts"),  # type: ignore[arg-type]
                exp=obj.get("exp"),
                sig=sig,
                ver=obj.get("ver"),
                neg_explicit=neg is False,
            )
        except TypeError as e:  # an unhashable / odd value slipping through
            raise InvalidLabel(f"malformed label: {e}") from None

    # -- serialisation

    def _unsigned_fields(self, ver: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {"src": self.src, "uri": self.uri}
        if self.cid is not None:
            out["cid"] = self.cid
        out["val"] = self.val
        if self.neg or self.neg_explicit:
            out["neg"] = self.neg
        out["cts"] = self.cts
        if self.exp is not None:
            out["exp"] = self.exp
        if ver is not None:
            out["ver"] = ver
        return out

    def to_lex(self) -> dict[str, Any]:
        """Lex JSON form: ``{src, uri, cid?, val, neg?, cts, exp?, sig?: {"$bytes"}, ver?}``."""
        out = self._unsigned_fields(self.ver)
        if self.sig is not None:
            out["sig"] = {"$bytes": cbor.b64encode_unpadded(self.sig)}
        return out

    def to_ipld(self) -> dict[str, Any]:
        """IPLD form (``sig`` as bytes), for DAG-CBOR frames."""
        out = self._unsigned_fields(self.ver)
        if self.sig is not None:
            out["sig"] = self.sig
        return out

    def signing_bytes(self) -> bytes:
        """DAG-CBOR of the label without ``sig`` and with ``ver`` (1 when absent): what is signed."""
        return cbor.encode(self._unsigned_fields(LABEL_VERSION if self.ver is None else self.ver))

    def verify(self, public_key: PublicKey | str) -> bool:
        """True iff ``sig`` is a valid low-S signature by *public_key* (object, did:key or Multikey).

        An unsigned label, or a key string that does not parse, is simply not verified.
        """
        if self.sig is None:
            return False
        if isinstance(public_key, str):
            try:
                public_key = verifier_for(public_key)
            except InvalidKey:
                return False
        return public_key.verify(self.signing_bytes(), self.sig)


def _validate(label: Label) -> None:
    if not is_valid_did(label.src):
        raise InvalidLabel(f"label src must be a DID: {label.src!r:.100}")
    if not isinstance(label.uri, str) or not _is_subject_uri(label.uri):
        raise InvalidLabel(f"label uri must be an at:// URI or a DID: {label.uri!r:.100}")
    if label.cid is not None and not is_valid_cid(label.cid):
        raise InvalidLabel(f"label cid is not a CID string: {label.cid!r:.100}")
    if not isinstance(label.val, str) or not label.val:
        raise InvalidLabel("label val must be a non-empty string")
    try:
        val_bytes = len(label.val.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidLabel("label val is not valid Unicode (lone surrogate)") from None
    if val_bytes > MAX_VAL_BYTES:
        raise InvalidLabel(f"label val longer than {MAX_VAL_BYTES} bytes")
    if type(label.neg) is not bool or type(label.neg_explicit) is not bool:
        raise InvalidLabel("label neg must be a boolean")
    if not is_valid_datetime(label.cts):
        raise InvalidLabel(f"label cts is not a datetime: {label.cts!r:.100}")
    if label.exp is not None and not is_valid_datetime(label.exp):
        raise InvalidLabel(f"label exp is not a datetime: {label.exp!r:.100}")
    if label.sig is not None and not isinstance(label.sig, bytes):
        raise InvalidLabel("label sig must be bytes")
    if label.ver is not None and (type(label.ver) is not int or label.ver != LABEL_VERSION):
        raise InvalidLabel(f"unsupported label version {label.ver!r:.20}")


def sign_label(label: Label, private_key: PrivateKey) -> Label:
    """A copy of *label* with ``ver`` set (1 if absent) and signed by *private_key*."""
    ver = LABEL_VERSION if label.ver is None else label.ver
    unsigned = dataclasses.replace(label, ver=ver, sig=None)
    return dataclasses.replace(unsigned, sig=private_key.sign(unsigned.signing_bytes()))


# --- com.atproto.label.subscribeLabels ------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelsMessage:
    """``#labels``: a batch of labels at one sequence number.

    ``rejected`` lists ``(index, reason)`` for labels dropped in non-strict decoding.
    """

    seq: int
    labels: tuple[Label, ...]
    rejected: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class InfoMessage:
    """``#info`` (e.g. ``OutdatedCursor``)."""

    name: str
    message: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """An error frame (``op: -1``), e.g. ``FutureCursor``; the server closes the stream after it."""

    error: str
    message: str | None = None


_NSID = "com.atproto.label.subscribeLabels"


def decode_labels_message(
    header: Any, body: Any, *, strict: bool = True
) -> LabelsMessage | InfoMessage | ErrorMessage | None:
    """Interpret a decoded ``subscribeLabels`` frame (header and body in IPLD form).

    Returns None for message types this version does not know (the event-stream spec
    says to ignore them). With ``strict=False`` a malformed label inside ``#labels`` is
    recorded in ``rejected`` instead of failing the whole message.
    """
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise InvalidLabelMessage("frame header and body must be objects")
    op = header.get("op")
    if op == -1:
        error = body.get("error")
        message = body.get("message")
        if not isinstance(error, str) or (message is not None and not isinstance(message, str)):
            raise InvalidLabelMessage("error frame needs a string error (and optional string message)")
        return ErrorMessage(error, message)
    if op != 1:
        raise InvalidLabelMessage(f"unknown frame op {op!r:.20}")
    t = header.get("t")
    if not isinstance(t, str):
        raise InvalidLabelMessage("message frame header needs a string t")
    if t.startswith(_NSID + "#"):
        t = t[len(_NSID) :]
    if t == "#labels":
        return _decode_labels(body, strict)
    if t == "#info":
        name = body.get("name")
        message = body.get("message")
        if not isinstance(name, str) or (message is not None and not isinstance(message, str)):
            raise InvalidLabelMessage("#info needs a string name (and optional string message)")
        return InfoMessage(name, message)
    return None


def _decode_labels(body: Mapping[str, Any], strict: bool) -> LabelsMessage:
    seq = body.get("seq")
    labels = body.get("labels")
    if type(seq) is not int or seq < 0:
        raise InvalidLabelMessage(f"#labels seq must be a non-negative integer: {seq!r:.20}")
    if not isinstance(labels, list):
        raise InvalidLabelMessage("#labels labels must be an array")
    if len(labels) > MAX_LABELS_PER_MESSAGE:
        raise InvalidLabelMessage(f"#labels carries more than {MAX_LABELS_PER_MESSAGE} labels")
    out: list[Label] = []
    rejected: list[tuple[int, str]] = []
    for i, obj in enumerate(labels):
        try:
            out.append(Label.from_ipld(obj))
        except InvalidLabel as e:
            if strict:
                raise InvalidLabelMessage(f"#labels seq {seq}, label {i}: {e}") from None
            rejected.append((i, str(e)))
    return LabelsMessage(seq, tuple(out), tuple(rejected))


def decode_labels_frame(
    frame: bytes, *, strict: bool = True
) -> LabelsMessage | InfoMessage | ErrorMessage | None:
    """Decode a binary ``subscribeLabels`` WebSocket frame (DAG-CBOR header + body)."""
    try:
        header, used = cbor.decode_prefix(frame)
        body, used_body = cbor.decode_prefix(memoryview(frame)[used:])
    except cbor.DecodeError as e:
        raise InvalidLabelMessage(f"frame: {e}") from None
    if used + used_body != len(frame):
        raise InvalidLabelMessage("frame has trailing bytes after the body")
    return decode_labels_message(header, body, strict=strict)


def encode_labels_frame(message: LabelsMessage | InfoMessage | ErrorMessage) -> bytes:
    """Binary frame for a message (what a labeler's ``subscribeLabels`` sends)."""
    body: dict[str, Any]
    if isinstance(message, LabelsMessage):
        header: dict[str, Any] = {"op": 1, "t": "#labels"}
        body = {"seq": message.seq, "labels": [label.to_ipld() for label in message.labels]}
    elif isinstance(message, InfoMessage):
        header = {"op": 1, "t": "#info"}
        body = {"name": message.name}
        if message.message is not None:
            body["message"] = message.message
    else:
        header = {"op": -1}
        body = {"error": message.error}
        if message.message is not None:
            body["message"] = message.message
    return cbor.encode(header) + cbor.encode(body)
