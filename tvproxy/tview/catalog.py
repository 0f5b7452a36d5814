"""The TVIEW catalog: plain SQL objects in a ``tvproxy`` schema of each database (no extension).

- ``<schema>.tview``: one row per TVIEW (entity, tables, pk column and type, definition,
  sources, key mapping, strategy, created_at).
- ``<schema>.pending_refresh``: the refresh queues of prepared (2PC) transactions.
- ``<schema>.generation``: one row, one more in the transaction of every TVIEW created or
  dropped.  Changes are announced on the channel ``<schema>_catalog``; every proxy instance
  LISTENs there on every database it serves (a connection named ``tvproxy-listener <schema>
  <generation>``), reloads, and acknowledges the generation it has loaded in that
  application_name.  Whoever made the change waits until every listener of the database has
  acknowledged it (:func:`wait_for_listeners`) before it repairs the window with a diff
  refresh and reports success.

The SQL is built here from quoted identifiers; values are always bound parameters.  The
functions taking a connection run on an asyncpg connection (the proxy's own control link).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tvproxy.tview.analyze import quote_ident

STRATEGIES = ("incremental", "full")


def catalog_ddl(schema: str, lock_namespace: int) -> list[str]:
    """Idempotent statements creating the catalog (serialised by an advisory lock, so two
    instances creating it at once do not collide)."""
    s = quote_ident(schema)
    return [
        f"SELECT pg_advisory_xact_lock({int(lock_namespace)}, 0)",
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.tview (
            entity      text PRIMARY KEY,
            table_name  text NOT NULL UNIQUE,
            view_name   text NOT NULL UNIQUE,
            pk_column   text NOT NULL,
            pk_type     text NOT NULL,
            definition  text NOT NULL,
            sources     text[] NOT NULL DEFAULT '{{}}',
            depends_on  text[] NOT NULL DEFAULT '{{}}',
            key_mapping jsonb NOT NULL DEFAULT '{{}}',
            strategy    text NOT NULL DEFAULT 'incremental'
                        CHECK (strategy IN ('incremental', 'full')),
            created_at  timestamptz NOT NULL DEFAULT now())""",
        f"""CREATE TABLE IF NOT EXISTS {s}.pending_refresh (
            gid         text PRIMARY KEY,
            database    text NOT NULL,
            keys        jsonb NOT NULL,
            prepared_at timestamptz NOT NULL DEFAULT now())""",
        *_generation_ddl(s),
    ]


def _generation_ddl(s: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {s}.generation (
            one         boolean PRIMARY KEY DEFAULT true CHECK (one),
            value       bigint NOT NULL DEFAULT 0)""",
        f"INSERT INTO {s}.generation DEFAULT VALUES ON CONFLICT DO NOTHING",
    ]


def notify_channel(schema: str) -> str:
    return f"{schema}_catalog"


LISTENER_PREFIX = "tvproxy-listener"
_NOT_LOADED = "-"


def listener_name(schema: str, generation: int | None) -> str:
    """application_name of a proxy's catalog listener: which catalog it follows and which
    generation of it the proxy has loaded (``-``: none yet); the schema is cut so the whole
    name fits PostgreSQL's 63 bytes."""
    return f"{LISTENER_PREFIX} {schema[:24]} {_NOT_LOADED if generation is None else generation}"


def parse_listener_name(name: str) -> tuple[str, int | None] | None:
    """(schema, generation) of a listener's application_name, None for anything else."""
    if not name.startswith(LISTENER_PREFIX + " "):
        return None
    schema, _, generation = name[len(LISTENER_PREFIX) + 1:].rpartition(" ")
    if generation == _NOT_LOADED:
        return schema, None
    try:
        return schema, int(generation)
    except ValueError:
        return None


@dataclass(frozen=True)
class CatalogEntry:
    entity: str
    table_name: str
    view_name: str
    pk_column: str
    pk_type: str
    definition: str
    sources: tuple[str, ...]
    depends_on: tuple[str, ...]
    key_mapping: dict[str, Any]
    strategy: str = "incremental"
    created_at: datetime | None = None  # set by the database


async def _missing(conn: Any, schema: str, tables: tuple[str, ...]) -> bool:
    """Whether a catalog table is missing (then the idempotent DDL runs: without this test its
    "already exists, skipping" NOTICEs would reach the client of TVIEW DDL every time)."""
    s = quote_ident(schema)
    return not await conn.fetchval(
        "SELECT bool_and(to_regclass(t) IS NOT NULL) FROM unnest($1::text[]) t",
        [f"{s}.{quote_ident(t)}" for t in tables])


async def ensure_catalog(conn: Any, schema: str, lock_namespace: int) -> None:
    """Create the catalog if missing, in the connection's current transaction if one is open."""
    if not await _missing(conn, schema, ("tview", "pending_refresh", "generation")):
        return
    for attempt in (1, 2):
        try:
            async with conn.transaction():
                for sql in catalog_ddl(schema, lock_namespace):
                    await conn.execute(sql)
            return
        except Exception as exc:
            # another instance created it while this one waited for the advisory lock, and
            # this backend had not yet seen that in its catalog caches: once more
            if attempt == 2 or getattr(exc, "sqlstate", None) not in ("23505", "42P06", "42P07"):
                raise


GUARD = "raise_error"  # (sqlstate text, message text) -> boolean: raises that error


async def ensure_guard(conn: Any, schema: str) -> str:
    """The catalog's function raising an error from inside a statement (a self-referencing
    TVIEW's refresh fails with 54001 beyond max_propagation_depth), created when missing (in
    the caller's transaction, which holds the catalog generation lock); its qualified name."""
    name = f"{quote_ident(schema)}.{quote_ident(GUARD)}"
    if await conn.fetchval("SELECT to_regprocedure($1) IS NULL", f"{name}(text, text)"):
        await conn.execute(
            f"CREATE FUNCTION {name}(code text, msg text) RETURNS boolean LANGUAGE plpgsql"
            f" VOLATILE AS $fn$BEGIN RAISE EXCEPTION USING ERRCODE = code, MESSAGE = msg;"
            f" END$fn$")
    return name


TOUCH = "touch_row"  # (tv_ table, pk column, pk type, key) -> boolean: a no-op UPDATE of it


async def ensure_touch(conn: Any, schema: str) -> str:
    """The catalog's function giving one tv_ row a no-op UPDATE (the refresh gate calls it under
    REPEATABLE READ only, so that under READ COMMITTED the gate opens no tv_ table at all),
    created when missing, like :func:`ensure_guard`; its qualified name."""
    name = f"{quote_ident(schema)}.{quote_ident(TOUCH)}"
    if await conn.fetchval("SELECT to_regprocedure($1) IS NULL",
                           f"{name}(regclass, text, regtype, text)"):
        await conn.execute(
            f"CREATE FUNCTION {name}(rel regclass, pk text, typ regtype, k text) RETURNS boolean"
            f" LANGUAGE plpgsql VOLATILE AS $fn$BEGIN EXECUTE format('UPDATE %s t SET %I = t.%I"
            f" WHERE t.%I = $1::%s', rel, pk, pk, pk, typ) USING k; RETURN true; END$fn$")
    return name


async def load_catalog(conn: Any, schema: str) -> list[CatalogEntry]:
    """Every TVIEW of the database ([] when the catalog does not exist yet)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(schema)}.tview")
    if not exists:
        return []
    rows = await conn.fetch(
        f"SELECT entity, table_name, view_name, pk_column, pk_type, definition, sources,"
        f" depends_on, key_mapping::text AS key_mapping, strategy, created_at"
        f" FROM {quote_ident(schema)}.tview ORDER BY entity")
    return [
        CatalogEntry(r["entity"], r["table_name"], r["view_name"], r["pk_column"], r["pk_type"],
                     r["definition"], tuple(r["sources"]), tuple(r["depends_on"]),
                     json.loads(r["key_mapping"]), r["strategy"], r["created_at"])
        for r in rows
    ]


async def bump_generation(conn: Any, schema: str) -> int:
    """One more catalog generation, in the connection's transaction (its row lock also orders
    concurrent TVIEW DDL).  A catalog made before generations existed gets its row here."""
    ddl = _generation_ddl(quote_ident(schema))
    for sql in ddl if await _missing(conn, schema, ("generation",)) else ddl[-1:]:
        await conn.execute(sql)
    value = await conn.fetchval(
        f"UPDATE {quote_ident(schema)}.generation SET value = value + 1 RETURNING value")
    return int(value)


async def read_generation(conn: Any, schema: str) -> int:
    """The catalog generation committed so far (0 when there is no catalog).  Read it before
    the catalog: what is loaded afterwards is at least that generation."""
    rel = f"{quote_ident(schema)}.generation"
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", rel):
        return 0
    value = await conn.fetchval(f"SELECT value FROM {rel}")
    return int(value or 0)


_LISTENERS_SQL = """
SELECT pid, application_name FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
   AND application_name LIKE $1"""


async def lagging_listeners(conn: Any, schema: str, generation: int) -> list[int]:
    """Backend pids of the live listeners of this database's catalog that have not loaded
    ``generation`` yet."""
    out = []
    for row in await conn.fetch(_LISTENERS_SQL, LISTENER_PREFIX + " %"):
        parsed = parse_listener_name(row[1] or "")
        if parsed is None or parsed[0] != schema[:24]:
            continue
        if parsed[1] is None or parsed[1] < generation:
            out.append(int(row[0]))
    return out


async def wait_for_listeners(conn: Any, schema: str, generation: int,
                             timeout: float = 5.0) -> list[int]:
    """Poll ``pg_stat_activity`` until every listener acknowledged ``generation``; returns the
    pids still lagging when ``timeout`` runs out (empty: every proxy maintains the change)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.002
    while True:
        lagging = await lagging_listeners(conn, schema, generation)
        if not lagging or loop.time() >= deadline:
            return lagging
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, 0.05)


async def save_entry(conn: Any, schema: str, entry: CatalogEntry) -> None:
    """Insert a TVIEW's row, bump the generation and announce the change (delivered when the
    transaction commits)."""

    if entry.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {entry.strategy!r}")
    await conn.execute(
        f"INSERT INTO {quote_ident(schema)}.tview (entity, table_name, view_name, pk_column,"
        f" pk_type, definition, sources, depends_on, key_mapping, strategy)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)",
        entry.entity, entry.table_name, entry.view_name, entry.pk_column, entry.pk_type,
        entry.definition, list(entry.sources), list(entry.depends_on),
        json.dumps(entry.key_mapping), entry.strategy)
    await bump_generation(conn, schema)
    await conn.execute("SELECT pg_notify($1, $2)", notify_channel(schema), entry.entity)


async def delete_entry(conn: Any, schema: str, entity: str) -> bool:
    deleted = await conn.fetchval(
        f"DELETE FROM {quote_ident(schema)}.tview WHERE entity = $1 RETURNING true", entity)
    if deleted:
        await bump_generation(conn, schema)
        await conn.execute("SELECT pg_notify($1, $2)", notify_channel(schema), entity)
    return bool(deleted)


_SOURCES_SQL = """
WITH RECURSIVE deps(relid, depth) AS (
    SELECT DISTINCT d.refobjid, 1
      FROM pg_rewrite r
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                      AND d.refclassid = 'pg_class'::regclass
     WHERE r.ev_class = $1::regclass AND d.refobjid <> $1::regclass
    UNION
    SELECT d.refobjid, deps.depth + 1
      FROM deps
      JOIN pg_rewrite r ON r.ev_class = deps.relid
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                      AND d.refclassid = 'pg_class'::regclass
     WHERE d.refobjid <> deps.relid AND deps.depth < 100
)
SELECT DISTINCT c.relname, n.nspname, c.relkind::text AS relkind, min(deps.depth) AS depth
  FROM deps JOIN pg_class c ON c.oid = deps.relid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 GROUP BY c.relname, n.nspname, c.relkind
 ORDER BY depth, n.nspname, c.relname
"""


@dataclass(frozen=True)
class ViewSource:
    name: str
    schema: str
    kind: str  # "table" or "view"
    depth: int  # 1 = read by the view itself, 2 = through one nested view, ...


async def view_sources(conn: Any, view: str) -> list[ViewSource]:
    """Every relation a view reads, recursively through nested views, from PostgreSQL's own
    dependency catalog (pg_depend of the view's rewrite rules)."""
    rows = await conn.fetch(_SOURCES_SQL, view)
    kinds = {"r": "table", "p": "table", "v": "view", "m": "view", "f": "table"}
    return [ViewSource(r["relname"], r["nspname"], kinds.get(r["relkind"], r["relkind"]),
                       r["depth"]) for r in rows]
