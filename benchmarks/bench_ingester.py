"""Ingester throughput: a seeded devnet relay replayed from cursor 0 into ``firehose_live``.

A devnet (PLC + PDSes + relay) runs in a child process, seeded with ``--accounts`` accounts
of about ``--records`` records each, so the relay holds that many frames. The ingester in
this process then reads the relay's whole ``subscribeRepos`` history once per verification
mode (``off``, ``lenient``, ``strict``: each a separate cursor and stream) and the figures
printed are frames/s and events/s into Redis, CPU of this process and its peak RSS.
The issue's goals on one core: >= 30,000 frames/s unverified, >= 10,000 verified, <= 150 MB.

Redis: ``REDIS_URL`` if set, else an embedded server in a temporary directory.

Usage: python benchmarks/bench_ingester.py [--accounts 500] [--records 40] [--pds 2]
       [--modes off,lenient] [--profile]
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
from psky.ingester import IngesterConfig, run_ingester
from psky.ops.embedded import EmbeddedServices
from psky.streams import connect, cursor_key


def _devnet_main(conn: Connection, n_pds: int, accounts: int, records: int) -> None:
    async def main() -> None:
        async with Devnet(n_pds=n_pds, seed=13, labeler=False) as net:
            started = time.perf_counter()
            await net.workload().seed(accounts=accounts, records_per_account=records, labels=0)
            seq = await net.settle(timeout_s=600)
            assert net.relay is not None
            conn.send((net.relay.url, net.plc.url, seq, time.perf_counter() - started))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop

    asyncio.run(main())


@contextlib.asynccontextmanager
async def _redis_url() -> AsyncIterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="psky-bench-") as tmp:
        async with EmbeddedServices(tmp, redis=True, postgres=False) as services:
            yield services.redis_url()


async def _one(url: str, relay: str, plc: str, seq: int, mode: str, profile: bool) -> None:
    prefix = f"bench:{os.getpid()}:{mode}:"
    config = IngesterConfig.from_env({
        "REDIS_URL": url, "INGESTER_MODE": "firehose", "INGESTER_RELAY_HOSTS": relay, "PLC_URL": plc,
        "INGESTER_FIREHOSE_STREAM": prefix + "firehose_live", "INGESTER_REPO_STREAM": prefix + "repo_backfill",
        "INGESTER_VERIFY": mode, "INGESTER_FIREHOSE_START_CURSOR": "0", "INGESTER_METRICS_PORT": "-1",
        "INGESTER_HIGH_WATER_MARK": "0",
    })
    redis = connect(url)
    key = cursor_key(config.firehose_stream, relay)
    stop = asyncio.Event()
    registry = CollectorRegistry()
    profiler = cProfile.Profile() if profile else None
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    task = asyncio.create_task(run_ingester(config, stop=stop, registry=registry))
    try:
        while True:
            value = await redis.get(key)
            if (value is not None and int(value) >= seq) or task.done():
                break
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
        print(f"verify={mode}: {frames or 0:.0f} frames, {events} events in {elapsed:.2f}s "
              f"({failures:.0f} verification failures)")
        print(f"  {(frames or 0) / elapsed:,.0f} frames/s, {events / elapsed:,.0f} events/s; "
              f"CPU {cpu:.2f}s in this process ({cpu / elapsed * 100:.0f}% of one core), "
              f"peak RSS {cpu1.ru_maxrss / 1024:.0f} MB")
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def bench(args: argparse.Namespace) -> None:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_devnet_main, args=(child, args.pds, args.accounts, args.records), daemon=True
    )
    proc.start()
    try:
        relay, plc, seq, seed_s = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        print(f"seeded {seq} relay frames in {seed_s:.1f}s (devnet in a child process)")
        async with _redis_url() as url:
            for mode in args.modes.split(","):
                await _one(url, relay, plc, seq, mode.strip(), args.profile)
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
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
