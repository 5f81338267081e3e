"""Protocol-core throughput on one core: firehose frames, repository CARs, records.

Prints, for synthetic but realistically shaped data built with psky's own repo writer:
  - #commit frames/s decoded + CAR-parsed + sync 1.1 proof-checked, without and with
    signature verification (K-256, cached key), and converted to stream events;
  - repository CAR MB/s read + every block hash-checked + MST walked strictly + records decoded;
  - records/s converted from DAG-CBOR to lex JSON and validated against the lexicons;
  - peak RSS.
Usage: python benchmarks/bench_protocol.py [--records N] [--frames N] [--seconds S]
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from collections.abc import Callable
from typing import Any

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import (
    NATIVE_COMMITS,
    CommitEvent,
    check_commit_frame,
    decode_frame,
    process_commit,
    to_stream_events,
)
from psky.atproto.lexicon import Lexicons
from psky.atproto.repo import RepoWriter, build_repo, verify_repo
from psky.atproto.syntax import make_tid

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "bluesky", "posts", "keep", "flowing", "through", "relays", "into", "appviews", "feeds", "labelers", "and", "everything", "else"]


def _tid(rng: random.Random, base_us: int, i: int) -> str:
    return make_tid(base_us + i * 1000 + rng.randrange(1000), rng.randrange(1024))


def make_record(rng: random.Random, kind: str, i: int) -> dict[str, Any]:
    created = f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T12:{i % 60:02d}:{(i * 7) % 60:02d}.000Z"
    ref = {"uri": f"at://{DID}/app.bsky.feed.post/3kabc{i % 1000:07d}",
           "cid": cbor.cid_for_cbor(i.to_bytes(8, "big")).encode()}
    if kind == "post":
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 40)))
        rec: dict[str, Any] = {"$type": "app.bsky.feed.post", "text": text, "createdAt": created, "langs": ["en"]}
        if i % 3 == 0:
            rec["reply"] = {"root": ref, "parent": ref}
        return rec
    if kind == "like":
        return {"$type": "app.bsky.feed.like", "subject": ref, "createdAt": created}
    return {"$type": "app.bsky.graph.follow", "subject": "did:plc:bv6ggog3tya2z3vxsub7hnal", "createdAt": created}


KINDS = [("post", "app.bsky.feed.post", 3), ("like", "app.bsky.feed.like", 5), ("follow", "app.bsky.graph.follow", 2)]


def pick(rng: random.Random) -> tuple[str, str]:
    r = rng.randrange(10)
    for kind, coll, weight in KINDS:
        if r < weight:
            return kind, coll
        r -= weight
    return KINDS[-1][0], KINDS[-1][1]


def rate(fn: Callable[[], int], seconds: float) -> tuple[float, int]:
    """Run fn (which returns how many items it did) repeatedly for about `seconds`."""
    done = 0
    start = time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, done


def bench_frames(n_frames: int, seconds: float, key: PrivateKey) -> None:
    rng = random.Random(1)
    writer = RepoWriter(DID, key)
    base = 1_700_000_000_000_000
    # history first, so that proofs walk a realistically deep tree (~5k records)
    for i in range(50):
        writes = []
        for j in range(100):
            kind, coll = pick(rng)
            writes.append(("create", coll, _tid(rng, base, i * 100 + j), make_record(rng, kind, i * 100 + j)))
        writer.apply_writes(writes)
    frames = []
    for i in range(n_frames):
        writes = []
        for j in range(rng.choice((1, 1, 1, 2, 3))):
            kind, coll = pick(rng)
            writes.append(("create", coll, _tid(rng, base + 10**12, i * 3 + j), make_record(rng, kind, i)))
        frames.append(writer.apply_writes(writes).to_frame(seq=i + 1, time="2024-01-01T00:00:00.000Z"))
    avg = sum(map(len, frames)) / len(frames)
    did_key = key.public_key().did_key()

    def decode_only() -> int:
        for f in frames:
            decode_frame(f)
        return len(frames)

    def unsigned() -> int:
        for f in frames:
            ev = decode_frame(f)
            assert isinstance(ev, CommitEvent)
            res = process_commit(ev, signing_key=None)
            assert res.proof and not res.reasons
            to_stream_events(res, ev)
        return len(frames)

    def signed() -> int:
        for f in frames:
            ev = decode_frame(f)
            assert isinstance(ev, CommitEvent)
            res = process_commit(ev, signing_key=did_key)
            assert res.signature and res.proof and not res.reasons
            to_stream_events(res, ev)
        return len(frames)

    verifier = key.public_key()

    def native_off() -> int:
        for f in frames:
            assert check_commit_frame(f, verify=False) is not None
        return len(frames)

    def native_signed() -> int:
        for f in frames:
            checked = check_commit_frame(f, verify=True)
            assert checked is not None and checked.unsigned is not None and checked.sig is not None
            assert verifier.verify(checked.unsigned, checked.sig)
        return len(frames)

    signed_parts: list[tuple[bytes, bytes]] = []
    for f in frames if NATIVE_COMMITS else ():
        checked = check_commit_frame(f, verify=True)
        assert checked is not None and checked.unsigned is not None and checked.sig is not None
        signed_parts.append((checked.unsigned, checked.sig))

    def signature_only() -> int:
        for unsigned_bytes, sig in signed_parts:
            assert verifier.verify(unsigned_bytes, sig)
        return len(signed_parts)

    print(f"firehose #commit frames ({len(frames)} distinct, {avg:.0f} bytes avg, 1-3 ops, tree of ~5k records)")
    r, _ = rate(decode_only, seconds)
    print(f"  decode frame only                                   {r:>10,.0f} frames/s")
    r, _ = rate(unsigned, seconds)
    print(f"  decode + CAR + proof check + events (no signature)  {r:>10,.0f} frames/s   goal >= 30,000")
    r, _ = rate(signed, seconds)
    print(f"  ... + K-256 signature verification                  {r:>10,.0f} frames/s   goal >= 10,000")
    if not NATIVE_COMMITS:
        print("  (native fast path not built or PSKY_NATIVE=0: no native figures)")
        return
    r, _ = rate(native_off, seconds)
    print(f"  native fast path, unverified: decode + events JSON  {r:>10,.0f} frames/s")
    r, _ = rate(native_signed, seconds)
    print(f"  native fast path, verified: + hashes, proof, K-256  {r:>10,.0f} frames/s")
    r, _ = rate(signature_only, seconds)
    print(f"  K-256 signature verification alone (libsecp256k1)   {r:>10,.0f} signatures/s")


def bench_car(n_records: int, seconds: float, key: PrivateKey) -> None:
    rng = random.Random(2)
    base = 1_600_000_000_000_000
    records = {}
    for i in range(n_records):
        kind, coll = pick(rng)
        records[f"{coll}/{_tid(rng, base, i)}"] = make_record(rng, kind, i)
    t0 = time.perf_counter()
    _cid, car = build_repo(DID, key, records)
    build_s = time.perf_counter() - t0
    mb = len(car) / 1e6
    did_key = key.public_key().did_key()

    def verify() -> int:
        repo = verify_repo(car, did=DID)
        assert repo.commit.verify(did_key) and repo.mst_ok
        n = sum(1 for _ in repo.records())
        assert n == n_records
        return 1

    print(f"repository CAR ({n_records:,} records, {mb:.1f} MB; built in {build_s:.1f} s)")
    r, _ = rate(verify, seconds)
    print(f"  read + hash every block + strict MST walk + decode records  {r * mb:>8,.1f} MB/s "
          f"({r * n_records:,.0f} records/s)   goal >= 50 MB/s")


def bench_records(seconds: float) -> None:
    rng = random.Random(3)
    lex = Lexicons.load()
    samples = []
    for i in range(2000):
        kind, coll = pick(rng)
        samples.append((coll, cbor.encode_lex(make_record(rng, kind, i))))

    def convert() -> int:
        for _coll, raw in samples:
            cbor.decode_lex(raw)
        return len(samples)

    def convert_validate() -> int:
        for coll, raw in samples:
            lex.validate_record(coll, cbor.decode_lex(raw))
        return len(samples)

    print("records (mix: 30% posts, 50% likes, 20% follows)")
    r, _ = rate(convert, seconds)
    print(f"  DAG-CBOR -> lex JSON                                {r:>10,.0f} records/s")
    r, _ = rate(convert_validate, seconds)
    print(f"  DAG-CBOR -> lex JSON + lexicon validation           {r:>10,.0f} records/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=60_000, help="records in the benchmark repository")
    ap.add_argument("--frames", type=int, default=2_000, help="distinct #commit frames")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = ap.parse_args()
    key = PrivateKey.generate("k256")
    print("psky protocol benchmark (one process, one core)\n")
    bench_frames(args.frames, args.seconds, key)
    print()
    bench_car(args.records, args.seconds, key)
    print()
    bench_records(args.seconds)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:,.0f} MB")


if __name__ == "__main__":
    main()
