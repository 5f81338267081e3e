"""The operator subcommands: ``psky status``, ``psky dlq``, ``psky reconcile`` and ``psky replay``.

Kept out of :mod:`psky.cli` so that the services' command wiring and the tools' evolve
apart; :func:`register` adds them to the main parser.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from psky.errors import UserError

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``status`` and ``dlq`` to the ``psky`` subcommand parsers *sub*."""
    st = sub.add_parser("status", help="streams, groups, cursors, dead letters, row counts, warnings")
    st.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECS",
                    help="refresh every SECS seconds (default 2) and show rates")
    st.add_argument("--json", action="store_true", help="one JSON object per snapshot")
    st.add_argument("--exact", action="store_true", help="count every table exactly (slow on big tables)")
    st.add_argument("--prefix", default="", help="key prefix of the stream and cursor names (default none)")
    st.add_argument("--relay", action="append", default=[], metavar="HOST",
                    help="show this relay's cursors (default: INGESTER_RELAY_HOSTS); repeatable")
    st.add_argument("--labeler", action="append", default=[], metavar="HOST",
                    help="show this labeler's cursor (default: INGESTER_LABELER_HOSTS); repeatable")
    st.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)
    st.set_defaults(func=_cmd_status)

    dlq = sub.add_parser("dlq", help="list, show, replay or purge dead-letter streams (<stream>_dlq)")
    dsub = dlq.add_subparsers(dest="action", metavar="ACTION")

    def common(p: argparse.ArgumentParser, *, selection: bool = True) -> None:
        p.add_argument("--prefix", default="", help="key prefix of the stream names (default none)")
        p.add_argument("--json", action="store_true", help="JSON output")
        if selection:
            p.add_argument("--reason", metavar="TEXT", help="only entries whose reason contains TEXT")
            p.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                           help="only this entry (repeatable)")

    ls = dsub.add_parser("list", help="entries per dead-letter stream, counted by reason")
    ls.add_argument("streams", nargs="*", metavar="DLQ", help="default: every *_dlq stream")
    common(ls, selection=False)
    ls.set_defaults(func=_cmd_dlq)

    sh = dsub.add_parser("show", help="print entries, decoded")
    sh.add_argument("streams", nargs=1, metavar="DLQ")
    sh.add_argument("-n", "--count", type=int, default=10, help="entries to show (default 10)")
    common(sh)
    sh.set_defaults(func=_cmd_dlq)

    rp = dsub.add_parser("replay", help="move entries back to the stream they came from (at-least-once)")
    rp.add_argument("streams", nargs=1, metavar="DLQ")
    rp.add_argument("-n", "--count", type=int, default=None, help="replay at most N entries (default all)")
    rp.add_argument("--to", metavar="STREAM", help="target stream (default: each entry's origin)")
    common(rp)
    rp.set_defaults(func=_cmd_dlq)

    pg = dsub.add_parser("purge", help="delete entries for good (needs --yes)")
    pg.add_argument("streams", nargs=1, metavar="DLQ")
    pg.add_argument("-n", "--count", type=int, default=None, help="delete at most N entries (default all)")
    pg.add_argument("--yes", action="store_true", help="really delete")
    common(pg)
    pg.set_defaults(func=_cmd_dlq)
    dlq.set_defaults(func=lambda _args: _no_action(dlq))

    rc = sub.add_parser("reconcile", help="fetch repos, verify, and make the database match them (indexRepo)")
    rc.add_argument("dids", nargs="*", metavar="DID")
    rc.add_argument("--file", "-f", action="append", default=[], metavar="F",
                    help="read DIDs from F, one per line ('-': stdin; '#' comments); repeatable")
    rc.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                    help="IP, CIDR or host name the PDS may be at although private (adds to "
                         "BACKFILLER_ALLOW_HOSTS); repeatable")
    rc.add_argument("--json", action="store_true", help="one JSON object per DID")
    rc.set_defaults(func=_cmd_reconcile)

    rp_ = sub.add_parser("replay", help="re-read a labeler's or relay's stream window into Redis (cursor untouched)")
    rsub = rp_.add_subparsers(dest="source", metavar="SOURCE")

    def replay_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", required=True, help="labeler or relay host (URL or host[:port])")
        p.add_argument("--until", type=int, default=None, metavar="SEQ", help="stop after this seq (inclusive)")
        p.add_argument("--idle", type=float, default=5.0, metavar="SECS",
                       help="caught up once nothing arrives for SECS seconds (default 5)")
        p.add_argument("--json", action="store_true", help="JSON summary")

    lb = rsub.add_parser("labels", help="subscribeLabels from a cursor (default 0: negations applied again)")
    lb.add_argument("--stream", default=None, help="target stream (default INGESTER_LABEL_STREAM or label_live)")
    lb.add_argument("--from-cursor", type=int, default=0, metavar="N", help="start after seq N (default 0)")
    replay_common(lb)
    lb.set_defaults(func=_cmd_replay)

    fh = rsub.add_parser("firehose", help="subscribeRepos from a cursor, up to --until or caught up")
    fh.add_argument("--stream", default=None,
                    help="target stream (default INGESTER_FIREHOSE_STREAM or firehose_live)")
    fh.add_argument("--cursor", type=int, required=True, metavar="N", help="start after seq N")
    replay_common(fh)
    fh.set_defaults(func=_cmd_replay)
    rp_.set_defaults(func=lambda _args: _no_action(rp_))


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _cmd_status(args: argparse.Namespace) -> int:
    from psky.ops.status import StatusOptions, run_status

    if args.watch is not None and args.watch <= 0:
        raise UserError("--watch: the interval must be positive", 2)
    env = dict(os.environ)
    if args.relay:
        env["INGESTER_RELAY_HOSTS"], env["INGESTER_HOSTS"] = ",".join(args.relay), ""
    if args.labeler:
        env["INGESTER_LABELER_HOSTS"] = ",".join(args.labeler)
    options = StatusOptions(prefix=args.prefix, exact=args.exact, hosts=StatusOptions.hosts_from_env(env))
    try:
        return asyncio.run(run_status(options=options, as_json=args.json, watch=args.watch,
                                      iterations=args.iterations))
    except KeyboardInterrupt:
        return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from psky.ops.dlq import run_dlq
    from psky.ops.status import embedded_urls, redact
    from psky.streams import connect

    count = getattr(args, "count", None)
    if count is not None and count < 1:
        raise UserError("--count must be at least 1", 2)

    async def run() -> int:
        async with embedded_urls(dict(os.environ), need_postgres=False) as (url, _pg):
            if isinstance(url, BaseException):
                raise UserError(f"Redis: {url}")
            redis = connect(url, socket_connect_timeout=10)
            try:
                return await run_dlq(redis, args.action, streams=args.streams, prefix=args.prefix, count=count,
                                     reason=getattr(args, "reason", None), ids=getattr(args, "ids", ()),
                                     to=getattr(args, "to", None), yes=getattr(args, "yes", False),
                                     as_json=args.json)
            except (RedisError, OSError) as e:
                raise UserError(f"Redis {redact(url)}: {e}") from None
            finally:
                await redis.aclose()

    return asyncio.run(run())


def _read_dids(args: argparse.Namespace) -> list[str]:
    import sys

    from psky.atproto.syntax import is_valid_did

    dids = list(args.dids)
    for name in args.file:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--file {name}: {e.strerror or e}", 2) from None
        dids += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    dids = list(dict.fromkeys(d for d in dids if d))
    if not dids:
        raise UserError("reconcile: give at least one DID (arguments or --file)", 2)
    bad = [d for d in dids if not is_valid_did(d)]
    if bad:
        raise UserError(f"reconcile: not a DID: {bad[0]!r:.200}", 2)
    return dids


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from psky.config import ConfigError
    from psky.ops.reconcile import ReconcileOptions, run_reconcile
    from psky.ops.status import embedded_urls

    dids = _read_dids(args)
    env = dict(os.environ)
    try:
        options = ReconcileOptions.from_env(env, args.allow_host)
    except ConfigError as e:
        raise UserError(str(e), 2) from None

    async def run() -> int:
        async with embedded_urls(env, need_postgres=True) as (_redis, pg):
            if pg is None or isinstance(pg, BaseException):
                raise UserError(f"PostgreSQL: {pg}")
            return await run_reconcile(dids, pg, options, as_json=args.json)

    return asyncio.run(run())


def _cmd_replay(args: argparse.Namespace) -> int:
    import orjson
    from redis.exceptions import RedisError

    from psky.config import ConfigError
    from psky.ingester.config import IngesterConfig, normalize_host
    from psky.ops.replay import replay_firehose, replay_labels
    from psky.ops.status import embedded_urls, redact
    from psky.streams import connect

    if args.idle <= 0:
        raise UserError("--idle must be positive", 2)
    env = dict(os.environ)
    try:
        config = IngesterConfig.from_env(env)
        host = normalize_host(args.host)
    except (ConfigError, ValueError) as e:
        raise UserError(str(e), 2) from None

    async def run() -> int:
        async with embedded_urls(env, need_postgres=False) as (url, _pg):
            if isinstance(url, BaseException):
                raise UserError(f"Redis: {url}")
            redis = connect(url, socket_connect_timeout=10)
            try:
                if args.source == "labels":
                    result = await replay_labels(redis, config, host, stream=args.stream or config.label_stream,
                                                 from_cursor=args.from_cursor, until=args.until, idle_s=args.idle)
                else:
                    result = await replay_firehose(redis, config, host, stream=args.stream or config.firehose_stream,
                                                   cursor=args.cursor, until=args.until, idle_s=args.idle)
            except (RedisError, OSError) as e:
                raise UserError(f"Redis {redact(url)}: {e}") from None
            finally:
                await redis.aclose()
        print(orjson.dumps(result.to_obj()).decode() if args.json else result.summary(), flush=True)
        return 0 if result.ok else 1

    return asyncio.run(run())
