"""The AppView schema: psky's migrations against the TypeScript services' schema dump.

Every test runs on real PostgreSQL (the embedded 18, or the server DATABASE_URL names).
The reference is `../shared/reference/bsky-schema.sql`, a `pg_dump --schema-only` of a
database the TypeScript migrations built; it is loaded as-is with one `execute`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from psky.db import MigrationError, PoolConfigError, create_pool, migrate, pool_sizes, run_migrations
from psky.db.migrations import (
    BASELINE_RELATIONS,
    BOOKKEEPING_TABLE,
    Catalog,
    catalog_snapshot,
    diff_catalogs,
)
from psky.db.schema import BASELINE, MIGRATIONS, Migration

pytestmark = pytest.mark.services

# A copy under tests/fixtures wins; otherwise the shared workspace's original.
REFERENCE_SQL = Path(__file__).resolve().parent / "fixtures" / "bsky-schema.sql"
if not REFERENCE_SQL.exists():
    REFERENCE_SQL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bsky-schema.sql"
KYSELY = tuple(name for name, _ in BASELINE.kysely_equivalent)


def _db_url(base: str, name: str) -> str:
    return urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


async def _load_reference(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(REFERENCE_SQL.read_text())
    finally:
        await conn.close()


async def _snapshot(url: str, schema: str = "public", alias: str | None = None) -> Catalog:
    conn = await asyncpg.connect(url)
    try:
        return await catalog_snapshot(conn, schema, alias=alias)
    finally:
        await conn.close()


async def _typescript_database(url: str, names: tuple[str, ...] = KYSELY) -> None:
    """What the TypeScript migrator leaves: the schema, its bookkeeping and its data rows."""
    await _load_reference(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(
            'INSERT INTO public.kysely_migration (name, "timestamp") VALUES ($1, $2)',
            [(name, "2025-10-09T04:02:22.812Z") for name in names],
        )
        await conn.execute(
            "INSERT INTO public.kysely_migration_lock (id, is_locked) VALUES ('migration_lock', 0);"
            "INSERT INTO public.view_param (name, value) VALUES"
            " ('whats_hot_like_threshold', '2'), ('whats_hot_interval', '1day');"
            "INSERT INTO public.post (uri, cid, creator, text, \"createdAt\", \"indexedAt\") VALUES"
            " ('at://did:plc:a/app.bsky.feed.post/1', 'bafy', 'did:plc:a', 'hello',"
            "  '2024-01-01T00:00:00.000Z', '2024-01-02T00:00:00.000Z');"
        )
    finally:
        await conn.close()


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def _bookkeeping_exists(url: str) -> bool:
    rows = await _fetch(url, f"SELECT to_regclass('public.{BOOKKEEPING_TABLE}') IS NOT NULL AS present")
    return bool(rows[0]["present"])


@pytest.fixture(scope="module")
async def reference_catalog(database_url: str) -> AsyncIterator[Catalog]:
    """Catalog of a fresh database into which the reference dump was loaded."""
    name = f"psky_test_ref_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        await _load_reference(_db_url(database_url, name))
        yield await _snapshot(_db_url(database_url, name))
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# ------------------------------------------------------------------ fresh database


async def test_reference_dump_loads_as_52_tables(reference_catalog: Catalog) -> None:
    kinds = reference_catalog["relations"]
    assert sum(kind == "table" for kind in kinds.values()) == 52
    assert kinds["algo_whats_hot_view"] == "materialized view"
    assert reference_catalog["extensions"]["pg_trgm"] == "in schema public"
    assert set(BASELINE_RELATIONS) == {k for k, v in kinds.items() if v != "sequence"}


async def test_migrations_create_the_reference_schema(pg_database: str, reference_catalog: Catalog) -> None:
    assert await migrate(pg_database) == [m.version for m in MIGRATIONS]
    ours = await _snapshot(pg_database)
    diff = diff_catalogs(reference_catalog, ours)
    assert not diff, "schema differs from bsky-schema.sql:\n" + diff.render()
    # every section was actually compared
    assert {k: len(v) for k, v in ours.items() if k != "extensions"} == {
        k: len(v) for k, v in reference_catalog.items() if k != "extensions"
    }
    assert len(ours["columns"]) > 300 and len(ours["indexes"]) > 90 and len(ours["sequences"]) == 5


async def test_comparison_reports_each_kind_of_difference(pg_database: str, reference_catalog: Catalog) -> None:
    await migrate(pg_database)
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(
            'ALTER TABLE actor ALTER COLUMN "trustedVerifier" DROP DEFAULT;'
            "DROP INDEX label_cts_idx;"
            "CREATE INDEX post_text_idx ON post (text);"
            "ALTER TABLE repost DROP CONSTRAINT repost_unique_subject;"
        )
    finally:
        await conn.close()
    diff = diff_catalogs(reference_catalog, await _snapshot(pg_database))
    text = diff.render()
    assert diff.fatal
    assert ("indexes", "label_cts_idx") in {(s, k) for s, k, _ in diff.missing}
    assert ("constraints", "repost.repost_unique_subject") in {(s, k) for s, k, _ in diff.missing}
    assert ("indexes", "post_text_idx") in {(s, k) for s, k, _ in diff.extra}
    changed = {(s, k): (want, have) for s, k, want, have in diff.changed}
    want, have = changed[("columns", "actor.trustedVerifier")]
    assert "DEFAULT false" in want and "DEFAULT" not in have
    assert "missing index label_cts_idx" in text and "extra index post_text_idx" in text


async def test_baseline_records_the_kysely_migrations(pg_database: str) -> None:
    await migrate(pg_database)
    names = await _fetch(pg_database, "SELECT name FROM kysely_migration ORDER BY name")
    assert tuple(r["name"] for r in names) == KYSELY and len(KYSELY) == 54
    lock = await _fetch(pg_database, "SELECT id, is_locked FROM kysely_migration_lock")
    assert [tuple(r) for r in lock] == [("migration_lock", 0)]
    params = await _fetch(pg_database, "SELECT name, value FROM view_param ORDER BY name")
    assert [tuple(r) for r in params] == [("whats_hot_interval", "1day"), ("whats_hot_like_threshold", "2")]
    rows = await _fetch(pg_database, f"SELECT version, name, checksum, mode FROM {BOOKKEEPING_TABLE}")
    assert [tuple(r) for r in rows] == [("0001", "baseline", BASELINE.checksum, "applied")]
    # the materialized view is populated, as the TypeScript migration leaves it
    assert (await _fetch(pg_database, "SELECT count(*) AS n FROM algo_whats_hot_view"))[0]["n"] == 0


async def test_migrate_twice_applies_nothing(pg_database: str, reference_catalog: Catalog) -> None:
    assert await migrate(pg_database) == ["0001"]
    before = await _fetch(pg_database, f"SELECT version, applied_at FROM {BOOKKEEPING_TABLE}")
    assert await migrate(pg_database) == []
    assert await _fetch(pg_database, f"SELECT version, applied_at FROM {BOOKKEEPING_TABLE}") == before
    assert not diff_catalogs(reference_catalog, await _snapshot(pg_database))


async def test_concurrent_migrations_apply_once(pg_database: str, reference_catalog: Catalog) -> None:
    results = await asyncio.gather(*(migrate(pg_database) for _ in range(3)))
    assert sorted(results) == [[], [], ["0001"]]
    rows = await _fetch(pg_database, f"SELECT version FROM {BOOKKEEPING_TABLE}")
    assert [r["version"] for r in rows] == ["0001"]
    assert len(await _fetch(pg_database, "SELECT name FROM kysely_migration")) == 54
    diff = diff_catalogs(reference_catalog, await _snapshot(pg_database))
    assert not diff, diff.render()


async def test_other_schema(pg_database: str, reference_catalog: Catalog) -> None:
    assert await migrate(pg_database, schema="appview") == ["0001"]
    diff = diff_catalogs(reference_catalog, await _snapshot(pg_database, "appview", alias="public"))
    assert not diff, diff.render()
    assert await migrate(pg_database, schema="appview") == []


def test_diff_classifies_and_limits() -> None:
    expected: Catalog = {"columns": {"t.a": "x", "t.b": "y"}, "column_order": {"t": "a, b"}}
    reordered: Catalog = {"columns": {"t.a": "x", "t.b": "y"}, "column_order": {"t": "b, a"}}
    diff = diff_catalogs(expected, reordered)
    assert diff and not diff.fatal  # column order alone does not stop an adoption
    assert diff.render() == "  different column order of t:\n      expected a, b\n      found    b, a"
    many = diff_catalogs({"indexes": {f"i{n:03}": "def" for n in range(150)}}, {})
    assert many.fatal and len(many.missing) == 150
    lines = many.render(limit=100).splitlines()
    assert len(lines) == 101 and lines[0] == "  missing index i000: def" and lines[-1] == "  ... and 50 more"


# -------------------------------------------------------- database from TypeScript


async def test_typescript_database_is_adopted_without_ddl(pg_database: str, reference_catalog: Catalog) -> None:
    await _typescript_database(pg_database)
    oids = await _fetch(pg_database, "SELECT relname, oid FROM pg_class WHERE relnamespace = 'public'::regnamespace")

    assert await migrate(pg_database) == ["0001"]

    rows = await _fetch(pg_database, f"SELECT version, checksum, mode FROM {BOOKKEEPING_TABLE}")
    assert [tuple(r) for r in rows] == [("0001", BASELINE.checksum, "adopted")]
    posts = await _fetch(pg_database, "SELECT uri, \"sortAt\" FROM post")
    assert [tuple(r) for r in posts] == [("at://did:plc:a/app.bsky.feed.post/1", "2024-01-01T00:00:00.000Z")]
    assert len(await _fetch(pg_database, "SELECT name FROM kysely_migration")) == 54
    after = await _fetch(pg_database, "SELECT relname, oid FROM pg_class WHERE relnamespace = 'public'::regnamespace")
    created = {r["relname"] for r in after} - {r["relname"] for r in oids}
    assert {r["relname"]: r["oid"] for r in after if r["relname"] not in created} == {
        r["relname"]: r["oid"] for r in oids
    }
    assert created == {BOOKKEEPING_TABLE, f"{BOOKKEEPING_TABLE}_pkey"}
    assert not diff_catalogs(reference_catalog, await _snapshot(pg_database))
    assert await migrate(pg_database) == []


async def test_adoption_tolerates_and_reports_extra_objects(pg_database: str) -> None:
    later = "_20251120T004738098Z"
    await _typescript_database(pg_database, (*KYSELY, later))
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(
            'ALTER TABLE public.actor ADD COLUMN "ageAssuranceAccess" text;'
            "CREATE INDEX like_subject_idx ON public.\"like\" (subject);"
        )
        report = await run_migrations(conn)
    finally:
        await conn.close()
    assert report.adopted == ["0001"] and report.applied == []
    warnings = "\n".join(report.warnings)
    assert later in warnings
    assert "extra column actor.ageAssuranceAccess" in warnings
    assert "extra index like_subject_idx" in warnings


async def test_adoption_refuses_a_schema_that_differs(pg_database: str) -> None:
    await _typescript_database(pg_database)
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("ALTER TABLE public.record DROP COLUMN rev; ALTER TABLE public.post ALTER COLUMN text TYPE text")
    finally:
        await conn.close()
    with pytest.raises(MigrationError) as failure:
        await migrate(pg_database)
    message = str(failure.value)
    assert "missing column record.rev" in message
    assert "different column post.text" in message and "text (text)" in message
    assert not await _bookkeeping_exists(pg_database)


async def test_partially_migrated_typescript_database_is_refused(pg_database: str) -> None:
    await _typescript_database(pg_database, KYSELY[:40])
    with pytest.raises(MigrationError) as failure:
        await migrate(pg_database)
    message = str(failure.value)
    assert "partially" in message and "40 of the 54" in message
    assert all(name in message for name in KYSELY[40:])
    assert "_20251009T040222812Z (20251009T040222812Z-backfill-init)" in message
    assert KYSELY[39] not in message
    assert not await _bookkeeping_exists(pg_database)


async def test_empty_kysely_bookkeeping_is_refused(pg_database: str) -> None:
    await _load_reference(pg_database)
    with pytest.raises(MigrationError, match="0 of the 54"):
        await migrate(pg_database)


async def test_tables_without_any_bookkeeping_are_refused(pg_database: str) -> None:
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("CREATE TABLE post (uri varchar PRIMARY KEY); CREATE TABLE unrelated (x int)")
    finally:
        await conn.close()
    with pytest.raises(MigrationError, match=r"1 of the AppView's tables \(post\)"):
        await migrate(pg_database)
    assert not await _bookkeeping_exists(pg_database)


async def test_edited_migration_is_detected(pg_database: str) -> None:
    await migrate(pg_database)
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(f"UPDATE {BOOKKEEPING_TABLE} SET checksum = 'feed'")
    finally:
        await conn.close()
    with pytest.raises(MigrationError, match=r"0001 \(baseline\) was recorded with checksum feed"):
        await migrate(pg_database)


async def test_unknown_newer_migrations_only_warn(pg_database: str) -> None:
    await migrate(pg_database)
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(
            f"INSERT INTO {BOOKKEEPING_TABLE} (version, name, checksum, mode, psky_version, duration_ms)"
            " VALUES ('9999', 'future', 'x', 'applied', '9.9', 1)"
        )
        report = await run_migrations(conn)
    finally:
        await conn.close()
    assert report.versions == []
    assert any("9999" in w for w in report.warnings)


# ------------------------------------------------------------------------ pool


@pytest.mark.parametrize(
    ("concurrency", "env", "expected"),
    [
        (100, {}, (50, 200)),
        (3, {}, (1, 6)),
        (1, {}, (0, 2)),
        (10, {"DB_POOL_MAX_SIZE": "40"}, (5, 40)),
        (10, {"DB_POOL_MIN_IDLE": "0"}, (0, 20)),
        (10, {"DB_POOL_MAX_SIZE": " 7 ", "DB_POOL_MIN_IDLE": "7"}, (7, 7)),
        (10, {"DB_POOL_MAX_SIZE": "2"}, (2, 2)),  # the derived minimum is capped
        (10, {"DB_POOL_MAX_SIZE": "", "DB_POOL_MIN_IDLE": "  "}, (5, 20)),  # empty = unset
    ],
)
def test_pool_sizes(concurrency: int, env: dict[str, str], expected: tuple[int, int]) -> None:
    assert pool_sizes(concurrency, env) == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DB_POOL_MAX_SIZE", "abc"),
        ("DB_POOL_MAX_SIZE", "0"),
        ("DB_POOL_MAX_SIZE", "-3"),
        ("DB_POOL_MAX_SIZE", "1.5"),
        ("DB_POOL_MAX_SIZE", "1e3"),
        ("DB_POOL_MIN_IDLE", "-1"),
        ("DB_POOL_MIN_IDLE", "ten"),
        ("DB_POOL_MIN_IDLE", "٣"),  # a digit, but not an ASCII one
    ],
)
def test_pool_sizes_reject_bad_values(variable: str, value: str) -> None:
    with pytest.raises(PoolConfigError, match=rf"^{variable}: expected a whole number"):
        pool_sizes(10, {variable: value})


def test_pool_sizes_reject_inconsistent_values() -> None:
    with pytest.raises(PoolConfigError, match=r"DB_POOL_MIN_IDLE \(9\) exceeds DB_POOL_MAX_SIZE \(4\)"):
        pool_sizes(10, {"DB_POOL_MAX_SIZE": "4", "DB_POOL_MIN_IDLE": "9"})
    with pytest.raises(PoolConfigError, match="concurrency"):
        pool_sizes(0, {})
    assert issubclass(PoolConfigError, ValueError)


async def test_create_pool_rejects_bad_sizes(database_url: str) -> None:
    for low, high in ((3, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="invalid pool sizes"):
            await create_pool(database_url, min_size=low, max_size=high, pgbouncer=False)


@pytest.mark.parametrize("pgbouncer", [False, True])
async def test_create_pool(database_url: str, pgbouncer: bool) -> None:
    pool = await create_pool(database_url, min_size=2, max_size=3, pgbouncer=pgbouncer)
    try:
        assert (pool.get_min_size(), pool.get_max_size(), pool.get_size()) == (2, 3, 2)
        async with pool.acquire() as conn:
            for n in range(3):
                assert await conn.fetchval("SELECT $1::int + 1", n) == n + 1
            named = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
            assert await conn.fetchval("SELECT current_setting('application_name')") == "psky"
        # PgBouncer mode prepares nothing by name (a named statement would not survive a
        # switch of server connection); the default mode caches them.
        assert (named == 0) is pgbouncer
    finally:
        await pool.close()


@pytest.fixture
def pgbouncer_url(database_url: str, pg_database: str) -> Iterator[str]:
    """``pg_database`` through a PgBouncer in transaction pooling mode (skipped without one)."""
    exe = shutil.which("pgbouncer")
    if exe is None:
        pytest.skip("pgbouncer is not installed")
    server = urlsplit(database_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="psky-pgbouncer-"))
    workdir.chmod(0o755)
    password = f" password={server.password}" if server.password else ""
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname} port={server.port} user={server.username or 'postgres'}{password}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 100\n"
    )
    command = [exe, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        command[1:1] = ["-u", "nobody"]
    log = workdir / "pgbouncer.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {log.read_text()!r}") from None
                time.sleep(0.05)
        yield urlunsplit(server._replace(netloc=f"{server.username or 'postgres'}@127.0.0.1:{port}",
                                         path=urlsplit(pg_database).path))
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_through_pgbouncer_transaction_pooling(pgbouncer_url: str) -> None:
    results = await asyncio.gather(*(migrate(pgbouncer_url) for _ in range(3)))
    assert sorted(results) == [[], [], ["0001"]]
    pool = await create_pool(pgbouncer_url, min_size=1, max_size=8, pgbouncer=True)

    async def work(worker: int) -> None:
        async with pool.acquire() as conn:
            for n in range(25):
                assert await conn.fetchval("SELECT count(*) FROM post WHERE creator = $1", f"did:{n}") == 0
                async with conn.transaction():
                    await conn.execute(
                        'INSERT INTO actor (did, "indexedAt") VALUES ($1, $2)', f"did:{worker}:{n}", "now"
                    )

    try:
        await asyncio.gather(*(work(worker) for worker in range(8)))  # 8 clients on 2 server connections
        assert await pool.fetchval("SELECT count(*) FROM actor") == 200
    finally:
        await pool.close()


async def test_failed_migration_rolls_back_the_whole_run(pg_database: str) -> None:
    broken = Migration("0002", "broken", "CREATE TABLE psky_probe (x int); SELECT no_such_column FROM post;")
    conn = await asyncpg.connect(pg_database)
    try:
        with pytest.raises(MigrationError, match=r"migration 0002 \(broken\) failed.*no_such_column"):
            await run_migrations(conn, migrations=(*MIGRATIONS, broken))
    finally:
        await conn.close()
    assert not await _bookkeeping_exists(pg_database)
    assert await _fetch(pg_database, "SELECT to_regclass('public.post') AS t, to_regclass('public.psky_probe') AS p") == [
        (None, None)
    ]


async def test_unreachable_database_is_a_clear_error(database_url: str) -> None:
    parts = urlsplit(database_url)
    url = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:s3cret@{parts.hostname}:{parts.port}",
                                    path="/psky_no_such_database"))
    with pytest.raises(MigrationError, match=r"cannot connect to .*:\*\*\*@.*/psky_no_such_database") as failure:
        await migrate(url)
    assert "s3cret" not in str(failure.value)


def test_psky_migrate_command(pg_database: str) -> None:
    """`psky migrate` as an operator runs it: applies once, then reports nothing to do."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": pg_database}
    first = subprocess.run([sys.executable, "-m", "psky.cli", "migrate"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "applied: 0001"
    again = subprocess.run([sys.executable, "-m", "psky.cli", "migrate", "--database-url", pg_database],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == "schema up to date"
    bad = subprocess.run([sys.executable, "-m", "psky.cli", "migrate"], capture_output=True, text=True,
                         env={**os.environ, "DATABASE_URL": "mysql://x"}, timeout=60)
    assert bad.returncode == 2 and "DATABASE_URL" in bad.stderr and "Traceback" not in bad.stderr
