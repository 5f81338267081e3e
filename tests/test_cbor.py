"""DAG-CBOR, CIDs and lex JSON against the interop data-model vectors."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from psky.atproto import cbor
from tests.paths import INTEROP

DM = INTEROP / "data-model"
FIXTURES = json.loads((DM / "data-model-fixtures.json").read_text())
VALID = json.loads((DM / "data-model-valid.json").read_text())
INVALID = json.loads((DM / "data-model-invalid.json").read_text())


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("fx", FIXTURES, ids=[f["cid"] for f in FIXTURES])
def test_fixture_cbor_to_json_and_cid(fx: dict[str, Any]) -> None:
    raw = _b64(fx["cbor_base64"])
    assert cbor.decode_lex(raw) == fx["json"]
    assert cbor.to_lex_json(cbor.decode(raw)) == fx["json"]
    assert cbor.cid_for_cbor(raw).encode() == fx["cid"]


@pytest.mark.parametrize("fx", FIXTURES, ids=[f["cid"] for f in FIXTURES])
def test_fixture_json_to_cbor(fx: dict[str, Any]) -> None:
    raw = _b64(fx["cbor_base64"])
    assert cbor.encode_lex(fx["json"]) == raw
    assert cbor.encode(cbor.decode(raw)) == raw


@pytest.mark.parametrize("fx", VALID, ids=[f["note"] for f in VALID])
def test_valid_data_model(fx: dict[str, Any]) -> None:
    value = cbor.record_from_lex_json(fx["json"])
    # round trip through DAG-CBOR is stable
    raw = cbor.encode(value)
    assert cbor.encode(cbor.decode(raw)) == raw


@pytest.mark.parametrize("fx", INVALID, ids=[f["note"] for f in INVALID])
def test_invalid_data_model(fx: dict[str, Any]) -> None:
    with pytest.raises(cbor.DecodeError):
        cbor.record_from_lex_json(fx["json"])


@pytest.mark.parametrize(
    "hexdata,why",
    [
        ("a2616202616101", "unsorted map keys"),
        ("1801", "integer not minimal"),
        ("f97e00", "half float"),
        ("fa7fc00000", "single float"),
        ("5f41ff", "indefinite length"),
        ("a1613101a1613102", "trailing data"),
        ("a16131", "truncated"),
        ("d82a4400017112", "tag 42 without 0x00 prefix"),
        ("c11a514b67b0", "tag other than 42"),
        ("a1016161", "integer map key"),
        ("", "empty"),
    ],
)
def test_strict_decoding_rejects(hexdata: str, why: str) -> None:
    with pytest.raises(cbor.DecodeError):
        cbor.decode(bytes.fromhex(hexdata))


def test_deep_nesting_does_not_crash() -> None:
    # libipld has been reported to overflow the stack here; cbrrr decodes iteratively.
    data = b"\x81" * 200_000 + b"\x01"
    value = cbor.decode(data)
    with pytest.raises(cbor.DecodeError):
        cbor.to_lex_json(value)


@pytest.mark.parametrize(
    "text",
    ["", "bafy", "Bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "zQmfoo", "b!!!"],
)
def test_parse_cid_rejects(text: str) -> None:
    with pytest.raises(cbor.DecodeError):
        cbor.parse_cid(text)


def test_parse_cid_rejects_cidv0_bytes_and_bad_lengths() -> None:
    with pytest.raises(cbor.DecodeError):
        cbor.validate_cid_bytes(b"\x12\x20" + b"\x00" * 32)
    with pytest.raises(cbor.DecodeError):
        cbor.validate_cid_bytes(b"\x01\x71\x12\x20" + b"\x00" * 31)
    cbor.validate_cid_bytes(b"\x01\x55\x12\x20" + b"\x00" * 32)


def test_decode_multi_reads_frame_pairs() -> None:
    frame = cbor.encode({"op": 1, "t": "#commit"}) + cbor.encode({"seq": 2**62})
    assert cbor.decode_multi(frame) == [{"op": 1, "t": "#commit"}, {"seq": 2**62}]


lex_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20),
    st.binary(max_size=20).map(lambda b: {"$bytes": cbor.b64encode_unpadded(b)}),
)
lex_values = st.recursive(
    lex_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=6).filter(lambda k: not k.startswith("$")), inner, max_size=4),
    ),
    max_leaves=20,
)


@given(lex_values)
def test_lex_json_round_trip(value: Any) -> None:
    raw = cbor.encode_lex(value)
    assert cbor.decode_lex(raw) == value
    assert cbor.to_lex_json(cbor.decode(raw)) == value


@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        cbor.decode(data)
    except cbor.DecodeError:
        pass
