"""psky.atproto.syntax against every line of the interop syntax vectors, plus edge cases."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from psky.atproto import syntax as S
from tests.paths import INTEROP

SYNTAX_DIR = INTEROP / "syntax"

# fixture file prefix -> (is_valid, ensure_valid)
KINDS: dict[str, tuple[Callable[[object], bool], Callable[[object], None]]] = {
    "atidentifier": (S.is_valid_at_identifier, S.ensure_valid_at_identifier),
    "aturi": (S.is_valid_at_uri, S.ensure_valid_at_uri),
    "cid": (S.is_valid_cid, S.ensure_valid_cid),
    "datetime": (S.is_valid_datetime, S.ensure_valid_datetime),
    "did": (S.is_valid_did, S.ensure_valid_did),
    "handle": (S.is_valid_handle, S.ensure_valid_handle),
    "language": (S.is_valid_language, S.ensure_valid_language),
    "nsid": (S.is_valid_nsid, S.ensure_valid_nsid),
    "recordkey": (S.is_valid_record_key, S.ensure_valid_record_key),
    "tid": (S.is_valid_tid, S.ensure_valid_tid),
    "uri": (S.is_valid_uri, S.ensure_valid_uri),
}


def fixture_lines(path: Path) -> list[tuple[str, str]]:
    """(id, line) for every data line; '#'-lines and empty lines are comments. Leading and
    trailing whitespace is significant (several vectors test exactly that)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line and not line.startswith("#"):
            out.append((f"{path.stem}:{n}", line))
    return out


def vectors(suffix: str) -> list[Any]:
    params = []
    for path in sorted(SYNTAX_DIR.glob(f"*_{suffix}.txt")):
        kind = path.stem.split("_")[0]
        for vid, line in fixture_lines(path):
            params.append(pytest.param(kind, line, id=vid))
    return params


def test_every_fixture_file_is_known() -> None:
    files = sorted(SYNTAX_DIR.glob("*.txt"))
    assert len(files) == 24
    for path in files:
        kind, category, validity = path.stem.split("_")
        assert kind in KINDS, path.name
        assert category in ("syntax", "parse") and validity in ("valid", "invalid"), path.name
        assert fixture_lines(path), path.name


@pytest.mark.parametrize(("kind", "value"), vectors("syntax_valid"))
def test_syntax_valid(kind: str, value: str) -> None:
    is_valid, ensure_valid = KINDS[kind]
    assert is_valid(value)
    ensure_valid(value)


@pytest.mark.parametrize(("kind", "value"), vectors("syntax_invalid"))
def test_syntax_invalid(kind: str, value: str) -> None:
    is_valid, ensure_valid = KINDS[kind]
    assert not is_valid(value)
    with pytest.raises(S.InvalidSyntax):
        ensure_valid(value)


@pytest.mark.parametrize(("kind", "value"), vectors("parse_invalid"))
def test_parse_invalid(kind: str, value: str) -> None:
    if kind == "datetime":
        # semantically impossible datetimes fail validation and parsing alike
        assert not S.is_valid_datetime(value)
        with pytest.raises(S.InvalidSyntax):
            S.datetime_to_us(value)
        with pytest.raises(S.InvalidSyntax):
            S.normalize_datetime(value)
    elif kind == "language":
        # well-formed BCP 47 (what lexicon `language` accepts) but not a valid tag
        assert S.is_valid_language(value)
        with pytest.raises(S.InvalidSyntax):
            S.parse_language(value)
    else:
        pytest.fail(f"unexpected parse vector kind {kind}")


# --- round trips over the valid vectors --------------------------------------------------


@pytest.mark.parametrize(("kind", "value"), [p for p in vectors("syntax_valid") if p.values[0] == "aturi"])
def test_at_uri_parse_round_trip(kind: str, value: str) -> None:
    uri = S.parse_at_uri(value)
    assert str(uri) == value
    assert S.is_valid_at_identifier(uri.authority)
    assert uri.collection is None or S.is_valid_nsid(uri.collection)
    assert uri.rkey is None or (uri.collection is not None and S.is_valid_record_key(uri.rkey))


@pytest.mark.parametrize(("kind", "value"), [p for p in vectors("syntax_valid") if p.values[0] == "datetime"])
def test_datetime_to_us_matches_stdlib(kind: str, value: str) -> None:
    us = S.datetime_to_us(value)
    norm = S.normalize_datetime(value)
    assert S.is_valid_datetime(norm) and norm.endswith("Z") and len(norm) == 24
    assert S.datetime_to_us(norm) == us - us % 1000
    if not value.startswith("0000"):
        head, _, frac_tz = value.partition(".")
        if frac_tz:  # stdlib only takes up to 6 fraction digits
            digits = frac_tz.rstrip("Z").split("+")[0].split("-")[0]
            value = head + "." + (digits + "000000")[:6] + frac_tz[len(digits):]
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        assert us == (parsed - epoch) // dt.timedelta(microseconds=1)


@pytest.mark.parametrize(("kind", "value"), [p for p in vectors("syntax_valid") if p.values[0] == "language"])
def test_valid_languages_parse(kind: str, value: str) -> None:
    tag = S.parse_language(value)
    assert tag.grandfathered or tag.language or tag.private_use


# --- edge cases ------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [k[0] for k in KINDS.values()])
@pytest.mark.parametrize("value", [None, 1, b"did:plc:abc", ["a.b.c"], 1.5])
def test_non_strings_are_invalid(fn: Callable[[object], bool], value: object) -> None:
    assert fn(value) is False


@pytest.mark.parametrize(
    ("fn", "value"),
    [
        (S.is_valid_did, "did:plc:ewvi7nxzyoun6zhxrhs64oiz\n"),
        (S.is_valid_handle, "alice.bsky.social\n"),
        (S.is_valid_nsid, "app.bsky.feed.post\n"),
        (S.is_valid_tid, "3jzfcijpj2z2a\n"),
        (S.is_valid_record_key, "self\n"),
        (S.is_valid_datetime, "1985-04-12T23:20:50.123Z\n"),
        (S.is_valid_at_uri, "at://did:plc:abc/app.bsky.feed.post/3jzfcijpj2z2a\n"),
        (S.is_valid_uri, "https://example.com\n"),
        (S.is_valid_language, "en\n"),
        (S.is_valid_cid, "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq\n"),
        # Unicode digits are not ASCII digits
        (S.is_valid_datetime, "１９８５-04-12T23:20:50.123Z"),
        (S.is_valid_tid, "3jzfcijpj2z2٣"),
    ],
)
def test_no_trailing_newline_or_unicode_digit_loophole(fn: Callable[[object], bool], value: str) -> None:
    assert not fn(value)


def test_length_limits() -> None:
    assert S.is_valid_did("did:web:" + "a" * (2048 - 8))
    assert not S.is_valid_did("did:web:" + "a" * (2049 - 8))
    assert S.is_valid_record_key("a" * 512) and not S.is_valid_record_key("a" * 513)
    assert S.is_valid_uri("https://x.y/" + "a" * (8192 - 12)) and not S.is_valid_uri("https://x.y/" + "a" * 8192)
    assert not S.is_valid_datetime("1985-04-12T23:20:50." + "1" * 60 + "Z")


def test_hostile_inputs_are_fast() -> None:
    hostile = [
        "a." * 5000 + "-",
        "at://" + "a" * 9000,
        "x-" * 70,
        "aa-" + "aaa-" * 40 + "!",
        "did:" + "a:" * 5000,
        "1" * 100_000,
        "a-" * 50_000,
    ]
    start = time.perf_counter()
    for s in hostile:
        for is_valid, _ in KINDS.values():
            is_valid(s)
        S.is_valid_language_lenient(s)
        S.is_valid_datetime_lenient(s)
    assert time.perf_counter() - start < 0.5


def test_datetime_semantics() -> None:
    assert S.is_valid_datetime("2024-02-29T00:00:00Z")  # leap year
    assert not S.is_valid_datetime("2023-02-29T00:00:00Z")
    assert not S.is_valid_datetime("1900-02-29T00:00:00Z")  # century, not a leap year
    assert S.is_valid_datetime("2000-02-29T00:00:00Z")
    assert S.is_valid_datetime("0000-02-29T00:00:00Z")  # year 0 is a leap year
    assert not S.is_valid_datetime("2024-04-31T00:00:00Z")
    assert not S.is_valid_datetime("2024-01-01T23:59:60Z")  # no leap seconds
    assert not S.is_valid_datetime("2024-01-01T00:00:00+24:00")
    assert S.is_valid_datetime("9999-12-31T23:59:59.999Z")
    assert not S.is_valid_datetime("9999-12-31T23:00:00-01:00")  # normalizes into year 10000
    assert S.datetime_to_us("1970-01-01T00:00:00Z") == 0
    assert S.datetime_to_us("1970-01-01T01:00:00+01:00") == 0
    assert S.datetime_to_us("1970-01-01T00:00:00.0000019Z") == 1
    assert S.datetime_to_us("0000-01-01T00:00:00Z") == -62167219200 * 10**6


def test_normalize_datetime() -> None:
    assert S.normalize_datetime("1985-04-12T23:20:50.1235678912345Z") == "1985-04-12T23:20:50.123Z"
    assert S.normalize_datetime("1985-04-12T23:20:50-07:00") == "1985-04-13T06:20:50.000Z"
    assert S.normalize_datetime("0000-01-01T00:00:00Z") == "0000-01-01T00:00:00.000Z"
    # legacy repairs, only when lenient
    assert S.normalize_datetime("2023-01-01T10:00:00") == "2023-01-01T10:00:00.000Z"
    assert S.normalize_datetime("2023-01-01T10:00:00-00:00") == "2023-01-01T10:00:00.000Z"
    assert S.normalize_datetime("2023-01-01T10:00:00.5+0000") == "2023-01-01T10:00:00.500Z"
    with pytest.raises(S.InvalidSyntax):
        S.normalize_datetime("2023-01-01T10:00:00", lenient=False)
    with pytest.raises(S.InvalidSyntax):
        S.normalize_datetime("yesterday")
    assert S.is_valid_datetime_lenient("2023-01-01T10:00:00.123")
    assert not S.is_valid_datetime("2023-01-01T10:00:00.123")
    assert not S.is_valid_datetime_lenient("2023-13-01T10:00:00")
    assert not S.is_valid_datetime_lenient("2023-01-01")


def test_language_lenient() -> None:
    for tag in ("EN", "JA", "jaja", "english", "En-us"):
        assert not S.is_valid_language(tag)
        assert S.is_valid_language_lenient(tag)
    for tag in ("e", "123", "en-", "english-language-x"):
        assert not S.is_valid_language_lenient(tag)


def test_parse_language_parts() -> None:
    tag = S.parse_language("hy-Latn-IT-arevela")
    assert (tag.language, tag.script, tag.region, tag.variants) == ("hy", "Latn", "IT", ("arevela",))
    tag = S.parse_language("en-u-co-phonebk-t-en-US-x-priv")
    assert tag.extensions == ("u-co-phonebk", "t-en-US") and tag.private_use == "x-priv"
    assert S.parse_language("i-navajo").grandfathered == "i-navajo"
    assert S.parse_language("x-whatever").private_use == "x-whatever"


def test_tid_encoding() -> None:
    assert S.make_tid(0, 0) == "2222222222222"
    assert S.make_tid((1 << 53) - 1, 1023) == "bzzzzzzzzzzzz"
    tid = S.make_tid(1_700_000_000_123_456, 7)
    assert S.is_valid_tid(tid)
    assert S.tid_to_timestamp_us(tid) == 1_700_000_000_123_456
    assert S.tid_clock_id(tid) == 7
    assert S.tid_to_int(tid) == (1_700_000_000_123_456 << 10) | 7
    # sortable: string order follows timestamp order
    assert S.make_tid(1_700_000_000_000_000, 1023) < S.make_tid(1_700_000_000_000_001, 0)
    with pytest.raises(ValueError):
        S.make_tid(-1, 0)
    with pytest.raises(ValueError):
        S.make_tid(1 << 53, 0)
    with pytest.raises(ValueError):
        S.make_tid(0, 1024)
    with pytest.raises(S.InvalidSyntax):
        S.tid_to_timestamp_us("kjzfcijpj2z2a")


def test_tid_clock_is_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = S.TidClock(clock_id=5)
    frozen = 1_700_000_000_000_000_000
    monkeypatch.setattr(time, "time_ns", lambda: frozen)
    tids = [clock.next() for _ in range(100)]
    assert tids == sorted(tids) and len(set(tids)) == 100
    assert all(S.tid_clock_id(t) == 5 for t in tids)
    # the wall clock stepping backwards does not make TIDs go backwards
    monkeypatch.setattr(time, "time_ns", lambda: frozen - 10**12)
    assert clock.next() > tids[-1]
    monkeypatch.undo()
    a, b = S.next_tid(), S.next_tid()
    assert S.is_valid_tid(a) and a < b
    assert abs(S.tid_to_timestamp_us(a) - time.time() * 1e6) < 60e6
    with pytest.raises(ValueError):
        S.TidClock(clock_id=2000)


def test_at_uri_parts() -> None:
    uri = S.parse_at_uri("at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3k43tv4rft22g")
    assert tuple(uri) == ("did:plc:ewvi7nxzyoun6zhxrhs64oiz", "app.bsky.feed.post", "3k43tv4rft22g")
    assert uri.collection == "app.bsky.feed.post" and uri.rkey == "3k43tv4rft22g"
    assert S.parse_at_uri("at://alice.test") == S.AtUri("alice.test")
    assert str(S.AtUri("alice.test", "app.bsky.feed.post")) == "at://alice.test/app.bsky.feed.post"
    for bad in ("at://did:plc:abc/", "at://did:plc:abc/app.bsky.feed.post/.", "https://x.com", "at://x"):
        with pytest.raises(S.InvalidSyntax):
            S.parse_at_uri(bad)


def test_handles_and_helpers() -> None:
    assert S.normalize_handle("Alice.BSKY.Social") == "alice.bsky.social"
    assert S.is_valid_handle(S.HANDLE_INVALID)
    assert S.is_valid_cid("bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq")
    assert not S.is_valid_cid("QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR")
    assert set(S.FORMAT_CHECKS) == {
        "at-identifier", "at-uri", "cid", "datetime", "did", "handle", "language", "nsid", "record-key",
        "tid", "uri",
    }


def test_error_messages_name_the_problem() -> None:
    with pytest.raises(S.InvalidSyntax, match="too long"):
        S.ensure_valid_handle("a" * 300 + ".com")
    with pytest.raises(S.InvalidSyntax, match="must be a string"):
        S.ensure_valid_nsid(5)
    with pytest.raises(S.InvalidSyntax, match="collection is not an NSID"):
        S.ensure_valid_at_uri("at://did:plc:abc/short/stuff")
    with pytest.raises(S.InvalidSyntax, match="-00:00"):
        S.ensure_valid_datetime("1985-04-12T23:20:50.123-00:00")
    with pytest.raises(S.InvalidSyntax, match="CIDv0"):
        S.ensure_valid_cid("QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR")
    assert issubclass(S.InvalidSyntax, ValueError)
