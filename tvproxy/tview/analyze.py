"""TVIEW declarations and the entity graph (pure, no I/O).

- :func:`parse_tview_ddl` recognises pg_tviews-style DDL sent through the proxy:
  ``CREATE TABLE tv_x AS SELECT ...`` and ``DROP TABLE [IF EXISTS] tv_x[, ...] [CASCADE]``.
  A ``CREATE TABLE`` whose name lacks the ``tv_`` prefix is not a TVIEW.
- :func:`check_columns` applies the column conventions (first ``pk_<entity>``, ``data jsonb``,
  ``fk_*`` for propagation) to the view's output columns.
- :func:`refresh_order` orders TVIEWs so dependencies come first and rejects cycles (55P03).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.enums import DropBehavior, ObjectType
from pglast.stream import RawStream

from tvproxy.tview.selfref import SelfReference

PREFIX = "tv_"


def quote_ident(name: str) -> str:
    """A SQL identifier, always quoted (refresh SQL never splices names unquoted)."""
    return '"' + name.replace('"', '""') + '"'


class TviewError(Exception):
    """A TVIEW declaration PostgreSQL-style: SQLSTATE plus a message naming the construct."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class CreateTview:
    entity: str
    table: str  # tv_<entity>
    view: str  # v_<entity>
    schema: str | None
    select_sql: str  # the SELECT, deparsed


@dataclass(frozen=True)
class DropTviews:
    tables: tuple[str, ...]
    if_exists: bool
    cascade: bool


@dataclass(frozen=True)
class TviewColumns:
    pk: str
    pk_type: str
    fks: tuple[str, ...]


def parse_tview_ddl(sql: str) -> CreateTview | DropTviews | None:
    """The TVIEW DDL in a single statement, or None for anything else."""
    low = sql.lstrip().lower()
    if not (low.startswith(("create", "drop")) and PREFIX in low):
        return None
    try:
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    if len(stmts) != 1:
        return None
    stmt = stmts[0].stmt
    if isinstance(stmt, ast.CreateTableAsStmt) and stmt.objtype == ObjectType.OBJECT_TABLE:
        rel = stmt.into.rel
        if not rel.relname.startswith(PREFIX) or len(rel.relname) == len(PREFIX):
            return None
        if not isinstance(stmt.query, ast.SelectStmt) or stmt.query.valuesLists:
            what = "VALUES" if isinstance(stmt.query, ast.SelectStmt) else "EXECUTE"
            raise TviewError("42601", f"TVIEW {rel.relname} must be defined by a SELECT, not {what}")
        entity = rel.relname[len(PREFIX):]
        return CreateTview(entity, rel.relname, "v_" + entity, rel.schemaname,
                           RawStream()(stmt.query))
    if isinstance(stmt, ast.DropStmt) and stmt.removeType == ObjectType.OBJECT_TABLE:
        names = tuple(obj[-1].sval for obj in stmt.objects)
        if not names or not all(n.startswith(PREFIX) for n in names):
            return None
        return DropTviews(names, bool(stmt.missing_ok), stmt.behavior == DropBehavior.DROP_CASCADE)
    return None


def check_columns(table: str, columns: Sequence[tuple[str, str]]) -> TviewColumns:
    """Validate the view's output ``(name, type)`` columns against the TVIEW conventions."""
    names = [name for name, _ in columns]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TviewError("42701", f'column "{dup}" specified more than once in TVIEW {table}')
    pks = [(n, t) for n, t in columns if n.startswith("pk_")]
    if not pks:
        raise TviewError("42703", f"TVIEW {table} needs a pk_<entity> column (its primary key)")
    types = dict(columns)
    if "data" not in types:
        raise TviewError("42703", f"TVIEW {table} needs a data column of type jsonb")
    if types["data"] != "jsonb":
        raise TviewError("42804", f'column "data" of TVIEW {table} is {types["data"]}, not jsonb')
    return TviewColumns(pks[0][0], pks[0][1], tuple(n for n in names if n.startswith("fk_")))


def refresh_order(depends_on: Mapping[str, set[str]]) -> list[str]:
    """Entities ordered dependencies first (stable by name); a cycle raises 55P03."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        mark = state.get(node)
        if mark == 2:
            return
        if mark == 1:
            cycle = " -> ".join([*path[path.index(node):], node])
            raise TviewError("55P03", f"TVIEW dependency cycle: {cycle}")
        state[node] = 1
        for dep in sorted(depends_on.get(node, ())):
            visit(dep, [*path, node])
        state[node] = 2
        order.append(node)

    for node in sorted(depends_on):
        visit(node, [])
    return order


@dataclass(frozen=True)
class SourceRule:
    table: str
    entity: str  # the base entity: tb_<entity>
    rule: str  # self | embedding | aggregation | transitive
    column: str | None  # fk_ column: on the tv_ table (embedding) or the child table (aggregation)
    via: str | None = None  # transitive: the embedded TVIEW entity that covers it


@dataclass(frozen=True)
class KeyMapping:
    rules: tuple[SourceRule, ...]
    strategy: str  # incremental | full
    warnings: tuple[str, ...]
    # a view reading other rows of its own base table: {"link": fk column, "terms": [[down,
    # up], ...]} (tview/selfref.py; treekeys.SelfRule at run time)
    tree: dict[str, object] | None = None


def base_entity(table: str) -> str | None:
    return table[3:] if table.startswith("tb_") and len(table) > 3 else None


def key_mapping(
    entity: str,
    tv_columns: Sequence[str],
    base_sources: Mapping[str, Sequence[str]],
    covered_by: Mapping[str, frozenset[str]],
    self_ref: SelfReference | None = None,
) -> KeyMapping:
    """How a write to each base table a TVIEW reads maps to rows of ``tv_<entity>``.

    ``base_sources``: every base table the view reads (through nested views too) with its
    columns. ``covered_by``: for each other TVIEW entity this one embeds (``fk_<d>`` on the tv
    table), the base tables that TVIEW already maps, so their writes reach this one transitively.
    A table none of the rules maps makes the TVIEW ``full`` (diff refresh when it is touched),
    with a warning naming it, never silent staleness.

    ``self_ref``: how the view reads its own base table when it reads it more than once
    (tview/selfref.py): the propagation between its rows, or, when it cannot be said, the
    table is not mapped (full, with the problem in the warning).
    """
    tv_fks = {c for c in tv_columns if c.startswith("fk_")}
    rules: list[SourceRule] = []
    warnings: list[str] = []
    for table in sorted(base_sources):
        b = base_entity(table)
        columns = set(base_sources[table])
        if b == entity and self_ref is not None and self_ref.problem:
            warnings.append(
                f"TVIEW tv_{entity} (view v_{entity}) reads other rows of {table}: "
                f"{self_ref.problem}; it is refreshed fully when {table} changes")
        elif b == entity:
            rules.append(SourceRule(table, b, "self", None))
        elif b is not None and f"fk_{b}" in tv_fks:
            rules.append(SourceRule(table, b, "embedding", f"fk_{b}"))
        elif f"fk_{entity}" in columns:
            rules.append(SourceRule(table, b or table, "aggregation", f"fk_{entity}"))
        else:
            via = next((d for d in sorted(covered_by) if table in covered_by[d]
                        and f"fk_{d}" in tv_fks), None)
            if via is not None:
                rules.append(SourceRule(table, b or table, "transitive", None, via))
            else:
                warnings.append(
                    f"TVIEW tv_{entity}: writes to {table} cannot be mapped to rows "
                    f"(no fk_{b or table} column on tv_{entity}, no fk_{entity} column on "
                    f"{table}); it is refreshed fully when {table} changes")
    tree: dict[str, object] | None = None
    if self_ref is not None and not self_ref.problem and self_ref.terms and self_ref.link:
        tree = {"link": self_ref.link, "terms": [list(t) for t in self_ref.terms]}
    return KeyMapping(tuple(rules), "full" if warnings else "incremental", tuple(warnings),
                      tree)
