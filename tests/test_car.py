"""CAR v1 reading/writing: round trips, every corruption case, streaming, fuzzing."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto import cbor
from psky.atproto.car import (
    AsyncCarReader,
    CarError,
    CarFile,
    CarWriter,
    aiter_car,
    car_header,
    encode_varint,
    iter_car,
    iter_car_bytes,
    read_car,
    write_car,
)
from psky.atproto.cbor import CID


def _blocks(n: int = 5) -> list[tuple[CID, bytes]]:
    out = []
    for i in range(n):
        data = cbor.encode({"i": i, "text": "x" * i})
        out.append((cbor.cid_for_cbor(data), data))
    raw = b"raw blob bytes"
    out.append((cbor.cid_for_raw(raw), raw))
    return out


BLOCKS = _blocks()
ROOT = BLOCKS[0][0]
CAR = write_car([ROOT], BLOCKS)


def _section(cid_bytes: bytes, data: bytes) -> bytes:
    return encode_varint(len(cid_bytes) + len(data)) + cid_bytes + data


def _header(obj: object) -> bytes:
    raw = cbor.encode(obj)
    return encode_varint(len(raw)) + raw


def _all_ways(data: bytes, **kw: object) -> list[CarFile | str]:
    """Parse with every reader; each result is a CarFile or the CarError message."""
    results: list[CarFile | str] = []

    def attempt(fn: object) -> None:
        try:
            results.append(fn())  # type: ignore[operator]
        except CarError as e:
            results.append(f"error: {e}")

    attempt(lambda: read_car(data, **kw))  # type: ignore[arg-type]
    attempt(lambda: iter_car(io.BytesIO(data), chunk_size=7, **kw).read_all())  # type: ignore[arg-type]
    attempt(lambda: iter_car([data[i : i + 1] for i in range(len(data))], **kw).read_all())  # type: ignore[arg-type]

    async def run() -> CarFile:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 5):
                yield data[i : i + 5]

        return await AsyncCarReader(chunks(), **kw).read_all()  # type: ignore[arg-type]

    attempt(lambda: asyncio.run(run()))
    return results


def _expect_error(data: bytes, fragment: str, **kw: object) -> None:
    """Every reader rejects ``data`` with a CarError mentioning ``fragment``."""
    for r in _all_ways(data, **kw):
        assert isinstance(r, str), f"accepted corrupt CAR: {r}"
        assert fragment in r, r


# --- round trips ---------------------------------------------------------------------------


def test_round_trip() -> None:
    car = read_car(CAR)
    assert car.roots == [ROOT]
    assert car.root == ROOT
    assert car.blocks == dict(BLOCKS)
    assert all(type(b) is bytes for b in car.blocks.values())


def test_round_trip_every_reader() -> None:
    for r in _all_ways(CAR):
        assert isinstance(r, CarFile)
        assert r.roots == [ROOT] and r.blocks == dict(BLOCKS)


def test_streaming_yields_in_order() -> None:
    reader = iter_car(io.BytesIO(CAR))
    assert reader.roots == [ROOT]
    assert list(reader) == BLOCKS
    assert list(reader) == []  # exhausted


def test_iter_car_accepts_bytes_and_bytearray_chunks() -> None:
    assert list(iter_car(CAR)) == BLOCKS
    assert list(iter_car([bytearray(CAR[:10]), memoryview(CAR[10:])])) == BLOCKS


def test_read_car_accepts_buffer_types() -> None:
    assert read_car(bytearray(CAR)).blocks == dict(BLOCKS)
    assert read_car(memoryview(CAR)).blocks == dict(BLOCKS)


def test_read_car_rejects_non_bytes() -> None:
    with pytest.raises(CarError):
        read_car("not bytes")  # type: ignore[arg-type]


async def test_aiter_car() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(CAR), 3):
            yield CAR[i : i + 3]

    assert [b async for b in aiter_car(chunks())] == BLOCKS
    reader = AsyncCarReader(chunks())
    with pytest.raises(CarError):
        _ = reader.roots
    assert await reader.read_header() == [ROOT]
    assert reader.roots == [ROOT]
    assert [b async for b in reader] == BLOCKS


async def test_aiter_car_errors() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield CAR[:-3]

    with pytest.raises(CarError, match="ends inside the section"):
        _ = [b async for b in aiter_car(chunks())]


def test_empty_and_multiple_roots() -> None:
    car = read_car(write_car([], BLOCKS))
    assert car.roots == []
    with pytest.raises(CarError, match="no roots"):
        _ = car.root
    two = [BLOCKS[0][0], BLOCKS[1][0]]
    assert read_car(write_car(two, [])).roots == two


def test_header_only() -> None:
    car = read_car(car_header([ROOT]))
    assert car.roots == [ROOT] and car.blocks == {}
    assert list(iter_car(car_header([ROOT]))) == []


def test_header_matches_reference_bytes() -> None:
    # canonical DAG-CBOR sorts "roots" before "version"; same bytes as the reference writers
    assert car_header([]) == bytes.fromhex("11a265726f6f7473806776657273696f6e01")


def test_writers_agree() -> None:
    buf = io.BytesIO()
    w = CarWriter(buf, [ROOT])
    for cid, data in BLOCKS:
        w.write(cid, data)
    assert buf.getvalue() == CAR
    assert b"".join(iter_car_bytes([ROOT], iter(BLOCKS))) == CAR


def test_writer_type_checks() -> None:
    with pytest.raises(TypeError):
        write_car(["bafy"], [])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        write_car([], [("bafy", b"x")])  # type: ignore[list-item]


def test_varint() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(300) == b"\xac\x02"
    assert encode_varint(2**63 - 1) == b"\xff" * 8 + b"\x7f"
    with pytest.raises(ValueError):
        encode_varint(-1)


def test_large_block_two_byte_and_three_byte_lengths() -> None:
    for size in (100, 200, 20000, 300000):
        data = b"\x00" * size
        cid = cbor.cid_for_raw(data)
        car = read_car(write_car([cid], [(cid, data)]))
        assert car.blocks[cid] == data


def test_duplicate_identical_blocks_allowed() -> None:
    dup = write_car([ROOT], [*BLOCKS, BLOCKS[0], BLOCKS[0]])
    for r in _all_ways(dup):
        assert isinstance(r, CarFile) and r.blocks == dict(BLOCKS)
    assert len(list(iter_car(dup))) == len(BLOCKS) + 2


def test_duplicate_conflicting_blocks_rejected() -> None:
    cid, data = BLOCKS[0]
    bad = write_car([ROOT], [(cid, data), (cid, data + b"x")])
    _expect_error(bad, "appears twice", verify=False)
    _expect_error(bad, "does not match its CID")


def test_verify_false_skips_hash_check() -> None:
    cid = BLOCKS[0][0]
    bad = write_car([cid], [(cid, b"tampered")])
    assert read_car(bad, verify=False).blocks[cid] == b"tampered"


# --- corruption -----------------------------------------------------------------------------


def test_bad_hash_names_cid() -> None:
    cid, data = BLOCKS[1]
    bad = write_car([ROOT], [BLOCKS[0], (cid, data[:-1] + b"\x00")])
    _expect_error(bad, cid.encode())
    _expect_error(bad, "does not match its CID")


def test_bad_hash_raw_codec() -> None:
    cid, data = BLOCKS[-1]
    _expect_error(write_car([ROOT], [(cid, data + b"!")]), cid.encode())


def test_empty_input() -> None:
    _expect_error(b"", "empty CAR")


@pytest.mark.parametrize("cut", range(1, len(car_header([ROOT]))))
def test_truncated_header(cut: int) -> None:
    _expect_error(car_header([ROOT])[:cut], "header")


def test_truncated_block_every_position() -> None:
    last_len = len(_section(BLOCKS[-1][0].cid_bytes, BLOCKS[-1][1]))
    for cut in range(1, last_len):
        _expect_error(CAR[:-cut], "truncated")


def test_truncated_section_messages() -> None:
    assert "truncated" in str(_all_ways(CAR[:-1])[0])
    assert "ends inside the section" in str(_all_ways(CAR[:-1])[1])
    assert "ends inside the header" in str(_all_ways(CAR[:5])[1])


def test_bad_varints() -> None:
    _expect_error(b"\x80", "header")  # header length cut inside the varint
    _expect_error(b"\x80\x00", "not minimally encoded")
    _expect_error(b"\xff" * 12, "too long")
    hdr = car_header([ROOT])
    _expect_error(hdr + b"\x80\x00" + BLOCKS[0][0].cid_bytes, "not minimally encoded")
    _expect_error(hdr + b"\xff" * 12, "too long")
    _expect_error(hdr + b"\x81", "truncated")


def test_huge_declared_lengths() -> None:
    _expect_error(encode_varint(2**40) + b"\xa0", "declares")
    hdr = car_header([ROOT])
    _expect_error(hdr + encode_varint(2**40) + b"\x01\x71", "declares")
    _expect_error(hdr + encode_varint(2**62), "declares")


def test_huge_length_fails_before_reading_stream() -> None:
    consumed = 0

    def endless() -> Iterator[bytes]:
        nonlocal consumed
        yield car_header([ROOT]) + encode_varint(2**40)
        while True:
            consumed += 1
            yield b"\x00" * 65536

    with pytest.raises(CarError, match="declares"):
        list(iter_car(endless()))
    assert consumed == 0


def test_zero_length_section_and_header() -> None:
    _expect_error(car_header([ROOT]) + b"\x00", "zero-length section")
    _expect_error(b"\x00", "zero-length CAR header")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ({"version": 2, "roots": []}, "unsupported CAR version 2"),
        ({"version": 0, "roots": []}, "unsupported CAR version 0"),
        ({"roots": []}, "integer version"),
        ({"version": "1", "roots": []}, "integer version"),
        ({"version": True, "roots": []}, "integer version"),
        ({"version": 1}, "roots is not a list"),
        ({"version": 1, "roots": "bafy"}, "roots is not a list"),
        ({"version": 1, "roots": {"a": 1}}, "roots is not a list"),
        ({"version": 1, "roots": [1]}, "must all be CIDs"),
        ([1, []], "not a map"),
        ("hello", "not a map"),
    ],
)
def test_bad_header(header: object, fragment: str) -> None:
    _expect_error(_header(header) + _section(BLOCKS[0][0].cid_bytes, BLOCKS[0][1]), fragment)


def test_header_not_cbor() -> None:
    _expect_error(b"\x03\xff\xff\xff", "CAR header")
    # trailing bytes inside the declared header length
    raw = cbor.encode({"version": 1, "roots": []}) + b"\x00"
    _expect_error(encode_varint(len(raw)) + raw, "CAR header")


def test_header_root_cidv0_rejected() -> None:
    # a CID tag holding a CIDv0 multihash
    v0 = b"\x12\x20" + hashlib.sha256(b"x").digest()
    raw = b"\xa2\x65roots\x81\xd8\x2a\x58\x23\x00" + v0 + b"\x67version\x01"
    _expect_error(encode_varint(len(raw)) + raw, "header")


def test_cidv0_section_rejected() -> None:
    data = b"hello"
    v0 = b"\x12\x20" + hashlib.sha256(data).digest()
    _expect_error(car_header([ROOT]) + _section(v0, data), "CIDv0")


def test_unsupported_cid_version_and_codec() -> None:
    data = b"hello"
    digest = hashlib.sha256(data).digest()
    _expect_error(car_header([ROOT]) + _section(b"\x02\x71\x12\x20" + digest, data), "unsupported version 2")
    _expect_error(car_header([ROOT]) + _section(b"\x01\x70\x12\x20" + digest, data), "unsupported codec 0x70")


def test_unknown_hash_function() -> None:
    data = b"hello"
    sha512 = b"\x01\x55\x13\x40" + hashlib.sha512(data).digest()
    car = car_header([ROOT]) + _section(sha512, data)
    _expect_error(car, "unsupported hash function 0x13")
    assert read_car(car, verify=False).blocks[CID(sha512)] == data
    short = b"\x01\x55\x12\x10" + hashlib.sha256(data).digest()[:16]
    _expect_error(car_header([ROOT]) + _section(short, data), "16-byte sha-256")


def test_truncated_cid_in_section() -> None:
    hdr = car_header([ROOT])
    _expect_error(hdr + _section(b"\x01\x71\x12\x20" + b"\x00" * 10, b""), "truncated multihash")
    _expect_error(hdr + _section(b"\x01", b""), "truncated")
    _expect_error(hdr + _section(b"\x01\x71\x12", b""), "truncated")


def test_limits() -> None:
    _expect_error(CAR, "more than 3 blocks", max_blocks=3)
    assert len(read_car(CAR, max_blocks=len(BLOCKS)).blocks) == len(BLOCKS)
    big = b"\x00" * 5000
    cid = cbor.cid_for_raw(big)
    car = write_car([cid], [(cid, big)])
    _expect_error(car, "declares 5036 bytes", max_block_size=4000)  # rejected from the length alone
    _expect_error(car, "limit 4999", max_block_size=4999)
    assert read_car(car, max_block_size=5000).blocks[cid] == big


def test_max_total_size() -> None:
    with pytest.raises(CarError, match="maximum total size"):
        list(iter_car(io.BytesIO(CAR), max_total_size=len(CAR) - 1))
    assert len(list(iter_car(io.BytesIO(CAR), max_total_size=len(CAR)))) == len(BLOCKS)


def test_stream_rejects_non_bytes_chunks() -> None:
    with pytest.raises(CarError, match="expected bytes"):
        list(iter_car([CAR[:5], 42]))  # type: ignore[list-item]


# --- fuzzing --------------------------------------------------------------------------------


def _same_outcome(data: bytes) -> None:
    """All readers agree: the same CarFile, or all raise CarError (nothing else escapes)."""
    results = _all_ways(data)
    first = results[0]
    if isinstance(first, CarFile):
        for r in results[1:]:
            assert isinstance(r, CarFile) and r.roots == first.roots and r.blocks == first.blocks
    else:
        assert all(isinstance(r, str) for r in results), results


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _same_outcome(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_sections_after_valid_header(data: bytes) -> None:
    _same_outcome(car_header([ROOT]) + data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "truncate"]),
            st.integers(min_value=0, max_value=len(CAR) - 1),
            st.integers(min_value=0, max_value=255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_car(mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(CAR)
    for kind, pos, value in mutations:
        pos = min(pos, max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[pos] ^= value or 1
        elif kind == "insert":
            data.insert(pos, value)
        elif kind == "delete" and data:
            del data[pos]
        elif kind == "truncate":
            del data[pos:]
    _same_outcome(bytes(data))
    try:
        car = read_car(bytes(data))
    except CarError:
        return
    # whatever survives verification really hashes to its CID
    for cid, block in car.blocks.items():
        assert cid.cid_bytes[4:] == hashlib.sha256(block).digest()
