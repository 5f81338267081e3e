"""Backfiller settings: the rsky-backfiller variables of the deployment guide, plus psky's
politeness, safety and size limits (all read once at start; a bad value names its variable)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from psky.config import ConfigError, env_float, env_int, env_list, env_str
from psky.identity import DEFAULT_PLC_URL
from psky.services import resolve_redis_url
from psky.streams import FIREHOSE_BACKFILL, REPO_BACKFILL, REPO_BACKFILL_DLQ, REPO_BACKFILL_GROUP

__all__ = ["BackfillerConfig"]


@dataclass(frozen=True, slots=True)
class BackfillerConfig:
    redis_url: str
    consumer: str
    group: str = REPO_BACKFILL_GROUP
    backfill_stream: str = REPO_BACKFILL
    firehose_stream: str = FIREHOSE_BACKFILL
    dlq_stream: str = REPO_BACKFILL_DLQ
    concurrency: int = 20
    batch_size: int = 500
    http_timeout_s: float = 60.0
    max_retries: int = 3
    retry_initial_backoff_ms: int = 1000
    retry_max_backoff_ms: int = 30_000
    metrics_port: int = 9090
    metrics_host: str = "0.0.0.0"
    plc_url: str = DEFAULT_PLC_URL
    high_water_mark: int = 100_000
    #: largest repo CAR accepted (bytes)
    max_car_bytes: int = 256 * 1024 * 1024
    max_redirects: int = 3
    host_concurrency: int = 8
    host_rate: float = 50.0
    #: repos queued for one host beyond its concurrency before more are deferred (0 = batch_size)
    host_backlog: int = 0
    #: IPs, CIDRs or host names that may be private (local networks, tests)
    allow_hosts: tuple[str, ...] = field(default_factory=tuple)
    #: pending entries idle this long belong to a dead consumer and are claimed
    claim_idle_ms: int = 60_000
    claim_interval_ms: int = 1000
    #: longest a worker waits for a host's Retry-After before rescheduling the repo
    max_host_wait_s: float = 2.0
    #: create events written per chunk (the TypeScript backfiller's 500)
    chunk_size: int = 500
    handle_map: str = ""
    #: seconds between two "backfill progress" log lines
    progress_interval_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackfillerConfig:
        env = os.environ if env is None else env
        redis_url = resolve_redis_url(env)
        if redis_url is None:
            raise ConfigError("REDIS_URL: required but not set (or REDIS_HOST)")
        consumer = env_str("BACKFILLER_CONSUMER", env=env, required=True)
        assert consumer is not None
        initial = env_int("BACKFILLER_RETRY_INITIAL_BACKOFF_MS", 1000, env, minimum=0)
        maximum = env_int("BACKFILLER_RETRY_MAX_BACKOFF_MS", 30_000, env, minimum=0)
        if maximum < initial:
            raise ConfigError(
                f"BACKFILLER_RETRY_MAX_BACKOFF_MS: must be at least BACKFILLER_RETRY_INITIAL_BACKOFF_MS ({initial})"
            )
        claim_idle = env_int("BACKFILLER_CLAIM_IDLE_MS", max(60_000, 2 * maximum), env, minimum=100)
        if claim_idle <= maximum:
            raise ConfigError(
                f"BACKFILLER_CLAIM_IDLE_MS: must exceed BACKFILLER_RETRY_MAX_BACKOFF_MS ({maximum})"
            )
        return cls(
            redis_url=redis_url,
            consumer=consumer,
            group=env_str("BACKFILLER_GROUP", REPO_BACKFILL_GROUP, env) or REPO_BACKFILL_GROUP,
            backfill_stream=env_str("BACKFILLER_BACKFILL_STREAM", REPO_BACKFILL, env) or REPO_BACKFILL,
            firehose_stream=env_str("BACKFILLER_FIREHOSE_STREAM", FIREHOSE_BACKFILL, env)
            or FIREHOSE_BACKFILL,
            dlq_stream=env_str("BACKFILLER_DLQ_STREAM", REPO_BACKFILL_DLQ, env) or REPO_BACKFILL_DLQ,
            concurrency=env_int("BACKFILLER_CONCURRENCY", 20, env, minimum=1, maximum=10_000),
            batch_size=env_int("BACKFILLER_BATCH_SIZE", 500, env, minimum=1, maximum=100_000),
            http_timeout_s=env_float("BACKFILLER_HTTP_TIMEOUT_SECS", 60.0, env, minimum=0.001),
            max_retries=env_int("BACKFILLER_MAX_RETRIES", 3, env, minimum=0, maximum=1000),
            retry_initial_backoff_ms=initial,
            retry_max_backoff_ms=maximum,
            metrics_port=env_int("BACKFILLER_METRICS_PORT", 9090, env, minimum=0, maximum=65535),
            metrics_host=env_str("BACKFILLER_METRICS_HOST", "0.0.0.0", env) or "0.0.0.0",
            plc_url=env_str("PLC_URL", DEFAULT_PLC_URL, env) or DEFAULT_PLC_URL,
            high_water_mark=env_int(
                ["BACKFILLER_HIGH_WATER_MARK", "BACKFILLER_FIREHOSE_STREAM_HIGH_WATER_MARK"],
                100_000,
                env,
                minimum=0,
            ),
            max_car_bytes=env_int("BACKFILLER_MAX_CAR_BYTES", 256 * 1024 * 1024, env, minimum=1024),
            max_redirects=env_int("BACKFILLER_MAX_REDIRECTS", 3, env, minimum=0, maximum=20),
            host_concurrency=env_int("BACKFILLER_HOST_CONCURRENCY", 8, env, minimum=1),
            host_rate=env_float("BACKFILLER_HOST_RATE", 50.0, env, minimum=0.0),
            host_backlog=env_int("BACKFILLER_HOST_BACKLOG", 0, env, minimum=0),
            allow_hosts=tuple(env_list("BACKFILLER_ALLOW_HOSTS", (), env)),
            claim_idle_ms=claim_idle,
            claim_interval_ms=env_int("BACKFILLER_CLAIM_INTERVAL_MS", 1000, env, minimum=10),
            max_host_wait_s=env_float("BACKFILLER_MAX_HOST_WAIT_SECS", 2.0, env, minimum=0.0),
            handle_map=env_str("PSKY_HANDLE_RESOLVER_MAP", "", env) or "",
            progress_interval_s=env_float("BACKFILLER_PROGRESS_INTERVAL_SECS", 10.0, env, minimum=0.01),
        )
