"""psky.atproto.label: label parsing, signing bytes, signatures, subscribeLabels messages."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from psky.atproto import cbor
from psky.atproto.crypto import Curve, PrivateKey
from psky.atproto.label import (
    ErrorMessage,
    InfoMessage,
    InvalidLabel,
    InvalidLabelMessage,
    Label,
    LabelsMessage,
    decode_labels_frame,
    decode_labels_message,
    encode_labels_frame,
    sign_label,
)
from tests.paths import INTEROP

SRC = "did:plc:ar7c4by46qjdydhdevvrndac"
URI = "at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3l3qo2vutsw2b"
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
CTS = "2024-09-10T12:00:00.000Z"
CURVES: list[Curve] = ["k256", "p256"]


def base(**kw: Any) -> Label:
    fields: dict[str, Any] = {"src": SRC, "uri": URI, "val": "spam", "cts": CTS}
    fields.update(kw)
    return Label(**fields)


def _syntax_lines(name: str) -> list[str]:
    text = (INTEROP / "syntax" / name).read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# --- signing bytes --------------------------------------------------------------------


def test_signing_bytes_exact_encoding() -> None:
    """sig dropped, ver included (1 when absent), optional fields omitted, canonical key order."""
    label = base(cid=CID, exp="2025-01-01T00:00:00Z", sig=b"\x01" * 64)
    expected = cbor.encode(
        {
            "ver": 1,
            "src": SRC,
            "uri": URI,
            "cid": CID,
            "val": "spam",
            "cts": CTS,
            "exp": "2025-01-01T00:00:00Z",
        }
    )
    assert label.signing_bytes() == expected
    decoded = cbor.decode(label.signing_bytes())
    assert set(decoded) == {"ver", "src", "uri", "cid", "val", "cts", "exp"}
    # DAG-CBOR key order: length first, then bytewise
    assert list(decoded) == ["cid", "cts", "exp", "src", "uri", "val", "ver"]


def test_signing_bytes_minimal_label() -> None:
    assert cbor.decode(base().signing_bytes()) == {
        "ver": 1,
        "src": SRC,
        "uri": URI,
        "val": "spam",
        "cts": CTS,
    }


def test_signing_bytes_pinned() -> None:
    """Hand-assembled DAG-CBOR, so the signed encoding does not merely agree with itself."""
    label = base(neg=True, sig=b"\x01" * 64)
    expected = bytes.fromhex(
        "a6"  # map(6), keys sorted by length then bytes
        "63637473"
        "7818"
        + CTS.encode().hex()  # "cts": text(24)
        + "636e6567"
        "f5"  # "neg": true
         + "63737263"
        "7820"
        + SRC.encode().hex()  # "src": text(32)
        + "63757269"
        "7846"
        + URI.encode().hex()  # "uri": text(70)
        + "6376616c"
        "647370616d"  # "val": "spam"
         + "63766572"
        "01"  # "ver": 1
    )
    assert label.signing_bytes() == expected


def test_neg_false_is_omitted_unless_it_was_on_the_wire() -> None:
    assert "neg" not in cbor.decode(base().signing_bytes())
    wire = base().to_lex() | {"neg": False}
    parsed = Label.from_lex(wire)
    assert parsed.neg is False and parsed.neg_explicit
    assert cbor.decode(parsed.signing_bytes())["neg"] is False
    assert parsed.to_lex()["neg"] is False
    assert parsed == base()  # semantically the same label


@pytest.mark.parametrize("curve", CURVES)
def test_explicit_neg_false_signature_verifies(curve: Curve) -> None:
    """A labeler that signs with neg:false present must still verify after a round trip."""
    key = PrivateKey.generate(curve)
    fields = {"ver": 1, "src": SRC, "uri": URI, "val": "spam", "neg": False, "cts": CTS}
    sig = key.sign(cbor.encode(fields))
    parsed = Label.from_ipld(fields | {"sig": sig})
    assert parsed.verify(key.public_key())
    assert Label.from_lex(parsed.to_lex()).verify(key.public_key())
    assert not dataclasses.replace(parsed, neg_explicit=False).verify(key.public_key())


# --- sign / verify --------------------------------------------------------------------


@pytest.mark.parametrize("curve", CURVES)
def test_sign_verify_round_trip(curve: Curve) -> None:
    key = PrivateKey.generate(curve)
    signed = sign_label(base(cid=CID), key)
    assert signed.ver == 1 and signed.sig is not None and len(signed.sig) == 64
    assert signed.verify(key.public_key())
    assert signed.verify(key.did_key())
    assert signed.verify(key.public_key().multibase())
    # through both wire forms
    assert Label.from_lex(signed.to_lex()).verify(key.public_key())
    assert Label.from_ipld(cbor.decode(cbor.encode(signed.to_ipld()))).verify(key.public_key())
    assert Label.from_ipld(cbor.decode(cbor.encode_lex(signed.to_lex()))) == signed


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize(
    "change",
    [
        {"val": "porn"},
        {"uri": "did:plc:ewvi7nxzyoun6zhxrhs64oiz"},
        {"src": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"},
        {"cid": None},
        {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpa"},
        {"neg": True},
        {"cts": "2024-09-10T12:00:00.001Z"},
        {"exp": "2030-01-01T00:00:00Z"},
    ],
)
def test_tampered_label_fails(curve: Curve, change: dict[str, Any]) -> None:
    key = PrivateKey.generate(curve)
    signed = sign_label(base(cid=CID), key)
    assert not dataclasses.replace(signed, **change).verify(key.public_key())


@pytest.mark.parametrize("curve", CURVES)
def test_wrong_key_bad_sig_and_unsigned(curve: Curve) -> None:
    key = PrivateKey.generate(curve)
    signed = sign_label(base(), key)
    assert not signed.verify(PrivateKey.generate(curve).public_key())
    assert signed.sig is not None
    assert not dataclasses.replace(signed, sig=signed.sig[:-1] + bytes([signed.sig[-1] ^ 1])).verify(
        key.public_key()
    )
    assert not dataclasses.replace(signed, sig=b"").verify(key.public_key())
    assert not base().verify(key.public_key())
    assert not signed.verify("did:key:zgarbage")


def test_unknown_fields_are_not_signed() -> None:
    key = PrivateKey.generate("k256")
    signed = sign_label(base(), key)
    wire = signed.to_lex() | {"$type": "com.atproto.label.defs#label", "extra": 1}
    parsed = Label.from_lex(wire)
    assert parsed.verify(key.public_key())
    assert "$type" not in parsed.to_lex()


def test_sign_keeps_fields_and_sets_version() -> None:
    key = PrivateKey.generate("p256")
    label = base(neg=True, exp="2030-01-01T00:00:00Z")
    signed = sign_label(label, key)
    assert dataclasses.replace(signed, sig=None, ver=None) == label
    resigned = sign_label(signed, key)
    assert resigned.verify(key.public_key())


# --- negation and expiry --------------------------------------------------------------


def test_negation_label() -> None:
    key = PrivateKey.generate("k256")
    neg = sign_label(base(neg=True), key)
    lex = neg.to_lex()
    assert lex["neg"] is True
    back = Label.from_lex(lex)
    assert back.neg is True and back.verify(key.public_key())
    assert cbor.decode(neg.signing_bytes())["neg"] is True


def test_expiry_field() -> None:
    key = PrivateKey.generate("k256")
    lab = sign_label(base(exp="2025-06-01T00:00:00.000Z"), key)
    assert lab.to_lex()["exp"] == "2025-06-01T00:00:00.000Z"
    assert Label.from_lex(lab.to_lex()).exp == "2025-06-01T00:00:00.000Z"
    assert "exp" not in base().to_lex()


def test_to_lex_shape() -> None:
    lab = base(cid=CID, sig=b"\xff" * 64, ver=1)
    assert lab.to_lex() == {
        "src": SRC,
        "uri": URI,
        "cid": CID,
        "val": "spam",
        "cts": CTS,
        "sig": {"$bytes": cbor.b64encode_unpadded(b"\xff" * 64)},
        "ver": 1,
    }
    assert base().to_lex() == {"src": SRC, "uri": URI, "val": "spam", "cts": CTS}
    assert lab.to_ipld()["sig"] == b"\xff" * 64


def test_account_label_uri_is_a_did() -> None:
    assert base(uri="did:plc:ewvi7nxzyoun6zhxrhs64oiz").uri.startswith("did:")
    assert base(uri="did:web:example.com").uri == "did:web:example.com"


def test_val_length_in_bytes() -> None:
    assert base(val="a" * 128).val
    with pytest.raises(InvalidLabel):
        base(val="a" * 129)
    assert base(val="é" * 64)  # 128 bytes
    with pytest.raises(InvalidLabel):
        base(val="é" * 65)  # 130 bytes, 65 chars


@pytest.mark.parametrize("dt", _syntax_lines("datetime_syntax_valid.txt"))
def test_valid_datetimes_accepted(dt: str) -> None:
    assert base(cts=dt, exp=dt).cts == dt


@pytest.mark.parametrize(
    "dt", _syntax_lines("datetime_syntax_invalid.txt") + _syntax_lines("datetime_parse_invalid.txt")
)
def test_invalid_datetimes_rejected(dt: str) -> None:
    with pytest.raises(InvalidLabel):
        base(cts=dt)
    with pytest.raises(InvalidLabel):
        base(exp=dt)


# --- malformed labels -----------------------------------------------------------------

GOOD_LEX: dict[str, Any] = {"src": SRC, "uri": URI, "val": "spam", "cts": CTS}


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        "label",
        {},
        {k: v for k, v in GOOD_LEX.items() if k != "src"},
        {k: v for k, v in GOOD_LEX.items() if k != "uri"},
        {k: v for k, v in GOOD_LEX.items() if k != "val"},
        {k: v for k, v in GOOD_LEX.items() if k != "cts"},
        GOOD_LEX | {"src": "not-a-did"},
        GOOD_LEX | {"src": "at://did:plc:ar7c4by46qjdydhdevvrndac"},
        GOOD_LEX | {"src": 5},
        GOOD_LEX | {"uri": "https://example.com/post"},
        GOOD_LEX | {"uri": "at://"},
        GOOD_LEX | {"uri": "at://did:plc:x/app.bsky.feed.post/abc def"},
        GOOD_LEX | {"uri": ""},
        GOOD_LEX | {"uri": "at://a/" + "b" * 9000},
        GOOD_LEX | {"cid": "not a cid"},
        GOOD_LEX | {"cid": 12},
        GOOD_LEX | {"cid": {"$link": CID}},
        GOOD_LEX | {"val": ""},
        GOOD_LEX | {"val": 1},
        GOOD_LEX | {"val": "x" * 129},
        GOOD_LEX | {"val": "bad\ud800"},
        GOOD_LEX | {"neg": "true"},
        GOOD_LEX | {"neg": 1},
        GOOD_LEX | {"cts": "yesterday"},
        GOOD_LEX | {"cts": 1700000000},
        GOOD_LEX | {"exp": "2024-13-01T00:00:00Z"},
        GOOD_LEX | {"exp": 0},
        GOOD_LEX | {"ver": 2},
        GOOD_LEX | {"ver": 0},
        GOOD_LEX | {"ver": "1"},
        GOOD_LEX | {"ver": True},
        GOOD_LEX | {"sig": "AAAA"},
        GOOD_LEX | {"sig": {"$bytes": "!!!"}},
        GOOD_LEX | {"sig": {"$bytes": "AAAA", "x": 1}},
        GOOD_LEX | {"sig": b"\x00" * 64},
    ],
)
def test_malformed_lex_labels(obj: Any) -> None:
    with pytest.raises(InvalidLabel):
        Label.from_lex(obj)


@pytest.mark.parametrize(
    "obj",
    [
        None,
        GOOD_LEX | {"sig": {"$bytes": "AAAA"}},
        GOOD_LEX | {"sig": "AAAA"},
        GOOD_LEX | {"cid": cbor.parse_cid(CID)},
        GOOD_LEX | {"val": b"spam"},
        GOOD_LEX | {"ver": 2},
    ],
)
def test_malformed_ipld_labels(obj: Any) -> None:
    with pytest.raises(InvalidLabel):
        Label.from_ipld(obj)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidLabel):
        base(src="nope")
    with pytest.raises(InvalidLabel):
        base(sig="abc")
    with pytest.raises(InvalidLabel):
        base(neg=1)
    assert issubclass(InvalidLabel, ValueError)


# --- subscribeLabels ------------------------------------------------------------------


def test_labels_message_frame_round_trip() -> None:
    key = PrivateKey.generate("k256")
    labels = (sign_label(base(), key), sign_label(base(val="nudity", neg=True), key))
    frame = encode_labels_frame(LabelsMessage(42, labels))
    header, body = cbor.decode_multi(frame)
    assert header == {"op": 1, "t": "#labels"}
    assert body["seq"] == 42 and body["labels"][0]["sig"] == labels[0].sig
    msg = decode_labels_frame(frame)
    assert isinstance(msg, LabelsMessage)
    assert msg.seq == 42 and msg.labels == labels and msg.rejected == ()
    assert all(label.verify(key.public_key()) for label in msg.labels)


def test_info_and_error_frames() -> None:
    info = decode_labels_frame(encode_labels_frame(InfoMessage("OutdatedCursor", "cursor too old")))
    assert info == InfoMessage("OutdatedCursor", "cursor too old")
    assert decode_labels_frame(encode_labels_frame(InfoMessage("OutdatedCursor"))) == InfoMessage(
        "OutdatedCursor"
    )
    err = decode_labels_frame(encode_labels_frame(ErrorMessage("FutureCursor", "nope")))
    assert err == ErrorMessage("FutureCursor", "nope")


def test_full_nsid_type_and_unknown_types() -> None:
    body = {"seq": 1, "labels": [base().to_ipld()]}
    msg = decode_labels_message({"op": 1, "t": "com.atproto.label.subscribeLabels#labels"}, body)
    assert isinstance(msg, LabelsMessage) and msg.labels == (base(),)
    assert decode_labels_message({"op": 1, "t": "#somethingNew"}, {"x": 1}) is None


def test_non_strict_decoding_collects_rejects() -> None:
    body = {"seq": 7, "labels": [base().to_ipld(), {"src": "bad"}, base(val="x").to_ipld()]}
    header = {"op": 1, "t": "#labels"}
    with pytest.raises(InvalidLabelMessage, match="label 1"):
        decode_labels_message(header, body)
    msg = decode_labels_message(header, body, strict=False)
    assert isinstance(msg, LabelsMessage)
    assert [label.val for label in msg.labels] == ["spam", "x"]
    assert len(msg.rejected) == 1 and msg.rejected[0][0] == 1


@pytest.mark.parametrize(
    ("header", "body"),
    [
        (None, {}),
        ({"op": 1, "t": "#labels"}, None),
        ({"op": 2, "t": "#labels"}, {"seq": 1, "labels": []}),
        ({"t": "#labels"}, {"seq": 1, "labels": []}),
        ({"op": 1}, {"seq": 1, "labels": []}),
        ({"op": 1, "t": 5}, {"seq": 1, "labels": []}),
        ({"op": 1, "t": "#labels"}, {"labels": []}),
        ({"op": 1, "t": "#labels"}, {"seq": -1, "labels": []}),
        ({"op": 1, "t": "#labels"}, {"seq": "1", "labels": []}),
        ({"op": 1, "t": "#labels"}, {"seq": True, "labels": []}),
        ({"op": 1, "t": "#labels"}, {"seq": 1}),
        ({"op": 1, "t": "#labels"}, {"seq": 1, "labels": {}}),
        ({"op": 1, "t": "#labels"}, {"seq": 1, "labels": [None] * 10_001}),
        ({"op": 1, "t": "#info"}, {}),
        ({"op": 1, "t": "#info"}, {"name": "X", "message": 3}),
        ({"op": -1}, {}),
        ({"op": -1}, {"error": "X", "message": []}),
    ],
)
def test_malformed_messages(header: Any, body: Any) -> None:
    with pytest.raises(InvalidLabelMessage):
        decode_labels_message(header, body)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xa0",  # header only
        cbor.encode({"op": 1, "t": "#info"}) + cbor.encode({"name": "X"}) + b"\x00",  # trailing
        b"\xff\xff",
        cbor.encode({"op": 1, "t": "#labels"}) + b"\x9f\x01\x02\xff",  # indefinite-length array
    ],
)
def test_malformed_frames(frame: bytes) -> None:
    with pytest.raises(InvalidLabelMessage):
        decode_labels_frame(frame)
