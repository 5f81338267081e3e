"""psky.streams: the Redis wire format, StreamWriter, StreamConsumer, trimming, status.

The Redis tests use the session's server (embedded Redis 6.2 unless REDIS_URL is set, e.g.
``REDIS_URL=redis://127.0.0.1:6379/0`` for the system Redis 7) and a per-test key prefix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey
from psky.atproto.label import Label, sign_label
from psky.streams import (
    CURSOR_DONE,
    SEQ_BACKFILL,
    AccountEvent,
    BackfillRequest,
    DeadLetter,
    DeleteEvent,
    IdentityEvent,
    MalformedMessage,
    Message,
    RecordEvent,
    RepoEvent,
    StreamConsumer,
    StreamEvent,
    StreamWriter,
    backfill_fields,
    connect,
    cursor_key,
    dead_letter_fields,
    dlq_stream_for,
    encode_event,
    event_fields,
    label_fields,
    parse_backfill_request,
    parse_dead_letter,
    parse_event,
    parse_label_entry,
    parse_stream_event,
    producer,
    stream_info,
    trim_acknowledged,
)
from tests.paths import INTEROP

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
COMMIT = "bafyreihffx5a2e7k5uwrmmgofbvzujc5cmw5h4espouwuxt3liqoflx3ee"
REV = "3l3qo2vutsw2b"
TIME = "2024-09-10T12:00:00.000Z"


def create(**kw: Any) -> RecordEvent:
    fields: dict[str, Any] = {
        "type": "create", "seq": 42, "time": TIME, "did": DID, "commit": COMMIT, "rev": REV,
        "collection": "app.bsky.feed.post", "rkey": REV, "cid": CID,
        "record": {"$type": "app.bsky.feed.post", "text": "hi", "createdAt": TIME},
    }  # fmt: skip
    fields.update(kw)
    return RecordEvent(**fields)


def create_json(**kw: Any) -> dict[str, Any]:
    return orjson.loads(encode_event(create())) | kw  # type: ignore[no-any-return]


def _syntax_lines(name: str) -> list[str]:
    text = (INTEROP / "syntax" / name).read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# --- wire format: events ---------------------------------------------------------------

EVENTS: list[StreamEvent] = [
    create(),
    create(type="update", seq=2**63 - 1),
    create(seq=SEQ_BACKFILL),
    DeleteEvent(
        seq=7, time=TIME, did=DID, commit=COMMIT, rev=REV, collection="app.bsky.feed.like", rkey="self"
    ),
    RepoEvent(time=TIME, did=DID, commit=COMMIT, rev=REV),
    AccountEvent(seq=8, time=TIME, did=DID, active=False, status="takendown"),
    AccountEvent(seq=9, time=TIME, did=DID, active=True),
    IdentityEvent(seq=10, time=TIME, did=DID, handle="alice.example.com"),
    IdentityEvent(seq=11, time=TIME, did=DID),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.type}")
def test_event_round_trip(event: StreamEvent) -> None:
    fields = event_fields(event)
    assert list(fields) == ["event"]
    assert parse_stream_event(fields) == event
    assert parse_event(fields["event"].decode()) == event


def test_event_json_is_the_typescript_shape() -> None:
    """Exact members per kind; optional ones omitted, never null."""
    assert json.loads(encode_event(create())) == {
        "type": "create", "seq": 42, "time": TIME, "did": DID, "commit": COMMIT, "rev": REV,
        "collection": "app.bsky.feed.post", "rkey": REV, "cid": CID,
        "record": {"$type": "app.bsky.feed.post", "text": "hi", "createdAt": TIME},
    }  # fmt: skip
    assert json.loads(encode_event(EVENTS[3])) == {
        "type": "delete", "seq": 7, "time": TIME, "did": DID, "commit": COMMIT, "rev": REV,
        "collection": "app.bsky.feed.like", "rkey": "self",
    }  # fmt: skip
    assert json.loads(encode_event(EVENTS[4])) == {
        "type": "repo", "time": TIME, "did": DID, "commit": COMMIT, "rev": REV,
    }  # fmt: skip
    assert json.loads(encode_event(EVENTS[6])) == {
        "type": "account",
        "seq": 9,
        "time": TIME,
        "did": DID,
        "active": True,
    }
    assert json.loads(encode_event(EVENTS[8])) == {"type": "identity", "seq": 11, "time": TIME, "did": DID}


def test_event_properties() -> None:
    assert create().uri == f"at://{DID}/app.bsky.feed.post/{REV}"
    assert create(seq=SEQ_BACKFILL).is_backfill and create(seq=-1).is_backfill and not create().is_backfill


_DATA_MODEL = json.loads((INTEROP / "data-model" / "data-model-fixtures.json").read_text())


@pytest.mark.parametrize("fixture", _DATA_MODEL, ids=lambda f: f["cid"][-8:])
def test_records_of_every_data_model_fixture(fixture: dict[str, Any]) -> None:
    """A record given in lex JSON or in IPLD form (CIDs, bytes) is written as the same lex JSON."""
    lex = fixture["json"]
    ipld = cbor.decode(base64.b64decode(fixture["cbor_base64"] + "=" * (-len(fixture["cbor_base64"]) % 4)))
    from_lex = parse_event(encode_event(create(record=lex)))
    from_ipld = parse_event(encode_event(create(record=ipld)))
    assert isinstance(from_lex, RecordEvent) and from_lex.record == lex
    assert isinstance(from_ipld, RecordEvent) and from_ipld.record == lex


def test_encode_rejects_unencodable_values() -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode_event(create(record={"x": object()}))
    with pytest.raises(ValueError, match="cannot encode"):
        encode_event(create(record={"x": 2**70}))


@pytest.mark.parametrize("value", _syntax_lines("did_syntax_valid.txt"))
def test_valid_dids_accepted(value: str) -> None:
    assert parse_event(orjson.dumps(create_json(did=value))).did == value


@pytest.mark.parametrize("value", _syntax_lines("did_syntax_invalid.txt"))
def test_invalid_dids_rejected(value: str) -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_event(orjson.dumps(create_json(did=value)))
    assert err.value.code == "bad_did"


@pytest.mark.parametrize("value", _syntax_lines("nsid_syntax_valid.txt"))
def test_valid_collections_accepted(value: str) -> None:
    parsed = parse_event(orjson.dumps(create_json(collection=value)))
    assert isinstance(parsed, RecordEvent) and parsed.collection == value


@pytest.mark.parametrize("value", _syntax_lines("nsid_syntax_invalid.txt"))
def test_invalid_collections_rejected(value: str) -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_event(orjson.dumps(create_json(collection=value)))
    assert err.value.code == "bad_collection"


@pytest.mark.parametrize("value", _syntax_lines("recordkey_syntax_valid.txt"))
def test_valid_rkeys_accepted(value: str) -> None:
    parsed = parse_event(orjson.dumps(create_json(type="delete", rkey=value)))
    assert isinstance(parsed, DeleteEvent) and parsed.rkey == value


@pytest.mark.parametrize("value", _syntax_lines("recordkey_syntax_invalid.txt"))
def test_invalid_rkeys_rejected(value: str) -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_event(orjson.dumps(create_json(rkey=value)))
    assert err.value.code == "bad_rkey"


@pytest.mark.parametrize("value", _syntax_lines("cid_syntax_valid.txt"))
def test_valid_cids_accepted(value: str) -> None:
    parsed = parse_event(orjson.dumps(create_json(cid=value, commit=value)))
    assert isinstance(parsed, RecordEvent) and parsed.cid == value == parsed.commit


@pytest.mark.parametrize("value", _syntax_lines("cid_syntax_invalid.txt"))
@pytest.mark.parametrize("member", ["cid", "commit"])
def test_invalid_cids_rejected(value: str, member: str) -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_event(orjson.dumps(create_json(**{member: value})))
    assert err.value.code == f"bad_{member}"


MALFORMED: list[tuple[Any, str]] = [
    (b"{", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b'"\\ud800"', "bad_json"),  # lone surrogate
    (b"[" * 5000 + b"]" * 5000, "bad_json"),  # nesting beyond the JSON parser's limit
    (b"[]", "not_object"),
    (b"null", "not_object"),
    (b'{"type":"commit"}', "unknown_type"),
    (b'{"type":7}', "unknown_type"),
    (b"{}", "unknown_type"),
    (create_json(seq="42"), "bad_seq"),
    (create_json(seq=True), "bad_seq"),
    (create_json(seq=2**63), "bad_seq"),
    (create_json(seq=1.5), "bad_seq"),
    (create_json(time="yesterday"), "bad_time"),
    (create_json(time=None), "missing_time"),
    (create_json(did="did:plc:\u0000x"), "bad_did"),
    (create_json(rev=""), "bad_rev"),
    (create_json(rev=5), "bad_rev"),
    (create_json(rev="x" * 3000), "bad_rev"),
    (create_json(record=None), "missing_record"),
    (create_json(record=[1]), "bad_record"),
    (create_json(record="x"), "bad_record"),
    ({"type": "account", "seq": 1, "time": TIME, "did": DID}, "bad_active"),
    ({"type": "account", "seq": 1, "time": TIME, "did": DID, "active": "yes"}, "bad_active"),
    ({"type": "account", "seq": 1, "time": TIME, "did": DID, "active": True, "status": 3}, "bad_status"),
    ({"type": "account", "time": TIME, "did": DID, "active": True}, "bad_seq"),
    ({"type": "identity", "seq": 1, "time": TIME, "did": DID, "handle": ["a"]}, "bad_handle"),
    ({"type": "identity", "seq": 1, "time": TIME}, "missing_did"),
    ({"type": "repo", "time": TIME, "did": DID, "rev": REV}, "missing_commit"),
]


@pytest.mark.parametrize(("data", "code"), MALFORMED, ids=[code for _, code in MALFORMED])
def test_malformed_events(data: Any, code: str) -> None:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    with pytest.raises(MalformedMessage) as err:
        parse_stream_event({"event": raw})
    assert err.value.code == code
    assert isinstance(err.value, ValueError) and str(err.value)


def test_missing_event_field() -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_stream_event({"repo": b"{}"})
    assert err.value.code == "missing_event_field" and "repo" in str(err.value)


def test_missing_seq_on_an_operation_reads_as_backfill() -> None:
    obj = create_json()
    del obj["seq"]
    assert parse_event(orjson.dumps(obj)) == create(seq=SEQ_BACKFILL)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(
        [create_json(), create_json(type="delete"), {"type": "account"}, {"type": "identity"}]
    ),
    patch=st.dictionaries(
        st.sampled_from(
            [
                "type",
                "seq",
                "time",
                "did",
                "commit",
                "rev",
                "collection",
                "rkey",
                "cid",
                "record",
                "active",
                "status",
                "handle",
            ]
        ),
        json_values,
        max_size=4,
    ),
)
def test_parse_never_fails_other_than_malformed(base: dict[str, Any], patch: dict[str, Any]) -> None:
    try:
        event = parse_event(orjson.dumps(base | patch))
    except MalformedMessage:
        return
    assert parse_event(encode_event(event)) == event


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    for parse in (parse_stream_event, parse_backfill_request, parse_label_entry):
        try:
            parse({"event": data, "repo": data})
        except MalformedMessage:
            pass


# --- wire format: backfill requests, labels, cursors, dead letters ---------------------


def test_backfill_request_round_trip() -> None:
    full = BackfillRequest(did=DID, host="https://relay.example", rev=REV, status="deactivated", active=False)
    assert parse_backfill_request(backfill_fields(full)) == full
    assert json.loads(backfill_fields(full)["repo"]) == {
        "did": DID, "host": "https://relay.example", "rev": REV, "status": "deactivated", "active": False,
    }  # fmt: skip
    bare = BackfillRequest(did=DID, host="https://relay.example", rev=REV)
    assert json.loads(backfill_fields(bare)["repo"]) == {
        "did": DID,
        "host": "https://relay.example",
        "rev": REV,
    }
    assert parse_backfill_request({"repo": orjson.dumps({"did": DID})}) == BackfillRequest(did=DID, host="")


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"host": "h"}, "missing_did"),
        ({"did": "nope", "host": "h"}, "bad_did"),
        ({"did": DID, "host": "https://a b"}, "bad_host"),
        ({"did": DID, "host": 5}, "bad_host"),
        ({"did": DID, "host": "h", "rev": 1}, "bad_rev"),
        ({"did": DID, "host": "h", "active": "true"}, "bad_active"),
        ({"did": DID, "host": "h", "status": False}, "bad_status"),
        ([DID], "not_object"),
    ],
)
def test_malformed_backfill_requests(obj: Any, code: str) -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_backfill_request({"repo": orjson.dumps(obj)})
    assert err.value.code == code
    with pytest.raises(MalformedMessage, match="no 'repo' field"):
        parse_backfill_request({"event": b"{}"})


SIGNER = PrivateKey.generate("k256")
LABEL = sign_label(
    Label(src=DID, uri=f"at://{DID}/app.bsky.feed.post/{REV}", cid=CID, val="spam", cts=TIME), SIGNER
)


def test_label_round_trip() -> None:
    fields = label_fields(LABEL)
    obj = json.loads(fields["event"])
    assert obj["type"] == "label" and obj["label"]["sig"] == {
        "$bytes": cbor.b64encode_unpadded(LABEL.sig or b"")
    }
    (parsed,) = parse_label_entry(fields)
    assert parsed == LABEL and parsed.verify(SIGNER.public_key())


def test_label_written_by_the_typescript_ingester() -> None:
    """JSON.stringify of a Uint8Array signature: {"0": b0, "1": b1, …}."""
    lex = LABEL.to_lex()
    lex["sig"] = {str(i): b for i, b in enumerate(LABEL.sig or b"")}
    (parsed,) = parse_label_entry({"event": orjson.dumps({"type": "label", "label": lex})})
    assert parsed == LABEL and parsed.verify(SIGNER.public_key())


def test_labels_written_by_rsky() -> None:
    unsigned = {"src": DID, "uri": DID, "cid": None, "val": "!hide", "neg": None, "cts": TIME}
    entry = {"labels": orjson.dumps({"seq": 5, "labels": [unsigned, unsigned | {"neg": True}]})}
    first, second = parse_label_entry(entry)
    assert (first.val, first.neg, second.neg, first.cid) == ("!hide", False, True, None)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"event": orjson.dumps({"type": "label", "label": {"src": "x"}})}, "bad_label"),
        ({"event": orjson.dumps({"type": "label", "label": None})}, "bad_label"),
        (
            {"event": orjson.dumps({"type": "label", "label": LABEL.to_lex() | {"sig": {"0": 300}}})},
            "bad_label",
        ),
        ({"event": orjson.dumps({"type": "create"})}, "unknown_type"),
        ({"event": b"[1]"}, "unknown_type"),
        ({"labels": b'{"seq": 1}'}, "bad_labels"),
        ({"other": b"{}"}, "missing_event_field"),
    ],
)
def test_malformed_label_entries(fields: dict[str, bytes], code: str) -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_label_entry(fields)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("https://bsky.network", "firehose_live:cursor:bsky.network"),
        ("http://localhost:2470", "firehose_live:cursor:localhost:2470"),
        ("wss://relay.example", "firehose_live:cursor:relay.example"),
        ("relay.example", "firehose_live:cursor:relay.example"),
    ],
)
def test_cursor_key(host: str, key: str) -> None:
    assert cursor_key("firehose_live", host) == key
    assert CURSOR_DONE == "!ingester-done"


def test_dead_letter_round_trip() -> None:
    letter = DeadLetter(
        source_stream="firehose_live", source_id="1-2", group="firehose_group", consumer="c1",
        reason="poison", attempts=6,
        fields={"event": b"{}", "reason": b"original reason field", "orig:x": b"y"},
    )  # fmt: skip
    fields = dead_letter_fields(letter)
    assert fields["event"] == b"{}" and fields["orig:reason"] == b"original reason field"
    assert fields["reason"] == "poison" and fields["attempts"] == "6" and fields["source_id"] == "1-2"
    wire = {k: v.encode() if isinstance(v, str) else v for k, v in fields.items()}
    assert parse_dead_letter(wire) == letter
    rsky = parse_dead_letter({"repo": b'{"did":"x"}', "reason": b"max_retries_exceeded", "attempts": b"3"})
    assert (rsky.reason, rsky.attempts, rsky.fields) == ("max_retries_exceeded", 3, {"repo": b'{"did":"x"}'})
    assert dlq_stream_for("repo_backfill") == "repo_backfill_dlq"


# --- Redis: fixtures and helpers --------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = connect(redis_url)
    yield r
    await r.aclose()


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll *check* until true; a hang guard, not a timing assertion."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def redis_major(client: aioredis.Redis) -> int:
    return int(str((await client.info("server"))["redis_version"]).split(".")[0])


async def add_events(client: aioredis.Redis, stream: str, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        ids.append(text(await client.xadd(stream, event_fields(create(seq=i)))))  # type: ignore[arg-type]
    return ids


async def entries(client: aioredis.Redis, stream: str) -> list[tuple[str, dict[str, bytes]]]:
    """XRANGE - + as (id, {name: value}) with str ids and names."""
    rows: Any = await client.xrange(stream)
    return [(text(entry_id), {text(k): v for k, v in fields.items()}) for entry_id, fields in rows]


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def seqs(messages: list[Message]) -> list[int]:
    return [parse_stream_event(m.fields).seq for m in messages]  # type: ignore[union-attr]


async def drain(consumer: StreamConsumer, *, until: int, within: float = 10.0) -> list[Message]:
    """Read and ack until *until* messages were seen."""
    seen: list[Message] = []
    deadline = time.monotonic() + within
    while len(seen) < until:
        assert time.monotonic() < deadline, f"only {len(seen)} of {until} messages arrived"
        batch = await consumer.read()
        seen += batch
        await consumer.ack(batch)
    return seen


# --- Redis: producer --------------------------------------------------------------------


async def test_writer_batches_and_cursor_follows_events(client: aioredis.Redis, redis_prefix: str) -> None:
    stream, key = f"{redis_prefix}firehose_live", cursor_key(f"{redis_prefix}firehose_live", "https://relay")
    writer = StreamWriter(client, stream, batch_size=3, high_water_mark=None)
    await writer.add(event_fields(create(seq=1)))
    await writer.add(event_fields(create(seq=2)))
    writer.set_cursor_after(key, 2)
    assert await client.get(key) is None and await client.xlen(stream) == 0  # nothing written yet
    await writer.add(event_fields(create(seq=3)))  # batch full: events 1-3, then the cursor
    assert await client.get(key) == b"2" and await client.xlen(stream) == 3
    writer.set_cursor_after(key, 3)  # cursor-only flush
    await writer.flush()
    assert await client.get(key) == b"3"
    assert [parse_stream_event(f).seq for _, f in await entries(client, stream)] == [1, 2, 3]  # type: ignore[union-attr]
    assert writer.stats.written == 3 and writer.stats.cursors_written == 2 and writer.buffered == 0


async def test_cursor_not_written_when_an_event_fails(client: aioredis.Redis, redis_prefix: str) -> None:
    """The script stops at the failing XADD: the cursor stays behind; the batch stays buffered."""
    stream, broken, key = f"{redis_prefix}s", f"{redis_prefix}not-a-stream", f"{redis_prefix}s:cursor:h"
    await client.set(broken, "string value")
    writer = StreamWriter(client, stream, batch_size=10, high_water_mark=None)
    await writer.add({"event": b"1"})
    await writer.add({"event": b"2"}, stream=broken)
    writer.set_cursor_after(key, "7")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await writer.flush()
    assert await client.get(key) is None
    assert writer.buffered == 2
    await client.delete(broken)
    await writer.flush()  # retried as a whole: the first event again (duplicates are allowed)
    assert await client.get(key) == b"7" and await client.xlen(broken) == 1 and await client.xlen(stream) == 2


async def test_single_field_batches_keep_the_cursor_behind_a_failure(client: aioredis.Redis, redis_prefix: str) -> None:
    """The leaner script (every entry with one field) has the same guarantee: a failing XADD
    stops it before the cursor SET."""
    stream, key = f"{redis_prefix}s", f"{redis_prefix}s:cursor:h"
    await client.set(stream, "string value")
    writer = StreamWriter(client, stream, batch_size=10, high_water_mark=None)
    await writer.add_many([{"event": b"1"}, {"event": "2"}, {"event": 3}])
    assert writer._script_arguments(writer._buffer, {})[0] is producer._RUNS_SCRIPT
    writer.set_cursor_after(key, "9")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await writer.flush()
    assert await client.get(key) is None and writer.buffered == 3
    await client.delete(stream)
    await writer.flush()
    assert await client.get(key) == b"9"
    assert [f for _, f in await client.xrange(stream)] == [{b"event": b"1"}, {b"event": b"2"}, {b"event": b"3"}]


async def test_add_many_nowait_adds_only_when_add_many_would_not_await(
        client: aioredis.Redis, redis_prefix: str) -> None:
    """The hot path's synchronous add: it takes entries while the batch stays short of full,
    refuses (adding nothing) when they would fill it, and what it took is written in order."""
    stream = f"{redis_prefix}nowait"
    writer = StreamWriter(client, stream, batch_size=4, high_water_mark=None)
    assert writer.add_many_nowait([{"event": b"1"}, {"event": b"2"}])
    assert writer.add_many_nowait([{"event": b"3"}], stream=f"{redis_prefix}other")
    assert writer.buffered == 3 and writer._first_at is not None
    assert not writer.add_many_nowait([{"event": b"4"}])  # would fill the batch: add_many's job
    assert not writer.add_many_nowait([{"event": b"4"}, {"event": b"5"}, {"event": b"6"}])
    assert writer.buffered == 3
    await writer.add_many([{"event": b"4"}])  # fills the batch: written
    await writer.flush()
    assert [f for _, f in await client.xrange(stream)] == [{b"event": v} for v in (b"1", b"2", b"4")]
    assert [f for _, f in await client.xrange(f"{redis_prefix}other")] == [{b"event": b"3"}]


@pytest.mark.parametrize(
    ("entries", "runs"),
    [
        ([({"event": b"1"}, None), ({"other": b"2"}, None)], True),  # two field names: two runs
        ([({"event": b"1", "extra": b"x"}, None), ({"event": b"2"}, None)], False),  # two fields
        ([({"event": b"1"}, None), ({"event": b"2"}, "elsewhere"), ({"event": b"3"}, None),
          ({"request": b"4"}, "elsewhere"), ({"event": b"5"}, None)], True),  # streams interleaved
        ([({"event": b"1"}, "elsewhere"), ({"event": b"2"}, None)], True),  # another stream first
    ],
)
async def test_batches_take_the_script_their_entries_allow(
    client: aioredis.Redis, redis_prefix: str, entries: list[tuple[dict[str, bytes], str | None]], runs: bool
) -> None:
    """Single-field entries (any streams and names) take the runs script, others the general
    one; either writes every entry, in order within each stream, and then the cursor."""
    stream, key = f"{redis_prefix}s", f"{redis_prefix}s:cursor:h"
    writer = StreamWriter(client, stream, batch_size=10, high_water_mark=None)
    for fields, other in entries:
        await writer.add(fields, stream=f"{redis_prefix}{other}" if other else None)
    writer.set_cursor_after(key, "5")
    script = writer._script_arguments(writer._buffer, writer._cursors)[0]
    assert script is (producer._RUNS_SCRIPT if runs else producer._WRITE_SCRIPT)
    await writer.flush()
    expected: dict[str, list[dict[str, bytes]]] = {}
    for fields, other in entries:
        expected.setdefault(f"{redis_prefix}{other}" if other else stream, []).append(fields)
    for target, want in expected.items():
        assert [{k.decode(): v for k, v in f.items()} for _, f in await client.xrange(target)] == want
    assert await client.get(key) == b"5" and writer.stats.written == len(entries)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "a", "b"]), st.sampled_from(["event", "label"]),
                          st.binary(max_size=8)), max_size=30))
def test_runs_keep_every_stream_in_order(redis_url: str, entries: list[tuple[str, str, bytes]]) -> None:
    """Any mix of single-field entries over several streams: each stream gets its entries in
    order (the runs script groups consecutive ones)."""

    async def check() -> None:
        client = connect(redis_url)
        prefix = f"psky-test:runs:{os.getpid()}:{time.monotonic_ns()}:"
        try:
            writer = StreamWriter(client, prefix + "main", batch_size=1000, high_water_mark=None)
            for other, field, value in entries:
                await writer.add({field: value}, stream=prefix + other if other else None)
            await writer.flush()
            for name in ("", "a", "b"):
                want = [{field.encode(): value} for other, field, value in entries if other == name]
                got = [f for _, f in await client.xrange(prefix + (name or "main"))]
                assert got == want
        finally:
            keys = [k async for k in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(check())


async def test_writer_timer_flushes(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    async with StreamWriter(client, stream, batch_size=500, batch_timeout_ms=20) as writer:
        await writer.add({"event": b"x"}, stream=f"{redis_prefix}other")
        await writer.add({"event": b"y", "extra": "z"})

        async def written() -> bool:
            return bool(await client.xlen(stream) == 1 and await client.xlen(f"{redis_prefix}other") == 1)

        await wait_for(written)
    assert (await entries(client, stream))[0][1] == {"event": b"y", "extra": b"z"}


async def test_high_water_mark_waits_until_consumers_drain(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}firehose_live"
    writer = StreamWriter(client, stream, batch_size=5, high_water_mark=5, poll_min_ms=5, poll_max_ms=20)
    for i in range(5):
        await writer.add(event_fields(create(seq=i)))
    assert writer.stats.stream_length == 5
    blocked = asyncio.create_task(writer.add_many(event_fields(create(seq=i)) for i in range(5, 10)))
    await asyncio.sleep(0.2)
    assert not blocked.done() and await client.xlen(stream) == 5  # the producer is held back
    consumer = StreamConsumer(client, [stream], "g", "c", batch_size=3, block_ms=50)
    batch = await consumer.read()
    assert seqs(batch) == [0, 1, 2]
    await consumer.ack(batch)  # XACK + XDEL: the stream shrinks to 2
    await asyncio.wait_for(blocked, 10)
    assert await client.xlen(stream) == 7
    assert writer.stats.backpressure_waits == 1 and writer.stats.backpressure_seconds > 0
    waiting = asyncio.create_task(writer.wait_below_high_water_mark())  # 7 >= 5: polls until drained
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await drain(consumer, until=7)
    await asyncio.wait_for(waiting, 10)


async def test_high_water_mark_returns_at_once_below_it(client: aioredis.Redis, redis_prefix: str) -> None:
    writer = StreamWriter(client, f"{redis_prefix}s", high_water_mark=100)
    await writer.wait_below_high_water_mark()
    assert writer.stats.stream_length == 0 and writer.stats.backpressure_waits == 0


# --- Redis: consumer --------------------------------------------------------------------


async def test_consume_ack_deletes(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}firehose_live"
    ids = await add_events(client, stream, 5)  # written before the group exists: still read
    consumer = StreamConsumer(client, [stream], "firehose_group", "c1", block_ms=50)
    batch = await consumer.read()
    assert [m.id for m in batch] == ids and all(m.deliveries == 1 for m in batch)
    assert consumer.in_flight == 5
    await consumer.ack(batch)
    assert await client.xlen(stream) == 0 and consumer.in_flight == 0
    assert (await client.xpending(stream, "firehose_group"))["pending"] == 0
    assert await consumer.read() == []  # nothing new within block_ms
    assert consumer.stats.acked == 5 and consumer.stats.delivered == 5


async def test_two_streams_one_group(client: aioredis.Redis, redis_prefix: str) -> None:
    live, backfill = f"{redis_prefix}firehose_live", f"{redis_prefix}firehose_backfill"
    await add_events(client, live, 2)
    await add_events(client, backfill, 3, start=100)
    consumer = StreamConsumer(client, [live, backfill], "g", "c", block_ms=50)
    got = await drain(consumer, until=5)
    assert sorted((m.stream, s) for m, s in zip(got, seqs(got), strict=True)) == sorted(
        [(live, 0), (live, 1), (backfill, 100), (backfill, 101), (backfill, 102)]
    )
    assert await client.xlen(live) == 0 and await client.xlen(backfill) == 0


async def test_two_consumers_share_work(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    ids = await add_events(client, stream, 60)
    a = StreamConsumer(client, [stream], "g", "a", batch_size=10, block_ms=20)
    b = StreamConsumer(client, [stream], "g", "b", batch_size=10, block_ms=20)
    seen: dict[str, list[str]] = {"a": [], "b": []}
    while len(seen["a"]) + len(seen["b"]) < 60:
        for name, consumer in (("a", a), ("b", b)):
            batch = await consumer.read()
            seen[name] += [m.id for m in batch]
            await consumer.ack(batch)
    assert seen["a"] and seen["b"] and not set(seen["a"]) & set(seen["b"])
    assert sorted(seen["a"] + seen["b"]) == sorted(ids)


async def test_own_pending_entries_come_first(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    old = await add_events(client, stream, 3)
    first = StreamConsumer(client, [stream], "g", "worker-1", block_ms=20)
    assert [m.id for m in await first.read()] == old  # read, never acknowledged: "crash"
    new = await add_events(client, stream, 2, start=3)
    restarted = StreamConsumer(client, [stream], "g", "worker-1", batch_size=2, block_ms=20)
    b1, b2 = await restarted.read(), await restarted.read()
    assert [m.id for m in b1 + b2] == old and all(m.deliveries == 2 for m in b1 + b2)
    await restarted.ack(b1 + b2)
    b3 = await restarted.read()
    assert [m.id for m in b3] == new and all(m.deliveries == 1 for m in b3)
    assert restarted.stats.redelivered == 3


async def test_killed_consumer_entries_are_claimed(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    ids = await add_events(client, stream, 4)
    dead = StreamConsumer(client, [stream], "g", "dead", block_ms=20)
    assert len(await dead.read()) == 4  # taken mid-batch, then the process "dies"
    alive = StreamConsumer(
        client, [stream], "g", "alive", block_ms=20, claim_idle_ms=300, claim_interval_ms=50
    )
    assert await alive.read() == [] and alive.stats.claimed == 0  # not idle long enough yet
    got = await drain(alive, until=4)
    assert sorted(m.id for m in got) == sorted(ids) and all(m.deliveries == 2 for m in got)
    assert alive.stats.claimed == 4
    assert (await client.xpending(stream, "g"))["pending"] == 0 and await client.xlen(stream) == 0


async def test_poison_entry_goes_to_dlq_others_flow(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}firehose_live"
    ids = await add_events(client, stream, 5)
    poison = ids[2]
    consumer = StreamConsumer(
        client, [stream], "g", "c", block_ms=20, claim_idle_ms=100, claim_interval_ms=20, max_deliveries=3
    )
    handled: list[str] = []
    deliveries: list[int] = []
    deadline = time.monotonic() + 10
    while consumer.stats.dead_lettered == 0:
        assert time.monotonic() < deadline
        batch = await consumer.read()
        bad = [m for m in batch if m.id == poison]
        good = [m for m in batch if m.id != poison]
        deliveries += [m.deliveries for m in bad]
        await consumer.fail(bad, "ValueError: cannot index this")
        await consumer.ack(good)
        handled += [m.id for m in good]
    assert sorted(handled) == sorted(set(ids) - {poison})
    assert deliveries == [1, 2, 3]  # handed out max_deliveries times, then dead-lettered
    dlq = await entries(client, dlq_stream_for(stream))
    assert len(dlq) == 1
    letter = parse_dead_letter(dlq[0][1])
    assert letter.source_id == poison and letter.source_stream == stream and letter.attempts == 4
    assert (
        "delivered 4 times" in letter.reason and "last error: ValueError: cannot index this" in letter.reason
    )
    assert parse_stream_event(letter.fields) == create(seq=2)  # the original entry, replayable
    assert (letter.group, letter.consumer) == ("g", "c")
    assert (await client.xpending(stream, "g"))["pending"] == 0 and await client.xlen(stream) == 0
    assert not await client.exists(f"{stream}:failures:g")
    assert await consumer.read() == []  # nothing loops


async def test_explicit_dead_letter_and_custom_dlq(client: aioredis.Redis, redis_prefix: str) -> None:
    stream, dlq = f"{redis_prefix}repo_backfill", f"{redis_prefix}repo_backfill_dlq"
    await client.xadd(stream, backfill_fields(BackfillRequest(did=DID, host="https://pds")))  # type: ignore[arg-type]
    consumer = StreamConsumer(client, [stream], "repo_backfill_group", "b1", block_ms=20, dlq_stream=dlq)
    (message,) = await consumer.read()
    await consumer.dead_letter([message], "RepoTakendown after 3 retries")
    ((_, fields),) = await entries(client, dlq)
    letter = parse_dead_letter(fields)
    assert letter.reason == "RepoTakendown after 3 retries" and letter.attempts == 1
    assert parse_backfill_request(letter.fields).did == DID
    assert await client.xlen(stream) == 0 and consumer.in_flight == 0


async def test_failed_entry_retried_on_schedule(client: aioredis.Redis, redis_prefix: str) -> None:
    """fail(retry_in_ms=0) makes it claimable now instead of after claim_idle_ms (60 s here)."""
    stream = f"{redis_prefix}s"
    (entry,) = await add_events(client, stream, 1)
    consumer = StreamConsumer(
        client, [stream], "g", "c", block_ms=20, claim_idle_ms=60_000, claim_interval_ms=10
    )
    first = await consumer.read()
    await consumer.fail(first, "HTTP 503", retry_in_ms=0)
    again = await drain(consumer, until=1)
    assert [(m.id, m.deliveries) for m in again] == [(entry, 2)]
    assert consumer.stats.failed == 1 and not await client.exists(f"{stream}:failures:g")


async def test_phantom_pending_in_own_history(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    ids = await add_events(client, stream, 3)
    first = StreamConsumer(client, [stream], "g", "c", block_ms=20)
    assert len(await first.read()) == 3
    await client.xdel(stream, ids[1])  # deleted while pending (a trim, a stray XDEL…)
    restarted = StreamConsumer(client, [stream], "g", "c", block_ms=20)
    batch = await restarted.read()
    assert [m.id for m in batch] == [ids[0], ids[2]]
    assert restarted.stats.phantoms == 1
    await restarted.ack(batch)
    assert (await client.xpending(stream, "g"))["pending"] == 0
    for _ in range(3):
        assert await restarted.read() == []


async def test_phantom_pending_when_claiming(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    ids = await add_events(client, stream, 3)
    dead = StreamConsumer(client, [stream], "g", "dead", block_ms=20)
    assert len(await dead.read()) == 3
    await client.xdel(stream, ids[0])
    alive = StreamConsumer(
        client, [stream], "g", "alive", block_ms=20, claim_idle_ms=50, claim_interval_ms=10
    )
    got = await drain(alive, until=2)
    assert sorted(m.id for m in got) == sorted(ids[1:])
    # Redis 6.2 hands the phantom to the claimer (then acknowledged here); Redis 7 drops it itself
    assert alive.stats.phantoms == (0 if await redis_major(client) >= 7 else 1)
    assert (await client.xpending(stream, "g"))["pending"] == 0
    await asyncio.sleep(0.1)
    for _ in range(5):  # claimed again and again would show up here
        assert await alive.read() == []


async def test_stop_ends_iteration_after_the_current_batch(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    await add_events(client, stream, 10)
    consumer = StreamConsumer(client, [stream], "g", "c", batch_size=4, block_ms=5000)
    batches = []
    async for batch in consumer:
        batches.append(batch)
        consumer.stop()
        await consumer.ack(batch)  # the batch in hand is still processed and acknowledged
    assert [seqs(b) for b in batches] == [[0, 1, 2, 3]]
    assert (await client.xpending(stream, "g"))["pending"] == 0
    assert await client.xlen(stream) == 6  # nothing else read, nothing acknowledged unprocessed
    assert await consumer.read() == []


async def test_stop_interrupts_a_blocked_read(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    consumer = StreamConsumer(client, [stream], "g", "c", block_ms=20_000)

    async def run() -> int:
        count = 0
        async for batch in consumer:
            count += len(batch)
            await consumer.ack(batch)
        return count

    task = asyncio.create_task(run())
    await add_events(client, stream, 2)
    await wait_for(lambda: _xlen_is(client, stream, 0))
    consumer.stop()
    assert await asyncio.wait_for(task, 5) == 2  # did not wait out the 20 s block


async def _xlen_is(client: aioredis.Redis, stream: str, n: int) -> bool:
    return bool(await client.xlen(stream) == n)


async def test_group_recreated_after_stream_loss(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    await add_events(client, stream, 1)
    consumer = StreamConsumer(client, [stream], "g", "c", block_ms=20)
    await consumer.ack(await consumer.read())
    await client.delete(stream)  # e.g. Redis restarted without persistence
    assert await consumer.read() == []  # NOGROUP noticed, group recreated on the next read
    await add_events(client, stream, 2, start=1)
    assert seqs(await drain(consumer, until=2)) == [1, 2]


async def test_decoding_client_still_yields_bytes(redis_url: str, redis_prefix: str) -> None:
    """Payloads are read undecoded whatever the caller's client options (RESP2 here too)."""
    client = connect(redis_url, decode_responses=True, protocol=2)
    try:
        stream = f"{redis_prefix}s"
        writer = StreamWriter(client, stream, batch_size=2)
        await writer.add_many([event_fields(create(seq=1)), event_fields(create(seq=2))])
        consumer = StreamConsumer(client, [stream], "g", "c", block_ms=20)
        batch = await consumer.read()
        assert all(isinstance(v, bytes) for m in batch for v in m.fields.values())
        assert seqs(batch) == [1, 2]
        await consumer.dead_letter(batch[:1], "x")
        await consumer.ack(batch[1:])
        info = await stream_info(client, stream)
        assert info.length == 0 and info.groups[0].pending == 0
        assert await trim_acknowledged(client, stream) == 0
    finally:
        await client.aclose()


# --- Redis: trimming and status ---------------------------------------------------------


async def test_trim_never_removes_pending_entries(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    ids = await add_events(client, stream, 10)
    consumer = StreamConsumer(client, [stream], "g", "c", batch_size=6, block_ms=20, delete_on_ack=False)
    batch = await consumer.read()  # ids[0:6] delivered
    await consumer.ack(batch[:2] + batch[4:])  # ids[2], ids[3] stay pending
    removed = await trim_acknowledged(client, stream)
    assert removed == 2
    remaining = [entry_id for entry_id, _ in await entries(client, stream)]
    assert remaining == ids[2:]  # pending ones and everything not yet delivered survive
    await consumer.ack(batch[2:4])
    assert await trim_acknowledged(client, stream) == 3  # ids[2..4]; ids[5] (last delivered) is kept
    assert [entry_id for entry_id, _ in await entries(client, stream)] == ids[5:]


async def test_trim_respects_every_group(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    await add_events(client, stream, 5)
    fast = StreamConsumer(client, [stream], "fast", "c", block_ms=20, delete_on_ack=False)
    await fast.ack(await fast.read())
    await client.xgroup_create(stream, "slow", id="0")  # has read nothing yet
    assert await trim_acknowledged(client, stream) == 0
    assert await trim_acknowledged(client, f"{redis_prefix}missing") == 0
    await client.xadd(f"{redis_prefix}nogroups", {"a": "b"})
    assert await trim_acknowledged(client, f"{redis_prefix}nogroups") == 0  # no group: keep all


async def test_trim_keeps_phantom_bound(client: aioredis.Redis, redis_prefix: str) -> None:
    """A pending entry whose message is gone still holds the bound (conservative)."""
    stream = f"{redis_prefix}s"
    ids = await add_events(client, stream, 4)
    consumer = StreamConsumer(client, [stream], "g", "c", block_ms=20, delete_on_ack=False)
    batch = await consumer.read()
    await client.xdel(stream, ids[1])
    await consumer.ack([m for m in batch if m.id != ids[1]])
    removed = await trim_acknowledged(client, stream, approximate=True)  # whole nodes only: maybe none
    removed += await trim_acknowledged(client, stream)
    assert removed == 1  # ids[0]; ids[1] is gone but still pending, so the bound stays there
    assert [entry_id for entry_id, _ in await entries(client, stream)] == ids[2:]


async def test_stream_info(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}firehose_live"
    missing = await stream_info(client, f"{redis_prefix}none")
    assert not missing.exists and missing.length == 0 and missing.groups == []
    ids = await add_events(client, stream, 6)
    a = StreamConsumer(client, [stream], "firehose_group", "a", batch_size=2, block_ms=20)
    b = StreamConsumer(client, [stream], "firehose_group", "b", batch_size=1, block_ms=20)
    batch_a = await a.read()
    await b.read()
    await a.ack(batch_a[:1])
    info = await stream_info(client, stream)
    assert info.exists and info.length == 5 and info.first_id == ids[1] and info.last_id == ids[-1]
    (group,) = info.groups
    assert group.name == "firehose_group" and group.pending == 2 and group.last_delivered_id == ids[2]
    assert group.lag == 3 and group.lag_source in ("redis", "counted")
    assert group.oldest_pending_id == ids[1] and group.oldest_pending_consumer == "a"
    assert group.oldest_pending_idle_ms is not None and group.oldest_pending_idle_ms >= 0
    assert {(c.name, c.pending) for c in group.consumers} == {("a", 1), ("b", 1)}
    assert info.to_json()["groups"][0]["consumers"][0]["name"] in ("a", "b")
    small = await stream_info(client, stream, lag_scan_limit=2)
    assert small.groups[0].lag == 3  # Redis 7 reports it; 6.2: estimated as length − pending


# --- Redis: failure paths and limits ----------------------------------------------------


async def test_writer_retries_while_redis_is_down() -> None:
    """Nothing is lost or stored ahead while Redis cannot be reached; cancelling keeps the batch."""
    dead = connect("redis://127.0.0.1:1/0", retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    try:
        writer = StreamWriter(dead, "s", batch_size=10, high_water_mark=None)
        await writer.add({"event": b"1"})
        writer.set_cursor_after("s:cursor:h", "1")
        task = asyncio.create_task(writer.flush())
        await wait_for(lambda: _true_when(writer.stats.retries >= 2))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert writer.buffered == 1 and writer.stats.written == 0
        strict = StreamWriter(dead, "s", batch_size=10, high_water_mark=None, retry=False)
        await strict.add({"event": b"1"})
        with pytest.raises(RedisConnectionError):
            await strict.flush()
        assert strict.buffered == 1
    finally:
        await dead.aclose()


async def _true_when(value: bool) -> bool:
    return value


async def test_writer_field_values(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    writer = StreamWriter(client, stream, batch_size=10, high_water_mark=None)
    await writer.add({"a": 5, "b": 1.5, "c": "é", "d": b"\x00\xff", "": b""})
    await writer.flush()
    assert (await entries(client, stream))[0][1] == {
        "a": b"5",
        "b": b"1.5",
        "c": "é".encode(),
        "d": b"\x00\xff",
        "": b"",
    }
    await writer.add({"a": True})
    with pytest.raises(TypeError, match="bool"):
        await writer.flush()
    with pytest.raises(ValueError, match="batch_size"):
        StreamWriter(client, stream, batch_size=0)


async def test_consumer_argument_checks(client: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="list of stream names"):
        StreamConsumer(client, "firehose_live", "g", "c")
    with pytest.raises(ValueError, match="repeat"):
        StreamConsumer(client, ["a", "a"], "g", "c")
    with pytest.raises(ValueError, match="empty"):
        StreamConsumer(client, ["a"], "g", "")


async def test_dead_letter_failure_loses_nothing(client: aioredis.Redis, redis_prefix: str) -> None:
    """If the DLQ cannot be written, the entries are not acknowledged: they stay pending."""
    stream, dlq = f"{redis_prefix}s", f"{redis_prefix}dlq"
    await add_events(client, stream, 2)
    await client.set(dlq, "not a stream")
    consumer = StreamConsumer(client, [stream], "g", "c", block_ms=20, dlq_stream=dlq)
    batch = await consumer.read()
    with pytest.raises(Exception, match="WRONGTYPE"):
        await consumer.dead_letter(batch, "poison")
    assert (await client.xpending(stream, "g"))["pending"] == 2 and await client.xlen(stream) == 2


async def test_large_batches_ack_and_dead_letter(client: aioredis.Redis, redis_prefix: str) -> None:
    """More ids than one Lua unpack takes (chunks of 1000) in one ack / one dead-letter call."""
    stream = f"{redis_prefix}s"
    writer = StreamWriter(client, stream, batch_size=2500, high_water_mark=None)
    await writer.add_many({"event": str(i).encode()} for i in range(2500))
    await writer.flush()
    consumer = StreamConsumer(client, [stream], "g", "c", batch_size=2500, block_ms=20)
    batch = await consumer.read()
    assert len(batch) == 2500
    await consumer.ack(batch[:1200])
    await consumer.dead_letter(batch[1200:], "bulk")
    assert await client.xlen(stream) == 0 and (await client.xpending(stream, "g"))["pending"] == 0
    assert await client.xlen(dlq_stream_for(stream)) == 1300
    assert consumer.stats.acked == 1200 and consumer.stats.dead_lettered == 1300


async def test_ack_ids_and_release(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    ids = await add_events(client, stream, 3)
    consumer = StreamConsumer(
        client, [stream], "g", "c", block_ms=20, claim_idle_ms=100, claim_interval_ms=10
    )
    batch = await consumer.read()
    consumer.release(batch[2:])  # given back: redelivered once idle, not acknowledged
    await consumer.ack_ids(stream, ids[:2])
    assert consumer.in_flight == 0
    (again,) = await drain(consumer, until=1)
    assert (again.id, again.deliveries) == (ids[2], 2)


def test_malformed_message_pickles() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(MalformedMessage("bad_did", "create: did is not a DID")))
    assert (
        isinstance(error, MalformedMessage)
        and error.code == "bad_did"
        and str(error) == "create: did is not a DID"
    )


async def test_non_blocking_reader(client: aioredis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}s"
    consumer = StreamConsumer(client, [stream], "g", "c", block_ms=0)
    assert await consumer.read() == []
    await add_events(client, stream, 1)

    async def first_batch() -> list[Message]:
        async for batch in consumer:
            consumer.stop()
            return batch
        return []

    assert seqs(await asyncio.wait_for(first_batch(), 5)) == [0]


async def test_packed_commands_match_redis_py_and_survive_cancellation(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """The scripts' own RESP packing gives redis-py's bytes; a command cancelled while its
    reply is pending closes its connection, so no later command reads that stale reply."""
    from psky.streams._redis import pack_command, packed_command

    args: list[bytes | str | int | float] = ["SET", f"{redis_prefix}k", b"\x00\xff", "é", 3, -1.5]
    conn = client.connection_pool.make_connection()
    assert b"".join(pack_command(args)) == b"".join(conn.pack_command(*args))
    with pytest.raises(TypeError):
        pack_command([None])  # type: ignore[list-item]
    blocked = asyncio.create_task(packed_command(client, pack_command(["BLPOP", f"{redis_prefix}list", "2"])))
    await asyncio.sleep(0.2)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await client.rpush(f"{redis_prefix}list", "pushed")  # the BLPOP would have taken it
    for _ in range(5):  # every pooled connection answers its own command
        assert await packed_command(client, pack_command(["LLEN", f"{redis_prefix}list"])) == 1
    with pytest.raises(Exception, match="WRONGTYPE"):
        await packed_command(client, pack_command(["XLEN", f"{redis_prefix}list"]))
    assert await packed_command(client, pack_command(["LPOP", f"{redis_prefix}list"])) == b"pushed"
