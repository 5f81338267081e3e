"""Regenerate psky/samples/: a small signed repository and a recorded firehose, deterministic.

The sample account is fictional (its DID is not registered anywhere); its K-256 key is
derived from a fixed seed so that the files are reproducible byte for byte:
    .venv/bin/python scripts/make_samples.py
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import account_body, encode_frame, identity_body
from psky.atproto.repo import RepoWriter, build_repo
from psky.atproto.syntax import make_tid
from psky.inspect import frame_file_bytes

OUT = Path(__file__).resolve().parents[1] / "psky" / "samples"
DID = "did:plc:psky2sampleaccount4repo7"
FRIENDS = ["did:plc:bv6ggog3tya2z3vxsub7hnal", "did:plc:ewvi7nxzyoun6zhxrhs64oiz", "did:plc:z72i7hdynmk6r22z27h6tvur"]
T0 = 1_717_000_000_000_000  # µs, mid-2024
WORDS = ["atproto", "firehose", "relay", "appview", "feed", "label", "repo", "commit", "record", "sky", "blue", "post", "like", "follow", "thread"]


def when(i: int) -> str:
    s = T0 // 1_000_000 + i * 97
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(s))


def records(rng: random.Random) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "app.bsky.actor.profile/self": {"$type": "app.bsky.actor.profile", "displayName": "psky sample",
                                        "description": "A fictional account for psky's demo."},
    }
    posts: list[dict[str, str]] = []
    for i in range(60):
        rkey = make_tid(T0 + i * 1_000_000, 7)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 25)))
        rec: dict[str, Any] = {"$type": "app.bsky.feed.post", "text": text, "createdAt": when(i), "langs": ["en"]}
        if posts and i % 4 == 0:
            root = posts[0]
            parent = rng.choice(posts)
            rec["reply"] = {"root": root, "parent": parent}
        path = f"app.bsky.feed.post/{rkey}"
        cid = cbor.cid_for_cbor(cbor.encode_lex(rec)).encode()
        posts.append({"uri": f"at://{DID}/{path}", "cid": cid})
        out[path] = rec
    for i in range(80):
        subject = rng.choice(posts)
        out[f"app.bsky.feed.like/{make_tid(T0 + i * 1_000_000 + 500, 9)}"] = {
            "$type": "app.bsky.feed.like", "subject": subject, "createdAt": when(i + 60)}
    for i, friend in enumerate(FRIENDS):
        out[f"app.bsky.graph.follow/{make_tid(T0 + i * 1_000_000 + 700, 3)}"] = {
            "$type": "app.bsky.graph.follow", "subject": friend, "createdAt": when(i)}
    return out


def main() -> None:
    rng = random.Random(42)
    key = PrivateKey.from_bytes(hashlib.sha256(b"psky sample account key").digest(), "k256")
    recs = records(rng)
    OUT.mkdir(parents=True, exist_ok=True)
    _cid, car = build_repo(DID, key, recs, rev=make_tid(T0 + 10**9, 1))
    (OUT / "sample-repo.car").write_bytes(car)
    (OUT / "sample-key.txt").write_text(key.public_key().did_key() + "\n")

    writer = RepoWriter(DID, key, dict(list(recs.items())[:40]), rev=make_tid(T0 + 2 * 10**9, 1))
    frames = []
    seq = 1000
    ts = T0 + 2 * 10**9 + 1
    for i in range(12):
        ts += 1_000_000
        if i % 5 == 4:
            path = writer.entries()[-1][0]
            coll, rkey = path.split("/")
            writes: list[tuple[str, str, str, dict[str, Any] | None]] = [("delete", coll, rkey, None)]
        else:
            rkey = make_tid(ts, 5)
            writes = [("create", "app.bsky.feed.post", rkey,
                       {"$type": "app.bsky.feed.post", "text": f"live post {i}", "createdAt": when(200 + i)})]
            if i % 3 == 0:
                writes.append(("create", "app.bsky.feed.like", make_tid(ts + 1, 5),
                               {"$type": "app.bsky.feed.like", "createdAt": when(200 + i),
                                "subject": {"uri": f"at://{DID}/app.bsky.feed.post/{rkey}",
                                            "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}))
        result = writer.apply_writes(writes, rev=make_tid(ts, 1))
        seq += 1
        frames.append(result.to_frame(seq=seq, time=when(200 + i)))
    frames.append(encode_frame("#identity", identity_body(seq=seq + 1, did=DID, time=when(300), handle="sample.psky.test")))
    frames.append(encode_frame("#account", account_body(seq=seq + 2, did=DID, time=when(301), active=True)))
    (OUT / "sample-frames.bin").write_bytes(frame_file_bytes(frames))
    print(f"wrote {OUT}: repo {len(car)} bytes, {len(recs)} records; {len(frames)} frames")


if __name__ == "__main__":
    main()
