"""Hostile Redis stream entries and hostile configuration values.

Stream entries: any field map (str or bytes names, any bytes) parses into an event or raises
:class:`MalformedMessage` with a short code; text members that reach the database carry no
NUL; SQL metacharacters come through byte-for-byte (storage uses bound parameters, so they
are plain text). On real Redis: a stream mixing malformed and valid entries, read through
the consumer group, gets its malformed entries dead-lettered with their reason and the
original bytes, and every valid entry through.

Configuration: any value of any variable gives the typed value or a :class:`ConfigError`
whose message starts with the variable's name; service configs built from hostile
environments fail the same way, never with another exception.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.backfiller.config import BackfillerConfig
from psky.config import ConfigError, env_bool, env_float, env_int, env_list, env_str
from psky.ingester.config import IngesterConfig
from psky.streams import StreamConsumer
from psky.streams._redis import connect
from psky.streams.wire import (
    AccountEvent,
    DeleteEvent,
    IdentityEvent,
    MalformedMessage,
    RecordEvent,
    StreamEvent,
    encode_event,
    parse_backfill_request,
    parse_dead_letter,
    parse_label_entry,
    parse_stream_event,
)

HOSTILE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def hostile(max_examples: int) -> settings:
    """CI size by default; ``PSKY_HOSTILE_SCALE=N`` multiplies every budget for long runs."""
    return settings(HOSTILE, max_examples=max_examples * int(os.environ.get("PSKY_HOSTILE_SCALE", "1")))


DID = "did:plc:hostilehostilehostilehos"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
TIME = "2024-05-01T12:00:00.123Z"

VALID: list[dict[str, Any]] = [
    {"type": "create", "seq": 5, "time": TIME, "did": DID, "commit": CID, "rev": "3kzzzzzzzzzz2",
     "collection": "app.bsky.feed.post", "rkey": "3kzzzzzzzzzz2", "cid": CID,
     "record": {"$type": "app.bsky.feed.post", "text": "hi", "createdAt": TIME}},
    {"type": "update", "seq": -2, "time": TIME, "did": DID, "commit": CID, "rev": "3kzzzzzzzzzz2",
     "collection": "app.bsky.actor.profile", "rkey": "self", "cid": CID, "record": {"$type": "app.bsky.actor.profile"}},
    {"type": "delete", "seq": 6, "time": TIME, "did": DID, "commit": CID, "rev": "3kzzzzzzzzzz2",
     "collection": "app.bsky.feed.like", "rkey": "abc"},
    {"type": "repo", "time": TIME, "did": DID, "commit": CID, "rev": "3kzzzzzzzzzz2"},
    {"type": "account", "seq": 7, "time": TIME, "did": DID, "active": False, "status": "takendown"},
    {"type": "identity", "seq": 8, "time": TIME, "did": DID, "handle": "alice.test"},
]  # fmt: skip

SQL = [
    "'; DROP TABLE post; --",
    "\" OR \"1\"=\"1",
    "1); DELETE FROM actor WHERE (1=1",
    "$1 $$ $tag$ E'\\\\x00'",
    "%s %(x)s ?",
    "\\'",
    "/* */ -- ",
    "\u2019; DROP TABLE record;",
]
NASTY: list[Any] = [
    *SQL,
    "",
    "\x00",
    "a\x00b",
    "\x1b[2J",
    "\u202e",
    "x" * 100_000,
    " " * 3000,
    None,
    0,
    -1,
    2**63,
    2**64 - 1,
    1.5,
    True,
    [],
    {},
    ["did:plc:x"],
    {"$link": CID},
]


def _names(obj: dict[str, Any]) -> list[str]:
    return [k for k in obj if k != "type"]


def _check_event(event: StreamEvent) -> None:
    """What a parsed event guarantees downstream."""
    for name in ("time", "did", "commit", "rev", "collection", "rkey", "cid", "status", "handle"):
        value = getattr(event, name, None)
        if value is not None:
            assert type(value) is str and "\x00" not in value and len(value) <= 8192, name
    if isinstance(event, (RecordEvent, DeleteEvent, AccountEvent, IdentityEvent)):
        assert -(2**63) <= event.seq < 2**63
    if isinstance(event, RecordEvent):
        assert type(event.record) is dict
    # a parsed event re-encodes, and reads back as itself
    assert parse_stream_event({"event": encode_event(event)}) == event


def _parse(fields: Any) -> StreamEvent | None:
    try:
        event = parse_stream_event(fields)
    except MalformedMessage as e:
        assert e.code and len(e.code) <= 64 and " " not in e.code
        assert len(str(e)) <= 1000
        return None
    _check_event(event)
    return event


@hostile(800)
@given(st.integers(0, len(VALID) - 1), st.data(), st.sampled_from(range(len(NASTY))), st.booleans())
def test_every_member_replaced_or_dropped(which: int, data: st.DataObject, nasty: int, drop: bool) -> None:
    obj = dict(VALID[which])
    name = data.draw(st.sampled_from(_names(obj)))
    if drop:
        del obj[name]
    else:
        obj[name] = NASTY[nasty]
    event = _parse({"event": orjson.dumps(obj)})
    if event is not None and not drop and isinstance(NASTY[nasty], str) and name not in ("handle",):
        # whatever text a field kept, it kept unchanged: SQL metacharacters are just text
        assert getattr(event, name, NASTY[nasty]) == NASTY[nasty] or name == "record"


@hostile(300)
@given(st.integers(0, len(VALID) - 1), st.sampled_from(SQL))
def test_sql_metacharacters_in_free_text_survive_unchanged(which: int, sql: str) -> None:
    obj = dict(VALID[which])
    for name in ("status", "handle", "rev"):
        if name in obj:
            obj[name] = sql
    if "record" in obj:
        obj["record"] = {**obj["record"], "text": sql, sql: sql}
    event = _parse({"event": orjson.dumps(obj)})
    assert event is not None
    for name in ("status", "handle", "rev"):
        if name in obj:
            assert getattr(event, name) == sql
    if isinstance(event, RecordEvent):
        assert event.record["text"] == sql and event.record[sql] == sql


_field_names = st.sampled_from(["event", b"event", "repo", b"repo", "labels", "x", ""])
_field_values = st.binary(max_size=200) | st.text(max_size=200) | st.sampled_from(
    [b"{}", b"[]", b"null", b'"event"', b"[" * 2000 + b"]" * 2000, b'{"type":"create"}', b'"\\ud800"', b"\xff\xfe", b"1e999999"]
)


@hostile(1000)
@given(st.dictionaries(_field_names, _field_values, max_size=4))
def test_random_entries_only_malformed_message(fields: dict[Any, Any]) -> None:
    _parse(fields)
    for parse in (parse_backfill_request, parse_label_entry):
        try:
            parse(fields)
        except MalformedMessage:
            pass
    parse_dead_letter({k: v for k, v in fields.items() if isinstance(v, (bytes, str))})


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)


@hostile(800)
@given(
    st.sampled_from(["create", "update", "delete", "repo", "account", "identity", "label", "", "CREATE"]),
    st.dictionaries(
        st.sampled_from(["seq", "time", "did", "commit", "rev", "collection", "rkey", "cid", "record",
                         "active", "status", "handle", "host", "label", "labels", "sig"]),
        _json | st.sampled_from(NASTY),
        max_size=12,
    ),
)  # fmt: skip
def test_structured_entries_with_wrong_types(kind: str, members: dict[str, Any]) -> None:
    obj = {"type": kind, **members}
    try:
        raw = orjson.dumps(obj)
    except TypeError:
        return  # not JSON (integers beyond 64 bits): no producer can write it
    _parse({"event": raw})
    for parse, fields in (
        (parse_backfill_request, {"repo": raw}),
        (parse_label_entry, {"event": raw}),
        (parse_label_entry, {"labels": orjson.dumps({"seq": 1, "labels": [members.get("label"), members]})}),
    ):
        try:
            parse(fields)
        except MalformedMessage:
            pass


def test_nul_in_stored_text_is_refused_or_dropped() -> None:
    base = dict(VALID[4])
    with pytest.raises(MalformedMessage) as info:
        parse_stream_event({"event": orjson.dumps({**base, "status": "taken\x00down"})})
    assert info.value.code == "bad_status"
    with pytest.raises(MalformedMessage):
        parse_stream_event({"event": orjson.dumps({**VALID[3], "rev": "3k\x00"})})
    with pytest.raises(MalformedMessage):
        parse_backfill_request({"repo": orjson.dumps({"did": DID, "host": "h", "rev": "a\x00"})})
    identity = parse_stream_event({"event": orjson.dumps({**VALID[5], "handle": "alice\x00.test"})})
    assert isinstance(identity, IdentityEvent) and identity.handle is None  # a hint, dropped


# --- real Redis: malformed entries are dead-lettered with their reason, the rest go through ---


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = connect(redis_url)
    yield r
    await r.aclose()


async def test_malformed_entries_dead_lettered_valid_ones_delivered(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    stream = f"{redis_prefix}firehose_live"
    dlq = f"{stream}_dlq"
    entries: list[tuple[dict[Any, Any], bool]] = []
    for i, obj in enumerate(VALID * 3):
        entries.append(({"event": orjson.dumps(obj)}, True))
        bad: list[dict[Any, Any]] = [
            {"event": b"\xff\xfe not json"},
            {"event": orjson.dumps({**obj, "did": SQL[i % len(SQL)]})},
            {"event": b"[" * 5000},
            {"event": orjson.dumps({**obj, "type": "create", "record": "x" * 100_000})},
            {"other": b"\x00\x01"},
            {"event": orjson.dumps({**obj, "time": "a\x00"})},
        ]
        entries.append((bad[i % len(bad)], False))
    ids = []
    for fields, _ in entries:
        ids.append(await client.xadd(stream, fields))
    consumer = StreamConsumer(client, [stream], "g", "c", batch_size=7, block_ms=20)
    good: list[StreamEvent] = []
    reasons: dict[str, str] = {}
    while len(good) + len(reasons) < len(entries):
        batch = await consumer.read()
        assert batch, "the consumer stopped delivering"
        for message in batch:
            try:
                good.append(parse_stream_event(message.fields))
            except MalformedMessage as e:
                reasons[message.id] = f"malformed:{e.code}: {e}"
                await consumer.dead_letter([message], reasons[message.id])
            else:
                await consumer.ack([message])
    assert [e.type for e in good] == [v["type"] for v in VALID * 3]
    assert await client.xlen(stream) == 0
    assert (await client.xpending(stream, "g"))["pending"] == 0
    letters = await client.xrange(dlq)
    assert len(letters) == sum(1 for _, ok in entries if not ok)
    by_id = {
        (i.decode() if isinstance(i, bytes) else i): fields for i, (fields, _) in zip(ids, entries, strict=True)
    }
    for _, raw in letters:
        letter = parse_dead_letter(raw)
        assert letter.reason == reasons[letter.source_id] and letter.source_stream == stream
        assert letter.fields == by_id[letter.source_id]  # the original bytes, verbatim


# --- configuration -------------------------------------------------------------------------

_values = st.text(max_size=40) | st.sampled_from(
    ["nan", "NaN", "inf", "-inf", "1e999", "-1e999", "1" * 5000, "9" * 30, "-9" * 20, "0x10", "1_0", "_", "١٢٣",
     "true ", " FALSE", "yes\x00", "\x00", "1.5", "-0", "+7", "1e3", "  ", "'; DROP TABLE x; --"]
)  # fmt: skip


def _named(e: ConfigError, name: str) -> None:
    assert str(e).startswith(f"{name}: "), str(e)
    assert len(str(e)) <= 400


@hostile(1500)
@given(_values, st.integers(-5, 5) | st.none(), st.integers(5, 10**6) | st.none())
def test_env_helpers_typed_value_or_named_error(value: str, minimum: int | None, maximum: int | None) -> None:
    env = {"PSKY_X": value}
    try:
        n = env_int("PSKY_X", 1, env, minimum=minimum, maximum=maximum)
        assert type(n) is int and -(2**63) <= n < 2**63
        if value.strip():  # unset (empty) gives the default, unchecked
            assert (minimum is None or n >= minimum) and (maximum is None or n <= maximum)
    except ConfigError as e:
        _named(e, "PSKY_X")
    try:
        f = env_float("PSKY_X", 1.0, env, minimum=None if minimum is None else float(minimum))
        assert math.isfinite(f)
    except ConfigError as e:
        _named(e, "PSKY_X")
    try:
        assert type(env_bool("PSKY_X", False, env)) is bool
    except ConfigError as e:
        _named(e, "PSKY_X")
    try:
        env_str("PSKY_X", None, env, choices=["all", "firehose"])
    except ConfigError as e:
        _named(e, "PSKY_X")
    assert all(item and item == item.strip() for item in env_list("PSKY_X", (), env))


_INGESTER_VARS = [
    "REDIS_URL", "INGESTER_MODE", "INGESTER_VERIFY", "INGESTER_RELAY_HOSTS", "INGESTER_LABELER_HOSTS",
    "INGESTER_HIGH_WATER_MARK", "INGESTER_COLLECTIONS", "INGESTER_FIREHOSE_START_CURSOR", "INGESTER_BATCH_SIZE",
    "INGESTER_BATCH_TIMEOUT_MS", "INGESTER_METRICS_PORT", "INGESTER_IDLE_TIMEOUT_S", "INGESTER_RECONNECT_MIN_MS",
    "INGESTER_MAX_FRAME_BYTES", "INGESTER_REPOS_PAGE_SIZE", "INGESTER_REPOS_RECHECK_S", "LOG_LEVEL",
]  # fmt: skip
_BACKFILLER_VARS = [
    "BACKFILLER_CONSUMER", "BACKFILLER_RETRY_INITIAL_BACKOFF_MS", "BACKFILLER_RETRY_MAX_BACKOFF_MS",
    "BACKFILLER_CLAIM_IDLE_MS", "BACKFILLER_CONCURRENCY", "BACKFILLER_BATCH_SIZE", "BACKFILLER_HTTP_TIMEOUT_SECS",
    "BACKFILLER_MAX_RETRIES", "BACKFILLER_METRICS_PORT", "BACKFILLER_HIGH_WATER_MARK", "BACKFILLER_MAX_CAR_BYTES",
    "BACKFILLER_HOST_RATE", "BACKFILLER_ALLOW_HOSTS", "BACKFILLER_MAX_HOST_WAIT_SECS",
]  # fmt: skip


@hostile(600)
@given(st.dictionaries(st.sampled_from(_INGESTER_VARS), _values, max_size=6))
def test_ingester_config_from_hostile_env(env: dict[str, str]) -> None:
    try:
        IngesterConfig.from_env(env)
    except ConfigError as e:
        name = str(e).split(":", 1)[0]
        assert name in _INGESTER_VARS or name in ("INGESTER_HOSTS", "REDIS_HOST", "HIGH_WATER_MARK"), str(e)


@hostile(600)
@given(st.dictionaries(st.sampled_from(_BACKFILLER_VARS), _values, max_size=6))
def test_backfiller_config_from_hostile_env(env: dict[str, str]) -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:6379", "BACKFILLER_CONSUMER": "c", **env}
    try:
        BackfillerConfig.from_env(env)
    except ConfigError as e:
        name = str(e).split(":", 1)[0]
        assert name in _BACKFILLER_VARS or name == "REDIS_URL", str(e)
