"""`psky demo` and `psky run` as a user runs them: subprocesses with real Redis, PostgreSQL,
the local network and the services as child processes; the printed summary is checked
against the database, Ctrl-C against leftover processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from psky.devnet.network import Devnet
from psky.ops.live_view import ViewState, render
from psky.ops.pipeline import pid_alive
from psky.ops.status import StatusOptions, collect

pytest_plugins = ("tests.devnet_fixtures",)

_COUNT_LINE = re.compile(r"^\s+(accounts|posts|replies|likes|reposts|follows|labels)\s+([\d,]+)$", re.M)


def _env(redis_url: str, database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGESTER_", "BACKFILLER_", "INDEXER_"))}
    env.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url, "PSKY_DATA_DIR": str(data_dir)})
    env.pop("REDIS_HOST", None)
    env.pop("DB_POSTGRES_URL", None)
    env.update(extra)
    return env


async def _psky(*args: str, env: Mapping[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "psky.cli", *args, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def _read_until(proc: asyncio.subprocess.Process, needle: str, wait_s: float) -> str:
    """Output up to and including the first line matching the regular expression *needle*."""
    assert proc.stdout is not None
    seen: list[str] = []

    async def read() -> str:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"exited before {needle!r}:\n{''.join(seen)}")
            seen.append(line)
            if re.search(needle, line):
                return "".join(seen)

    return await asyncio.wait_for(read(), wait_s)


async def _finish(proc: asyncio.subprocess.Process, wait_s: float) -> tuple[int, str]:
    out, _ = await asyncio.wait_for(proc.communicate(), wait_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _children_gone(data_dir: Path, run: str) -> dict[str, int]:
    pids: dict[str, int] = orjson.loads((data_dir / "logs" / run / "pids.json").read_bytes())
    assert pids and all(isinstance(p, int) for p in pids.values())
    return {name: pid for name, pid in pids.items() if pid_alive(pid)}


async def _db_counts(database_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        return {
            "accounts": await conn.fetchval("SELECT count(*) FROM actor"),
            "posts": await conn.fetchval("SELECT count(*) FROM post"),
            "replies": await conn.fetchval('SELECT count(*) FROM post WHERE "replyParent" IS NOT NULL'),
            "likes": await conn.fetchval('SELECT count(*) FROM "like"'),
            "reposts": await conn.fetchval("SELECT count(*) FROM repost"),
            "follows": await conn.fetchval("SELECT count(*) FROM follow"),
            "labels": await conn.fetchval("SELECT count(*) FROM label"),
            "top_likes": await conn.fetchval('SELECT max("likeCount") FROM post_agg'),
        }
    finally:
        await conn.close()


async def _demo(*args: str, env: Mapping[str, str]) -> str:
    proc = await _psky("demo", "--no-live", *args, env=env)
    status, out = await _finish(proc, 240)
    assert status == 0, out
    assert "Summary, read from PostgreSQL" in out and "most-liked posts:" in out and "longest thread:" in out
    return out


def _printed(out: str) -> dict[str, int]:
    return {name: int(value.replace(",", "")) for name, value in _COUNT_LINE.findall(out)}


async def test_demo_ends_with_a_summary_that_matches_the_database(
        redis_url: str, pg_database: str, redis_prefix: str, tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    data = tmp_path / "data"
    env = _env(redis_url, pg_database, data)
    out = await _demo("--accounts", "30", "--records", "12", "--duration", "4", "--rate", "25", "--indexers", "2",
                      "--stream-prefix", redis_prefix, "--summary-json", str(summary_path), env=env)
    assert re.search(r"^\[\s*\d+s\] live writes", out, re.M), out  # progress lines (no terminal)
    assert re.search(r"indexer [\d,]+ events/s", out), out  # from the services' own metrics
    db = await _db_counts(pg_database)
    assert _printed(out) == {k: v for k, v in db.items() if k != "top_likes"}
    assert db["accounts"] >= 30 and db["posts"] > 0 and db["likes"] > 0 and db["labels"] > 0
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["most_liked"][0]["likes"] == db["top_likes"]
    assert summary["longest_thread"]["posts"] >= 2 and summary["errors"] == 0
    check = summary["network_check"]  # this run's ground truth (the devnet's manifest) against the database
    assert check["records"] > 0 and check["indexed"] > 0
    assert f"its active accounts hold {check['records']:,} records, {check['indexed']:,} are indexed" in out
    assert (data / "logs" / "demo" / "manifest.json").stat().st_size > 0
    assert _children_gone(data, "demo") == {}
    # the terminal view of what the run left behind: every stage drained, the rows indexed
    snapshot = await collect(redis_url, pg_database, StatusOptions(prefix=redis_prefix, exact=True))
    view = "\n".join(render(snapshot, None, ViewState(title="psky demo")))
    assert re.search(r"backfiller\s+firehose_backfill\s+0\s+firehose_group\s+0\s+0", view), view
    assert f"accounts {db['accounts']:,}" in view and f"posts {db['posts']:,}" in view
    assert re.search(r"cursor listRepos 127.0.0.1:\d+: done", view) and "dead letters: none" in view

    # again on the same data directory: a new workload seed, so new accounts join the old ones
    out = await _demo("--accounts", "10", "--records", "5", "--duration", "1", "--stream-prefix", redis_prefix,
                      env=env)
    assert "(seed 1)" in out
    again = await _db_counts(pg_database)
    assert _printed(out) == {k: v for k, v in again.items() if k != "top_likes"}
    assert again["accounts"] >= db["accounts"] + 10 and again["posts"] > db["posts"]
    assert _children_gone(data, "demo") == {}


async def test_demo_stops_cleanly_on_sigint(
        redis_url: str, pg_database: str, redis_prefix: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = await _psky("demo", "--accounts", "20", "--records", "8", "--duration", "300", "--rate", "10",
                       "--indexers", "1", "--no-live", "--stream-prefix", redis_prefix,
                       env=_env(redis_url, pg_database, data))
    head = await _read_until(proc, r"live writes .* indexed accounts [1-9]", 120)  # data is flowing
    proc.send_signal(signal.SIGINT)
    status, out = await _finish(proc, 120)
    out = head + out
    assert status in (0, 130), out
    assert "interrupted" in out and "Summary, read from PostgreSQL" in out
    assert "did not stop cleanly" not in out  # every service drained and exited 0
    assert _children_gone(data, "demo") == {}


async def test_run_indexes_from_the_given_relay(
        redis_url: str, pg_database: str, redis_prefix: str, tmp_path: Path, devnet: Devnet) -> None:
    workload = devnet.workload(5)
    await workload.seed(accounts=12, records_per_account=10, churn=0)
    await devnet.settle()
    endpoints = devnet.endpoints()
    data = tmp_path / "data"
    env = _env(redis_url, pg_database, data, PLC_URL=endpoints["plc"],
               PSKY_HANDLE_RESOLVER_MAP=endpoints["handle_resolver_map"], BACKFILLER_ALLOW_HOSTS="127.0.0.1")
    proc = await _psky("run", "--relay", endpoints["relay"], "--labeler", endpoints["labeler"], "--indexers", "1",
                       "--no-live", "--stream-prefix", redis_prefix, env=env)
    try:
        await _read_until(proc, "Ctrl-C stops", 60)
        posts = sum(1 for uri in workload.manifest.records() if "/app.bsky.feed.post/" in uri)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:  # the seeded history arrives through listRepos and the backfiller
            counts = await _db_counts(pg_database)
            if counts["accounts"] >= 12 and counts["posts"] >= posts:
                break
            assert proc.returncode is None and loop.time() < deadline, counts
            await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        status, out = await _finish(proc, 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert status in (0, 130), out
    printed = _printed(out)
    assert printed["accounts"] == 12 and printed["posts"] == posts
    assert _children_gone(data, "run") == {}
