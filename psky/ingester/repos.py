"""``com.atproto.sync.listRepos`` enumeration of one relay into ``repo_backfill``.

Pages of up to 1000 repos become ``{did, host, rev, status?, active?}`` entries; the page
cursor is stored in ``<repo stream>:cursor:<host>`` after the page's entries (so a restart
repeats at most one page), and :data:`~psky.streams.CURSOR_DONE` once the last page is in.
When done, the task re-checks the marker every ``INGESTER_REPOS_RECHECK_S`` seconds: an
operator who deletes the key starts a new enumeration without restarting the service.

A page that keeps failing is skipped forward in a bounded way (one bad account row can make
a relay answer 500 for every page holding it):

1. it is tried ``INGESTER_REPOS_PAGE_ATTEMPTS`` times with capped, jittered backoff;
2. then again with a tenth of the limit, down to a limit of 1 (each size as many times), so
   the repos before the bad one still arrive and the cursor moves up to it;
3. when a one-repo page fails too, the cursor is *given up*: logged, counted
   (``ingester_repos_cursor_given_up_total``) and added to the Redis set
   ``<repo stream>:cursor:<host>:given-up``. A decimal cursor (indigo's relay and the devnet
   number their accounts; the cursor is the last uid) is then advanced by one, skipping that
   one account, and enumeration moves on. An opaque cursor cannot be skipped past: the task
   tries it again after ``INGESTER_REPOS_RECHECK_S``.

Given-up cursors are retried (one one-repo page each) at every re-check once enumeration is
done, and leave the set when their repo is queued. So a bad page costs at most
``attempts × (1 + log10(limit))`` requests per pass, and nothing is dropped for good.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from psky.atproto.syntax import is_valid_did
from psky.ingester.config import IngesterConfig, http_base
from psky.ingester.metrics import IngesterMetrics
from psky.streams import CURSOR_DONE, BackfillRequest, StreamWriter, backfill_fields, cursor_key
from psky.streams._redis import Backoff, command, is_transient, raw_client, text

__all__ = ["RepoEnumerator", "enqueue_repos"]

log = logging.getLogger(__name__)

LIST_REPOS = "/xrpc/com.atproto.sync.listRepos"


class ListReposError(Exception):
    pass


class RepoEnumerator:
    def __init__(
        self,
        config: IngesterConfig,
        host: str,
        redis: aioredis.Redis,
        session: aiohttp.ClientSession,
        metrics: IngesterMetrics,
    ) -> None:
        self.config = config
        self.host = host
        self.session = session
        self.metrics = metrics
        self.cursor_key = cursor_key(config.repo_stream, host)
        self.writer = StreamWriter(
            redis, config.repo_stream, high_water_mark=config.repo_high_water_mark,
            batch_size=config.batch_size, batch_timeout_ms=config.batch_timeout_ms,
        )
        self.given_up_key = f"{self.cursor_key}:given-up"
        self._raw = raw_client(redis)
        self.done = False

    async def run(self) -> None:
        while True:
            cursor = await self._get_cursor()
            if cursor == CURSOR_DONE:
                self.done = True
                await self.retry_given_up()
                await asyncio.sleep(self.config.repos_recheck_s)
                continue
            self.done = False
            await self.enumerate(cursor or None)

    async def close(self) -> None:
        await self.writer.close()

    async def _redis(self, *args: Any) -> Any:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                return await command(self._raw, *args)
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("listRepos state unreachable, retrying", extra={"key": args[1], "error": str(e)})
                await backoff.sleep()

    async def _get_cursor(self) -> str | None:
        value = await self._redis("GET", self.cursor_key)
        return None if value is None else text(value)

    async def enumerate(self, cursor: str | None) -> None:
        """Page from *cursor* to the end, then store the done marker."""
        url = http_base(self.host) + LIST_REPOS
        log.info("listRepos enumeration", extra={"host": self.host, "cursor": cursor})
        while True:
            page = await self._page_or_smaller(url, cursor)
            if page is None:
                skipped = await self._give_up(cursor)
                if skipped is None:
                    await asyncio.sleep(self.config.repos_recheck_s)
                    continue
                cursor = skipped
                self.writer.set_cursor_after(self.cursor_key, cursor)
                await self.writer.flush()
                continue
            await self._queue(page)
            next_cursor = page.get("cursor")
            if not isinstance(next_cursor, str) or not next_cursor or next_cursor == cursor:
                self.writer.set_cursor_after(self.cursor_key, CURSOR_DONE)
                await self.writer.flush()
                log.info("listRepos enumeration done", extra={"host": self.host})
                return
            cursor = next_cursor
            self.writer.set_cursor_after(self.cursor_key, cursor)
            await self.writer.flush()

    async def _queue(self, page: dict[str, Any]) -> None:
        count = self.metrics.repos.labels(host=self.host)
        for repo in page.get("repos") or []:
            request = _request(repo, self.host)
            if request is None:
                self.metrics.repos_errors.labels(host=self.host).inc()
                continue
            await self.writer.add(backfill_fields(request))
            count.inc()

    async def _page_or_smaller(self, url: str, cursor: str | None) -> dict[str, Any] | None:
        """The page at *cursor*, shrinking the limit tenfold after each run of failures; None
        when even a one-repo page keeps failing."""
        limit = self.config.repos_page_size
        while True:
            page = await self._page(url, cursor, limit, self.config.repos_page_attempts)
            if page is not None or limit == 1:
                return page
            limit = max(limit // 10, 1)
            log.warning("listRepos page keeps failing, trying a smaller page",
                        extra={"host": self.host, "cursor": cursor, "limit": limit})

    async def _give_up(self, cursor: str | None) -> str | None:
        """Record *cursor* as given up; the cursor to go on from, or None (opaque: retry later)."""
        self.metrics.repos_given_up.labels(host=self.host).inc()
        await self._redis("SADD", self.given_up_key, cursor or "")
        skipped = str(int(cursor) + 1) if cursor is not None and cursor.isdigit() else None
        log.error("listRepos cursor given up", extra={
            "host": self.host, "cursor": cursor, "key": self.given_up_key,
            "action": f"skipping one account, going on from {skipped}" if skipped is not None
            else f"cursor is opaque, trying again in {self.config.repos_recheck_s:g} s"})
        return skipped

    async def retry_given_up(self) -> int:
        """One one-repo page for each given-up cursor; those that succeed are queued and
        forgotten. Returns how many succeeded."""
        cursors = [text(c) for c in await self._redis("SMEMBERS", self.given_up_key) or ()]
        url = http_base(self.host) + LIST_REPOS
        recovered = 0
        for cursor in sorted(cursors):
            page = await self._page(url, cursor or None, 1, 1)
            if page is None:
                continue
            await self._queue(page)
            await self.writer.flush()
            await self._redis("SREM", self.given_up_key, cursor)
            recovered += 1
            log.info("given-up listRepos cursor recovered", extra={"host": self.host, "cursor": cursor})
        return recovered

    async def _page(self, url: str, cursor: str | None, limit: int, attempts: int) -> dict[str, Any] | None:
        """One page, tried *attempts* times with backoff; None when every try failed."""
        params = {"limit": str(limit)}
        if cursor:
            params["cursor"] = cursor
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        for attempt in range(1, attempts + 1):
            try:
                async with self.session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    if resp.status != 200:
                        raise ListReposError(f"HTTP {resp.status}")
                    body = orjson.loads(await resp.read())
                    if not isinstance(body, dict) or not isinstance(body.get("repos", []), list):
                        raise ListReposError("response is not a listRepos page")
                    return body
            except (aiohttp.ClientError, OSError, TimeoutError, ListReposError, orjson.JSONDecodeError) as e:
                self.metrics.repos_errors.labels(host=self.host).inc()
                last = attempt == attempts
                delay = 0.0 if last else backoff.next_delay()
                log.warning("listRepos failed", extra={"host": self.host, "cursor": cursor, "limit": limit,
                                                       "attempt": attempt, "error": str(e) or type(e).__name__,
                                                       "retry_in_s": round(delay, 2)})
                if not last:
                    await asyncio.sleep(delay)
        return None


def _request(repo: Any, host: str) -> BackfillRequest | None:
    if not isinstance(repo, dict) or not isinstance(repo.get("did"), str) or not is_valid_did(repo["did"]):
        return None
    rev = repo.get("rev")
    status = repo.get("status")
    active = repo.get("active")
    return BackfillRequest(
        did=repo["did"], host=host, rev=rev if isinstance(rev, str) else "",
        status=status if isinstance(status, str) else None,
        active=active if isinstance(active, bool) else None,
    )


async def enqueue_repos(
    redis: aioredis.Redis, dids: list[str], *, stream: str = "repo_backfill", host: str = "", batch_size: int = 500
) -> int:
    """Queue chosen repos for backfill by hand (``psky backfill enqueue``); returns how many.

    Every DID is checked first, so a typo queues nothing (ValueError naming it)."""
    bad = [d for d in dids if not is_valid_did(d)]
    if bad:
        raise ValueError(f"not a valid DID: {bad[0]!r:.120}")
    async with StreamWriter(redis, stream, high_water_mark=None, batch_size=batch_size) as writer:
        for did in dids:
            await writer.add(backfill_fields(BackfillRequest(did=did, host=host)))
    return len(dids)
