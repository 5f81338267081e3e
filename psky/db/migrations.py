"""Schema migrations: apply psky's versioned migrations, or adopt a TypeScript-built database.

Bookkeeping lives in ``psky_migration`` (version, name, checksum, when, how). A run is one
transaction under the same transaction-level advisory lock the kysely migrator takes, so
any number of psky processes, and a TypeScript migrator, can start against one database
at once: the first does the work, the others wait and then find nothing to do.

With no psky bookkeeping yet, the database is one of:

- empty (no baseline table): every migration is applied;
- built by the TypeScript services (``kysely_migration`` lists all 54 migrations the
  baseline reproduces): the baseline is recorded as *adopted* without any DDL, after the
  live catalog has been compared with what the baseline would create; a missing or
  different object aborts with the list of differences, extra objects (later TypeScript
  migrations, an operator's index) are reported as warnings;
- anything else (some kysely migrations missing, baseline tables without bookkeeping):
  a :class:`MigrationError` that says what is missing, and nothing is changed.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from psky import __version__
from psky.db.schema import BASELINE, MIGRATIONS, Migration
from psky.errors import UserError

log = logging.getLogger("psky.db.migrations")

BOOKKEEPING_TABLE = "psky_migration"
# kysely's PostgreSQL migration lock (pg_advisory_xact_lock), shared on purpose.
MIGRATION_LOCK_ID = 3853314791062309107

Catalog = dict[str, dict[str, str]]
RENDER_LIMIT = 100  # differences listed in one error or warning


class MigrationError(UserError):
    """The database cannot be migrated safely; the message says why and what differs."""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _baseline_relations(sql: str) -> frozenset[str]:
    pattern = r'^CREATE (?:TABLE|MATERIALIZED VIEW) "?([a-z_]+)"? '
    return frozenset(re.findall(pattern, sql, flags=re.MULTILINE))


BASELINE_RELATIONS = _baseline_relations(BASELINE.sql)


# --------------------------------------------------------------------------- catalog


_COLUMNS = """
SELECT c.table_name, c.column_name,
       row_number() OVER (PARTITION BY c.table_name ORDER BY c.ordinal_position) AS position,
       c.data_type, c.udt_name, c.is_nullable, c.column_default,
       c.character_maximum_length, c.is_generated, c.generation_expression
FROM information_schema.columns c
WHERE c.table_schema = $1 AND c.table_name <> $2
"""

_RELATIONS = """
SELECT c.relname, c.relkind::text AS relkind
FROM pg_catalog.pg_class c
WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND c.relname <> $2
"""

_VIEWS = """
SELECT c.relname, pg_catalog.pg_get_viewdef(c.oid) AS definition
FROM pg_catalog.pg_class c
WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)
  AND c.relkind IN ('v', 'm')
"""

_INDEXES = """
SELECT i.indexname, i.indexdef
FROM pg_catalog.pg_indexes i
WHERE i.schemaname = $1 AND i.tablename <> $2
"""

_CONSTRAINTS = """
SELECT t.relname, k.conname, k.contype::text AS contype,
       pg_catalog.pg_get_constraintdef(k.oid) AS definition
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class t ON t.oid = k.conrelid
WHERE k.connamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)
  AND t.relname <> $2
"""

_SEQUENCES = """
SELECT c.relname, s.seqtypid::regtype::text AS type, s.seqstart, s.seqmin, s.seqmax,
       s.seqincrement, s.seqcycle, s.seqcache,
       (SELECT t.relname || '.' || a.attname
          FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
          JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
           AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype = 'a') AS owned_by
FROM pg_catalog.pg_sequence s
JOIN pg_catalog.pg_class c ON c.oid = s.seqrelid
WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)
"""

_EXTENSIONS = """
SELECT e.extname, n.nspname
FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
"""

# Differences psky can live with when adopting a database (it names every column it writes).
NONFATAL_SECTIONS = frozenset({"column_order"})
_SINGULAR = {"relations": "relation", "columns": "column", "column_order": "column order of",
             "views": "view", "indexes": "index", "constraints": "constraint",
             "sequences": "sequence", "extensions": "extension"}
_KINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view",
          "S": "sequence", "f": "foreign table"}
_CONTYPES = {"p": "primary key", "u": "unique", "f": "foreign key", "c": "check",
             "n": "not null", "x": "exclusion", "t": "trigger"}


def _column_text(row: Mapping[str, Any]) -> str:
    text = f"{row['data_type']} ({row['udt_name']}"
    if row["character_maximum_length"] is not None:
        text += f", max {row['character_maximum_length']}"
    text += ")"
    text += " NULL" if row["is_nullable"] == "YES" else " NOT NULL"
    if row["column_default"] is not None:
        text += f" DEFAULT {row['column_default']}"
    if row["is_generated"] == "ALWAYS":
        text += f" GENERATED ALWAYS AS {row['generation_expression']}"
    return text


async def _snapshot(conn: asyncpg.Connection, schema: str, alias: str) -> Catalog:
    # Objects of a scratch schema print qualified with its name; present them as `alias`.
    printed = await conn.fetchval("SELECT pg_catalog.quote_ident($1)", alias)

    def fix(text: str) -> str:
        return text if alias == schema else text.replace(f"{schema}.", f"{printed}.")

    skip = BOOKKEEPING_TABLE
    catalog: Catalog = {}
    catalog["relations"] = {
        r["relname"]: _KINDS[r["relkind"]] for r in await conn.fetch(_RELATIONS, schema, skip)
    }
    columns = await conn.fetch(_COLUMNS, schema, skip)
    catalog["columns"] = {f"{r['table_name']}.{r['column_name']}": fix(_column_text(r)) for r in columns}
    order: dict[str, list[str]] = {}
    for r in sorted(columns, key=lambda r: (r["table_name"], r["position"])):
        order.setdefault(r["table_name"], []).append(r["column_name"])
    catalog["column_order"] = {table: ", ".join(names) for table, names in order.items()}
    catalog["views"] = {r["relname"]: fix(r["definition"]) for r in await conn.fetch(_VIEWS, schema)}
    catalog["indexes"] = {
        r["indexname"]: fix(r["indexdef"]) for r in await conn.fetch(_INDEXES, schema, skip)
    }
    catalog["constraints"] = {
        f"{r['relname']}.{r['conname']}": f"{_CONTYPES.get(r['contype'], r['contype'])}: "
        + fix(r["definition"])
        for r in await conn.fetch(_CONSTRAINTS, schema, skip)
    }
    catalog["sequences"] = {
        r["relname"]: (
            f"{r['type']} start {r['seqstart']} min {r['seqmin']} max {r['seqmax']}"
            f" increment {r['seqincrement']} cache {r['seqcache']}"
            f"{' cycle' if r['seqcycle'] else ''} owned by {r['owned_by']}"
        )
        for r in await conn.fetch(_SEQUENCES, schema)
    }
    catalog["extensions"] = {r["extname"]: f"in schema {r['nspname']}" for r in await conn.fetch(_EXTENSIONS)}
    return catalog


async def catalog_snapshot(conn: asyncpg.Connection, schema: str = "public", *, alias: str | None = None) -> Catalog:
    """The parts of a schema's catalog that must match the reference, as comparable text.

    Sections: relations, columns (type, nullability, default, generation, order), views,
    indexes, constraints, sequences, extensions; ``psky_migration`` is left out. Names are
    printed with an empty ``search_path`` so both sides qualify objects the same way;
    ``alias`` renames the schema in that text (to compare a scratch schema with public).
    """
    alias = alias or schema
    if conn.is_in_transaction():
        previous = await conn.fetchval("SELECT current_setting('search_path')")
        await conn.execute("SELECT pg_catalog.set_config('search_path', '', true)")
        try:
            return await _snapshot(conn, schema, alias)
        finally:
            await conn.execute("SELECT pg_catalog.set_config('search_path', $1, true)", previous)
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL search_path = ''")
        return await _snapshot(conn, schema, alias)


@dataclass
class CatalogDiff:
    """Differences between an expected and an actual catalog, per section and object."""

    missing: list[tuple[str, str, str]] = field(default_factory=list)  # (section, key, expected)
    changed: list[tuple[str, str, str, str]] = field(default_factory=list)  # + actual
    extra: list[tuple[str, str, str]] = field(default_factory=list)  # (section, key, actual)

    @property
    def fatal(self) -> bool:
        """Something psky relies on is absent or different (extras and column order are not)."""
        return bool(self.missing) or any(c[0] not in NONFATAL_SECTIONS for c in self.changed)

    def __bool__(self) -> bool:
        return bool(self.missing or self.changed or self.extra)

    def render(self, limit: int | None = None) -> str:
        """One line per difference (two more for a changed object), at most ``limit`` entries."""
        lines: list[str] = []
        for section, key, expected in self.missing:
            lines.append(f"  missing {_SINGULAR.get(section, section)} {key}: {expected}")
        for section, key, expected, actual in self.changed:
            lines.append(
                f"  different {_SINGULAR.get(section, section)} {key}:\n"
                f"      expected {expected}\n      found    {actual}"
            )
        for section, key, actual in self.extra:
            lines.append(f"  extra {_SINGULAR.get(section, section)} {key}: {actual}")
        if limit is not None and len(lines) > limit:
            lines = [*lines[:limit], f"  ... and {len(lines) - limit} more"]
        return "\n".join(lines)


def diff_catalogs(expected: Catalog, actual: Catalog) -> CatalogDiff:
    """Object-by-object comparison of two :func:`catalog_snapshot` results."""
    diff = CatalogDiff()
    for section in sorted(expected.keys() | actual.keys()):
        want, have = expected.get(section, {}), actual.get(section, {})
        for key in sorted(want.keys() | have.keys()):
            if key not in have:
                diff.missing.append((section, key, want[key]))
            elif key not in want:
                diff.extra.append((section, key, have[key]))
            elif want[key] != have[key]:
                diff.changed.append((section, key, want[key], have[key]))
    return diff


# ---------------------------------------------------------------------------- runner


@dataclass
class MigrationReport:
    """What one run did: versions applied (DDL ran) and adopted (recorded only)."""

    applied: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def versions(self) -> list[str]:
        return sorted(self.applied + self.adopted)


_BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    version text NOT NULL PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    mode text NOT NULL CHECK (mode IN ('applied', 'adopted')),
    psky_version text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL
)
"""


async def _set_search_path(conn: asyncpg.Connection, schema: str) -> None:
    path = _ident(schema) if schema == "public" else f"{_ident(schema)}, public"
    await conn.execute(f"SET LOCAL search_path TO {path}")


async def _exists(conn: asyncpg.Connection, schema: str, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{_ident(schema)}.{_ident(name)}"))


async def _record(conn: asyncpg.Connection, schema: str, migration: Migration, mode: str, ms: int) -> None:
    await conn.execute(
        f"INSERT INTO {_ident(schema)}.{BOOKKEEPING_TABLE}"
        " (version, name, checksum, mode, psky_version, duration_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        migration.version, migration.name, migration.checksum, mode, __version__, ms,
    )


async def baseline_diff(conn: asyncpg.Connection, schema: str = "public") -> CatalogDiff:
    """Compare ``schema`` with what the baseline creates, built in a throw-away schema.

    Runs inside the caller's transaction; the scratch schema lives in a savepoint that is
    rolled back, so nothing is left behind and the comparison uses this very server.
    """
    actual = await catalog_snapshot(conn, schema)
    scratch = f"psky_verify_{secrets.token_hex(6)}"
    savepoint = conn.transaction()
    await savepoint.start()
    try:
        await conn.execute(f"CREATE SCHEMA {scratch}")
        await _set_search_path(conn, scratch)
        await conn.execute(BASELINE.sql)
        expected = await catalog_snapshot(conn, scratch, alias=schema)
    finally:
        await savepoint.rollback()
    return diff_catalogs(expected, actual)


async def _adopt_typescript(conn: asyncpg.Connection, schema: str, report: MigrationReport) -> None:
    names = {r["name"] for r in await conn.fetch(f"SELECT name FROM {_ident(schema)}.kysely_migration")}
    expected = BASELINE.kysely_equivalent
    missing = [f"{name} ({source})" for name, source in expected if name not in names]
    if missing:
        raise MigrationError(
            f"database was migrated by the TypeScript services but only partially: "
            f"{len(expected) - len(missing)} of the {len(expected)} kysely migrations psky's baseline "
            f"reproduces are recorded in kysely_migration; missing: {', '.join(missing)}. "
            "Finish the TypeScript migrations first, or start from an empty database."
        )
    unknown = sorted(names - {name for name, _ in expected})
    if unknown:
        report.warnings.append(f"kysely_migration lists migrations newer than psky's baseline: {', '.join(unknown)}")
    started = time.monotonic()
    diff = await baseline_diff(conn, schema)
    if diff.fatal:
        raise MigrationError(
            f"database built by the TypeScript migrations does not match the schema they should "
            f"have created ({len(diff.missing)} missing, {len(diff.changed)} different, "
            f"{len(diff.extra)} extra):\n{diff.render(limit=RENDER_LIMIT)}"
        )
    if diff.extra:
        report.warnings.append(
            f"objects not in the reference schema (kept as they are):\n{diff.render(limit=RENDER_LIMIT)}"
        )
    await _record(conn, schema, BASELINE, "adopted", int((time.monotonic() - started) * 1000))
    report.adopted.append(BASELINE.version)


async def run_migrations(
    conn: asyncpg.Connection, *, schema: str = "public", migrations: Sequence[Migration] = MIGRATIONS
) -> MigrationReport:
    """Bring ``schema`` up to date in one transaction under the migration lock."""
    report = MigrationReport()
    timings: list[tuple[Migration, int]] = []
    async with conn.transaction():
        await conn.execute(f"SELECT pg_catalog.pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        if schema != "public":
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema)}")
        await _set_search_path(conn, schema)
        await conn.execute(_BOOKKEEPING_DDL.format(table=f"{_ident(schema)}.{BOOKKEEPING_TABLE}"))
        rows = await conn.fetch(f"SELECT version, name, checksum FROM {_ident(schema)}.{BOOKKEEPING_TABLE}")
        recorded = {r["version"]: r for r in rows}
        done = set(recorded)
        known = {m.version: m for m in migrations}
        for version, row in sorted(recorded.items()):
            migration = known.get(version)
            if migration is None:
                continue
            if row["checksum"] != migration.checksum:
                raise MigrationError(
                    f"migration {version} ({migration.name}) was recorded with checksum {row['checksum']}, "
                    f"but this psky has {migration.checksum}: the migration was edited after it was applied"
                )
        newer = sorted(set(recorded) - set(known))
        if newer:
            report.warnings.append(
                f"database has migrations this psky {__version__} does not know: {', '.join(newer)}"
            )

        if not recorded:
            if await _exists(conn, schema, "kysely_migration"):
                await _adopt_typescript(conn, schema, report)
                done.add(BASELINE.version)
            else:
                present = await _present_relations(conn, schema, BASELINE_RELATIONS)
                if present:
                    raise MigrationError(
                        f"schema {schema} already has {len(present)} of the AppView's tables "
                        f"({', '.join(present[:8])}{', ...' if len(present) > 8 else ''}) but neither "
                        f"{BOOKKEEPING_TABLE} nor kysely_migration: refusing to guess how it was built"
                    )

        for migration in migrations:
            if migration.version in done:
                continue
            started = time.monotonic()
            await _set_search_path(conn, schema)
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.version} ({migration.name}) failed, nothing was changed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            ms = int((time.monotonic() - started) * 1000)
            await _record(conn, schema, migration, "applied", ms)
            report.applied.append(migration.version)
            timings.append((migration, ms))
    # logged once committed: a failure later in the run rolls every step back
    for migration, ms in timings:
        log.info("applied migration %s (%s) in %d ms", migration.version, migration.name, ms)
    for version in report.adopted:
        log.info("adopted TypeScript-built database: recorded migration %s without running it", version)
    for warning in report.warnings:
        log.warning("%s", warning)
    return report


async def _present_relations(conn: asyncpg.Connection, schema: str, names: Iterable[str]) -> list[str]:
    rows = await conn.fetch(
        "SELECT relname FROM pg_catalog.pg_class"
        " WHERE relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1)"
        " AND relname = ANY($2::text[]) ORDER BY relname",
        schema, sorted(names),
    )
    return [r["relname"] for r in rows]


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


async def migrate(database_url: str, *, schema: str = "public") -> list[str]:
    """``psky migrate``: bring the database up to date; the versions applied or adopted.

    Connects without a statement cache so it works through PgBouncer in transaction mode.
    """
    try:
        conn = await asyncpg.connect(
            database_url, statement_cache_size=0, timeout=30, server_settings={"application_name": "psky-migrate"}
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise MigrationError(f"cannot connect to {_redact(database_url)}: {exc}") from exc
    try:
        return (await run_migrations(conn, schema=schema)).versions
    finally:
        await conn.close()
