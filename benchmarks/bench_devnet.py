"""Devnet throughput: the relay's firehose on loopback, and seeding a network.

1. Relay replay mode: a relay in its own process is preloaded (``Relay.preload``) with
   ``--events`` re-sequenced ``#commit`` frames built by psky's repo writer (posts, likes,
   follows; 1-3 writes per commit, real signatures and sync 1.1 proofs); a ``websockets``
   client in this process subscribes from cursor 0 and counts what arrives. Printed:
   events/s and MB/s received, then events/s when the client also runs
   ``firehose.decode_frame`` on every frame. The requirement is >= 20,000 events/s.
2. Seeding (unless ``--skip-seed``): a two-PDS devnet (PLC, PDSes, relay, labeler) in this
   process; ``Workload.seed(accounts, records_per_account)`` is timed, then the time until
   the relay has re-sequenced every PDS event. The requirement is < 60 s for 1,000 accounts
   with about 100 records each.

Usage: python benchmarks/bench_devnet.py [--events N] [--repos R] [--accounts A]
       [--records M] [--skip-seed]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

import websockets

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import decode_frame
from psky.atproto.repo import RepoWriter
from psky.atproto.syntax import make_tid

TIME = "2024-05-01T12:00:00.000Z"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "relays", "keep", "flowing", "into", "appviews", "and", "feeds"]


def _record(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    ref = {
        "uri": f"at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3kabc{i % 1000:07d}",
        "cid": cbor.cid_for_cbor(i.to_bytes(8, "big")).encode(),
    }
    kind = rng.randrange(10)
    if kind < 3:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 40)))
        return "app.bsky.feed.post", {"$type": "app.bsky.feed.post", "text": text, "createdAt": TIME, "langs": ["en"]}
    if kind < 8:
        return "app.bsky.feed.like", {"$type": "app.bsky.feed.like", "subject": ref, "createdAt": TIME}
    return "app.bsky.graph.follow", {
        "$type": "app.bsky.graph.follow",
        "subject": "did:plc:bv6ggog3tya2z3vxsub7hnal",
        "createdAt": TIME,
    }


def generate_frames(repos: int, commits: int, seed: int = 1) -> list[bytes]:
    """``repos`` repositories × ``commits`` commits, as the ``#commit`` frames a PDS sends."""
    rng = random.Random(seed)
    frames: list[bytes] = []
    seq = 0
    base_us = 1_714_000_000_000_000
    for r in range(repos):
        did = "did:plc:" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(24))
        repo = RepoWriter(did, PrivateKey.generate("k256"))
        seq += 1
        frames.append(repo.initial.to_frame(seq=seq, time=TIME))
        for c in range(commits):
            writes: list[tuple[str, str, str, dict[str, Any] | None]] = []
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                collection, record = _record(rng, seq)
                rkey = make_tid(base_us + (r * commits + c) * 1000 + len(writes), r % 1024)
                writes.append(("create", collection, rkey, record))
            seq += 1
            frames.append(repo.apply_writes(writes).to_frame(seq=seq, time=TIME))
    return frames


# --- 1. relay replay throughput --------------------------------------------------------------


def _relay_process(conn: Connection, events: int, repos: int) -> None:
    asyncio.run(_serve_relay(conn, events, repos))


async def _serve_relay(conn: Connection, events: int, repos: int) -> None:
    from psky.devnet.relay import Relay

    t0 = time.perf_counter()
    frames = generate_frames(repos, max(1, min(events, 20_000) // repos))
    gen_s = time.perf_counter() - t0
    relay = await Relay(max_lag=events + 1).start()
    t1 = time.perf_counter()
    while relay.seq < events:  # repeat the generated frames until the stream is long enough
        relay.preload(frames[: events - relay.seq])
    preload_s = time.perf_counter() - t1
    nbytes = sum(len(f) for _, f in relay.sequencer.frames_after(0))
    conn.send({"url": relay.url, "gen_s": gen_s, "preload_s": preload_s, "frames": len(frames), "bytes": nbytes})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    await relay.stop()


async def _consume(url: str, n: int, decode: bool) -> tuple[float, int, int]:
    """Receive ``n`` frames from cursor 0; returns (seconds, bytes, last seq)."""
    ws_url = url.replace("http://", "ws://") + "/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
    nbytes = 0
    last = b""
    async with websockets.connect(ws_url, max_size=None, compression=None) as ws:
        t0 = time.perf_counter()
        for _ in range(n):
            msg = await ws.recv(decode=False)
            nbytes += len(msg)
            if decode:
                decode_frame(msg)
            last = msg
        elapsed = time.perf_counter() - t0
    ev = decode_frame(last)
    return elapsed, nbytes, int(getattr(ev, "seq", -1))


def bench_relay(events: int, repos: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_relay_process, args=(child, events, repos), daemon=True)
    proc.start()
    try:
        info = parent.recv()
        print(
            f"relay replay: {info['frames']:,} distinct #commit frames generated in {info['gen_s']:.1f}s, "
            f"{events:,} re-sequenced into the relay in {info['preload_s']:.1f}s "
            f"({info['bytes'] / events:,.0f} B/frame)"
        )
        best = 0.0
        for decode in (False, True):
            elapsed, nbytes, last_seq = asyncio.run(_consume(info["url"], events, decode))
            if last_seq != events:
                raise SystemExit(f"stream ended at seq {last_seq}, expected {events}")
            rate = events / elapsed
            what = "received + decode_frame" if decode else "received"
            print(f"  websockets client, {what}: {rate:,.0f} events/s, {nbytes / elapsed / 1e6:,.1f} MB/s")
            if not decode:
                best = rate
        verdict = "ok" if best >= 20_000 else "BELOW the 20,000 events/s requirement"
        print(f"  requirement >= 20,000 events/s: {verdict}")
        return best
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# --- 2. seeding ---------------------------------------------------------------------------------


async def bench_seed(accounts: int, records: int) -> float:
    from psky.devnet.network import Devnet

    async with Devnet(n_pds=2, seed=1) as net:
        workload = net.workload()
        t0 = time.perf_counter()
        await workload.seed(accounts=accounts, records_per_account=records)
        seed_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        relay_seq = await net.settle(timeout_s=600)
        settle_s = time.perf_counter() - t1
        stats = workload.stats
        print(
            f"seeding {accounts:,} accounts x ~{records} records: {seed_s:.1f}s "
            f"({stats['writes']:,} writes in {stats['commits']:,} commits, {stats['blobs']:,} blobs; "
            f"{stats['writes'] / seed_s:,.0f} writes/s)"
        )
        print(f"  relay caught up {settle_s:.2f}s later at seq {relay_seq:,}")
        verdict = "ok" if seed_s < 60 else "ABOVE the 60 s requirement"
        print(f"  requirement < 60 s for 1,000 x 100: {verdict}")
        return seed_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--events", type=int, default=200_000, help="frames the relay serves (default 200000)")
    ap.add_argument("--repos", type=int, default=200, help="distinct repositories in the generated frames")
    ap.add_argument("--accounts", type=int, default=1000, help="accounts to seed (default 1000)")
    ap.add_argument("--records", type=int, default=100, help="records per seeded account (default 100)")
    ap.add_argument("--skip-seed", action="store_true", help="only measure the relay firehose")
    args = ap.parse_args()
    bench_relay(args.events, args.repos)
    if not args.skip_seed:
        asyncio.run(bench_seed(args.accounts, args.records))
    print(f"peak RSS (this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
