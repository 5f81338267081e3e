"""Syntax of atproto identifiers and string formats (atproto.com/specs: did, handle, nsid,
at-uri-scheme, record-key, tid, lexicon string formats).

Every check runs once per firehose event or record field, so each kind is a precompiled
regular expression plus length limits, building no strings on the success path.  ``is_valid_*``
answers a bool for any input (non-strings are simply invalid); ``ensure_valid_*`` raises
:class:`InvalidSyntax` naming what is wrong.  Patterns use explicit ASCII classes and
``fullmatch`` so neither Unicode digits nor a trailing newline can slip through.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple


class InvalidSyntax(ValueError):
    """A string that is not a syntactically valid identifier / format of the named kind."""


# --- DID ------------------------------------------------------------------------------

DID_MAX_LENGTH = 2048
_DID_RE = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")


def is_valid_did(s: object) -> bool:
    return type(s) is str and len(s) <= DID_MAX_LENGTH and _DID_RE.fullmatch(s) is not None


def ensure_valid_did(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"DID must be a string, not {type(s).__name__}")
    if len(s) > DID_MAX_LENGTH:
        raise InvalidSyntax(f"DID is too long ({len(s)} chars, {DID_MAX_LENGTH} max)")
    if not s.startswith("did:"):
        raise InvalidSyntax(f"DID must start with 'did:': {s!r:.80}")
    if _DID_RE.fullmatch(s) is None:
        raise InvalidSyntax(f"invalid DID syntax: {s!r:.80}")


# --- handle ---------------------------------------------------------------------------

HANDLE_MAX_LENGTH = 253
HANDLE_INVALID = "handle.invalid"
# Domain labels: alphanumeric runs joined by hyphens (so none starts or ends with one), each
# followed by a dot; the TLD starts with a letter. Possessive quantifiers make the match a
# single left-to-right pass; the 63-character label limit is checked separately.
_LABEL = r"[a-zA-Z0-9]++(?:-++[a-zA-Z0-9]++)*+"
_HANDLE_RE = re.compile(rf"(?:{_LABEL}\.)++[a-zA-Z][a-zA-Z0-9]*+(?:-++[a-zA-Z0-9]++)*+")


def _labels_fit(s: str) -> bool:
    """No dot-separated part longer than 63 characters."""
    return len(s) <= 63 or max(map(len, s.split("."))) <= 63


def is_valid_handle(s: object) -> bool:
    return (
        type(s) is str and len(s) <= HANDLE_MAX_LENGTH and _HANDLE_RE.fullmatch(s) is not None and _labels_fit(s)
    )


def ensure_valid_handle(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"handle must be a string, not {type(s).__name__}")
    if len(s) > HANDLE_MAX_LENGTH:
        raise InvalidSyntax(f"handle is too long ({len(s)} chars, {HANDLE_MAX_LENGTH} max)")
    if _HANDLE_RE.fullmatch(s) is None:
        raise InvalidSyntax(f"invalid handle syntax: {s!r:.80}")
    if not _labels_fit(s):
        raise InvalidSyntax(f"handle part too long (63 chars max): {s!r:.80}")


def normalize_handle(s: str) -> str:
    """Handles compare case-insensitively; the lower-case form is the canonical one."""
    return s.lower()


# --- at-identifier (DID or handle) ----------------------------------------------------


def is_valid_at_identifier(s: object) -> bool:
    if type(s) is not str:
        return False
    if s.startswith("did:"):
        return len(s) <= DID_MAX_LENGTH and _DID_RE.fullmatch(s) is not None
    return len(s) <= HANDLE_MAX_LENGTH and _HANDLE_RE.fullmatch(s) is not None and _labels_fit(s)


def ensure_valid_at_identifier(s: object) -> None:
    if isinstance(s, str) and s.startswith("did:"):
        ensure_valid_did(s)
    else:
        try:
            ensure_valid_handle(s)
        except InvalidSyntax as e:
            raise InvalidSyntax(f"not a DID or handle: {e}") from None


# --- NSID -----------------------------------------------------------------------------

NSID_MAX_LENGTH = 317  # 253 (domain authority) + 1 + 63 (name)
# reversed domain (first label starts with a letter) + "." + name (letter, then alphanumerics);
# the lookahead keeps the domain labels from swallowing the name, so nothing backtracks
_NSID_RE = re.compile(
    rf"[a-zA-Z][a-zA-Z0-9]*+(?:-++[a-zA-Z0-9]++)*+(?:\.{_LABEL}(?=\.))++\.[a-zA-Z][a-zA-Z0-9]*+"
)


def is_valid_nsid(s: object) -> bool:
    return type(s) is str and len(s) <= NSID_MAX_LENGTH and _NSID_RE.fullmatch(s) is not None and _labels_fit(s)


def ensure_valid_nsid(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"NSID must be a string, not {type(s).__name__}")
    if len(s) > NSID_MAX_LENGTH:
        raise InvalidSyntax(f"NSID is too long ({len(s)} chars, {NSID_MAX_LENGTH} max)")
    if _NSID_RE.fullmatch(s) is None:
        raise InvalidSyntax(f"invalid NSID syntax: {s!r:.80}")
    if not _labels_fit(s):
        raise InvalidSyntax(f"NSID part too long (63 chars max): {s!r:.80}")


# --- record key -----------------------------------------------------------------------

RECORD_KEY_MAX_LENGTH = 512
_RECORD_KEY_RE = re.compile(r"[a-zA-Z0-9_~.:-]{1,512}")


def is_valid_record_key(s: object) -> bool:
    return type(s) is str and _RECORD_KEY_RE.fullmatch(s) is not None and s != "." and s != ".."


def ensure_valid_record_key(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"record key must be a string, not {type(s).__name__}")
    if not 1 <= len(s) <= RECORD_KEY_MAX_LENGTH:
        raise InvalidSyntax(f"record key must be 1 to {RECORD_KEY_MAX_LENGTH} characters")
    if s in (".", ".."):
        raise InvalidSyntax("record key can not be '.' or '..'")
    if _RECORD_KEY_RE.fullmatch(s) is None:
        raise InvalidSyntax(f"invalid record key syntax: {s!r:.80}")


# --- TID ------------------------------------------------------------------------------

TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_TID_RE = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")
_TID_VALUE = {c: i for i, c in enumerate(TID_ALPHABET)}
_TS_MASK = (1 << 53) - 1


def is_valid_tid(s: object) -> bool:
    return type(s) is str and len(s) == 13 and _TID_RE.fullmatch(s) is not None


def ensure_valid_tid(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"TID must be a string, not {type(s).__name__}")
    if len(s) != 13:
        raise InvalidSyntax(f"TID must be 13 characters, got {len(s)}")
    if _TID_RE.fullmatch(s) is None:
        raise InvalidSyntax(f"invalid TID syntax: {s!r:.80}")


def tid_to_int(tid: str) -> int:
    """The 64-bit integer a TID encodes (top bit 0, 53 bits of µs timestamp, 10 bits clock id)."""
    ensure_valid_tid(tid)
    value = 0
    for c in tid:
        value = (value << 5) | _TID_VALUE[c]
    return value


def tid_to_timestamp_us(tid: str) -> int:
    """Microseconds since the UNIX epoch at which the TID was minted."""
    return tid_to_int(tid) >> 10


def tid_clock_id(tid: str) -> int:
    return tid_to_int(tid) & 0x3FF


def make_tid(timestamp_us: int, clock_id: int) -> str:
    """Encode a µs timestamp and a clock id (0..1023) as a 13-character sortable TID."""
    if not 0 <= timestamp_us <= _TS_MASK:
        raise ValueError(f"TID timestamp out of range: {timestamp_us}")
    if not 0 <= clock_id <= 0x3FF:
        raise ValueError(f"TID clock id out of range: {clock_id}")
    value = (timestamp_us << 10) | clock_id
    alphabet = TID_ALPHABET
    out = [""] * 13
    for i in range(12, -1, -1):
        out[i] = alphabet[value & 0x1F]
        value >>= 5
    return "".join(out)


class TidClock:
    """Mints strictly increasing TIDs for one clock id, even if the wall clock stalls or
    steps backwards (each TID is at least 1 µs after the previous one). Thread-safe."""

    def __init__(self, clock_id: int | None = None) -> None:
        self.clock_id = random.randrange(1024) if clock_id is None else clock_id
        if not 0 <= self.clock_id <= 0x3FF:
            raise ValueError(f"TID clock id out of range: {self.clock_id}")
        self._last_us = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        now = time.time_ns() // 1000
        with self._lock:
            if now <= self._last_us:
                now = self._last_us + 1
            self._last_us = now
        return make_tid(now, self.clock_id)


_DEFAULT_CLOCK = TidClock()


def next_tid() -> str:
    """A fresh TID from the process-wide clock (monotonic within this process)."""
    return _DEFAULT_CLOCK.next()


# --- AT-URI (restricted Lexicon syntax) ------------------------------------------------

AT_URI_MAX_LENGTH = 8192
_AT_URI_RE = re.compile(
    r"at://([a-zA-Z0-9._:%-]+)(?:/([a-zA-Z0-9.-]+)(?:/([a-zA-Z0-9_~.:-]{1,512}))?)?"
)


class AtUri(NamedTuple):
    """``at://AUTHORITY[/COLLECTION[/RKEY]]``; ``str()`` gives the URI back."""

    authority: str
    collection: str | None = None
    rkey: str | None = None

    def __str__(self) -> str:
        if self.collection is None:
            return f"at://{self.authority}"
        if self.rkey is None:
            return f"at://{self.authority}/{self.collection}"
        return f"at://{self.authority}/{self.collection}/{self.rkey}"


def _at_uri_error(s: object) -> str | None:
    """Why *s* is not a restricted AT-URI, or None if it is one."""
    if type(s) is not str:
        return f"AT-URI must be a string, not {type(s).__name__}"
    if len(s) > AT_URI_MAX_LENGTH:
        return f"AT-URI is too long ({len(s)} chars, {AT_URI_MAX_LENGTH} max)"
    m = _AT_URI_RE.fullmatch(s)
    if m is None:
        if not s.startswith("at://"):
            return f"AT-URI must start with 'at://': {s!r:.80}"
        return f"invalid AT-URI syntax (only at://authority[/collection[/rkey]]): {s!r:.80}"
    authority, collection, rkey = m.groups()
    if not is_valid_at_identifier(authority):
        return f"AT-URI authority is neither a DID nor a handle: {authority!r:.80}"
    if collection is not None and not is_valid_nsid(collection):
        return f"AT-URI collection is not an NSID: {collection!r:.80}"
    if rkey is not None and (rkey == "." or rkey == ".."):
        return "AT-URI record key can not be '.' or '..'"
    return None


# One pass for the usual case: every part's own grammar inlined. Length limits of the parts
# can only be exceeded by URIs longer than _AT_URI_FAST_LEN, which take the detailed path.
_AT_URI_FAST_RE = re.compile(
    r"at://(?:did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]|(" + _HANDLE_RE.pattern + "))"
    r"(?:/(" + _NSID_RE.pattern + r")(?:/([a-zA-Z0-9_~.:-]{1,512}))?)?"
)
_AT_URI_FAST_LEN = 5 + HANDLE_MAX_LENGTH


def is_valid_at_uri(s: object) -> bool:
    if type(s) is str and len(s) <= _AT_URI_FAST_LEN:
        m = _AT_URI_FAST_RE.fullmatch(s)
        if m is None:
            return False
        handle, collection, rkey = m.groups()
        if len(s) > 68 and not (
            (handle is None or _labels_fit(handle)) and (collection is None or _labels_fit(collection))
        ):
            return False
        return rkey is None or (rkey != "." and rkey != "..")
    return _at_uri_error(s) is None


def ensure_valid_at_uri(s: object) -> None:
    err = _at_uri_error(s)
    if err is not None:
        raise InvalidSyntax(err)


def parse_at_uri(s: str) -> AtUri:
    """Split a restricted AT-URI into authority, collection and rkey (validating each)."""
    err = _at_uri_error(s)
    if err is not None:
        raise InvalidSyntax(err)
    m = _AT_URI_RE.fullmatch(s)
    assert m is not None
    authority, collection, rkey = m.groups()
    return AtUri(authority, collection, rkey)


# --- CID (string form, loose syntax) ---------------------------------------------------

_CID_RE = re.compile(r"[a-zA-Z0-9+=]{8,256}")


def is_valid_cid(s: object) -> bool:
    """Loose CID string syntax (any multibase); CIDv0 (``Qm…``) is rejected. Use
    :func:`psky.atproto.cbor.parse_cid` when the CID must actually decode."""
    return type(s) is str and _CID_RE.fullmatch(s) is not None and not s.startswith("Qm")


def ensure_valid_cid(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"CID must be a string, not {type(s).__name__}")
    if not 8 <= len(s) <= 256:
        raise InvalidSyntax(f"CID string must be 8 to 256 characters, got {len(s)}")
    if _CID_RE.fullmatch(s) is None:
        raise InvalidSyntax(f"invalid CID string syntax: {s!r:.80}")
    if s.startswith("Qm"):
        raise InvalidSyntax("CIDv0 is not allowed in atproto")


# --- datetime -------------------------------------------------------------------------

DATETIME_MAX_LENGTH = 64
_DATETIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})"
)
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_EPOCH_DAYS_YEAR0 = -719528  # days from 1970-01-01 back to 0000-01-01 (proleptic Gregorian)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (valid for year 0 too)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return y + (m <= 2), m, d


_MIN_US = _EPOCH_DAYS_YEAR0 * 86_400_000_000
_MAX_US = (_days_from_civil(10000, 1, 1)) * 86_400_000_000 - 1


def _datetime_us(s: object) -> int | str:
    """µs since the epoch for a valid atproto datetime, else the reason it is invalid."""
    if type(s) is not str:
        return f"datetime must be a string, not {type(s).__name__}"
    if len(s) > DATETIME_MAX_LENGTH:
        return f"datetime is too long ({len(s)} chars, {DATETIME_MAX_LENGTH} max)"
    m = _DATETIME_RE.fullmatch(s)
    if m is None:
        return f"datetime must be RFC 3339 & ISO 8601 with 'Z' or ±hh:mm timezone: {s!r:.80}"
    ys, mos, ds, hs, mis, ss, frac, tz = m.groups()
    year, month, day = int(ys), int(mos), int(ds)
    hour, minute, second = int(hs), int(mis), int(ss)
    if not 1 <= month <= 12:
        return f"datetime month out of range: {s!r:.80}"
    dim = 29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month]
    if not 1 <= day <= dim:
        return f"datetime day out of range: {s!r:.80}"
    if hour > 23 or minute > 59 or second > 59:
        return f"datetime time of day out of range: {s!r:.80}"
    offset_s = 0
    if tz != "Z":
        if tz == "-00:00":
            return "datetime can not use '-00:00' as UTC offset (ISO 8601); use 'Z' or '+00:00'"
        oh, om = int(tz[1:3]), int(tz[4:6])
        if oh > 23 or om > 59:
            return f"datetime timezone offset out of range: {s!r:.80}"
        offset_s = (oh * 3600 + om * 60) * (1 if tz[0] == "+" else -1)
    us = (_days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset_s) * 1_000_000
    if frac is not None:
        us += int((frac[1:] + "00000")[:6])
    if us < _MIN_US:
        return "datetime normalizes to before year 0"
    if us > _MAX_US:
        return "datetime normalizes to after year 9999"
    return us


# Fast path: ranges of every field enforced by the pattern; only day 29-31 needs a calendar
# check, and only offsets applied to years 0000 / 9999 can leave the representable range.
_DATETIME_FAST_RE = re.compile(
    r"([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]+)?(Z|\+(?:[01][0-9]|2[0-3]):[0-5][0-9]|-(?:[01][0-9]|2[0-3]):[0-5][0-9])"
)


def is_valid_datetime(s: object) -> bool:
    """Syntax plus semantics: real calendar date, time of day, offset; not before year 0."""
    if type(s) is not str or len(s) > DATETIME_MAX_LENGTH:
        return False
    m = _DATETIME_FAST_RE.fullmatch(s)
    if m is None:
        return False
    ys, mos, ds, tz = m.groups()
    if ds > "28":
        month = int(mos)
        dim = 29 if month == 2 and _is_leap(int(ys)) else _DAYS_IN_MONTH[month]
        if int(ds) > dim:
            return False
    if tz != "Z" and (tz == "-00:00" or ys == "0000" or ys == "9999"):
        return type(_datetime_us(s)) is int
    return True


def ensure_valid_datetime(s: object) -> None:
    if is_valid_datetime(s):
        return
    r = _datetime_us(s)
    raise InvalidSyntax(r if type(r) is str else f"invalid datetime: {s!r:.80}")


def datetime_to_us(s: str) -> int:
    """Microseconds since 1970-01-01T00:00:00Z (fraction truncated to µs)."""
    r = _datetime_us(s)
    if type(r) is str:
        raise InvalidSyntax(r)
    assert isinstance(r, int)
    return r


_LENIENT_TZ_RE = re.compile(r".*(?:[+-][0-9]{2}:?[0-9]{2}|[a-zA-Z])")


def _lenient_candidates(s: str) -> list[str]:
    out = []
    if s.endswith("-00:00"):
        out.append(s[:-6] + "+00:00")
    elif s.endswith(("+0000", "-0000")):
        out.append(s[:-5] + "+00:00")
    elif _LENIENT_TZ_RE.fullmatch(s) is None:
        out.append(s + "Z")
    return out


def is_valid_datetime_lenient(s: object) -> bool:
    """Also accepts the common legacy slips (missing timezone, '-00:00', '+0000') that
    :func:`normalize_datetime` repairs; for reading old records, never for writing."""
    if type(_datetime_us(s)) is int:
        return True
    if not isinstance(s, str) or len(s) > DATETIME_MAX_LENGTH:
        return False
    return any(type(_datetime_us(c)) is int for c in _lenient_candidates(s))


def normalize_datetime(s: str, *, lenient: bool = True) -> str:
    """Canonical ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC, millisecond precision) for a datetime,
    e.g. as a sort key. With *lenient*, legacy slips are repaired first."""
    r = _datetime_us(s)
    if type(r) is str and lenient and isinstance(s, str) and len(s) <= DATETIME_MAX_LENGTH:
        for cand in _lenient_candidates(s):
            c = _datetime_us(cand)
            if type(c) is int:
                r = c
                break
    if type(r) is str:
        raise InvalidSyntax(r)
    assert isinstance(r, int)
    days, rem = divmod(r, 86_400_000_000)
    y, mo, d = _civil_from_days(days)
    secs, us = divmod(rem, 1_000_000)
    hh, rest = divmod(secs, 3600)
    mm, ss = divmod(rest, 60)
    return f"{y:04d}-{mo:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}.{us // 1000:03d}Z"


# --- language (BCP 47) ----------------------------------------------------------------

LANGUAGE_MAX_LENGTH = 128
_GRANDFATHERED = (
    "en-GB-oed|i-ami|i-bnn|i-default|i-enochian|i-hak|i-klingon|i-lux|i-mingo|i-navajo|i-pwn|"
    "i-tao|i-tay|i-tsu|sgn-BE-FR|sgn-BE-NL|sgn-CH-DE|"
    "art-lojban|cel-gaulish|no-bok|no-nyn|zh-guoyu|zh-hakka|zh-min|zh-min-nan|zh-xiang"
)
# RFC 5646 §2.1 langtag / privateuse / grandfathered. Strictly, the primary language subtag
# must be the lower-case 2-3 letter ISO 639 form (the interop vectors reject `JA` and `jaja`);
# the lenient form accepts any case and the reserved 4-8 letter forms, as BCP 47's grammar does.
_LANG_PATTERN = (
    rf"(?P<grandfathered>{_GRANDFATHERED})"
    r"|(?P<language>{language})"
    r"(?:-(?P<script>[A-Za-z]{{4}}))?"
    r"(?:-(?P<region>[A-Za-z]{{2}}|[0-9]{{3}}))?"
    r"(?P<variants>(?:-(?:[A-Za-z0-9]{{5,8}}|[0-9][A-Za-z0-9]{{3}}))*)"
    r"(?P<extensions>(?:-[0-9A-WY-Za-wy-z](?:-[A-Za-z0-9]{{2,8}})+)*)"
    r"(?:-(?P<private_a>[xX](?:-[A-Za-z0-9]{{1,8}})+))?"
    r"|(?P<private_b>[xX](?:-[A-Za-z0-9]{{1,8}})+)"
)
_LANG_RE = re.compile(_LANG_PATTERN.format(language=r"[a-z]{2,3}(?:-[A-Za-z]{3}(?:-[A-Za-z]{3}){0,2})?"))
_LANG_LENIENT_RE = re.compile(
    _LANG_PATTERN.format(language=r"[A-Za-z]{2,3}(?:-[A-Za-z]{3}(?:-[A-Za-z]{3}){0,2})?|[A-Za-z]{4,8}")
)


class LanguageTag(NamedTuple):
    """The parts of a well-formed, valid BCP 47 tag (subtags as written, not normalized)."""

    language: str | None
    script: str | None
    region: str | None
    variants: tuple[str, ...]
    extensions: tuple[str, ...]
    private_use: str | None
    grandfathered: str | None


@lru_cache(maxsize=4096)
def _language_match(s: str) -> re.Match[str] | None:
    return _LANG_RE.fullmatch(s)


def is_valid_language(s: object) -> bool:
    """Well-formed BCP 47 (what Lexicon ``language`` requires)."""
    if type(s) is not str or len(s) > LANGUAGE_MAX_LENGTH:
        return False
    if 2 <= len(s) <= 3 and s.isascii() and s.isalpha() and s.islower():
        return True  # the overwhelmingly common bare ISO 639 code
    return _language_match(s) is not None


def is_valid_language_lenient(s: object) -> bool:
    """Well-formed per the BCP 47 grammar alone (any case, 4-8 letter primary subtags):
    what the TypeScript reference accepts in records, for reading legacy data."""
    if type(s) is not str or len(s) > LANGUAGE_MAX_LENGTH:
        return False
    return is_valid_language(s) or _LANG_LENIENT_RE.fullmatch(s) is not None


def ensure_valid_language(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"language tag must be a string, not {type(s).__name__}")
    if len(s) > LANGUAGE_MAX_LENGTH:
        raise InvalidSyntax(f"language tag is too long ({len(s)} chars, {LANGUAGE_MAX_LENGTH} max)")
    if not is_valid_language(s):
        raise InvalidSyntax(f"not a well-formed BCP 47 language tag: {s!r:.80}")


def parse_language(s: str) -> LanguageTag:
    """Parse a tag that is well-formed *and* valid per RFC 5646 §2.2.9: no repeated variant
    subtag and no repeated extension singleton (case-insensitively)."""
    ensure_valid_language(s)
    m = _language_match(s)
    assert m is not None
    g = m.groupdict()
    variants = tuple(v for v in (g["variants"] or "").split("-") if v)
    if len({v.lower() for v in variants}) != len(variants):
        raise InvalidSyntax(f"language tag repeats a variant subtag: {s!r:.80}")
    extensions: list[str] = []
    for part in (g["extensions"] or "").split("-")[1:]:
        if len(part) == 1:
            extensions.append(part)
        else:
            extensions[-1] += "-" + part
    singletons = [e[0].lower() for e in extensions]
    if len(set(singletons)) != len(singletons):
        raise InvalidSyntax(f"language tag repeats an extension singleton: {s!r:.80}")
    return LanguageTag(
        language=g["language"],
        script=g["script"],
        region=g["region"],
        variants=variants,
        extensions=tuple(extensions),
        private_use=g["private_a"] or g["private_b"],
        grandfathered=g["grandfathered"],
    )


# --- generic URI ----------------------------------------------------------------------

URI_MAX_LENGTH = 8192
# RFC 3986 scheme, then a non-empty run without whitespace or control characters.
_URI_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{0,80}:[^\s\x00-\x1f\x7f]+")


def is_valid_uri(s: object) -> bool:
    return type(s) is str and len(s) <= URI_MAX_LENGTH and _URI_RE.fullmatch(s) is not None


def ensure_valid_uri(s: object) -> None:
    if type(s) is not str:
        raise InvalidSyntax(f"URI must be a string, not {type(s).__name__}")
    if len(s) > URI_MAX_LENGTH:
        raise InvalidSyntax(f"URI is too long ({len(s)} chars, {URI_MAX_LENGTH} max)")
    if _URI_RE.fullmatch(s) is None:
        raise InvalidSyntax(f"invalid URI syntax: {s!r:.80}")


#: Lexicon string ``format`` name -> validity check.
FORMAT_CHECKS: dict[str, Callable[[object], bool]] = {
    "at-identifier": is_valid_at_identifier,
    "at-uri": is_valid_at_uri,
    "cid": is_valid_cid,
    "datetime": is_valid_datetime,
    "did": is_valid_did,
    "handle": is_valid_handle,
    "language": is_valid_language,
    "nsid": is_valid_nsid,
    "record-key": is_valid_record_key,
    "tid": is_valid_tid,
    "uri": is_valid_uri,
}
