"""The devnet labeler over real loopback HTTP and websockets: DID registration at the devnet
PLC, signed labels that verify with the key from the DID document, negations and
expirations on the wire, ``subscribeLabels`` cursor semantics and ``queryLabels``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey, verifier_for
from psky.atproto.did import parse_did_document
from psky.atproto.label import (
    ErrorMessage,
    InfoMessage,
    Label,
    LabelsMessage,
    decode_labels_frame,
)
from psky.atproto.syntax import is_valid_datetime
from psky.devnet.faults import Faults
from psky.devnet.labeler import Labeler, format_datetime
from psky.devnet.plc import PlcDirectory

POST = "at://did:plc:abcdefghijklmnopqrstuvwx/app.bsky.feed.post/3jzfcijpj2z2a"
POST_CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
ACCOUNT = "did:plc:abcdefghijklmnopqrstuvwx"
OTHER = "at://did:plc:bbbbbbbbbbbbbbbbbbbbbbbb/app.bsky.feed.post/3jzfcijpj2z2b"


@pytest.fixture
async def plc() -> AsyncIterator[PlcDirectory]:
    directory = PlcDirectory()
    await directory.start()
    yield directory
    await directory.stop()


@pytest.fixture
async def labeler(plc: PlcDirectory) -> AsyncIterator[Labeler]:
    async with Labeler(plc.url) as lab:
        yield lab


def ws_url(lab: Labeler, cursor: int | None = None) -> str:
    url = lab.url.replace("http://", "ws://") + "/xrpc/com.atproto.label.subscribeLabels"
    return url if cursor is None else f"{url}?cursor={cursor}"


async def fetch_doc(plc_url: str, did: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"{plc_url}/{did}") as resp:
        assert resp.status == 200
        return parse_did_document(await resp.json(content_type=None), expected_did=did)


async def recv(ws: websockets.ClientConnection) -> bytes:
    return await asyncio.wait_for(ws.recv(decode=False), 5)


async def subscribed(lab: Labeler, n: int = 1) -> None:
    """Wait until the labeler has registered *n* subscribers (a live-only subscription sees
    only what is sequenced after that)."""
    for _ in range(500):
        if lab.sequencer.subscriber_count >= n:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("subscriber not registered")


async def recv_labels(ws: websockets.ClientConnection, n: int) -> list[LabelsMessage]:
    out = []
    for _ in range(n):
        msg = decode_labels_frame(await recv(ws))
        assert isinstance(msg, LabelsMessage)
        out.append(msg)
    return out


def raw_label(frame: bytes) -> dict[str, Any]:
    header, used = cbor.decode_prefix(frame)
    assert header == {"op": 1, "t": "#labels"}
    body = cbor.decode(memoryview(frame)[used:])
    assert set(body) == {"seq", "labels"} and len(body["labels"]) == 1
    label: dict[str, Any] = body["labels"][0]
    return label


async def test_did_registered_with_label_key_and_service(plc: PlcDirectory, labeler: Labeler) -> None:
    doc = await fetch_doc(plc.url, labeler.did)
    assert doc.labeler_key == labeler.did_key
    assert doc.labeler_endpoint == labeler.url
    # a pure labeler identity, like ozone's: no repo signing key, no PDS, no handle
    assert doc.signing_key is None and doc.pds_endpoint is None and doc.handle is None
    audit = plc.audit_log(labeler.did)
    assert len(audit) == 1 and audit[0]["operation"]["prev"] is None


async def test_handle_alias(plc: PlcDirectory) -> None:
    async with Labeler(plc.url, handle="mod.labeler.test") as lab:
        doc = await fetch_doc(plc.url, lab.did)
        assert doc.handle == "mod.labeler.test"


async def test_labels_verify_with_key_from_did_document(plc: PlcDirectory, labeler: Labeler) -> None:
    await labeler.label(POST, "spam", cid=POST_CID)
    await labeler.label(ACCOUNT, "!hide")
    await labeler.label(OTHER, "porn", exp=datetime.now(UTC) + timedelta(days=1))
    doc = await fetch_doc(plc.url, labeler.did)
    async with websockets.connect(ws_url(labeler, 0)) as ws:
        msgs = await recv_labels(ws, 3)
    assert [m.seq for m in msgs] == [1, 2, 3]
    for m in msgs:
        (label,) = m.labels
        assert label.src == labeler.did
        assert label.ver == 1
        assert label.sig is not None and len(label.sig) == 64
        assert is_valid_datetime(label.cts)
        assert label.verify(doc.labeler_key)
        # a different key does not verify it
        assert not label.verify(PrivateKey.generate("k256").public_key())
    assert msgs[0].labels[0].cid == POST_CID and msgs[0].labels[0].uri == POST
    assert msgs[1].labels[0].cid is None and msgs[1].labels[0].uri == ACCOUNT


async def test_negation_and_expiry_on_the_wire(plc: PlcDirectory, labeler: Labeler) -> None:
    exp = datetime(2031, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    await labeler.label(POST, "spam", exp=exp)
    await labeler.label(OTHER, "spam")
    neg = await labeler.negate(OTHER, "spam")
    assert neg.neg
    doc = await fetch_doc(plc.url, labeler.did)
    async with websockets.connect(ws_url(labeler, 0)) as ws:
        frames = [await recv(ws) for _ in range(2)]  # OTHER's first version was compacted
    positive, negation = raw_label(frames[0]), raw_label(frames[1])
    # positive: no neg key at all (ozone omits neg unless true); exp in atproto datetime form
    assert set(positive) == {"ver", "src", "uri", "val", "cts", "exp", "sig"}
    assert positive["exp"] == "2031-01-02T03:04:05.678Z"
    assert positive["ver"] == 1
    # negation: neg true, no exp, no cid
    assert set(negation) == {"ver", "src", "uri", "val", "neg", "cts", "sig"}
    assert negation["neg"] is True and negation["uri"] == OTHER and negation["val"] == "spam"
    for raw in (positive, negation):
        label = Label.from_ipld(raw)
        assert label.verify(doc.labeler_key)
        # the signature covers exactly the DAG-CBOR of the fields without sig
        unsigned = {k: v for k, v in raw.items() if k != "sig"}
        assert doc.labeler_key is not None
        assert verifier_for(doc.labeler_key).verify(cbor.encode(unsigned), raw["sig"])


async def test_replay_compacts_to_latest_version_live_sees_all(labeler: Labeler) -> None:
    seen: list[LabelsMessage] = []
    async with websockets.connect(ws_url(labeler)) as live:
        await subscribed(labeler)
        await labeler.label(POST, "spam")
        seen += await recv_labels(live, 1)
        await labeler.label(OTHER, "nudity")
        seen += await recv_labels(live, 1)
        await labeler.negate(POST, "spam")
        seen += await recv_labels(live, 1)
    assert [(m.seq, m.labels[0].uri, m.labels[0].neg) for m in seen] == [
        (1, POST, False),
        (2, OTHER, False),
        (3, POST, True),
    ]
    async with websockets.connect(ws_url(labeler, 0)) as ws:
        replay = await recv_labels(ws, 2)
    assert [(m.seq, m.labels[0].uri, m.labels[0].neg) for m in replay] == [(2, OTHER, False), (3, POST, True)]
    assert [(seq, lab.neg) for seq, lab in labeler.labels()] == [(2, False), (3, True)]


async def test_uncompacted_log_keeps_every_version(plc: PlcDirectory) -> None:
    async with Labeler(plc.url, compact=False) as lab:
        await lab.label(POST, "spam")
        await lab.negate(POST, "spam")
        async with websockets.connect(ws_url(lab, 0)) as ws:
            msgs = await recv_labels(ws, 2)
        assert [m.labels[0].neg for m in msgs] == [False, True]


async def test_cursor_replay_then_live(labeler: Labeler) -> None:
    for i in range(5):
        await labeler.label(f"{POST}{i}", "spam")
    async with websockets.connect(ws_url(labeler, 2)) as ws:
        replay = await recv_labels(ws, 3)
        assert [m.seq for m in replay] == [3, 4, 5]
        await labeler.label(OTHER, "gore")
        (live,) = await recv_labels(ws, 1)
        assert live.seq == 6 and live.labels[0].uri == OTHER
    # cursor == current seq: nothing to replay, live afterwards
    async with websockets.connect(ws_url(labeler, 6)) as ws:
        await labeler.label(OTHER, "spam")
        (msg,) = await recv_labels(ws, 1)
        assert msg.seq == 7


async def test_future_cursor_error_frame(labeler: Labeler) -> None:
    await labeler.label(POST, "spam")
    async with websockets.connect(ws_url(labeler, 5)) as ws:
        msg = decode_labels_frame(await recv(ws))
        assert msg == ErrorMessage("FutureCursor", "Cursor in the future.")
        with pytest.raises(ConnectionClosed):
            await recv(ws)
    assert ws.close_code == 1008
    # a cursor equal to the current seq is not in the future: live from there
    async with websockets.connect(ws_url(labeler, 1)) as ws:
        await labeler.label(OTHER, "spam")
        (msg2,) = await recv_labels(ws, 1)
        assert msg2.seq == 2


async def test_outdated_cursor_info(plc: PlcDirectory) -> None:
    async with Labeler(plc.url, retain=2) as lab:
        for i in range(6):
            await lab.label(f"{POST}{i}", "spam")
        async with websockets.connect(ws_url(lab, 0)) as ws:
            info = decode_labels_frame(await recv(ws))
            assert isinstance(info, InfoMessage) and info.name == "OutdatedCursor"
            msgs = await recv_labels(ws, 2)
        assert [m.seq for m in msgs] == [5, 6]


async def test_bad_signature_fault(plc: PlcDirectory) -> None:
    faults = Faults()
    async with Labeler(plc.url, faults=faults) as lab:
        good = await lab.label(POST, "spam")
        faults.bad_signature = True
        bad = await lab.label(OTHER, "spam")
        doc = await fetch_doc(plc.url, lab.did)
        assert good.verify(doc.labeler_key)
        assert not bad.verify(doc.labeler_key)


async def test_key_rotation_updates_did_document(plc: PlcDirectory, labeler: Labeler) -> None:
    old = await labeler.label(POST, "spam")
    old_key = labeler.did_key
    new_key = await labeler.rotate_key()
    assert new_key != old_key
    new = await labeler.label(OTHER, "spam")
    doc = await fetch_doc(plc.url, labeler.did)
    assert doc.labeler_key == new_key and doc.labeler_endpoint == labeler.url
    assert new.verify(new_key) and not new.verify(old_key)
    assert old.verify(old_key) and not old.verify(new_key)


async def test_stream_drop_fault(plc: PlcDirectory) -> None:
    faults = Faults(drop_after_frames=2)
    async with Labeler(plc.url, faults=faults) as lab:
        for i in range(5):
            await lab.label(f"{POST}{i}", "spam")
        async with websockets.connect(ws_url(lab, 0)) as ws:
            got = await recv_labels(ws, 2)
            with pytest.raises(ConnectionClosed):
                await recv(ws)
        assert [m.seq for m in got] == [1, 2]


async def test_invalid_labels_rejected(labeler: Labeler) -> None:
    with pytest.raises(ValueError, match="uri"):
        await labeler.label("https://example.com/", "spam")
    with pytest.raises(ValueError, match="val"):
        await labeler.label(POST, "x" * 129)
    with pytest.raises(ValueError, match="cid"):
        await labeler.label(POST, "spam", cid="not-a-cid")
    assert labeler.seq == 0


# --- queryLabels ------------------------------------------------------------------------


async def query(lab: Labeler, params: list[tuple[str, str]]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(lab.url + "/xrpc/com.atproto.label.queryLabels", params=params) as resp,
    ):
        return resp.status, await resp.json()


async def test_query_labels(plc: PlcDirectory, labeler: Labeler) -> None:
    await labeler.label(POST, "spam", cid=POST_CID)
    await labeler.label(OTHER, "nudity")
    await labeler.label(ACCOUNT, "!warn")
    await labeler.negate(OTHER, "nudity")
    doc = await fetch_doc(plc.url, labeler.did)

    status, body = await query(labeler, [("uriPatterns", POST)])
    assert status == 200
    (only,) = body["labels"]
    assert only["uri"] == POST and only["cid"] == POST_CID and only["ver"] == 1
    assert set(only["sig"]) == {"$bytes"}
    assert Label.from_lex(only).verify(doc.labeler_key)
    assert body["cursor"] == "1"

    status, body = await query(labeler, [("uriPatterns", "at://did:plc:bbbb*")])
    assert [(lab["uri"], lab.get("neg")) for lab in body["labels"]] == [(OTHER, True)]

    status, body = await query(labeler, [("uriPatterns", POST), ("uriPatterns", ACCOUNT)])
    assert [lab["uri"] for lab in body["labels"]] == [POST, ACCOUNT]

    status, body = await query(labeler, [("uriPatterns", "*")])
    assert [lab["uri"] for lab in body["labels"]] == [POST, ACCOUNT, OTHER]

    status, body = await query(labeler, [("uriPatterns", "*"), ("sources", "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz")])
    assert body["labels"] == [] and "cursor" not in body
    status, body = await query(labeler, [("uriPatterns", "*"), ("sources", labeler.did)])
    assert len(body["labels"]) == 3


async def test_query_labels_pagination(labeler: Labeler) -> None:
    for i in range(7):
        await labeler.label(f"{POST}{i}", "spam")
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = [("uriPatterns", "at://*"), ("limit", "3")]
        if cursor:
            params.append(("cursor", cursor))
        status, body = await query(labeler, params)
        assert status == 200
        pages += 1
        seen += [lab["uri"] for lab in body["labels"]]
        if not body["labels"]:
            break
        cursor = body["cursor"]
    assert seen == [f"{POST}{i}" for i in range(7)]
    assert pages == 4  # 3 + 3 + 1, then an empty page


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ([], "uriPatterns"),
        ([("uriPatterns", "at://did:*/app")], "invalid pattern"),
        ([("uriPatterns", "*"), ("limit", "0")], "limit"),
        ([("uriPatterns", "*"), ("limit", "251")], "limit"),
        ([("uriPatterns", "*"), ("cursor", "abc")], "cursor"),
    ],
)
async def test_query_labels_errors(labeler: Labeler, params: list[tuple[str, str]], fragment: str) -> None:
    status, body = await query(labeler, params)
    assert status == 400
    assert body["error"] == "InvalidRequest"
    assert fragment in body["message"]


async def test_http_fault_knobs(plc: PlcDirectory) -> None:
    faults = Faults()
    async with Labeler(plc.url, faults=faults) as lab:
        faults.http_429_every = 1
        status, body = await query(lab, [("uriPatterns", "*")])
        assert status == 429 and body["error"] == "RateLimitExceeded"


def test_format_datetime() -> None:
    assert format_datetime(datetime(2024, 1, 2, 3, 4, 5, 6789, tzinfo=UTC)) == "2024-01-02T03:04:05.006Z"
    assert format_datetime(datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05.000Z"
    plus_two = datetime(2024, 1, 2, 7, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_datetime(plus_two) == "2024-01-02T05:04:05.000Z"
