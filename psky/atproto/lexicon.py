"""Lexicon schemas: loading, schema-document checks, and record validation (atproto.com/specs/lexicon).

The indexer validates every record it sees, so each schema definition is compiled once into a
tree of small closures ``check(value, depth) -> None`` that raise :class:`ValidationError`;
nothing re-reads the schema JSON per call. References are bound lazily on first use, which
keeps compilation non-recursive across documents and makes cyclic schemas harmless.

Input is the lex JSON form (what :func:`psky.atproto.cbor.decode_lex` returns): CID links as
``{"$link": str}``, bytes as ``{"$bytes": str}``, blobs as ``$type: blob`` maps. Error paths
are collected while the exception unwinds, so the success path never builds strings.

Choices where the reference implementations differ, following the spec:
  * open unions accept a ``$type`` they do not list, checking only data-model validity of it;
  * a ``$type`` with an explicit ``#main`` suffix matches the bare-NSID union member;
  * a required property with a ``default`` is satisfied by the default (as the TS validator);
  * legacy blobs ``{"cid", "mimeType"}`` are accepted wherever a blob is expected;
  * ``lenient=True`` additionally accepts legacy datetimes (no timezone, ``-00:00``, ``+0000``)
    and any-case BCP 47 language subtags, matching what the TypeScript appview tolerates.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from psky.atproto import syntax
from psky.atproto.cbor import MAX_DEPTH, DecodeError, b64decode_lenient, parse_cid

Check = Callable[[Any, int], None]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


class ValidationError(ValueError):
    """Data that does not match its schema (or the atproto data model). ``str()`` reads
    ``Record/reply/root/cid: must be a cid string``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self._rpath: list[str] = []  # path segments, innermost first (appended while unwinding)

    @property
    def path(self) -> list[str]:
        return self._rpath[::-1]

    def __str__(self) -> str:
        if not self._rpath:
            return self.message
        # keys come from the record: a 100 kB key must not make a 100 kB log line
        return "/".join(p if len(p) <= 64 else p[:60] + "..." for p in reversed(self._rpath)) + ": " + self.message


class UnknownLexicon(ValidationError):
    """No record schema is loaded for the collection (or the reference does not resolve)."""


class LexiconError(ValueError):
    """A lexicon document that is not a valid schema."""


# --- grapheme clusters (UAX #29 extended grapheme clusters, approximated) ---------------

_G_OTHER, _G_CR, _G_LF, _G_CONTROL, _G_EXTEND, _G_ZWJ, _G_RI, _G_PREPEND, _G_SPACING = range(9)
_G_L, _G_V, _G_T, _G_LV, _G_LVT, _G_PICT = range(9, 15)

# Extended_Pictographic (emoji-data.txt), as inclusive ranges
_PICT_RANGES = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
    (0x2139, 0x2139), (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328),
    (0x2388, 0x2388), (0x23CF, 0x23CF), (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2),
    (0x25AA, 0x25AB), (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x2605),
    (0x2607, 0x2612), (0x2614, 0x2685), (0x2690, 0x2705), (0x2708, 0x2712), (0x2714, 0x2714),
    (0x2716, 0x2716), (0x271D, 0x271D), (0x2721, 0x2721), (0x2728, 0x2728), (0x2733, 0x2734),
    (0x2744, 0x2744), (0x2747, 0x2747), (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755),
    (0x2757, 0x2757), (0x2763, 0x2767), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0),
    (0x27BF, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50),
    (0x2B55, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299),
    (0x1F000, 0x1F0FF), (0x1F10D, 0x1F10F), (0x1F12F, 0x1F12F), (0x1F16C, 0x1F171),
    (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E), (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5),
    (0x1F201, 0x1F20F), (0x1F21A, 0x1F21A), (0x1F22F, 0x1F22F), (0x1F232, 0x1F23A),
    (0x1F23C, 0x1F23F), (0x1F249, 0x1F3FA), (0x1F400, 0x1F53D), (0x1F546, 0x1F64F),
    (0x1F680, 0x1F6FF), (0x1F774, 0x1F77F), (0x1F7D5, 0x1F7FF), (0x1F80C, 0x1F80F),
    (0x1F848, 0x1F84F), (0x1F85A, 0x1F85F), (0x1F888, 0x1F88F), (0x1F8AE, 0x1F8FF),
    (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945), (0x1F947, 0x1FAFF), (0x1FC00, 0x1FFFD),
)
_PREPEND = frozenset(
    [*range(0x0600, 0x0606), 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x0D4E, 0x110BD, 0x110CD,
     0x111C2, 0x111C3, 0x1193F, 0x11941, 0x11A3A, *range(0x11A84, 0x11A8A), 0x11D46]
)
# spacing combining marks (Mc) that are Grapheme_Extend, and ones that are plain "Other"
_MC_EXTEND = frozenset(
    [0x09BE, 0x09D7, 0x0B3E, 0x0B57, 0x0BBE, 0x0BD7, 0x0CC2, 0x0CD5, 0x0CD6, 0x0D3E, 0x0D57,
     0x0DCF, 0x0DDF, 0x1B35, 0x302E, 0x302F, 0x1133E, 0x11357, 0x114B0, 0x114BD, 0x115AF,
     0x11930, 0x1D165, *range(0x1D16E, 0x1D173)]
)
_MC_OTHER = frozenset(
    [0x102B, 0x102C, 0x1038, 0x1062, 0x1063, 0x1064, *range(0x1067, 0x106E), 0x1083,
     *range(0x1087, 0x108D), 0x108F, 0x109A, 0x109B, 0x109C, 0x1A61, 0x1A63, 0x1A64, 0xAA7B,
     0xAA7D, 0x11720, 0x11721]
)


@lru_cache(maxsize=65536)
def _gcb(ch: str) -> int:
    """Grapheme_Cluster_Break property of one code point."""
    cp = ord(ch)
    if cp == 0x0D:
        return _G_CR
    if cp == 0x0A:
        return _G_LF
    if cp == 0x200D:
        return _G_ZWJ
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return _G_RI
    if 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F or cp in (0x200C, 0xFF9E, 0xFF9F):
        return _G_EXTEND
    if 0xAC00 <= cp <= 0xD7A3:
        return _G_LV if (cp - 0xAC00) % 28 == 0 else _G_LVT
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return _G_L
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return _G_V
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return _G_T
    if cp in _PREPEND:
        return _G_PREPEND
    for lo, hi in _PICT_RANGES:
        if cp < lo:
            break
        if cp <= hi:
            return _G_PICT
    cat = unicodedata.category(ch)
    if cat in ("Mn", "Me"):
        return _G_EXTEND
    if cat == "Mc":
        if cp in _MC_EXTEND:
            return _G_EXTEND
        return _G_OTHER if cp in _MC_OTHER else _G_SPACING
    if cat in ("Cc", "Cf", "Zl", "Zp", "Cs"):
        return _G_CONTROL
    if cp in (0x0E33, 0x0EB3):
        return _G_SPACING
    return _G_OTHER


_NO_BREAK_HANGUL = {
    _G_L: (_G_L, _G_V, _G_LV, _G_LVT),
    _G_LV: (_G_V, _G_T),
    _G_V: (_G_V, _G_T),
    _G_LVT: (_G_T,),
    _G_T: (_G_T,),
}
_BREAK_AROUND = (_G_CONTROL, _G_CR, _G_LF)
_JOIN_PREVIOUS = (_G_EXTEND, _G_ZWJ, _G_SPACING)


def grapheme_len(s: str) -> int:
    """Number of extended grapheme clusters in *s* (UAX #29 rules GB3-GB13, without the
    Unicode 15.1 Indic conjunct rule). ASCII strings take a constant-time path."""
    if s.isascii():
        return len(s) - s.count("\r\n")
    count = 0
    prev = -1
    ri_run = 0  # regional indicators immediately before the current position
    pict = False  # inside ExtPict Extend*
    pict_zwj = False  # previous code point is a ZWJ that follows ExtPict Extend*
    for ch in s:
        c = _gcb(ch)
        if prev < 0:
            brk = True
        elif prev == _G_CR:
            brk = c != _G_LF
        elif prev in _BREAK_AROUND or c in _BREAK_AROUND:
            brk = True
        else:
            brk = not (
                (prev in _NO_BREAK_HANGUL and c in _NO_BREAK_HANGUL[prev])
                or c in _JOIN_PREVIOUS
                or prev == _G_PREPEND
                or (c == _G_PICT and pict_zwj)
                or (c == _G_RI and ri_run % 2 == 1)
            )
        if brk:
            count += 1
        pict_zwj = c == _G_ZWJ and pict
        pict = c == _G_PICT or (pict and c == _G_EXTEND)
        ri_run = ri_run + 1 if c == _G_RI else 0
        prev = c
    return count


def _utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


# --- data model checks (used for unknown / unlisted content) -----------------------------


def _fail(message: str) -> ValidationError:
    return ValidationError(message)


def _brief(value: object) -> str:
    """A short repr for messages: repr() of a hostile value can be huge or recurse too deep."""
    if value is None or type(value) in (str, int, bool):
        text = repr(value[:120] if type(value) is str else value)
        return text if len(text) <= 130 else text[:120] + "..."
    return f"a {type(value).__name__}"


# base32 CIDv1 of a sha2-256 digest with the dag-cbor or raw codec: "b" + 58 characters, whose
# first 32 bits (6 characters and the top 2 bits of the 7th) spell 01 71|55 12 20.
_B32_BODY = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def _is_cid_string(s: str) -> bool:
    """Does *s* parse as an atproto CID? The common shape is checked without decoding, with
    the same outcome as :func:`psky.atproto.cbor.parse_cid`, which handles everything else."""
    if len(s) == 59 and s[:7] in ("bafyrei", "bafkrei") and s[7] in "abcdefgh" and _B32_BODY.issuperset(s):
        return True
    try:
        parse_cid(s)
    except DecodeError:
        return False
    return True


def _check_link(v: dict[Any, Any]) -> None:
    link = v["$link"]
    if len(v) != 1 or type(link) is not str:
        raise _fail('a CID link must be exactly {"$link": "<cid>"}')
    if not _is_cid_string(link):
        raise _fail(f"invalid CID in $link: {link!r:.80}")


def _decode_bytes(v: dict[Any, Any]) -> bytes:
    if len(v) != 1:
        raise _fail('bytes must be exactly {"$bytes": "<base64>"}')
    try:
        return b64decode_lenient(v["$bytes"])
    except DecodeError as e:
        raise _fail(str(e)) from None


_BLOB_KEYS = frozenset(("$type", "ref", "mimeType", "size"))
_LEGACY_BLOB_KEYS = frozenset(("cid", "mimeType"))


def _check_blob_shape(v: dict[Any, Any]) -> tuple[str, int | None]:
    """Validate a blob map (current or legacy form); return (mimeType, size or None)."""
    if v.get("$type") == "blob":
        if v.keys() != _BLOB_KEYS:
            raise _fail("blob must have exactly $type, ref, mimeType and size")
        ref = v["ref"]
        if type(ref) is not dict or "$link" not in ref:
            raise _fail('blob ref must be a CID link {"$link": "<cid>"}')
        _check_link(ref)
        size = v["size"]
        if type(size) is not int or size < 0:
            raise _fail("blob size must be a non-negative integer")
    elif v.keys() == _LEGACY_BLOB_KEYS:
        cid = v["cid"]
        if type(cid) is not str:
            raise _fail("legacy blob cid must be a string")
        if not _is_cid_string(cid):
            raise _fail(f"invalid CID in legacy blob: {cid!r:.80}")
        size = None
    else:
        raise _fail("must be a blob")
    mime = v["mimeType"]
    if type(mime) is not str or not mime:
        raise _fail("blob mimeType must be a non-empty string")
    return mime, size


def _check_data(v: Any, depth: int) -> None:
    """Any value must be valid in the atproto data model (no floats, well-formed links,
    bytes and blobs, string $type, bounded nesting)."""
    t = type(v)
    if t is str or t is bool or v is None:
        return
    if t is int:
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise _fail("integer out of 64-bit range")
        return
    if t is dict:
        _check_data_map(v, depth)
        return
    if t is list:
        if depth > MAX_DEPTH:
            raise _fail(f"nested deeper than {MAX_DEPTH}")
        i = 0
        try:
            for i, x in enumerate(v):  # noqa: B007 - i is read after an exception
                _check_data(x, depth + 1)
        except ValidationError as e:
            e._rpath.append(str(i))
            raise
        return
    if t is float:
        raise _fail("floats are not allowed in the atproto data model")
    raise _fail(f"unsupported value type {t.__name__}")


def _check_data_map(v: dict[Any, Any], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _fail(f"nested deeper than {MAX_DEPTH}")
    if "$link" in v:
        _check_link(v)
        return
    if "$bytes" in v:
        _decode_bytes(v)
        return
    if "$type" in v:
        tv = v["$type"]
        if type(tv) is not str or not tv:
            raise _fail("$type must be a non-empty string")
        if tv == "blob":
            _check_blob_shape(v)
            return
    key: Any = None
    try:
        for key, x in v.items():
            if type(key) is not str:
                raise _fail("map keys must be strings")
            t = type(x)
            if t is not str and t is not bool and x is not None:
                _check_data(x, depth + 1)
    except ValidationError as e:
        e._rpath.append(str(key))
        raise


# --- compiling schemas into checks --------------------------------------------------------

_LEX_STRING_FORMATS = frozenset(syntax.FORMAT_CHECKS)
_PRIMARY = frozenset(("record", "query", "procedure", "subscription", "permission-set"))
_DEFINABLE = _PRIMARY | {"boolean", "integer", "string", "bytes", "cid-link", "blob", "array", "object", "token"}
_FIELD_TYPES = frozenset(
    ("boolean", "integer", "string", "bytes", "cid-link", "blob", "array", "object", "ref", "union", "unknown")
)
_PARAM_TYPES = frozenset(("boolean", "integer", "string", "unknown"))
_RECORD_KEY_TYPES = frozenset(("tid", "nsid", "any"))


def _full_ref(ref: str, doc_id: str) -> str:
    """Canonical ``nsid#name`` key for a reference written inside document *doc_id*."""
    if ref.startswith("#"):
        return doc_id + ref
    return ref if "#" in ref else ref + "#main"


def _type_name(key: str) -> str:
    """How a definition is named in data ``$type``: bare NSID for ``main``."""
    return key[:-5] if key.endswith("#main") else key


def _mime_ok(patterns: tuple[str, ...], mime: str) -> bool:
    return any(p == "*/*" or p == mime or (p.endswith("*") and mime.startswith(p[:-1])) for p in patterns)


class _RecordEntry:
    __slots__ = ("check", "key_type", "nsid")

    def __init__(self, nsid: str, key_type: str, check: Check) -> None:
        self.nsid = nsid
        self.key_type = key_type
        self.check = check


class Lexicons:
    """A set of lexicon documents, compiled lazily into validators.

    ``Lexicons.load()`` reads the lexicons bundled with psky; ``validate_record`` is the
    per-record hot path."""

    def __init__(self, docs: Iterable[dict[str, Any]] = (), *, lenient: bool = False) -> None:
        self.lenient = lenient
        self._docs: dict[str, dict[str, Any]] = {}
        self._defs: dict[str, tuple[str, dict[str, Any]]] = {}  # "nsid#name" -> (doc id, def)
        self._refs: set[str] = set()
        self._compiled: dict[str, Check] = {}
        self._records: dict[str, _RecordEntry] = {}
        self._formats: dict[str, Callable[[object], bool]] = dict(syntax.FORMAT_CHECKS)
        if lenient:
            self._formats["datetime"] = syntax.is_valid_datetime_lenient
            self._formats["language"] = syntax.is_valid_language_lenient
        for doc in docs:
            self.add_doc(doc)

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def load(cls, dir: str | Path | None = None, *, lenient: bool = False) -> Lexicons:
        """Load every ``*.json`` lexicon under *dir* (default: psky's bundled lexicons)."""
        root = Path(dir) if dir is not None else Path(__file__).resolve().parent.parent / "lexicons"
        if not root.is_dir():
            raise LexiconError(f"lexicon directory not found: {root}")
        lex = cls(lenient=lenient)
        for path in sorted(root.rglob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                raise LexiconError(f"{path}: not valid JSON: {e}") from None
            try:
                lex.add_doc(doc)
            except LexiconError as e:
                raise LexiconError(f"{path}: {e}") from None
        return lex

    def add_doc(self, doc: dict[str, Any]) -> None:
        """Check a lexicon document and add its definitions."""
        refs = check_lexicon_doc(doc)
        doc_id: str = doc["id"]
        if doc_id in self._docs:
            raise LexiconError(f"duplicate lexicon id {doc_id}")
        self._docs[doc_id] = doc
        self._refs |= refs
        for name, d in doc["defs"].items():
            key = f"{doc_id}#{name}"
            self._defs[key] = (doc_id, d)
            if d["type"] == "record":
                self._records[doc_id] = _RecordEntry(doc_id, d["key"], self._compile_object(d["record"], doc_id))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._docs.values())

    def __len__(self) -> int:
        return len(self._docs)

    def get_def(self, ref: str) -> dict[str, Any] | None:
        """The schema for ``nsid``, ``nsid#name``; None if not loaded."""
        found = self._defs.get(_full_ref(ref, ""))
        return found[1] if found else None

    def unresolved_refs(self) -> list[str]:
        """References made by the loaded documents to definitions that are not loaded."""
        return sorted(r for r in self._refs if r not in self._defs)

    def has_record_type(self, nsid: str) -> bool:
        return nsid in self._records

    def record_types(self) -> list[str]:
        return sorted(self._records)

    # -- validation --------------------------------------------------------------------

    def validate_record(self, collection: str, value: Any, rkey: str | None = None) -> None:
        """Validate *value* (lex JSON form) as a record of *collection*; with *rkey*, also
        check the record key against the schema's key type. Raises :class:`ValidationError`
        (:class:`UnknownLexicon` if no record schema for *collection* is loaded)."""
        entry = self._records.get(collection)
        if entry is None:
            raise UnknownLexicon(f"no record lexicon loaded for {_brief(collection)}")
        if type(value) is not dict:
            raise ValidationError("Record must be an object")
        t = value.get("$type")
        if t != collection:
            err = ValidationError(f"must be {collection!r}, got {_brief(t)}")
            err._rpath += ["$type", "Record"]
            raise err
        if rkey is not None:
            _check_rkey(entry.key_type, rkey)
        try:
            entry.check(value, 0)
        except ValidationError as e:
            e._rpath.append("Record")
            raise

    def validate(self, ref: str, value: Any) -> None:
        """Validate *value* against any data definition (``nsid`` or ``nsid#name``)."""
        key = _full_ref(ref, "")
        check = self._def_check(key)
        try:
            check(value, 0)
        except ValidationError as e:
            e._rpath.append(_type_name(key))
            raise

    # -- compilation ---------------------------------------------------------------------

    def _def_check(self, key: str) -> Check:
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        found = self._defs.get(key)
        if found is None:
            raise UnknownLexicon(f"unresolved lexicon reference {_type_name(key)!r:.120}")
        doc_id, d = found
        t = d["type"]
        if t == "record":
            fn = self._record_ref_check(key, self._records[doc_id].check)
        elif t in _PRIMARY:
            raise ValidationError(f"{_type_name(key)} is a {t}, not a data type")
        elif t == "token":
            raise ValidationError(f"{_type_name(key)} is a token, which has no data representation")
        else:
            fn = self._compile(d, doc_id)
        self._compiled[key] = fn
        return fn

    @staticmethod
    def _record_ref_check(key: str, inner: Check) -> Check:
        nsid = _type_name(key)

        def check(v: Any, depth: int) -> None:
            if type(v) is dict and v.get("$type") not in (nsid, key):
                raise _fail(f"record $type must be {nsid!r}")
            inner(v, depth)

        return check

    def _compile(self, s: dict[str, Any], doc_id: str) -> Check:
        t = s["type"]
        if t == "object":
            return self._compile_object(s, doc_id)
        if t == "string":
            return self._compile_string(s)
        if t == "integer":
            return _compile_integer(s)
        if t == "boolean":
            return _compile_boolean(s)
        if t == "array":
            return self._compile_array(s, doc_id)
        if t == "ref":
            return self._compile_ref(_full_ref(s["ref"], doc_id))
        if t == "union":
            return self._compile_union(s, doc_id)
        if t == "blob":
            return _compile_blob(s)
        if t == "bytes":
            return _compile_bytes(s)
        if t == "cid-link":
            return _check_cid_link
        if t == "unknown":
            return _check_unknown
        raise LexiconError(f"type {t!r} can not describe data")

    def _compile_ref(self, key: str) -> Check:
        target: Check | None = None

        def check(v: Any, depth: int) -> None:
            nonlocal target
            if target is None:
                target = self._def_check(key)
            target(v, depth)

        return check

    def _compile_union(self, s: dict[str, Any], doc_id: str) -> Check:
        closed = bool(s.get("closed", False))
        keys = [_full_ref(r, doc_id) for r in s["refs"]]
        names = ", ".join(_type_name(k) for k in keys)
        defs = self._defs
        variants: dict[str, tuple[str, Check]] = {}
        for k in keys:
            entry = (k, self._compile_ref(k))
            variants[_type_name(k)] = entry
            if k.endswith("#main"):
                variants[k] = entry  # tolerate the explicit "#main" spelling in $type

        def check(v: Any, depth: int) -> None:
            if type(v) is not dict:
                raise _fail('must be an object which includes the "$type" property')
            t = v.get("$type")
            if type(t) is not str:
                raise _fail('must be an object which includes the "$type" property')
            entry = variants.get(t)
            if entry is not None:
                # an open union may list a schema that is not loaded: treat it as unlisted
                if closed or entry[0] in defs:
                    entry[1](v, depth)
                    return
            elif closed:
                raise _fail(f"$type must be one of {names}")
            if t == "blob":
                raise _fail("must be an object, not a blob")
            _check_data_map(v, depth)

        return check

    def _compile_array(self, s: dict[str, Any], doc_id: str) -> Check:
        item = self._compile(s["items"], doc_id)
        lo: int | None = s.get("minLength")
        hi: int | None = s.get("maxLength")

        def check(v: Any, depth: int) -> None:
            if type(v) is not list:
                raise _fail("must be an array")
            if hi is not None and len(v) > hi:
                raise _fail(f"must not have more than {hi} elements")
            if lo is not None and len(v) < lo:
                raise _fail(f"must not have fewer than {lo} elements")
            if depth > MAX_DEPTH:
                raise _fail(f"nested deeper than {MAX_DEPTH}")
            i = 0
            try:
                for i, x in enumerate(v):  # noqa: B007 - i is read after an exception
                    item(x, depth + 1)
            except ValidationError as e:
                e._rpath.append(str(i))
                raise

        return check

    def _compile_object(self, s: dict[str, Any], doc_id: str) -> Check:
        props_schema: dict[str, dict[str, Any]] = s.get("properties") or {}
        props = {name: self._compile(p, doc_id) for name, p in props_schema.items()}
        nullable = frozenset(s.get("nullable") or ())
        # a required property that has a default is satisfied by it
        required = tuple(k for k in s.get("required") or () if props_schema[k].get("default") is None)

        def check(v: Any, depth: int) -> None:
            if type(v) is not dict:
                raise _fail("must be an object")
            if depth > MAX_DEPTH:
                raise _fail(f"nested deeper than {MAX_DEPTH}")
            for k in required:
                if k not in v:
                    raise _fail(f'must have the property "{k}"')
            key: Any = None
            try:
                for key, x in v.items():
                    fn = props.get(key)
                    if fn is not None:
                        if x is None and key in nullable:
                            continue
                        fn(x, depth + 1)
                    elif type(key) is not str:
                        raise _fail("map keys must be strings")
                    elif key == "$type":
                        if type(x) is not str or not x:
                            raise _fail("must be a non-empty string")
                    else:
                        t = type(x)
                        if t is not str and t is not bool and x is not None:
                            _check_data(x, depth + 1)
            except ValidationError as e:
                e._rpath.append(str(key))
                raise

        return check

    def _compile_string(self, s: dict[str, Any]) -> Check:
        fmt: str | None = s.get("format")
        is_fmt = self._formats[fmt] if fmt is not None else None
        fmt_msg = f"must be a valid {fmt}"
        const: str | None = s.get("const")
        enum = frozenset(s["enum"]) if s.get("enum") is not None else None
        min_len: int | None = s.get("minLength")
        max_len: int | None = s.get("maxLength")
        min_g: int | None = s.get("minGraphemes")
        max_g: int | None = s.get("maxGraphemes")

        if const is None and enum is None and min_len is None and max_len is None and min_g is None and max_g is None:
            if is_fmt is None:
                return _check_plain_string
            fmt_check = is_fmt

            def check_format(v: Any, depth: int) -> None:
                if type(v) is not str:
                    raise _fail("must be a string")
                if not fmt_check(v):
                    raise _fail(fmt_msg)

            return check_format

        def check(v: Any, depth: int) -> None:
            if type(v) is not str:
                raise _fail("must be a string")
            if const is not None and v != const:
                raise _fail(f"must be {const!r}")
            if enum is not None and v not in enum:
                raise _fail(f"must be one of ({'|'.join(sorted(enum))})")
            n = len(v)  # code points: UTF-8 length is between n and 4n
            if max_len is not None and n * 4 > max_len and _utf8_len(v) > max_len:
                raise _fail(f"must not be longer than {max_len} bytes (UTF-8)")
            if min_len is not None and n < min_len and _utf8_len(v) < min_len:
                raise _fail(f"must not be shorter than {min_len} bytes (UTF-8)")
            # grapheme count <= code point count
            if max_g is not None and n > max_g and grapheme_len(v) > max_g:
                raise _fail(f"must not be longer than {max_g} graphemes")
            if min_g is not None and (n < min_g or grapheme_len(v) < min_g):
                raise _fail(f"must not be shorter than {min_g} graphemes")
            if is_fmt is not None and not is_fmt(v):
                raise _fail(fmt_msg)

        return check


def _check_plain_string(v: Any, depth: int) -> None:
    if type(v) is not str:
        raise _fail("must be a string")


def _compile_integer(s: dict[str, Any]) -> Check:
    const: int | None = s.get("const")
    enum = frozenset(s["enum"]) if s.get("enum") is not None else None
    lo: int | None = s.get("minimum")
    hi: int | None = s.get("maximum")

    def check(v: Any, depth: int) -> None:
        if type(v) is not int:
            raise _fail("must be an integer")
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise _fail("integer out of 64-bit range")
        if const is not None and v != const:
            raise _fail(f"must be {const}")
        if enum is not None and v not in enum:
            raise _fail(f"must be one of ({'|'.join(map(str, sorted(enum)))})")
        if hi is not None and v > hi:
            raise _fail(f"can not be greater than {hi}")
        if lo is not None and v < lo:
            raise _fail(f"can not be less than {lo}")

    return check


def _compile_boolean(s: dict[str, Any]) -> Check:
    const: bool | None = s.get("const")

    def check(v: Any, depth: int) -> None:
        if v is not True and v is not False:
            raise _fail("must be a boolean")
        if const is not None and v is not const:
            raise _fail(f"must be {str(const).lower()}")

    return check


def _compile_bytes(s: dict[str, Any]) -> Check:
    lo: int | None = s.get("minLength")
    hi: int | None = s.get("maxLength")

    def check(v: Any, depth: int) -> None:
        if type(v) is not dict or "$bytes" not in v:
            raise _fail('must be bytes ({"$bytes": "<base64>"})')
        raw = _decode_bytes(v)
        if hi is not None and len(raw) > hi:
            raise _fail(f"must not be larger than {hi} bytes")
        if lo is not None and len(raw) < lo:
            raise _fail(f"must not be smaller than {lo} bytes")

    return check


def _check_cid_link(v: Any, depth: int) -> None:
    if type(v) is not dict or "$link" not in v:
        raise _fail('must be a CID link ({"$link": "<cid>"})')
    _check_link(v)


def _compile_blob(s: dict[str, Any]) -> Check:
    accept = tuple(s["accept"]) if s.get("accept") else None
    max_size: int | None = s.get("maxSize")

    def check(v: Any, depth: int) -> None:
        if type(v) is not dict:
            raise _fail("must be a blob")
        mime, size = _check_blob_shape(v)
        if accept is not None and not _mime_ok(accept, mime):
            raise _fail(f"blob mimeType {mime!r:.80} is not accepted ({', '.join(accept)})")
        if max_size is not None and size is not None and size > max_size:
            raise _fail(f"blob is larger than {max_size} bytes")

    return check


def _check_unknown(v: Any, depth: int) -> None:
    if type(v) is not dict:
        raise _fail("must be an object")
    if "$link" in v or "$bytes" in v or v.get("$type") == "blob":
        raise _fail("must be an object, not a CID link, bytes or a blob")
    _check_data_map(v, depth)


def _check_rkey(key_type: str, rkey: str) -> None:
    if key_type == "tid":
        ok = syntax.is_valid_tid(rkey)
    elif key_type == "nsid":
        ok = syntax.is_valid_nsid(rkey)
    elif key_type.startswith("literal:"):
        ok = rkey == key_type[8:]
    else:
        ok = syntax.is_valid_record_key(rkey)
    if not ok:
        raise ValidationError(f"record key {_brief(rkey)} does not match key type {key_type!r}")


# --- schema documents -------------------------------------------------------------------


def check_lexicon_doc(doc: Any) -> set[str]:
    """Check that *doc* is a valid lexicon (v1) document; return the definitions it
    references (as ``nsid#name``). Raises :class:`LexiconError`."""
    if type(doc) is not dict:
        raise LexiconError("lexicon document must be a JSON object")
    if type(doc.get("lexicon")) is not int or doc["lexicon"] != 1:
        raise LexiconError("'lexicon' must be the integer 1")
    doc_id = doc.get("id")
    if not syntax.is_valid_nsid(doc_id):
        raise LexiconError(f"'id' must be an NSID, got {doc_id!r:.120}")
    assert isinstance(doc_id, str)
    _opt(doc, "description", str, "")
    _opt(doc, "revision", int, "")
    defs = doc.get("defs")
    if type(defs) is not dict or not defs:
        raise LexiconError("'defs' must be a non-empty object")
    checker = _SchemaChecker(doc_id)
    for name, d in defs.items():
        where = f"defs/{name}"
        if type(name) is not str or not name or "#" in name or "." in name:
            raise LexiconError(f"invalid definition name {name!r:.80}")
        t = _type_of(d, where)
        if t in _PRIMARY and name != "main":
            raise LexiconError(f"{where}: a {t} definition must be named 'main'")
        if t not in _DEFINABLE:
            raise LexiconError(f"{where}: type {t!r} can not be a named definition")
        checker.check(d, where, 0)
    return checker.refs


def _type_of(s: Any, where: str) -> str:
    if type(s) is not dict:
        raise LexiconError(f"{where}: schema must be an object")
    t = s.get("type")
    if type(t) is not str:
        raise LexiconError(f"{where}: schema must have a string 'type'")
    return t


def _opt(s: dict[str, Any], field: str, typ: type, where: str) -> Any:
    """An optional schema field, type-checked (``bool`` never passes for ``int``)."""
    v = s.get(field)
    if v is not None and (type(v) is not typ):
        raise LexiconError(f"{where}{'/' if where else ''}{field} must be {typ.__name__}")
    return v


def _opt_nonneg(s: dict[str, Any], lo_field: str, hi_field: str, where: str) -> None:
    lo = _opt(s, lo_field, int, where)
    hi = _opt(s, hi_field, int, where)
    if (lo is not None and lo < 0) or (hi is not None and hi < 0):
        raise LexiconError(f"{where}: {lo_field}/{hi_field} can not be negative")
    if lo is not None and hi is not None and hi < lo:
        raise LexiconError(f"{where}: {hi_field} is less than {lo_field}")


def _str_list(s: dict[str, Any], field: str, where: str) -> list[str] | None:
    v = s.get(field)
    if v is None:
        return None
    if type(v) is not list or any(type(x) is not str for x in v):
        raise LexiconError(f"{where}/{field} must be an array of strings")
    return v


class _SchemaChecker:
    def __init__(self, doc_id: str) -> None:
        self.doc_id = doc_id
        self.refs: set[str] = set()

    def _add_ref(self, ref: Any, where: str) -> None:
        if type(ref) is not str or not ref:
            raise LexiconError(f"{where}: reference must be a non-empty string")
        nsid, _, name = ref.partition("#")
        if ("#" in ref and not name) or "#" in name or (nsid and not syntax.is_valid_nsid(nsid)):
            raise LexiconError(f"{where}: invalid reference {ref!r:.120}")
        self.refs.add(_full_ref(ref, self.doc_id))

    def check(self, s: Any, where: str, depth: int, allowed: frozenset[str] | None = None) -> None:
        t = _type_of(s, where)
        if depth > MAX_DEPTH:
            raise LexiconError(f"{where}: schema nested too deeply")
        if allowed is not None and t not in allowed:
            raise LexiconError(f"{where}: type {t!r} not allowed here")
        _opt(s, "description", str, where)
        method = self._by_type.get(t)
        if method is None:
            raise LexiconError(f"{where}: unknown schema type {t!r:.80}")
        method(self, s, where, depth)

    def _boolean(self, s: dict[str, Any], where: str, depth: int) -> None:
        if _opt(s, "default", bool, where) is not None and _opt(s, "const", bool, where) is not None:
            raise LexiconError(f"{where}: 'default' and 'const' are mutually exclusive")

    def _integer(self, s: dict[str, Any], where: str, depth: int) -> None:
        if _opt(s, "default", int, where) is not None and _opt(s, "const", int, where) is not None:
            raise LexiconError(f"{where}: 'default' and 'const' are mutually exclusive")
        lo, hi = _opt(s, "minimum", int, where), _opt(s, "maximum", int, where)
        if lo is not None and hi is not None and hi < lo:
            raise LexiconError(f"{where}: maximum is less than minimum")
        enum = s.get("enum")
        if enum is not None and (type(enum) is not list or any(type(x) is not int for x in enum)):
            raise LexiconError(f"{where}/enum must be an array of integers")

    def _string(self, s: dict[str, Any], where: str, depth: int) -> None:
        fmt = s.get("format")
        if fmt is not None and (type(fmt) is not str or fmt not in _LEX_STRING_FORMATS):
            raise LexiconError(f"{where}: unknown string format {fmt!r:.80}")
        _opt_nonneg(s, "minLength", "maxLength", where)
        _opt_nonneg(s, "minGraphemes", "maxGraphemes", where)
        _str_list(s, "enum", where)
        _str_list(s, "knownValues", where)
        if _opt(s, "default", str, where) is not None and _opt(s, "const", str, where) is not None:
            raise LexiconError(f"{where}: 'default' and 'const' are mutually exclusive")

    def _bytes(self, s: dict[str, Any], where: str, depth: int) -> None:
        _opt_nonneg(s, "minLength", "maxLength", where)

    def _cid_link(self, s: dict[str, Any], where: str, depth: int) -> None:
        pass

    def _unknown(self, s: dict[str, Any], where: str, depth: int) -> None:
        pass

    def _token(self, s: dict[str, Any], where: str, depth: int) -> None:
        pass

    def _blob(self, s: dict[str, Any], where: str, depth: int) -> None:
        for pattern in _str_list(s, "accept", where) or ():
            if "/" not in pattern:
                raise LexiconError(f"{where}: invalid accept pattern {pattern!r:.80}")
        size = _opt(s, "maxSize", int, where)
        if size is not None and size <= 0:
            raise LexiconError(f"{where}: maxSize must be positive")

    def _array(self, s: dict[str, Any], where: str, depth: int) -> None:
        _opt_nonneg(s, "minLength", "maxLength", where)
        if "items" not in s:
            raise LexiconError(f"{where}: array needs 'items'")
        self.check(s["items"], where + "/items", depth + 1, _FIELD_TYPES)

    def _object(self, s: dict[str, Any], where: str, depth: int) -> None:
        props = s.get("properties")
        if type(props) is not dict:
            raise LexiconError(f"{where}: object needs a 'properties' object")
        for field in ("required", "nullable"):
            for k in _str_list(s, field, where) or ():
                if k not in props:
                    raise LexiconError(f"{where}: {field} field {k!r:.80} is not a property")
        for k, p in props.items():
            if not k:
                raise LexiconError(f"{where}: empty property name")
            self.check(p, f"{where}/{k}", depth + 1, _FIELD_TYPES)

    def _ref(self, s: dict[str, Any], where: str, depth: int) -> None:
        self._add_ref(s.get("ref"), where)

    def _union(self, s: dict[str, Any], where: str, depth: int) -> None:
        refs = s.get("refs")
        if type(refs) is not list:
            raise LexiconError(f"{where}: union needs a 'refs' array")
        closed = _opt(s, "closed", bool, where)
        if closed and not refs:
            raise LexiconError(f"{where}: a closed union can not be empty")
        for r in refs:
            self._add_ref(r, where)

    def _record(self, s: dict[str, Any], where: str, depth: int) -> None:
        key = s.get("key")
        if type(key) is not str or not (
            key in _RECORD_KEY_TYPES or (key.startswith("literal:") and syntax.is_valid_record_key(key[8:]))
        ):
            raise LexiconError(f"{where}: invalid record key type {key!r:.80}")
        if "record" not in s:
            raise LexiconError(f"{where}: record needs a 'record' schema")
        self.check(s["record"], where + "/record", depth + 1, frozenset(("object",)))

    def _params(self, s: dict[str, Any], where: str, depth: int) -> None:
        props = s.get("properties")
        if type(props) is not dict:
            raise LexiconError(f"{where}: params needs a 'properties' object")
        for k in _str_list(s, "required", where) or ():
            if k not in props:
                raise LexiconError(f"{where}: required field {k!r:.80} is not a property")
        for k, p in props.items():
            pw = f"{where}/{k}"
            t = _type_of(p, pw)
            if t == "array":
                self.check(p, pw, depth + 1)
                if _type_of(p["items"], pw + "/items") not in _PARAM_TYPES:
                    raise LexiconError(f"{pw}: params arrays may only hold boolean, integer, string")
            else:
                self.check(p, pw, depth + 1, _PARAM_TYPES)

    def _body(self, s: Any, where: str, depth: int) -> None:
        if type(s) is not dict:
            raise LexiconError(f"{where}: must be an object")
        if type(s.get("encoding")) is not str:
            raise LexiconError(f"{where}: needs an 'encoding' string")
        _opt(s, "description", str, where)
        if "schema" in s:
            self.check(s["schema"], where + "/schema", depth + 1, frozenset(("object", "ref", "union")))

    def _xrpc(self, s: dict[str, Any], where: str, depth: int, bodies: tuple[str, ...]) -> None:
        if "parameters" in s:
            self.check(s["parameters"], where + "/parameters", depth + 1, frozenset(("params",)))
        for b in bodies:
            if b in s:
                self._body(s[b], f"{where}/{b}", depth + 1)
        errors = s.get("errors")
        if errors is not None and (
            type(errors) is not list or any(type(e) is not dict or type(e.get("name")) is not str for e in errors)
        ):
            raise LexiconError(f"{where}: 'errors' must be an array of {{name: string}}")

    def _query(self, s: dict[str, Any], where: str, depth: int) -> None:
        self._xrpc(s, where, depth, ("output",))

    def _procedure(self, s: dict[str, Any], where: str, depth: int) -> None:
        self._xrpc(s, where, depth, ("input", "output"))

    def _subscription(self, s: dict[str, Any], where: str, depth: int) -> None:
        self._xrpc(s, where, depth, ())
        message = s.get("message")
        if type(message) is not dict or "schema" not in message:
            raise LexiconError(f"{where}: subscription needs 'message' with a 'schema'")
        self.check(message["schema"], where + "/message/schema", depth + 1, frozenset(("union",)))

    def _permission_set(self, s: dict[str, Any], where: str, depth: int) -> None:
        _opt(s, "title", str, where)
        _opt(s, "detail", str, where)
        for field in ("title:lang", "detail:lang"):
            langs = s.get(field)
            if langs is None:
                continue
            if type(langs) is not dict or any(
                not syntax.is_valid_language(k) or type(v) is not str for k, v in langs.items()
            ):
                raise LexiconError(f"{where}/{field} must map language tags to strings")
        perms = s.get("permissions")
        if type(perms) is not list:
            raise LexiconError(f"{where}: permission-set needs a 'permissions' array")
        for i, p in enumerate(perms):
            self.check(p, f"{where}/permissions/{i}", depth + 1, frozenset(("permission",)))

    def _permission(self, s: dict[str, Any], where: str, depth: int) -> None:
        resource = s.get("resource")
        if type(resource) is not str or not resource:
            raise LexiconError(f"{where}: permission needs a 'resource'")
        if resource == "repo":
            colls = _str_list(s, "collection", where)
            if not colls or any(not syntax.is_valid_nsid(c) for c in colls):
                raise LexiconError(f"{where}: repo permission needs 'collection' NSIDs (no wildcard)")
            if any(a not in ("create", "update", "delete") for a in _str_list(s, "action", where) or ()):
                raise LexiconError(f"{where}: repo permission actions are create, update, delete")
        elif resource == "rpc":
            lxms = _str_list(s, "lxm", where)
            if not lxms or any(x != "*" and not syntax.is_valid_nsid(x) for x in lxms):
                raise LexiconError(f"{where}: rpc permission needs 'lxm' NSIDs or '*'")
            aud = _opt(s, "aud", str, where)
            inherit = _opt(s, "inheritAud", bool, where)
            if (aud is None) == (not inherit):
                raise LexiconError(f"{where}: rpc permission needs exactly one of 'aud' or 'inheritAud'")
            if aud is not None and aud != "*":
                raise LexiconError(f"{where}: rpc permission 'aud' must be '*' in a permission set")
            if aud == "*" and "*" in lxms:
                raise LexiconError(f"{where}: rpc permission can not have both 'lxm' and 'aud' wildcard")
        # other resource types are ignored (spec: unsupported permissions must be ignored)

    _by_type: dict[str, Callable[[_SchemaChecker, dict[str, Any], str, int], None]] = {
        "array": _array,
        "blob": _blob,
        "boolean": _boolean,
        "bytes": _bytes,
        "cid-link": _cid_link,
        "integer": _integer,
        "object": _object,
        "params": _params,
        "permission": _permission,
        "permission-set": _permission_set,
        "procedure": _procedure,
        "query": _query,
        "record": _record,
        "ref": _ref,
        "string": _string,
        "subscription": _subscription,
        "token": _token,
        "union": _union,
        "unknown": _unknown,
    }

