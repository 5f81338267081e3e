"""The `psky` command: one subcommand per service and tool.

This is the only module that knows every part of psky; each subcommand imports its part
lazily so that `psky --help` stays instant.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence

from psky import __version__
from psky.errors import UserError
from psky.ops import cli_ops


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psky", description="Bluesky AppView ingest pipeline in Python.")
    p.add_argument("--version", action="version", version=f"psky {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="the whole pipeline offline: local network, services, live view, summary")
    demo.add_argument("--accounts", type=int, default=150, help="accounts seeded in the local network (default 150)")
    demo.add_argument("--records", type=int, default=30, help="records per seeded account (default 30)")
    demo.add_argument("--duration", type=float, default=30.0, metavar="SECS",
                      help="seconds of live writes once the services run (default 30)")
    demo.add_argument("--rate", type=float, default=40.0, help="live writes per second (default 40)")
    demo.add_argument("--indexers", type=int, default=2, help="indexer processes (default 2)")
    demo.add_argument("--backfillers", type=int, default=1, help="backfiller processes (default 1)")
    demo.add_argument("--seed", type=int, default=None, help="workload seed (default: the run number)")
    demo.add_argument("--no-live", action="store_true", help="progress lines instead of the redrawn view")
    demo.add_argument("--stream-prefix", default="", metavar="P", help="prefix of every Redis key (shared Redis)")
    demo.add_argument("--summary-json", metavar="PATH", help="also write the final summary here as JSON")
    demo.add_argument("--sample", action="store_true",
                      help="only verify the bundled sample repo and firehose frames (instant, no services)")
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", help="ingester, backfillers and indexers against real relays, with a live view")
    run.add_argument("--relay", action="append", default=[], metavar="HOST",
                     help="relay to ingest (repeatable; default INGESTER_RELAY_HOSTS, else bsky.network)")
    run.add_argument("--labeler", action="append", default=[], metavar="HOST",
                     help="labeler to ingest (repeatable; default INGESTER_LABELER_HOSTS, else mod.bsky.app)")
    run.add_argument("--mode", choices=("all", "firehose", "backfill", "labeler"), default=None,
                     help="what the ingester reads (default INGESTER_MODE, else all: firehose, listRepos "
                          "backfill of every repo, labelers)")
    run.add_argument("--indexers", type=int, default=2, help="indexer processes (default 2)")
    run.add_argument("--backfillers", type=int, default=1, help="backfiller processes (default 1)")
    run.add_argument("--duration", type=float, default=None, metavar="SECS", help="stop after SECS (default: Ctrl-C)")
    run.add_argument("--no-live", action="store_true", help="progress lines instead of the redrawn view")
    run.add_argument("--stream-prefix", default="", metavar="P", help="prefix of every Redis key (shared Redis)")
    run.add_argument("--summary-json", metavar="PATH", help="also write the final summary here as JSON")
    run.set_defaults(func=_cmd_run)

    insp = sub.add_parser("inspect", help="decode and verify repositories and firehose frames")
    isub = insp.add_subparsers(dest="what", metavar="WHAT")

    car = isub.add_parser("car", help="verify a repository CAR file (com.atproto.sync.getRepo)")
    car.add_argument("file", help="path to the .car file ('-' for standard input)")
    car.add_argument("--did", help="the DID the repository must belong to")
    keysrc = car.add_mutually_exclusive_group()
    keysrc.add_argument("--plc", metavar="URL", help="resolve the signing key from this PLC directory")
    keysrc.add_argument("--key", metavar="DID_KEY", help="verify the commit signature with this did:key")
    car.add_argument("--records", action="store_true",
                     help="print the records as JSON lines in the indexer's event format")
    car.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    car.set_defaults(func=_cmd_inspect_car)

    fr = isub.add_parser("frames", help="decode subscribeRepos frames from a file or a ws:// URL")
    fr.add_argument("source", help="a frame file (see docs) or a ws:// / wss:// subscribeRepos URL")
    fr.add_argument("--limit", type=int, default=None, help="stop after N frames")
    fr.add_argument("--cursor", type=int, default=None, help="start a live subscription at this seq")
    fr.add_argument("--plc", metavar="URL", help="verify commit signatures with keys from this PLC directory")
    fr.add_argument("--key", metavar="DID_KEY", help="verify every commit against this one did:key")
    fr.set_defaults(func=_cmd_inspect_frames)
    ing = sub.add_parser("ingester", help="run the ingester: relay firehoses, listRepos, labelers -> Redis streams")
    ing.set_defaults(func=_cmd_ingester)

    bf = sub.add_parser("backfiller", help="run the backfiller: repo_backfill -> getRepo -> firehose_backfill")
    bf.set_defaults(func=_cmd_backfiller)

    idx = sub.add_parser("indexer", help="run an indexer: firehose_live/firehose_backfill/label_live -> PostgreSQL")
    idx.set_defaults(func=_cmd_indexer)

    mig = sub.add_parser("migrate", help="create or update the AppView schema in PostgreSQL")
    mig.add_argument("--database-url", help="default: DATABASE_URL / DB_POSTGRES_URL, else the embedded server")
    mig.set_defaults(func=_cmd_migrate)

    dev = sub.add_parser("devnet", help="a local AT Protocol network: PLC, PDSes, relay, labeler")
    dsub = dev.add_subparsers(dest="action", metavar="ACTION")
    up = dsub.add_parser("up", help="start the network, seed it, print its endpoints as JSON, run until Ctrl-C")
    up.add_argument("--pds", type=int, default=2, help="number of PDSes (default 2)")
    up.add_argument("--accounts", type=int, default=50, help="accounts to seed at start (default 50)")
    up.add_argument("--records", type=int, default=40, help="records per seeded account (default 40)")
    up.add_argument("--live", type=float, default=0.0, metavar="RATE", help="live writes per second (default 0)")
    up.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    up.add_argument("--faults", default="", metavar="SPEC", help="fault knobs, e.g. drop_after_frames=100,http_429_every=3")
    up.add_argument("--base-port", type=int, default=0, help="fixed ports from here (default: free ports)")
    up.add_argument("--control-port", type=int, default=0, help="port of the control API (default: free)")
    up.add_argument("--manifest", metavar="PATH", help="write the ground-truth manifest here on exit")
    up.set_defaults(func=_cmd_devnet_up)
    sd = dsub.add_parser("seed", help="seed more accounts into the running devnet")
    sd.add_argument("--accounts", type=int, default=10)
    sd.add_argument("--records", type=int, default=20)
    sd.add_argument("--control", metavar="URL", help="control URL (default: from the data dir's devnet.json)")
    sd.set_defaults(func=_cmd_devnet_seed)
    mf = dsub.add_parser("manifest", help="print (or save) the running devnet's ground-truth manifest")
    mf.add_argument("-o", "--output", metavar="PATH")
    mf.add_argument("--control", metavar="URL")
    mf.set_defaults(func=_cmd_devnet_manifest)
    cli_ops.register(sub)
    return p


async def _serve_until_signalled(run: Callable[[Mapping[str, str], asyncio.Event], Awaitable[None]],
                                 *, needs_postgres: bool = False) -> int:
    """Run one service until SIGINT/SIGTERM, then let it drain.

    Unset REDIS_URL / DATABASE_URL mean embedded servers (started here, or shared with other
    psky processes using the same data directory)."""
    from psky.runtime import tune_gc
    from psky.services import ConfigError, resolve_database_url, resolve_redis_url, service_urls

    try:
        tune_gc(os.environ)
    except ConfigError as e:
        raise UserError(str(e), 2) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    env = dict(os.environ)
    try:
        have_redis = resolve_redis_url(env) is not None
        have_pg = resolve_database_url(env) is not None or not needs_postgres
    except ConfigError as e:
        raise UserError(str(e), 2) from None
    try:
        if have_redis and have_pg:
            await run(env, stop)
        else:
            async with service_urls(env) as (redis_url, database_url):
                env.setdefault("REDIS_URL", redis_url)
                if needs_postgres:
                    env.setdefault("DATABASE_URL", database_url)
                await run(env, stop)
    except ConfigError as e:
        raise UserError(str(e), 2) from None
    return 0


def _cmd_ingester(args: argparse.Namespace) -> int:
    from psky.ingester import IngesterConfig, run_ingester

    async def run(env: Mapping[str, str], stop: asyncio.Event) -> None:
        await run_ingester(IngesterConfig.from_env(env), stop=stop)

    return asyncio.run(_serve_until_signalled(run))


def _cmd_backfiller(args: argparse.Namespace) -> int:
    from psky.backfiller import BackfillerConfig, run_backfiller

    async def run(env: Mapping[str, str], stop: asyncio.Event) -> None:
        await run_backfiller(BackfillerConfig.from_env(env), stop=stop)

    return asyncio.run(_serve_until_signalled(run))


def _cmd_indexer(args: argparse.Namespace) -> int:
    from psky.indexer import IndexerConfig, run_indexer

    async def run(env: Mapping[str, str], stop: asyncio.Event) -> None:
        await run_indexer(IndexerConfig.from_env(env), stop=stop)

    return asyncio.run(_serve_until_signalled(run, needs_postgres=True))


def _cmd_migrate(args: argparse.Namespace) -> int:
    from psky.db.migrations import migrate
    from psky.services import ConfigError, resolve_database_url, service_urls_sync

    async def run(url: str) -> list[str]:
        return await migrate(url)

    try:
        url = args.database_url or resolve_database_url()
    except ConfigError as e:
        raise UserError(str(e), 2) from None
    if url:
        applied = asyncio.run(run(url))
    else:
        with service_urls_sync() as (_redis, pg_url):
            applied = asyncio.run(run(pg_url))
    print(f"applied: {', '.join(applied)}" if applied else "schema up to date")
    return 0


def _cmd_devnet_up(args: argparse.Namespace) -> int:
    from psky.devnet.control import run_up

    if args.pds < 1 or args.accounts < 0 or args.records < 0 or args.live < 0:
        raise UserError("--pds must be at least 1; --accounts, --records and --live not negative", 2)
    return asyncio.run(run_up(n_pds=args.pds, accounts=args.accounts, records=args.records, live_rate=args.live,
                              seed=args.seed, faults=args.faults, base_port=args.base_port,
                              control_port=args.control_port, manifest=args.manifest))


def _cmd_devnet_seed(args: argparse.Namespace) -> int:
    from psky.devnet.control import run_seed

    return asyncio.run(run_seed(control=args.control, accounts=args.accounts, records=args.records))


def _cmd_devnet_manifest(args: argparse.Namespace) -> int:
    from psky.devnet.control import run_manifest

    return asyncio.run(run_manifest(control=args.control, output=args.output))


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.sample:
        from psky.inspect import run_demo as run_sample

        return run_sample()
    from psky.ops.demo import DemoOptions, run_demo

    if args.accounts < 1 or args.records < 0 or args.duration < 0 or args.rate <= 0:
        raise UserError("--accounts must be at least 1, --records and --duration not negative, --rate positive", 2)
    if args.indexers < 1 or args.backfillers < 1:
        raise UserError("--indexers and --backfillers must be at least 1", 2)
    options = DemoOptions(accounts=args.accounts, records=args.records, duration=args.duration, rate=args.rate,
                          indexers=args.indexers, backfillers=args.backfillers, seed=args.seed,
                          live=False if args.no_live else None, prefix=args.stream_prefix,
                          summary_json=args.summary_json)
    return asyncio.run(run_demo(options))


def _cmd_run(args: argparse.Namespace) -> int:
    from psky.ops.demo import RunOptions, run_pipeline

    if args.indexers < 1 or args.backfillers < 1:
        raise UserError("--indexers and --backfillers must be at least 1", 2)
    if args.duration is not None and args.duration <= 0:
        raise UserError("--duration must be positive", 2)
    options = RunOptions(relays=args.relay, labelers=args.labeler, mode=args.mode, indexers=args.indexers,
                         backfillers=args.backfillers, duration=args.duration,
                         live=False if args.no_live else None, prefix=args.stream_prefix,
                         summary_json=args.summary_json)
    return asyncio.run(run_pipeline(options))


def _cmd_inspect_car(args: argparse.Namespace) -> int:
    from psky.inspect import inspect_car

    return asyncio.run(inspect_car(args.file, did=args.did, plc=args.plc, key=args.key,
                                   records=args.records, as_json=args.json))


def _cmd_inspect_frames(args: argparse.Namespace) -> int:
    from psky.inspect import inspect_frames

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1", 2)
    return asyncio.run(inspect_frames(args.source, limit=args.limit, cursor=args.cursor,
                                      plc=args.plc, key=args.key))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from psky import logs

    try:
        logs.configure()
        status: int = args.func(args)
        return status
    except UserError as e:
        print(f"psky: {e}", file=sys.stderr)
        return e.status
    except logs.LogConfigError as e:
        print(f"psky: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
