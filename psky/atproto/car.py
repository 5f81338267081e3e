"""CAR v1 archives: the container for repo exports (``getRepo``) and firehose ``blocks``.

Layout: ``varint(len) header`` then sections ``varint(len) CID block``; the header is the
DAG-CBOR map ``{version: 1, roots: [CID, ...]}``. Block CIDs are binary CIDv1 (dag-cbor or
raw codec); with ``verify`` each block is hashed and checked against its CID.

This is a hot path (every firehose frame, every backfilled repo), so the whole-buffer reader
works on one ``bytes`` object with index arithmetic and takes a fast path for the usual
36-byte CIDv1/sha-256 prefix. The streaming readers keep at most one section (plus the
unconsumed tail of the current chunk) in memory and enforce a total size limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final, TypeAlias

from psky.atproto import cbor
from psky.atproto.cbor import CID

__all__ = [
    "DEFAULT_MAX_BLOCK_SIZE",
    "MAX_HEADER_SIZE",
    "AsyncCarReader",
    "CarError",
    "CarFile",
    "CarReader",
    "CarWriter",
    "aiter_car",
    "car_header",
    "encode_varint",
    "iter_car",
    "iter_car_bytes",
    "read_car",
    "write_car",
]

#: largest block accepted by default (atproto records are capped at 1,000,000 bytes)
DEFAULT_MAX_BLOCK_SIZE: Final = 2 * 1024 * 1024
#: largest header accepted: a version and a handful of roots need well under 1 KiB
MAX_HEADER_SIZE: Final = 64 * 1024
#: read size used when streaming from a file object
DEFAULT_CHUNK_SIZE: Final = 256 * 1024

_PFX_CBOR: Final = b"\x01\x71\x12\x20"
_PFX_RAW: Final = b"\x01\x55\x12\x20"
_CODEC_DAG_CBOR: Final = 0x71
_CODEC_RAW: Final = 0x55
_HASH_SHA256: Final = 0x12
_MAX_VARINT_BYTES: Final = 9  # values up to 2**63 - 1
# a section holds a CID (36 bytes usually; allow generous multihashes) plus the block
_MAX_CID_LEN: Final = 128

_sha256 = hashlib.sha256
_Chunk: TypeAlias = bytes | bytearray | memoryview


class CarError(ValueError):
    """Malformed, truncated, oversized or unverifiable CAR data."""


class _Incomplete(Exception):
    """Internal: the buffer ends inside a varint (streaming readers fetch more)."""


@dataclass(slots=True)
class CarFile:
    """A fully read CAR: header roots and raw block bytes by CID."""

    roots: list[CID]
    blocks: dict[CID, bytes]

    @property
    def root(self) -> CID:
        """The first root (atproto: the commit); CarError if the header lists none."""
        if not self.roots:
            raise CarError("CAR header has no roots")
        return self.roots[0]


# --- varints ---------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Unsigned LEB128 at ``data[pos:end]``; minimal encoding, at most 63 bits.

    Raises _Incomplete when ``end`` is reached inside the varint.
    """
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _Incomplete
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if b == 0 and pos - start > 1:
                raise CarError(f"varint at offset {start} is not minimally encoded")
            return value, pos
        shift += 7
        if pos - start >= _MAX_VARINT_BYTES:
            raise CarError(f"varint at offset {start} is too long")


def encode_varint(n: int) -> bytes:
    """Unsigned LEB128 encoding (CAR section and header lengths)."""
    if n < 0:
        raise ValueError("varint must be non-negative")
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# --- header and sections -----------------------------------------------------------------


#: the canonical header of a CAR with one root (every firehose commit): the fixed bytes
#: around the root's 36-byte CID, ``{roots: [CID], version: 1}`` with sorted keys
_ONE_ROOT_HEAD: Final = b"\xa2\x65roots\x81\xd8\x2a\x58\x25\x00"
_ONE_ROOT_TAIL: Final = b"\x67version\x01"
_ONE_ROOT_LEN: Final = len(_ONE_ROOT_HEAD) + 36 + len(_ONE_ROOT_TAIL)


def _parse_header(data: bytes, pos: int, end: int) -> list[CID]:
    """Decode and check the header object in ``data[pos:end]``."""
    if end - pos == _ONE_ROOT_LEN and data.startswith(_ONE_ROOT_HEAD, pos):
        # the usual header, byte for byte: what the decoder would return, without decoding
        cid_at = pos + len(_ONE_ROOT_HEAD)
        if data.startswith(_ONE_ROOT_TAIL, cid_at + 36) and (
            data.startswith(_PFX_CBOR, cid_at) or data.startswith(_PFX_RAW, cid_at)
        ):
            return [CID(data[cid_at : cid_at + 36])]
    try:
        header = cbor.decode(data[pos:end])
    except cbor.DecodeError as e:
        raise CarError(f"CAR header: {e}") from None
    if type(header) is not dict:
        raise CarError("CAR header is not a map")
    version = header.get("version")
    if type(version) is not int:
        raise CarError("CAR header has no integer version")
    if version != 1:
        raise CarError(f"unsupported CAR version {version} (only CARv1 is supported)")
    roots = header.get("roots")
    if type(roots) is not list:
        raise CarError("CAR header roots is not a list")
    for r in roots:
        # cbor.decode has already checked each CID's structure
        if not isinstance(r, CID):
            raise CarError("CAR header roots must all be CIDs")
    return roots


def _parse_cid_slow(data: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
    """Binary CID at ``data[pos:end]``: (cid end, hash code, digest start, digest length).

    Only CIDv1 with the dag-cbor or raw codec is accepted; CIDv0 is named in the error.
    """
    if end - pos >= 2 and data[pos] == 0x12 and data[pos + 1] == 0x20:
        raise CarError(f"block CID at offset {pos} is CIDv0; CAR sections need CIDv1")
    try:
        version, p = _read_varint(data, pos, end)
        if version != 1:
            raise CarError(f"block CID at offset {pos} has unsupported version {version}")
        codec, p = _read_varint(data, p, end)
        if codec not in (_CODEC_DAG_CBOR, _CODEC_RAW):
            raise CarError(f"block CID at offset {pos} has unsupported codec 0x{codec:x}")
        hash_code, p = _read_varint(data, p, end)
        digest_len, p = _read_varint(data, p, end)
    except _Incomplete:
        raise CarError(f"block CID at offset {pos} is truncated") from None
    if digest_len > end - p:
        raise CarError(f"block CID at offset {pos} has a truncated multihash")
    if p + digest_len - pos > _MAX_CID_LEN:
        raise CarError(f"block CID at offset {pos} is implausibly long")
    return p + digest_len, hash_code, p, digest_len


def _parse_section(data: bytes, pos: int, end: int, verify: bool) -> tuple[CID, bytes]:
    """One section body ``data[pos:end]`` (after its length varint) → (CID, block bytes)."""
    if end - pos >= 36 and (data.startswith(_PFX_CBOR, pos) or data.startswith(_PFX_RAW, pos)):
        cid = CID(data[pos : pos + 36])
        block = data[pos + 36 : end]
        if verify and not data.startswith(_sha256(block).digest(), pos + 4):
            raise CarError(f"block {cid.encode()} does not match its CID (sha-256 mismatch)")
        return cid, block
    cid_end, hash_code, dstart, dlen = _parse_cid_slow(data, pos, end)
    cid = CID(data[pos:cid_end])
    block = data[cid_end:end]
    if verify:
        if hash_code != _HASH_SHA256:
            raise CarError(f"block {cid.encode()} uses unsupported hash function 0x{hash_code:x}")
        if dlen != 32:
            raise CarError(f"block {cid.encode()} has a {dlen}-byte sha-256 digest (need 32)")
        if not data.startswith(_sha256(block).digest(), dstart):
            raise CarError(f"block {cid.encode()} does not match its CID (sha-256 mismatch)")
    return cid, block


def _add_block(blocks: dict[CID, bytes], cid: CID, block: bytes) -> None:
    existing = blocks.setdefault(cid, block)
    if existing is not block and existing != block:
        raise CarError(f"block {cid.encode()} appears twice with different contents")


# --- whole-buffer reader ----------------------------------------------------------------


def read_car(
    data: bytes | bytearray | memoryview,
    *,
    verify: bool = True,
    max_blocks: int | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
) -> CarFile:
    """Parse a complete CAR held in memory.

    ``verify`` checks every block against its CID (sha-256 only). Duplicate blocks are
    accepted when identical. ``max_blocks`` bounds the number of sections (including
    duplicates); ``max_block_size`` bounds each block.
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytearray, memoryview)):
            raise CarError(f"CAR data must be bytes, not {type(data).__name__}")
        data = bytes(data)
    end = len(data)
    if end == 0:
        raise CarError("empty CAR data")
    if data[0] < 0x80:
        hlen, pos = data[0], 1
    else:
        try:
            hlen, pos = _read_varint(data, 0, end)
        except _Incomplete:
            raise CarError("CAR header length is truncated") from None
    if hlen == 0:
        raise CarError("zero-length CAR header")
    if hlen > MAX_HEADER_SIZE:
        raise CarError(f"CAR header at offset 0 declares {hlen} bytes (limit {MAX_HEADER_SIZE})")
    if hlen > end - pos:
        raise CarError(f"CAR header is truncated ({end - pos} of {hlen} bytes)")
    roots = _parse_header(data, pos, pos + hlen)
    pos += hlen

    blocks: dict[CID, bytes] = {}
    limit = max_block_size + _MAX_CID_LEN
    count = 0
    max_count = -1 if max_blocks is None else max_blocks
    startswith = data.startswith
    sha = _sha256
    setdefault = blocks.setdefault
    while pos < end:
        # section length: one- and two-byte varints inline, the rest via the general reader
        b = data[pos]
        if b < 0x80:
            slen = b
            spos = pos + 1
        elif pos + 1 < end and data[pos + 1] < 0x80 and data[pos + 1] != 0:
            slen = (b & 0x7F) | (data[pos + 1] << 7)
            spos = pos + 2
        else:
            try:
                slen, spos = _read_varint(data, pos, end)
            except _Incomplete:
                raise CarError(f"section length at offset {pos} is truncated") from None
        if slen == 0:
            raise CarError(f"zero-length section at offset {pos}")
        if slen > limit:
            raise CarError(f"section at offset {pos} declares {slen} bytes (limit {limit})")
        send = spos + slen
        if send > end:
            raise CarError(f"section at offset {pos} is truncated ({end - spos} of {slen} bytes)")
        count += 1
        if count > max_count >= 0:
            raise CarError(f"CAR has more than {max_blocks} blocks")
        if slen >= 36 and (startswith(_PFX_CBOR, spos) or startswith(_PFX_RAW, spos)):
            cid = CID(data[spos : spos + 36])
            block = data[spos + 36 : send]
            if verify and not startswith(sha(block).digest(), spos + 4):
                raise CarError(f"block {cid.encode()} does not match its CID (sha-256 mismatch)")
        else:
            cid, block = _parse_section(data, spos, send, verify)
        if len(block) > max_block_size:
            raise CarError(f"block {cid.encode()} is {len(block)} bytes (limit {max_block_size})")
        existing = setdefault(cid, block)
        if existing is not block and existing != block:
            raise CarError(f"block {cid.encode()} appears twice with different contents")
        pos = send
    return CarFile(roots, blocks)


# --- streaming readers ------------------------------------------------------------------


class _StreamParser:
    """Sans-I/O incremental parser shared by the sync and async readers.

    It holds the unconsumed tail of the input. ``step_header``/``step_block`` either parse
    the next item or return how many buffered bytes they need; the reader then ``feed``s
    that much more from its source (or reports truncation when the source is exhausted).
    Limits are checked against declared lengths before anything is buffered.
    """

    __slots__ = (
        "_buf",
        "_count",
        "_max_block_size",
        "_max_blocks",
        "_max_total",
        "_pos",
        "_total",
        "_verify",
        "roots",
    )

    def __init__(
        self, verify: bool, max_blocks: int | None, max_block_size: int, max_total_size: int | None
    ) -> None:
        self._buf = b""
        self._pos = 0
        self._total = 0
        self._count = 0
        self._verify = verify
        self._max_blocks = max_blocks
        self._max_block_size = max_block_size
        self._max_total = max_total_size
        self.roots: list[CID] | None = None

    def feed(self, chunks: list[bytes]) -> None:
        tail = self._buf[self._pos :]
        self._buf = b"".join([tail, *chunks]) if tail else b"".join(chunks)
        self._pos = 0

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _frame(self, max_len: int, what: str) -> tuple[int, int] | int:
        """Length-prefixed item at the cursor → (body start, body end), or bytes still needed."""
        buf, pos = self._buf, self._pos
        end = len(buf)
        try:
            length, start = _read_varint(buf, pos, end)
        except _Incomplete:
            return end - pos + 1
        if length == 0:
            raise CarError(f"zero-length {what} at offset {self._total}")
        if length > max_len:
            raise CarError(f"{what} at offset {self._total} declares {length} bytes (limit {max_len})")
        frame_len = start - pos + length
        if self._max_total is not None and self._total + frame_len > self._max_total:
            raise CarError(f"CAR exceeds the maximum total size of {self._max_total} bytes")
        if start + length > end:
            return frame_len
        return start, start + length

    def step_header(self) -> int:
        """Parse the header if buffered; return 0 when done, else the bytes needed."""
        r = self._frame(MAX_HEADER_SIZE, "CAR header")
        if isinstance(r, int):
            return r
        start, end = r
        self.roots = _parse_header(self._buf, start, end)
        self._total += end - self._pos
        self._pos = end
        return 0

    def step_block(self) -> tuple[CID, bytes] | int:
        """Parse one section if buffered; else the number of bytes needed."""
        r = self._frame(self._max_block_size + _MAX_CID_LEN, "section")
        if isinstance(r, int):
            return r
        start, end = r
        self._count += 1
        if self._max_blocks is not None and self._count > self._max_blocks:
            raise CarError(f"CAR has more than {self._max_blocks} blocks")
        cid, block = _parse_section(self._buf, start, end, self._verify)
        if len(block) > self._max_block_size:
            raise CarError(f"block {cid.encode()} is {len(block)} bytes (limit {self._max_block_size})")
        self._total += end - self._pos
        self._pos = end
        return cid, block

    def truncated(self, what: str) -> CarError:
        return CarError(f"CAR is truncated: the stream ends inside the {what} at offset {self._total}")


def _as_chunk(chunk: object) -> bytes:
    if type(chunk) is bytes:
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise CarError(f"CAR stream produced {type(chunk).__name__}, expected bytes")


def _chunk_iter(source: BinaryIO | Iterable[_Chunk] | bytes, chunk_size: int) -> Iterator[_Chunk]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return iter((bytes(source),))
    read = getattr(source, "read", None)
    if read is not None:
        return iter(lambda: read(chunk_size), b"")
    return iter(source)


class CarReader:
    """Incremental CAR reader over a file object or an iterable of byte chunks.

    ``roots`` reads the header on first access; iterating yields ``(cid, block)`` pairs.
    Memory stays bounded by one section plus one chunk; ``max_total_size`` bounds the
    whole stream. Duplicates are yielded as they appear (the caller decides).
    """

    def __init__(
        self,
        source: BinaryIO | Iterable[_Chunk] | bytes,
        *,
        verify: bool = True,
        max_blocks: int | None = None,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
        max_total_size: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self._chunks = _chunk_iter(source, chunk_size)
        self._p = _StreamParser(verify, max_blocks, max_block_size, max_total_size)
        self._done = False

    def _fill(self, need: int) -> bool:
        """Buffer at least ``need`` bytes; False if the source ended first."""
        p = self._p
        have = p.buffered()
        parts: list[bytes] = []
        while have < need:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            chunk = _as_chunk(chunk)
            parts.append(chunk)
            have += len(chunk)
        if parts:
            p.feed(parts)
        return have >= need

    @property
    def roots(self) -> list[CID]:
        p = self._p
        while p.roots is None:
            need = p.step_header()
            if need and not self._fill(need):
                if p.buffered() == 0:
                    raise CarError("empty CAR stream")
                raise p.truncated("header")
        return p.roots

    def __iter__(self) -> CarReader:
        return self

    def __next__(self) -> tuple[CID, bytes]:
        if self._done:
            raise StopIteration
        _ = self.roots
        p = self._p
        while True:
            r = p.step_block()
            if not isinstance(r, int):
                return r
            if not self._fill(r):
                self._done = True
                if p.buffered() == 0:
                    raise StopIteration
                raise p.truncated("section")

    def read_all(self) -> CarFile:
        """Collect the rest of the stream into a CarFile (same duplicate rules as read_car)."""
        roots = self.roots
        blocks: dict[CID, bytes] = {}
        for cid, block in self:
            _add_block(blocks, cid, block)
        return CarFile(roots, blocks)


def iter_car(
    source: BinaryIO | Iterable[_Chunk] | bytes,
    *,
    verify: bool = True,
    max_blocks: int | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_total_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> CarReader:
    """Stream blocks from a file object or chunk iterable: see :class:`CarReader`."""
    return CarReader(
        source,
        verify=verify,
        max_blocks=max_blocks,
        max_block_size=max_block_size,
        max_total_size=max_total_size,
        chunk_size=chunk_size,
    )


class AsyncCarReader:
    """:class:`CarReader` for async chunk sources (HTTP response bodies).

    ``await reader.read_header()`` returns the roots; ``async for cid, block in reader``
    reads the header first if needed.
    """

    def __init__(
        self,
        chunks: AsyncIterable[_Chunk],
        *,
        verify: bool = True,
        max_blocks: int | None = None,
        max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
        max_total_size: int | None = None,
    ) -> None:
        self._chunks = chunks.__aiter__()
        self._p = _StreamParser(verify, max_blocks, max_block_size, max_total_size)
        self._done = False

    async def _fill(self, need: int) -> bool:
        p = self._p
        have = p.buffered()
        parts: list[bytes] = []
        while have < need:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                break
            chunk = _as_chunk(chunk)
            parts.append(chunk)
            have += len(chunk)
        if parts:
            p.feed(parts)
        return have >= need

    @property
    def roots(self) -> list[CID]:
        if self._p.roots is None:
            raise CarError("CAR header not read yet (await read_header())")
        return self._p.roots

    async def read_header(self) -> list[CID]:
        p = self._p
        while p.roots is None:
            need = p.step_header()
            if need and not await self._fill(need):
                if p.buffered() == 0:
                    raise CarError("empty CAR stream")
                raise p.truncated("header")
        return p.roots

    def __aiter__(self) -> AsyncCarReader:
        return self

    async def __anext__(self) -> tuple[CID, bytes]:
        if self._done:
            raise StopAsyncIteration
        await self.read_header()
        p = self._p
        while True:
            r = p.step_block()
            if not isinstance(r, int):
                return r
            if not await self._fill(r):
                self._done = True
                if p.buffered() == 0:
                    raise StopAsyncIteration
                raise p.truncated("section")

    async def read_all(self) -> CarFile:
        roots = await self.read_header()
        blocks: dict[CID, bytes] = {}
        async for cid, block in self:
            _add_block(blocks, cid, block)
        return CarFile(roots, blocks)


async def aiter_car(
    chunks: AsyncIterable[_Chunk],
    *,
    verify: bool = True,
    max_blocks: int | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_total_size: int | None = None,
) -> AsyncIterator[tuple[CID, bytes]]:
    """Yield ``(cid, block)`` from an async chunk source (use AsyncCarReader for the roots)."""
    reader = AsyncCarReader(
        chunks,
        verify=verify,
        max_blocks=max_blocks,
        max_block_size=max_block_size,
        max_total_size=max_total_size,
    )
    async for item in reader:
        yield item


# --- writing ------------------------------------------------------------------------------


def car_header(roots: Iterable[CID]) -> bytes:
    """Length-prefixed CARv1 header for ``roots``."""
    roots = list(roots)
    for r in roots:
        if not isinstance(r, CID):
            raise TypeError(f"CAR roots must be CIDs, not {type(r).__name__}")
    header = cbor.encode({"version": 1, "roots": roots})
    return encode_varint(len(header)) + header


def _section(cid: CID, block: bytes) -> bytes:
    if not isinstance(cid, CID):
        raise TypeError(f"block key must be a CID, not {type(cid).__name__}")
    raw = cid.cid_bytes
    return b"".join((encode_varint(len(raw) + len(block)), raw, block))


def iter_car_bytes(roots: Iterable[CID], blocks: Iterable[tuple[CID, bytes]]) -> Iterator[bytes]:
    """Stream a CAR: the header, then one chunk per section (blocks written as given)."""
    yield car_header(roots)
    for cid, block in blocks:
        yield _section(cid, bytes(block))


def write_car(roots: Iterable[CID], blocks: Iterable[tuple[CID, bytes]]) -> bytes:
    """Serialize a complete CAR in memory."""
    return b"".join(iter_car_bytes(roots, blocks))


class CarWriter:
    """Write a CAR section by section to a binary stream (header written on construction)."""

    def __init__(self, stream: BinaryIO, roots: Iterable[CID]) -> None:
        self._stream = stream
        stream.write(car_header(roots))

    def write(self, cid: CID, block: bytes) -> None:
        self._stream.write(_section(cid, bytes(block)))
