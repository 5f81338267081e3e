"""The ``INGESTER_VERIFY=off`` commit path (the relay is trusted).

:func:`~psky.atproto.firehose.process_commit` parses every block of a commit's CAR slice
into CID objects and decodes the commit block; with nothing to verify, only the record
blocks its ops name are needed. This path indexes the slice by raw CID bytes (no hashing,
no CID objects) and decodes just those records (indexing costs ~6 µs a commit instead of
~20; decoding the records is then most of the rest). It covers the usual
shape only (CIDv1 sha-256 blocks under 16 KiB, the commit block present, every op well
formed, every record present and decodable); anything else goes through ``process_commit``,
so failure reasons and events are the same, except for the checks "off" skips anyway
(signature, proof, block hashes, the commit block's own fields).
"""

from __future__ import annotations

from psky.atproto import cbor
from psky.atproto.firehose import (
    MAX_COMMIT_BLOCKS_BYTES,
    MAX_OPS,
    MAX_RECORD_BYTES,
    CommitEvent,
    CommitResult,
    RecordOp,
    _split_path,
    process_commit,
)

__all__ = ["process_commit_unverified"]

_CID_LEN = 36  # CIDv1, one-byte codec, sha2-256 multihash (0x12 0x20 + 32 bytes)


def _index(data: bytes) -> dict[bytes, bytes] | None:
    """Record bytes by raw CID bytes, or None when the CAR is not of the usual shape."""
    try:
        pos = data[0] + 1  # header length as a one-byte varint; the header itself is not needed
        end = len(data)
        if not 1 < pos <= 0x80 or pos >= end:
            return None
        out: dict[bytes, bytes] = {}
        while pos < end:
            b = data[pos]
            if b < 0x80:
                slen, spos = b, pos + 1
            else:
                b2 = data[pos + 1]
                if b2 >= 0x80 or b2 == 0:
                    return None
                slen, spos = (b & 0x7F) | (b2 << 7), pos + 2
            stop = spos + slen
            if (slen < _CID_LEN or stop > end or data[spos] != 1 or data[spos + 1] >= 0x80
                    or data[spos + 2] != 0x12 or data[spos + 3] != 0x20):
                return None
            out[data[spos:spos + _CID_LEN]] = data[spos + _CID_LEN:stop]
            pos = stop
        return out
    except IndexError:
        return None


def process_commit_unverified(ev: CommitEvent) -> CommitResult:
    """The record operations of *ev* without any verification (see the module doc)."""
    blocks = None
    if len(ev.blocks) <= MAX_COMMIT_BLOCKS_BYTES and len(ev.ops) <= MAX_OPS:
        blocks = _index(ev.blocks)
    if blocks is None or ev.commit.cid_bytes not in blocks:
        return process_commit(ev, signing_key=None, check_proof=False, verify_blocks=False)
    ops: list[RecordOp] = []
    seen: set[str] = set()
    for op in ev.ops:
        path, action, cid = op.path, op.action, op.cid
        split = _split_path(path)  # a path it accepts is also a valid repo path (MST key)
        if split is None or path in seen:
            break
        collection, rkey = split
        seen.add(path)
        if action == "delete":
            if cid is not None:
                break
            ops.append(RecordOp("delete", collection, rkey, None, None, op.prev))
            continue
        if cid is None or (action == "create" and op.prev is not None) or action not in ("create", "update"):
            break
        block = blocks.get(cid.cid_bytes)
        if block is None or len(block) > MAX_RECORD_BYTES:
            break
        try:
            record = cbor.decode_lex(block)
        except cbor.DecodeError:
            break
        if type(record) is not dict:
            break
        ops.append(RecordOp(action, collection, rkey, cid, record, op.prev))
    else:
        result = CommitResult(ev.seq, ev.repo, ev.rev, ev.commit)
        result.ops = ops
        return result
    # something unusual: the general path reports it exactly
    return process_commit(ev, signing_key=None, check_proof=False, verify_blocks=False)
