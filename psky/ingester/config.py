"""Ingester settings, read once from the environment (seed names first, TypeScript aliases).

Every variable is documented on :class:`IngesterConfig`; a wrong value is a
:class:`~psky.config.ConfigError` naming the variable at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from psky.config import ConfigError, env_float, env_int, env_list, env_str
from psky.streams import FIREHOSE_LIVE, LABEL_LIVE, REPO_BACKFILL

__all__ = ["DEFAULT_COLLECTIONS", "MODES", "VERIFY_MODES", "CollectionFilter", "IngesterConfig", "normalize_host"]

MODES = ("all", "firehose", "backfill", "labeler")
VERIFY_MODES = ("off", "lenient", "strict")
DEFAULT_COLLECTIONS = ("app.bsky.*", "chat.bsky.*")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def normalize_host(host: str) -> str:
    """``relay.example`` → ``https://relay.example``; a given scheme is kept, trailing / dropped."""
    host = host.strip().rstrip("/")
    if not _SCHEME.match(host):
        host = "https://" + host
    if not host.startswith(("http://", "https://", "ws://", "wss://")):
        raise ValueError(f"unsupported scheme in host {host!r}")
    return host


def ws_base(host: str) -> str:
    """The WebSocket base URL of a normalized host (http→ws, https→wss)."""
    if host.startswith("http://"):
        return "ws://" + host[7:]
    if host.startswith("https://"):
        return "wss://" + host[8:]
    return host


def http_base(host: str) -> str:
    if host.startswith("ws://"):
        return "http://" + host[5:]
    if host.startswith("wss://"):
        return "https://" + host[6:]
    return host


class CollectionFilter:
    """NSID patterns: exact names or ``prefix.*``; ``*`` alone matches everything.

    Answers are cached per collection (a network has a few hundred NSIDs at most; the cache
    is bounded anyway), so the per-op cost is one dict lookup.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._all = "*" in self.patterns
        self._exact = frozenset(p for p in self.patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in self.patterns if p.endswith(".*"))
        #: answers so far (callers on a hot path may look here first)
        self.cached: dict[str, bool] = {}

    def __call__(self, collection: str) -> bool:
        hit = self.cached.get(collection)
        if hit is not None:
            return hit
        ok = self._all or collection in self._exact or collection.startswith(self._prefixes)
        if len(self.cached) < 10_000:
            self.cached[collection] = ok
        return ok


@dataclass(slots=True)
class IngesterConfig:
    """All ingester settings (environment variable in brackets)."""

    redis_url: str = "redis://127.0.0.1:6379"  # REDIS_URL | REDIS_HOST
    mode: str = "all"  # INGESTER_MODE: all | firehose | backfill | labeler
    relay_hosts: list[str] = field(default_factory=list)  # INGESTER_RELAY_HOSTS | INGESTER_HOSTS
    labeler_hosts: list[str] = field(default_factory=list)  # INGESTER_LABELER_HOSTS
    firehose_stream: str = FIREHOSE_LIVE  # INGESTER_FIREHOSE_STREAM
    repo_stream: str = REPO_BACKFILL  # INGESTER_REPO_STREAM
    label_stream: str = LABEL_LIVE  # INGESTER_LABEL_STREAM
    # INGESTER_HIGH_WATER_MARK, overridden per stream by INGESTER_FIREHOSE_HIGH_WATER_MARK,
    # INGESTER_REPO_HIGH_WATER_MARK, INGESTER_LABEL_HIGH_WATER_MARK (0 = no limit)
    firehose_high_water_mark: int = 100_000
    repo_high_water_mark: int = 100_000
    label_high_water_mark: int = 100_000
    batch_size: int = 500  # INGESTER_BATCH_SIZE
    batch_timeout_ms: int = 100  # INGESTER_BATCH_TIMEOUT_MS
    collections: tuple[str, ...] = DEFAULT_COLLECTIONS  # INGESTER_COLLECTIONS (comma list)
    verify: str = "lenient"  # INGESTER_VERIFY: off (trust the relay: no checks at all) | lenient | strict
    metrics_port: int = 9090  # INGESTER_METRICS_PORT | METRICS_PORT (0 = free port, -1 = none)
    metrics_host: str = "0.0.0.0"  # INGESTER_METRICS_HOST
    log_level: str = "info"  # LOG_LEVEL | RUST_LOG
    plc_url: str = "https://plc.directory"  # PLC_URL
    handle_resolver_map: str = ""  # PSKY_HANDLE_RESOLVER_MAP
    # INGESTER_FIREHOSE_START_CURSOR: where a relay without a stored cursor starts
    # (unset = live only, as the TypeScript ingester; 0 = everything the relay retains)
    start_cursor: int | None = None
    idle_timeout_s: float = 60.0  # INGESTER_IDLE_TIMEOUT_S: no data frame for this long → reconnect
    reconnect_min_s: float = 0.5  # INGESTER_RECONNECT_MIN_MS / 1000
    reconnect_max_s: float = 60.0  # INGESTER_RECONNECT_MAX_MS / 1000
    healthy_after_s: float = 30.0  # INGESTER_HEALTHY_AFTER_S: connection age that resets backoff
    max_frame_bytes: int = 5_000_000  # INGESTER_MAX_FRAME_BYTES
    repos_page_size: int = 1000  # INGESTER_REPOS_PAGE_SIZE (listRepos limit)
    repos_recheck_s: float = 60.0  # INGESTER_REPOS_RECHECK_S: done-marker re-check interval
    # INGESTER_REPOS_PAGE_ATTEMPTS: tries of one listRepos page at each page size before a
    # smaller one (then the cursor is given up; see psky.ingester.repos)
    repos_page_attempts: int = 4
    repo_state_cache: int = 200_000  # INGESTER_REPO_STATE_CACHE: repos kept in memory
    # verified firehose read-ahead (see psky.ingester.firehose): frames read and decoded ahead of
    # processing, at most INGESTER_READ_AHEAD_FRAMES of them and INGESTER_READ_AHEAD_BYTES of frame
    # bytes, while the DID documents they need are fetched in the background, at most
    # INGESTER_RESOLVE_CONCURRENCY at once
    read_ahead_frames: int = 2000
    read_ahead_bytes: int = 8_000_000
    resolve_concurrency: int = 32

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IngesterConfig:
        e: Mapping[str, str] = {} if env is None else env
        if env is None:
            import os

            e = os.environ
        redis_url = env_str(("REDIS_URL", "REDIS_HOST"), "redis://127.0.0.1:6379", e) or ""
        if "://" not in redis_url:
            redis_url = f"redis://{redis_url}"
        mode = env_str("INGESTER_MODE", "all", e, choices=MODES) or "all"
        verify = env_str("INGESTER_VERIFY", "lenient", e, choices=VERIFY_MODES) or "lenient"

        def hosts(names: str | Sequence[str]) -> list[str]:
            out = []
            for h in env_list(names, (), e):
                try:
                    out.append(normalize_host(h))
                except ValueError as err:
                    name = names if isinstance(names, str) else names[0]
                    raise ConfigError(f"{name}: {err}") from None
            return out

        hwm = env_int(("INGESTER_HIGH_WATER_MARK", "HIGH_WATER_MARK"), 100_000, e, minimum=0)
        collections = tuple(env_list("INGESTER_COLLECTIONS", DEFAULT_COLLECTIONS, e))
        for pattern in collections:
            if pattern != "*" and ("*" in pattern[:-1] or (pattern.endswith("*") and not pattern.endswith(".*"))):
                raise ConfigError(f"INGESTER_COLLECTIONS: bad pattern {pattern!r} (use nsid or prefix.*)")
        start = env_str("INGESTER_FIREHOSE_START_CURSOR", None, e)
        start_cursor: int | None = None
        if start is not None:
            start_cursor = env_int("INGESTER_FIREHOSE_START_CURSOR", 0, e, minimum=0)
        log_level = env_str(("LOG_LEVEL", "RUST_LOG"), "info", e) or "info"
        return cls(
            redis_url=redis_url,
            mode=mode,
            relay_hosts=hosts(("INGESTER_RELAY_HOSTS", "INGESTER_HOSTS")),
            labeler_hosts=hosts("INGESTER_LABELER_HOSTS"),
            firehose_stream=env_str("INGESTER_FIREHOSE_STREAM", FIREHOSE_LIVE, e) or FIREHOSE_LIVE,
            repo_stream=env_str("INGESTER_REPO_STREAM", REPO_BACKFILL, e) or REPO_BACKFILL,
            label_stream=env_str("INGESTER_LABEL_STREAM", LABEL_LIVE, e) or LABEL_LIVE,
            firehose_high_water_mark=env_int("INGESTER_FIREHOSE_HIGH_WATER_MARK", hwm, e, minimum=0),
            repo_high_water_mark=env_int("INGESTER_REPO_HIGH_WATER_MARK", hwm, e, minimum=0),
            label_high_water_mark=env_int("INGESTER_LABEL_HIGH_WATER_MARK", hwm, e, minimum=0),
            batch_size=env_int("INGESTER_BATCH_SIZE", 500, e, minimum=1, maximum=100_000),
            batch_timeout_ms=env_int("INGESTER_BATCH_TIMEOUT_MS", 100, e, minimum=1),
            collections=collections,
            verify=verify,
            metrics_port=env_int(("INGESTER_METRICS_PORT", "METRICS_PORT"), 9090, e, minimum=-1, maximum=65535),
            metrics_host=env_str("INGESTER_METRICS_HOST", "0.0.0.0", e) or "0.0.0.0",
            log_level=log_level.split(",")[0].split("=")[-1].lower(),
            plc_url=env_str("PLC_URL", "https://plc.directory", e) or "https://plc.directory",
            handle_resolver_map=env_str("PSKY_HANDLE_RESOLVER_MAP", "", e) or "",
            start_cursor=start_cursor,
            idle_timeout_s=env_float("INGESTER_IDLE_TIMEOUT_S", 60.0, e, minimum=0.1),
            reconnect_min_s=env_int("INGESTER_RECONNECT_MIN_MS", 500, e, minimum=1) / 1000.0,
            reconnect_max_s=env_int("INGESTER_RECONNECT_MAX_MS", 60_000, e, minimum=1) / 1000.0,
            healthy_after_s=env_float("INGESTER_HEALTHY_AFTER_S", 30.0, e, minimum=0.0),
            max_frame_bytes=env_int("INGESTER_MAX_FRAME_BYTES", 5_000_000, e, minimum=1024),
            repos_page_size=env_int("INGESTER_REPOS_PAGE_SIZE", 1000, e, minimum=1, maximum=1000),
            repos_recheck_s=env_float("INGESTER_REPOS_RECHECK_S", 60.0, e, minimum=0.01),
            repos_page_attempts=env_int("INGESTER_REPOS_PAGE_ATTEMPTS", 4, e, minimum=1, maximum=100),
            repo_state_cache=env_int("INGESTER_REPO_STATE_CACHE", 200_000, e, minimum=1),
            read_ahead_frames=env_int("INGESTER_READ_AHEAD_FRAMES", 2000, e, minimum=1),
            read_ahead_bytes=env_int("INGESTER_READ_AHEAD_BYTES", 8_000_000, e, minimum=1),
            resolve_concurrency=env_int("INGESTER_RESOLVE_CONCURRENCY", 32, e, minimum=1, maximum=10_000),
        )
