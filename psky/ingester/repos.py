"""``com.atproto.sync.listRepos`` enumeration of one relay into ``repo_backfill``.

Pages of up to 1000 repos become ``{did, host, rev, status?, active?}`` entries; the page
cursor is stored in ``<repo stream>:cursor:<host>`` after the page's entries (so a restart
repeats at most one page), and :data:`~psky.streams.CURSOR_DONE` once the last page is in.
When done, the task re-checks the marker every ``INGESTER_REPOS_RECHECK_S`` seconds: an
operator who deletes the key starts a new enumeration without restarting the service.
Failed requests are retried with capped, jittered backoff (and counted); the page cursor is
opaque, so it is never skipped past.
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
        self._raw = raw_client(redis)
        self.done = False

    async def run(self) -> None:
        while True:
            cursor = await self._get_cursor()
            if cursor == CURSOR_DONE:
                self.done = True
                await asyncio.sleep(self.config.repos_recheck_s)
                continue
            self.done = False
            await self.enumerate(cursor or None)

    async def close(self) -> None:
        await self.writer.close()

    async def _get_cursor(self) -> str | None:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                value = await command(self._raw, "GET", self.cursor_key)
                return None if value is None else text(value)
            except Exception as e:
                if not is_transient(e):
                    raise
                log.warning("cannot read listRepos cursor", extra={"key": self.cursor_key, "error": str(e)})
                await backoff.sleep()

    async def enumerate(self, cursor: str | None) -> None:
        """Page from *cursor* to the end, then store the done marker."""
        url = http_base(self.host) + LIST_REPOS
        count = self.metrics.repos.labels(host=self.host)
        log.info("listRepos enumeration", extra={"host": self.host, "cursor": cursor})
        while True:
            page = await self._page(url, cursor)
            for repo in page.get("repos") or []:
                request = _request(repo, self.host)
                if request is None:
                    self.metrics.repos_errors.labels(host=self.host).inc()
                    continue
                await self.writer.add(backfill_fields(request))
                count.inc()
            next_cursor = page.get("cursor")
            if not isinstance(next_cursor, str) or not next_cursor or next_cursor == cursor:
                self.writer.set_cursor_after(self.cursor_key, CURSOR_DONE)
                await self.writer.flush()
                log.info("listRepos enumeration done", extra={"host": self.host})
                return
            cursor = next_cursor
            self.writer.set_cursor_after(self.cursor_key, cursor)
            await self.writer.flush()

    async def _page(self, url: str, cursor: str | None) -> dict[str, Any]:
        params = {"limit": str(self.config.repos_page_size)}
        if cursor:
            params["cursor"] = cursor
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while True:
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
                delay = backoff.next_delay()
                log.warning("listRepos failed, retrying", extra={"host": self.host, "cursor": cursor,
                                                                 "error": str(e) or type(e).__name__,
                                                                 "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)


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
