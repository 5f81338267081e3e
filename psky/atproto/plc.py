"""did:plc operations: building, signing, hashing, verifying and validating operation logs.

An operation is a JSON object; its DAG-CBOR encoding is what gets hashed and signed:

* ``sig`` is base64url (unpadded, zero padding bits) of a 64-byte low-S compact ECDSA
  signature over the DAG-CBOR of the op *without* its ``sig`` key;
* an op's CID (``prev`` of its successor) is CIDv1 dag-cbor sha-256 of the signed op,
  kept as a base32 *string* inside the next op (not an IPLD link);
* the DID is ``did:plc:`` + the first 24 chars of base32-lower(sha256(signed genesis op)).

Three op types exist: ``plc_operation`` (current), ``plc_tombstone`` (deactivates the DID for
good) and the legacy ``create`` genesis format, which is only ever valid as the first op of
old DIDs and is treated as a ``plc_operation`` whose rotation keys are
``[recoveryKey, signingKey]``.

Authority: an op must be signed by one of the rotation keys of the op it points at. A key
earlier in that list may fork history from an older op within 72 hours of the first op it
discards ("nullifies"), provided it is strictly more powerful than the key that signed the
op being discarded. :func:`assure_valid_next_op` is that rule for a directory accepting an
op; :func:`validate_audit_log` replays a whole ``/log/audit`` answer, nullifications
included. Nothing here does I/O: the directory server lives in :mod:`psky.devnet.plc`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from psky.atproto import cbor, syntax
from psky.atproto.crypto import InvalidKey, PrivateKey, b58decode, verifier_for
from psky.atproto.did import (
    ATPROTO_KEY,
    ATPROTO_PDS,
    DID_CONTEXT,
    K256_CONTEXT,
    MULTIKEY_CONTEXT,
    P256_CONTEXT,
    PDS_TYPE,
    normalize_plc_data,
)

__all__ = [
    "MAX_OP_BYTES",
    "RECOVERY_WINDOW",
    "GenesisHashMismatch",
    "InvalidOperation",
    "InvalidSignature",
    "LateRecovery",
    "LogEntry",
    "MisorderedOperation",
    "NextOp",
    "PlcError",
    "assure_valid_next_op",
    "check_incoming_op",
    "check_op",
    "create_op",
    "decode_sig",
    "did_for_genesis",
    "encode_sig",
    "format_created_at",
    "format_document",
    "is_valid_plc_did",
    "normalize_op",
    "op_cid",
    "op_data",
    "parse_created_at",
    "rotation_keys_of",
    "sign_op",
    "signer_index",
    "tombstone_op",
    "unsigned_bytes",
    "update_op",
    "validate_audit_log",
    "validate_op_log",
    "verify_op",
]

#: how long a more powerful rotation key may rewrite history after the op it discards
RECOVERY_WINDOW = timedelta(hours=72)

#: limits a directory applies to submitted ops (those of the reference directory)
MAX_OP_BYTES = 4000
MAX_AKA_ENTRIES = 10
MAX_AKA_LENGTH = 258
MAX_ROTATION_ENTRIES = 10
MAX_SERVICE_ENTRIES = 10
MAX_SERVICE_TYPE_LENGTH = 256
MAX_SERVICE_ENDPOINT_LENGTH = 512
MAX_VERIFICATION_METHOD_ENTRIES = 10
MAX_ID_LENGTH = 32
MAX_DID_KEY_LENGTH = 256

#: structural bound for ops read from logs (the directory limits are far lower)
_MAX_ITEMS = 256

OpType = Literal["plc_operation", "plc_tombstone", "create"]


class PlcError(ValueError):
    """A PLC operation or log that is not acceptable."""


class InvalidOperation(PlcError):
    """The op's structure or field values are wrong."""


class InvalidSignature(PlcError):
    """The op's ``sig`` is malformed or was not made by an allowed rotation key."""


class MisorderedOperation(PlcError):
    """The op does not chain onto the DID's history (wrong/missing ``prev``, after a tombstone)."""


class GenesisHashMismatch(PlcError):
    """The genesis op does not hash to the DID it was submitted for."""


class LateRecovery(PlcError):
    """A fork that would nullify ops older than the 72 h recovery window."""


# --- signatures and hashes -------------------------------------------------------------

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_PLC_DID_RE = re.compile(r"did:plc:[a-z2-7]{24}")


def encode_sig(sig: bytes) -> str:
    """base64url without padding, as ``sig`` fields carry it."""
    return base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii")


def decode_sig(sig: object) -> bytes:
    """Strictly decode a ``sig`` field: base64url alphabet only, no ``=``, zero padding bits, 64 bytes.

    Anything looser would let the same signature be spelled several ways, and so give one
    op several CIDs.
    """
    if not isinstance(sig, str):
        raise InvalidSignature("sig must be a string")
    if len(sig) != 86 or not _B64URL_RE.fullmatch(sig):
        raise InvalidSignature("sig must be 86 base64url characters (a 64-byte signature, unpadded)")
    try:
        raw = base64.urlsafe_b64decode(sig + "==")
    except (binascii.Error, ValueError):
        raise InvalidSignature("sig is not valid base64url") from None
    if encode_sig(raw) != sig:
        raise InvalidSignature("sig has non-zero base64url padding bits")
    return raw


def unsigned_bytes(op: Mapping[str, Any]) -> bytes:
    """DAG-CBOR of the op without its ``sig`` key: the bytes rotation keys sign."""
    return cbor.encode({k: v for k, v in op.items() if k != "sig"})


def _encode_op(op: Mapping[str, Any]) -> bytes:
    try:
        return cbor.encode(dict(op))
    except ValueError as e:
        raise InvalidOperation(f"operation is not encodable as DAG-CBOR: {e}") from None


def op_cid(signed_op: Mapping[str, Any]) -> str:
    """CID string (``bafyrei…``) of a signed op: what the next op's ``prev`` names."""
    return cbor.cid_str(cbor.cid_for_cbor(_encode_op(signed_op)))


def did_for_genesis(signed_op: Mapping[str, Any]) -> str:
    """The DID a signed genesis op creates."""
    digest = hashlib.sha256(_encode_op(signed_op)).digest()
    return "did:plc:" + base64.b32encode(digest).decode("ascii").lower()[:24]


def is_valid_plc_did(did: object) -> bool:
    """``did:plc:`` followed by 24 base32-lower characters."""
    return isinstance(did, str) and _PLC_DID_RE.fullmatch(did) is not None


def sign_op(op: Mapping[str, Any], rotation_key: PrivateKey) -> dict[str, Any]:
    """A copy of *op* (any existing ``sig`` dropped) signed by *rotation_key*."""
    unsigned = {k: v for k, v in op.items() if k != "sig"}
    return {**unsigned, "sig": encode_sig(rotation_key.sign(cbor.encode(unsigned)))}


def signer_index(signed_op: Mapping[str, Any], rotation_keys: Sequence[str]) -> int | None:
    """Index of the first key in *rotation_keys* whose signature ``sig`` is, or None.

    A malformed ``sig`` or an unusable key never matches; with duplicate keys the first
    position wins, which is what decides recovery authority.
    """
    try:
        sig = decode_sig(signed_op.get("sig"))
        data = unsigned_bytes(signed_op)
    except (PlcError, ValueError):
        return None
    for index, key in enumerate(rotation_keys):
        try:
            if verifier_for(key).verify(data, sig):
                return index
        except InvalidKey:
            continue
    return None


def _require_signer(op: Mapping[str, Any], keys: Sequence[str], what: str) -> int:
    """Index of the key that signed *op*, or an :class:`InvalidSignature` saying why none did."""
    decode_sig(op.get("sig"))
    index = signer_index(op, keys)
    if index is not None:
        return index
    data, sig = unsigned_bytes(op), decode_sig(op["sig"])
    for key in keys:
        try:
            if verifier_for(key).verify(data, sig, allow_high_s=True):
                raise InvalidSignature(f"{what}: high-S signature (must be low-S)")
        except InvalidKey:
            continue
    raise InvalidSignature(f"{what}: not signed by {'an allowed' if keys else 'any'} rotation key")


def verify_op(signed_op: Mapping[str, Any], rotation_keys: Sequence[str]) -> bool:
    """Whether one of *rotation_keys* (did:key strings) signed *signed_op*."""
    return signer_index(signed_op, rotation_keys) is not None


# --- building ops ----------------------------------------------------------------------


def _at_uri(handle: str) -> str:
    if handle.startswith("at://"):
        return handle
    return "at://" + handle.removeprefix("http://").removeprefix("https://")


def _http_url(endpoint: str) -> str:
    return endpoint if endpoint.startswith(("http://", "https://")) else "https://" + endpoint


def create_op(
    *,
    signing_key: str | None,
    rotation_keys: Sequence[str],
    handle: str | None,
    pds_endpoint: str | None,
    prev: str | None = None,
    verification_methods: Mapping[str, str] | None = None,
    services: Mapping[str, Mapping[str, str]] | None = None,
    also_known_as: Sequence[str] = (),
) -> dict[str, Any]:
    """An unsigned atproto ``plc_operation``.

    *signing_key* (did:key) becomes ``verificationMethods.atproto``, *handle* the first
    ``alsoKnownAs`` entry (``at://`` added), *pds_endpoint* the ``atproto_pds`` service
    (``https://`` added when no scheme). Extra methods/services (a labeler's
    ``atproto_label`` / ``atproto_labeler``) and aliases are merged in.
    """
    methods: dict[str, str] = {}
    if signing_key is not None:
        methods[ATPROTO_KEY] = signing_key
    methods.update(verification_methods or {})
    svcs: dict[str, dict[str, str]] = {}
    if pds_endpoint is not None:
        svcs[ATPROTO_PDS] = {"type": PDS_TYPE, "endpoint": _http_url(pds_endpoint)}
    for name, svc in (services or {}).items():
        svcs[name] = {"type": svc["type"], "endpoint": svc["endpoint"]}
    aka = [_at_uri(handle)] if handle is not None else []
    aka.extend(a for a in also_known_as if a not in aka)
    return {
        "type": "plc_operation",
        "verificationMethods": methods,
        "rotationKeys": list(rotation_keys),
        "alsoKnownAs": aka,
        "services": svcs,
        "prev": prev,
    }


def normalize_op(op: Mapping[str, Any]) -> dict[str, Any]:
    """A ``plc_operation`` or legacy ``create`` op as a ``plc_operation`` (prev/sig kept)."""
    if op.get("type") == "plc_tombstone":
        raise InvalidOperation("a tombstone has no document data")
    data = normalize_plc_data(dict(op))
    out: dict[str, Any] = {"type": "plc_operation", **data, "prev": op.get("prev")}
    if "sig" in op:
        out["sig"] = op["sig"]
    return out


def update_op(
    last_op: Mapping[str, Any],
    *,
    handle: str | None = None,
    pds_endpoint: str | None = None,
    signing_key: str | None = None,
    rotation_keys: Sequence[str] | None = None,
    verification_methods: Mapping[str, str] | None = None,
    services: Mapping[str, Mapping[str, str]] | None = None,
    also_known_as: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The unsigned op that follows *last_op* (signed) with the given fields changed.

    A new *handle* replaces the first ``at://`` alias (or is prepended); *signing_key* and
    *pds_endpoint* replace the atproto entries; the other arguments replace whole fields.
    """
    current = normalize_op(last_op)
    methods = dict(current["verificationMethods"])
    if verification_methods is not None:
        methods = dict(verification_methods)
    if signing_key is not None:
        methods[ATPROTO_KEY] = signing_key
    svcs = {name: dict(svc) for name, svc in current["services"].items()}
    if services is not None:
        svcs = {name: {"type": s["type"], "endpoint": s["endpoint"]} for name, s in services.items()}
    if pds_endpoint is not None:
        svcs[ATPROTO_PDS] = {"type": PDS_TYPE, "endpoint": _http_url(pds_endpoint)}
    aka = list(current["alsoKnownAs"]) if also_known_as is None else list(also_known_as)
    if handle is not None:
        uri = _at_uri(handle)
        at_index = next((i for i, a in enumerate(aka) if a.startswith("at://")), None)
        if at_index is None:
            aka.insert(0, uri)
        else:
            aka[at_index] = uri
    return {
        "type": "plc_operation",
        "verificationMethods": methods,
        "rotationKeys": list(current["rotationKeys"] if rotation_keys is None else rotation_keys),
        "alsoKnownAs": aka,
        "services": svcs,
        "prev": op_cid(last_op),
    }


def tombstone_op(prev: str, key: PrivateKey) -> dict[str, Any]:
    """A signed ``plc_tombstone`` following the op whose CID is *prev*."""
    cbor.parse_cid(prev)
    return sign_op({"type": "plc_tombstone", "prev": prev}, key)


# --- structure -------------------------------------------------------------------------

_OP_FIELDS = frozenset({"type", "rotationKeys", "verificationMethods", "alsoKnownAs", "services", "prev"})
_TOMBSTONE_FIELDS = frozenset({"type", "prev"})
_CREATE_FIELDS = frozenset({"type", "signingKey", "recoveryKey", "handle", "service", "prev"})


def _str_list(op: Mapping[str, Any], name: str) -> list[str]:
    value = op[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidOperation(f"{name} must be an array of strings")
    if len(value) > _MAX_ITEMS:
        raise InvalidOperation(f"{name} has too many entries")
    return value


def _check_prev(prev: object, *, nullable: bool) -> None:
    if prev is None:
        if not nullable:
            raise InvalidOperation("prev must be a CID string")
        return
    if not isinstance(prev, str):
        raise InvalidOperation("prev must be a CID string or null")
    try:
        cbor.parse_cid(prev)
    except cbor.DecodeError as e:
        raise InvalidOperation(f"prev is not a valid CID: {e}") from None


def check_op(op: object, *, signed: bool = True, allow_legacy: bool = True) -> OpType:
    """Check an op's shape strictly (exact field set and types); return its type.

    Unknown fields are refused because they would be signed and hashed yet meaningless.
    """
    if not isinstance(op, dict):
        raise InvalidOperation("operation must be a JSON object")
    op_type = op.get("type")
    if op_type == "plc_operation":
        expected = _OP_FIELDS
    elif op_type == "plc_tombstone":
        expected = _TOMBSTONE_FIELDS
    elif op_type == "create":
        if not allow_legacy:
            raise InvalidOperation("legacy 'create' ops are only valid as the genesis op of old DIDs")
        expected = _CREATE_FIELDS
    else:
        raise InvalidOperation(f"unknown operation type {op_type!r:.50}")
    keys = set(op)
    if signed:
        if "sig" not in keys:
            raise InvalidOperation("operation is not signed (no sig)")
        keys.discard("sig")
        if not isinstance(op["sig"], str):
            raise InvalidOperation("sig must be a string")
    missing = expected - keys
    if missing:
        raise InvalidOperation(f"{op_type} is missing {', '.join(sorted(missing))}")
    extra = keys - expected
    if extra:
        raise InvalidOperation(f"{op_type} has unexpected field(s) {', '.join(sorted(extra))[:200]}")

    if op_type == "plc_tombstone":
        _check_prev(op["prev"], nullable=False)
        return "plc_tombstone"
    if op_type == "create":
        for name in ("signingKey", "recoveryKey", "handle", "service"):
            if not isinstance(op[name], str):
                raise InvalidOperation(f"create.{name} must be a string")
        if op["prev"] is not None:
            raise InvalidOperation("a legacy create op must have prev null")
        return "create"
    _str_list(op, "rotationKeys")
    _str_list(op, "alsoKnownAs")
    methods = op["verificationMethods"]
    if not isinstance(methods, dict) or not all(isinstance(v, str) for v in methods.values()):
        raise InvalidOperation("verificationMethods must map names to did:key strings")
    services = op["services"]
    if not isinstance(services, dict):
        raise InvalidOperation("services must be an object")
    if len(methods) > _MAX_ITEMS or len(services) > _MAX_ITEMS:
        raise InvalidOperation("too many verificationMethods or services")
    for name, svc in services.items():
        if (
            not isinstance(svc, dict)
            or set(svc) != {"type", "endpoint"}
            or not isinstance(svc["type"], str)
            or not isinstance(svc["endpoint"], str)
        ):
            raise InvalidOperation(f"service {name!r:.50} must be exactly {{type, endpoint}} strings")
    _check_prev(op["prev"], nullable=True)
    return "plc_operation"


def _check_did_key_syntax(key: str) -> None:
    """did:key prefix + base58btc multibase, whatever the key type (as verificationMethods allow)."""
    body = key.removeprefix("did:key:")
    if body == key or len(body) < 2 or body[0] != "z":
        raise InvalidOperation(f"invalid verificationMethod key: {key:.100}")
    try:
        b58decode(body[1:])
    except InvalidKey:
        raise InvalidOperation(f"invalid verificationMethod key: {key:.100}") from None


def check_incoming_op(op: object) -> OpType:
    """:func:`check_op` plus the limits a directory applies to newly submitted ops.

    Legacy ``create`` ops are refused; rotation keys must be K-256/P-256 did:keys;
    verification-method keys may be any syntactically valid did:key.
    """
    op_type = check_op(op, signed=True, allow_legacy=False)
    assert isinstance(op, dict)
    size = len(_encode_op(op))
    if size > MAX_OP_BYTES:
        raise InvalidOperation(f"operation too large ({size} bytes; {MAX_OP_BYTES} maximum in DAG-CBOR)")
    if op_type == "plc_tombstone":
        return op_type
    aka = op["alsoKnownAs"]
    if len(aka) > MAX_AKA_ENTRIES:
        raise InvalidOperation(f"too many alsoKnownAs entries (max {MAX_AKA_ENTRIES})")
    if len(set(aka)) != len(aka):
        raise InvalidOperation("duplicate alsoKnownAs entry")
    for entry in aka:
        if len(entry) > MAX_AKA_LENGTH:
            raise InvalidOperation(f"alsoKnownAs entry too long (max {MAX_AKA_LENGTH})")
    rotation = op["rotationKeys"]
    if len(rotation) > MAX_ROTATION_ENTRIES:
        raise InvalidOperation(f"too many rotationKeys (max {MAX_ROTATION_ENTRIES})")
    for key in rotation:
        try:
            verifier_for(key) if key.startswith("did:key:") else _raise_not_did_key(key)
        except InvalidKey:
            raise InvalidOperation(
                f"invalid rotationKey (K-256/P-256 did:key required): {key:.100}"
            ) from None
    services = op["services"]
    if len(services) > MAX_SERVICE_ENTRIES:
        raise InvalidOperation(f"too many services (max {MAX_SERVICE_ENTRIES})")
    for name, svc in services.items():
        if len(name) > MAX_ID_LENGTH:
            raise InvalidOperation(f"service id too long (max {MAX_ID_LENGTH}): {name:.100}")
        if len(svc["type"]) > MAX_SERVICE_TYPE_LENGTH:
            raise InvalidOperation(f"service type too long (max {MAX_SERVICE_TYPE_LENGTH})")
        if len(svc["endpoint"]) > MAX_SERVICE_ENDPOINT_LENGTH:
            raise InvalidOperation(f"service endpoint too long (max {MAX_SERVICE_ENDPOINT_LENGTH})")
    methods = op["verificationMethods"]
    if len(methods) > MAX_VERIFICATION_METHOD_ENTRIES:
        raise InvalidOperation(f"too many verificationMethods (max {MAX_VERIFICATION_METHOD_ENTRIES})")
    for name, key in methods.items():
        if len(name) > MAX_ID_LENGTH:
            raise InvalidOperation(f"verificationMethod id too long (max {MAX_ID_LENGTH}): {name:.100}")
        if len(key) > MAX_DID_KEY_LENGTH:
            raise InvalidOperation(f"verificationMethod key too long (max {MAX_DID_KEY_LENGTH})")
        _check_did_key_syntax(key)
    return op_type


def _raise_not_did_key(key: str) -> None:
    raise InvalidKey(f"not a did:key: {key:.100}")


# --- state ------------------------------------------------------------------------------


def rotation_keys_of(op: Mapping[str, Any]) -> list[str]:
    """Keys allowed to sign the op after *op* (``[recoveryKey, signingKey]`` for legacy create)."""
    if op.get("type") == "create":
        return [op["recoveryKey"], op["signingKey"]]
    if op.get("type") == "plc_tombstone":
        return []
    keys = op.get("rotationKeys")
    return list(keys) if isinstance(keys, list) else []


def op_data(did: str, op: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``/{did}/data`` object for a DID whose last op is *op*; None after a tombstone."""
    if op.get("type") == "plc_tombstone":
        return None
    norm = normalize_op(op)
    return {
        "did": did,
        "verificationMethods": norm["verificationMethods"],
        "rotationKeys": norm["rotationKeys"],
        "alsoKnownAs": norm["alsoKnownAs"],
        "services": norm["services"],
    }


def format_document(did: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The DID document a PLC directory serves for ``/data``-shaped *data*.

    Same output as :func:`psky.atproto.did.format_plc_document` for K-256/P-256 keys, and,
    like the reference directory, still renders other did:key types (no ``@context`` suite,
    the multibase copied verbatim) instead of refusing the document.
    """
    context = [DID_CONTEXT, MULTIKEY_CONTEXT]
    methods = []
    for name, key in data["verificationMethods"].items():
        multibase = key.removeprefix("did:key:")
        try:
            pub = verifier_for(key)
        except InvalidKey:
            pub = None
        if pub is not None:
            suite = K256_CONTEXT if pub.curve == "k256" else P256_CONTEXT
            if suite not in context:
                context.append(suite)
            multibase = pub.multibase()
        methods.append(
            {"id": f"{did}#{name}", "type": "Multikey", "controller": did, "publicKeyMultibase": multibase}
        )
    services = [
        {"id": f"#{name}", "type": svc["type"], "serviceEndpoint": svc["endpoint"]}
        for name, svc in data["services"].items()
    ]
    return {
        "@context": context,
        "id": did,
        "alsoKnownAs": list(data["alsoKnownAs"]),
        "verificationMethod": methods,
        "service": services,
    }


# --- logs -------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_created_at(text: object) -> datetime:
    """An audit-log ``createdAt`` (atproto datetime syntax) as an aware UTC datetime."""
    if not isinstance(text, str):
        raise PlcError("createdAt must be a string")
    try:
        return _EPOCH + timedelta(microseconds=syntax.datetime_to_us(text))
    except ValueError as e:
        raise PlcError(f"invalid createdAt {text!r:.50}: {e}") from None


def format_created_at(when: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.sssZ``, the form the directory serves."""
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class LogEntry:
    """One ``/{did}/log/audit`` entry."""

    did: str
    operation: dict[str, Any]
    cid: str
    nullified: bool
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "did": self.did,
            "operation": self.operation,
            "cid": self.cid,
            "nullified": self.nullified,
            "createdAt": format_created_at(self.created_at),
        }

    @classmethod
    def from_json(cls, obj: object) -> LogEntry:
        if not isinstance(obj, dict):
            raise PlcError("audit log entry must be an object")
        did, cid, nullified = obj.get("did"), obj.get("cid"), obj.get("nullified")
        if not isinstance(did, str) or not isinstance(cid, str) or not isinstance(nullified, bool):
            raise PlcError("audit log entry needs string did and cid and a boolean nullified")
        operation = obj.get("operation")
        if not isinstance(operation, dict):
            raise PlcError("audit log entry operation must be an object")
        return cls(did, operation, cid, nullified, parse_created_at(obj.get("createdAt")))


@dataclass(frozen=True, slots=True)
class NextOp:
    """What accepting an op does: the op it follows and the CIDs it nullifies."""

    prev: str | None
    nullified: tuple[str, ...]


def _assure_genesis(did: str, op: Mapping[str, Any]) -> None:
    if op.get("type") == "plc_tombstone":
        raise MisorderedOperation("the first operation of a DID cannot be a tombstone")
    if op.get("prev") is not None:
        raise InvalidOperation("the genesis operation must have prev null")
    _require_signer(op, rotation_keys_of(op), "genesis operation")
    expected = did_for_genesis(op)
    if expected != did:
        raise GenesisHashMismatch(f"genesis operation hashes to {expected}, not {did}")


def assure_valid_next_op(
    did: str, active: Sequence[LogEntry], proposed: Mapping[str, Any], now: datetime
) -> NextOp:
    """Decide whether a directory may accept *proposed* (already structurally checked) for *did*.

    *active* is the DID's non-nullified history, oldest first. Raises a :class:`PlcError`
    subclass naming the rule broken; otherwise returns which op it follows and which
    ops it nullifies (a recovery fork).
    """
    if not active:
        _assure_genesis(did, proposed)
        return NextOp(None, ())
    prev = proposed.get("prev")
    if not isinstance(prev, str):
        raise MisorderedOperation(f"{did} already exists: an update must name its prev")
    index = next((i for i, e in enumerate(active) if e.cid == prev), None)
    if index is None:
        raise MisorderedOperation(f"prev {prev:.80} is not an operation in the current history of {did}")
    base = active[index]
    if base.operation.get("type") == "plc_tombstone":
        raise MisorderedOperation(f"{did} is tombstoned")
    keys = rotation_keys_of(base.operation)
    disputed = active[index + 1 :]
    if not disputed:
        _require_signer(proposed, keys, "operation")
        return NextOp(prev, ())
    rival = signer_index(disputed[0].operation, keys)
    if rival is None:  # only possible for a corrupted store
        raise InvalidSignature("the operation to nullify has no valid signer")
    _require_signer(
        proposed, keys[:rival], "history fork (needs a key above the one that signed the op it replaces)"
    )
    if now <= active[-1].created_at:
        raise MisorderedOperation("operation timestamps must increase")
    lapsed = now - disputed[0].created_at
    if lapsed > RECOVERY_WINDOW:
        raise LateRecovery(f"recovery {lapsed} after the op it would nullify; the window is 72 h")
    return NextOp(prev, tuple(e.cid for e in disputed))


@dataclass(slots=True)
class _OpStatus:
    created_at: datetime
    allowed_keys: list[str]
    tombstone: bool
    nullified: bool = False
    last_child: str | None = None


def validate_audit_log(entries: Iterable[LogEntry | Mapping[str, Any]]) -> dict[str, Any] | None:
    """Replay a full ``/{did}/log/audit`` answer (nullified entries included) and check it all.

    Checks every CID and signature, ``prev`` chaining, the genesis hash, recovery authority
    (a fork must be signed by a key strictly more powerful than the one that signed the
    op it discards, within 72 h of it), increasing timestamps and every ``nullified`` flag.
    Returns the resulting ``/data`` object, or None when the DID ends tombstoned.
    """
    log = [e if isinstance(e, LogEntry) else LogEntry.from_json(e) for e in entries]
    if not log:
        raise PlcError("empty operation log")
    did = log[0].did
    status: dict[str, _OpStatus] = {}
    head: str | None = None
    for position, entry in enumerate(log):
        if entry.did != did:
            raise PlcError(f"log mixes DIDs ({entry.did:.60} after {did:.60})")
        op = entry.operation
        check_op(op, signed=True, allow_legacy=position == 0)
        if op_cid(op) != entry.cid:
            raise PlcError(f"entry {position}: cid does not match the operation")
        if head is None:
            _assure_genesis(did, op)
            key_index = 0
            prev_status = None
        else:
            prev = op.get("prev")
            if not isinstance(prev, str):
                raise MisorderedOperation(f"entry {position}: a second genesis operation")
            prev_status = status.get(prev)
            if prev_status is None:
                raise MisorderedOperation(f"entry {position}: prev is not an earlier operation of this DID")
            if prev_status.nullified:
                raise MisorderedOperation(f"entry {position}: prev is a nullified operation")
            if prev_status.tombstone:
                raise MisorderedOperation(f"entry {position}: prev is a tombstone")
            key_index = _require_signer(op, prev_status.allowed_keys, f"entry {position}")
            latest = status[head]
            if prev_status.last_child is None:
                if entry.created_at <= prev_status.created_at:
                    raise MisorderedOperation(f"entry {position}: timestamps must increase")
            else:
                if entry.created_at <= latest.created_at:
                    raise MisorderedOperation(f"entry {position}: timestamps must increase")
                first_nullified = status[prev_status.last_child]
                if entry.created_at - first_nullified.created_at > RECOVERY_WINDOW:
                    raise LateRecovery(f"entry {position}: nullifies an op older than 72 h")
                _mark_nullified(status, prev_status.last_child)
            prev_status.allowed_keys = prev_status.allowed_keys[:key_index]
            prev_status.last_child = entry.cid
        if entry.cid in status:
            raise PlcError(f"entry {position}: operation appears twice")
        status[entry.cid] = _OpStatus(entry.created_at, rotation_keys_of(op), op["type"] == "plc_tombstone")
        head = entry.cid
    for position, entry in enumerate(log):
        if status[entry.cid].nullified != entry.nullified:
            raise PlcError(f"entry {position}: nullified is {entry.nullified}, the log implies otherwise")
    last = next(e for e in reversed(log) if not status[e.cid].nullified)
    return op_data(did, last.operation)


def _mark_nullified(status: dict[str, _OpStatus], cid: str | None) -> None:
    while cid is not None:
        entry = status[cid]
        if entry.nullified:
            return
        entry.nullified = True
        cid = entry.last_child


def validate_op_log(did: str, ops: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Check a ``/{did}/log`` answer (current history only): genesis, chaining and signatures.

    Returns the ``/data`` object, or None when the history ends with a tombstone.
    """
    if not ops:
        raise PlcError("empty operation log")
    data: dict[str, Any] | None = None
    prev_cid: str | None = None
    keys: list[str] = []
    for position, op in enumerate(ops):
        check_op(op, signed=True, allow_legacy=position == 0)
        if position == 0:
            _assure_genesis(did, op)
        else:
            if data is None:
                raise MisorderedOperation(f"op {position}: operation after a tombstone")
            if op.get("prev") != prev_cid:
                raise MisorderedOperation(f"op {position}: prev does not name the previous operation")
            _require_signer(op, keys, f"op {position}")
        data = op_data(did, op)
        keys = rotation_keys_of(op)
        prev_cid = op_cid(op)
    return data
