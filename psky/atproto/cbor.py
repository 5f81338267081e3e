"""DAG-CBOR, CIDs and lex JSON: the data model every other protocol module speaks.

The codec is `cbrrr` (C, iterative, strict canonical DAG-CBOR: minimal integers,
sorted map keys, no indefinite lengths, no floats other than 64-bit). It never
recurses on the C stack, so deeply nested hostile input cannot crash the process;
psky still bounds nesting (:data:`MAX_DEPTH`) where it walks values in Python.

Values in Python form ("IPLD form"): dict/list/str/int/bool/None/bytes and :class:`CID`.
Values in lex JSON form: CID links as ``{"$link": "<cid>"}``, bytes as
``{"$bytes": "<base64, no padding>"}``; blobs are ordinary maps with ``$type: blob``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any

import cbrrr
from cbrrr import _cbrrr  # the C decoder; its (value, length) form reads frames
from libipld import encode_cid as _encode_cid

CID = cbrrr.CID

#: multicodec codes
CODEC_DAG_CBOR = 0x71
CODEC_RAW = 0x55
HASH_SHA256 = 0x12

#: deepest nesting psky accepts in records and frames it walks in Python
MAX_DEPTH = 128

#: the C decoder: (data, cid_ctor, atjson) -> (value, bytes used); takes any buffer
_c_decode: Any = _cbrrr.decode_dag_cbor

_DAG_CBOR_PFX = CID.CIDV1_DAG_CBOR_SHA256_32_PFX
_RAW_PFX = CID.CIDV1_RAW_SHA256_32_PFX


class DecodeError(ValueError):
    """Bytes that are not valid (strict, canonical) DAG-CBOR, or a malformed CID."""


def _checked_cid(raw: bytes) -> CID:
    """CID constructor for the decoder: the common 36-byte sha-256 form is accepted at once."""
    if len(raw) == 36 and (raw[:4] == _DAG_CBOR_PFX or raw[:4] == _RAW_PFX):
        return CID(raw)
    validate_cid_bytes(raw)
    return CID(raw)


def decode(data: bytes | memoryview) -> Any:
    """Strictly decode one DAG-CBOR object (CIDs as :class:`CID`, structurally checked)."""
    try:
        obj, used = _c_decode(data, _checked_cid, False)
    except (cbrrr.CbrrrDecodeError, ValueError, TypeError, EOFError, OverflowError) as e:
        raise DecodeError(f"invalid DAG-CBOR: {e}") from None
    if used != len(data):
        raise DecodeError("invalid DAG-CBOR: trailing bytes after the object")
    return obj


def decode_lex(data: bytes) -> Any:
    """Strictly decode DAG-CBOR straight into lex JSON form (fast path for records).

    CID links come out as ``{"$link": str}`` without a structural check of the CID (the C
    decoder does the base32 itself); lexicon validation checks ``cid-link`` fields. Values
    nested deeper than :data:`MAX_DEPTH` or integers outside 64 bits are refused here: they
    are valid DAG-CBOR, but JSON encoders (the Redis wire format) cannot carry them, so a
    record holding one would otherwise fail later, where it cannot be skipped cleanly."""
    try:
        value, used = _c_decode(data, CID, True)  # the C call itself: no wrapper per record
    except (cbrrr.CbrrrDecodeError, ValueError, TypeError, EOFError, OverflowError) as e:
        raise DecodeError(f"invalid DAG-CBOR: {e}") from None
    if used != len(data):
        raise DecodeError("invalid DAG-CBOR: did not parse to end of buffer")
    if type(value) is dict or type(value) is list:
        # nesting that deep needs more than MAX_DEPTH array/map heads (bytes 0x80-0xbf), and
        # an integer beyond 64 bits an 8-byte head (0x1b, 0x3b) whose first argument byte has
        # its top bit set: byte scans in C let most records skip the walk
        raw = data if type(data) is bytes else bytes(data)
        if _has_big_int_head(raw) or (
            len(raw) > MAX_DEPTH and len(raw.translate(None, _NOT_CONTAINER_HEAD)) > MAX_DEPTH
        ):
            _check_lex_bounds(value)
    return value


def _has_big_int_head(data: bytes) -> bool:
    """Whether *data* holds a byte pair that may head an integer outside signed 64 bits.

    Most records hold the head bytes themselves (inside CIDs and strings), few the pair:
    a ``find`` loop visits just those, about 3x cheaper than the regular expression, which
    takes over after a few hits so that a block full of head bytes costs one C scan."""
    for head in b"\x1b", b"\x3b":
        i = data.find(head)
        hits = 0
        while i >= 0:
            if i + 1 < len(data) and data[i + 1] >= 0x80:
                return True
            hits += 1
            if hits > 8:
                return _BIG_INT_HEAD.search(data) is not None
            i = data.find(head, i + 1)
    return False


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_NOT_CONTAINER_HEAD = bytes(b for b in range(256) if not 0x80 <= b <= 0xBF)
#: an 8-byte integer head with an argument of 2**63 or more (outside the signed 64-bit range)
_BIG_INT_HEAD = re.compile(rb"[\x1b\x3b][\x80-\xff]")


def _check_lex_bounds(value: dict[str, Any] | list[Any]) -> None:
    """Iteratively: containers nested at most MAX_DEPTH deep, integers within signed 64 bits."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        if depth > MAX_DEPTH:
            raise DecodeError(f"value nested deeper than {MAX_DEPTH}")
        for x in v.values() if type(v) is dict else v:
            t = type(x)
            if t is dict or t is list:
                push((x, depth + 1))
            elif t is int and not _INT64_MIN <= x <= _INT64_MAX:
                raise DecodeError("integer outside the signed 64-bit range")


def decode_prefix(data: bytes | memoryview, *, lex: bool = False) -> tuple[Any, int]:
    """Decode the first DAG-CBOR object in *data*; return it and the number of bytes used."""
    try:
        obj, used = _c_decode(data, _checked_cid, lex)
    except (cbrrr.CbrrrDecodeError, ValueError, TypeError, EOFError, OverflowError) as e:
        raise DecodeError(f"invalid DAG-CBOR: {e}") from None
    if used <= 0:
        raise DecodeError("invalid DAG-CBOR: empty item")
    return obj, int(used)


def decode_multi(data: bytes) -> list[Any]:
    """Decode concatenated DAG-CBOR objects (event-stream frames are header + body)."""
    out: list[Any] = []
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        obj, used = decode_prefix(view[pos:])
        out.append(obj)
        pos += used
    return out


def encode(obj: Any) -> bytes:
    """Canonical DAG-CBOR encoding of a value in IPLD form."""
    try:
        return bytes(cbrrr.encode_dag_cbor(obj))
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"cannot encode as DAG-CBOR: {e}") from None


def encode_lex(obj: Any) -> bytes:
    """Canonical DAG-CBOR encoding of a value in lex JSON form (``$link``/``$bytes`` understood)."""
    return encode(from_lex_json(obj))


# --- CIDs ---------------------------------------------------------------------------


def cid_for_cbor(data: bytes) -> CID:
    """CIDv1, dag-cbor, sha-256 of a block."""
    return CID(_DAG_CBOR_PFX + hashlib.sha256(data).digest())


def cid_for_raw(data: bytes) -> CID:
    """CIDv1, raw, sha-256 of a blob."""
    return CID(_RAW_PFX + hashlib.sha256(data).digest())


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and shift:
                raise DecodeError("varint not minimally encoded")
            return value, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def validate_cid_bytes(raw: bytes) -> None:
    """Check binary CID structure: v1, a known codec, a multihash whose length matches.

    atproto data uses CIDv1 with the dag-cbor or raw codec; CIDv0 (sha-256 multihash only)
    is recognised so that it can be rejected with a clear message.
    """
    if len(raw) == 34 and raw[0] == 0x12 and raw[1] == 0x20:
        raise DecodeError("CIDv0 is not allowed in atproto data")
    version, pos = _read_varint(raw, 0)
    if version != 1:
        raise DecodeError(f"unsupported CID version {version}")
    codec, pos = _read_varint(raw, pos)
    if codec not in (CODEC_DAG_CBOR, CODEC_RAW):
        raise DecodeError(f"unsupported CID codec 0x{codec:x}")
    _hash_code, pos = _read_varint(raw, pos)
    size, pos = _read_varint(raw, pos)
    if len(raw) - pos != size:
        raise DecodeError("CID multihash length mismatch")


def is_valid_cid(cid: CID) -> bool:
    try:
        validate_cid_bytes(cid.cid_bytes)
    except DecodeError:
        return False
    return True


def parse_cid(text: str) -> CID:
    """Parse a base32 (``b…``) CIDv1 string, checking its structure."""
    if not isinstance(text, str) or not text.startswith("b") or text != text.lower():
        raise DecodeError(f"not a base32 CIDv1 string: {text!r:.80}")
    body = text[1:]
    try:
        raw = base64.b32decode(body.upper() + "=" * ((-len(body)) % 8))
    except (binascii.Error, ValueError):
        raise DecodeError(f"invalid base32 in CID: {text!r:.80}") from None
    validate_cid_bytes(raw)
    return CID(raw)


def cid_str(cid: CID) -> str:
    """The base32 text of a CID; the usual 36-byte sha-256 form via libipld (~20x faster than
    ``CID.encode``, which base32-encodes in Python; the text is the same)."""
    raw = cid.cid_bytes
    if len(raw) == 36 and (raw[:4] == _DAG_CBOR_PFX or raw[:4] == _RAW_PFX):
        return str(_encode_cid(raw))
    return str(cid.encode())


# --- lex JSON ------------------------------------------------------------------------


def b64encode_unpadded(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64decode_lenient(text: str) -> bytes:
    """Decode standard base64 with or without padding (lex JSON ``$bytes``)."""
    if not isinstance(text, str):
        raise DecodeError("$bytes must be a string")
    try:
        return base64.b64decode(text + "=" * ((-len(text)) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("invalid base64 in $bytes") from None


_MAX_SAFE_INT = 2**53 - 1


def _check_typed_object(obj: dict[str, Any]) -> None:
    """``$type`` must be a non-empty string; ``blob`` objects need ref, mimeType and size."""
    t = obj["$type"]
    if not isinstance(t, str) or not t:
        raise DecodeError("$type must be a non-empty string")
    if t == "blob":
        if not isinstance(obj.get("ref"), CID):
            raise DecodeError("blob ref must be a CID link")
        if not isinstance(obj.get("mimeType"), str):
            raise DecodeError("blob mimeType must be a string")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DecodeError("blob size must be a non-negative integer")


def record_from_lex_json(value: Any) -> dict[str, Any]:
    """A record (or any top-level atproto data object) from lex JSON, checked against the data model."""
    if not isinstance(value, dict):
        raise DecodeError("top-level atproto data must be an object")
    out: dict[str, Any] = from_lex_json(value)
    return out


def to_lex_json(value: Any, _depth: int = 0) -> Any:
    """IPLD form → lex JSON form."""
    if _depth > MAX_DEPTH:
        raise DecodeError(f"value nested deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        return {k: to_lex_json(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [to_lex_json(v, _depth + 1) for v in value]
    if isinstance(value, CID):
        return {"$link": value.encode()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": b64encode_unpadded(bytes(value))}
    return value


def from_lex_json(value: Any, _depth: int = 0) -> Any:
    """Lex JSON form → IPLD form. Strict about ``$link`` / ``$bytes`` shapes; no floats."""
    if _depth > MAX_DEPTH:
        raise DecodeError(f"value nested deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        if "$link" in value:
            link = value["$link"]
            if len(value) != 1 or not isinstance(link, str):
                raise DecodeError("malformed $link object")
            return parse_cid(link)
        if "$bytes" in value:
            if len(value) != 1:
                raise DecodeError("malformed $bytes object")
            return b64decode_lenient(value["$bytes"])
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DecodeError("map keys must be strings")
            out[k] = from_lex_json(v, _depth + 1)
        if "$type" in out:
            _check_typed_object(out)
        return out
    if isinstance(value, list):
        return [from_lex_json(v, _depth + 1) for v in value]
    if isinstance(value, float):
        # JSON has one number type: 123.0 is the integer 123 (as JavaScript reads it).
        if value.is_integer() and abs(value) <= _MAX_SAFE_INT:
            return int(value)
        raise DecodeError("floats are not allowed in the atproto data model")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    raise DecodeError(f"unsupported value type {type(value).__name__}")
