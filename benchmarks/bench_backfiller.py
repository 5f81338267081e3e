"""Backfiller throughput: whole repos from a seeded devnet into ``firehose_backfill``.

A devnet (PLC + PDSes) runs in a child process and is seeded with ``--accounts`` accounts of
about ``--records`` records each; every account is queued on ``repo_backfill``; then one
backfiller in this process (full verification: block hashes, commit signature against the
DID document key, MST, DID) drains the queue into ``firehose_backfill``. Printed: repos/s,
events/s, MB/s of CAR, CPU seconds of this process and its peak RSS. The issue's goal is
>= 26,700 events/s (10x the TypeScript backfiller's 2,668) at <= 150 MB RSS.

Redis: ``REDIS_URL`` if set, else an embedded server in a temporary directory.

Usage: python benchmarks/bench_backfiller.py [--accounts 2000] [--records 45] [--pds 2]
       [--concurrency 20] [--profile]
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

from psky.backfiller import Backfiller, BackfillerConfig
from psky.devnet.network import Devnet
from psky.ops.embedded import EmbeddedServices
from psky.streams import BackfillRequest, backfill_fields, connect


def _proc_cpu(pid: int | None) -> float:
    """CPU seconds used so far by process *pid* (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _devnet_main(conn: Connection, n_pds: int, accounts: int, records: int) -> None:
    async def main() -> None:
        async with Devnet(n_pds=n_pds, seed=11, labeler=False) as net:
            started = time.perf_counter()
            manifest = await net.workload().seed(
                accounts=accounts, records_per_account=records, churn=0.0, labels=0
            )
            n_records = sum(len(a.records) for a in manifest.accounts.values())
            conn.send((net.plc.url, list(manifest.accounts), n_records, time.perf_counter() - started))
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


async def bench(args: argparse.Namespace) -> None:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_devnet_main, args=(child, args.pds, args.accounts, args.records), daemon=True
    )
    proc.start()
    try:
        plc_url, dids, n_records, seed_s = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
        print(
            f"seeded {len(dids)} accounts, {n_records} records in {seed_s:.1f}s (devnet in a child process)"
        )
        async with _redis_url() as url:
            prefix = f"bench:{os.getpid()}:"
            cfg = BackfillerConfig(
                redis_url=url,
                consumer="bench",
                group=f"{prefix}group",
                backfill_stream=f"{prefix}repo_backfill",
                firehose_stream=f"{prefix}firehose_backfill",
                dlq_stream=f"{prefix}dlq",
                concurrency=args.concurrency,
                plc_url=plc_url,
                allow_hosts=("127.0.0.1",),
                host_concurrency=args.concurrency,
                host_rate=0.0,
                high_water_mark=0,
            )
            redis = connect(url)
            try:
                pipe = redis.pipeline(transaction=False)
                for did in dids:
                    pipe.xadd(cfg.backfill_stream, backfill_fields(BackfillRequest(did=did, host="")))  # type: ignore[arg-type]
                await pipe.execute()
                backfiller = Backfiller(cfg, redis)
                stop = asyncio.Event()
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                devnet_cpu0 = _proc_cpu(proc.pid)
                started = time.perf_counter()
                profiler = cProfile.Profile() if args.profile else None
                if profiler is not None:
                    profiler.enable()
                task = asyncio.create_task(backfiller.run(stop))
                while True:  # poll: the run has no "queue empty" signal of its own
                    if backfiller.totals.repos >= len(dids) or task.done():
                        break
                    await asyncio.sleep(0.02)
                elapsed = time.perf_counter() - started
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                devnet_cpu = _proc_cpu(proc.pid) - devnet_cpu0
                if profiler is not None:
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats(
                        os.environ.get("PSKY_PROFILE_SORT", "tottime")
                    ).print_stats(40)
                stop.set()
                await task
                await backfiller.close()
                events = int(await redis.xlen(cfg.firehose_stream))
                fetched = (
                    backfiller.metrics.registry.get_sample_value("backfiller_bytes_fetched_total") or 0.0
                )
                cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                print(
                    f"backfilled {backfiller.totals.repos} repos, {backfiller.totals.records} records "
                    f"({events} events incl. repo events) in {elapsed:.2f}s"
                )
                print(
                    f"  {backfiller.totals.repos / elapsed:,.0f} repos/s, {events / elapsed:,.0f} events/s, "
                    f"{fetched / elapsed / 1e6:.1f} MB/s of CAR ({fetched / 1e6:.1f} MB)"
                )
                print(
                    f"  CPU {cpu:.2f}s in this process (user {cpu1.ru_utime - cpu0.ru_utime:.2f}s, "
                    f"system {cpu1.ru_stime - cpu0.ru_stime:.2f}s; {cpu / elapsed * 100:.0f}% of one core), "
                    f"peak RSS {cpu1.ru_maxrss / 1024:.0f} MB; "
                    f"{cpu / max(events, 1) * 1e6:.1f} µs CPU per event"
                )
                print(f"  devnet (PLC + PDSes, child process) CPU {devnet_cpu:.2f}s")
                keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
                if keys:
                    await redis.delete(*keys)
            finally:
                await redis.aclose()
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=2000)
    p.add_argument("--records", type=int, default=45)
    p.add_argument("--pds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="print a cProfile of the backfill phase")
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
