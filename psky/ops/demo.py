"""``psky demo`` and ``psky run``: the whole pipeline from one command.

``demo`` needs nothing but this machine: Redis and PostgreSQL (embedded unless
``REDIS_URL``/``DATABASE_URL`` are set), a local network (:mod:`psky.devnet`) seeded with
accounts, the ingester, backfiller(s) and indexers as separate processes, a live view, then
live writes for a while, a wait until every stage has drained, and a summary read back from
PostgreSQL, checked against the network's ground truth (the devnet's manifest). ``run`` is the same pipeline against real relays and labelers, until Ctrl-C (or
``--duration``). Both keep their state in the data directory (``PSKY_DATA_DIR``), so running
them again continues where the last run stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import asyncpg
import orjson

from psky.errors import UserError
from psky.ops.live_view import LiveView, ViewState, current_cursors
from psky.ops.pipeline import Pipeline, PipelineConfig, drain_state, service_specs
from psky.ops.status import StatusOptions, collect, redact, with_rates
from psky.streams import FIREHOSE_BACKFILL, FIREHOSE_LIVE, LABEL_LIVE, REPO_BACKFILL

__all__ = ["DEFAULT_LABELER", "DEFAULT_RELAY", "DemoOptions", "RunOptions", "format_summary", "network_check",
           "read_summary", "run_demo", "run_pipeline"]

DEFAULT_RELAY = "bsky.network"
DEFAULT_LABELER = "mod.bsky.app"
T = TypeVar("T")


@dataclass(slots=True, kw_only=True)
class DemoOptions:
    accounts: int = 150
    records: int = 30
    #: seconds of live writes after the services started
    duration: float = 30.0
    rate: float = 40.0
    pds: int = 2
    indexers: int = 2
    backfillers: int = 1
    #: workload seed; None = the run number kept in the data directory (new accounts each run)
    seed: int | None = None
    live: bool | None = None  # None: when stdout is a terminal
    interval: float = 1.0
    #: longest wait for the pipeline to drain after the live writes
    drain_timeout: float = 180.0
    prefix: str = ""
    summary_json: str | None = None


@dataclass(slots=True, kw_only=True)
class RunOptions:
    relays: list[str] = field(default_factory=list)
    labelers: list[str] = field(default_factory=list)
    #: INGESTER_MODE (None: the environment's, else all)
    mode: str | None = None
    indexers: int = 2
    backfillers: int = 1
    duration: float | None = None
    live: bool | None = None
    interval: float = 1.0
    prefix: str = ""
    summary_json: str | None = None


# --- the summary --------------------------------------------------------------------------

_COUNTS = (("accounts", 'SELECT count(*) FROM actor'), ("posts", "SELECT count(*) FROM post"),
           ("replies", 'SELECT count(*) FROM post WHERE "replyParent" IS NOT NULL'),
           ("likes", 'SELECT count(*) FROM "like"'), ("reposts", "SELECT count(*) FROM repost"),
           ("follows", "SELECT count(*) FROM follow"), ("labels", "SELECT count(*) FROM label"))
_TOP = """SELECT a.uri, a."likeCount", p.text, p.creator, actor.handle
            FROM post_agg a JOIN post p ON p.uri = a.uri LEFT JOIN actor ON actor.did = p.creator
           WHERE a."likeCount" > 0 ORDER BY a."likeCount" DESC, a.uri LIMIT $1"""
_THREAD = """SELECT "replyRoot" AS root, count(*) AS replies FROM post WHERE "replyRoot" IS NOT NULL
              GROUP BY "replyRoot" ORDER BY count(*) DESC, "replyRoot" LIMIT 1"""
_DEPTH = """WITH RECURSIVE t(uri, depth) AS (
              SELECT $1::varchar, 0
              UNION ALL
              SELECT p.uri, t.depth + 1 FROM post p JOIN t ON p."replyParent" = t.uri WHERE t.depth < 500)
            SELECT max(depth) FROM t"""
_ROOT = """SELECT p.text, p.creator, actor.handle FROM post p LEFT JOIN actor ON actor.did = p.creator
            WHERE p.uri = $1"""


async def read_summary(database_url: str, *, top: int = 3, timeout_s: float = 30.0) -> dict[str, Any]:
    """What the database holds: row counts, the most-liked posts and the thread with the most
    replies (with its depth). Exact counts: this is the proof that the data is there."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute(f"SET statement_timeout = {int(timeout_s * 1000)}")
        out: dict[str, Any] = {"database": redact(database_url)}
        for name, sql in _COUNTS:
            out[name] = int(await conn.fetchval(sql))
        out["most_liked"] = [
            {"uri": r["uri"], "likes": int(r["likeCount"]), "text": r["text"], "author": r["handle"] or r["creator"]}
            for r in await conn.fetch(_TOP, top)
        ]
        out["longest_thread"] = None
        row = await conn.fetchrow(_THREAD)
        if row is not None:
            root = await conn.fetchrow(_ROOT, row["root"])
            out["longest_thread"] = {
                "uri": row["root"], "posts": int(row["replies"]) + 1,
                "depth": int(await conn.fetchval(_DEPTH, row["root"]) or 0),
                "text": None if root is None else root["text"],
                "author": None if root is None else (root["handle"] or root["creator"]),
            }
        return out
    finally:
        await conn.close()


async def network_check(database_url: str, expected: Mapping[str, str]) -> dict[str, int]:
    """This run's ground truth (record URI → CID of the indexed collections, from the
    devnet's manifest) against the live rows of ``record``: how many are indexed with the
    right CID, missing, stale, or indexed although deleted in the network."""
    from psky.indexer.plugins import PLUGINS

    # collections the AppView does not index (e.g. newer lexicons) are not expected
    expected = {uri: cid for uri, cid in expected.items() if uri.split("/")[3] in PLUGINS}
    dids = sorted({uri.split("/")[2] for uri in expected})
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        # tombstones (json '') are deleted records, not indexed ones
        rows = await conn.fetch(
            "SELECT uri, cid FROM record WHERE did = ANY($1::varchar[]) AND json <> ''", dids
        )
    finally:
        await conn.close()
    indexed = {r["uri"]: r["cid"] for r in rows}
    matching = sum(1 for uri, cid in expected.items() if indexed.get(uri) == cid)
    return {"records": len(expected), "indexed": matching,
            "missing": sum(1 for uri in expected if uri not in indexed),
            "wrong_cid": sum(1 for uri, cid in expected.items() if uri in indexed and indexed[uri] != cid),
            "extra": sum(1 for uri in indexed if uri not in expected)}


def _quote(text: str | None, width: int = 60) -> str:
    if text is None:
        return "(root post not indexed)"
    flat = " ".join(text.split())
    return f'"{flat[:width - 1]}…"' if len(flat) > width else f'"{flat}"'


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"Summary, read from PostgreSQL ({summary['database']}):"]
    for name in ("accounts", "posts", "replies", "likes", "reposts", "follows", "labels"):
        lines.append(f"  {name:<10} {summary[name]:>10,}")
    if summary["most_liked"]:
        lines.append("  most-liked posts:")
        for p in summary["most_liked"]:
            lines.append(f"    {p['likes']:>5,} likes  @{p['author']}: {_quote(p['text'])}")
            lines.append(f"                 {p['uri']}")
    check = summary.get("network_check")
    if check is not None:
        verdict = "all there" if check["indexed"] == check["records"] and not check["extra"] else (
            f"{check['missing']:,} missing, {check['wrong_cid']:,} with an older CID, "
            f"{check['extra']:,} deleted in the network but still indexed")
        lines.append(f"  check against the network: its active accounts hold {check['records']:,} records, "
                     f"{check['indexed']:,} are indexed with the same CID ({verdict})")
    thread = summary["longest_thread"]
    if thread is not None:
        lines.append(f"  longest thread: {thread['posts']:,} posts, {thread['depth']} replies deep, "
                     f"started by @{thread['author'] or '?'}: {_quote(thread['text'])}")
        lines.append(f"                 {thread['uri']}")
    return "\n".join(lines)


# --- the common machinery -----------------------------------------------------------------


class _Monitor:
    """Collects a snapshot every *interval* seconds, keeps the latest, and draws the view."""

    def __init__(self, redis_url: str, database_url: str, options: StatusOptions, pipeline: Pipeline,
                 state: ViewState, view: LiveView | None, *, print_every: float) -> None:
        self.redis_url, self.database_url = redis_url, database_url
        self.options = options
        self.pipeline = pipeline
        self.state = state
        self.view = view
        self.print_every = print_every
        self.latest: dict[str, Any] | None = None
        self.ticks = 0
        self._started = time.monotonic()
        self._printed = 0.0
        self._scraped = time.monotonic()
        self._changed = asyncio.Event()

    async def tick(self, *, force_print: bool = False) -> dict[str, Any]:
        self.pipeline.scan_logs()  # first: it finds the children's metrics ports
        snapshot, metrics = await asyncio.gather(collect(self.redis_url, self.database_url, self.options),
                                                 self.pipeline.scrape())
        snapshot = with_rates(snapshot, self.latest)
        now = time.monotonic()
        self.state.update_metrics(metrics, now - self._scraped)
        self._scraped = now
        self.latest = snapshot
        self.ticks += 1
        self.state.elapsed_s = now - self._started
        if self.view is not None:
            now = time.monotonic()
            if self.view.tty or force_print or now - self._printed >= self.print_every:
                self._printed = now
                self.view.show(snapshot, self.pipeline, self.state)
        self._changed.set()
        return snapshot

    async def run(self, interval: float) -> None:
        while True:
            started = time.monotonic()
            await self.tick()
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))

    async def next_snapshot(self) -> dict[str, Any]:
        self._changed.clear()
        await self._changed.wait()
        assert self.latest is not None
        return self.latest


async def _until(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """*work*'s result, or None when *stop* was set first (*work* is then cancelled)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class _ChildDied(Exception):
    pass


def _check_children(pipeline: Pipeline) -> None:
    dead = pipeline.exited()
    if dead:
        child = dead[0]
        raise _ChildDied(f"{child.name} exited with status {child.returncode}; the end of {child.log_path}:\n"
                         f"{child.tail()}")


def _install_signals(stop: asyncio.Event, interrupted: list[int]) -> Callable[[], None]:
    loop = asyncio.get_running_loop()

    def handler(sig: int) -> None:
        interrupted.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig)

    def remove() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    return remove


def _quiet_in_process_logs(live: bool) -> None:
    """The devnet and migrations run in this process: their info lines would tear the
    redrawn view apart (the services' logs go to their files)."""
    if live and logging.getLogger().getEffectiveLevel() >= logging.INFO:
        for name in ("psky.devnet", "psky.db", "psky.ops.embedded"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


async def _finish(out: TextIO, pipeline: Pipeline, monitor: _Monitor | None, database_url: str,
                  summary_json: str | None, expected: Mapping[str, str] | None = None) -> dict[str, Any]:
    if monitor is not None and monitor.view is not None:
        monitor.view.release()
    _say(out, "stopping the services (they finish what they hold)...")
    codes = await pipeline.stop()
    bad = {name: code for name, code in codes.items() if code not in (0, None, -signal.SIGTERM)}
    if bad:
        _say(out, "services that did not stop cleanly: " + ", ".join(f"{n} (status {c})" for n, c in bad.items()))
    try:
        summary = await read_summary(database_url)
        if expected is not None:
            summary["network_check"] = await network_check(database_url, expected)
    except (OSError, TimeoutError, asyncpg.PostgresError) as e:  # e.g. counting a huge table timed out
        _say(out, f"summary unavailable: {type(e).__name__}: {e}")
        summary = {"database": redact(database_url), "error": str(e)}
    summary["errors"] = pipeline.errors
    summary["warnings"] = pipeline.warnings
    summary["logs"] = str(pipeline.log_dir)
    if "error" not in summary:
        _say(out, "")
        _say(out, format_summary(summary))
    _say(out, f"  service logs: {pipeline.log_dir} ({pipeline.errors} errors, {pipeline.warnings} warnings)")
    if summary_json:
        await asyncio.to_thread(Path(summary_json).write_bytes, orjson.dumps(summary))
    return summary


def _data_dir(env: Mapping[str, str]) -> Path:
    from psky.ops.embedded import data_dir

    return data_dir(env)


def _next_run_number(path: Path) -> int:
    """Runs recorded in *path*, incremented there (a fresh seed, so new accounts, per run)."""
    try:
        runs = int(orjson.loads(path.read_bytes()).get("runs", 0))
    except (OSError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        runs = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"runs": runs + 1}))
    return runs


# --- psky demo ----------------------------------------------------------------------------


async def run_demo(options: DemoOptions, *, out: TextIO | None = None, env: Mapping[str, str] | None = None) -> int:
    """The offline demo; exit status 0 when the pipeline drained, 130 when interrupted."""
    from psky.db.migrations import migrate
    from psky.devnet.network import Devnet
    from psky.services import ConfigError, service_urls

    out = out or sys.stdout
    env = dict(os.environ if env is None else env)
    data = _data_dir(env)
    stop = asyncio.Event()
    interrupted: list[int] = []
    remove_signals = _install_signals(stop, interrupted)
    live = out.isatty() if options.live is None else options.live
    _quiet_in_process_logs(live)
    seed = options.seed if options.seed is not None else _next_run_number(data / "demo.json")
    started = time.monotonic()
    try:
        _say(out, f"psky demo: data directory {data}")
        async with service_urls(env, data_dir=data) as (redis_url, database_url):
            _say(out, f"  Redis {redact(redis_url)} · PostgreSQL {redact(database_url)}")
            applied = await migrate(database_url)
            if applied:
                _say(out, f"  schema: applied {', '.join(applied)}")
            net = Devnet(n_pds=options.pds, seed=seed)
            await net.start()
            try:
                return await _demo_on(net, options, seed, redis_url, database_url, env, data, stop, interrupted,
                                      live, out, started)
            finally:
                await net.stop()
    except ConfigError as e:
        raise UserError(str(e), 2) from None
    finally:
        remove_signals()


async def _demo_on(net: Any, options: DemoOptions, seed: int, redis_url: str, database_url: str,
                   env: dict[str, str], data: Path, stop: asyncio.Event, interrupted: list[int], live: bool,
                   out: TextIO, started: float) -> int:
    from psky.devnet.network import Devnet

    assert isinstance(net, Devnet) and net.relay is not None
    endpoints = net.endpoints()
    workload = net.workload(seed)
    _say(out, f"  devnet: PLC {endpoints['plc']} · relay {endpoints['relay']} · labeler {endpoints.get('labeler')} "
              f"· {options.pds} PDS(es)")
    _say(out, f"  seeding {options.accounts} accounts with about {options.records} records each (seed {seed})...")

    async def seed_network() -> bool:
        await workload.seed(accounts=options.accounts, records_per_account=options.records)
        await net.settle(timeout_s=120)
        return True

    if not await _until(stop, seed_network()):
        _say(out, "interrupted while seeding; no service was started")
        return 130
    _say(out, f"  seeded: {workload.stats['writes']:,} writes in {workload.stats['commits']:,} commits, "
              f"relay seq {net.relay.seq:,}")
    config = PipelineConfig(
        redis_url=redis_url, database_url=database_url,
        relay_hosts=[endpoints["relay"]], labeler_hosts=[endpoints["labeler"]] if "labeler" in endpoints else [],
        indexers=options.indexers, backfillers=options.backfillers, prefix=options.prefix,
        plc_url=endpoints["plc"], handle_map=endpoints["handle_resolver_map"],
        allow_hosts=["127.0.0.1", "localhost", "::1"],
        # the seeded history reaches the database through listRepos and the backfiller;
        # the firehose starts right after it, so no live write can fall in a gap
        start_cursor=net.relay.seq,
    )
    specs = service_specs(env, config)
    pipeline = Pipeline(specs, data / "logs" / "demo")
    _say(out, f"  starting {', '.join(s.name for s in specs)} (logs in {pipeline.log_dir})")
    await pipeline.start()
    try:
        return await _demo_pipeline(net, workload, pipeline, specs[0].env, options, redis_url, database_url,
                                    stop, interrupted, live, out, started)
    finally:
        await pipeline.stop()  # a no-op after a clean finish; otherwise no child outlives us


async def _demo_pipeline(net: Any, workload: Any, pipeline: Pipeline, ingester_env: Mapping[str, str],
                         options: DemoOptions, redis_url: str, database_url: str, stop: asyncio.Event,
                         interrupted: list[int], live: bool, out: TextIO, started: float) -> int:
    status_options = StatusOptions(prefix=options.prefix, hosts=StatusOptions.hosts_from_env(ingester_env),
                                   exact=True)
    state = ViewState(title="psky demo", cursors=set(status_options.hosts))
    view = LiveView(out, tty=live)
    monitor = _Monitor(redis_url, database_url, status_options, pipeline, state, view,
                       print_every=options.interval if live else 5.0)
    monitor_task = asyncio.create_task(monitor.run(options.interval))
    drained = False
    try:
        state.phase = f"live writes at {options.rate:g}/s for {options.duration:g}s"
        live_task = asyncio.ensure_future(workload.live(rate=options.rate, duration=options.duration))

        async def watch_live() -> int:
            while not live_task.done():
                _check_children(pipeline)
                _update_heads(net, state)
                await asyncio.sleep(0.5)
            return int(live_task.result())

        try:
            written = await _until(stop, watch_live())
        finally:
            if not live_task.done():
                live_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await live_task
        if written is not None:
            await net.settle(timeout_s=60)
            _update_heads(net, state)
            state.phase = f"draining ({written:,} live writes done)"
            state.notes = [f"network: {len(workload.manifest.accounts):,} accounts, relay seq {net.relay.seq:,}"]
            drained = bool(await _until(stop, _wait_drained(monitor, pipeline, state, options.drain_timeout)))
            if not stop.is_set():
                await monitor.tick(force_print=True)
    except _ChildDied as e:
        monitor_task.cancel()
        view.release()
        _say(out, f"psky demo: {e}")
        await pipeline.stop()
        return 1
    finally:
        monitor_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor_task
    if interrupted:
        _say(out, "\ninterrupted")
    elif not drained:
        _say(out, f"the pipeline did not drain within {options.drain_timeout:g}s")
    # accounts that are not active serve no repo (getRepo refuses): only active ones count
    expected = {uri: rec["cid"] for acct in workload.manifest.accounts.values() if acct.status == "active"
                for uri, rec in acct.records.items()}
    # the run's ground truth, next to the services' logs (what `psky devnet manifest` gives)
    await asyncio.to_thread((pipeline.log_dir / "manifest.json").write_bytes, workload.manifest.to_json())
    await _finish(out, pipeline, monitor, database_url, options.summary_json, expected)
    _say(out, f"  demo took {time.monotonic() - started:.0f}s; run it again to add a new set of accounts "
              "to the same database")
    if interrupted:
        return 130
    return 0 if drained else 1


def _update_heads(net: Any, state: ViewState) -> None:
    state.heads[FIREHOSE_LIVE] = net.relay.seq
    if net.labeler is not None:
        state.heads[LABEL_LIVE] = net.labeler.seq


async def _wait_drained(monitor: _Monitor, pipeline: Pipeline, state: ViewState, timeout_s: float) -> bool:
    """True once the ingester's cursors reached the relay's and labeler's heads, listRepos is
    done, and every group has read and settled everything (two snapshots in a row)."""
    groups = {REPO_BACKFILL: 1, FIREHOSE_LIVE: 1, FIREHOSE_BACKFILL: 1, LABEL_LIVE: 1}
    deadline = time.monotonic() + timeout_s
    in_a_row = 0
    while time.monotonic() < deadline:
        snapshot = await monitor.next_snapshot()
        _check_children(pipeline)
        ok, why = drain_state(snapshot, groups=groups)
        if ok:
            ok, why = _cursors_at_heads(snapshot, state)
        in_a_row = in_a_row + 1 if ok else 0
        state.notes = state.notes[:1] + ([f"waiting: {why}"] if why else [])
        if in_a_row >= 2:
            return True
    return False


def _cursors_at_heads(snapshot: Mapping[str, Any], state: ViewState) -> tuple[bool, str]:
    heads = state.heads
    cursors = current_cursors(snapshot, state.cursors)
    for stream, head in heads.items():
        mine = [c for c in cursors if c["stream"] == stream and c.get("seq") is not None]
        if head and not any(c["seq"] >= head for c in mine):
            return False, f"{stream} cursor not yet at seq {head:,}"
    if not any(c["stream"] == REPO_BACKFILL and c["state"] == "done" for c in cursors):
        return False, "listRepos still enumerating"
    return True, ""


# --- psky run -----------------------------------------------------------------------------


async def run_pipeline(options: RunOptions, *, out: TextIO | None = None, env: Mapping[str, str] | None = None) -> int:
    """The services against real (or given) relays and labelers until Ctrl-C / *duration*."""
    from psky.config import env_list
    from psky.db.migrations import migrate
    from psky.services import ConfigError, service_urls

    out = out or sys.stdout
    env = dict(os.environ if env is None else env)
    relays = options.relays or env_list(("INGESTER_RELAY_HOSTS", "INGESTER_HOSTS"), (DEFAULT_RELAY,), env)
    labelers = options.labelers or env_list("INGESTER_LABELER_HOSTS", (DEFAULT_LABELER,), env)
    data = _data_dir(env)
    stop = asyncio.Event()
    interrupted: list[int] = []
    remove_signals = _install_signals(stop, interrupted)
    live = out.isatty() if options.live is None else options.live
    _quiet_in_process_logs(live)
    try:
        async with service_urls(env, data_dir=data) as (redis_url, database_url):
            _say(out, f"psky run: relays {', '.join(relays)} · labelers {', '.join(labelers) or 'none'}")
            _say(out, f"  Redis {redact(redis_url)} · PostgreSQL {redact(database_url)} · data {data}")
            await migrate(database_url)
            config = PipelineConfig(redis_url=redis_url, database_url=database_url, relay_hosts=list(relays),
                                    labeler_hosts=[h for h in labelers if h], indexers=options.indexers,
                                    backfillers=options.backfillers, prefix=options.prefix,
                                    extra_env={"INGESTER_MODE": options.mode} if options.mode else {})
            specs = service_specs(env, config)
            pipeline = Pipeline(specs, data / "logs" / "run")
            _say(out, f"  starting {', '.join(s.name for s in specs)} (logs in {pipeline.log_dir}); Ctrl-C stops")
            await pipeline.start()
            status_options = StatusOptions(prefix=options.prefix, hosts=StatusOptions.hosts_from_env(specs[0].env))
            state = ViewState(title="psky run", cursors=set(status_options.hosts), phase="running" + (
                f" for {options.duration:g}s" if options.duration else " until Ctrl-C"))
            view = LiveView(out, tty=live)
            monitor = _Monitor(redis_url, database_url, status_options, pipeline, state, view,
                               print_every=options.interval if live else 5.0)
            monitor_task = asyncio.create_task(monitor.run(options.interval))

            async def watch() -> None:
                deadline = None if options.duration is None else time.monotonic() + options.duration
                while deadline is None or time.monotonic() < deadline:
                    _check_children(pipeline)
                    await asyncio.sleep(0.5)

            try:
                await _until(stop, watch())
            except _ChildDied as e:
                view.release()
                _say(out, f"psky run: {e}")
                await pipeline.stop()
                return 1
            finally:
                monitor_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor_task
            await _finish(out, pipeline, monitor, database_url, options.summary_json)
    except ConfigError as e:
        raise UserError(str(e), 2) from None
    finally:
        remove_signals()
    return 130 if interrupted else 0
