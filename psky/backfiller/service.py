"""The backfiller worker: ``repo_backfill`` → getRepo → verify → ``firehose_backfill``.

One process is one member of the consumer group; any number run side by side. Per message:

1. parse the ``repo_backfill`` entry (malformed: acknowledged and counted);
2. resolve the DID document (the PDS endpoint and signing key; ``host`` is only a hint);
3. wait for the PDS host's turn (concurrency cap, request rate, its Retry-After) *before*
   taking a worker slot, so one slow host never starves the others: repos queued for a host
   do not count against the read-ahead, and beyond ``host_backlog`` of them (or when the
   host asks for a longer pause) a repo is put back in the group for later without
   spending a retry;
4. fetch and verify the whole repo (hashes, signature, MST, DID), streaming, size-capped;
5. write one ``create`` event (seq -2) per record, in chunks, then the ``repo`` event,
   waiting at the output stream's high-water mark; flush; only then acknowledge.

A crash before step 5 ends leaves the entry pending: it is claimed again (by this consumer on
restart, or by another once idle) and the repo is emitted again — duplicates are harmless
to the indexer, loss is not. Transient failures are rescheduled with exponential backoff and
jitter through the consumer group itself (the entry's idle time is set so it is claimed after
the delay), so no task sleeps on it; after ``max_retries`` retries it is dead-lettered with
the reason. Verification and parse failures are dead-lettered at once and never emitted.
Unavailable repos (RepoNotFound/Takendown/Deactivated/Suspended) are acknowledged and, when
the status differs from what the entry said, become an ``account`` event for the indexer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import redis.asyncio as aioredis
from libipld import encode_cid
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.typing import StreamIdT

from psky.backfiller.config import BackfillerConfig
from psky.backfiller.fetch import IN_MEMORY_MAX, Fatal, FetchFailure, Permanent, Transient, fetch_repo
from psky.backfiller.hosts import (
    AddressGuard,
    GuardedResolver,
    HostBlocked,
    HostLimiter,
    HostLimits,
    HostRegistry,
)
from psky.identity import IdentityResolver, ResolutionError
from psky.metrics import MetricsServer
from psky.streams import (
    SEQ_BACKFILL,
    AccountEvent,
    MalformedMessage,
    Message,
    StreamConsumer,
    StreamWriter,
    connect,
    encode_event,
    now_iso,
    parse_backfill_request,
)
from psky.streams._redis import Backoff, is_transient

__all__ = ["Backfiller", "BackfillerMetrics", "run_backfiller"]

log = logging.getLogger("psky.backfiller")

#: deliveries after which an entry is dead-lettered whatever happened (see the consumer)
MAX_DELIVERIES_FLOOR = 25
#: Redis calls settling single repos (retry, dead letter, acknowledgement) that may run at
#: once: hundreds of repos can fail together (a PLC outage) and each call takes a pooled
#: connection, so an unbounded fan-out would exhaust the client's pool (redis-py: 100)
OUTCOME_CALLS = 8
#: deferred repos are parked with their idle time rounded down to this step, so that repos
#: deferred together share one XCLAIM (the jitter stays, in steps)
DEFER_IDLE_STEP_MS = 25


class BackfillerMetrics:
    """The seed's metric names (rsky-backfiller) plus bytes fetched and per-host state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.repos_processed = Counter("backfiller_repos_processed", "Repos fully emitted", registry=r)
        self.repos_failed = Counter("backfiller_repos_failed", "Repo attempts that failed", registry=r)
        self.repos_dead_lettered = Counter(
            "backfiller_repos_dead_lettered", "Repos sent to the DLQ", registry=r
        )
        self.records_extracted = Counter("backfiller_records_extracted", "Records emitted", registry=r)
        self.retries_attempted = Counter("backfiller_retries_attempted", "Retries scheduled", registry=r)
        self.repos_waiting = Gauge("backfiller_repos_waiting", "Entries in the input stream", registry=r)
        self.repos_running = Gauge("backfiller_repos_running", "Repos being processed", registry=r)
        self.output_stream_length = Gauge(
            "backfiller_output_stream_length", "Output stream length", registry=r
        )
        self.car_fetch_errors = Counter("backfiller_car_fetch_errors", "CAR fetch errors", registry=r)
        self.car_parse_errors = Counter("backfiller_car_parse_errors", "CAR parse errors", registry=r)
        self.verification_errors = Counter(
            "backfiller_verification_errors", "Verification errors", registry=r
        )
        self.bytes_fetched = Counter("backfiller_bytes_fetched", "CAR bytes read", registry=r)
        self.repos_unavailable = Counter(
            "backfiller_repos_unavailable", "Repos the PDS reports unavailable", ["error"], registry=r
        )
        self.address_refused = Counter(
            "backfiller_address_refused", "Targets refused by the guard", registry=r
        )
        self.malformed = Counter(
            "backfiller_malformed_messages", "Unusable input entries", ["code"], registry=r
        )
        self.host_active = Gauge(
            "backfiller_host_requests_active", "Requests in flight per host", ["host"], registry=r
        )
        self.repos_deferred = Counter(
            "backfiller_repos_deferred",
            "Repos put back because their host was busy or backing off",
            registry=r,
        )
        self.host_rate_limited = Gauge(
            "backfiller_host_rate_limited", "429 answers per host", ["host"], registry=r
        )


@dataclass(slots=True)
class _Deferral:
    """A repo waiting for the next parking round trip (see :meth:`Backfiller._defer`)."""

    message: Message
    idle_ms: int
    retry_count: int
    parked: asyncio.Future[None]


@dataclass(slots=True)
class _Totals:
    repos: int = 0
    records: int = 0
    failed: int = 0
    dead_lettered: int = 0
    deferred: int = 0


class Backfiller:
    """One consumer-group member; :meth:`run` until *stop* is set."""

    def __init__(
        self,
        config: BackfillerConfig,
        redis: aioredis.Redis,
        *,
        metrics: BackfillerMetrics | None = None,
        resolver: IdentityResolver | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics if metrics is not None else BackfillerMetrics()
        self.guard = AddressGuard(config.allow_hosts)
        self.hosts = HostRegistry(HostLimits(config.host_concurrency, config.host_rate))
        self.resolver = (
            resolver
            if resolver is not None
            else IdentityResolver(
                config.plc_url, timeout_s=min(config.http_timeout_s, 30.0), handle_map=config.handle_map
            )
        )
        self._own_resolver = resolver is None
        self.consumer = StreamConsumer(
            redis,
            [config.backfill_stream],
            config.group,
            config.consumer,
            batch_size=config.batch_size,
            claim_idle_ms=config.claim_idle_ms,
            claim_interval_ms=config.claim_interval_ms,
            # a blocking read must not outlast the claim interval: scheduled retries and
            # deferred repos are picked up by the claim that follows it
            block_ms=min(1000, config.claim_interval_ms),
            # safety net for repos that crash the process (max_retries is enforced below on
            # failed attempts): generous, because every restart redelivers all the entries
            # read ahead, attempted or not, and must not dead-letter healthy repos
            max_deliveries=max(config.max_retries + 2, MAX_DELIVERIES_FLOOR),
            dlq_stream=config.dlq_stream,
        )
        self.writer = StreamWriter(
            redis,
            config.firehose_stream,
            high_water_mark=config.high_water_mark,
            batch_size=config.chunk_size,
        )
        self._slots = asyncio.Semaphore(config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        #: tasks queued for a host's turn: they hold no worker, so more may be read meanwhile
        self._parked = 0
        self._running = 0
        self._host_backlog = config.host_backlog or config.batch_size
        self._max_tasks = config.concurrency + self._host_backlog + config.batch_size
        self._wakeup = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._to_settle: list[tuple[Message, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._to_defer: list[_Deferral] = []
        self._parker: asyncio.Task[None] | None = None
        self._outcome_calls = asyncio.Semaphore(OUTCOME_CALLS)
        self.totals = _Totals()

    # -- lifecycle

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=self.config.host_concurrency,
                resolver=GuardedResolver(self.guard),
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.config.http_timeout_s),
                headers={"accept": "application/vnd.ipld.car", "user-agent": "psky-backfiller"},
                auto_decompress=True,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_resolver:
            await self.resolver.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until *stop*; in-flight repos finish (or stay pending) before returning."""
        stop_task = asyncio.ensure_future(stop.wait())
        stats = asyncio.ensure_future(self._report(stop))
        try:
            await self._ensure_groups(stop)
            read_backoff = Backoff(0.1, 5.0)
            while not stop.is_set():
                # read more only when the workers are about to run dry; repos queued for a
                # busy host do not count, so one slow host cannot hold every worker idle
                while self._saturated() and not stop.is_set():
                    self._wakeup.clear()
                    if not self._saturated():
                        break
                    woken = asyncio.ensure_future(self._wakeup.wait())
                    await asyncio.wait([woken, stop_task], return_when=asyncio.FIRST_COMPLETED)
                    woken.cancel()
                if stop.is_set():
                    break
                await self.writer.wait_below_high_water_mark()
                read = asyncio.ensure_future(self.consumer.read())
                await asyncio.wait([read, stop_task], return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    self.consumer.stop()
                    with contextlib.suppress(Exception):
                        await read
                    break
                try:
                    messages = read.result()
                except Exception as e:  # Redis restarting or unreachable: wait it out
                    if not is_transient(e):
                        raise
                    delay = read_backoff.next_delay()
                    log.warning("stream read failed, retrying", extra={"error": str(e)[:300], "retry_in_s": delay})
                    await asyncio.wait([stop_task], timeout=delay)
                    continue
                read_backoff.reset()
                for message in messages:
                    task = asyncio.create_task(self._handle(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
        finally:
            self.consumer.stop()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            stop_task.cancel()
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats
            with contextlib.suppress(Exception):
                await self.writer.flush()

    async def _ensure_groups(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.1, 5.0)
        while not stop.is_set():
            try:
                await self.consumer.ensure_groups()
                return
            except Exception as e:
                if not is_transient(e):
                    raise
                delay = backoff.next_delay()
                log.warning("Redis unavailable, waiting", extra={"error": str(e)[:300], "retry_in_s": delay})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    def _saturated(self) -> bool:
        return (
            len(self._tasks) - self._parked >= self.config.concurrency or len(self._tasks) >= self._max_tasks
        )

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wakeup.set()

    # -- one repo

    async def _handle(self, message: Message) -> None:
        try:
            await self._process(message)
        except asyncio.CancelledError:
            self.consumer.release([message])
            raise
        except Exception as e:  # never lose the entry: record and retry later
            if is_transient(e):
                # Redis or the network failing is not the repo's fault: no attempt is spent;
                # the entry stays pending and is claimed again once idle
                log.warning(
                    "transient error backfilling, left pending",
                    extra={"id": message.id, "error": f"{type(e).__name__}: {e}"[:300]},
                )
                self.consumer.release([message])
                return
            log.exception("unexpected error backfilling", extra={"id": message.id})
            with contextlib.suppress(Exception):
                await self._retry(message, f"internal error: {type(e).__name__}: {e}", None)

    async def _process(self, message: Message) -> None:
        m = self.metrics
        try:
            request = parse_backfill_request(message.fields)
        except MalformedMessage as e:
            m.malformed.labels(e.code).inc()
            log.error("unusable repo_backfill entry", extra={"id": message.id, "error": str(e)})
            await self._ack_one(message)
            return
        did = request.did
        try:
            doc = await self.resolver.resolve(did)
        except ResolutionError as e:
            text = str(e)
            if "not found" in text or "invalid DID document" in text or "unsupported DID" in text:
                m.repos_unavailable.labels("InvalidDid").inc()
                log.warning("DID not resolvable, skipping", extra={"did": did, "error": text})
                await self._ack_one(message)
                return
            await self._retry(message, text, None)
            return
        endpoint, key = doc.pds_endpoint, doc.signing_key
        if not endpoint or not key:
            m.repos_unavailable.labels("NoPdsOrKey").inc()
            log.warning("DID document lacks a PDS or signing key", extra={"did": did})
            await self._ack_one(message)
            return
        try:
            self.guard.check_url(endpoint)
            # politeness per PDS endpoint: host and port (several PDSes may share a host)
            host = urlsplit(endpoint).netloc.lower()
        except ValueError as e:
            m.address_refused.inc()
            m.car_fetch_errors.inc()
            await self._dead_letter(message, f"refused: {e}")
            return
        limiter = self.hosts.get(host)
        if limiter.waiting >= self._host_backlog:
            # enough of this host's repos are queued already: put this one back for later
            # rather than let one slow host fill every place in the read-ahead
            await self._defer(
                message, f"{host} has {limiter.waiting} repos queued", limiter.drain_estimate_s() or None
            )
            return
        parked = True
        self._parked += 1
        self._wakeup.set()
        try:
            async with limiter.slot(max_wait=self.config.max_host_wait_s):
                self._parked -= 1
                parked = False
                m.host_active.labels(host).set(limiter.active)
                async with self._slots:
                    m.repos_running.inc()
                    self._running += 1
                    try:
                        await self._backfill(
                            message, request.did, request.status, request.active, endpoint, key, limiter
                        )
                    finally:
                        self._running -= 1
                        m.repos_running.dec()
                m.host_active.labels(host).set(limiter.active - 1)
        except HostBlocked as e:
            # the host's own back-off, not this repo's failure: reschedule, no retry spent
            await self._defer(message, str(e), e.seconds)
        finally:
            if parked:
                self._parked -= 1

    async def _backfill(
        self,
        message: Message,
        did: str,
        old_status: str | None,
        old_active: bool | None,
        endpoint: str,
        key: str,
        limiter: HostLimiter,
    ) -> None:
        m = self.metrics
        try:
            repo, size = await fetch_repo(
                self._http(),
                self.guard,
                endpoint,
                did,
                key,
                max_car_bytes=self.config.max_car_bytes,
                max_redirects=self.config.max_redirects,
            )
        except Transient as e:
            m.car_fetch_errors.inc()
            if e.rate_limited:
                limiter.block_for(e.retry_after if e.retry_after is not None else 1.0)
                m.host_rate_limited.labels(limiter.host).set(limiter.rate_limited)
            await self._retry(message, e.reason, e.retry_after)
            return
        except Permanent as e:
            m.repos_unavailable.labels(e.error).inc()
            await self._unavailable(message, did, e, old_status, old_active)
            return
        except Fatal as e:
            if e.kind == "verify":
                m.verification_errors.inc()
            elif e.kind in ("parse", "too_large"):
                m.car_parse_errors.inc()
            else:
                m.car_fetch_errors.inc()
                if e.kind == "refused":
                    m.address_refused.inc()
            await self._dead_letter(message, f"{e.kind}: {e.reason}")
            return
        except FetchFailure as e:  # pragma: no cover - the three kinds above are exhaustive
            await self._retry(message, e.reason, None)
            return
        m.bytes_fetched.inc(size)
        commit, rev, now = repo.commit_cid.encode(), repo.rev or "", now_iso()
        head = b'{"type":"create","seq":%d,"time":%s,"did":%s,"commit":%s,"rev":%s,' % (
            SEQ_BACKFILL,
            orjson.dumps(now),
            orjson.dumps(did),
            orjson.dumps(commit),
            orjson.dumps(rev),
        )
        dumps = orjson.dumps
        add = self.writer.add
        count = 0
        # a large repo gives its blocks back as they are emitted; a small one is gone soon anyway
        for rec in repo.records(release=size > IN_MEMORY_MAX):
            if rec.value is None:
                log.warning(
                    "undecodable record skipped", extra={"did": did, "path": rec.path, "error": rec.error}
                )
                continue
            body = dumps(
                {
                    "collection": rec.collection,
                    "rkey": rec.rkey,
                    "cid": encode_cid(rec.cid.cid_bytes),
                    "record": rec.value,
                }
            )
            await add({"event": head + body[1:]})
            count += 1
        await add({"event": dumps({"type": "repo", "time": now, "did": did, "commit": commit, "rev": rev})})
        await self._settle(message)
        m.records_extracted.inc(count)
        m.repos_processed.inc()
        self.totals.repos += 1
        self.totals.records += count
        if self.writer.stats.stream_length is not None:
            m.output_stream_length.set(self.writer.stats.stream_length)

    # -- group commit

    async def _settle(self, message: Message) -> None:
        """Acknowledge *message* once everything buffered so far is written.

        Repos finishing together share one write of the buffer and one acknowledgement
        pipeline (the flusher runs while more repos finish); the caller waits for both, so
        a worker slot is only given back once its repo is safely out (handing it back
        earlier was measured: busier, no faster, smaller groups).
        """
        done = asyncio.get_running_loop().create_future()
        self._to_settle.append((message, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await done

    async def _flush_loop(self) -> None:
        while self._to_settle:
            batch, self._to_settle = self._to_settle, []
            try:
                await self.writer.flush()
                await self.consumer.ack([m for m, _ in batch])
            except Exception as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    # -- outcomes

    def _backoff_ms(self, attempt: int) -> int:
        """Exponential backoff with jitter for retry number *attempt* (1-based)."""
        c = self.config
        delay = min(c.retry_max_backoff_ms, c.retry_initial_backoff_ms * (2 ** min(attempt - 1, 30)))
        return int(random.uniform(delay / 2, delay))

    async def _retry(self, message: Message, reason: str, retry_after: float | None) -> None:
        m = self.metrics
        m.repos_failed.inc()
        self.totals.failed += 1
        retries_done = message.deliveries - 1
        if retries_done >= self.config.max_retries:
            await self._dead_letter(
                message, f"gave up after {retries_done} retries (max {self.config.max_retries}): {reason}"
            )
            return
        delay = self._backoff_ms(retries_done + 1)
        if retry_after is not None:
            delay = max(delay, int(retry_after * 1000))
        delay = min(delay, self.config.claim_idle_ms)
        m.retries_attempted.inc()
        log.info(
            "repo backfill failed, retrying",
            extra={"id": message.id, "reason": reason, "retry_in_ms": delay, "attempt": message.deliveries},
        )
        async with self._outcome_calls:
            await self.consumer.fail([message], reason, retry_in_ms=delay)

    async def _defer(self, message: Message, reason: str, after_s: float | None) -> None:
        """Put *message* back, claimable again in about *after_s* seconds (the host's pause,
        or how long its queue should take to drain; the initial retry backoff when None),
        without spending one of its retries: the delivery count is reset so the next claim
        gives it the count it had."""
        c = self.config
        delay = int(after_s * 1000) if after_s is not None else c.retry_initial_backoff_ms
        delay = min(max(delay, 50), c.claim_idle_ms)
        delay = int(random.uniform(delay, delay * 1.5)) if delay < c.claim_idle_ms else delay
        self.metrics.repos_deferred.inc()
        self.totals.deferred += 1
        log.debug("repo deferred", extra={"id": message.id, "reason": reason, "retry_in_ms": delay})
        self.consumer.release([message])
        idle = max(0, c.claim_idle_ms - delay)
        idle -= idle % DEFER_IDLE_STEP_MS
        parked = asyncio.get_running_loop().create_future()
        self._to_defer.append(_Deferral(message, idle, max(0, message.deliveries - 1), parked))
        if self._parker is None or self._parker.done():
            self._parker = asyncio.create_task(self._park_loop())
        await parked

    async def _park_loop(self) -> None:
        """Park every repo deferred since the last round trip in one pipeline on one
        connection, one ``XCLAIM … JUSTID`` per (stream, idle, retry count): a host's whole
        backlog deferred at once must not take a pooled connection per repo."""
        c = self.config
        while self._to_defer:
            batch, self._to_defer = self._to_defer, []
            groups: dict[tuple[str, int, int], list[StreamIdT]] = {}
            for deferral in batch:
                key = (deferral.message.stream, deferral.idle_ms, deferral.retry_count)
                groups.setdefault(key, []).append(deferral.message.id)
            pipe = self.redis.pipeline(transaction=False)
            for (stream, idle, retry_count), ids in groups.items():
                pipe.xclaim(stream, c.group, c.consumer, 0, ids, idle=idle, retrycount=retry_count, justid=True)
            try:
                await pipe.execute()
            except Exception as e:
                for deferral in batch:
                    if not deferral.parked.done():
                        deferral.parked.set_exception(e)
                continue
            for deferral in batch:
                if not deferral.parked.done():
                    deferral.parked.set_result(None)

    async def _dead_letter(self, message: Message, reason: str) -> None:
        self.metrics.repos_dead_lettered.inc()
        self.totals.dead_lettered += 1
        log.warning("repo dead-lettered", extra={"id": message.id, "reason": reason})
        async with self._outcome_calls:
            await self.consumer.dead_letter([message], reason)

    async def _ack_one(self, message: Message) -> None:
        """Acknowledge a repo settled without output (bounded like the other outcomes)."""
        async with self._outcome_calls:
            await self.consumer.ack([message])

    async def _unavailable(
        self, message: Message, did: str, e: Permanent, old_status: str | None, old_active: bool | None
    ) -> None:
        """Acknowledge; tell the indexer when the status is news to what the entry said."""
        if old_status != e.status or old_active is not False:
            event = AccountEvent(seq=SEQ_BACKFILL, time=now_iso(), did=did, active=False, status=e.status)
            async with self._outcome_calls:
                await self.writer.add({"event": encode_event(event)})
                await self.writer.flush()
        log.info("repo unavailable, acknowledged", extra={"did": did, "error": e.error})
        await self._ack_one(message)

    # -- progress

    async def _queue_state(self) -> tuple[int, int, int, int]:
        """(input stream length, entries pending in the group, output length, DLQ length)
        in one round trip."""
        c = self.config
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(c.backfill_stream)
        pipe.execute_command("XPENDING", c.backfill_stream, c.group)
        pipe.xlen(c.firehose_stream)
        pipe.xlen(c.dlq_stream)
        xlen, summary, out_len, dlq_len = await pipe.execute()
        pending = int(summary[0]) if isinstance(summary, list | tuple) and summary else 0
        return int(xlen), pending, int(out_len), int(dlq_len)

    async def _report(self, stop: asyncio.Event) -> None:
        """Gauges every second; every ``progress_interval_s`` one "backfill progress" line:
        rates since the last line, what is left in the queue, running, failed, DLQ."""
        m, every = self.metrics, self.config.progress_interval_s
        tick = min(1.0, every)
        last_log, last = time.monotonic(), _Totals()
        while not stop.is_set():
            await asyncio.sleep(tick)
            try:
                xlen, pending, out_len, dlq_len = await self._queue_state()
            except Exception as e:
                log.warning("stream length check failed", extra={"error": str(e)})
                continue
            m.repos_waiting.set(xlen)
            m.output_stream_length.set(out_len)
            now = time.monotonic()
            if now - last_log < every * 0.999:
                continue
            span, t = now - last_log, self.totals
            log.info(
                "backfill progress",
                extra={
                    "repos_per_s": round((t.repos - last.repos) / span, 1),
                    "records_per_s": round((t.records - last.records) / span, 1),
                    # acknowledged entries are deleted: the stream holds what is left
                    "queue_left": xlen,
                    "queue_unread": max(0, xlen - pending),
                    "queue_pending": pending,
                    "running": self._running,
                    "queued_for_hosts": self._parked,
                    "in_flight": len(self._tasks),
                    "repos_done": t.repos,
                    "records_done": t.records,
                    "failed": t.failed,
                    "dead_lettered": t.dead_lettered,
                    "deferred": t.deferred,
                    "dlq_size": dlq_len,
                    "hosts": len(self.hosts),
                },
            )
            last_log, last = now, _Totals(t.repos, t.records)

    async def health(self) -> dict[str, Any]:
        await self.redis.ping()
        return {
            "status": "ok",
            "repos": self.totals.repos,
            "records": self.totals.records,
            "in_flight": len(self._tasks),
            "hosts": {h: lim.state() for h, lim in self.hosts.items()[:50]},
        }


async def run_backfiller(config: BackfillerConfig, *, stop: asyncio.Event) -> None:
    """The ``psky backfiller`` service: metrics/health server plus the worker, until *stop*."""
    redis = connect(config.redis_url)
    backfiller = Backfiller(config, redis)
    server = MetricsServer(backfiller.metrics.registry, health=backfiller.health)
    await server.start(config.metrics_host, config.metrics_port)
    log.info(
        "backfiller started",
        extra={
            "consumer": config.consumer,
            "group": config.group,
            "metrics_port": server.port,
            "concurrency": config.concurrency,
        },
    )
    try:
        await backfiller.run(stop)
    finally:
        await backfiller.close()
        await server.stop()
        await redis.aclose()
        log.info(
            "backfiller stopped",
            extra={"repos": backfiller.totals.repos, "records": backfiller.totals.records},
        )
