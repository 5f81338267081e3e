"""Indexer settings: the rsky-indexer variables of the deployment guide, the TypeScript
stream/group names, and psky's delivery limit, notification and validation switches."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from psky.config import ConfigError, env_bool, env_int, env_list, env_str
from psky.db.pool import PoolConfigError, pool_sizes
from psky.identity import DEFAULT_PLC_URL
from psky.services import resolve_database_url, resolve_redis_url
from psky.streams import FIREHOSE_BACKFILL, FIREHOSE_GROUP, FIREHOSE_LIVE, LABEL_GROUP, LABEL_LIVE

__all__ = ["IndexerConfig"]


@dataclass(frozen=True, slots=True)
class IndexerConfig:
    redis_url: str
    database_url: str
    consumer: str
    streams: tuple[str, ...] = (FIREHOSE_LIVE, FIREHOSE_BACKFILL)
    group: str = FIREHOSE_GROUP
    label_stream: str | None = LABEL_LIVE
    label_group: str = LABEL_GROUP
    #: batches indexed at the same time (each one transaction on its own connection)
    concurrency: int = 4
    batch_size: int = 500
    #: streams whose events create notifications (live: yes; backfill: no, as in the TypeScript indexer)
    notify_streams: tuple[str, ...] = (FIREHOSE_LIVE,)
    validate: bool = True
    did_resolution: bool = True
    plc_url: str = DEFAULT_PLC_URL
    handle_map: str = ""
    max_deliveries: int = 5
    claim_idle_ms: int = 60_000
    pool_min: int = 2
    pool_max: int = 8
    pgbouncer: bool = False
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    migrate: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IndexerConfig:
        env = os.environ if env is None else env
        redis_url = resolve_redis_url(env)
        if redis_url is None:
            raise ConfigError("REDIS_URL: required but not set (or REDIS_HOST)")
        database_url = resolve_database_url(env)
        if database_url is None:
            raise ConfigError("DATABASE_URL: required but not set (or DB_POSTGRES_URL)")
        consumer = env_str("INDEXER_CONSUMER", env=env, required=True)
        assert consumer is not None
        streams = tuple(env_list("INDEXER_STREAMS", (FIREHOSE_LIVE, FIREHOSE_BACKFILL), env))
        if not streams:
            raise ConfigError("INDEXER_STREAMS: at least one stream is needed")
        if len(set(streams)) != len(streams):
            raise ConfigError(f"INDEXER_STREAMS: a stream is listed twice: {','.join(streams)}")
        concurrency = env_int("INDEXER_CONCURRENCY", 4, env, minimum=1, maximum=1000)
        try:
            pool_min, pool_max = pool_sizes(concurrency, env)
        except PoolConfigError as e:
            raise ConfigError(str(e)) from None
        if pool_max < 2:
            raise ConfigError("DB_POOL_MAX_SIZE: the indexer needs at least 2 connections")
        labels = env_bool("INDEXER_LABELS", True, env)
        label_stream = env_str("INDEXER_LABEL_STREAM", LABEL_LIVE, env) or LABEL_LIVE
        return cls(
            redis_url=redis_url,
            database_url=database_url,
            consumer=consumer,
            streams=streams,
            group=env_str("INDEXER_GROUP", FIREHOSE_GROUP, env) or FIREHOSE_GROUP,
            label_stream=label_stream if labels else None,
            label_group=env_str("INDEXER_LABEL_GROUP", LABEL_GROUP, env) or LABEL_GROUP,
            concurrency=concurrency,
            batch_size=env_int("INDEXER_BATCH_SIZE", 500, env, minimum=1, maximum=50_000),
            notify_streams=tuple(env_list("INDEXER_NOTIFY_STREAMS", (FIREHOSE_LIVE,), env)),
            validate=env_bool("INDEXER_VALIDATE_RECORDS", True, env),
            did_resolution=env_bool("ENABLE_DID_RESOLUTION", True, env),
            plc_url=env_str("PLC_URL", DEFAULT_PLC_URL, env) or DEFAULT_PLC_URL,
            handle_map=env_str("PSKY_HANDLE_RESOLVER_MAP", "", env) or "",
            max_deliveries=env_int("INDEXER_MAX_DELIVERIES", 5, env, minimum=1, maximum=1000),
            claim_idle_ms=env_int("INDEXER_CLAIM_IDLE_MS", 60_000, env, minimum=100),
            pool_min=pool_min,
            pool_max=pool_max,
            pgbouncer=env_bool(("DB_PGBOUNCER", "PGBOUNCER"), False, env),
            metrics_host=env_str("INDEXER_METRICS_HOST", "0.0.0.0", env) or "0.0.0.0",
            metrics_port=env_int(
                ("INDEXER_METRICS_PORT", "METRICS_PORT"), 9090, env, minimum=0, maximum=65535
            ),
            migrate=env_bool("INDEXER_MIGRATE", True, env),
        )
