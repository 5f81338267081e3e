"""Soak and backpressure runs: is psky's memory flat and its lag bounded under sustained load?

``soak``: the devnet writes at ``--rate`` for ``--duration`` seconds while the whole pipeline
runs (real processes, scripts/fault_loop.py's harness); every ``--interval`` seconds the RSS of
each service, the stream lengths, the indexer's lag and the ingester's cursor lag are sampled
and printed. Memory is flat when each service's largest RSS in the last third of the run is at
most ``--mem-growth`` % (+16 MB) above its largest in the first third; lag is bounded when the
backlog and the indexer lag of the last third stay below the limits. Afterwards the streams
drain and the database is compared with the manifest.

``--backpressure``: the same with the indexer stopped (never started) for the whole duration and
a small ``--high-water-mark``: the streams must stop at the mark (plus one write batch), the
ingester and backfiller must not grow without bound; then the indexer starts and everything
must be indexed. With ``--slow-db-ms N`` the indexer runs the whole time instead, but every
packet between it and PostgreSQL waits N ms each way (psky/devnet/tcp_proxy.py): a database too
slow for the load, so the streams fill up to the mark and stay there while the indexer, slowed
down, keeps working; then the delay is lifted and everything must be indexed.

    .venv/bin/python scripts/soak.py                          # 600 s at 200 events/s
    .venv/bin/python scripts/soak.py --duration 60 --rate 120 # CI size
    .venv/bin/python scripts/soak.py --backpressure --duration 180 --high-water-mark 5000
    .venv/bin/python scripts/soak.py --backpressure --slow-db-ms 30 --duration 300 --high-water-mark 5000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_loop as fl  # a sibling script, not a package

from psky.devnet.tcp_proxy import LatencyProxy
from psky.streams import FIREHOSE_LIVE, REPO_BACKFILL


@dataclass
class SoakOptions:
    duration_s: float = 600.0
    interval_s: float = 5.0
    rate: float = 200.0
    accounts: int = 200
    records: int = 30
    high_water_mark: int = 0  #: 0: the services' default (100,000)
    #: the largest RSS of the last third may exceed the first third's by this much (and 16 MB)
    mem_growth_pct: float = 25.0
    #: the indexer's lag (seconds behind the newest event it committed) must stay below this
    lag_limit_s: float = 60.0
    #: entries waiting in the streams in the last third: at most this many
    backlog_limit: int = 20_000
    database_url: str | None = None
    #: backpressure with the indexer running on a database this slow (ms each way), not stopped
    slow_db_ms: float = 0.0


@dataclass
class Sample:
    t: float
    rss_mb: dict[str, float]
    streams: dict[str, int]
    indexer_lag_s: float
    ingester_lag: int  #: relay seq minus the ingester's cursor


@dataclass
class Report:
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verdict: Any = None
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    events: int = 0


async def _sample(p: Any, started: float) -> Sample:
    rss = {name: round(kb / 1024, 1) for name, kb in p.sample_rss().items()}
    metrics = await p.scrape()
    lag = max((m.get("psky_indexer_lag_seconds", 0.0) for n, m in metrics.items() if n.startswith("indexer")),
              default=0.0)  # fmt: skip
    st = await p.status()
    cursor = (await p.cursors())["firehose"] or 0
    return Sample(time.monotonic() - started, rss, await p.stream_lengths(), lag, max(0, st["relay_seq"] - cursor))


def _table(samples: list[Sample]) -> str:
    if not samples:
        return "(no samples)"
    names = list(samples[0].rss_mb)
    head = ["t(s)", *[f"{n} MB" for n in names], *fl.STREAMS, "ix lag s", "ing lag"]
    rows = [[f"{s.t:.0f}", *[f"{s.rss_mb.get(n, 0):.1f}" for n in names], *[str(s.streams[k]) for k in fl.STREAMS],
             f"{s.indexer_lag_s:.1f}", str(s.ingester_lag)] for s in samples]  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows])


def _thirds(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    n = max(1, len(samples) // 3)
    return samples[:n], samples[-n:]


def _check_memory(report: Report, opts: SoakOptions, names: list[str]) -> None:
    first, last = _thirds(report.samples)
    for name in names:
        a = max(s.rss_mb.get(name, 0.0) for s in first)
        b = max(s.rss_mb.get(name, 0.0) for s in last)
        if b > a * (1 + opts.mem_growth_pct / 100) + 16:
            report.problems.append(f"{name}: RSS grew from {a:.1f} MB (first third) to {b:.1f} MB (last third)")


def _options(opts: SoakOptions) -> Any:
    return fl.Options(accounts=opts.accounts, records=opts.records, labels=20, live=-1, rate=opts.rate,
                      high_water_mark=opts.high_water_mark, database_url=opts.database_url)  # fmt: skip


async def _verify(p: Any, report: Report) -> None:
    await p.control("POST", "/stop_live")
    await p.wait_drained(900)
    m = await p.manifest()
    async with p.db() as conn:
        v = await fl.verify(conn, m)
    v.dead_letters = await p.dead_letters()
    report.verdict = v
    report.peak_rss_mb = p.peak_rss_mb()
    report.events = p.events_processed()
    if not v.ok:
        report.problems.append(f"database differs from the manifest: {v.summary()}")


async def soak(opts: SoakOptions) -> Report:
    """Sustained load with the whole pipeline; see the module docstring."""
    report = Report()
    p = fl.Pipeline(_options(opts))
    try:
        await p.start()
        started = time.monotonic()
        while time.monotonic() - started < opts.duration_s:
            await asyncio.sleep(opts.interval_s)
            p.ensure_running()
            report.samples.append(await _sample(p, started))
        print(_table(report.samples), flush=True)
        _check_memory(report, opts, list(p.services))
        _, last = _thirds(report.samples)
        lag = max(s.indexer_lag_s for s in last)
        backlog = max(sum(n for k, n in s.streams.items() if k != REPO_BACKFILL) for s in last)
        if lag > opts.lag_limit_s:
            report.problems.append(f"indexer lag reached {lag:.1f}s in the last third (limit {opts.lag_limit_s}s)")
        if backlog > opts.backlog_limit:
            report.problems.append(f"{backlog} entries waiting in the last third (limit {opts.backlog_limit})")
        await _verify(p, report)
    finally:
        await p.close()
    return report


async def backpressure(opts: SoakOptions) -> Report:
    """The indexer stopped while the devnet writes; see the module docstring."""
    report = Report()
    hwm = opts.high_water_mark or 100_000
    p = fl.Pipeline(_options(replace(opts, high_water_mark=hwm)))
    proxy: LatencyProxy | None = None
    try:
        await p.start(services=False)
        producers = [n for n in p.services if not n.startswith("indexer")]
        watched = list(producers)
        if opts.slow_db_ms > 0:
            proxy = LatencyProxy.for_url(p.database_url, delay_s=opts.slow_db_ms / 1000)
            await proxy.start()
            for name, svc in p.services.items():
                if name.startswith("indexer"):
                    svc.env["DATABASE_URL"] = proxy.url(p.database_url)
            watched = list(p.services)
        for name in watched:
            p.services[name].start()
        started = time.monotonic()
        while time.monotonic() - started < opts.duration_s:
            await asyncio.sleep(opts.interval_s)
            p.ensure_running()
            report.samples.append(await _sample(p, started))
        print(_table(report.samples), flush=True)
        _check_memory(report, opts, watched)
        slack = 1_000  # a writer checks the mark before each batch, so one batch may overshoot
        peak = {s: max(x.streams[s] for x in report.samples) for s in fl.STREAMS}
        for stream, n in peak.items():
            if n > hwm + slack:
                report.problems.append(f"{stream} reached {n} entries (high-water mark {hwm})")
        if peak[FIREHOSE_LIVE] < hwm:
            report.problems.append(f"{FIREHOSE_LIVE} never reached the high-water mark ({peak[FIREHOSE_LIVE]} < {hwm}): "
                                   "run longer or faster")  # fmt: skip
        if proxy is not None:
            proxy.delay_s = 0.0  # the database recovers: the backlog drains
            print(f"slow database: {proxy.stats.delayed_chunks:,} chunks delayed {opts.slow_db_ms:g} ms, "
                  f"{proxy.stats.bytes / 2**20:.1f} MB through the proxy", flush=True)
        else:
            for name, svc in p.services.items():
                if name.startswith("indexer"):
                    svc.start()
        await _verify(p, report)
    finally:
        await p.close()
        if proxy is not None:
            await proxy.close()
    return report


def _print(report: Report, title: str) -> None:
    print(f"\n=== {title} ===")
    print(f"events processed  {report.events:,}")
    if report.verdict is not None:
        print(f"database          {report.verdict.summary()}")
    print("peak RSS (MB)     " + ", ".join(f"{k} {v}" for k, v in report.peak_rss_mb.items()))
    print("RESULT", "OK" if not report.problems else "FAILED: " + "; ".join(report.problems))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--rate", type=float, default=200.0, help="devnet live events per second (default 200)")
    ap.add_argument("--accounts", type=int, default=200)
    ap.add_argument("--records", type=int, default=30)
    ap.add_argument("--mem-growth", type=float, default=25.0, help="allowed RSS growth, %% (default 25)")
    ap.add_argument("--lag-limit", type=float, default=60.0, help="indexer lag limit, s (default 60)")
    ap.add_argument("--backpressure", action="store_true", help="stop the indexer; check the high-water mark")
    ap.add_argument("--high-water-mark", type=int, default=0, help="stream cap (default: services' default)")
    ap.add_argument("--slow-db-ms", type=float, default=0.0,
                    help="with --backpressure: keep the indexer running on a database this slow (ms each way)")
    ap.add_argument("--database-url", help="PostgreSQL server for a fresh database (default DATABASE_URL, else embedded)")
    args = ap.parse_args(argv)
    opts = SoakOptions(duration_s=args.duration, interval_s=args.interval, rate=args.rate, accounts=args.accounts,
                       records=args.records, high_water_mark=args.high_water_mark, mem_growth_pct=args.mem_growth,
                       lag_limit_s=args.lag_limit, slow_db_ms=args.slow_db_ms,
                       database_url=args.database_url or os.environ.get("DATABASE_URL"))  # fmt: skip
    if args.backpressure:
        report = asyncio.run(backpressure(opts))
        _print(report, "backpressure (" + ("indexer on a slow database" if opts.slow_db_ms > 0 else "indexer stopped") + ")")
    else:
        report = asyncio.run(soak(opts))
        _print(report, "soak")
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
