"""`psky inspect car|frames` and `psky demo`: verify repositories and firehose frames by hand.

A frame file is what `psky inspect frames` reads offline: either one raw frame, or a
sequence of frames each preceded by its length as an unsigned LEB128 varint (the same
framing as CAR sections), which is how psky's tools and test network record firehoses.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from psky.atproto import cbor
from psky.atproto.crypto import InvalidKey, parse_did_key
from psky.atproto.firehose import (
    AccountEvent,
    CommitEvent,
    ErrorFrame,
    FrameError,
    IdentityEvent,
    InfoEvent,
    SyncEvent,
    UnknownEvent,
    decode_frame,
    process_commit,
    to_stream_events,
)
from psky.atproto.repo import RepoError, VerifiedRepo, verify_repo_stream
from psky.errors import UserError
from psky.identity import IdentityResolver, ResolutionError

SEQ_BACKFILL = -2
SAMPLES = Path(__file__).resolve().parent / "samples"
MAX_FRAME = 16 * 1024 * 1024


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _out(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.buffer.flush()


def _read_input(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _check_key(key: str) -> str:
    try:
        parse_did_key(key)
    except InvalidKey as e:
        raise UserError(f"--key: {e}", 2) from None
    return key


async def _key_from_plc(plc: str, did: str) -> str:
    async with IdentityResolver(plc) as resolver:
        try:
            return await resolver.signing_key(did)
        except ResolutionError as e:
            raise UserError(f"cannot get the signing key: {e}") from None


def _load_repo(path: str, did: str | None) -> tuple[VerifiedRepo, int]:
    """Verify the CAR's structure, streamed: only the block map is held, never the file too."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
            return verify_repo_stream([data], did=did), len(data)
        with open(path, "rb") as f:
            return verify_repo_stream(f, did=did), os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (RepoError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


async def inspect_car(path: str, *, did: str | None = None, plc: str | None = None, key: str | None = None,
                      records: bool = False, as_json: bool = False) -> int:
    if key:
        _check_key(key)
    started = time.perf_counter()
    repo, size = _load_repo(path, did)
    key_source = "--key" if key else None
    if plc and not key:
        key = await _key_from_plc(plc, repo.did)
        key_source = f"PLC {plc}"
    signature: bool | None = repo.commit.verify(key) if key else None
    elapsed = time.perf_counter() - started
    ok = (signature is not False) and repo.ok

    if records:
        return _print_records(repo, path) if ok else _report_failure(repo, path, signature)

    summary: dict[str, Any] = {
        "did": repo.did, "rev": repo.rev, "commit": repo.commit_cid.encode(), "version": repo.commit.version,
        "signature": {True: "valid", False: "INVALID", None: "not checked"}[signature],
        "key": key, "keySource": key_source,
        "mst": "ok" if repo.mst_ok else f"INVALID: {repo.mst_error}",
        "missingBlocks": [c.encode() for c in repo.missing_blocks],
        "records": sum(repo.counts.values()), "collections": dict(sorted(repo.counts.items())),
        "invalidPaths": repo.invalid_paths,
        "blocks": repo.block_count, "bytes": size, "seconds": round(elapsed, 4),
    }
    if as_json:
        _out(summary)
    else:
        w = sys.stdout.write
        w(f"repository  {repo.did}\n")
        w(f"rev         {repo.rev}\n")
        w(f"commit      {summary['commit']} (v{repo.commit.version})\n")
        w(f"signature   {summary['signature']}" + (f" (key {key}, from {key_source})" if key else
                                                   " (give --key or --plc to verify)") + "\n")
        w(f"mst         {summary['mst']}\n")
        if repo.missing_blocks:
            w(f"missing     {len(repo.missing_blocks)} record blocks, e.g. {repo.missing_blocks[0].encode()}\n")
        w(f"records     {summary['records']} in {len(repo.counts)} collections "
          f"({repo.block_count} blocks, {size / 1e6:.2f} MB, verified in {elapsed * 1000:.1f} ms)\n")
        if repo.invalid_paths:
            w(f"invalid     {len(repo.invalid_paths)} MST keys are not collection/rkey, e.g. {repo.invalid_paths[0]!r}\n")
        width = max((len(c) for c in repo.counts), default=0)
        for coll, n in sorted(repo.counts.items()):
            w(f"  {coll:<{width}}  {n}\n")
    return 0 if ok else 1


def _report_failure(repo: VerifiedRepo, path: str, signature: bool | None) -> int:
    problems = []
    if signature is False:
        problems.append("the commit signature does not verify")
    if not repo.mst_ok:
        problems.append(f"the MST is invalid ({repo.mst_error})")
    if repo.missing_records:
        problems.append(f"{len(repo.missing_records)} record blocks are missing")
    if repo.invalid_paths:
        problems.append(f"{len(repo.invalid_paths)} MST keys are not collection/rkey")
    print(f"psky: {path}: not emitting records: " + "; ".join(problems), file=sys.stderr)
    return 1


def _print_records(repo: VerifiedRepo, path: str) -> int:
    """The records as the backfiller emits them: `create` events (seq -2), then one `repo` event."""
    now = _now_iso()
    commit = repo.commit_cid.encode()
    bad = 0
    for rec in repo.records(release=True):
        line = None
        if rec.value is not None:
            try:
                line = orjson.dumps({
                    "type": "create", "seq": SEQ_BACKFILL, "time": now, "did": repo.did, "commit": commit,
                    "rev": repo.rev, "collection": rec.collection, "rkey": rec.rkey, "cid": rec.cid.encode(),
                    "record": rec.value})
            except (orjson.JSONEncodeError, TypeError) as e:
                rec = rec._replace(error=f"cannot be written as JSON: {e}")
        if line is None:
            bad += 1
            print(f"psky: {path}: skipping record {rec.path} ({rec.cid.encode()}): {rec.error}", file=sys.stderr)
            continue
        sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()
    _out({"type": "repo", "time": now, "did": repo.did, "commit": commit, "rev": repo.rev})
    return 1 if bad else 0


def iter_frame_file(data: bytes) -> Iterator[bytes]:
    """Frames of a frame file: varint-length-prefixed, or the whole file as one frame."""
    try:
        cbor.decode_multi(data)
        yield data  # a single raw frame (header + body)
        return
    except cbor.DecodeError:
        pass
    pos = 0
    while pos < len(data):
        length = shift = 0
        while True:
            if pos >= len(data) or shift > 35:
                raise UserError(f"frame file is truncated or malformed at byte {pos}")
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
        if length == 0 or length > MAX_FRAME or pos + length > len(data):
            raise UserError(f"frame file has a bad frame length {length} at byte {pos}")
        yield data[pos:pos + length]
        pos += length


def frame_file_bytes(frames: list[bytes]) -> bytes:
    """Write frames in the varint-length-prefixed frame-file format."""
    out = bytearray()
    for f in frames:
        n = len(f)
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                break
        out += f
    return bytes(out)


async def _live_frames(url: str, cursor: int | None) -> AsyncIterator[bytes]:
    import websockets

    if "subscribeRepos" not in url:
        url = url.rstrip("/") + "/xrpc/com.atproto.sync.subscribeRepos"
    if cursor is not None:
        url += ("&" if "?" in url else "?") + f"cursor={cursor}"
    try:
        async with websockets.connect(url, max_size=MAX_FRAME, open_timeout=15) as ws:
            async for msg in ws:
                if isinstance(msg, bytes):
                    yield msg
    except (OSError, websockets.WebSocketException) as e:
        raise UserError(f"cannot subscribe to {url}: {e}") from None


async def inspect_frames(source: str, *, limit: int | None = None, cursor: int | None = None,
                         plc: str | None = None, key: str | None = None) -> int:
    if key:
        _check_key(key)
    frames: AsyncIterator[bytes] | None = None
    if source.startswith(("ws://", "wss://")):
        frames = _live_frames(source, cursor)
    else:
        data = _read_input(source)

        async def _from_file() -> AsyncIterator[bytes]:
            for f in iter_frame_file(data):
                yield f

        frames = _from_file()
    resolver = IdentityResolver(plc) if plc else None
    bad = 0
    seen = 0
    try:
        async for raw in frames:
            seen += 1
            line, ok = await _describe_frame(raw, resolver, key)
            bad += 0 if ok else 1
            _out(line)
            if limit is not None and seen >= limit:
                break
    finally:
        if resolver is not None:
            await resolver.close()
    return 0 if bad == 0 else 1


async def _describe_frame(raw: bytes, resolver: IdentityResolver | None, key: str | None) -> tuple[dict[str, Any], bool]:
    try:
        ev = decode_frame(raw)
    except (FrameError, ValueError) as e:
        return {"type": "invalid-frame", "error": str(e), "bytes": len(raw)}, False
    if isinstance(ev, CommitEvent):
        signing_key = key
        note = None
        if signing_key is None and resolver is not None:
            try:
                signing_key = await resolver.signing_key(ev.repo)
            except ResolutionError as e:
                note = str(e)
        result = process_commit(ev, signing_key=signing_key)
        line: dict[str, Any] = {
            "type": "commit", "seq": ev.seq, "repo": ev.repo, "rev": ev.rev, "since": ev.since,
            "commit": ev.commit.encode(), "tooBig": ev.too_big,
            "signature": {True: "valid", False: "invalid", None: "not checked"}[result.signature],
            "proof": {True: "valid", False: "invalid", None: "not checked"}[result.proof],
            "problems": result.reasons,
            "events": to_stream_events(result, ev),
        }
        if note:
            line["keyError"] = note
        return line, not result.reasons
    if isinstance(ev, IdentityEvent):
        return {"type": "identity", "seq": ev.seq, "did": ev.did, "handle": ev.handle, "time": ev.time}, True
    if isinstance(ev, AccountEvent):
        return {"type": "account", "seq": ev.seq, "did": ev.did, "active": ev.active,
                "status": ev.status, "time": ev.time}, True
    if isinstance(ev, SyncEvent):
        return {"type": "sync", "seq": ev.seq, "did": ev.did, "rev": ev.rev, "time": ev.time}, True
    if isinstance(ev, InfoEvent):
        return {"type": "info", "name": ev.name, "message": ev.message}, True
    if isinstance(ev, ErrorFrame):
        return {"type": "error", "error": ev.error, "message": ev.message}, False
    if isinstance(ev, UnknownEvent):
        return {"type": "unknown", "t": ev.t}, True
    return {"type": type(ev).__name__}, True


def run_demo() -> int:
    """The main job until the pipeline exists: verify the bundled sample repository and frames."""
    import asyncio

    key = (SAMPLES / "sample-key.txt").read_text().strip()
    car = SAMPLES / "sample-repo.car"
    frames = SAMPLES / "sample-frames.bin"
    print(f"$ psky inspect car {car.name} --key {key}\n", flush=True)
    status = asyncio.run(inspect_car(str(car), key=key))
    print(f"\n$ psky inspect frames {frames.name} --key {key} --limit 3\n", flush=True)
    status |= asyncio.run(inspect_frames(str(frames), key=key, limit=3))
    return status
