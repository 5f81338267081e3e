"""``psky status``: the deployment guide's redis-cli and psql recipes in one view.

One snapshot (:func:`collect`) holds the Redis server's memory and persistence settings,
every pipeline stream (``firehose_live``, ``firehose_backfill``, ``repo_backfill``,
``label_live`` and each ``*_dlq``) with its groups, pending counts, lag and consumers, the
ingester's cursors per host (``<stream>:cursor:<host>``; listRepos progress reads
``!ingester-done`` when a host is fully enumerated), and PostgreSQL row counts with the
latest ``indexedAt``. Two snapshots give rates (:func:`with_rates`), which ``--watch`` shows.

Everything is read-only and cheap on a large deployment: stream figures come from ``XINFO``
and ``XPENDING`` (a sample of 100 entries per group), row counts of big tables are the
planner's estimates (``pg_class.reltuples``), and the latest ``indexedAt`` of a big table is
read from its last heap pages only (a TID range scan), since no index covers that column.
Each part fails on its own: an unreachable database still shows the Redis part, and the
other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from psky.streams import (
    CURSOR_DONE,
    FIREHOSE_BACKFILL,
    FIREHOSE_LIVE,
    LABEL_LIVE,
    REPO_BACKFILL,
    cursor_key,
    dlq_stream_for,
    failures_key,
    stream_info,
)
from psky.streams._redis import as_map, command, raw_client, text

__all__ = [
    "KNOWN_STREAMS",
    "TABLES",
    "StatusOptions",
    "collect",
    "embedded_urls",
    "format_text",
    "postgres_status",
    "redis_status",
    "redis_warnings",
    "run_status",
    "with_rates",
]

#: the pipeline's streams, in data-flow order
KNOWN_STREAMS = (REPO_BACKFILL, FIREHOSE_LIVE, FIREHOSE_BACKFILL, LABEL_LIVE)
#: tables whose row counts are shown (the AppView schema's main ones)
TABLES = (
    "record", "actor", "actor_sync", "profile", "profile_agg", "post", "post_agg", "like", "repost",
    "follow", "actor_block", "list", "list_item", "feed_item", "notification", "label", "duplicate_record",
)  # fmt: skip
#: tables whose latest "indexedAt" is shown
LATEST_TABLES = ("record", "post")
_SCAN_BATCH = 1000


@dataclass(slots=True, kw_only=True)
class StatusOptions:
    """What to read and when to warn."""

    #: prepended to every stream and cursor name (a shared Redis, tests)
    prefix: str = ""
    #: count every table exactly (slow on big tables) instead of estimating the big ones
    exact: bool = False
    #: tables up to this size on disk are counted exactly
    exact_bytes: int = 64 * 1024 * 1024
    #: heap pages read from the end of a big table for its latest indexedAt
    tail_pages: int = 2048
    #: a pending entry delivered this often means its group is stuck on it
    stuck_deliveries: int = 5
    #: a pending entry nobody touched for this long means its consumer is gone
    stale_pending_ms: int = 300_000
    #: per-statement limit for PostgreSQL, and the connect timeout of both servers
    timeout_s: float = 5.0
    #: ingester hosts whose cursors are read directly: (stream, host) pairs
    hosts: tuple[tuple[str, str], ...] = ()
    #: look for other cursors and dead-letter streams with SCAN up to this many keys in Redis
    scan_max_keys: int = 200_000

    @classmethod
    def hosts_from_env(cls, env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        """The ingester's configured hosts (INGESTER_RELAY_HOSTS/INGESTER_HOSTS feed
        ``firehose_live`` and ``repo_backfill``, INGESTER_LABELER_HOSTS ``label_live``)."""
        from psky.config import env_list
        from psky.ingester.config import normalize_host

        out: list[tuple[str, str]] = []
        for names, streams in ((("INGESTER_RELAY_HOSTS", "INGESTER_HOSTS"), (FIREHOSE_LIVE, REPO_BACKFILL)),
                               (("INGESTER_LABELER_HOSTS",), (LABEL_LIVE,))):
            for host in env_list(names, (), env):
                with contextlib.suppress(ValueError):
                    out += [(stream, normalize_host(host)) for stream in streams]
        return tuple(out)


def redact(url: str) -> str:
    """*url* without its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _error(e: BaseException) -> str:
    message = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {message}" if type(e).__name__ not in message else message


# --- Redis --------------------------------------------------------------------------------


async def scan_keys(raw: aioredis.Redis, pattern: str, kind: str, *, max_keys: int) -> list[str] | None:
    """Keys matching *pattern* of type *kind*, or None when the keyspace holds more than
    *max_keys* keys (the ingester keeps one key per repo: a full SCAN would take too long)."""
    if int(await command(raw, "DBSIZE")) > max_keys:
        return None
    found: set[str] = set()
    cursor: Any = 0
    while True:
        cursor, keys = await command(raw, "SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_BATCH, "TYPE", kind)
        found.update(text(k) for k in keys)
        if int(cursor) == 0:
            return sorted(found)


def glob_escape(value: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in value)


def redis_warnings(server: Mapping[str, Any]) -> list[str]:
    """Dangerous settings in a :func:`redis_status` ``server`` section.

    Eviction drops stream entries and cursors silently; without AOF or RDB snapshots a restart
    loses every stream, group and cursor (the ingester then restarts from the relay's head)."""
    out: list[str] = []
    policy = server.get("maxmemory_policy")
    if policy and policy != "noeviction":
        out.append(
            f"Redis maxmemory-policy is {policy}: under memory pressure Redis deletes stream entries "
            "and cursors; set maxmemory-policy noeviction"
        )
    aof, save = server.get("appendonly"), server.get("save")
    if aof is False and save == "":
        out.append("Redis persistence is off (appendonly no, no save points): a restart loses every stream, "
                   "group and cursor; set appendonly yes")
    elif aof is False and save is None:
        out.append("Redis AOF is off (appendonly no) and the snapshot settings are unreadable: "
                   "check that the server persists its data")
    for name in ("rdb_last_bgsave_status", "aof_last_write_status"):
        if server.get(name) not in (None, "ok"):
            out.append(f"Redis {name.replace('_', ' ')} is {server.get(name)}: persistence is failing")
    used, limit = server.get("used_memory"), server.get("maxmemory")
    if isinstance(used, int) and isinstance(limit, int) and limit > 0 and used > 0.8 * limit:
        out.append(f"Redis uses {used * 100 // limit}% of maxmemory: writers will soon get OOM errors")
    return out


async def _server_section(client: aioredis.Redis) -> dict[str, Any]:
    info = await client.info()
    aof = bool(int(info.get("aof_enabled", 0)))
    server: dict[str, Any] = {
        "version": str(info.get("redis_version", "")),
        "used_memory": int(info.get("used_memory", 0)),
        "maxmemory": int(info.get("maxmemory", 0)),
        "maxmemory_policy": info.get("maxmemory_policy"),
        "appendonly": aof,
        "save": None,  # RDB save points ("" = none); None when CONFIG is not allowed
        "rdb_last_bgsave_status": info.get("rdb_last_bgsave_status"),
        "aof_last_write_status": info.get("aof_last_write_status") if aof else None,
    }
    try:  # CONFIG is often disabled on managed servers: INFO's aof_enabled then stands alone
        config = as_map(await command(raw_client(client), "CONFIG", "GET", "save"))
        server["save"] = text(config.get("save", b"")).strip()
    except ResponseError:
        pass
    return server


async def _stream_section(raw: aioredis.Redis, client: aioredis.Redis, name: str, label: str,
                          options: StatusOptions) -> dict[str, Any]:
    info = await stream_info(client, name)
    out: dict[str, Any] = info.to_json()
    out["stream"] = label
    out["key"] = name
    out["entries_added"] = None
    if not info.exists:
        return out
    with contextlib.suppress(ResponseError):
        out["entries_added"] = _opt_int(as_map(await command(raw, "XINFO", "STREAM", name)).get("entries-added"))
    pipe = raw.pipeline(transaction=False)
    for group in info.groups:
        pipe.execute_command("XPENDING", name, group.name, "-", "+", 100)
        pipe.execute_command("HLEN", failures_key(name, group.name))
    replies = await pipe.execute()
    for index, group in enumerate(out["groups"]):
        sample, failing = replies[2 * index], replies[2 * index + 1]
        deliveries = [int(entry[3]) for entry in sample]
        group["max_deliveries"] = max(deliveries, default=0)
        group["redelivered"] = sum(1 for d in deliveries if d > 1)
        group["stuck"] = sum(1 for d in deliveries if d >= options.stuck_deliveries)
        group["failing"] = int(failing)
    return out


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _group_warnings(stream: Mapping[str, Any], options: StatusOptions) -> list[str]:
    out = []
    for group in stream.get("groups", ()):
        where = f"group {group['name']} on {stream['stream']}"
        if group.get("stuck"):
            out.append(
                f"{where}: {group['stuck']} pending entries delivered ≥ {options.stuck_deliveries} times "
                f"(up to {group['max_deliveries']}); they fail repeatedly — see the consumers' logs, "
                "or let the dead-letter limit move them aside"
            )
        idle = group.get("oldest_pending_idle_ms")
        if group.get("pending") and idle is not None and idle >= options.stale_pending_ms:
            out.append(
                f"{where}: oldest pending entry {group['oldest_pending_id']} untouched for "
                f"{_duration(idle / 1000)} (consumer {group['oldest_pending_consumer']}); "
                "no running member is claiming it"
            )
    return out


async def redis_status(client: aioredis.Redis, options: StatusOptions) -> dict[str, Any]:
    """The Redis part of a snapshot (raises on connection errors)."""
    raw = raw_client(client)
    server = await _server_section(client)
    prefix = options.prefix
    names = [prefix + s for s in KNOWN_STREAMS]
    names += [prefix + dlq_stream_for(s) for s in KNOWN_STREAMS]
    scanned = await scan_keys(raw, f"{glob_escape(prefix)}*_dlq", "stream", max_keys=options.scan_max_keys)
    names += [k for k in scanned or () if k not in names]
    streams = [await _stream_section(raw, client, n, n[len(prefix):], options) for n in names]
    cursor_keys = [prefix + cursor_key(stream, host) for stream, host in options.hosts]
    found = await scan_keys(raw, f"{glob_escape(prefix)}*:cursor:*", "string", max_keys=options.scan_max_keys)
    cursor_keys += [k for k in found or () if k not in cursor_keys]
    values = await command(raw, "MGET", *cursor_keys) if cursor_keys else []
    cursors = []
    for key, value in zip(cursor_keys, values, strict=True):
        stream, _, host = key[len(prefix):].partition(":cursor:")
        cursors.append(_cursor(stream, host, None if value is None else text(value)))
    warnings = redis_warnings(server)
    for section in streams:
        warnings += _group_warnings(section, options)
    return {"server": server, "streams": streams, "cursors": cursors, "warnings": warnings,
            "discovery": "complete" if found is not None else
            f"skipped: more than {options.scan_max_keys:,} keys (cursors of configured hosts only)"}


def _cursor(stream: str, host: str, value: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"stream": stream, "host": host, "value": value}
    if value is None:
        entry["state"] = "none"  # a configured host that has not stored a cursor yet
    elif value == CURSOR_DONE:
        entry["state"] = "done"
    elif stream.endswith(REPO_BACKFILL):
        entry["state"] = "enumerating"  # listRepos page cursors are opaque
    elif value.lstrip("-").isdigit():
        entry["state"] = "seq"
        entry["seq"] = int(value)
    else:
        entry["state"] = "other"
    return entry


# --- PostgreSQL ---------------------------------------------------------------------------


async def postgres_status(conn: asyncpg.Connection, options: StatusOptions) -> dict[str, Any]:
    """Row counts and latest ``indexedAt`` (raises on connection errors)."""
    timeout_ms = int(options.timeout_s * 1000)
    await conn.execute(f"SET statement_timeout = {timeout_ms}")
    version = await conn.fetchval("SHOW server_version")
    rows = await conn.fetch(
        """SELECT c.relname, c.reltuples::bigint AS estimate, pg_relation_size(c.oid) AS bytes,
                  c.relpages::bigint AS pages
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname = ANY($1::text[])""",
        list(TABLES),
    )
    present = {r["relname"]: r for r in rows}
    out: dict[str, Any] = {"version": version, "tables": [], "latest": {}, "warnings": []}
    if "record" not in present:
        out["warnings"].append("the AppView schema is missing in this database: run `psky migrate`")
    for table in TABLES:
        row = present.get(table)
        if row is None:
            continue
        entry: dict[str, Any] = {"table": table, "rows": None, "exact": False, "bytes": int(row["bytes"])}
        if options.exact or row["bytes"] <= options.exact_bytes or row["estimate"] < 0:
            try:
                entry["rows"] = int(await conn.fetchval(f'SELECT count(*) FROM "{table}"'))
                entry["exact"] = True
            except asyncpg.QueryCanceledError:
                entry["error"] = "count timed out"
        if entry["rows"] is None and row["estimate"] >= 0:
            entry["rows"] = int(row["estimate"])
        out["tables"].append(entry)
    for table in LATEST_TABLES:
        row = present.get(table)
        if row is None:
            continue
        out["latest"][table] = await _latest_indexed(conn, table, row, options)
    return out


async def _latest_indexed(conn: asyncpg.Connection, table: str, row: Mapping[str, Any],
                          options: StatusOptions) -> dict[str, Any]:
    """max("indexedAt"): exact on small tables, else over the last heap pages (new rows land there)."""
    tail = not options.exact and row["bytes"] > options.exact_bytes
    where = ""
    if tail:
        start = max(0, int(row["bytes"]) // 8192 - options.tail_pages)
        where = f" WHERE ctid >= '({start},0)'::tid"
    try:
        value = await conn.fetchval(f'SELECT max("indexedAt") FROM "{table}"{where}')
    except asyncpg.QueryCanceledError:
        return {"value": None, "exact": False, "error": "timed out"}
    return {"value": value, "exact": not tail}


# --- snapshots ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_urls(env: Mapping[str, str], *, need_postgres: bool = True
                        ) -> AsyncIterator[tuple[str | BaseException, str | BaseException | None]]:
    """``(redis, postgres)``: configured URLs, else embedded servers' (adopted or started);
    an error in place of a URL when that server cannot be had, so the other still works."""
    from psky.ops.embedded import EmbeddedServices, data_dir
    from psky.services import ConfigError, resolve_database_url, resolve_redis_url

    async with contextlib.AsyncExitStack() as stack:
        urls: list[str | BaseException | None] = []
        for kind in ("redis", "postgres"):
            if kind == "postgres" and not need_postgres:
                urls.append(None)
                continue
            try:
                url = resolve_redis_url(env) if kind == "redis" else resolve_database_url(env)
                if url is None:
                    services = EmbeddedServices(data_dir(env), redis=kind == "redis", postgres=kind == "postgres")
                    await stack.enter_async_context(services)
                    url = services.redis_url() if kind == "redis" else services.database_url()
                urls.append(url)
            except (ConfigError, OSError, RuntimeError) as e:
                urls.append(e)
        redis_url = urls[0]
        assert redis_url is not None
        yield redis_url, urls[1]


async def collect(redis_url: str | BaseException, database_url: str | BaseException | None,
                  options: StatusOptions | None = None) -> dict[str, Any]:
    """One snapshot as a JSON-ready dict: ``time``, ``redis``, ``postgres``, ``warnings``; a
    part that could not be read holds ``{"error": …}`` instead."""
    options = options or StatusOptions()
    snapshot: dict[str, Any] = {"time": _now_iso(), "monotonic": time.monotonic()}

    async def read_redis() -> dict[str, Any]:
        if isinstance(redis_url, BaseException):
            return {"error": _error(redis_url)}
        client = aioredis.Redis.from_url(redis_url, socket_timeout=options.timeout_s * 4,
                                         socket_connect_timeout=options.timeout_s)
        try:
            return {"url": redact(redis_url), **await redis_status(client, options)}
        except (RedisError, OSError) as e:
            return {"url": redact(redis_url), "error": _error(e)}
        finally:
            await client.aclose()

    async def read_postgres() -> dict[str, Any] | None:
        if database_url is None:
            return None
        if isinstance(database_url, BaseException):
            return {"error": _error(database_url)}
        try:
            conn = await asyncpg.connect(database_url, timeout=options.timeout_s)
        except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as e:
            return {"url": redact(database_url), "error": _error(e)}
        try:
            return {"url": redact(database_url), **await postgres_status(conn, options)}
        except (TimeoutError, OSError, asyncpg.PostgresError) as e:
            return {"url": redact(database_url), "error": _error(e)}
        finally:
            await conn.close(timeout=options.timeout_s)

    snapshot["redis"], snapshot["postgres"] = await asyncio.gather(read_redis(), read_postgres())
    warnings: list[str] = []
    for part in ("redis", "postgres"):
        section = snapshot[part]
        if section is not None:
            warnings += section.pop("warnings", [])
    snapshot["warnings"] = warnings
    return snapshot


def with_rates(current: dict[str, Any], previous: dict[str, Any] | None, *, stall_s: float = 10.0) -> dict[str, Any]:
    """Add per-second rates to *current* from the figures both snapshots have: entries added
    per stream (else net length change), entries read per group (Redis ≥ 7), cursor seqs,
    row counts; and warn about a group that has entries waiting and has neither delivered
    nor settled anything for *stall_s* seconds (over consecutive snapshots)."""
    if previous is None:
        return current
    seconds = float(current["monotonic"]) - float(previous["monotonic"])
    if seconds <= 0:
        return current
    current["interval_s"] = round(seconds, 3)

    def rate(now: Any, before: Any) -> float | None:
        if not isinstance(now, int) or not isinstance(before, int):
            return None
        return round(float(now - before) / seconds, 2)

    old_streams = {s["key"]: s for s in (previous.get("redis") or {}).get("streams", ())}
    for stream in (current.get("redis") or {}).get("streams", ()):
        old = old_streams.get(stream["key"])
        if old is None:
            continue
        added = rate(stream.get("entries_added"), old.get("entries_added"))
        stream["rate_in"] = added
        stream["rate_net"] = rate(stream["length"], old["length"])
        old_groups = {g["name"]: g for g in old.get("groups", ())}
        for group in stream.get("groups", ()):
            before = old_groups.get(group["name"])
            if before is None:
                continue
            group["rate_read"] = rate(group.get("entries_read"), before.get("entries_read"))
            unchanged = (group["pending"] == before["pending"] and group["pending"] > 0
                         and group["last_delivered_id"] == before["last_delivered_id"]
                         and group["oldest_pending_id"] == before["oldest_pending_id"]
                         and (group.get("lag") or 0) > 0)
            group["stalled_s"] = round(before.get("stalled_s", 0.0) + seconds, 3) if unchanged else 0.0
            if unchanged and group["stalled_s"] >= stall_s:
                current["warnings"].append(
                    f"group {group['name']} on {stream['stream']}: no progress for {group['stalled_s']:.0f}s "
                    f"({group['pending']} pending, {group['lag']} waiting); are its consumers running?"
                )
    old_cursors = {(c["stream"], c["host"]): c for c in (previous.get("redis") or {}).get("cursors", ())}
    for cursor in (current.get("redis") or {}).get("cursors", ()):
        old = old_cursors.get((cursor["stream"], cursor["host"]))
        if old is not None and "seq" in cursor:
            cursor["rate"] = rate(cursor["seq"], old.get("seq"))
    old_tables = {t["table"]: t for t in (previous.get("postgres") or {}).get("tables", ())}
    for table in (current.get("postgres") or {}).get("tables", ()):
        old = old_tables.get(table["table"])
        if old is not None:
            table["rate"] = rate(table["rows"], old["rows"])
    return current


# --- text ---------------------------------------------------------------------------------


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _rate(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:+,.1f}/s"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _id_age(entry_id: str | None) -> str:
    if not entry_id:
        return ""
    ms = int(entry_id.partition("-")[0])
    return _duration(max(0.0, time.time() - ms / 1000)) + " ago"


def format_text(snapshot: Mapping[str, Any]) -> str:
    """The snapshot as the terminal view."""
    lines = [f"psky status · {snapshot['time']}" + (
        f" · rates over {snapshot['interval_s']:.1f}s" if "interval_s" in snapshot else "")]
    r = snapshot.get("redis") or {}
    lines.append("")
    if "error" in r:
        lines.append(f"Redis {r.get('url', '')}: UNAVAILABLE — {r['error']}")
    else:
        s = r["server"]
        persistence = "+".join(p for p, on in (("aof", s["appendonly"]), ("rdb", bool(s["save"]))) if on) or "none"
        limit = _bytes(s["maxmemory"]) if s["maxmemory"] else "no limit"
        lines.append(f"Redis {s['version']} at {r['url']} · memory {_bytes(s['used_memory'])} / {limit} · "
                     f"policy {s['maxmemory_policy']} · persistence {persistence}")
        lines.append("")
        lines.append(f"  {'STREAM':<28} {'LENGTH':>12} {'IN':>12} {'NET':>12}  LAST ENTRY")
        dlqs = []
        for st in r["streams"]:
            if st["stream"].endswith("_dlq"):
                dlqs.append(st)
                continue
            if not st["exists"]:
                lines.append(f"  {st['stream']:<28} {'(absent)':>12}")
                continue
            lines.append(f"  {st['stream']:<28} {_n(st['length']):>12} {_rate(st.get('rate_in')):>12} "
                         f"{_rate(st.get('rate_net')):>12}  {_id_age(st['last_id'])}")
            for g in st["groups"]:
                extra = []
                if g.get("entries_read") is not None:
                    read_rate = f" ({_rate(g['rate_read'])})" if g.get("rate_read") is not None else ""
                    extra.append(f"read {_n(g['entries_read'])}{read_rate}")
                if g.get("redelivered"):
                    extra.append(f"redelivered {g['redelivered']} (max {g['max_deliveries']}×)")
                if g.get("failing"):
                    extra.append(f"failing {g['failing']}")
                if g.get("oldest_pending_idle_ms") is not None:
                    extra.append(f"oldest pending idle {_duration(g['oldest_pending_idle_ms'] / 1000)}")
                lag = _n(g["lag"]) + ("+" if g["lag_source"] == "at_least" else "")
                lines.append(" · ".join([f"    group {g['name']}: pending {_n(g['pending'])}", f"lag {lag}", *extra]))
                for c in g["consumers"]:
                    lines.append(f"      {c['name']:<26} pending {_n(c['pending']):>8} · idle {_duration(c['idle_ms'] / 1000)}")
        lines.append("")
        lines.append("  DEAD LETTERS: " + (", ".join(
            f"{st['stream']} {_n(st['length'])}" for st in dlqs if st["exists"]) or "none"))
        if not r["discovery"].startswith("complete"):
            lines.append(f"  cursor and dead-letter discovery {r['discovery']}")
        if r["cursors"]:
            lines.append("")
            lines.append(f"  {'CURSOR':<20} {'HOST':<36} VALUE")
            for c in r["cursors"]:
                value = {"done": "listRepos done", "none": "(no cursor yet)"}.get(c["state"]) or (
                    f"listRepos page {c['value'][:24]}" if c["state"] == "enumerating" else c["value"][:40])
                lines.append(f"  {c['stream']:<20} {c['host']:<36} {value} {_rate(c.get('rate'))}".rstrip())
    p = snapshot.get("postgres")
    if p is not None:
        lines.append("")
        if "error" in p:
            lines.append(f"PostgreSQL {p.get('url', '')}: UNAVAILABLE — {p['error']}")
        else:
            lines.append(f"PostgreSQL {p['version']} at {p['url']}")
            latest = " · ".join(
                f"{t} {v['value'] or '-'}{'' if v.get('exact', True) else ' (recent pages)'}"
                for t, v in p["latest"].items())
            if latest:
                lines.append(f"  latest indexedAt: {latest}")
            row = []
            for t in p["tables"]:
                mark = "" if t["exact"] else "~"
                row.append(f"{t['table']} {mark}{_n(t['rows'])}" + (f" ({_rate(t['rate'])})" if t.get("rate") else ""))
            for i in range(0, len(row), 4):
                lines.append("  " + " · ".join(row[i:i + 4]))
    if snapshot["warnings"]:
        lines.append("")
        lines.extend(f"WARNING: {w}" for w in snapshot["warnings"])
    return "\n".join(lines)


def _json(snapshot: Mapping[str, Any]) -> str:
    return orjson.dumps({k: v for k, v in snapshot.items() if k != "monotonic"}).decode()


async def run_status(env: Mapping[str, str] | None = None, *, options: StatusOptions | None = None,
                     as_json: bool = False, watch: float | None = None, iterations: int | None = None,
                     out: TextIO | None = None) -> int:
    """Print one snapshot, or one every *watch* seconds (*iterations* times, else until
    interrupted). Exit status 1 when a part was unreadable in the last snapshot."""
    env = os.environ if env is None else env
    out = out or sys.stdout
    clear = watch is not None and not as_json and out.isatty()
    status = 0
    async with embedded_urls(env) as (redis_url, database_url):
        previous: dict[str, Any] | None = None
        count = 0
        while True:
            snapshot = with_rates(await collect(redis_url, database_url, options), previous)
            text_out = _json(snapshot) if as_json else format_text(snapshot)
            if clear:
                out.write("\x1b[H\x1b[2J")
            out.write(text_out + "\n")
            out.flush()
            status = 1 if any("error" in (snapshot[p] or {}) for p in ("redis", "postgres")) else 0
            previous, count = snapshot, count + 1
            if watch is None or (iterations is not None and count >= iterations):
                return status
            if not clear and not as_json:
                out.write("\n")
            await asyncio.sleep(watch)
