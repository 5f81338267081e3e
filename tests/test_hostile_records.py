"""Hostile records against lexicon validation (the indexer's per-record gate).

For any value, :meth:`Lexicons.validate_record` returns or raises :class:`ValidationError`
(never anything else, never recursing without bound), and its message stays short enough to
log whatever the record holds. Inputs: valid records of several types mutated at every path,
with deep nesting, huge strings and arrays, NUL bytes, lone surrogates, wrong types, floats,
out-of-range integers, malformed ``$link``/``$bytes``/blobs; plus records arriving as
DAG-CBOR bytes with invalid UTF-8 (refused by the decoder before validation).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto import cbor
from psky.atproto.lexicon import Lexicons, ValidationError

HOSTILE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def hostile(max_examples: int) -> settings:
    """CI size by default; ``PSKY_HOSTILE_SCALE=N`` multiplies every budget for long runs."""
    return settings(HOSTILE, max_examples=max_examples * int(os.environ.get("PSKY_HOSTILE_SCALE", "1")))


LEX = Lexicons.load()
LENIENT = Lexicons.load(lenient=True)
#: longest error message accepted: whatever the record, what gets logged stays small
MAX_MESSAGE = 4096

CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
TIME = "2024-05-01T12:00:00.123Z"
URI = "at://did:plc:hostilehostilehostilehos/app.bsky.feed.post/3kzzzzzzzzzz2"
BLOB = {"$type": "blob", "ref": {"$link": CID}, "mimeType": "image/jpeg", "size": 1000}

SAMPLES: list[dict[str, Any]] = [
    {
        "$type": "app.bsky.feed.post",
        "text": "hello @alice.test https://example.com #tag",
        "createdAt": TIME,
        "langs": ["en", "pt-BR"],
        "reply": {"root": {"uri": URI, "cid": CID}, "parent": {"uri": URI, "cid": CID}},
        "facets": [
            {"index": {"byteStart": 6, "byteEnd": 17}, "features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:hostilehostilehostilehos"}]},
            {"index": {"byteStart": 18, "byteEnd": 37}, "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.com"}]},
        ],
        "embed": {"$type": "app.bsky.embed.images", "images": [{"image": BLOB, "alt": "a cat", "aspectRatio": {"width": 4, "height": 3}}]},
        "labels": {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "nudity"}]},
        "tags": ["a", "b"],
    },
    {
        "$type": "app.bsky.actor.profile",
        "displayName": "Alice",
        "description": "hi",
        "avatar": BLOB,
        "banner": BLOB,
        "createdAt": TIME,
        "pinnedPost": {"uri": URI, "cid": CID},
    },
    {"$type": "app.bsky.feed.like", "subject": {"uri": URI, "cid": CID}, "createdAt": TIME},
    {"$type": "app.bsky.graph.follow", "subject": "did:plc:hostilehostilehostilehos", "createdAt": TIME},
    {"$type": "app.bsky.graph.list", "purpose": "app.bsky.graph.defs#curatelist", "name": "list", "createdAt": TIME},
    {
        "$type": "app.bsky.feed.threadgate",
        "post": URI,
        "allow": [{"$type": "app.bsky.feed.threadgate#mentionRule"}],
        "createdAt": TIME,
    },
]


def test_samples_are_valid() -> None:
    for rec in SAMPLES:
        LEX.validate_record(rec["$type"], rec)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _deep(depth: int, leaf: Any = "x", as_map: bool = False) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"k": value} if as_map else [value]
    return value


_HOSTILE_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    -(2**63) - 1,
    2**200,
    1.5,
    float("nan"),
    float("inf"),
    "",
    "\x00",
    "a\x00b",
    "\ud800",  # a lone surrogate (never valid UTF-8)
    "\udfff\ud800",
    "'; DROP TABLE record; --",
    "x" * 1_000_000,
    "é" * 300_000,
    "👨‍👩‍👧‍👦" * 10_000,
    "\u0301" * 100_000,  # combining marks only: one huge grapheme
    b"bytes",
    [],
    [None] * 100_000,
    list(range(100_000)),
    {},
    {"$link": "not a cid"},
    {"$link": CID, "extra": 1},
    {"$link": 5},
    {"$bytes": "!!!"},
    {"$bytes": "AAEC", "x": 1},
    {"$type": ""},
    {"$type": 5},
    {"$type": "blob"},
    {"$type": "blob", "ref": {"$link": CID}, "mimeType": "", "size": -1},
    {"$type": "app.bsky.feed.post"},
    {"$type": "app.bsky.embed.record", "record": {"$type": "app.bsky.embed.record"}},
    {"cid": CID, "mimeType": "image/png"},
    {5: "non-string key"},
    {"k" * 100_000: 1},
    _deep(200),
    _deep(100_000),
    _deep(200, as_map=True),
    _deep(100_000, as_map=True),
    {"uri": "at://" + "a" * 100_000, "cid": CID},
    object(),
]


def _check(collection: str, value: Any, rkey: str | None = None) -> None:
    for lex in (LEX, LENIENT):
        try:
            lex.validate_record(collection, value, rkey)
        except ValidationError as e:
            assert len(str(e)) <= MAX_MESSAGE, str(e)[:200]


@hostile(1500)
@given(
    st.integers(0, len(SAMPLES) - 1),
    st.data(),
    st.sampled_from(range(len(_HOSTILE_VALUES))),
)
def test_any_path_replaced_by_hostile_value(sample: int, data: st.DataObject, which: int) -> None:
    rec = copy.deepcopy(SAMPLES[sample])
    path = data.draw(st.sampled_from(_paths(rec)))
    value = _HOSTILE_VALUES[which]
    if not path:
        _check(rec["$type"], value)
        return
    target: Any = rec
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    _check(SAMPLES[sample]["$type"], rec)


@hostile(600)
@given(st.integers(0, len(SAMPLES) - 1), st.data(), st.sampled_from(range(len(_HOSTILE_VALUES))), st.text(max_size=20))
def test_hostile_extra_keys_anywhere(sample: int, data: st.DataObject, which: int, key: str) -> None:
    rec = copy.deepcopy(SAMPLES[sample])
    maps = [p for p in _paths(rec) if isinstance(_get(rec, p), dict)]
    target = _get(rec, data.draw(st.sampled_from(maps)))
    target[key] = _HOSTILE_VALUES[which]
    _check(SAMPLES[sample]["$type"], rec)


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40,
)


@hostile(1500)
@given(st.sampled_from([*LEX.record_types(), "com.example.unknown", ""]), _json, st.none() | st.text(max_size=20))
def test_arbitrary_json_for_every_record_type(collection: str, value: Any, rkey: str | None) -> None:
    _check(collection, value, rkey)
    if isinstance(value, dict):
        _check(collection, {**value, "$type": collection}, rkey)


@hostile(400)
@given(st.sampled_from(LEX.record_types()), st.text(max_size=2000))
def test_hostile_record_keys(collection: str, rkey: str) -> None:
    rec = next((r for r in SAMPLES if r["$type"] == collection), {"$type": collection})
    _check(collection, rec, rkey)


def test_huge_keys_do_not_make_huge_messages() -> None:
    rec = {**SAMPLES[0], "k" * 100_000: {"y" * 100_000: [1.5]}}
    with pytest.raises(ValidationError) as info:
        LEX.validate_record("app.bsky.feed.post", rec)
    assert len(str(info.value)) <= MAX_MESSAGE
    assert info.value.path[1] == "k" * 100_000  # the full path stays available to code


@pytest.mark.parametrize("value", [_deep(129), _deep(129, as_map=True), _deep(10**5), _deep(10**5, as_map=True)])
def test_deep_nesting_is_a_validation_error(value: Any) -> None:
    rec = {**SAMPLES[0], "unknownField": value}
    with pytest.raises(ValidationError, match="nested deeper"):
        LEX.validate_record("app.bsky.feed.post", rec)


@hostile(600)
@given(st.integers(0, len(SAMPLES) - 1), st.binary(min_size=1, max_size=40), st.integers(0, 10_000))
def test_records_as_cbor_with_invalid_utf8(sample: int, garbage: bytes, where: int) -> None:
    """Raw text bytes spliced into a record's CBOR: the decoder refuses invalid UTF-8, so
    validation only ever sees proper strings."""
    block = cbor.encode_lex(SAMPLES[sample])
    text = b"hello" if b"hello" in block else b"2024"
    pos = block.find(text)
    patched = block[:pos] + garbage[: len(text)].ljust(len(text), b"\xff") + block[pos + len(text) :]
    try:
        value = cbor.decode_lex(patched)
    except cbor.DecodeError:
        return
    _check(SAMPLES[sample]["$type"], value)
