"""The one-root CAR header is recognised byte for byte; anything that differs is decoded."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from psky.atproto import cbor
from psky.atproto.car import CarError, car_header, read_car, write_car
from psky.atproto.cbor import CID


def _header_body(roots: list[CID], version: int = 1) -> bytes:
    return cbor.encode({"version": version, "roots": roots})


@pytest.mark.parametrize("make", [cbor.cid_for_cbor, cbor.cid_for_raw])
def test_one_root_header_read_as_the_decoder_reads_it(make: Callable[[bytes], CID]) -> None:
    root = make(b"commit")
    block = b"\xa1\x61a\x01"
    car = read_car(write_car([root], [(cbor.cid_for_cbor(block), block)]))
    assert car.roots == [root] and type(car.roots[0]) is CID
    assert car_header([root])[1:] == _header_body([root])


def test_headers_of_the_same_length_that_differ_are_decoded() -> None:
    root = cbor.cid_for_cbor(b"commit")
    other_hash = CID(b"\x01\x71\x13\x20" + hashlib.sha256(b"x").digest())  # sha-512 code, 32 bytes
    for body, message in [
        (_header_body([root], version=2), "unsupported CAR version 2"),
        (_header_body([other_hash]), None),  # a valid CID, just not the usual prefix
    ]:
        data = bytes([len(body)]) + body
        if message is None:
            assert read_car(data).roots == [other_hash]
        else:
            with pytest.raises(CarError, match=message):
                read_car(data)


def test_bad_codec_root_is_refused_by_the_decoder() -> None:
    body = bytearray(_header_body([cbor.cid_for_cbor(b"commit")]))
    body[body.index(b"\x01\x71\x12\x20") + 1] = 0x70  # dag-pb: not an atproto codec
    with pytest.raises(CarError, match="codec"):
        read_car(bytes([len(body)]) + bytes(body))
