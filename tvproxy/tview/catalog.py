"""The TVIEW catalog: plain SQL objects in a ``tvproxy`` schema of each database (no extension).

- ``<schema>.tview``: one row per TVIEW (entity, tables, pk column and type, definition,
  sources, key mapping, strategy, created_at).
- ``<schema>.pending_refresh``: the refresh queues of prepared (2PC) transactions.
- Changes are announced on the channel ``<schema>_catalog`` so every proxy instance reloads.

The SQL is built here from quoted identifiers; values are always bound parameters.  The
functions taking a connection run on an asyncpg connection (the proxy's own control link).
"""

from __future__ import annotations

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
    ]


def notify_channel(schema: str) -> str:
    return f"{schema}_catalog"


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


async def ensure_catalog(conn: Any, schema: str, lock_namespace: int) -> None:
    """Create the catalog if missing, in the connection's current transaction if one is open."""
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


async def save_entry(conn: Any, schema: str, entry: CatalogEntry) -> None:
    """Insert a TVIEW's row and announce the change (delivered when the transaction commits)."""

    if entry.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {entry.strategy!r}")
    await conn.execute(
        f"INSERT INTO {quote_ident(schema)}.tview (entity, table_name, view_name, pk_column,"
        f" pk_type, definition, sources, depends_on, key_mapping, strategy)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)",
        entry.entity, entry.table_name, entry.view_name, entry.pk_column, entry.pk_type,
        entry.definition, list(entry.sources), list(entry.depends_on),
        json.dumps(entry.key_mapping), entry.strategy)
    await conn.execute("SELECT pg_notify($1, $2)", notify_channel(schema), entry.entity)


async def delete_entry(conn: Any, schema: str, entity: str) -> bool:
    deleted = await conn.fetchval(
        f"DELETE FROM {quote_ident(schema)}.tview WHERE entity = $1 RETURNING true", entity)
    if deleted:
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
