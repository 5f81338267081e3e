"""decode_lex skips its bounds walk unless a byte scan finds a possible problem: the scans
must never miss an integer outside 64 bits, wherever the head bytes also occur."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from psky.atproto import cbor

_IN_RANGE = [0, 2**32, 2**63 - 1, -(2**63), -1]
_OUT_OF_RANGE = [2**63, 2**64 - 1, -(2**63) - 1, -(2**64)]


def _record(n: int, noise: str) -> bytes:
    # "\x1b" and ";" (0x3b) are the 8-byte integer heads: the text puts many before the value
    return cbor.encode({"$type": "app.bsky.feed.post", "text": noise, "n": n})


@pytest.mark.parametrize("noise", ["", "\x1b", ";;;", "\x1b;" * 40, "\x1b" * 500])
@pytest.mark.parametrize("value", _OUT_OF_RANGE)
def test_out_of_range_integer_found_behind_head_bytes(noise: str, value: int) -> None:
    with pytest.raises(cbor.DecodeError, match="64-bit"):
        cbor.decode_lex(_record(value, noise))


@pytest.mark.parametrize("noise", ["", "\x1b" * 500, "\x1b;" * 40])
@pytest.mark.parametrize("value", _IN_RANGE)
def test_in_range_integers_decode(noise: str, value: int) -> None:
    assert cbor.decode_lex(_record(value, noise))["n"] == value


@given(st.binary(max_size=64))
def test_byte_scan_agrees_with_the_pattern(data: bytes) -> None:
    expected = any(data[i] in (0x1B, 0x3B) and data[i + 1] >= 0x80 for i in range(len(data) - 1))
    assert cbor._has_big_int_head(data) is expected
    many = b"\x1b\x00" * 20 + data  # past the loop's hit limit: the regular expression decides
    assert cbor._has_big_int_head(many) is expected


@given(st.lists(st.integers(min_value=-(2**64), max_value=2**64 - 1), max_size=6), st.text(max_size=40))
def test_decode_lex_refuses_exactly_the_out_of_range_integers(values: list[int], text: str) -> None:
    data = cbor.encode({"$type": "x", "t": text, "v": values})
    if all(-(2**63) <= v <= 2**63 - 1 for v in values):
        assert cbor.decode_lex(data)["v"] == values
    else:
        with pytest.raises(cbor.DecodeError, match="64-bit"):
            cbor.decode_lex(data)
