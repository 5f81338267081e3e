"""Devnet relay: one ``subscribeRepos`` firehose aggregated from the devnet PDSes.

The relay subscribes to every PDS's ``com.atproto.sync.subscribeRepos`` (aiohttp websocket
client), re-sequences each ``#commit``/``#sync``/``#identity``/``#account`` frame with its own
``seq`` (the body is decoded, ``seq`` replaced, the frame re-encoded) and keeps the frames in
memory. Upstream ``#info`` frames are consumed, not forwarded; upstream error frames are
logged and counted. Per PDS it remembers the last upstream ``seq`` it processed and resumes
from it after a disconnect (jittered exponential backoff, immediate retry after progress).
A frame that cannot be decoded (or is larger than :data:`FRAME_SIZE_LIMIT`) also restarts
the connection from that cursor, so a flaky PDS costs neither lost nor duplicated events.
Frames at or below the cursor (replayed, or out of order) are dropped and counted, as the
reference relay (indigo) does — an event a PDS sends with a seq lower than one already seen
is therefore lost, as it would be behind indigo. A ``FutureCursor`` error from a PDS parks
that host (``status="idle"``) as indigo does, until :meth:`Relay.add_host` resumes it.
Commits are passed through unverified (indigo checks signatures and drops bad commits; in
the devnet the consumers behind the relay are what is under test).

The outbound stream is a :class:`~psky.devnet.sequencer.Sequencer`, the same one the PDSes
use, so it has their semantics: no cursor → live only; a cursor → replay everything after it,
then live; a cursor ahead of the stream → ``FutureCursor`` error frame and close (1008); a
cursor older than the retained window → ``#info OutdatedCursor`` and replay from the oldest
frame kept; a live subscriber lagging more than ``max_lag`` frames → ``ConsumerTooSlow``.
Frames are encoded once, when sequenced; subscribers read the shared log by position.
:meth:`Relay.preload` fills it from pre-generated frames for benchmarks (replay mode): serving
is then a memory-to-socket copy per frame.

Sync endpoints:

* ``listRepos`` — every account the relay knows, across all hosts, in the order first seen
  (the cursor is that position, as indigo's account uid). Accounts come from the firehose and
  from one ``listRepos`` crawl of each PDS when it is first reached.
* ``getRepo`` — an HTTP **302 redirect** to ``getRepo`` on the account's PDS (same query).
  Current relays are non-archival: they do not store repositories, and indigo's relay answers
  ``getRepo`` with exactly this redirect. The PDS is taken from the DID document when the
  relay knows a PLC directory (like indigo), else from the host the account's events came
  from. psky's backfiller resolves the PDS from the DID document anyway.
* ``getLatestCommit`` / ``getRepoStatus`` / ``listHosts`` — answered from the last events
  seen, with indigo's status codes and error names (404 ``RepoNotFound``, 403 for inactive
  accounts), which differ from the PDS's 400s.

Fault knobs (a shared :class:`~psky.devnet.faults.Faults`) act on the outbound stream
(drop after N frames, one stall, malformed / oversized frames, out-of-order and replayed
seqs) and on HTTP requests (429, 500, slow responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from psky.atproto import cbor
from psky.atproto.car import CarError, read_car
from psky.atproto.cbor import CID
from psky.atproto.did import InvalidDid, validate_did
from psky.atproto.firehose import encode_frame
from psky.devnet.faults import Faults, http_fault_middleware
from psky.devnet.sequencer import Sequencer
from psky.devnet.xrpc import (
    XrpcError,
    invalid_request,
    json_response,
    param_did,
    param_int,
    xrpc_error,
    xrpc_middleware,
)
from psky.httpserver import start_app
from psky.identity import IdentityResolver, ResolutionError

__all__ = ["FRAME_SIZE_LIMIT", "HostState", "Relay", "RelayAccount"]

log = logging.getLogger("psky.devnet.relay")

SUBSCRIBE_REPOS = "/xrpc/com.atproto.sync.subscribeRepos"

#: largest websocket message the relay reads from a PDS (indigo's ``MaxMessageBytes``); a larger
#: one (e.g. from the ``oversized_every`` fault) restarts the connection from the cursor
FRAME_SIZE_LIMIT = 5_000_000

#: upstream frame types forwarded (re-sequenced); ``#info`` and unknown types are not
PASSTHROUGH = frozenset({"#commit", "#sync", "#identity", "#account"})


# --- upstream hosts ------------------------------------------------------------------------


@dataclass(slots=True)
class HostState:
    """One upstream PDS: where to resume and what happened on its connection."""

    url: str
    #: last upstream seq processed (resume point); None = not connected yet
    cursor: int | None = None
    status: str = "active"
    connected: bool = False
    connects: int = 0
    #: frames forwarded to the relay's stream
    forwarded: int = 0
    #: frames at or below the cursor (replayed or out of order), dropped
    stale: int = 0
    #: frames that could not be decoded (the connection is restarted)
    malformed: int = 0
    #: upstream ``#info`` names and error-frame names, counted
    infos: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    crawled: bool = False
    account_count: int = 0

    @property
    def hostname(self) -> str:
        return self.url.split("://", 1)[-1]


@dataclass(slots=True)
class RelayAccount:
    """The relay's view of one account, from its latest events."""

    uid: int
    did: str
    host: str | None
    head: CID | None = None
    rev: str | None = None
    active: bool = True
    status: str | None = None
    handle: str | None = None

    def repo_view(self) -> dict[str, Any] | None:
        if self.head is None or self.rev is None:
            return None
        view: dict[str, Any] = {"did": self.did, "head": self.head.encode(), "rev": self.rev, "active": self.active}
        if self.status is not None:
            view["status"] = self.status
        return view


class _Reconnect(Exception):
    """Internal: restart the upstream connection (malformed frame or upstream error)."""


class _Park(Exception):
    """Internal: stop following this host (FutureCursor)."""


# --- the relay -----------------------------------------------------------------------------


class Relay:
    """A relay over the given PDS base URLs (``http://127.0.0.1:PORT``).

    ``plc_url`` lets ``getRepo`` find the PDS from DID documents; ``retain`` bounds the frames
    kept for replay; ``max_lag`` is the live backlog after which a subscriber is cut off;
    ``start_cursor`` is where the relay starts on a new host (0 = everything the PDS has,
    None = live only); ``crawl`` seeds the account table from each host's ``listRepos``;
    ``backoff`` is (first retry delay, cap) in seconds for reconnects without progress.
    """

    def __init__(
        self,
        pds_urls: Sequence[str] = (),
        *,
        faults: Faults | None = None,
        plc_url: str | None = None,
        retain: int | None = None,
        max_lag: int = 100_000,
        start_cursor: int | None = 0,
        crawl: bool = True,
        backoff: tuple[float, float] = (0.05, 5.0),
    ) -> None:
        self.faults = faults
        self.plc_url = plc_url.rstrip("/") if plc_url else None
        self.start_cursor = start_cursor
        self.crawl = crawl
        self.backoff = backoff
        self.sequencer = Sequencer(retain=retain, max_buffer=max_lag, logger=log)
        self.hosts: dict[str, HostState] = {}
        #: upstream error-frame names over all hosts
        self.upstream_errors: Counter[str] = Counter()
        self._accounts: dict[str, RelayAccount] = {}
        self._by_uid: list[RelayAccount] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._resolver: IdentityResolver | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._rng = random.Random()
        self.url = ""
        for url in pds_urls:
            self.add_host(url)

    @staticmethod
    def _norm_url(url: str) -> str:
        url = url.rstrip("/")
        if url.startswith("ws://"):
            return "http://" + url[5:]
        if url.startswith("wss://"):
            return "https://" + url[6:]
        return url

    # -- lifecycle

    def make_app(self) -> web.Application:
        middlewares = [xrpc_middleware(log)]
        if self.faults is not None:
            middlewares.append(http_fault_middleware(self.faults, f"relay:{id(self)}"))
        app = web.Application(middlewares=middlewares)
        app.router.add_get(SUBSCRIBE_REPOS, self._subscribe_repos)
        app.router.add_get("/xrpc/com.atproto.sync.listRepos", self._list_repos)
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", self._get_repo)
        app.router.add_get("/xrpc/com.atproto.sync.getLatestCommit", self._get_latest_commit)
        app.router.add_get("/xrpc/com.atproto.sync.getRepoStatus", self._get_repo_status)
        app.router.add_get("/xrpc/com.atproto.sync.listHosts", self._list_hosts)
        app.router.add_get("/xrpc/_health", self._health)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Relay:
        """Listen on *host*:*port* (0 = a free port) and start following the hosts."""
        if self._runner is not None:
            raise RuntimeError("relay already started")
        self._runner, self.url = await start_app(self.make_app(), host, port)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        if self.plc_url is not None:
            self._resolver = IdentityResolver(self.plc_url, ttl_s=60.0, session=self._session)
        for state in self.hosts.values():
            self._spawn(state, None)
        log.info("relay listening on %s, following %d host(s)", self.url, len(self.hosts))
        return self

    async def stop(self) -> None:
        """Stop following hosts, end every subscription (1001) and close the server."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.sequencer.close()
        self._wake()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- following hosts

    def add_host(self, url: str, *, cursor: int | None = None) -> HostState:
        """Follow one more PDS (like ``requestCrawl``), or resume a parked one.

        *cursor* overrides where to start (default: the host's saved cursor, else
        ``start_cursor``). Before :meth:`start` the host is only registered.
        """
        url = self._norm_url(url)
        state = self.hosts.setdefault(url, HostState(url))
        if self._session is not None:
            self._spawn(state, cursor)
        return state

    def _spawn(self, state: HostState, cursor: int | None) -> None:
        task = self._tasks.get(state.url)
        if task is not None and not task.done():
            return
        state.status = "active"
        if cursor is not None:
            state.cursor = cursor
        elif state.cursor is None:
            state.cursor = self.start_cursor
        self._tasks[state.url] = asyncio.create_task(self._follow(state), name=f"relay-follow-{state.url}")

    def _backoff(self, attempt: int) -> float:
        """Jittered delay before reconnect number *attempt* (0 = right after progress)."""
        base, cap = self.backoff
        if attempt <= 0:
            return self._rng.uniform(0, base / 5)
        return float(min(cap, base * 2.0 ** (attempt - 1)) * self._rng.uniform(0.5, 1.5))

    async def _follow(self, host: HostState) -> None:
        """Keep a subscription to *host* alive, resuming from its cursor after every drop."""
        assert self._session is not None
        attempt = 0
        while True:
            before = host.cursor
            url = host.url + SUBSCRIBE_REPOS
            if host.cursor is not None:
                url += f"?cursor={host.cursor}"
            try:
                async with self._session.ws_connect(
                    url, max_msg_size=FRAME_SIZE_LIMIT, autoping=True, heartbeat=30.0, compress=0
                ) as ws:
                    host.connected = True
                    host.connects += 1
                    log.info("connected to %s (cursor %s)", host.url, host.cursor)
                    if self.crawl and not host.crawled:
                        host.crawled = True
                        self._tasks[f"crawl:{host.url}"] = asyncio.create_task(self._crawl(host))
                    await self._read(host, ws)
            except _Park as e:
                host.status = "idle"
                log.error("stopped following %s: %s", host.url, e)
                return
            except (_Reconnect, aiohttp.ClientError, OSError, TimeoutError) as e:
                log.info("connection to %s lost: %s", host.url, str(e) or type(e).__name__)
            except Exception:  # a bug must not end the subscription for good
                log.exception("following %s failed", host.url)
            finally:
                host.connected = False
            progressed = host.cursor is not None and (before is None or host.cursor > before)
            attempt = 0 if progressed else attempt + 1
            await asyncio.sleep(self._backoff(attempt))

    async def _read(self, host: HostState, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                self._ingest(host, msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return
            elif msg.type is aiohttp.WSMsgType.ERROR:
                raise _Reconnect(f"websocket error: {msg.data or ws.exception()}")
            else:
                raise _Reconnect(f"unexpected {msg.type.name} message")

    def _ingest(self, host: HostState, data: bytes) -> None:
        """Handle one upstream frame (no awaits: frames are processed atomically, in order)."""
        try:
            header, used = cbor.decode_prefix(data)
            body = cbor.decode(memoryview(data)[used:])
            if type(header) is not dict or type(body) is not dict:
                raise cbor.DecodeError("header and body must be maps")
        except cbor.DecodeError as e:
            host.malformed += 1
            raise _Reconnect(f"malformed frame from {host.url}: {e}") from None
        op = header.get("op")
        t = header.get("t")
        if op == -1:
            error = body.get("error")
            name = error if type(error) is str else "?"
            host.errors[name] += 1
            self.upstream_errors[name] += 1
            log.warning("error frame from %s: %s %s", host.url, name, body.get("message"))
            if name == "FutureCursor":
                raise _Park(f"upstream says cursor {host.cursor} is in the future")
            raise _Reconnect(f"error frame {name}")
        if op != 1 or type(t) is not str:
            host.malformed += 1
            raise _Reconnect(f"bad frame header from {host.url}: {header!r:.100}")
        if t == "#info":
            info = body.get("name")
            host.infos[info if type(info) is str else "?"] += 1
            log.info("info from %s: %s %s", host.url, info, body.get("message"))
            return
        seq = body.get("seq")
        if type(seq) is not int:
            host.malformed += 1
            raise _Reconnect(f"{t} frame from {host.url} without an integer seq")
        if host.cursor is not None and seq <= host.cursor:
            host.stale += 1
            log.warning("%s: dropping %s seq %d at or below cursor %d", host.url, t, seq, host.cursor)
            return
        host.cursor = seq
        if t not in PASSTHROUGH:
            log.debug("%s: skipping unknown frame type %s", host.url, t)
            return
        if self._resequence(t, body, host.url):
            host.forwarded += 1

    def _resequence(self, t: str, body: dict[str, Any], host_url: str | None) -> bool:
        """Give the event the relay's next seq, append it, update the account table."""
        did = body.get("repo") if t == "#commit" else body.get("did")
        if type(did) is not str:
            log.warning("%s frame without a DID from %s, dropped", t, host_url)
            return False

        def build(seq: int, _time: str) -> bytes:
            body["seq"] = seq  # the upstream event time is kept
            return encode_frame(t, body)

        self.sequencer.append(build, did=did)
        self._wake()
        acc = self._account(did, host_url)
        if t == "#commit":
            commit = body.get("commit")
            rev = body.get("rev")
            if isinstance(commit, CID) and type(rev) is str:
                acc.head, acc.rev = commit, rev
        elif t == "#sync":
            rev = body.get("rev")
            blocks = body.get("blocks")
            if type(rev) is str and type(blocks) is bytes:
                with contextlib.suppress(CarError):
                    acc.head = read_car(blocks, verify=False).root
                    acc.rev = rev
        elif t == "#account":
            active = body.get("active")
            status = body.get("status")
            if type(active) is bool:
                acc.active = active
                acc.status = status if type(status) is str and not active else None
        elif t == "#identity":
            handle = body.get("handle")
            if type(handle) is str:
                acc.handle = handle
            if self._resolver is not None:
                self._resolver.invalidate(did)
        return True

    def _account(self, did: str, host_url: str | None) -> RelayAccount:
        acc = self._accounts.get(did)
        if acc is None:
            acc = RelayAccount(len(self._by_uid) + 1, did, host_url)
            self._accounts[did] = acc
            self._by_uid.append(acc)
            if host_url is not None and host_url in self.hosts:
                self.hosts[host_url].account_count += 1
        elif host_url is not None and acc.host != host_url:
            acc.host = host_url
        return acc

    async def _crawl(self, host: HostState) -> None:
        """Add the accounts a host lists that the firehose has not shown yet."""
        assert self._session is not None
        cursor: str | None = None
        attempt = 0
        while True:
            params = {"limit": "1000"}
            if cursor:
                params["cursor"] = cursor
            try:
                async with self._session.get(host.url + "/xrpc/com.atproto.sync.listRepos", params=params) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, resp.history, status=resp.status, message=body[:200].decode(errors="replace")
                        )
                    page = orjson.loads(body)
            except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as e:
                attempt += 1
                if attempt > 8:
                    log.warning("giving up crawling %s: %s", host.url, e)
                    return
                await asyncio.sleep(self._backoff(attempt))
                continue
            attempt = 0
            repos = page.get("repos") if isinstance(page, dict) else None
            if not isinstance(repos, list):
                log.warning("listRepos of %s returned no repos array", host.url)
                return
            for repo in repos:
                self._crawled_repo(host, repo)
            next_cursor = page.get("cursor")
            if not repos or not isinstance(next_cursor, str) or next_cursor == cursor:
                return
            cursor = next_cursor

    def _crawled_repo(self, host: HostState, repo: Any) -> None:
        if not isinstance(repo, dict):
            return
        did = repo.get("did")
        if not isinstance(did, str) or did in self._accounts:
            return
        try:
            validate_did(did)
            head = cbor.parse_cid(repo["head"])
        except (InvalidDid, KeyError, TypeError, ValueError):
            return
        rev = repo.get("rev")
        acc = self._account(did, host.url)
        acc.head = head
        acc.rev = rev if isinstance(rev, str) else None
        active = repo.get("active")
        acc.active = active if isinstance(active, bool) else True
        status = repo.get("status")
        acc.status = status if isinstance(status, str) and not acc.active else None

    # -- replay mode and helpers for tests / benchmarks

    def preload(self, frames: Iterable[bytes]) -> int:
        """Re-sequence pre-generated upstream frames into the stream (replay mode).

        Each frame is processed as if a host had sent it (no host attached), so the account
        table follows too; ``#info``, error frames and unknown types are skipped. Returns the
        number of frames sequenced. Raises ``cbor.DecodeError`` on a frame that is not DAG-CBOR.
        """
        n = 0
        for data in frames:
            header, used = cbor.decode_prefix(data)
            body = cbor.decode(memoryview(data)[used:])
            if type(header) is not dict or type(body) is not dict or header.get("op") != 1:
                continue
            t = header.get("t")
            if type(t) is str and t in PASSTHROUGH and self._resequence(t, body, None):
                n += 1
        return n

    @property
    def seq(self) -> int:
        """The relay's newest seq (0 before the first event)."""
        return self.sequencer.seq

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_seq(self, seq: int, timeout_s: float = 10.0) -> None:
        """Wait until the relay has sequenced *seq*; TimeoutError otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.sequencer.seq < seq:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"relay did not reach seq {seq} within {timeout_s}s (at {self.seq})")
            if self._waiter is None:
                self._waiter = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._waiter), remaining)

    async def wait_for_host(self, url: str, seq: int, timeout_s: float = 10.0) -> None:
        """Wait until the relay has processed upstream *seq* from the host at *url*."""
        host = self.hosts[self._norm_url(url)]
        deadline = time.monotonic() + timeout_s
        while host.cursor is None or host.cursor < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay did not reach {url} seq {seq} within {timeout_s}s (at {host.cursor})")
            await asyncio.sleep(0.005)

    def account(self, did: str) -> RelayAccount | None:
        return self._accounts.get(did)

    def accounts(self) -> list[RelayAccount]:
        """Every known account, in the order first seen (listRepos order)."""
        return list(self._by_uid)

    def stats(self) -> dict[str, Any]:
        """Counters for logs and tests: seq, subscribers, per-host connection state."""
        return {
            "seq": self.seq,
            "subscribers": self.sequencer.subscriber_count,
            "accounts": len(self._by_uid),
            "upstream_errors": dict(self.upstream_errors),
            "hosts": {
                h.url: {
                    "cursor": h.cursor,
                    "status": h.status,
                    "connected": h.connected,
                    "connects": h.connects,
                    "forwarded": h.forwarded,
                    "stale": h.stale,
                    "malformed": h.malformed,
                    "errors": dict(h.errors),
                    "infos": dict(h.infos),
                }
                for h in self.hosts.values()
            },
        }

    # -- XRPC handlers

    async def _subscribe_repos(self, request: web.Request) -> web.StreamResponse:
        return await self.sequencer.serve(request, faults=self.faults, fault_key=f"relay:{id(self)}")

    async def _health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def _list_repos(self, request: web.Request) -> web.Response:
        limit = param_int(request, "limit", default=500, minimum=1, maximum=1000)
        cursor = _uint_cursor(request)
        assert limit is not None
        repos: list[dict[str, Any]] = []
        last = cursor
        for acc in self._by_uid[cursor:]:
            last = acc.uid
            view = acc.repo_view()
            if view is not None:
                repos.append(view)
                if len(repos) >= limit:
                    break
        failing = self.faults.list_repos_500_dids if self.faults is not None else frozenset()
        if failing and any(r["did"] in failing for r in repos):
            return json_response({"error": "InternalServerError", "message": "injected fault"}, status=500)
        out: dict[str, Any] = {"repos": repos}
        if len(repos) >= limit and last < len(self._by_uid):
            out["cursor"] = str(last)
        return json_response(out)

    async def _get_repo(self, request: web.Request) -> web.Response:
        did = param_did(request)
        pds: str | None = None
        if self._resolver is not None:
            try:
                pds = (await self._resolver.resolve(did)).pds_endpoint
            except ResolutionError as e:
                log.info("getRepo: cannot resolve %s: %s", did, e)
        if pds is None:
            acc = self._accounts.get(did)
            pds = acc.host if acc is not None else None
        if pds is None:
            return xrpc_error(404, "RepoNotFound", f"could not find the PDS of {did}")
        # the query string is passed on untouched (did, since), as indigo does
        raise web.HTTPFound(f"{pds.rstrip('/')}/xrpc/com.atproto.sync.getRepo?{request.query_string}")

    async def _get_latest_commit(self, request: web.Request) -> web.Response:
        acc = self._known(param_did(request))
        if not acc.active:
            status = acc.status
            if status in ("takendown", "suspended"):
                raise XrpcError(403, "RepoTakendown", "account not active (takendown)")
            if status == "deactivated":
                raise XrpcError(403, "RepoDeactivated", "account not active (deactivated)")
            if status == "deleted":
                raise XrpcError(403, "RepoDeleted", "account not active (deleted)")
            raise XrpcError(403, "RepoInactive", f"account not active: {status}")
        if acc.head is None or acc.rev is None:
            raise XrpcError(404, "RepoNotSynchronized", "do not know current repo state for account")
        return json_response({"cid": acc.head.encode(), "rev": acc.rev})

    async def _get_repo_status(self, request: web.Request) -> web.Response:
        acc = self._known(param_did(request))
        out: dict[str, Any] = {"did": acc.did, "active": acc.active}
        if acc.status is not None:
            out["status"] = acc.status
        if acc.rev is not None:
            out["rev"] = acc.rev
        return json_response(out)

    def _known(self, did: str) -> RelayAccount:
        acc = self._accounts.get(did)
        if acc is None:
            raise XrpcError(404, "RepoNotFound", "account not found")
        return acc

    async def _list_hosts(self, request: web.Request) -> web.Response:
        limit = param_int(request, "limit", default=200, minimum=1, maximum=1000)
        cursor = _uint_cursor(request)
        assert limit is not None
        hosts = list(self.hosts.values())
        out: dict[str, Any] = {
            "hosts": [
                {"hostname": h.hostname, "seq": h.cursor or 0, "status": h.status, "accountCount": h.account_count}
                for h in hosts[cursor : cursor + limit]
            ]
        }
        if cursor + limit < len(hosts):
            out["cursor"] = str(cursor + limit)
        return json_response(out)


def _uint_cursor(request: web.Request) -> int:
    """A numeric pagination cursor (absent = 0), as indigo's relay uses."""
    raw = request.query.get("cursor")
    if not raw:
        return 0
    if not raw.isdigit():
        raise invalid_request(f"invalid cursor: {raw[:40]}")
    return int(raw)
