"""``psky indexer``: Redis consumer groups → PostgreSQL, a batch per transaction.

A reader takes batches from the group (own pending entries first, then idle entries of dead
consumers, then new ones: :class:`~psky.streams.StreamConsumer`) and hands them to
``concurrency`` workers. Each worker indexes its batch set-wise (:mod:`psky.indexer.batch`)
and acknowledges it (XACK + XDEL) only after the transaction committed. A deadlock retries
the batch; a database outage is waited out with nothing acknowledged; any other failure
retries the batch's events one by one, and an event that keeps failing is recorded as failed
and, after ``INDEXER_MAX_DELIVERIES`` deliveries, moved to ``<stream>_dlq`` with the reason —
so no poison message ever blocks the group. Malformed entries, invalid records and unknown
collections are acknowledged and counted by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis

from psky.atproto.lexicon import Lexicons
from psky.db.migrations import MigrationError
from psky.db.pool import create_pool
from psky.identity import IdentityResolver
from psky.indexer.actors import Actors, RedisDidCache
from psky.indexer.batch import BatchResult, Item, apply_batch, prepare_items
from psky.indexer.config import IndexerConfig
from psky.indexer.labels import apply_labels
from psky.indexer.metrics import IndexerMetrics
from psky.metrics import MetricsServer
from psky.streams import (
    MalformedMessage,
    Message,
    StreamConsumer,
    connect,
    parse_label_entry,
    parse_stream_event,
)
from psky.streams.wire import StreamEvent

__all__ = ["Indexer", "run_indexer"]

log = logging.getLogger("psky.indexer")

_RETRY_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
_MAX_BATCH_RETRIES = 8


def _is_db_outage(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError) and str(getattr(exc, "sqlstate", "")).startswith(("08", "57P")):
        return True
    return isinstance(
        exc,
        (
            OSError,
            asyncio.TimeoutError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.InterfaceError,
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.TooManyConnectionsError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.CrashShutdownError,
            asyncpg.exceptions.InternalClientError,
            _Unavailable,
        ),
    )


class _Unavailable(Exception):
    """No database connection could be opened."""


class _Rejected(Exception):
    """The database refused a batch for a reason other than contention or an outage."""


def _event_type(event: StreamEvent) -> str:
    collection = getattr(event, "collection", None)
    return f"{event.type}-{collection}" if collection else event.type


class Indexer:
    """The consumer loops and workers of one indexer process."""

    def __init__(
        self,
        config: IndexerConfig,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        *,
        resolver: IdentityResolver | None = None,
        metrics: IndexerMetrics | None = None,
        lexicons: Lexicons | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.pool = pool
        self.metrics = metrics or IndexerMetrics()
        self.lexicons = lexicons if lexicons is not None else (Lexicons.load() if config.validate else None)
        self.actors = Actors(resolver, cache=RedisDidCache(redis) if resolver is not None else None)
        self.consumer = StreamConsumer(
            redis, list(config.streams), config.group, config.consumer,
            batch_size=config.batch_size, claim_idle_ms=config.claim_idle_ms,
            max_deliveries=config.max_deliveries,
        )  # fmt: skip
        self.label_consumer = (
            StreamConsumer(
                redis,
                [config.label_stream],
                config.label_group,
                config.consumer,
                batch_size=config.batch_size,
                claim_idle_ms=config.claim_idle_ms,
                max_deliveries=config.max_deliveries,
            )
            if config.label_stream
            else None
        )
        self._notify = frozenset(config.notify_streams)
        self._stop = asyncio.Event()
        self.indexed = 0
        self.batches = 0
        self.last_batch_at: float | None = None
        self.db_ok = True

    def _labels(self, stream: str) -> dict[str, str]:
        return {"stream": stream, "group": self.config.group, "consumer": self.config.consumer}

    # -- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until *stop*, then finish the batches in hand and return."""
        queue: asyncio.Queue[list[Message] | None] = asyncio.Queue(maxsize=self.config.concurrency)
        workers = [
            asyncio.create_task(self._worker(queue), name=f"indexer-worker-{i}")
            for i in range(self.config.concurrency)
        ]
        reader = asyncio.create_task(self._read(queue), name="indexer-reader")
        labels = (
            asyncio.create_task(self._labels_loop(), name="label-indexer") if self.label_consumer else None
        )
        stopper = asyncio.create_task(stop.wait())
        try:
            watched = [stopper, reader] + ([labels] if labels is not None else [])
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():  # a reader that died raises here: the service must not run on half
                for task in (reader, labels):
                    if task is not None and task.done():
                        task.result()
        finally:
            self._stop.set()
            self.consumer.stop()
            if self.label_consumer is not None:
                self.label_consumer.stop()
            stopper.cancel()
            with contextlib.suppress(Exception):
                await reader
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers, return_exceptions=True)
            if labels is not None:
                with contextlib.suppress(Exception):
                    await labels

    async def _read(self, queue: asyncio.Queue[list[Message] | None]) -> None:
        seen = 0
        async for batch in self.consumer:
            dead = self.consumer.stats.dead_lettered  # moved to <stream>_dlq while reading
            if dead > seen:
                self.metrics.dead_lettered.labels("all").inc(dead - seen)
                seen = dead
            for m in batch:
                self.metrics.waiting.labels(**self._labels(m.stream)).inc()
            await queue.put(batch)

    async def _worker(self, queue: asyncio.Queue[list[Message] | None]) -> None:
        while True:
            batch = await queue.get()
            if batch is None:
                return
            try:
                await self.handle(batch)
            except Exception:
                log.exception("indexer batch failed", extra={"messages": len(batch)})
                self.consumer.release(batch)

    # -- one batch

    async def handle(self, messages: Sequence[Message]) -> None:
        """Index one batch of messages and acknowledge them."""
        started = time.perf_counter()
        for m in messages:
            labels = self._labels(m.stream)
            self.metrics.waiting.labels(**labels).dec()
            self.metrics.running.labels(**labels).inc()
        types: dict[str, str] = {}
        try:
            await self._handle(messages, types)
        finally:
            spent_ms = (time.perf_counter() - started) * 1000 / max(1, len(messages))
            for m in messages:
                labels = self._labels(m.stream)
                self.metrics.running.labels(**labels).dec()
                self.metrics.processed.labels(**labels).inc()
                self.metrics.timing.labels(**labels, type=types.get(m.id, "malformed")).observe(spent_ms)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(messages))

    async def _handle(self, messages: Sequence[Message], types: dict[str, str]) -> None:
        parsed: list[tuple[Message, StreamEvent]] = []
        malformed: list[Message] = []
        for m in messages:
            try:
                parsed.append((m, parse_stream_event(m.fields)))
            except MalformedMessage as e:
                self.metrics.malformed.labels(e.code).inc()
                log.error(
                    "skipping bad indexer stream message",
                    extra={"stream": m.stream, "id": m.id, "code": e.code, "error": str(e)},
                )
                malformed.append(m)
        if malformed:
            await self.consumer.ack(malformed)
        if not parsed:
            return
        items = prepare_items(((e, m.stream in self._notify) for m, e in parsed), self.lexicons)
        resolved, failures = self.actors.resolved, self.actors.failures
        try:
            await self.actors.resolve(self.pool, items)
        except Exception as e:  # handles are re-checked later; never block records on them
            log.warning("handle resolution step failed", extra={"error": str(e)})
        if self.actors.resolved > resolved:
            self.metrics.handles.labels("resolved").inc(self.actors.resolved - resolved)
        if self.actors.failures > failures:
            self.metrics.handles.labels("failed").inc(self.actors.failures - failures)
        try:
            result: BatchResult | None = await self._apply(items)
        except _Rejected:
            result = None
        if result is None:
            failed = await self._one_by_one(parsed, items)
            done = [m for (m, _), ok in zip(parsed, failed, strict=True) if ok]
        else:
            self._count(result)
            done = [m for m, _ in parsed]
        if done:
            await self.consumer.ack(done)
        last: dict[str, str] = {}
        for m, event in parsed:
            types[m.id] = _event_type(event)
            last[m.stream] = event.time
        for stream, at_text in last.items():
            with contextlib.suppress(ValueError, AttributeError):
                at = datetime.fromisoformat(at_text.replace("Z", "+00:00")).timestamp()
                self.metrics.lag.labels(stream).set(max(0.0, time.time() - at))
        self.indexed += len(parsed)
        self.batches += 1
        self.last_batch_at = time.time()

    async def _apply(self, items: list[Item]) -> BatchResult:
        """The batch in one transaction: deadlocks retried, outages waited out; any other
        failure raises :class:`_Rejected` (the caller then goes event by event)."""
        attempt = 0
        outage_delay = 0.5
        while True:
            try:
                try:
                    conn = await self.pool.acquire()
                except Exception as e:  # no connection to be had: the database is unavailable
                    raise _Unavailable(str(e)) from e
                try:
                    result = await apply_batch(conn, items, lexicons=self.lexicons, actors=self.actors)
                except BaseException as e:
                    if _is_db_outage(e) or isinstance(e, asyncio.CancelledError):
                        conn.terminate()  # never hand a half-dead connection back to the pool
                    raise
                finally:
                    await self.pool.release(conn)
                self.db_ok = True
                return result
            except asyncpg.PostgresError as e:
                code = getattr(e, "sqlstate", None)
                if code in _RETRY_SQLSTATES and attempt < _MAX_BATCH_RETRIES:
                    attempt += 1
                    self.metrics.retries.labels("deadlock" if code == "40P01" else "serialization").inc()
                    # jittered: two batches that collided must not collide again in step
                    await asyncio.sleep(random.uniform(0.0, 0.05 * attempt))
                    continue
                if _is_db_outage(e):
                    await self._wait_outage(e, outage_delay)
                    outage_delay = min(outage_delay * 2, 10.0)
                    continue
                log.warning("batch failed, indexing its events one by one", extra={"error": str(e)[:500]})
                self.metrics.retries.labels("split").inc()
                raise _Rejected(f"{type(e).__name__}: {e}") from e
            except Exception as e:
                if _is_db_outage(e):
                    await self._wait_outage(e, outage_delay)
                    outage_delay = min(outage_delay * 2, 10.0)
                    continue
                raise

    async def _wait_outage(self, error: BaseException, delay: float) -> None:
        self.db_ok = False
        self.metrics.retries.labels("database_unavailable").inc()
        log.warning("database unavailable, waiting", extra={"error": str(error)[:300], "retry_in_s": delay})
        if self._stop.is_set():
            raise asyncio.CancelledError  # stop: leave the batch pending for the next run
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    async def _one_by_one(self, parsed: list[tuple[Message, StreamEvent]], items: list[Item]) -> list[bool]:
        ok: list[bool] = []
        for (m, event), item in zip(parsed, items, strict=True):
            fresh = prepare_items([(event, item.notify)], self.lexicons)
            fresh[0].handle = item.handle
            error: Exception | None = None
            result: BatchResult | None = None
            try:
                result = await self._apply(fresh)
            except Exception as e:
                error = e
            if result is None:
                reason = f"indexing failed: {error}"
                self.metrics.failed.labels(**self._labels(m.stream)).inc()
                log.error(
                    "failed indexer stream message",
                    extra={"stream": m.stream, "id": m.id, "error": reason[:500]},
                )
                await self.consumer.fail([m], reason)
                ok.append(False)
            else:
                self._count(result)
                ok.append(True)
        return ok

    def _count(self, result: BatchResult) -> None:
        for (collection, action), n in result.indexed.items():
            self.metrics.records.labels(collection, action).inc(n)
        for reason, n in result.skipped.items():
            self.metrics.skipped.labels(reason).inc(n)
        if result.stale:
            self.metrics.stale.inc(result.stale)
        if result.notifications:
            self.metrics.notifications.inc(result.notifications)
        self.metrics.waves.inc(result.waves)

    # -- labels

    async def _labels_loop(self) -> None:
        assert self.label_consumer is not None
        consumer = self.label_consumer
        async for batch in consumer:
            try:
                await self._label_batch(batch)
            except Exception as e:  # e.g. Redis went away mid-acknowledgement: the batch stays
                # pending and is delivered again; the loop must live on
                log.error("label batch failed", extra={"error": str(e)[:300], "messages": len(batch)})
                consumer.release(batch)
                await asyncio.sleep(0.5)

    async def _label_batch(self, batch: list[Message]) -> None:
        assert self.label_consumer is not None
        consumer = self.label_consumer
        started = time.perf_counter()
        tags = {"group": consumer.group, "consumer": consumer.consumer}
        labels = []
        good, bad = [], []
        for m in batch:
            try:
                labels.extend(parse_label_entry(m.fields))
                good.append(m)
            except MalformedMessage as e:
                self.metrics.malformed.labels(e.code).inc()
                log.error("skipping bad label stream message", extra={"id": m.id, "error": str(e)})
                bad.append(m)
        if bad:
            await consumer.ack(bad)
        if good and await self._apply_labels(labels, good):
            await consumer.ack(good)
        ms = (time.perf_counter() - started) * 1000 / max(1, len(batch))
        for m in batch:
            self.metrics.label_processed.labels(stream=m.stream, **tags).inc()
            self.metrics.label_timing.labels(stream=m.stream, **tags).observe(ms)

    async def _apply_labels(self, labels: list[Any], messages: list[Message]) -> bool:
        assert self.label_consumer is not None
        delay = 0.5
        while True:
            try:
                try:
                    conn = await self.pool.acquire()
                except Exception as e:
                    raise _Unavailable(str(e)) from e
                try:
                    await apply_labels(conn, labels)
                finally:
                    await self.pool.release(conn)
            except Exception as e:
                if _is_db_outage(e) and not self._stop.is_set():
                    await self._wait_outage(e, delay)
                    delay = min(delay * 2, 10.0)
                    continue
                log.error("label batch failed", extra={"error": str(e)[:300]})
                for m in messages:
                    self.metrics.label_failed.labels(
                        m.stream, self.label_consumer.group, self.label_consumer.consumer
                    ).inc()
                if self._stop.is_set():
                    self.label_consumer.release(messages)
                else:
                    await self.label_consumer.fail(messages, f"label indexing failed: {e}")
                return False
            for label in labels:
                self.metrics.labels.labels("true" if label.neg else "false").inc()
            return True

    async def health(self) -> dict[str, Any]:
        return {
            "ok": self.db_ok,
            "database": "ok" if self.db_ok else "unavailable",
            "indexed": self.indexed,
            "batches": self.batches,
            "last_batch_age_s": None
            if self.last_batch_at is None
            else round(time.time() - self.last_batch_at, 3),
            "consumer": self.config.consumer,
            "delivered": self.consumer.stats.delivered,
            "dead_lettered": self.consumer.stats.dead_lettered,
        }


_T = TypeVar("_T")


async def _when_database_answers(
    step: Callable[[], Awaitable[_T]], stop: asyncio.Event, what: str
) -> _T | None:
    """Run a start-up step, waiting out a database that is down, restarting or refusing
    connections (the same rule as mid-run), so a supervisor does not have to; a configuration
    error (wrong password, missing database) still ends the start. None: stopped meanwhile."""
    delay = 0.5
    while True:
        try:
            return await step()
        except Exception as e:
            cause = e.__cause__ if isinstance(e, MigrationError) and e.__cause__ is not None else e
            if not _is_db_outage(cause) or stop.is_set():
                raise
            log.warning(
                "database unavailable at start-up, waiting",
                extra={"step": what, "error": f"{type(cause).__name__}: {cause}"[:300], "retry_in_s": delay},
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return None
        delay = min(delay * 2, 10.0)


async def run_indexer(config: IndexerConfig, *, stop: asyncio.Event) -> None:
    """The ``psky indexer`` service: migrations, metrics/health server, consumers, until *stop*."""
    if config.migrate:
        from psky.db.migrations import migrate

        if await _when_database_answers(lambda: migrate(config.database_url), stop, "migrate") is None:
            return
    pool = await _when_database_answers(
        lambda: create_pool(
            config.database_url, min_size=config.pool_min, max_size=config.pool_max,
            pgbouncer=config.pgbouncer, application_name=f"psky-indexer-{config.consumer}",
        ),
        stop,
        "open the pool",
    )  # fmt: skip
    if pool is None:
        return
    redis = connect(config.redis_url)
    resolver = (
        IdentityResolver(config.plc_url, handle_map=config.handle_map) if config.did_resolution else None
    )
    indexer = Indexer(config, redis, pool, resolver=resolver)
    server = MetricsServer(indexer.metrics.registry, health=indexer.health)
    await server.start(config.metrics_host, config.metrics_port)
    log.info(
        "indexer started",
        extra={
            "consumer": config.consumer, "group": config.group, "streams": list(config.streams),
            "metrics_port": server.port, "concurrency": config.concurrency, "batch_size": config.batch_size,
        },
    )  # fmt: skip
    try:
        await indexer.run(stop)
    finally:
        await server.stop()
        if resolver is not None:
            await resolver.close()
        await pool.close()
        await redis.aclose()
        log.info("indexer stopped", extra={"indexed": indexer.indexed, "batches": indexer.batches})
