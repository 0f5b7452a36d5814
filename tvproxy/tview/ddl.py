"""TVIEW DDL and maintenance on an asyncpg connection: the Python API behind the proxy's
``CREATE TABLE tv_x AS SELECT`` / ``DROP TABLE tv_x``, the ``tvproxy tview`` commands and the
engine's catalog loading.

    conn = await asyncpg.connect(dsn)
    result = await create_tview(conn, "CREATE TABLE tv_post AS SELECT ...")
    await drop_tviews(conn, "DROP TABLE tv_post")
    await refresh_full(conn, "post"); drift = await verify(conn)

Called outside a transaction block, ``create_tview`` and ``drop_tviews`` commit their own
transaction and then wait (bounded) until every proxy serving the database has loaded the new
catalog, and a creation ends with a diff refresh of the new TVIEW: that repairs writes other
proxies committed between the creating COMMIT and their reload.  Called inside the caller's
transaction, they leave that to the caller: ``await sync_catalog(conn, entities=[...])`` after
the COMMIT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvproxy.log import get_logger
from tvproxy.tview.analyze import (
    CreateTview,
    DropTviews,
    TviewError,
    base_entity,
    check_columns,
    key_mapping,
    parse_tview_ddl,
    refresh_order,
)
from tvproxy.tview.analyze import quote_ident as q
from tvproxy.tview.catalog import (
    CatalogEntry,
    ViewSource,
    bump_generation,
    delete_entry,
    ensure_catalog,
    ensure_guard,
    ensure_touch,
    load_catalog,
    read_generation,
    save_entry,
    view_sources,
    wait_for_listeners,
)
from tvproxy.tview.model import BaseTable, RuntimeCatalog, build_runtime
from tvproxy.tview.opaque import OpaqueFacts
from tvproxy.tview.selfref import SelfReference, self_reference

log = get_logger("tvproxy.tview")

DEFAULT_SCHEMA = "tvproxy"
DEFAULT_LOCK_NAMESPACE = 0x7476
SYNC_TIMEOUT = 5.0  # seconds a catalog change waits for every proxy to load it

_COLUMNS_SQL = """
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
  FROM pg_attribute a WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum"""

_PK_SQL = """
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
  FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
 WHERE i.indrelid = $1::regclass AND i.indisprimary"""


@dataclass(frozen=True)
class CreateResult:
    entity: str
    rows: int
    strategy: str
    warnings: tuple[str, ...]


async def _columns(conn: Any, rel: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in await conn.fetch(_COLUMNS_SQL, rel)]


async def _base_table(conn: Any, schema: str, name: str) -> BaseTable | None:
    rel = f"{q(schema)}.{q(name)}"
    cols = await _columns(conn, rel)
    pk = await conn.fetchrow(_PK_SQL, rel)
    if pk is None:
        guess = [(n, t) for n, t in cols if n == f"pk_{base_entity(name)}"]
        if not guess:
            return None
        pk = guess[0]
    return BaseTable(name, schema, pk[0], pk[1], tuple(n for n, _ in cols))


def _in_transaction(conn: Any) -> bool:
    probe = getattr(conn, "is_in_transaction", None)
    return bool(probe()) if probe is not None else False


async def sync_catalog(conn: Any, schema: str = DEFAULT_SCHEMA,
                       lock_namespace: int = DEFAULT_LOCK_NAMESPACE,
                       entities: tuple[str, ...] | list[str] = (),
                       timeout: float = SYNC_TIMEOUT) -> tuple[str, ...]:
    """After a committed catalog change: wait until every proxy listening on this database has
    loaded it, then diff-refresh ``entities`` (those still in the catalog), repairing what was
    written through other proxies before they reloaded.  Returns warnings (proxies that did
    not acknowledge in time)."""
    generation = await read_generation(conn, schema)
    lagging = await wait_for_listeners(conn, schema, generation, timeout)
    warnings: tuple[str, ...] = ()
    if lagging:
        warnings = (f"{len(lagging)} tvproxy instance(s) (listener backend pid "
                    f"{', '.join(map(str, lagging))}) did not load TVIEW catalog generation "
                    f"{generation} within {timeout:g}s: writes through them may leave TVIEWs "
                    f"stale until they reload (`tvproxy tview refresh` repairs)",)
    if entities:
        known = {e.entity for e in await load_catalog(conn, schema)}
        for entity in entities:
            if entity in known:
                await refresh_full(conn, entity, schema, lock_namespace)
    return warnings


async def create_tview(conn: Any, ddl: str | CreateTview, schema: str = DEFAULT_SCHEMA,
                       lock_namespace: int = DEFAULT_LOCK_NAMESPACE,
                       sync_timeout: float = SYNC_TIMEOUT) -> CreateResult:
    """Create v_x, tv_x (pk, fk and GIN indexes) and the catalog row in one transaction (then,
    when that was this call's own transaction, :func:`sync_catalog`)."""
    stmt = parse_tview_ddl(ddl) if isinstance(ddl, str) else ddl
    if not isinstance(stmt, CreateTview):
        raise TviewError("42601", "not a CREATE TABLE tv_<entity> AS SELECT statement")
    own = not _in_transaction(conn)
    await ensure_catalog(conn, schema, lock_namespace)
    async with conn.transaction():
        # first: the generation row's lock orders concurrent TVIEW DDL, so the catalog read
        # next includes whatever committed before
        await bump_generation(conn, schema)
        catalog = {e.entity: e for e in await load_catalog(conn, schema)}
        if stmt.entity in catalog:
            raise TviewError("42P07", f'TVIEW "{stmt.table}" already exists')
        rel_schema = stmt.schema or await conn.fetchval("SELECT current_schema()::text")
        view = f"{q(rel_schema)}.{q(stmt.view)}"
        table = f"{q(rel_schema)}.{q(stmt.table)}"
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            raise TviewError("42P07", f'relation "{stmt.table}" already exists')
        await conn.execute(f"CREATE VIEW {view} AS {stmt.select_sql}")
        cols = await _columns(conn, view)
        tvcols = check_columns(stmt.table, cols)
        sources = await view_sources(conn, view)
        tables = [s for s in sources if s.kind == "table"]
        views = {s.name for s in sources if s.kind == "view"}
        depends = tuple(sorted(e.entity for e in catalog.values() if e.view_name in views))
        graph = {e.entity: set(e.depends_on) for e in catalog.values()}
        graph[stmt.entity] = set(depends)
        refresh_order(graph)  # 55P03 on a cycle
        base_sources: dict[str, list[str]] = {}
        for src in tables:
            if src.schema == schema:
                continue
            await conn.execute(f"LOCK TABLE {q(src.schema)}.{q(src.name)} IN SHARE MODE")
            base_sources[src.name] = [n for n, _ in await _columns(
                conn, f"{q(src.schema)}.{q(src.name)}")]
        covered = {d: frozenset(r["table"] for r in catalog[d].key_mapping.get("rules", ()))
                   | frozenset(catalog[d].key_mapping.get("unmapped", ())) for d in depends}
        self_ref = await _self_reference(conn, stmt, tvcols.pk, sources, base_sources)
        mapping = key_mapping(stmt.entity, [n for n, _ in cols], base_sources, covered,
                              self_ref)
        tree = dict(mapping.tree) if mapping.tree is not None else None
        if tree is not None:
            tree["guard"] = await ensure_guard(conn, schema)
        mapped = {r.table for r in mapping.rules}
        await conn.execute(f"CREATE TABLE {table} AS SELECT * FROM {view} WITH NO DATA")
        await conn.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({q(tvcols.pk)})")
        for fk in tvcols.fks:
            await conn.execute(f"CREATE INDEX ON {table} ({q(fk)})")
        await conn.execute(f"CREATE INDEX ON {table} USING gin (data)")
        status = await conn.execute(f"INSERT INTO {table} SELECT * FROM {view}")
        rows = int(status.split()[-1])
        entry = CatalogEntry(
            stmt.entity, stmt.table, stmt.view, tvcols.pk, tvcols.pk_type, stmt.select_sql,
            tuple(sorted(f"{s.schema}.{s.name}" for s in sources)), depends,
            {"schema": rel_schema, "columns": [n for n, _ in cols],
             "rules": [{"table": r.table, "entity": r.entity, "rule": r.rule,
                        "column": r.column, "via": r.via} for r in mapping.rules],
             "unmapped": sorted(set(base_sources) - mapped), "self_checked": True,
             "touch": await ensure_touch(conn, schema),
             **({"tree": tree} if tree is not None else {})},
            mapping.strategy)
        await save_entry(conn, schema, entry)
    warnings = tuple(mapping.warnings)
    if own:
        warnings += await sync_catalog(conn, schema, lock_namespace, [stmt.entity], sync_timeout)
    return CreateResult(stmt.entity, rows, mapping.strategy, warnings)


async def _view_definitions(conn: Any, names: list[tuple[str, str]]) -> dict[str, str]:
    """The definitions of the views among ``names`` ((schema, name) pairs; other relations are
    left out), by name and by ``schema.name``, as tview/selfref.py expands them."""
    views: dict[str, str] = {}
    for schema, name in names:
        sql = await conn.fetchval(
            "SELECT pg_get_viewdef(c.oid) FROM pg_class c WHERE c.oid = to_regclass($1)"
            " AND c.relkind = 'v'", f"{q(schema)}.{q(name)}")
        if sql is not None:
            views.setdefault(name, sql)
            views[f"{schema}.{name}"] = sql
    return views


async def _unanalysed_trees(conn: Any, entries: list[CatalogEntry],
                            tables: dict[str, BaseTable]) -> list[str]:
    """TVIEWs created before self-references were analysed (no ``self_checked`` in their key
    mapping) whose view reads its own base table more than once: refreshed fully when that
    table changes (never stale), with a WARNING to create them again."""
    out = []
    for entry in entries:
        mapping = entry.key_mapping
        table = f"tb_{entry.entity}"
        if mapping.get("self_checked") or "tree" in mapping or table not in tables or not any(
                r.get("rule") == "self" for r in mapping.get("rules", ())):
            continue
        split = [src.rpartition(".") for src in entry.sources]
        views = await _view_definitions(conn, [(sch or "public", name)
                                               for sch, _, name in split])
        base = tables[table]
        columns = {t: list(b.columns) for t, b in tables.items()}
        ref = self_reference(entry.definition, table, base.pk, entry.pk_column, columns, views,
                             base.schema)
        if ref is not None and (ref.problem or ref.terms):
            log.warning("tview reads its own base table but was created before that was "
                        "analysed: refreshed fully when it changes; create it again",
                        tview=entry.table_name, table=table)
            out.append(entry.entity)
    return out


async def _self_reference(conn: Any, stmt: CreateTview, out_pk: str,
                          sources: list[ViewSource],
                          base_sources: dict[str, list[str]]) -> SelfReference | None:
    """How the new TVIEW's SELECT reads its own base table (through the views it reads, from
    their definitions), when it reads it at all."""
    table = f"tb_{stmt.entity}"
    own = next((s for s in sources if s.kind == "table" and s.name == table), None)
    if own is None or table not in base_sources:
        return None
    base = await _base_table(conn, own.schema, own.name)
    views = await _view_definitions(conn, [(s.schema, s.name) for s in sources
                                           if s.kind == "view"])
    return self_reference(stmt.select_sql, table, base.pk if base else f"pk_{stmt.entity}",
                          out_pk, base_sources, views, own.schema)


async def drop_tviews(conn: Any, ddl: str | DropTviews, schema: str = DEFAULT_SCHEMA,
                      warnings: list[str] | None = None,
                      sync_timeout: float = SYNC_TIMEOUT) -> list[str]:
    """Drop TVIEWs (and, with CASCADE, the TVIEWs built on them); returns the entities dropped.
    In its own transaction it then waits for every proxy to stop maintaining them
    (:func:`sync_catalog`; its warnings go to ``warnings``)."""
    stmt = parse_tview_ddl(ddl) if isinstance(ddl, str) else ddl
    if not isinstance(stmt, DropTviews):
        raise TviewError("42601", "not a DROP TABLE tv_<entity> statement")
    own = not _in_transaction(conn)
    async with conn.transaction():
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{q(schema)}.tview"):
            await bump_generation(conn, schema)  # orders it after concurrent TVIEW DDL
        catalog = {e.table_name: e for e in await load_catalog(conn, schema)}
        todo: list[str] = []
        for name in stmt.tables:
            if name not in catalog:
                if stmt.if_exists:
                    continue
                raise TviewError("42P01", f'TVIEW "{name}" does not exist')
            todo.append(name)
        dropped: list[str] = []
        while todo:
            name = todo.pop()
            entry = catalog[name]
            if entry.entity in dropped:
                continue
            users = [e for e in catalog.values() if entry.entity in e.depends_on
                     and e.entity not in dropped and e.table_name not in stmt.tables]
            if users and not stmt.cascade:
                raise TviewError(
                    "2BP01", f'cannot drop TVIEW {name} because TVIEW {users[0].table_name} '
                             f'depends on it (use DROP ... CASCADE)')
            todo.extend(u.table_name for u in users)
            rel_schema = entry.key_mapping.get("schema", "public")
            await conn.execute(f"DROP VIEW IF EXISTS {q(rel_schema)}.{q(entry.view_name)} CASCADE")
            await conn.execute(f"DROP TABLE IF EXISTS {q(rel_schema)}.{q(entry.table_name)}")
            await delete_entry(conn, schema, entry.entity)
            dropped.append(entry.entity)
    if own and dropped:
        found = await sync_catalog(conn, schema, DEFAULT_LOCK_NAMESPACE, (), sync_timeout)
        if warnings is not None:
            warnings.extend(found)
    return dropped


async def load_versioned(conn: Any, schema: str = DEFAULT_SCHEMA) -> tuple[int, RuntimeCatalog]:
    """The catalog generation and the runtime catalog, which is at least that generation."""
    generation = await read_generation(conn, schema)
    return generation, await load_runtime(conn, schema)


async def load_runtime(conn: Any, schema: str = DEFAULT_SCHEMA) -> RuntimeCatalog:
    """The engine's view of a database's TVIEWs (empty when there is no catalog)."""
    entries = await load_catalog(conn, schema)
    tables: dict[str, BaseTable] = {}
    for entry in entries:
        names = [r["table"] for r in entry.key_mapping.get("rules", ())]
        names += list(entry.key_mapping.get("unmapped", ()))
        for name in names:
            if name in tables:
                continue
            src = next((s for s in entry.sources if s.rsplit(".", 1)[-1] == name), None)
            src_schema = src.rsplit(".", 1)[0] if src and "." in src else "public"
            base = await _base_table(conn, src_schema, name)
            if base is not None:
                tables[name] = base
    opaque = await _opaque_facts(conn, schema) if entries else None
    rt = build_runtime(entries, tables, opaque=opaque)
    for entity in await _unanalysed_trees(conn, entries, tables):
        rt.full_on.setdefault(entity, []).append(entity)
    rt.server_version = int(await conn.fetchval(
        "SELECT current_setting('server_version_num')")) // 10000
    return rt


# Volatile functions and procedures an application defined (not the system's, not extensions'):
# a statement calling one may write anything.
_FUNCTIONS_SQL = """
SELECT DISTINCT lower(p.proname) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', $1) AND n.nspname NOT LIKE 'pg\\_%'
  AND p.provolatile = 'v' AND p.prokind IN ('f', 'p') AND p.prorettype <> 'trigger'::regtype
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                  AND d.objid = p.oid AND d.deptype = 'e')
"""
# Tables whose writes run more than the statement: user triggers, or a foreign key that
# cascades (ON DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT) points at them.
_TRIGGER_TABLES_SQL = """
SELECT lower(c.relname) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal
UNION
SELECT lower(c.relname) FROM pg_constraint k JOIN pg_class c ON c.oid = k.confrelid
WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
"""


async def _opaque_facts(conn: Any, schema: str) -> OpaqueFacts:
    functions = frozenset(r[0] for r in await conn.fetch(_FUNCTIONS_SQL, schema))
    tables = frozenset(r[0] for r in await conn.fetch(_TRIGGER_TABLES_SQL))
    track = await conn.fetchval("SELECT current_setting('track_counts')::bool")
    return OpaqueFacts(functions, tables, bool(track))


async def refresh_full(conn: Any, entity: str | None = None, schema: str = DEFAULT_SCHEMA,
                       lock_namespace: int = DEFAULT_LOCK_NAMESPACE
                       ) -> dict[str, tuple[int, int]]:
    """Recompute TVIEWs from their views (diff: upsert changed rows, delete vanished ones)."""
    from tvproxy.tview.planner import ALL_KEYS, plan_refresh

    rt = await load_runtime(conn, schema)
    wanted = [entity] if entity else rt.order
    out: dict[str, tuple[int, int]] = {}
    async with conn.transaction():
        for e in wanted:
            if e not in rt.specs:
                raise TviewError("42P01", f'TVIEW "tv_{e}" does not exist')
            plan = plan_refresh({e: rt.specs[e]}, [e], {e: {ALL_KEYS}}, rt.key_types,
                                lock_namespace, all_keys=rt.all_keys)
            assert plan is not None
            for sql, params in zip(plan.statements[:-1], plan.params[:-1], strict=True):
                await conn.fetch(sql, *params)
            row = await conn.fetchrow(plan.statements[-1], *plan.params[-1])
            out[e] = (row["upserted"], row["deleted"])
    return out


async def verify(conn: Any, schema: str = DEFAULT_SCHEMA) -> dict[str, int]:
    """Rows that differ between each tv_x and its v_x (0 everywhere means fresh)."""
    rt = await load_runtime(conn, schema)
    out: dict[str, int] = {}
    for e in rt.order:
        spec = rt.specs[e]
        cols = ", ".join(q(c) for c in spec.columns)
        tv, view = f"{q(spec.schema)}.{q(spec.table)}", f"{q(spec.schema)}.{q(spec.view)}"
        out[e] = await conn.fetchval(
            f"SELECT count(*) FROM ((SELECT {cols} FROM {tv} EXCEPT SELECT {cols} FROM {view})"
            f" UNION ALL (SELECT {cols} FROM {view} EXCEPT SELECT {cols} FROM {tv})) d")
    return out
