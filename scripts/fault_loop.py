"""Kill -9 psky's services at random moments and prove the database still loses nothing (issue 8).

The whole pipeline runs as real processes: a devnet (child process), the ingester, one or more
backfillers and indexers (``python -m psky.cli ...``), on a private embedded Redis (AOF) and a
fresh PostgreSQL database. While the devnet writes, a random service is killed with SIGKILL
and restarted, again and again. Then every stream is left to drain and the database is
compared with the devnet manifest and with an undisturbed run of the same workload.

    .venv/bin/python scripts/fault_loop.py                  # long: >= 100,000 events
    .venv/bin/python scripts/fault_loop.py --accounts 40 --records 20 --live 400 --kills 6   # CI size

The module is also the harness of ``scripts/soak.py`` and ``tests/test_reliability_faults.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from psky.devnet.faults import Faults
from psky.devnet.manifest import Manifest
from psky.devnet.network import Devnet
from psky.httpserver import start_app
from psky.indexer.plugins import PLUGINS
from psky.ops.embedded import EmbeddedPostgres, EmbeddedRedis
from psky.streams import (
    CURSOR_DONE,
    FIREHOSE_BACKFILL,
    FIREHOSE_GROUP,
    FIREHOSE_LIVE,
    LABEL_GROUP,
    LABEL_LIVE,
    REPO_BACKFILL,
    REPO_BACKFILL_GROUP,
    cursor_key,
)

ROOT = Path(__file__).resolve().parents[1]
STREAMS = (FIREHOSE_LIVE, FIREHOSE_BACKFILL, LABEL_LIVE, REPO_BACKFILL)
GROUPS = {FIREHOSE_LIVE: FIREHOSE_GROUP, FIREHOSE_BACKFILL: FIREHOSE_GROUP, LABEL_LIVE: LABEL_GROUP,
          REPO_BACKFILL: REPO_BACKFILL_GROUP}  # fmt: skip
#: columns that hold wall-clock time, left out when two runs' rows are compared
CLOCK_COLUMNS = ("id", "indexedAt", "sortAt", "sortedAt", "updatedAt")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# the devnet child process


async def _devnet_main(args: argparse.Namespace) -> None:
    """Seed, print the endpoints, write ``--live`` events at ``--rate`` (0 = unbounded, -1 = forever
    at the rate), and serve /manifest, /status, /faults, /stop until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    net = await Devnet(n_pds=args.pds, seed=args.seed, base_port=args.base_port).start()
    workload = net.workload(args.seed)
    lock = asyncio.Lock()
    state: dict[str, Any] = {"live_done": False, "live_events": 0}
    halt_live = asyncio.Event()

    async def manifest(_: web.Request) -> web.Response:
        async with lock:
            body = workload.manifest.to_json()
        return web.Response(body=body, content_type="application/json")

    async def status(_: web.Request) -> web.Response:
        assert net.relay is not None and net.labeler is not None
        return web.json_response({**state, "relay_seq": net.relay.seq, "labeler_seq": net.labeler.seq})

    async def faults(request: web.Request) -> web.Response:
        new = Faults.parse((await request.read()).decode())
        for f in fields(Faults):  # the servers hold this object: update it in place
            setattr(net.faults, f.name, getattr(new, f.name))
        net.faults.reset_counters()
        return web.json_response({"faults": str(net.faults)})

    async def stop_live(_: web.Request) -> web.Response:
        halt_live.set()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/manifest", manifest)
    app.router.add_get("/status", status)
    app.router.add_post("/faults", faults)
    app.router.add_post("/stop_live", stop_live)
    runner, control = await start_app(app, "127.0.0.1", 0)
    try:
        await workload.seed(accounts=args.accounts, records_per_account=args.records, labels=args.labels)
        for st in ("deactivated", "takendown", "suspended", "deleted", "deleted"):
            await workload.set_status(st)
        await workload.change_handle()
        await net.settle(timeout_s=600)
        print(orjson.dumps({**net.endpoints(), "control": control}).decode(), flush=True)
        rate = None if args.rate <= 0 else args.rate
        while not halt_live.is_set() and (args.live < 0 or state["live_events"] < args.live):
            n = 50 if args.live < 0 else min(50, args.live - state["live_events"])
            async with lock:
                try:
                    state["live_events"] += await workload.live(rate=rate, events=n)
                except KeyError as e:
                    # a devnet planner bug (a deleted starter pack still offered to new profiles,
                    # psky/devnet/workload.py Planner._profile): the account was created, its
                    # first batch was not; the network and the manifest still agree, carry on
                    state["workload_errors"] = state.get("workload_errors", 0) + 1
                    print(f"workload error (skipped): KeyError {e}", file=sys.stderr, flush=True)
        await net.settle(timeout_s=600)
        state["live_done"] = True
        await stop.wait()
    finally:
        await runner.cleanup()
        await net.stop()


# ------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_range(n: int = 8) -> int:
    """A first port P with P .. P+n-1 free (for the devnet's fixed ports)."""
    import socket

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 32_000)
        try:
            socks = []
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError("no free port range")


def rss_kb(pid: int) -> tuple[int, int]:
    """(current, peak) resident set of *pid* in kB, (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in text.splitlines())
              if k in ("VmRSS", "VmHWM")}  # fmt: skip
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


@dataclass
class Service:
    """One psky service process, restartable; keeps its peak RSS over every incarnation."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int | None = None
    peak_kb: int = 0
    starts: int = 0
    kills: int = 0
    retired: bool = False  #: killed for good: not expected to run
    crashes: int = 0  #: times it exited by itself and a supervising pipeline restarted it
    #: messages processed by earlier incarnations, and the last figure scraped from this one
    processed_before: float = 0.0
    processed_now: float = 0.0

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)  # fmt: skip
        self.starts += 1
        self.processed_before += self.processed_now
        self.processed_now = 0.0

    async def scrape(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """The service's Prometheus metrics, summed over labels ({} when it does not answer)."""
        if self.metrics_port is None or not self.alive:
            return {}
        try:
            async with http.get(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                timeout=aiohttp.ClientTimeout(total=2)) as resp:  # fmt: skip
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        out: dict[str, float] = defaultdict(float)
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name.split("{", 1)[0]] += float(value)
        processed = out.get("stream_indexer_messages_processed_total", 0.0) + out.get(
            "label_indexer_messages_processed_total", 0.0)
        self.processed_now = max(self.processed_now, processed)
        return out

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample(self) -> int:
        """Current RSS in kB (and remember the peak)."""
        if self.proc is None:
            return 0
        cur, peak = rss_kb(self.proc.pid)
        self.peak_kb = max(self.peak_kb, peak)
        return cur

    def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.sample()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def suspend(self, on: bool) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP if on else signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.sample()
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


@dataclass
class Options:
    """The size and shape of one run."""

    accounts: int = 40
    records: int = 20
    labels: int = 30
    live: int = 400  #: live events after seeding (-1: until stop_live)
    rate: float = 200.0  #: live events/s (0: as fast as possible)
    seed: int = 23
    #: the devnet's first port (0: free ports); fixed, two runs get the same DIDs (a DID is the
    #: hash of its genesis operation, which names the PDS URL)
    base_port: int = 0
    backfillers: int = 1
    indexers: int = 1
    claim_idle_ms: int = 2_000
    indexer_concurrency: int = 2
    batch_size: int = 200
    high_water_mark: int = 0  #: ingester/backfiller stream cap (0: the services' default)
    embedded_postgres: bool = False
    database_url: str | None = None  #: an existing server to create a fresh database on
    extra_env: dict[str, str] = field(default_factory=dict)


class Pipeline:
    """The devnet, Redis, PostgreSQL and the services of one run, in a temporary data dir."""

    def __init__(self, opts: Options, workdir: Path | None = None) -> None:
        self.opts = opts
        self.own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="psky-faults-")) if workdir is None else workdir
        self.dir.chmod(0o755)  # the embedded PostgreSQL user must reach its cluster
        self.redis_server = EmbeddedRedis(self.dir)
        self.pg_server: EmbeddedPostgres | None = None
        self.database_url = ""
        self._admin_url: str | None = None
        self._db_name = ""
        self.devnet: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, Any] = {}
        self.services: dict[str, Service] = {}
        self.redis: aioredis.Redis | None = None
        self.http: aiohttp.ClientSession | None = None
        #: restart a service that exits by itself (as a process supervisor would) instead of failing
        self.supervise = False

    # -- life cycle ------------------------------------------------------------------------
    async def start(self, *, services: bool = True) -> None:
        await self.redis_server.astart()
        if self.opts.embedded_postgres or not self.opts.database_url:
            self.pg_server = EmbeddedPostgres(self.dir)
            await self.pg_server.astart()
            self._admin_url = self.pg_server.database_url()
        else:
            self._admin_url = self.opts.database_url
        self._db_name = f"psky_faults_{secrets.token_hex(5)}"
        admin = await asyncpg.connect(self._admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self._db_name}"')
        finally:
            await admin.close()
        self.database_url = urlunsplit(urlsplit(self._admin_url)._replace(path=f"/{self._db_name}"))
        # the harness's own client rides out Redis restarts (the services must do so themselves)
        self.redis = aioredis.from_url(self.redis_server.url(), retry=Retry(ExponentialBackoff(cap=1.0), 30),
                                       retry_on_error=[RedisConnectionError, OSError])  # fmt: skip
        self.http = aiohttp.ClientSession()
        await self._start_devnet()
        self._define_services()
        if services:
            for svc in self.services.values():
                svc.start()

    async def _start_devnet(self) -> None:
        self.devnet = await asyncio.to_thread(self._spawn_devnet)
        assert self.devnet.stdout is not None
        line = await asyncio.to_thread(self.devnet.stdout.readline)
        if not line:
            raise RuntimeError(f"the devnet exited; see {self.dir / 'devnet.log'}")
        self.endpoints = orjson.loads(line)

    def _spawn_devnet(self) -> subprocess.Popen[bytes]:
        o = self.opts
        cmd = [sys.executable, str(Path(__file__).resolve()), "devnet", "--accounts", str(o.accounts),
               "--records", str(o.records), "--labels", str(o.labels), "--live", str(o.live),
               "--rate", str(o.rate), "--seed", str(o.seed), "--base-port", str(o.base_port)]  # fmt: skip
        with open(self.dir / "devnet.log", "ab") as err:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, start_new_session=True)  # fmt: skip

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INGESTER_", "BACKFILLER_", "INDEXER_"))}
        env.update({
            "REDIS_URL": self.redis_server.url(), "DATABASE_URL": self.database_url,
            "PLC_URL": self.endpoints["plc"], "PSKY_HANDLE_RESOLVER_MAP": self.endpoints["handle_resolver_map"],
            "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", "PSKY_DATA_DIR": str(self.dir),
        })  # fmt: skip
        env.update(self.opts.extra_env)
        env.update(extra)
        return env

    def _define_services(self) -> None:
        o = self.opts
        ep = self.endpoints
        hwm = {"INGESTER_HIGH_WATER_MARK": str(o.high_water_mark),
               "BACKFILLER_HIGH_WATER_MARK": str(o.high_water_mark)} if o.high_water_mark else {}  # fmt: skip

        def svc(name: str, kind: str, **env: str) -> None:
            port = free_port()
            env[f"{kind.upper()}_METRICS_PORT"] = str(port)
            self.services[name] = Service(name, [sys.executable, "-m", "psky.cli", kind], self._env(**hwm, **env),
                                          self.dir / f"{name}.log", metrics_port=port)  # fmt: skip

        svc("ingester", "ingester", INGESTER_MODE="all", INGESTER_RELAY_HOSTS=ep["relay"],
            INGESTER_LABELER_HOSTS=ep["labeler"], INGESTER_FIREHOSE_START_CURSOR="0", INGESTER_VERIFY="strict",
            INGESTER_BATCH_TIMEOUT_MS="20", INGESTER_RECONNECT_MAX_MS="1000",
            INGESTER_REPOS_RECHECK_S="2")  # fmt: skip
        for i in range(1, o.backfillers + 1):
            svc(f"backfiller-{i}", "backfiller", BACKFILLER_CONSUMER=f"backfiller-{i}", BACKFILLER_ALLOW_HOSTS="127.0.0.1",
                BACKFILLER_CONCURRENCY="4", BACKFILLER_CLAIM_IDLE_MS=str(o.claim_idle_ms),
                BACKFILLER_CLAIM_INTERVAL_MS="500", BACKFILLER_RETRY_INITIAL_BACKOFF_MS="50",
                BACKFILLER_RETRY_MAX_BACKOFF_MS=str(min(1000, o.claim_idle_ms // 2)), BACKFILLER_MAX_HOST_WAIT_SECS="1")  # fmt: skip
        for i in range(1, o.indexers + 1):
            svc(f"indexer-{i}", "indexer", INDEXER_CONSUMER=f"indexer-{i}",
                INDEXER_CONCURRENCY=str(o.indexer_concurrency), INDEXER_BATCH_SIZE=str(o.batch_size),
                INDEXER_CLAIM_IDLE_MS=str(o.claim_idle_ms))  # fmt: skip

    async def close(self) -> None:
        for svc in self.services.values():
            svc.stop()
        if self.devnet is not None and self.devnet.poll() is None:
            self.devnet.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.devnet.wait, 30)
            except subprocess.TimeoutExpired:
                self.devnet.kill()
        if self.http is not None:
            await self.http.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self._admin_url is not None and self._db_name:
            with contextlib.suppress(Exception):
                admin = await asyncpg.connect(self._admin_url)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self._db_name}" WITH (FORCE)')
                finally:
                    await admin.close()
        if self.pg_server is not None:
            await self.pg_server.astop()
        await self.redis_server.astop()
        if self.own_dir and not os.environ.get("PSKY_FAULTS_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the devnet's control API ------------------------------------------------------------
    async def control(self, method: str, path: str, data: bytes | None = None) -> Any:
        assert self.http is not None
        if self.devnet is not None and self.devnet.poll() is not None:
            tail = (self.dir / "devnet.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the devnet exited with code {self.devnet.returncode}:\n{tail}")
        async with self.http.request(method, self.endpoints["control"] + path, data=data) as resp:
            resp.raise_for_status()
            return orjson.loads(await resp.read())

    async def status(self) -> dict[str, Any]:
        return dict(await self.control("GET", "/status"))

    async def manifest(self) -> Manifest:
        return Manifest.from_obj(await self.control("GET", "/manifest"))

    async def set_faults(self, spec: str) -> None:
        await self.control("POST", "/faults", spec.encode())

    # -- observation -----------------------------------------------------------------------------
    async def stream_lengths(self) -> dict[str, int]:
        assert self.redis is not None
        return {s: int(await self.redis.xlen(s)) for s in STREAMS}

    async def pending(self) -> dict[str, int]:
        assert self.redis is not None
        out: dict[str, int] = {}
        for stream, group in GROUPS.items():
            try:
                info = await self.redis.xpending(stream, group)
            except aioredis.ResponseError:
                continue  # no group yet
            out[stream] = int(info["pending"])
        return out

    async def pending_of(self, consumer: str, streams: tuple[str, ...]) -> int:
        """Entries delivered to *consumer* and not yet acknowledged, over *streams*."""
        assert self.redis is not None
        total = 0
        for stream in streams:
            with contextlib.suppress(aioredis.ResponseError):
                total += len(await self.redis.xpending_range(stream, GROUPS[stream], min="-", max="+", count=10_000,
                                                             consumername=consumer))  # fmt: skip
        return total

    async def dead_letters(self) -> dict[str, int]:
        assert self.redis is not None
        return {s: int(await self.redis.xlen(f"{s}_dlq")) for s in STREAMS}

    async def dead_letter_reasons(self) -> Counter[str]:
        """``<stream>: <reason> (<attempts> attempts)`` of every dead letter, counted."""
        assert self.redis is not None
        out: Counter[str] = Counter()
        for s in STREAMS:
            entries: list[tuple[Any, dict[bytes, bytes]]] = cast(Any, await self.redis.xrange(f"{s}_dlq"))
            for _, f in entries:
                reason = f.get(b"reason", b"?").decode(errors="replace")[:240]
                out[f"{s}: {reason} ({f.get(b'attempts', b'?').decode()} attempts)"] += 1
        return out

    async def cursors(self) -> dict[str, int | None]:
        assert self.redis is not None
        out: dict[str, int | None] = {}
        for name, stream, host in (("firehose", FIREHOSE_LIVE, self.endpoints["relay"]),
                                   ("labels", LABEL_LIVE, self.endpoints["labeler"])):  # fmt: skip
            value = await self.redis.get(cursor_key(stream, host))
            out[name] = None if value is None else int(value)
        return out

    async def drained(self) -> bool:
        """The devnet wrote everything, the ingester has read it all, every stream is empty."""
        st = await self.status()
        if not st["live_done"]:
            return False
        cur = await self.cursors()
        if (cur["firehose"] or 0) < st["relay_seq"] or (cur["labels"] or 0) < st["labeler_seq"]:
            return False
        assert self.redis is not None
        listed = await self.redis.get(cursor_key(REPO_BACKFILL, self.endpoints["relay"]))
        if listed is None or listed not in (CURSOR_DONE, CURSOR_DONE.encode()):
            return False
        return not (any((await self.stream_lengths()).values()) or any((await self.pending()).values()))

    async def wait_drained(self, limit_s: float = 600.0, *, during: Callable[[], Awaitable[None]] | None = None) -> float:
        """Poll until :meth:`drained` holds twice in a row; returns the seconds waited."""
        started = time.monotonic()
        streak = 0
        while streak < 2:
            if time.monotonic() - started > limit_s:
                raise AssertionError(f"not drained after {limit_s:.0f}s: streams {await self.stream_lengths()}, "
                                     f"pending {await self.pending()}, cursors {await self.cursors()}, "
                                     f"devnet {await self.status()}")  # fmt: skip
            streak = streak + 1 if await self.drained() else 0
            self.ensure_running()
            self.sample_rss()
            await self.scrape()
            if during is not None:
                await during()
            await asyncio.sleep(0.5)
        return time.monotonic() - started

    def ensure_running(self) -> None:
        """Every service that should run does (a service that exits by itself is a failure)."""
        for svc in self.services.values():
            code = svc.exit_code()
            if code is not None and svc.starts and not svc.retired and self.supervise:
                log(f"{svc.name} exited by itself with code {code}: restarting it")
                svc.crashes += 1
                svc.start()
            elif code is not None and svc.starts and not svc.retired:
                tail = svc.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{svc.name} exited by itself with code {code}:\n{tail}")

    def sample_rss(self) -> dict[str, int]:
        return {name: svc.sample() for name, svc in self.services.items()}

    def peak_rss_mb(self) -> dict[str, float]:
        self.sample_rss()
        return {name: round(svc.peak_kb / 1024, 1) for name, svc in self.services.items()}

    async def scrape(self) -> dict[str, dict[str, float]]:
        assert self.http is not None
        return {name: await svc.scrape(self.http) for name, svc in self.services.items()}

    def events_processed(self) -> int:
        """Stream and label entries the indexers processed, over every incarnation (scraped, so
        what an indexer did between its last scrape and a kill -9 is not counted)."""
        return int(sum(s.processed_before + s.processed_now for s in self.services.values()))

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.database_url)
        try:
            yield conn
        finally:
            await conn.close()


# ------------------------------------------------------------------------------------------
# comparing the database with the manifest

#: collection -> its table
TABLES = {
    "app.bsky.feed.post": "post", "app.bsky.feed.like": "like", "app.bsky.feed.repost": "repost",
    "app.bsky.graph.follow": "follow", "app.bsky.graph.block": "actor_block", "app.bsky.graph.list": "list",
    "app.bsky.graph.listitem": "list_item", "app.bsky.graph.listblock": "list_block",
    "app.bsky.feed.generator": "feed_generator", "app.bsky.graph.starterpack": "starter_pack",
    "app.bsky.feed.threadgate": "thread_gate", "app.bsky.feed.postgate": "post_gate",
    "app.bsky.actor.profile": "profile", "app.bsky.labeler.service": "labeler",
    "app.bsky.graph.verification": "verification",
}  # fmt: skip


def _collection(uri: str) -> str:
    return uri.split("/")[3]


def _owner(key: str) -> str:
    """The DID of an at:// URI, or the DID itself."""
    return key.split("/")[2] if key.startswith("at://") else key


@dataclass
class Verdict:
    """What the database lacks or has too much of, compared with the manifest."""

    records: int = 0  #: live records in the manifest that the indexer covers
    rows: dict[str, int] = field(default_factory=dict)  #: rows per table
    lost: list[str] = field(default_factory=list)  #: live records with no row (nor duplicate marker)
    extra: list[str] = field(default_factory=list)  #: rows the manifest does not have, or wrong CIDs
    duplicates: list[str] = field(default_factory=list)  #: the same URI / notification twice
    aggregates: list[str] = field(default_factory=list)
    #: counters of deleted accounts' posts / profiles that differ (defects 1-2, fixed)
    deleted_aggregates: list[str] = field(default_factory=list)
    #: counters of live subjects above the manifest's (defect 6, fixed); reported apart from
    #: lost increments, which are in ``aggregates``, with the rows behind them
    overcounts: list[str] = field(default_factory=list)
    #: live records of deleted accounts still in the database (defect 3, fixed; the
    #: aggregates are checked as if those records were live, so they are reported once)
    deleted_leftovers: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    dead_letters: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The database is the manifest: every list empty, nothing dead-lettered."""
        return not (self.lost or self.extra or self.duplicates or self.aggregates or self.labels
                    or self.overcounts or self.deleted_aggregates or self.deleted_leftovers
                    or any(self.dead_letters.values()))  # fmt: skip

    def summary(self) -> str:
        return (f"records {self.records}, rows lost {len(self.lost)}, extra {len(self.extra)}, "
                f"duplicates {len(self.duplicates)}, counters below the manifest {len(self.aggregates)}, "
                f"over it {len(self.overcounts)}, "
                f"label mismatches {len(self.labels)}, deleted-account aggregates {len(self.deleted_aggregates)}, deleted-account leftovers {len(self.deleted_leftovers)}, dead letters {sum(self.dead_letters.values())}"
                + ("" if self.ok else f"; first: {self.problems()[:4]}"))

    def problems(self) -> list[str]:
        return [*self.lost, *self.extra, *self.duplicates, *self.aggregates, *self.labels, *self.overcounts,
                *self.deleted_aggregates, *self.deleted_leftovers]  # fmt: skip


async def _post_rows(conn: asyncpg.Connection, subject: str) -> tuple[int, int, int]:
    """The rows behind a post's counters (likes, counted replies, reposts): tells a counter
    that drifted from a row that should not be there."""
    row = await conn.fetchrow(
        'SELECT (SELECT count(*) FROM "like" WHERE subject = $1) AS l,'
        ' (SELECT count(*) FROM post WHERE "replyParent" = $1 AND NOT coalesce("violatesThreadGate", false)) AS r,'
        " (SELECT count(*) FROM repost WHERE subject = $1) AS p",
        subject,
    )
    return (int(row["l"]), int(row["r"]), int(row["p"]))


async def verify(conn: asyncpg.Connection, m: Manifest) -> Verdict:
    """The database against the manifest: records and tombstones, every collection table, the
    post/profile aggregates, labels, and no duplicate rows or notifications (the checks of
    tests/test_indexer_e2e.py, in one function)."""
    v = Verdict()
    gone = {did for did, a in m.accounts.items() if a.status == "deleted"}
    live = {u: r for u, r in m.records().items() if _collection(u) in PLUGINS}
    v.records = len(live)
    rows = {r["uri"]: r for r in await conn.fetch("SELECT uri, cid, json FROM record")}
    for uri, rec in live.items():
        row = rows.get(uri)
        if row is None or row["json"] == "":
            v.lost.append(f"record {uri}")
        elif row["cid"] != rec["cid"]:
            v.extra.append(f"record {uri} has cid {row['cid']}, not {rec['cid']}")
    tombstones = {u for u, r in rows.items() if r["json"] == ""}
    want_tombs = {u for u in m.deleted() if _collection(u) in PLUGINS and u.split("/")[2] not in gone}
    # rows of accounts deleted upstream that the indexer kept (defect 3): reported apart
    leftovers = {u: orjson.loads(r["json"]) for u, r in rows.items() if r["json"] != "" and _owner(u) in gone}
    v.deleted_leftovers = sorted(leftovers)
    v.extra += [f"record {u} (not live)" for u, r in rows.items()
                if r["json"] != "" and u not in live and u not in leftovers]  # fmt: skip
    v.lost += [f"tombstone {u}" for u in sorted(want_tombs - tombstones)]
    dups = {r["uri"] for r in await conn.fetch("SELECT uri FROM duplicate_record")}
    for collection, table in TABLES.items():
        plugin = PLUGINS[collection]
        want = {u: r["cid"] for u, r in live.items() if _collection(u) == collection}
        if plugin.self_only:
            want = {u: c for u, c in want.items() if u.endswith("/self")}
        table_rows = await conn.fetch(f'SELECT uri, cid FROM "{table}"')
        v.rows[table] = len(table_rows)
        got = Counter(r["uri"] for r in table_rows)
        v.duplicates += [f"{table} {u} x{n}" for u, n in got.items() if n > 1]
        for r in table_rows:
            if want.get(r["uri"]) != r["cid"] and r["uri"] not in leftovers:
                v.extra.append(f"{table} {r['uri']}")
        v.lost += [f"{table} {u}" for u in want if u not in got and u not in dups]
    dup_notes = await conn.fetchval(
        'SELECT count(*) FROM (SELECT did, "recordUri", reason, "reasonSubject" FROM notification'
        " GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d")  # fmt: skip
    v.duplicates += [f"notification x{dup_notes}"] if dup_notes else []
    v.rows["notification"] = int(await conn.fetchval("SELECT count(*) FROM notification"))
    # aggregates: distinct (creator, subject) count once; gated replies not at all
    violating = {r["uri"] for r in await conn.fetch('SELECT uri FROM post WHERE "violatesThreadGate"')}
    likes: dict[str, set[str]] = defaultdict(set)
    reposts: dict[str, set[str]] = defaultdict(set)
    replies: Counter[str] = Counter()
    followers: dict[str, set[str]] = defaultdict(set)
    follows: dict[str, set[str]] = defaultdict(set)
    posts: Counter[str] = Counter()
    counted = [*((u, r["value"]) for u, r in m.iter_records()), *leftovers.items()]
    for uri, value in counted:
        creator, kind = uri.split("/")[2], _collection(uri)
        if kind == "app.bsky.feed.like":
            likes[value["subject"]["uri"]].add(creator)
        elif kind == "app.bsky.feed.repost":
            reposts[value["subject"]["uri"]].add(creator)
        elif kind == "app.bsky.graph.follow":
            followers[value["subject"]].add(creator)
            follows[creator].add(value["subject"])
        elif kind == "app.bsky.feed.post":
            posts[creator] += 1
            reply = value.get("reply")
            if reply and uri not in violating:
                replies[reply["parent"]["uri"]] += 1
    for subject in [u for u in {*likes, *replies, *reposts} if u.split("/")[2] in gone]:
        likes.pop(subject, None), replies.pop(subject, None), reposts.pop(subject, None)
    for did in gone:
        followers.pop(did, None)
    zero = (0, 0, 0)
    exp_posts = {u: (len(likes.get(u, ())), replies[u], len(reposts.get(u, ()))) for u in {*likes, *replies, *reposts}}
    exp_prof = {d: (len(followers.get(d, ())), len(follows.get(d, ())), posts[d]) for d in {*followers, *follows, *posts}}
    got_posts = {r["uri"]: (r["likeCount"], r["replyCount"], r["repostCount"])
                 for r in await conn.fetch("SELECT * FROM post_agg")}  # fmt: skip
    got_prof = {r["did"]: (r["followersCount"], r["followsCount"], r["postsCount"])
                for r in await conn.fetch("SELECT * FROM profile_agg")}  # fmt: skip
    for want_agg, got_agg in ((exp_posts, got_posts), (exp_prof, got_prof)):
        for k in sorted({*want_agg, *got_agg}):
            if want_agg.get(k, zero) != got_agg.get(k, zero):
                want_k, got_k = want_agg.get(k, zero), got_agg.get(k, zero)
                over = all(g >= w for g, w in zip(got_k, want_k, strict=True))
                target = v.deleted_aggregates if _owner(k) in gone else v.overcounts if over else v.aggregates
                detail = ""
                if target is v.overcounts and k.startswith("at://"):
                    detail = " rows " + str(await _post_rows(conn, k))
                target.append(f"{k}: want {want_k} got {got_k}{detail}")
    # labels: the latest state of each (src, uri, cid, val); a negation negates every CID
    expected: dict[tuple[str, str, str, str], bool] = {}
    for label in m.labels:
        key = (label["src"], label["uri"], label.get("cid") or "", label["val"])
        expected[key] = label["neg"]
        if label["neg"]:
            for other in expected:
                if other[:2] == key[:2] and other[3] == key[3]:
                    expected[other] = True
    got_labels = {(r["src"], r["uri"], r["cid"], r["val"]): r["neg"] for r in await conn.fetch("SELECT * FROM label")}
    v.labels = [f"label {k}: want {expected.get(k)} got {got_labels.get(k)}" for k in {*expected, *got_labels}
                if expected.get(k) != got_labels.get(k)]  # fmt: skip
    v.rows["label"] = len(got_labels)
    return v


# ------------------------------------------------------------------------------------------
# the fault loop


@dataclass
class Result:
    events: int
    kills: Counter[str]
    verdict: Verdict
    peak_rss_mb: dict[str, float]
    seconds: float
    drain_s: float


async def chaos(p: Pipeline, *, kills: int, rng: random.Random, min_gap_s: float, max_gap_s: float,
                down_s: float = 0.3, targets: list[str] | None = None) -> Counter[str]:  # fmt: skip
    """Kill -9 a random service *kills* times, restarting it after *down_s*; every service at least
    once when *kills* allows, the rest at random."""
    names = targets or list(p.services)
    order = names[:kills] + [rng.choice(names) for _ in range(max(0, kills - len(names)))]
    rng.shuffle(order)
    done: Counter[str] = Counter()
    for name in order:
        await asyncio.sleep(rng.uniform(min_gap_s, max_gap_s))
        p.ensure_running()
        p.sample_rss()
        await p.scrape()
        svc = p.services[name]
        svc.kill9()
        done[name] += 1
        log(f"kill -9 #{sum(done.values())}: {name} (streams {await p.stream_lengths()})")
        await asyncio.sleep(down_s)
        svc.start()
    return done


async def run(opts: Options, *, kills: int, seed: int = 1, min_gap_s: float = 1.0, max_gap_s: float = 4.0,
              drain_limit_s: float = 900.0) -> Result:  # fmt: skip
    """One run: start, inject *kills* kill -9s while the devnet writes, drain, verify."""
    p = Pipeline(opts)
    started = time.monotonic()
    try:
        await p.start()
        log(f"pipeline up in {p.dir}; devnet {p.endpoints['relay']}")
        done = await chaos(p, kills=kills, rng=random.Random(seed), min_gap_s=min_gap_s, max_gap_s=max_gap_s)
        drain_s = await p.wait_drained(drain_limit_s)
        await p.scrape()
        m = await p.manifest()
        async with p.db() as conn:
            verdict = await verify(conn, m)
        verdict.dead_letters = await p.dead_letters()
        if any(verdict.dead_letters.values()):
            log(f"dead letters: {dict(await p.dead_letter_reasons())}")
        return Result(p.events_processed(), done, verdict, p.peak_rss_mb(), time.monotonic() - started, drain_s)
    finally:
        await p.close()


async def _main(args: argparse.Namespace) -> int:
    opts = Options(accounts=args.accounts, records=args.records, labels=args.labels, live=args.live, rate=args.rate,
                   seed=args.seed, backfillers=args.backfillers, indexers=args.indexers,
                   database_url=args.database_url or os.environ.get("DATABASE_URL"), base_port=free_port_range())  # fmt: skip
    log(f"faulted run: {args.kills} kills, {opts}")
    faulted = await run(opts, kills=args.kills, seed=args.seed, min_gap_s=args.min_gap, max_gap_s=args.max_gap)
    log(f"faulted run done in {faulted.seconds:.0f}s: {faulted.verdict.summary()}")
    clean: Result | None = None
    if not args.no_baseline:
        clean = await run(opts, kills=0)
        log(f"undisturbed run done in {clean.seconds:.0f}s: {clean.verdict.summary()}")
    v = faulted.verdict
    print("\n=== fault loop ===")
    print(f"events processed     {faulted.events:,}")
    print(f"live records checked {v.records:,}")
    print(f"kills (SIGKILL)      {sum(faulted.kills.values())}  " + ", ".join(f"{k} {n}" for k, n in sorted(faulted.kills.items())))
    print(f"rows lost            {len(v.lost)}")
    print(f"duplicates           {len(v.duplicates)}")
    print(f"extra/wrong rows     {len(v.extra)}")
    print(f"counters below       {len(v.aggregates)}, over {len(v.overcounts)}, label mismatches {len(v.labels)}, "
          f"dead letters {sum(v.dead_letters.values())}")
    print("rows per table       " + ", ".join(f"{t} {n:,}" for t, n in sorted(v.rows.items())))
    if clean is not None:
        # the devnet is not byte-for-byte reproducible (wall-clock revs, a random labeler key, the
        # seeding order of concurrent account creations), so the runs are compared table by table
        # and each one exactly with its own manifest
        cv = clean.verdict
        diff = {t: (cv.rows.get(t, 0), v.rows.get(t, 0)) for t in sorted({*cv.rows, *v.rows})
                if cv.rows.get(t, 0) != v.rows.get(t, 0)}  # fmt: skip
        print(f"undisturbed run      {cv.summary()}")
        print(f"  rows per table vs faulted (undisturbed, faulted): {diff or 'identical'}")
        print("  peak RSS (MB)      " + ", ".join(f"{k} {mb}" for k, mb in clean.peak_rss_mb.items()))
    print(f"deleted accounts     {len(v.deleted_leftovers)} rows kept, {len(v.deleted_aggregates)} counters off")
    print("peak RSS (MB)        " + ", ".join(f"{k} {mb}" for k, mb in faulted.peak_rss_mb.items()))
    print(f"wall time            {faulted.seconds:.0f}s (drain after the last kill {faulted.drain_s:.0f}s)")
    ok = v.ok and (clean is None or clean.verdict.ok)
    if not ok:
        for line in v.problems()[:20]:
            print("  ", line)
    print("RESULT", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    dn = sub.add_parser("devnet", help="(internal) the devnet child process")
    for a, d in (("--pds", 2), ("--accounts", 1000), ("--records", 60), ("--labels", 200), ("--live", 20_000),
                 ("--seed", 23), ("--base-port", 0)):  # fmt: skip
        dn.add_argument(a, type=int, default=d)
    dn.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--accounts", type=int, default=900, help="seeded accounts (default 900)")
    ap.add_argument("--records", type=int, default=50, help="records per seeded account (default 50)")
    ap.add_argument("--labels", type=int, default=300)
    ap.add_argument("--live", type=int, default=20_000, help="live events after seeding (default 20,000)")
    ap.add_argument("--rate", type=float, default=400.0, help="live events per second (default 400)")
    ap.add_argument("--kills", type=int, default=40, help="kill -9s to inject (default 40)")
    ap.add_argument("--min-gap", type=float, default=2.0, help="seconds between kills, at least")
    ap.add_argument("--max-gap", type=float, default=8.0, help="... and at most")
    ap.add_argument("--backfillers", type=int, default=2)
    ap.add_argument("--indexers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--database-url", help="PostgreSQL server for a fresh database (default DATABASE_URL, else embedded)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the undisturbed comparison run")
    args = ap.parse_args(argv)
    if args.cmd == "devnet":
        asyncio.run(_devnet_main(args))
        return 0
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
