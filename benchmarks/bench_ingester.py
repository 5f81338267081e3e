"""Ingester throughput: a seeded devnet relay replayed from cursor 0 into ``firehose_live``.

A devnet (PLC + PDSes + relay) runs in a child process, seeded with ``--accounts`` accounts
of about ``--records`` records each, so the relay holds that many frames. The ingester in
this process then reads the relay's whole ``subscribeRepos`` history once per verification
mode (``off``, ``lenient``, ``strict``: each a separate cursor and stream) and the figures
printed are frames/s and events/s into Redis, CPU of this process and its peak RSS, and how
many DID documents the devnet PLC served and how many of those requests overlapped at most.
``--plc-latency-ms`` delays every DID document (after seeding) like a distant directory: each
mode starts with a cold key cache, so this shows how well resolutions overlap processing.
``--live-events N --from-live`` measures live-like traffic instead: after seeding, the devnet
applies N live events (single creates, likes by popularity, deletes: mostly one-op commits, as
on the network) and each mode reads only those, with cold caches.
A mode with ``-warm`` (``lenient-warm``) starts with every author's DID document cached, as
on a live firehose where nearly every commit comes from an account seen before. ``raw`` only
reads the frames (the relay's ceiling on this machine). Each mode also prints its steady
state (10% to 90% of the frames) and the CPU per frame of this process, and a verifying mode
the time one K-256 check takes alone right after it (on a shared VM the same run moves by
20% from hour to hour: that line says which hour it was).
The issue's goals on one core: >= 30,000 frames/s unverified, >= 10,000 verified, <= 150 MB.

``--backpressure-seconds N`` measures memory under backpressure instead: the devnet keeps
producing live events (``--live-rate`` per second) while the ingester fills ``firehose_live``
up to ``--high-water-mark`` and nobody consumes it, so the ingester has to stop reading the
relay for N seconds. RSS of this process is printed every ``--sample-seconds`` with the
max-min spread at the end (it must stay flat: bounded queues, TCP flow control holds the relay).

Redis: ``REDIS_URL`` if set, else an embedded server in a temporary directory.

Usage: python benchmarks/bench_ingester.py [--accounts 500] [--records 40] [--pds 2]
       [--modes raw,off,lenient,lenient-warm] [--profile] [--plc-latency-ms 50]
       [--live-events 50000 --from-live]
       [--backpressure-seconds N [--live-rate 200] [--high-water-mark 5000] [--sample-seconds 5]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import multiprocessing
import os
import pstats
import resource
import tempfile
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

from prometheus_client import CollectorRegistry

from psky.devnet.network import Devnet
from psky.identity import IdentityResolver
from psky.ingester import IngesterConfig, run_ingester
from psky.ops.embedded import EmbeddedServices
from psky.runtime import tune_gc
from psky.streams import connect, cursor_key


def _devnet_main(conn: Connection, n_pds: int, accounts: int, records: int, live_rate: float,
                 plc_latency_ms: float = 0.0, live_events: int = 0) -> None:
    async def main() -> None:
        async with Devnet(n_pds=n_pds, seed=13, labeler=False) as net:
            started = time.perf_counter()
            workload = net.workload()
            await workload.seed(accounts=accounts, records_per_account=records, labels=0)
            seeded = await net.settle(timeout_s=600)
            if live_events:  # then live traffic: mostly one-op commits, as on the network
                await workload.live(rate=None, events=live_events)
            seq = await net.settle(timeout_s=600)
            assert net.relay is not None
            conn.send((net.relay.url, net.plc.url, seeded, seq, time.perf_counter() - started))
            net.plc.document_delay_ms = plc_latency_ms  # seeding ran at full speed
            live = asyncio.create_task(workload.live(rate=live_rate, duration=1e9)) if live_rate > 0 else None
            loop = asyncio.get_running_loop()
            while True:  # answer questions until told to stop
                question = await loop.run_in_executor(None, conn.recv)
                if question == "seq":
                    conn.send(net.relay.seq)
                elif question == "plc":  # DID document requests since the last question
                    conn.send((net.plc.document_requests, net.plc.max_documents_in_flight))
                    net.plc.reset_document_counters()
                else:
                    break
            if live is not None:
                live.cancel()

    asyncio.run(main())


def _rss_mb() -> float:
    """Current (not peak) resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.asynccontextmanager
async def _redis_url() -> AsyncIterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="psky-bench-") as tmp:
        async with EmbeddedServices(tmp, redis=True, postgres=False) as services:
            yield services.redis_url()


async def _raw(relay: str, start: int, seq: int) -> None:
    """Only read the relay's frames (no decoding, no Redis): what the relay serves on this
    machine, the ceiling of every other figure."""
    import aiohttp

    url = f"{relay.replace('http', 'ws', 1)}/xrpc/com.atproto.sync.subscribeRepos?cursor={start}"
    frames = 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.ws_connect(url, compress=0, max_msg_size=0) as ws:
        while frames < seq - start:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            frames += 1
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"read only (the relay's ceiling): {frames} frames in {elapsed:.2f}s, {frames / elapsed:,.0f} frames/s; "
          f"CPU {cpu:.2f}s in this process ({cpu / elapsed * 100:.0f}% of one core)")


def _k256_reference_us(checks: int = 3000) -> float:
    """µs per lone K-256 signature check right now: the floor of a verified frame, and a gauge
    of how fast this (possibly shared) machine runs at the moment."""
    from psky.atproto.crypto import PrivateKey

    key = PrivateKey.generate("k256")
    data = b"\xa5" + bytes(range(256))  # about a commit's unsigned bytes
    sig = key.sign(data)
    public = key.public_key()
    started = time.process_time()
    for _ in range(checks):
        public.verify(data, sig)
    return (time.process_time() - started) / checks * 1e6


async def _one(url: str, relay: str, plc: str, start: int, seq: int, mode: str, profile: bool,
               conn: Connection) -> None:
    if mode == "raw":
        await _raw(relay, start, seq)
        return
    resolver = None
    if mode.endswith("-warm"):  # every author's DID document cached beforehand, as on a live firehose
        mode = mode.removesuffix("-warm")
        resolver = await _warm_resolver(relay, plc)
    prefix = f"bench:{os.getpid()}:{mode}:"
    config = IngesterConfig.from_env({
        "REDIS_URL": url, "INGESTER_MODE": "firehose", "INGESTER_RELAY_HOSTS": relay, "PLC_URL": plc,
        "INGESTER_FIREHOSE_STREAM": prefix + "firehose_live", "INGESTER_REPO_STREAM": prefix + "repo_backfill",
        "INGESTER_VERIFY": mode, "INGESTER_FIREHOSE_START_CURSOR": str(start), "INGESTER_METRICS_PORT": "-1",
        "INGESTER_HIGH_WATER_MARK": "0", "INGESTER_BATCH_SIZE": os.environ.get("INGESTER_BATCH_SIZE", "500"),
    })
    redis = connect(url)
    key = cursor_key(config.firehose_stream, relay)
    stop = asyncio.Event()
    registry = CollectorRegistry()
    profiler = cProfile.Profile() if profile else None
    loop = asyncio.get_running_loop()
    conn.send("plc")  # reset the devnet PLC's request counters
    await loop.run_in_executor(None, conn.recv)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    task = asyncio.create_task(run_ingester(config, stop=stop, registry=registry))
    incoming = {"host": config.relay_hosts[0]}
    # steady state: between 10% and 90% of the frames read (start-up, the first DID documents
    # and the last batch's flush timer left out); (time, frames, CPU) at each mark
    marks: list[tuple[float, float, float]] = []
    try:
        while True:
            value = await redis.get(key)
            if (value is not None and int(value) >= seq) or task.done():
                break
            read = registry.get_sample_value("firehose_ingester_incoming_events_total", incoming) or 0.0
            if len(marks) < 2 and read >= (seq - start) * (0.1 if not marks else 0.9):
                usage = resource.getrusage(resource.RUSAGE_SELF)
                marks.append((time.perf_counter(), read, usage.ru_utime + usage.ru_stime))
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats(os.environ.get("PSKY_PROFILE_SORT", "tottime")).print_stats(30)
        stop.set()
        await task
        events = int(await redis.xlen(config.firehose_stream))
        frames = registry.get_sample_value("firehose_ingester_incoming_events_total", {"host": config.relay_hosts[0]})
        failures = sum(
            s.value for m in registry.collect() for s in m.samples
            if s.name == "ingester_verification_failures_total"
        )
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        conn.send("plc")
        plc_requests, plc_overlap = await loop.run_in_executor(None, conn.recv)
        print(f"verify={mode}{' (DID documents cached beforehand)' if resolver else ''}: {frames or 0:.0f} frames, {events} events in {elapsed:.2f}s "
              f"({failures:.0f} verification failures)")
        print(f"  {(frames or 0) / elapsed:,.0f} frames/s, {events / elapsed:,.0f} events/s; "
              f"CPU {cpu:.2f}s in this process ({cpu / elapsed * 100:.0f}% of one core), "
              f"peak RSS {cpu1.ru_maxrss / 1024:.0f} MB")
        print(f"  {plc_requests} DID document requests at the PLC, at most {plc_overlap} at once")
        if mode != "off":
            print(f"  reference: one K-256 check alone takes {_k256_reference_us():.1f} µs on this machine now "
                  "(a shared VM's speed moves: compare runs by it)")
        reconnects = sum(s.value for m in registry.collect() for s in m.samples if s.name == "ingester_reconnects_total")
        retries = sum(s.value for m in registry.collect() for s in m.samples
                      if s.name == "ingester_stream_write_retries_total")
        if reconnects or retries:
            print(f"  {reconnects:.0f} reconnects, {retries:.0f} stream write retries (duplicates are possible)")
        if len(marks) == 2:
            (t0, f0, c0), (t1, f1, c1) = marks
            per_frame = (c1 - c0) / (f1 - f0) * 1e6
            print(f"  steady state (10%..90% of the frames): {(f1 - f0) / (t1 - t0):,.0f} frames/s, "
                  f"{per_frame:.1f} µs CPU per frame in this process (one core: {1e6 / per_frame:,.0f} frames/s)")
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        if resolver is not None:
            await resolver.close()


async def _warm_resolver(relay: str, plc: str) -> IdentityResolver:
    """A resolver holding every repo's DID document (listed by the relay's listRepos)."""
    import aiohttp

    resolver = IdentityResolver(plc)
    async with aiohttp.ClientSession() as session:
        cursor = None
        while True:
            params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
            async with session.get(f"{relay}/xrpc/com.atproto.sync.listRepos", params=params) as resp:
                page = await resp.json()
            for repo in page.get("repos", []):
                await resolver.resolve(repo["did"])
            cursor = page.get("cursor")
            if not cursor or not page.get("repos"):
                return resolver


async def _backpressure(url: str, relay: str, plc: str, conn: Connection, args: argparse.Namespace) -> None:
    prefix = f"bench:{os.getpid()}:backpressure:"
    mark = args.high_water_mark
    config = IngesterConfig.from_env({
        "REDIS_URL": url, "INGESTER_MODE": "firehose", "INGESTER_RELAY_HOSTS": relay, "PLC_URL": plc,
        "INGESTER_FIREHOSE_STREAM": prefix + "firehose_live", "INGESTER_REPO_STREAM": prefix + "repo_backfill",
        "INGESTER_VERIFY": "lenient", "INGESTER_FIREHOSE_START_CURSOR": "0", "INGESTER_METRICS_PORT": "-1",
        "INGESTER_HIGH_WATER_MARK": str(mark),
    })
    redis = connect(url)
    loop = asyncio.get_running_loop()

    async def relay_seq() -> int:
        conn.send("seq")
        return int(await loop.run_in_executor(None, conn.recv))

    key = cursor_key(config.firehose_stream, relay)
    stop = asyncio.Event()
    registry = CollectorRegistry()
    task = asyncio.create_task(run_ingester(config, stop=stop, registry=registry))
    try:
        for _ in range(6000):  # until the stream is full (10 minutes at most)
            if int(await redis.xlen(config.firehose_stream)) >= mark or task.done():
                break
            await asyncio.sleep(0.1)
        print(f"stream at its high-water mark ({mark} entries); holding it there for "
              f"{args.backpressure_seconds:g}s while the relay produces {args.live_rate:g} events/s")
        started = loop.time()
        samples: list[float] = []
        seq0 = await relay_seq()
        while not task.done():
            elapsed = loop.time() - started
            rss = _rss_mb()
            samples.append(rss)
            cursor = int(await redis.get(key) or 0)
            print(f"  t={elapsed:6.1f}s  RSS {rss:7.1f} MB  stream {int(await redis.xlen(config.firehose_stream)):6d}"
                  f"  ingester cursor {cursor:7d}  relay seq {await relay_seq():7d}", flush=True)
            if elapsed >= args.backpressure_seconds:
                break
            await asyncio.sleep(min(args.sample_seconds, args.backpressure_seconds - elapsed))
        produced = await relay_seq() - seq0
        waits = registry.get_sample_value("ingester_backpressure", {"stream": config.firehose_stream})
        reconnects = sum(s.value for m in registry.collect() for s in m.samples
                         if s.name == "ingester_reconnects_total")
        print(f"relay produced {produced} frames meanwhile; backpressure gauge {waits}; reconnects {reconnects:.0f}")
        print(f"RSS over {len(samples)} samples: min {min(samples):.1f} MB, max {max(samples):.1f} MB, "
              f"spread {max(samples) - min(samples):.1f} MB "
              f"(after the first sample: {max(samples[1:] or samples) - min(samples[1:] or samples):.1f} MB)")
    finally:
        stop.set()
        await task
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def bench(args: argparse.Namespace) -> None:
    parent, child = multiprocessing.Pipe()
    live_rate = args.live_rate if args.backpressure_seconds else 0.0
    proc = multiprocessing.get_context("spawn").Process(
        target=_devnet_main,
        args=(child, args.pds, args.accounts, args.records, live_rate, args.plc_latency_ms, args.live_events),
        daemon=True,
    )
    proc.start()
    try:
        relay, plc, seeded, seq, seed_s = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        print(f"seeded {seeded} relay frames, {seq - seeded} live ones after them, in {seed_s:.1f}s "
              f"(devnet in a child process)")
        start = seeded if args.from_live else 0
        if start:
            print(f"each mode reads the live frames only (cursor {start}); its caches start cold")
        async with _redis_url() as url:
            if args.backpressure_seconds:
                await _backpressure(url, relay, plc, parent, args)
                return
            for mode in args.modes.split(","):
                await _one(url, relay, plc, start, seq, mode.strip(), args.profile, parent)
    finally:
        parent.send("stop")
        proc.join(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=500)
    p.add_argument("--records", type=int, default=40)
    p.add_argument("--pds", type=int, default=2)
    p.add_argument("--modes", default="off,lenient")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--backpressure-seconds", type=float, default=0.0,
                   help="hold firehose_live at its high-water mark this long and sample RSS")
    p.add_argument("--live-rate", type=float, default=200.0, help="live events/s the devnet produces meanwhile")
    p.add_argument("--high-water-mark", type=int, default=5000)
    p.add_argument("--live-events", type=int, default=0,
                   help="live events the devnet applies after seeding (as fast as it can)")
    p.add_argument("--from-live", action="store_true",
                   help="read only the live frames (from the cursor where seeding ended)")
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--plc-latency-ms", type=float, default=0.0,
                   help="delay every DID document the devnet PLC serves (a distant directory, cold cache)")
    tune_gc(os.environ)  # as the psky services do (PSKY_GC_GEN0; psky/runtime.py)
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
